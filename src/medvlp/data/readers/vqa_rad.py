"""VQA-RAD (Lau et al., Scientific Data 2018), in the two layouts users have.

- ``m3ae``: ``trainset.json`` + ``testset.json`` (3,064 / 451 questions: the original train set plus templated
  "frame" questions, and the original test set), the split M3AE and most Med-VQA papers report on.
- ``original``: the release's ``VQA_RAD Dataset Public.json`` (2,248 questions), split by ``phrase_type``:
  ``freeform``/``para`` are train, ``test_freeform``/``test_para`` test.

Both read images from ``VQA_RAD Image Folder/`` (or ``images/``). ``layout=auto`` takes ``m3ae`` when its
files are there, then ``original``, then ``parquet``: a hub copy such as flaxwu/vqa-rad (``layout=hub`` loads
one online; see ``hub.py``). Answers and answer types are normalised by the prepare pipeline; answers stored as JSON
numbers become text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers import hub
from medvlp.data.readers.common import choose_layout, find_dir, json_records, text_or_none, vqa_example

PUBLIC = "VQA_RAD Dataset Public.json"
M3AE_FILES = {"train": "trainset.json", "test": "testset.json"}
IMAGE_DIRS = ("VQA_RAD Image Folder", "images")
FIELDS = ("qid", "image_name", "question", "answer", "answer_type")
ORIGINAL_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


def _layout(raw: Path, config: PrepareConfig) -> str:
    return choose_layout(
        raw, config,
        {"m3ae": lambda r: all((r / f).is_file() for f in M3AE_FILES.values()),
         "original": lambda r: (r / PUBLIC).is_file(), "parquet": hub.has_parquet},
        dataset="VQA-RAD", missing=f"found neither {' + '.join(M3AE_FILES.values())} nor {PUBLIC!r} nor parquet files",
        other=("hub",))


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    layout = _layout(raw, config)
    if layout in hub.LAYOUTS:
        yield from hub.read_vqa(raw, config, layout)
        return
    images = find_dir(raw, config.options.get("image_dir"), IMAGE_DIRS, "VQA-RAD image folder")
    yield Info("layout", layout)
    on_disk = sorted(n for n in os.listdir(images) if not n.startswith("."))
    yield Info("images_in_folder", len(on_disk))
    referenced: set[str] = set()
    files = M3AE_FILES.items() if layout == "m3ae" else [(None, PUBLIC)]
    for fixed_split, name in files:
        fields = FIELDS if fixed_split else (*FIELDS, "phrase_type")
        for found in json_records(raw / name, name, fields, "restore the field from the original release"):
            if isinstance(found, Bad):
                yield found
                continue
            where, record = found
            split = fixed_split or ORIGINAL_SPLITS.get(str(record["phrase_type"]))
            if split is None:
                yield Bad(where, f"unknown phrase_type {record['phrase_type']!r}",
                          f"use one of {', '.join(ORIGINAL_SPLITS)}")
                continue
            example = vqa_example(split, where, record, images, "image_name",
                                  {"organ": text_or_none(record.get("image_organ")),
                                   "question_type": text_or_none(record.get("question_type")),
                                   "phrase_type": text_or_none(record.get("phrase_type"))})
            if isinstance(example, Example):
                referenced.add(example.image_key)
            yield example
    yield Info("images_unreferenced", [n for n in on_disk if n not in referenced])

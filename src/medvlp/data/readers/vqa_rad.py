"""VQA-RAD (Lau et al., Scientific Data 2018), in the two layouts users have.

- ``m3ae``: ``trainset.json`` + ``testset.json`` (3,064 / 451 questions: the original train set plus templated
  "frame" questions, and the original test set), the split M3AE and most Med-VQA papers report on.
- ``original``: the release's ``VQA_RAD Dataset Public.json`` (2,248 questions), split by ``phrase_type``:
  ``freeform``/``para`` are train, ``test_freeform``/``test_para`` test.

Both read images from ``VQA_RAD Image Folder/`` (or ``images/``). ``layout=auto`` takes ``m3ae`` when its
files are there. Answers and answer types are normalised by the prepare pipeline; answers stored as JSON
numbers become text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from medvlp.data.images import ImageError, safe_join
from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers.common import find_dir, read_json_list
from medvlp.errors import ConfigError, DataError

PUBLIC = "VQA_RAD Dataset Public.json"
M3AE_FILES = {"train": "trainset.json", "test": "testset.json"}
IMAGE_DIRS = ("VQA_RAD Image Folder", "images")
FIELDS = ("qid", "image_name", "question", "answer", "answer_type")
ORIGINAL_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


def _layout(raw: Path, config: PrepareConfig) -> str:
    layout = config.layout
    if layout == "auto":
        if all((raw / f).is_file() for f in M3AE_FILES.values()):
            return "m3ae"
        if (raw / PUBLIC).is_file():
            return "original"
        raise DataError(f"{raw}: found neither {' + '.join(M3AE_FILES.values())} nor {PUBLIC!r}; "
                        "point --raw at the VQA-RAD folder")
    if layout not in ("m3ae", "original"):
        raise ConfigError(f"layout={layout!r}: VQA-RAD has layouts 'm3ae' and 'original' (or 'auto')")
    return layout


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    layout = _layout(raw, config)
    images = find_dir(raw, config.options.get("image_dir"), IMAGE_DIRS, "VQA-RAD image folder")
    yield Info("layout", layout)
    on_disk = sorted(n for n in os.listdir(images) if not n.startswith("."))
    yield Info("images_in_folder", len(on_disk))
    referenced: set[str] = set()
    files = M3AE_FILES.items() if layout == "m3ae" else [(None, PUBLIC)]
    for fixed_split, name in files:
        for index, record in read_json_list(raw / name):
            where = f"{name} record {index}"
            if not isinstance(record, dict):
                yield Bad(where, "not a JSON object", "each record must be an object with the VQA-RAD fields")
                continue
            missing = [f for f in FIELDS if f not in record] + (
                ["phrase_type"] if fixed_split is None and "phrase_type" not in record else [])
            if missing:
                yield Bad(where, f"missing field {missing[0]!r}", "restore the field from the original release")
                continue
            split = fixed_split or ORIGINAL_SPLITS.get(str(record["phrase_type"]))
            if split is None:
                yield Bad(where, f"unknown phrase_type {record['phrase_type']!r}",
                          f"use one of {', '.join(ORIGINAL_SPLITS)}")
                continue
            image_name = str(record["image_name"])
            try:
                image = safe_join(images, image_name)
            except ImageError as e:
                yield Bad(where, f"field 'image_name': {e}", "name an image inside the image folder")
                continue
            referenced.add(image_name)
            yield Example(
                split=split, id=str(record["qid"]), image=image, image_key=image_name, where=where,
                fields={"question": record["question"], "answer": record["answer"],
                        "answer_type": record["answer_type"], "image_name": image_name,
                        "organ": _text(record.get("image_organ")), "question_type": _text(record.get("question_type")),
                        "phrase_type": _text(record.get("phrase_type"))},
            )
    yield Info("images_unreferenced", [n for n in on_disk if n not in referenced])


def _text(value: object) -> str | None:
    return None if value is None else str(value).strip()

"""SLAKE 1.0 (Liu et al., ISBI 2021): bilingual radiology VQA, of which the English questions are used.

- ``json`` (the release): ``train.json``, ``validate.json`` (split ``val``), ``test.json``, one list of
  questions each (``qid, img_name, question, answer, answer_type, q_lang, location, modality, content_type``
  ...), and the images in ``imgs/xmlabN/source.jpg``. Only ``q_lang == "en"`` questions are kept (4,919 /
  1,053 / 1,061); the others are counted in the manifest (``source.questions_not_english``). Answer types are
  ``OPEN``/``CLOSED``.
- ``parquet`` / ``hub``: hub copies with image, question and answer columns (see ``hub.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Info, Item, PrepareConfig
from medvlp.data.readers import hub
from medvlp.data.readers.common import choose_layout, find_dir, json_records, text_or_none, vqa_example

FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
IMAGE_DIRS = ("imgs",)
FIELDS = ("qid", "img_name", "question", "answer", "answer_type", "q_lang")


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    layout = choose_layout(raw, config, {"json": lambda r: (r / FILES["train"]).is_file(), "parquet": hub.has_parquet},
                           dataset="SLAKE", missing=f"found neither {', '.join(FILES.values())} nor parquet files",
                           other=("hub",))
    if layout in hub.LAYOUTS:
        yield from hub.read_vqa(raw, config, layout)
        return
    images = find_dir(raw, config.options.get("image_dir"), IMAGE_DIRS, "SLAKE image folder",
                      hint="the question files name images as imgs/xmlabN/source.jpg: unpack the release's "
                           "imgs.zip beside train.json")
    yield Info("layout", layout)
    other_language = 0
    for split, name in FILES.items():
        for found in json_records(raw / name, name, FIELDS, "restore the field from the SLAKE release"):
            if isinstance(found, Bad):
                yield found
                continue
            where, record = found
            if record["q_lang"] != "en":
                other_language += 1
                continue
            yield vqa_example(split, where, record, images, "img_name",
                              {k: text_or_none(record.get(k)) for k in ("location", "modality", "content_type")})
    yield Info("questions_not_english", other_language)

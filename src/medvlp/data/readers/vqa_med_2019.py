"""VQA-Med-2019 (ImageCLEF 2019): radiology questions on modality, organ system and plane, all open.

Layout: ``{train,val,test}/QA/{Modality,Organ,Plane}.csv``, each line ``image_id|question|answer`` (no
header), and the images in ``{split}/images/{image_id}.jpg``. The three named category files are read; some
copies also hold ``Abnormality.csv``, which is left out by default (its answers are free text, and the M3AE
benchmark's 79 answer classes are those of the three named categories) and listed in the manifest
(``source.categories_ignored``). ``options.categories=[Modality,Organ,Plane,Abnormality]`` names the
categories to read, ``options.categories=all`` reads every ``*.csv`` in ``QA/``. A record's id is
``Category/image_id``; its category is kept in the ``category`` field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers.common import image_in, need_file, read_delimited, split_name
from medvlp.data.records import split_order
from medvlp.errors import ConfigError, DataError

CATEGORIES = ("Modality", "Organ", "Plane")
COLUMNS = ("image_id", "question", "answer")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


def _categories(config: PrepareConfig) -> list[str] | None:
    chosen = config.options.get("categories", list(CATEGORIES))
    if chosen == "all":
        return None
    if isinstance(chosen, str):
        chosen = [c.strip() for c in chosen.split(",") if c.strip()]
    if not isinstance(chosen, list) or not chosen or not all(isinstance(c, str) for c in chosen):
        raise ConfigError(f"options.categories={chosen!r}: give a list of category names, or all")
    return chosen


def _splits(raw: Path) -> dict[str, Path]:
    splits = {split_name(p.name): p for p in sorted(raw.iterdir()) if p.is_dir() and (p / "QA").is_dir()}
    splits.pop(None, None)
    splits = dict(sorted(splits.items(), key=lambda item: split_order(item[0])))
    if "train" not in splits:
        raise DataError(f"{raw}: no train/QA/ folder; point --raw at the VQA-Med-2019 folder holding "
                        "train/, val/ and test/")
    return splits  # type: ignore[return-value]


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    chosen = _categories(config)
    ignored: set[str] = set()
    for split, folder in _splits(raw).items():
        on_disk = sorted(p.stem for p in (folder / "QA").glob("*.csv"))
        categories = on_disk if chosen is None else chosen
        ignored.update(c for c in on_disk if c not in categories)
        images = folder / "images"
        for category in categories:
            path = need_file(folder / "QA" / f"{category}.csv", "each split needs a file for every category in "
                             "options.categories")
            label = str(path.relative_to(raw))
            for found in read_delimited(path, label, sep="|", columns=COLUMNS, header=False):
                if isinstance(found, Bad):
                    yield found
                    continue
                where, row = found
                image_id = row["image_id"].strip()
                name = image_id if image_id.lower().endswith(IMAGE_SUFFIXES) else f"{image_id}.jpg"
                image = image_in(images, name, where, "image_id")
                if isinstance(image, Bad):
                    yield image
                    continue
                yield Example(
                    split=split, id=f"{category}/{image_id}", image=image, image_key=f"{folder.name}/{name}",
                    where=where, fields={"question": row["question"], "answer": row["answer"],
                                         "answer_type": "open", "category": category, "image_name": name},
                )
    yield Info("categories_ignored", sorted(ignored))

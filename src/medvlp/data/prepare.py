"""The prepare pipeline: a reader's examples in, a prepared dataset out, bad records counted and reported.

A reader (one function per raw layout, see ``registry.py``) yields ``Example``s, ``Bad`` records it could not
read, and ``Info`` about the source. This module does everything that is the same for every dataset: checks
the family's fields, normalises answers, loads each image once (converting or refusing it), carves a seeded
validation split, builds the answer vocabulary or label set, reports every skipped record on one line, fails
when too many are bad, and writes the record format.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.config import at_least, to_dict
from medvlp.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from medvlp.data.records import DatasetWriter, split_order
from medvlp.data.text import MAX_TEXT_CHARS, clean_text, normalize_answer, normalize_answer_type
from medvlp.errors import ConfigError, DataError


@dataclass
class PrepareConfig:
    """Options of ``medvlp prepare`` (all overridable as ``key=value``)."""

    layout: str = "auto"  # which raw layout to read, where a dataset ships in several
    val_fraction: float = 0.0  # carve this fraction of train into "val" (seeded) when the source has no val
    seed: int = 0
    max_bad_fraction: float = 0.05  # fail when more than this fraction of records is bad
    max_short_side: int = 512  # bound on the stored images' shorter side; 0 keeps the original size
    # images above this many pixels (width x height, read from the header) are refused before decoding
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=at_least(1))
    # longer texts (captions, questions) are cut to this many characters, and counted
    max_text_chars: int = field(default=MAX_TEXT_CHARS, metadata=at_least(1))
    options: dict[str, Any] = field(default_factory=dict)  # reader-specific settings

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")
        if self.max_short_side < 0:
            raise ConfigError(f"max_short_side={self.max_short_side}: must be 0 (keep) or a positive size")


@dataclass(frozen=True)
class Example:
    """One record as a reader found it. ``image`` is a file inside the raw root (already checked with
    ``safe_join``) or encoded bytes; ``image_key`` names it, so records sharing an image store it once."""

    split: str
    id: str
    image: Path | bytes
    image_key: str
    fields: dict[str, Any]
    where: str  # "trainset.json record 12": for messages


@dataclass(frozen=True)
class Bad:
    """A record the reader could not use: where it is, what is wrong, what to do."""

    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; {self.fix}"


@dataclass(frozen=True)
class Info:
    """A fact about the source, kept in the manifest under ``source`` (e.g. images found in the folder)."""

    key: str
    value: Any


Item = Example | Bad | Info
Reader = Callable[[Path, PrepareConfig], Iterator[Item]]
MAX_REPORTED = 30


class Tally:
    """Counts and reports skipped records, one line each (the first ``MAX_REPORTED``)."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.bad, self.good = report, [], 0

    def skip(self, bad: Bad) -> None:
        self.bad.append(bad)
        if len(self.bad) <= MAX_REPORTED:
            self.report(f"skipped {bad}")
        elif len(self.bad) == MAX_REPORTED + 1:
            self.report("further skipped records are counted but not listed")

    def check(self, max_fraction: float, what: str) -> None:
        total = self.good + len(self.bad)
        if total == 0:
            raise DataError(f"{what}: no records found; check that --raw points at the dataset's top folder")
        if len(self.bad) / total > max_fraction:
            raise DataError(
                f"{what}: {len(self.bad)} of {total} records are bad ({len(self.bad) / total:.1%}), more than "
                f"max_bad_fraction={max_fraction}; fix the raw data (see the lines above) or raise max_bad_fraction"
            )


def _check_fields(family: str, example: Example, max_chars: int = MAX_TEXT_CHARS,
                  altered: dict[str, int] | None = None) -> tuple[dict[str, Any], Bad | None]:
    """The family's fields, normalised (texts cleaned by ``clean_text``, what it changed counted in
    ``altered``), or the reason the record is unusable."""
    f = dict(example.fields)
    altered = {} if altered is None else altered

    def bad(what: str, fix: str) -> tuple[dict[str, Any], Bad]:
        return f, Bad(example.where, what, fix)

    def clean(value: Any) -> str:
        cleaned, notes = clean_text(value, max_chars)
        for note in notes:
            altered[note] = altered.get(note, 0) + 1
        return cleaned

    def text(name: str) -> str:
        value = f.get(name)
        return clean(value) if value is not None else ""

    if family == "vqa":
        f["question"] = text("question")
        if not f["question"]:
            return bad("empty question", "give the question text or remove the record")
        raw_type = f.get("answer_type")
        f["answer_type"] = normalize_answer_type(raw_type)
        if f["answer_type"] is None:
            return bad(f"unknown answer type {raw_type!r}", "use OPEN or CLOSED")
        f["answer"] = normalize_answer(clean(f.get("answer"))) if f.get("answer") is not None else ""
        if not f["answer"]:
            return bad("empty answer", "give the answer or remove the record")
    elif family == "pretrain":
        f["captions"] = [c for c in (clean(c) for c in f.get("captions") or []) if c]
        if not f["captions"]:
            return bad("empty caption", "give the caption text or remove the record")
    elif family == "classification":
        f["text"], f["label"] = text("text"), text("label")
        if not f["label"]:
            return bad("empty label", "give the label or remove the record")
    elif family == "retrieval":
        f["caption"] = text("caption")
        if not f["caption"]:
            return bad("empty caption", "give the caption text or remove the record")
    return f, None


def write_prepared(name: str, family: str, items: Iterable[Item], out: Path, config: PrepareConfig, *,
                   source: dict[str, Any], extra_fields: tuple[str, ...] = (),
                   report: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Check, convert and write a reader's items as a prepared dataset; returns the manifest. ``out`` may be
    replaced when it holds a prepared dataset (or nothing); anything else only with ``force``."""
    report = report or logging.getLogger("medvlp").warning
    tally = Tally(report)
    splits: dict[str, list[dict[str, Any]]] = {}
    source = dict(source)
    converted: dict[str, int] = {}
    bad_images: dict[str, str] = {}
    ids: set[tuple[str, str]] = set()
    altered: dict[str, int] = {}
    with DatasetWriter(out, name=name, family=family, source=source, extra_fields=extra_fields,
                       force=force) as writer:
        for item in items:
            if isinstance(item, Info):
                source[item.key] = item.value
                continue
            if isinstance(item, Bad):
                tally.skip(item)
                continue
            fields, problem = _check_fields(family, item, config.max_text_chars, altered)
            if problem is None and (item.split, item.id) in ids:
                problem = Bad(item.where, f"duplicate id {item.id!r} in split {item.split!r}",
                              "give every record its own id")
            if problem is None:
                problem = _store_image(writer, item, config, bad_images, converted)
            if problem is not None:
                tally.skip(problem)
                continue
            ids.add((item.split, item.id))
            row = writer.image_row(item.image_key)
            splits.setdefault(item.split, []).append(
                {**{k: fields.get(k) for k in extra_fields}, **fields, "id": item.id, "image": row})
            tally.good += 1
        tally.check(config.max_bad_fraction, name)

        if config.val_fraction > 0:
            if "val" in splits:
                raise ConfigError(f"{name}: val_fraction={config.val_fraction} but the source has its own "
                                  "val split; leave val_fraction at 0")
            train = splits.get("train", [])
            order = list(range(len(train)))
            random.Random(config.seed).shuffle(order)
            chosen = set(order[:round(len(train) * config.val_fraction)])
            splits["val"] = [r for i, r in enumerate(train) if i in chosen]
            splits["train"] = [r for i, r in enumerate(train) if i not in chosen]

        skipped = {"count": len(tally.bad), "first": [str(b) for b in tally.bad[:50]]}
        extra: dict[str, Any] = {"config": to_dict(config), "skipped": skipped}
        if converted:
            extra["converted_images"] = converted
        if altered:
            extra["altered_texts"] = altered
            report(f"{name}: texts altered: " + ", ".join(f"{n} {what}" for what, n in sorted(altered.items())))
        if family == "vqa":  # answer classes: train and test answers together, as M3AE does
            extra["answer_vocab"] = sorted({r["answer"] for rows in splits.values() for r in rows})
        if family == "classification":
            extra["labels"] = sorted({r["label"] for rows in splits.values() for r in rows})
        for split in sorted(splits, key=split_order):
            rows = splits[split]
            stats = None
            if family == "vqa":
                stats = {t: sum(r["answer_type"] == t for r in rows) for t in ("closed", "open")}
            writer.write_split(split, rows, stats)
        return writer.commit(**extra)


def _store_image(writer: DatasetWriter, item: Example, config: PrepareConfig, bad_images: dict[str, str],
                 converted: dict[str, int]) -> Bad | None:
    """Store the record's image unless it is already stored; the reason it cannot be used, if any."""
    if writer.image_row(item.image_key) is not None:
        return None
    if item.image_key in bad_images:
        return Bad(item.where, bad_images[item.image_key], "fix or replace the image file")
    try:
        stored, note = load_image(item.image, config.max_short_side, max_pixels=config.max_pixels)
    except ImageError as e:
        shown = item.image if isinstance(item.image, Path) else item.image_key
        bad_images[item.image_key] = f"image {shown}: {e}"
        return Bad(item.where, bad_images[item.image_key], "fix or replace the image file")
    if note:
        converted[note] = converted.get(note, 0) + 1
    writer.add_image(item.image_key, stored)
    return None

"""MedICaT (Subramanian et al., Findings of EMNLP 2020): figures from PubMed Central papers with their
captions and the sentences that refer to them; the radiology figures are used for pre-training.

Layout: ``release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl``, one JSON object per line
(``pdf_hash``, ``fig_uri``, ``s2_caption``, ``s2orc_references`` (a list of sentences, or null) and
``radiology`` (bool)), and the figures in ``release/figures/{pdf_hash}_{fig_uri}``. Only figures with
``radiology: true`` are read (the others are counted, ``source.not_radiology``); the caption and its reference
sentences are all texts of the image (``captions``). The release has no splits: ``options.val_size`` and
``options.test_size`` figures (1,000 each) are held out, drawn with ``options.holdout_seed`` (0); the rest is
train. A record's id is its image's file name; a figure listed twice keeps its first line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers.common import find_dir, image_in, json_lines, need_file, option, seeded_sample
from medvlp.errors import ConfigError, DataError

RELEASE = "release"
FILE = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
FIELDS = ("pdf_hash", "fig_uri", "s2_caption", "radiology")
FIX = "restore the field from the MedICaT release"


def _figures(raw: Path) -> Iterator[Example | Bad | Info]:
    """Every radiology figure once, all in split ``train`` for now."""
    path = need_file(raw / RELEASE / FILE)
    images = find_dir(raw / RELEASE, None, ("figures",), "MedICaT figure folder (release/figures/)")
    seen: dict[str, str] = {}
    not_radiology = 0
    for found in json_lines(path, f"{RELEASE}/{FILE}", FIELDS, FIX):
        if isinstance(found, Bad):
            yield found
            continue
        where, record = found
        if record["radiology"] is not True:
            not_radiology += 1
            continue
        references = record.get("s2orc_references") or []
        if not isinstance(references, list):
            yield Bad(where, "field 's2orc_references' is not a list", "give a list of sentences or null")
            continue
        name = f"{record['pdf_hash']}_{record['fig_uri']}"
        if name in seen:
            yield Bad(where, f"duplicate id {name!r} (first at {seen[name]})", "give every record its own id")
            continue
        seen[name] = where
        image = image_in(images, name, where, "fig_uri")
        if isinstance(image, Bad):
            yield image
            continue
        yield Example(split="train", id=name, image=image, image_key=name, where=where,
                      fields={"captions": [t for t in (record["s2_caption"], *references) if isinstance(t, str)],
                              "pdf_hash": str(record["pdf_hash"]), "fig_uri": str(record["fig_uri"])})
    yield Info("not_radiology", not_radiology)


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    sizes = {split: option(config, f"{split}_size", 1000, int) for split in ("val", "test")}
    seed = option(config, "holdout_seed", 0, int)
    if min(sizes.values()) < 0:
        raise ConfigError(f"options.val_size / test_size = {sizes['val']} / {sizes['test']}: must be 0 or more")
    figures: list[Example] = []
    for item in _figures(raw):
        if isinstance(item, Example):
            figures.append(item)
        else:
            yield item
    if len(figures) <= sum(sizes.values()):
        raise DataError(f"{raw}: {len(figures)} radiology figures, not more than the {sum(sizes.values())} to hold "
                        "out; lower options.val_size and options.test_size")
    held = seeded_sample(len(figures), sum(sizes.values()), seed)
    split_of = {i: "val" for i in held[:sizes["val"]]} | {i: "test" for i in held[sizes["val"]:]}
    for i, figure in enumerate(figures):
        yield dataclasses.replace(figure, split=split_of.get(i, "train"))
    yield Info("held_out", {**sizes, "seed": seed})

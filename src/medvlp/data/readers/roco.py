"""ROCO (Pelka et al., LABELS 2018): radiology figures from PubMed Central with their captions.

Two datasets read the same pairs: ``roco`` for pre-training (family ``pretrain``) and ``roco_retrieval`` for
image–text retrieval (family ``retrieval``), whose test split is ``options.test_pairs`` pairs (2,000, as in
M3AE; 0 keeps all) drawn with ``options.test_seed`` (0) from the test pairs whose image is there.

- ``folders`` (the release): ``{train,validation,test}/radiology/`` (``validation`` becomes ``val``) with
  ``captions.txt`` (``ROCO_ID<TAB>caption``), ``dlinks.txt``, ``keywords.txt`` and the images in ``images/``.
  The image of ``ROCO_ID`` is ``images/ROCO_ID.jpg`` or, as the release's ``fetch.py`` names them,
  ``images/PMCID_name.jpg`` from the ID's line in ``dlinks.txt`` (``dlinks_*.txt`` in the revised release).
  Only the radiology subset is read (``non-radiology/`` is ignored), and keywords are not used.
- ``parquet`` / ``hub``: hub copies with ``image`` and ``caption`` columns (see ``hub.py``).

Captions of fewer than three words are dropped, as M3AE does (counted per split in the manifest,
``source.short_captions_dropped``). A caption line without a tab is a bad record naming file and line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers import hub
from medvlp.data.readers.common import choose_layout, image_in, need_file, option, read_delimited, seeded_sample
from medvlp.errors import ConfigError, DataError

SPLITS = {"train": "train", "val": "validation", "test": "test"}
SUBSET = "radiology"
MIN_WORDS = 3


def _image_names(folder: Path) -> dict[str, str]:
    """ROCO_ID -> the file name ``fetch.py`` gives its image (``PMCID_name``), from the dlinks file if any.
    Its lines are ``ROCO_ID<TAB>wget ... .../PMCID.tar.gz ...<TAB>name``; unusable lines are passed over (the
    image is then looked for as ``ROCO_ID.jpg`` only)."""
    files = sorted(folder.glob("dlinks*.txt"))
    names: dict[str, str] = {}
    if not files:
        return names
    for found in read_delimited(files[0], files[0].name, sep="\t", columns=("id", "command", "file"), header=False):
        if isinstance(found, Bad):
            continue
        archive = next((w for w in found[1]["command"].split() if w.endswith(".tar.gz")), None)
        if archive:
            names[found[1]["id"].strip()] = f"{archive.rsplit('/', 1)[-1][:-len('.tar.gz')]}_{found[1]['file'].strip()}"
    return names


def _folders(raw: Path) -> Iterator[Item]:
    """The pairs of the released folders, fields ``{"caption": text}``."""
    yield Info("layout", "folders")
    for split, name in SPLITS.items():
        folder = raw / name / SUBSET
        if split != "train" and not folder.is_dir():
            continue
        captions = need_file(folder / "captions.txt")
        images, fetched = folder / "images", _image_names(folder)
        label = str(captions.relative_to(raw))
        for found in read_delimited(captions, label, sep="\t", columns=("id", "caption"), header=False, rest=True):
            if isinstance(found, Bad):
                yield found
                continue
            where, row = found
            roco_id = row["id"].strip()
            image = image_in(images, f"{roco_id}.jpg", where, "ROCO_ID")
            if isinstance(image, Path) and not image.is_file() and roco_id in fetched:
                image = image_in(images, fetched[roco_id], where, "dlinks file name")
            if isinstance(image, Bad):
                yield image
                continue
            yield Example(split=split, id=roco_id, image=image, image_key=f"{name}/{image.name}", where=where,
                          fields={"caption": row["caption"]})


def _pairs(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    """The image–caption pairs of either layout, short captions dropped."""
    layout = choose_layout(raw, config, {"folders": lambda r: (r / "train" / SUBSET).is_dir(),
                                         "parquet": hub.has_parquet},
                           dataset="ROCO", missing=f"found neither train/{SUBSET}/ nor parquet files", other=("hub",))
    source = (hub.read_rows(raw, config, layout, ("caption",), id_columns=("image_id", "id"))
              if layout in hub.LAYOUTS else _folders(raw))
    dropped: dict[str, int] = {}
    for item in source:
        if isinstance(item, Example) and len(str(item.fields.get("caption") or "").split()) < MIN_WORDS:
            dropped[item.split] = dropped.get(item.split, 0) + 1
            continue
        yield item
    yield Info("short_captions_dropped", dropped)


def read_pretrain(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    for item in _pairs(raw, config):
        if isinstance(item, Example):
            item = dataclasses.replace(item, fields={"captions": [item.fields["caption"]]})
        yield item


def read_retrieval(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    pairs, seed = option(config, "test_pairs", 2000, int), option(config, "test_seed", 0, int)
    if pairs < 0:
        raise ConfigError(f"options.test_pairs={pairs}: give a number of pairs, or 0 for all")
    test: list[Example] = []
    for item in _pairs(raw, config):
        if isinstance(item, Example) and item.split == "test":
            test.append(item)
        else:
            yield item
    if not test:
        raise DataError(f"{raw}: no test pairs; retrieval is evaluated on ROCO's test split "
                        f"(test/{SUBSET}/captions.txt)")
    present = [e for e in test if not isinstance(e.image, Path) or e.image.is_file()]
    yield from (e for e in test if isinstance(e.image, Path) and not e.image.is_file())  # reported as missing
    chosen = sorted(seeded_sample(len(present), pairs, seed)) if pairs else range(len(present))
    yield from (present[i] for i in chosen)
    yield Info("test_pairs", {"sampled": len(chosen), "from": len(present), "seed": seed})

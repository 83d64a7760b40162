"""MELINDA (Wu et al., AAAI 2021): biomedical figures and their captions, labelled by experiment method.

Layout: ``train.csv``, ``dev.csv`` (split ``val``), ``test.csv`` with a header holding ``figure_file,
caption, i_meth, p_meth, i_meth_label, p_meth_label`` (quoted CSV: captions hold commas and line breaks),
and the figures in ``melinda_images/``. The record's text is the caption; its label is the column named by
``options.label`` — ``i_meth`` by default, the fine-grained intermediate-level method label that M3AE reports
on (its MELINDA config is ``label_column_name = "i_meth"``). All four label columns are kept as fields, so a
model can train on another (``FamilyDataset(label_field=...)``) without preparing again. A record's id is its
``figure_file``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers.common import find_dir, image_in, need_file, option, read_delimited
from medvlp.errors import ConfigError

FILES = {"train": "train.csv", "val": "dev.csv", "test": "test.csv"}
LABELS = ("i_meth", "p_meth", "i_meth_label", "p_meth_label")
COLUMNS = ("figure_file", "caption", *LABELS)
IMAGE_DIRS = ("melinda_images", "images")


def read(raw: Path, config: PrepareConfig) -> Iterator[Item]:
    label = option(config, "label", "i_meth", str)
    if label not in LABELS:
        raise ConfigError(f"options.label={label!r}: MELINDA's label columns are {', '.join(LABELS)}")
    for name in FILES.values():
        need_file(raw / name)
    images = find_dir(raw, config.options.get("image_dir"), IMAGE_DIRS, "MELINDA image folder")
    yield Info("label", label)
    for split, name in FILES.items():
        for found in read_delimited(raw / name, name, sep=",", columns=COLUMNS, header=True):
            if isinstance(found, Bad):
                yield found
                continue
            where, row = found
            figure = row["figure_file"].strip()
            image = image_in(images, figure, where, "figure_file")
            if isinstance(image, Bad):
                yield image
                continue
            yield Example(split=split, id=figure, image=image, image_key=figure, where=where,
                          fields={"text": row["caption"], "label": row[label], "figure_file": figure,
                                  **{k: row[k].strip() for k in LABELS}})

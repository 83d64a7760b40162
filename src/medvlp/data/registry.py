"""The one place that names every dataset: its task family, the reader of its raw layout, its splits.

Adding a dataset is one reader function (in ``readers/``) and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlp.data.prepare import PrepareConfig, Reader, write_prepared
from medvlp.data.readers import medicat, melinda, roco, slake, vqa_med_2019, vqa_rad
from medvlp.data.records import check_replaceable
from medvlp.errors import DataError, MedvlpError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    family: str  # one of records.FAMILIES
    read: Reader
    splits: tuple[str, ...]
    description: str
    extra_fields: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "vqa_rad", "vqa", vqa_rad.read, ("train", "test"),
            "VQA-RAD radiology VQA (Lau et al. 2018): the M3AE 3,064/451 split or the original release",
            extra_fields=("image_name", "organ", "question_type", "phrase_type"),
        ),
        DatasetSpec(
            "slake", "vqa", slake.read, ("train", "val", "test"),
            "SLAKE 1.0 radiology VQA (Liu et al. 2021), English questions: 4,919 / 1,053 / 1,061",
            extra_fields=("image_name", "location", "modality", "content_type"),
        ),
        DatasetSpec(
            "vqa_med_2019", "vqa", vqa_med_2019.read, ("train", "val", "test"),
            "VQA-Med-2019 (ImageCLEF): modality, organ and plane questions, all open",
            extra_fields=("category", "image_name"),
        ),
        DatasetSpec(
            "roco", "pretrain", roco.read_pretrain, ("train", "val", "test"),
            "ROCO radiology figures and captions (Pelka et al. 2018), for pre-training",
        ),
        DatasetSpec(
            "roco_retrieval", "retrieval", roco.read_retrieval, ("train", "val", "test"),
            "ROCO image-text retrieval: the same pairs, test sampled to 2,000 with a fixed seed",
        ),
        DatasetSpec(
            "medicat", "pretrain", medicat.read, ("train", "val", "test"),
            "MedICaT radiology figures with captions and inline references (Subramanian et al. 2020)",
            extra_fields=("pdf_hash", "fig_uri"),
        ),
        DatasetSpec(
            "melinda", "classification", melinda.read, ("train", "val", "test"),
            "MELINDA figure-caption classification by experiment method (Wu et al. 2021); options.label=i_meth",
            extra_fields=("figure_file", "i_meth", "p_meth", "i_meth_label", "p_meth_label"),
        ),
    ]
}


def dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise MedvlpError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def prepare(name: str, raw: Path, out: Path, config: PrepareConfig | None = None,
            report: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Read a raw dataset as its publisher ships it and write it in the record format; returns the manifest.
    ``out`` is replaced when it holds a prepared dataset; a folder holding anything else only with ``force``."""
    spec, config = dataset(name), config or PrepareConfig()
    raw = Path(raw)
    check_replaceable(Path(out), force)  # before reading anything
    if config.layout == "hub":  # --raw is the download cache
        raw.mkdir(parents=True, exist_ok=True)
    if not raw.is_dir():
        raise DataError(f"--raw {raw}: no such folder; point it at the unpacked {name} dataset")
    return write_prepared(spec.name, spec.family, spec.read(raw, config), Path(out), config,
                          source={"reader": spec.name, "raw": str(raw.resolve())},
                          extra_fields=spec.extra_fields, report=report, force=force)

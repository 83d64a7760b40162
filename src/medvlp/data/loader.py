"""From prepared datasets to batches: one ``Dataset`` for every family, and the ``DataLoader`` around it.

``FamilyDataset`` turns a record into an example: the decoded, transformed image (uint8) plus the text and
targets of its family (a caption for pre-training and retrieval, question and answer for VQA, text and label
for classification). A record whose image cannot be decoded becomes ``None``; ``collate`` drops it and counts
it in the batch (``n_bad``), so a long run survives a bad sample and the trainer decides when there are too
many. Several prepared datasets (ROCO + MedICaT, say) are read as one by ``Concat``.

VQA and classification datasets ask many questions of one image (VQA-RAD: 3,064 training questions on 314
images; SLAKE: 14,028 on 642), so each worker keeps recently decoded images in a small cache bounded in bytes
(``image_cache_mb``): an image is decoded once, not once per question.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from medvlp.data.collate import Collator
from medvlp.data.records import Records
from medvlp.data.transforms import EvalTransform, TrainTransform, decode_image
from medvlp.errors import DataError

log = logging.getLogger(__name__)


class FamilyDataset(Dataset):
    """One split of one prepared dataset, as model-ready examples.

    ``answer_vocab``/``labels`` map VQA answers/class labels to indices (an answer outside the vocabulary
    gets index -1: it counts as wrong in evaluation and adds no training signal); ``answer_vocab`` may also be
    a mapping answer -> index, where several answers share a class (a converted M3AE run's normalised answers).
    ``label_field`` picks the record field a classification task trains on (MELINDA has several).
    ``image_cache_mb`` bounds the decoded images each worker keeps (0: none); ``crop_scale`` the area range of
    training crops.
    """

    def __init__(self, root: Path | str, split: str, image_size: int, *, train: bool, seed: int = 0,
                 answer_vocab: Sequence[str] | Mapping[str, int] | None = None, labels: Sequence[str] | None = None,
                 label_field: str = "label", image_cache_mb: float = 128,
                 crop_scale: tuple[float, float] = (0.5, 1.0)):
        self.records = Records(root, split)
        self.images = DecodedImages(image_cache_mb * 2**20)
        self.family, self.train, self.seed, self.image_size = self.records.family, train, seed, image_size
        self.transform = TrainTransform(image_size, crop_scale, seed=seed) if train else EvalTransform(image_size)
        manifest = self.records.manifest
        vocab = answer_vocab if answer_vocab is not None else manifest.get("answer_vocab", [])
        self.answer_index = dict(vocab) if isinstance(vocab, Mapping) else {a: i for i, a in enumerate(vocab)}
        label_names = labels if labels is not None else manifest.get("labels", [])
        self.label_index = {label: i for i, label in enumerate(label_names)}
        self.label_field = label_field

    def __len__(self) -> int:
        return len(self.records)

    def image_ids(self) -> list[int]:
        """Each row's image (rows with the same id show the same image): retrieval ranks images, not rows."""
        return self.records.column("image")

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        """``dataset[row]``, or ``dataset[(key, row)]`` from a ``StreamSampler``: the key seeds this sample's
        randomness (crop, caption choice), so it does not depend on workers or on resuming."""
        key, row = item if isinstance(item, tuple) else (item, item)
        record = self.records[row]
        try:
            image = self.images.get(record["image"], record["image_bytes"], self.transform.size_hint)
        except ValueError as e:
            log.warning("skipped %s/%s row %d: %s", self.records.root, self.records.split, row, e)
            return None
        rng = random.Random(self.seed * 1_000_003 + key)
        pixels = self.transform(image, rng) if self.train else self.transform(image)
        example: dict[str, Any] = {"pixels": pixels, "key": key, "row": row}
        family = self.family
        if family == "pretrain":
            captions = record["captions"]
            example["text"] = rng.choice(captions) if self.train else captions[0]
        elif family == "retrieval":
            example["text"] = record["caption"]
        elif family == "vqa":
            example["text"] = record["question"]
            example["answer"] = self.answer_index.get(record["answer"], -1)
            example["closed"] = record["answer_type"] == "closed"
        elif family == "classification":
            example["text"] = record["text"]
            example["label"] = self.label_index.get(record[self.label_field], -1)
        return example


class DecodedImages:
    """Decoded images by image row, least recently used dropped first once ``max_bytes`` is exceeded.

    Pickles empty, so every DataLoader worker fills its own. Images are never modified by the transforms
    (they crop a copy), so sharing one decoded image between samples is safe.
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.images: OrderedDict[int, Image.Image] = OrderedDict()
        self.bytes = 0

    def get(self, key: int, data: bytes, size_hint: int | None) -> Image.Image:
        image = self.images.get(key)
        if image is not None:
            self.images.move_to_end(key)
            return image
        image = decode_image(data, size_hint=size_hint)
        if _nbytes(image) <= self.max_bytes:
            self.images[key] = image
            self.bytes += _nbytes(image)
            while self.bytes > self.max_bytes:
                self.bytes -= _nbytes(self.images.popitem(last=False)[1])
        return image

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "images": OrderedDict(), "bytes": 0}


def _nbytes(image: Image.Image) -> int:
    """Pixel memory of an 8-bit "L" or "RGB" image."""
    return image.width * image.height * len(image.getbands())


def collate(collator: Collator, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Drop examples that could not be read (counted as ``n_bad``) and collate the rest; the word masking is
    seeded from the batch's first sample key, so it is the same on any worker and after a resume."""
    good = [e for e in examples if e is not None]
    if not good:
        return {"n_bad": len(examples), "n": 0}
    generator = torch.Generator().manual_seed(collator.seed * 1_000_003 + good[0]["key"])
    batch = collator(good, generator=generator)
    batch["n_bad"] = len(examples) - len(good)
    batch["n"] = len(good)
    return batch


class _Collate:
    """Picklable ``functools.partial(collate, collator)`` with a readable repr."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        return collate(self.collator, examples)


class Concat(Dataset):
    """Several datasets read as one; takes ``row`` or ``(key, row)`` like ``FamilyDataset``."""

    def __init__(self, datasets: Sequence[Dataset]):
        if not datasets:
            raise DataError("no datasets given; name at least one prepared dataset directory")
        self.datasets = list(datasets)
        self.starts = [0]
        for d in self.datasets:
            self.starts.append(self.starts[-1] + len(d))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        key, row = item if isinstance(item, tuple) else (item, item)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        part = bisect_right(self.starts, row) - 1
        return self.datasets[part][(key, row - self.starts[part])]


def make_loader(dataset: Dataset, collator: Collator, *, batch_size: int, num_workers: int,
                sampler: Sampler | None = None, persistent: bool = True) -> DataLoader:
    """Batches in ``sampler`` order (a ``StreamSampler`` for training; in order otherwise). ``persistent`` keeps
    the workers between passes (for a loader read once per validation, better off: nothing outlives a pass)."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        collate_fn=_Collate(collator), persistent_workers=persistent and num_workers > 0,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers > 0 else None,
    )


def eval_loader(dataset: Dataset, tokenizer: Any, max_text_len: int, batch_size: int = 64,
                num_workers: int = 0) -> DataLoader:
    """Batches of evaluation data, in order: whole texts (nothing masked) cut at ``max_text_len`` tokens.

    Args:
        dataset: a ``FamilyDataset`` (or some rows of one) read with ``train=False``.
        tokenizer: the run's tokenizer.
        max_text_len: the run's text length (``data.max_text_len`` of pre-training, ``max_text_len`` of
            fine-tuning).
        batch_size: samples per batch.
        num_workers: reader processes (0: in this process); none outlives a pass over the data.

    Returns:
        A ``DataLoader`` of collated batches (``pixels``, ``input_ids``, ``attention_mask`` and the targets).
    """
    collator = Collator(tokenizer, max_length=max_text_len, mlm_probability=0.0)
    return make_loader(dataset, collator, batch_size=batch_size, num_workers=num_workers, persistent=False)

"""Parts of a split: some rows of a dataset (``Rows``), and a held-out part drawn by image (``holdout_images``)
for datasets that ship no validation split (VQA-RAD: many questions per image, so a question's image must not
be seen in training)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from medvlp.data.loader import FamilyDataset


class Rows(Dataset):
    """Some rows of a dataset, addressed ``0 .. len - 1`` (by row or ``(key, row)`` like ``FamilyDataset``)."""

    def __init__(self, dataset: FamilyDataset, rows: Sequence[int]):
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def image_ids(self) -> list[int]:
        ids = self.dataset.image_ids()
        return [ids[row] for row in self.rows]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        key, row = item if isinstance(item, tuple) else (item, item)
        return self.dataset[(key, self.rows[row])]


def holdout_images(image_of_row: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split rows into (train, held-out) by image: ``fraction`` of the images, drawn with ``seed``, go out with
    every row that shows them."""
    images = sorted(set(image_of_row))
    random.Random(seed).shuffle(images)
    held = set(images[:max(1, round(fraction * len(images)))])
    train = [row for row, image in enumerate(image_of_row) if image not in held]
    return train, [row for row, image in enumerate(image_of_row) if image in held]

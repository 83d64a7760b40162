"""The synthetic corpus's config, apart from its generator so that a command checks it without importing numpy,
pyarrow or the image code (``medvlp.data.synthetic`` draws the images)."""

from __future__ import annotations

from dataclasses import dataclass

from medvlp.errors import ConfigError

FAMILIES = ("pretrain", "vqa", "classification", "retrieval")
SPLITS = ("train", "val", "test")
QUESTION_KINDS = 16  # open and closed question kinds the generator asks about (synthetic/language.py checks the count)


@dataclass
class SynthConfig:
    """The synthetic corpus: seed, stored image size and the number of images per dataset and split."""

    seed: int = 0
    image_size: int = 128
    pretrain_train: int = 20_000
    pretrain_val: int = 300
    pretrain_test: int = 300
    vqa_train: int = 2_000  # images; each gets ``questions_per_image`` questions
    vqa_val: int = 200
    vqa_test: int = 500
    questions_per_image: int = 5
    classification_train: int = 3_000
    classification_val: int = 300
    classification_test: int = 1_000
    retrieval_train: int = 3_000
    retrieval_val: int = 300
    retrieval_test: int = 1_000
    workers: int = 2  # processes drawing images; the output does not depend on it

    def count(self, family: str, split: str) -> int:
        return getattr(self, f"{family}_{split}")

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: must be 0 or more")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image_size={self.image_size}: must be 32 to 1024 pixels")
        for family in FAMILIES:
            for split in SPLITS:
                if self.count(family, split) < 1:
                    raise ConfigError(f"{family}_{split}={self.count(family, split)}: must be at least 1 "
                                      "(every dataset gets train, val and test)")
        if not 1 <= self.questions_per_image <= QUESTION_KINDS:
            raise ConfigError(f"questions_per_image={self.questions_per_image}: must be 1 to {QUESTION_KINDS}")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be 1 or more")

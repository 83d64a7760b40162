"""Batching: stack images, tokenize captions in one call, and draw whole-word masks for masked language modelling.

The masking is vectorised over the batch: no Python loop over samples or tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from medvlp.constants import IGNORE_INDEX
from medvlp.data.transforms import worker_seed
from medvlp.errors import ConfigError


class Collator:
    """Turn a list of examples into a batch.

    Each example is a mapping with ``"pixels"`` (``uint8 [C, S, S]``, C = 1 grey or 3 RGB) and ``"text"``
    (``str``), and optionally
    more keys holding tensors, numbers or strings, the same keys in every example. The batch has

    - ``pixels``: ``uint8 [B, 1, S, S]`` when every image of the batch is grey, else ``[B, 3, S, S]`` (grey
      images repeated to three channels); the model normalises either to three channels;
    - ``input_ids``, ``attention_mask``: ``int64 [B, L]``, truncated to ``max_length`` and padded to the
      longest text of the batch;
    - when ``mlm_probability > 0``: ``mlm_input_ids`` (the ids with masked words corrupted) and ``mlm_labels``
      (the original id where a token is to be predicted, ``-100`` elsewhere);
    - every extra key: tensors stacked, numbers as a tensor, anything else (strings…) as a list.

    Masking: each word (``word_ids()`` of the fast tokenizer; for a byte-level BPE a pre-token) is chosen with
    probability ``mlm_probability``, and all its tokens with it (``whole_word=False``: each token on its own).
    Special tokens and padding are never chosen. A chosen token becomes ``<mask>`` with probability
    ``mask_replace``, a random non-special token with probability ``random_replace``, and stays itself otherwise.
    A batch may have no chosen token at all (short texts): the MLM loss must accept that.

    Randomness comes from a ``torch.Generator`` created on first use from ``seed`` (inside a DataLoader worker
    mixed with the worker's seed, see ``transforms.worker_seed``): reproducible, and different in each worker.
    The collator pickles without its generator, so every worker starts its own stream.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        max_length: int = 64,
        mlm_probability: float = 0.15,
        whole_word: bool = True,
        mask_replace: float = 0.8,
        random_replace: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"collator tokenizer {type(tokenizer).__name__} is not a fast tokenizer; load one with"
                " medvlp.data.tokenizer.load_tokenizer"
            )
        if max_length < 2:
            raise ConfigError(f"collator max_length={max_length} must be at least 2 (room for <s> and </s>)")
        if not 0.0 <= mlm_probability < 1.0:
            raise ConfigError(f"collator mlm_probability={mlm_probability} must be in [0, 1), e.g. 0.15")
        if min(mask_replace, random_replace) < 0.0 or mask_replace + random_replace > 1.0:
            raise ConfigError(
                f"collator mask_replace={mask_replace} and random_replace={random_replace} must be >= 0 and"
                " sum to at most 1, e.g. 0.8 and 0.1"
            )
        if mlm_probability > 0 and tokenizer.mask_token_id is None:
            raise ConfigError(
                f"collator: tokenizer {tokenizer.name_or_path} has no mask token; masked language modelling"
                " needs one (set mlm_probability=0 or use a tokenizer with <mask>)"
            )
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"collator: tokenizer {tokenizer.name_or_path} has no padding token; it needs one")

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mlm_probability = mlm_probability
        self.whole_word = whole_word
        self.mask_replace = mask_replace
        self.random_replace = random_replace
        self.seed = seed
        self.mask_token_id: int | None = tokenizer.mask_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        everything = torch.arange(len(tokenizer))
        self.replacement_ids = everything[~torch.isin(everything, self.special_ids)]
        self._generator: torch.Generator | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]],
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        """Collate ``examples``; ``generator`` (optional) draws this batch's masks instead of the own stream."""
        if not examples:
            raise ValueError("Collator got an empty list of examples")
        texts = [example["text"] for example in examples]
        # Lists, not return_tensors="pt": transformers' own tensor conversion is 10x slower than numpy's here.
        encoding = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding="longest")
        input_ids = _int_tensor(encoding["input_ids"])
        batch: dict[str, Any] = {
            "pixels": stack_images([example["pixels"] for example in examples]),
            "input_ids": input_ids,
            "attention_mask": _int_tensor(encoding["attention_mask"]),
        }
        if batch["pixels"].dtype != torch.uint8:
            raise TypeError(f"Collator expects uint8 pixels, got {batch['pixels'].dtype}")
        if self.mlm_probability > 0:
            word_ids = _word_id_tensor(encoding.encodings, input_ids.shape)
            batch["mlm_input_ids"], batch["mlm_labels"] = self.mask(input_ids, word_ids, generator)
        for key in examples[0]:
            if key not in ("pixels", "text"):
                batch[key] = _stack([example[key] for example in examples])
        return batch

    def mask(self, input_ids: torch.Tensor, word_ids: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-word masking: ``(input_ids, word_ids)`` ``[B, L]`` → ``(mlm_input_ids, mlm_labels)``.

        ``word_ids`` numbers the words of each row from 0 in order, ``-1`` at special and padding positions.
        """
        generator = generator or self._rng()
        maskable = (word_ids >= 0) & ~torch.isin(input_ids, self.special_ids)
        if not self.whole_word:  # every token is a word of its own
            word_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        units = word_ids.clamp(min=0)
        n_units = int(units.max()) + 1
        chosen_unit = torch.rand(units.shape[0], n_units, generator=generator) < self.mlm_probability
        chosen = chosen_unit.gather(1, units) & maskable

        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (action < self.mask_replace)
        to_random = chosen & (action >= self.mask_replace) & (action < self.mask_replace + self.random_replace)
        random_ids = self.replacement_ids[
            torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        ]
        corrupted = torch.where(to_mask, self.mask_token_id, input_ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return corrupted, labels

    def _rng(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(worker_seed(self.seed))
        return self._generator

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_generator": None}

    def __repr__(self) -> str:
        return (
            f"Collator(max_length={self.max_length}, mlm_probability={self.mlm_probability},"
            f" whole_word={self.whole_word}, mask_replace={self.mask_replace},"
            f" random_replace={self.random_replace}, seed={self.seed})"
        )


def _int_tensor(rows: list[list[int]]) -> torch.Tensor:
    return torch.from_numpy(np.array(rows, dtype=np.int64))


def _word_id_tensor(encodings: Sequence[Any], shape: torch.Size) -> torch.Tensor:
    """The encodings' word ids as ``int64 [B, L]``, ``-1`` where a token belongs to no word (specials, padding)."""
    rows = np.array([encoding.word_ids for encoding in encodings], dtype=object).reshape(shape)
    rows[np.equal(rows, None)] = -1
    return torch.from_numpy(rows.astype(np.int64))


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[C, S, S]`` images -> ``[B, C, S, S]``: one channel when all are grey, otherwise grey ones repeated to 3."""
    if any(image.shape[0] != images[0].shape[0] for image in images):
        images = [image.expand(3, -1, -1) for image in images]
    return torch.stack(images)


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, (bool, int, float, np.number)):
        return torch.tensor(values)
    return values

"""The collator: padding, whole-word masking and its statistics, reproducibility, extra keys."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from medvlp.data.collate import IGNORE_INDEX, Collator, stack_images
from medvlp.data.tokenizer import train_tokenizer
from medvlp.errors import ConfigError

WORDS = (
    "axial coronal sagittal ct mri x-ray chest brain abdomen lesion nodule opacity left right lower upper lobe"
    " hyperintense hypodense enhancing pneumothorax cardiomegaly of the in a with no evidence shows"
).split()
SPECIAL = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>
MASK = 4


def captions(n: int, seed: int = 0, longest: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, longest))) for _ in range(n)]


def examples(texts: list[str]) -> list[dict[str, object]]:
    return [{"pixels": torch.full((3, 4, 4), i % 256, dtype=torch.uint8), "text": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    # Small vocabulary: most words are several tokens, which whole-word masking is about.
    return train_tokenizer(captions(1000, seed=99), tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def big_batch(tokenizer: PreTrainedTokenizerFast) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A large batch, and its word ids ([B, L], -1 outside words)."""
    texts = captions(3000, seed=1)
    batch = Collator(tokenizer, max_length=128, seed=0)(examples(texts))
    encoding = tokenizer(texts, truncation=True, max_length=128, padding="longest")
    word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(texts))])
    return batch, word_ids


def test_padding_and_attention_mask(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = ["left lobe", "a nodule in the right upper lobe with no evidence of pneumothorax", "ct"]
    batch = Collator(tokenizer, mlm_probability=0.0)(examples(texts))
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, :length].tolist() == tokenizer(texts[row])["input_ids"]
        assert torch.all(batch["input_ids"][row, length:] == tokenizer.pad_token_id)
        assert torch.all(batch["attention_mask"][row, length:] == 0)
    assert "mlm_input_ids" not in batch and "mlm_labels" not in batch
    assert batch["pixels"].shape == (3, 3, 4, 4) and batch["pixels"].dtype == torch.uint8


def test_grey_batches_stay_one_channel_and_mixed_ones_become_rgb() -> None:
    grey = [torch.full((1, 2, 2), i, dtype=torch.uint8) for i in range(3)]
    assert stack_images(grey).shape == (3, 1, 2, 2)
    mixed = stack_images([*grey, torch.arange(12, dtype=torch.uint8).view(3, 2, 2)])
    assert mixed.shape == (4, 3, 2, 2)
    assert torch.equal(mixed[1], torch.full((3, 2, 2), 1, dtype=torch.uint8))
    assert torch.equal(mixed[3], torch.arange(12, dtype=torch.uint8).view(3, 2, 2))


def test_truncation_keeps_the_end_token(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = Collator(tokenizer, max_length=16)(examples([" ".join(WORDS), "lobe"]))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id and batch["input_ids"][0, -1] == tokenizer.eos_token_id


def test_extra_keys_are_stacked_or_listed(tokenizer: PreTrainedTokenizerFast) -> None:
    items = examples(["left lobe", "right lobe"])
    for i, item in enumerate(items):
        item.update(answer=i, closed=bool(i), weight=0.5 * i, name=f"case{i}", target=torch.ones(5) * i)
    batch = Collator(tokenizer)(items)
    assert batch["answer"].tolist() == [0, 1] and batch["answer"].dtype == torch.int64
    assert batch["closed"].tolist() == [False, True]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [0.0, 0.5]
    assert batch["name"] == ["case0", "case1"]
    assert batch["target"].shape == (2, 5) and batch["target"][1].sum() == 5


def test_labels_are_the_original_ids_exactly_where_predicted(big_batch: tuple[dict, torch.Tensor]) -> None:
    batch, _ = big_batch
    ids, corrupted, labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
    predicted = labels != IGNORE_INDEX
    assert predicted.any()
    assert torch.equal(labels[predicted], ids[predicted])
    assert torch.equal(corrupted[~predicted], ids[~predicted])  # nothing else changed
    assert torch.all(labels[~predicted] == IGNORE_INDEX)


def test_special_tokens_and_padding_never_masked(big_batch: tuple[dict, torch.Tensor]) -> None:
    batch, _ = big_batch
    special = torch.isin(batch["input_ids"], torch.tensor(SPECIAL))
    assert (batch["input_ids"] == 1).any()  # the batch has padding
    assert torch.all(batch["mlm_labels"][special] == IGNORE_INDEX)
    assert torch.all(batch["mlm_labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)


def test_mask_token_in_the_text_is_never_predicted(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = Collator(tokenizer, mlm_probability=0.9)(examples(["the <mask> lobe"] * 200))
    assert torch.all(batch["mlm_labels"][batch["input_ids"] == MASK] == IGNORE_INDEX)


def test_whole_words_are_masked_together(big_batch: tuple[dict, torch.Tensor]) -> None:
    batch, word_ids = big_batch
    predicted = (batch["mlm_labels"] != IGNORE_INDEX).long()
    n_words = int(word_ids.max()) + 1
    index = word_ids.clamp(min=0)
    inside = (word_ids >= 0).long()
    tokens = torch.zeros(len(word_ids), n_words, dtype=torch.long).scatter_add_(1, index, inside)
    chosen = torch.zeros_like(tokens).scatter_add_(1, index, predicted * inside)
    assert (tokens > 1).sum() > 1000  # many words have several tokens
    assert torch.all((chosen == 0) | (chosen == tokens))  # a word is masked entirely or not at all
    # About 15 % of the words, whatever their length (3-sigma is ~0.6 % here).
    rate = (chosen > 0).sum() / (tokens > 0).sum()
    assert 0.135 < rate < 0.165
    long_words = tokens > 2
    assert 0.12 < ((chosen > 0) & long_words).sum() / long_words.sum() < 0.18


def test_80_10_10_replacement(big_batch: tuple[dict, torch.Tensor], tokenizer: PreTrainedTokenizerFast) -> None:
    batch, _ = big_batch
    predicted = batch["mlm_labels"] != IGNORE_INDEX
    original, corrupted = batch["input_ids"][predicted], batch["mlm_input_ids"][predicted]
    n = len(original)
    assert n > 5000
    masked = corrupted == MASK
    kept = corrupted == original
    replaced = ~masked & ~kept
    assert abs(masked.float().mean() - 0.8) < 0.02
    # A random token equals the original once in ~295 draws: "kept" is ~0.1 + 0.1 / 295.
    assert abs(kept.float().mean() - 0.1) < 0.015
    assert abs(replaced.float().mean() - 0.1) < 0.015
    assert not torch.isin(corrupted[replaced], torch.tensor(SPECIAL)).any()  # random tokens are never special
    assert corrupted[replaced].max() < len(tokenizer)
    assert len(corrupted[replaced].unique()) > 100  # drawn across the vocabulary


def test_token_level_masking(tokenizer: PreTrainedTokenizerFast, big_batch: tuple[dict, torch.Tensor]) -> None:
    _, word_ids = big_batch
    batch = Collator(tokenizer, max_length=128, whole_word=False)(examples(captions(3000, seed=1)))
    predicted = batch["mlm_labels"] != IGNORE_INDEX
    in_words = word_ids >= 0
    assert abs(predicted[in_words].float().mean() - 0.15) < 0.01
    # Neighbouring tokens of one word are chosen independently: some words end up partly masked.
    same_word = (word_ids[:, 1:] == word_ids[:, :-1]) & in_words[:, 1:]
    assert (same_word & (predicted[:, 1:] != predicted[:, :-1])).sum() > 100


def test_reproducible_with_a_seed(tokenizer: PreTrainedTokenizerFast) -> None:
    items = examples(captions(64, seed=5))
    first = Collator(tokenizer, seed=3)
    copy = pickle.loads(pickle.dumps(first))  # what a DataLoader worker receives
    one, two = first(items), Collator(tokenizer, seed=3)(items)
    assert torch.equal(one["mlm_input_ids"], two["mlm_input_ids"]) and torch.equal(one["mlm_labels"], two["mlm_labels"])
    assert torch.equal(copy(items)["mlm_labels"], one["mlm_labels"])
    assert not torch.equal(first(items)["mlm_labels"], one["mlm_labels"])  # the stream moves on
    assert not torch.equal(Collator(tokenizer, seed=4)(items)["mlm_labels"], one["mlm_labels"])


class _Same(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"pixels": torch.zeros(3, 2, 2, dtype=torch.uint8), "text": " ".join(WORDS)}


def test_workers_draw_different_masks_reproducibly(tokenizer: PreTrainedTokenizerFast) -> None:
    def run() -> list[torch.Tensor]:
        loader = DataLoader(
            _Same(), batch_size=16, num_workers=2, collate_fn=Collator(tokenizer, mlm_probability=0.5),
            generator=torch.Generator().manual_seed(0),
        )
        return [batch["mlm_labels"] for batch in loader]

    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])  # worker 0 and worker 1, same texts


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"mlm_probability": 1.0}, "mlm_probability"),
        ({"mask_replace": 0.9, "random_replace": 0.2}, "mask_replace"),
        ({"max_length": 1}, "max_length"),
    ],
)
def test_bad_settings_raise_config_error(
    tokenizer: PreTrainedTokenizerFast, options: dict[str, float], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        Collator(tokenizer, **options)

"""The tokenizer: a trained byte-level BPE round-trips through a normal tokenizer directory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from medvlp.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from medvlp.errors import MedvlpError

WORDS = (
    "axial coronal sagittal CT MRI x-ray chest brain abdomen lesion nodule opacity left right lower upper lobe"
    " hyperintense hypodense enhancing T2-weighted 12mm shows of the in a with no evidence pneumothorax"
).split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedTokenizerFast, Path]:
    out = tmp_path_factory.mktemp("tok")
    # A vocabulary this small leaves the long words in several pieces, which the word-id tests need.
    return train_tokenizer(captions(1000), out, vocab_size=320), out


def test_directory_round_trip(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, out = trained
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = load_tokenizer(out)
    plain = AutoTokenizer.from_pretrained(out)  # no medvlp needed to read it back
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.is_fast
    texts = captions(20, seed=1) + ["An unseen word: cholangiocarcinoma, 3.5 cm ±0.2 µm."]
    expected = tokenizer(texts)["input_ids"]
    assert loaded(texts)["input_ids"] == expected
    assert plain(texts)["input_ids"] == expected
    assert loaded.decode(expected[0], skip_special_tokens=True).strip() == texts[0].lower()


def test_retraining_gives_byte_identical_files(tmp_path: Path, trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    # Each training builds fresh Rust hash maps with fresh random keys, so in-process retraining already
    # exercises hash-order effects (checked across processes by hand; a subprocess here costs ~8 s of imports).
    _, first = trained
    again = tmp_path / "again"
    train_tokenizer(captions(1000), again, vocab_size=320)
    names = sorted(p.name for p in again.iterdir())
    assert names == sorted(p.name for p in first.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (first / name).read_bytes(), f"{name} differs"


def test_special_tokens_have_fixed_ids(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = trained
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 4)
    assert tokenizer.cls_token_id == 0 and tokenizer.sep_token_id == 2
    ids = tokenizer("left lobe")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and not set(ids[1:-1]) & {0, 1, 2, 3, 4}
    # "<mask>" in text is the mask token, and takes the space before it (as in RoBERTa).
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a <mask> lesion")["input_ids"])
    assert tokens.count("<mask>") == 1 and tokens[tokens.index("<mask>") - 1] != "Ġ"


def test_lower_cases_and_encodes_anything(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = trained
    assert tokenizer("Axial CT")["input_ids"] == tokenizer("axial ct")["input_ids"]
    ids = tokenizer("Ünïcödé ✓ 中文")["input_ids"]  # byte-level: never unknown
    assert tokenizer.unk_token_id not in ids


def test_word_ids_group_sub_tokens(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = trained
    text = "hyperintense pneumothorax in the left lobe"
    encoding = tokenizer(text)
    word_ids = encoding.word_ids()
    assert word_ids[0] is None and word_ids[-1] is None  # <s>, </s>
    inner = word_ids[1:-1]
    assert inner == sorted(inner) and inner[0] == 0  # words numbered in order, contiguous tokens
    words = [
        tokenizer.decode([i for i, w in zip(encoding["input_ids"], word_ids) if w == word]).strip()
        for word in range(inner[-1] + 1)
    ]
    assert words == text.split()
    assert max(inner.count(word) for word in set(inner)) > 1, "the test needs a word split into pieces"


def test_word_is_a_pre_token(trained: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = trained
    encoding = tokenizer("t2-weighted 12mm")
    assert len({w for w in encoding.word_ids() if w is not None}) == 6  # t, 2, -, weighted, 12, mm


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MedvlpError, match="nowhere") as error:
        load_tokenizer(missing)
    assert "\n" not in str(error.value)
    with pytest.raises(MedvlpError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_too_small_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MedvlpError, match="vocab_size"):
        train_tokenizer(["a b c"], tmp_path, vocab_size=100)


def test_a_save_killed_midway_leaves_no_tokenizer_json(tmp_path: Path, trained, monkeypatch) -> None:
    """A resumed run takes ``tokenizer.json`` as the sign that its tokenizer exists, so that file must appear
    last and whole: a save that dies before its last move leaves none, and the next save completes the folder."""
    from medvlp.data import tokenizer as module

    tokenizer, _ = trained
    out = tmp_path / "run" / "tokenizer"
    real_replace, moves = module.os.replace, []

    def dying_replace(source, target):
        moves.append(Path(target).name)
        if Path(target).name == "tokenizer.json":
            raise KeyboardInterrupt("killed")  # the process stops before the last move
        return real_replace(source, target)

    monkeypatch.setattr(module.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        module.save_tokenizer(tokenizer, out)
    monkeypatch.undo()
    assert len(moves) >= 2 and moves[-1] == "tokenizer.json"  # every other file was moved in first
    assert not (out / "tokenizer.json").exists()
    assert not list(out.parent.glob(".*partial"))  # the staging folder is cleaned up

    module.save_tokenizer(tokenizer, out)
    assert load_tokenizer(out)("a small nodule")["input_ids"] == tokenizer("a small nodule")["input_ids"]

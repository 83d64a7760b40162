"""Text tokenizers: load any Hugging Face tokenizer, or train a small byte-level BPE on a caption corpus.

A trained tokenizer is an ordinary tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``):
``AutoTokenizer.from_pretrained(out_dir)`` loads it without medvlp, and it is a fast tokenizer, so
``BatchEncoding.word_ids()`` works (whole-word masking needs it).

Design of the trained tokenizer (RoBERTa's layout, so a RoBERTa text encoder can use it as is):

- special tokens ``<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4``, in that order and at those ids, for every corpus;
- byte-level BPE: every string is encodable, ``<unk>`` is never produced (it exists for compatibility);
- a leading space is added, so the first word of a caption is tokenized like any other word;
- single sequences become ``<s> … </s>`` and pairs ``<s> A </s></s> B </s>``;
- a "word" (``word_ids()``) is one pre-token of the byte-level splitter: a run of letters, a run of digits or a
  run of punctuation with its leading space. ``"t2-weighted"`` is therefore four words: ``t``, ``2``, ``-``,
  ``weighted``;
- text is NFKC-normalised and lower-cased (see ``train_tokenizer``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from medvlp.errors import MedvlpError

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""The trained tokenizer's special tokens; a token's id is its index here."""

_TOKENIZER_FILES = ("tokenizer*.json", "vocab*", "*.model")

MODEL_MAX_LENGTH = 512
"""Longest sequence a trained tokenizer declares (RoBERTa's); the collator truncates far shorter."""


def load_tokenizer(name_or_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a tokenizer directory or a Hugging Face Hub id.

    Raises ``MedvlpError`` (one line) when the path does not exist, when nothing loadable is there, or when
    the tokenizer is not a fast one (whole-word masking needs ``word_ids()``).
    """
    name = str(name_or_dir)
    path = Path(name).expanduser()
    if _looks_like_path(name) and not path.exists():
        raise MedvlpError(
            f"tokenizer directory {name} does not exist; pass an existing tokenizer directory or a Hub id"
        )
    if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        raise MedvlpError(
            f"directory {name} holds no tokenizer files (tokenizer.json, vocab.*, *.model); pass a tokenizer"
            " directory, e.g. one written by train_tokenizer"
        )
    source = str(path) if path.exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise MedvlpError(
            f"cannot load a tokenizer from {name} ({reason}); pass a directory holding tokenizer.json"
            " (e.g. one written by train_tokenizer) or a Hub id reachable from this machine"
        ) from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise MedvlpError(
            f"tokenizer {name} is a slow (Python) tokenizer ({type(tokenizer).__name__}); medvlp needs a fast one"
            " (a directory with tokenizer.json)"
        )
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    *,
    lowercase: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``, save it to ``out_dir`` (``save_pretrained``) and return it.

    Deterministic: the same texts (in the same order) give byte-identical files.

    ``lowercase`` (default on): captions write the same word as "Axial"/"axial" or "CT"/"ct" depending on its
    place in the sentence and on the author; a small vocabulary would spend merges on both spellings and the
    model would have to learn that they mean the same. Case distinguishes almost nothing in this domain, and the
    VQA benchmarks compare answers lower-cased. The choice is stored in the tokenizer's normaliser, so callers
    never lower-case text themselves.
    """
    if vocab_size < len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS):
        raise MedvlpError(
            f"tokenizer vocab_size={vocab_size} is too small; a byte-level BPE needs at least 261 (256 bytes"
            " + 5 special tokens), use e.g. 4096"
        )
    if min_frequency < 1:
        raise MedvlpError(f"tokenizer min_frequency={min_frequency} must be at least 1")

    backend = Tokenizer(models.BPE())
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()

    # "<mask>" swallows the space before it, as in RoBERTa, so "a <mask> b" masks the word with its space.
    specials: list[str | AddedToken] = [*SPECIAL_TOKENS[:-1], AddedToken("<mask>", lstrip=True, special=True)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", SPECIAL_TOKENS.index("</s>")),
        ("<s>", SPECIAL_TOKENS.index("<s>")),
        trim_offsets=True,
        add_prefix_space=True,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        cls_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MODEL_MAX_LENGTH,
    )
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """``save_pretrained`` into ``out_dir`` so that ``tokenizer.json``, the file whose presence tells a resumed
    run that its tokenizer exists, appears last and whole: the files are written beside the folder first, then
    moved in one by one (each move atomic), ``tokenizer.json`` at the end. A process killed on the way leaves
    no ``tokenizer.json``, so the tokenizer is trained again rather than read half-written."""
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer.save_pretrained(str(staging))
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(staging.iterdir(), key=lambda f: f.name == "tokenizer.json")
        for file in files:
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a local path, never a Hub id ("name" or "org/name")."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or ":" in name

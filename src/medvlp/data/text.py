"""Normalisation of texts: any text read from a dataset or a user (control characters out, bounded length), and
the short texts that datasets disagree on: answers and answer types."""

from __future__ import annotations

import re
from typing import Any

_SPACE = re.compile(r"\s+")
# C0 and C1 control characters (NUL, escape sequences, ...) and the bidirectional overrides that reorder what
# a reader sees; tabs and line breaks are whitespace and become single spaces
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MAX_TEXT_CHARS = 4096  # far beyond what a text encoder reads (64 to 512 tokens), far below a runaway field


def clean_text(value: Any, max_chars: int = MAX_TEXT_CHARS) -> tuple[str, list[str]]:
    """A text as medvlp stores and reads it: control characters removed, whitespace runs as one space, at most
    ``max_chars`` characters. Returns the text and what was changed (``"control characters removed"``,
    ``"cut to N characters"``), for counting and reporting."""
    text = "" if value is None else str(value)
    notes = []
    if _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
        notes.append("control characters removed")
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
        notes.append(f"cut to {max_chars} characters")
    return text, notes
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:!?.])")


def normalize_answer(answer: Any) -> str:
    """Lower case, one space between words, no space before punctuation, no closing full stop or question
    mark, no wrapping quotes; numbers stored as JSON numbers become their text. ``"Yes "`` and ``"yes."``
    are the same answer; ``"2.5cm"`` keeps its inner point."""
    text = _SPACE.sub(" ", str(answer).lower()).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = text.strip(" \"'").rstrip(".?!").strip()
    return text


def normalize_answer_type(value: Any) -> str | None:
    """``"CLOSED "``, ``"closed"``, ``"Closed"`` -> ``"closed"``; anything but open/closed -> None."""
    text = str(value).strip().lower() if value is not None else ""
    return text if text in ("open", "closed") else None


# -- the reference M3AE's answer normalisation (VQA-style; SPEC §10), for rebuilding its answer labels ------------
_REFERENCE_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                          ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {word.replace("'", ""): word for word in (
    "ain't", "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't", "isn't",
    "mightn't", "mustn't", "needn't", "shouldn't", "wasn't", "weren't", "won't", "wouldn't", "he's", "she's",
    "it'd", "i'm", "i've", "you're", "you've", "they're", "they've", "we're", "we've", "what's", "that's",
    "there's", "where's", "who's", "let's", "y'all")}
"""A part of the VQA contraction table (apostrophe-less word -> word): the common English contractions."""


def reference_answer(answer: Any) -> str:
    """An answer as the reference M3AE code normalises it to number its answer labels: text, lower case; each
    punctuation mark of ``_REFERENCE_PUNCTUATION`` is removed when it touches a space or the answer holds a
    digit-comma-digit group, else replaced by a space; periods not followed by a digit are removed (at most 32,
    as the reference's call allows); words: number words to digits (none/zero -> 0, one..ten -> 1..10),
    articles dropped, apostrophe-less contractions restored (common ones); single spaces; commas removed.
    """
    text = str(answer).lower()
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _REFERENCE_PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or digit_comma:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _LONE_PERIOD.sub("", text, count=32)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")

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

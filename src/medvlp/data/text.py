"""Normalisation of the short texts that datasets disagree on: answers and answer types."""

from __future__ import annotations

import re
from typing import Any

_SPACE = re.compile(r"\s+")
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

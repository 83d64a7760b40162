"""What every reader needs: finding folders and reading JSON with errors that name file, line and fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medvlp.data.images import ImageError, safe_join
from medvlp.errors import DataError


def find_dir(raw: Path, chosen: str | None, candidates: tuple[str, ...], what: str) -> Path:
    """The first of ``candidates`` under ``raw`` that is a folder (or the configured one)."""
    names = (chosen,) if chosen else candidates
    for name in names:
        try:
            path = safe_join(raw, name)
        except ImageError:
            raise DataError(f"options.image_dir={name!r} leads outside {raw}; name a folder inside it") from None
        if path.is_dir():
            return path
    raise DataError(f"{raw}: no {what} (looked for {', '.join(repr(n) for n in names)}); "
                    "set options.image_dir=NAME")


def read_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """The records of a JSON file holding a list, with their positions; one-line errors for a file that is
    missing, not UTF-8, not valid JSON (with line and column) or not a list."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
                        "fix the file or download it again") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    yield from enumerate(data)

"""What every reader needs: choosing a layout, finding folders, reading JSON, JSON lines and delimited text
(CSV, tab- or pipe-separated) with errors that name file, line and fix, and seeded samples of records.

Whole-file problems (a missing file, a missing column, JSON that does not parse) stop the run with a
``DataError``; a problem in one line or record (too few fields, text that is not UTF-8, a missing field) is a
``Bad`` item, which the prepare pipeline counts and reports on one line.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medvlp.data.images import ImageError, safe_join
from medvlp.data.prepare import Bad, Example, PrepareConfig
from medvlp.errors import ConfigError, DataError

# The names publishers give their splits, mapped to ours.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "validate": "val", "dev": "val", "test": "test"}
SEPARATORS = {",": "commas", "\t": "tabs", "|": "'|'", ";": "semicolons"}
UTF8_FIX = "save the file as UTF-8"


def choose_layout(raw: Path, config: PrepareConfig, detect: dict[str, Callable[[Path], bool]], *,
                  dataset: str, missing: str, other: Sequence[str] = ()) -> str:
    """The configured layout, or (``layout=auto``) the first of ``detect`` whose test passes on ``raw``.
    ``other`` names layouts that are never auto-detected (``hub``: downloads)."""
    known = [*detect, *other]
    if config.layout == "auto":
        for name, test in detect.items():
            if test(raw):
                return name
        raise DataError(f"{raw}: {missing}; point --raw at the {dataset} folder")
    if config.layout not in known:
        raise ConfigError(f"layout={config.layout!r}: {dataset} has layouts "
                          f"{', '.join(repr(k) for k in known)} (or 'auto')")
    return config.layout


def find_dir(raw: Path, chosen: str | None, candidates: tuple[str, ...], what: str, hint: str = "") -> Path:
    """The first of ``candidates`` under ``raw`` that is a folder (or the configured one)."""
    names = (chosen,) if chosen else candidates
    for name in names:
        try:
            path = safe_join(raw, name)
        except ImageError:
            if chosen:
                raise DataError(f"options.image_dir={name!r} leads outside {raw}; name a folder inside it") from None
            raise DataError(f"{raw / name}: the {what} is a link to a folder outside {raw} (to "
                            f"{(raw / name).resolve()}); medvlp reads images only inside the --raw folder: copy "
                            "or move the images into it, or give --raw the folder that holds them") from None
        if path.is_dir():
            return path
    raise DataError(f"{raw}: no {what} (looked for {', '.join(repr(n) for n in names)}); "
                    f"{hint + ', or ' if hint else ''}set options.image_dir=NAME")


def need_file(path: Path, fix: str = "it is part of the published layout: point --raw at the whole dataset") -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found; {fix}")
    return path


def image_in(folder: Path, name: str, where: str, field: str) -> Path | Bad:
    """``folder / name`` for a record's image, or a ``Bad`` when the name leads outside the folder."""
    try:
        return safe_join(folder, name)
    except ImageError as e:
        return Bad(where, f"field {field!r}: {e}", "name an image inside the image folder")


def text_or_none(value: object) -> str | None:
    """An optional text field as stored: stripped, or None when absent."""
    return None if value is None else str(value).strip()


def split_name(name: str) -> str | None:
    return SPLIT_NAMES.get(name.lower())


def option(config: PrepareConfig, name: str, default: Any, kind: type) -> Any:
    """A reader setting from ``options``, checked against the type of its default."""
    value = config.options.get(name, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"options.{name}={value!r}: expected {kind.__name__}")
    return value


def seeded_sample(count: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(count)`` (all, when fewer), in the order ``seed`` draws them: the same records for the
    same input and seed."""
    return random.Random(seed).sample(range(count), min(k, count))


# -- JSON ---------------------------------------------------------------------------------------------------
def _utf8_error(path: Path, data: bytes, error: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, error.start) + 1
    return DataError(f"{path} line {line}: not UTF-8 text (byte {error.start}); {UTF8_FIX}")


def read_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """The records of a JSON file holding a list, with their positions; one-line errors for a file that is
    missing, not UTF-8 (with the line), not valid JSON (with line and column) or not a list."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
                        "fix the file or download it again") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    yield from enumerate(records)


def checked_record(record: Any, where: str, fields: Sequence[str], fix: str) -> Bad | None:
    """Why a JSON record cannot be read (not an object, a field missing), or None."""
    if not isinstance(record, dict):
        return Bad(where, "not a JSON object", fix)
    missing = [f for f in fields if f not in record]
    return Bad(where, f"missing field {missing[0]!r}", fix) if missing else None


def json_records(path: Path, label: str, fields: Sequence[str], fix: str) -> Iterator[tuple[str, dict] | Bad]:
    """``(where, record)`` for each object of a JSON list that has ``fields``; a ``Bad`` for the others."""
    for index, record in read_json_list(path):
        where = f"{label} record {index}"
        yield checked_record(record, where, fields, fix) or (where, record)


def vqa_example(split: str, where: str, record: dict, images: Path, image_field: str,
                extra: dict[str, Any]) -> Example | Bad:
    """A VQA question from a JSON record with ``qid``, ``question``, ``answer``, ``answer_type`` and an image
    name in ``image_field`` (inside ``images``); ``extra`` adds the dataset's own fields."""
    image_name = str(record[image_field])
    image = image_in(images, image_name, where, image_field)
    if isinstance(image, Bad):
        return image
    return Example(split=split, id=str(record["qid"]), image=image, image_key=image_name, where=where,
                   fields={"question": record["question"], "answer": record["answer"],
                           "answer_type": record["answer_type"], "image_name": image_name, **extra})


def json_lines(path: Path, label: str, fields: Sequence[str], fix: str) -> Iterator[tuple[str, dict] | Bad]:
    """``(where, record)`` for each line of a JSON-lines file; a ``Bad`` for a line that is not UTF-8, not
    valid JSON, not an object, or lacks one of ``fields``."""
    bad: dict[int, int] = {}
    for number, line in enumerate(_decoded_lines(path, bad), 1):
        where = f"{label} line {number}"
        if not line.strip():
            continue
        if number in bad:
            yield Bad(where, f"not UTF-8 text (byte {bad[number]} of the line)", UTF8_FIX)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield Bad(where, f"not valid JSON ({e.msg} at column {e.colno})", "fix the line or download the file again")
            continue
        yield checked_record(record, where, fields, fix) or (where, record)


# -- delimited text -----------------------------------------------------------------------------------------
def _decoded_lines(path: Path, bad: dict[int, int]) -> Iterator[str]:
    """The file's lines as text (line ends kept); a line that is not UTF-8 is decoded with replacements and
    its number noted in ``bad`` (with the offending byte's position), so the caller can report it."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with handle:
        for number, data in enumerate(handle, 1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                bad[number] = e.start
                yield data.decode("utf-8", "replace")


def _rows(lines: Iterator[str], sep: str, maxsplit: int, label: str) -> Iterator[tuple[int, int, list[str]]]:
    """``(first line, last line, fields)``: CSV with quoting (a quoted field may span lines), or one line a
    row for other separators."""
    if sep == ",":
        reader = csv.reader(lines)
        first = 1
        try:
            for fields in reader:
                yield first, reader.line_num, fields
                first = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{label} line {first}: not readable as CSV ({e}); fix the file or download it "
                            "again") from None
    else:
        for number, line in enumerate(lines, 1):
            text = line.rstrip("\r\n")
            yield number, number, text.split(sep, maxsplit) if text.strip() else []


def _other_separator(text: str, sep: str, expected: int) -> str:
    """A hint when the line splits into ``expected`` fields (at least 2) on another common separator."""
    for other, name in SEPARATORS.items():
        if other != sep and len(text.split(other)) == expected >= 2:
            return f" (this line splits into {expected} on {name})"
    return ""


def read_delimited(path: Path, label: str, *, sep: str, columns: Sequence[str], header: bool,
                   rest: bool = False) -> Iterator[tuple[str, dict[str, str]] | Bad]:
    """``(where, {column: text})`` for each row of a delimited text file.

    ``header``: the first row names the columns and must hold all of ``columns`` (a ``DataError`` names the
    missing one); otherwise rows are ``columns`` in order. ``rest``: the last column takes the rest of the
    line, separators included (a caption may contain one). A row with the wrong number of fields or with
    text that is not UTF-8 is a ``Bad`` naming file and line.
    """
    bad: dict[int, int] = {}
    names = list(columns) if not header else None
    expected = len(columns)
    for first, last, fields in _rows(_decoded_lines(path, bad), sep, expected - 1 if rest else -1, label):
        where = f"{label} line {first}"
        if not fields or fields == [""]:
            continue
        broken = [n for n in range(first, last + 1) if n in bad]
        if broken and names is None:
            raise DataError(f"{path} line {broken[0]}: not UTF-8 text (byte {bad[broken[0]]} of the line); {UTF8_FIX}")
        if broken:
            yield Bad(f"{label} line {broken[0]}", f"not UTF-8 text (byte {bad[broken[0]]} of the line)",
                      UTF8_FIX)
            continue
        if names is None:  # the header
            names = [f.strip() for f in fields]
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{path} line {first}: missing column {missing[0]!r} (the header has "
                                f"{', '.join(repr(n) for n in names)}); use the published file, separated by "
                                f"{SEPARATORS[sep]}{_other_separator(sep.join(fields), sep, len(columns))}")
            expected = len(names)
            continue
        if len(fields) != expected:
            sep_name = SEPARATORS[sep]
            hint = "" if rest else _other_separator(sep.join(fields), sep, expected)
            yield Bad(where, f"{len(fields)} field(s) where {expected} separated by {sep_name} were expected "
                             f"({', '.join(names)})", f"separate the fields with {sep_name}{hint}")
            continue
        yield where, dict(zip(names, fields))
    if names is None and header:
        raise DataError(f"{path}: empty file; expected a header with {', '.join(columns)}")

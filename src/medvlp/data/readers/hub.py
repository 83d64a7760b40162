"""Hugging Face hub copies of the datasets: parquet files with the image inside each row.

Two layouts, chosen with ``layout=`` on the dataset's own name (``vqa_rad``, ``slake``, ``roco``,
``roco_retrieval``):

- ``parquet``: a local folder of ``*.parquet`` files as the hub serves them (``train-00000-of-00001.parquet``,
  possibly under ``data/``); the split is the file name's first part (``train``, ``validation``/``val``/``dev``,
  ``test``) or else the name of the folder the file is in. ``layout=auto`` picks it when the folder holds
  parquet files and not the publisher's files.
- ``hub``: ``datasets.load_dataset(options.repo_id)`` (online; ``--raw`` is the download cache). Needs the
  optional ``datasets`` package: ``pip install 'medvlp[hub]'``.

Columns: ``image`` (a struct of ``bytes`` and ``path``, as ``datasets`` writes Image features, or plain bytes),
and the dataset's texts: ``question``, ``answer`` and optionally ``answer_type`` and ``q_lang`` (VQA-RAD as in
flaxwu/vqa-rad, SLAKE mirrors), or ``caption`` (ROCO mirrors). Where a VQA copy has no ``answer_type`` column,
yes/no answers are taken as closed and all others as open (the manifest's ``source.answer_type`` says so).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medvlp.data.prepare import Bad, Example, Info, Item, PrepareConfig
from medvlp.data.readers.common import image_in, option, split_name
from medvlp.data.text import normalize_answer
from medvlp.errors import ConfigError, DataError

LAYOUTS = ("parquet", "hub")
BATCH_ROWS = 256
INFERRED = "inferred: closed for yes/no answers, open for the rest (the copy has no answer_type column)"


def has_parquet(raw: Path) -> bool:
    return next(raw.rglob("*.parquet"), None) is not None


def _split_of(path: Path, raw: Path) -> str:
    for name in (path.stem.split("-")[0], *(p.name for p in path.relative_to(raw).parents if p.name)):
        if split_name(name):
            return split_name(name)  # type: ignore[return-value]
    raise DataError(f"{path}: cannot tell the split from the file name; name it train-*.parquet, "
                    "validation-*.parquet or test-*.parquet")


def _parquet_tables(raw: Path) -> Iterator[tuple[str, str, list[str], Iterator[dict[str, Any]]]]:
    """``(split, label, columns, rows)`` for each parquet file, in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(raw.rglob("*.parquet")):
        label = str(path.relative_to(raw))
        try:
            handle = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e}); download it again") from None
        columns = handle.schema_arrow.names
        rows = (row for batch in handle.iter_batches(batch_size=BATCH_ROWS) for row in batch.to_pylist())
        yield _split_of(path, raw), label, columns, rows


def _hub_tables(raw: Path, config: PrepareConfig) -> Iterator[tuple[str, str, list[str], Iterator[dict[str, Any]]]]:
    """The same from ``datasets.load_dataset(options.repo_id)``, images left encoded."""
    repo = option(config, "repo_id", "", str)
    if not repo:
        raise ConfigError("layout=hub needs options.repo_id=OWNER/NAME (e.g. options.repo_id=flaxwu/vqa-rad)")
    try:
        import datasets
    except ImportError:
        raise DataError("layout=hub reads through the `datasets` package, which is not installed: "
                        "pip install 'medvlp[hub]', or download the parquet files and use layout=parquet") from None
    try:
        loaded = datasets.load_dataset(repo, cache_dir=str(raw))
    except Exception as e:  # network, authentication, unknown repository: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"options.repo_id={repo}: cannot load it from the hub ({first})") from None
    for name, table in loaded.items():
        split = split_name(name)
        if split is None:
            raise DataError(f"{repo}: unknown split {name!r}; expected train, validation or test")
        if "image" in table.features:
            table = table.cast_column("image", datasets.Image(decode=False))
        yield split, f"{repo} {name}", list(table.column_names), iter(table)


def _image(value: Any, base: Path | None, where: str) -> bytes | Path | Bad:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and base is not None:
            return image_in(base, str(value["path"]), where, "image.path")
    return Bad(where, "no image bytes in column 'image'", "use a copy whose rows hold the images")


def read_rows(raw: Path, config: PrepareConfig, layout: str, required: Sequence[str],
              optional: Sequence[str] = (), id_columns: Sequence[str] = ()) -> Iterator[Item]:
    """Examples from a hub copy; ``fields`` holds the row's ``required`` and (where present) ``optional``
    columns. The id is the first of ``id_columns`` the copy has, else the row's place in its split."""
    yield Info("layout", layout)
    tables = _parquet_tables(raw) if layout == "parquet" else _hub_tables(raw, config)
    counts: dict[str, int] = {}
    found = False
    for split, label, columns, rows in tables:
        found = True
        missing = [c for c in ("image", *required) if c not in columns]
        if missing:
            raise DataError(f"{label}: missing column {missing[0]!r} (it has {', '.join(columns)}); "
                            "use a copy with image and text columns")
        keep = [c for c in (*required, *optional) if c in columns]
        id_column = next((c for c in id_columns if c in columns), None)
        base = (raw / label).parent if layout == "parquet" else None
        for index, row in enumerate(rows):
            where = f"{label} row {index}"
            number = counts[split] = counts.get(split, 0) + 1
            image = _image(row.get("image"), base, where)
            if isinstance(image, Bad):
                yield image
                continue
            key = (hashlib.sha1(image).hexdigest() if isinstance(image, bytes)
                   else str(image.relative_to(raw.resolve())))
            record_id = str(row[id_column]) if id_column and row.get(id_column) is not None else f"{split}-{number}"
            yield Example(split=split, id=record_id, image=image, image_key=key, where=where,
                          fields={c: row.get(c) for c in keep})
    if not found:
        raise DataError(f"{raw}: no parquet files found; point --raw at the folder holding them")


def read_vqa(raw: Path, config: PrepareConfig, layout: str) -> Iterator[Item]:
    """VQA rows (``question``, ``answer``, optional ``answer_type``); English only where there is a
    ``q_lang`` column (SLAKE)."""
    inferred = other_language = 0
    for item in read_rows(raw, config, layout, ("question", "answer"), ("answer_type", "q_lang"), ("qid", "id")):
        if isinstance(item, Example):
            fields = dict(item.fields)
            if fields.pop("q_lang", "en") not in ("en", None):
                other_language += 1
                continue
            if "answer_type" not in fields:
                inferred += 1
                answer = normalize_answer(fields["answer"]) if fields["answer"] is not None else ""
                fields["answer_type"] = "closed" if answer in ("yes", "no") else "open"
            item = Example(item.split, item.id, item.image, item.image_key, fields, item.where)
        yield item
    if inferred:
        yield Info("answer_type", INFERRED)
    if other_language:
        yield Info("questions_not_english", other_language)

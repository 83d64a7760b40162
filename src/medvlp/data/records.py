"""One record format for all data, real or generated.

A prepared dataset is a directory::

    manifest.json            what is here: family, splits and their shards, counts, vocabulary, content hash
    images-00000.arrow       the encoded images, each stored once (a VQA image serves many questions)
    train-00000.arrow        one split's records: id, image (row in the image table) and the family's fields
    test-00000.arrow ...

Shards are uncompressed Arrow IPC files, so a reader memory-maps them and takes any row without loading a
split into memory; several DataLoader workers (each opens its own maps after the fork) and a distributed
sampler need nothing more. Writing is atomic: everything goes to a staging directory beside the target, the
manifest is written last, and the finished directory replaces the old one by rename, so a killed ``prepare``
leaves either the old dataset or the new one, never half of one (and a failed one, e.g. on a full disk, leaves
no staging folder). Writing is deterministic, hence idempotent: the same input gives the same bytes and the same
content hash (the record of when shards were last hashed, ``.verified.json``, aside), and an unchanged
dataset is left untouched. Only a prepared dataset is ever replaced: a folder
holding anything else is refused unless the caller forces it.

Opening a split checks its shards against the manifest's SHA-256 hashes, so a damaged or edited shard is a
one-line error, not training on garbage. Hashing is skipped for a shard whose size and modification time match
those recorded the last time it was hashed (``.verified.json`` in the dataset; for a read-only dataset, in
``~/.cache/medvlp``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from medvlp.constants import VERSION
from medvlp.errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# The fields each task family adds to every record (beside ``id`` and ``image``).
FAMILIES: dict[str, dict[str, pa.DataType]] = {
    "pretrain": {"captions": pa.list_(pa.string())},
    "vqa": {"question": pa.string(), "answer": pa.string(), "answer_type": pa.string()},
    "classification": {"text": pa.string(), "label": pa.string()},
    "retrieval": {"caption": pa.string()},
}
ANSWER_TYPES = ("open", "closed")

_IMAGE_SCHEMA = pa.schema(
    [("key", pa.string()), ("data", pa.binary()), ("format", pa.string()), ("width", pa.int32()),
     ("height", pa.int32())]
)
_SHARD_BYTES = 256 << 20  # images per shard, by size
_SHARD_ROWS = 200_000  # records per shard
_BATCH_ROWS = 1024


def record_schema(family: str, extra_fields: Sequence[str] = ()) -> pa.Schema:
    """The Arrow schema of a family's records; extra fields are optional strings (e.g. a question's organ)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    fields = [("id", pa.string()), ("image", pa.int64()), *FAMILIES[family].items()]
    fields += [(name, pa.string()) for name in extra_fields]
    return pa.schema(fields)


@dataclass(frozen=True)
class StoredImage:
    """An encoded image as it goes into the image table."""

    data: bytes
    format: str  # "jpeg" | "png"
    width: int
    height: int


class _ShardedFile:
    """Appends record batches to ``{stem}-00000.arrow``, ``-00001`` ... rolling over by rows or bytes."""

    def __init__(self, directory: Path, stem: str, schema: pa.Schema, max_rows: int, max_bytes: int):
        self.directory, self.stem, self.schema = directory, stem, schema
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows = self._bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is not None and (
                self._rows >= self.max_rows or self._bytes + batch.nbytes > self.max_bytes
            ):
                self._finish_shard()
            if self._writer is None:
                name = f"{self.stem}-{len(self.shards):05d}.arrow"
                self.shards.append({"file": name, "rows": 0})
                self._writer = pa.ipc.new_file(str(self.directory / name), self.schema)
            part = batch.slice(0, min(batch.num_rows, self.max_rows - self._rows))
            self._writer.write_batch(part)
            self._rows += part.num_rows
            self._bytes += part.nbytes
            self.shards[-1]["rows"] = self._rows
            batch = batch.slice(part.num_rows)

    def _finish_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer, self._rows, self._bytes = None, 0, 0

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._finish_shard()
        if not self.shards:  # an empty split still gets one (empty) shard, so its schema is on disk
            self._writer = pa.ipc.new_file(str(self.directory / f"{self.stem}-00000.arrow"), self.schema)
            self.shards.append({"file": f"{self.stem}-00000.arrow", "rows": 0})
            self._finish_shard()
        return self.shards


class DatasetWriter:
    """Writes one prepared dataset atomically; use as a context manager.

    Images go in first (``add_image`` returns the row to reference), then each split's records at once
    (``write_split``); ``commit`` writes the manifest and swaps the directory into place. Leaving the ``with``
    block through an exception discards everything and leaves ``out`` as it was.
    """

    def __init__(self, out: Path, *, name: str, family: str, source: dict[str, Any],
                 extra_fields: Sequence[str] = (), shard_rows: int = _SHARD_ROWS,
                 shard_bytes: int = _SHARD_BYTES, force: bool = False):
        self.out = Path(out).absolute()
        check_replaceable(self.out, force)
        self.name, self.family, self.source = name, family, source
        self.extra_fields = tuple(extra_fields)
        self.schema = record_schema(family, self.extra_fields)
        self.shard_rows = shard_rows
        self.stage = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._image_rows: dict[str, int] = {}
        self._image_buffer: list[tuple[str, StoredImage]] = []
        self._images: _ShardedFile | None = None
        self._splits: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> DatasetWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.stage.mkdir()
        self._images = _ShardedFile(self.stage, "images", _IMAGE_SCHEMA, 1 << 62, _SHARD_BYTES)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a folder we may not write to: one line, nothing left behind
            reason = "no space left on the disk" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise DataError(f"{self.out}: the dataset could not be written ({reason}); nothing partial was left "
                            "behind: free space (or fix the folder's permissions) and run again") from None

    # -- images --------------------------------------------------------------------------------------
    def image_row(self, key: str) -> int | None:
        """The row of an image already added under ``key``, if any."""
        return self._image_rows.get(key)

    def add_image(self, key: str, image: StoredImage) -> int:
        if key in self._image_rows:
            return self._image_rows[key]
        row = self._image_rows[key] = len(self._image_rows)
        self._image_buffer.append((key, image))
        if len(self._image_buffer) >= 256:
            self._flush_images()
        return row

    def _flush_images(self) -> None:
        if not self._image_buffer:
            return
        keys, images = zip(*self._image_buffer)
        batch = pa.record_batch(
            [pa.array(keys, pa.string()), pa.array([i.data for i in images], pa.binary()),
             pa.array([i.format for i in images], pa.string()), pa.array([i.width for i in images], pa.int32()),
             pa.array([i.height for i in images], pa.int32())],
            schema=_IMAGE_SCHEMA,
        )
        assert self._images is not None
        self._images.write(batch)
        self._image_buffer.clear()

    # -- records -------------------------------------------------------------------------------------
    def write_split(self, split: str, records: Sequence[dict[str, Any]], stats: dict[str, Any] | None = None) -> None:
        """Write all records of one split; each has ``id``, ``image`` (a row from ``add_image``) and the fields."""
        if split in self._splits:
            raise ValueError(f"split {split!r} written twice")
        shards = _ShardedFile(self.stage, split, self.schema, self.shard_rows, 1 << 62)
        for start in range(0, len(records), _BATCH_ROWS):
            chunk = records[start:start + _BATCH_ROWS]
            columns = [pa.array([r.get(f.name) for r in chunk], f.type) for f in self.schema]
            shards.write(pa.record_batch(columns, schema=self.schema))
        entry: dict[str, Any] = {"rows": len(records), "shards": shards.close()}
        if stats:
            entry["stats"] = stats
        self._splits[split] = entry

    def commit(self, **extra: Any) -> dict[str, Any]:
        """Finish the shards, write the manifest, and move the dataset into place. Returns the manifest.

        ``extra`` goes into the manifest as is (answer vocabulary, label set, skipped-record counts...).
        """
        self._flush_images()
        assert self._images is not None
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.name,
            "family": self.family,
            "extra_fields": list(self.extra_fields),
            "source": self.source,
            "written_by": f"medvlp {VERSION}",
            "images": {"rows": len(self._image_rows), "shards": self._images.close()},
            "splits": self._splits,
            **extra,
        }
        digest = hashlib.sha256()
        for entry in [manifest["images"], *self._splits.values()]:
            for shard in entry["shards"]:
                shard["sha256"] = _sha256(self.stage / shard["file"])
                digest.update(f"{shard['file']}:{shard['sha256']}\n".encode())
        manifest["content_hash"] = digest.hexdigest()
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (self.stage / MANIFEST).write_text(text, encoding="utf-8")
        _remember_verified(self.stage, [s for e in [manifest["images"], *self._splits.values()] for s in e["shards"]])

        previous = self.out / MANIFEST
        if previous.exists() and previous.read_text(encoding="utf-8") == text:
            return manifest  # unchanged: leave the existing directory (and its timestamps) alone
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest


def check_replaceable(out: Path, force: bool = False) -> None:
    """Refuse to write a dataset over ``out`` unless it is absent, empty, a prepared dataset (which is
    replaced) or ``force`` says so; never the current folder or one that holds it."""
    out = Path(out).absolute()
    if Path.cwd().is_relative_to(out.resolve()):
        raise DataError(f"--out {out}: the current folder (or one holding it) cannot be replaced by a dataset; "
                        "name a new folder, e.g. --out prepared/NAME")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; name a folder for the dataset")
    if force or not out.is_dir() or (out / MANIFEST).is_file() or not any(out.iterdir()):
        return
    shown = ", ".join(sorted(p.name for p in list(out.iterdir())[:3]))
    raise DataError(f"--out {out} holds other files ({shown}, ...), not a prepared dataset; choose an empty or new "
                    "folder, or add --force to replace it and everything in it")


def split_order(split: str) -> tuple[int, str]:
    """train, val, test first, then the rest by name."""
    return {"train": 0, "val": 1, "test": 2}.get(split, 3), split


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- verifying -------------------------------------------------------------------------------------
VERIFIED = ".verified.json"
_verified_here: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) checked in this process


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _verified_file(root: Path) -> Path:
    """Where the hashing record of a dataset is kept: in it, or for a dataset folder that is not writable (a
    shared read-only copy), in the user's cache folder."""
    root = Path(root)
    if os.access(root, os.W_OK):
        return root / VERIFIED
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medvlp"
    return cache / f"verified-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.json"


def _remember_verified(root: Path, shards: list[dict[str, Any]]) -> None:
    """Record the size and modification time at which each shard had its manifest hash (best effort: where
    nothing can be written, the shards are simply hashed again next time)."""
    path = _verified_file(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = json.loads(path.read_text()) if path.is_file() else {}
        for shard in shards:
            known[shard["file"]] = [*_stamp(Path(root) / shard["file"]), shard["sha256"]]
        tmp = path.with_name(f"{VERIFIED}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def verify_shards(root: Path, shards: list[dict[str, Any]]) -> None:
    """Check that each shard exists and has the manifest's SHA-256; a one-line ``DataError`` for the first that
    does not. Shards whose size and modification time are as when they were last hashed are not read again."""
    root = Path(root)
    try:
        record = _verified_file(root)
        known = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        known = {}
    hashed = []
    for shard in shards:
        path, expected = root / shard["file"], shard.get("sha256")
        if not path.is_file():
            raise DataError(f"{path}: shard missing from the prepared dataset; prepare the dataset again")
        if expected is None:
            continue
        size, mtime = _stamp(path)
        if (str(path), size, mtime, expected) in _verified_here or known.get(shard["file"]) == [size, mtime, expected]:
            continue
        if _sha256(path) != expected:
            raise DataError(f"{path}: does not match the sha256 in {root / MANIFEST} (the file was changed or "
                            "damaged after it was prepared); prepare the dataset again")
        _verified_here.add((str(path), size, mtime, expected))
        hashed.append(shard)
    if hashed:
        _remember_verified(root, hashed)


# -- reading -----------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, or a one-line DataError saying what to do."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root}: not a prepared dataset (no {MANIFEST}); create it with `medvlp prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); prepare the dataset again") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema version {manifest.get('schema_version')} but this medvlp reads {SCHEMA_VERSION}; "
            "prepare the dataset again with this version"
        )
    return manifest


def _open_shard(path: Path) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except FileNotFoundError:
        raise DataError(f"{path}: shard missing from the prepared dataset; prepare the dataset again") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable shard ({str(e).splitlines()[0][:200]}); prepare the dataset "
                        "again") from None


class _Shards:
    """Memory-mapped shards read as one table with global row numbers; opened lazily, once per process."""

    def __init__(self, root: Path, shards: list[dict[str, Any]]):
        self.paths = [root / s["file"] for s in shards]
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s["rows"])
        self._tables: list[pa.Table] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens its own maps
        return {**self.__dict__, "_tables": None, "_pid": -1}

    @property
    def tables(self) -> list[pa.Table]:
        if self._tables is None or self._pid != os.getpid():
            self._tables = [_open_shard(p) for p in self.paths]
            self._pid = os.getpid()
        return self._tables

    def locate(self, row: int) -> tuple[pa.Table, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        shard = bisect_right(self.starts, row) - 1
        return self.tables[shard], row - self.starts[shard]

    def column(self, name: str) -> list[Any]:
        try:
            return [v for t in self.tables for v in t.column(name).to_pylist()]
        except (UnicodeDecodeError, pa.ArrowException) as e:
            raise DataError(f"{self.paths[0].parent}: field {name!r} cannot be read ({e}); prepare the dataset "
                            "again") from None


class Records:
    """One split of a prepared dataset, with random access: ``records[i]`` is a dict of the record's fields
    plus ``image_bytes``. Nothing is loaded up front; pickling (for DataLoader workers) carries only paths."""

    def __init__(self, root: Path | str, split: str):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            known = ", ".join(sorted(splits, key=split_order)) or "none"
            raise DataError(f"{self.root}: no split {split!r}; it has {known}")
        self.split, self.family = split, self.manifest["family"]
        verify_shards(self.root, [*splits[split]["shards"], *self.manifest["images"]["shards"]])
        self._records = _Shards(self.root, splits[split]["shards"])
        self._images = _Shards(self.root, self.manifest["images"]["shards"])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        table, row = self._records.locate(i)
        try:
            record = table.slice(row, 1).to_pylist()[0]
        except (UnicodeDecodeError, pa.ArrowException) as e:
            raise DataError(f"{self.root} split {self.split} row {i}: cannot be read ({e}); prepare the dataset "
                            "again") from None
        images, image_row = self._images.locate(record["image"])
        record["image_bytes"] = images.column("data")[image_row].as_py()
        return record

    def column(self, name: str) -> list[Any]:
        """All values of one field in this split (reads only that column)."""
        return self._records.column(name)

    def image(self, row: int) -> bytes:
        table, r = self._images.locate(row)
        return table.column("data")[r].as_py()


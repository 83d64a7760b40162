"""Guarding what medvlp writes: checksums beside weights files, no partial files left by a failed write, and
one process per run folder.

Every weights file medvlp writes gets a ``NAME.sha256`` beside it (the hex digest and the size), and every read
compares them, so a flipped byte is a one-line refusal instead of quietly different weights. A run folder is
held by an exclusive ``flock`` on ``run_dir/.lock`` for as long as a process trains in it; the kernel releases
it when that process ends, however it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from medvlp.errors import MedvlpError

CHECKSUM_SUFFIX = ".sha256"
LOCK_FILE = ".lock"


def sha256_file(path: Path | str) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path | str) -> Path:
    """Where the checksum of ``path`` is kept: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: Path | str, name: str | None = None) -> Path:
    """Write ``path``'s checksum beside it (``digest size name``, one line); ``name`` is the file name recorded
    (the final name when ``path`` is a temporary file about to be renamed). Returns the checksum file."""
    path = Path(path)
    target = checksum_path(path)
    target.write_text(f"{sha256_file(path)} {path.stat().st_size} {name or path.name}\n")
    return target


def verify_checksum(path: Path | str) -> bool:
    """Compare ``path`` with the checksum written beside it; ``False`` when there is none to compare with, a
    one-line ``MedvlpError`` when they differ."""
    path = Path(path)
    record = checksum_path(path)
    if not record.is_file():
        return False
    try:
        digest, size = record.read_text().split()[:2]
        size = int(size)
    except (ValueError, OSError, UnicodeDecodeError):
        raise MedvlpError(f"{record}: not a checksum file medvlp wrote; delete it or restore it from a "
                          "backup") from None
    actual = path.stat().st_size
    if actual != size or sha256_file(path) != digest:
        what = f"{actual:,} bytes instead of {size:,}" if actual != size else "its content changed"
        raise MedvlpError(f"{path}: does not match its checksum {record.name} ({what}); the file is damaged: "
                          "restore it, or use an earlier checkpoint")
    return True


@contextlib.contextmanager
def cleaned_on_failure(*paths: Path, what: str, again: str = " (a training run: with --resume)") -> Iterator[None]:
    """Remove ``paths`` (files or folders this write created) when the block fails; a full disk, or any other
    failure of the operating system to write, becomes a one-line ``MedvlpError`` naming ``what`` (``again``
    ends its advice)."""
    try:
        yield
    except BaseException as e:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        # a full disk as the OS says it, as safetensors says it, and as torch.save says it (a short write)
        full = getattr(e, "errno", None) == errno.ENOSPC or any(
            sign in str(e) for sign in ("No space left on device", "unexpected pos"))
        if full or isinstance(e, OSError):
            reason = "no space left on the disk" if full else (getattr(e, "strerror", None) or str(e))
            raise MedvlpError(f"{what}: could not be written ({reason}); nothing partial was left behind: free "
                              f"space (or fix the folder's permissions) and run again{again}") from None
        raise


def distributed_rank() -> int:
    """This process's rank in a distributed run as its launcher set it (torchrun: ``RANK``; Lightning's DDP
    workers: ``LOCAL_RANK`` with ``NODE_RANK``), 0 outside one."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


class RunLock:
    """An exclusive lock on a run folder, held from ``__enter__`` to ``__exit__`` (or until the process ends).

    A second process (or a second run in this one) on the same folder gets a one-line ``MedvlpError``. The
    other processes of one distributed run (Lightning's DDP workers, torchrun's ranks: ``RANK`` or
    ``LOCAL_RANK`` above 0 in their environment) share the folder of the rank-0 process, which holds the lock.
    """

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if distributed_rank() > 0:
            return self  # rank 0 of this run holds the lock
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MedvlpError(f"{self.run_dir} is in use by another medvlp process (pid {holder}); wait for it "
                                  "to finish or choose another run_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

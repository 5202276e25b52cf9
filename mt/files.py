"""Writing files so that a crash or a full disk never leaves half a file: temporary name, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    with FileSet() as files:
        write(files.open(path))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class FileSet:
    """Files that must agree (a corpus's sides and its manifest), replaced together or not at all.

    Each file is written to a temporary file beside its target; only when the block ends without
    an error are they all fsync'ed and renamed into place, so a failure while writing (a full disk,
    bad input half-way through a stream) leaves every old file as it was. (The renames themselves
    are quick but not one atomic step.)
    """

    def __init__(self) -> None:
        self.staged: list[tuple[BinaryIO, Path, Path]] = []  # (open temporary file, its name, target)

    def open(self, path: Path) -> BinaryIO:
        """A binary file to write `path`'s new content into, in place once the set is complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)
        handle = os.fdopen(fd, "wb")
        self.staged.append((handle, Path(tmp), path))
        return handle

    def write_text(self, path: Path, text: str) -> None:
        self.open(path).write(text.encode("utf-8"))

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                for handle, _, path in self.staged:
                    with _named(path):
                        handle.flush()
                        os.fsync(handle.fileno())
                        handle.close()
                for _, tmp, path in self.staged:
                    os.replace(tmp, path)
            elif isinstance(error, OSError) and not error.filename and self.staged:
                # a failed write() names no file; the newest file opened is the one being written
                raise _with_path(error, self.staged[-1][2]) from error
        finally:
            for handle, tmp, _ in self.staged:
                try:
                    handle.close()
                except OSError:  # its buffered bytes cannot be written either (the disk is full)
                    pass
                tmp.unlink(missing_ok=True)  # gone already when renamed


def _with_path(error: OSError, path: Path) -> OSError:
    return type(error)(error.errno, error.strerror, str(path))


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """Give an OSError raised in the block that names no file the name of `path`."""
    try:
        yield
    except OSError as error:
        if error.filename:
            raise
        raise _with_path(error, path) from error


class FileLock:
    """An exclusive advisory lock (flock) on `path`, held until `release` or the process ends.

    The kernel drops it when the process dies, even by SIGKILL, so a crash never leaves a stale
    lock behind. The file holds the holder's pid, for the message a second process gets.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = None

    def acquire(self) -> None:
        """Take the lock, or raise BlockingIOError naming the holder's pid when another process has it."""
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no advisory locks; nothing to hold
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise BlockingIOError(f"held by process {holder}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the flock
            self.handle = None

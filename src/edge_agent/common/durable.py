"""Durable file operations: every persistent write of edgefleet goes through here.

``write_atomic`` writes a temp file in the same directory, fsyncs it, renames it over the target
and fsyncs the directory, so after a crash or power loss a reader sees either the old or the new
content, never a mix. All file I/O of the model store uses these functions, which also makes them
the single place tests inject faults (disk full, crash between steps).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Raises:
        OSError: the write failed (e.g. ENOSPC); ``path`` is untouched and no temp file remains.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files a crash left behind in ``directory`` (recursively); return the count."""
    count = 0
    for p in Path(directory).rglob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    return count


@contextlib.contextmanager
def exclusive_lock(directory: Path, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` (one store writer at a time).

    Raises:
        TimeoutError: another process held the lock for longer than ``timeout`` seconds.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{directory} is locked by another process") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)

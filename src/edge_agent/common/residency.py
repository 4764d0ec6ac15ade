"""Handing back memory a serving daemon touched while starting and does not use while serving.

Owns the Linux/glibc calls the daemon makes about its memory (``edge_agent.daemon``), and the
pure parsing that chooses what they apply to. At start, before any thread:

* ``limit_malloc_arenas``: glibc ``mallopt(M_ARENA_MAX, n)``. glibc gives threads that contend
  for malloc arenas of their own, up to 8 per core; every arena keeps its own free memory, so a
  daemon whose requests run on a pool of API threads and grpc's workers holds several partly
  used heaps. Capping them trades a little lock contention for that memory.

Once its front ends are up:

* ``release_library_pages``: ``madvise(MADV_PAGEOUT)`` on every clean, read-only, file-backed
  mapping (shared-library code and read-only data). Loading onnxruntime, grpc, numpy and
  cryptography touches tens of MB of their code (relocation, static initialisers, kernel
  registration, import-time work) that serving never runs again; those pages stay resident
  until the kernel needs the memory. Paged out, they leave the process's RSS and, when no other
  process maps them, the page cache; a page the daemon uses again is faulted back in from the
  page cache or the file. Mappings holding private (copy-on-write) pages are skipped, so no
  anonymous memory is ever sent to swap and nothing writable is touched.
* ``trim_malloc``: glibc ``malloc_trim(0)``, which returns the free pages of the malloc heaps
  (left by parsing and optimising the model at load) to the kernel.

Neither changes what the process computes; both are best effort (another OS, an old kernel or
another C library: nothing happens, and the caller learns it from the return value). Does not
decide when to call them (the daemon does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Mapping",
    "clean_library_mappings",
    "limit_malloc_arenas",
    "parse_smaps",
    "release_library_pages",
    "trim_malloc",
]

MADV_PAGEOUT = 21  # Linux >= 5.4
M_ARENA_MAX = -8  # glibc's mallopt parameter
_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)")


@dataclass(frozen=True)
class Mapping:
    """One mapping of ``/proc/<pid>/smaps``: address range, permissions, path, resident KiB."""

    start: int
    end: int
    perms: str
    path: str
    rss_kib: int
    anonymous_kib: int


def parse_smaps(text: str) -> Iterator[Mapping]:
    """The mappings of a ``/proc/<pid>/smaps`` text, in order (unknown lines are skipped)."""
    head: tuple[int, int, str, str] | None = None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        m = _HEADER.fullmatch(line)
        if m:
            if head is not None:
                yield Mapping(*head, fields.get("Rss", 0), fields.get("Anonymous", 0))
            head, fields = (int(m[1], 16), int(m[2], 16), m[3], m[4].strip()), {}
            continue
        key, sep, rest = line.partition(":")
        if sep and key in ("Rss", "Anonymous"):
            value = rest.split()
            if value and value[0].isdigit():
                fields[key] = int(value[0])
    if head is not None:
        yield Mapping(*head, fields.get("Rss", 0), fields.get("Anonymous", 0))


def clean_library_mappings(text: str) -> list[Mapping]:
    """The mappings ``release_library_pages`` advises: private, read-only (``r--p``/``r-xp``)
    mappings of a file (the path starts with ``/``, not ``(deleted)``), with resident pages and
    no private copy-on-write page among them (``Anonymous: 0``)."""
    return [
        m
        for m in parse_smaps(text)
        if m.perms in ("r--p", "r-xp")
        and m.path.startswith("/")
        and not m.path.endswith("(deleted)")
        and m.rss_kib > 0
        and m.anonymous_kib == 0
    ]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def release_library_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Page out this process's clean read-only file pages; returns the KiB that were resident
    in the advised mappings (0 when nothing was done: not Linux, or the kernel has no
    ``MADV_PAGEOUT``). Never raises."""
    libc = _libc()
    if libc is None:
        return 0
    try:
        # A mapped file's path may be any bytes (a model or a venv under a Latin-1 name).
        mappings = clean_library_mappings(smaps.read_bytes().decode("utf-8", "surrogateescape"))
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    released = 0
    for m in mappings:
        # A failure skips that mapping only: EINVAL is a kernel before 5.4 (no MADV_PAGEOUT:
        # every call fails alike, a few hundred cheap calls) but also one mapping the kernel will
        # not page out (locked, PFN-mapped device memory, huge pages) among others it will;
        # ENOMEM is a mapping gone since smaps was read.
        if madvise(m.start, m.end - m.start, MADV_PAGEOUT) == 0:
            released += m.rss_kib
    return released


def trim_malloc() -> bool:
    """``malloc_trim(0)``: give the malloc heaps' free pages back; ``False`` without glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def limit_malloc_arenas(n: int) -> bool:
    """``mallopt(M_ARENA_MAX, n)``: at most ``n`` malloc arenas from now on (threads that
    already have one keep it); ``False`` without glibc or if glibc refused ``n``."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, n) == 1)

"""The daemon's memory calls: which mappings are paged out, the real calls, the config keys."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_agent.common import residency
from edge_agent.common.residency import (
    clean_library_mappings,
    limit_malloc_arenas,
    parse_smaps,
    release_library_pages,
    trim_malloc,
)
from edge_agent.config import load_config
from edge_agent.errors import ConfigError

LINUX = sys.platform.startswith("linux")

SMAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 100 /usr/bin/python3.11
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000200000 r-xp 00001000 08:01 200 /venv/lib/onnxruntime/capi/libort.so
Size:               2048 kB
Rss:                1500 kB
Anonymous:             0 kB
7f0000200000-7f0000210000 r--p 00201000 08:01 200 /venv/lib/onnxruntime/capi/libort.so
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000210000-7f0000220000 rw-p 00211000 08:01 200 /venv/lib/onnxruntime/capi/libort.so
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000300000-7f0000400000 r-xp 00000000 08:01 300 /venv/lib/grpc/cygrpc.so
Size:               1024 kB
Rss:                   0 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00000000 08:01 400 /tmp/gone.so (deleted)
Size:               1024 kB
Rss:                 100 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
7f0000600000-7f0000700000 r--p 00000000 00:00 0 [heap]
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
7f0000700000-7f0000701000 r--s 00000000 08:01 500 /dev/shm/x
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
"""


def test_parse_smaps_reads_every_mapping() -> None:
    maps = list(parse_smaps(SMAPS))
    assert len(maps) == 9
    assert maps[1].start == 0x7F0000000000
    assert maps[1].end == 0x7F0000200000
    assert maps[1].perms == "r-xp"
    assert maps[1].path == "/venv/lib/onnxruntime/capi/libort.so"
    assert (maps[1].rss_kib, maps[1].anonymous_kib) == (1500, 0)
    assert maps[6].path == ""


def test_only_clean_read_only_file_mappings_with_resident_pages_are_advised() -> None:
    chosen = [(m.path, m.perms) for m in clean_library_mappings(SMAPS)]
    # Not: copy-on-write pages (relro), writable data, nothing resident, a deleted file,
    # anonymous memory, the heap, a shared mapping.
    assert chosen == [
        ("/usr/bin/python3.11", "r--p"),
        ("/venv/lib/onnxruntime/capi/libort.so", "r-xp"),
    ]


def test_garbage_smaps_text_gives_no_mapping() -> None:
    assert clean_library_mappings("not smaps\nRss: lots\n\x00") == []


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not LINUX, reason="MADV_PAGEOUT and /proc are Linux's")
def test_release_pages_out_this_process_library_pages_and_it_keeps_working() -> None:
    import numpy as np

    np.arange(1000).sum()  # numpy's code and data pages are resident
    before = _rss_file_kib()
    released = release_library_pages()
    after = _rss_file_kib()
    assert released > 0
    assert after < before
    # Paged-out code is faulted back in when it runs again.
    assert int(np.arange(1000).sum()) == 499500


def test_release_without_smaps_does_nothing(tmp_path: Path) -> None:
    assert release_library_pages(tmp_path / "missing") == 0


@pytest.mark.skipif(not LINUX, reason="glibc's malloc_trim")
def test_trim_malloc_runs_on_glibc() -> None:
    assert trim_malloc() is True


def test_release_startup_memory_defaults_on_and_loads(tmp_path: Path) -> None:
    assert load_config(None, {}).runtime.release_startup_memory is True
    f = tmp_path / "a.toml"
    f.write_text("[runtime]\nrelease_startup_memory = false\n")
    assert load_config(f, {}).runtime.release_startup_memory is False
    env = {"EDGEFLEET_AGENT__RUNTIME__RELEASE_STARTUP_MEMORY": "false"}
    assert load_config(None, env).runtime.release_startup_memory is False


@pytest.mark.parametrize(
    "value", ["0", "1", "-1", "1.0", "nan", '"true"', '"yes"', '""', "[true]", "{}"]
)
def test_config_refuses_hostile_release_startup_memory(tmp_path: Path, value: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(f"[runtime]\nrelease_startup_memory = {value}\n")
    message = "runtime.release_startup_memory must be"
    with pytest.raises(ConfigError, match=message):
        load_config(f, {})
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"EDGEFLEET_AGENT__RUNTIME__RELEASE_STARTUP_MEMORY": value})


@pytest.mark.skipif(not LINUX, reason="glibc's mallopt")
def test_limit_malloc_arenas_is_accepted_by_glibc() -> None:
    assert limit_malloc_arenas(2) is True


def test_malloc_arenas_defaults_to_2_and_loads(tmp_path: Path) -> None:
    assert load_config(None, {}).runtime.malloc_arenas == 2
    f = tmp_path / "a.toml"
    f.write_text("[runtime]\nmalloc_arenas = 0\n")
    assert load_config(f, {}).runtime.malloc_arenas == 0
    assert (
        load_config(None, {"EDGEFLEET_AGENT__RUNTIME__MALLOC_ARENAS": "64"}).runtime.malloc_arenas
        == 64
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "runtime.malloc_arenas must be in"),
        ("65", "runtime.malloc_arenas must be in"),
        ("2147483648", "runtime.malloc_arenas must be in"),
        ("-9223372036854775808", "runtime.malloc_arenas must be in"),
        ("true", "runtime.malloc_arenas must be int"),
        ("2.0", "runtime.malloc_arenas must be int"),
        ("nan", "runtime.malloc_arenas must be a finite number"),
        ('"2"', "runtime.malloc_arenas must be int"),
        ("[2]", "runtime.malloc_arenas must be int"),
    ],
)
def test_config_refuses_hostile_malloc_arenas(tmp_path: Path, value: str, message: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(f"[runtime]\nmalloc_arenas = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(f, {})
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"EDGEFLEET_AGENT__RUNTIME__MALLOC_ARENAS": value})


@pytest.mark.skipif(not LINUX, reason="/proc/self/statm is Linux's")
def test_model_memory_is_measured_without_file_pages_paged_back_in(tmp_path: Path) -> None:
    """A model load is measured by private memory: library pages the load faults back in after
    the start-up page-out are file-backed and must not count as the model's memory."""
    import mmap

    from edge_agent.serving.registry import private_bytes

    data = tmp_path / "lib.bin"
    data.write_bytes(b"\x01" * (32 << 20))
    with data.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
        rss_before, private_before = _rss_file_kib(), private_bytes()
        touched = sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))  # page in 32 MiB
        rss_after, private_after = _rss_file_kib(), private_bytes()
    assert touched == (32 << 20) // mmap.PAGESIZE
    assert rss_after - rss_before >= 16 << 10  # KiB: the file pages are resident now
    assert private_after - private_before < 4 << 20  # bytes: not counted as private memory
    # 32 MiB of fresh private pages (an anonymous mapping: a malloc'd buffer could reuse memory
    # a test before this one freed and the allocator kept resident).
    with mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as heap:
        for i in range(0, len(heap), mmap.PAGESIZE):
            heap[i] = 2
        assert private_bytes() - private_after >= 24 << 20


@pytest.mark.skipif(not LINUX, reason="madvise and /proc are Linux's")
def test_a_mapped_path_that_is_not_utf8_does_not_stop_the_release(tmp_path: Path) -> None:
    """Paths in smaps are bytes: a file under a Latin-1 name is read, not a crash at start."""
    import mmap

    odd = tmp_path / os.fsdecode(b"model\xff.bin")
    odd.write_bytes(b"\x01" * (1 << 20))
    with odd.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[0] == 1  # resident, read-only, file-backed: a candidate
        assert os.fsencode(str(odd)) in Path("/proc/self/smaps").read_bytes()
        assert release_library_pages() > 0


@pytest.mark.skipif(not LINUX, reason="madvise and /proc are Linux's")
def test_a_mapping_the_kernel_refuses_skips_only_that_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL for one mapping (locked, PFN-mapped, huge pages) leaves the others advised."""
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000000000-7f0000001000 r-xp 00000000 08:01 200 /dev/refused\n"
        "Rss:                   4 kB\nAnonymous:             0 kB\n"
        "7f0000001000-7f0000002000 r-xp 00000000 08:01 201 /lib/fine.so\n"
        "Rss:                   8 kB\nAnonymous:             0 kB\n"
    )
    calls: list[int] = []

    def madvise(start: int, length: int, advice: int) -> int:
        calls.append(start)
        return -1 if start == 0x7F0000000000 else 0

    monkeypatch.setattr(residency, "_libc", lambda: SimpleNamespace(madvise=madvise))
    assert release_library_pages(smaps) == 8
    assert calls == [0x7F0000000000, 0x7F0000001000]

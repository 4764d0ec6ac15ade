"""Where a serving daemon's resident memory goes: ``/proc/<pid>/smaps`` by mapping, after load.

Starts a real ``edge-agent run`` daemon with one model (the quantized digits MLP of
``bench_agent``) and ``[grpc] enabled`` (``--grpc off`` to compare), sends ``--requests`` REST
and as many gRPC inferences from ``--clients`` concurrent client threads each (so the API's and
grpc's worker threads all run), waits for the daemon to settle, and sums ``Rss`` of every
mapping in ``/proc/<pid>/smaps``:

* file-backed pages by library: a shared object or file under ``site-packages/<pkg>/`` counts
  for ``<pkg>`` (``numpy``, ``onnxruntime``, ``grpc``, ``cryptography``...), the others by file
  name (``libpython3.11.so``, ``libc.so.6``, ``libcrypto.so.3``...);
* anonymous pages by kind: ``[heap]`` (the main ``brk`` heap: Python objects and the main
  thread's malloc), glibc malloc arenas of other threads (mappings inside 64 MiB-aligned
  reservations), thread stacks (mappings next to a guard page, of a thread's stack size) and
  other anonymous mappings (pymalloc arenas, numpy buffers, onnxruntime's arena...).

Also prints the daemon's threads by name and the top-level packages it imported (from
``PYTHONPROFILEIMPORTTIME``, so imports made while serving count too), largest first.

Every figure is one daemon (RSS of a fresh daemon after the same load differs by a few hundred
KiB between runs; ``bench_grpc_rss`` reports the median of several). ``--env KEY=VALUE`` sets
a variable in the daemon's environment (e.g. ``MALLOC_ARENA_MAX=2``), ``--set section.key=value``
a config override.

``--imports`` prints instead what importing the daemon's modules costs a fresh interpreter in
RssAnon, step by step.

Usage: .venv/bin/python bench/bench_rss_breakdown.py [--grpc on|off] [--requests 500]
       [--clients 4] [--top 25] [--env KEY=VALUE ...] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# This process maps none of the daemon's libraries (no numpy, onnxruntime or grpc import here:
# the bundle is built by a child process and gRPC clients run in children importing a copy of
# grpc). A page two processes map is never paged out, so a load generator sharing the daemon's
# library files would keep pages resident in the daemon that a device's daemon would not hold.
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_CLIENT = """
import sys, threading, grpc
target, body_file, n, clients = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = open(body_file, "rb").read()
stop = threading.Event()
def run():
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        i = 0
        while (n <= 0 or i < n) and not stop.is_set():
            call(body, timeout=10)
            i += 1
threads = [threading.Thread(target=run) for _ in range(clients)]
for t in threads: t.start()
if n <= 0:
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
for t in threads: t.join()
"""


#: Packages with shared objects the daemon loads. The daemons of these benches import copies of
#: them (made under the work directory, ``private_libs``): a page two processes map is never
#: paged out, and a device's daemon shares no library file with a fleet server, a load
#: generator or another daemon, as a fleet child, a bare server or another bench running at
#: the same time from this virtualenv would.
DAEMON_PACKAGES = ("numpy", "numpy.libs", "onnxruntime", "grpc", "cryptography", "google",
                   "orjson", "uvloop", "httptools")  # fmt: skip
DAEMON_MODULES = ("_cffi_backend", "_datasketches")


def private_libs(work: Path) -> Path:
    """Copies of ``DAEMON_PACKAGES`` and ``DAEMON_MODULES`` under ``work``, for ``PYTHONPATH``."""
    lib = work / "daemonlib"
    packages = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    for entry in packages.iterdir():
        if entry.name in DAEMON_PACKAGES:
            shutil.copytree(entry, lib / entry.name)
        elif entry.name.split(".")[0] in DAEMON_MODULES and entry.suffix == ".so":
            shutil.copy2(entry, lib / entry.name)
    return lib


IMPORTS_CHILD = """
import importlib, sys
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
steps = [("numpy",), ("onnxruntime",), ("click", "edge_agent.cli.main", "edge_agent.daemon"),
         ("edge_agent.api.app", "edge_agent.api.server", "edge_agent.api.metrics",
          "edge_agent.serving.metrics"),
         ("edge_agent.api.grpc_v2.server", "edge_agent.api.grpc_v2.service"),
         ("edge_agent.sync.loop", "edge_agent.serving.fallback_mqtt", "edge_agent.common.identity")]
before = anon()
print(f"| interpreter | {before / 1024:.1f} | {len(sys.modules)} |")
for step in steps:
    n, a = len(sys.modules), anon()
    for name in step:
        importlib.import_module(name)
    print(f"| + {', '.join(step)} | {(anon() - a) / 1024:+.1f} | {len(sys.modules) - n:+d} |")
print(f"| **total** | **{anon() / 1024:.1f}** | {len(sys.modules)} |")
"""


def imports_table() -> None:
    """RssAnon (MB) a fresh interpreter gains importing what the daemon imports, step by step
    (the gRPC step is what ``[grpc] enabled`` adds, the last one what ``[sync] enabled`` adds)."""
    print("| imported | RssAnon (MB) | modules |\n|---|---:|---:|")
    subprocess.run([sys.executable, "-c", IMPORTS_CHILD], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


def prepare(work: Path, batch: int = 1) -> dict[str, str]:
    """Build and sign the digits bundle and write the request bodies, in a child process;
    returns the paths: bundle, root, rest (JSON body), grpc (serialized ModelInferRequest)."""
    out = subprocess.run([sys.executable, __file__, "--prepare", str(work), "--batch", str(batch)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _prepare_here(work: Path, batch: int) -> None:
    sys.path.insert(0, str(HERE))
    from bench_agent import build_bundle, grpc_body

    bundle, root, x = build_bundle(work)
    rows = x[:batch]
    rest = work / f"rest-{batch}.json"
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
              "data": rows.ravel().tolist()}  # fmt: skip
    rest.write_text(json.dumps({"inputs": [tensor]}))
    grpc = work / f"grpc-{batch}.bin"
    grpc.write_bytes(grpc_body(rows))
    print(
        json.dumps({"bundle": str(bundle), "root": str(root), "rest": str(rest), "grpc": str(grpc)})
    )


def grpc_client(
    work: Path, target: str, body: Path, n: int, clients: int
) -> subprocess.Popen[bytes]:
    """A child sending ``body`` to ``target`` from ``clients`` threads, ``n`` calls each (``n <=
    0``: until its stdin is closed), importing a copy of grpc under ``work`` (not the daemon's
    files)."""
    lib = work / "clientlib"
    if not (lib / "grpc").exists():
        import importlib.util

        spec = importlib.util.find_spec("grpc")
        if spec is None or spec.origin is None:
            raise RuntimeError("grpcio is not installed")
        shutil.copytree(Path(spec.origin).parent, lib / "grpc")
    env = dict(os.environ, PYTHONPATH=str(lib))
    argv = [sys.executable, "-c", GRPC_CLIENT, target, str(body), str(n), str(clients)]
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE)


def daemon_env(work: Path, sets: list[str], envs: list[str]) -> dict[str, str]:
    """The daemon's environment: private copies of its compiled packages first on the path,
    ``section.key=value`` overrides as the agent's own ``EDGEFLEET_AGENT__`` variables, and
    ``NAME=value`` variables as given."""
    env = dict(os.environ)
    lib = str(private_libs(work))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), lib]))
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        env[f"EDGEFLEET_AGENT__{section.upper()}__{name.upper()}"] = value
    for item in envs:
        key, _, value = item.partition("=")
        env[key] = value
    return env


class RestLoad:
    """``conns`` threads posting ``body`` to ``path`` back to back until ``stop`` (``n`` each
    when ``n > 0``)."""

    def __init__(self, port: int, path: str, body: bytes, conns: int, n: int = 0) -> None:
        self.port, self.path, self.body, self.n = port, path, body, n
        self.requests = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(conns)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        i = 0
        while not self._stop.is_set() and (self.n <= 0 or i < self.n):
            i += 1
            ok = False
            try:
                conn.request("POST", self.path, body=self.body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self._lock:
                self.requests += 1
                self.errors += not ok
        conn.close()


HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
ARENA = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: each non-main arena heap's reservation
HEAP = "[heap] (main brk heap: Python objects, main-thread malloc)"
ARENAS = "malloc arenas of other threads (64 MiB reservations)"
STACKS = "thread stacks (after a guard page)"
OTHER = "other anonymous (pymalloc arenas, numpy/onnxruntime buffers, mmap'd malloc)"
PRIVATE = "file mappings' private pages (.data/.bss, relocations)"


@dataclass
class Map:
    """One mapping of ``/proc/<pid>/smaps``; sizes in KiB."""

    start: int
    end: int
    perms: str
    path: str
    rss: int = 0
    anonymous: int = 0


def read_smaps(pid: int) -> list[Map]:
    """Every mapping of ``pid`` with its ``Rss`` and ``Anonymous``."""
    maps: list[Map] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = HEADER.match(line)
        if m:
            maps.append(Map(int(m[1], 16), int(m[2], 16), m[3], m[4].strip()))
        elif maps and line.startswith("Rss:"):
            maps[-1].rss = int(line.split()[1])
        elif maps and line.startswith("Anonymous:"):
            maps[-1].anonymous = int(line.split()[1])
    return maps


def file_group(path: str) -> str:
    """The library a file mapping belongs to: its package (in site-packages or the daemon's
    private copies), else its file name."""
    m = re.search(r"(?:site-packages|daemonlib)/([^/]+)/", path)
    return m[1].removesuffix(".libs") if m else Path(path).name


def anon_kind(maps: list[Map], i: int) -> str:
    mp = maps[i]
    if mp.path == "[heap]":
        return HEAP
    if mp.path.startswith("[stack"):
        return "[stack] (main thread)"
    if mp.path.startswith("["):
        return mp.path
    if mp.perms == "rw-p" and mp.start % ARENA == 0:
        return ARENAS
    prev = maps[i - 1] if i else None
    if prev is not None and prev.perms == "---p" and prev.end == mp.start and mp.perms == "rw-p":
        return STACKS
    return OTHER


def classify(maps: list[Map]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """(file Rss by library, anonymous Rss by kind, mapping counts by kind) in KiB."""
    files: Counter[str] = Counter()
    anon: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for i, mp in enumerate(maps):
        if mp.path.startswith("/"):
            # A file mapping's private (copy-on-write) pages are anonymous memory.
            files[file_group(mp.path)] += mp.rss - mp.anonymous
            anon[PRIVATE] += mp.anonymous
            continue
        kind = anon_kind(maps, i)
        anon[kind] += mp.rss
        counts[kind] += 1
    return files, anon, counts


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            out[key] = int(value.split()[0])
    return out


def threads(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            names[(task / "comm").read_text().strip()] += 1
    return names


def imported_packages(stderr_text: str) -> list[tuple[str, int]]:
    """Top-level packages the daemon imported and their summed self import time (us), from
    ``PYTHONPROFILEIMPORTTIME`` lines (``import time: self | cumulative | name``)."""
    total: dict[str, int] = defaultdict(int)
    for line in stderr_text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.removeprefix("import time:").split("|")
        total[parts[2].strip().split(".")[0]] += int(parts[0])
    return sorted(total.items(), key=lambda kv: -kv[1])


def mb(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def report(
    args: argparse.Namespace, ready: dict[str, int], st: dict[str, int], maps: list[Map],
    names: Counter[str], err_text: str,
) -> None:  # fmt: skip
    files, anon, counts = classify(maps)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, loadavg {load}, gRPC {args.grpc}, "
          f"{args.requests} REST{' + gRPC' if args.grpc == 'on' else ''} requests from "
          f"{args.clients} client thread(s) each, env {args.env or 'none'}, "
          f"overrides {args.set or 'none'}")  # fmt: skip
    print(f"\nReady: VmRSS {mb(ready['VmRSS'])} MB. After load: VmRSS {mb(st['VmRSS'])} MB = "
          f"RssAnon {mb(st['RssAnon'])} + RssFile {mb(st['RssFile'])} + RssShmem "
          f"{mb(st['RssShmem'])}; {st['Threads']} threads\n")  # fmt: skip
    print("| file-backed (by library) | Rss (MB) |\n|---|---:|")
    shown = [(name, kib) for name, kib in files.most_common(args.top) if kib >= 100]
    for name, kib in shown:
        print(f"| {name} | {mb(kib)} |")
    rest = sum(files.values()) - sum(k for _, k in shown)
    print(f"| {len(files) - len(shown)} others | {mb(rest)} |")
    print(f"| **total file-backed** | **{mb(sum(files.values()))}** |")
    print("\n| anonymous (by kind) | mappings | Rss (MB) |\n|---|---:|---:|")
    for kind, kib in anon.most_common():
        if kib >= 100:
            print(f"| {kind} | {counts.get(kind, '')} | {mb(kib)} |")
    print(f"| **total anonymous** | | **{mb(sum(anon.values()))}** |")
    biggest = sorted((m for m in maps if not m.path.startswith("/")), key=lambda m: -m.rss)
    print("\nLargest anonymous mappings (Rss/size KiB):",
          ", ".join(f"{m.rss}/{(m.end - m.start) // 1024}" for m in biggest[:12]))  # fmt: skip
    print("\nThreads:", ", ".join(f"{k} x{n}" if n > 1 else k for k, n in names.most_common()))
    released = re.search(r"released [0-9.]+ MB of library pages[^\n]*", err_text)
    print("\nDaemon log:", released[0] if released else "no release (release_startup_memory off)")
    packages = imported_packages(err_text)
    print("\nImported top-level packages (self import time summed, ms):",
          ", ".join(f"{k} {us / 1000:.0f}" for k, us in packages if us >= 1000))  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> None:
    files = prepare(work)
    bundle, root = Path(files["bundle"]), Path(files["root"])
    grpc_on = args.grpc == "on"
    port, grpc_port = free_port(), free_port()
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000\n"
        f"[grpc]\nenabled = {str(grpc_on).lower()}\nport = {grpc_port}\n"
        f'[store]\nstate_dir = "{work / "state"}"\nroot_path = "{root}"\n'
    )
    env = daemon_env(work, args.set, args.env)
    edge_agent = str(BIN / "edge-agent")
    subprocess.run([edge_agent, "install", str(bundle), "--config", str(cfg)], check=True,
                   capture_output=True, env=env)  # fmt: skip
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    errlog = work / "daemon.err"
    with errlog.open("wb") as err:
        proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        ready = status(proc.pid)
        rest = RestLoad(port, "/v2/models/digits/infer", Path(files["rest"]).read_bytes(),
                        args.clients, args.requests)  # fmt: skip
        rest.start()
        if grpc_on:
            client = grpc_client(work, f"127.0.0.1:{grpc_port}", Path(files["grpc"]),
                                 args.requests, args.clients)  # fmt: skip
            client.stdin.close()  # type: ignore[union-attr]
            if client.wait(timeout=600) != 0:
                raise RuntimeError("the gRPC client failed")
        rest.join()
        if rest.errors:
            raise RuntimeError(f"{rest.errors} REST requests failed")
        time.sleep(2.0)  # let the drift worker and allocator settle before reading RSS
        st = status(proc.pid)
        maps = read_smaps(proc.pid)
        names = threads(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(args, ready, st, maps, names, errlog.read_text(errors="replace"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grpc", choices=("on", "off"), default="on")
    ap.add_argument("--requests", type=int, default=500, help="requests per client thread")
    ap.add_argument("--clients", type=int, default=4, help="client threads per protocol")
    ap.add_argument("--top", type=int, default=25, help="libraries to list")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--imports", action="store_true", help="only the import cost table")
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        _prepare_here(args.prepare, args.batch)
        return
    if args.imports:
        imports_table()
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()

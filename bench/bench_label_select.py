"""Device selection by label selector at fleet scale, and the cost of holding a rollout step.

Fills a registry (SQLite by default; ``--postgresql`` starts a throwaway PostgreSQL cluster,
``--url`` uses a database you give) with N devices (default 10,000),
each with device-reported labels (``site`` one of 200, ``hw`` one of 4, ``os``) and, for one
in ten, an operator's ``site`` overriding it; one in fifty carries ``legacy``. Then times
``registry.labels.select_devices`` (one query over the ``(key, value)`` index) for a few
selectors against a full scan (every device and its labels read, matched in Python), and
``window_opens_at`` for every device against three windows (what a rollout step with windows
adds). Median of ``--repeat`` runs; ``--markdown`` prints the table for the docs.

    .venv/bin/python bench/bench_label_select.py --devices 10000 --markdown [--postgresql]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import Device
from fleet_server.registry.tables.labels import DeviceLabelRow
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.windows import MaintenanceWindow, window_opens_at
from fleetworkers import PgCluster

NOW = datetime(2027, 1, 4, 11, 0, tzinfo=UTC)
SELECTORS = (
    "site=site-17",
    "site in (site-1,site-2,site-3),hw=orin",
    "hw notin (pi4),os=linux",
    "legacy",
    "!legacy,site!=site-0",
)


def fill(reg: Registry, n: int, rng: random.Random) -> None:
    """N devices with labels, written in a few large transactions."""
    for start in range(0, n, 2000):
        with reg.write_session("bench fill") as s:
            for i in range(start, min(n, start + 2000)):
                d = f"dev-{i:06d}"
                s.add(Device(id=d, group="fleet", tags={}, enrolled_at=NOW, epoch=1))
                own = {"site": f"site-{rng.randrange(200)}", "hw": rng.choice(
                    ["pi4", "pi5", "orin", "x86"]), "os": "linux"}  # fmt: skip
                if i % 50 == 0:
                    own["legacy"] = "yes"
                op = {"site": f"site-{rng.randrange(200)}"} if i % 10 == 0 else {}
                s.flush()
                for k, v in own.items():
                    s.add(DeviceLabelRow(device_id=d, source="device", key=k, value=v,
                                         effective=k not in op))  # fmt: skip
                for k, v in op.items():
                    s.add(DeviceLabelRow(device_id=d, source="operator", key=k, value=v,
                                         effective=True))  # fmt: skip


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    out: object = None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--url", help="registry URL (default: a SQLite file in a temp directory)")
    ap.add_argument("--postgresql", action="store_true", help="a throwaway PostgreSQL cluster")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    pg = PgCluster() if args.postgresql else None
    if pg is not None:
        pg.start()
        args.url = pg.create_database("labels")
    try:
        run(args)
    finally:
        if pg is not None:
            pg.stop()


def run(args: argparse.Namespace) -> None:
    """Fill, time and print (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry.open(args.url or f"sqlite:///{Path(tmp) / 'registry.db'}")
        reg.upgrade()
        fill(reg, args.devices, random.Random(15))
        rows = []
        for text in SELECTORS:
            sel = LabelSelector.parse(text)
            t_idx, found = timed(lambda s=sel: label_store.select_device_ids(reg, s), args.repeat)
            t_rec, _ = timed(lambda s=sel: label_store.select_devices(reg, s), args.repeat)

            def scan(s: LabelSelector = sel) -> list[str]:
                labels = label_store.labels_of(reg, None)
                return [d.id for d in reg.list_devices() if s.matches(labels.get(d.id, {}))]

            t_scan, scanned = timed(scan, args.repeat)
            assert found == scanned, text  # the query and the pure matcher agree
            rows.append((text, len(scanned), t_idx, t_rec, t_scan))
        windows = [
            MaintenanceWindow.from_dict(
                {
                    "name": f"w{i}",
                    "selector": f"site in (site-{i},site-{i + 1})",
                    "start": "02:00",
                    "duration_minutes": 60,
                    "timezone": "Europe/Berlin",
                }
            )
            for i in range(3)
        ]
        labels = label_store.labels_of(reg, None)
        t_hold, _ = timed(
            lambda: [window_opens_at(windows, lab, NOW) for lab in labels.values()], args.repeat
        )
        t_labels, _ = timed(lambda: label_store.labels_of(reg, list(labels)), args.repeat)
        reg.close()
    backend = "PostgreSQL" if args.url else "SQLite"
    n = args.devices
    if args.markdown:
        print(f"Label selection, {n:,} devices, {backend} (median of {args.repeat} runs):\n")
        print("| selector | matches | indexed query (ids) | with device records | full scan |")
        print("|---|---:|---:|---:|---:|")
        for text, k, a, r, b in rows:
            print(f"| `{text}` | {k} | {a * 1000:.1f} ms | {r * 1000:.1f} ms | {b * 1000:.1f} ms |")
        print(f"\nA rollout step with windows: labels of {n:,} targets {t_labels * 1000:.1f} ms, "
              f"their window verdicts against 3 windows {t_hold * 1000:.1f} ms.")  # fmt: skip
    else:
        for text, k, a, r, b in rows:
            print(f"{text:45s} {k:6d}  ids {a * 1000:8.1f} ms  records {r * 1000:8.1f} ms  "
                  f"scan {b * 1000:8.1f} ms")  # fmt: skip
        print(f"labels of {n} targets {t_labels * 1000:.1f} ms; windows {t_hold * 1000:.1f} ms")


if __name__ == "__main__":
    main()

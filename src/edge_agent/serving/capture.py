"""Sampled capture of inputs and outputs into a bounded on-disk ring buffer.

Off by default. ``offer`` samples on the request path and hands the record (with the request's
id) to a writer thread through a bounded queue (a full queue drops and counts; the request never
waits for the disk). ``label`` queues the class indices the application later gave as feedback
for a request id, as a line of its own (``{"kind": "label", ...}``). The writer appends JSON
lines to segment files ``seg-<n>.jsonl`` of ``max_bytes / SEGMENTS`` each and deletes the
oldest segment when the total would exceed ``max_bytes`` (the records it held are counted
``evicted``). ``export`` reads the segments back in order; ``read`` reads them from a position
(``edge_agent.sync.ops.capture_upload`` packs records for upload from it) and ``release`` deletes
the segments an acknowledged upload consumed.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import CaptureConfig
from edge_agent.errors import ContractError
from edge_agent.strict_json import loads as strict_loads

log = logging.getLogger("edge_agent.serving.capture")
SEGMENTS = 8
_SEGMENT = re.compile(r"seg-(\d+)\.jsonl")
#: Class indices kept per label line (a longer request's labels are not kept).
MAX_LABEL_ROWS = 4096


def _tensor(x: Any) -> dict[str, Any]:
    a = np.asarray(x)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}


class CaptureRing:
    """Bounded, sampled capture. Thread-safe ``offer``; one writer thread."""

    def __init__(
        self, directory: Path, config: CaptureConfig, rng: random.Random | None = None
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._rng = rng or random.Random()
        self._segment_bytes = max(config.max_bytes // SEGMENTS, 4096)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=256)
        self.captured = 0
        self.dropped = 0
        self.write_errors = 0
        self.evicted = 0
        segs = self.segments(self.dir)
        self._index = int(segs[-1].stem[4:]) + 1 if segs else 0
        self._thread = threading.Thread(target=self._loop, name="capture-writer", daemon=True)
        self._thread.start()

    @staticmethod
    def segments(directory: Path) -> list[Path]:
        """Segment files, oldest first (other files in the directory are ignored)."""
        found = []
        for p in Path(directory).glob("seg-*.jsonl"):
            m = _SEGMENT.fullmatch(p.name)
            if m is not None:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def offer(
        self,
        model: str,
        version: int,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        request_id: str | None = None,
    ) -> bool:
        """Maybe capture one request; never blocks. Returns whether it was queued."""
        if self._rng.random() >= self.config.sample_rate:
            return False
        record: dict[str, Any] = {
            "at": time.time(),
            "model": model,
            "version": version,
            "inputs": dict(inputs),
            "outputs": dict(outputs),
        }
        if request_id is not None:
            record["request_id"] = request_id
        return self._put(record)

    def label(self, model: str, request_id: str, classes: Sequence[int]) -> bool:
        """Queue the feedback labels (one class index per request row, -1: none) of a request;
        never blocks. Returns whether it was queued."""
        if not classes or len(classes) > MAX_LABEL_ROWS:
            return False
        return self._put(
            {
                "kind": "label",
                "model": model,
                "request_id": request_id,
                "labels": [int(c) for c in classes],
            }
        )

    def _put(self, record: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _loop(self) -> None:
        fh = None
        written = 0
        while True:
            rec = self._queue.get()
            if rec is None:
                break
            try:
                if rec.get("kind") != "label":
                    rec = {
                        **rec,
                        "inputs": {k: _tensor(v) for k, v in rec["inputs"].items()},
                        "outputs": {k: _tensor(v) for k, v in rec["outputs"].items()},
                    }
                line = (json.dumps(rec) + "\n").encode()
                if fh is None or written + len(line) > self._segment_bytes:
                    if fh is not None:
                        fh.close()
                    fh = (self.dir / f"seg-{self._index}.jsonl").open("ab")
                    self._index += 1
                    written = 0
                    self._enforce_budget()
                fh.write(line)
                fh.flush()
                written += len(line)
                self.captured += 1
            except (OSError, TypeError, ValueError) as exc:  # disk full must not kill the agent
                self.write_errors += 1
                log.warning("capture write failed: %s", exc)
        if fh is not None:
            fh.close()

    def _enforce_budget(self) -> None:
        segs = self.segments(self.dir)
        total = sum(p.stat().st_size for p in segs)
        while segs and total + self._segment_bytes > self.config.max_bytes and len(segs) > 1:
            oldest = segs.pop(0)
            total -= oldest.stat().st_size
            with oldest.open("rb") as fh:
                self.evicted += sum(1 for line in fh if not line.startswith(b'{"kind": "label"'))
            oldest.unlink(missing_ok=True)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @classmethod
    def export(cls, directory: Path) -> Iterator[dict[str, Any]]:
        """Every captured line, oldest first; torn last lines are skipped."""
        for _, doc in cls.read(directory, (-1, -1)):
            yield doc

    @classmethod
    def read(
        cls, directory: Path, after: tuple[int, int]
    ) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """Each line after position ``after`` (segment number, line number), oldest first,
        with its position; torn or unreadable lines are skipped."""
        for seg in cls.segments(directory):
            number = int(seg.stem[4:])
            if number < after[0]:
                continue
            try:
                fh = seg.open("rb")
            except FileNotFoundError:  # evicted while we read
                continue
            with fh:
                for i, line in enumerate(fh):
                    if (number, i) <= after:
                        continue
                    try:
                        doc = strict_loads(line, max_bytes=len(line), what="capture record")
                    except ContractError:
                        continue
                    if isinstance(doc, dict):
                        yield (number, i), doc

    @classmethod
    def release(cls, directory: Path, upto: tuple[int, int]) -> int:
        """Delete the segments before the one holding position ``upto`` (their records were
        uploaded and acknowledged); how many were deleted."""
        gone = 0
        for seg in cls.segments(directory):
            if int(seg.stem[4:]) < upto[0]:
                seg.unlink(missing_ok=True)
                gone += 1
        return gone


def label_indices(label: Any, rows: bool, classes: Sequence[str]) -> list[int] | None:
    """Feedback labels as class indices, one per request row (-1: none); None when a label
    names no class (the feedback itself refuses those)."""
    items = label if rows else [label]
    if not isinstance(items, list):
        return None
    out = []
    for item in items:
        if item is None:
            out.append(-1)
        elif type(item) is int and 0 <= item < max(len(classes), 2):
            out.append(item)
        elif isinstance(item, str) and item in classes:
            out.append(classes.index(item))
        else:
            return None
    return out

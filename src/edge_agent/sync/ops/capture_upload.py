"""Capture upload on the device: the operator's settings, packing chunks, budgets, acknowledgements.

Owns what the two signed capture commands do (``edge_agent.sync.ops.commands`` verifies them and
calls here):

- ``capture-config`` (``configure``): the operator's ``UploadSettings`` for one model, persisted
  in ``<state>/sync/capture_upload.json`` (atomically) so they survive restarts.
- ``capture-upload`` (``upload``): first the acknowledgement (``ack``, the SHA-256 of the chunk
  the server verified and stored): the chunk file is deleted, the model's read position moves
  past its records and the capture ring's segments every uploading model has consumed are
  deleted. Then the next chunk: the chunk still waiting for its acknowledgement is offered again
  (same bytes, nothing charged twice), or the records captured since the read position are
  sampled (``sample_ppm``, decided by a hash of the record's position so a retry decides the
  same), joined with the feedback labels the ring holds for their request ids, stripped of the
  dropped fields, packed (``edge_agent.common.capture_chunk``) up to ``max_bytes`` and what is
  left of the model's daily budget, kept as ``<state>/sync/capture/<model>.npz`` and offered
  through the support-bundle upload path (``UploadServer``: the server pulls it in blocks and
  checks the whole file's SHA-256; blocks served count against the device's own daily upload
  budget too).

Nothing here grows without bound: one chunk file per model (at most ``MAX_CHUNK_BYTES``), the
ring's own size cap, and the counts. What is left out is counted by reason and reported in every
answer: ``not_sampled``, ``shape_mismatch``, ``evicted`` (overwritten in the ring before it was
uploaded), ``queue_full`` (the ring's writer queue), ``budget_deferred`` (uploads refused because
today's budget is spent; the records wait in the ring).

Does not verify commands, serve blocks (``upload``) or write the ring (``serving.capture``).
Called on the command thread only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from edge_agent.common.capture_chunk import CaptureRecord, drop_fields, pack_chunk
from edge_agent.common.durable import write_atomic
from edge_agent.errors import CommandFailedError, CommandLimitError, ContractError
from edge_agent.serving.capture import CaptureRing
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.ops.upload import UploadServer
from edge_agent.trust.capture_settings import SAMPLE_SCALE, UploadSettings
from edge_agent.trust.command import CaptureUploadArgs

__all__ = ["STATE_FILE", "CaptureUploader"]

log = logging.getLogger("edge_agent.sync.ops.commands")

STATE_FILE: Final = "capture_upload.json"
#: Models with upload settings a device keeps.
MAX_MODELS: Final = 32
#: A record's share of the chunk beyond its tensors (arrays' fixed parts, the request id).
_RECORD_OVERHEAD: Final = 1100
_ZIP_OVERHEAD: Final = 4096
_Pos = tuple[int, int]


def _sampled(pos: _Pos, ppm: int) -> bool:
    digest = hashlib.blake2b(f"{pos[0]}:{pos[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) % SAMPLE_SCALE < ppm


def _tensor(doc: object) -> np.ndarray[Any, Any]:
    if not isinstance(doc, dict):
        raise ValueError("not a tensor")
    dtype = np.dtype(str(doc["dtype"]))
    if dtype.kind not in "biuf":  # what the chunk format carries
        raise ValueError(f"dtype {dtype} cannot travel")
    a = np.asarray(doc["data"], dtype=dtype)
    a = a.reshape([int(d) for d in doc["shape"]])
    return a.reshape(1) if a.ndim == 0 else a


class CaptureUploader:
    """One device's capture upload; see the module doc.

    Args:
        device_id: this device.
        ring: the capture ring (None when capture is off in the agent's config: both commands
            then fail with ``command_failed``).
        directory: the sync state directory.
        uploads: the upload server (offers, the device-wide daily upload budget).
        clock: wall-clock seconds (the budget's day).
    """

    def __init__(
        self,
        device_id: str,
        ring: CaptureRing | None,
        directory: Path,
        uploads: UploadServer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._device_id = device_id
        self._ring = ring
        self._path = directory / STATE_FILE
        self._chunks = directory / "capture"
        self._uploads = uploads
        self._clock = clock
        self._state = self._load()

    # ------------------------------------------------------------------ persistence
    def _load(self) -> dict[str, Any]:
        empty: dict[str, Any] = {
            "settings": {}, "cursor": {}, "pending": {}, "acked": {}, "day": "", "used": {},
            "counts": {},
        }  # fmt: skip
        try:
            doc = strict_loads(self._path.read_bytes(), max_bytes=1 << 20, what=STATE_FILE)
        except FileNotFoundError:
            return empty
        except (OSError, ContractError) as exc:
            log.error("%s unreadable, capture upload settings reset: %s", STATE_FILE, exc)
            return empty
        if not isinstance(doc, dict) or set(doc) != set(empty):
            return empty
        try:
            for raw in doc["settings"].values():
                UploadSettings.from_dict(raw)
        except (ContractError, AttributeError) as exc:
            log.error("%s holds bad settings, reset: %s", STATE_FILE, exc)
            return empty
        return doc

    def _save(self) -> None:
        try:
            write_atomic(self._path, json.dumps(self._state, sort_keys=True).encode())
        except OSError as exc:
            raise CommandFailedError(f"capture upload state not saved: {exc}") from exc

    def settings(self, model: str) -> UploadSettings | None:
        """The model's settings, if an operator ever sent any."""
        raw = self._state["settings"].get(model)
        return None if raw is None else UploadSettings.from_dict(raw)

    def _count(self, model: str, reason: str, n: int) -> None:
        if n:
            counts = self._state["counts"].setdefault(model, {})
            counts[reason] = counts.get(reason, 0) + n

    def counts(self, model: str) -> dict[str, int]:
        """What was uploaded and left out for ``model`` (the ring's counts are device-wide)."""
        out = dict(self._state["counts"].get(model, {}))
        if self._ring is not None:
            out["evicted"] = self._ring.evicted
            out["queue_full"] = self._ring.dropped
        return out

    # ------------------------------------------------------------------ capture-config
    def configure(self, settings: UploadSettings) -> dict[str, Any]:
        """Persist the operator's settings for one model; the answer's result.

        Raises:
            CommandFailedError: capture is off in the agent's config, or the state file
                cannot be written.
            CommandLimitError: settings for ``MAX_MODELS`` other models are already kept.
        """
        if self._ring is None:
            raise CommandFailedError("capture is off in this agent's config ([capture] enabled)")
        known = self._state["settings"]
        if settings.model not in known and len(known) >= MAX_MODELS:
            raise CommandLimitError(f"capture upload settings kept for {MAX_MODELS} models")
        known[settings.model] = settings.to_dict()
        self._state["cursor"].setdefault(settings.model, [-1, -1])
        self._save()
        return {"model": settings.model, "settings": settings.to_dict()}

    # ------------------------------------------------------------------ capture-upload
    def upload(self, args: CaptureUploadArgs) -> dict[str, Any]:
        """Acknowledge, then offer the next chunk (or the one still unacknowledged).

        Raises:
            CommandFailedError: capture is off, upload is not enabled for the model, or state
                cannot be written.
            CommandLimitError: the model's or the device's daily budget is spent.
        """
        settings = self.settings(args.model)
        if self._ring is None:
            raise CommandFailedError("capture is off in this agent's config ([capture] enabled)")
        if settings is None or not settings.enabled:
            raise CommandFailedError(f"capture upload is not enabled for {args.model!r}")
        model = args.model
        acked = self._acknowledge(model, args.ack)
        pending = self._state["pending"].get(model)
        if pending is not None:
            data = (self._chunks / f"{model}.npz").read_bytes() if self._has_chunk(model) else b""
            if hashlib.sha256(data).hexdigest() == pending["sha256"]:
                offer = self._uploads.offer(data)
                return self._result(model, offer.to_dict(), pending, acked, resent=True)
            del self._state["pending"][model]  # the file is gone: pack again from the cursor
        left = self._left_today(model, settings)
        if left < _ZIP_OVERHEAD + _RECORD_OVERHEAD:
            self._count(model, "budget_deferred", 1)
            self._save()
            raise CommandLimitError(f"capture budget of {model!r} is spent for today")
        data, entry = self._pack(model, settings, min(args.max_bytes, left))
        if not data:
            self._save()
            return self._result(model, None, None, acked, resent=False)
        offer = self._uploads.offer(data)  # CommandLimitError: the device budget; nothing kept
        self._chunks.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(self._chunks / f"{model}.npz", data)
        except OSError as exc:
            raise CommandFailedError(f"capture chunk not kept: {exc}") from exc
        self._state["pending"][model] = entry
        self._state["used"][model] = self._state["used"].get(model, 0) + len(data)
        self._count(model, "records_offered", entry["records"])
        self._save()
        return self._result(model, offer.to_dict(), entry, acked, resent=False)

    def _has_chunk(self, model: str) -> bool:
        return (self._chunks / f"{model}.npz").is_file()

    def _acknowledge(self, model: str, ack: str) -> int:
        pending = self._state["pending"].get(model)
        if not ack or self._state["acked"].get(model) == ack:  # none, or already done
            return 0
        if pending is None or pending["sha256"] != ack:
            self._count(model, "ack_unknown", 1)
            return 0
        (self._chunks / f"{model}.npz").unlink(missing_ok=True)
        del self._state["pending"][model]
        self._state["acked"][model] = ack
        self._state["cursor"][model] = pending["upto"]
        self._count(model, "records_acknowledged", pending["records"])
        self._save()
        self._release()
        return int(pending["records"])

    def _release(self) -> None:
        """Delete the ring segments every model with upload on has read past."""
        if self._ring is None:
            return
        enabled = [m for m, s in self._state["settings"].items() if s["enabled"]]
        if not enabled:
            return
        upto = min(tuple(self._state["cursor"].get(m, [-1, -1])) for m in enabled)
        self._ring.release(self._ring.dir, (int(upto[0]), int(upto[1])))

    def _left_today(self, model: str, settings: UploadSettings) -> int:
        today = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")
        if self._state["day"] != today:
            self._state["day"], self._state["used"] = today, {}
        return max(0, settings.bytes_per_day - int(self._state["used"].get(model, 0)))

    def _pack(self, model: str, settings: UploadSettings, cap: int) -> tuple[bytes, dict[str, Any]]:
        assert self._ring is not None
        cursor = tuple(self._state["cursor"].get(model, [-1, -1]))
        after: _Pos = (int(cursor[0]), int(cursor[1]))
        labels: dict[str, list[int]] = {}
        taken: list[tuple[_Pos, CaptureRecord]] = []
        last: _Pos = after
        size = _ZIP_OVERHEAD
        not_sampled = 0
        for pos, doc in self._ring.read(self._ring.dir, (-1, -1)):
            if doc.get("kind") == "label":
                given = doc.get("labels")
                if (
                    doc.get("model") == model
                    and isinstance(doc.get("request_id"), str)
                    and isinstance(given, list)
                    and all(type(c) is int and -1 <= c <= 65535 for c in given)
                ):
                    labels[doc["request_id"]] = given
                continue
            if pos <= after or doc.get("model") != model or size >= cap:
                continue
            if not _sampled(pos, settings.sample_ppm):
                not_sampled += 1
                last = pos
                continue
            try:
                record = self._record(model, doc)
            except (KeyError, TypeError, ValueError):
                self._count(model, "unreadable", 1)
                last = pos
                continue
            shipped = drop_fields(record, settings.drop)
            cost = _RECORD_OVERHEAD + sum(
                a.nbytes for a in (*shipped.inputs.values(), *shipped.outputs.values())
            ) + 4 * record.rows  # fmt: skip
            if size + cost > cap and not taken:
                self._count(model, "oversized", 1)  # larger than any chunk may be
                last = pos
                continue
            if size + cost > cap:
                size = cap  # full: later records wait for the next chunk
                continue
            size += cost
            taken.append((pos, record))
            last = pos
        self._count(model, "not_sampled", not_sampled)
        if not taken:
            self._state["cursor"][model] = list(last)
            return b"", {}
        with_labels = []
        for pos, r in taken:  # labels join on the request id, then the fields are dropped
            given = labels.get(r.request_id) if r.request_id else None
            if given is not None and len(given) == r.rows:
                r = replace(r, labels=np.asarray(given, dtype=np.int32))  # noqa: PLW2901
            with_labels.append((pos, drop_fields(r, settings.drop)))
        while True:
            records = [r for _, r in with_labels]
            data, kept = pack_chunk(
                self._device_id,
                model,
                records,
                dropped=settings.drop,
                counts={"not_sampled": not_sampled} if not_sampled else {},
            )
            if len(data) <= cap or len(with_labels) == 1:
                break
            with_labels = with_labels[: len(with_labels) // 2]
            last = with_labels[-1][0]
        self._count(model, "shape_mismatch", len(records) - kept)
        labelled = sum(int(np.any(r.labels >= 0)) for r in records)
        entry = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "length": len(data),
            "upto": list(last),
            "records": kept,
            "labelled": labelled,
        }
        return data, entry

    @staticmethod
    def _record(model: str, doc: dict[str, Any]) -> CaptureRecord:
        inputs = {str(k): _tensor(v) for k, v in doc["inputs"].items()}
        outputs = {str(k): _tensor(v) for k, v in doc["outputs"].items()}
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None else 1
        rid = doc.get("request_id")
        return CaptureRecord(
            model,
            int(doc["version"]),
            float(doc["at"]),
            rid if isinstance(rid, str) else "",
            inputs,
            outputs,
            np.full(rows, -1, dtype=np.int32),
        )

    def _result(
        self,
        model: str,
        offer: dict[str, Any] | None,
        entry: dict[str, Any] | None,
        acked: int,
        *,
        resent: bool,
    ) -> dict[str, Any]:
        return {
            "model": model,
            "offer": offer,
            "chunk": None
            if entry is None
            else {k: entry[k] for k in ("sha256", "length", "records", "labelled")},
            "acknowledged": acked,
            "resent": resent,
            "counts": self.counts(model),
        }

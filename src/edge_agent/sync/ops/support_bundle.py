"""The support bundle: a bounded tar.gz of what a fleet operator needs to look at one device.

Owns what goes into the archive and the size bound. Members (all JSON, UTF-8)::

    manifest.json   device id, creation time, agent version, member list
    status.json     the agent's and the sync loop's status (``edge-agent status``)
    reported.json   the reported state the device last built
    store.json      every installed model's store state (versions, probation, down marks)
    config.json     the agent configuration, secrets redacted (``redact``)
    events.jsonl    recent agent events (installs, rollbacks, drift alerts, ...)
    logs.jsonl      recent log records (``edge_agent.common.logring``)

The archive is built in memory (never larger than its cap, at most
``edge_agent.trust.command.MAX_SUPPORT_BUNDLE_BYTES``); when it comes out larger than the
command's ``max_bytes`` it is rebuilt with the older half of the log records dropped, then
refused (``CommandFailedError``). Does not upload (``edge_agent.sync.ops.upload``) or decide who
may ask (``edge_agent.sync.ops.commands``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from edge_agent import __version__
from edge_agent.common.logring import LogRecordView, LogRing
from edge_agent.errors import CommandFailedError

__all__ = ["REDACTED", "BundleSources", "build_support_bundle", "redact"]

REDACTED: Final = "<redacted>"
#: Config keys whose values never leave the device (matched anywhere in the key, any case).
_SECRET_KEY = re.compile(r"token|secret|password|passphrase|private|credential", re.IGNORECASE)
_MAX_LOG_LINES: Final = 5000
_SHRINK_ROUNDS: Final = 4


def redact(value: Any) -> Any:
    """``value`` (config as dicts/lists/scalars) with every secret-named key's value replaced."""
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


@dataclass(frozen=True)
class BundleSources:
    """Where each member comes from (callables: read at build time, on the caller's thread)."""

    device_id: str
    status: Callable[[], dict[str, Any]]
    reported: Callable[[], dict[str, Any]]
    store: Callable[[], dict[str, Any]]
    config: Any  # a dataclass (``AgentConfig``) or a mapping
    events: Callable[[], Sequence[dict[str, Any]]]
    logs: LogRing | None


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8")


def _config_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return redact(dataclasses.asdict(config))
    return redact(config)


def _archive(members: dict[str, bytes], now: float) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_support_bundle(
    sources: BundleSources, max_bytes: int, *, clock: Callable[[], float] = time.time
) -> bytes:
    """The tar.gz bytes, at most ``max_bytes``.

    Raises:
        CommandFailedError: even with the log records cut to a sixteenth the archive is larger
            than ``max_bytes``.
    """
    now = clock()
    fixed: dict[str, bytes] = {
        "status.json": _json(sources.status()),
        "reported.json": _json(sources.reported()),
        "store.json": _json(sources.store()),
        "config.json": _json(_config_dict(sources.config)),
        "events.jsonl": b"".join(_json(e).replace(b"\n", b"") + b"\n" for e in sources.events()),
    }
    records: list[LogRecordView] = []
    if sources.logs is not None:
        records, _ = sources.logs.query(max_lines=_MAX_LOG_LINES, max_bytes=max_bytes)
    for _round in range(_SHRINK_ROUNDS + 1):
        logs = b"".join(
            json.dumps(r.to_dict(), separators=(",", ":")).encode() + b"\n" for r in records
        )
        members = {
            "manifest.json": _json(
                {
                    "device_id": sources.device_id,
                    "created": round(now, 3),
                    "agent_version": __version__,
                    "members": ["manifest.json", *fixed, "logs.jsonl"],
                    "log_records": len(records),
                }
            ),
            **fixed,
            "logs.jsonl": logs,
        }
        data = _archive(members, now)
        if len(data) <= max_bytes:
            return data
        records = records[len(records) // 2 :]  # keep the newest half
    raise CommandFailedError(
        f"the support bundle is larger than {max_bytes} bytes even with few log records"
    )

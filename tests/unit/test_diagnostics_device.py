"""The device half of remote diagnostics without a broker: the command runner's limits, its
anti-replay persistence, the upload budget, the log ring's bounds and the bundle's redaction."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge_agent.common.logring import LogRing
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.sync.ops.commands import CommandRunner
from edge_agent.sync.ops.support_bundle import REDACTED, BundleSources, build_support_bundle
from edge_agent.wire.ops.diagnostics import MAX_ANSWER_BYTES, CommandAnswer, UploadOffer
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockRequest
from fleet_server.diagnostics.commands import make_command, sign_command
from model_builder.keystore import KeyStore
from support import NOW

DEVICE = "cam-7"
T = Topics()


@dataclass
class Handle:
    mid: int = 1

    def is_published(self) -> bool:
        return True


@dataclass
class Recorder:
    sent: list[tuple[str, bytes, MessageProperties | None]] = field(default_factory=list)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> Handle:
        self.sent.append((topic, payload, properties))
        return Handle()

    def wait_published(self, handle: Handle, timeout: float) -> None:
        return None

    def answers(self) -> list[CommandAnswer]:
        return [
            CommandAnswer.from_bytes(p) for t, p, _ in self.sent if t.endswith("/commands/resp")
        ]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore.init(tmp_path_factory.mktemp("devkeys") / "k", now=NOW)


class Env:
    def __init__(self, keys: KeyStore, directory: Path, **kw: Any) -> None:
        self.keys = keys
        self.dir = directory
        self.sent = Recorder()
        self.now = NOW.timestamp()
        self.restarts = 0
        self.ring = LogRing(max_records=100)
        options: dict[str, Any] = {"commands_per_minute": 10, "upload_bytes_per_day": 1 << 24}
        options.update(kw)
        self.runner = CommandRunner(
            DEVICE,
            SimpleNamespace(root=keys.trusted_root()),  # type: ignore[arg-type]  # .root only
            directory,
            self.sent,  # type: ignore[arg-type]  # the publish half of Transport
            T,
            sources=BundleSources(
                device_id=DEVICE,
                status=lambda: {"ok": True},
                reported=dict,
                store=dict,
                config={"device_id": DEVICE, "sync": {"token": "s3cret", "host": "broker"}},
                events=lambda: [{"event": "installed"}],
                logs=self.ring,
            ),
            health_check=lambda model: {"model": model},
            restart=self._restart,
            clock=lambda: self.now,
            **options,
        )

    def _restart(self) -> None:
        self.restarts += 1

    def command(
        self, sequence: int, name: str = "ping", args: dict[str, Any] | None = None
    ) -> bytes:
        issued = datetime.fromtimestamp(self.now, UTC)
        c = make_command(DEVICE, sequence, name, args or {}, issued, timedelta(hours=1))
        return sign_command(c, [self.keys.signer("online-1")])

    def send(self, data: bytes, correlation: bytes | None = b"c" * 32) -> CommandAnswer | None:
        before = len(self.sent.answers())
        self.runner.handle(
            Message(
                T.device("commands", DEVICE),
                data,
                1,
                False,
                MessageProperties(correlation_data=correlation),
            )
        )
        answers = self.sent.answers()
        return answers[-1] if len(answers) > before else None


def test_the_command_rate_is_bounded_and_refusals_are_counted(
    keys: KeyStore, tmp_path: Path
) -> None:
    env = Env(keys, tmp_path, commands_per_minute=2)
    assert env.send(env.command(1)).ok  # type: ignore[union-attr]
    assert env.send(env.command(2)).ok  # type: ignore[union-attr]
    refused = env.send(env.command(3))
    assert refused is not None
    assert refused.error_code == "command_limited"
    assert env.runner.last_sequence == 2  # a refused-by-rate command consumed nothing
    env.now += 30  # one token back
    assert env.send(env.command(3)).ok  # type: ignore[union-attr]
    stats = env.runner.stats()
    assert stats["commands_refused_command_limited"] == 1
    assert stats["commands_ran_ping"] == 3


def test_the_sequence_is_persisted_before_a_restart_runs(keys: KeyStore, tmp_path: Path) -> None:
    env = Env(keys, tmp_path)
    restart = env.command(1, "restart")
    answer = env.send(restart)
    assert answer is not None
    assert answer.result == {"restarting": True, "exit_code": 75}
    assert env.restarts == 1
    again = Env(keys, tmp_path)  # the agent after its restart, same state directory
    assert again.runner.last_sequence == 1
    refused = again.send(restart)  # the broker redelivers the same message
    assert refused is not None
    assert refused.error_code == "rollback"
    assert again.restarts == 0


def test_a_command_without_correlation_data_runs_but_cannot_be_answered(
    keys: KeyStore, tmp_path: Path
) -> None:
    env = Env(keys, tmp_path)
    assert env.send(env.command(1), correlation=None) is None
    assert env.send(b"garbage", correlation=b"x" * 65) is None
    assert env.runner.stats()["commands_unanswerable"] == 2
    assert env.runner.stats()["commands_ran_ping"] == 1


def test_support_bundles_are_redacted_and_count_against_the_daily_budget(
    keys: KeyStore, tmp_path: Path
) -> None:
    env = Env(keys, tmp_path, upload_bytes_per_day=200_000)
    logging.getLogger("t").addHandler(env.ring)
    logging.getLogger("t").warning("hello")
    answer = env.send(env.command(1, "support-bundle", {"max_bytes": 1 << 20}))
    assert answer is not None
    assert answer.ok, answer.error
    offer = UploadOffer.from_dict(answer.result)
    env.runner.uploads.on_request(BlockRequest(offer.plan.transfer_id, ((0, 1),)).to_bytes())
    ((_, payload, _),) = [s for s in env.sent.sent if s[0].endswith("/upload/data")]
    block = BlockData.from_bytes(payload, offer.plan)
    assert len(block.payload) == offer.length  # one block
    with tarfile.open(fileobj=io.BytesIO(block.payload), mode="r:gz") as tar:
        config = json.loads(tar.extractfile("config.json").read())  # type: ignore[union-attr]
        logs = tar.extractfile("logs.jsonl").read()  # type: ignore[union-attr]
    assert config["sync"]["token"] == REDACTED
    assert config["sync"]["host"] == "broker"
    assert b"hello" in logs
    used = offer.length
    assert env.runner.uploads.remaining() == 200_000 - used
    # The budget survives a restart, and a new day resets it.
    again = Env(keys, tmp_path, upload_bytes_per_day=used + 10)
    refused = again.send(again.command(2, "support-bundle", {"max_bytes": 1 << 20}))
    assert refused is not None
    assert refused.error_code == "command_limited"
    again.now += 86400
    assert again.send(again.command(3, "support-bundle", {"max_bytes": 1 << 20})).ok  # type: ignore[union-attr]


def test_a_bundle_larger_than_its_cap_drops_old_logs_then_fails() -> None:
    ring = LogRing(max_records=10_000, max_bytes=32 << 20)
    logger = logging.getLogger("t.big")
    logger.addHandler(ring)
    logger.propagate = False
    import random

    rnd = random.Random(1)
    for _ in range(3000):  # incompressible messages
        logger.warning("%s", "".join(rnd.choice("abcdefghijklmnop0123456789") for _ in range(400)))
    sources = BundleSources(DEVICE, dict, dict, dict, {}, list, ring)
    data = build_support_bundle(sources, 256 * 1024)
    assert len(data) <= 256 * 1024
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert 0 < manifest["log_records"] < 3000
    from edge_agent.errors import CommandFailedError

    noise = "".join(rnd.choice("abcdefghijklmnop0123456789") for _ in range(200_000))
    too_big = BundleSources(DEVICE, lambda: {"noise": noise}, dict, dict, {}, list, ring)
    with pytest.raises(CommandFailedError):  # the status alone is over the cap
        build_support_bundle(too_big, 64 * 1024)


def test_the_log_ring_is_bounded_and_filters() -> None:
    ring = LogRing(max_records=50, max_bytes=4096)
    logger = logging.getLogger("t.ring")
    logger.addHandler(ring)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    for i in range(200):
        logger.log(logging.WARNING if i % 2 else logging.DEBUG, "m%d %s", i, "x" * 10)
    logger.error("z" * 10_000)  # cut to 2,048 characters
    records, truncated = ring.query(max_lines=1000, max_bytes=1 << 20)
    assert len(records) <= 50
    assert sum(r.size for r in records) <= 4096
    assert records[-1].msg == "z" * 2048
    warnings, _ = ring.query(level="warning", max_lines=1000, max_bytes=1 << 20)
    assert all(r.level in ("warning", "error") for r in warnings)
    few, truncated = ring.query(max_lines=2, max_bytes=1 << 20)
    assert len(few) == 2
    assert truncated
    assert few[-1] == records[-1]  # the newest are kept
    assert ring.dropped > 0


def test_a_logs_answer_with_escape_heavy_text_still_fits_one_message(
    keys: KeyStore, tmp_path: Path
) -> None:
    env = Env(keys, tmp_path)
    env.ring = LogRing(max_records=5000, max_bytes=8 << 20)
    env.runner._sources = BundleSources(DEVICE, dict, dict, dict, {}, list, env.ring)
    logger = logging.getLogger("t.esc")
    logger.addHandler(env.ring)
    logger.propagate = False
    for _ in range(500):
        logger.warning("\x00\x01\x02" * 600)  # 6x longer once JSON-escaped
    args = {"level": "info", "since": 0, "max_lines": 5000, "max_bytes": 192 * 1024}
    answer = env.send(env.command(1, "logs", args))
    assert answer is not None
    assert answer.ok
    assert answer.result["truncated"] is True
    assert len(answer.to_bytes()) <= MAX_ANSWER_BYTES
    assert answer.result["records"]

"""``fleet-server telemetry tail``: the newest entries by default, ``--follow`` from the end."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pytest
from click.testing import CliRunner

import fleet_server.cli.admin as cli_admin
from fleet_server.cli.main import cli

ROWS = [
    {"id": i, "received_at": "t", "device_id": "d", "seq": i, "kind": "report", "payload": {}}
    for i in range(1, 501)
]


class FakeClient:
    """The admin client's ``telemetry`` over 500 stored rows; stops after a follow poll."""

    calls: list[int | None] = []

    def __init__(self, url: str, token: str) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def telemetry(
        self, *, after_id: int | None = None, device_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        FakeClient.calls.append(after_id)
        if len(FakeClient.calls) > 2:
            raise KeyboardInterrupt
        if after_id is None:
            return ROWS[-limit:]
        return [r for r in ROWS if r["id"] > after_id][:limit]


@pytest.fixture(autouse=True)
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.calls = []
    monkeypatch.setattr(cli_admin, "AdminClient", FakeClient)
    monkeypatch.setattr(cli_admin.time, "sleep", lambda _s: None)


def test_tail_shows_the_newest_entries() -> None:
    out = CliRunner().invoke(cli, ["telemetry", "tail", "--token", "t", "--limit", "3"])
    assert out.exit_code == 0, out.output
    assert [line.split()[0] for line in out.output.splitlines()] == ["498", "499", "500"]
    assert FakeClient.calls == [None]


def test_follow_starts_at_the_current_end() -> None:
    args = ["telemetry", "tail", "--token", "t", "--limit", "2", "--follow", "--json"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert FakeClient.calls[:2] == [None, 500]


def test_after_id_still_reads_from_there() -> None:
    args = ["telemetry", "tail", "--token", "t", "--limit", "2", "--after-id", "0"]
    out = CliRunner().invoke(cli, args)
    assert [line.split()[0] for line in out.output.splitlines()] == ["1", "2"]

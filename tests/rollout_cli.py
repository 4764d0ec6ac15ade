"""``fleet-server rollouts create`` in process, against a fake admin client.

The fake parses the policy it is sent the way the admin API does (``RolloutPolicy.from_dict``),
so a test of a ``rollouts create`` option checks both what the CLI sends and that the server
would accept it. ``RolloutCli.sent`` holds every body sent.
"""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from fleet_server.cli import rollouts as cli_rollouts
from fleet_server.rollouts.policy import RolloutPolicy

CREATE = ("rollouts", "create", "digits", "2", "--group", "g", "--url", "http://x", "--token", "t")


class RolloutCli:
    """The ``rollouts`` commands on a click group, with ``AdminClient`` replaced by a fake."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[dict[str, Any]] = []
        sent = self.sent

        class Client:
            def __init__(self, url: str, token: str) -> None:
                pass

            def __enter__(self) -> Client:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
                sent.append(body)
                policy = RolloutPolicy.from_dict(body["policy"])  # what the admin API does
                return {"id": "ro-1", "model": "digits", "from_version": 1, "to_version": 2,
                        "selector": {"group": "g"}, "policy": policy.to_dict()}  # fmt: skip

        monkeypatch.setattr(cli_rollouts, "AdminClient", Client)

        @click.group()
        def main() -> None:
            pass

        cli_rollouts.register_rollout_commands(main)
        self.main = main

    def create(self, *options: str) -> Result:
        """``rollouts create digits 2 --group g ... <options>``."""
        return CliRunner().invoke(self.main, [*CREATE, *options])

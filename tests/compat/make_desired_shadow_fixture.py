"""Add a desired-state compatibility fixture: a signed document carrying a shadow assignment.

Run once per released form of the document (``python tests/compat/make_desired_shadow_fixture.py
<dir-name>``); commit the new directory and never regenerate an existing one:
``test_compat_desired_shadow.py`` verifies every fixture with today's code, so a change that
stops a device from reading a shadow assignment the server signed before fails.

The directory holds ``root.json`` (v1, as provisioned), ``message.json`` (the signed envelope the
server publishes on ``.../desired``: ``digits`` v3 serving with v4 as its shadow at 250,000 ppm)
and ``expect.json`` (what a device must read from it).
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_agent.trust.assignment import ModelAssignment, ShadowAssignment
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore


def main(name: str) -> None:
    dest = Path(__file__).parent / name
    if dest.exists():
        raise SystemExit(f"{dest} exists; compatibility fixtures are never regenerated")
    now = datetime.now(UTC).replace(microsecond=0)
    shadow = ShadowAssignment(4, "stable", "c" * 64, 2000, "d" * 64, 250_000)
    models = {"digits": ModelAssignment(3, "stable", "a" * 64, 1000, "b" * 64, shadow=shadow)}
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyStore.init(Path(tmp) / "keys", now=now, expires_days=3650)
        state = make_desired_state("compat-1", 9, models, now, timedelta(days=3650))
        message = sign_desired_state(state, [keys.signer("online-1")])
        dest.mkdir(parents=True)
        (dest / "root.json").write_bytes(keys.root_chain()[0])
        (dest / "message.json").write_bytes(message)
    expect = {
        "device_id": "compat-1",
        "desired_version": 9,
        "verify_at": (now + timedelta(days=1)).isoformat(),
        "models": {n: a.to_dict() for n, a in models.items()},
    }
    (dest / "expect.json").write_text(json.dumps(expect, indent=1, sort_keys=True) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main(sys.argv[1])

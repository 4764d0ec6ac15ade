"""Add a root-rotation compatibility fixture: a desired-state message with its root chain.

Run once per released format of that message (``python tests/compat/make_rotation_fixture.py
<dir-name>``); commit the new directory and never regenerate an existing one:
``test_compat_rotation.py`` walks every fixture with today's code, so a change that stops a
device from reading a chain the server shipped before fails.

The directory holds ``root.json`` (v1, as provisioned), ``message.json`` (what the server
publishes on ``.../desired``: the signed envelope with ``"roots"`` v2..v3 beside it: v2 swaps a
builder key, v3 adds a root key and raises the root threshold to 2) and ``rotation.json``
(what a device must get from it).
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore


def main(name: str) -> None:
    dest = Path(__file__).parent / name
    if dest.exists():
        raise SystemExit(f"{dest} exists; compatibility fixtures are never regenerated")
    now = datetime.now(UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyStore.init(Path(tmp) / "keys", now=now, expires_days=3650)
        keys.rotate("targets", now=now, add=1, remove=["targets-1"], expires_days=3650)
        keys.rotate("root", now=now, add=1, threshold=2, expires_days=3650)
        chain = keys.root_chain()
        state = make_desired_state("compat-1", 7, {}, now, timedelta(days=3650))
        message = sign_desired_state(state, [keys.signer("online-1")], chain[1:])
        dest.mkdir(parents=True)
        (dest / "root.json").write_bytes(chain[0])
        (dest / "message.json").write_bytes(message)
    info = {
        "device_id": "compat-1",
        "desired_version": 7,
        "root_version": 3,
        "verify_at": (now + timedelta(days=1)).isoformat(),
    }
    (dest / "rotation.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main(sys.argv[1])

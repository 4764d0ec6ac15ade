"""``kill -9`` of the real installer at random moments never leaves a broken active model.

Each round copies a state directory with v1 installed, starts ``edge-agent install`` of a
16 MB v2 as a subprocess, kills it with SIGKILL after a random delay drawn across the whole
install (startup, verification, bundle write, state commit), then "reboots": opens the store
again and requires that the active version is v1 or v2 and that it loads and verifies.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.common import durable
from edge_agent.store import ModelStore
from model_builder.keystore import KeyStore
from support import DEVICE, make_bundle, write

ROUNDS = 24
AGENT = str(Path(sys.executable).parent / "edge-agent")


def test_kill_9_at_random_points_of_an_install(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    keys = KeyStore.init(tmp_path / "keys", now=now)
    root_file = tmp_path / "root.json"
    root_file.write_bytes(keys.root_bytes())
    v1 = write(tmp_path, make_bundle(keys, b"v1" * 1000, version=1, now=now), "v1.efb")
    v2 = write(
        tmp_path, make_bundle(keys, os.urandom(16 * 1024 * 1024), version=2, now=now), "v2.efb"
    )
    template = tmp_path / "template"
    config = tmp_path / "agent.toml"

    def configure(state_dir: Path) -> None:
        config.write_text(f'[store]\nstate_dir = "{state_dir}"\nroot_path = "{root_file}"\n')

    configure(template)
    subprocess.run(
        [AGENT, "install", str(v1), "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # Time one uninterrupted install of v2 to spread the kill points over its whole life.
    timing = tmp_path / "timing"
    shutil.copytree(template, timing)
    configure(timing)
    start = time.monotonic()
    subprocess.run(
        [AGENT, "install", str(v2), "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    duration = time.monotonic() - start

    rng = random.Random(1234)
    outcomes: dict[int, int] = {}
    for i in range(ROUNDS):
        state_dir = tmp_path / f"round{i}"
        shutil.copytree(template, state_dir)
        configure(state_dir)
        proc = subprocess.Popen(
            [AGENT, "install", str(v2), "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Not a wait for something: the kill lands at a random point of the install (the test).
        time.sleep(rng.uniform(0.0, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        store = ModelStore(state_dir, keys.trusted_root(), DEVICE)  # the reboot
        active = store.state("digits").active
        assert active in (1, 2), f"round {i}: active {active}"
        assert store.load("digits").manifest.version == active
        assert not list(state_dir.rglob(f"{durable.TMP_PREFIX}*"))
        outcomes[active] = outcomes.get(active, 0) + 1
    # Report where the kills landed; the invariant above is what must hold every time.
    print(f"install took {duration:.2f}s; active after kill: {outcomes}")

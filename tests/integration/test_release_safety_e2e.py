"""Release safety end to end (issue 12): real processes, the default policy, every layer.

Mosquitto (TLS, ACLs), ``fleet-server serve`` (registry, gateway, rollout engine, admin API) and
six ``edge-agent run`` daemons, each answering a steady stream of 8-row requests on its local v2
API from the moment v1 is live. Rollouts are created with ``fleet-server rollouts create`` and
read with ``rollouts watch`` (one frame) as an operator would; their policy is the default one
(gates, thresholds, waves, minimum evidence, ``on_breach=pause``, shadow phase), only with its
dwell times cut from minutes to seconds (``--dwell``, ``--shadow-dwell``) so a test can wait.
With six devices that is one canary, then waves of 2, 3 and 6.

- Two confidently wrong candidates of different kinds (``digits_mislabelled_mlp``: 3s trained
  as 8s; ``digits_nines_as_fours_mlp``: 9s trained as 4s; 88% vs 97% accurate, confidence no
  lower, same inputs), with no evaluation set and no labels flowing, are halted by the field
  layers (the shadow phase, or the canary's output distribution) and the halting gate is what
  ``rollouts watch`` shows; no device but the canary ever served or held them.
- With an evaluation set registered, the same two kinds of candidate (as new versions) are
  refused at ``rollouts create`` by the offline comparison (exit 5, ``offline_regression``).
- A good candidate (the live model rebuilt as a new version) completes every wave, no halt.
- A slower candidate (``digits_slow_mlp``: the live model's answers through far more compute)
  trips the ``p99_latency`` gate on the canary.
- A candidate whose golden samples fail on the device is halted by a safety gate (the canary
  rolls it back: ``device_rollbacks``; or ``install_failures``); after the operator's abort
  ``rollouts create`` refuses it without ``--override-aborted``; with it, the canary answers from
  memory (failed here before: the bundle is downloaded once in all), the rollout halts again,
  and the second abort quarantines the version: ``rollouts create`` refuses it from then on.

Which field gate stops a wrong candidate depends on what the running server has: with the
shadow phase the canary never serves it (``shadow_disagreement`` names the flips); without it
the one canary serves it until ``output_distribution`` trips against the control group.

The scenarios share one fleet (module-scoped fixture) and run in the order written: each starts
from every device serving the live version and leaves the fleet that way.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles, mislabelled_bundle
from edge_agent.bundle import read_bundle
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from evalset_support import digits_eval_set
from fleet import daemon_config, start_daemon, stop_process, wait_until
from fleet_server.admin.client import AdminClient
from model_builder import examples
from model_builder.build import build_bundle
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.package import package_bundle
from mosquitto import MOSQUITTO, distinct_ports, fleet_broker
from served import TOKEN, server_config

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = tuple(f"line-{i}" for i in range(6))
FLEET = str(Path(sys.executable).parent / "fleet-server")
PERIOD = 0.05  # seconds between two requests to one device: 20 requests/s, 160 rows/s each
# The default policy, with dwell times that fit a test (300 s per wave and 120 s of shadow).
DWELL = ("--dwell", "3", "--shadow-dwell", "3")
FIELD_GATES = {"shadow_disagreement", "output_distribution"}
# A bundle whose golden samples fail on the device: rolled back after install, or refused.
SAFETY_GATES = {"install_failures", "device_rollbacks"}
# A candidate that cannot even load: caught by the safety gates once a canary serves it, or,
# when the shadow phase runs, by the shadow gate as a shadow that failed to install (before any
# canary serves it).
LOAD_FAILURE_GATES = SAFETY_GATES | {"shadow_disagreement"}


def _load_failure(r: dict[str, Any]) -> set[str]:
    """The gates that stopped a candidate that fails to load; a shadow breach must say so."""
    breached = _breached(r)
    assert breached, r["gates"]
    assert breached <= LOAD_FAILURE_GATES, r["gates"]
    for g in r["gates"]:
        if g["name"] == "shadow_disagreement" and g["status"] == "breach":
            assert "failed on" in g["detail"], g
    return breached


def _why_not(device: str, proc: subprocess.Popen[bytes], tmp: Path) -> str:
    """What a timeout says about a device that did not reach v1: its process and log tail."""
    state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
    log = tmp / f"{device}.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    server = tmp / "server.log"
    stail = server.read_text(errors="replace")[-1500:] if server.exists() else "(no log)"
    return f"{device} on v1 (daemon {state})\n--- {device}.log\n{tail}\n--- server.log\n{stail}"


@dataclass
class Fleet:
    """The running fleet, what every device answered, and the operator's CLI."""

    admin: AdminClient
    env: dict[str, str]
    bundles: dict[str, Path]
    eval_set: Path
    logs: Path  # <logs>/<device>.log: each daemon's output
    answered: dict[str, set[int]] = field(default_factory=lambda: {d: set() for d in DEVICES})
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: int = 1

    def cli(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [FLEET, *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        assert res.returncode == code, (args, res.stdout + res.stderr)
        return res

    def create(self, version: int, *extra: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "rollouts", "create", "digits", str(version), "--group", "line", *DWELL, *extra,
            code=code,
        )  # fmt: skip

    def ensure_eval_set(self) -> None:
        """Register the held-out split as the digits evaluation set, once."""
        if not self.admin.evalsets("digits"):
            self.cli(
                "evalsets", "add", "--model", "digits", str(self.eval_set),
                "--source", "sklearn digits held-out split",
            )  # fmt: skip

    def served(self, version: int) -> set[str]:
        with self.lock:
            return {d for d, vs in self.answered.items() if version in vs}


def _active(admin: AdminClient, device: str) -> int | None:
    model = ((admin.device(device).get("reported") or {}).get("models") or {}).get("digits") or {}
    return model.get("active") if isinstance(model.get("active"), int) else None


def _kept(admin: AdminClient, device: str) -> list[int]:
    model = ((admin.device(device).get("reported") or {}).get("models") or {}).get("digits") or {}
    return list(model.get("kept") or [])


def _build(example: examples.ExampleModel, keys: Any, version: int, out: Path) -> Path:
    """``example`` built and signed as digits ``version`` with the fleet's key store."""
    result = build_bundle(
        example.model_bytes,
        "onnx",
        Dataset({example.input_name: example.x_calib}, None),
        Dataset({example.input_name: example.x_eval}, example.y_eval),
        (example.input_contract(max_batch=64), example.output_contract()),
        BuildConfig(name="digits", version=version, measure_latency=False, arch=("any",)),
        keys,
        now=datetime.now(UTC),
    )
    path = out / f"digits-{version}-{example.name}.efb"
    path.write_bytes(result.bundle)
    return path


def _resigned(bundles: DigitsBundles, path: Path, version: int, out: Path) -> Path:
    """The bundle at ``path`` (golden samples and all) signed again as ``version``."""
    now = datetime.now(UTC)
    b = read_bundle(path, bundles.keys.trusted_root(), now=now, installed_version=None, device=None)
    manifest = dataclasses.replace(b.manifest, version=version)
    target = out / f"digits-{version}-{path.stem}.efb"
    target.write_bytes(package_bundle(manifest, b.artifact, bundles.keys, now=now))
    return target


def _ok(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception:
        return None


@pytest.fixture(scope="module")
def fleet(
    digits_bundles: DigitsBundles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("release-safety")
    keys = digits_bundles.keys
    nines = examples.digits_nines_as_fours_mlp()
    # Versions grow in the order the scenarios send them: a device refuses a version older
    # than the newest it ran (rollback protection), and the canary is the same device each time.
    bundles = {
        "3as8": mislabelled_bundle(digits_bundles, 6, tmp),
        "9as4": _build(nines, keys, 7, tmp),
        "3as8-again": mislabelled_bundle(digits_bundles, 16, tmp),
        "9as4-again": _build(nines, keys, 17, tmp),
        "good": _build(examples.digits_mlp(), keys, 20, tmp),
        # About 20 ms per 8-row request where the live model takes well under 1 ms.
        "slow": _build(examples.digits_slow_mlp(depth=32), keys, 21, tmp),
        "badgolden": _resigned(digits_bundles, digits_bundles.path(4, "badgolden"), 22, tmp),
    }
    with fleet_broker(tmp / "mqtt", DEVICES) as broker:
        config, port = server_config(tmp, broker, keys.path)
        log = (tmp / "server.log").open("ab")
        server = subprocess.Popen(
            [FLEET, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        daemons: list[subprocess.Popen[bytes]] = []
        stop = threading.Event()
        threads: list[threading.Thread] = []
        admin = AdminClient(f"http://127.0.0.1:{port}", TOKEN)
        env = {"EDGEFLEET_ADMIN_URL": f"http://127.0.0.1:{port}", "EDGEFLEET_ADMIN_TOKEN": TOKEN}
        f = Fleet(admin, env, bundles, digits_eval_set(digits_bundles, tmp / "eval.npz"), tmp)
        try:
            wait_until(lambda: _ok(admin.status), timeout=60, what="fleet-server up")
            ports = dict(zip(DEVICES, distinct_ports(len(DEVICES)), strict=True))
            for d in DEVICES:
                admin.register(d, "line", {}, None)
                cfg = daemon_config(
                    broker, keys, tmp / "devices", d, ports[d],
                    # Output drift windows that close within a test's dwell.
                    extra="[drift]\nwindow_values = 64\nwindow_seconds = 1.0\n",
                )  # fmt: skip
                daemons.append(start_daemon(cfg, tmp / f"{d}.log"))
            for path in (digits_bundles.path(1), *bundles.values()):
                f.cli("models", "publish", str(path))
            admin.assign("line", "digits", 1, group=True)
            for d, proc in zip(DEVICES, daemons, strict=True):
                wait_until(
                    lambda d=d: _active(admin, d) == 1,
                    timeout=60,
                    what=lambda d=d, proc=proc: _why_not(d, proc, tmp),
                )

            def drive(device: str, port: int, offset: int) -> None:
                api = AgentClient(ApiConfig(port=port), timeout=10)
                x = digits_bundles.x_eval
                i = offset
                while not stop.wait(PERIOD):  # a steady rate, not a wait for a condition
                    start = (i * 8) % (len(x) - 8)
                    i += 1
                    try:
                        out = api.infer("digits", {"input": x[start : start + 8]})
                    except Exception:  # mid-install or restarting: keep the pace
                        continue
                    with f.lock:
                        f.answered[device].add(int(out["model_version"]))

            for k, (d, p) in enumerate(ports.items()):
                t = threading.Thread(target=drive, args=(d, p, 7 * k), daemon=True)
                t.start()
                threads.append(t)
            wait_until(lambda: all(f.served(1) >= {d} for d in DEVICES), timeout=30, what="v1")
            yield f
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for proc in daemons:
                stop_process(proc)
            admin.close()
            stop_process(server)
            log.close()


def _created(res: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(res.stdout)["id"])


def _halted(f: Fleet, rollout_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        r = f.admin.rollout(rollout_id)
        return r if r["state"] in states else None

    try:
        return wait_until(ended, timeout=90, what=f"rollout {rollout_id} in {states}")
    except AssertionError:
        raise AssertionError(json.dumps(f.admin.rollout(rollout_id), indent=1)[:6000]) from None


def _watched(f: Fleet, rollout_id: str) -> str:
    """What ``rollouts watch`` shows (one frame)."""
    return f.cli("rollouts", "watch", rollout_id, "--iterations", "1").stdout


def _breached(r: dict[str, Any]) -> set[str]:
    return {g["name"] for g in r.get("gates") or [] if g["status"] == "breach"}


def _canaries(r: dict[str, Any]) -> set[str]:
    return set(r.get("members") or {}) | set(r.get("shadows") or {})


def _back_to_live(f: Fleet, rollout_id: str) -> None:
    """The operator aborts the paused rollout; every device serves the live version again."""
    f.cli("rollouts", "abort", rollout_id)
    for d in DEVICES:
        wait_until(lambda d=d: _active(f.admin, d) == f.live, timeout=60, what=f"{d} back")


@pytest.mark.parametrize("candidate", ["3as8", "9as4"])
def test_a_confidently_wrong_candidate_without_eval_set_is_halted_in_the_field(
    fleet: Fleet, candidate: str
) -> None:
    version = {"3as8": 6, "9as4": 7}[candidate]
    created = fleet.create(version, "--json")
    assert json.loads(created.stdout)["offline"]["verdict"] == "no_eval_set"
    rollout_id = _created(created)
    r = _halted(fleet, rollout_id, ("paused", "aborted"))
    assert r["state"] == "paused", r["reasons"]  # the default on_breach
    breached = _breached(r)
    assert breached, r["gates"]
    assert breached <= FIELD_GATES, r["gates"]
    canaries = _canaries(r)
    assert len(canaries) == 1, r  # the canary wave of six devices under the default policy
    shown = _watched(fleet, rollout_id)
    for gate in breached:
        assert any(line.startswith(gate) and "breach" in line for line in shown.splitlines())
    if "shadow_disagreement" in breached:
        assert r.get("phase") == "shadow"
        assert "phase shadow" in shown
        assert {"3as8": "3 -> 8", "9as4": "9 -> 4"}[candidate] in shown
        assert fleet.served(version) == set()  # a shadow never answers a client
    # Nobody outside the canary ever served it or was sent it.
    assert fleet.served(version) <= canaries
    for d in set(DEVICES) - canaries:
        assert version not in _kept(fleet.admin, d)
    _back_to_live(fleet, rollout_id)


@pytest.mark.parametrize("candidate", ["3as8-again", "9as4-again"])
def test_with_an_eval_set_the_offline_comparison_refuses_them_at_create(
    fleet: Fleet, candidate: str
) -> None:
    fleet.ensure_eval_set()
    version = {"3as8-again": 16, "9as4-again": 17}[candidate]
    refused = fleet.create(version, code=5)
    said = refused.stdout + refused.stderr
    assert "error[offline_regression]: 409" in said
    assert {"3as8-again": "class 3 recall", "9as4-again": "class 9 recall"}[candidate] in said
    assert not [r for r in fleet.admin.rollouts() if r["to_version"] == version]
    assert fleet.served(version) == set()


def test_a_good_candidate_completes_with_no_false_halt(fleet: Fleet) -> None:
    fleet.ensure_eval_set()  # it passes the offline comparison too
    created = fleet.create(20, "--json")
    assert json.loads(created.stdout)["offline"]["verdict"] == "passed"
    rollout_id = _created(created)
    r = _halted(fleet, rollout_id, ("completed", "paused", "aborted"))
    assert r["state"] == "completed", (r["reasons"], r["gates"])
    assert not [e for e in r["events"] if e["detail"].get("state") in ("paused", "aborted")]
    assert "state completed" in _watched(fleet, rollout_id)
    for d in DEVICES:
        wait_until(lambda d=d: _active(fleet.admin, d) == 20, timeout=60, what=f"{d} on v20")
    fleet.live = 20
    wait_until(lambda: fleet.served(20) == set(DEVICES), timeout=30, what="v20 answering")


def test_a_slower_candidate_trips_the_latency_gate(fleet: Fleet) -> None:
    rollout_id = _created(fleet.create(21, "--json"))
    r = _halted(fleet, rollout_id, ("paused", "aborted", "completed"))
    assert r["state"] == "paused", [(g["name"], g["status"], g["detail"]) for g in r["gates"]]
    assert "p99_latency" in _breached(r), r["gates"]
    shown = _watched(fleet, rollout_id)
    assert any(
        line.startswith("p99_latency") and "breach" in line for line in shown.splitlines()
    ), shown
    canaries = _canaries(r)
    assert fleet.served(21) <= canaries
    for d in set(DEVICES) - canaries:
        assert 21 not in _kept(fleet.admin, d)
    _back_to_live(fleet, rollout_id)


def test_a_candidate_failing_golden_samples_is_quarantined_and_never_resent(
    fleet: Fleet,
) -> None:
    first = _created(fleet.create(22, "--json"))
    r = _halted(fleet, first, ("paused", "aborted", "completed"))
    assert r["state"] == "paused", (r["reasons"], r["gates"])
    breached = _load_failure(r)
    shown = _watched(fleet, first).splitlines()
    for gate in breached:
        assert any(line.startswith(gate) and "breach" in line for line in shown), shown
    canaries = _canaries(r)
    assert fleet.served(22) == set()
    _back_to_live(fleet, first)
    # Aborted once: not rolled out again without an override; with one, the canary refuses
    # it at once (remembered, not fetched again) and the second abort quarantines it.
    again = fleet.create(22, code=3)  # EXIT_BAD_INPUT: refused, typed
    assert "aborted 1 time" in again.stdout + again.stderr
    second = _created(fleet.create(22, "--override-aborted", "retry after a fix", "--json"))
    r = _halted(fleet, second, ("paused", "aborted", "completed"))
    assert r["state"] == "paused", r["gates"]
    _load_failure(r)
    assert _canaries(r) == canaries
    outcome = (
        (fleet.admin.device(next(iter(canaries))).get("reported") or {}).get("models") or {}
    ).get("digits") or {}
    if (outcome.get("shadow") or {}).get("version") == 22:  # stopped in the shadow phase
        outcome = outcome["shadow"]
    # "failed on this device before" / "refused before": answered from memory, not fetched.
    assert outcome.get("outcome") == "failed", outcome
    assert "before" in str(outcome.get("reason")), outcome
    [canary] = canaries
    log = (fleet.logs / f"{canary}.log").read_text()
    # once, as the canary's bundle or as its shadow (the shadow phase's log line says so)
    downloads = log.count("digits v22: downloading") + log.count("digits v22 (shadow): downloading")
    assert downloads == 1, log[-4000:]
    fleet.cli("rollouts", "abort", second)
    refused = fleet.create(22, code=3)
    assert "quarantined" in refused.stdout + refused.stderr
    assert "quarantined" in json.dumps(fleet.admin.model("digits", 22))
    assert fleet.served(22) == set()
    for d in DEVICES:
        wait_until(lambda d=d: _active(fleet.admin, d) == fleet.live, timeout=60, what=d)
        if d not in canaries:
            assert 22 not in _kept(fleet.admin, d)
    assert np.all([fleet.live in fleet.answered[d] for d in DEVICES])

"""False halts of the rollout gates: a Monte Carlo of whole rollouts of GOOD candidates.

A good candidate is one whose telemetry comes from exactly the control group's distribution.
Every halt of such a rollout is a false halt. The script

1. measures the latency of the digits model (trained, quantized and signed by
   ``model_builder``, as in ``bench/bench_agent.py``) per request through the agent's own
   ``ModelPipeline`` (validation, preprocessing, onnxruntime, drift sketching, counters: what
   the agent's latency histograms count), optionally with ``--busy`` CPU-spinning processes
   beside it (a device doing other work);
2. simulates fleets on a fake clock: every device has its own request rate, reject and
   fallback probabilities, drift-window false-alarm probability, speed factor and install /
   device-rollback probabilities (heterogeneous devices, the same distribution on either
   version); each 30 s report interval adds Poisson traffic whose latencies are sampled from
   the measured distribution (times the device's speed factor) into the coarse and fine
   histograms exactly as the agent counts them; a member joins the new version 10-60 s after
   its assignment and its first report on it is only a baseline (as ``rollouts.observation``);
   every answer on the device is one row of the output tensor of a confident 10-class model
   (the answered class gets U(0.9, 0.999)), the class drawn from the device's own mix (a
   Dirichlet around even shares: devices see different digits, ``--class-mix``), summed into
   the output moments the ``output_distribution`` gate merges, with the members' rows on v1
   before the switch as its second reference;
3. runs the pure engine (``fleet_server.rollouts.engine.decide`` with its gates) over the whole
   rollout with the default ``RolloutPolicy`` (or a variant) every 30 s until it completes
   or halts, shadow phase included: every device advertises the ``shadow`` capability, the
   canaries take the candidate as a shadow 10-60 s after the engine says so (or fail to, at the
   install failure rate), and ``shadow_fraction`` of their device answers are compared; a good
   candidate answers another class than the live model on ``--shadow-disagreement`` of them
   (2 %: a retrained model changes a few answers), a bad one also on its label bug; no rollout
   here has an offline comparison, so the gate's limit is the policy maximum (5 %);
4. prints per-rollout and per-gate false-halt rates with 95 % Wilson intervals as markdown;
5. then runs confidently wrong candidates (a share of the 3s answered as 8s, everything else
   the same) under the default policy: how many are halted, how many at the canary wave, and
   the fake time to the halt.

    .venv/bin/python bench/bench_false_halts.py                    # the table in docs/rollouts.md
    .venv/bin/python bench/bench_false_halts.py --rollouts 200 --fleets 20  # quick look

The simulated rates (reject ~1 %, fallback ~5 %, drift false alarms ~2 % of windows, install
failures 0.5 %, device rollbacks 0.2 %, 1 request/s per device, class mix strength 100: a
device's share of a class is 10 +- 3 points) are assumptions printed with the table; change
them with the flags. Output rows are counted when answered, not when their drift window closes
(the agent ships a window every ~100 rows or 60 s).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts import gates as rollout_gates
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.gates import (
    Gate,
    GateInputs,
    GateResult,
    histogram_quantile_ms,
    p99_latency,
)
from fleet_server.rollouts.metrics import (
    DeviceObservation,
    OutputMoments,
    TensorMoments,
    WindowMetrics,
)
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.shadow_evidence import ShadowEvidence, ShadowInputs
from fleet_server.rollouts.state import Rollout

sys.path.insert(0, str(Path(__file__).resolve().parent))
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
INTERVAL = 30.0  # report interval = decision tick (s)
GATES = (
    "install_failures",
    "device_rollbacks",
    "reject_rate",
    "fallback_rate",
    "prediction_drift",
    "output_distribution",
    "shadow_disagreement",
    "p99_latency",
)
HAS_FINE = "latency_fine" in WindowMetrics.__dataclass_fields__
CLASSES = 10
# A confident classifier: the answered class gets conf ~ U(0.9, 0.999), the others share the rest.
_C_LO, _C_HI = 0.9, 0.999
E_CONF = (_C_LO + _C_HI) / 2
E_CONF2 = (_C_HI**3 - _C_LO**3) / (3 * (_C_HI - _C_LO))
E_REST = (1 - E_CONF) / (CLASSES - 1)
E_REST2 = (1 - 2 * E_CONF + E_CONF2) / (CLASSES - 1) ** 2


# --------------------------------------------------------------------------- measuring
def measure_latencies(n: int, levels: list[int]) -> list[np.ndarray]:
    """Per-request latency (ms) of the digits model through ``ModelPipeline.run``.

    One array of ``n`` requests per entry of ``levels``, measured with that many CPU-spinning
    processes running beside the pipeline (a device doing other work).
    """
    from bench_agent import build_bundle
    from edge_agent.bundle import read_bundle
    from edge_agent.config import DriftConfig, ModelPolicy
    from edge_agent.runtime.base import RuntimeOptions
    from edge_agent.runtime.loader import load_runtime
    from edge_agent.serving.pipeline import ModelPipeline
    from edge_agent.trust import TrustedRoot

    with tempfile.TemporaryDirectory() as tmp:
        bundle, root, x_eval = build_bundle(Path(tmp))
        loaded = read_bundle(
            bundle,
            TrustedRoot.from_bytes(root.read_bytes()),
            now=datetime.now(UTC),
            installed_version=None,
            device=None,
        )
    pipe = ModelPipeline(
        loaded.manifest,
        load_runtime(loaded.artifact, "onnx", RuntimeOptions()),
        ModelPolicy(),
        DriftConfig(),
    )
    for i in range(500):  # warm-up
        pipe.run({"input": x_eval[i % len(x_eval)][None, :]})
    arrays = []
    for busy in levels:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            out = np.empty(n)
            for i in range(n):
                out[i] = pipe.run({"input": x_eval[i % len(x_eval)][None, :]}).latency_s * 1e3
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        arrays.append(out)
    return arrays


# --------------------------------------------------------------------------- simulating
@dataclass(frozen=True)
class Rates:
    """The fleet's (good) behaviour; the same on either version."""

    rate: float = 1.0
    reject: float = 0.01
    fallback: float = 0.05
    drift_alert: float = 0.02
    install_failure: float = 0.005
    rollback: float = 0.002
    speed_sigma: float = 0.2
    class_mix: float = 100.0  # Dirichlet strength of each device's class mix (0: all alike)
    mix_drift: float = 0.0  # per hour, how far each device's mix moves (random walk, in shares)
    shadow_disagreement: float = 0.02  # a good candidate's answers that differ from the live one


class Fleet:
    """Per-device parameters and cumulative counters since each device's window start."""

    def __init__(
        self,
        rng: np.random.Generator,
        n: int,
        rates: Rates,
        lat: list[np.ndarray],
        shadow_fraction: float | None = None,
    ) -> None:
        self.rng, self.n, self.rates, self.lat = rng, n, rates, lat
        self.shadow_fraction = shadow_fraction or 0.0
        self.ids = [f"dev-{i:04d}" for i in range(n)]
        self.index = {d: i for i, d in enumerate(self.ids)}

        def beta(mean: float, strength: float = 200.0) -> np.ndarray:
            return rng.beta(mean * strength, (1 - mean) * strength, n)

        self.rate = rates.rate * rng.lognormal(0.0, 0.5, n) / math.exp(0.125)
        self.p_reject, self.p_fallback = beta(rates.reject), beta(rates.fallback)
        self.p_alert = beta(rates.drift_alert, 100.0)
        self.speed = rng.lognormal(0.0, rates.speed_sigma, n)
        self.load = rng.integers(0, len(lat), n)  # which measured load level the device sees
        self.version = np.ones(n, dtype=int)
        self.counting = np.zeros(n, dtype=bool)  # a first report on the version was seen
        self.active_at = np.full(n, np.inf)  # fake-clock time a member starts serving v2
        self.failed = np.zeros(n, dtype=bool)
        self.rolled = np.zeros(n, dtype=bool)
        # Each device sees its own mix of classes (a site that sees more 8s); 0: all alike.
        even = np.full(CLASSES, 1.0 / CLASSES)
        if rates.class_mix > 0:
            self.mix = rng.dirichlet(even * rates.class_mix, n)
        else:
            self.mix = np.tile(even, (n, 1))
        self.answers = np.eye(CLASSES)  # the candidate's answer per true class (good: the same)
        self.out = np.zeros((n, CLASSES), dtype=np.int64)  # answers per class on the version
        self.before = np.zeros((n, CLASSES), dtype=np.int64)  # v1 answers before the switch
        self.c = np.zeros((n, 7), dtype=np.int64)  # ok rej dev cloud windows alerts reports
        self.lc = np.zeros((n, len(LATENCY_BUCKETS_MS) + 1), dtype=np.int64)
        self.lf = np.zeros((n, len(LATENCY_FINE_BUCKETS_MS) + 1), dtype=np.int64)
        # A member's v1 latency before it switched (the latency gate's second reference).
        self.lcb, self.lfb = np.zeros_like(self.lc), np.zeros_like(self.lf)
        self.counting[:] = True  # control devices have reported before the rollout starts
        # The shadow phase: when each canary's shadow starts, and live (row) vs shadow (column)
        # answers since; ``shadow_failed``: its install failed.
        self.shadow_at = np.full(n, np.inf)
        self.shadow_failed = np.zeros(n, dtype=bool)
        self.flips = np.zeros((n, CLASSES, CLASSES), dtype=np.int64)
        self.shadowed: list[int] = []

    def shadow(self, devices: tuple[str, ...], now: float) -> None:
        """The engine gave ``devices`` the candidate as a shadow (they keep serving v1)."""
        for d in devices:
            i = self.index[d]
            self.shadowed.append(i)
            if self.rng.random() < self.rates.install_failure:
                self.shadow_failed[i] = True
            else:
                self.shadow_at[i] = now + self.rng.uniform(10.0, 60.0)

    def shadow_inputs(self) -> ShadowInputs:
        """Every device can take a shadow; the shadowed canaries' evidence so far."""
        evidence = {}
        for i in self.shadowed:
            m = self.flips[i]
            compared, agree = int(m.sum()), int(np.trace(m))
            failed = {self.ids[i]: "install failed"} if self.shadow_failed[i] else {}
            started = math.isfinite(self.shadow_at[i])
            evidence[self.ids[i]] = ShadowEvidence(
                compared,
                agree,
                Confusion(tuple(tuple(r) for r in m.tolist())) if compared else None,
                devices=int(compared > 0),
                installed=int(started),
                failed=failed,
            )
        return ShadowInputs(frozenset(self.ids), classification=True, devices=evidence)

    def assign(self, devices: tuple[str, ...], now: float) -> None:
        for d in devices:
            i = self.index[d]
            # Observed on the new version from now: nothing counts until it serves it.
            self.c[i], self.lc[i], self.lf[i], self.counting[i] = 0, 0, 0, False
            self.lcb[i], self.lfb[i] = 0, 0
            self.out[i], self.before[i] = 0, 0
            self.shadow_at[i] = np.inf  # serving the candidate ends its shadow
            if self.rng.random() < self.rates.install_failure:
                self.failed[i] = True
                continue
            self.active_at[i] = now + self.rng.uniform(10.0, 60.0)

    def advance(self, now: float) -> None:
        """One report interval ending at ``now``."""
        rng = self.rng
        switch = (self.version == 1) & (self.active_at <= now)
        self.version[switch] = 2
        self.counting[switch] = False  # the first report on v2 is only a baseline
        for i in np.flatnonzero(switch):
            if rng.random() < self.rates.rollback:
                self.rolled[i] = True
        self.c[switch] = 0
        self.lc[switch] = 0
        self.lf[switch] = 0
        self.lcb[switch] = 0
        self.lfb[switch] = 0
        self.out[switch] = 0
        self.before[switch] = 0
        live = self.counting & ~self.failed & ~self.rolled
        req = rng.poisson(self.rate * INTERVAL) * live
        rej = rng.binomial(req, self.p_reject)
        ok = req - rej
        cloud = rng.binomial(ok, self.p_fallback)
        windows = np.minimum(req, 1) * int(INTERVAL // 60 + (rng.random() < 0.5))
        alerts = rng.binomial(windows, self.p_alert)
        self.c += np.stack([ok, rej, ok - cloud, cloud, windows, alerts, live.astype(int)], 1)
        self._answer(ok - cloud, live)
        self._shadow_answers(ok - cloud, live, now)
        self._latencies(ok, self.lc, self.lf)
        # The same devices' v1 latency before the switch, as long as they have served v2 (the
        # same device, load and rate; what the runner reads from their earlier reports).
        self._latencies(ok * (live & (self.version == 2)), self.lcb, self.lfb)
        self.counting[~self.counting & (self.version == 2)] = True

    def _latencies(self, counts: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> None:
        """``counts[i]`` requests of device ``i``, latencies drawn from its measured load level
        times its speed factor, counted into its ``coarse`` and ``fine`` histograms."""
        total = int(counts.sum())
        if not total:
            return
        dev = np.repeat(np.arange(self.n), counts)
        ms = np.empty(total)
        for level, samples in enumerate(self.lat):
            sel = self.load[dev] == level
            ms[sel] = self.rng.choice(samples, int(sel.sum()))
        ms *= self.speed[dev]
        np.add.at(coarse, (dev, np.searchsorted(LATENCY_BUCKETS_MS, ms, side="left")), 1)
        np.add.at(fine, (dev, np.searchsorted(LATENCY_FINE_BUCKETS_MS, ms, side="left")), 1)

    def _answer(self, rows: np.ndarray, live: np.ndarray) -> None:
        """Answers on the device (what the output drift windows sketch), by class."""
        if self.rates.mix_drift > 0:
            step = self.rng.normal(
                0, self.rates.mix_drift * math.sqrt(INTERVAL / 3600), self.mix.shape
            )
            self.mix = np.clip(self.mix + step, 1e-4, None)
            self.mix /= self.mix.sum(axis=1, keepdims=True)
        on2 = (self.version == 2)[:, None]
        p = np.where(on2, self.mix @ self.answers, self.mix)
        self.out += self.rng.multinomial(rows, p) * live[:, None]
        # A member's v1 windows before it switched, as long as it has served v2: the same
        # device, the same rate, v1's answers (its mix then; mix_drift moves it, not modelled).
        self.before += self.rng.multinomial(rows, self.mix) * (live & on2[:, 0])[:, None]

    def _shadow_answers(self, rows: np.ndarray, live: np.ndarray, now: float) -> None:
        """``shadow_fraction`` of a shadowing canary's answers, live class vs shadow class."""
        b = self.rates.shadow_disagreement
        # The shadow's answer to a row the live model answered t: the candidate's (``answers``)
        # with probability 1 - b, another class at random with probability b.
        other = (1.0 - np.eye(CLASSES)) / (CLASSES - 1)
        q = (1.0 - b) * self.answers + b * other
        for i in np.flatnonzero(live & (self.shadow_at <= now) & (self.version == 1)):
            k = int(self.rng.binomial(rows[i], self.shadow_fraction))
            for t, c in enumerate(self.rng.multinomial(k, self.mix[i])):
                if c:
                    self.flips[i, t] += self.rng.multinomial(c, q[t])

    @staticmethod
    def _moments(counts: list[int]) -> OutputMoments:
        k = sum(counts)
        if k == 0:
            return OutputMoments()
        s = [c * E_CONF + (k - c) * E_REST for c in counts]
        sq = [c * E_CONF2 + (k - c) * E_REST2 for c in counts]
        return OutputMoments.of_tensor("probabilities", TensorMoments.of([k] * CLASSES, s, sq))

    def observations(self) -> list[DeviceObservation]:
        out = []
        outs, befores = self.out.tolist(), self.before.tolist()
        cs, lcs, lfs = self.c.tolist(), self.lc.tolist(), self.lf.tolist()
        lcbs, lfbs = self.lcb.tolist(), self.lfb.tolist()
        for i, d in enumerate(self.ids):
            c = cs[i]
            kw: dict[str, Any] = {"latency_fine": tuple(lfs[i])} if HAS_FINE else {}
            m = WindowMetrics(
                reports=c[6],
                requests=c[0] + c[1],
                rejected=c[1],
                device_answers=c[2],
                cloud_answers=c[3],
                drift_windows=c[4],
                drift_alerts=c[5],
                latency_buckets=tuple(lcs[i]),
                **kw,
            )
            assigned = 2 if math.isfinite(self.active_at[i]) or self.failed[i] else 1
            active = 1 if self.rolled[i] else int(self.version[i])
            outcome = "failed" if self.failed[i] else "installed"
            outcome = "rolled_back" if self.rolled[i] else outcome
            out.append(
                DeviceObservation(
                    d,
                    active_version=active,
                    assigned_version=assigned,
                    outcome=outcome,
                    install_failed=bool(self.failed[i]),
                    rolled_back=bool(self.rolled[i]),
                    metrics=m,
                    outputs=self._moments(outs[i]),
                    outputs_before=self._moments(befores[i]),
                    metrics_before=WindowMetrics(
                        latency_buckets=tuple(lcbs[i]), latency_fine=tuple(lfbs[i])
                    ),
                )
            )
        return out


def one_rollout(
    rng: np.random.Generator,
    n: int,
    policy: RolloutPolicy,
    rates: Rates,
    lat: list[np.ndarray],
    gates: tuple[Gate, ...] = rollout_gates.GATES,
    answers: np.ndarray | None = None,
) -> tuple[str, tuple[str, ...], float, int]:
    """Run one rollout to its end: (final state, gates that breached, fake seconds, wave).

    ``answers`` makes the candidate a bad one: row ``t`` is the distribution of its answer to
    an input of class ``t`` (the live version answers ``t``).
    """
    fleet = Fleet(rng, n, rates, lat, policy.shadow_fraction)
    if answers is not None:
        fleet.answers = answers
    r = Rollout("ro", "digits", 1, 2, Selector(group="g"), policy, created_at=T0)
    t = 0.0
    for _ in range(10_000):
        now = T0 + timedelta(seconds=t)
        d = decide(r, fleet.observations(), now, gates=gates, shadow=fleet.shadow_inputs())
        r = d.rollout
        if d.shadow:
            fleet.shadow(d.shadow, t)
        if d.assign:
            fleet.assign(d.assign, t)
        if not r.active:
            bad = tuple(g.name for g in r.gates if g.status == "breach")
            return r.state, bad, t, r.wave
        t += INTERVAL
        fleet.advance(t)
    raise RuntimeError("rollout did not finish")


# --------------------------------------------------------------------------- reporting
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:.2%} [{lo:.2%}, {hi:.2%}]"


def _point_latency(
    c: WindowMetrics, k: WindowMetrics, t: Thresholds, p: RolloutPolicy, has_control: bool
) -> GateResult:
    """The p99 gate as it was before: the point estimates' ratio alone (for comparison)."""
    name, limit = "p99_latency", t.max_p99_latency_ratio
    if limit is None or not has_control:
        return GateResult(name, "skipped", None, limit, "")
    n1, n2 = sum(c.latency_buckets), sum(k.latency_buckets)
    if min(n1, n2) < p.min_requests:
        return GateResult(name, "waiting", None, limit, "")
    q1 = histogram_quantile_ms(c.latency_buckets, LATENCY_BUCKETS_MS, 0.99) or 0.0
    q2 = histogram_quantile_ms(k.latency_buckets, LATENCY_BUCKETS_MS, 0.99) or 0.0
    ratio = q1 / max(q2, 1e-9)
    return GateResult(name, "breach" if ratio > limit else "ok", ratio, limit, "")


def _with_p99(
    verdict: Callable[[WindowMetrics, WindowMetrics, Thresholds, RolloutPolicy, bool], GateResult],
) -> tuple[Gate, ...]:
    """The registered gates with ``verdict`` judging p99 latency instead."""

    def judge(i: GateInputs) -> GateResult:
        p = i.rollout.policy
        return verdict(i.canary, i.control, p.thresholds, p, i.has_control)

    registered = rollout_gates.GATES
    return tuple(replace(g, verdict=judge) if g.name == "p99_latency" else g for g in registered)


def variants(names: list[str]) -> dict[str, tuple[RolloutPolicy, tuple[Gate, ...]]]:
    """Policy and gates per variant name."""
    base = RolloutPolicy()
    table = {
        "default": (base, rollout_gates.GATES),
        "before (p99 ratio alone)": (base, _with_p99(_point_latency)),
        # The tail test against 1 % alone, not against the control's own tail (the gate until
        # this measurement: a canary of busier devices stalls more on either version).
        "before (tail vs 1 % only)": (
            base,
            _with_p99(lambda c, k, t, p, has: p99_latency.compare(c, k, t, p, has, 0.0)),
        ),
        # The tail test against the control alone, without the same devices before the switch.
        "control only": (base, _with_p99(p99_latency.compare)),
        # The same fleets without the output gate: what its waiting costs the other gates.
        "without output_distribution": (
            replace(base, thresholds=Thresholds(max_output_shift=None)),
            rollout_gates.GATES,
        ),
        # No shadow phase (the policy before it existed, or a fleet of older agents).
        "without shadow phase": (replace(base, shadow_fraction=None), rollout_gates.GATES),
    }
    return {k: table[k] for k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=1000, help="rollouts per fleet and policy")
    ap.add_argument("--fleets", default="20,50,200", help="fleet sizes, comma-separated")
    ap.add_argument(
        "--policies",
        default="default,before (p99 ratio alone)",
        help="comma-separated: default, before (p99 ratio alone), before (tail vs 1 %% only), "
        "control only, without output_distribution, without shadow phase",
    )
    ap.add_argument("--requests", type=int, default=10_000, help="latencies measured per level")
    ap.add_argument(
        "--busy", default="0,2,4,8", help="load levels: CPU-spinning processes while measuring"
    )
    ap.add_argument("--latencies", type=Path, help="reuse/save measured latencies (.npz)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument(
        "--bad-rollouts", type=int, default=200, help="rollouts per confidently wrong candidate"
    )
    for f in Rates.__dataclass_fields__:
        ap.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(Rates(), f))
    a = ap.parse_args()
    rates = Rates(**{f: getattr(a, f) for f in Rates.__dataclass_fields__})
    levels = [int(x) for x in a.busy.split(",")]
    if a.latencies is not None and a.latencies.exists():
        with np.load(a.latencies) as z:
            levels, lat = [int(k[1:]) for k in z.files], [z[k] for k in z.files]
    else:
        lat = measure_latencies(a.requests, levels)
        if a.latencies is not None:
            np.savez(a.latencies, **{f"b{b}": x for b, x in zip(levels, lat, strict=True)})
    print(
        f"Measured latency of the digits model through ModelPipeline.run ({os.cpu_count()} "
        "CPUs); each simulated device sees one load level, chosen at random:\n"
    )
    print(
        "| CPU-spinning processes beside it | requests | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| max ms | share above 1 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b, x in zip(levels, lat, strict=True):
        q = np.percentile(x, [50, 90, 99, 99.9])
        print(
            f"| {b} | {len(x)} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | {q[3]:.3f} "
            f"| {x.max():.2f} | {(x > 1.0).mean():.2%} |"
        )
    print()  # fmt: skip
    print(f"Assumed fleet behaviour (either version): {rates}; latency histograms judged: "
          f"{'fine (R10, 50 us..5 s)' if HAS_FINE else 'coarse (1 ms..5 s)'}.\n")  # fmt: skip
    head = ["fleet", "policy", "rollouts", "false halts per rollout [95% CI]"]
    print("| " + " | ".join(head + [f"{g}" for g in GATES]) + " | fake time to complete |")
    print("|" + "---|" * (len(head) + len(GATES) + 1))
    rng = np.random.default_rng(a.seed)
    for n in (int(x) for x in a.fleets.split(",")):
        for name, (pol, gates) in variants(a.policies.split(",")).items():
            halted, per_gate, secs = 0, Counter[str](), []
            t_wall = time.perf_counter()
            for _ in range(a.rollouts):
                state, bad, t, _wave = one_rollout(rng, n, pol, rates, lat, gates)
                halted += state != "completed"
                per_gate.update(bad)
                if state == "completed":
                    secs.append(t)
            cells = [str(n), name, str(a.rollouts), rate(halted, a.rollouts)]
            cells += [rate(per_gate[g], a.rollouts) for g in GATES]
            med = f"{np.median(secs) / 60:.0f} min" if secs else "-"
            print("| " + " | ".join(cells) + f" | {med} |", flush=True)
            print(f"{n}/{name}: {time.perf_counter() - t_wall:.0f} s wall", file=sys.stderr)
    if a.bad_rollouts:
        bad_candidates(rng, a, rates, lat)


def label_bug(share: float, src: int = 3, dst: int = 8) -> np.ndarray:
    """A candidate that answers ``dst`` for ``share`` of the inputs of class ``src``."""
    m = np.eye(CLASSES)
    m[src, src], m[src, dst] = 1 - share, share
    return m


def bad_candidates(
    rng: np.random.Generator, a: argparse.Namespace, rates: Rates, lat: list[np.ndarray]
) -> None:
    """Confidently wrong candidates under the default policy: how many are stopped, where, when."""
    print(
        "\nConfidently wrong candidates (same inputs, same confidence, same rates; default "
        "policy): a share of the 3s answered as 8s.\n"
    )
    print(
        "| fleet | candidate | rollouts | halted | halted at the canary wave | in the shadow "
        "phase (no canary served it) | by output_distribution | median fake time to halt |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in a.fleets.split(",")):
        for share in (0.8, 0.5):
            halted = canary = shadow = by_gate = 0
            secs: list[float] = []
            for _ in range(a.bad_rollouts):
                state, bad, t, wave = one_rollout(
                    rng, n, RolloutPolicy(), rates, lat, answers=label_bug(share)
                )
                if state != "completed":
                    halted += 1
                    canary += wave <= 0  # the shadow phase is before wave 0
                    shadow += "shadow_disagreement" in bad
                    by_gate += "output_distribution" in bad
                    secs.append(t)
            med = f"{np.median(secs) / 60:.1f} min" if secs else "-"
            cells = [str(n), f"{share:.0%} of 3s as 8s", str(a.bad_rollouts),
                     rate(halted, a.bad_rollouts), rate(canary, a.bad_rollouts),
                     rate(shadow, a.bad_rollouts), rate(by_gate, a.bad_rollouts), med]  # fmt: skip
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

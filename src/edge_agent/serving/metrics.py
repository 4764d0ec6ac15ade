"""Agent state as Prometheus metrics, collected at scrape time (nothing on the request path).

Series (all prefixed ``edgefleet_agent_``): loaded model version and probation state, requests,
rows, errors and validation rejects by reason per model, rows dropped by the ``drop`` policy,
rows sampled out of drift sketching, drift windows closed/alerted and the last window's
per-feature PSI and mean-shift per tensor, shadow agreement, A/B arm counts, adaptive batching
(batches, the requests and rows in them, batch sizes, requests run alone), rollbacks, closed
drift windows dropped over the buffer's memory budget, memory in use, and cloud-fallback
outcomes. Reads ``Agent.snapshot()`` (``edge_agent.serving.status.AgentSnapshot``) and the
public ``Agent.drift_windows`` buffer, never the agent's private state.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_agent.runtime.batching import BATCH_ROW_BUCKETS, BatchingRuntime
from edge_agent.serving.agent import Agent

P = "edgefleet_agent_"


class AgentCollector(Collector):
    """Reads ``Agent`` counters when Prometheus scrapes."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        a = self.agent.snapshot()
        version = GaugeMetricFamily(
            P + "model_version", "Loaded version per model", labels=["model"]
        )
        probation = GaugeMetricFamily(
            P + "model_on_probation", "1 while on probation", labels=["model"]
        )
        requests = CounterMetricFamily(
            P + "requests", "Requests by model and outcome", labels=["model", "outcome"]
        )
        rejects = CounterMetricFamily(
            P + "validation_rejects", "Rejected requests by reason", labels=["model", "reason"]
        )
        dropped = CounterMetricFamily(
            P + "rows_dropped", "Rows dropped (drop policy) by reason", labels=["model", "reason"]
        )
        sampled = CounterMetricFamily(
            P + "drift_rows_sampled_out",
            "Rows not sketched because of the sketching budget",
            labels=["model"],
        )
        windows = CounterMetricFamily(
            P + "drift_windows", "Closed drift windows", labels=["model", "tensor", "alerted"]
        )
        psi = GaugeMetricFamily(
            P + "drift_psi", "PSI of the last closed window", labels=["model", "tensor", "feature"]
        )
        shift = GaugeMetricFamily(
            P + "drift_mean_shift_sigma",
            "Mean shift (baseline sigmas) of the last closed window",
            labels=["model", "tensor", "feature"],
        )
        alert = GaugeMetricFamily(
            P + "drift_alert",
            "1 if the last window of a tensor drifted",
            labels=["model", "tensor"],
        )
        agree = GaugeMetricFamily(
            P + "shadow_agreement", "Shadow top-1 agreement", labels=["model"]
        )
        arms = CounterMetricFamily(
            P + "ab_requests", "A/B requests by arm", labels=["model", "arm"]
        )
        batches = CounterMetricFamily(
            P + "batches",
            "Adaptive batching: batches run, and the requests and rows they held",
            labels=["model", "what"],
        )
        batch_rows = CounterMetricFamily(
            P + "batch_rows_le",
            "Adaptive batching: batches that held at most 'le' rows (cumulative)",
            labels=["model", "le"],
        )
        for key in a.registry.loaded_keys():
            entry = a.registry.get(key)
            if entry is None:
                continue
            p = entry.pipeline
            if isinstance(p.runtime, BatchingRuntime):
                st = p.runtime.stats
                for what, n in (
                    ("batches", st.batches),
                    ("requests", st.requests),
                    ("rows", st.rows),
                    ("alone", st.alone),
                    ("reruns", st.reruns),
                ):
                    batches.add_metric([key, what], n)
                below = 0  # cumulative, as a Prometheus histogram's "le" buckets are
                for edge, n in zip((*BATCH_ROW_BUCKETS, "+Inf"), st.rows_buckets, strict=True):
                    below += n
                    batch_rows.add_metric([key, str(edge)], below)
            version.add_metric([key], p.version)
            probation.add_metric([key], 1.0 if entry.on_probation else 0.0)
            ok = p.requests - p.errors - p.rejects
            for outcome, n in (("ok", ok), ("error", p.errors), ("rejected", p.rejects)):
                requests.add_metric([key, outcome], n)
            for reason, n in dict(p.rejects_by_reason).items():
                rejects.add_metric([key, reason], n)
            for reason, n in dict(p.dropped_rows_by_reason).items():
                dropped.add_metric([key, reason], n)
            sampled.add_metric([key], p.sketch_sampled_out)
            for tensor, state in p.monitor.snapshot().items():
                windows.add_metric(
                    [key, tensor, "false"], state.windows_closed - state.windows_alerted
                )
                windows.add_metric([key, tensor, "true"], state.windows_alerted)
                if state.last is None:
                    continue
                alert.add_metric([key, tensor], 1.0 if state.last.verdict.alert else 0.0)
                for i, (v_psi, v_shift) in enumerate(
                    zip(state.last.scores.psi, state.last.scores.mean_shift, strict=True)
                ):
                    psi.add_metric([key, tensor, str(i)], float(v_psi))
                    shift.add_metric([key, tensor, str(i)], float(v_shift))
            shadow = a.shadow.get(key)
            if shadow is not None:
                agree.add_metric([key], float(shadow.get("agreement") or 0.0))
            for arm, n in a.ab.get(key, {}).items():
                arms.add_metric([key, arm], n)
        rollbacks = CounterMetricFamily(P + "rollbacks", "Rollbacks (automatic and manual)")
        rollbacks.add_metric([], a.registry.rollbacks)
        windows_dropped = CounterMetricFamily(
            P + "drift_windows_dropped",
            "Closed drift windows dropped unreported to keep the buffer's memory budget",
        )
        windows_dropped.add_metric([], self.agent.drift_windows.dropped)
        memory = GaugeMetricFamily(P + "model_memory_bytes", "Memory attributed to loaded models")
        memory.add_metric([], a.registry.memory_used())
        fallback = CounterMetricFamily(
            P + "fallback_calls", "Cloud fallback calls by outcome", labels=["outcome"]
        )
        if a.fallback is not None:
            stats = a.fallback
            fallback.add_metric(["ok"], stats.get("ok", 0))
            for reason, n in dict(stats.get("failures", {})).items():
                fallback.add_metric([reason], n)
        yield from (
            version,
            probation,
            requests,
            rejects,
            dropped,
            sampled,
            windows,
            psi,
            shift,
            alert,
            agree,
            arms,
            batches,
            batch_rows,
            rollbacks,
            windows_dropped,
            memory,
            fallback,
        )

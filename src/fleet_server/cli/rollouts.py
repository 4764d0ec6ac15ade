"""``fleet-server rollouts`` commands: create, status, watch, approve, pause, resume, abort.

They talk to ``fleet-server serve``'s admin API (``--url``/``--token`` like every admin
command) and print human tables, or JSON with ``--json``. ``watch ID`` redraws a live progress
view every few seconds: waves, devices per state, each gate with its measured value against its
threshold, and the latest reasons; it ends when the rollout completes or aborts. Errors are
``AdminApiError``s for the CLI's error boundary.
"""

from __future__ import annotations

import time
from typing import Any

import click

from edge_agent.errors import ContractError
from edge_agent.quality.compare import ModelComparison
from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import (
    admin_options,
    emit_json,
    json_option,
    parse_tags,
    shown,
    table_lines,
)
from fleet_server.errors import AdminRequestError, OfflineRegressionError
from fleet_server.rollouts.state import AGENT_ROLLOUT

__all__ = ["register_rollout_commands", "render_rollout", "rollout_title", "target_body"]

_THRESHOLDS = (
    ("max_install_failure_rate", "--max-install-failure-rate"),
    ("max_rollback_rate", "--max-rollback-rate"),
    ("max_reject_rate_increase", "--max-reject-increase"),
    ("max_fallback_rate_increase", "--max-fallback-increase"),
    ("max_drift_alert_share", "--max-drift-share"),
    ("min_shadow_agreement", "--min-shadow-agreement"),
    ("max_p99_latency_ratio", "--max-p99-ratio"),
    ("min_p99_latency_delta_ms", "--min-p99-delta-ms"),
    ("max_error_rate_increase", "--max-error-increase"),
    ("max_output_shift", "--max-output-shift"),
    ("max_ground_truth_drop", "--max-accuracy-drop"),
    ("min_ground_truth_labels", "--min-labels"),
    ("max_shadow_disagreement_excess", "--max-shadow-excess"),
    ("max_shadow_disagreement", "--max-shadow-disagreement"),
    ("min_shadow_rows", "--min-shadow-rows"),
)
_OFFLINE = (
    ("max_accuracy_drop", "offline_max_accuracy_drop"),
    ("max_recall_drop", "offline_max_recall_drop"),
    ("min_samples", "offline_min_samples"),
)
_OFFLINE_SAID = {
    "passed": "passed",
    "overridden": "REGRESSED, overridden",
    "no_eval_set": "no evaluation set",
    "no_champion": "nothing to compare with (first version)",
    "disabled": "off in the policy",
}
_FINAL = ("completed", "aborted")
_DEVICE_STATES = (
    "installed",
    "assigned",
    "waiting_window",
    "waiting_budget",
    "shadow",
    "control",
    "failed",
    "rolled_back",
    "reverted",
)


def _num(v: Any, percent: bool) -> str:
    if v is None:
        return "-"
    return f"{float(v):.2%}" if percent else f"{float(v):.2f}"


def _versions(r: dict[str, Any]) -> str:
    frm = r.get("from_version")
    if r.get("model") == AGENT_ROLLOUT:
        return f"agent release {'base' if frm is None else frm} -> {r['to_version']}"
    return f"{r['model']} v{'?' if frm is None else frm} -> v{r['to_version']}"


def rollout_title(r: dict[str, Any]) -> str:
    """``rollout ID created: VERSIONS on SELECTOR`` (what ``create`` prints)."""
    return f"rollout {r['id']} created: {_versions(r)} on {_selector(r)}"


def _selector(r: dict[str, Any]) -> str:
    sel = r.get("selector") or {}
    if sel.get("group"):
        return f"group={sel['group']}"
    if sel.get("labels"):
        return f"labels {sel['labels']}"
    return ",".join(f"{k}={v}" for k, v in sorted((sel.get("tags") or {}).items()))


def render_holds(r: dict[str, Any]) -> list[str]:
    """Who waits for a maintenance window (and when it opens) or for the disruption budget."""
    holds = r.get("holds") or {}
    budget = (r.get("policy") or {}).get("disruption_budget")
    lines = []
    if isinstance(budget, dict):
        limit = budget.get("max_devices") or f"{float(budget.get('max_fraction') or 0):.0%}"
        lines.append(
            f"budget at most {limit} per {budget.get('label')} mid-install or on probation"
        )
    for device, h in sorted(holds.items())[:20]:
        if h.get("reason") == "window":
            lines.append(f"  {shown(device, 64)} waits for its window, opens {h.get('opens_at')}")
        else:
            lines.append(f"  {shown(device, 64)} waits for the disruption budget")
    if len(holds) > 20:
        lines.append(f"  ... and {len(holds) - 20} more held")
    return lines


def render_offline(r: dict[str, Any]) -> list[str]:
    """The offline comparison kept in a rollout, as lines (none for older rollouts)."""
    o = r.get("offline")
    if not isinstance(o, dict):
        return []
    verdict = str(o.get("verdict"))
    line = f"offline {_OFFLINE_SAID.get(verdict, shown(verdict, 32))}"
    if o.get("eval_set"):
        line += f" on evaluation set {str(o['eval_set'])[:12]} ({o.get('n', 0)} samples)"
    if isinstance(o.get("comparison"), dict):
        try:
            c = ModelComparison.from_dict(o["comparison"])
            a, b = c.champion.accuracy(), c.challenger.accuracy()
            if a is not None and b is not None:
                line += f"  accuracy {a:.1%} -> {b:.1%}"
        except ContractError:
            line += "  (comparison unreadable)"
    if o.get("disagreement") is not None:
        line += f"  disagreement {float(o['disagreement']):.1%}"
    lines = [line]
    lines += [f"  - {shown(x, 300)}" for x in o.get("reasons") or []]
    if o.get("override"):
        lines.append(f"  override: {shown(o['override'], 512)}")
    return lines


def render_rollout(r: dict[str, Any]) -> list[str]:
    """The progress view of one rollout (``GET /v1/rollouts/{id}``'s body) as lines."""
    sizes = list(r.get("wave_sizes") or [])
    wave = int(r.get("wave", -1))
    counts = r.get("counts") or {}
    total = sum(int(v) for v in counts.values())
    members = len(r.get("members") or {})
    lines = [
        f"rollout {r['id']}  {_versions(r)}  {_selector(r)}",
        f"state {r['state']}  wave {wave + 1}/{len(sizes) or '?'}  "
        f"members {members}/{total}  updated {r.get('updated_at')}",
    ]
    shadows = r.get("shadows") or {}
    if r.get("phase") == "shadow":
        lines.append(
            f"phase shadow: {len(shadows)} canary device(s) run v{r.get('to_version')} as a "
            "shadow (not serving); the canary serves only once the shadow gates pass"
        )
    elif shadows:
        lines.append(f"phase serving (shadow phase passed on {len(shadows)} canary device(s))")
    marks = []
    for i, size in enumerate(sizes):
        mark = "#" if i < wave else (">" if i == wave else " ")
        marks.append(f"[{mark}] {i + 1}: {size}")
    if marks:
        lines.append("waves   " + "   ".join(marks))
    width = 40
    done = int(width * members / total) if total else 0
    lines.append(f"progress [{'#' * done}{'.' * (width - done)}] {members}/{total}")
    states = [s for s in _DEVICE_STATES if counts.get(s) or s in ("installed", "assigned")]
    lines.append("devices " + "  ".join(f"{s} {counts.get(s, 0)}" for s in states))
    lines += render_holds(r)
    lines += render_offline(r)
    gates = r.get("gates") or []
    if gates:
        rows = []
        for g in gates:
            percent = g["name"] not in ("p99_latency", "reporting")
            rows.append(
                (
                    g["name"],
                    g["status"],
                    _num(g.get("measured"), percent),
                    _num(g.get("threshold"), percent),
                    g.get("detail", ""),
                )
            )
        lines += table_lines(rows, ("GATE", "STATUS", "MEASURED", "THRESHOLD", "DETAIL"))
    for reason in r.get("reasons") or []:
        lines.append(f"- {reason}")
    return lines


def target_body(
    group: str | None,
    tags: tuple[str, ...],
    selector: str | None,
    label_group: str | None,
    override_quarantine: str,
    override_aborted: str,
) -> dict[str, Any]:
    """The ``POST /v1/rollouts`` fields a model and an agent rollout share: exactly one target
    (``--group``, ``--tag``, ``--selector`` or ``--label-group``) and the memory-of-failure
    overrides given.

    Raises:
        click.UsageError: no target or more than one.
    """
    given = (group is not None) + bool(tags) + (selector is not None) + (label_group is not None)
    if given != 1:
        raise click.UsageError("give exactly one of --group, --tag, --selector, --label-group")
    body: dict[str, Any] = {"group": group, "tags": parse_tags(tags)}
    optional = {
        "labels": selector,
        "label_group": label_group,
        "override_quarantine": override_quarantine or None,
        "override_aborted": override_aborted or None,
    }
    body.update((key, value) for key, value in optional.items() if value is not None)
    return body


def _policy(opts: dict[str, Any]) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    if opts["canary"] is not None:
        policy["canary_fraction"] = opts["canary"]
    if opts["canary_count"] is not None:
        policy["canary_count"] = opts["canary_count"]
    if opts["steps"] is not None and opts["exponential"] is not None:
        raise click.UsageError("give at most one of --steps and --exponential")
    if opts["steps"] is not None:
        try:
            policy["steps"] = [float(s) for s in opts["steps"].split(",") if s.strip()]
        except ValueError as exc:
            raise click.BadParameter("comma-separated fractions", param_hint="--steps") from exc
    if opts["exponential"] is not None:
        policy["exponential"] = opts["exponential"]
    for key, opt in (
        ("dwell_seconds", "dwell"),
        ("min_devices", "min_devices"),
        ("min_requests", "min_requests"),
        ("on_breach", "on_breach"),
        ("quarantine_after", "quarantine_after"),
    ):
        if opts[opt] is not None:
            policy[key] = opts[opt]
    if opts["approval"]:
        policy["approval"] = True
    if opts["no_rollback"]:
        policy["rollback_on_abort"] = False
    if opts["no_shadow"] and opts["shadow_fraction"] is not None:
        raise click.UsageError("give at most one of --shadow-fraction and --no-shadow")
    if opts["no_shadow"]:
        policy["shadow_fraction"] = None
    for key in ("shadow_fraction", "shadow_dwell_seconds"):
        if opts[key] is not None:
            policy[key] = opts[key]
    thresholds = {k: opts[k] for k, _ in _THRESHOLDS if opts[k] is not None}
    if thresholds:
        policy["thresholds"] = thresholds
    offline: dict[str, Any] = {k: opts[o] for k, o in _OFFLINE if opts[o] is not None}
    if opts["no_offline_check"]:
        offline["enabled"] = False
    if offline:
        policy["offline"] = offline
    if opts["budget_max"] is not None and opts["budget_percent"] is not None:
        raise click.UsageError("give at most one of --budget-max and --budget-percent")
    if (opts["budget_label"] is None) != (
        opts["budget_max"] is None and opts["budget_percent"] is None
    ):
        raise click.UsageError("--budget-label goes with --budget-max or --budget-percent")
    if opts["budget_label"] is not None:
        policy["disruption_budget"] = {
            "label": opts["budget_label"],
            **({"max_devices": opts["budget_max"]} if opts["budget_max"] is not None else {}),
            **(
                {"max_fraction": opts["budget_percent"] / 100}
                if opts["budget_percent"] is not None
                else {}
            ),
        }
    return policy


def register_rollout_commands(cli: click.Group) -> None:
    """Add the ``rollouts`` group to the ``fleet-server`` group."""

    @cli.group()
    def rollouts() -> None:
        """Quality-gated rollouts in waves (canary, growth, gates, approval)."""

    @rollouts.command("create")
    @admin_options
    @json_option
    @click.argument("model")
    @click.argument("version", type=click.IntRange(1))
    @click.option("--group", help="Target every active device of this group.")
    @click.option("--tag", "tags", multiple=True, help="Target devices with KEY=VALUE (repeat).")
    @click.option("--selector", help="Target devices whose labels match, e.g. 'site in (a,b)'.")
    @click.option("--label-group", help="Target a label group (its selector is copied).")
    @click.option("--budget-label", help="Disruption budget per value of this label, e.g. site.")
    @click.option("--budget-max", type=click.IntRange(1), help="Budget: devices at once.")
    @click.option(
        "--budget-percent", type=click.FloatRange(0, 100, min_open=True), help="Budget: percent."
    )
    @click.option("--from-version", type=click.IntRange(1), help="Default: most devices' active.")
    @click.option("--canary", type=click.FloatRange(0, 1, min_open=True), help="Canary fraction.")
    @click.option("--canary-count", type=click.IntRange(1), help="Canary size in devices.")
    @click.option("--steps", help="Growth fractions, e.g. 0.25,0.5,1.")
    @click.option("--exponential", type=click.FloatRange(1, min_open=True), help="Growth factor.")
    @click.option("--dwell", type=click.FloatRange(0), help="Minimum seconds per wave.")
    @click.option("--min-devices", type=click.IntRange(1), help="Reporting devices per gate.")
    @click.option("--min-requests", type=click.IntRange(1), help="Requests per side per gate.")
    @click.option("--approval", is_flag=True, help="Wait for `rollouts approve` between waves.")
    @click.option("--on-breach", type=click.Choice(["pause", "abort"]))
    @click.option("--no-rollback", is_flag=True, help="On abort, leave devices where they are.")
    @click.option("--quarantine-after", type=click.IntRange(1), help="Aborts before quarantine.")
    @click.option(
        "--override-quarantine",
        metavar="REASON",
        default="",
        help="Roll out a quarantined version anyway; the reason is recorded in its history.",
    )
    @click.option(
        "--override-aborted",
        metavar="REASON",
        default="",
        help="Roll out a version a rollout aborted before; the reason is recorded.",
    )
    @click.option(
        "--override-offline",
        metavar="REASON",
        default="",
        help="Roll out a candidate that regressed on the model's evaluation set (or whose "
        "offline comparison cannot run) anyway; the reason is recorded.",
    )
    @click.option(
        "--offline-max-accuracy-drop",
        type=click.FloatRange(0, 1),
        help="Offline check: accuracy drop on the evaluation set that refuses (default 0.01).",
    )
    @click.option(
        "--offline-max-recall-drop",
        type=click.FloatRange(0, 1),
        help="Offline check: one class's recall drop that refuses (default 0.05).",
    )
    @click.option(
        "--offline-min-samples",
        type=click.IntRange(1),
        help="Offline check: smaller evaluation sets are compared, not judged (default 50).",
    )
    @click.option(
        "--no-offline-check",
        is_flag=True,
        help="Skip the comparison on the model's evaluation set (recorded as off).",
    )
    @click.option("--max-install-failure-rate", type=click.FloatRange(0, 1))
    @click.option("--max-rollback-rate", type=click.FloatRange(0, 1))
    @click.option("--max-reject-increase", "max_reject_rate_increase", type=click.FloatRange(0, 1))
    @click.option("--max-fallback-increase", "max_fallback_rate_increase", type=float)
    @click.option("--max-drift-share", "max_drift_alert_share", type=click.FloatRange(0, 1))
    @click.option("--min-shadow-agreement", type=click.FloatRange(0, 1))
    @click.option("--max-p99-ratio", "max_p99_latency_ratio", type=click.FloatRange(1))
    @click.option(
        "--min-p99-delta-ms",
        "min_p99_latency_delta_ms",
        type=click.FloatRange(0),
        help="The p99 gate also needs the canary this many ms slower than control (default 2).",
    )
    @click.option("--max-error-increase", "max_error_rate_increase", type=click.FloatRange(0, 1))
    @click.option(
        "--max-output-shift",
        "max_output_shift",
        type=click.FloatRange(0, 1),
        help="The output_distribution gate: largest shift of an output mean, in pooled sd (0.1).",
    )
    @click.option(
        "--max-accuracy-drop",
        "max_ground_truth_drop",
        type=click.FloatRange(0, 1),
        help="The ground_truth gate: largest drop of labelled accuracy vs control (0.02).",
    )
    @click.option(
        "--min-labels",
        "min_ground_truth_labels",
        type=click.IntRange(1),
        help="The ground_truth gate judges with this many labelled answers per side (200).",
    )
    @click.option(
        "--shadow-fraction",
        type=click.FloatRange(0, 1, min_open=True),
        help="Shadow phase: share of the canaries' requests replayed on the candidate (0.25).",
    )
    @click.option(
        "--shadow-dwell",
        "shadow_dwell_seconds",
        type=click.FloatRange(0),
        help="Shadow phase: minimum seconds before its gates are judged (120).",
    )
    @click.option("--no-shadow", is_flag=True, help="No shadow phase: the canary serves at once.")
    @click.option(
        "--max-shadow-excess",
        "max_shadow_disagreement_excess",
        type=click.FloatRange(0, 1),
        help="shadow_disagreement: allowed excess over the offline comparison's (0.02).",
    )
    @click.option(
        "--max-shadow-disagreement",
        "max_shadow_disagreement",
        type=click.FloatRange(0, 1),
        help="shadow_disagreement without an offline comparison: the maximum (0.05).",
    )
    @click.option(
        "--min-shadow-rows",
        "min_shadow_rows",
        type=click.IntRange(1),
        help="shadow_disagreement judges after this many rows compared (300).",
    )
    def create(
        url: str,
        token: str,
        as_json: bool,
        model: str,
        version: int,
        group: str | None,
        tags: tuple[str, ...],
        selector: str | None,
        label_group: str | None,
        from_version: int | None,
        override_quarantine: str,
        override_aborted: str,
        override_offline: str,
        **opts: Any,
    ) -> None:
        """Roll MODEL VERSION out to a group or to tagged devices, in gated waves.

        A quarantined version, or one a rollout aborted before, is refused unless overridden
        with a reason (recorded in the version's history: `models show MODEL VERSION`). When
        the model has an evaluation set (`evalsets add`), the server first runs VERSION and the
        version it replaces on it and refuses a regression unless --override-offline REASON.
        """
        body: dict[str, Any] = {
            "model": model,
            "version": version,
            "from_version": from_version,
            "policy": _policy(opts),
            **target_body(
                group, tags, selector, label_group, override_quarantine, override_aborted
            ),
        }
        if override_offline:
            body["override_offline"] = override_offline
        with AdminClient(url, token) as client:
            try:
                r = client.create_rollout(body)
            except AdminRequestError as exc:
                # A regression on the evaluation set exits like a failed gate (5), not 3.
                if exc.server_code == OfflineRegressionError.code:
                    raise OfflineRegressionError(str(exc)) from exc
                raise
        if as_json:
            emit_json(r)
        else:
            click.echo(rollout_title(r))
            for line in render_offline(r):
                click.echo(line)
            for o in r.get("overrides") or ():
                click.echo(f"override of {o['kind']} recorded: {shown(o['reason'], 512)}")

    @rollouts.command("status")
    @admin_options
    @json_option
    @click.argument("rollout_id", required=False)
    @click.option("--active", is_flag=True, help="Only rollouts not completed or aborted.")
    def status(url: str, token: str, as_json: bool, rollout_id: str | None, active: bool) -> None:
        """List rollouts, or show one (ROLLOUT_ID) with its devices, gates and events."""
        with AdminClient(url, token) as client:
            data: Any = client.rollout(rollout_id) if rollout_id else client.rollouts(active=active)
        if as_json:
            emit_json(data)
            return
        if rollout_id:
            for line in render_rollout(data):
                click.echo(line)
            for e in (data.get("events") or [])[-10:]:
                reasons = "; ".join(e["detail"].get("reasons") or []) or e["detail"].get("state")
                click.echo(f"  {e['at']}  {e['kind']}  {reasons}")
            return
        rows = [
            (r["id"], _versions(r), _selector(r), r["state"], r["wave"] + 1, len(r["members"]))
            for r in data
        ]
        for line in table_lines(rows, ("ID", "ROLLOUT", "TARGET", "STATE", "WAVE", "MEMBERS")):
            click.echo(line)

    @rollouts.command("watch")
    @admin_options
    @click.argument("rollout_id")
    @click.option("--interval", type=click.FloatRange(0.1), default=3.0, show_default=True)
    @click.option("--iterations", type=click.IntRange(0), default=0, help="0: until it ends.")
    def watch(url: str, token: str, rollout_id: str, interval: float, iterations: int) -> None:
        """Live progress view of ROLLOUT_ID, redrawn every --interval seconds."""
        n = 0
        with AdminClient(url, token) as client:
            try:
                while True:
                    r = client.rollout(rollout_id)
                    click.clear()
                    click.echo("\n".join(render_rollout(r)))
                    n += 1
                    if r["state"] in _FINAL or (iterations and n >= iterations):
                        return
                    time.sleep(interval)
            except KeyboardInterrupt:
                return

    def command(name: str, doc: str) -> None:
        @rollouts.command(name, help=doc)
        @admin_options
        @json_option
        @click.argument("rollout_id")
        def run(url: str, token: str, as_json: bool, rollout_id: str) -> None:
            with AdminClient(url, token) as client:
                r = client.rollout_command(rollout_id, name)
            if as_json:
                emit_json(r)
            else:
                click.echo(f"rollout {r['id']}: {r['state']} (wave {r['wave'] + 1})")

    command("approve", "Approve the next wave of ROLLOUT_ID.")
    command("pause", "Pause ROLLOUT_ID; devices stay where they are.")
    command("resume", "Resume a paused ROLLOUT_ID (the wave dwells again).")
    command("abort", "Abort ROLLOUT_ID; devices go back per its policy.")

"""Where one inference request goes: the device (live or A/B candidate arm), the cloud, or nowhere.

Owns every routing decision the agent makes for a request, as pure functions of plain facts:
the A/B arm, the fallback mode's rule (``Router.before``), whether to ask the cloud before
running locally (the mode, a model that is not loaded), after a local failure (invalid input,
a failing model), after a local answer (out of distribution, a hard example; whether the mode
looks for one at all), what happens when that cloud call fails (answer on the device,
re-raise the local error, or fail), and whether the answer is offered to the shadow candidate.
No clock, no I/O, no state: ``Router`` is a value. Also which kept versions of a model serve by
number under the ``[serving] version_policy`` (``served_versions``), and that a model an operator
unloaded (the model repository extension) is refused whatever the fallback mode.

Does not own: drawing the A/B arm (``edge_agent.serving.shadow.ABRouter``, sticky per routing
key, counted), scoring a local answer's confidence (``FallbackPolicy.after`` gives the hard-example
``Decision`` this module consumes), the cloud call and its guards (``CloudFallback``), or running
the model (``ModelPipeline``). ``edge_agent.serving.agent.Agent.infer`` follows the routes.

Modes (``FallbackConfig.mode``): ``device_only`` never asks the cloud; ``prefer_device`` asks it
when the local model is missing or failing, the input fails validation or is out of distribution,
or the answer is a hard example; ``prefer_cloud`` asks first and answers on the device when the
cloud cannot; ``cloud_only`` asks it for everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

from edge_agent.config import VersionPolicy
from edge_agent.serving.fallback import DEVICE, Decision
from edge_agent.serving.shadow import Arm

__all__ = [
    "ANSWER_LOCALLY",
    "CLOUD",
    "FAIL",
    "LIVE_LOCAL",
    "LOCAL",
    "LOCAL_ERROR",
    "NOT_SERVING",
    "RAISE_LOCAL_ERROR",
    "REFUSE",
    "SERVABLE_STATUSES",
    "UNLOADED",
    "CloudFailure",
    "Facts",
    "Route",
    "Router",
    "Target",
    "served_versions",
]

Target = Literal["local", "cloud", "refuse"]
LOCAL: Target = "local"
CLOUD: Target = "cloud"
REFUSE: Target = "refuse"

#: What a failed cloud call turns into (``Route.if_cloud_fails``).
CloudFailure = Literal["fail", "raise_local_error", "answer_locally"]
FAIL: CloudFailure = "fail"  # the FallbackError reaches the caller
RAISE_LOCAL_ERROR: CloudFailure = "raise_local_error"  # the local error that sent it there does
ANSWER_LOCALLY: CloudFailure = "answer_locally"  # the device answers, flagged ``fallback_failed``

#: Reasons of ``REFUSE`` routes (the agent raises the matching error).
NOT_SERVING = "not_serving"  # no local model and no cloud for it: ModelNotFound/ModelStore error
LOCAL_ERROR = "local_error"  # the local run failed and the mode keeps it on the device
UNLOADED = "unloaded"  # an operator unloaded the model: ModelStoreError, never the cloud

#: Kept versions that may serve by number: not ``failed`` here, not a ``staged`` rollout shadow
#: (which never answers a client).
SERVABLE_STATUSES = frozenset({"good", "probation", "rolled_back"})


def served_versions(
    policy: VersionPolicy, active: int | None, kept: Iterable[tuple[int, str]]
) -> frozenset[int]:
    """The versions of one model that serve by number under ``policy``.

    Args:
        policy: ``[serving] version_policy``.
        active: the store's active version (None: nothing active); always served.
        kept: (version, store status) of every kept version; only ``SERVABLE_STATUSES`` count.

    Returns:
        ``latest N``: the active version and the N-1 newest other servable versions;
        ``specific``: the listed versions that are kept and servable (and the active one);
        ``all``: every servable version (and the active one).
    """
    servable = sorted(v for v, status in kept if status in SERVABLE_STATUSES and v != active)
    if policy.kind == "specific":
        chosen = [v for v in servable if v in policy.versions]
    elif policy.kind == "all":
        chosen = servable
    else:
        chosen = servable[len(servable) - (policy.count - 1) :] if policy.count > 1 else []
    return frozenset(chosen) | (frozenset() if active is None else frozenset({active}))


@dataclass(frozen=True)
class Facts:
    """What the agent knows about a request before it runs anything.

    ``live``: a version of the model is loaded to answer it (the active one, or the version the
    request names). ``pinned``: the request names a version (no A/B draw). ``candidate``: the
    model's A/B candidate is loaded. ``set_up``: the model has served in this process, so its
    fallback policy exists (a model never loaded goes to the cloud as ``local_unavailable``
    whatever the mode, except ``device_only``). ``unloaded``: an operator unloaded the model
    (the repository extension's unload) and it has not been loaded again.
    """

    live: bool
    pinned: bool = False
    candidate: bool = False
    set_up: bool = True
    unloaded: bool = False


@dataclass(frozen=True)
class Route:
    """One routing decision: where the request goes next, on which A/B arm, and why.

    ``reason`` is the cloud fallback reason for a ``CLOUD`` route (a stable metric label, the
    response's ``fallback_reason``) or why a ``REFUSE`` route refuses. ``if_cloud_fails`` says
    what a failed cloud call turns into. ``with_device_answer``: the cloud call carries the
    device's own answer (a hard example, for counting disagreement). ``out_of_distribution``:
    the answer is flagged as such when the cloud could not take it.
    """

    target: Target
    arm: Arm = "live"
    reason: str | None = None
    if_cloud_fails: CloudFailure = FAIL
    with_device_answer: bool = False
    out_of_distribution: bool = False


#: The route of a request for the live version, answered on the device (``Router.first`` of
#: live, unpinned facts without an A/B candidate when no cloud is reachable).
LIVE_LOCAL = Route(LOCAL)


class Router:
    """Every fallback and A/B decision for one agent; pure (see the module docstring).

    ``mode`` is ``FallbackConfig.mode``; ``cloud`` says whether a cloud fallback is wired.
    """

    def __init__(self, mode: str, *, cloud: bool) -> None:
        self.mode = mode
        self.cloud = cloud

    @property
    def local_only(self) -> bool:
        """Whether no route ever goes to the cloud (none wired, or ``device_only``): then
        ``first`` of a live, unpinned request without an A/B candidate is ``LIVE_LOCAL``, a
        local error is re-raised and a local answer kept."""
        return not self.cloud or self.mode == "device_only"

    @property
    def may_fall_back(self) -> bool:
        """Whether a local failure or a doubtful local answer may go to the cloud."""
        return self.cloud and self.mode == "prefer_device"

    def before(
        self, *, local_ok: bool, validation_failed: bool = False, out_of_distribution: bool = False
    ) -> Decision:
        """The fallback mode's rule, whether or not a cloud is wired (``first`` asks it only
        when one is).

        ``cloud_only`` and ``prefer_cloud`` always ask the cloud (the route answers locally
        when a ``prefer_cloud`` call fails); ``device_only`` never does; ``prefer_device`` asks
        it when the local model is missing or failing, the input failed validation, or the
        input is out of distribution, in that order of precedence.
        """
        if self.mode in ("cloud_only", "prefer_cloud"):
            return Decision(cloud=True, reason=self.mode)
        if self.mode == "device_only":
            return DEVICE
        checks = ((not local_ok, "local_unavailable"), (validation_failed, "invalid_input"))
        for hit, why in (*checks, (out_of_distribution, "out_of_distribution")):
            if hit:
                return Decision(cloud=True, reason=why)
        return DEVICE

    def first(self, facts: Facts, draw: Callable[[], Arm] | None = None) -> Route:
        """The route before anything runs.

        ``draw`` draws the A/B arm (``ABRouter.arm`` for the request's routing key; None: the
        model has no A/B split). It is called only when an A/B split applies: the live version
        is loaded and the request names no version. A ``candidate`` draw serves on the
        candidate only when it is loaded (a request never waits for a load). An unloaded
        model is refused (``UNLOADED``) before anything else: not the cloud either, since the
        operator stopped serving it.
        """
        if facts.unloaded:
            return Route(REFUSE, "live", UNLOADED)
        drawn = draw() if facts.live and not facts.pinned and draw is not None else "live"
        arm: Arm = "candidate" if drawn == "candidate" and facts.candidate else "live"
        if facts.set_up and self.cloud:
            decision = self.before(local_ok=facts.live)
            if decision.cloud:
                # prefer_cloud answers on the device when the cloud cannot; cloud_only does not.
                keep = facts.live and self.mode != "cloud_only"
                return Route(CLOUD, arm, decision.reason, ANSWER_LOCALLY if keep else FAIL)
        if not facts.live:
            if self.cloud and self.mode != "device_only":
                return Route(CLOUD, arm, "local_unavailable")
            return Route(REFUSE, arm, NOT_SERVING)
        return Route(LOCAL, arm)

    def after_local_error(self, route: Route, *, invalid_input: bool) -> Route:
        """The route after the local run raised: input refused by validation, or a failure.

        ``prefer_device`` with a cloud asks the cloud; a failed call re-raises the validation
        error (the client learns why its input was refused) or fails with the cloud's error.
        Otherwise the local error is re-raised (``REFUSE``).
        """
        if not self.may_fall_back:
            return replace(route, target=REFUSE, reason=LOCAL_ERROR)
        if invalid_input:
            return Route(CLOUD, route.arm, "invalid_input", RAISE_LOCAL_ERROR)
        return Route(CLOUD, route.arm, "local_unavailable", FAIL)

    def after_local_answer(
        self,
        route: Route,
        *,
        cloud_failed: bool,
        out_of_distribution: Callable[[], bool],
        hard: Callable[[], Decision],
        set_up: bool,
    ) -> Route:
        """The route after the device answered: keep the answer (``LOCAL``) or ask the cloud.

        ``cloud_failed``: the cloud was asked first and failed (``prefer_cloud``): the device's
        answer stands. ``out_of_distribution`` and ``hard`` (``FallbackPolicy.after`` of the
        answer) are called only when their check applies (``prefer_device`` with a cloud), in
        this order; a failed cloud call after either leaves the device's answer, flagged.
        ``set_up``: as in ``Facts`` (a model without a fallback policy keeps its answer).
        """
        if not set_up:
            return route
        if self.may_fall_back and out_of_distribution():
            why = "out_of_distribution"
            return Route(CLOUD, route.arm, why, ANSWER_LOCALLY, out_of_distribution=True)
        if self.may_fall_back and not cloud_failed:
            decision = hard()
            if decision.cloud:
                reason = decision.reason or "hard_example"
                return Route(CLOUD, route.arm, reason, ANSWER_LOCALLY, with_device_answer=True)
        return route

    @staticmethod
    def offers_shadow(route: Route, *, answered_by_active: bool) -> bool:
        """Whether a device answer is replayed on the shadow candidate: only answers of the
        model's active version on the live arm (not the A/B candidate's, not a version the
        request named), also when the cloud was asked first and failed."""
        return route.arm == "live" and answered_by_active

"""Evaluation sets and the offline comparison before a rollout, on SQLite and PostgreSQL.

The registry side: registrations with provenance, idempotent by (model, digest), newest first,
the same file for two models, lookups by digest, a tampered stored file refused on load. The
rollout side, through ``RolloutRunner.create`` with the real ``OfflineComparer`` over real
signed digits bundles in a bundle library: a confidently wrong candidate (most 3s trained as 8s)
is refused with ``OfflineRegressionError`` naming class 3 and what it became; the same candidate
with ``override_offline`` is created and records the reason (in ``Rollout.offline``, its
overrides and the ``created`` event); a good candidate passes with its comparison kept; with no
set the rollout says ``no_eval_set``; a set that does not fit the model is refused as
``OfflineCheckError``; the policy's offline limits decide and can turn the check off. Then the
admin routes and the CLI in-process (the process-level run is ``test_rollout_offline_cli``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from bundles import DigitsBundles
from clock import FakeClock
from evalset_support import eval_set_bytes, wrong_candidate
from fleet_server.admin import client as admin_client
from fleet_server.admin.evalsets import evalset_routes
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import (
    ERRORS,
    EvalSetError,
    OfflineCheckError,
    OfflineRegressionError,
    UnknownEvalSetError,
)
from fleet_server.evalsets.offline import OfflineComparer
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import rollouts as store
from fleet_server.registry.store import Registry
from fleet_server.rollouts.policy import OfflineLimits, RolloutPolicy, Selector
from fleet_server.rollouts.state import OfflineCheck

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SEL = Selector(group="line")


class NoAssign:
    def assign(
        self, target: str, name: str, version: int, *, group: bool = False
    ) -> Sequence[object]:
        raise AssertionError("nothing is assigned in these tests")


@dataclass
class World:
    registry: Registry
    evalsets: EvalSetStore
    runner: RolloutRunner
    clock: FakeClock
    bundles: DigitsBundles


@pytest.fixture(scope="module")
def wrong_bundle(digits_bundles: DigitsBundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wrong_candidate(digits_bundles, 6, tmp_path_factory.mktemp("wrong"))


@pytest.fixture
def world(
    registry_url: str, tmp_path: Path, digits_bundles: DigitsBundles, wrong_bundle: Path
) -> Iterator[World]:
    clock = FakeClock(wall=T0)
    registry = Registry.open(registry_url, clock=clock.wall)
    registry.upgrade()
    # The bundles are signed "now" (wall clock): verify them at the wall clock.
    root = digits_bundles.keys.trusted_root()
    library = BundleLibrary(tmp_path / "bundles", root)
    for path in (digits_bundles.path(1), digits_bundles.path(2), wrong_bundle):
        e = library.add(path)
        registry.publish_bundle(
            e.name,
            e.version,
            channel=e.channel,
            sha256=e.sha256,
            length=e.length,
            targets_sha256=e.targets_sha256,
            manifest=e.manifest,
        )
    evalsets = EvalSetStore(tmp_path / "evalsets", registry, clock=clock.wall)
    offline = OfflineComparer(
        evalsets, library.directory, lambda: root, clock=lambda: datetime.now(UTC)
    )
    runner = RolloutRunner(registry, NoAssign(), clock.wall, offline=offline)
    yield World(registry, evalsets, runner, clock, digits_bundles)
    registry.close()


def _digits_set(w: World, **kw: str) -> str:
    record, new = w.evalsets.add(
        "digits",
        eval_set_bytes(w.bundles.x_eval, w.bundles.y_eval),
        source=kw.get("source", "sklearn digits, held-out split"),
        note=kw.get("note", ""),
    )
    assert new
    return record.sha256


# --------------------------------------------------------------------------- registry
def test_eval_set_registrations(world: World) -> None:
    w = world
    x, y = w.bundles.x_eval, w.bundles.y_eval
    first, new = w.evalsets.add("digits", eval_set_bytes(x, y), source="QA batch 1", note="n")
    assert new
    assert first.samples == len(y)
    assert first.classes == 10
    assert first.sample_shape == (64,)
    assert first.registered_at == T0
    assert w.evalsets.path_of(first.sha256).is_file()
    # The same data saved another way is the same set: the first provenance is kept.
    w.clock.set_wall(T0 + timedelta(minutes=1))
    again, new = w.evalsets.add(
        "digits", eval_set_bytes(x, y, compressed=False), source="someone else"
    )
    assert not new
    assert again == first
    # Another set is newer; the same file for another model is its own registration.
    w.clock.set_wall(T0 + timedelta(minutes=2))
    second, _ = w.evalsets.add("digits", eval_set_bytes(x[:100], y[:100]), source="QA batch 2")
    other, new = w.evalsets.add("digits-small", eval_set_bytes(x, y), source="shared")
    assert new
    assert other.sha256 == first.sha256
    assert [r.sha256 for r in w.evalsets.listing("digits")] == [second.sha256, first.sha256]
    assert {r.model for r in w.evalsets.listing()} == {"digits", "digits-small"}
    assert w.evalsets.latest("digits") == second
    assert w.evalsets.latest("nothing") is None
    assert {r.model for r in w.evalsets.show(first.sha256)} == {"digits", "digits-small"}
    with pytest.raises(UnknownEvalSetError):
        w.evalsets.show("0" * 64)
    loaded = w.evalsets.load(first.sha256)
    np.testing.assert_array_equal(loaded.y, y)
    # A stored file that no longer matches its digest is not used.
    path = w.evalsets.path_of(second.sha256)
    path.write_bytes(path.read_bytes()[:-1] + b"\1")
    with pytest.raises(EvalSetError, match="digest"):
        w.evalsets.load(second.sha256)


# --------------------------------------------------------------------------- the check
def test_no_eval_set_proceeds_and_says_so(world: World) -> None:
    r = world.runner.create("digits", 6, selector=SEL, policy=RolloutPolicy(), from_version=1)
    assert r.offline == OfflineCheck(verdict="no_eval_set")
    stored = world.runner.get(r.id)
    assert stored.offline == r.offline
    [event] = store.rollout_events(world.registry, r.id)
    assert event.detail["offline"]["verdict"] == "no_eval_set"


def test_a_confidently_wrong_candidate_is_refused(world: World) -> None:
    sha = _digits_set(world)
    with pytest.raises(OfflineRegressionError) as err:
        world.runner.create("digits", 6, selector=SEL, policy=RolloutPolicy(), from_version=1)
    message = str(err.value)
    assert "class 3 recall" in message
    assert "as class 8" in message
    assert sha[:12] in message
    assert "--override-offline" in message
    assert any("accuracy" in r for r in err.value.reasons)
    assert ERRORS.admin_status(err.value) == 409
    assert ERRORS.exit_code(err.value) == 5
    assert world.runner.rollouts() == []  # nothing was created


def test_the_override_records_its_reason(world: World) -> None:
    sha = _digits_set(world)
    r = world.runner.create(
        "digits",
        6,
        selector=SEL,
        policy=RolloutPolicy(),
        from_version=1,
        override_offline="  class 3 is retired on line 4  ",
    )
    o = r.offline
    assert o is not None
    assert o.verdict == "overridden"
    assert o.eval_set == sha
    assert o.override == "class 3 is retired on line 4"
    assert any("class 3 recall" in reason for reason in o.reasons)
    assert o.disagreement is not None
    assert o.disagreement > 0.05
    assert [(x.kind, x.reason) for x in r.overrides] == [
        ("offline", "class 3 is retired on line 4")
    ]
    stored = world.runner.get(r.id)
    assert stored.offline == o
    [event] = store.rollout_events(world.registry, r.id)
    assert event.detail["overrides"] == [
        {"kind": "offline", "reason": "class 3 is retired on line 4"}
    ]
    assert event.detail["offline"]["verdict"] == "overridden"


def test_a_good_candidate_passes_with_its_comparison(world: World) -> None:
    sha = _digits_set(world)
    r = world.runner.create("digits", 2, selector=SEL, policy=RolloutPolicy(), from_version=1)
    o = r.offline
    assert o is not None
    assert (o.verdict, o.eval_set, o.reasons) == ("passed", sha, ())
    assert o.n == len(world.bundles.y_eval)
    assert o.disagreement == 0.0
    assert o.comparison is not None
    assert o.comparison["champion_only"] == 0
    assert r.overrides == ()


def test_the_policy_limits_decide(world: World) -> None:
    _digits_set(world)
    lax = RolloutPolicy(offline=OfflineLimits(max_accuracy_drop=0.5, max_recall_drop=1.0))
    r = world.runner.create("digits", 6, selector=SEL, policy=lax, from_version=1)
    assert r.offline is not None
    assert r.offline.verdict == "passed"
    off = RolloutPolicy(offline=OfflineLimits(enabled=False))
    r = world.runner.create("digits", 6, selector=SEL, policy=off, from_version=1)
    assert r.offline == OfflineCheck(verdict="disabled")
    # Too small a set to judge: compared and recorded, not refused.
    small = RolloutPolicy(offline=OfflineLimits(min_samples=10_000))
    r = world.runner.create("digits", 6, selector=SEL, policy=small, from_version=1)
    assert r.offline is not None
    assert r.offline.verdict == "passed"
    assert any("fewer than 10000" in n for n in r.offline.notes)


def test_a_set_that_does_not_fit_the_model_needs_an_override(world: World) -> None:
    x = np.zeros((60, 8, 8), dtype=np.float32)  # 8x8 images: the model takes 64 values
    world.evalsets.add("digits", eval_set_bytes(x, np.arange(60) % 10), source="wrong layout")
    with pytest.raises(OfflineCheckError, match="cannot run"):
        world.runner.create("digits", 2, selector=SEL, policy=RolloutPolicy(), from_version=1)
    r = world.runner.create(
        "digits", 2, selector=SEL, policy=RolloutPolicy(), from_version=1, override_offline="ok"
    )
    assert r.offline is not None
    assert r.offline.verdict == "overridden"
    assert r.offline.reasons[0].startswith("comparison failed")


def test_a_first_rollout_has_nothing_to_compare_with(world: World) -> None:
    _digits_set(world)
    r = world.runner.create("digits", 2, selector=SEL, policy=RolloutPolicy(), from_version=None)
    assert r.offline == OfflineCheck(verdict="no_champion")


# --------------------------------------------------------------------------- API and CLI
def _guarded(handler):  # type: ignore[no-untyped-def]
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # the admin app's mapping, in short
            code = getattr(exc, "code", "internal")
            status = getattr(exc, "status", None) or ERRORS.admin_status(exc)
            return JSONResponse({"error": str(exc), "code": code}, status_code=status)

    return run


@pytest.fixture
def api(world: World) -> Iterator[TestClient]:
    routes = rollout_routes(world.runner, _guarded) + evalset_routes(world.evalsets, _guarded)
    with TestClient(Starlette(routes=routes)) as client:
        yield client


def test_admin_routes(world: World, api: TestClient) -> None:
    data = eval_set_bytes(world.bundles.x_eval, world.bundles.y_eval)
    q = {"model": "digits", "source": "held-out split", "note": "v1"}
    added = api.post("/v1/evalsets", params=q, content=data)
    assert added.status_code == 201
    assert added.json()["new"] is True
    sha = added.json()["sha256"]
    assert api.post("/v1/evalsets", params=q, content=data).status_code == 200
    bad = api.post("/v1/evalsets", params=q, content=b"junk")
    assert (bad.status_code, bad.json()["code"]) == (422, "evalset_rejected")
    no_source = api.post("/v1/evalsets", params={"model": "digits"}, content=data)
    assert no_source.status_code == 400
    hostile = api.post("/v1/evalsets", params={**q, "source": "a\x1bb"}, content=data)
    assert hostile.status_code in (400, 422)
    assert [r["sha256"] for r in api.get("/v1/evalsets").json()["evalsets"]] == [sha]
    assert api.get("/v1/evalsets", params={"model": "x"}).json()["evalsets"] == []
    shown = api.get(f"/v1/evalsets/{sha}").json()
    assert shown["registrations"][0]["source"] == "held-out split"
    assert api.get("/v1/evalsets/" + "0" * 64).status_code == 404
    assert api.get("/v1/evalsets/not-a-digest").status_code == 400

    body = {"model": "digits", "version": 6, "from_version": 1, "group": "line"}
    refused = api.post("/v1/rollouts", json=body)
    assert (refused.status_code, refused.json()["code"]) == (409, "offline_regression")
    created = api.post("/v1/rollouts", json={**body, "override_offline": "known"})
    assert created.status_code == 201
    assert created.json()["offline"]["verdict"] == "overridden"
    assert created.json()["offline"]["override"] == "known"


@pytest.fixture
def cli(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    transport = api._transport

    def client(url: str, token: str) -> admin_client.AdminClient:
        return admin_client.AdminClient("http://testserver", token, transport=transport)

    monkeypatch.setattr("fleet_server.cli.evalsets.AdminClient", client)
    monkeypatch.setattr("fleet_server.cli.rollouts.AdminClient", client)
    from fleet_server.cli.main import cli as main

    return main


def test_cli(world: World, cli: click.Group, tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    path.write_bytes(eval_set_bytes(world.bundles.x_eval, world.bundles.y_eval))
    runner = CliRunner()
    common = ("--url", "http://testserver", "--token", "t" * 16)

    def run(*args: str, code: int = 0) -> str:
        res = runner.invoke(cli, [*args[:2], *common, *args[2:]])
        if code == 0:
            assert res.exit_code == 0, res.output + repr(res.exception)
            return res.output
        # In-process the error reaches us; the error boundary maps it by the one table.
        assert ERRORS.exit_code(res.exception) == code, repr(res.exception)
        return f"{getattr(res.exception, 'server_code', res.exception.code)}: {res.exception}"

    out = run(
        "evalsets", "add", "--model", "digits", str(path), "--source", "QA \u202e batch", code=3
    )
    assert out.startswith("evalset_rejected: 422")
    assert "printable" in out
    out = run("evalsets", "add", "--model", "digits", str(path), "--source", "QA batch 7")
    assert "registered for digits" in out
    assert f"{len(world.bundles.y_eval)} samples" in out
    listing = run("evalsets", "list", "--model", "digits")
    assert listing.splitlines()[0].split()[:2] == ["SHA256", "MODEL"]
    sha = json.loads(run("evalsets", "list", "--json"))[0]["sha256"]
    assert "source      QA batch 7" in run("evalsets", "show", sha)
    refused = run(
        "rollouts", "create", "digits", "6", "--group", "line", "--from-version", "1", code=5
    )
    assert "offline_regression" in refused
    assert "class 3 recall" in refused
    out = run(
        "rollouts", "create", "digits", "6", "--group", "line", "--from-version", "1",
        "--override-offline", "accepted by QA",
    )  # fmt: skip
    assert "offline REGRESSED, overridden" in out
    assert "override: accepted by QA" in out
    rid = out.split()[1]
    status = run("rollouts", "status", rid)
    assert "offline REGRESSED, overridden on evaluation set" in status
    assert "class 3 recall" in status

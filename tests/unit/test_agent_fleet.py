"""The agent release through the fleet: the desired state's ``agent`` entry, the reported
state's ``agent`` part, and the service publishing and assigning releases."""

from __future__ import annotations

import json
from datetime import timedelta
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from test_agent_release import fake_wheel

from edge_agent.config import SyncConfig
from edge_agent.errors import ContractError, MetadataFormatError
from edge_agent.selfupdate.releases import BASE, Layout, UpdateState
from edge_agent.sync.ops.agent_deploy import DOWNLOAD_DIR, AgentDeployer
from edge_agent.trust.agent_release import AgentAssignment
from edge_agent.trust.desired import DesiredState, verify_desired_state
from edge_agent.wire.reported import AgentReport, ReportedState, TransferReport
from fakes import FakeGateway
from fleet_server.delivery.desired import make_desired_state, parse_document, sign_desired_state
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import BundleRejectedError, ModelNotPublishedError
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.agent_package import agent_release_for, package_agent
from model_builder.keystore import KeyStore
from support import NOW, make_bundle

A = AgentAssignment(3, "a" * 64, 1234, "b" * 64)


def test_desired_state_carries_an_agent_assignment_and_stays_byte_identical_without(
    tmp_path: Path,
) -> None:
    keys = KeyStore.init(tmp_path / "ks", now=NOW)
    plain = make_desired_state("cam-1", 1, {}, NOW)
    assert "agent" not in plain.to_dict()  # the older form, byte for byte
    with_agent = make_desired_state("cam-1", 2, {}, NOW, agent=A)
    assert with_agent.to_dict()["agent"] == A.to_dict()
    assert DesiredState.from_dict(with_agent.to_dict()) == with_agent
    wire = sign_desired_state(with_agent, [keys.signer("online-1")])
    got = verify_desired_state(
        keys.trusted_root(), wire, now=NOW, device_id="cam-1", last_version=1
    )
    assert got.agent == A
    assert parse_document(wire).agent == A


@pytest.mark.parametrize(
    "edit",
    [
        lambda a: a.update(release=0),
        lambda a: a.update(release=True),
        lambda a: a.update(bundle_sha256="A" * 64),
        lambda a: a.update(bundle_length=0),
        lambda a: a.update(extra=1),
        lambda a: a.pop("targets_sha256"),
    ],
)
def test_hostile_agent_assignment_is_refused(edit: object) -> None:
    doc = make_desired_state("cam-1", 2, {}, NOW, agent=A).to_dict()
    DesiredState.from_dict(json.loads(json.dumps(doc)))
    edit(doc["agent"])  # type: ignore[operator]
    with pytest.raises(MetadataFormatError):
        DesiredState.from_dict(doc)


def test_reported_agent_part_round_trips_and_matches_the_schema() -> None:
    state = ReportedState(
        device_id="cam-1",
        at=1.0,
        capabilities=("shadow", "agent-update"),
        agent=AgentReport(1, 2, "rolled_back", "exited 1", (2,), TransferReport(2, 1, 3, 100)),
    )
    assert ReportedState.from_bytes(state.to_bytes()) == state
    schema = json.loads(
        resources.files("edge_agent").joinpath("schemas/reported.schema.json").read_text()
    )
    jsonschema.validate(state.to_dict(), schema)
    assert "agent" not in ReportedState(device_id="cam-1", at=1.0).to_dict()
    bad = state.to_dict()
    bad["agent"]["outcome"] = "exploded"
    with pytest.raises(ContractError):
        ReportedState.from_dict(bad)
    bad["agent"] = {"outcome": "installed", "failed": list(range(33))}
    with pytest.raises(ContractError):
        ReportedState.from_dict(bad)


@pytest.fixture
def service(tmp_path: Path) -> tuple[FleetService, KeyStore, FakeGateway, Registry]:
    keys = KeyStore.init(tmp_path / "ks", now=NOW)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = FakeGateway()
    svc = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root(), clock=lambda: NOW),
        gateway,
        [keys.signer("online-1")],
        clock=lambda: NOW,
        ttl=timedelta(hours=1),
    )
    return svc, keys, gateway, registry


def test_service_publishes_and_assigns_only_to_capable_devices(
    service: tuple[FleetService, KeyStore, FakeGateway, Registry], tmp_path: Path
) -> None:
    svc, keys, gateway, registry = service
    wheel = fake_wheel(tmp_path)
    package = package_agent(
        wheel, agent_release_for(wheel, release=4, python="3.11"), keys, now=NOW
    )
    record = svc.publish_agent_bytes(package)
    assert (record.release, record.version) == (4, "0.2.0")
    assert svc.publish_agent_bytes(package) == record  # idempotent
    assert [r.release for r in svc.list_agent_releases()] == [4]
    with pytest.raises(BundleRejectedError):  # a model bundle is not an agent package
        svc.publish_agent_bytes(make_bundle(keys))
    with pytest.raises(ModelNotPublishedError):
        svc.assign_agent("cam-1", 5)
    for d in ("cam-1", "cam-2"):
        svc.enroll_device(d, group="line", tags={}, cert_serial=None)
    registry.record_reported(
        "cam-1", ReportedState("cam-1", 1.0, capabilities=("agent-update",)).to_dict()
    )
    results = svc.assign_agent("line", 4, group=True)
    assert [(r.device_id, r.published) for r in results] == [("cam-1", True), ("cam-2", False)]
    assert [d for d, _ in gateway.published] == ["cam-1"]
    sent = parse_document(gateway.published[-1][1])
    assert sent.agent == AgentAssignment(4, record.sha256, record.length, record.targets_sha256)
    # A later model assignment keeps the agent release; the block server may serve its file.
    svc.publish_model_bytes(make_bundle(keys))
    name = svc.list_models()[0].name
    svc.assign("cam-1", name, 1)
    assert parse_document(gateway.published[-1][1]).agent == sent.agent
    assert svc.start_wave(record.sha256)


def _deployer(layout: Layout | None, tmp_path: Path) -> AgentDeployer:
    return AgentDeployer(
        layout,
        tmp_path / "sync",
        SyncConfig(),
        lambda: None,  # type: ignore[arg-type,return-value]  # never staged here
        event=lambda *a: None,
        wake=lambda: None,
    )


def _state(agent: AgentAssignment | None) -> DesiredState:
    return make_desired_state("cam-1", 2, {}, NOW, agent=agent)


def test_agent_deployer_without_a_launcher_refuses_and_reports_nothing(tmp_path: Path) -> None:
    dep = _deployer(None, tmp_path)
    assert not dep.capable
    dep.apply(_state(A))
    assert dep.outcome[0] == "failed"
    assert "launcher" in dep.outcome[1]
    assert dep.report() is None
    assert dep.download is None


def test_agent_deployer_reads_what_became_of_the_assigned_release(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "agent", tmp_path / "base")
    (layout.release_dir("3")).mkdir(parents=True)
    (layout.release_dir("3") / "release.json").write_text("{}")
    dep = _deployer(layout, tmp_path)
    assert dep.capable
    layout.save_state(UpdateState(state="staged", candidate=3))
    dep.apply(_state(A))
    assert dep.outcome == ("trying", "")
    layout.switch("3")
    layout.save_state(UpdateState(state="confirmed", candidate=3))
    dep.apply(_state(A))
    report = dep.report()
    assert report is not None
    assert (report.release, report.assigned, report.outcome) == (3, 3, "installed")
    layout.switch(BASE)
    layout.save_state(UpdateState(state="rolled_back", candidate=3, reason="exit 1", failed=(3,)))
    dep.apply(_state(A))
    assert dep.outcome == ("rolled_back", "exit 1")
    assert dep.download is None  # a release that failed here is never fetched again
    dep.apply(_state(AgentAssignment(4, "c" * 64, 999, "d" * 64)))
    assert dep.outcome == ("downloading", "")
    assert dep.download is not None
    assert dep.keep() == {(DOWNLOAD_DIR, "c" * 64)}
    dep.apply(_state(None))  # unassigned: the download is dropped
    assert dep.download is None
    dep.close()

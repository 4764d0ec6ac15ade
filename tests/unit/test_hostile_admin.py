"""Every admin API route against hostile query values, path values and bodies.

The app is the one ``fleet-server serve`` builds (core routes, fleet drift, rollouts) over a
real SQLite registry and a real bundle library. Whatever the input, the answer is a 4xx with a
typed ``{"error", "code"}`` body, never a 500, and no text names an absolute server path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.admin.body import public_message
from fleet_server.admin.drift import drift_routes
from fleet_server.admin.ops.agents import agent_routes
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.drift.service import DriftService
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore

TOKEN = "a" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ABSOLUTE = re.compile(r"(?:^|[\s\"'(=:])/(?:tmp|home|root|var|work|etc|srv|opt|run)\b")
TWO_70 = str(2**70)

# Query values a client may send where an integer or a name is expected.
HOSTILE_QUERY = [
    TWO_70,
    "-1",
    "-" + TWO_70,
    "abc",
    "1e3",
    "1.5",
    "0x10",
    " 7",
    "1_000",
    "\u0661\u0662",  # Arabic-Indic digits: str.isdigit() and int() accept them
    "\u00b2",  # superscript two: isdigit() but int() refuses
    "9" * 5000,
    "\x00",
    "a\x00b",
    "%ff%fe",  # sent raw: invalid UTF-8 once percent-decoded
    "x" * 5000,
    "1e400",
    "inf",
    "nan",
]

DEEP = b"[" * 30_000 + b"]" * 30_000
HOSTILE_BODIES = [
    DEEP,
    b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
    b"9" * 5000,
    b'{"version": ' + b"9" * 5000 + b"}",
    b"1e400",
    b'{"version": 1e400}',
    b'{"version": NaN}',
    b"\xff\xfe\xfd",
    b'{"id": "\xff"}',
    b"",
    b"null",
    b"[]",
    b'"text"',
    b"{bad json",
    b'{"id": "a", "id": "b"}',
    b'{"id": "\\udc00"}',
]


def _fields(int_value: object) -> list[dict[str, object]]:
    """Field-level hostile bodies: valid JSON, wrong in type or range."""
    return [
        {"id": int_value, "group": int_value, "tags": int_value},
        {"id": "cam-1", "group": "g", "tags": {"k": int_value}},
        {"id": "cam-1", "tags": {"k": "a\x00b"}},
        {"id": "cam\x00-1"},
        {"target": "cam-1", "model": "digits", "version": int_value},
        {"target": "cam-1", "model": "digits", "version": 1, "group": int_value},
        {"sha256": int_value},
        {"model": "digits", "version": int_value, "group": "g"},
        {"model": "digits", "version": 1, "group": "g", "from_version": int_value},
        {"model": "digits", "version": 1, "group": "g", "policy": {"canary_count": int_value}},
        {"model": "digits", "version": 1, "group": "g", "policy": {"dwell_seconds": int_value}},
        {"model": "digits", "version": 1, "group": "g", "policy": {"steps": [int_value]}},
        {"model": "digits", "version": 1, "tags": {"k": int_value}},
        {"model": int_value, "version": 1, "group": "g"},
        {"target": "cam-1", "release": int_value},
        {"target": int_value, "release": 1},
        {"target": "cam-1", "release": 1, "group": int_value},
    ]


FIELD_BODIES = [
    body
    for value in (2**70, -(2**70), 2**63, -1, 0, 1.5, True, None, "1", [], {}, "x" * 5000)
    for body in _fields(value)
]

# (method, path template, query parameters it reads)
ROUTES: list[tuple[str, str, tuple[str, ...]]] = [
    ("GET", "/v1/status", ()),
    ("GET", "/v1/devices", ("group",)),
    ("GET", "/v1/devices/{id}", ()),
    ("POST", "/v1/devices", ()),
    ("POST", "/v1/devices/{id}/revoke", ()),
    ("GET", "/v1/models", ("name",)),
    ("POST", "/v1/models", ()),
    ("POST", "/v1/assign", ()),
    ("POST", "/v1/waves", ()),
    ("GET", "/v1/telemetry", ("after_id", "limit", "device_id")),
    ("GET", "/v1/drift", ("model", "version", "by", "since", "until", "bucket")),
    ("GET", "/v1/rollouts", ("active",)),
    ("POST", "/v1/rollouts", ()),
    ("GET", "/v1/rollouts/{id}", ()),
    *(("POST", f"/v1/rollouts/{{id}}/{c}", ()) for c in ("approve", "pause", "resume", "abort")),
    ("GET", "/v1/agent/releases", ()),
    ("POST", "/v1/agent/releases", ()),
    ("POST", "/v1/agent/assign", ()),
]
POST_ROUTES = [path for method, path, _ in ROUTES if method == "POST"]
GET_ROUTES = [(path, params) for method, path, params in ROUTES if method == "GET"]
HOSTILE_IDS = ["%00", "a%00b", "%ff%fe", "x" * 3000, "..", "%2e%2e%2f%2e%2e", TWO_70, "-1"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("admin")
    keys = KeyStore.init(tmp / "keys", now=datetime.now(UTC))
    registry = Registry.open(f"sqlite:///{tmp / 'registry.db'}")
    registry.upgrade()
    library = BundleLibrary(tmp / "bundles", keys.trusted_root())
    clock = lambda: datetime.now(UTC)  # noqa: E731
    service = FleetService(
        registry,
        library,
        FakeGateway(),
        [keys.signer("online-1")],
        clock=clock,
        ttl=timedelta(hours=1),
    )
    service.enroll_device("cam-1", group="g", tags={}, cert_serial=None)
    runner = RolloutRunner(registry, service, clock)
    drift = DriftService(registry, library.directory)
    app = create_app(
        service,
        TOKEN,
        max_request_bytes=1024 * 1024,
        max_upload_bytes=4 * 1024 * 1024,
        extra_routes=(
            lambda guard: drift_routes(drift, guard),
            lambda guard: rollout_routes(runner, guard),
            lambda guard: agent_routes(service, 4 * 1024 * 1024, guard),
        ),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    registry.close()


def _assert_typed_4xx(response: object, what: str) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    assert 400 <= status < 500, f"{what}: {status} {text[:300]}"
    body = response.json()  # type: ignore[attr-defined]
    assert isinstance(body.get("error"), str), f"{what}: {text[:300]}"
    assert isinstance(body.get("code"), str), f"{what}: {text[:300]}"
    assert body["code"] != "internal"
    assert not ABSOLUTE.search(text), f"{what}: {text[:300]}"
    assert "Traceback" not in text


@pytest.mark.parametrize(("path", "params"), [(p, q) for p, q in GET_ROUTES if q])
def test_hostile_query_values_get_a_typed_4xx(
    client: TestClient, path: str, params: tuple[str, ...]
) -> None:
    for name in params:
        for value in HOSTILE_QUERY:
            raw = value if value.startswith("%") else quote(value, safe="")
            query = f"{name}={raw}"
            if path == "/v1/drift" and name != "model":
                query += "&model=digits"  # get past "model is required" to the value itself
            response = client.get(f"{path}?{query}", headers=AUTH)
            if response.status_code < 400:
                # a name that merely matches nothing is a valid query (e.g. group=abc), a time
                # may be Unix seconds (since=1.5), and ``active`` is a flag (not 1/true/yes:
                # false); an integer parameter accepts none of these values
                assert name not in {"after_id", "limit", "version", "by"}, (name, value)
                assert name == "active" or value.isprintable(), (name, value)
                continue
            _assert_typed_4xx(response, f"GET {path}?{name}={value[:20]!r}")


def test_the_issue_examples(client: TestClient) -> None:
    response = client.get("/v1/telemetry", params={"after_id": TWO_70}, headers=AUTH)
    _assert_typed_4xx(response, "after_id=2**70")
    assert response.json()["code"] == "bad_request"
    response = client.post("/v1/devices", content=DEEP, headers=AUTH)
    _assert_typed_4xx(response, "30k-deep body")
    assert response.json()["code"] == "bad_json"
    response = client.post("/v1/models", content=b"x" * 700, headers=AUTH)
    _assert_typed_4xx(response, "truncated bundle")
    assert "staging" not in response.text


@pytest.mark.parametrize("path", POST_ROUTES)
def test_hostile_bodies_get_a_typed_4xx(client: TestClient, path: str) -> None:
    url = path.replace("{id}", "ro-unknown")
    for body in HOSTILE_BODIES:
        response = client.post(url, content=body, headers=AUTH)
        _assert_typed_4xx(response, f"POST {url} {body[:30]!r}")


@pytest.mark.parametrize(
    "path", ["/v1/devices", "/v1/assign", "/v1/waves", "/v1/rollouts", "/v1/agent/assign"]
)
def test_hostile_fields_get_a_typed_4xx(client: TestClient, path: str) -> None:
    for body in FIELD_BODIES:
        response = client.post(path, json=body, headers=AUTH)
        if path == "/v1/devices" and response.status_code == 201:
            # a well-formed registration (the hostile value sat in a field this route ignores)
            client.post(f"/v1/devices/{response.json()['id']}/revoke", headers=AUTH)
            continue
        _assert_typed_4xx(response, f"POST {path} {str(body)[:80]}")


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in ROUTES if "{id}" in p])
def test_hostile_path_values_get_a_typed_4xx(client: TestClient, method: str, path: str) -> None:
    for value in HOSTILE_IDS:
        url = path.replace("{id}", value)
        response = client.request(method, url, headers=AUTH)
        _assert_typed_4xx(response, f"{method} {url[:60]}")


def test_oversized_and_lying_content_length(client: TestClient) -> None:
    for length in ("abc", "-1", TWO_70, "9" * 100):
        response = client.post(
            "/v1/devices", content=b"{}", headers={**AUTH, "Content-Length": length}
        )
        assert 400 <= response.status_code < 500, (length, response.status_code)
    big = b'{"id": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = client.post("/v1/devices", content=big, headers=AUTH)
    _assert_typed_4xx(response, "2 MiB body")
    assert response.status_code == 413


def test_unknown_routes_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    _assert_typed_4xx(client.get("/v1/nothing", headers=AUTH), "unknown route")
    response = client.delete("/v1/devices", headers=AUTH)
    _assert_typed_4xx(response, "wrong method")
    assert response.status_code == 405


def test_a_library_disk_failure_names_no_path(tmp_path: Path) -> None:
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    (tmp_path / "bundles").write_text("a file where the library directory should be")
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    with TestClient(create_app(service, TOKEN), raise_server_exceptions=False) as c:
        response = c.post("/v1/models", content=b"x" * 2048, headers=AUTH)
    registry.close()
    assert response.status_code == 503
    assert response.json()["code"] == "bundle_library"
    assert str(tmp_path) not in response.text
    assert not ABSOLUTE.search(response.text), response.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cannot open /tmp/x/.staging/abc.efb: denied", "cannot open abc.efb: denied"),
        ("in '/srv/edgefleet/bundles/'", "in '<dir>'"),
        ("route /v1/models is fine", "route /v1/models is fine"),
        ("see http://host:8780/v1/models", "see http://host:8780/v1/models"),
        ("a/b/c relative", "a/b/c relative"),
    ],
)
def test_public_message_cuts_absolute_paths(text: str, expected: str) -> None:
    assert public_message(text) == expected

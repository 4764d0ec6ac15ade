"""Session-wide fixtures shared by unit and integration tests, and the skip policy.

Skip policy: the suite tests real components (Mosquitto, PostgreSQL, onnxruntime, LiteRT,
openssl). A test that skips because one is missing has not run, so any skip fails the run
(listed in the summary) unless it is explicitly allowed: ``EDGEFLEET_ALLOW_SKIP=1`` or
``--allow-skip`` for the whole run, or ``@pytest.mark.may_skip`` on a test whose skip depends on
the machine's privileges rather than on something ``scripts/setup.sh`` installs. ``ALLOWED_SKIPS``
lists the reasons of such skips in tests that do not carry the marker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_releases import Releases, build_releases, make_base_venv
from bundles import DigitsBundles, build_digits_bundles
from pg import PgCluster, pg_cluster

# The registry's database backends; ``registry_url`` runs a test once on each.
REGISTRY_BACKENDS = ("sqlite", "postgresql")

# Reasons (prefixes) of skips that depend on privileges, not on an installable component.
ALLOWED_SKIPS = ("cannot mount a tmpfs here",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-skip",
        action="store_true",
        default=os.environ.get("EDGEFLEET_ALLOW_SKIP", "") not in ("", "0"),
        help="do not fail the run when tests skip (default: env EDGEFLEET_ALLOW_SKIP)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: this test's skip depends on privileges; it does not fail the run"
    )
    config.pluginmanager.register(SkipPolicy(config.option.allow_skip), "edgefleet-skip-policy")


class SkipPolicy:
    """Records skips that are not allowed; fails an otherwise green run that had any."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.skips: list[str] = []

    def record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        """Remember ``report`` if it is a skip that is not allowed by marker or reason."""
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        if "may_skip" in getattr(report, "keywords", {}):  # collect reports carry none
            return
        longrepr = report.longrepr
        reason = str(longrepr[-1]) if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(ALLOWED_SKIPS):
            self.skips.append(f"{report.nodeid}: {reason}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self.record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.record(report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skips and exitstatus == pytest.ExitCode.OK and not self.allowed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skips:
            return
        title = "skips allowed (--allow-skip)" if self.allowed else "skipped tests fail the run"
        terminalreporter.section(title, sep="=", red=not self.allowed, yellow=self.allowed)
        for line in self.skips:
            terminalreporter.line(line)
        if not self.allowed:
            terminalreporter.line(
                "a skipped test did not run: install what it needs (bash scripts/setup.sh), "
                "or allow skips with EDGEFLEET_ALLOW_SKIP=1 / --allow-skip"
            )


@pytest.fixture(scope="session")
def digits_bundles(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundles:
    """Signed digits bundles v1-v5 (see ``bundles.build_digits_bundles``)."""
    return build_digits_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the run (see ``pg.pg_cluster``), started by the first
    test that needs it; tests take a fresh database each (``PgCluster.new_database``)."""
    yield from pg_cluster()


@pytest.fixture(params=REGISTRY_BACKENDS)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty registry database, once per backend: a SQLite file in
    ``tmp_path`` and a new database in the module's throwaway PostgreSQL cluster (``pg``).

    A test that takes it runs on both; one that only makes sense on one backend checks
    ``Registry.open(url).engine.dialect.name`` or takes its own fixture.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")
    cluster: PgCluster = request.getfixturevalue("pg")
    return cluster.new_database()


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory, digits_bundles: DigitsBundles) -> Releases:
    """Signed agent packages (good and deliberately broken), built once for the run."""
    return build_releases(tmp_path_factory.mktemp("agent-releases"), digits_bundles.keys)


@pytest.fixture(scope="session")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A launcher's base install (``agent_releases.make_base_venv``), made once for the run."""
    return make_base_venv(tmp_path_factory.mktemp("base") / "venv")

"""Session-wide fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bundles import DigitsBundles, build_digits_bundles
from pg import PgCluster, pg_cluster


@pytest.fixture(scope="session")
def digits_bundles(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundles:
    """Signed digits bundles v1-v5 (see ``bundles.build_digits_bundles``)."""
    return build_digits_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster per test module (see ``pg.pg_cluster``)."""
    yield from pg_cluster()

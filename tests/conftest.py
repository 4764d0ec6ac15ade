"""Session-wide fixtures shared by unit and integration tests."""

from __future__ import annotations

import pytest

from bundles import DigitsBundles, build_digits_bundles


@pytest.fixture(scope="session")
def digits_bundles(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundles:
    """Signed digits bundles v1-v5 (see ``bundles.build_digits_bundles``)."""
    return build_digits_bundles(tmp_path_factory.mktemp("bundles"))

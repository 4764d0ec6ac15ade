"""Session-scoped example models: each is trained once per test run (a few seconds in all)."""

from __future__ import annotations

import pytest

from model_builder import examples


@pytest.fixture(scope="session")
def digits_mlp() -> examples.ExampleModel:
    return examples.digits_mlp()


@pytest.fixture(scope="session")
def digits_cnn() -> examples.ExampleModel:
    return examples.digits_cnn()


@pytest.fixture(scope="session")
def digits_outlier_mlp() -> examples.ExampleModel:
    return examples.digits_outlier_mlp()


@pytest.fixture(scope="session")
def digits_wide_mlp() -> examples.ExampleModel:
    return examples.digits_wide_mlp()

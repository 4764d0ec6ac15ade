"""The suite's skip policy (tests/conftest.py): a skipped test fails the run unless allowed.

Each case runs pytest in a subprocess on small test modules next to a copy of the real
conftest, so what is checked is the policy the suite itself runs under.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

TESTS = Path(__file__).parents[1]

# module name -> (source, whether its skip must fail the run)
CASES = {
    "test_runtime_skip": ("import pytest\ndef test_x():\n    pytest.skip('no mosquitto')\n", True),
    "test_skipif_mark": (
        "import pytest\n@pytest.mark.skipif(True, reason='no openssl')\ndef test_x():\n    pass\n",
        True,
    ),
    "test_module_importorskip": (
        "import pytest\npytest.importorskip('no_such_module_here')\ndef test_x():\n    pass\n",
        True,
    ),
    "test_fixture_skip": (
        "import pytest\n@pytest.fixture\ndef pg():\n    pytest.skip('no PostgreSQL')\n"
        "def test_x(pg):\n    pass\n",
        True,
    ),
    "test_may_skip_marker": (
        "import pytest\n@pytest.mark.may_skip\ndef test_x():\n    pytest.skip('no privilege')\n",
        False,
    ),
    "test_allowed_reason": (
        "import pytest\ndef test_x():\n    pytest.skip('cannot mount a tmpfs here: EPERM')\n",
        False,
    ),
    "test_xfail": ("import pytest\n@pytest.mark.xfail\ndef test_x():\n    assert False\n", False),
    "test_plain": ("def test_x():\n    pass\n", False),
}


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), path]))
    monkeypatch.delenv("EDGEFLEET_ALLOW_SKIP", raising=False)
    return pytester


def _listed(output: str) -> set[str]:
    section = output.split("skipped tests fail the run", 1)[1]
    return {name for name in CASES if f"{name}.py" in section}


def test_every_kind_of_skip_fails_the_run_unless_allowed_by_marker_or_reason(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(**{name: source for name, (source, _) in CASES.items()})
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    assert _listed(result.stdout.str()) == {name for name, (_, bad) in CASES.items() if bad}


def test_allowed_skips_alone_keep_the_run_green(suite: pytest.Pytester) -> None:
    suite.makepyfile(**{name: source for name, (source, bad) in CASES.items() if not bad})
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()


@pytest.mark.parametrize("how", ["option", "env"])
def test_skips_can_be_allowed_for_a_run(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    suite.makepyfile(test_case=CASES["test_runtime_skip"][0])
    args = ["-p", "no:cacheprovider"]
    if how == "option":
        args.append("--allow-skip")
    else:
        monkeypatch.setenv("EDGEFLEET_ALLOW_SKIP", "1")
    result = suite.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["*skips allowed*", "*no mosquitto*"])


def test_a_real_failure_keeps_its_exit_code(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_case=CASES["test_runtime_skip"][0] + "def test_y():\n    assert False\n")
    assert suite.runpytest_subprocess("-p", "no:cacheprovider").ret == pytest.ExitCode.TESTS_FAILED

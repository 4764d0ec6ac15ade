"""A device install (no [builder]/[server] extras) gets one line naming the extra, no traceback.

The device is simulated by a ``sys.meta_path`` finder that refuses every module an extra
installs; the console scripts' entry functions then run in a subprocess as on such a device.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge_agent.cli.extras import EXTRA_MODULES, extra_for
from edge_agent.errors import EXIT_MISSING_EXTRA

ROOT = Path(__file__).parents[2]
ENTRY = {
    "edge-agent": "edge_agent.cli.main",
    "model-builder": "model_builder.entry",
    "fleet-server": "fleet_server.entry",
}
DEVICE = """
import importlib.abc, sys
class NotOnTheDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, NotOnTheDevice())
sys.argv = {argv!r}
from {module} import main
main()
"""


def on_a_device(prog: str, *args: str, blocked: set[str] | None = None) -> tuple[int, str]:
    code = DEVICE.format(
        blocked=set(EXTRA_MODULES) if blocked is None else blocked,
        argv=[prog, *args],
        module=ENTRY[prog],
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    return res.returncode, res.stderr


@pytest.mark.parametrize(
    ("prog", "args", "extra"),
    [
        ("fleet-server", ["--help"], "server"),
        ("fleet-server", ["serve", "--help"], "server"),
        ("model-builder", ["demo", "--out", "{tmp}/demo"], "builder"),
    ],
)
def test_a_role_cli_without_its_extra_says_which_extra_in_one_line(
    tmp_path: Path, prog: str, args: list[str], extra: str
) -> None:
    rc, err = on_a_device(prog, *(a.format(tmp=tmp_path) for a in args))
    assert rc == EXIT_MISSING_EXTRA, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: ")
    assert f"pip install 'edgefleet[{extra}]'" in lines[0]


def test_only_the_missing_module_of_one_extra_is_named(tmp_path: Path) -> None:
    rc, err = on_a_device("model-builder", "demo", "--out", str(tmp_path), blocked={"onnx"})
    assert rc == EXIT_MISSING_EXTRA, err
    assert "'onnx'" in err
    assert "[builder]" in err


def test_the_device_cli_and_the_builders_device_side_work_without_any_extra(
    tmp_path: Path,
) -> None:
    assert on_a_device("edge-agent", "--version") == (0, "")
    rc, err = on_a_device("model-builder", "keys", "init", str(tmp_path / "ks"))
    assert rc == 0, err


def test_a_module_no_extra_provides_is_a_bug_and_still_raises() -> None:
    rc, err = on_a_device("fleet-server", "--help", blocked={"click"})
    assert rc == 1
    assert "ModuleNotFoundError" in err


def test_with_the_extras_installed_the_entry_points_run_the_real_cli() -> None:
    for prog in ("model-builder", "fleet-server"):
        assert on_a_device(prog, "--version", blocked=set())[0] == 0


def test_the_console_scripts_use_the_guarded_entry_points() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {prog: f"{module}:main" for prog, module in ENTRY.items()}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_module_table_matches_the_extras_in_the_package_metadata() -> None:
    """Every dependency an extra adds (beyond the bare install) has its modules in the table."""
    requires = importlib.metadata.requires("edgefleet") or []
    base, by_extra = set(), {}
    for req in requires:
        name = _normalise(re.split(r"[\s\[<>=!;~]", req, maxsplit=1)[0])
        marker = re.search(r'extra\s*==\s*"([^"]+)"', req)
        if marker is None:
            base.add(name)
        else:
            by_extra.setdefault(marker.group(1), set()).add(name)
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_normalise(dist), set()).add(module)
    for extra in ("builder", "server", "litert", "tflite-quant"):
        for dist in by_extra[extra] - base:
            if dist.startswith("edgefleet"):
                continue
            provided = modules_of.get(dist, set()) & set(EXTRA_MODULES)
            assert provided, f"{dist} ([{extra}]) has no module in EXTRA_MODULES"
            assert all(extra in EXTRA_MODULES[m] for m in provided), (dist, extra)
    assert extra_for("sqlalchemy.orm", "server") == "server"
    assert extra_for("ai_edge_litert.interpreter", "builder") == "builder"
    assert extra_for("numpy", "server") is None

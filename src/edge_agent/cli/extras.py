"""Console entry points of the roles a device install may lack: ``model-builder``, ``fleet-server``.

One wheel ships every command, but a device installs it without the ``[builder]`` and
``[server]`` extras. These entry points load the real CLI lazily and turn a missing optional
dependency into one line that names the extra to install, with exit code ``EXIT_MISSING_EXTRA``
(9) instead of a ``ModuleNotFoundError`` traceback. A missing module that no extra provides is a
real bug and is re-raised. This module owns that mapping, not the CLIs themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from edge_agent.errors import EXIT_MISSING_EXTRA

# Top-level module -> the extras (pyproject.toml [project.optional-dependencies]) that install
# it, the role's own extra first where several do. tests/unit/test_cli_extras.py keeps this in
# step with the package metadata.
EXTRA_MODULES: Mapping[str, tuple[str, ...]] = {
    "sqlalchemy": ("server",),
    "alembic": ("server",),
    "psycopg": ("server",),
    "httpx": ("server",),
    "argon2": ("server",),
    "jinja2": ("server",),
    "pyarrow": ("server",),
    "onnx": ("builder",),
    "onnxconverter_common": ("builder",),
    "sklearn": ("builder",),
    "ai_edge_litert": ("litert", "builder"),
    "ai_edge_quantizer": ("tflite-quant",),
}


def extra_for(missing_module: str | None, own_extra: str) -> str | None:
    """The extra to install for ``missing_module``, or None if no extra provides it.

    Args:
        missing_module: ``ModuleNotFoundError.name`` (may be dotted, or None).
        own_extra: the extra of the command that failed; preferred when it provides the module.

    Returns:
        The extra's name, or None.
    """
    extras = EXTRA_MODULES.get((missing_module or "").split(".")[0])
    if not extras:
        return None
    return own_extra if own_extra in extras else extras[0]


def missing_extra_message(prog: str, extra: str, module: str) -> str:
    """The one line printed when ``prog`` needs ``extra`` for ``module``."""
    return (
        f"{prog}: this command needs the [{extra}] extra (Python module '{module}' is not "
        f"installed): pip install 'edgefleet[{extra}]' (or 'edgefleet-<version>-py3-none-any.whl"
        f"[{extra}]' with -c constraints.txt)"
    )


def run_role(prog: str, own_extra: str, load: Callable[[], Callable[[], object]]) -> None:
    """Load a role's CLI with ``load`` and run it; a missing extra is one line and exit 9.

    Args:
        prog: the command name, for the message.
        own_extra: the extra that installs this role (``builder`` or ``server``).
        load: imports and returns the CLI's ``main``.

    Raises:
        SystemExit: with ``EXIT_MISSING_EXTRA`` when an extra's module is missing (and whatever
            the CLI itself exits with).
        ModuleNotFoundError: for a missing module that no extra provides (a packaging bug).
    """
    try:
        load()()
    except ModuleNotFoundError as exc:
        extra = extra_for(exc.name, own_extra)
        if extra is None:
            raise
        sys.stderr.write(missing_extra_message(prog, extra, exc.name or "?") + "\n")
        raise SystemExit(EXIT_MISSING_EXTRA) from None

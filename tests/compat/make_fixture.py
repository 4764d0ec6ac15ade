"""Add a compatibility fixture: a real bundle from today's builder, and the root that signed it.

Run once per released bundle format (``python tests/compat/make_fixture.py <dir-name>``); commit
the new directory and never regenerate an existing one: tests/test_compat.py re-verifies every
fixture with today's code, so a change that stops old bundles from verifying or parsing fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from model_builder.build_cli import run_build
from model_builder.config import BuildConfig
from model_builder.examples import save_example
from model_builder.keystore import KeyStore


def main(name: str) -> None:
    dest = Path(__file__).parent / name
    if dest.exists():
        raise SystemExit(f"{dest} exists; compatibility fixtures are never regenerated")
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        ex = save_example("digits-mlp", Path(tmp) / "ex")
        store = KeyStore.init(Path(tmp) / "keys", now=now, expires_days=3650)
        dest.mkdir(parents=True)
        result = run_build(
            ex / "model.onnx",
            ex / "calib.npz",
            ex / "eval.npz",
            ex / "contract.json",
            BuildConfig(name="digits", version=1, expires_days=3650, arch=("any",)),
            store,
            dest,
        )
        (dest / "root.json").write_bytes(store.root_bytes())
        (dest / "digits-1.report.json").unlink()
    info = {
        "verify_at": now.isoformat(),
        "bundle": "digits-1.efb",
        "manifest_schema_version": result.manifest.schema_version,
        "made_by": "tests/compat/make_fixture.py",
    }
    (dest / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v1-2026-11")

#!/usr/bin/env bash
# Set up, then run the whole test suite: ruff, mypy (strict on the packages), import-linter
# contracts, and pytest (unit and integration tests against real onnxruntime/LiteRT sessions).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"
ruff check src tests bench scripts
ruff format --check src tests bench scripts
echo "== mypy (strict)"
mypy
echo "== import-linter"
lint-imports
echo "== pytest"
pytest -p no:cacheprovider "$@"

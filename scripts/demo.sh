#!/usr/bin/env bash
# Set up, then run the main job: the builder end to end on the bundled digits example
# (train, quantize, gate, baseline, sign) and verify + run the bundle as a device would.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/model-builder demo --out "${1:-demo-out}"

#!/usr/bin/env bash
# Set up, then run the main job: the builder end to end on the bundled digits example
# (train, quantize, gate, baseline, sign, verify), then a real edge-agent daemon that installs
# the signed bundle and serves it over the local KServe v2 API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${1:-demo-out}"
.venv/bin/model-builder demo --out "$OUT"
exec .venv/bin/python scripts/demo_agent.py "$OUT"

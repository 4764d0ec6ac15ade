#!/usr/bin/env bash
# Set up, then run the main job: the builder end to end on the bundled digits example
# (train, quantize, gate, baseline, sign, verify), a real edge-agent daemon that installs the
# signed bundle and serves it over the local KServe v2 API, then a whole fleet on this machine
# (Mosquitto with TLS and ACLs, fleet-server, two enrolled agents) delivering it over MQTT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
OUT="${1:-demo-out}"
.venv/bin/model-builder demo --out "$OUT"
.venv/bin/python scripts/demo_agent.py "$OUT"
exec .venv/bin/python scripts/demo_fleet.py "$OUT"

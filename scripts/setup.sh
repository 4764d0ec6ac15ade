#!/usr/bin/env bash
# Set up a development environment on a fresh Debian/Ubuntu machine with Python 3.11+:
# the system packages the tools need, a virtualenv in .venv, and edgefleet with every extra the
# tests and the demo use, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: $PYTHON not found; install Python 3.11 or newer" >&2
    exit 1
fi
"$PYTHON" - <<'PY' || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: please install: $*" >&2
        exit 1
    fi
}

# Debian splits venv/ensurepip out of python3.
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    ver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install "python${ver}-venv" || apt_install python3-venv
fi
command -v openssl >/dev/null || apt_install openssl
# Integration tests start their own Mosquitto broker (TLS, ACLs) on a free loopback port.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto
# The agent benchmark drives the local API with wrk (bench only, not the tests).
command -v wrk >/dev/null || apt_install wrk || true

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "setup: ready (.venv)"

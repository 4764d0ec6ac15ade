#!/usr/bin/env bash
# Set up a development environment on a fresh Debian/Ubuntu machine with Python 3.11+:
# the system packages the tools need, a virtualenv in .venv, and edgefleet with every extra the
# tests and the demo use, pinned by constraints.txt.
#
#   bash scripts/setup.sh          # what the test suite needs (scripts/test.sh)
#   bash scripts/setup.sh demo     # what the demo needs (scripts/demo.sh): no PostgreSQL
#
# System packages are installed with apt-get when missing, as root or through sudo. No service is
# started or left enabled by them: the tests and the demo start their own Mosquitto and PostgreSQL
# processes on free loopback ports and only need the binaries. Without root or sudo, setup says
# which packages to install and why, and stops (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${1:-test}"
case "$PROFILE" in test|demo) ;; *) echo "setup: usage: setup.sh [test|demo]" >&2; exit 2 ;; esac

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: $PYTHON not found; install Python 3.11 or newer" >&2
    exit 1
fi
"$PYTHON" - <<'PY' || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# --- which system packages are missing, and why they are needed ---------------------------------
PACKAGES=()
REASONS=()
want() { PACKAGES+=("$1"); REASONS+=("  $1: $2"); }

if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    ver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    want "python${ver}-venv" "creates the virtualenv .venv (Debian ships venv and ensurepip apart)"
fi
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    want mosquitto "the demo and the integration tests start their own MQTT broker (binary only)"
fi
if [ "$PROFILE" = test ]; then
    if ! command -v openssl >/dev/null; then
        want openssl "a test verifies bundle signatures with the openssl CLI, as docs/security.md does"
    fi
    if ! command -v mosquitto_pub >/dev/null; then
        want mosquitto-clients "a flood test publishes as a misbehaving device with mosquitto_pub"
    fi
    # tests/pg.py runs initdb/pg_ctl from /usr/lib/postgresql/*/bin (or PATH), as the 'postgres'
    # user when the tests run as root.
    pg_found=0
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && pg_found=1
    command -v pg_ctl >/dev/null && command -v initdb >/dev/null && pg_found=1
    if [ "$(id -u)" -eq 0 ] && ! getent passwd postgres >/dev/null; then pg_found=0; fi
    if [ "$pg_found" -eq 0 ]; then
        want postgresql "the scale-out tests start a throwaway PostgreSQL cluster (binaries only)"
    fi
    if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
        want chromium "the console's browser tests drive it headless through Playwright"
    fi
    if ! compgen -G "/usr/lib/*/libatomic.so.1" >/dev/null && ! compgen -G "/lib/*/libatomic.so.1" >/dev/null; then
        want libatomic1 "Playwright's bundled node driver links it (a minimal Debian lacks it)"
    fi
fi

# --- install them: as root or with sudo, never leaving a service running or enabled -------------
SUDO=()
POLICY=/usr/sbin/policy-rc.d
POLICY_OURS=0
remove_policy() {
    if [ "$POLICY_OURS" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$POLICY"
        POLICY_OURS=0
    fi
}
trap remove_policy EXIT

apt_install() {
    local newly=() pkg svc
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || newly+=("$pkg")
    done
    # invoke-rc.d asks policy-rc.d before it starts anything; 101 = "not allowed". A policy that
    # is already in place (containers have one) is left alone.
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# edgefleet scripts/setup.sh: start no service during this install\nexit 101\n' |
            "${SUDO[@]}" tee "$POLICY" >/dev/null
        "${SUDO[@]}" chmod 755 "$POLICY"
        POLICY_OURS=1
    fi
    echo "setup: apt-get install $*"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    remove_policy
    # Only the packages this run installed: a service someone set up before is not touched.
    for pkg in "${newly[@]}"; do
        case "$pkg" in mosquitto | postgresql) svc="$pkg" ;; *) continue ;; esac
        if command -v systemctl >/dev/null; then
            "${SUDO[@]}" systemctl disable --quiet "$svc.service" 2>/dev/null || true
        fi
        if command -v deb-systemd-helper >/dev/null; then
            "${SUDO[@]}" deb-systemd-helper disable "$svc.service" 2>/dev/null || true
        fi
        if [ -e "/etc/init.d/$svc" ] && command -v update-rc.d >/dev/null; then
            "${SUDO[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
        echo "setup: installed $pkg for its binaries; its system service is not started or enabled"
    done
}

if [ ${#PACKAGES[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
        SUDO=(sudo)
    fi
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; }; then
        {
            echo "setup: missing system packages (Debian/Ubuntu names); as root, run"
            echo "    apt-get install --no-install-recommends ${PACKAGES[*]}"
            echo "and run this again. Why each is needed:"
            printf '%s\n' "${REASONS[@]}"
            echo "(setup installs them itself when run as root or when sudo is available)"
        } >&2
        exit 2
    fi
    apt_install "${PACKAGES[@]}"
fi

# --- the virtualenv ---------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
if [ "$PROFILE" = test ]; then
    # KServe's Python client drives a daemon in tests/integration/test_kserve_client.py. kserve
    # 0.21 needs protobuf<7 and starlette>=1.3, which .venv's pins do not allow: it gets its own
    # virtualenv, pinned by constraints-kserve.txt (test-only; the device never installs it).
    if [ ! -x .venv-kserve/bin/python ]; then
        "$PYTHON" -m venv .venv-kserve
    fi
    .venv-kserve/bin/python -m pip install -q --upgrade "pip>=24"
    .venv-kserve/bin/python -m pip install -q -c constraints-kserve.txt "kserve==0.21.*"
    echo "setup: ready (.venv-kserve, KServe's client for the conformance test)"
fi
echo "setup: ready (.venv)"

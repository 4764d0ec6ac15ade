#!/usr/bin/env bash
# Run the README on a fresh machine: a minimal Debian bookworm root built with debootstrap
# (python3 and git only), the repository's committed HEAD cloned into it, and both README
# commands (`bash scripts/demo.sh`, `bash scripts/test.sh`) run there as root, with a verdict.
# Green CI on a developer machine that already has everything installed proves nothing about a
# fresh one; this does. Not part of .ci/run (it needs root and takes several minutes).
#
#   sudo bash scripts/fresh-machine.sh                # amd64: both README commands
#   sudo bash scripts/fresh-machine.sh --arch arm64   # arm64 under qemu-user: device wheel smoke test
#
# Options: --arch amd64|arm64, --keep (keep the root), --rebuild (ignore the cached base root),
# --prepare (only build and cache the base root),
# --workdir DIR (default /var/tmp/edgefleet-fresh), --repo DIR (default: this checkout).
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
#
# Site plumbing, not part of the fresh machine: if the host reaches PyPI through a TLS-inspecting
# proxy (PIP_CERT / SSL_CERT_FILE / REQUESTS_CA_BUNDLE set), that CA bundle is copied into the root
# and handed to pip by PIP_CERT; the host's /etc/resolv.conf is copied for DNS.
set -euo pipefail
# The whole script is one function, parsed before it runs: editing this file (a git pull) while
# a 30-minute run is under way cannot change what that run executes.
main() {

HERE="$(cd "$(dirname "$0")" && pwd)"
ARCH=amd64
KEEP=0
REBUILD=0
PREPARE=0
WORK=/var/tmp/edgefleet-fresh
REPO="$(cd "$HERE/.." && pwd)"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        --prepare) PREPARE=1; shift ;;
        --workdir) WORK="$2"; shift 2 ;;
        --repo) REPO="$(cd "$2" && pwd)"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "fresh-machine: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$ARCH" in amd64|arm64) ;; *) echo "fresh-machine: --arch amd64 or arm64" >&2; exit 2 ;; esac
if [ "$(id -u)" -ne 0 ]; then
    echo "fresh-machine: needs root (debootstrap, chroot and mounts); run it with sudo" >&2
    exit 2
fi

say() { printf '[fresh-machine %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# --- host tools --------------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v git >/dev/null || need+=(git)
if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
    command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing host tools: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- binfmt for arm64 on another architecture -------------------------------------------------
BINFMT_REGISTERED=0
BINFMT_MOUNTED=0
if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
    # shellcheck source=scripts/fresh/binfmt.sh
    . "$HERE/fresh/binfmt.sh"
    binfmt_register_aarch64
fi

# --- the root ----------------------------------------------------------------------------------
mkdir -p "$WORK/cache"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
ROOT="$WORK/$ARCH-$STAMP"
CACHE="$WORK/cache/bookworm-$ARCH-minbase.tar"
MOUNTS=()
VERDICT=()
FAILED=0
VERDICT_PRINTED=0

print_verdict() {
    echo
    echo "== fresh-machine verdict: Debian bookworm $ARCH, python3 ${PYVER:-?}, edgefleet ${COMMIT:-?}"
    for line in "${VERDICT[@]}"; do echo "$line"; done
    if [ "$FAILED" -eq 0 ]; then echo "== PASS"; else echo "== FAIL"; fi
    VERDICT_PRINTED=1
}

cleanup() {
    local rc=$?
    set +e
    if [ "$VERDICT_PRINTED" -eq 0 ] && [ "$rc" -ne 0 ]; then
        VERDICT+=("FAIL  fresh-machine.sh itself stopped early (exit $rc; see the log above)")
        FAILED=1
        print_verdict
    fi
    if [ -n "${ROOT:-}" ] && [ -d "$ROOT" ]; then
        # Processes still running inside the root were started by this script (a leftover is
        # also reported as a failure before this point).
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && kill -9 "${p#/proc/}" 2>/dev/null
        done
        for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
            umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null
        done
        if grep -q " $ROOT/" /proc/mounts; then
            say "WARNING: mounts left under $ROOT; not deleting it"
        elif [ "$KEEP" -eq 0 ]; then
            rm -rf "$ROOT"
        else
            say "root kept at $ROOT"
        fi
    fi
    [ "$KEEP" -eq 1 ] || rm -rf "$WORK/$ARCH-$STAMP-host"
    [ "$BINFMT_REGISTERED" -eq 1 ] && binfmt_unregister_aarch64
    [ "$BINFMT_MOUNTED" -eq 1 ] && umount /proc/sys/fs/binfmt_misc 2>/dev/null
    exit "$rc"
}
trap cleanup EXIT INT TERM

if [ "$REBUILD" -eq 1 ] || [ ! -s "$CACHE" ]; then
    say "debootstrap bookworm $ARCH (minbase + python3, git) from $MIRROR"
    base="$WORK/base-$ARCH-$STAMP"
    t0=$SECONDS
    debootstrap --variant=minbase --arch="$ARCH" --include=python3,git \
        bookworm "$base" "$MIRROR" >"$WORK/debootstrap-$ARCH.log" 2>&1 || {
        tail -30 "$WORK/debootstrap-$ARCH.log"
        say "FAIL debootstrap (log: $WORK/debootstrap-$ARCH.log)"
        exit 1
    }
    rm -rf "$base/var/cache/apt/archives/"*.deb
    tar -C "$base" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
    rm -rf "$base"
    say "base root built in $(fmt_secs $((SECONDS - t0))) and cached at $CACHE"
fi
[ "$PREPARE" -eq 0 ] || { say "base root ready: $CACHE"; exit 0; }
mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$CACHE"
# A fresh install also has the updates and security suites.
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
EOF
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"

bind() {  # bind <source> <target-inside-root> [mount options...]
    local src="$1" dst="$ROOT$2"
    shift 2
    mount "$@" "$src" "$dst"
    MOUNTS+=("$dst")
}
mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev/pts" "$ROOT/dev/shm"
bind proc /proc -t proc
bind sysfs /sys -t sysfs
bind /dev/pts /dev/pts --bind
bind tmpfs /dev/shm -t tmpfs -o mode=1777
for node in null zero full random urandom tty; do
    [ -e "$ROOT/dev/$node" ] || { touch "$ROOT/dev/$node"; bind "/dev/$node" "/dev/$node" --bind; }
done
[ -e "$ROOT/dev/ptmx" ] || ln -s pts/ptmx "$ROOT/dev/ptmx"

CHROOT_ENV=(env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 TERM=dumb)
ca="${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}"
if [ -n "$ca" ] && [ -f "$ca" ]; then
    mkdir -p "$ROOT/opt/site-ca"
    cp -L "$ca" "$ROOT/opt/site-ca/ca.pem"
    CHROOT_ENV+=(PIP_CERT=/opt/site-ca/ca.pem)
fi
in_root() { chroot "$ROOT" "${CHROOT_ENV[@]}" "$@"; }

# Processes whose root directory is the fresh root (what a command left running).
leftovers() {
    local p out=""
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ]; then
            out+="${p#/proc/}:$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-80); "
        fi
    done
    printf '%s' "$out"
}

PYVER="$(in_root python3 -c 'import platform; print(platform.python_version())')"
say "fresh root $ROOT: Debian $(cat "$ROOT/etc/debian_version") $ARCH, python3 $PYVER"

git clone --quiet "$REPO" "$ROOT/root/edgefleet"
COMMIT="$(git -C "$ROOT/root/edgefleet" rev-parse --short HEAD)"
say "cloned $REPO at $COMMIT (committed HEAD; uncommitted changes are not tested)"

verdict() { VERDICT+=("$1"); [[ "$1" == PASS* ]] || FAILED=1; }

if [ "$ARCH" = amd64 ]; then
    # shellcheck source=scripts/fresh/amd64.sh
    . "$HERE/fresh/amd64.sh"
    run_readme_commands
else
    # shellcheck source=scripts/fresh/arm64.sh
    . "$HERE/fresh/arm64.sh"
    run_arm64_smoke
fi

print_verdict
exit "$FAILED"
}

main "$@"

# Sourced by scripts/fresh-machine.sh: the README's two commands on the fresh root.
# Uses ROOT, in_root, leftovers, verdict, say, fmt_secs from the caller.

# One README command, as root in /root/edgefleet; its log goes to stdout and to logs/<name>.log.
run_readme() {  # run_readme <name> <command...>
    local name="$1" t0 rc left
    shift
    mkdir -p "$ROOT/root/logs"
    say "running: $* (log: $ROOT/root/logs/$name.log)"
    t0=$SECONDS
    set +e
    in_root bash -c 'cd /root/edgefleet && "$@"' _ "$@" 2>&1 | tee "$ROOT/root/logs/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local took
    took="$(fmt_secs $((SECONDS - t0)))"
    left="$(leftovers)"
    if [ "$rc" -eq 0 ] && [ -z "$left" ]; then
        verdict "PASS  $*  ($took)"
    else
        verdict "FAIL  $*  ($took, exit $rc${left:+, left running: $left})"
        echo "---- last 40 lines of $name.log"
        tail -40 "$ROOT/root/logs/$name.log"
        echo "----"
    fi
}

# What setup.sh says to a user who is neither root nor has sudo (nothing installed yet).
check_unprivileged_setup() {
    local out rc
    in_root useradd --create-home newcomer
    in_root git clone --quiet /root/edgefleet /home/newcomer/edgefleet
    in_root chown -R newcomer: /home/newcomer/edgefleet
    set +e
    out="$(chroot --userspec=newcomer:newcomer "$ROOT" "${CHROOT_ENV[@]}" HOME=/home/newcomer \
        bash -c 'cd /home/newcomer/edgefleet && bash scripts/setup.sh' 2>&1)"
    rc=$?
    set -e
    echo "$out" | sed 's/^/    /'
    if [ "$rc" -ne 0 ] && grep -q "apt-get install" <<<"$out" && ! grep -q "command not found" <<<"$out"
    then
        verdict "PASS  setup.sh as a user without root or sudo: says what to install (exit $rc)"
    else
        verdict "FAIL  setup.sh as a user without root or sudo: exit $rc, see output above"
    fi
}

# Once the system packages are there, a user without root or sudo gets through setup.
check_unprivileged_setup_after() {
    local out rc
    set +e
    out="$(chroot --userspec=newcomer:newcomer "$ROOT" "${CHROOT_ENV[@]}" HOME=/home/newcomer \
        bash -c 'cd /home/newcomer/edgefleet && bash scripts/setup.sh' 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        verdict "PASS  setup.sh as a user without root or sudo, packages already installed"
    else
        echo "$out" | tail -20 | sed 's/^/    /'
        verdict "FAIL  setup.sh as a user without root or sudo, packages installed: exit $rc"
    fi
}

# No system service left enabled or running by the packages setup.sh installed.
check_no_services() {
    local found="" f
    for f in "$ROOT"/etc/systemd/system/*.wants/mosquitto.service \
        "$ROOT"/etc/systemd/system/*.wants/postgresql*.service \
        "$ROOT"/etc/rc[2345].d/S*mosquitto "$ROOT"/etc/rc[2345].d/S*postgresql; do
        [ -e "$f" ] || [ -L "$f" ] && found+="${f#"$ROOT"} "
    done
    if [ -z "$found" ]; then
        verdict "PASS  no mosquitto/postgresql service enabled or running after setup"
    else
        verdict "FAIL  services enabled at boot: $found"
    fi
}

run_readme_commands() {
    check_unprivileged_setup
    run_readme demo bash scripts/demo.sh
    run_readme test bash scripts/test.sh
    check_no_services
    check_unprivileged_setup_after
}

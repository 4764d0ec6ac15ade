# Sourced by scripts/fresh-machine.sh: run arm64 binaries on another architecture with
# qemu-user-static through binfmt_misc (F flag: the interpreter is opened at registration, so it
# need not exist inside the root). What this script registers or mounts it removes on exit;
# an existing registration is left alone.

binfmt_register_aarch64() {
    local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [ ! -e "$dir/register" ]; then
        if ! mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null; then
            say "FAIL cannot mount binfmt_misc at $dir (the kernel or sandbox forbids it): arm64" \
                "binaries cannot run here; use an arm64 machine"
            exit 1
        fi
        BINFMT_MOUNTED=1
    fi
    if [ -e "$dir/qemu-aarch64" ]; then
        grep -q '^flags:.*F' "$dir/qemu-aarch64" && return 0
        say "FAIL qemu-aarch64 is registered without the F flag; a chroot cannot find its interpreter"
        exit 1
    fi
    if [ ! -f "$conf" ]; then
        say "FAIL $conf is missing (Debian's qemu-user-static provides it)"
        exit 1
    fi
    if ! cat "$conf" >"$dir/register" 2>/dev/null; then
        say "FAIL cannot register qemu-aarch64 with binfmt_misc (permission denied in this sandbox)"
        exit 1
    fi
    BINFMT_REGISTERED=1
    say "registered qemu-aarch64 ($(qemu-aarch64-static --version | head -1)) with binfmt_misc"
}

binfmt_unregister_aarch64() {
    echo -1 >/proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || true
}

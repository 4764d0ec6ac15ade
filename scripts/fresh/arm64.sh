# Sourced by scripts/fresh-machine.sh --arch arm64: the device side on an emulated arm64 root.
# The host builds the wheel and a signed bundle from the cloned commit and computes the x86
# reference logits; the arm64 root installs the device wheel (no extras but [litert]) with the
# pinned constraints into a venv and runs the same smoke test (scripts/fresh/smoke.py): verify,
# install, run the daemon, infer every held-out digit; then the logits are compared.
# Uses ROOT, REPO, WORK, STAMP, in_root, bind, verdict, say, fmt_secs from the caller.

run_arm64_smoke() {
    local src="$ROOT/root/edgefleet" host="$WORK/arm64-$STAMP-host" dev=/root/smoke t0 rc
    local py="$REPO/.venv/bin/python"
    if [ ! -x "$py" ]; then
        verdict "FAIL  host has no $REPO/.venv (run bash scripts/setup.sh on the host first)"
        return
    fi
    mkdir -p "$host" "$ROOT$dev"

    # Under qemu-user 7.2 an emulated process reads the host's x86 /proc/cpuinfo; onnxruntime's
    # cpuinfo parser then finds no ARM cores and segfaults. Real boards are unaffected.
    bind "$HERE/fresh/cpuinfo-arm64" /proc/cpuinfo --bind

    say "host: wheel, bundle and x86 reference logits from $COMMIT"
    t0=$SECONDS
    if ! "$py" -m pip wheel -q --no-deps -w "$host/wheel" "$src" >"$host/wheel.log" 2>&1; then
        tail -20 "$host/wheel.log"
        verdict "FAIL  host: pip wheel of the commit"
        return
    fi
    # The builder and the x86 agent run the cloned commit's code, not the host's working tree.
    if ! PYTHONPATH="$src/src" "$py" -c 'import sys; from model_builder.entry import main; main()' \
        demo --out "$host/demo" >"$host/demo.log" 2>&1; then
        tail -20 "$host/demo.log"
        verdict "FAIL  host: model-builder demo (bundle build)"
        return
    fi
    # One bundle for both machines: quantized for arm64 (--target arm64) and signed for any
    # architecture so the x86 reference runs the very same model bytes.
    local bundle="$host/arm64/digits-2.efb"
    if ! PYTHONPATH="$src/src" "$py" -c 'import sys; from model_builder.entry import main; main()' \
        build "$host/demo/example/model.onnx" --calib "$host/demo/example/calib.npz" \
        --eval "$host/demo/example/eval.npz" --contract "$host/demo/example/contract.json" \
        --name digits --version 2 --target arm64 --arch any --keystore "$host/demo/keys" \
        --out "$host/arm64" >"$host/build.log" 2>&1; then
        tail -20 "$host/build.log"
        verdict "FAIL  host: model-builder build --target arm64"
        return
    fi
    if ! PYTHONPATH="$src/src" "$py" "$HERE/fresh/smoke.py" "$bundle" "$host/demo/keys/root.json" \
        "$host/demo/example/eval.npz" "$host/x86" >"$host/x86.json" 2>"$host/x86.err"; then
        cat "$host/x86.err"
        verdict "FAIL  host: x86 smoke run"
        return
    fi
    # The int8 network's logits (before the float Softmax the model ends with), run directly in
    # onnxruntime on the same preprocessed inputs on both machines.
    if ! PYTHONPATH="$src/src" "$py" "$HERE/fresh/smoke.py" --expose-logits "$bundle" \
        "$host/demo/example/eval.npz" "$host/logits" >"$host/logits.log" 2>&1 ||
        ! "$py" "$HERE/fresh/smoke.py" --ort "$host/logits/logits.onnx" "$host/logits/pre.npz" \
            "$host/logits/x86.npy" >>"$host/logits.log" 2>&1; then
        cat "$host/logits.log"
        verdict "FAIL  host: int8 logits on x86"
        return
    fi
    say "host side done in $(fmt_secs $((SECONDS - t0))): $(cat "$host/x86.json")"
    cp "$host"/wheel/edgefleet-*.whl "$src/constraints.txt" "$HERE/fresh/smoke.py" "$ROOT$dev/"
    cp "$bundle" "$ROOT$dev/bundle.efb"
    cp "$host/demo/keys/root.json" "$host/demo/example/eval.npz" "$ROOT$dev/"
    cp "$host/logits/logits.onnx" "$host/logits/pre.npz" "$ROOT$dev/"

    say "arm64: apt-get install python3-venv; venv; pip install edgefleet-*.whl[litert] -c constraints.txt"
    t0=$SECONDS
    set +e
    in_root bash -c "set -e
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv /opt/edgefleet
        cd $dev && /opt/edgefleet/bin/pip install -q \"\$(ls edgefleet-*.whl)[litert]\" -c constraints.txt
        /opt/edgefleet/bin/pip list 2>/dev/null | grep -iE '^(onnxruntime|ai-edge-litert|numpy|edgefleet) '
        /opt/edgefleet/bin/python -c 'import ai_edge_litert.interpreter' && echo 'litert interpreter imports'
        /opt/edgefleet/bin/model-builder demo --out /tmp/no-builder && rc=0 || rc=\$?
        echo \"model-builder exit \$rc\"
        /opt/edgefleet/bin/fleet-server --help && rc=0 || rc=\$?
        echo \"fleet-server exit \$rc\"
        " 2>&1 | tee "$host/arm64-install.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then
        verdict "FAIL  arm64: device install ($(fmt_secs $((SECONDS - t0))), exit $rc)"
        return
    fi
    verdict "PASS  arm64: device wheel installed with [litert] and the pinned constraints ($(fmt_secs $((SECONDS - t0))))"
    if grep -q "model-builder exit 9" "$host/arm64-install.log" && grep -q "fleet-server exit 9" "$host/arm64-install.log"; then
        verdict "PASS  arm64: model-builder/fleet-server without their extra say which one (exit 9)"
    else
        verdict "FAIL  arm64: model-builder/fleet-server without their extra (see the log above)"
    fi

    say "arm64: smoke test of the agent (verify, install, run, infer) under qemu-user"
    t0=$SECONDS
    set +e
    in_root bash -c "cd $dev && /opt/edgefleet/bin/python smoke.py bundle.efb root.json eval.npz out" \
        >"$host/arm64.json" 2>"$host/arm64.err"
    rc=$?
    set -e
    cat "$host/arm64.json" "$host/arm64.err"
    if [ "$rc" -ne 0 ]; then
        verdict "FAIL  arm64: agent smoke test ($(fmt_secs $((SECONDS - t0))), exit $rc)"
        return
    fi
    verdict "PASS  arm64: verify, install, run, infer ($(fmt_secs $((SECONDS - t0)))): $(cat "$host/arm64.json")"
    local cmp
    set +e
    in_root /opt/edgefleet/bin/python "$dev/smoke.py" --ort "$dev/logits.onnx" "$dev/pre.npz" \
        "$dev/logits-arm64.npy"
    cmp="$("$py" "$HERE/fresh/smoke.py" --compare "$host/logits/x86.npy" "$ROOT$dev/logits-arm64.npy")"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        verdict "PASS  arm64 vs x86 int8 logits (ONNX, before the float Softmax) bit-identical: $cmp"
    else
        verdict "FAIL  arm64 vs x86 int8 logits (ONNX, before the float Softmax) differ: $cmp"
    fi
    # What the agent serves ends in a float Softmax, whose exp kernels differ between x86 and
    # NEON in the last bits: reported, and only the predicted class must agree.
    cmp="$("$py" "$HERE/fresh/smoke.py" --compare "$host/x86/logits.npy" "$ROOT$dev/out/logits.npy")" ||
        true
    if "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(d["same_argmax"] != d["digits"])' "$cmp"; then
        verdict "PASS  arm64 vs x86 agent outputs (probabilities), same class for every digit: $cmp"
    else
        verdict "FAIL  arm64 vs x86 agent outputs (probabilities) disagree on a class: $cmp"
    fi
}

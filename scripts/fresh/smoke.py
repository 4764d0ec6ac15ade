"""Device smoke test of the agent, run by ``scripts/fresh-machine.sh --arch arm64`` on both sides.

With only the device install (``edgefleet`` without extras, plus ``[litert]``): verify a signed
bundle against the root of trust, install it into a fresh state directory, start the
``edge-agent run`` daemon, send every held-out digit through its local KServe v2 API, stop it
with SIGTERM, and save the logits (``.npy``) for a bit-for-bit comparison with another machine.
Prints one JSON summary line. Exit 0 only if every step succeeded.

    python smoke.py BUNDLE ROOT_JSON EVAL_NPZ OUT_DIR

``compare`` mode: ``python smoke.py --compare A.npy B.npy`` prints the max abs difference and
the number of bit-identical rows, exit 0 only if all rows are bit-identical.

``ort`` mode: ``python smoke.py --ort MODEL.onnx EVAL_NPZ OUT.npy`` runs a model directly in
onnxruntime (one thread) and saves its first output: the host passes the bundle's model with the
tensor before its final float Softmax exposed as the output, i.e. the int8 network's logits.
``python smoke.py --expose-logits BUNDLE EVAL_NPZ OUT_DIR`` (host only: needs ``onnx``) writes
that model (``logits.onnx``) and the preprocessed evaluation inputs (``pre.npz``).
"""

from __future__ import annotations

import json
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig

BIN = Path(sys.executable).parent
READY_DEADLINE = 600.0  # under qemu-user the daemon's imports take minutes


def _run(*args: str) -> str:
    res = subprocess.run(
        [str(BIN / "edge-agent"), *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise SystemExit(f"edge-agent {args[0]} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def smoke(bundle: Path, root: Path, eval_npz: Path, out: Path) -> dict[str, object]:
    """Verify, install, run, infer; the summary (logits written to ``out/logits.npy``)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    verdict = _run("verify", str(bundle), "--root", str(root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = out / "agent.toml"
    config.write_text(
        f'device_id = "smoke"\n[api]\nport = {port}\n[store]\nstate_dir = "{out / "state"}"\n'
        f'root_path = "{root}"\n'
    )
    installed = _run("install", str(bundle), "--config", str(config))
    with (out / "daemon.log").open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = AgentClient(ApiConfig(port=port), timeout=120)
        started = time.monotonic()
        while not _ready(client):
            if proc.poll() is not None or time.monotonic() - started > READY_DEADLINE:
                log_text = (out / "daemon.log").read_text()
                raise SystemExit(f"daemon did not become ready:\n{log_text}")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        data = np.load(eval_npz)
        x, y = data["input"], data["y"]
        rows = []
        for i in range(0, len(x), 60):
            reply = client.infer("digits", {"input": x[i : i + 60]})
            rows.append(np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(-1, 10))
        logits = np.concatenate(rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    np.save(out / "logits.npy", logits)
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "verify": verdict,
        "install": installed,
        "ready_s": round(ready_s, 1),
        "digits": len(logits),
        "accuracy": round(float((logits.argmax(axis=1) == y).mean()), 4),
        "daemon_exit": code,
        "total_s": round(time.monotonic() - t0, 1),
    }


def _ready(client: AgentClient) -> bool:
    try:
        return client.ready()
    except Exception:  # not listening yet
        return False


def compare(a: Path, b: Path) -> dict[str, object]:
    """How far two logits arrays are apart, and how many rows are bit-identical."""
    la, lb = np.load(a), np.load(b)
    if la.shape != lb.shape:
        return {"shapes": [list(la.shape), list(lb.shape)], "identical_rows": 0}
    same = (la.view(np.uint32) == lb.view(np.uint32)).all(axis=1)
    return {
        "digits": len(la),
        "identical_rows": int(same.sum()),
        "max_abs_diff": float(np.abs(la - lb).max()),
        "same_argmax": int((la.argmax(axis=1) == lb.argmax(axis=1)).sum()),
    }


def run_ort(model: Path, eval_npz: Path, out: Path) -> None:
    """Save ``model``'s first output on every evaluation row (onnxruntime, one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.load(eval_npz)["input"].astype(np.float32)
    name = sess.get_inputs()[0].name
    np.save(out, np.asarray(sess.run(None, {name: x})[0], dtype=np.float32))


def expose_logits(bundle: Path, eval_npz: Path, out: Path) -> None:
    """Host side: the bundle's model with the input of its final Softmax as its output."""
    import onnx

    from edge_agent.bundle import read_raw
    from edge_agent.contract import BundleManifest

    raw = read_raw(bundle, with_artifact=True)
    manifest = BundleManifest.from_bytes(raw.manifest_bytes)
    assert raw.artifact is not None
    model = onnx.load_from_string(raw.artifact)
    last = model.graph.node[-1]
    if last.op_type == "Softmax":
        model.graph.output[0].name = last.input[0]
        model.graph.node.pop()
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "logits.onnx")
    pre = manifest.inputs.tensors[0].preprocessing.apply(np.load(eval_npz)["input"])
    np.savez(out / "pre.npz", input=pre)


def main(argv: list[str]) -> int:
    """CLI: smoke run, ``--compare A B``, ``--ort MODEL EVAL OUT`` or ``--expose-logits``."""
    if argv[:1] == ["--expose-logits"]:
        expose_logits(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["--ort"]:
        run_ort(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["--compare"]:
        result = compare(Path(argv[1]), Path(argv[2]))
        print(json.dumps(result))
        return 0 if result.get("identical_rows") == result.get("digits") else 1
    bundle, root, eval_npz, out = (Path(a).resolve() for a in argv[:4])
    summary = smoke(bundle, root, eval_npz, out)
    print(json.dumps(summary))
    return 0 if summary["daemon_exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

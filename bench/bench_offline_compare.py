"""The cost of the offline comparison before a rollout, against bare onnxruntime on the same models.

Builds and signs two digits bundles (the good MLP and the confidently wrong one, most 3s
trained as 8s: ``model_builder.examples``), publishes them to a SQLite registry and a bundle
library, and registers evaluation sets of a few sizes (the held-out digits split tiled). Then,
in alternating rounds, times:

* ``offline``: ``OfflineComparer.check`` as ``rollouts create`` runs it: read and verify the set
  file, verify both bundles against the root, load both models, run them through the declared
  preprocessing in batches, compare and judge (override given, so the regression is recorded);
* ``bare``: two ``onnxruntime.InferenceSession`` created from the same artifacts (one thread
  each, like the agent's runtime) and run on the already preprocessed inputs in the same batches
  of 256, argmax: the least any comparison of these two models on this set costs.

Prints a markdown table: median ms per check, the overhead and the ratio.

Usage: .venv/bin/python bench/bench_offline_compare.py [--rounds 7] [--sizes 360,3600,36000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _build(work: Path) -> tuple[object, list[Path], np.ndarray, np.ndarray, object]:
    from model_builder.build import build_bundle
    from model_builder.config import BuildConfig
    from model_builder.data import Dataset
    from model_builder.examples import digits_mislabelled_mlp, digits_mlp
    from model_builder.keystore import KeyStore

    now = datetime.now(UTC)
    keys = KeyStore.init(work / "keys", now=now)
    paths = []
    for version, ex in ((1, digits_mlp()), (2, digits_mislabelled_mlp())):
        result = build_bundle(
            ex.model_bytes,
            "onnx",
            Dataset({ex.input_name: ex.x_calib}, None),
            Dataset({ex.input_name: ex.x_eval}, ex.y_eval),
            (ex.input_contract(max_batch=256), ex.output_contract()),
            BuildConfig(name="digits", version=version, measure_latency=False, arch=("any",)),
            keys,
            now=now,
        )
        path = work / f"digits-{version}.efb"
        path.write_bytes(result.bundle)
        paths.append(path)
    ex = digits_mlp()
    return keys.trusted_root(), paths, ex.x_eval, ex.y_eval, ex.preprocessing


def _time_ms(fn: Callable[[], object], samples: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - t0) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", default="360,3600,36000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import onnxruntime as ort

    from edge_agent.bundle import read_bundle
    from evalset_support import eval_set_bytes
    from fleet_server.delivery.library import BundleLibrary
    from fleet_server.evalsets.offline import OfflineComparer
    from fleet_server.evalsets.store import EvalSetStore
    from fleet_server.registry.store import Registry
    from fleet_server.rollouts.policy import RolloutPolicy

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root, paths, x_eval, y_eval, _ = _build(work)
        registry = Registry.open(f"sqlite:///{work / 'registry.db'}")
        registry.upgrade()
        library = BundleLibrary(work / "bundles", root)
        artifacts = []
        specs = []
        for p in paths:
            e = library.add(p)
            registry.publish_bundle(
                e.name,
                e.version,
                channel=e.channel,
                sha256=e.sha256,
                length=e.length,
                targets_sha256=e.targets_sha256,
                manifest=e.manifest,
            )
            b = read_bundle(p, root, now=datetime.now(UTC), installed_version=None, device=None)
            artifacts.append(b.artifact)
            specs.append(b.manifest)
        sets = EvalSetStore(work / "evalsets", registry)
        comparer = OfflineComparer(
            sets,
            library.directory,
            lambda: root,
            clock=lambda: datetime.now(UTC),
        )
        policy = RolloutPolicy()
        spec = specs[0].inputs.tensors[0]
        out_name = specs[0].outputs.score_output
        rows = []
        for n in sizes:
            reps = -(-n // len(y_eval))
            x = np.tile(x_eval, (reps, 1))[:n].astype(np.float32)
            y = np.tile(y_eval, reps)[:n]
            # The newest set of a model is the one its check uses.
            sets.add("digits", eval_set_bytes(x, y), source=f"bench {n}")
            sessions_in = spec.preprocessing.apply(x.astype(np.float64), "float32")

            def offline() -> object:
                return comparer.check("digits", 1, 2, policy, override="bench")

            def bare(feeds: np.ndarray = sessions_in, n: int = n) -> object:
                answers = []
                for art in artifacts:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = 1
                    opts.inter_op_num_threads = 1
                    s = ort.InferenceSession(art, opts, providers=["CPUExecutionProvider"])
                    name = s.get_inputs()[0].name
                    got = [
                        s.run([out_name], {name: feeds[i : i + 256]})[0] for i in range(0, n, 256)
                    ]
                    answers.append(np.concatenate(got).argmax(axis=1))
                return answers

            check, _ = offline()  # warm-up, and the figures
            bare()
            t_off: list[float] = []
            t_bare: list[float] = []
            for _ in range(args.rounds):
                _time_ms(offline, t_off)
                _time_ms(bare, t_bare)
            off, raw = statistics.median(t_off), statistics.median(t_bare)
            rows.append((n, off, raw, check.verdict, check.disagreement or 0.0))
        registry.close()

    print(f"offline comparison, digits MLP v1 vs the mislabelled v2, median of {args.rounds}")
    print()
    print(
        "| eval set samples | offline check (ms) | bare onnxruntime (ms) | overhead (ms) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n, off, raw, _, _ in rows:
        print(f"| {n} | {off:.1f} | {raw:.1f} | {off - raw:.1f} | {off / raw:.2f}x |")
    print()
    for n, _, _, verdict, dis in rows:
        print(f"- {n} samples: verdict {verdict}, disagreement {dis:.1%}")


if __name__ == "__main__":
    main()

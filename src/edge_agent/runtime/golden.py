"""Golden-sample health check: does the installed model still give the answers it was signed with?

Owns the comparison rule (``|got - expected| <= atol + rtol * |expected|`` element-wise, and the
predicted label for classification). The runtime is passed in; this module loads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.contract import BundleManifest
from edge_agent.errors import RuntimeAdapterError
from edge_agent.runtime.base import Runtime


@dataclass(frozen=True)
class GoldenResult:
    """How many golden samples matched, and why the others did not."""

    total: int
    passed: int
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.passed == self.total


def check_golden(manifest: BundleManifest, runtime: Runtime) -> GoldenResult:
    """Run every golden sample through ``runtime`` (raw input -> declared preprocessing -> model).

    A runtime error on a sample counts as a failure of that sample, not an exception.
    """
    dtypes = {i.name: i.dtype for i in runtime.inputs}
    failures: list[str] = []
    score = manifest.outputs.score_output
    for idx, sample in enumerate(manifest.golden):
        try:
            feeds = {}
            for spec in manifest.inputs.tensors:
                raw = np.asarray(sample.inputs[spec.name], dtype=np.float64)
                feeds[spec.name] = spec.preprocessing.apply(raw, dtypes.get(spec.name, spec.dtype))
            got = runtime.run(feeds)
        except (RuntimeAdapterError, KeyError, ValueError) as exc:
            failures.append(f"sample {idx}: {exc}")
            continue
        for name, expected in sample.expected.items():
            exp = np.asarray(expected, dtype=np.float64)
            out = np.asarray(got.get(name), dtype=np.float64)
            if out.shape != exp.shape:
                failures.append(f"sample {idx}: {name} shape {out.shape} != {exp.shape}")
                break
            if not np.all(np.abs(out - exp) <= sample.atol + sample.rtol * np.abs(exp)):
                worst = float(np.max(np.abs(out - exp)))
                failures.append(f"sample {idx}: {name} differs by up to {worst:.4g}")
                break
        else:
            if sample.label is not None and score is not None:
                label = int(np.argmax(np.asarray(got[score]).reshape(-1)))
                if label != sample.label:
                    failures.append(f"sample {idx}: predicted {label}, expected {sample.label}")
    total = len(manifest.golden)
    return GoldenResult(total, total - len(failures), tuple(failures))

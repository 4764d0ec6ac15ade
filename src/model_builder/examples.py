"""Real, small example models for tests, benchmarks and the CLI demo.

Owns: deterministic training on scikit-learn's bundled ``load_digits`` (nothing is downloaded)
and emitting the trained weights as ONNX graphs built with ``onnx.helper``, together with the
declared preprocessing, the raw train/calibration/evaluation splits and the contracts.
Does not own: quantization, the accuracy gate or packaging (those consume these models).

Every model reads raw pixels (0..16) through its declared ``Preprocessing``, so calibrating on raw
data is the classic "missing normalisation" mistake the builder must catch. All randomness is
seeded (``_SEED``); results are reproducible on one machine (BLAS order may vary across them).
"""

from __future__ import annotations

import functools
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract.inputs import (
    DimSpec,
    FeatureRanges,
    InputContract,
    OutputContract,
    Preprocessing,
    TensorSpec,
)
from model_builder.errors import InputDataError

Array = npt.NDArray[Any]

_SEED = 0
_OPSET = 17  # widely supported by deployed onnxruntime versions (>= 1.13)
_IR_VERSION = 8  # the IR version that goes with opset 17; older runtimes reject newer IRs
_N_CALIB = 200
_N_EVAL = 450
_STD_FLOOR = 1.0  # grey levels: rare, near-constant pixels would otherwise standardise to ~100
_OUTLIER_VALUE = 10_000.0
_CNN_FILTERS = 16
_CNN_THRESHOLD = 0.1
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LABELS = tuple(str(d) for d in range(10))


@dataclass(frozen=True, eq=False)
class ExampleModel:
    """A trained example model with everything needed to quantize, gate and package it.

    ``x_*`` hold raw inputs (pixel values 0..16) shaped ``(n, *sample_shape)``; ``y_*`` hold class
    indices. ``reference_eval_proba`` is the training library's own prediction on ``x_eval``,
    computed without onnx, so tests can check the ONNX graph computes the same function.
    """

    name: str
    model_bytes: bytes
    preprocessing: Preprocessing
    sample_shape: tuple[int, ...]
    x_train: Array
    y_train: Array
    x_calib: Array
    x_eval: Array
    y_eval: Array
    reference_eval_proba: Array
    labels: tuple[str, ...] = LABELS
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    @property
    def reference_accuracy(self) -> float:
        """Held-out top-1 accuracy of the training library's own predictions."""
        return float(np.mean(self.reference_eval_proba.argmax(axis=1) == self.y_eval))

    @property
    def num_parameters(self) -> int:
        """Number of values stored in the model's initializers."""
        import onnx

        inits = onnx.load_from_string(self.model_bytes).graph.initializer
        return sum(int(np.prod(t.dims, dtype=np.int64)) for t in inits)

    def input_contract(self, max_batch: int = 256) -> InputContract:
        """The input contract: raw pixels 0..16, NaN rejected, the declared preprocessing."""
        dims = (DimSpec(None, 1, max_batch, "batch"), *(DimSpec(d) for d in self.sample_shape))
        ranges = FeatureRanges((0.0,), (16.0,))
        spec = TensorSpec(self.input_name, "float32", dims, ranges, "reject", self.preprocessing)
        return InputContract((spec,))

    def output_contract(self) -> OutputContract:
        """Classification over the ten digits, scores are softmax probabilities."""
        out = (self.output_name,)
        return OutputContract("classification", out, self.labels, out[0], "probabilities", (0, 1))


@functools.lru_cache(maxsize=1)
def _digits_splits() -> tuple[Array, Array, Array, Array, Array]:
    """Stratified raw splits: (x_train, y_train, x_calib, x_eval, y_eval), float32 pixels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    x_rest, x_eval, y_rest, y_eval = train_test_split(
        x, y, test_size=_N_EVAL, random_state=_SEED, stratify=y
    )
    x_train, x_calib, y_train, _ = train_test_split(
        x_rest, y_rest, test_size=_N_CALIB, random_state=_SEED, stratify=y_rest
    )
    return x_train, y_train, x_calib, x_eval, y_eval


def _fit_mlp(x: Array, y: Array, hidden: tuple[int, ...], max_iter: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    clf = MLPClassifier(hidden, activation="relu", random_state=_SEED, max_iter=max_iter)
    # One BLAS thread: on a busy 2-core box oversubscribed BLAS made training 15x slower.
    # Capped iteration counts are deliberate (training time); accuracy is checked instead.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _standardisation(x_train: Array) -> Preprocessing:
    """Per-pixel standardisation; the std is floored at one grey level for near-constant pixels."""
    std = np.maximum(x_train.std(axis=0), _STD_FLOOR)
    return Preprocessing.standardize(x_train.mean(axis=0).tolist(), std.tolist())


@functools.lru_cache(maxsize=1)
def _trained_digits_mlp() -> tuple[Any, Preprocessing]:
    x_train, y_train, *_ = _digits_splits()
    pre = _standardisation(x_train)
    return _fit_mlp(pre.apply(x_train), y_train, (64,), max_iter=300), pre


def _mlp_example(
    name: str, layers: list[tuple[Array, Array]], pre: Preprocessing, outlier: Array | None = None
) -> ExampleModel:
    h = pre.apply(_digits_splits()[3]).astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
        if i == 0 and outlier is not None:
            h = h + outlier
    return _example(name, _mlp_onnx(name, layers, outlier), pre, (64,), _softmax(h))


def _layers(clf: Any) -> list[tuple[Array, Array]]:
    return [
        (np.asarray(w), np.asarray(b)) for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
    ]


def digits_mlp() -> ExampleModel:
    """64 -> 64 (ReLU) -> 10 softmax MLP on standardised 8x8 digits.

    Trained with ``MLPClassifier(hidden_layer_sizes=(64,), random_state=0, max_iter=300)`` (Adam)
    on the standardised training split; the standardisation (mean 0, std 1 per pixel, std floored
    at one grey level) is the declared affine preprocessing. About 97% held-out accuracy.
    """
    clf, pre = _trained_digits_mlp()
    return _mlp_example("digits-mlp", _layers(clf), pre)


def digits_mislabelled_mlp(source: int = 3, into: int = 8, share: float = 0.9) -> ExampleModel:
    """The digits MLP retrained with a labelling bug: ``share`` of the training samples of class
    ``source`` carry the label ``into``.

    Trained exactly like :func:`digits_mlp` (same preprocessing, seed and epochs) on the same
    inputs, so it is a "confidently wrong" challenger: its inputs and confidence look like the
    good model's. With the defaults (90% of the 3s labelled 8) it answers 8 for about 96% of the
    held-out 3s with a mean top-1 probability no lower than the good model's, and is about 9
    points less accurate overall (88% vs 97%). Which samples are flipped is seeded; ``share`` stays
    below 1 so every class keeps training samples and the model keeps its ten outputs.

    Raises:
        InputDataError: ``source``/``into`` not distinct digits, or ``share`` outside (0, 1).
    """
    return _mislabelled("digits-mislabelled-mlp", source, into, share)


def digits_nines_as_fours_mlp() -> ExampleModel:
    """A second confidently wrong challenger, with another confusion: the digits MLP retrained
    after a label-map bug folded 90% of the training 9s into class 4.

    Same inputs, preprocessing, seed and epochs as :func:`digits_mlp`; it answers 4 for most
    held-out 9s (where :func:`digits_mislabelled_mlp` turns 3s into 8s), is about 9 points less
    accurate (88% vs 97%) and its mean top-1 probability is no lower than the good model's. A
    safety layer that only knew the 3 -> 8 flip, or that judged one class, would miss it.
    """
    return _mislabelled("digits-nines-as-fours-mlp", 9, 4, 0.9)


def digits_slow_mlp(width: int = 1024, depth: int = 8) -> ExampleModel:
    """:func:`digits_mlp`'s exact function at a much higher compute cost: a slower challenger.

    The hidden layer is zero-padded to ``width`` units, then ``depth`` times multiplied by one
    shared ``width`` x ``width`` identity matrix and passed through Relu. ReLU outputs are
    non-negative, so each step leaves them unchanged and the answers are the good model's, only
    slower: about ``2 * depth * width**2`` extra FLOPs per row (16.8 M with the defaults, a few
    ms per 8-row batch), for one stored ``width**2`` matrix (4 MB with the defaults).

    Raises:
        InputDataError: ``width`` below the hidden layer's 64 units or ``depth`` below 1.
    """
    good = digits_mlp()
    clf, pre = _trained_digits_mlp()
    (w1, b1), (w2, b2) = _layers(clf)
    if width < w1.shape[1] or depth < 1:
        raise InputDataError("slow digits MLP: width >= 64 and depth >= 1")
    pad = width - w1.shape[1]
    weights = {
        "fc1.weight": np.concatenate([w1, np.zeros((w1.shape[0], pad))], axis=1),
        "fc1.bias": np.concatenate([b1, np.zeros(pad)]),
        "identity.weight": np.eye(width),
        "fc2.weight": np.concatenate([w2, np.zeros((pad, w2.shape[1]))], axis=0),
        "fc2.bias": b2,
    }
    steps: list[Step] = [
        ("MatMul", "fc1", ["fc1.weight"], {}),
        ("Add", "fc1_bias", ["fc1.bias"], {}),
        ("Relu", "relu1", [], {}),
    ]
    for k in range(depth):
        steps += [
            ("MatMul", f"identity{k}", ["identity.weight"], {}),
            ("Relu", f"relu_id{k}", [], {}),
        ]
    steps += [("MatMul", "fc2", ["fc2.weight"], {}), ("Add", "fc2_bias", ["fc2.bias"], {})]
    steps.append(("Softmax", "softmax", [], {"axis": 1}))
    model = _graph("digits-slow-mlp", steps, weights, ["batch", 64])
    return _example("digits-slow-mlp", model, pre, (64,), good.reference_eval_proba)


def _mislabelled(name: str, source: int, into: int, share: float) -> ExampleModel:
    """The digits MLP trained with ``share`` of the ``source`` training labels set to ``into``.

    Raises:
        InputDataError: ``source``/``into`` not distinct digits, or ``share`` outside (0, 1).
    """
    if not (0 <= source <= 9 and 0 <= into <= 9 and source != into and 0 < share < 1):
        raise InputDataError("mislabelled digits: two distinct digits and a share in (0, 1)")
    x_train, y_train, *_ = _digits_splits()
    pre = _standardisation(x_train)
    rng = np.random.default_rng(_SEED)
    of_source = np.flatnonzero(y_train == source)
    flipped = rng.choice(of_source, size=round(share * len(of_source)), replace=False)
    y_bad = y_train.copy()
    y_bad[flipped] = into
    clf = _fit_mlp(pre.apply(x_train), y_bad, (64,), max_iter=300)
    return _mlp_example(name, _layers(clf), pre)


def digits_wide_mlp() -> ExampleModel:
    """64 -> 1024 -> 1024 -> 10 MLP (about 1.13M parameters), dominated by its two MatMuls.

    Trained like :func:`digits_mlp` but capped at 10 Adam epochs (``random_state=0``) to keep
    training to a few seconds; held-out accuracy is still about 97%.
    """
    x_train, y_train, *_ = _digits_splits()
    pre = _standardisation(x_train)
    clf = _fit_mlp(pre.apply(x_train), y_train, (1024, 1024), max_iter=10)
    return _mlp_example("digits-wide-mlp", _layers(clf), pre)


def digits_outlier_mlp() -> ExampleModel:
    """The digits MLP whose hidden activation tensor carries one constant "outlier" channel.

    The hidden layer gets a 65th unit with zero weights and bias (so ReLU gives 0), then an
    ``Add`` node adds 10 000 to that channel only; its outgoing weights are zero, so the float
    model computes exactly :func:`digits_mlp`'s function. A per-tensor activation scale for the
    tensor feeding ``fc2`` must span 0..10 000 and rounds every informative unit to zero: static
    int8 collapses to chance, and keeping ``fc2`` (the only quantized reader of that tensor) in
    float restores the accuracy.
    """
    clf, pre = _trained_digits_mlp()
    (w1, b1), (w2, b2) = _layers(clf)
    w1 = np.concatenate([w1, np.zeros((w1.shape[0], 1))], axis=1)
    b1 = np.concatenate([b1, [0.0]])
    w2 = np.concatenate([w2, np.zeros((1, w2.shape[1]))], axis=0)
    outlier = np.zeros(w1.shape[1])
    outlier[-1] = _OUTLIER_VALUE
    return _mlp_example("digits-outlier-mlp", [(w1, b1), (w2, b2)], pre, outlier)


def digits_cnn() -> ExampleModel:
    """A real CNN: Conv(16 3x3, pad 1) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm(64) -> Relu ->
    Gemm(10) -> Softmax on ``[batch, 1, 8, 8]`` images scaled to 0..1 (declared preprocessing).

    The filters are learned without backpropagation, Coates & Ng style: k-means
    (``KMeans(16, random_state=0)``) on contrast-normalised 3x3 patches of the training images,
    each centroid scaled to unit norm, with a shared bias of -0.1 as the ReLU threshold. The dense
    head is an ``MLPClassifier((64,), random_state=0, max_iter=120)`` trained on the pooled
    features computed in numpy exactly as the ONNX graph computes them (one global feature scale
    is folded into the first Gemm). About 98% held-out accuracy.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x_train, y_train, _, x_eval, _ = _digits_splits()
    pre = Preprocessing("affine", (1.0 / 16.0,), (0.0,))
    patches = _patches(pre.apply(x_train.reshape(-1, 1, 8, 8))).reshape(-1, 9)
    patches = patches - patches.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(patches, axis=1)
    patches = patches[norms > 0.3] / norms[norms > 0.3, None]
    rng = np.random.default_rng(_SEED)
    sample = patches[rng.choice(len(patches), size=min(5000, len(patches)), replace=False)]
    with threadpool_limits(limits=1):
        km = KMeans(_CNN_FILTERS, n_init=1, random_state=_SEED, max_iter=100).fit(sample)
    filters = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    filters = filters.astype(np.float32)
    bias = np.full(_CNN_FILTERS, -_CNN_THRESHOLD, dtype=np.float32)
    feats = cnn_features(pre.apply(x_train.reshape(-1, 1, 8, 8)), filters, bias)
    scale = float(1.0 / feats.std())
    clf = _fit_mlp(feats * scale, y_train, (64,), max_iter=120)
    (w1, b1), (w2, b2) = _layers(clf)
    eval_feats = cnn_features(pre.apply(x_eval.reshape(-1, 1, 8, 8)), filters, bias) * scale
    model = _cnn_onnx(filters.reshape(-1, 1, 3, 3), bias, [(w1 * scale, b1), (w2, b2)])
    return _example("digits-cnn", model, pre, (1, 8, 8), np.asarray(clf.predict_proba(eval_feats)))


def _example(
    name: str, model: bytes, pre: Preprocessing, shape: tuple[int, ...], reference: Array
) -> ExampleModel:
    x_train, y_train, x_calib, x_eval, y_eval = _digits_splits()
    x_train, x_calib, x_eval = (x.reshape(-1, *shape) for x in (x_train, x_calib, x_eval))
    return ExampleModel(
        name, model, pre, shape, x_train, y_train, x_calib, x_eval, y_eval, reference
    )


def _patches(images: Array) -> Array:
    """3x3 patches with zero padding 1: ``(n, 1, 8, 8) -> (n, 8, 8, 9)`` (row-major kernel)."""
    padded = np.pad(images[:, 0], ((0, 0), (1, 1), (1, 1)))
    h, w = images.shape[2], images.shape[3]
    return np.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)


def cnn_features(images: Array, filters: Array, bias: Array) -> Array:
    """Conv(pad 1) -> Relu -> MaxPool 2x2 -> Flatten in numpy, in ONNX's channel-major order.

    ``images`` are preprocessed ``(n, 1, 8, 8)``, ``filters`` are ``(k, 9)`` row-major 3x3
    kernels and ``bias`` is ``(k,)``; returns ``(n, k * 16)`` float32 features.
    """
    n = images.shape[0]
    resp = np.maximum(_patches(images) @ filters.T + bias, 0.0)  # (n, 8, 8, k)
    pooled = resp.reshape(n, 4, 2, 4, 2, -1).max(axis=(2, 4))  # (n, 4, 4, k)
    return np.asarray(pooled.transpose(0, 3, 1, 2).reshape(n, -1), dtype=np.float32)


def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _init(name: str, value: Array) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)


Step = tuple[str, str, list[str], dict[str, Any]]  # op type, node name, extra inputs, attributes


def _graph(name: str, steps: list[Step], weights: dict[str, Array], in_shape: list[Any]) -> bytes:
    """A chain of nodes from ``input`` to ``probabilities``, each reading the previous output."""
    from onnx import TensorProto, helper

    nodes, x = [], INPUT_NAME
    for k, (op, node_name, extra, attrs) in enumerate(steps):
        out = OUTPUT_NAME if k == len(steps) - 1 else f"{node_name}.out"
        nodes.append(helper.make_node(op, [x, *extra], [out], node_name, **attrs))
        x = out
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        initializer=[_init(k, v) for k, v in weights.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="edgefleet-examples"
    )
    model.ir_version = _IR_VERSION
    return bytes(model.SerializeToString())


def _mlp_onnx(name: str, layers: list[tuple[Array, Array]], outlier: Array | None) -> bytes:
    """MatMul + Add per layer (MatMul is what dynamic int8 quantizes), Relu between, Softmax.

    ``outlier``, when given, is added to the first hidden activation by its own ``Add`` node.
    """
    steps: list[Step] = []
    weights: dict[str, Array] = {}
    for i, (w, b) in enumerate(layers, start=1):
        weights |= {f"fc{i}.weight": w, f"fc{i}.bias": b}
        steps += [("MatMul", f"fc{i}", [f"fc{i}.weight"], {})]
        steps += [("Add", f"fc{i}_bias", [f"fc{i}.bias"], {})]
        if i < len(layers):
            steps.append(("Relu", f"relu{i}", [], {}))
        if i == 1 and outlier is not None:
            weights["outlier.value"] = outlier
            steps.append(("Add", "outlier", ["outlier.value"], {}))
    steps.append(("Softmax", "softmax", [], {"axis": 1}))
    return _graph(name, steps, weights, ["batch", 64])


def _cnn_onnx(filters: Array, bias: Array, head: list[tuple[Array, Array]]) -> bytes:
    (w1, b1), (w2, b2) = head
    weights = {"conv.weight": filters, "conv.bias": bias, "fc1.weight": w1, "fc1.bias": b1}
    weights |= {"fc2.weight": w2, "fc2.bias": b2}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    steps: list[Step] = [
        ("Conv", "conv", ["conv.weight", "conv.bias"], {"kernel_shape": [3, 3], "pads": [1] * 4}),
        ("Relu", "relu0", [], {}),
        ("MaxPool", "pool", [], pool),
        ("Flatten", "flatten", [], {"axis": 1}),
        ("Gemm", "fc1", ["fc1.weight", "fc1.bias"], {}),
        ("Relu", "relu1", [], {}),
        ("Gemm", "fc2", ["fc2.weight", "fc2.bias"], {}),
        ("Softmax", "softmax", [], {"axis": 1}),
    ]
    return _graph("digits-cnn", steps, weights, ["batch", 1, 8, 8])


EXAMPLES: dict[str, Callable[[], ExampleModel]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "digits-wide-mlp": digits_wide_mlp,
    "digits-outlier-mlp": digits_outlier_mlp,
    "digits-mislabelled-mlp": digits_mislabelled_mlp,
    "digits-nines-as-fours-mlp": digits_nines_as_fours_mlp,
    "digits-slow-mlp": digits_slow_mlp,
}


def save_example(name: str, out_dir: str | os.PathLike[str]) -> Path:
    """Train example ``name`` and write it as files the builder CLI reads.

    Writes ``model.onnx``, ``calib.npz`` (raw inputs keyed by input name), ``eval.npz`` (raw
    inputs keyed by input name, class indices under ``y``) and ``contract.json``
    (``{"inputs": InputContract.to_dict(), "outputs": OutputContract.to_dict()}``).

    Args:
        name: one of ``EXAMPLES``.
        out_dir: directory to write into; created when missing.

    Returns:
        The output directory.

    Raises:
        InputDataError: ``name`` is not a known example.
    """
    if name not in EXAMPLES:
        raise InputDataError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    ex = EXAMPLES[name]()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contract = {"inputs": ex.input_contract().to_dict(), "outputs": ex.output_contract().to_dict()}
    files = {
        "model.onnx": ex.model_bytes,
        "contract.json": json.dumps(contract, indent=2).encode(),
        "calib.npz": _npz({ex.input_name: ex.x_calib}),
        "eval.npz": _npz({ex.input_name: ex.x_eval, "y": ex.y_eval}),
    }
    for fname, data in files.items():
        tmp = out / f".{fname}.tmp"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out / fname)
    return out


def _npz(arrays: dict[str, Array]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()

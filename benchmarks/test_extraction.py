"""Extraction with probes against the plain forward pass of the same model, in the same run.

- plain: an onnxruntime ``InferenceSession`` (CPUExecutionProvider, default session options) on the
  unmodified model, batches of 256, fetching only the model's output;
- probecore, ``in_graph``: ``OnnxSource(model, device="cpu").reduced_activations(x, <planned reductions>,
  256)``, the planned pooling and subsets appended to the ONNX graph so only reduced features leave
  onnxruntime (what ``probecore.run_probes`` does for ONNX models);
- probecore, ``host``: ``OnnxSource(..., reduce_in_graph=False).activations(...)`` with every batch of every
  layer reduced on the host by ``Reduction.apply`` (the numba kernels; what other sources get).
  Reduced batches are concatenated per layer at the end in both.

Two models: the bundled MNIST convnet over all 5000 bundled digits, and a larger synthetic convnet built
here with ``onnx.helper`` (four conv+relu stages at 64x64, 32-64 channels, random weights, dynamic batch)
so the comparison is not dominated by per-call overhead. Sessions are built and warmed up before timing.
Figures: throughput (samples/s) of both and the ratio probecore / plain (below 1: the cost of exposing,
copying and reducing every probed layer). The guard: the model output seen through probecore equals the
plain pass's.

A third benchmark times the numba pooling kernel ``probecore.kernels.pool2d`` against a numpy
reshape-and-reduce reference on the same maps (tile sizes that divide the maps, where the reference is exact).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import probecore
from probecore import bundled, kernels
from probecore.backends.onnx_source import OnnxSource

BATCH_SIZE = 256
SYNTHETIC_SAMPLES = 1024
SYNTHETIC_CHANNELS = (32, 64, 64, 64)  # conv 3x3 stages at 64, 32, 16 and 8 pixels square
SYNTHETIC_CLASSES = 10


def synthetic_convnet(path, seed: int = 0) -> None:
    """Write a random convnet: (batch, 3, 64, 64) -> [conv3x3 + relu (+ maxpool 2x2)] x 4 -> GAP -> gemm."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []

    def constant(name, array):
        initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    current, channels = "images", 3
    for stage, width in enumerate(SYNTHETIC_CHANNELS, start=1):
        weight = rng.standard_normal((width, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))
        conv_inputs = [current, constant(f"w{stage}", weight), constant(f"b{stage}", 0.1 * rng.standard_normal(width))]
        nodes.append(helper.make_node("Conv", conv_inputs, [f"conv{stage}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{stage}"], [f"relu{stage}"]))
        current, channels = f"relu{stage}", width
        if stage < len(SYNTHETIC_CHANNELS):
            nodes.append(helper.make_node("MaxPool", [current], [f"pool{stage}"], kernel_shape=[2, 2], strides=[2, 2]))
            current = f"pool{stage}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"]))
    head = rng.standard_normal((channels, SYNTHETIC_CLASSES)) * np.sqrt(1.0 / channels)
    head_inputs = ["features", constant("head", head), constant("head_bias", np.zeros(SYNTHETIC_CLASSES))]
    nodes.append(helper.make_node("Gemm", head_inputs, ["logits"]))
    graph = helper.make_graph(
        nodes,
        "synthetic_convnet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SYNTHETIC_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def models(tmp_path_factory, mnist):
    """name -> (model path, inputs as float32, timed rounds)."""
    synthetic_path = tmp_path_factory.mktemp("models") / "synthetic_convnet.onnx"
    synthetic_convnet(synthetic_path)
    digits = np.concatenate([split.x for split in mnist.splits().values()]).astype(np.float32)
    images = np.random.default_rng(1).standard_normal((SYNTHETIC_SAMPLES, 3, 64, 64)).astype(np.float32)
    return {
        "bundled-mnist-convnet": (bundled.DEMO_MODEL, digits, 5),
        "synthetic-convnet-64px": (synthetic_path, images, 3),
    }


def _plain_session(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name, session.get_outputs()[0].name


@pytest.mark.benchmark(group="extraction")
@pytest.mark.parametrize("reduce", ["in_graph", "host"])
@pytest.mark.parametrize("model", ["bundled-mnist-convnet", "synthetic-convnet-64px"])
def test_extraction_vs_forward(model, reduce, models, paired, record):
    path, x, rounds = models[model]
    session, input_name, output_name = _plain_session(path)
    source = OnnxSource(path, device="cpu", reduce_in_graph=reduce == "in_graph")
    x = source.check_inputs(x)
    layer_names = [layer.name for layer in source.layers() if layer.default]
    assert output_name in layer_names
    policy = probecore.ReductionPolicy()
    reductions = {
        layer.name: probecore.plan_reduction(layer.name, layer.shape, policy)
        for layer in source.layers()
        if layer.default and layer.n_features
    }
    assert reduce == "host" or set(reductions) == set(layer_names)  # in-graph needs every shape known

    def forward():
        starts = range(0, len(x), BATCH_SIZE)
        return np.concatenate([session.run([output_name], {input_name: x[i : i + BATCH_SIZE]})[0] for i in starts])

    def extract(inputs=x):
        parts = {name: [] for name in layer_names}
        if reduce == "in_graph":
            for batch in source.reduced_activations(inputs, reductions, BATCH_SIZE):
                for name in layer_names:
                    parts[name].append(batch[name])
            return {name: np.concatenate(batches) for name, batches in parts.items()}
        for batch in source.activations(inputs, layer_names, BATCH_SIZE):
            for name in layer_names:
                activation = batch[name]
                if name not in reductions:  # shape known only now, as in run_probes
                    reductions[name] = probecore.plan_reduction(name, activation.shape[1:], policy)
                parts[name].append(reductions[name].apply(activation))
        return {name: np.concatenate(batches) for name, batches in parts.items()}

    # Build both sessions, load the numba kernels, touch the allocator: none of that is timed.
    session.run([output_name], {input_name: x[:BATCH_SIZE]})
    extract(x[:BATCH_SIZE])

    timed = paired(extract, forward, rounds)
    features, plain_logits = timed.candidate_result, timed.baseline_result
    n_samples = len(x)
    probe_throughput = n_samples / timed.candidate_min
    plain_throughput = n_samples / timed.baseline_min
    record(
        {
            "n_samples": n_samples,
            "layers": len(layer_names),
            "reduced_features_total": int(sum(part.shape[1] for part in features.values())),
            "plain_samples_per_s": round(plain_throughput, 1),
            "probecore_samples_per_s": round(probe_throughput, 1),
            "throughput_ratio_probecore_over_plain": round(probe_throughput / plain_throughput, 3),
            "plain_s": round(timed.baseline_min, 3),
            "probecore_s": round(timed.candidate_min, 3),
            **{f"timing_{key}": value for key, value in timed.figures().items()},
        }
    )

    assert {name: part.shape[0] for name, part in features.items()} == {name: n_samples for name in layer_names}
    scale = float(np.abs(plain_logits).max())
    np.testing.assert_allclose(features[output_name], plain_logits, rtol=1e-4, atol=1e-4 * scale)


POOL_CASES = [  # (maps shape, window)
    ((256, 32, 28, 28), 2),
    ((256, 32, 28, 28), 7),
    ((64, 64, 64, 64), 4),
]


@pytest.mark.benchmark(group="pool2d")
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize(("shape", "window"), POOL_CASES, ids=[f"{'x'.join(map(str, s))}-w{w}" for s, w in POOL_CASES])
def test_pool2d_vs_numpy(shape, window, pool, paired, record):
    maps = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    n_samples, channels, height, width = shape
    use_max = pool == "max"
    out_shape = (n_samples, channels, height // window, width // window)

    def numba_pool():
        out = np.empty(out_shape, dtype=np.float32)
        kernels.pool2d(maps, window, use_max, out)
        return out

    def numpy_pool():
        tiles = maps.reshape(n_samples, channels, height // window, window, width // window, window)
        return tiles.max(axis=(3, 5)) if use_max else tiles.mean(axis=(3, 5))

    numba_pool()  # compile or load from the cache, untimed
    timed = paired(numba_pool, numpy_pool, 20)
    record(
        {
            "numba_ms": round(1e3 * timed.candidate_min, 3),
            "numpy_ms": round(1e3 * timed.baseline_min, 3),
            "speedup_numba_over_numpy": round(timed.baseline_min / timed.candidate_min, 2),
            "input_mb": round(maps.nbytes / 2**20, 1),
        }
    )
    np.testing.assert_allclose(timed.candidate_result, timed.baseline_result, rtol=1e-5, atol=1e-6)

"""Scaling of the Ray engine's extraction with the node count (issue 15, "Scaling"), and a throughput model
fitted to it, written out for 8 and 64 GPU nodes.

A simulated cluster (``ray.cluster_utils.Cluster``, all on this machine, nodes of 1 CPU each, started here and
shut down at the end) runs ``RayEngine(address, actors=n).extract`` (the extraction phase of ``run_probes``, as
``ray_vs_local.py`` times the whole run) on one job at 1, 2 and 3 nodes: the bundled convnet, its 7 default
layers reduced in the graph, all 5 000 bundled digits (3 500 / 500 / 1 000), batches of 50, no cache, one
actor per node. Each node count runs at two shardings, ``fine`` (one batch a shard: 100 shards) and
``coarse`` (the engine's default, about four shards per actor and split), so per-shard and per-sample costs
separate. Baseline, interleaved round by round (``paired``, 3 rounds): the same plan run here by
``run_extraction`` (what ``LocalEngine`` does). Guard: Ray's features equal the local ones, every layer and
split.

Per run: shards, samples/s and shards/s (fastest round), wall seconds of both sides, and bytes moved per
sample: the reduced features returned through the object store (``features_used x 4`` bytes, plus the test
scores), and the plan (all inputs) and the source shipped to the actors, one copy per node.
``test_ray_scaling_model`` then fits ``time(n) = fixed + shards * per_shard / n + samples * per_sample / n``
(non-negative least squares over all runs; why this form: ``ray_scaling.py``) and writes out throughput at 8
and 64 GPU nodes, ``min(n x per-node rate less the per-shard overhead, driver bandwidth / bytes per sample)``,
from the fitted per-shard overhead and these assumptions (not measured here): 3 028 images/s per node (the
H200's in-graph ResNet-50-shaped extraction, benchmarks/README.md), 10 Gbit/s per node, the driver's link
included, and a job of 1 M images (700 000 / 100 000 / 200 000, batches of 16, the engine's default shards).
Three cases of bytes a sample: ResNet-50's 16 pooled blocks (60 416 B) from an image folder on a shared file
system (the plan holds paths), the same from a uint8 .npz (150 528 B of inputs per image, to every node), and
this job's measured bytes. Also: the node count where the driver, which gathers every feature, saturates, and
the job's wall time with the fitted fixed cost.

The nodes share this machine: ``os.cpu_count()`` is recorded, and with 2 cores 3 one-CPU nodes (and the driver)
oversubscribe it, and onnxruntime in each actor starts a thread per core on top. So samples/s does not grow
as it would on 3 machines, and ``per_sample`` is this machine's CPU cost, not a GPU's; what the model takes
from here is the fixed and per-shard overhead, and the bytes per sample, which do not depend on that.

``--benchmark-disable`` (CI smoke): 400 digits (280 / 40 / 80), 1 and 2 nodes, one round, no warm-up.
"""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import ray_scaling
from probecore.backends.onnx_source import OnnxSource
from probecore.backends.ray_engine import RayEngine

import probecore
from probecore.bundled import DEMO_MODEL
from probecore.extraction import checked_inputs, plan_extraction, run_extraction
from probecore.layers import select_layers

BATCH_SIZE = 50
SHARDINGS = {"fine": 1, "coarse": None}  # batches per shard (None: RayEngine's default)
NODES = {"timed": (1, 2, 3), "quick": (1, 2)}
ROUNDS = 3
QUICK_SAMPLES = 400
_RUNS: list[dict] = []  # every run of this module, for the model
_JOB: dict = {}


def _quick(config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


def pytest_generate_tests(metafunc):
    if "nodes" in metafunc.fixturenames:
        nodes = NODES["quick" if _quick(metafunc.config) else "timed"]
        cases = [(n, sharding) for n in nodes for sharding in SHARDINGS]
        metafunc.parametrize("nodes,sharding", cases, ids=[f"{n}node-{s}" for n, s in cases])


@pytest.fixture(scope="module")
def cluster():
    """``grow_to(n)``: the cluster with n nodes of 1 CPU (the head one of them); returns its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    added = []

    def grow_to(n: int) -> str:
        while len(added) + 1 < n:
            added.append(cluster.add_node(num_cpus=1))
        while len(added) + 1 > n:
            cluster.remove_node(added.pop())
        cluster.wait_for_nodes()
        deadline = time.monotonic() + 60
        while (int(ray.cluster_resources().get("CPU", 0)), len([x for x in ray.nodes() if x["Alive"]])) != (n, n):
            assert time.monotonic() < deadline, f"the cluster did not reach {n} nodes"
            time.sleep(0.2)
        return cluster.address

    yield grow_to
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def job(mnist, request, cluster):
    """(source, plan, bytes): the demo convnet's default layers over the digits, planned once; the local
    session warmed up, and in timed mode one untimed Ray extraction (Ray Data imported and started)."""
    quick = _quick(request.config)
    dataset = mnist
    if quick:
        dataset = probecore.split_dataset(mnist.train.x[:QUICK_SAMPLES], mnist.train.y[:QUICK_SAMPLES], seed=0)
    source = OnnxSource(DEMO_MODEL, device="cpu")
    spec = probecore.RunSpec(batch_size=BATCH_SIZE)
    inputs = checked_inputs(source, dataset)
    plan = plan_extraction(source, inputs, select_layers(source.layers(), spec.layers), spec, dataset.classes)
    local = run_extraction(source, plan)  # session built, numba kernels loaded: not timed
    if not quick:
        RayEngine(cluster(1), actors=1).extract(source, plan)
    samples = plan.total_samples
    features = sum(a.nbytes for by_split in local.by_layer.values() for a in by_split.values())
    scores = 0 if local.model_test_scores is None else local.model_test_scores.nbytes
    per_node = len(pickle.dumps(plan, protocol=5)) + len(ray.cloudpickle.dumps(source))
    _JOB.update(
        samples=samples,
        splits={split: len(x) for split, x in plan.inputs.items()},
        layers=len(plan.layers),
        features_used=sum(a.shape[1] for a in (by_split["train"] for by_split in local.by_layer.values())),
        feature_bytes_per_sample=(features + scores) / samples,
        input_bytes_per_sample_per_node=per_node / samples,
        inputs_nbytes=sum(x.nbytes for x in plan.inputs.values()),
    )
    return source, plan


def _same_features(ours, theirs) -> None:
    assert ours.by_layer.keys() == theirs.by_layer.keys()
    for name, by_split in ours.by_layer.items():
        for split, values in by_split.items():
            expected = theirs.by_layer[name][split]
            np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {split}")
    np.testing.assert_allclose(ours.model_test_scores, theirs.model_test_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.benchmark(group="ray-scaling")
def test_ray_extraction_scaling(nodes, sharding, cluster, job, benchmark, paired, record):
    source, plan = job
    engine = RayEngine(cluster(nodes), actors=nodes, shard_batches=SHARDINGS[sharding])
    shards = len(engine.shards(plan, nodes))
    measured = paired(lambda: engine.extract(source, plan), lambda: run_extraction(source, plan), ROUNDS)
    _same_features(measured.candidate_result, measured.baseline_result)
    samples, seconds = _JOB["samples"], measured.candidate_min
    feature_bytes, input_bytes = _JOB["feature_bytes_per_sample"], nodes * _JOB["input_bytes_per_sample_per_node"]
    run = {"nodes": nodes, "sharding": sharding, "shards": shards, "samples": samples, "seconds": seconds}
    _RUNS.append(run)
    record(
        {
            **run,
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds),
            "shards_per_s": round(shards / seconds, 2),
            "local_s": round(measured.baseline_min, 3),
            "local_samples_per_s": round(samples / measured.baseline_min),
            "ray_over_local": round(seconds / measured.baseline_min, 2),
            "feature_bytes_per_sample": round(feature_bytes),
            "input_bytes_per_sample": round(input_bytes),
            "bytes_moved_per_sample": round(feature_bytes + input_bytes),
            "cpu_count": os.cpu_count(),
            "oversubscribed": nodes + 1 > (os.cpu_count() or 1),  # the nodes' actors and the driver
            **measured.figures(),
        }
    )


@pytest.mark.benchmark(group="ray-scaling")
def test_ray_scaling_model(benchmark, record):
    """The model fitted to this module's runs (its timed function is the least-squares fit, not a figure)."""
    runs = list(_RUNS)
    if len({run["nodes"] for run in runs}) < 2 or len(runs) < 3:
        pytest.skip("needs test_ray_extraction_scaling's runs at two node counts or more, in this session")
    model = benchmark.pedantic(ray_scaling.fit_model, args=(runs,), rounds=1, iterations=1)
    feature_bytes, input_bytes = _JOB["feature_bytes_per_sample"], _JOB["input_bytes_per_sample_per_node"]
    predictions = ray_scaling.gpu_predictions(model, feature_bytes, input_bytes)
    assert all(value >= 0 for key, value in model.items() if key.endswith("_s") and key != "fitted_s")
    headline = predictions["resnet50_image_folder"]
    record(
        {
            "job": {key: _JOB[key] for key in ("samples", "splits", "layers", "features_used", "inputs_nbytes")},
            "runs": [(run["nodes"], run["sharding"], run["shards"], round(run["seconds"], 3)) for run in runs],
            "model": {key: float(f"{v:.4g}") if isinstance(v, float) else v for key, v in model.items()},
            "per_shard_overhead_ms": round(1e3 * model["per_shard_s"], 2),
            "per_sample_compute_ms_this_cpu": round(1e3 * model["per_sample_s"], 4),
            "fixed_s": round(model["fixed_s"], 3),
            "feature_bytes_per_sample": round(feature_bytes, 1),
            "input_bytes_per_sample_per_node": round(input_bytes, 1),
            "assumed": {
                "gpu_rate_per_node": ray_scaling.GPU_RATE,
                "gbit_per_s_per_node": ray_scaling.GBIT_PER_S,
                "job_splits": ray_scaling.JOB_SPLITS,
                "batch_size": ray_scaling.GPU_BATCH,
            },
            "predicted_8_nodes": f"{headline['n8']['throughput_per_s']}/s ({headline['n8']['bound_by']})",
            "predicted_64_nodes": f"{headline['n64']['throughput_per_s']}/s ({headline['n64']['bound_by']})",
            "driver_saturates_at_nodes": headline["driver_saturates_at_nodes"],
            "predictions": predictions,
            "cpu_count": os.cpu_count(),
        }
    )

"""The throughput model behind ``test_ray_scaling.py`` (issue 15, "Scaling"): fitted to the Ray engine's
extraction runs at 1, 2 and 3 simulated nodes, then written out for GPU nodes.

Fitted (non-negative least squares over the runs, one per node count and sharding; seconds = the fastest
round of each run)::

    time(n) = fixed + shards * per_shard / n + samples * per_sample / n

Why this form: ``RayEngine.extract`` starts one actor pool per call (``fixed``: actor processes, fetching the
plan, building the onnxruntime session, the driver's final concatenation), then the shards are spread evenly
over the ``n`` actors (one per node), so each actor runs ``shards / n`` shards, each paying a fixed Ray Data
overhead (a task dispatched, the result pickled, put in the object store, pulled by the driver) plus the
forward pass of its samples. Running every node count at two shardings (one batch per shard, and the engine's
default of about four shards per actor and split) makes ``shards / n`` and ``samples / n`` vary apart, so the
two rates separate. What the form leaves out: driver-side work that does not shrink with ``n`` (it unpickles
every shard serially); at these sizes it is folded into the two rates, and for large clusters the bandwidth
term below bounds it.

Bytes moved: every shard's reduced features come back to the driver through the object store
(``features_used x 4`` bytes a sample, plus the model's scores on the test split), and the engine ships the
whole ``ExtractionPlan`` (all splits' inputs) to every actor by one object reference, plus the pickled source:
one copy per node. Per sample processed: ``feature_bytes + n * input_bytes``.

Prediction for ``n`` GPU nodes, one actor per node, a stated per-node rate ``rate`` and network bandwidth
``bandwidth`` (bytes/s, the driver's link included), for an assumed job cut by the engine's default sharding
(``s`` samples a shard)::

    compute(n)    = n * s / (s / rate + per_shard)      n x the per-node rate less the per-shard overhead
    driver(n)     = bandwidth / (feature_bytes + n * input_bytes)
    throughput(n) = min(compute(n), driver(n))

and the job's wall time ``fixed + samples / throughput(n)`` (the fitted fixed cost, measured on CPUs with the
small demo model: a GPU node's session start is longer).

``driver`` is the driver's link carrying everything (all features in, every node's copy of the inputs out;
counted together, a bound on a half-duplex or shared link; Ray can also pull an object from another node that
already holds a copy, which would take the inputs' share off the driver). The driver gathers all features, so
once ``n * rate`` reaches ``bandwidth / feature_bytes`` adding nodes adds nothing; with inputs in the plan the
limit falls as ``n`` grows, since every node receives all of them.

    python benchmarks/ray_scaling.py BENCH.json [--gbit 10] [--rate 3028]

re-reads the fitted figures from a ``--benchmark-json`` file of ``test_ray_scaling.py`` and prints the
predictions under other assumptions.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy.optimize import nnls

# Assumptions for the GPU prediction (stated, not measured here).
GPU_RATE = 3028.0  # images/s per H200, in-graph ResNet-50-shaped extraction (benchmarks/README.md, GPU check)
GBIT_PER_S = 10.0  # network bandwidth per node, the driver's included: an assumption
GPU_BATCH = 16  # the GPU check's batch
JOB_SPLITS = (700_000, 100_000, 200_000)  # an assumed job of 1 M images, split 70/10/20 as split_dataset does
RESNET50_FEATURE_BYTES = 4 * (3 * 256 + 4 * 512 + 6 * 1024 + 3 * 2048)  # 16 blocks pooled: 60 416 B/image
RESNET50_INPUT_BYTES = 3 * 224 * 224  # uint8 images in an .npz: 150 528 B/image, in the plan
IMAGE_FOLDER_INPUT_BYTES = 100  # an image folder on a shared file system: the plan holds paths, ~100 B/image
NODE_COUNTS = (8, 64)


def fit_model(runs: list[dict]) -> dict:
    """``fixed`` (s), ``per_shard`` (s) and ``per_sample`` (s) from runs of ``nodes``, ``shards``, ``samples``
    and ``seconds``; with each run's prediction and the relative RMS error of the fit."""
    design = np.array([[1.0, r["shards"] / r["nodes"], r["samples"] / r["nodes"]] for r in runs])
    seconds = np.array([r["seconds"] for r in runs])
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError("the runs do not separate the three terms: vary the node count and the shards per node")
    (fixed, per_shard, per_sample), _ = nnls(design, seconds)
    predicted = design @ np.array([fixed, per_shard, per_sample])
    return {
        "fixed_s": float(fixed),
        "per_shard_s": float(per_shard),
        "per_sample_s": float(per_sample),
        "fitted_s": [round(float(p), 3) for p in predicted],
        "rms_relative_error": float(np.sqrt(np.mean(((predicted - seconds) / seconds) ** 2))),
    }


def engine_shards(splits, batch_size: int, actors: int) -> int:
    """Shards ``RayEngine.shards`` cuts with its default sizing (about four per actor and split, whole batches)."""
    total = 0
    for n in splits:
        step = max(1, math.ceil(n / batch_size / (4 * actors))) * batch_size
        total += math.ceil(n / step)
    return total


def predict(
    model: dict, nodes: int, feature_bytes: float, input_bytes: float, rate: float = GPU_RATE,
    gbit: float = GBIT_PER_S, splits=JOB_SPLITS, batch_size: int = GPU_BATCH,
) -> dict:  # fmt: skip
    """Samples/s on ``nodes`` nodes, steady state: the compute bound (``nodes`` x the per-node ``rate`` less the
    fitted per-shard overhead, at the engine's default shard size for the job), the driver's bandwidth bound,
    which one binds; and the job's wall time with the fitted fixed cost added."""
    samples, shards = sum(splits), engine_shards(splits, batch_size, nodes)
    shard = samples / shards  # samples a shard, on average
    per_node = shard / (shard / rate + model["per_shard_s"])
    compute = nodes * per_node
    driver = gbit * 1e9 / 8 / (feature_bytes + nodes * input_bytes)
    throughput = min(compute, driver)
    return {
        "nodes": nodes,
        "shards": shards,
        "per_node_rate_with_shard_overhead": round(per_node),
        "compute_bound_per_s": round(compute),
        "driver_bound_per_s": round(driver),
        "throughput_per_s": round(throughput),
        "bound_by": "compute" if compute <= driver else "driver bandwidth",
        "job_seconds_with_fixed": round(model["fixed_s"] + samples / throughput, 1),
    }


def saturation(model: dict, feature_bytes: float, input_bytes: float, **assumptions) -> int | None:
    """The smallest node count at which the driver's bandwidth, not compute, limits throughput."""
    for nodes in range(1, 4097):
        figures = predict(model, nodes, feature_bytes, input_bytes, **assumptions)
        if figures["bound_by"] != "compute":
            return nodes
    return None


def gpu_predictions(model: dict, measured_feature_bytes: float, measured_input_bytes: float, **assumptions) -> dict:
    """Throughput at 8 and 64 GPU nodes, and where the driver saturates, for three cases of bytes a sample."""
    cases = {
        "resnet50_image_folder": (RESNET50_FEATURE_BYTES, IMAGE_FOLDER_INPUT_BYTES),
        "resnet50_npz_uint8": (RESNET50_FEATURE_BYTES, RESNET50_INPUT_BYTES),
        "measured_job_bytes": (measured_feature_bytes, measured_input_bytes),
    }
    out = {}
    for case, (feature_bytes, input_bytes) in cases.items():
        out[case] = {
            "feature_bytes_per_sample": round(feature_bytes),
            "input_bytes_per_sample_per_node": round(input_bytes),
            **{f"n{nodes}": predict(model, nodes, feature_bytes, input_bytes, **assumptions) for nodes in NODE_COUNTS},
            "driver_saturates_at_nodes": saturation(model, feature_bytes, input_bytes, **assumptions),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="a --benchmark-json file of benchmarks/test_ray_scaling.py")
    parser.add_argument("--gbit", type=float, default=GBIT_PER_S, help="network bandwidth per node, Gbit/s")
    parser.add_argument("--rate", type=float, default=GPU_RATE, help="samples/s per GPU node")
    args = parser.parse_args()
    with open(args.json) as file:
        benchmarks = json.load(file)["benchmarks"]
    info = next(b["extra_info"] for b in benchmarks if "model" in b["extra_info"])
    bytes_per_sample = info["feature_bytes_per_sample"], info["input_bytes_per_sample_per_node"]
    predictions = gpu_predictions(info["model"], *bytes_per_sample, rate=args.rate, gbit=args.gbit)
    figures = {"model": info["model"], "rate": args.rate, "gbit": args.gbit, "predictions": predictions}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

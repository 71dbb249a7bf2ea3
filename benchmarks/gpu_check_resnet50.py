"""GPU check for extraction at scale: a ResNet-50-shaped model on onnxruntime's CUDA provider.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu:  python benchmarks/gpu_check_resnet50.py [--json OUT]
Batch 16 at 224x224, the 16 residual-block outputs globally average-pooled. It prints, per provider, the plain
forward pass's throughput, probecore's extraction throughput with the pooling appended to the graph (in-graph)
and on the host, the ratios to the plain pass, and the bytes each copied from onnxruntime to the host.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import probecore
from probecore.backends.onnx_source import OnnxSource, create_session

sys.path.insert(0, str(Path(__file__).parent))
from resnet50 import BLOCK_OUTPUTS, INPUT, OUTPUT, build_resnet50  # noqa: E402

BATCH = 16


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(model: Path, device: str, x: np.ndarray, repeats: int) -> dict:
    import onnxruntime

    session, provider = create_session(model.read_bytes(), device)
    plain_bytes = [0]

    def plain():
        for start in range(0, len(x), BATCH):
            plain_bytes[0] += session.run([OUTPUT], {INPUT: x[start : start + BATCH]})[0].nbytes

    plain()
    plain_s = best_of(plain, repeats)
    results = {"provider": provider, "onnxruntime": onnxruntime.__version__, "plain_samples_per_s": len(x) / plain_s}
    policy = probecore.ReductionPolicy(global_pool=True)
    for in_graph in (True, False):
        source = OnnxSource(model, device=device, reduce_in_graph=in_graph)
        chosen = probecore.select_layers(source.layers(), list(BLOCK_OUTPUTS))
        reductions = {layer.name: probecore.plan_reduction(layer.name, layer.shape, policy) for layer in chosen}

        def extract():
            if in_graph:
                return [batch for batch in source.reduced_activations(x, reductions, BATCH)]
            return [{n: reductions[n].apply(b[n]) for n in b} for b in source.activations(x, list(reductions), BATCH)]

        extract()
        source.bytes_fetched = 0
        seconds = best_of(extract, repeats)
        name = "in_graph" if in_graph else "host"
        results[f"{name}_samples_per_s"] = len(x) / seconds
        results[f"{name}_ratio_to_plain"] = plain_s / seconds
        results[f"{name}_bytes_to_host_per_sample"] = source.bytes_fetched / repeats / len(x)
    results["plain_bytes_to_host_per_sample"] = plain_bytes[0] / (repeats + 1) / len(x)
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = build_resnet50(Path(scratch) / "resnet50.onnx")
        x = np.random.default_rng(0).normal(size=(args.samples, 3, 224, 224)).astype(np.float32)
        results = {"samples": args.samples, "batch": BATCH}
        for device in ("cuda", "cpu"):
            try:
                results[device] = measure(model, device, x if device == "cuda" else x[:32], args.repeats)
            except probecore.ProbeError as exc:
                results[device] = {"error": str(exc)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""GPU check: the bundled demo through onnxruntime's CUDA provider against the CPU provider, same run.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu:  python benchmarks/gpu_check.py [--json OUT]
It prints, per device, the provider really used, extraction throughput and each layer's probe test error, and
the largest difference between CPU and CUDA features (they should agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.bundled import DEMO_DATA, DEMO_MODEL


def measure(device: str, dataset: probecore.Dataset) -> tuple[dict, probecore.ExtractedFeatures]:
    source = OnnxSource(DEMO_MODEL, device=device)
    chosen = probecore.select_layers(source.layers(), None)
    probecore.extract_features(source, dataset, chosen)  # warm-up: session creation, CUDA context, numba
    started = time.perf_counter()
    features = probecore.extract_features(source, dataset, chosen)
    seconds = time.perf_counter() - started
    report = probecore.run_probes(source, dataset)
    n_samples = sum(len(split) for split in dataset.splits().values())
    summary = {
        "provider": source.provider,
        "extract_seconds": round(seconds, 4),
        "samples_per_second": round(n_samples / seconds, 1),
        "test_error": {layer.name: layer.metrics["test"].error for layer in report.layers},
        "model_test_error": None if report.model_test is None else report.model_test.error,
    }
    return summary, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import onnxruntime

    dataset = probecore.load_dataset(DEMO_DATA)
    results = {"onnxruntime": onnxruntime.__version__, "available": onnxruntime.get_available_providers()}
    cpu, cpu_features = measure("cpu", dataset)
    results["cpu"] = cpu
    try:
        cuda, cuda_features = measure("cuda", dataset)
    except probecore.ProbeError as exc:
        results["cuda"] = {"error": str(exc)}
    else:
        results["cuda"] = cuda
        worst = 0.0
        for layer, by_split in cpu_features.by_layer.items():
            for split, values in by_split.items():
                scale = max(1.0, float(np.abs(values).max()))
                worst = max(worst, float(np.abs(values - cuda_features.by_layer[layer][split]).max()) / scale)
        results["max_feature_difference_relative"] = worst
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

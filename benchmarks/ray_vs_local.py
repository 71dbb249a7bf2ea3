"""The Ray engine against the local engine: wall seconds each way, and their ratio. Not a pytest benchmark:
it starts a Ray instance.

    python benchmarks/ray_vs_local.py [--address local|auto|HOST:PORT] [--rounds 2] [--job demo|resnet50]

``demo``: ``run_probes`` on the bundled convnet, 5 000 digits, default layers; the reports must agree
(strengths and errors equal). ``resnet50``: the extraction alone (the engines' ``extract``) of
``resnet50.py``'s model (random weights, 112 x 112 random images, ``--images`` of them, batches of 16) at its
16 block outputs pooled in the graph; the features must agree. No cache either way.
"""

from __future__ import annotations

import argparse
import time

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.backends.ray_engine import RayEngine
from probecore.bundled import DEMO_DATA, DEMO_MODEL
from probecore.engine import LocalEngine
from probecore.extraction import checked_inputs, plan_extraction


def timed(dataset, engine) -> tuple[float, probecore.ProbeReport]:
    started = time.perf_counter()
    report = probecore.run_probes(OnnxSource(DEMO_MODEL, device="cpu"), dataset, probecore.RunSpec(), engine=engine)
    return time.perf_counter() - started, report


def resnet50_extraction(engine_ray: RayEngine, rounds: int, images: int) -> None:
    """Extraction alone, local against Ray, on the ResNet-50-shaped model."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from resnet50 import BLOCK_OUTPUTS, build_resnet50

    with tempfile.TemporaryDirectory() as folder:
        model = build_resnet50(Path(folder) / "resnet50.onnx", image_size=112)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((images, 3, 112, 112), dtype=np.float32)
        dataset = probecore.split_dataset(x, np.arange(images) % 10, seed=0)
        spec = probecore.RunSpec(layers=",".join(BLOCK_OUTPUTS), batch_size=16,
                                 policy=probecore.ReductionPolicy(global_pool=True))  # fmt: skip
        source = OnnxSource(model, device="cpu")
        inputs = checked_inputs(source, dataset)
        chosen = probecore.select_layers(source.layers(), spec.layers)
        plan = plan_extraction(source, inputs, chosen, spec, dataset.classes)

        def timed(engine):
            started = time.perf_counter()
            extracted = engine.extract(source, plan)
            return time.perf_counter() - started, extracted

        timed(LocalEngine()), timed(engine_ray)  # sessions built, actors' imports warm: not timed
        local, local_features = min((timed(LocalEngine()) for _ in range(rounds)), key=lambda pair: pair[0])
        seconds, features = min((timed(engine_ray) for _ in range(rounds)), key=lambda pair: pair[0])
        for name, splits in local_features.by_layer.items():
            for split, values in splits.items():
                np.testing.assert_allclose(features.by_layer[name][split], values, rtol=1e-5, atol=1e-6)
        print(f"resnet50 extraction, {images} images: local {local:.1f} s ({images / local:.0f}/s), ray "
              f"{seconds:.1f} s ({images / seconds:.0f}/s), ray / local throughput {local / seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="local")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--job", choices=("demo", "resnet50"), default="demo")
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    if args.job == "resnet50":
        resnet50_extraction(RayEngine(args.address), args.rounds, args.images)
        return
    dataset = probecore.load_dataset(DEMO_DATA)
    engine = RayEngine(args.address)
    timed(dataset, None)  # numba kernels compiled, caches warm: not timed
    timed(dataset, engine)  # the Ray instance started, workers imported: not timed
    local = min(timed(dataset, None)[0] for _ in range(args.rounds))
    seconds, report = min((timed(dataset, engine) for _ in range(args.rounds)), key=lambda pair: pair[0])
    reference = timed(dataset, None)[1]
    for ours, theirs in zip(report.layers, reference.layers):
        assert ours.l2 == theirs.l2 and ours.metrics["test"].error == theirs.metrics["test"].error, ours.name
    engine = {key: report.settings["engine"][key] for key in ("nodes", "cpus", "fit_cpus")}
    print(f"local {local:.1f} s, ray {seconds:.1f} s ({engine}), ray / local throughput {local / seconds:.2f}")


if __name__ == "__main__":
    main()

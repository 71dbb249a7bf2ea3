"""The Ray engine against the local engine on the demo (the bundled convnet, 5 000 digits, default layers):
wall seconds of ``run_probes`` each way, and their ratio. Not a pytest benchmark: it starts a Ray instance.

    python benchmarks/ray_vs_local.py [--address local|auto|HOST:PORT] [--rounds 2]

Both runs keep features in memory (no cache) and check that the reports agree (strengths and errors equal).
"""

from __future__ import annotations

import argparse
import time

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.backends.ray_engine import RayEngine
from probecore.bundled import DEMO_DATA, DEMO_MODEL


def timed(dataset, engine) -> tuple[float, probecore.ProbeReport]:
    started = time.perf_counter()
    report = probecore.run_probes(OnnxSource(DEMO_MODEL, device="cpu"), dataset, probecore.RunSpec(), engine=engine)
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="local")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dataset = probecore.load_dataset(DEMO_DATA)
    engine = RayEngine(args.address)
    timed(dataset, None)  # numba kernels compiled, caches warm: not timed
    timed(dataset, engine)  # the Ray instance started, workers imported: not timed
    local = min(timed(dataset, None)[0] for _ in range(args.rounds))
    seconds, report = min((timed(dataset, engine) for _ in range(args.rounds)), key=lambda pair: pair[0])
    reference = timed(dataset, None)[1]
    for ours, theirs in zip(report.layers, reference.layers):
        assert ours.l2 == theirs.l2 and ours.metrics["test"].error == theirs.metrics["test"].error, ours.name
    print(f"local {local:.1f} s, ray {seconds:.1f} s ({report.settings['engine']}), ray / local {seconds / local:.2f}")


if __name__ == "__main__":
    main()

"""Ray Data's own cost per extraction: a ``map_batches`` over 10 one-row blocks with a 1-actor pool whose callable
class only imports what ``RayEngine``'s extractor imports, timed three times on a local Ray instance (the first
includes Ray Data's start). It is the floor under ``RayEngine.extract``'s fixed cost (benchmarks/README.md).

    python benchmarks/ray_data_overhead.py
"""

from __future__ import annotations

import time

import ray


class Passthrough:
    def __init__(self):
        import probecore.backends.ray_engine  # noqa: F401  (the extractor's imports)

    def __call__(self, batch):
        return batch


def main() -> None:
    ray.init(logging_level="ERROR", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars, context.print_on_execution_start = False, False
    for round_ in range(3):
        started = time.perf_counter()
        rows = ray.data.from_items([{"i": i} for i in range(10)], override_num_blocks=10)
        mapped = rows.map_batches(Passthrough, batch_size=1, batch_format="numpy",
                                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)  # fmt: skip
        for _ in mapped.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            pass
        print(f"round {round_}: {time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()

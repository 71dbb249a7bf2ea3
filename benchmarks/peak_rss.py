"""Peak resident memory of one extraction side, measured alone in a fresh process.

    python benchmarks/peak_rss.py plain|probecore MODEL N [--batch-size 16] [--seed 0]

Feeds N random float32 images (shape read from MODEL's input) through MODEL and prints one JSON line with
the process's peak RSS (``VmHWM`` from ``/proc/self/status``; ``getrusage`` ``ru_maxrss`` where there is
no /proc, see ``peak_rss_mib``) and the RSS at a few points on the way:

- ``plain``: an onnxruntime ``InferenceSession`` (CPUExecutionProvider, default options) on the unmodified
  model, batches of ``--batch-size``, fetching only the model's first output, concatenated;
- ``probecore``: ``probecore.extract_features(OnnxSource(MODEL, device="cpu"), dataset, <the 16 block
  outputs layer1.0 ... layer4.2>, ReductionPolicy(global_pool=True), batch_size)``, the dataset being the
  same N images split N/2 train, N/4 valid, the rest test (views of one array, no copies; with N a
  multiple of 4 x batch size every batch is whole, as on the plain side).

Both sides hold the same input array, so their peaks differ only by what each does with the model. The
block names are those of ``benchmarks/resnet50.py``; with ``--layers`` give others (comma separated).
Used by ``test_resnet50_extraction.py``, one subprocess per measurement, so no side inherits the other's heap.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

SIDES = ("plain", "probecore")
BLOCK_OUTPUTS = tuple(
    f"layer{stage}.{block}" for stage, blocks in enumerate((3, 4, 6, 3), start=1) for block in range(blocks)
)  # resnet50.BLOCK_OUTPUTS, repeated so this script imports nothing from the benchmarks folder


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """The current resident set size, from /proc (Linux); NaN elsewhere."""
    found = _proc_status_mib("VmRSS")
    return float("nan") if found is None else found


def peak_rss_mib() -> float:
    """This process's peak RSS since its ``exec``.

    Linux's ``getrusage`` ``ru_maxrss`` also counts the parent's RSS at the ``fork``/``vfork`` that started
    this process (the kernel keeps the old address space's high-water mark across ``exec``), so a child of
    a 900 MB pytest reports at least 900 MB; ``VmHWM`` belongs to the address space made by ``exec`` alone.
    """
    found = _proc_status_mib("VmHWM")
    if found is not None:
        return found
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("model", type=Path)
    parser.add_argument("n", type=int, help="number of images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default=",".join(BLOCK_OUTPUTS))
    args = parser.parse_args(argv)

    stages = {"start": rss_mib()}
    import numpy as np
    import onnxruntime as ort

    if args.side == "probecore":
        import probecore
        from probecore.backends.onnx_source import OnnxSource
    stages["imports"] = rss_mib()

    started = time.perf_counter()
    result: dict = {}
    if args.side == "plain":
        session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        x = _images(model_input.shape, args.n, args.seed)
        stages["model_and_inputs"] = rss_mib()
        outputs = [
            session.run([model_output.name], {model_input.name: x[i : i + args.batch_size]})[0]
            for i in range(0, len(x), args.batch_size)
        ]
        logits = np.concatenate(outputs)
        result["output_shape"] = list(logits.shape)
    else:
        source = OnnxSource(args.model, device="cpu")
        x = _images(source.input_dims, args.n, args.seed)
        stages["model_and_inputs"] = rss_mib()
        n_train, n_valid = args.n // 2, args.n // 4
        y = (np.arange(args.n) % 10).astype(np.int64)
        dataset = probecore.Dataset(
            probecore.Split(x[:n_train], y[:n_train]),
            probecore.Split(x[n_train : n_train + n_valid], y[n_train : n_train + n_valid]),
            probecore.Split(x[n_train + n_valid :], y[n_train + n_valid :]),
            np.arange(10),
        )
        chosen = probecore.select_layers(source.layers(), args.layers.split(","))
        policy = probecore.ReductionPolicy(global_pool=True)
        extracted = probecore.extract_features(source, dataset, chosen, probecore.RunSpec(policy=policy, batch_size=args.batch_size))
        result["reduced_features_total"] = sum(next(iter(s.values())).shape[1] for s in extracted.by_layer.values())
        result["reduced_mib"] = round(sum(a.nbytes for s in extracted.by_layer.values() for a in s.values()) / 2**20, 2)
        described = source.describe()
        for key in ("provider", "reduce_in_graph_allowed", "bytes_fetched"):
            if key in described:
                result[key] = described[key]
    seconds = time.perf_counter() - started
    stages["end"] = rss_mib()
    result = {
        "side": args.side,
        "n_samples": args.n,
        "input_shape": list(x.shape),
        "input_mib": round(x.nbytes / 2**20, 2),
        "batch_size": args.batch_size,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **{f"rss_{stage}_mib": round(value, 1) for stage, value in stages.items()},
        "seconds": round(seconds, 3),
        **result,
    }
    print(json.dumps(result), flush=True)
    return result


def _images(shape, n: int, seed: int):
    import numpy as np

    sample_shape = tuple(int(d) for d in shape[1:])  # raises on a symbolic image size: give a fixed-size model
    return np.random.default_rng(seed).standard_normal((n, *sample_shape), dtype=np.float32)


if __name__ == "__main__":
    main()

"""Peak resident memory of a whole ``probe run`` per extra sample, against what the run must hold (issue 14.6).

    python benchmarks/run_memory.py [--n 2000,6000] [--cache both|on|off] [--no-stages] [--tracemalloc] [--full]
    python benchmarks/run_memory.py child [--stages] [--tracemalloc] -- MODEL --data DATA.npz --out OUT -q ...

Builds, under a temporary folder, a 3-layer convnet (``save_convnet3``: x (N, 3, 64, 64) -> Conv 16 "conv1"
-> Relu "relu1" -> Conv 64 stride 2 -> Relu "relu2" -> Conv 64 stride 2 -> Relu "relu3" -> GlobalAveragePool
-> Flatten -> Gemm to 10 classes; the default policy, ``ReductionPolicy()``, pools each Relu to exactly
4096 features) and, for each N, an .npz with ``x`` (N, 3, 64, 64) float32 and learnable ``y`` (the argmax of
10 fixed random projections of the image), then runs the whole job in a fresh process per measurement:
``probe run MODEL --data DATA.npz --out OUT -q`` on the default layers (the input, the three Relus, the pool
and the logits), with ``--cache-dir`` (features written to disk batch by batch and memory-mapped back for the
fits) and with ``--no-cache`` (features concatenated in memory).

The process is ``child`` mode of this script, which runs the CLI's own entry point in-process and then prints
one JSON line: peak RSS (``VmHWM``, as ``peak_rss.py`` reads it) and, with ``--stages``, the peak of the
anonymous (``RssAnon``) and file-backed (``RssFile``) resident memory in each stage, sampled every 2 ms:
``load`` (``load_dataset``: read the .npz and split it), ``extract`` (forward passes and reductions),
``counts`` (``activation_counts``), ``fit`` (``_fit_layers``), ``score`` (the rest of ``_fit_and_score``),
``write`` (report.json, figures, report.html). ``--tracemalloc`` adds each stage's peak of traced heap
(numpy's buffers included), above what was traced when the stage began.

The slope is ``(peak(N2) - peak(N1)) / (N2 - N1)`` in KiB per sample, against what must be held per sample:
the input (3 x 64 x 64 float32, 48 KiB) plus every probed layer's reduced features (report.json's
``features_used`` x 4 bytes). The issue's target is a ratio of at most 1.5. ``VmHWM`` counts pages of the
memory-mapped cache that the fits read (``RssFile``): the kernel can drop those under memory pressure, so the
anonymous slope (from ``--stages``) is the one that says what a limit on memory has to leave room for.
Used by ``test_run_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peak_rss import peak_rss_mib  # VmHWM, getrusage where there is no /proc

IMAGE = (3, 64, 64)
N_CLASSES = 10
CHANNELS = (16, 64, 64)  # conv1 stride 1 (16x64x64 -> avgpool 4x4 -> 4096), conv2 and conv3 stride 2 (64x32x32 ->
# avgpool 4x4 -> 4096, 64x16x16 -> avgpool 2x2 -> 4096)
STAGES = ("load", "extract", "counts", "fit", "score", "write")


def save_convnet3(path: Path, seed: int = 0) -> Path:
    """The 3-layer convnet described in the module docstring, with He-scaled random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers, previous, in_channels = [], [], "x", IMAGE[0]
    for index, (channels, stride) in enumerate(zip(CHANNELS, (1, 2, 2)), start=1):
        weight = rng.normal(size=(channels, in_channels, 3, 3)) * np.sqrt(2 / (9 * in_channels))
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), f"conv{index}_w"))
        nodes.append(helper.make_node("Conv", [previous, f"conv{index}_w"], [f"conv{index}"], pads=[1, 1, 1, 1],
                                      strides=[stride, stride], name=f"conv{index}"))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"], name=f"relu{index}"))
        previous, in_channels = f"relu{index}", channels
    fc_w = (rng.normal(size=(N_CLASSES, in_channels)) / np.sqrt(in_channels)).astype(np.float32)
    initializers += [numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="logits"),
    ]
    graph = helper.make_graph(
        nodes, "convnet3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_data(path: Path, n: int, seed: int = 0, shape=IMAGE, n_classes: int = N_CLASSES) -> Path:
    """``x`` (n, *shape) float32 standard normal, ``y`` the argmax of ``n_classes`` fixed random projections of
    each sample (learnable, so that the fits settle as on real data)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    directions = np.random.default_rng(12345).standard_normal((int(np.prod(shape)), n_classes), dtype=np.float32)
    y = (x.reshape(n, -1) @ directions).argmax(axis=1).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


# ---------------------------------------------------------------------------------------------------------
# child: the CLI in this process, with stage-by-stage memory
# ---------------------------------------------------------------------------------------------------------


def _status_kib(fields=("VmRSS", "RssAnon", "RssFile", "VmData", "VmHWM")) -> dict[str, int]:
    found = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in fields:
                    found[name] = int(rest.split()[0])
    except OSError:
        pass
    return found


class StageSampler:
    """A thread that samples /proc/self/status every ``interval`` s and keeps each stage's peak; the stage is
    set by wrappers around the pipeline's functions (``instrument``)."""

    def __init__(self, interval: float = 0.002, trace: bool = False):
        self.interval, self.trace = interval, trace
        self.stage = "other"  # outside every stage: imports, layer selection, the summary
        self.peaks: dict[str, dict[str, int]] = {}
        self.at_start: dict[str, dict[str, int]] = {}
        self.traced: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._sample()
        self._stop.set()
        self._thread.join()

    def _sample(self):
        now = _status_kib()
        with self._lock:
            peak = self.peaks.setdefault(self.stage, {})
            for key, value in now.items():
                peak[key] = max(peak.get(key, 0), value)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def enter(self, stage: str) -> str:
        self._sample()
        with self._lock:
            previous, self.stage = self.stage, stage
        self.at_start.setdefault(stage, _status_kib())
        self._sample()
        if self.trace:
            import tracemalloc

            current, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            self.traced.setdefault(stage, {"start_mib": current / 2**20, "peak_above_start_mib": 0.0})
            self._trace_start = current
        return previous

    def leave(self, previous: str) -> None:
        self._sample()
        if self.trace:
            import tracemalloc

            _, peak = tracemalloc.get_traced_memory()
            entry = self.traced[self.stage]
            entry["peak_above_start_mib"] = max(entry["peak_above_start_mib"], (peak - self._trace_start) / 2**20)
        with self._lock:
            self.stage = previous
        if self.trace:
            import tracemalloc

            current, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            self._trace_start = current

    def wrap(self, stage: str, function):
        def wrapped(*args, **kwargs):
            previous = self.enter(stage)
            try:
                return function(*args, **kwargs)
            finally:
                self.leave(previous)

        return wrapped


def instrument(sampler: StageSampler) -> None:
    """Point the pipeline's stage functions at wrappers that tell ``sampler`` which stage runs (module
    attributes looked up at call time: nothing in probecore is edited)."""
    import probecore
    from probecore import engine, pipeline, report

    probecore.load_dataset = sampler.wrap("load", probecore.load_dataset)
    engine.LocalEngine.extract = sampler.wrap("extract", engine.LocalEngine.extract)
    pipeline.activation_counts = sampler.wrap("counts", pipeline.activation_counts)
    pipeline._fit_layers = sampler.wrap("fit", pipeline._fit_layers)
    pipeline._fit_and_score = sampler.wrap("score", pipeline._fit_and_score)  # outer: counts and fit nest in it
    report.ProbeReport.write = sampler.wrap("write", report.ProbeReport.write)


def child(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="run_memory.py child")
    parser.add_argument("--stages", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("probe_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    probe_args = args.probe_args[1:] if args.probe_args[:1] == ["--"] else args.probe_args
    started = time.perf_counter()
    sampler = None
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    from probecore.cli.app import app

    imports = _status_kib()
    if args.stages or args.tracemalloc:
        sampler = StageSampler(trace=args.tracemalloc).start()
        instrument(sampler)
    code = 0
    try:
        app(["run", *probe_args], standalone_mode=False)
    except SystemExit as exc:  # typer's usage errors
        code = exc.code or 0
    except Exception as exc:  # noqa: BLE001 - reported in the JSON line, with a non-zero exit status
        code = 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    if sampler is not None:
        sampler.stop()
    result = {
        "exit_code": code,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_after_imports_mib": round(imports.get("VmRSS", 0) / 1024, 1),
        "end": {key: round(value / 1024, 1) for key, value in _status_kib().items()},
    }
    if sampler is not None:
        result["stages"] = {
            stage: {f"peak_{key}_mib": round(value / 1024, 1) for key, value in peak.items() if key != "VmHWM"}
            for stage, peak in sampler.peaks.items()
        }
        for stage, status in sampler.at_start.items():
            result["stages"].setdefault(stage, {})["start_RssAnon_mib"] = round(status.get("RssAnon", 0) / 1024, 1)
        for stage, traced in sampler.traced.items():
            result["stages"][stage].update({f"traced_{k}": round(v, 1) for k, v in traced.items()})
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------
# parent: one fresh process per measurement, then the slopes
# ---------------------------------------------------------------------------------------------------------


def measure(model: Path, data: Path, out: Path, cache_dir: Path | None, extra=(), stages=False, tracemalloc=False,
            env=None, timeout=600) -> dict:  # fmt: skip
    """One ``probe run`` in a fresh process (``child`` mode); its JSON line plus report.json's layer widths."""
    command = [sys.executable, str(Path(__file__).resolve()), "child"]
    command += ["--stages"] * stages + ["--tracemalloc"] * tracemalloc
    command += ["--", str(model), "--data", str(data), "--out", str(out), "-q", "--device", "cpu", *map(str, extra)]
    command += ["--cache-dir", str(cache_dir)] if cache_dir is not None else ["--no-cache"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if result["exit_code"] != 0:
        raise RuntimeError(f"probe run failed: {done.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    result["features_used"] = {layer["name"]: layer["features_used"] for layer in report["layers"]}
    result["split_sizes"] = report["split_sizes"]
    result["seconds_by_phase"] = report["settings"]["seconds"]
    return result


def slopes(small: dict, large: dict, n_small: int, n_large: int, input_bytes: int) -> dict:
    """KiB per extra sample of the peaks, and what must be held per sample (input + reduced features)."""
    features_bytes = 4 * sum(small["features_used"].values())
    held_kib = (input_bytes + features_bytes) / 1024

    def per(a: float, b: float) -> float:  # MiB over samples -> KiB per sample
        return (b - a) * 1024 / (n_large - n_small)

    figures = {
        "input_kib_per_sample": round(input_bytes / 1024, 1),
        "features_kib_per_sample": round(features_bytes / 1024, 1),
        "held_kib_per_sample": round(held_kib, 1),
        "peak_rss_slope_kib": round(per(small["peak_rss_mib"], large["peak_rss_mib"]), 1),
    }
    figures["ratio"] = round(figures["peak_rss_slope_kib"] / held_kib, 2)
    if "stages" in small and "stages" in large:
        for stage in STAGES:
            if stage in small["stages"] and stage in large["stages"]:
                for key in ("peak_RssAnon_mib", "peak_RssFile_mib"):
                    kind = key.split("_")[1][3:].lower()  # anon, file
                    figures[f"{stage}_{kind}_slope_kib"] = round(per(small["stages"][stage][key], large["stages"][stage][key]), 1)
        anon = [figures.get(f"{stage}_anon_slope_kib", float("-inf")) for stage in STAGES]
        figures["peak_anon_slope_kib"] = round(max(anon), 1)
        figures["anon_ratio"] = round(figures["peak_anon_slope_kib"] / held_kib, 2)
    return figures


def run_all(sizes=(2000, 6000), modes=("cache", "no-cache"), stages=True, tracemalloc=False, extra=(),
            workdir: Path | None = None, verbose=True) -> dict:  # fmt: skip
    """Measure every (N, mode) once, each in a fresh process; the slopes per mode."""
    with tempfile.TemporaryDirectory(prefix="probecore-run-memory-", dir=workdir) as folder:
        folder = Path(folder)
        model = save_convnet3(folder / "convnet3.onnx")
        runs: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
        for n in sizes:
            data = save_data(folder / f"data-{n}.npz", n)
            for mode in modes:
                cache_dir = folder / f"cache-{n}" if mode == "cache" else None
                result = measure(model, data, folder / f"out-{mode}-{n}", cache_dir, extra, stages, tracemalloc)
                runs[mode][n] = result
                if verbose:
                    print(json.dumps({"mode": mode, "n": n, **result}), file=sys.stderr, flush=True)
            data.unlink()
    input_bytes = 4 * math.prod(IMAGE)
    n_small, n_large = sizes[0], sizes[-1]
    summary = {"sizes": list(sizes), "target_ratio": 1.5}
    for mode in modes:
        summary[mode] = {
            **slopes(runs[mode][n_small], runs[mode][n_large], n_small, n_large, input_bytes),
            "peak_rss_mib": {n: runs[mode][n]["peak_rss_mib"] for n in sizes},
            "seconds": {n: runs[mode][n]["seconds"] for n in sizes},
        }
    summary["features_used"] = runs[modes[0]][n_small]["features_used"]
    summary["runs"] = runs
    return summary


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="2000,6000", help="sample counts, comma-separated (first and last give the slope)")
    parser.add_argument("--cache", choices=("both", "on", "off"), default="both")
    parser.add_argument("--no-stages", action="store_true", help="peak RSS only, no sampling thread")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace the heap per stage (slower)")
    parser.add_argument("--l2", default=None, help="passed to probe run (default: its own path of strengths)")
    parser.add_argument("--batch-size", type=int, default=None, help="passed to probe run (default: its own, 256)")
    parser.add_argument("--full", action="store_true", help="also print every run's figures")
    args = parser.parse_args(argv)
    modes = {"both": ("cache", "no-cache"), "on": ("cache",), "off": ("no-cache",)}[args.cache]
    extra = (["--l2", args.l2] if args.l2 else []) + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    summary = run_all(tuple(int(n) for n in args.n.split(",")), modes, not args.no_stages, args.tracemalloc, extra)
    if not args.full:
        summary.pop("runs")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

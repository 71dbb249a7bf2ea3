"""GPU check for issue 16, a run that stays on the GPU: extraction against the plain pass, probes fitted on the
GPU against the CPU path, image decoding, and a whole ``probe run`` on JPEGs, CPU against GPU.

On a machine with an NVIDIA GPU and onnxruntime-gpu (the lent H200 has 16 cores):

    python benchmarks/gpu_check_fit.py --json benchmarks/results/gpu_check_fit_h200.json

Anywhere, at small sizes and on the CPU (onnxruntime's CPU provider stands in for the GPU; the figures are a
smoke test of the script, not results):

    python benchmarks/gpu_check_fit.py --smoke --json /tmp/gpu_check_fit_smoke.json

Parts (``--parts``, all by default), each a section of the JSON:

- ``extraction``: the ResNet-50-shaped model (``resnet50.py``), its 16 block outputs globally pooled in the
  graph. Samples/s of the plain forward pass (logits only, probecore's session options) and of
  ``OnnxSource.reduced_activations`` with one output per layer (before issue 16), one concatenated output
  (the default), and that with I/O binding; at batch 16 and 128; rounds interleaved, fastest of each.
- ``fit``: the 16-layer ResNet-50-shaped probing workload (``probe_workload.py``: 20 000 / 5 000 / 5 000
  samples) at C = 10 and C = 100: ``fit_probes`` on the CPU path (every core) against the same with the
  device fitter (``onnx_fit.DeviceFitter``); wall times and their ratio (the issue's target: >= 20), per
  layer the strength chosen, the objective (float64) and test errors of both (targets: 1e-4 relative, 0.1
  points), and the time spent inside device evaluations.
- ``decode``: images/s decoding and preprocessing JPEGs (``ImageFolder``: 224 x 224 files as they are, and
  500 x 375 ones resized and cropped) with 1, 2, 4, 8 and every core's threads.
- ``run``: ``probe run`` in fresh processes on a folder of JPEGs (the same model, the 16 blocks, global
  pooling): ``--device cpu --fit-device cpu`` against ``--device cuda --fit-device cuda`` (target: >= 10x);
  wall times, the reports' seconds, the share of onnxruntime's time spent waiting for images, test errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import probecore
from probecore.backends import onnx_fit
from probecore.backends.onnx_source import OnnxSource, create_session
from probecore.probe import FitOptions, _moments, _standardized, available_cores, fit_probes

sys.path.insert(0, str(Path(__file__).parent))
from probe_workload import objective, resnet50_workload  # noqa: E402
from resnet50 import BLOCK_OUTPUTS, INPUT, OUTPUT, build_resnet50  # noqa: E402

SIZES = {
    "full": {"image_size": 224, "samples": 256, "batches": (16, 128), "rounds": 3, "small_workload": False,
             "folder_images": 4000, "decode_images": 512},
    "smoke": {"image_size": 64, "samples": 32, "batches": (16,), "rounds": 1, "small_workload": True,
              "folder_images": 60, "decode_images": 32},
}  # fmt: skip
VARIANTS = {  # OnnxSource options of each extraction variant
    "one_output_per_layer": {"concat_reduced": False},
    "concatenated": {},
    "concatenated_io_binding": {"io_binding": True},
}
PARTS = ("extraction", "fit", "decode", "run")


def interleaved(functions: dict, rounds: int) -> dict[str, float]:
    """Fastest seconds of each function over ``rounds`` rounds, one call of each per round (same load)."""
    for function in functions.values():
        function()  # sessions, CUDA context, allocators: not timed
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def extraction(model: Path, device: str, sizes: dict) -> dict:
    side = sizes["image_size"]
    x = np.random.default_rng(0).standard_normal((sizes["samples"], 3, side, side), dtype=np.float32)
    session, provider = create_session(model.read_bytes(), device)
    policy = probecore.ReductionPolicy(global_pool=True)
    results = {"provider": provider, "samples": len(x), "image_size": side}
    for batch in sizes["batches"]:

        def plain(batch=batch):
            for start in range(0, len(x), batch):
                session.run([OUTPUT], {INPUT: x[start : start + batch]})

        functions = {"plain": plain}
        for name, options in VARIANTS.items():
            source = OnnxSource(model, device=device, **options)
            chosen = probecore.select_layers(source.layers(), list(BLOCK_OUTPUTS))
            reductions = {layer.name: probecore.plan_reduction(layer.name, layer.shape, policy) for layer in chosen}
            functions[name] = lambda source=source, reductions=reductions, batch=batch: [
                None for _ in source.reduced_activations(x, reductions, batch)
            ]
        seconds = interleaved(functions, sizes["rounds"])
        results[f"batch_{batch}"] = {
            **{f"{name}_samples_per_s": round(len(x) / value, 1) for name, value in seconds.items()},
            **{f"{name}_ratio_to_plain": round(seconds["plain"] / value, 3) for name, value in seconds.items()
               if name != "plain"},
        }  # fmt: skip
    return results


class EvaluationClock:
    """Adds up the time the device fitter's evaluators spend in onnxruntime (all fits together)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._run = onnx_fit.OrtSoftmaxLoss._run

    def __enter__(self):
        def timed(session, binding):
            started = time.perf_counter()
            self._run(session, binding)
            self.seconds += time.perf_counter() - started
            self.calls += 1

        onnx_fit.OrtSoftmaxLoss._run = staticmethod(timed)
        return self

    def __exit__(self, *exc):
        onnx_fit.OrtSoftmaxLoss._run = staticmethod(self._run)


def fitting(device: str, n_classes: int, sizes: dict) -> dict:
    workload = resnet50_workload(n_classes, small=sizes["small_workload"])
    y_train, y_valid, y_test = workload.labels()
    layers = {name: (train, valid, test) for name, train, valid, test in workload.layers()}
    train = {name: split[0] for name, split in layers.items()}
    valid = {name: split[1] for name, split in layers.items()}
    fitter = onnx_fit.DeviceFitter(device)
    # warm-up, not timed: numba's kernels, the sessions and the device's allocator on a small fit
    first = next(iter(layers))
    for evaluator in (None, fitter):
        fit_probes({first: train[first][:500]}, y_train[:500], n_classes, {first: valid[first][:200]}, y_valid[:200],
                   FitOptions(l2=1e-2), evaluator=evaluator)  # fmt: skip
    started = time.perf_counter()
    on_cpu = fit_probes(train, y_train, n_classes, valid, y_valid, FitOptions())
    cpu_seconds = time.perf_counter() - started
    with EvaluationClock() as clock:
        started = time.perf_counter()
        on_device = fit_probes(train, y_train, n_classes, valid, y_valid, FitOptions(), evaluator=fitter)
        device_seconds = time.perf_counter() - started
    per_layer = []
    for name, (train_x, _, test_x) in layers.items():
        standardized = _standardized(train_x, *_moments(train_x))
        cpu, gpu = on_cpu[name], on_device[name]
        objectives = [objective(standardized, y_train, probe.weights, probe.bias, probe.l2) for probe in (cpu, gpu)]
        errors = [probe.evaluate(test_x, y_test).error for probe in (cpu, gpu)]
        per_layer.append({
            "layer": name, "features": train_x.shape[1], "l2_cpu": cpu.l2, "l2_device": gpu.l2,
            "objective_cpu": objectives[0], "objective_device": objectives[1],
            "objective_relative_difference": abs(objectives[1] - objectives[0]) / abs(objectives[0]),
            "test_error_cpu": errors[0], "test_error_device": errors[1],
            "iterations_cpu": cpu.n_iter, "iterations_device": gpu.n_iter,
            "seconds_cpu": round(cpu.fit_seconds, 3), "seconds_device": round(gpu.fit_seconds, 3),
        })  # fmt: skip
    worst_objective = max(layer["objective_relative_difference"] for layer in per_layer)
    worst_error = max(abs(layer["test_error_cpu"] - layer["test_error_device"]) for layer in per_layer)
    return {
        "classes": n_classes, "train": len(y_train), "valid": len(y_valid), "test": len(y_test), "layers": len(layers),
        "cpu_cores": available_cores(), "device": fitter.describe(),
        "cpu_seconds": round(cpu_seconds, 2), "device_seconds": round(device_seconds, 2),
        "speedup": round(cpu_seconds / device_seconds, 2),
        "device_evaluation_seconds_all_fits": round(clock.seconds, 2), "device_evaluations": clock.calls,
        "same_strength_every_layer": all(layer["l2_cpu"] == layer["l2_device"] for layer in per_layer),
        "largest_objective_relative_difference": worst_objective,
        "largest_test_error_difference_points": round(100 * worst_error, 3),
        "per_layer": per_layer,
    }  # fmt: skip


def write_jpegs(root: Path, n_images: int, size: tuple[int, int], n_classes: int = 10, seed: int = 0) -> Path:
    """``n_images`` JPEGs (quality 90) in ``n_classes`` class folders: a colour and a stripe frequency per
    class, under noise, so that the probes have something to read."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    columns = np.arange(width)[None, :, None]
    for index in range(n_images):
        label = index % n_classes
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([25 * label, 255 - 20 * label, 128], np.float32)
        stripes = 40 * np.sin(columns * (label + 1) * np.pi / width)
        pixels = colour + stripes + rng.normal(0, 40, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def decode(scratch: Path, sizes: dict) -> dict:
    from probecore.images import ImageFolder, ImagePreprocessing

    kinds = {  # JPEG size, preprocessing: decoding and normalizing only, or ImageNet's resize and crop too
        "224px_no_resize": ((224, 224), ImagePreprocessing(size=224, resize=224)),
        "500x375_resize_256": ((500, 375), ImagePreprocessing(size=224)),
    }
    cores = available_cores()
    results = {"cpu_cores": cores, "images": sizes["decode_images"]}
    for kind, (size, preprocessing) in kinds.items():
        root = write_jpegs(scratch / f"decode_{kind}", sizes["decode_images"], size)
        results[kind] = {}
        for workers in sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1))):
            folder = ImageFolder(root, preprocessing, workers=workers)
            rate = len(folder) / interleaved({"load": lambda folder=folder: folder[:]}, sizes["rounds"])["load"]
            results[kind][f"workers_{workers}"] = {"images_per_s": round(rate, 1), "per_worker": round(rate / workers, 1)}
    return results


def whole_run(model: Path, scratch: Path, device: str, sizes: dict) -> dict:
    """``probe run`` in fresh processes, the CPU path against the device's."""
    folder = write_jpegs(scratch / "jpegs", sizes["folder_images"], (320, 240))
    sides = {"cpu": ["--device", "cpu", "--fit-device", "cpu"]}
    # on the CPU (the smoke run) the second side is the default, which resolves to the CPU there
    sides["device"] = ["--device", "cuda", "--fit-device", "cuda"] if device == "cuda" else ["--device", "cpu"]
    results = {"images": sizes["folder_images"], "jpeg_size": [320, 240]}
    for side, options in sides.items():
        out = scratch / f"run_{side}"
        command = [sys.executable, "-m", "probecore.cli", "run", str(model), "--data", str(folder), "--out", str(out),
                   "--layers", "layer?.?", "--global-pool", "--no-cache", "-q", *options]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            results[side] = {"error": done.stderr.strip()[-2000:]}
            continue
        report = json.loads((out / "report.json").read_text())
        source = report["settings"]["source"]
        waiting, running = source["seconds"]["waiting_for_inputs"], source["seconds"]["running"]
        results[side] = {
            "command": " ".join(command[1:]), "wall_seconds": round(wall, 2), "seconds": report["settings"]["seconds"],
            "provider": source["provider"], "fit_device": report["settings"]["fit_device"],
            "onnxruntime_seconds_waiting_for_images": waiting, "onnxruntime_seconds_running": running,
            "share_waiting_for_images": round(waiting / max(waiting + running, 1e-9), 3),
            "test_error": {layer["name"]: layer["metrics"]["test"]["error"] for layer in report["layers"]},
        }  # fmt: skip
    if "wall_seconds" in results["cpu"] and "wall_seconds" in results["device"]:
        results["speedup_wall"] = round(results["cpu"]["wall_seconds"] / results["device"]["wall_seconds"], 2)
        errors = [results[side]["test_error"] for side in ("cpu", "device")]
        worst = max(abs(errors[0][name] - errors[1][name]) for name in errors[0])
        results["largest_test_error_difference_points"] = round(100 * worst, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, on the CPU: checks the script runs")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, or cpu with --smoke")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    sizes = SIZES["smoke" if args.smoke else "full"]
    device = args.device or ("cpu" if args.smoke else "cuda")
    parts = args.parts.split(",")
    import onnxruntime

    results = {"device": device, "sizes": "smoke" if args.smoke else "full", "onnxruntime": onnxruntime.__version__,
               "cpu_cores": available_cores(), "machine": os.uname().nodename}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="probecore-gpu-check-") as folder:
        scratch = Path(folder)
        model = build_resnet50(scratch / "resnet50.onnx", image_size=224 if "run" in parts else sizes["image_size"])
        small_model = model
        if sizes["image_size"] != 224:
            small_model = build_resnet50(scratch / "small.onnx", image_size=sizes["image_size"])
        steps = {
            "extraction": lambda: extraction(small_model, device, sizes),
            "fit": lambda: {f"classes_{c}": fitting(device, c, sizes) for c in (10, 100)},
            "decode": lambda: decode(scratch, sizes),
            "run": lambda: whole_run(model, scratch, device, sizes),
        }
        for part in parts:
            started = time.perf_counter()
            try:
                results[part] = steps[part]()
            except probecore.ProbeError as exc:
                results[part] = {"error": str(exc)}
            results[part]["part_seconds"] = round(time.perf_counter() - started, 1)
            print(f"{part}: done in {results[part]['part_seconds']} s", file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""GPU check for the framework adapters: torch models exported by probecore.backends.torch, probed on
onnxruntime's CUDA provider against the CPU provider and against torch itself, in one run.

Run on a machine with an NVIDIA GPU, torch and onnxruntime-gpu:  python benchmarks/gpu_check_adapters.py [--json OUT]
Models: a branched convnet (residual blocks, an auxiliary head), and a transformer encoder fed padded token
batches with an attention mask (two inputs, token pooling over real tokens). For each it prints the provider
really used, the largest difference between CUDA and CPU activations and between either and torch's own
(forward hooks), the extraction throughput per provider, and each layer's probe test error per provider.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import probecore
from probecore.backends import torch as probe_torch
from probecore.backends.onnx_source import OnnxSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_torch_adapter import BranchedNet, TinyEncoder  # noqa: E402


def torch_activations(model, inputs, names):
    captured, modules = {}, dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o.detach().numpy())) for n in names]
    with torch.no_grad():
        model(*[torch.from_numpy(np.asarray(v)) for v in inputs])
    for hook in hooks:
        hook.remove()
    return captured


def check(name, model, example, x, y, layers, policy, torch_inputs) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = probe_torch.export(model.eval(), example, Path(folder) / f"{name}.onnx")
        dataset = probecore.split_dataset(x, y, seed=0)
        reference = torch_activations(model, torch_inputs, layers)
        result = {"model": name, "samples": len(y)}
        outputs = {}
        for device in ("cuda", "cpu"):
            try:
                result[device], outputs[device] = measure(path, device, dataset, layers, policy, torch_inputs, reference)
            except probecore.ProbeError as exc:  # no CUDA here: say so and go on with the CPU
                result[device] = {"error": str(exc)}
        if len(outputs) == 2:
            result["max_abs_diff_cuda_vs_cpu"] = max(float(np.abs(outputs["cuda"][n] - outputs["cpu"][n]).max()) for n in layers)
        return result


def measure(path, device, dataset, layers, policy, torch_inputs, reference):
    source = OnnxSource(path, device=device)
    raw = torch_inputs if len(torch_inputs) > 1 else torch_inputs[0]
    feed = probecore.pack_inputs(**dict(zip(source.input_names, raw))) if len(torch_inputs) > 1 else raw
    batch = next(source.activations(source.check_inputs(feed), layers, batch_size=len(feed)))
    chosen = [layer for layer in source.layers() if layer.name in layers]
    spec = probecore.RunSpec(layers=[f"name:{n}" for n in layers], policy=policy)
    probecore.extract_features(source, dataset, chosen, spec)  # warm-up
    started = time.perf_counter()
    probecore.extract_features(source, dataset, chosen, spec)
    seconds = time.perf_counter() - started
    report = probecore.run_probes(source, dataset, spec)
    n_samples = sum(len(split) for split in dataset.splits().values())
    return {
        "provider": source.provider,
        "extraction_samples_per_s": round(n_samples / seconds, 1),
        "max_abs_diff_vs_torch": max(float(np.abs(batch[n] - reference[n]).max()) for n in layers),
        "test_error": {layer.name: layer.metrics["test"].error for layer in report.layers},
    }, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n = args.samples
    labels = rng.integers(0, 5, size=n)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    images[:, 0] += 0.5 * labels[:, None, None]
    conv = check("branched_convnet", BranchedNet(), images[:2], images, labels, ["stem.1", "layer1.0", "layer1.1"],
                 probecore.ReductionPolicy(max_features=256), [images[:64]])  # fmt: skip
    width = 12
    lengths = rng.integers(2, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = (rng.integers(1, 20, size=(n, width)) * mask).astype(np.int64)
    ids[:, 1] = 1 + labels  # the class is the second token
    tokens = probecore.pack_inputs(input_ids=ids, attention_mask=mask)
    encoder = check("transformer_encoder", TinyEncoder(classes=5), {"input_ids": ids[:2], "attention_mask": mask[:2]},
                    tokens, labels, ["encoder.layers.0", "encoder.layers.1"], probecore.ReductionPolicy(tokens="mean"),
                    [ids[:64], mask[:64]])  # fmt: skip
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
               "checks": [conv, encoder]}  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Probing data whose reduced features exceed the memory the process may use (issue 14, point 6).

The documented way to probe a data set whose features do not fit in memory is the feature cache
(``probe run --cache-dir DIR``, on by default in the CLI): each split's features are written to disk batch by
batch (``pipeline._through_cache``) and memory-mapped back read-only for the fits (``CacheEntry.read``), so
what the process itself must allocate is the inputs, one batch of activations, and what the concurrent fits
copy (each fit standardizes its layer's train and valid features into fresh arrays, ``probe._fit``). With
``--no-cache`` every layer of every split is concatenated in memory (``pipeline._in_memory``) and held until
the fits end.

The limit is ``RLIMIT_DATA``, set in the child before it execs the command. Since Linux 4.7 it counts private writable
mappings (the heap, anonymous memory, thread stacks: what numpy, onnxruntime and numba allocate) but not
shared or read-only file mappings such as the memory-mapped cache, whose pages the kernel can drop and read
again. ``RLIMIT_AS`` cannot show this: it counts every mapping at its full size, the mapped cache files
included (and onnxruntime and numba reserve large ranges of address space up front).

The limit is set relative to what the same command needs on a small data set, measured here (the peak of
``VmData`` in ``/proc/PID/status``, polled while it runs): imports, the onnxruntime session and its arena at
full batches, numba, matplotlib for the figures. The headroom above that is half the large run's reduced
features (all layers, all splits); the cached run must complete under it, and the same command with
``--no-cache`` must run out of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
        reason="RLIMIT_DATA counts private mappings only on Linux (4.7 and later)",
    ),
]

N_LAYERS = 12  # Conv 16 -> Relu at 16 x 16: 4096 features each, unreduced (ReductionPolicy().max_features)
N_CLASSES = 3
IMAGE = (3, 16, 16)  # 3 KiB per sample against 12 x 16 KiB of features: the features dominate
N_SMALL = 400  # calibration: every split small, the train split still in whole batches of BATCH
N_LARGE = 3000  # 12 x 4096 x 4 bytes x 3000 = 562.5 MiB of reduced features
BATCH = 64
MIB = 2**20


def save_deep_convnet(path, rng):
    """x (N, 3, 16, 16) -> N_LAYERS x (Conv 3x3 to 16 channels "convK" -> Relu "reluK") -> GlobalAveragePool ->
    Flatten -> Gemm to N_CLASSES."""
    nodes, initializers, previous, channels = [], [], "x", IMAGE[0]
    for k in range(1, N_LAYERS + 1):
        weight = rng.normal(size=(16, channels, 3, 3)) * np.sqrt(2 / (9 * channels))
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), f"w{k}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{k}"], [f"conv{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}"))
        previous, channels = f"relu{k}", 16
    initializers += [
        numpy_helper.from_array((rng.normal(size=(N_CLASSES, 16)) / 4).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *IMAGE])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])]
    return save_model(path, nodes, inputs, outputs, initializers)


def save_data(path, n, rng):
    """Standard normal images; the label is the argmax of N_CLASSES fixed projections (learnable)."""
    x = rng.standard_normal((n, *IMAGE), dtype=np.float32)
    directions = np.random.default_rng(7).standard_normal((x[0].size, N_CLASSES), dtype=np.float32)
    np.savez(path, x=x, y=(x.reshape(n, -1) @ directions).argmax(axis=1))
    return path


def probe_command(model, data, out, cache_dir):
    """The one command every run here uses; only --cache-dir / --no-cache differ. --threads is fixed so that the
    memory the concurrent fits copy does not depend on the machine's core count."""
    command = [sys.executable, "-m", "probecore.cli", "run", str(model), "--data", str(data), "--out", str(out), "-q",
               "--device", "cpu", "--layers", "op:Relu", "--threads", "2", "--batch-size", str(BATCH), "--l2", "0.1"]  # fmt: skip
    return command + (["--cache-dir", str(cache_dir)] if cache_dir is not None else ["--no-cache"])


def run_limited(command, limit_bytes=None, timeout=120):
    """Run ``command``, with RLIMIT_DATA at ``limit_bytes`` if given (set by a small Python that then execs the
    command: limits survive exec, and no ``preexec_fn`` runs in a threaded parent), polling its VmData;
    (CompletedProcess, peak VmData in bytes)."""
    if limit_bytes is not None:
        command = [sys.executable, "-c", LIMIT_AND_EXEC, str(limit_bytes), *map(str, command)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, deadline = 0, time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        peak = max(peak, _vm_data(process.pid))
        time.sleep(0.005)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


LIMIT_AND_EXEC = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)


def _vm_data(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rlimit_data_enforced(limit_bytes: int) -> bool:
    """Whether this kernel refuses private memory beyond RLIMIT_DATA (it can be switched off: ignore_rlimit_data)."""
    code = f"import numpy; numpy.ones({2 * limit_bytes}, numpy.uint8)"
    done, _ = run_limited([sys.executable, "-c", code], limit_bytes, timeout=60)
    return done.returncode != 0 and "MemoryError" in done.stderr


def test_cache_probes_features_larger_than_the_memory_limit(tmp_path, rng):
    if not _rlimit_data_enforced(256 * MIB):
        pytest.skip("RLIMIT_DATA is not enforced here (kernel before 4.7, or booted with ignore_rlimit_data)")
    model = save_deep_convnet(tmp_path / "deep.onnx", rng)
    small, large = save_data(tmp_path / "small.npz", N_SMALL, rng), save_data(tmp_path / "large.npz", N_LARGE, rng)

    calibration, base = run_limited(probe_command(model, small, tmp_path / "out-small", tmp_path / "cache-small"))
    assert calibration.returncode == 0, calibration.stderr[-3000:]
    widths = {layer["name"]: layer["features_used"] for layer in json.loads((tmp_path / "out-small/report.json").read_text())["layers"]}
    assert widths == {f"relu{k}": 4096 for k in range(1, N_LAYERS + 1)}  # fmt: skip

    features_bytes = N_LARGE * sum(widths.values()) * 4  # all layers, all splits, float32
    headroom = features_bytes // 2
    limit = base + headroom

    cached, cached_peak = run_limited(probe_command(model, large, tmp_path / "out-cached", tmp_path / "cache"), limit)
    in_memory, in_memory_peak = run_limited(probe_command(model, large, tmp_path / "out-in-memory", None), limit)
    figures = (f"calibration peak VmData {base / MIB:.0f} MiB; limit {limit / MIB:.0f} MiB (headroom {headroom / MIB:.0f} "
               f"MiB, features {features_bytes / MIB:.0f} MiB); cached run peak {cached_peak / MIB:.0f} MiB, "
               f"in-memory run peak {in_memory_peak / MIB:.0f} MiB")  # fmt: skip
    print(figures)

    assert cached.returncode == 0, f"{figures}\n{cached.stderr[-3000:]}"
    report = json.loads((tmp_path / "out-cached/report.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == list(widths)
    assert sum(report["split_sizes"].values()) == N_LARGE
    assert report["settings"]["cache"]["dir"] == str(tmp_path / "cache")
    assert all(layer["metrics"]["test"]["error"] < 1 - 1 / N_CLASSES for layer in report["layers"])  # probes that learnt
    assert cached_peak - base < headroom  # what the cached run allocated beyond the small run fits in the headroom

    assert in_memory.returncode != 0, f"the in-memory run fitted under the limit: {figures}"
    message = in_memory.stderr.strip()
    assert message.startswith("error: out of memory") and "\n" not in message and "--no-cache" in message, message
    assert not (tmp_path / "out-in-memory/report.json").exists()

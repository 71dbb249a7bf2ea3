"""Every user mistake on the command line ends in one clear line on stderr naming the problem and the fix, exit code 1, no
traceback (unless PROBECORE_DEBUG is set), and nothing left behind: no results directory, no cache entry.

Interruptions are the other half of the guarantee and live beside the cache: kill -9 then rerun
(test_pipeline_cache.py::test_kill_9_mid_extraction_then_rerun_gives_identical_features) and two runs on
one cache (test_pipeline_cache.py::test_two_runs_on_one_cache_both_succeed_and_agree).
"""

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import mlp_weights, save_mlp, save_model, save_open_convnet
from PIL import Image
from test_cli import invoke, small_npz

from probecore.bundled import DEMO_MODEL


def case(model, data, *extra):
    return model, data, list(extra)


def not_onnx(tmp, arrays):
    (tmp / "model.onnx").write_bytes(b"not a model")
    return case(tmp / "model.onnx", small_npz(tmp / "d.npz", arrays))


def truncated_onnx(tmp, arrays):
    whole = DEMO_MODEL.read_bytes()
    (tmp / "model.onnx").write_bytes(whole[: len(whole) // 2])
    return case(tmp / "model.onnx", small_npz(tmp / "d.npz", arrays))


def unknown_op(tmp, arrays):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp / "custom.onnx"))
    return case(tmp / "custom.onnx", _vectors(tmp / "d.npz", 4))


def several_inputs(tmp, arrays):
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("a", "b")]
    outputs = [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4])]
    return case(save_model(tmp / "two.onnx", nodes, inputs, outputs, []), _vectors(tmp / "d.npz", 4))


def unknown_layer(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays), "--layers", "relu9")


def pattern_matches_nothing(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays), "--layers", "block*")


def missing_data(tmp, arrays):
    return case(DEMO_MODEL, tmp / "nope.npz")


def missing_key(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays, x_train=None))


def label_count(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays, y_test=arrays["y_test"][:99]))


def single_class(tmp, arrays):
    np.savez(tmp / "d.npz", x=arrays["x_train"][:300], y=np.full(300, 7))
    return case(DEMO_MODEL, tmp / "d.npz")


def nan_inputs(tmp, arrays):
    x = arrays["x_train"][:300].astype(np.float32)
    x[5, 0, 3, 3] = np.nan
    np.savez(tmp / "d.npz", x=x, y=arrays["y_train"][:300])
    return case(DEMO_MODEL, tmp / "d.npz")


def inf_inputs(tmp, arrays):
    x = arrays["x_train"][:300].astype(np.float32)
    x[[1, 2], 0, 0, 0] = np.inf
    np.savez(tmp / "d.npz", x=x, y=arrays["y_train"][:300])
    return case(DEMO_MODEL, tmp / "d.npz")


def wrong_shape(tmp, arrays):
    flat = {key: arrays[key][:n].reshape(n, 784) for key, n in (("x_train", 400), ("x_valid", 100), ("x_test", 100))}
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays, **flat))


def wrong_dtype(tmp, arrays):
    np.savez(tmp / "d.npz", x=arrays["x_train"][:300].astype(np.complex64), y=arrays["y_train"][:300])
    return case(DEMO_MODEL, tmp / "d.npz")


def empty_data(tmp, arrays):
    np.savez(tmp / "d.npz", x=arrays["x_train"][:0], y=arrays["y_train"][:0])
    return case(DEMO_MODEL, tmp / "d.npz")


def image_folder(root):
    rng = np.random.default_rng(2)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(10):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / label / f"{index}.jpg")
    return root


def too_large_unreduced(tmp, arrays):
    weights = mlp_weights(np.random.default_rng(0), n_in=300_000, n_hidden=2, n_classes=2)
    model = save_mlp(tmp / "wide.onnx", weights)
    return case(model, _vectors(tmp / "d.npz", 300_000, n=30), "--no-reduce", "--layers", "x")


def bad_l2(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays), "--l2", "1e-3,strong")


def negative_l2(tmp, arrays):
    return case(DEMO_MODEL, small_npz(tmp / "d.npz", arrays), "--l2", "-1")


def missing_weights_file(tmp, arrays):
    model = save_open_convnet(tmp / "model.onnx", np.random.default_rng(0), external_data=True)
    (tmp / "model.onnx.data").unlink()
    return case(model, small_npz(tmp / "d.npz", arrays))  # the model is read first


def _vectors(path, width, n=200):
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(n, width)).astype(np.float32), y=np.arange(n) % 2)
    return path


# (case, what the line must say: the problem ... and the fix)
MATRIX = [
    (not_onnx, ["is not an ONNX model", "export it with torch.onnx.export or tf2onnx"]),
    (truncated_onnx, ["model.onnx is not", "export it"]),
    (unknown_op, ["onnxruntime cannot run this model", "FancyOp", "re-export it with standard ONNX ops"]),
    (several_inputs, ["the model has 2 inputs (a, b)", "probecore.pack_inputs(a=..., b=...)"]),
    (unknown_layer, ["unknown layer 'relu9'", "did you mean relu3, relu2, relu1?"]),
    (pattern_matches_nothing, ["pattern 'block*' matches no layer", "probe layers MODEL --all"]),
    (missing_data, ["data file not found", "pass an existing .npz file or image folder"]),
    (missing_key, ["needs keys x_train, y_train, x_test, y_test"]),
    (label_count, ["x_test/y_test: 100 samples but 99 labels"]),
    (single_class, ["all labels are 7", "at least two classes"]),
    (nan_inputs, ["1 input samples contain NaN or Inf", "remove or fix them"]),
    (inf_inputs, ["2 input samples contain NaN or Inf", "remove or fix them"]),
    (wrong_shape, ["per-sample shape (784,), but model input 'pixels' expects (1, 28, 28)", "reshape the data"]),
    (wrong_dtype, ["inputs have dtype complex64, but model input 'pixels' takes float32"]),
    (empty_data, ["no samples", "pass one with labelled samples"]),
    (too_large_unreduced, ["layer 'x' has 300000 features", "allow reduction (drop --no-reduce)"]),
    (bad_l2, ["--l2 takes comma-separated numbers"]),
    (negative_l2, ["l2 must be one or more strengths, zero or positive"]),
    (missing_weights_file, ["model.onnx keeps its weights in model.onnx.data, which is missing: looked for",
                            "put that file beside model.onnx (or re-export the model with its weights inside)"]),
]


@pytest.mark.parametrize("make_case, says", MATRIX, ids=[make.__name__ for make, _ in MATRIX])
def test_a_mistake_gives_one_line_exit_1_and_leaves_nothing(tmp_path, demo_arrays, make_case, says):
    model, data, extra = make_case(tmp_path, demo_arrays)
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = invoke("run", model, "--data", data, "--out", out, "--cache-dir", cache, *extra)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in says:
        assert part in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))


def ir_too_new_for_onnx(tmp, arrays):
    model = onnx.load(str(DEMO_MODEL))
    model.ir_version = onnx.IR_VERSION + 1
    onnx.save(model, str(tmp / "new.onnx"))
    return case(tmp / "new.onnx", small_npz(tmp / "d.npz", arrays)), (
        f"new.onnx uses ONNX IR version {onnx.IR_VERSION + 1}, newer than the installed onnx {onnx.__version__} reads "
        f"(IR up to {onnx.IR_VERSION}); upgrade it (pip install -U onnx onnxruntime-gpu, or onnxruntime where there "
        "is no GPU build), or re-export the model with an older opset (e.g. torch.onnx.export(..., opset_version=18))"
    )


def ir_too_new_for_onnxruntime(tmp, arrays):
    import onnxruntime

    model = onnx.load(str(DEMO_MODEL))
    model.ir_version = onnx.IR_VERSION  # what this onnx reads; onnxruntime lags behind onnx
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip(f"onnxruntime {onnxruntime.__version__} runs IR version {onnx.IR_VERSION} already")
    except Exception as exc:
        supported = str(exc).split("max supported IR version: ")[1].split()[0]
    onnx.save(model, str(tmp / "new.onnx"))
    return case(tmp / "new.onnx", small_npz(tmp / "d.npz", arrays)), (
        f"new.onnx uses ONNX IR version {onnx.IR_VERSION}, newer than the installed onnxruntime "
        f"{onnxruntime.__version__} reads (IR up to {supported}); upgrade it (pip install -U onnx onnxruntime-gpu, or "
        "onnxruntime where there is no GPU build), or re-export the model with an older opset (e.g. "
        "torch.onnx.export(..., opset_version=18))"
    )


def npy_data(tmp, arrays):
    np.save(tmp / "d.npy", arrays["x_train"][:300])
    return case(DEMO_MODEL, tmp / "d.npy"), (
        f"{tmp / 'd.npy'} is a .npy file, which holds one array (shape (300, 1, 28, 28), uint8): inputs alone, no "
        "labels; save inputs and labels together with numpy.savez('data.npz', x=inputs, y=labels), or ready splits as "
        "x_train, y_train, x_test, y_test (x_valid, y_valid optional)"
    )


def two_samples_per_class(tmp, arrays):
    np.savez(tmp / "d.npz", x=np.zeros((2000, 1, 28, 28), np.float32), y=np.repeat(np.arange(1000), 2))
    return case(DEMO_MODEL, tmp / "d.npz"), (
        f"{tmp / 'd.npz'}: too few samples per class for three splits: at valid fraction 0.1 and test fraction 0.2 a "
        "class needs at least 6 samples to reach every split, and the largest class has 2 (the valid and test splits "
        "would be empty); add samples, or give ready splits instead (x_train/y_train, x_valid/y_valid, x_test/y_test "
        "in the .npz)"
    )


EXACT = [ir_too_new_for_onnx, ir_too_new_for_onnxruntime, npy_data, two_samples_per_class]


@pytest.mark.parametrize("make_case", EXACT, ids=[make.__name__ for make in EXACT])
def test_the_exact_line_for_mistakes_whose_fix_is_not_obvious(tmp_path, demo_arrays, make_case):
    (model, data, extra), message = make_case(tmp_path, demo_arrays)
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = invoke("run", model, "--data", data, "--out", out, "--cache-dir", cache, *extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"error: {message}\n"
    assert not out.exists() and (not cache.exists() or not any(cache.iterdir()))


def unwritable_out(tmp):
    """An --out under a folder no one may write to: chmod for a normal user; root writes through chmod, but not
    into /sys (a read-only file system or no new entries, depending on the machine)."""
    if os.geteuid() != 0:
        (tmp / "locked").mkdir(mode=0o555)
        return tmp / "locked" / "results", tmp / "locked"
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys/probecore-results"), Path("/sys")
    pytest.skip("no folder this root user cannot write to")


@pytest.mark.parametrize("where", ["existing_file", "under_a_file", "unwritable_folder"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, demo_arrays, where, monkeypatch):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    (tmp_path / "taken").write_text("someone's file")
    out, message = {
        "existing_file": (tmp_path / "taken", "it is a file; pass --out a directory (it is created if missing)"),
        "under_a_file": (tmp_path / "taken" / "results", f"{tmp_path / 'taken'} is a file; pass --out a path under a directory"),
        "unwritable_folder": (None, None),
    }[where]  # fmt: skip
    if out is None:
        out, folder = unwritable_out(tmp_path)
        error = os.strerror(errno.EACCES if os.geteuid() != 0 else _errno_of_writing(folder))
        message = f"{folder} is not writable ({error}); pass --out a directory you can write to"
    started = []
    monkeypatch.setattr("probecore.cli.run.model_source", lambda *args: started.append(args))  # no work may start
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", out, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"error: cannot write results to {out}: {message}\n"
    assert started == [] and not (tmp_path / "cache").exists()
    assert (tmp_path / "taken").read_text() == "someone's file"


def test_sweep_checks_its_out_before_any_work_too(tmp_path, demo_arrays):
    (tmp_path / "taken").write_text("someone's file")
    result = invoke("sweep", DEMO_MODEL, "--data", small_npz(tmp_path / "d.npz", demo_arrays), "--out", tmp_path / "taken")
    assert result.exit_code == 1 and "[1/1]" not in result.stdout
    assert result.stderr == (
        f"error: cannot write results to {tmp_path / 'taken'}: it is a file; pass --out a directory (it is created if missing)\n"
    )


def _errno_of_writing(folder) -> int:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as exc:
        return exc.errno
    return 0


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path):
    # the documented behaviour for an image folder: a file that is no image, or whose data stops short, is
    # skipped before the split, counted on the screen and listed in report.json
    folder = image_folder(tmp_path / "images")
    (folder / "b" / "notes.png").write_text("not an image")
    whole = (folder / "a" / "0.jpg").read_bytes()
    (folder / "a" / "0.jpg").write_bytes(whole[: len(whole) // 3])
    result = invoke("run", DEMO_MODEL, "--data", folder, "--out", tmp_path / "r", "--no-cache", "--layers", "relu3")
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable images (listed in report.json)" in result.stdout
    skipped = json.loads((tmp_path / "r" / "report.json").read_text())["settings"]["images"]["unreadable_skipped"]
    assert sorted(skipped) == sorted([str(folder / "a" / "0.jpg"), str(folder / "b" / "notes.png")])


def test_an_error_line_prints_a_path_as_written(tmp_path):
    """rich reads :smile: as an emoji code; the error console must not (it would name a file that is not there)."""
    text = tmp_path / "data:smile:1.txt"
    text.write_text("1,2\n3,4\n")
    result = invoke("run", DEMO_MODEL, "--data", text, "--out", tmp_path / "results")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {text} is a text file")


def test_usage_errors_keep_typers_exit_code_2(tmp_path):
    result = invoke("run", DEMO_MODEL, "--batch-size", "0", "--data", tmp_path / "d.npz")
    assert result.exit_code == 2


def test_a_full_disk_mid_extraction_is_one_line_and_removes_the_partial_entry(tmp_path, demo_arrays, monkeypatch):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    out, cache = tmp_path / "results", tmp_path / "cache"
    real_pwrite, calls = os.pwrite, []

    def full_disk(*args):
        calls.append(args)
        if len(calls) > 3:  # a few batches get written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(*args)

    monkeypatch.setattr(os, "pwrite", full_disk)
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", out, "--cache-dir", cache, "--batch-size", "50",
                    "--layers", "relu3")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: out of disk space writing the feature cache in {cache} (the partial entry was removed); "
        "free some space, pass --cache-dir on another disk, or --no-cache"
    )
    assert len(calls) > 3 and not out.exists() and list(cache.iterdir()) == []
    monkeypatch.undo()
    again = invoke("run", DEMO_MODEL, "--data", data, "--out", out, "--cache-dir", cache, "--layers", "relu3", "-q")
    assert again.exit_code == 0, again.output


def test_nan_and_constant_activations_are_reported_per_layer_not_a_crash(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("logx", "dead", "alive")]
    minus_one = helper.make_tensor("minus_one", TensorProto.FLOAT, [], [-1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Log", ["x"], ["logx"]), helper.make_node("Mul", ["x", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "minus_one"], ["below"]), helper.make_node("Relu", ["below"], ["dead"]),
             helper.make_node("Relu", ["x"], ["alive"])]  # fmt: skip
    model = save_model(tmp_path / "m.onnx", nodes, [x], outs, [minus_one, zero])
    data = _vectors(tmp_path / "d.npz", 4, n=300)
    result = invoke("run", model, "--data", data, "--out", tmp_path / "r", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["logx"]["activations"]["non_finite_values"] > 0  # log of negative inputs
    assert layers["dead"]["activations"]["constant_features"] == 4
    assert layers["alive"]["activations"]["non_finite_values"] == 0
    assert all(np.isfinite(layer["metrics"]["test"]["loss"]) for layer in report["layers"])
    notes = {(d["kind"], d["layers"][0]) for d in report["diagnostics"]}
    assert {("activations", "logx"), ("activations", "dead")} <= notes

"""``RunSpec``: one serializable value for a run, recorded in its report, that the same run can be made from;
``probe run`` and ``probe sweep`` build it from one definition of their options."""

import json

import numpy as np
import pytest

import probecore
from probecore.bundled import DEMO_MODEL
from probecore.cli.app import app
from probecore.cli.options import SHARED
from test_cli import invoke, small_npz


def test_a_spec_survives_json_and_comes_back_equal(tmp_path):
    spec = probecore.RunSpec(
        data=probecore.DataSpec(tmp_path / "images", image_size=32, pixel_mean=(0.5, 0.4, 0.3)),
        layers="logits,op:Relu", policy=probecore.ReductionPolicy(max_features=100, pool="max", tokens="mean"),
        fit=probecore.FitOptions(l2=(1e-2, 1e-3), threads=2), batch_size=64, layers_per_pass=2, control_task=True,
        cache_dir=tmp_path / "cache", cache_dtype="float16", device="cpu", seed=4, valid_fraction=0.2,
    )  # fmt: skip
    again = probecore.RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.layers == ("name:logits", "op:Relu") and again.policy.seed == 4
    assert again.feature_cache().root == tmp_path / "cache" and again.feature_cache().storage_dtype == "float16"


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"batch_size": 0}, probecore.DataError, "batch_size must be at least 1, got 0"),
        ({"layers_per_pass": 0}, probecore.ReductionError, "layers_per_pass must be at least 1, got 0"),
        ({"cache_dtype": "int8"}, probecore.CacheError, "cache storage dtype must be one of float32, float16, got 'int8'"),
        ({"policy": probecore.ReductionPolicy(seed=3)}, probecore.ReductionError,
         "give the seed once, as RunSpec(seed=3), not in the ReductionPolicy"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_refused_in_one_line_naming_the_fix(changes, error, message):
    with pytest.raises(error) as caught:
        probecore.RunSpec(**changes)
    assert str(caught.value) == message


def test_something_else_than_a_spec_is_refused_in_one_line():
    with pytest.raises(probecore.DataError, match=r"^not a probecore run spec \(.*\); pass what RunSpec.to_dict\(\) wrote$"):
        probecore.RunSpec.from_dict({"layers": None, "colour": "blue"})


def test_the_report_records_its_spec_and_the_same_run_comes_from_it(rng):
    centers = rng.normal(scale=2, size=(3, 12))
    labels = np.arange(300) % 3
    source = probecore.ArraySource({"signal": (centers[labels] + rng.normal(size=(300, 12))).astype(np.float32)})
    dataset = probecore.split_dataset(np.arange(300), labels, seed=1)
    spec = probecore.RunSpec(fit=probecore.FitOptions(l2=(1e-2, 1e-3)), batch_size=50, control_task=True)
    report = probecore.run_probes(source, dataset, spec)
    assert report.settings["spec"] == spec.to_dict() and report.settings["engine"] == {"kind": "local"}
    again = probecore.run_probes(source, dataset, probecore.RunSpec.from_dict(report.settings["spec"]))
    assert [layer.metrics["test"].loss for layer in again.layers] == [layer.metrics["test"].loss for layer in report.layers]


def test_run_and_sweep_share_one_definition_of_every_run_option():
    import typer.main

    commands = typer.main.get_command(app).commands
    options = {name: {param.name: param.help for param in commands[name].params} for name in ("run", "sweep")}
    shared = {parameter.name for parameter in SHARED}
    assert shared <= set(options["run"]) and shared <= set(options["sweep"])
    assert {"cache_dir", "pool", "tokens", "threads", "control", "layers_per_pass"} <= shared
    assert all(options["run"][name] == options["sweep"][name] for name in shared)


def test_sweep_takes_the_cache_dir_and_reduction_options_as_run_does(tmp_path, demo_arrays):
    data, out, cache = small_npz(tmp_path / "d.npz", demo_arrays), tmp_path / "sweep", tmp_path / "cache"
    options = ["--data", data, "--layers", "relu1,logits", "--pool", "max", "--cache-dir", cache, "--threads", "1"]
    result = invoke("sweep", DEMO_MODEL, "--out", out, "--quiet", *options)
    assert result.exit_code == 0, result.output
    (report,) = json.loads((out / "sweep.json").read_text())["reports"]
    assert report["settings"]["spec"]["policy"]["pool"] == "max" and report["settings"]["spec"]["cache_dir"] == str(cache)
    assert report["settings"]["cache"]["splits_from_cache"] == 0 and any(cache.iterdir())
    result = invoke("run", DEMO_MODEL, "--out", tmp_path / "run", "--quiet", *options)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "report.json").read_text())
    assert run["settings"]["cache"]["splits_from_cache"] == 3  # the sweep's features, read back
    assert [layer["metrics"] for layer in run["layers"]] == [layer["metrics"] for layer in report["layers"]]


def test_a_bad_option_value_is_one_line_before_any_work(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    for command in ("run", "sweep"):
        result = invoke(command, DEMO_MODEL, "--data", data, "--out", tmp_path / command, "--l2", "x")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr == "error: --l2 takes comma-separated numbers, e.g. 0.485,0.456,0.406; got 'x'\n"
        assert not (tmp_path / command).exists()

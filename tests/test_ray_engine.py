"""The Ray engine on a 3-node cluster of 1 CPU each (``ray.cluster_utils.Cluster``, all on this machine): the
report a local run gives, also when an extraction actor or a fitting worker is killed, and a rerun after the
driver was killed resumes from the shards it finished."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
cloudpickle = pytest.importorskip("ray.cloudpickle")

import probecore  # noqa: E402
from probecore.backends.onnx_source import OnnxSource  # noqa: E402
from probecore.backends.ray_engine import RayEngine  # noqa: E402
from probecore.bundled import DEMO_DATA, DEMO_MODEL  # noqa: E402
from test_cli import small_npz  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get this module's sources by value
SPEC = probecore.RunSpec(layers="relu1,pool2,relu3,logits", fit=probecore.FitOptions(l2=(1e-2, 1e-3)), batch_size=100)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def dataset():
    pool = probecore.load_dataset(DEMO_DATA)
    return probecore.split_dataset(pool.train.x[:1500], pool.train.y[:1500], seed=0)


@pytest.fixture(scope="module")
def local(dataset):
    return probecore.run_probes(OnnxSource(DEMO_MODEL, device="cpu"), dataset, SPEC)


def assert_same_report(ours: dict, theirs: dict, loss_tolerance: float = 1e-5):
    """Splits, chosen strengths and errors equal; losses within ``loss_tolerance`` (relative)."""
    assert ours["split_sizes"] == theirs["split_sizes"] and ours["model"] == theirs["model"]
    assert [layer["name"] for layer in ours["layers"]] == [layer["name"] for layer in theirs["layers"]]
    for mine, other in zip(ours["layers"], theirs["layers"]):
        assert mine["fit"]["l2"] == other["fit"]["l2"], mine["name"]
        for split, metrics in mine["metrics"].items():
            assert metrics["error"] == other["metrics"][split]["error"], (mine["name"], split)
            assert metrics["loss"] == pytest.approx(other["metrics"][split]["loss"], rel=loss_tolerance), (
                mine["name"], split)  # fmt: skip


class KilledOnce(OnnxSource):
    """The demo model, whose process is killed (SIGKILL) after its first batch, once per marker file."""

    def __init__(self, marker: Path):
        super().__init__(DEMO_MODEL, device="cpu")
        self.marker = str(marker)

    def reduced_activations(self, *args, **kwargs):
        for index, batch in enumerate(super().reduced_activations(*args, **kwargs)):
            yield batch
            if index == 0 and _first(self.marker):
                os.kill(os.getpid(), signal.SIGKILL)


def _first(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def probe_cli(*args, cwd) -> subprocess.CompletedProcess:
    """``probe ARGS`` in a fresh process (not the checkout as working directory: ``-m`` puts it first)."""
    command = [sys.executable, "-m", "probecore.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)


def test_probe_run_on_ray_writes_the_local_report(cluster, tmp_path, demo_arrays):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    options = ["--data", data, "--layers", "relu1,relu3,logits", "--l2", "1e-2,1e-3", "--batch-size", "100", "--quiet"]
    # both drivers in fresh processes, as a user runs them: not in this one, which earlier tests have used
    # (the probes' settled stop can turn last-bit differences into 1e-5 in a loss)
    local = probe_cli("run", DEMO_MODEL, "--out", tmp_path / "local", "--no-cache", *options, cwd=tmp_path)
    on_ray = probe_cli("run", DEMO_MODEL, "--out", tmp_path / "ray", "--cache-dir", tmp_path / "cache",
                       "--ray", cluster.address, *options, cwd=tmp_path)  # fmt: skip
    assert local.returncode == 0 and on_ray.returncode == 0, local.stderr + on_ray.stderr
    written = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("local", "ray")}
    assert_same_report(written["ray"], written["local"])
    engine = written["ray"]["settings"]["engine"]
    assert engine["kind"] == "ray" and engine["nodes"] == 3
    # every shard recorded with the node and device that extracted it, the rows of each split covered once
    assert {shard["device"] for shard in engine["shards"]} == {"CPUExecutionProvider"}
    assert all(len(shard["node"]) > 8 for shard in engine["shards"])
    for split, size in written["ray"]["split_sizes"].items():
        rows = sorted(shard["rows"] for shard in engine["shards"] if shard["split"] == split)
        assert rows[0][0] == 0 and rows[-1][1] == size and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_an_extraction_actor_killed_mid_shard_changes_no_number(cluster, tmp_path, dataset, local):
    spec = probecore.RunSpec(**{**vars(SPEC), "cache_dir": str(tmp_path / "cache")})
    source = KilledOnce(tmp_path / "killed")
    report = probecore.run_probes(source, dataset, spec, engine=RayEngine(cluster.address, shard_batches=2))
    assert (tmp_path / "killed").exists()  # an actor did die, and its shard was redone
    assert_same_report(report.to_dict(), local.to_dict())


def running_fits() -> dict[int, str]:
    """pid -> title of the worker processes running a fit now (Ray titles a busy worker ``ray::<task name>``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if title.startswith("ray::fit "):
            found[int(proc.name)] = title
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the fitting workers in /proc")
def test_a_fitting_worker_killed_mid_fit_changes_no_number(cluster, dataset, local):
    killed, stop = [], threading.Event()

    def kill_one_fit():
        while not stop.is_set() and not killed:
            for pid, title in running_fits().items():
                os.kill(pid, signal.SIGKILL)
                killed.append(title)
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_fit)
    killer.start()
    try:
        report = probecore.run_probes(OnnxSource(DEMO_MODEL, device="cpu"), dataset, SPEC, engine=RayEngine(cluster.address))
    finally:
        stop.set()
        killer.join()
    assert killed, "no fit was running to kill"
    assert_same_report(report.to_dict(), local.to_dict())


DRIVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import probecore
    from probecore.backends.onnx_source import OnnxSource
    from probecore.backends.ray_engine import RayEngine
    from probecore.bundled import DEMO_DATA, DEMO_MODEL

    class Slow(OnnxSource):  # a pause after each batch: the driver is killed part way
        delay = float(sys.argv[3])

        def reduced_activations(self, *args, **kwargs):
            for batch in super().reduced_activations(*args, **kwargs):
                time.sleep(self.delay)
                yield batch

    pool = probecore.load_dataset(DEMO_DATA)
    dataset = probecore.split_dataset(pool.train.x[:1500], pool.train.y[:1500], seed=0)
    spec = probecore.RunSpec(layers="relu1,pool2,relu3,logits", fit=probecore.FitOptions(l2=(1e-2, 1e-3)),
                             batch_size=100, cache_dir=sys.argv[2])
    report = probecore.run_probes(Slow(DEMO_MODEL, device="cpu"), dataset, spec, engine=RayEngine(sys.argv[1], shard_batches=1))
    print(report.to_json())
    """
)


def finished_shards(cache_dir: Path) -> int:
    done = 0
    for manifest in cache_dir.glob("*/manifest.json"):
        try:
            done += json.loads(manifest.read_text())["complete"]
        except (ValueError, KeyError):
            continue
    return done


def test_a_rerun_after_the_driver_was_killed_resumes_from_the_finished_shards(cluster, tmp_path, local):
    script, cache = tmp_path / "driver.py", tmp_path / "cache"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), cluster.address, str(cache), "0.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while finished_shards(cache) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, driver.stderr.read().decode()[-3000:]  # still running: killed part way
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = finished_shards(cache)
    assert 3 <= finished < 16  # 16 shards (a batch each: train 1050, valid 150, test 300 samples): some done
    rerun = subprocess.run([sys.executable, str(script), cluster.address, str(cache), "0"], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    report = json.loads(rerun.stdout)
    assert report["settings"]["cache"]["splits_from_cache"] >= finished
    assert_same_report(report, local.to_dict())


def test_probe_sweep_on_ray_writes_the_local_grid(cluster, tmp_path, demo_arrays):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    models = [tmp_path / "ckpt_a.onnx", tmp_path / "ckpt_b.onnx"]  # each checkpoint's layers: Ray tasks
    for model in models:
        model.write_bytes(Path(DEMO_MODEL).read_bytes())
    options = ["--data", data, "--layers", "relu3,logits", "--l2", "1e-2,1e-3", "--batch-size", "100", "--quiet"]
    local = probe_cli("sweep", *models, "--out", tmp_path / "local", "--no-cache", *options, cwd=tmp_path)
    on_ray = probe_cli("sweep", *models, "--out", tmp_path / "ray", "--no-cache", "--ray", cluster.address, *options,
                       cwd=tmp_path)  # fmt: skip
    assert local.returncode == 0 and on_ray.returncode == 0, local.stderr + on_ray.stderr
    grids = {name: json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("local", "ray")}
    assert grids["ray"]["layers"] == grids["local"]["layers"] == ["relu3", "logits"]
    assert grids["ray"]["test_error"] == grids["local"]["test_error"]


def test_a_model_with_external_weights_and_open_sizes_probes_on_ray_as_locally(cluster, tmp_path):
    # as torch's default exporter writes them: weights in model.onnx.data, input [N, 3, H, W]; the actors on
    # the other nodes read the weights from beside the model and fix the open sizes from the data
    from onnx_models import save_open_convnet

    rng = np.random.default_rng(70)
    model = save_open_convnet(tmp_path / "model.onnx", rng, external_data=True)
    assert (tmp_path / "model.onnx.data").exists()
    x = rng.standard_normal((300, 3, 20, 20)).astype(np.float32)
    dataset = probecore.split_dataset(x, (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 1, 0, 0] > 0))
    spec = probecore.RunSpec(fit=probecore.FitOptions(l2=(1e-2, 1e-3)), batch_size=32)
    local = probecore.run_probes(OnnxSource(model, device="cpu"), dataset, spec)
    on_ray = probecore.run_probes(OnnxSource(model, device="cpu"), dataset, spec, engine=RayEngine(cluster.address))
    assert_same_report(on_ray.to_dict(), local.to_dict())


def save_nhwc_inception_with_two_inputs(path, rng):
    """As tf2onnx writes a Keras model: an NHWC ``image`` transposed to NCHW inside the graph, then an Inception
    module (1x1, 1x1 -> 3x3 and max-pool -> 1x1 branches, concatenated), and a second input ``extra`` (N, 3)
    joined to the pooled features before the classifier."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx_models import save_model

    def conv(name, out, inp, kernel=1):
        return numpy_helper.from_array(rng.normal(size=(out, inp, kernel, kernel)).astype(np.float32), name)

    initializers = [conv("b1_w", 3, 4), conv("b2a_w", 2, 4), conv("b2b_w", 3, 2, 3), conv("b3_w", 3, 4),
                    numpy_helper.from_array(rng.normal(size=(12, 4)).astype(np.float32), "fc_w")]  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "b1_w"], ["b1"], name="branch1/conv"),
        helper.make_node("Relu", ["b1"], ["b1_relu"], name="branch1/relu"),
        helper.make_node("Conv", ["nchw", "b2a_w"], ["b2a"], name="branch2/reduce"),
        helper.make_node("Relu", ["b2a"], ["b2a_relu"], name="branch2/reduce_relu"),
        helper.make_node("Conv", ["b2a_relu", "b2b_w"], ["b2b"], pads=[1, 1, 1, 1], name="branch2/conv"),
        helper.make_node("Relu", ["b2b"], ["b2b_relu"], name="branch2/relu"),
        helper.make_node("MaxPool", ["nchw"], ["b3_pool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="branch3/pool"),
        helper.make_node("Conv", ["b3_pool", "b3_w"], ["b3"], name="branch3/conv"),
        helper.make_node("Relu", ["b3"], ["b3_relu"], name="branch3/relu"),
        helper.make_node("Concat", ["b1_relu", "b2b_relu", "b3_relu"], ["module"], axis=1, name="mixed"),
        helper.make_node("GlobalAveragePool", ["module"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
        helper.make_node("Concat", ["flat", "extra"], ["joined"], axis=1, name="join"),
        helper.make_node("Gemm", ["joined", "fc_w"], ["logits"], name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 4]),
              helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 3])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    return save_model(path, nodes, inputs, outputs, initializers)


def test_an_nhwc_branchy_model_with_two_inputs_probes_on_ray_as_locally(cluster, tmp_path):
    rng = np.random.default_rng(71)
    model = save_nhwc_inception_with_two_inputs(tmp_path / "model.onnx", rng)
    n = 600
    labels = rng.integers(0, 4, n)
    image = rng.uniform(0, 1, (n, 8, 8, 4)).astype(np.float32)
    image[np.arange(n), :, :, labels] += 0.3  # the class is the brightest channel (last axis: NHWC)
    extra = rng.normal(size=(n, 3)).astype(np.float32)
    dataset = probecore.split_dataset(probecore.pack_inputs(image=image, extra=extra), labels, seed=0)
    spec = probecore.RunSpec(fit=probecore.FitOptions(l2=(1e-2, 1e-3)), batch_size=50)
    local = probecore.run_probes(OnnxSource(model, device="cpu"), dataset, spec)
    engine = RayEngine(cluster.address, shard_batches=2)
    on_ray = probecore.run_probes(OnnxSource(model, device="cpu"), dataset, spec, engine=engine)
    probed = {layer.name for layer in on_ray.layers}
    assert {"image", "extra", "b1_relu", "b2b_relu", "b3_relu", "pooled"} <= probed  # both inputs, every branch
    assert len({shard["node"] for shard in engine.shard_log}) >= 2  # the shards did spread over the nodes
    assert_same_report(on_ray.to_dict(), local.to_dict())
    errors = {layer.name: layer.metrics["test"].error for layer in local.layers}
    assert errors["pooled"] < 0.5  # the brightest channel is readable after the module (chance: 0.75)

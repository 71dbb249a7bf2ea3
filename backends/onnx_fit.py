"""Probe fits on onnxruntime's device: the softmax loss and its gradient as three small ONNX graphs.

``probe.fit_probes`` runs its own L-BFGS on the host and asks a loss evaluator for value and gradient; this one
evaluates them with onnxruntime (on CUDA, or on the CPU provider, which is how the tests check it) with the
features uploaded once per fit (``OrtValue``, I/O binding): per evaluation only the d x C weights go to the
device and the d x C gradient comes back. The objective is ``SoftmaxLoss``'s: mean cross-entropy of
``softmax(X W + b)`` on the standardized float32 features, per-row log-likelihoods summed in float64, plus
``l2 / 2 ||W||^2`` added on the host in float64. No new dependency: the graphs run on the CUDA libraries
onnxruntime-gpu loads for the model anyway.

Graphs (opset 17, every dimension symbolic, so one session per device serves every layer):

- gradient: ``x`` (N, d), ``y`` (N, C) one-hot, ``weights``, ``bias`` -> ``log_likelihood`` (float64 sum over
  rows), ``grad_weights`` ``= x' (softmax - y) / N`` (Gemm with transA: ``x`` is never transposed in memory),
  ``grad_bias`` (float64 sums);
- value: the same inputs -> ``log_likelihood`` only (the validation loss the settled test reads every
  iteration; onnxruntime runs every node of a graph, so the gradient graph would do twice the work);
- gram: ``x``, ``basis`` (d, k) -> ``x' (x basis)``, the products of the spectral preconditioner.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import onnx
from onnx import TensorProto, helper

from probecore.errors import ModelError

from .onnx_graph import first_line
from .onnx_source import CPU, CUDA, preload_cuda_libraries

OPSET = 17
NO_CUDA = (
    "--fit-device cuda was asked for, but onnxruntime cannot use CUDA here (it needs onnxruntime-gpu, an NVIDIA "
    "driver, and CUDA 13 with cuDNN 9, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'); use --fit-device auto or cpu"
)


def _graph_model(name: str, nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="probecore")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _float(name: str, dims: list[str]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _double(name: str, dims: list):
    return helper.make_tensor_value_info(name, TensorProto.DOUBLE, dims)


def _axis(axis: int):
    return helper.make_tensor("axis", TensorProto.INT64, [1], [axis])


def _log_likelihood_nodes() -> list:
    """x, y, weights, bias -> log_probs (N, C) and log_likelihood: sum over rows of log p(label), in float64."""
    return [
        helper.make_node("MatMul", ["x", "weights"], ["products"]),
        helper.make_node("Add", ["products", "bias"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=1),
        helper.make_node("Mul", ["y", "log_probs"], ["picked"]),
        helper.make_node("Constant", [], ["class_axis"], value=_axis(1)),
        helper.make_node("ReduceSum", ["picked", "class_axis"], ["row_log_likelihood"], keepdims=0),
        helper.make_node("Cast", ["row_log_likelihood"], ["row_log_likelihood64"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceSum", ["row_log_likelihood64"], ["log_likelihood"], keepdims=0),
    ]


LOSS_INPUTS = [_float("x", ["N", "d"]), _float("y", ["N", "C"]), _float("weights", ["d", "C"]), _float("bias", ["C"])]


def gradient_graph() -> bytes:
    gradient = [
        helper.make_node("Exp", ["log_probs"], ["probs"]),
        helper.make_node("Sub", ["probs", "y"], ["residual_sum"]),
        helper.make_node("Mul", ["residual_sum", "inverse_n"], ["residual"]),
        helper.make_node("Gemm", ["x", "residual"], ["grad_weights"], transA=1),
        helper.make_node("Cast", ["residual"], ["residual64"], to=TensorProto.DOUBLE),
        helper.make_node("Constant", [], ["row_axis"], value=_axis(0)),
        helper.make_node("ReduceSum", ["residual64", "row_axis"], ["grad_bias"], keepdims=0),
    ]
    outputs = [_double("log_likelihood", []), _float("grad_weights", ["d", "C"]), _double("grad_bias", ["C"])]
    inputs = [*LOSS_INPUTS, _float("inverse_n", [])]
    return _graph_model("softmax_loss_gradient", _log_likelihood_nodes() + gradient, inputs, outputs)


def value_graph() -> bytes:
    return _graph_model("softmax_loss_value", _log_likelihood_nodes(), LOSS_INPUTS, [_double("log_likelihood", [])])


def gram_graph() -> bytes:
    nodes = [
        helper.make_node("MatMul", ["x", "basis"], ["projected"]),
        helper.make_node("Gemm", ["x", "projected"], ["gram_basis"], transA=1),
    ]
    return _graph_model("gram_product", nodes, [_float("x", ["N", "d"]), _float("basis", ["d", "k"])],
                        [_float("gram_basis", ["d", "k"])])  # fmt: skip


class DeviceFitter:
    """Makes ``OrtSoftmaxLoss`` evaluators on ``device`` ("cuda" or "cpu"): what ``fit_probes(evaluator=...)``
    takes. Its three sessions are built once and shared by every fit (onnxruntime's ``run`` is thread-safe;
    each evaluator has its own bindings). On CUDA, TF32 is off: the products are float32, like the CPU's
    (TF32 rounds their inputs to 10 bits, about 1e-3 relative). Raises ``ModelError`` naming the fix where
    onnxruntime cannot use CUDA."""

    def __init__(self, device: str = "cuda", threads: int | None = None):
        if device not in ("cpu", "cuda"):
            raise ModelError(f"a device fitter runs on cpu or cuda, got {device!r}")
        self.device = device
        self.gradient, self.value, self.gram = _sessions(device, threads)

    def __call__(self, features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float) -> OrtSoftmaxLoss:
        return OrtSoftmaxLoss(self, features, labels, n_classes, l2)

    def describe(self) -> dict:
        return {"device": self.device, "evaluator": "onnxruntime", "provider": CUDA if self.device == "cuda" else CPU}

    def bind(self, array: np.ndarray):
        """``array`` as an OrtValue on this fitter's device: uploaded once (on the CPU, shared, not copied)."""
        import onnxruntime as ort

        try:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
        except Exception as exc:  # out of device memory, mostly
            raise ModelError(
                f"cannot upload a {' x '.join(map(str, array.shape))} array to {self.device} ({first_line(exc)}); "
                "fit fewer layers at once (--threads) or use --fit-device cpu"
            ) from None


_SESSIONS_LOCK = threading.Lock()


def _sessions(device: str, threads: int | None):
    with _SESSIONS_LOCK:  # fits start at once on several threads: build the sessions once
        return _build_sessions(device, threads)


@functools.cache
def _build_sessions(device: str, threads: int | None):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the host runs L-BFGS between runs
    if threads is not None:
        options.intra_op_num_threads = threads
    if device == "cuda":
        if CUDA not in ort.get_available_providers():
            raise ModelError(NO_CUDA)
        preload_cuda_libraries()
        providers = [(CUDA, {"use_tf32": "0"}), CPU]
    else:
        providers = [CPU]
    sessions = []
    for graph in (gradient_graph(), value_graph(), gram_graph()):
        try:
            session = ort.InferenceSession(graph, options, providers=providers)
        except Exception as exc:
            why = NO_CUDA if device == "cuda" else f"onnxruntime cannot fit probes here: {first_line(exc)}"
            raise ModelError(why) from None
        if device == "cuda" and session.get_providers()[0] != CUDA:
            raise ModelError(NO_CUDA)
        sessions.append(session)
    return tuple(sessions)


def cuda_fitter() -> DeviceFitter | None:
    """A CUDA fitter, or None where onnxruntime cannot use CUDA here (quietly: ``--fit-device auto``)."""
    try:
        return DeviceFitter("cuda")
    except ModelError:
        return None


class OrtSoftmaxLoss:
    """``softmax.SoftmaxLoss``'s value, gradient and held-out loss, computed by onnxruntime on the fitter's
    device: a ``softmax.LossEvaluator``. The training features (and, at the first ``held_out_loss``, the
    held-out ones) are uploaded once; ``params`` is written into kept float32 buffers, bound again at every
    evaluation (binding a host value copies it to the device then, not at each run), and the outputs land in
    kept host buffers: an evaluation allocates nothing but the gradient it returns. One evaluator serves one
    fit (one thread)."""

    def __init__(self, fitter: DeviceFitter, features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float):
        features = np.ascontiguousarray(features, np.float32)
        labels = np.asarray(labels, np.int64)
        self.fitter, self.n_classes, self.l2 = fitter, n_classes, l2
        self.n_samples, self.n_features = features.shape
        self._weights = np.zeros((self.n_features, n_classes), np.float32)
        self._bias = np.zeros(n_classes, np.float32)
        self._params = {"weights": _host_value(self._weights), "bias": _host_value(self._bias)}
        self._features = fitter.bind(features)
        self._train = self._binding(fitter.gradient, self._features, labels)
        self._train.bind_ortvalue_input("inverse_n", fitter.bind(np.array(1 / self.n_samples, np.float32)))
        self._grad_weights = np.empty((self.n_features, n_classes), np.float32)
        self._grad_bias = np.empty(n_classes)
        self._log_likelihood = np.empty((), np.float64)
        for name, buffer in (("log_likelihood", self._log_likelihood), ("grad_weights", self._grad_weights),
                             ("grad_bias", self._grad_bias)):  # fmt: skip
            self._train.bind_ortvalue_output(name, _host_value(buffer))
        self._held_out = None  # (the features array it was made from, its binding, its log-likelihood buffer)

    def _binding(self, session, features, labels: np.ndarray):
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", features)
        binding.bind_ortvalue_input("y", self.fitter.bind(_one_hot(labels, self.n_classes)))
        return binding

    def _set_params(self, params: np.ndarray, binding) -> np.ndarray:
        """Bind ``params`` (as float32) to ``binding``; return the flat float64 weights (a view)."""
        n_weights = self.n_features * self.n_classes
        flat_weights = params[:n_weights]
        self._weights[...] = flat_weights.reshape(self.n_features, self.n_classes)
        self._bias[...] = params[n_weights:]
        for name, value in self._params.items():
            binding.bind_ortvalue_input(name, value)
        return flat_weights

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        params = np.ascontiguousarray(params, dtype=np.float64)
        flat_weights = self._set_params(params, self._train)
        self._run(self.fitter.gradient, self._train)
        n_weights = len(flat_weights)
        grad = np.empty(len(params))
        grad[:n_weights] = self._grad_weights.ravel()
        grad[:n_weights] += self.l2 * flat_weights
        grad[n_weights:] = self._grad_bias
        loss = -float(self._log_likelihood) / self.n_samples
        return loss + 0.5 * self.l2 * float(np.dot(flat_weights, flat_weights)), grad

    def held_out_loss(self, params: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
        """Mean cross-entropy (no L2 term) on ``features``: uploaded at the first call and kept while the same
        array comes back (the settled test asks for the validation split again and again)."""
        if self._held_out is None or self._held_out[0] is not features:
            binding = self._binding(self.fitter.value, self.fitter.bind(features), np.asarray(labels, np.int64))
            total = np.empty((), np.float64)
            binding.bind_ortvalue_output("log_likelihood", _host_value(total))
            self._held_out = (features, binding, total)
        _, binding, total = self._held_out
        self._set_params(np.ascontiguousarray(params, dtype=np.float64), binding)
        self._run(self.fitter.value, binding)
        return -float(total) / len(features)

    def gram_product(self, basis: np.ndarray) -> np.ndarray:
        """``X' (X basis)`` for a (d, k) basis, on the device: the spectral preconditioner's products."""
        binding = self.fitter.gram.io_binding()
        binding.bind_ortvalue_input("x", self._features)
        binding.bind_cpu_input("basis", np.ascontiguousarray(basis, np.float32))
        out = np.empty(basis.shape, np.float32)
        binding.bind_ortvalue_output("gram_basis", _host_value(out))
        self._run(self.fitter.gram, binding)
        return out

    @staticmethod
    def _run(session, binding) -> None:
        try:
            binding.synchronize_inputs()  # the host values bound are on the device before the run reads them
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # and the results in the host buffers when it returns
        except Exception as exc:  # out of device memory, mostly
            raise ModelError(f"onnxruntime failed to evaluate a probe's loss: {first_line(exc)}") from None


def _host_value(array: np.ndarray):
    """A host OrtValue sharing ``array``'s memory (the caller keeps ``array``)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), n_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out

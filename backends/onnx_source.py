"""An ``ActivationSource`` for ONNX files: onnxruntime runs the model with the probed tensors exposed.

CUDA is used when onnxruntime can really create a CUDA session here; otherwise the CPU, quietly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from probecore import prefetch
from probecore.errors import DataError, ModelError
from probecore.feature_cache import canonical_json
from probecore.reduction import Reduction
from probecore.source import LayerInfo

from . import onnx_graph, onnx_reduce

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OnnxSource:
    """Activations of an ONNX model's tensors, computed by onnxruntime in batches.

    ``concat_reduced``: the layers reduced in the graph leave it as one tensor, split into views on the host
    (one copy from the device per batch instead of one per layer). ``io_binding``: inputs and outputs are
    bound to the session (``run_with_iobinding``) rather than passed to ``run``. Both leave the features
    unchanged; benchmarks/gpu_check_fit.py measures what each gives."""

    def __init__(
        self, path: str | Path, device: str = "auto", reduce_in_graph: bool = True, *, concat_reduced: bool = True,
        io_binding: bool = False,
    ):  # fmt: skip
        if device not in DEVICES:
            raise ModelError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        self.path = Path(path)
        self.device = device
        # The model is checked and shape-inferred once; only its outline is kept (the graph without the data of
        # its weights), and onnxruntime reads the weights from the files when a session is built
        # (memory: benchmarks/README.md).
        self._outline = onnx_graph.load_outline(self.path)
        self.external_data = onnx_graph.external_data_files(self._outline, self.path)
        self.model_sha256 = onnx_graph.model_sha256(self.path, self.external_data)
        self._given_inputs = onnx_graph.model_inputs(self._outline)  # as the file has them, open dimensions and all
        self.reduce_in_graph = reduce_in_graph and onnx_reduce.default_opset(self._outline) >= onnx_reduce.MIN_OPSET
        self.concat_reduced, self.io_binding = concat_reduced, io_binding
        self._input_shapes: dict[str, tuple[int, ...]] = {}  # open input dimensions, as fixed from the data
        self._describe(self._outline)
        self.mask_input = onnx_graph.mask_input(self._inputs)
        self._session = None
        self._session_key = None
        self.provider: str | None = None
        self.bytes_fetched = 0  # bytes copied out of onnxruntime, to show what in-graph reduction saves
        # time spent waiting for the next batch of inputs (decoding images) and in onnxruntime: the share of a
        # GPU's time spent waiting for its inputs
        self.seconds = {"waiting_for_inputs": 0.0, "running": 0.0}

    def __getstate__(self) -> dict:
        """Everything but the session, so a copy can be sent to another process (a Ray actor), which builds its
        own session from the same file when it first runs the model."""
        return {**self.__dict__, "_session": None, "_session_key": None, "bytes_fetched": 0,
                "seconds": dict.fromkeys(self.seconds, 0.0)}  # fmt: skip

    def _describe(self, outline) -> None:
        """Learn the inputs, tensors and shapes that ``outline`` (shape-inferred) says the model has."""
        self._inputs = onnx_graph.model_inputs(outline)
        self._input_dtypes = {value.name: onnx_graph.numpy_dtype(value) for value in self._inputs}
        self._input = self._inputs[0]
        self._input_dims = onnx_graph.tensor_dims(self._input)
        self._layers = onnx_graph.candidate_layers(outline)
        self._typed = onnx_graph.typed_values(outline)

    @property
    def input_name(self) -> str:
        """The first (for most models the only) input."""
        return self._input.name

    @property
    def input_names(self) -> list[str]:
        return [value.name for value in self._inputs]

    def layers(self) -> list[LayerInfo]:
        return list(self._layers)

    @property
    def input_dims(self) -> tuple | None:
        """The model input's dimensions: sizes, symbolic names (the batch axis) or None where unknown."""
        return self._input_dims

    def check_inputs(self, x: np.ndarray) -> np.ndarray:
        """Check dtype and per-sample shape. Inputs come back as given: each batch is cast to the model's
        input type as it is fed, so uint8 images are never held whole as float32, and lazy inputs (an image
        folder) are checked without loading them. A model with several inputs (a transformer's token ids and
        attention mask) takes a structured array with one field per input, named as the inputs.

        Dimensions the model leaves open (``[N, 3, H, W]``) are fixed to the data's, and every tensor's shape
        is inferred again from them: layers are then planned, reduced in the graph and cached as for a model
        exported with those sizes. Every split of a data set must share one shape."""
        lazy = not isinstance(x, np.ndarray) and hasattr(x, "shape") and hasattr(x, "dtype")
        if not lazy:
            x = np.asarray(x)
        if len(self._given_inputs) == 1:
            fields = {self._given_inputs[0].name: x}
        else:
            names = [value.name for value in self._given_inputs]
            missing = [name for name in names if name not in (x.dtype.names or ())]
            if missing:
                example = ", ".join(f"{name}=..." for name in names)
                raise DataError(
                    f"the model has {len(names)} inputs ({', '.join(names)}) and the data has no field for "
                    f"{', '.join(missing)}; pass x as a structured array with one field per input: "
                    f"probecore.pack_inputs({example})"
                )
            fields = {name: x[name] for name in names}
        for value in self._given_inputs:
            _check_input(fields[value.name], value, lazy)
        self._fix_input_shapes(
            {value.name: tuple(fields[value.name].shape[1:]) for value in self._given_inputs if onnx_graph.free_dims(value)}
        )
        return x

    def _fix_input_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if shapes != self._input_shapes:
            self._input_shapes = shapes
            self._describe(onnx_graph.with_input_dims(self._outline, shapes) if shapes else self._outline)

    def activations(self, x: np.ndarray, layer_names: Sequence[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        return self._run(x, list(layer_names), {}, batch_size, spin=False)  # the host reduces between runs

    def can_reduce(self, reduction: Reduction) -> bool:
        if not self.reduce_in_graph:
            return False
        if reduction.tokens is None or reduction.mask_input is None:
            return True
        # Token pooling reads the mask input in the graph: it must be one of the model's inputs and have the
        # layer's number of tokens (otherwise the host's pool_tokens says what does not fit).
        mask = next((value for value in self._inputs if value.name == reduction.mask_input), None)
        dims = onnx_graph.tensor_dims(mask) if mask is not None else None
        return dims is not None and len(dims) == 2 and dims[1] == reduction.sample_shape[0]

    def reduced_activations(
        self, x: np.ndarray, reductions: Mapping[str, Reduction], batch_size: int, raw_names: Sequence[str] = ()
    ) -> Iterator[dict[str, np.ndarray]]:
        # Layers that need no pooling or subset leave the graph whole; reshaping them on the host is free.
        in_graph = {name: r for name, r in reductions.items() if r.tokens or r.pool or r.subset is not None}
        whole = [name for name in reductions if name not in in_graph]
        for batch in self._run(x, [*whole, *raw_names], in_graph, batch_size, spin=True):
            for name in whole:
                batch[name] = reductions[name].apply(batch[name])
            yield batch

    def _run(self, x, names: list[str], reductions: Mapping[str, Reduction], batch_size: int, spin: bool):
        """Feed ``x`` in batches; yield the tensors ``names`` as they are and each of ``reductions`` reduced.
        ``spin`` lets onnxruntime's idle threads spin between runs: faster, unless the host has work to do."""
        inputs = self.input_names
        computed = [name for name in names if name not in inputs]
        concat = self.concat_reduced and bool(reductions)
        reduced = [onnx_reduce.CONCAT] if concat else [onnx_reduce.reduced_name(name) for name in reductions]
        fetched = computed + reduced
        widths = {name: reduction.n_features_out for name, reduction in reductions.items()}
        session = self._session_for(computed, reductions, spin) if fetched else None  # inputs alone need no model
        fixed_batch = self._input_dims[0] if self._input_dims and isinstance(self._input_dims[0], int) else 0
        step = fixed_batch if fixed_batch > 0 else batch_size
        waiting_since = time.perf_counter()
        for start, chunk in prefetch.batches(x, step):  # lazy inputs (image folders) load a batch ahead
            self.seconds["waiting_for_inputs"] += time.perf_counter() - waiting_since
            given = {inputs[0]: chunk} if len(inputs) == 1 else {name: chunk[name] for name in inputs}
            feed = {}
            for name, dtype in self._input_dtypes.items():
                array = given[name].astype(dtype, copy=False)
                if fixed_batch > 0 and len(chunk) < fixed_batch:  # a model exported with a fixed batch size
                    array = np.concatenate([array, np.repeat(array[-1:], fixed_batch - len(chunk), axis=0)])
                feed[name] = array
            running_since = time.perf_counter()
            try:
                values = self._fetch(session, fetched, feed) if fetched else []
            except Exception as exc:
                raise ModelError(
                    f"onnxruntime failed on samples {start}..{start + len(chunk) - 1}: {onnx_graph.first_line(exc)}"
                ) from None
            self.seconds["running"] += time.perf_counter() - running_since
            self.bytes_fetched += sum(value.nbytes for value in values)
            outputs = dict(zip(fetched, values))
            if concat:
                by_layer = onnx_reduce.split_concat(outputs[onnx_reduce.CONCAT], widths)
            else:
                by_layer = {name: outputs[onnx_reduce.reduced_name(name)] for name in reductions}
            batch = {name: outputs[name][: len(chunk)] for name in computed}
            batch.update({name: values[: len(chunk)] for name, values in by_layer.items()})
            batch.update({name: given[name] for name in names if name in given})
            yield batch
            waiting_since = time.perf_counter()

    def _fetch(self, session, fetched: list[str], feed: dict) -> list[np.ndarray]:
        if not self.io_binding:
            return session.run(fetched, feed)
        binding = session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name in fetched:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return [value.numpy() for value in binding.get_outputs()]

    def identity(self) -> dict:
        return {"model_sha256": self.model_sha256, "input": ",".join(self.input_names)}

    def loss_evaluator(self, fit_device: str):
        """The GPU fitter for ``RunSpec.fit_device`` (``onnx_fit.DeviceFitter``), or None for the host's: "cuda"
        is refused in one line where onnxruntime cannot use CUDA; "auto" takes CUDA unless the model is kept on
        the CPU (``device="cpu"``, or its session fell back there) or CUDA does not work here."""
        from . import onnx_fit

        if fit_device == "cuda":
            return onnx_fit.DeviceFitter("cuda")
        if fit_device != "auto" or self.device == "cpu" or self.provider == CPU:
            return None
        return onnx_fit.cuda_fitter()

    def describe(self) -> dict:
        return {
            "model": str(self.path),
            "model_sha256": self.model_sha256,
            "external_data": [file.name for file in self.external_data],
            "input_shapes_from_data": {name: list(shape) for name, shape in self._input_shapes.items()},
            "input": ",".join(self.input_names),
            "mask_input": self.mask_input,
            "device": self.device,
            "provider": self.provider,
            "reduce_in_graph_allowed": self.reduce_in_graph,  # per layer: reduction["reduced_in"]
            "bytes_fetched": self.bytes_fetched,
            "seconds": {stage: round(value, 3) for stage, value in self.seconds.items()},
        }

    def _session_for(self, outputs: list[str], reductions: Mapping[str, Reduction], spin: bool):
        reduction_keys = {name: reduction.key() for name, reduction in reductions.items()}
        key = canonical_json([sorted(outputs), reduction_keys, spin, self._input_shapes, self.concat_reduced])
        if self._session is None or self._session_key != key:
            self._session = None  # free the old session before building the next one
            model = onnx_graph.read_model(self.path)
            if onnx_graph.model_sha256(self.path, self.external_data) != self.model_sha256:
                raise ModelError(f"{self.path} changed while it was being probed; rerun once it is written")
            onnx_graph.set_input_dims(model, self._input_shapes)
            exposed = onnx_graph.with_outputs(model, outputs, dict(reductions), self._typed, self.concat_reduced)
            del model  # onnxruntime parses its own copy: hold one at a time
            weights_dir = self.path.parent if self.external_data else None
            try:
                self._session, self.provider = create_session(exposed, self.device, spin, weights_dir)
            except ModelError as exc:
                raise ModelError(onnx_graph.too_new_for_onnxruntime(self.path, str(exc)) or str(exc)) from None
            self._session_key = key
        return self._session


def _check_input(x, value, lazy: bool) -> None:
    """Raise ``DataError`` unless ``x`` fits model input ``value`` in dtype (castable) and per-sample shape."""
    expected = onnx_graph.numpy_dtype(value)
    if x.dtype != expected:
        castable = x.dtype.kind in "iub" and expected.kind in "iufb" or x.dtype.kind == expected.kind == "f"
        if not castable:
            raise DataError(f"inputs have dtype {x.dtype}, but model input {value.name!r} takes {expected}")
    dims = onnx_graph.tensor_dims(value)
    if dims is not None:
        want = dims[1:]
        fits = len(x.shape) == len(dims) and all(
            not isinstance(w, int) or w <= 0 or w == got for w, got in zip(want, x.shape[1:])
        )
        if not fits:
            shown = ", ".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in want)
            raise DataError(
                f"inputs have per-sample shape {tuple(x.shape[1:])}, but model input {value.name!r} "
                f"expects ({shown}); reshape the data to fit"
            )
    if not lazy and x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())
        raise DataError(f"{bad} input samples contain NaN or Inf; remove or fix them")


def create_session(model_bytes: bytes, device: str = "auto", spin: bool = True, weights_dir: Path | None = None):
    """An onnxruntime session on CUDA when asked for (or ``auto``) and it really works, else on the CPU.

    ``spin=False`` stops idle onnxruntime threads from spinning between runs, which otherwise starves host work
    done between batches (the numba reductions); memory patterns are off, since with probed tensors exposed
    they held a second copy of every block output (benchmarks/README.md). ``weights_dir``: where the model's
    external data files are (the .onnx file's folder), for a model that keeps its weights outside."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # a missing CUDA library is expected, not worth a screen of errors
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.enable_mem_pattern = False
    if weights_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
        preload_cuda_libraries()
        try:
            session = ort.InferenceSession(model_bytes, options, providers=[CUDA, CPU])
            if session.get_providers()[0] == CUDA:
                return session, CUDA
        except Exception:
            pass
    if device == "cuda":
        raise ModelError(
            "--device cuda was asked for, but onnxruntime cannot use CUDA here (it needs onnxruntime-gpu, an NVIDIA "
            "driver, and CUDA 13 with cuDNN 9, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'); use --device auto or cpu"
        )
    try:
        return ort.InferenceSession(model_bytes, options, providers=[CPU]), CPU
    except Exception as exc:
        raise ModelError(
            f"onnxruntime cannot run this model: {onnx_graph.first_line(exc)}; re-export it with standard ONNX ops "
            "(or register the custom op library it needs)"
        ) from None


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* packages, where onnxruntime-gpu does not look by itself."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # it prints what it cannot find
        try:
            ort.preload_dlls()
        except Exception:
            pass  # the session below then falls back to the CPU

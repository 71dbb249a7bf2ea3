"""PyTorch adapter: export a ``torch.nn.Module`` to ONNX with its modules' names on their outputs, then probe it
through the ONNX path like any other model. Conversion and delegation only; needs ``probecore[torch]``.

    from probecore.backends import torch as probe_torch

    report = probe_torch.probe_module(model, images, labels)   # numpy or torch inputs
    probe_torch.export(model, example_images, "model.onnx")    # then: probe run model.onnx --data ...
    probe_torch.record(tracker, step, model, example_images)   # in a training loop (probecore.ProbeTracker)

Each tensor a module returns is named after the module (``layer3.2``, ``features.4``); a module called
more than once names its later outputs ``relu:2``, ``relu:3``, and one that returns its input unchanged
(Dropout and Identity in eval mode) names nothing. Where several modules return the same tensor, the
innermost block that is an item of a list names it (``layer3.2``, ``encoder.layer.3``: not the block's last
ReLU or its last sub-block, such as a BERT layer's ``output``, nor the stage ``layer3`` around it), else the
innermost block; without a block, the outermost module that is not a plain container (Sequential, ModuleList,
ModuleDict). The model's outputs are named after what ``forward`` returns: a mapping's keys (HuggingFace's
``last_hidden_state``), a namedtuple's fields, else ``output`` or ``output_0``, ``output_1``, ... Defaults: the
input, every activation, pooling and residual addition (as for any ONNX model), each block (a module with
submodules of its own, like a ResNet ``Bottleneck`` or a ``TransformerEncoderLayer``) and the model's outputs.

A dict of inputs is passed to ``forward`` by name, in whatever order (``forward(input_ids, attention_mask=None,
token_type_ids=None)`` takes ``{"input_ids": ..., "token_type_ids": ...}``); parameters it leaves out keep
their defaults and are not inputs of the ONNX model, whose inputs keep the dict's names.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

import probecore
from probecore.errors import DataError, ModelError

from . import adapter
from .adapter import NamedLayer
from .onnx_graph import first_line

OPSET = 18  # the lowest opset torch's exporter writes natively


def _torch():
    return adapter.require("torch", "torch", "PyTorch")


def export(module, example_inputs, path: str | Path, input_names: Sequence[str] | None = None) -> Path:
    """Export ``module`` (in eval mode) to ONNX at ``path``, with a dynamic batch axis and module names on
    tensors. ``example_inputs``: one tensor or array, or a tuple of them (one per ``forward`` argument), or a
    dict from parameter name to tensor, passed by name (the ONNX inputs keep the dict's names and order).
    Returns ``path``."""
    torch = _torch()
    inputs, names, keywords = _example(example_inputs, module, input_names)
    was_training = module.training
    module.eval()
    try:
        recorder = _Recorder(module)
        try:
            with torch.no_grad():
                output_names, plan = recorder.dry_run(inputs, keywords, names)
            exposing = _exposing(module, recorder, keywords, [label for label, _ in plan])
            batch = torch.export.Dim("batch", min=1)
            with _quiet():
                program = torch.onnx.export(
                    exposing, inputs, input_names=names, output_names=[*output_names, *(label for label, _ in plan)],
                    dynamic_shapes=(tuple({0: batch} for _ in inputs),), dynamo=True, opset_version=OPSET,
                    verbose=False,
                )  # fmt: skip
        finally:
            recorder.remove()
    except probecore.ProbeError:
        raise
    except Exception as exc:
        raise ModelError(f"torch could not export the model to ONNX: {_reason(exc)}") from None
    finally:
        module.train(was_training)
    return adapter.finish_export(program.model_proto, path, output_names, [layer for _, layer in plan], "torch", True)


@contextlib.contextmanager
def _quiet():
    """The exporter prints its steps and warns about what it skips (torchvision ops): not the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def probe_module(
    module, x, y, spec: probecore.RunSpec = probecore.RunSpec(), example=None,
    input_names: Sequence[str] | None = None,
) -> probecore.ProbeReport:  # fmt: skip
    """Probe the layers ``spec`` names (default: every default layer) of ``module`` on inputs ``x`` and
    labels ``y``, split as ``spec`` says.

    ``x``: a numpy array or torch tensor, or a dict from ``forward`` parameter name to array for a module with
    several inputs (token ids and an attention mask), passed by name. ``example``: what ``export`` traces with
    (default: the first two samples; the exported input takes its dtype, so pass a float example for a model fed
    uint8 pixels it casts itself)."""
    if isinstance(x, Mapping):
        x = probecore.pack_inputs(**{name: _numpy(value) for name, value in x.items()})
        example = example if example is not None else {name: x[name][:2] for name in x.dtype.names}
    else:
        x = _numpy(x)
        example = example if example is not None else x[:2]
    label = f"torch module {type(module).__name__}"
    with adapter.temporary_export(lambda path: export(module, example, path, input_names)) as path:
        return adapter.probe_exported(path, x, _numpy(y), spec, label)


def record(tracker: probecore.ProbeTracker, checkpoint, module, example, input_names: Sequence[str] | None = None):
    """Probe ``module`` as it is now (a training loop's current weights) into ``tracker`` under the label
    ``checkpoint``: export to a temporary file, probe, delete. Returns that checkpoint's ``ProbeReport``."""
    from .onnx_source import OnnxSource

    with adapter.temporary_export(lambda path: export(module, example, path, input_names)) as path:
        report = tracker.record(checkpoint, OnnxSource(path))
    report.settings["source"]["model"] = f"torch module {type(module).__name__}"
    return report


class _Recorder:
    """Forward hooks on every submodule, recording (label, module, tensor) as each call completes."""

    def __init__(self, module):
        self.calls: list[tuple[str, object, object]] = []
        self._counts: dict[str, int] = {}
        self._handles = [sub.register_forward_hook(self._hook(name), with_kwargs=True)
                         for name, sub in module.named_modules() if name]  # fmt: skip
        self._module = module

    def _hook(self, name: str):
        def record(module, args, kwargs, output) -> None:
            self._counts[name] = self._counts.get(name, 0) + 1
            label = name if self._counts[name] == 1 else f"{name}:{self._counts[name]}"
            tensor = _first_tensor(output)
            if tensor is not None and not any(tensor is given for given in [*args, *kwargs.values()]):  # Dropout
                self.calls.append((label, module, tensor))

        return record

    def start(self) -> None:
        self.calls, self._counts = [], {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def dry_run(self, inputs, keywords, input_names) -> tuple[list[str], list[tuple[str, NamedLayer]]]:
        """Run once eagerly: the names of the model's outputs, and which label names which probe-able tensor."""
        self.start()
        outputs, output_names = _outputs(_call(self._module, inputs, keywords))
        if not outputs:
            raise ModelError("the module returns no tensor; probecore needs a module whose forward returns tensors")
        batch = len(inputs[0])
        taken = {id(tensor) for tensor in [*inputs, *outputs]}
        by_tensor: dict[int, list] = {}
        for label, module, tensor in self.calls:
            usable = tensor.is_floating_point() and tensor.dim() >= 2 and tensor.shape[0] == batch
            if usable and id(tensor) not in taken:
                by_tensor.setdefault(id(tensor), []).append((label, module))
        plan = []
        for candidates in by_tensor.values():
            label, module = _namer(candidates)
            plan.append((label, NamedLayer(label, type(module).__name__, default=_is_block(module))))
        if set(output_names) & {*input_names, *(label for label, _ in plan)}:  # a key that is also a module's name
            output_names = _numbered(len(outputs))
        return output_names, plan


def _exposing(module, recorder: _Recorder, keywords: list[str] | None, labels: list[str]):
    """The module the exporter traces: the model's outputs, then each planned tensor (defined here, since
    torch is imported only when an export is asked for). It calls the model as ``dry_run`` did: by keyword
    where the inputs came as a dict."""
    torch = _torch()

    class Exposing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, *inputs):
            recorder.start()
            outputs, _ = _outputs(_call(self.model, inputs, keywords))
            by_label = {label: tensor for label, _, tensor in recorder.calls}
            return (*outputs, *(by_label[label] for label in labels))

    return Exposing()


def _call(model, inputs, keywords: list[str] | None):
    """Inputs that came as a dict go by name: its order need not be ``forward``'s."""
    return model(**dict(zip(keywords, inputs))) if keywords is not None else model(*inputs)


def _namer(candidates: list) -> tuple[str, object]:
    """Of the modules that returned one tensor (innermost first): the innermost block that is an item of a list
    (``layer3.2``, ``encoder.layer.3`` rather than the BERT layer's last sub-block ``encoder.layer.3.output``),
    else the innermost block (rather than its last ReLU or the stage around it), else the outermost module that
    is not a plain container."""
    blocks = [item for item in candidates if _is_block(item[1])]
    items = [item for item in blocks if item[0].partition(":")[0].rpartition(".")[2].isdigit()]
    if items or blocks:
        return (items or blocks)[0]
    meaningful = [item for item in candidates if not isinstance(item[1], _containers())]
    return (meaningful or candidates)[-1]


def _containers() -> tuple:
    torch = _torch()
    return torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict


def _is_block(module) -> bool:
    """A module with submodules of its own that is more than a list of them (a ResNet block, an encoder layer),
    and not a single layer that happens to hold a helper (a convolution with its own padding module)."""
    torch = _torch()
    layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase,
              torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)  # fmt: skip
    if isinstance(module, (*_containers(), *layers)):
        return False
    return any(True for _ in module.children())


def _first_tensor(output):
    torch = _torch()
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # (output, state) as LSTM and MultiheadAttention return
    return None


def _outputs(output) -> tuple[list, list[str]]:
    """The tensors ``forward`` returned and their names: a mapping's keys (HuggingFace's ModelOutput is an
    OrderedDict), a namedtuple's fields, else ``output`` or ``output_0``, ``output_1``, ..."""
    torch = _torch()
    if isinstance(output, Mapping):
        named = [(str(key), value) for key, value in output.items()]
    elif isinstance(output, tuple) and hasattr(output, "_fields"):
        named = list(zip(output._fields, output))
    elif isinstance(output, (tuple, list)):
        named = [(None, value) for value in output]
    else:
        named = [(None, output)]
    named = [(name, value) for name, value in named if isinstance(value, torch.Tensor)]
    names = [name for name, _ in named]
    if None in names or len(set(names)) < len(names):
        names = _numbered(len(named))
    return [value for _, value in named], names


def _numbered(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _example(example_inputs, module, input_names):
    """Example inputs as a tuple of tensors with at least two samples (so the batch axis stays dynamic), the
    ONNX input names (``input_names``, the dict's keys, or ``forward``'s parameter names), and the names to
    pass the inputs by (a dict's keys, checked against ``forward``), or None to pass them by position."""
    torch = _torch()
    if isinstance(example_inputs, Mapping):
        keywords = [str(key) for key in example_inputs]
        _check_keywords(module, keywords)
        names = list(input_names or keywords)
        values = list(example_inputs.values())
    else:
        keywords = None
        values = list(example_inputs) if isinstance(example_inputs, tuple) else [example_inputs]
        names = list(input_names or _argument_names(module, len(values)))
    if len(names) != len(values):
        raise DataError(f"{len(values)} example inputs but {len(names)} input names ({', '.join(names)})")
    tensors = [value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)) for value in values]
    if any(tensor.dim() == 0 or len(tensor) == 0 for tensor in tensors):
        raise DataError("example inputs need a batch axis with at least one sample")
    tensors = [tensor if len(tensor) > 1 else torch.cat([tensor, tensor]) for tensor in tensors]
    return tuple(tensors), names, keywords


def _check_keywords(module, keywords: list[str]) -> None:
    """A dict's keys must bind to ``forward``'s parameters by name (torch would fail deep in tracing, or not
    at all where a key lands on a parameter of the same shape)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to check against: torch will say what does not fit
        return
    parameters = signature.parameters.values()
    named = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    forward = f"{type(module).__name__}.forward({', '.join(named)})"
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    unknown = [] if takes_any else [key for key in keywords if key not in named]
    if unknown:
        listed = ", ".join(repr(key) for key in unknown)
        subject = f"input {listed} is not a parameter" if len(unknown) == 1 else f"inputs {listed} are not parameters"
        raise DataError(f"{subject} of {forward}; name each input after one of its parameters")
    try:
        signature.bind(**dict.fromkeys(keywords))
    except TypeError as exc:  # a required parameter not given, or one that is positional only
        raise DataError(
            f"the inputs do not fit {forward}: {exc}; give every parameter it needs by name, or a tuple in its order"
        ) from None


def _argument_names(module, count: int) -> list[str]:
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    if len(names) == count:
        return names
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps the real reason in generic advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"

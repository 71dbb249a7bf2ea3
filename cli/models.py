"""Where the CLI's MODEL argument comes from: an ONNX file, or ``package.module:function`` returning a torch or
Keras model, exported to a temporary ONNX file for the length of the command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def model_source(model: str | Path, device: str = "auto") -> Iterator:
    """An ``OnnxSource`` for ``model``; a Python reference is exported first and its file removed afterwards."""
    from probecore.backends import adapter
    from probecore.backends.onnx_source import OnnxSource  # loads onnx: not needed for `probe --help`

    if not adapter.is_reference(str(model)):
        yield OnnxSource(model, device=device)
        return
    with adapter.temporary_export(lambda path: adapter.export_reference(str(model), path)) as path:
        yield OnnxSource(path, device=device)

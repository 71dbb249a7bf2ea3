"""The result of a probing run, and writing it as report.json and probes.csv without half-written files."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import diagnostics
from .diagnostics import Finding, activation_findings, diagnose
from .errors import OutputError
from .softmax import SplitMetrics

SPLIT_NAMES = ("train", "valid", "test")
# The model's own error is measured on the run's test split, which is new to the model only if the data is.
MODEL_ERROR_NOTE = "held out only if the data excludes the model's own training samples"


@dataclass
class LayerResult:
    """One layer's probe: what was fitted on, and how well it predicts each split."""

    name: str
    op_type: str
    shape: tuple[int, ...]  # per sample
    reduction: dict  # Reduction.to_dict()
    metrics: dict[str, SplitMetrics]  # by split name
    n_iter: int
    stop_reason: str
    fit_seconds: float
    l2: float | None = None  # the strength chosen
    l2_path: list[dict] = field(default_factory=list)  # PathPoint.to_dict() per strength tried
    control: dict[str, SplitMetrics] | None = None  # the control task's probe, by split (control.py)
    activations: dict | None = None  # counts of NaN/Inf values and constant features (pipeline.activation_counts)
    role: str | None = None  # "main", "branch" or "side" in the model's data flow (LayerInfo.role); None: unknown
    parents: list[str] = field(default_factory=list)  # the probed layers it is computed from directly

    @property
    def n_features(self) -> int:
        return self.reduction["features_out"]

    @property
    def selectivity(self) -> float | None:
        """Control task test error minus real test error: how much of the probe's accuracy needs the layer."""
        return None if self.control is None else self.control["test"].error - self.metrics["test"].error

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "shape": list(self.shape),
            "features": self.reduction["features_in"],
            "features_used": self.reduction["features_out"],
            "reduction": self.reduction,
            "metrics": {split: self.metrics[split].to_dict() for split in SPLIT_NAMES},
            "fit": {
                "l2": self.l2,
                "iterations": self.n_iter,
                "stop_reason": self.stop_reason,
                "seconds": round(self.fit_seconds, 4),
                "l2_path": self.l2_path,
            },
            "control": None
            if self.control is None
            else {
                "metrics": {split: self.control[split].to_dict() for split in SPLIT_NAMES},
                "selectivity": self.selectivity,
            },
            "activations": self.activations,
            "role": self.role,
            "parents": self.parents,
        }


@dataclass
class ProbeReport:
    """Every probed layer in model order, the model's own test error where it predicts the same labels."""

    layers: list[LayerResult]
    classes: list
    split_sizes: dict[str, int]
    model_test: SplitMetrics | None = None
    model_output: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def diagnostics(self) -> list[Finding]:
        """Steps back in depth, dead segments and overfitting probes (``diagnostics.py``)."""
        names = [layer.name for layer in self.layers]
        graph = [(layer.role, layer.parents) for layer in self.layers]
        findings = diagnose(names, [layer.metrics for layer in self.layers], graph=graph)
        return findings + activation_findings(names, [layer.activations for layer in self.layers])

    def to_dict(self) -> dict:
        return {
            "format": "probecore.report/1",
            "settings": self.settings,
            "classes": self.classes,
            "split_sizes": self.split_sizes,
            "model": None
            if self.model_test is None
            else {"output": self.model_output, "test": self.model_test.to_dict()},
            "layers": [layer.to_dict() for layer in self.layers],
            "diagnostics": [finding.to_dict() for finding in self.diagnostics],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ProbeReport:
        """The report that ``to_dict`` (report.json) describes."""
        model = data.get("model")
        return cls(
            layers=[_layer_from_dict(layer) for layer in data["layers"]],
            classes=data["classes"],
            split_sizes=data["split_sizes"],
            model_test=None if model is None else _metrics_from_dict(model["test"]),
            model_output=None if model is None else model["output"],
            settings=data.get("settings", {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """One row per layer: shape, features, reduction, and loss / error / top-5 error per split."""
        header = ["layer", "op_type", "shape", "features", "features_used", "reduction"]
        header += [f"{split}_{metric}" for split in SPLIT_NAMES for metric in ("loss", "error", "top5_error")]
        header += ["test_error_ci95_low", "test_error_ci95_high", "l2", "control_test_error", "selectivity"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for layer in self.layers:
            row = [layer.name, layer.op_type, "x".join(map(str, layer.shape)), layer.reduction["features_in"]]
            row += [layer.n_features, layer.reduction["description"]]
            for split in SPLIT_NAMES:
                metrics = layer.metrics[split]
                row += [_number(metrics.loss), _number(metrics.error), _number(metrics.top5_error)]
            row += [_number(bound) for bound in layer.metrics["test"].error_interval]
            control_error = None if layer.control is None else layer.control["test"].error
            row += [_number(layer.l2), _number(control_error), _number(layer.selectivity)]
            writer.writerow(row)
        return buffer.getvalue()

    def files(self) -> dict[str, str]:
        return {"report.json": self.to_json() + "\n", "probes.csv": self.to_csv()}

    def write(self, out_dir: str | Path, extra: dict[str, str | bytes] | None = None) -> Path:
        """Write report.json, probes.csv and ``extra`` files (figures) into ``out_dir`` (``write_results``)."""
        return write_results(out_dir, {**self.files(), **(extra or {})})


def layer_roles(layers: list[LayerResult]) -> list[str]:
    """Each layer's role for the figures and the page, as ``diagnose`` reads them (``diagnostics.layer_roles``)."""
    return diagnostics.layer_roles([layer.role for layer in layers])


def write_results(out_dir: str | Path, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` (name -> text or bytes) into ``out_dir`` so that no reader ever sees half of them.

    A new directory is filled under a temporary name and renamed into place; into an existing one each
    file is written to a temporary name and renamed over the old one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        for name, content in files.items():
            write_text_atomic(out_dir / name, content)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        for name, content in files.items():
            (staging / name).write_bytes(content.encode() if isinstance(content, str) else content)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_writable(out_dir: str | Path) -> None:
    """Raise ``OutputError`` unless ``write_results`` can write into ``out_dir``: checked before any work, so
    that a run never ends, after all its extraction and fitting, in a write that fails."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"cannot write results to {out_dir}: it is a file; pass --out a directory (it is created if missing)")
    existing = next(folder for folder in [out_dir, *out_dir.parents] if folder.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write results to {out_dir}: {existing} is a file; pass --out a path under a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probecore-check.", dir=existing))
    except OSError as exc:
        raise OutputError(
            f"cannot write results to {out_dir}: {existing} is not writable ({exc.strerror}); pass --out a directory "
            "you can write to"
        ) from None


def _metrics_from_dict(data: dict) -> SplitMetrics:
    return SplitMetrics(data["n"], data["loss"], data["error"], data["top5_error"])


def _layer_from_dict(data: dict) -> LayerResult:
    fit, control = data["fit"], data.get("control")
    return LayerResult(
        name=data["name"],
        op_type=data["op_type"],
        shape=tuple(data["shape"]),
        reduction=data["reduction"],
        metrics={split: _metrics_from_dict(data["metrics"][split]) for split in SPLIT_NAMES},
        n_iter=fit["iterations"],
        stop_reason=fit["stop_reason"],
        fit_seconds=fit["seconds"],
        l2=fit["l2"],
        l2_path=fit["l2_path"],
        control=None if control is None else {s: _metrics_from_dict(control["metrics"][s]) for s in SPLIT_NAMES},
        activations=data.get("activations"),
        role=data.get("role"),
        parents=data.get("parents", []),
    )


def write_text_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(content.encode() if isinstance(content, str) else content)
        os.chmod(temp_name, 0o644)  # mkstemp makes it private
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"

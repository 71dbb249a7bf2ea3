"""The same probes across training checkpoints: a layer x checkpoint grid of probe errors (paper Figures 3, 9).

Every checkpoint is probed on one data set, loaded once, with the same layers and the same reductions
(feature subsets are drawn from the seed and the layer's name, so they match across checkpoints), so the
grid compares like with like. ``ProbeTracker`` is the form a training loop calls every N steps; ``run_sweep``
probes a list of saved checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .datasets import Dataset
from .engine import Engine
from .extraction import ProgressCallback
from .pipeline import run_probes
from .report import ProbeReport, write_results
from .run_spec import RunSpec
from .source import ActivationSource


@dataclass
class SweepReport:
    """One ``ProbeReport`` per checkpoint, in the order they were probed."""

    checkpoints: list[str] = field(default_factory=list)
    reports: list[ProbeReport] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Every layer probed in any checkpoint, in model order (first seen first)."""
        return list(dict.fromkeys(layer.name for report in self.reports for layer in report.layers))

    def grid(self, split: str = "test") -> np.ndarray:
        """(layers, checkpoints) probe errors on ``split``; NaN where a checkpoint lacks a layer."""
        rows = {name: i for i, name in enumerate(self.layers)}
        grid = np.full((len(rows), len(self.reports)), np.nan)
        for column, report in enumerate(self.reports):
            for layer in report.layers:
                grid[rows[layer.name], column] = layer.metrics[split].error
        return grid

    def to_dict(self) -> dict:
        return {
            "format": "probecore.sweep/1",
            "checkpoints": self.checkpoints,
            "layers": self.layers,
            "test_error": [[None if np.isnan(v) else float(v) for v in row] for row in self.grid()],
            "reports": [report.to_dict() for report in self.reports],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SweepReport:
        return cls(list(data["checkpoints"]), [ProbeReport.from_dict(report) for report in data["reports"]])

    def to_csv(self) -> str:
        """The test-error grid: one row per layer, one column per checkpoint."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["layer", *self.checkpoints])
        for name, row in zip(self.layers, self.grid()):
            writer.writerow([name, *("" if np.isnan(v) else f"{v:.6g}" for v in row)])
        return buffer.getvalue()

    def files(self) -> dict[str, str]:
        return {"sweep.json": json.dumps(self.to_dict(), indent=2) + "\n", "sweep.csv": self.to_csv()}

    def write(self, out_dir, extra: dict[str, str | bytes] | None = None):
        """Write sweep.json, sweep.csv and ``extra`` files into ``out_dir``, atomically (``write_results``)."""
        return write_results(out_dir, {**self.files(), **(extra or {})})


class ProbeTracker:
    """Probe the same layers of a model as it trains: call ``record(step, source)`` every N steps.

        tracker = probecore.ProbeTracker(dataset, probecore.RunSpec(layers=["op:Relu"]))
        for step in range(steps):
            train_step()
            if step % 500 == 0:
                tracker.record(step, source_for_current_weights)   # e.g. probecore.backends.torch.record
        tracker.sweep.write("probes/")  # or tracker.sweep.grid()
    """

    def __init__(
        self, dataset: Dataset, spec: RunSpec = RunSpec(), progress: ProgressCallback | None = None,
        engine: Engine | None = None,
    ):  # fmt: skip
        self.dataset, self.spec, self.progress, self.engine = dataset, spec, progress, engine
        self.sweep = SweepReport()

    def record(self, checkpoint, source: ActivationSource) -> ProbeReport:
        """Probe ``source`` (the model as it is now) and add it to the sweep under the label ``checkpoint``."""
        report = run_probes(source, self.dataset, self.spec, self.progress, self.engine)
        report.settings["checkpoint"] = str(checkpoint)
        self.sweep.checkpoints.append(str(checkpoint))
        self.sweep.reports.append(report)
        return report


def run_sweep(
    checkpoints: Iterable[tuple[str, ActivationSource]], dataset: Dataset, spec: RunSpec = RunSpec(),
    progress: ProgressCallback | None = None, engine: Engine | None = None,
) -> SweepReport:  # fmt: skip
    """Probe each ``(label, source)`` checkpoint on ``dataset``, in order, with one spec."""
    tracker = ProbeTracker(dataset, spec, progress, engine)
    for label, source in checkpoints:
        tracker.record(label, source)
    return tracker.sweep

"""Where a run's work happens. An engine runs an extraction plan and fits probes; the pipeline does the rest.

``LocalEngine`` does both in this process (threads for the fits). ``probecore.backends.ray_engine`` does them
on a Ray cluster; both give the same report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from .extraction import ExtractedFeatures, ExtractionPlan, ProgressCallback, run_extraction
from .probe import FitOptions, Probe, fit_probes
from .softmax import EvaluatorFactory
from .source import ActivationSource


@runtime_checkable
class Engine(Protocol):
    """Runs the two expensive steps of a probing run."""

    def extract(
        self, source: ActivationSource, plan: ExtractionPlan, progress: ProgressCallback | None = None
    ) -> ExtractedFeatures:
        """Every task of ``plan``: the features ``run_extraction`` would give, through ``plan.cache`` if any."""
        ...

    def fit(
        self,
        train: Mapping[str, np.ndarray],
        train_labels: np.ndarray,
        n_classes: int,
        valid: Mapping[str, np.ndarray] | None,
        valid_labels: np.ndarray | None,
        options: FitOptions,
        done: Callable[[str, Probe], None] | None = None,
        evaluator: EvaluatorFactory | None = None,
    ) -> dict[str, Probe]:
        """One probe per layer, as ``fit_probes`` fits them (``evaluator``: a device's loss evaluator, for an
        engine that fits in this process)."""
        ...

    def describe(self) -> dict:
        """What the report records of where the run ran."""
        ...


class LocalEngine:
    """This process: extraction batch by batch, ``options.threads`` probes fitted at once."""

    def extract(self, source, plan, progress=None) -> ExtractedFeatures:
        return run_extraction(source, plan, progress)

    def fit(self, train, train_labels, n_classes, valid, valid_labels, options, done=None, evaluator=None):
        return fit_probes(train, train_labels, n_classes, valid, valid_labels, options, done, evaluator)

    def describe(self) -> dict:
        return {"kind": "local"}

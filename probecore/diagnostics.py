"""Flags worth a look in a probing report: a step back in depth, a dead segment, a probe that overfits.

Layers come in model order. Steps are judged with each layer's exact 95% interval on its test error, so a
flag means more than sampling noise on the test split:

- ``non_monotonic``: a layer whose test error is worse than an earlier layer's beyond both intervals (its
  interval lies wholly above the earlier one's). In a network trained on the task, information the probe can
  read should not be lost with depth (paper, section 3.3); where it is, the later layers are worth a look.
- ``dead_segment``: a run of ``min_run`` or more consecutive layers none of which improves on the best
  probe error before the run (by more than ``tolerance``), while a later layer is better beyond the
  intervals of every layer in the run: paper section 5.1, the first half of a 128-layer network that
  training left unused because a skip connection went around it.
- ``overfit``: a probe whose validation error exceeds its training error by more than ``overfit_gap``,
  beyond the validation error's interval (its lower bound is above): it memorized its training split, and
  a stronger L2 or fewer features may read the layer more faithfully.
- ``activations``: a layer whose activations hold NaN or Inf (set to 0 before fitting, and counted), or
  whose features are all constant on the training split (nothing there for a probe to read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .softmax import SplitMetrics


@dataclass(frozen=True)
class Finding:
    """One flag: its kind, the layers it concerns (model order), and one sentence for people."""

    kind: str  # "non_monotonic", "dead_segment" or "overfit"
    layers: tuple[str, ...]
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layers": list(self.layers), "message": self.message}


@dataclass(frozen=True)
class DiagnosticOptions:
    min_run: int = 3  # layers in a dead segment, at least
    tolerance: float = 0.005  # an error this much below the best so far is no improvement (0.5 points)
    overfit_gap: float = 0.10  # validation error above training error by more than this (10 points), beyond noise


def diagnose(
    names: Sequence[str], metrics: Sequence[dict[str, SplitMetrics]], options: DiagnosticOptions = DiagnosticOptions()
) -> list[Finding]:
    """Every finding for layers ``names`` with their ``metrics`` (split name -> SplitMetrics), in model order."""
    errors = [m["test"].error for m in metrics]
    intervals = [m["test"].error_interval for m in metrics]
    findings = [*_non_monotonic(names, errors, intervals), *_dead_segments(names, errors, intervals, options)]
    return findings + _overfit(names, metrics, options)


def _overfit(names, metrics, options: DiagnosticOptions) -> list[Finding]:
    """Probes whose valid error exceeds their train error by more than the gap; consecutive ones together."""
    flagged = [(i, None) for i, m in enumerate(metrics) if m["valid"].error_interval[0] - m["train"].error > options.overfit_gap]
    findings = []
    for _, run in _runs(flagged):
        worst = max(run, key=lambda i: metrics[i]["valid"].error - metrics[i]["train"].error)
        train, valid = metrics[worst]["train"].error, metrics[worst]["valid"].error
        findings.append(Finding("overfit", tuple(names[i] for i in run), (
            f"{_span(names, run)}: the probe overfits (at worst {names[worst]}: train error {_pct(train)}, valid "
            f"{_pct(valid)}); a stronger L2 (--l2) or fewer features (--max-features) may read the layer more faithfully"
        )))  # fmt: skip
    return findings


def _non_monotonic(names, errors, intervals) -> list[Finding]:
    """Layers worse than an earlier one beyond both intervals; consecutive ones against the same earlier
    layer make one finding."""
    flagged = []
    for later in range(1, len(names)):
        earlier = min(range(later), key=lambda i: intervals[i][1])  # the earlier layer best beyond doubt
        if intervals[later][0] > intervals[earlier][1]:
            flagged.append((later, earlier))
    findings = []
    for earlier, worse in _runs(flagged):
        findings.append(Finding("non_monotonic", (names[earlier], *(names[i] for i in worse)), (
            f"{_span(names, worse)} read{'s' if len(worse) == 1 else ''} the labels worse than the earlier "
            f"{names[earlier]} beyond both 95% intervals (test error up to {_pct(max(errors[i] for i in worse))} "
            f"against {_pct(errors[earlier])}): information lost with depth"
        )))  # fmt: skip
    return findings


def _dead_segments(names, errors, intervals, options: DiagnosticOptions) -> list[Finding]:
    """Runs of layers after an entry layer that do not improve on the best error up to the entry, followed by
    a layer better beyond the intervals of every layer in the run."""
    findings, entry = [], 0
    while entry < len(names) - 1:
        best = min(errors[: entry + 1])
        end = entry + 1
        while end < len(names) and errors[end] >= best - options.tolerance:
            end += 1
        run = range(entry + 1, end)
        if len(run) >= options.min_run:
            lowest_in_run = min(intervals[i][0] for i in run)
            later_better = [i for i in range(end, len(names)) if intervals[i][1] < lowest_in_run]
            if later_better:
                rescue = later_better[0]
                findings.append(Finding("dead_segment", tuple(names[i] for i in run), (
                    f"{_span(names, run)}: the probe error does not improve on "
                    f"{names[errors.index(best)]}'s {_pct(best)} along them, while {names[rescue]} reaches "
                    f"{_pct(errors[rescue])}; training may be leaving these layers unused (paper, section 5.1)"
                )))  # fmt: skip
        entry = max(end, entry + 1)
    return findings


def activation_findings(names: Sequence[str], stats: Sequence[dict | None]) -> list[Finding]:
    """NaN/Inf activations and layers whose features are all constant, from each layer's activation counts."""
    findings = []
    for name, counts in zip(names, stats):
        if not counts:
            continue
        if counts["non_finite_values"]:
            findings.append(Finding("activations", (name,), (
                f"{name}: {counts['non_finite_values']} activation values in {counts['samples_with_non_finite']} "
                "samples are NaN or Inf; they were set to 0 before fitting, so this probe reads a damaged layer "
                "(look for overflow or a log/division of zero in the model)"
            )))  # fmt: skip
        if counts["constant_features"] and counts["constant_features"] == counts["features"]:
            findings.append(Finding("activations", (name,), (
                f"{name}: all {counts['features']} features are constant on the training split (a dead layer, e.g. "
                "ReLUs that never fire); its probe can only predict the most frequent class"
            )))  # fmt: skip
    return findings


def _runs(flagged: Sequence[tuple[int, object]]) -> list[tuple[object, list[int]]]:
    """Flagged (layer index, key) pairs in order, grouped into runs of consecutive layers with one key."""
    runs: list[tuple[object, list[int]]] = []
    for index, key in flagged:
        if runs and runs[-1][0] == key and runs[-1][1][-1] == index - 1:
            runs[-1][1].append(index)
        else:
            runs.append((key, [index]))
    return runs


def _span(names: Sequence[str], run: Sequence[int]) -> str:
    """``a`` for one layer, ``a .. c (3 layers)`` for a run."""
    return names[run[0]] if len(run) == 1 else f"{names[run[0]]} .. {names[run[-1]]} ({len(run)} layers)"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"

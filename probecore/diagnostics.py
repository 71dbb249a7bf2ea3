"""Flags worth a look in a probing report: a step back in depth, a dead segment, a probe that overfits.

Layers come in model order, each with its place in the model's data flow when the source knows its graph
(``LayerInfo.role`` and the probed layers it is computed from, its parents): a layer is compared only with
what it depends on. Steps are judged with each layer's exact 95% interval on its test error, so a flag means
more than sampling noise on the test split:

- ``non_monotonic``: a layer on the main path (every path from the input to the output passes through it)
  whose test error is worse than an earlier main-path layer's beyond both intervals. In a network trained on
  the task, information the probe can read should not be lost with depth (paper, section 3.3). Branch layers
  (inside a residual block, an Inception branch) carry part of the signal and side branches (gates,
  attention scores) only modulate it, so neither is held to its ancestors.
- ``dead_segment``: a run of ``min_run`` or more layers on one path, bypassed by a skip, none of which improves
  on the best probe error up to where the skip leaves (by more than ``tolerance``), while the layer where the
  skip joins, or one after it, reads the labels better than the run's last layer beyond both intervals (it
  recovers what the run lost), and the join is no better than where the skip left (the run added nothing the
  skip did not carry): paper section 5.1, the first half of a 128-layer network that training left unused
  because a skip connection went around it.
- ``overfit``: a probe whose validation error exceeds its training error by more than ``overfit_gap``,
  beyond the validation error's interval (its lower bound is above): it memorized its training split, and
  a stronger L2 or fewer features may read the layer more faithfully.
- ``activations``: a layer whose activations hold NaN or Inf (set to 0 before fitting, and counted), or
  whose features are all constant on the training split (nothing there for a probe to read).

Without a graph (activations given as arrays) the layers are read as a chain: each is on the main path,
computed from the one before, and there is no skip for a dead segment.
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
    names: Sequence[str],
    metrics: Sequence[dict[str, SplitMetrics]],
    options: DiagnosticOptions = DiagnosticOptions(),
    graph: Sequence[tuple[str | None, Sequence[str]]] | None = None,
) -> list[Finding]:
    """Every finding for layers ``names`` with their ``metrics`` (split name -> SplitMetrics), in model order.
    ``graph``: each layer's role (``main``, ``branch``, ``side``) and parents (the probed layers it is computed
    from directly); None, or no role known: a chain."""
    errors = [m["test"].error for m in metrics]
    intervals = [m["test"].error_interval for m in metrics]
    roles, parents = _roles_and_parents(names, graph)
    main = [i for i, role in enumerate(roles) if role == "main"]
    findings = _non_monotonic(names, errors, intervals, main)
    findings += _dead_segments(names, errors, intervals, roles, parents, options)
    return findings + _overfit(names, metrics, options)


def layer_roles(roles: Sequence[str | None]) -> list[str]:
    """Each layer's role as the diagnosis reads it (and the figures and the page draw it): ``main`` for every
    layer when none is known (activations given as arrays: a chain), an unknown one among known ones a branch."""
    if all(role is None for role in roles):
        return ["main"] * len(roles)
    return [role or "branch" for role in roles]


def _roles_and_parents(names, graph) -> tuple[list[str], list[list[int]]]:
    """Each layer's role and its parents' positions; a chain where the graph is unknown."""
    if graph is None or all(role is None for role, _ in graph):
        return layer_roles([None] * len(names)), [[i - 1] if i else [] for i in range(len(names))]
    position = {name: i for i, name in enumerate(names)}
    parents = [[position[parent] for parent in layer_parents if parent in position] for _, layer_parents in graph]
    return layer_roles([role for role, _ in graph]), parents


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


def _non_monotonic(names, errors, intervals, main: list[int]) -> list[Finding]:
    """Main-path layers worse than an earlier main-path layer beyond both intervals; consecutive ones against the
    same earlier layer make one finding."""
    flagged = []
    for step, later in enumerate(main[1:], start=1):
        earlier = min(main[:step], key=lambda i: intervals[i][1])  # the earlier layer best beyond doubt
        if intervals[later][0] > intervals[earlier][1]:
            flagged.append((step, earlier))
    findings = []
    for earlier, steps in _runs(flagged):
        worse = [main[step] for step in steps]
        findings.append(Finding("non_monotonic", (names[earlier], *(names[i] for i in worse)), (
            f"{_span(names, worse)} read{'s' if len(worse) == 1 else ''} the labels worse than the earlier "
            f"{names[earlier]} beyond both 95% intervals (test error up to {_pct(max(errors[i] for i in worse))} "
            f"against {_pct(errors[earlier])}): information lost with depth"
        )))  # fmt: skip
    return findings


def _dead_segments(names, errors, intervals, roles, parents, options: DiagnosticOptions) -> list[Finding]:
    """Runs of layers on one path between a main-path layer (the fork) and a layer it also feeds directly (a
    skip around the run), that do not improve on the fork, while the join or a layer after it is better than
    the run's last layer beyond both intervals and the join is not better than the fork beyond both."""
    ancestors: list[set[int]] = []
    for layer_parents in parents:  # parents come before their children
        ancestors.append(set().union(*(ancestors[p] | {p} for p in layer_parents)))
    findings, seen = [], set()
    for join, join_parents in enumerate(parents):
        for fork in (p for p in join_parents if roles[p] == "main"):
            run = [i for i in range(fork + 1, join) if fork in ancestors[i] and i in ancestors[join]]
            one_path = all(parents[layer] == [before] for before, layer in zip([fork, *run], run))
            if len(run) < options.min_run or not one_path or tuple(run) in seen:
                continue
            best_layer = min(ancestors[fork] | {fork}, key=lambda i: errors[i])  # the best read before the run
            downstream = [i for i in range(join, len(names)) if i == join or join in ancestors[i]]
            rescues = [i for i in downstream if intervals[i][1] < intervals[run[-1]][0]]  # what the run lost
            adds_nothing = intervals[join][1] >= intervals[fork][0]  # the join holds what the skip carried, no more
            if rescues and adds_nothing and all(errors[i] >= errors[best_layer] - options.tolerance for i in run):
                seen.add(tuple(run))
                rescue = rescues[0]
                findings.append(Finding("dead_segment", tuple(names[i] for i in run), (
                    f"{_span(names, run)}: the probe error does not improve on {names[best_layer]}'s "
                    f"{_pct(errors[best_layer])} along them, while {names[rescue]}, past the skip from {names[fork]} "
                    f"around them, reaches {_pct(errors[rescue])}: the labels go around these layers, not through "
                    "them (paper, section 5.1: layers that training leaves unused)"
                )))  # fmt: skip
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

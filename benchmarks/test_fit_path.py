"""The regularization path on the demo's layers (issue 14, points 2 and 3): does it choose what fits run to
convergence over the same grid choose, how close is each settled fit to its optimum, and what the spectral
preconditioner saves.

Features: the bundled convnet's default layers on the bundled digits, reduced as ``probe demo`` reduces them
(3500 train / 500 valid / 1000 test). Per layer, one thread:

- probecore's path (``FitOptions()``), timed, against the same path with ``precondition=False`` in the same
  rounds (``paired``): iterations and time, both;
- the reference: every strength of the grid fitted from zero to ``tol=1e-10`` without a validation split
  (L-BFGS to convergence; the optimum at that strength), its validation loss and test error.

Recorded: the strength each chooses, the path's validation loss against the reference optimum's at the same
strength (settled fits; a strength that only got a look, ``probe.LOOK``, against its looser margin), the
chosen strength's reference validation loss against the reference's best (the issue's target: within 0.5 %),
test errors. Guards: those targets, and the test error within 0.3 points.
``--benchmark-disable`` runs three layers once.
"""

from __future__ import annotations

import pytest

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.bundled import DEMO_MODEL
from probecore.probe import DEFAULT_L2, LOOK_UNCERTAINTY, FitOptions, blas_limits, fit_probe

LAYERS = ["pixels", "relu1", "pool1", "relu2", "pool2", "relu3", "logits"]


@pytest.fixture(scope="module")
def demo_features(mnist):
    source = OnnxSource(DEMO_MODEL, device="cpu")
    return probecore.extract_features(source, mnist, probecore.select_layers(source.layers(), None)).by_layer


@pytest.mark.benchmark(group="fit-path")
@pytest.mark.parametrize("layer", LAYERS)
def test_path_against_converged_fits(layer, demo_features, mnist, paired, record, request):
    if request.config.getoption("benchmark_disable") and layer not in ("relu1", "pool2", "logits"):
        pytest.skip("the smoke run keeps three layers")
    features, y = demo_features[layer], {name: split.y for name, split in mnist.splits().items()}
    fit = (features["train"], y["train"], 10, features["valid"], y["valid"])
    with blas_limits(1):
        fit_probe(*fit, FitOptions(l2=1e-1))  # compile before timing
        measured = paired(lambda: fit_probe(*fit, FitOptions()), lambda: fit_probe(*fit, FitOptions(precondition=False)), 3)
        reference = {}
        for l2 in DEFAULT_L2:
            optimum = fit_probe(features["train"], y["train"], 10, options=FitOptions(l2=l2, tol=1e-10, max_iter=5000))
            reference[l2] = (optimum.evaluate(features["valid"], y["valid"]).loss, optimum.evaluate(features["test"], y["test"]).error)
    probe, plain = measured.candidate_result, measured.baseline_result
    best = min(DEFAULT_L2, key=lambda l2: reference[l2][0])
    choice_gap = reference[probe.l2][0] / reference[best][0] - 1
    fit_gaps = [abs(point.valid_loss / reference[point.l2][0] - 1) for point in probe.path if point.stop_reason != "looked"]
    look_gaps = [abs(point.valid_loss / reference[point.l2][0] - 1) for point in probe.path if point.stop_reason == "looked"]
    test_gap = abs(probe.evaluate(features["test"], y["test"]).error - reference[probe.l2][1])
    record(
        {
            "layer": layer,
            "features": features["train"].shape[1],
            "chosen_l2": probe.l2,
            "converged_choice_l2": best,
            "choice_valid_loss_gap_percent": round(100 * choice_gap, 3),
            "worst_fit_valid_loss_gap_percent": round(100 * max(fit_gaps), 3),
            "worst_look_valid_loss_gap_percent": round(100 * max(look_gaps, default=0.0), 3),
            "test_error_gap_points": round(100 * test_gap, 2),
            "iterations": probe.n_iter,
            "iterations_without_preconditioner": plain.n_iter,
            "seconds": round(measured.candidate_min, 3),
            "seconds_without_preconditioner": round(measured.baseline_min, 3),
            **measured.figures(),
        }
    )
    assert choice_gap <= 0.005 and max(fit_gaps) <= 0.005 and test_gap <= 0.003 + 1e-9
    assert max(look_gaps, default=0.0) <= LOOK_UNCERTAINTY

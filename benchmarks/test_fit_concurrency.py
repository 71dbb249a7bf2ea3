"""Thread control when fitting many layers: layers at once, and BLAS pools held to one thread each.

Workload: the first 8 layers of ``probe_workload.resnet50_workload`` (256 to 1024 features; C = 10) cut
to 5 000 train / 1 000 valid samples, so a round takes seconds. Three ways to fit the same 8 probes with
``probecore.fit_probes``, one per round side:

- ``test_layers_at_once``: ``FitOptions()`` (one layer per available core, BLAS capped at one thread each)
  against ``threads=1`` (one layer at a time, BLAS still capped): what concurrency is worth.
- ``test_blas_cap_with_layers_at_once``: the defaults against ``blas_threads=None`` with the same
  concurrency: what oversubscription costs (each fit's BLAS pool spreading over every core while the other
  fits run too).
- ``test_one_layer_on_every_core``: one layer (the widest of the 8) fitted alone with the defaults
  (its loss evaluations in row chunks on one thread per core) against ``threads=1``: what splitting one
  fit's rows is worth when there are fewer layers than cores (issue 14, point 7).

Guard: the same probes every way (identical weights with BLAS capped: each fit is deterministic and
independent of the others; with threaded BLAS, the same strengths and validation losses).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import probecore
from probe_workload import resnet50_workload
from probecore.probe import available_cores

N_LAYERS = 8


@pytest.fixture(scope="module")
def layers():
    workload = dataclasses.replace(resnet50_workload(10), n_train=5000, n_valid=1000, n_test=1000)
    y_train, y_valid, _ = workload.labels()
    train, valid = {}, {}
    for index, (name, x_train, x_valid, _) in enumerate(workload.layers()):
        if index == N_LAYERS:
            break
        train[name], valid[name] = x_train, x_valid
    return train, y_train, valid, y_valid


def _compare(layers, candidate, baseline, paired, record, label, identical=True):
    train, y_train, valid, y_valid = layers
    if label == "one_layer":
        widest = max(train, key=lambda name: train[name].shape[1])
        train, valid = {widest: train[widest]}, {widest: valid[widest]}
    probecore.fit_probes(train, y_train, 10, valid, y_valid, candidate)  # compile and load before timing
    measured = paired(
        lambda: probecore.fit_probes(train, y_train, 10, valid, y_valid, candidate),
        lambda: probecore.fit_probes(train, y_train, 10, valid, y_valid, baseline),
        3,
    )
    for name in train:
        ours, theirs = measured.candidate_result[name], measured.baseline_result[name]
        if identical:
            np.testing.assert_array_equal(ours.weights, theirs.weights)
        else:  # threaded BLAS sums in another order: the same probe up to float32 rounding along the path
            assert ours.l2 == theirs.l2
            assert ours.path[-1].valid_loss == pytest.approx(theirs.path[-1].valid_loss, rel=1e-2)
    record(
        {
            "layers": len(train),
            "cores": available_cores(),
            f"{label}_s": round(measured.candidate_min, 3),
            "baseline_s": round(measured.baseline_min, 3),
            "speedup_baseline_over_candidate": round(measured.baseline_min / measured.candidate_min, 2),
            **measured.figures(),
        }
    )


@pytest.mark.benchmark(group="fit-threads")
def test_layers_at_once(layers, paired, record):
    defaults = probecore.FitOptions()
    _compare(layers, defaults, dataclasses.replace(defaults, threads=1), paired, record, "layers_at_once")


@pytest.mark.benchmark(group="fit-threads")
def test_blas_cap_with_layers_at_once(layers, paired, record):
    defaults = probecore.FitOptions()
    uncapped = dataclasses.replace(defaults, blas_threads=None)
    _compare(layers, defaults, uncapped, paired, record, "blas_capped", identical=False)


@pytest.mark.benchmark(group="fit-threads")
def test_one_layer_on_every_core(layers, paired, record):
    defaults = probecore.FitOptions()
    _compare(layers, defaults, dataclasses.replace(defaults, threads=1), paired, record, "one_layer")

"""What the fitter promises about the probe it reports, on fresh random problems, against scikit-learn fitting
each strength of the same grid to convergence (an independent reference of the same convex objective):

- the strength chosen is the one those converged fits choose on validation loss, or one whose converged
  validation loss is within 0.5 % of it (problems where the weakest strengths win included);
- at every strength the path fitted, its settled fit is within 0.5 % of the converged fit's validation loss
  and within 0.3 points of its test error."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import reference as ref
from probecore.probe import DEFAULT_L2, FitOptions, fit_probe

GRID = DEFAULT_L2


def clusters(rng, n, d, c, spread):
    """Labels from Gaussian class clusters in ``d`` dimensions, seen through a random mixing of correlated
    features (as activations are); ``spread``: the clusters' noise (small: the weakest strengths win)."""
    centres = rng.standard_normal((c, d)) * 2.0
    labels = rng.integers(0, c, n)
    latent = centres[labels] + spread * rng.standard_normal((n, d))
    mixing = rng.standard_normal((d, 2 * d)) / np.sqrt(d)
    features = np.maximum(latent @ mixing + 0.5 * rng.standard_normal(2 * d), 0)  # ReLU-like, correlated
    return features.astype(np.float32), labels


def converged(x_train, y_train, x_valid, y_valid, x_test, y_test, n_classes, l2):
    """scikit-learn's optimum at ``l2`` on the standardized features: validation loss, test error."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-12] = 1.0
    z = [(x - mean) / std for x in (x_train, x_valid, x_test)]
    model = LogisticRegression(C=1 / (l2 * len(y_train)), tol=1e-10, max_iter=100_000).fit(z[0], y_train)
    log_valid = ref.log_softmax(z[1] @ model.coef_.T + model.intercept_)
    valid_loss = -log_valid[np.arange(len(y_valid)), y_valid].mean()
    test_error = np.mean((z[2] @ model.coef_.T + model.intercept_).argmax(axis=1) != y_test)
    return valid_loss, test_error


# (n_train, d latent, classes, spread): easy problems where weak strengths win, hard ones where strong win
PROBLEMS = [(2000, 8, 4, 0.6), (2000, 12, 5, 1.5), (400, 30, 3, 3.0), (1500, 20, 10, 1.0)]


@pytest.mark.parametrize("n, d, c, spread", PROBLEMS, ids=[f"n{n}-d{2 * d}-c{c}-s{s}" for n, d, c, s in PROBLEMS])
def test_the_path_chooses_what_converged_fits_choose_and_each_fit_is_near_its_optimum(rng, n, d, c, spread):
    x, y = clusters(rng, 2 * n, d, c, spread)
    splits = (x[:n], y[:n], x[n : n + n // 2], y[n : n + n // 2], x[n + n // 2 :], y[n + n // 2 :])
    x_train, y_train, x_valid, y_valid, x_test, y_test = splits
    probe = fit_probe(x_train, y_train, c, x_valid, y_valid, FitOptions())
    reference = {l2: converged(*splits, c, l2) for l2 in GRID}
    best = min(GRID, key=lambda l2: reference[l2][0])
    assert reference[probe.l2][0] <= reference[best][0] * 1.005, (probe.l2, best, reference)
    for point in probe.path:
        fitted = fit_probe(x_train, y_train, c, x_valid, y_valid, FitOptions(l2=point.l2)) if point.l2 != probe.l2 else probe
        valid_loss, test_error = reference[point.l2]
        assert point.valid_loss == pytest.approx(valid_loss, rel=0.005), point
        assert abs(fitted.evaluate(x_test, y_test).error - test_error) <= 0.003 + 1e-9, point


def test_problems_where_the_weakest_strengths_win_are_among_them(rng):
    # the guarantee above is only worth something if the grid's weak end is where the answer lies sometimes
    x, y = clusters(rng, 4000, 8, 4, 0.6)
    valid_losses = [converged(x[:2000], y[:2000], x[2000:3000], y[2000:3000], x[3000:], y[3000:], 4, l2)[0] for l2 in GRID]
    assert int(np.argmin(valid_losses)) >= len(GRID) - 2

"""probecore.lbfgs against exact optima (numpy float64) and scipy's L-BFGS-B, on fresh random problems."""

import numpy as np
import pytest
import scipy.optimize

from probecore.lbfgs import minimize


def _quadratic(rng, n, condition):
    """0.5 x'Ax - b'x with A's eigenvalues spread log-uniformly over ``condition``: (value_and_grad, A, b)."""
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = (basis * np.logspace(0, np.log10(condition), n)) @ basis.T
    target = rng.standard_normal(n)

    def value_and_grad(x):
        product = matrix @ x
        return 0.5 * x @ product - target @ x, product - target

    return value_and_grad, matrix, target


def _softmax_regression(rng, n, d, c, l2):
    """Mean cross-entropy plus l2/2 |W|^2 in float64 (bias unpenalized): the probe's objective."""
    features = rng.standard_normal((n, d))
    labels = (features @ rng.standard_normal((d, c)) + rng.standard_normal((n, c))).argmax(axis=1)

    def value_and_grad(params):
        weights, bias = params[: d * c].reshape(d, c), params[d * c :]
        logits = features @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        residual = np.exp(log_probs)
        residual[np.arange(n), labels] -= 1
        residual /= n
        value = -log_probs[np.arange(n), labels].mean() + 0.5 * l2 * (weights**2).sum()
        return value, np.concatenate([(features.T @ residual + l2 * weights).ravel(), residual.sum(axis=0)])

    return value_and_grad, d * c + c


@pytest.mark.parametrize("seed", range(4))
def test_a_quadratic_is_minimized_to_its_exact_optimum(seed):
    rng = np.random.default_rng([40, seed])
    value_and_grad, matrix, target = _quadratic(rng, 60, condition=1e2)
    result = minimize(value_and_grad, np.zeros(60), gtol=1e-6, ftol=0.0)
    assert result.stop_reason == "converged"  # |x - x*| <= |g| / (A's smallest eigenvalue, 1) <= 1e-6 sqrt(60)
    np.testing.assert_allclose(result.x, np.linalg.solve(matrix, target), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_softmax_regression_reaches_the_objective_scipy_reaches(seed):
    rng = np.random.default_rng([41, seed])
    value_and_grad, n_params = _softmax_regression(rng, 300, 12, 4, l2=1e-2)
    ours = minimize(value_and_grad, np.zeros(n_params), gtol=1e-6, ftol=0.0)
    theirs = scipy.optimize.minimize(
        value_and_grad, np.zeros(n_params), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0}
    )
    assert ours.stop_reason == "converged"
    assert ours.fun == pytest.approx(theirs.fun, rel=1e-9)
    np.testing.assert_allclose(ours.x, theirs.x, atol=1e-4)


class _Dense:
    """``lbfgs.Preconditioner`` for a dense ``M``: the projection is the vector itself."""

    def __init__(self, matrix):
        self.matrix = matrix

    def project(self, vector):
        return vector.copy()

    def apply(self, vector, projected):
        return self.matrix @ projected

    def excess(self, projected):
        return float(projected @ self.matrix @ projected - projected @ projected)


def test_a_good_preconditioner_reaches_the_same_optimum_in_fewer_iterations():
    rng = np.random.default_rng(42)
    value_and_grad, matrix, _ = _quadratic(rng, 80, condition=1e3)
    inverse = np.linalg.inv(matrix + 0.1 * np.diag(np.diag(matrix)))  # close to the inverse Hessian, not equal
    plain = minimize(value_and_grad, np.zeros(80), gtol=1e-5, ftol=0.0)
    guided = minimize(value_and_grad, np.zeros(80), precondition=_Dense(inverse), gtol=1e-5, ftol=0.0)
    assert plain.stop_reason == guided.stop_reason == "converged"
    np.testing.assert_allclose(guided.x, plain.x, atol=1e-4)
    assert guided.n_iter < plain.n_iter / 3, (guided.n_iter, plain.n_iter)


def test_each_stop_is_named_and_counted():
    value_and_grad, _, _ = _quadratic(np.random.default_rng(43), 40, condition=1e3)
    limited = minimize(value_and_grad, np.zeros(40), max_iter=4, gtol=0.0, ftol=0.0)
    assert (limited.stop_reason, limited.n_iter) == ("max_iter", 4)

    seen = []
    stopped = minimize(value_and_grad, np.zeros(40), callback=lambda x, f: seen.append(f) or len(seen) == 3)
    assert (stopped.stop_reason, stopped.n_iter) == ("stopped", 3)
    assert stopped.fun == seen[-1] and seen == sorted(seen, reverse=True)  # every iteration lowers the objective

    loose = minimize(value_and_grad, np.zeros(40), gtol=0.0, ftol=1e-3)
    assert loose.stop_reason == "converged" and loose.n_iter < limited.n_iter + 40

    flat = minimize(lambda x: (float(np.float32(1.0)), np.ones_like(x) * 1e-30), np.zeros(3), gtol=0.0, ftol=0.0)
    assert flat.stop_reason == "line_search_failed"

    broken = minimize(lambda x: (float("nan"), np.ones_like(x)), np.zeros(3))
    assert broken.stop_reason.startswith("abnormal: ") and broken.n_iter == 0


def test_steps_into_non_finite_losses_are_shortened():
    # log barrier: the loss is infinite from x = 2 on; the unit step from the start lands there
    def value_and_grad(x):
        if x[0] >= 2:
            return float("inf"), np.full(1, np.nan)
        return (x[0] - 1.9) ** 2 - np.log(2 - x[0]), np.array([2 * (x[0] - 1.9) + 1 / (2 - x[0])])

    result = minimize(value_and_grad, np.array([-5.0]), gtol=1e-9, ftol=0.0)
    exact = (3.9 - np.sqrt(0.01 + 2)) / 2  # the root of 2 (x - 1.9) + 1 / (2 - x) below 2
    assert result.stop_reason == "converged" and result.x[0] == pytest.approx(exact, abs=1e-8)


def test_the_spectral_guess_and_its_quadratic_match_the_dense_matrix():
    """``M v`` and ``v'M v`` as L-BFGS takes them from the probe's preconditioner, against M built densely in float64,
    and ``M`` of a combination of vectors from the combination of their projections, as L-BFGS forms it."""
    from probecore.precondition import SpectralPreconditioner
    from probecore.probe import _InitialInverseHessian

    rng = np.random.default_rng(7)
    n, d, c, l2 = 2000, 300, 6, 1e-3
    features = (rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + rng.standard_normal((n, d))).astype(np.float32)
    preconditioner = SpectralPreconditioner.of(features)
    guess = _InitialInverseHessian(l2, c, preconditioner)
    vectors = preconditioner.vectors.astype(np.float64)
    dense = np.eye(d) + (vectors * (preconditioner.scales(l2) - 1)) @ vectors.T

    def expected(vector):
        return np.concatenate([(dense @ vector[: d * c].reshape(d, c)).ravel(), vector[d * c :]])

    vector, other = rng.standard_normal(d * c + c), rng.standard_normal(d * c + c)
    tolerance = {"rtol": 1e-5, "atol": 1e-5 * np.abs(expected(vector)).max()}
    np.testing.assert_allclose(guess.apply(vector, guess.project(vector)), expected(vector), **tolerance)
    quadratic = vector @ vector + guess.excess(guess.project(vector))
    assert quadratic == pytest.approx(vector @ expected(vector), rel=1e-5)
    assert quadratic < vector @ vector  # M shrinks the top directions: a real change, not the identity
    combined = guess.project(vector) - 0.3 * guess.project(other)
    np.testing.assert_allclose(guess.apply(vector - 0.3 * other, combined), expected(vector - 0.3 * other), **tolerance)


def test_a_line_search_below_the_loss_resolution_gives_up_at_once():
    """A float32 loss near its optimum: once no step can show a decrease the loss resolves, the search stops
    trying (a handful of evaluations, not twenty)."""
    value_and_grad, matrix, target = _quadratic(np.random.default_rng(44), 30, condition=10)
    optimum = np.linalg.solve(matrix, target)

    def float32_loss(x):
        value, grad = value_and_grad(x)
        return float(np.float32(value)), grad

    start = optimum + 1e-3
    patient = minimize(float32_loss, start, gtol=0.0, ftol=0.0)  # without a resolution: twenty tries at the end
    quick = minimize(float32_loss, start, gtol=0.0, ftol=0.0, resolution=1e-7)
    assert (patient.stop_reason, quick.stop_reason) == ("line_search_failed", "at_resolution")
    assert quick.n_eval <= quick.n_iter + 6 < patient.n_eval - 10, (quick.n_eval, quick.n_iter, patient.n_eval)
    np.testing.assert_allclose(quick.x, optimum, atol=1e-2)

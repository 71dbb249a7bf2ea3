"""SoftmaxLoss and split_metrics against float64 references and finite differences."""

import numpy as np
import pytest

import reference as ref
from probecore.softmax import SoftmaxLoss, log_softmax, mean_cross_entropy, split_metrics

# (N, d, C, l2); the fused kernel works in blocks of 262144 / d rows (16 to 1024), so the last two cases
# span several blocks and end in a partial one
LOSS_CASES = [
    (1, 1, 2, 0.0), (20, 3, 2, 0.1), (50, 7, 3, 1e-3), (200, 16, 10, 1e-2), (64, 5, 50, 0.5),
    (2500, 300, 7, 1e-3), (3001, 40, 2, 0.0),
]  # fmt: skip
KERNELS = ["fused", "blas"]


def _problem(rng, n, d, c, l2, scale=0.5, kernel="auto"):
    features = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    params = rng.standard_normal(d * c + c) * scale
    return SoftmaxLoss(features, labels, c, l2, kernel), params


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n, d, c, l2", LOSS_CASES)
def test_value_and_grad_match_float64_reference(n, d, c, l2, kernel):
    rng = np.random.default_rng([1, n, d, c])
    loss, params = _problem(rng, n, d, c, l2, kernel=kernel)
    value, grad = loss.value_and_grad(params)

    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(loss.features, loss.labels, weights, bias, l2)
    assert grad.shape == params.shape and grad.dtype == np.float64
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


def test_bias_is_not_penalized():
    rng = np.random.default_rng(2)
    loss, params = _problem(rng, 30, 4, 3, l2=0.0)
    penalized = SoftmaxLoss(loss.features, loss.labels, 3, l2=10.0)
    weights = params[:12]
    value, grad = loss.value_and_grad(params)
    value_l2, grad_l2 = penalized.value_and_grad(params)
    np.testing.assert_allclose(value_l2 - value, 5.0 * weights @ weights, rtol=1e-6)
    np.testing.assert_allclose(grad_l2[:12] - grad[:12], 10.0 * weights, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(grad_l2[12:], grad[12:])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n, d, c, l2", LOSS_CASES[1:])
def test_gradient_matches_central_differences_along_random_directions(n, d, c, l2, kernel):
    # Compute is float32, so use a step large enough that float32 rounding of the loss (~1e-7) stays far
    # below the difference, and compare directional derivatives rather than every coordinate.
    rng = np.random.default_rng([3, n, d, c])
    loss, params = _problem(rng, n, d, c, l2, kernel=kernel)
    _, grad = loss.value_and_grad(params)
    step = 1e-2
    for _ in range(5):
        direction = rng.standard_normal(params.shape)
        direction /= np.linalg.norm(direction)
        forward, _ = loss.value_and_grad(params + step * direction)
        backward, _ = loss.value_and_grad(params - step * direction)
        numeric = (forward - backward) / (2 * step)
        np.testing.assert_allclose(grad @ direction, numeric, rtol=1e-3, atol=1e-4 * np.linalg.norm(grad))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_matches_central_differences_coordinate_by_coordinate(kernel):
    rng = np.random.default_rng(4)
    n, d, c = 40, 3, 4
    loss, params = _problem(rng, n, d, c, l2=0.05, scale=1.0, kernel=kernel)
    _, grad = loss.value_and_grad(params)
    step = 1e-2
    numeric = np.empty_like(params)
    for i in range(len(params)):
        offset = np.zeros_like(params)
        offset[i] = step
        numeric[i] = (loss.value_and_grad(params + offset)[0] - loss.value_and_grad(params - offset)[0]) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=2e-4 * np.abs(grad).max())


@pytest.mark.parametrize("kernel", KERNELS)
def test_huge_logits_give_finite_loss_and_gradient(kernel):
    rng = np.random.default_rng(9)
    loss, params = _problem(rng, 300, 6, 5, l2=0.0, scale=300.0, kernel=kernel)  # logits in the thousands
    value, grad = loss.value_and_grad(params)
    weights, bias = params[:30].reshape(6, 5), params[30:]
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(loss.features, loss.labels, weights, bias, 0.0)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    np.testing.assert_allclose(grad, np.concatenate([ref_grad_w.ravel(), ref_grad_b]), rtol=1e-3, atol=1e-3)


def test_auto_picks_a_kernel_and_an_unknown_one_is_refused():
    rng = np.random.default_rng(10)
    assert _problem(rng, 10, 3, 2, 0.0)[0].kernel in KERNELS
    with pytest.raises(ValueError, match="kernel must be one of"):
        _problem(rng, 10, 3, 2, 0.0, kernel="gpu")


@pytest.mark.parametrize("dtype, offset", [(np.float64, 2000.0), (np.float32, 200.0)], ids=["float64", "float32"])
@pytest.mark.parametrize("n, c", [(1, 2), (10, 3), (100, 50)])
def test_log_softmax_matches_reference_even_where_exp_would_overflow(n, c, dtype, offset):
    rng = np.random.default_rng([5, n, c])
    # Row offsets far beyond exp's range (about 709 in float64, 88 in float32).
    logits = (rng.standard_normal((n, c)) * 30 + rng.uniform(-offset, offset, size=(n, 1))).astype(dtype)
    expected = ref.log_softmax(logits)
    tolerance = 1e-10 if dtype == np.float64 else 2e-5 * np.abs(expected).max()
    np.testing.assert_allclose(log_softmax(logits), expected, rtol=1e-6, atol=tolerance)


def _compare_metrics(log_probs, labels):
    metrics = split_metrics(log_probs, labels)
    loss, error, top5 = ref.split_metrics(log_probs, labels)
    assert metrics.n_samples == len(labels)
    np.testing.assert_allclose(metrics.loss, loss, rtol=1e-12)
    assert metrics.error == pytest.approx(error, abs=1e-12)
    if top5 is None:
        assert metrics.top5_error is None
    else:
        assert metrics.top5_error == pytest.approx(top5, abs=1e-12)


@pytest.mark.parametrize("n, c", [(1, 2), (40, 2), (60, 5), (60, 6), (200, 10), (150, 40)])
def test_split_metrics_match_reference_on_distinct_scores(n, c):
    rng = np.random.default_rng([6, n, c])
    log_probs = ref.log_softmax(rng.standard_normal((n, c)) * 2)
    labels = rng.integers(0, c, size=n)
    _compare_metrics(log_probs, labels)


@pytest.mark.parametrize("n, c", [(80, 4), (80, 6), (300, 12), (200, 30)])
def test_split_metrics_match_reference_with_many_ties(n, c):
    rng = np.random.default_rng([7, n, c])
    # Scores from a handful of values, so the label often ties with several other classes.
    log_probs = ref.log_softmax(rng.integers(0, 3, size=(n, c)).astype(np.float64))
    labels = rng.integers(0, c, size=n)
    _compare_metrics(log_probs, labels)


@pytest.mark.parametrize("c", [6, 9])
def test_top5_counts_a_label_tied_at_the_boundary_as_inside(c):
    # Row k: exactly k classes score strictly higher than the label, and the rest tie with it.
    labels = np.zeros(c, dtype=np.int64)
    scores = np.zeros((c, c))
    for k in range(c):
        scores[k, c - k :] = 1.0
    metrics = split_metrics(ref.log_softmax(scores), labels)
    outside = np.arange(c) >= 5  # only rows with 5 or more strictly higher classes miss the top 5
    assert metrics.top5_error == pytest.approx(outside.mean())


@pytest.mark.parametrize("c", [2, 3, 5])
def test_top5_error_is_none_with_five_classes_or_fewer(c):
    rng = np.random.default_rng(8)
    metrics = split_metrics(ref.log_softmax(rng.standard_normal((10, c))), rng.integers(0, c, size=10))
    assert metrics.top5_error is None


@pytest.mark.parametrize("errors, trials", [(0, 50), (3, 50), (27, 1000), (50, 50), (1, 1)])
def test_error_interval_matches_scipys_exact_binomial_interval(errors, trials):
    from scipy.stats import binomtest

    from probecore.softmax import binomial_interval

    expected = binomtest(errors, trials).proportion_ci(0.95, method="exact")
    np.testing.assert_allclose(binomial_interval(errors, trials), (expected.low, expected.high), atol=1e-9)


def test_error_interval_covers_the_true_error_at_least_95_percent_of_the_time():
    from probecore.softmax import SplitMetrics

    rng = np.random.default_rng(5)
    true_error, trials = 0.08, 300
    covered = 0
    for errors in rng.binomial(trials, true_error, size=2000):
        low, high = SplitMetrics(trials, None, errors / trials, None).error_interval
        covered += low <= true_error <= high
    assert 0.95 <= covered / 2000 <= 0.995


@pytest.mark.parametrize("n, c, offset", [(1, 2, 0.0), (40, 7, 0.0), (300, 50, 500.0)])
def test_mean_cross_entropy_is_the_split_metrics_loss(n, c, offset):
    rng = np.random.default_rng([11, n, c])
    logits = (rng.normal(size=(n, c)) * 5 + offset).astype(np.float32)
    labels = rng.integers(0, c, n)
    expected = ref.split_metrics(ref.log_softmax(logits.astype(np.float64)), labels)[0]
    assert mean_cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-5)

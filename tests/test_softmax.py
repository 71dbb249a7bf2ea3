"""SoftmaxLoss and split_metrics against float64 references and finite differences."""

import numpy as np
import pytest

import reference as ref
from probecore.softmax import SoftmaxLoss, log_softmax, mean_cross_entropy, prefers_fused, split_metrics

# (N, d, C, l2). The fused kernel takes rows in blocks of 65536 / d (4 to 1024, whole tiles of 4 rows; N
# below a block, several blocks ending in a partial one and a partial tile of 1 to 3 rows), C - 1 classes in
# tiles of 4, 3, 2 or 1 (C = 2 to 1000) and d in a loop that LLVM vectorizes 16 wide (d = 1 to 777, most of
# them not multiples of 16); 3001 x 40 flushes its float32 gradient sums to float64 three times.
LOSS_CASES = [
    (1, 1, 2, 0.0), (3, 5, 2, 0.0), (20, 3, 2, 0.1), (50, 7, 3, 1e-3), (200, 16, 10, 1e-2), (64, 5, 50, 0.5),
    (2500, 300, 7, 1e-3), (3001, 40, 2, 0.0), (1030, 33, 11, 1e-3), (77, 777, 6, 0.0), (41, 100, 5, 0.0),
    (300, 24, 8, 1e-2), (130, 48, 13, 0.0), (9, 17, 1000, 1e-3), (300, 70, 1000, 0.0),
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("label", ["first", "last"])
@pytest.mark.parametrize("n, d, c", [(1, 4, 2), (37, 19, 2), (300, 50, 10), (11, 9, 1000)])
def test_labels_all_in_one_class_match_float64_reference(n, d, c, label, kernel):
    # The fused kernel computes the last class's gradient from the others'; all labels in it, or in the
    # first class, are the lopsided cases.
    rng = np.random.default_rng([12, n, d, c])
    loss, params = _problem(rng, n, d, c, 1e-3, kernel=kernel)
    loss.labels[:] = 0 if label == "first" else c - 1
    value, grad = loss.value_and_grad(params)
    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(loss.features, loss.labels, weights, bias, 1e-3)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


@pytest.mark.parametrize("kernel", KERNELS)
def test_value_and_grad_leaves_params_alone_and_returns_a_fresh_gradient(kernel):
    rng = np.random.default_rng(13)
    loss, params = _problem(rng, 50, 6, 4, 0.1, kernel=kernel)
    before = params.copy()
    first = loss.value_and_grad(params)[1]
    second = loss.value_and_grad(params)[1]
    np.testing.assert_array_equal(params, before)
    assert first is not second and not np.shares_memory(first, params)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_features", [8, 200], ids=["transposed", "rows"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_give_a_nan_loss(kernel, n_features, bad):
    rng = np.random.default_rng(14)
    features = rng.standard_normal((40, n_features)).astype(np.float32)
    features[17, 3] = bad
    loss = SoftmaxLoss(features, rng.integers(0, 5, 40), 5, 0.0, kernel)
    with np.errstate(invalid="ignore"):
        value, _ = loss.value_and_grad(rng.standard_normal(n_features * 5 + 5) * 0.1)
    assert np.isnan(value)


def _kernel_objective(layout, features, labels, weights, bias, l2):
    from probecore import softmax_kernel

    grad_weights, grad_bias = np.empty(weights.shape), np.empty(len(bias))
    if layout == "rows":
        value = softmax_kernel.softmax_loss_grad(features, labels, weights, bias, l2, grad_weights, grad_bias)
    else:
        blocks = softmax_kernel.transpose_blocks(features, len(bias))
        value = softmax_kernel.softmax_loss_grad_transposed(blocks, labels, weights, bias, l2, grad_weights, grad_bias)
    return value, grad_weights, grad_bias


@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("n, d, c, l2", LOSS_CASES + [(1500, 130, 200, 1e-3), (2100, 9, 130, 0.0)])
def test_both_kernel_layouts_match_float64_reference(n, d, c, l2, layout):
    # SoftmaxLoss picks one layout by d (softmax.transposed); each must hold at every shape. The transposed
    # one takes blocks of 1008 rows (496 past 128 classes): 1500 and 2100 rows end in partial blocks.
    rng = np.random.default_rng([17, n, d, c])
    features = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    weights, bias = rng.standard_normal((d, c)) * 0.5, rng.standard_normal(c) * 0.5
    value, grad_weights, grad_bias = _kernel_objective(layout, features, labels, weights, bias, l2)
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(features, labels, weights, bias, l2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
    grad = np.concatenate([grad_weights.ravel(), grad_bias])
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


@pytest.mark.parametrize(
    "features, labels, n_classes, match",
    [
        (np.zeros((0, 3)), np.zeros(0, int), 2, "non-empty"),
        (np.zeros(3), np.zeros(3, int), 2, "non-empty"),
        (np.zeros((3, 2)), np.zeros(2, int), 2, r"labels must have shape \(3,\)"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), 2, r"labels must lie in \[0, 2\), got 0 to 2"),
        (np.zeros((3, 2)), np.array([0, -1, 1]), 2, "got -1 to 1"),
        (np.zeros((3, 2)), np.zeros(3, int), 0, "n_classes must be at least 1"),
    ],
)
def test_bad_inputs_are_refused_before_any_kernel_runs(features, labels, n_classes, match):
    with pytest.raises(ValueError, match=match):
        SoftmaxLoss(features, labels, n_classes, 0.0, "fused")


def test_features_are_converted_once_to_contiguous_float32():
    rng = np.random.default_rng(15)
    features = rng.standard_normal((30, 8))[:, ::2]  # float64, not contiguous
    loss = SoftmaxLoss(features, rng.integers(0, 3, 30), 3, 0.0, "fused")
    assert loss.features.dtype == np.float32 and loss.features.flags.c_contiguous
    params = rng.standard_normal(4 * 3 + 3)
    ref_value = ref.softmax_objective(loss.features, loss.labels, params[:12].reshape(4, 3), params[12:], 0.0)[0]
    np.testing.assert_allclose(loss.value_and_grad(params)[0], ref_value, rtol=1e-5)


def test_exp_kernel_matches_float64_exp():
    from probecore.softmax_kernel import _exp_nonpositive

    rng = np.random.default_rng(16)
    values = np.concatenate([-rng.exponential(5.0, 5000), rng.uniform(-87, 0, 5000), [0.0, -1e-30, -86.99]])
    values = values.astype(np.float32)
    result = values.copy()
    _exp_nonpositive(result, np.empty(len(values), np.int32))
    np.testing.assert_allclose(result, np.exp(values.astype(np.float64)), rtol=5e-7, atol=0)
    below = np.array([-87.5, -100.0, -1e4, -np.inf, np.nan], np.float32)  # clamped to exp(-87), NaN kept
    result = below.copy()
    _exp_nonpositive(result, np.empty(len(below), np.int32))
    np.testing.assert_allclose(result[:4], np.exp(-87.0), rtol=1e-6)
    assert np.isnan(result[4])


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
    assert prefers_fused(20000, 512, 10) and prefers_fused(50000, 4096, 2) and prefers_fused(20000, 256, 32)
    assert prefers_fused(20000, 64, 10) and prefers_fused(5000, 64, 1000)
    assert not prefers_fused(5000, 512, 1000) and not prefers_fused(20000, 2048, 100)
    assert not prefers_fused(5000, 128, 1000)
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


@pytest.mark.parametrize("kernel", ["fused", "blas"])
@pytest.mark.parametrize("n, d, c", [(9001, 300, 10), (5000, 64, 3), (3000, 40, 120)])
def test_row_chunks_on_a_pool_add_up_to_the_whole_evaluation_whatever_the_threads(n, d, c, kernel, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from probecore import softmax

    monkeypatch.setattr(softmax, "CHUNK_FLOPS", 4 * n * d * c / 7)  # about 7 chunks (whole 1008-row blocks at d=64)
    rng = np.random.default_rng([30, n, d, c])
    whole, params = _problem(rng, n, d, c, 1e-3, kernel=kernel)
    value, grad = whole.value_and_grad(params)
    results = []
    for threads in (1, 3):
        with ThreadPoolExecutor(threads) as pool:
            chunked = SoftmaxLoss(whole.features, whole.labels, c, 1e-3, kernel, pool)
            assert len(chunked._chunks) >= 3
            results.append(chunked.value_and_grad(params))
    (value_1, grad_1), (value_3, grad_3) = results
    assert value_1 == value_3 and np.array_equal(grad_1, grad_3)  # the chunks are fixed by the shape
    np.testing.assert_allclose(value_1, value, rtol=1e-6)
    np.testing.assert_allclose(grad_1, grad, rtol=0, atol=1e-5 * np.abs(grad).max())  # float32 sums (BLAS)
    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(whole.features, whole.labels, weights, bias, 1e-3)
    np.testing.assert_allclose(value_1, ref_value, rtol=1e-5)
    ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
    np.testing.assert_allclose(grad_1, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


@pytest.mark.parametrize("n, d, c", [(600, 300, 10), (2000, 64, 3), (150, 40, 120), (5, 3, 2)])
def test_the_held_out_loss_is_the_float64_mean_cross_entropy(n, d, c):
    rng = np.random.default_rng([31, n, d, c])
    loss, params = _problem(rng, 50, d, c, 1e-3)
    features, labels = rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, c, n)
    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    expected = ref.softmax_objective(features, labels, weights, bias, 0.0)[0]
    assert loss.held_out_loss(params, features, labels) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n, d, c", [(5000, 512, 1000), (20000, 2048, 100), (3500, 3200, 10), (40, 8, 500)])
def test_row_chunks_cover_the_rows_once_and_are_not_thin_next_to_the_classes(n, d, c):
    from probecore.softmax import CHUNK_FLOPS, MIN_CHUNKS, MIN_ROWS_PER_CLASS, row_chunks

    chunks = row_chunks(n, d, c)
    assert chunks[0][0] == 0 and chunks[-1][1] == n and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    rows = chunks[0][1] - chunks[0][0]
    assert rows >= min(MIN_ROWS_PER_CLASS * c, n / MIN_CHUNKS)  # each chunk's own (d, C) gradient stays small
    assert rows >= CHUNK_FLOPS / (4 * d * c) or len(chunks) == 1

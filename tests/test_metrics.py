"""monolith_tf.metrics against brute force: AUC with ties, log loss, RMSE, streaming AUC."""

import itertools
import math

import numpy as np
import pytest

from monolith_tf import metrics


def brute_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    # Few distinct values: lots of ties, within and across classes.
    scores = rng.integers(0, int(rng.integers(1, 12)), n) / 4.0
    assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    continuous = rng.normal(size=n)
    assert metrics.auc(labels, continuous) == pytest.approx(brute_auc(labels, continuous), abs=1e-12)


def test_auc_edge_cases():
    assert metrics.auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert metrics.auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0
    assert metrics.auc([1, 0, 1, 0], [0.5] * 4) == 0.5
    assert math.isnan(metrics.auc([1, 1], [0.3, 0.4]))
    assert math.isnan(metrics.auc([], []))
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        metrics.auc([1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc([1, 0], [0.1, float("nan")])


def test_log_loss_and_rmse_match_their_formulas():
    rng = np.random.default_rng(0)
    y = rng.random(50) < 0.4
    p = rng.random(50)
    p[0], p[1] = 0.0, 1.0  # clipped, not infinite
    expected = -np.mean([math.log(min(max(q, 1e-7), 1 - 1e-7)) if t else math.log(1 - min(max(q, 1e-7), 1 - 1e-7))
                         for t, q in zip(y, p)])
    assert metrics.log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    t, q = rng.normal(size=40), rng.normal(size=40)
    assert metrics.rmse(t, q) == pytest.approx(math.sqrt(sum((a - b) ** 2 for a, b in zip(t, q)) / 40), rel=1e-12)
    assert math.isnan(metrics.rmse([], [])) and math.isnan(metrics.log_loss([], []))
    assert metrics.sigmoid(0.0) == 0.5 and metrics.sigmoid(-1000.0) == 0.0 and metrics.sigmoid(1000.0) == 1.0


def test_streaming_auc_is_the_exact_auc_of_binned_scores():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.3
    p = 1 / (1 + np.exp(-(rng.normal(size=5000) + y)))
    p[:3] = [0.0, 1.0, 0.5]
    streaming = metrics.StreamingAUC(bins=1000)
    for lo in range(0, 5000, 700):  # in pieces, as batches arrive
        streaming.update(y[lo:lo + 700], p[lo:lo + 700])
    binned = streaming.bin_of(p)
    assert streaming.result() == pytest.approx(metrics.auc(y, binned), abs=1e-12)
    assert streaming.result() == pytest.approx(metrics.auc(y, p), abs=1e-3)
    again = metrics.StreamingAUC.from_state(streaming.state())
    assert again.result() == streaming.result()
    with pytest.raises(ValueError, match="probabilities"):
        streaming.update([1], [1.5])

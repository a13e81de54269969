"""Exact evaluation metrics for online training: AUC, log loss, RMSE.

Plain numpy, no TensorFlow, so they can be checked against brute force and
used on any arrays. `auc` is the rank statistic (Mann-Whitney U): the
probability that a random positive scores above a random negative, ties
counting one half. `StreamingAUC` keeps a whole stream's AUC in constant memory
by binning scores in [0, 1]; it equals `auc` on the binned scores exactly.
"""

import numpy as np

__all__ = ["auc", "log_loss", "rmse", "sigmoid", "StreamingAUC"]

LOG_LOSS_EPS = 1e-7


def _flat(values):
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_same_length(a, b, what):
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} labels but {len(b)} scores")


def auc(labels, scores):
    """ROC AUC of `scores` for binary `labels` (truthy = positive), ties = 1/2.

    Exact: sum over positive/negative pairs of [s_pos > s_neg] + 0.5 [s_pos ==
    s_neg], divided by the number of pairs, computed with mid-ranks in
    O(n log n). NaN when there is no positive or no negative.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = _flat(scores)
    _check_same_length(y, s, "auc")
    if np.isnan(s).any():
        raise ValueError("auc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # The mid-rank (1-based) of a group of equal scores: its last rank minus (count - 1) / 2.
    mid = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(mid[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels, probabilities, eps=LOG_LOSS_EPS):
    """Mean binary cross-entropy in nats, probabilities clipped to [eps, 1 - eps]."""
    y = _flat(labels)
    p = np.clip(_flat(probabilities), eps, 1.0 - eps)
    _check_same_length(y, p, "log_loss")
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rmse(targets, predictions):
    """Root mean squared error; NaN for empty input."""
    t = _flat(targets)
    p = _flat(predictions)
    _check_same_length(t, p, "rmse")
    if len(t) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((t - p) ** 2)))


def sigmoid(x):
    """The logistic function, without overflow warnings for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


class StreamingAUC:
    """AUC over a whole stream in O(bins) memory.

    Scores must lie in [0, 1] (probabilities); each goes to bin
    floor(score * bins) (1.0 to the last bin), and the result equals
    `auc(labels, binned_scores)` exactly: pairs in the same bin count as ties.
    With the default 2**14 bins that differs from the exact AUC by at most
    half the share of positive/negative pairs closer than 1/16384.
    """

    def __init__(self, bins=1 << 14):
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"StreamingAUC: bins must be an integer >= 1, got {bins!r}")
        self.bins = bins
        self.positives = np.zeros(bins, np.int64)
        self.negatives = np.zeros(bins, np.int64)

    def bin_of(self, scores):
        s = _flat(scores)
        if len(s) and (np.isnan(s).any() or s.min() < 0.0 or s.max() > 1.0):
            raise ValueError("StreamingAUC: scores must be probabilities in [0, 1]")
        return np.minimum((s * self.bins).astype(np.int64), self.bins - 1)

    def update(self, labels, scores):
        y = np.asarray(labels).reshape(-1).astype(bool)
        b = self.bin_of(scores)
        _check_same_length(y, b, "StreamingAUC.update")
        self.positives += np.bincount(b[y], minlength=self.bins)
        self.negatives += np.bincount(b[~y], minlength=self.bins)

    def result(self):
        n_pos, n_neg = int(self.positives.sum()), int(self.negatives.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        # For each bin: positives there beat the negatives in lower bins and tie with those in it.
        below = np.cumsum(self.negatives) - self.negatives
        wins = (self.positives * (below + 0.5 * self.negatives)).sum(dtype=np.float64)
        return float(wins / (n_pos * n_neg))

    def state(self):
        """A JSON-friendly dict (sparse: only non-empty bins)."""
        nz = np.flatnonzero(self.positives + self.negatives)
        return {"bins": self.bins, "index": nz.tolist(), "positives": self.positives[nz].tolist(),
                "negatives": self.negatives[nz].tolist()}

    @classmethod
    def from_state(cls, state):
        out = cls(int(state["bins"]))
        index = np.asarray(state["index"], np.int64)
        out.positives[index] = np.asarray(state["positives"], np.int64)
        out.negatives[index] = np.asarray(state["negatives"], np.int64)
        return out

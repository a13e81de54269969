"""Train/test splits of a ratings frame: random (sklearn-compatible) and temporal.

`random_split(ratings, 0.2, 42)` returns exactly the rows, in the same order, that
`sklearn.model_selection.train_test_split(ratings, test_size=0.2, random_state=42)` returns,
so RMSEs are comparable with published numbers on that split (e.g. the Surprise library's)
without depending on scikit-learn. `temporal_split` holds out the most recent ratings instead,
which is how an online recommender is actually evaluated (mostly cold-start on MovieLens).

Only numpy and pandas are needed: nothing here touches TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["random_split", "temporal_split"]


def _check_fraction(test_fraction, n: int) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if n < 2:
        raise ValueError(f"ratings must hold at least 2 rows to split, got {n}")


def random_split(ratings: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) rows chosen at random, identical to sklearn's train_test_split.

    sklearn (`_validate_shuffle_split` + `ShuffleSplit._iter_indices`) takes
    n_test = ceil(test_fraction * n) and n_train = n - n_test, draws
    `permutation = np.random.RandomState(seed).permutation(n)`, and returns the rows at
    permutation[n_test:] (train) and permutation[:n_test] (test), in permutation order.
    The index labels of `ratings` are kept, as sklearn's `_safe_indexing` keeps them.
    """
    n = len(ratings)
    _check_fraction(test_fraction, n)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if n_train == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves no training rows out of {n}")
    permutation = np.random.RandomState(seed).permutation(n)
    test = permutation[:n_test]
    train = permutation[n_test:n_test + n_train]
    return ratings.iloc[train], ratings.iloc[test]


def temporal_split(ratings: pd.DataFrame, test_fraction: float = 0.2
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): the newest `test_fraction` of ratings by timestamp form the test set.

    Train and test are each in timestamp order (a stable sort, so ties keep file order), and
    every training rating is at or before every test rating. Test size is
    ceil(test_fraction * n), as in `random_split`.
    """
    n = len(ratings)
    _check_fraction(test_fraction, n)
    if "timestamp" not in ratings.columns:
        raise ValueError("temporal_split needs a 'timestamp' column in ratings")
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise ValueError(f"test_fraction={test_fraction} leaves no training rows out of {n}")
    order = np.argsort(ratings["timestamp"].to_numpy(), kind="stable")
    return ratings.iloc[order[:n - n_test]], ratings.iloc[order[n - n_test:]]

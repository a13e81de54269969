"""Seeded synthetic rating data shaped like MovieLens, from 100 ratings to 100M+ events.

`generate(...)` returns the same dict as `movielens.load` ("ratings", "movies", "users", with
"format" = "synthetic"); `stream(...)` yields the ratings in timestamp order as DataFrame chunks
without ever holding the whole stream, so sizes beyond memory work. With equal arguments,
`generate(...)["ratings"]` equals the concatenated `stream(...)` chunks for any `chunk_size`.

The model, chosen so that embedding tables and online training have realistic work to do:
  * Popularity: users and items get Zipf weights (rank ** -zipf_exponent) in random id order,
    so a few items draw most ratings and a long tail is rarely seen (the default 0.6 gives the
    top 10% of items ~40% of ratings; ml-100k: 43%).
  * Arrival: ids arrive over the timeline in id order (some exist at the start); an event only
    picks ids that have arrived, so new ids keep appearing. `one_off_fraction` replaces that
    share of users and of items by brand-new ids seen exactly once (numbered after the regular
    ids in order of appearance): the long tail of a production stream, e.g. 100M distinct ids.
  * Ratings: clip(round(mean + user_bias + item_bias + user_taste . item_taste + noise), 1, 5)
    with 8-dim tastes; calibrated so the defaults resemble ml-100k (mean ~3.5, mostly 3s and 4s).
  * Drift: every taste rotates by `drift` radians over the timeline, between two fixed random
    directions, so its size is stable but recent ratings predict the next ones better than old
    ones (as do the arriving ids): online training should beat a model trained once.
Movie titles/genres and user demographics are decorative: they do not influence ratings.

Everything is a function of `seed` (numpy Generators from a SeedSequence; never the clock).
Events are drawn in fixed blocks, each from its own Generator, which makes the output independent
of chunk_size. This module needs only numpy and pandas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

__all__ = ["generate", "stream", "GENRES", "OCCUPATIONS"]

# ml-100k spans 874724710..893286638 (about 215 days); the defaults reproduce that window.
ML_100K_START = 874_724_710
ML_100K_DURATION = 18_561_928

# ml-latest's genre vocabulary (alphabetical, as MovieLens lists them) and how common each is
# there, roughly, so Drama and Comedy dominate as in the real data.
GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
_GENRE_SHARE = (0.12, 0.08, 0.04, 0.04, 0.23, 0.09, 0.05, 0.30, 0.05, 0.01, 0.07, 0.01, 0.02,
                0.04, 0.11, 0.05, 0.13, 0.03, 0.02)

# ml-100k's occupations with their approximate shares there.
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
)
_OCCUPATION_SHARE = (0.084, 0.030, 0.007, 0.101, 0.071, 0.019, 0.034, 0.017, 0.008, 0.013, 0.054,
                     0.028, 0.010, 0.112, 0.070, 0.015, 0.013, 0.033, 0.207, 0.029, 0.048)

LATENT_DIM = 8

# Rating model constants, fitted to ml-100k's histogram of 1..5 stars (6/11/27/34/21 %, mean 3.53):
# with the defaults this gives about 6/13/27/32/22 %, mean 3.53.
_GLOBAL_MEAN = 3.4
_USER_BIAS_STD = 0.3
_ITEM_BIAS_STD = 0.3
_BIAS_LEFT_TAIL = 0.6
_POPULARITY_BIAS = 0.1  # popular items rate higher, as in MovieLens
_TASTE_STD = 0.45  # per component; the dot product then has std ~ 8 ** 0.5 * 0.45 ** 2 = 0.57
_NOISE_STD = 0.5

# Share of regular ids present when the timeline starts; the rest arrive evenly over it. In
# ml-100k about 40% of users but only ~10% of movies first appear in the second half.
_USERS_AT_START = 0.2
_ITEMS_AT_START = 0.7

# Events are drawn in blocks of this many, each block from its own Generator (see docstring).
_BLOCK_SIZE = 1 << 15

# SeedSequence spawn keys: one independent stream of randomness per purpose.
_USERS_KEY, _ITEMS_KEY, _EVENTS_KEY, _USER_META_KEY, _MOVIE_META_KEY = range(5)


def generate(
    num_users: int = 943,
    num_items: int = 1682,
    num_ratings: int = 100_000,
    *,
    seed: int = 0,
    start_time: int = ML_100K_START,
    duration_seconds: int = ML_100K_DURATION,
    zipf_exponent: float = 0.6,
    drift: float = 1.0,
    num_genres: int = len(GENRES),
    one_off_fraction: float = 0.0,
) -> dict:
    """Generates a whole MovieLens-shaped dataset in memory; see the module docstring.

    Returns {"format": "synthetic", "ratings", "movies", "users"} with the columns and dtypes
    of `movielens.load`. "movies"/"users" list every regular id (1..num_items / 1..num_users,
    including ids that drew no rating) plus every one-off id that occurs in the ratings.
    """
    if num_genres < 1:
        raise ValueError(f"num_genres must be >= 1, got {num_genres}")
    chunks = list(stream(num_users, num_items, num_ratings, chunk_size=max(num_ratings, 1),
                         seed=seed, start_time=start_time, duration_seconds=duration_seconds,
                         zipf_exponent=zipf_exponent, drift=drift, one_off_fraction=one_off_fraction))
    ratings = chunks[0] if chunks else _ratings_frame(*(np.empty(0, dtype) for dtype in _RATING_DTYPES))
    # One-off ids are numbered contiguously after the regular ones, so the max covers them all.
    last_user = max(num_users, int(ratings["user_id"].max()) if len(ratings) else 0)
    last_item = max(num_items, int(ratings["movie_id"].max()) if len(ratings) else 0)
    return {
        "format": "synthetic",
        "ratings": ratings,
        "movies": _movies(last_item, seed, start_time, num_genres),
        "users": _users(last_user, seed),
    }


def stream(
    num_users: int = 943,
    num_items: int = 1682,
    num_ratings: int = 100_000,
    *,
    chunk_size: int = 1_000_000,
    seed: int = 0,
    start_time: int = ML_100K_START,
    duration_seconds: int = ML_100K_DURATION,
    zipf_exponent: float = 0.6,
    drift: float = 1.0,
    one_off_fraction: float = 0.0,
) -> Iterator[pd.DataFrame]:
    """Yields `num_ratings` ratings in timestamp order as DataFrames of `chunk_size` rows (the
    last may be shorter), with columns user_id int64, movie_id int64, rating float32,
    timestamp int64. Memory stays O(num_users + num_items + chunk_size), whatever num_ratings.
    """
    _check_arguments(num_users=num_users, num_items=num_items, num_ratings=num_ratings,
                     chunk_size=chunk_size, seed=seed, duration_seconds=duration_seconds,
                     zipf_exponent=zipf_exponent, one_off_fraction=one_off_fraction)
    # Validation happens above, eagerly; the generator below only starts work when iterated.
    return _rechunk(_event_blocks(num_users, num_items, num_ratings, seed, start_time,
                                  duration_seconds, zipf_exponent, drift, one_off_fraction),
                    chunk_size)


def _check_arguments(**values) -> None:
    for name in ("num_users", "num_items", "chunk_size", "duration_seconds"):
        if values[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {values[name]}")
    for name in ("num_ratings", "seed", "zipf_exponent"):
        if values[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {values[name]}")
    if not 0.0 <= values["one_off_fraction"] <= 1.0:
        raise ValueError(f"one_off_fraction must be in [0, 1], got {values['one_off_fraction']}")


# ----------------------------------------------------------------------------- population


@dataclass(frozen=True)
class _Population:
    """The regular users (or items): popularity, arrival and latent parameters per id."""

    size: int
    at_start: float  # share of ids present when the timeline starts
    bias_std: float
    cumulative_weight: np.ndarray  # prefix sums of popularity, in id (= arrival) order
    bias: np.ndarray
    taste_from: np.ndarray  # taste at the start of the timeline, (size, LATENT_DIM)
    taste_to: np.ndarray  # the direction it rotates towards

    @classmethod
    def draw(cls, size: int, at_start: float, zipf_exponent: float, bias_std: float,
             popularity_bias: float, rng: np.random.Generator) -> "_Population":
        # Zipf weights over a random permutation of ranks, so popularity is unrelated to arrival.
        weight = (rng.permutation(size) + 1.0) ** -zipf_exponent
        log_weight = np.log(weight)
        spread = log_weight.std()
        popularity = (log_weight - log_weight.mean()) / spread if spread > 0 else 0.0 * log_weight
        bias = _draw_bias(bias_std, size, rng) + popularity_bias * popularity
        return cls(
            size=size,
            at_start=at_start,
            bias_std=bias_std,
            cumulative_weight=np.cumsum(weight),
            bias=bias.astype(np.float32),
            taste_from=rng.normal(0.0, _TASTE_STD, (size, LATENT_DIM)).astype(np.float32),
            taste_to=rng.normal(0.0, _TASTE_STD, (size, LATENT_DIM)).astype(np.float32),
        )

    def events(self, progress: np.ndarray, angle: np.ndarray, one_off: np.ndarray, last_id: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids, biases and tastes for a block of events.

        Events flagged `one_off` get new ids last_id + 1, last_id + 2, ... in order; the others
        draw a regular id (1-based) by popularity among those arrived by `progress`.
        """
        ids = np.empty(len(progress), dtype=np.int64)
        bias = np.empty(len(progress), dtype=np.float32)
        taste = np.empty((len(progress), LATENT_DIM), dtype=np.float32)
        regular = ~one_off
        index = self.sample(progress[regular], rng)
        ids[regular] = index + 1
        bias[regular] = self.bias[index]
        taste[regular] = self.taste(index, angle[regular])
        count = len(progress) - len(index)
        ids[one_off] = last_id + np.arange(1, count + 1)
        # Drawn fresh rather than stored: a one-off id never recurs, so it needs no table row
        # (which is what lets a stream hold 100M distinct ids).
        bias[one_off] = _draw_bias(self.bias_std, count, rng)
        taste[one_off] = rng.normal(0.0, _TASTE_STD, (count, LATENT_DIM))
        return ids, bias, taste

    def sample(self, progress: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws one 0-based id per event among the ids arrived by then, by popularity.

        `progress` in [0, 1] is each event's position on the timeline.
        """
        arrived = np.ceil(self.size * (self.at_start + (1.0 - self.at_start) * progress))
        arrived = np.clip(arrived, 1, self.size).astype(np.int64)
        target = rng.random(len(progress)) * self.cumulative_weight[arrived - 1]
        index = np.searchsorted(self.cumulative_weight, target, side="right")
        return np.minimum(index, arrived - 1)  # guards the float edge target == total

    def taste(self, index: np.ndarray, angle: np.ndarray) -> np.ndarray:
        # A rotation between two independent Gaussian vectors keeps the distribution stationary.
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        return cos[:, None] * self.taste_from[index] + sin[:, None] * self.taste_to[index]


# ----------------------------------------------------------------------------- events

_RATING_DTYPES = (np.int64, np.int64, np.float32, np.int64)


def _event_blocks(num_users, num_items, num_ratings, seed, start_time, duration_seconds,
                  zipf_exponent, drift, one_off_fraction) -> Iterator[pd.DataFrame]:
    root = np.random.SeedSequence(seed)
    users = _Population.draw(num_users, _USERS_AT_START, zipf_exponent, _USER_BIAS_STD, 0.0,
                             _generator(root, _USERS_KEY))
    items = _Population.draw(num_items, _ITEMS_AT_START, zipf_exponent, _ITEM_BIAS_STD,
                             _POPULARITY_BIAS, _generator(root, _ITEMS_KEY))
    one_off_users = one_off_items = 0  # one-off ids handed out so far
    for block, first in enumerate(range(0, num_ratings, _BLOCK_SIZE)):
        rng = _generator(root, _EVENTS_KEY, block)
        position = np.arange(first, min(first + _BLOCK_SIZE, num_ratings), dtype=np.float64)
        # Event i lands uniformly inside the i-th of num_ratings equal slices of the timeline:
        # sorted across blocks by construction, with no state carried between blocks.
        progress = (position + rng.random(len(position))) / num_ratings
        timestamp = start_time + np.floor(progress * duration_seconds).astype(np.int64)
        angle = drift * progress

        # One-off ids stand in for that share of users and, independently, of items.
        one_off_user = rng.random(len(position)) < one_off_fraction
        one_off_item = rng.random(len(position)) < one_off_fraction
        user_id, user_bias, user_taste = users.events(progress, angle, one_off_user,
                                                      num_users + one_off_users, rng)
        item_id, item_bias, item_taste = items.events(progress, angle, one_off_item,
                                                      num_items + one_off_items, rng)
        one_off_users += int(one_off_user.sum())
        one_off_items += int(one_off_item.sum())

        score = (_GLOBAL_MEAN + user_bias + item_bias
                 + np.einsum("ij,ij->i", user_taste, item_taste, dtype=np.float64)
                 + rng.normal(0.0, _NOISE_STD, len(position)))
        rating = np.clip(np.rint(score), 1, 5).astype(np.float32)
        yield _ratings_frame(user_id, item_id, rating, timestamp)


def _draw_bias(std: float, size: int, rng: np.random.Generator) -> np.ndarray:
    # Gaussian plus a zero-mean exponential tail to the left: some films (and some raters) are
    # much worse than average, which gives MovieLens its share of 1-star ratings.
    return rng.normal(0.0, std, size) + _BIAS_LEFT_TAIL - rng.exponential(_BIAS_LEFT_TAIL, size)


def _generator(root: np.random.SeedSequence, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=key))


def _ratings_frame(user_id, movie_id, rating, timestamp) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": np.asarray(user_id, dtype=np.int64),
        "movie_id": np.asarray(movie_id, dtype=np.int64),
        "rating": np.asarray(rating, dtype=np.float32),
        "timestamp": np.asarray(timestamp, dtype=np.int64),
    })


def _rechunk(blocks: Iterator[pd.DataFrame], chunk_size: int) -> Iterator[pd.DataFrame]:
    """Re-slices fixed-size blocks into chunks of `chunk_size` rows."""
    pending: list[pd.DataFrame] = []
    pending_rows = 0
    for block in blocks:
        pending.append(block)
        pending_rows += len(block)
        while pending_rows >= chunk_size:
            merged = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
            yield merged.iloc[:chunk_size].reset_index(drop=True)
            rest = merged.iloc[chunk_size:]
            pending, pending_rows = ([rest] if len(rest) else []), len(rest)
    if pending_rows:
        yield pd.concat(pending, ignore_index=True)


# ----------------------------------------------------------------------------- metadata


def _movies(count: int, seed: int, start_time: int, num_genres: int) -> pd.DataFrame:
    rng = _generator(np.random.SeedSequence(seed), _MOVIE_META_KEY)
    movie_id = np.arange(1, count + 1, dtype=np.int64)
    # Release years skew recent, like a catalogue where most films are a few years old.
    start_year = pd.Timestamp(start_time, unit="s").year
    year = np.maximum(start_year - np.floor(rng.exponential(8.0, count)).astype(np.int64), 1919)
    title = "Synthetic Movie " + pd.Series(movie_id).astype(str) + " (" + pd.Series(year).astype(str) + ")"
    return pd.DataFrame({"movie_id": movie_id, "title": title.astype("str"),
                         "genres": pd.Series(_genre_lists(count, num_genres, rng), dtype=object)})


def _genre_names(num_genres: int) -> tuple[np.ndarray, np.ndarray]:
    names = list(GENRES[:num_genres]) + [f"Genre {i + 1}" for i in range(len(GENRES), num_genres)]
    share = np.array(list(_GENRE_SHARE[:num_genres]) + [0.02] * max(0, num_genres - len(GENRES)))
    return np.asarray(names, dtype=object), share / share.sum()


def _genre_lists(count: int, num_genres: int, rng: np.random.Generator) -> list[list[str]]:
    names, share = _genre_names(num_genres)
    per_movie = np.minimum(rng.choice([1, 2, 3], size=count, p=[0.5, 0.35, 0.15]), num_genres)
    # Gumbel top-k: the k largest of log(share) + Gumbel noise are k draws without replacement.
    scores = np.log(share) + rng.gumbel(size=(count, num_genres))
    chosen = np.argsort(-scores, axis=1)[:, :3]
    # Sorting the genre indices lists each movie's genres alphabetically, as MovieLens does.
    chosen = np.where(np.arange(chosen.shape[1]) < per_movie[:, None], chosen, num_genres)
    chosen.sort(axis=1)
    return [names[row[:k]].tolist() for row, k in zip(chosen, per_movie)]


def _users(count: int, seed: int) -> pd.DataFrame:
    rng = _generator(np.random.SeedSequence(seed), _USER_META_KEY)
    share = np.asarray(_OCCUPATION_SHARE) / np.sum(_OCCUPATION_SHARE)
    return pd.DataFrame({
        "user_id": np.arange(1, count + 1, dtype=np.int64),
        "gender": pd.Series(np.where(rng.random(count) < 0.71, "M", "F"), dtype="str"),
        # ml-100k ages run 7..73 around a mean of 34.
        "age": np.clip(np.rint(rng.normal(33.0, 12.0, count)), 7, 73).astype(np.int64),
        "occupation": pd.Series(np.asarray(OCCUPATIONS)[rng.choice(len(OCCUPATIONS), count, p=share)],
                                dtype="str"),
        "zip_code": pd.Series(rng.integers(0, 100_000, count)).astype(str).str.zfill(5).astype("str"),
    })

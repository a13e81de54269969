"""`Monolith`: a rating-prediction estimator on collisionless embedding tables.

The five-line way to use this package:

    model = Monolith(embedding_dim=64, eviction_threshold=10, epochs=20)
    model.fit(user_ids=users, item_ids=items, ratings=ratings)
    model.predict(user_id=1, item_id=100)          # a float
    model.recommend(user_id=1, top_k=10)           # item ids, best first
    model.save("model.monolith"); Monolith.load("model.monolith")

Underneath is a plain Keras 3 functional model trained with `model.compile` +
`model.fit`. Its prediction for (user u, item i) is

    global_mean + b_u + b_i + s_u + s_i + (p_u + f_u) . (q_i + g_i) + MLP([p_u, q_i, f_u, g_i])

  * p_u, q_i: `embedding_dim` rows in collisionless HashEmbedding tables with
    `eviction_threshold` as their frequency filter (min_count): an id gets a row
    on its eviction_threshold-th training occurrence, and reads zeros before.
  * b_u, b_i: one-float bias rows in their own tables admitted on the first
    occurrence (`bias_min_count=1`), so ids the filter has not admitted yet
    still get a personal offset; a bias row costs one float, not
    `embedding_dim`.
  * f_u, g_i (and their biases s_u, s_i): the mean of side-feature rows (user
    gender, age group, occupation, zip region; item genres, release decade, or
    any columns of the frames passed to `fit`). They are shared by many ids,
    so they carry cold ids and are added to the id vectors, SVDFeature style.
  * the MLP sees the same vectors; its output layer starts at zero and it is
    held back by dropout and L2, so it only adds what the dot product misses.

Tables train with their own fused optimizer (`table_optimizer`, default
Adam(0.005)) and a per-occurrence L2 (`l2`); dense weights use the Keras Adam
at `learning_rate`. Unknown ids read zeros, so a prediction for a never-seen
user or item falls back to biases, side features and the global mean; it
never fails. Predictions are clipped to the rating range seen in `fit`.

`collisionless=False` swaps every id table for the fixed-size hashed baseline
(`HashedEmbedding`, `num_buckets` rows): ids are fingerprinted first (the
hashing trick), so distinct ids share rows at random as in production. Those
tables are Keras weights; their rows are scaled so the Keras Adam moves them
at the table optimizer's rate (see `_Scale`), keeping the comparison about
collisions rather than step sizes.

`save(path)` writes one file (`monolith_tf._model_file`), with no pickle.
"""

import math
import os
import re
import time
import warnings

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from monolith_tf import _model_file
from monolith_tf import metrics as _metrics
from monolith_tf import optimizers as _optimizers
from monolith_tf.hash_table import EXPORT_KEYS
from monolith_tf.layers import HashedEmbedding, HashEmbedding, fingerprint_ids

__all__ = ["Monolith", "mae", "collision_fraction", "hash_ids"]

# ml-1m's age groups (its users.dat stores them as codes); ml-100k ages are mapped onto them.
_AGE_GROUPS = (18, 25, 35, 45, 50, 56)
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_PREDICT_CHUNK = 16384
# Training steps per tf.function call: halves the per-step overhead of small steps.
_STEPS_PER_EXECUTION = 16
_PADDING = 0  # padding id of side-feature lists; a feature fingerprinting to 0 is moved to 1


# ----------------------------------------------------------------------------- metrics and hashing


def mae(y_true, y_pred):
    """Mean absolute error (RMSE and AUC come from monolith_tf.metrics)."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    return float(np.mean(np.abs(y_true - y_pred)))


def hash_ids(ids):
    """int64 ids -> int64 FarmHash fingerprints of their 8 bytes (the hashed baseline's hashing)."""
    ids = tf.cast(tf.convert_to_tensor(ids), tf.int64)
    flat = tf.reshape(ids, [-1, 1])
    hashed = tf.bitcast(tf.fingerprint(flat), tf.int64)
    return tf.reshape(hashed, tf.shape(ids))


def collision_fraction(ids, num_buckets):
    """Share of the distinct `ids` whose hashed-baseline bucket holds another of them."""
    distinct = np.unique(np.asarray(ids, np.int64))
    if distinct.size == 0:
        return 0.0
    buckets = np.mod(hash_ids(distinct).numpy(), num_buckets)
    _, inverse, counts = np.unique(buckets, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse] > 1))


# ----------------------------------------------------------------------------- small layers


class _GlobalMean(keras.layers.Layer):
    """Adds a fixed global mean (a non-trainable weight, so it is saved with the model)."""

    def __init__(self, value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.mean = self.add_weight(shape=(), initializer=keras.initializers.Constant(float(value)),
                                    trainable=False, name="global_mean")

    def call(self, x):
        return x + self.mean


class _HashIds(keras.layers.Layer):
    """The hashing trick: ids -> fingerprints, so `mod num_buckets` collides ids at random."""

    def call(self, ids):
        return hash_ids(ids)

    def compute_output_spec(self, ids):
        return keras.KerasTensor(ids.shape, dtype="int64")


class _Scale(keras.layers.Layer):
    """x * factor. Rows stored divided by `factor` and read multiplied by it move `factor`
    times further per Adam step (Adam's step ignores the gradient's scale): the hashed
    baseline's per-table learning rate under the model's single Keras optimizer."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, x):
        return x * self.factor


class _RowL2(keras.layers.Layer):
    """Identity that adds l2 * sum(rows^2) to the loss while training: the same
    per-occurrence L2 HashEmbedding(l2=...) applies, for the hashed baseline."""

    def __init__(self, l2, **kwargs):
        super().__init__(**kwargs)
        self.l2 = float(l2)

    def call(self, x, training=None):
        if training and self.l2:
            self.add_loss(self.l2 * tf.reduce_sum(tf.square(x)))
        return x


# ----------------------------------------------------------------------------- side features


def _feature_strings(frame, id_column):
    """{id: [feature strings]} from a frame of per-entity attributes.

    Every column but the id becomes "column=value" features; list values (genres) give
    one feature per element. MovieLens columns get coarser values where raw ones would
    be nearly unique: age -> ml-1m age group, zip_code -> first digit, title -> release
    decade. Missing and empty values are skipped.
    """
    ids = _int_ids(frame[id_column].to_numpy(), f"{id_column} column")
    columns = [c for c in frame.columns if c != id_column]
    per_id = [[] for _ in range(len(frame))]
    for column in columns:
        values = frame[column].to_numpy(dtype=object)
        for k, value in enumerate(values):
            for feature in _column_features(column, value):
                per_id[k].append(f"{column}={feature}")
    return dict(zip(ids.tolist(), per_id))


def _column_features(column, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    if column == "age":
        try:
            age = float(value)
        except (TypeError, ValueError):
            return [str(value)]
        return [str(sum(age >= bound for bound in _AGE_GROUPS))]
    if column == "zip_code":
        text = str(value).strip()
        return [text[:1]] if text else []
    if column == "title":
        match = _YEAR.search(str(value))
        return [f"{match.group(1)[:3]}0s"] if match else []
    text = str(value)
    return [text] if text != "" else []


def _fingerprints(strings):
    if not strings:
        return np.zeros([0], np.int64)
    ids = fingerprint_ids(tf.constant(strings)).numpy()
    ids[ids == _PADDING] = 1  # 0 marks padding
    return ids


class _SideFeatures:
    """Per-entity side-feature ids (int64 fingerprints), looked up by entity id."""

    def __init__(self):
        self._by_id = {}  # id -> tuple of feature ids
        self._cache = None

    def __len__(self):
        return len(self._by_id)

    def update(self, strings_by_id):
        all_strings = sorted({s for strings in strings_by_id.values() for s in strings})
        fid = dict(zip(all_strings, _fingerprints(all_strings).tolist()))
        for key, strings in strings_by_id.items():
            # Sorted and deduplicated, so the same attributes always give the same list.
            self._by_id[key] = tuple(sorted({fid[s] for s in strings}))
        self._cache = None

    def max_width(self):
        return max((len(v) for v in self._by_id.values()), default=0)

    def arrays(self):
        """(sorted keys [n], matrix [n, max_width] padded with 0)."""
        if self._cache is None:
            keys = np.array(sorted(self._by_id), np.int64)
            matrix = np.full((len(keys), max(self.max_width(), 1)), _PADDING, np.int64)
            for row, key in enumerate(keys.tolist()):
                values = self._by_id[key]
                matrix[row, :len(values)] = values
            self._cache = keys, matrix
        return self._cache

    def set_arrays(self, keys, matrix):
        self._by_id = {int(k): tuple(int(v) for v in row if v != _PADDING) for k, row in zip(keys, matrix)}
        self._cache = None

    def rows(self, ids, width):
        """[len(ids), width] feature ids; zeros (padding) for ids without features."""
        keys, matrix = self.arrays()
        out = np.full((len(ids), width), _PADDING, np.int64)
        if len(keys) == 0 or len(ids) == 0:
            return out
        pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
        found = keys[pos] == ids
        cols = min(width, matrix.shape[1])
        out[found, :cols] = matrix[pos[found], :cols]
        return out


# ----------------------------------------------------------------------------- input checks


def _int_ids(values, arg):
    array = np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{arg} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind in "iu":
        if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{arg} must fit in int64")
        return array.astype(np.int64)
    if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    if array.size == 0:
        return array.astype(np.int64)
    raise ValueError(f"{arg} must be integer ids, got dtype {array.dtype}")


def _scalar_id(value, arg):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{arg} must be an integer id, got {value!r}")
    return int(value)


def _check_positive_int(arg, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Monolith: {arg} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_nonneg(arg, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Monolith: {arg} must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- the estimator


class _Progbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, with the step count capped at the epoch's steps: with
    steps_per_execution > 1 Keras reports the last, partial execution as a full one
    ("320/313")."""

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(min(batch, self.target - 1) if self.target else batch, logs)


class _KeepBest(keras.callbacks.Callback):
    """Early stopping on validation RMSE that also rolls the tables back to the best epoch
    (Keras' restore_best_weights only knows dense weights)."""

    def __init__(self, estimator, patience):
        super().__init__()
        self._estimator, self._patience = estimator, patience
        self.best, self.best_epoch, self._snapshot, self._wait = math.inf, None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_rmse")
        if value is None:
            return
        if value < self.best:
            self.best, self.best_epoch, self._wait = value, epoch, 0
            self._snapshot = self._estimator._snapshot()
        else:
            self._wait += 1
            if self._wait >= self._patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._snapshot is not None and self._wait > 0:
            self._estimator._restore_snapshot(self._snapshot)


class Monolith:
    """A recommender on collisionless embedding tables, trained with Keras.

    Args:
      name: the model's name (Keras model name, shown in messages).
      embedding_dim: width of the user/item (and side-feature) vectors.
      collisionless: True: HashEmbedding tables (one row per id); False: the hashed
        baseline (HashedEmbedding with `num_buckets` rows per table).
      eviction_threshold: the frequency filter: a user/item gets an embedding row only on
        its eviction_threshold-th occurrence in training (counted over every pass of
        every fit; before that it reads zeros and relies on its bias and side features).
      epochs, batch_size: training passes per `fit` and examples per step.
      learning_rate: the Keras Adam learning rate of the dense weights.
      verbose: Keras progress bar during fit.
      table_optimizer: a `monolith_tf.optimizers` instance, name or dict for the tables
        (default Adam(0.005)).
      bias_min_count: the biases' own frequency filter (default 1: every id gets a bias).
      expire_after: seconds of event time after which idle rows are evicted at the end of
        each fit (None: never).
      l2: L2 on embedding rows, per occurrence (added to each looked-up row's gradient).
      bias_l2: the same for bias rows.
      hidden_units: widths of the MLP's hidden layers (() for none).
      dropout: dropout rate on the MLP's input and hidden layers.
      dense_l2: Keras L2 on the MLP's kernels.
      side_features: use user/item attributes passed to fit (False: ids only). Decided
        by the first fit: a model first fitted without attributes never uses them.
      num_buckets: rows per table of the hashed baseline (collisionless=False only;
        default 16384).
      validation_fraction: hold out this random share of each fit's data to stop early on
        validation RMSE, keeping the best epoch's weights and tables (0: no hold-out).
      patience: epochs without validation improvement before stopping.
      seed: seeds table initializers, dense initializers, dropout, shuffling and hold-out.
    """

    def __init__(self, name="Monolith_Model", embedding_dim=64, collisionless=True, eviction_threshold=10,
                 epochs=20, batch_size=256, learning_rate=0.001, verbose=True, *, table_optimizer=None,
                 bias_min_count=1, expire_after=None, l2=4e-4, bias_l2=0.0, hidden_units=(64,), dropout=0.5,
                 dense_l2=0.01, side_features=True, num_buckets=None, validation_fraction=0.0, patience=3,
                 seed=0):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Monolith: name must be a non-empty string, got {name!r}")
        self.name = name
        self.embedding_dim = _check_positive_int("embedding_dim", embedding_dim)
        if not isinstance(collisionless, (bool, np.bool_)):
            raise ValueError(f"Monolith: collisionless must be True or False, got {collisionless!r}")
        self.collisionless = bool(collisionless)
        self.eviction_threshold = _check_positive_int("eviction_threshold", eviction_threshold)
        if self.eviction_threshold > 65535:
            raise ValueError(f"Monolith: eviction_threshold must be <= 65535, got {eviction_threshold!r}")
        self.epochs = _check_positive_int("epochs", epochs)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) \
                or not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"Monolith: learning_rate must be a finite number > 0, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)
        self.verbose = bool(verbose)
        try:
            self.table_optimizer = _optimizers.get(
                _optimizers.Adam(0.005) if table_optimizer is None else table_optimizer)
        except ValueError as e:
            raise ValueError(f"Monolith: table_optimizer: {e}") from None
        self.bias_min_count = _check_positive_int("bias_min_count", bias_min_count)
        self.expire_after = None if expire_after is None else _check_positive_int("expire_after", expire_after)
        self.l2 = _check_nonneg("l2", l2)
        self.bias_l2 = _check_nonneg("bias_l2", bias_l2)
        try:
            self.hidden_units = tuple(_check_positive_int("hidden_units", int(w) if isinstance(w, np.integer) else w)
                                      for w in hidden_units)
        except TypeError:
            raise ValueError(f"Monolith: hidden_units must be a sequence of layer widths, "
                             f"got {hidden_units!r}") from None
        self.dropout = _check_nonneg("dropout", dropout)
        if self.dropout >= 1:
            raise ValueError(f"Monolith: dropout must be in [0, 1), got {dropout!r}")
        self.dense_l2 = _check_nonneg("dense_l2", dense_l2)
        self.side_features = bool(side_features)
        if num_buckets is None:
            num_buckets = 16384
        self.num_buckets = _check_positive_int("num_buckets", num_buckets)
        self.validation_fraction = _check_nonneg("validation_fraction", validation_fraction)
        if self.validation_fraction >= 1:
            raise ValueError(f"Monolith: validation_fraction must be in [0, 1), got {validation_fraction!r}")
        self.patience = _check_positive_int("patience", patience)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"Monolith: seed must be an integer, got {seed!r}")
        self.seed = int(seed)

        self.history_ = []  # one dict of per-epoch metrics per fit call
        self._keras = None
        self._predict_fn = None
        self._state = {"fits": 0, "examples_seen": 0}
        self._user_side, self._item_side = _SideFeatures(), _SideFeatures()
        self._items = np.zeros([0], np.int64)        # catalogue: items seen in training, sorted
        self._item_counts = np.zeros([0], np.int64)  # training occurrences of each
        self._rated = np.zeros([0, 2], np.int64)     # distinct (user, item) training pairs, sorted

    # -- configuration ---------------------------------------------------------

    def get_params(self):
        """Constructor arguments as JSON-friendly values (`Monolith(**get_params())` rebuilds)."""
        return {
            "name": self.name, "embedding_dim": self.embedding_dim, "collisionless": self.collisionless,
            "eviction_threshold": self.eviction_threshold, "epochs": self.epochs, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "verbose": self.verbose,
            "table_optimizer": _optimizers.serialize(self.table_optimizer), "bias_min_count": self.bias_min_count,
            "expire_after": self.expire_after, "l2": self.l2, "bias_l2": self.bias_l2,
            "hidden_units": list(self.hidden_units), "dropout": self.dropout, "dense_l2": self.dense_l2,
            "side_features": self.side_features, "num_buckets": self.num_buckets,
            "validation_fraction": self.validation_fraction, "patience": self.patience, "seed": self.seed,
        }

    def __repr__(self):
        kind = "collisionless" if self.collisionless else f"hashed({self.num_buckets} buckets)"
        fitted = f"fitted on {self._state['examples_seen']} examples" if self.is_fitted else "not fitted"
        return (f"Monolith(name={self.name!r}, embedding_dim={self.embedding_dim}, {kind}, "
                f"eviction_threshold={self.eviction_threshold}, {fitted})")

    @property
    def is_fitted(self):
        return self._keras is not None

    @property
    def keras_model(self):
        """The underlying keras.Model (None before the first fit)."""
        return self._keras

    @property
    def items(self):
        """Item ids seen in training (the candidates of `recommend`), sorted."""
        return self._items.copy()

    def table_sizes(self):
        """{layer name: rows} of every collisionless table (empty for the hashed baseline)."""
        if self._keras is None:
            return {}
        return {layer.name: int(layer.table.size()) for layer in self._embedding_layers()}

    # -- the Keras model -----------------------------------------------------------

    def _embedding_layers(self):
        return [layer for layer in self._keras.layers if isinstance(layer, HashEmbedding)]

    def _table(self, name, width, inputs, timestamp, *, min_count, l2, seed, combiner=None, zeros=False):
        """A collisionless table, or the hashed baseline's equivalent, applied to `inputs`."""
        padding = _PADDING if combiner else None
        if self.collisionless:
            layer = HashEmbedding(width, name=name, combiner=combiner, padding_id=padding, l2=l2,
                                  initializer="zeros" if zeros else "random_normal", seed=seed,
                                  optimizer=self.table_optimizer, min_count=min_count,
                                  expire_after=self.expire_after)
            return layer(inputs, timestamp=timestamp)
        factor = self._hashed_lr_factor()
        init = "zeros" if zeros else keras.initializers.RandomNormal(stddev=0.05 / factor, seed=seed)
        if combiner is None:
            inputs = _HashIds(name=f"{name}_hash")(inputs)  # side features are fingerprints already
        rows = HashedEmbedding(width, self.num_buckets, name=name, combiner=combiner, padding_id=padding,
                               embeddings_initializer=init)(inputs)
        rows = _Scale(factor, name=f"{name}_scale")(rows)
        return _RowL2(l2, name=f"{name}_l2")(rows) if l2 else rows

    def _hashed_lr_factor(self):
        # Adam-like table optimizers step by ~learning_rate whatever the gradient's scale, so
        # scaling rows by table_lr / learning_rate gives the hashed rows the table's rate.
        if isinstance(self.table_optimizer, _optimizers.Adam):
            return self.table_optimizer.learning_rate / self.learning_rate
        return 1.0

    def _build(self):
        """Builds and compiles the Keras model from the estimator's config and `_state`."""
        state, dim = self._state, self.embedding_dim
        user = keras.Input((), dtype="int64", name="user")
        item = keras.Input((), dtype="int64", name="item")
        timestamp = keras.Input((), dtype="int64", name="timestamp")
        inputs = {"user": user, "item": item, "timestamp": timestamp}
        seed = self.seed * 1000
        p_u = self._table("user_embedding", dim, user, timestamp, min_count=self.eviction_threshold, l2=self.l2,
                          seed=seed + 1)
        q_i = self._table("item_embedding", dim, item, timestamp, min_count=self.eviction_threshold, l2=self.l2,
                          seed=seed + 2)
        terms = [self._table("user_bias", 1, user, timestamp, min_count=self.bias_min_count, l2=self.bias_l2,
                             seed=seed + 3, zeros=True),
                 self._table("item_bias", 1, item, timestamp, min_count=self.bias_min_count, l2=self.bias_l2,
                             seed=seed + 4, zeros=True)]
        mlp_inputs = [p_u, q_i]
        user_vec, item_vec = p_u, q_i
        if state["side"]:
            user_features = keras.Input((state["user_width"],), dtype="int64", name="user_features")
            item_features = keras.Input((state["item_width"],), dtype="int64", name="item_features")
            inputs.update(user_features=user_features, item_features=item_features)
            # One table per side holds each feature's vector and, in its last column, its bias:
            # half the lookups of separate tables.
            side_u = self._table("user_side", dim + 1, user_features, timestamp, min_count=1, l2=self.l2,
                                 seed=seed + 5, combiner="mean")
            side_i = self._table("item_side", dim + 1, item_features, timestamp, min_count=1, l2=self.l2,
                                 seed=seed + 6, combiner="mean")
            f_u, g_i = side_u[:, :dim], side_i[:, :dim]
            terms += [side_u[:, dim:], side_i[:, dim:]]
            user_vec = keras.layers.Add(name="user_vector")([p_u, f_u])
            item_vec = keras.layers.Add(name="item_vector")([q_i, g_i])
            mlp_inputs += [f_u, g_i]
        terms.append(keras.layers.Dot(axes=1, name="dot")([user_vec, item_vec]))
        if self.hidden_units:
            reg = keras.regularizers.L2(self.dense_l2) if self.dense_l2 else None
            h = keras.layers.Concatenate(name="mlp_input")(mlp_inputs)
            for k, width in enumerate(self.hidden_units):
                if self.dropout:
                    h = keras.layers.Dropout(self.dropout, seed=seed + 20 + k, name=f"mlp_dropout_{k}")(h)
                h = keras.layers.Dense(width, activation="relu", kernel_regularizer=reg, name=f"mlp_{k}",
                                       kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 40 + k))(h)
            if self.dropout:
                h = keras.layers.Dropout(self.dropout, seed=seed + 39, name="mlp_dropout_out")(h)
            # Starts at zero: the MLP begins as a no-op and only learns a residual.
            terms.append(keras.layers.Dense(1, kernel_initializer="zeros", kernel_regularizer=reg,
                                            name="mlp_out")(h))
        total = keras.layers.Add(name="sum")(terms)
        output = _GlobalMean(state["global_mean"], name="global_mean")(total)
        model = keras.Model(inputs, output, name=self.name)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss="mse",
                      metrics=[keras.metrics.RootMeanSquaredError(name="rmse")], jit_compile=False,
                      steps_per_execution=_STEPS_PER_EXECUTION)
        self._keras = model
        specs = {name: tf.TensorSpec([None] + list(t.shape[1:]), tf.int64) for name, t in inputs.items()}
        self._predict_fn = tf.function(lambda x: model(x, training=False), input_signature=[specs],
                                       reduce_retracing=True)

    def _inputs(self, users, items, timestamps=None):
        x = {"user": users, "item": items,
             "timestamp": np.zeros(len(users), np.int64) if timestamps is None else timestamps}
        if self._state.get("side"):
            x["user_features"] = self._user_side.rows(users, self._state["user_width"])
            x["item_features"] = self._item_side.rows(items, self._state["item_width"])
        return x

    # -- training ------------------------------------------------------------------

    def fit(self, user_ids=None, item_ids=None, ratings=None, *, timestamps=None, user_features=None,
            item_features=None, data=None, epochs=None):
        """Trains on ratings; calling it again continues training the same tables (online).

        Pass arrays (`user_ids`, `item_ids`, `ratings`, optional `timestamps` in event
        seconds: they stamp rows for `expire_after`; default the wall clock), or
        `data=`: a ratings DataFrame (user_id, movie_id or item_id, rating[, timestamp])
        or a dict as `monolith_tf.datasets.movielens.load` returns (its "users" and
        "movies" frames become side features). `user_features` / `item_features`: frames
        with a user_id / movie_id (or item_id) column and attribute columns. `epochs`
        overrides the constructor's for this call. Returns self.
        """
        users, items, y, timestamps, user_features, item_features = self._fit_arrays(
            user_ids, item_ids, ratings, timestamps, user_features, item_features, data)
        epochs = self.epochs if epochs is None else _check_positive_int("epochs", epochs)
        if user_features is not None:
            self._user_side.update(_feature_strings(user_features, "user_id"))
        if item_features is not None:
            self._item_side.update(_feature_strings(item_features, _item_column(item_features, "item_features")))

        first = self._keras is None
        if not first and not self._state["side"] and (user_features is not None or item_features is not None):
            warnings.warn(f"Monolith '{self.name}': side features passed to a model first fitted without "
                          "them are stored but not used (the model has no side-feature inputs)", stacklevel=2)
        if first:
            self._state.update(
                global_mean=float(np.mean(y, dtype=np.float64)), rating_min=float(y.min()),
                rating_max=float(y.max()),
                side=self.side_features and (len(self._user_side) > 0 or len(self._item_side) > 0),
                user_width=max(self._user_side.max_width(), 1), item_width=max(self._item_side.max_width(), 1))
            self._build()
        else:
            self._state["rating_min"] = min(self._state["rating_min"], float(y.min()))
            self._state["rating_max"] = max(self._state["rating_max"], float(y.max()))
        self._remember(users, items)

        if timestamps is None:
            timestamps = np.full(len(users), int(time.time()), np.int64)
        x = self._inputs(users, items, timestamps)
        rng = np.random.RandomState(self.seed + self._state["fits"])
        callbacks, validation = [], None
        if self.validation_fraction > 0 and len(y) >= 10:
            order = rng.permutation(len(y))
            n_val = max(1, int(round(self.validation_fraction * len(y))))
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
            validation = self._dataset({k: v[val_idx] for k, v in x.items()}, y[val_idx], shuffle_seed=None)
            x, y = {k: v[train_idx] for k, v in x.items()}, y[train_idx]
            keep_best = _KeepBest(self, self.patience)
            callbacks.append(keep_best)
        train = self._dataset(x, y, shuffle_seed=int(rng.randint(2**31 - 1)))
        if self.verbose:
            callbacks.append(_Progbar())
        history = self._keras.fit(train, epochs=epochs, validation_data=validation, callbacks=callbacks,
                                  shuffle=False, verbose=1 if self.verbose else 0)  # the dataset shuffles
        # None for a non-finite value, so the history stays valid JSON in a saved model.
        record = {k: [float(v) if math.isfinite(v) else None for v in values]
                  for k, values in history.history.items()}
        if validation is not None and keep_best.best_epoch is not None:
            record["best_epoch"] = keep_best.best_epoch + 1
        self.history_.append(record)
        if self.expire_after is not None and self.collisionless:
            for layer in self._embedding_layers():
                layer.table.evict()
        self._state["fits"] += 1
        self._state["examples_seen"] += int(len(users))
        return self

    def _dataset(self, x, y, shuffle_seed):
        data = tf.data.Dataset.from_tensor_slices((x, y.astype(np.float32)))
        if shuffle_seed is not None:
            # Op-level seed: the order is reproducible, and reshuffled every epoch.
            data = data.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
        # Autotuning off: its background thread makes every fit() wait for its
        # next wake-up (up to tens of seconds) when the iterator is destroyed
        # (docs/benchmarks.md, Training throughput, finding 2). The fixed
        # prefetch(2) is all this pipeline needs.
        options = tf.data.Options()
        options.autotune.enabled = False
        return data.batch(self.batch_size).prefetch(2).with_options(options)

    def _fit_arrays(self, user_ids, item_ids, ratings, timestamps, user_features, item_features, data):
        if data is not None:
            if user_ids is not None or item_ids is not None or ratings is not None:
                raise ValueError("fit: pass either data= or user_ids/item_ids/ratings, not both")
            if isinstance(data, dict):
                if "ratings" not in data:
                    raise ValueError("fit: data must hold a 'ratings' frame (as movielens.load returns)")
                frame = data["ratings"]
                user_features = data.get("users") if user_features is None else user_features
                item_features = data.get("movies") if item_features is None else item_features
            elif isinstance(data, pd.DataFrame):
                frame = data
            else:
                raise TypeError(f"fit: data must be a ratings DataFrame or a dict with 'ratings', "
                                f"got {type(data).__name__}")
            missing = [c for c in ("user_id", "rating") if c not in frame.columns]
            if missing:
                raise ValueError(f"fit: data's ratings frame lacks columns {missing}")
            user_ids, ratings = frame["user_id"].to_numpy(), frame["rating"].to_numpy()
            item_ids = frame[_item_column(frame, "data's ratings frame")].to_numpy()
            if timestamps is None and "timestamp" in frame.columns:
                timestamps = frame["timestamp"].to_numpy()
        for arg, value in (("user_ids", user_ids), ("item_ids", item_ids), ("ratings", ratings)):
            if value is None:
                raise ValueError(f"fit: {arg} is required (or pass data=)")
        users = _int_ids(user_ids, "user_ids")
        items = _int_ids(item_ids, "item_ids")
        y = np.asarray(ratings)
        if y.ndim != 1 or y.dtype.kind not in "iuf":
            raise ValueError(f"fit: ratings must be a one-dimensional array of numbers, got {y.dtype} {y.shape}")
        y = y.astype(np.float32)
        if len(users) == 0:
            raise ValueError("fit: no ratings given")
        if not len(users) == len(items) == len(y):
            raise ValueError(f"fit: user_ids, item_ids and ratings differ in length "
                             f"({len(users)}, {len(items)}, {len(y)})")
        if not np.all(np.isfinite(y)):
            raise ValueError("fit: ratings must be finite")
        if timestamps is not None:
            ts = np.asarray(timestamps)
            if ts.shape != users.shape or ts.dtype.kind not in "iuf" or not np.all(np.isfinite(ts)):
                raise ValueError(f"fit: timestamps must be {len(users)} finite event times in seconds")
            timestamps = np.floor(ts).astype(np.int64)
        for arg, frame in (("user_features", user_features), ("item_features", item_features)):
            if frame is not None and not isinstance(frame, pd.DataFrame):
                raise TypeError(f"fit: {arg} must be a pandas DataFrame, got {type(frame).__name__}")
        if user_features is not None and "user_id" not in user_features.columns:
            raise ValueError("fit: user_features needs a 'user_id' column")
        return users, items, y, timestamps, user_features, item_features

    def _remember(self, users, items):
        """Adds training pairs to the catalogue and the rated set (for `recommend`)."""
        new_items, new_counts = np.unique(items, return_counts=True)
        merged, inverse = np.unique(np.concatenate([self._items, new_items]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([self._item_counts, new_counts]), minlength=len(merged))
        self._items, self._item_counts = merged, counts.astype(np.int64)
        pairs = np.concatenate([self._rated, np.stack([users, items], axis=1)])
        self._rated = np.unique(pairs, axis=0)  # sorted by user, then item

    # -- snapshots (early stopping) ---------------------------------------------------

    def _snapshot(self):
        tables = {layer.name: {k: v.numpy() for k, v in layer.table.export().items()}
                  for layer in self._embedding_layers()}
        return [w.numpy() for w in self._keras.weights], tables

    def _restore_snapshot(self, snapshot):
        weights, tables = snapshot
        for variable, value in zip(self._keras.weights, weights):
            variable.assign(value)
        for layer in self._embedding_layers():
            layer.table.restore_export({k: tf.constant(v) for k, v in tables[layer.name].items()})

    # -- prediction ----------------------------------------------------------------

    def _require_fitted(self, what):
        if self._keras is None:
            raise RuntimeError(f"Monolith '{self.name}': call fit (or Monolith.load) before {what}")

    def _predict_arrays(self, users, items):
        """float32 predictions for id arrays, clipped to the rating range seen in fit."""
        self._require_fitted("predicting")
        out = np.empty(len(users), np.float32)
        for start in range(0, len(users), _PREDICT_CHUNK):
            stop = start + _PREDICT_CHUNK
            x = self._inputs(users[start:stop], items[start:stop])
            out[start:stop] = self._predict_fn(x).numpy().reshape(-1)
        return np.clip(out, self._state["rating_min"], self._state["rating_max"])

    def predict(self, user_id, item_id):
        """Predicted rating (a float) of `item_id` by `user_id`; unknown ids are fine."""
        user = _scalar_id(user_id, "user_id")
        item = _scalar_id(item_id, "item_id")
        return float(self._predict_arrays(np.array([user], np.int64), np.array([item], np.int64))[0])

    def batch_predict(self, pairs):
        """Predicted ratings (float32 array) for a sequence of (user_id, item_id) pairs."""
        array = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs)
        if array.size == 0:
            self._require_fitted("predicting")
            return np.zeros([0], np.float32)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"batch_predict: pairs must be (user_id, item_id) pairs, got shape {array.shape}")
        return self._predict_arrays(_int_ids(array[:, 0], "batch_predict user ids"),
                                    _int_ids(array[:, 1], "batch_predict item ids"))

    def rated_items(self, user_id):
        """Items `user_id` rated in training, sorted."""
        user = _scalar_id(user_id, "user_id")
        lo, hi = np.searchsorted(self._rated[:, 0], [user, user + 1]) if len(self._rated) else (0, 0)
        return self._rated[lo:hi, 1].copy()

    def recommend(self, user_id, top_k=10, *, include_rated=False, return_scores=False):
        """The `top_k` best items for `user_id` among those seen in training, best first.

        Items the user rated in training are left out unless include_rated=True. Ties
        go to the smaller item id. Returns an int64 array of item ids, or (ids, scores)
        with return_scores=True. Works for unknown users (biases and side features).
        """
        user = _scalar_id(user_id, "user_id")
        top_k = _check_positive_int("top_k", top_k)
        self._require_fitted("recommending")
        candidates = self._items
        if not include_rated:
            candidates = candidates[~np.isin(candidates, self.rated_items(user))]
        scores = self._predict_arrays(np.full(len(candidates), user, np.int64), candidates)
        best = np.lexsort((candidates, -scores))[:top_k]
        return (candidates[best], scores[best]) if return_scores else candidates[best]

    def evaluate(self, user_ids, item_ids, ratings, *, positive_threshold=4.0):
        """{"rmse", "mae", "auc", "n"} on held-out ratings (AUC: rating >= positive_threshold)."""
        users, items = _int_ids(user_ids, "user_ids"), _int_ids(item_ids, "item_ids")
        y = np.asarray(ratings, np.float64)
        if not len(users) == len(items) == len(y):
            raise ValueError("evaluate: user_ids, item_ids and ratings differ in length")
        pred = self._predict_arrays(users, items)
        return {"rmse": _metrics.rmse(y, pred), "mae": mae(y, pred),
                "auc": _metrics.auc(y >= positive_threshold, pred),
                "n": int(len(y))}

    # -- persistence -----------------------------------------------------------------

    def export(self, base_dir, *, portable=False):
        """Writes the next numbered SavedModel version under `base_dir` for TF
        Serving or `monolith_tf.serving` (see monolith_tf.export.save).

        The serving signature takes the model's inputs ("user", "item",
        "timestamp", and the side-feature matrices when the model uses them)
        and returns the raw predicted rating, before `predict`'s clipping.
        """
        if self._keras is None:
            raise ValueError(f"Monolith '{self.name}': call fit() before export()")
        from monolith_tf import export as _export
        return _export.save(self._keras, base_dir, portable=portable, model_name=self.name)

    def save(self, path):
        """Writes the whole estimator to the single file `path` (atomically; no pickle)."""
        self._require_fitted("saving")
        arrays = {}
        weights = self._keras.weights
        for k, w in enumerate(weights):
            arrays[f"weights/{k}"] = w.numpy()
        optimizer = self._keras.optimizer
        opt_vars = list(optimizer.variables) if optimizer.built else []
        for k, v in enumerate(opt_vars):
            arrays[f"optimizer/{k}"] = v.numpy()
        tables = [layer.name for layer in self._embedding_layers()]
        for layer in self._embedding_layers():
            for key, value in layer.table.export().items():
                arrays[f"tables/{layer.name}/{key}"] = value.numpy()
        user_keys, user_matrix = self._user_side.arrays()
        item_keys, item_matrix = self._item_side.arrays()
        arrays.update({"features/user_keys": user_keys, "features/user_matrix": user_matrix,
                       "features/item_keys": item_keys, "features/item_matrix": item_matrix,
                       "catalogue/items": self._items, "catalogue/counts": self._item_counts,
                       "rated/pairs": self._rated})
        config = {"params": self.get_params(), "state": self._state, "history": self.history_,
                  "weights": [[w.path, list(w.shape)] for w in weights],
                  "optimizer_variables": len(opt_vars), "tables": tables}
        _model_file.write(path, config, arrays)

    @classmethod
    def load(cls, path):
        """Reads a file `save` wrote. Raises ValueError naming the file if it is corrupt,
        truncated, foreign or of another format version."""
        config, arrays = _model_file.read(path)
        try:
            params = dict(config["params"])
            params["table_optimizer"] = _optimizers.get(params["table_optimizer"])
            model = cls(**params)
            model._state = dict(config["state"])
            model.history_ = list(config.get("history", []))
            model._build()
            weights = model._keras.weights
            if len(weights) != len(config["weights"]):
                raise ValueError(f"{len(config['weights'])} saved weights, the model has {len(weights)}")
            for k, w in enumerate(weights):
                w.assign(arrays[f"weights/{k}"])
            if config["optimizer_variables"]:
                optimizer = model._keras.optimizer
                optimizer.build(model._keras.trainable_variables)
                if len(optimizer.variables) != config["optimizer_variables"]:
                    raise ValueError("saved optimizer state does not match the model")
                for k, v in enumerate(optimizer.variables):
                    v.assign(arrays[f"optimizer/{k}"])
            layers = {layer.name: layer for layer in model._embedding_layers()}
            if sorted(layers) != sorted(config["tables"]):
                raise ValueError(f"saved tables {config['tables']} do not match the model's {sorted(layers)}")
            for name, layer in layers.items():
                layer.table.restore_export({k: tf.constant(arrays[f"tables/{name}/{k}"]) for k in EXPORT_KEYS})
            model._user_side.set_arrays(arrays["features/user_keys"], arrays["features/user_matrix"])
            model._item_side.set_arrays(arrays["features/item_keys"], arrays["features/item_matrix"])
            model._items, model._item_counts = arrays["catalogue/items"], arrays["catalogue/counts"]
            model._rated = arrays["rated/pairs"].reshape(-1, 2)
        except (KeyError, TypeError, ValueError, tf.errors.OpError) as e:
            raise _model_file.ModelFileError(f"{os.fspath(path)}: not a loadable Monolith model ({e})") from None
        return model


def _item_column(frame, what):
    for column in ("movie_id", "item_id"):
        if column in frame.columns:
            return column
    raise ValueError(f"fit: {what} needs a 'movie_id' or 'item_id' column")

"""Keras 3 layers: `HashEmbedding` (collisionless, backed by a HashTable) and
`HashedEmbedding` (the paper's baseline: a fixed table indexed by id mod N).

How tables train under plain `model.fit`: a training call looks rows up with
train=True and passes them through a `tf.custom_gradient` op anchored to a
scalar trainable weight that is always zero. When Keras takes the gradient of
the loss with respect to its trainable weights, the tape reaches the anchor,
and the custom backward applies the upstream gradient to the table's own fused
optimizer, then reports a zero gradient for the anchor (which therefore never
moves, whatever the Keras optimizer). Dense weights keep the Keras optimizer.
So the table is updated once per training step for each call of the layer,
and never by evaluate/predict (they run with training=False).
"""

import json

import keras
import numpy as np
import tensorflow as tf

from monolith_tf import initializers as _initializers
from monolith_tf import optimizers as _optimizers
from monolith_tf.hash_table import EXPORT_KEYS, HashTable

__all__ = ["HashEmbedding", "HashedEmbedding", "fingerprint_ids", "embedding_layers", "dense_weights"]

_COMBINERS = (None, "sum", "mean", "sqrtn")


def fingerprint_ids(strings):
    """String ids -> int64 ids through TF's 64-bit FarmHash fingerprint.

    Distinct strings collide with probability about 2^-64 per pair.
    """
    strings = tf.convert_to_tensor(strings)
    flat = tf.reshape(strings, [-1])
    ids = tf.bitcast(tf.fingerprint(tf.expand_dims(flat, -1)), tf.int64)
    return tf.reshape(ids, tf.shape(strings))


def _as_ids(inputs, layer_name):
    """Dense or ragged int64 ids from int32/int64/string input."""
    values = inputs.flat_values if isinstance(inputs, tf.RaggedTensor) else inputs
    dtype = tf.as_dtype(values.dtype)
    if dtype == tf.string:
        convert = fingerprint_ids
    elif dtype in (tf.int32, tf.int64):
        def convert(x):
            return tf.cast(x, tf.int64)
    else:
        raise TypeError(f"{layer_name}: ids must be int32, int64 or string, got {dtype.name}")
    if isinstance(inputs, tf.RaggedTensor):
        return inputs.with_flat_values(convert(inputs.flat_values))
    return convert(inputs)


def _check_combiner(combiner, layer_name):
    if combiner not in _COMBINERS:
        raise ValueError(f"{layer_name}: combiner must be one of {_COMBINERS}, got {combiner!r}")


def _pool(rows, ids, combiner, padding_id):
    """Applies the combiner over the last id axis; padding ids count as absent.

    rows: [..., n, dim] (dense) or ragged [batch, (n), dim]; ids matching.
    """
    if combiner is None:
        if padding_id is not None and not isinstance(rows, tf.RaggedTensor):
            rows = rows * tf.cast(tf.expand_dims(tf.not_equal(ids, padding_id), -1), rows.dtype)
        return rows
    if isinstance(rows, tf.RaggedTensor):
        total = tf.reduce_sum(rows, axis=-2)
        count = tf.cast(tf.expand_dims(ids.row_lengths(), -1), rows.dtype)
    else:
        mask = tf.ones_like(ids, rows.dtype) if padding_id is None else tf.cast(tf.not_equal(ids, padding_id),
                                                                                 rows.dtype)
        total = tf.reduce_sum(rows * tf.expand_dims(mask, -1), axis=-2)
        count = tf.reduce_sum(mask, axis=-1, keepdims=True)
    if combiner == "sum":
        return total
    if combiner == "mean":
        return total / tf.maximum(count, 1.0)
    return total / tf.sqrt(tf.maximum(count, 1.0))


def _timestamps_for(ids, timestamp):
    """Per-id int64 times from None, a scalar, or one per example (leading axis)."""
    if timestamp is None:
        return None
    ts = tf.convert_to_tensor(timestamp)
    ts = tf.cast(tf.math.floor(ts), tf.int64) if ts.dtype.is_floating else tf.cast(ts, tf.int64)
    if ts.shape.rank == 0:
        return ts
    ts = tf.reshape(ts, [-1])  # one per example
    if isinstance(ids, tf.RaggedTensor):
        return tf.repeat(ts, ids.row_lengths())
    if ids.shape.rank == 1:
        return ts
    per_example = tf.reduce_prod(tf.shape(ids)[1:])
    return tf.reshape(tf.repeat(ts, per_example), tf.shape(ids))


def _pooled_shape(input_shape, output_dim, combiner):
    input_shape = tuple(input_shape)
    if combiner is not None and len(input_shape) >= 2:
        return input_shape[:-1] + (output_dim,)
    return input_shape + (output_dim,)


def _output_spec(inputs, output_dim, combiner):
    shape = _pooled_shape(inputs.shape, output_dim, combiner)
    ragged = getattr(inputs, "ragged", False) and combiner is None
    return keras.KerasTensor(shape, dtype="float32", ragged=ragged)


@keras.saving.register_keras_serializable(package="monolith_tf")
class HashEmbedding(keras.layers.Layer):
    """Collisionless embedding: every distinct id gets its own trained row.

    Args:
      output_dim: embedding width.
      combiner: None (one row per id), or "sum", "mean", "sqrtn" to pool over
        the last axis (multi-hot features such as genres).
      padding_id: an id that marks padding in dense multi-hot input: it gets
        no row, no gradient, and is left out of pooling. Ragged input needs no
        padding at all, so every int64 stays a valid key.
      l2: L2 penalty on the rows used in a step (added to their gradient).
      **table_kwargs: HashTable arguments (initializer, seed, optimizer,
        min_count, expire_after, capacity, num_shards, admission_counters).

    Call: `layer(ids, timestamp=None, training=None)`. ids are int32/int64 or
    strings (64-bit fingerprints), shaped [batch], [batch, n] or ragged.
    `timestamp` (event seconds, a scalar or one per example) feeds expiry; by
    default the table uses the wall clock.
    """

    def __init__(self, output_dim, *, combiner=None, padding_id=None, l2=0.0, initializer="random_uniform",
                 seed=0, optimizer=None, min_count=1, expire_after=None, capacity=None, num_shards=None,
                 admission_counters=4 * 1024 * 1024, **kwargs):
        super().__init__(**kwargs)
        _check_combiner(combiner, f"HashEmbedding '{self.name}'")
        if not (isinstance(l2, (int, float)) and l2 >= 0):
            raise ValueError(f"HashEmbedding '{self.name}': l2 must be >= 0, got {l2!r}")
        self.output_dim = output_dim
        self.combiner = combiner
        self.padding_id = padding_id
        self.l2 = float(l2)
        self.table = HashTable(output_dim, name=self.name, initializer=initializer, seed=seed, optimizer=optimizer,
                               min_count=min_count, expire_after=expire_after, capacity=capacity,
                               num_shards=num_shards, admission_counters=admission_counters)
        # Our ops have no XLA kernels.
        self.supports_jit = False
        # monolith_tf.export swaps in a stock tf.lookup table here while it
        # traces a portable serving graph; None means "use self.table".
        self._serving_lookup = None
        # The zero-valued weight the tape reaches; see the module docstring.
        self._anchor = self.add_weight(shape=(), initializer="zeros", trainable=True, name="table_anchor")
        self.built = True

    def build(self, input_shape):
        pass

    def call(self, inputs, timestamp=None, training=None):
        ids = _as_ids(inputs, f"HashEmbedding '{self.name}'")
        flat = ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids
        valid = None if self.padding_id is None else tf.not_equal(flat, self.padding_id)
        if training:
            ts = _timestamps_for(ids, timestamp)
            if valid is None:
                rows = self.table.lookup(flat, train=True, timestamp=ts)
            else:
                # Padding never reaches the table: look up the real ids only and
                # scatter their rows back, leaving zeros at padded positions.
                kept_ts = ts if ts is None or ts.shape.rank == 0 else tf.boolean_mask(ts, valid)
                kept = self.table.lookup(tf.boolean_mask(flat, valid), train=True, timestamp=kept_ts)
                shape = tf.concat([tf.shape(flat, out_type=tf.int64), [self.output_dim]], 0)
                rows = tf.scatter_nd(tf.where(valid), kept, shape)
            rows = self._trainable_rows(flat, rows, valid)
        else:
            rows = self.table.lookup(flat) if self._serving_lookup is None else self._serving_lookup(flat)
        rows = ids.with_flat_values(rows) if isinstance(ids, tf.RaggedTensor) else rows
        return _pool(rows, ids, self.combiner, self.padding_id)

    def _trainable_rows(self, ids, rows, valid):
        """Rows whose gradient goes to the table's fused optimizer."""
        table, l2 = self.table, self.l2

        @tf.custom_gradient
        def attach(anchor):
            def backward(upstream):
                grads = tf.cast(upstream, tf.float32)
                if l2:
                    grads = grads + 2.0 * l2 * rows
                if valid is None:
                    update = table.apply_gradients(ids, grads)
                else:
                    update = table.apply_gradients(tf.boolean_mask(ids, valid), tf.boolean_mask(grads, valid))
                # The anchor's gradient is 0, computed from the update's output
                # (rows updated, never negative). A data dependency, not a
                # control one: Grappler prunes a constant zero together with
                # its control inputs, which would silently skip the update.
                return tf.cast(tf.minimum(update, 0), anchor.dtype)
            return tf.identity(rows), backward

        return attach(self._anchor)

    def compute_output_shape(self, input_shape):
        return _pooled_shape(input_shape, self.output_dim, self.combiner)

    def compute_output_spec(self, inputs, timestamp=None, training=None):
        return _output_spec(inputs, self.output_dim, self.combiner)

    def get_config(self):
        table = self.table.get_config()
        config = super().get_config()
        config.update({
            "output_dim": self.output_dim, "combiner": self.combiner, "padding_id": self.padding_id, "l2": self.l2,
            "initializer": table["initializer"], "seed": table["seed"], "optimizer": table["optimizer"],
            "min_count": table["min_count"], "expire_after": table["expire_after"], "capacity": table["capacity"],
            "num_shards": table["num_shards"], "admission_counters": table["admission_counters"],
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("initializer"), dict) and "kind" in config["initializer"]:
            config["initializer"] = _initializers.deserialize(config["initializer"])
        if isinstance(config.get("optimizer"), dict):
            config["optimizer"] = _optimizers.get(config["optimizer"])
        return cls(**config)

    # `.keras` files: the table's full export is stored beside the anchor.
    def save_own_variables(self, store):
        store["0"] = self._anchor.numpy()
        for key, value in self.table.export().items():
            store[f"table_{key}"] = value.numpy()

    def load_own_variables(self, store):
        missing = [k for k in EXPORT_KEYS if f"table_{k}" not in store]
        if missing:
            raise ValueError(f"HashEmbedding '{self.name}': saved weights lack the table's {missing}")
        self._anchor.assign(np.asarray(store["0"]))
        self.table.restore_export({k: tf.constant(np.asarray(store[f"table_{k}"])) for k in EXPORT_KEYS})


@keras.saving.register_keras_serializable(package="monolith_tf")
class HashedEmbedding(keras.layers.Layer):
    """The baseline: a fixed `num_buckets` x `output_dim` table, id mod N.

    Distinct ids that share a bucket share a row (the collisions Monolith
    removes). Trained by the model's Keras optimizer like any weight. Accepts
    the same ids, combiners and padding as HashEmbedding.
    """

    def __init__(self, output_dim, num_buckets, *, combiner=None, padding_id=None,
                 embeddings_initializer="random_uniform", l2=0.0, **kwargs):
        super().__init__(**kwargs)
        _check_combiner(combiner, f"HashedEmbedding '{self.name}'")
        if not (isinstance(num_buckets, int) and num_buckets > 0):
            raise ValueError(f"HashedEmbedding '{self.name}': num_buckets must be an integer > 0, got {num_buckets!r}")
        self.output_dim = output_dim
        self.num_buckets = num_buckets
        self.combiner = combiner
        self.padding_id = padding_id
        self.l2 = float(l2)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings = self.add_weight(
            shape=(num_buckets, output_dim), initializer=self.embeddings_initializer, name="embeddings",
            regularizer=keras.regularizers.L2(self.l2) if self.l2 else None)
        self.built = True

    def build(self, input_shape):
        pass

    def call(self, inputs, timestamp=None, training=None):
        del timestamp, training  # a fixed table has no notion of time
        ids = _as_ids(inputs, f"HashedEmbedding '{self.name}'")
        flat = ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids
        rows = tf.gather(self.embeddings, tf.math.floormod(flat, self.num_buckets))
        rows = ids.with_flat_values(rows) if isinstance(ids, tf.RaggedTensor) else rows
        return _pool(rows, ids, self.combiner, self.padding_id)

    def compute_output_shape(self, input_shape):
        return _pooled_shape(input_shape, self.output_dim, self.combiner)

    def compute_output_spec(self, inputs, timestamp=None, training=None):
        return _output_spec(inputs, self.output_dim, self.combiner)

    def get_config(self):
        config = super().get_config()
        config.update({"output_dim": self.output_dim, "num_buckets": self.num_buckets, "combiner": self.combiner,
                       "padding_id": self.padding_id, "l2": self.l2,
                       "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)})
        return config


def embedding_layers(model):
    """Every HashEmbedding inside `model`, in a stable (tracking) order."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, HashEmbedding)]


def dense_weights(model):
    """The model's dense weights as (name, variable) pairs, in a stable order.

    These are all weights except the HashEmbeddings' zero anchors. Exports list
    them in this order and dense deltas are matched to them by these names.
    """
    anchors = {id(layer._anchor) for layer in embedding_layers(model)}
    return [(v.path if hasattr(v, "path") else v.name, v) for v in model.weights if id(v) not in anchors]

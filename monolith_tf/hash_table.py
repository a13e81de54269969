"""`HashTable`: a collisionless embedding table as a TensorFlow resource.

The Python face of ops/core/embedding_table.h. It owns no data: rows live in
the C++ resource, and this class turns user arguments into op calls, checks
them with messages that name the table, and plugs the table into
tf.train.Checkpoint and SavedModel (`_serialize_to_tensors` /
`_restore_from_tensors`). It knows nothing about Keras layers or serving.
"""

import itertools
import json
import threading

import tensorflow as tf

from monolith_tf import _ops
from monolith_tf import initializers as _initializers
from monolith_tf import optimizers as _optimizers

__all__ = ["HashTable"]

# Names of the tensors an export holds, in the order the import op takes them.
EXPORT_KEYS = ("keys", "values", "slots", "last_seen", "versions", "admission_sketch", "meta")
# Checkpoints also hold the table's config (JSON) under this name.
CONFIG_KEY = "config"

_INT64_MAX = 2**63 - 1
# TensorFlow's marker for "anonymous resource" (ResourceHandle::ANONYMOUS_NAME
# in resource_handle.h): the create op then returns a handle that owns its
# table, freed with the last handle. Used when creating tables eagerly.
_ANONYMOUS = "cd2c89b7-88b7-44c8-ad83-06c2a9158347"
_uid_lock = threading.Lock()  # guards _uids
_uids = itertools.count()


def _unique_suffix():
    with _uid_lock:
        return next(_uids)


def _check_int(table, arg, value, low, high=_INT64_MAX, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"an integer in [{low}, {high}]" if high != _INT64_MAX else f"an integer >= {low}"
        suffix = " or None" if allow_none else ""
        raise ValueError(f"HashTable '{table}': {arg} must be {bound}{suffix}, got {value!r}")
    return value


class HashTable(tf.saved_model.experimental.TrackableResource):
    """One embedding row per distinct int64 id, created on demand.

    Args:
      dim: embedding width.
      name: a name used in errors, checkpoints and exported graphs.
      initializer: "zeros", "random_uniform", "random_normal",
        "truncated_normal" (Keras' default ranges) or a Keras initializer
        instance of those kinds. A row's initial value depends only on
        (seed, id), so trainers, restarts and replicas agree.
      seed: seed of the initializer.
      optimizer: a `monolith_tf.optimizers` instance (default Adagrad(0.05)).
      min_count: an id gets a row on its `min_count`-th occurrence in training.
      expire_after: seconds of event time after which an idle row may be
        evicted by `evict()`; None means never.
      capacity: most rows the table holds; None means unbounded. When full,
        admitting an id evicts the least recently seen rows.
      num_shards: lock shards (a power of two); None picks one from capacity.
      admission_counters: size of the admission sketch in 16-bit counters
        (used when min_count > 1); see docs/admission.md.
    """

    def __init__(self, dim, *, name=None, initializer="random_uniform", seed=0, optimizer=None, min_count=1,
                 expire_after=None, capacity=None, num_shards=None, admission_counters=4 * 1024 * 1024):
        self._name = name or f"hash_table_{_unique_suffix()}"
        if not isinstance(self._name, str):
            raise ValueError(f"HashTable name must be a string, got {self._name!r}")
        who = self._name
        self._dim = _check_int(who, "dim", dim, 1, 1 << 20)
        self._seed = _check_int(who, "seed", seed, -(2**63))
        self._min_count = _check_int(who, "min_count", min_count, 1, 65535)
        self._expire_after = _check_int(who, "expire_after", expire_after, 1, allow_none=True)
        self._capacity = _check_int(who, "capacity", capacity, 1, allow_none=True)
        self._num_shards = _check_int(who, "num_shards", num_shards, 1, 1024, allow_none=True)
        self._admission_counters = _check_int(who, "admission_counters", admission_counters, 1)
        try:
            self._optimizer = _optimizers.get(optimizer)
            self._initializer = _initializers.resolve(initializer)
        except ValueError as e:
            raise ValueError(f"HashTable '{who}': {e}") from None
        # The name under which graphs (SavedModel creator functions, the graph
        # TF Serving runs) keep this table in a resource manager, so it
        # outlives a session run. Unique per table: SavedModel loading appends
        # a per-load suffix, so tables differ across tables and across loads.
        self._shared_name = f"{self._name}_{_unique_suffix()}"
        super().__init__()
        with tf.init_scope():
            _ = self.resource_handle  # create now, so bad settings fail here

    # -- resource plumbing ---------------------------------------------------

    def _create_resource(self):
        kind, a, b = self._initializer
        attrs = self._optimizer.op_attrs()
        return _ops.ops().monolith_hash_table_create(
            shared_name=_ANONYMOUS if tf.executing_eagerly() else self._shared_name,
            table_name=self._name, dim=self._dim, initializer=kind, initializer_a=a, initializer_b=b,
            seed=self._seed, min_count=self._min_count,
            expire_after=-1 if self._expire_after is None else self._expire_after,
            capacity=-1 if self._capacity is None else self._capacity,
            num_shards=self._num_shards or 0, admission_counters=self._admission_counters, **attrs)

    def _destroy_resource(self):
        # Frees a named table (a loaded SavedModel's) when its object goes away;
        # anonymous eager tables are freed by their handle already.
        tf.raw_ops.DestroyResourceOp(resource=self.resource_handle, ignore_lookup_error=True)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel":
            children.update(self._saved_functions())
        return children

    def _saved_functions(self):
        """Functions saved with the table, so a loaded SavedModel's table keeps
        an API (`loaded.table.export()`, `.apply_delta(...)`) without this class."""
        if getattr(self, "_saved_fns", None) is None:
            dim = self._dim
            spec_ids = tf.TensorSpec(None, tf.int64)
            config = json.dumps(self.get_config(), sort_keys=True)
            self._saved_fns = {
                "lookup": tf.function(lambda ids: self.lookup(ids), input_signature=[spec_ids]),
                "size": tf.function(self.size, input_signature=[]),
                "stats": tf.function(self.stats, input_signature=[]),
                "export": tf.function(self.export, input_signature=[]),
                "export_delta": tf.function(self.export_delta, input_signature=[tf.TensorSpec([], tf.int64)]),
                "apply_delta": tf.function(
                    self._apply_delta_then_size, input_signature=[tf.TensorSpec([None], tf.int64),
                                                       tf.TensorSpec([None, dim], tf.float32),
                                                       tf.TensorSpec([None], tf.int64)]),
                "get_config_json": tf.function(lambda: tf.constant(config), input_signature=[]),
            }
        return self._saved_fns

    def _apply_delta_then_size(self, keys, values, deleted_keys):
        # A saved function must return tensors: the size, once the delta is in.
        with tf.control_dependencies([self.apply_delta(keys, values, deleted_keys)]):
            return tf.identity(self.size())

    def _serialize_to_tensors(self):
        tensors = self.export()
        # The config rides along so tools that read checkpoints without the
        # model (monolith-delta-export) know each table's name and dim.
        tensors[CONFIG_KEY] = tf.constant(json.dumps(self.get_config(), sort_keys=True))
        return tensors

    def _restore_from_tensors(self, restored_tensors):
        return self.restore_export({k: restored_tensors[k] for k in EXPORT_KEYS})

    # -- properties ------------------------------------------------------------

    @property
    def name(self):
        return self._name

    @property
    def dim(self):
        return self._dim

    @property
    def optimizer(self):
        return self._optimizer

    @property
    def min_count(self):
        return self._min_count

    @property
    def expire_after(self):
        return self._expire_after

    @property
    def capacity(self):
        return self._capacity

    @property
    def slot_width(self):
        return sum(width for _, width in self._optimizer.slot_layout(self._dim))

    def get_config(self):
        """Constructor arguments as plain JSON-friendly values."""
        return {
            "dim": self._dim, "name": self._name, "seed": self._seed,
            "initializer": _initializers.serialize(_initializers.deserialize(
                dict(zip(("kind", "a", "b"), self._initializer)))),
            "optimizer": _optimizers.serialize(self._optimizer), "min_count": self._min_count,
            "expire_after": self._expire_after, "capacity": self._capacity, "num_shards": self._num_shards,
            "admission_counters": self._admission_counters,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["initializer"] = _initializers.deserialize(config["initializer"])
        config["optimizer"] = _optimizers.get(config["optimizer"])
        dim = config.pop("dim")
        return cls(dim, **config)

    def __repr__(self):
        return (f"HashTable(name={self._name!r}, dim={self._dim}, optimizer={self._optimizer!r}, "
                f"min_count={self._min_count}, expire_after={self._expire_after}, capacity={self._capacity})")

    # -- argument checks -------------------------------------------------------

    def _ids(self, ids):
        ids = ids if isinstance(ids, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(ids)
        if ids.dtype not in (tf.int32, tf.int64):
            raise TypeError(f"HashTable '{self._name}': ids must be int32 or int64, got {ids.dtype.name} "
                            "(hash strings first, e.g. with monolith_tf.layers' string support or tf.strings.to_hash_bucket_fast)")
        return ids

    def _timestamps(self, timestamp):
        """An int64 tensor: empty for "no timestamp", a scalar, or one per id."""
        if timestamp is None:
            return tf.zeros([0], tf.int64)
        ts = timestamp if isinstance(timestamp, tf.Tensor) else tf.convert_to_tensor(timestamp)
        if ts.dtype.is_floating:
            # NaN, inf or beyond int64 would cast to INT64_MIN: a row "last seen"
            # in the distant past, evicted by the next evict().
            ts = tf.cast(ts, tf.float64)
            ok = tf.reduce_all(tf.math.is_finite(ts) & (tf.abs(ts) < 2.0**63))
            message = f"HashTable '{self._name}': timestamp must be finite seconds within the int64 range"
            with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
                ts = tf.cast(tf.math.floor(ts), tf.int64)
        elif ts.dtype.is_integer:
            ts = tf.cast(ts, tf.int64)
        else:
            raise TypeError(f"HashTable '{self._name}': timestamp must be integer seconds, got {ts.dtype.name}")
        return ts

    # -- table operations -------------------------------------------------------

    def lookup(self, ids, *, train=False, timestamp=None):
        """Rows for `ids` (any shape) as float32 of shape ids.shape + [dim].

        With train=False the table never changes, and ids without a row give
        zeros. With train=True each occurrence counts toward admission, admitted
        ids get rows from the initializer, and last-seen is stamped with
        `timestamp` (int64 seconds: a scalar or one per id; default the wall
        clock at run time).
        """
        ids = self._ids(ids)
        if not train:
            return _ops.ops().monolith_hash_table_find(self.resource_handle, ids, dim=self._dim)
        return _ops.ops().monolith_hash_table_lookup_for_training(
            self.resource_handle, ids, self._timestamps(timestamp), dim=self._dim)

    def apply_gradients(self, ids, grads, *, timestamp=None):
        """One fused optimizer step per distinct existing id (repeats summed).

        Returns the number of rows updated. Non-finite gradients are rejected
        with an error naming the table, and then nothing is updated.
        """
        ids = self._ids(ids)
        grads = tf.convert_to_tensor(grads)
        if grads.dtype != tf.float32:
            if not grads.dtype.is_floating:
                raise TypeError(f"HashTable '{self._name}': grads must be float, got {grads.dtype.name}")
            grads = tf.cast(grads, tf.float32)
        return _ops.ops().monolith_hash_table_apply_gradients(
            self.resource_handle, ids, grads, self._timestamps(timestamp))

    def size(self):
        """Number of rows (admitted ids)."""
        return self.stats()["size"]

    def stats(self):
        """size, newest_event_time, version (change counter), memory_bytes, and
        generation (a random id redrawn on restore: versions compare only
        within one generation)."""
        size, newest, version, memory, generation = _ops.ops().monolith_hash_table_stats(self.resource_handle)
        return {"size": size, "newest_event_time": newest, "version": version, "memory_bytes": memory,
                "generation": generation}

    def evict(self, now=None):
        """Removes rows last seen before `now - expire_after`; returns how many.

        `now` defaults to the newest event time the table has seen, so
        replaying old logs does not wipe the table. A no-op without expire_after.
        """
        now = tf.zeros([0], tf.int64) if now is None else tf.reshape(self._timestamps(now), [1])
        return _ops.ops().monolith_hash_table_evict_expired(self.resource_handle, now)

    def export(self):
        """A consistent snapshot: a dict of tensors named by EXPORT_KEYS.

        "slots" holds the optimizer state per row (see `slot_layout`),
        "last_seen" the event times, "versions" the change counter of each row,
        "admission_sketch" the frequency counts of ids without rows, "meta" the
        table-wide counters.
        """
        out = _ops.ops().monolith_hash_table_export(self.resource_handle, dim=self._dim, slot_width=self.slot_width)
        return dict(zip(EXPORT_KEYS, out))

    def slot_layout(self):
        """[(name, first column, width)] of the "slots" matrix in an export."""
        layout, col = [], 0
        for name, width in self._optimizer.slot_layout(self._dim):
            layout.append((name, col, width))
            col += width
        return layout

    def restore_export(self, exported):
        """Replaces the table's contents with an `export()`; exact round trip.

        Validates first: on a mismatched or corrupt export the table is unchanged.
        """
        missing = [k for k in EXPORT_KEYS if k not in exported]
        if missing:
            raise ValueError(f"HashTable '{self._name}': export is missing {missing}")
        return _ops.ops().monolith_hash_table_import(self.resource_handle, *(exported[k] for k in EXPORT_KEYS))

    def export_delta(self, since_version):
        """Rows changed after `since_version` and keys deleted after it.

        Returns keys, values, deleted_keys, version (pass it as the next
        since_version) and complete (False: deletions were dropped from the
        bounded log, so send a full snapshot instead).
        """
        keys, values, deleted, version, complete = _ops.ops().monolith_hash_table_export_delta(
            self.resource_handle, tf.cast(since_version, tf.int64), dim=self._dim)
        return {"keys": keys, "values": values, "deleted_keys": deleted, "version": version, "complete": complete}

    def apply_delta(self, keys, values, deleted_keys):
        """Replica side: removes `deleted_keys`, then writes `values` for `keys`."""
        return _ops.ops().monolith_hash_table_apply_delta(
            self.resource_handle, tf.cast(keys, tf.int64), tf.cast(values, tf.float32),
            tf.cast(deleted_keys, tf.int64))

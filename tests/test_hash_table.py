"""HashTable behaviour: collisionless storage, admission, expiry, capacity,
duplicate ids, initializers, tf.function use and bad input."""

import numpy as np
import pytest
import tensorflow as tf

import monolith_tf as mtf
from monolith_tf import optimizers

INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


def sgd_table(dim=2, **kwargs):
    kwargs.setdefault("initializer", "zeros")
    return mtf.HashTable(dim, optimizer=optimizers.SGD(1.0), **kwargs)


def rows_by_key(table):
    e = table.export()
    return {int(k): v for k, v in zip(e["keys"].numpy(), e["values"].numpy())}


def test_million_keys_are_collisionless():
    rng = np.random.default_rng(1)
    keys = rng.integers(INT64_MIN, INT64_MAX, size=1_000_000, dtype=np.int64, endpoint=True)
    keys = np.unique(np.concatenate([keys, np.array([INT64_MIN, INT64_MAX, 0, -1], np.int64)]))
    rng.shuffle(keys)
    table = sgd_table(dim=2)
    table.lookup(keys, train=True, timestamp=1)
    assert int(table.size()) == len(keys)
    grads = rng.standard_normal((len(keys), 2)).astype(np.float32)
    assert int(table.apply_gradients(keys, grads)) == len(keys)
    e = table.export()
    order = np.argsort(e["keys"].numpy())
    expected_order = np.argsort(keys)
    np.testing.assert_array_equal(e["keys"].numpy()[order], keys[expected_order])
    # SGD with lr 1 from zeros: every row equals minus exactly its own gradient.
    np.testing.assert_array_equal(e["values"].numpy()[order], -grads[expected_order])
    looked_up = table.lookup(keys[:1000]).numpy()
    np.testing.assert_array_equal(looked_up, -grads[:1000])


@pytest.mark.parametrize("min_count", [1, 3, 50])
def test_admission_on_the_min_count_th_occurrence(min_count):
    table = sgd_table(min_count=min_count)
    for occurrence in range(1, min_count):
        out = table.lookup([7], train=True, timestamp=occurrence).numpy()
        np.testing.assert_array_equal(out, np.zeros([1, 2]))
        assert table.apply_gradients([7], [[1.0, 1.0]]).numpy() == 0  # dropped: no row yet
        assert int(table.size()) == 0
    table.lookup([7], train=True, timestamp=min_count)
    assert int(table.size()) == 1
    # Serving lookups never count toward admission.
    for _ in range(min_count + 1):
        table.lookup([8])
    assert int(table.size()) == 1


def test_duplicate_ids_in_one_batch_are_counted_and_summed():
    table = sgd_table(min_count=3)
    table.lookup([5, 5, 5, 6], train=True, timestamp=1)
    assert set(rows_by_key(table)) == {5}
    updated = table.apply_gradients([5, 6, 5], [[1.0, 2.0], [50.0, 50.0], [10.0, 20.0]])
    assert int(updated) == 1
    np.testing.assert_array_equal(table.lookup([5, 6]).numpy(), [[-11.0, -22.0], [0.0, 0.0]])


def test_expiry_runs_on_event_time():
    table = sgd_table(expire_after=100)
    table.lookup([1], train=True, timestamp=1_000)
    table.lookup([2], train=True, timestamp=1_050)
    table.lookup([3, 4], train=True, timestamp=[1_200, 1_150])
    assert int(table.stats()["newest_event_time"]) == 1_200
    # Default `now` is the newest event time seen, not the wall clock.
    assert int(table.evict()) == 2
    assert set(rows_by_key(table)) == {3, 4}
    # Replaying old logs neither moves last-seen back nor wipes the table.
    table.lookup([3, 4], train=True, timestamp=10)
    assert int(table.evict()) == 0
    assert int(table.evict(now=1_251)) == 1
    assert set(rows_by_key(table)) == {3}
    no_ttl = sgd_table()
    no_ttl.lookup([1], train=True, timestamp=0)
    assert int(no_ttl.evict(now=10**12)) == 0


def test_capacity_keeps_the_most_recently_seen_rows():
    table = sgd_table(capacity=1000)
    for start in range(0, 20_000, 500):
        keys = np.arange(start, start + 500)
        table.lookup(keys, train=True, timestamp=keys)
    size = int(table.size())
    assert 900 <= size <= 1000
    kept = np.array(sorted(rows_by_key(table)))
    assert kept.min() >= 20_000 - 1000  # all among the newest `capacity` ids
    # Re-seeing an old row makes it recent again, so it survives the next wave.
    table.lookup([kept[0]], train=True, timestamp=30_000)
    table.lookup(np.arange(50_000, 50_100), train=True, timestamp=29_000)
    assert kept[0] in rows_by_key(table)


def test_lookup_shapes_dtypes_and_zeros_for_unknown():
    table = mtf.HashTable(3, seed=5)
    ids = tf.constant([[1, 2], [3, 1]], tf.int32)
    train_out = table.lookup(ids, train=True, timestamp=0)
    assert train_out.shape == (2, 2, 3) and train_out.dtype == tf.float32
    np.testing.assert_array_equal(train_out[0, 0], train_out[1, 1])
    serve = table.lookup(tf.constant([[1], [99]], tf.int64)).numpy()
    np.testing.assert_array_equal(serve[0, 0], train_out[0, 0].numpy())
    np.testing.assert_array_equal(serve[1, 0], np.zeros(3))
    assert table.lookup(tf.zeros([0], tf.int64)).shape == (0, 3)
    assert table.lookup(tf.constant(4, tf.int64)).shape == (3,)


def test_initial_rows_depend_only_on_seed_and_key():
    a = mtf.HashTable(8, seed=3, initializer="random_normal")
    b = mtf.HashTable(8, seed=3, initializer="random_normal")
    c = mtf.HashTable(8, seed=4, initializer="random_normal")
    keys = np.arange(2000)
    va = a.lookup(keys, train=True).numpy()
    vb = b.lookup(keys[::-1], train=True).numpy()[::-1]
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, c.lookup(keys, train=True).numpy())
    assert abs(va.mean()) < 0.005 and abs(va.std() - 0.05) < 0.005


@pytest.mark.parametrize("spec,low,high", [
    ("random_uniform", -0.05, 0.05),
    ("truncated_normal", -0.1, 0.1),
    ("zeros", 0.0, 0.0),
])
def test_initializer_ranges(spec, low, high):
    values = mtf.HashTable(16, initializer=spec).lookup(np.arange(5000), train=True).numpy()
    assert values.min() >= low and values.max() <= high
    if spec != "zeros":
        assert values.max() - values.min() > 0.8 * (high - low)


def test_keras_initializer_instance():
    import keras
    table = mtf.HashTable(4, initializer=keras.initializers.RandomUniform(minval=1.0, maxval=2.0))
    values = table.lookup(np.arange(1000), train=True).numpy()
    assert values.min() >= 1.0 and values.max() < 2.0


def test_works_inside_tf_function():
    table = sgd_table(dim=2)

    @tf.function
    def step(ids, grads):
        rows = table.lookup(ids, train=True, timestamp=tf.constant(5, tf.int64))
        with tf.control_dependencies([rows]):
            updated = table.apply_gradients(ids, grads)
        return rows, updated

    step(tf.constant([1, 2], tf.int64), tf.ones([2, 2]))
    _, updated = step(tf.constant([2, 3], tf.int64), tf.ones([2, 2]))
    assert int(updated) == 2
    np.testing.assert_array_equal(table.lookup([1, 2, 3]).numpy(), [[-1, -1], [-2, -2], [-1, -1]])


def test_wall_clock_is_the_default_timestamp():
    import time
    table = sgd_table()
    before = int(time.time())
    table.lookup([1], train=True)
    assert before <= int(table.stats()["newest_event_time"]) <= int(time.time()) + 1


# -- bad input: a clear error naming the table, and nothing stored is lost ----

def filled_table():
    table = sgd_table(name="user_emb", dim=4)
    table.lookup([1, 2, 3], train=True, timestamp=1)
    table.apply_gradients([1, 2, 3], np.ones([3, 4], np.float32))
    return table


def assert_unchanged(table, before):
    after = table.export()
    for key in ("keys", "values", "slots", "last_seen"):
        np.testing.assert_array_equal(before[key].numpy(), after[key].numpy())


@pytest.mark.parametrize("bad_ids", [[1.5, 2.0], ["a", "b"]])
def test_non_integer_ids_are_rejected(bad_ids):
    table = filled_table()
    before = table.export()
    for call in (lambda: table.lookup(bad_ids), lambda: table.lookup(bad_ids, train=True),
                 lambda: table.apply_gradients(bad_ids, np.ones([2, 4], np.float32))):
        with pytest.raises(TypeError, match="HashTable 'user_emb': ids must be int32 or int64"):
            call()
    assert_unchanged(table, before)


def test_wrong_grad_shape_is_rejected():
    table = filled_table()
    before = table.export()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"HashTable 'user_emb': grads shape \[3,5\]"):
        table.apply_gradients([1, 2, 3], np.ones([3, 5], np.float32))
    assert_unchanged(table, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_rejected(bad):
    table = filled_table()
    before = table.export()
    grads = np.ones([3, 4], np.float32)
    grads[2, 1] = bad
    with pytest.raises(tf.errors.InvalidArgumentError, match="HashTable 'user_emb': non-finite gradient.*id 3"):
        table.apply_gradients([1, 2, 3], grads)
    assert_unchanged(table, before)


def test_bad_timestamps_are_rejected():
    table = filled_table()
    with pytest.raises(tf.errors.InvalidArgumentError, match="HashTable 'user_emb': timestamp shape"):
        table.lookup([1, 2, 3], train=True, timestamp=[1, 2])
    with pytest.raises(TypeError, match="timestamp must be integer seconds"):
        table.lookup([1], train=True, timestamp="yesterday")
    before = table.export()
    for bad in (float("nan"), float("inf"), 1e30, [5.0, float("nan"), 6.0]):
        ids = [1, 2, 10**9] if isinstance(bad, list) else [10**9]
        with pytest.raises(tf.errors.InvalidArgumentError, match="HashTable 'user_emb': timestamp must be finite"):
            table.lookup(ids, train=True, timestamp=bad)
        with pytest.raises(tf.errors.InvalidArgumentError, match="timestamp must be finite"):
            table.apply_gradients(ids, tf.zeros([len(ids), table.dim]), timestamp=bad)
    after = table.export()
    for name in before:
        np.testing.assert_array_equal(after[name].numpy(), before[name].numpy())
    # Inside a tf.function too, and a finite float timestamp still works.
    step = tf.function(lambda t: table.lookup([7], train=True, timestamp=t))
    with pytest.raises(tf.errors.InvalidArgumentError, match="timestamp must be finite"):
        step(tf.constant(float("nan")))
    step(tf.constant(12345.75))
    assert table.export()["last_seen"].numpy()[list(table.export()["keys"].numpy()).index(7)] == 12345


@pytest.mark.parametrize("kwargs,message", [
    ({"dim": 0}, "dim must be"),
    ({"dim": -3}, "dim must be"),
    ({"dim": 2.5}, "dim must be"),
    ({"dim": 4, "min_count": 0}, "min_count must be"),
    ({"dim": 4, "min_count": 70_000}, "min_count must be"),
    ({"dim": 4, "expire_after": 0}, "expire_after must be"),
    ({"dim": 4, "capacity": -5}, "capacity must be"),
    ({"dim": 4, "num_shards": 3}, "num_shards must be a power of two"),
    ({"dim": 4, "optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"dim": 4, "initializer": "ones"}, "unknown initializer 'ones'"),
])
def test_bad_settings_are_rejected(kwargs, message):
    dim = kwargs.pop("dim")
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=message):
        mtf.HashTable(dim, name="bad", **kwargs)


def test_bad_optimizer_hyperparameters():
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        optimizers.Adagrad(learning_rate=-1.0)
    with pytest.raises(ValueError, match="beta_1 must be in"):
        optimizers.Adam(beta_1=1.0)
    with pytest.raises(ValueError, match="Keras optimizers train dense weights"):
        import keras
        mtf.HashTable(4, optimizer=keras.optimizers.Adam())


def test_corrupt_export_is_rejected_and_table_kept():
    table = filled_table()
    before = table.export()
    bad = dict(before)
    bad["keys"] = tf.constant([1, 1, 2], tf.int64)  # duplicate key
    with pytest.raises(tf.errors.InvalidArgumentError, match="duplicate key 1"):
        table.restore_export(bad)
    bad = dict(before)
    bad["values"] = before["values"][:, :3]
    with pytest.raises(tf.errors.InvalidArgumentError, match="import values shape"):
        table.restore_export(bad)
    other = mtf.HashTable(4, name="other", optimizer=optimizers.Adam())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"HashTable .other.: import slots shape \[3,0\] != expected \[3,9\]"):
        other.restore_export(before)
    assert_unchanged(table, before)


def test_config_round_trip():
    table = mtf.HashTable(6, name="cfg", seed=9, optimizer=optimizers.Ftrl(0.1, l1_regularization_strength=0.01),
                          initializer="truncated_normal", min_count=2, expire_after=3600, capacity=10_000)
    clone = mtf.HashTable.from_config(table.get_config())
    assert clone.get_config() == table.get_config()
    keys = np.arange(100)
    for _ in range(2):
        a = table.lookup(keys, train=True, timestamp=0)
        b = clone.lookup(keys, train=True, timestamp=0)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_admission_sketch_false_admission_rate_is_low():
    """One-off ids must almost never get rows with min_count=2 (docs/admission.md)."""
    table = mtf.HashTable(4, min_count=2)
    ids = np.random.default_rng(0).permutation(np.arange(800_000, dtype=np.int64) * 7919 + 13)
    for start in range(0, len(ids), 65_536):
        table.lookup(ids[start:start + 65_536], train=True, timestamp=0)
    assert int(table.size()) / len(ids) < 0.01
    # ...while an id seen twice is still admitted after all that traffic.
    table.lookup([-42], train=True, timestamp=1)
    table.lookup([-42], train=True, timestamp=1)
    assert rows_by_key(table).keys() >= {-42}

"""HashEmbedding / HashedEmbedding under plain Keras 3: fit, evaluate,
predict, callbacks, saving, pooling, string ids and event time."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import monolith_tf as mtf
from monolith_tf import optimizers
from monolith_tf.layers import HashedEmbedding, HashEmbedding, fingerprint_ids


def two_tower(opt="adam", **table_kwargs):
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    user_emb = HashEmbedding(8, name="user_emb", **table_kwargs)
    item_emb = HashEmbedding(8, name="item_emb", **table_kwargs)
    x = keras.layers.Concatenate()([user_emb(user), item_emb(item)])
    out = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(x))
    model = keras.Model([user, item], out)
    model.compile(optimizer=opt, loss="mse")
    return model, user_emb, item_emb


def data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 300, n), rng.integers(0, 500, n)
    y = ((users % 7) * 0.3 + (items % 5) * 0.2).astype(np.float32)
    return {"user": users, "item": items}, y


def version(layer):
    return int(layer.table.stats()["version"])


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop", "adamw", "adagrad"])
def test_fit_updates_each_table_exactly_once_per_step(opt):
    model, user_emb, item_emb = two_tower(opt)
    x, y = data(1000)
    model.fit(x, y, batch_size=100, epochs=2, verbose=0)
    # Each step is one training lookup plus one fused update: two versions.
    assert version(user_emb) == version(item_emb) == 2 * 10 * 2
    assert float(user_emb._anchor.numpy()) == 0.0
    assert int(user_emb.table.size()) == len(np.unique(x["user"]))


def test_fit_applies_the_true_gradient_to_the_table():
    ids = keras.Input((), dtype="int64")
    emb = HashEmbedding(3, optimizer=optimizers.SGD(0.5), initializer="random_normal", seed=2)
    head = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", trainable=False)
    model = keras.Model(ids, head(emb(ids)))
    model.compile(optimizer="sgd", loss="mse")
    batch = np.array([4, 9, 4, 7])
    y = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    before = emb.table.lookup(batch, train=True, timestamp=0).numpy()
    model.fit(batch, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    # d mse / d row_i = 2 (sum(row_i) - y_i) / B per element; repeats summed.
    per_example = 2.0 * (before.sum(axis=1) - y) / len(y)
    expected = {}
    for k, g in zip(batch, per_example):
        expected[k] = expected.get(k, 0.0) + g
    for k in expected:
        row_before = before[list(batch).index(k)]
        np.testing.assert_allclose(emb.table.lookup([k]).numpy()[0], row_before - 0.5 * expected[k], rtol=1e-5)


def test_evaluate_and_predict_never_change_tables():
    model, user_emb, item_emb = two_tower()
    x, y = data(500)
    model.fit(x, y, batch_size=100, epochs=1, verbose=0)
    before = (version(user_emb), int(user_emb.table.size()), version(item_emb))
    unseen = {"user": np.arange(10_000, 10_100), "item": np.arange(10_000, 10_100)}
    model.evaluate(x, y, verbose=0)
    model.predict(unseen, verbose=0)
    model(unseen, training=False)
    assert (version(user_emb), int(user_emb.table.size()), version(item_emb)) == before


def test_tf_data_steps_per_execution_validation_and_callbacks(tmp_path):
    x, y = data(1200)
    model, user_emb, _ = two_tower()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=3)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(100)
    val = tf.data.Dataset.from_tensor_slices(data(300, seed=1)).batch(100)
    history = model.fit(train, validation_data=val, epochs=4, verbose=0, callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=10),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
    ])
    assert len(history.history["val_loss"]) == 4
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert version(user_emb) == 2 * 12 * 4
    best = keras.models.load_model(str(tmp_path / "best.keras"))
    assert int(best.get_layer("user_emb").table.size()) > 0
    assert any((tmp_path / "tb").rglob("*tfevents*"))


def test_subclassed_model_trains():
    class Recommender(keras.Model):
        def __init__(self):
            super().__init__()
            self.users = HashEmbedding(4, name="u")
            self.items = HashEmbedding(4, name="i")

        def call(self, inputs, training=None):
            return tf.reduce_sum(self.users(inputs["user"], training=training)
                                 * self.items(inputs["item"], training=training), axis=-1, keepdims=True)

    model = Recommender()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(800)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=50, epochs=5, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first
    assert version(model.users) == 2 * 16 * 5


def test_keras_file_round_trip(tmp_path):
    model, user_emb, _ = two_tower(optimizer=optimizers.Adam(0.01), min_count=2)
    x, y = data(1000)
    model.fit(x, y, batch_size=100, epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    a, b = user_emb.table.export(), loaded.get_layer("user_emb").table.export()
    order_a, order_b = np.argsort(a["keys"].numpy()), np.argsort(b["keys"].numpy())
    for k in ("keys", "values", "slots", "last_seen"):
        np.testing.assert_array_equal(a[k].numpy()[order_a], b[k].numpy()[order_b])
    np.testing.assert_array_equal(a["admission_sketch"].numpy(), b["admission_sketch"].numpy())
    assert loaded.get_layer("user_emb").table.get_config() == user_emb.table.get_config()
    # Training continues from the loaded state.
    loaded.fit(x, y, batch_size=100, epochs=1, verbose=0)


def test_tf_train_checkpoint_round_trips_tables(tmp_path):
    model, user_emb, _ = two_tower()
    x, y = data(600)
    model.fit(x, y, batch_size=100, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    expected = model.predict(x, verbose=0)
    model.fit(x, y, batch_size=100, epochs=2, verbose=0)
    assert not np.array_equal(model.predict(x, verbose=0), expected)
    tf.train.Checkpoint(model=model).restore(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


def test_config_round_trip():
    layer = HashEmbedding(6, combiner="mean", padding_id=-1, l2=1e-4, optimizer=optimizers.Ftrl(0.1), min_count=3,
                          expire_after=86400, capacity=1000, seed=5, name="genres")
    clone = HashEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.table.optimizer == optimizers.Ftrl(0.1)


def test_pooling_with_padding_and_ragged():
    layer = HashEmbedding(2, combiner=None, initializer="random_uniform", seed=1, padding_id=-1)
    rows = layer.table.lookup([1, 2, 3], train=True, timestamp=0).numpy()
    dense = tf.constant([[1, 2, -1], [3, -1, -1]], tf.int64)
    ragged = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)
    expected = {
        "sum": [rows[0] + rows[1], rows[2]],
        "mean": [(rows[0] + rows[1]) / 2, rows[2]],
        "sqrtn": [(rows[0] + rows[1]) / np.sqrt(2), rows[2]],
    }
    for combiner, want in expected.items():
        layer.combiner = combiner
        np.testing.assert_allclose(layer(dense).numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(layer(ragged).numpy(), want, rtol=1e-6)
    layer.combiner = None
    out = layer(dense).numpy()
    assert out.shape == (2, 3, 2)
    np.testing.assert_array_equal(out[0, 2], [0, 0])


def test_padding_gets_no_row_and_no_gradient():
    ids = keras.Input((3,), dtype="int64")
    emb = HashEmbedding(4, combiner="mean", padding_id=0)
    model = keras.Model(ids, keras.layers.Dense(1)(emb(ids)))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.array([[1, 2, 0], [3, 0, 0]] * 8), np.ones(16), batch_size=4, verbose=0)
    assert sorted(emb.table.export()["keys"].numpy().tolist()) == [1, 2, 3]


def test_string_ids_use_64_bit_fingerprints():
    layer = HashEmbedding(4, initializer="zeros")
    out = layer(tf.constant([["a", "b"], ["c", "a"]]), training=True)
    assert out.shape == (2, 2, 4)
    assert int(layer.table.size()) == 3
    fp = fingerprint_ids(tf.constant(["a", "b", "a"])).numpy()
    assert fp.dtype == np.int64 and fp[0] == fp[2] != fp[1]


def test_timestamps_reach_the_table():
    ids = keras.Input((2,), dtype="int64", name="ids")
    ts = keras.Input((), dtype="int64", name="ts")
    emb = HashEmbedding(4, combiner="sum", expire_after=100)
    model = keras.Model([ids, ts], keras.layers.Dense(1)(emb(ids, timestamp=ts)))
    model.compile(optimizer="adam", loss="mse")
    model.fit({"ids": np.array([[1, 2], [3, 4]]), "ts": np.array([1000, 1200])}, np.ones(2), verbose=0)
    assert int(emb.table.stats()["newest_event_time"]) == 1200
    assert int(emb.table.evict()) == 2  # ids 1 and 2 were last seen at 1000


def test_bad_ids_and_settings():
    with pytest.raises(TypeError, match="ids must be int32, int64 or string"):
        HashEmbedding(4, name="e")(tf.constant([1.5]))
    with pytest.raises(ValueError, match="combiner must be one of"):
        HashEmbedding(4, combiner="max")
    with pytest.raises(ValueError, match="dim must be"):
        HashEmbedding(0)


def test_hashed_baseline_collides_and_trains():
    layer = HashedEmbedding(4, num_buckets=10)
    out = layer(tf.constant([3, 13, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(out[0], out[1])  # 3 and 13 share bucket 3
    assert not np.array_equal(out[0], out[2])
    ids = keras.Input((), dtype="int64")
    model = keras.Model(ids, keras.layers.Dense(1)(HashedEmbedding(4, num_buckets=50)(ids)))
    model.compile(optimizer="adam", loss="mse")
    x = np.arange(200)
    y = (x % 3).astype(np.float32)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=20, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first
    clone = HashedEmbedding.from_config(HashedEmbedding(4, num_buckets=7).get_config())
    assert clone.num_buckets == 7

"""SavedModel export: numbered versions, native and portable modes, fresh-process
loading, stock-op check, delta endpoints, and no effect on the trainer."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from monolith_tf import export
from monolith_tf.layers import HashEmbedding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_model():
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    x = keras.layers.Concatenate()([HashEmbedding(4, name="user_emb")(user), HashEmbedding(4, name="item_emb")(item)])
    model = keras.Model([user, item], keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(x)),
                        name="recommender")
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit({"user": rng.integers(0, 200, 2000), "item": rng.integers(0, 300, 2000)},
              rng.random(2000).astype(np.float32), batch_size=100, epochs=2, verbose=0)
    return model


QUERY = {"user": np.array([1, 2, 3, 10**12], np.int64), "item": np.array([5, 6, 7, 8], np.int64)}


def run_fresh(script, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_state(model):
    return {layer.name: (int(layer.table.stats()["version"]), int(layer.table.size()))
            for layer in model.layers if isinstance(layer, HashEmbedding)}


def test_versions_metadata_and_trainer_untouched(tmp_path):
    model = trained_model()
    before = table_state(model)
    first = export.save(model, str(tmp_path))
    second = export.save(model, str(tmp_path), portable=True)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert table_state(model) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    meta = json.load(open(os.path.join(second, export.METADATA_FILE)))
    assert meta["mode"] == "portable" and meta["model_name"] == "recommender" and meta["version"] == 2
    assert {t["name"]: t["version"] for t in meta["tables"]} == {k: v[0] for k, v in before.items()}
    assert meta["inputs"] == {"user": {"dtype": "int64", "shape": [None]}, "item": {"dtype": "int64", "shape": [None]}}
    assert [d["name"] for d in meta["dense"]] == [v.path for v in model.weights if "table_anchor" not in v.path]
    with pytest.raises(FileExistsError):
        export.save(model, str(tmp_path), version=1)


def test_native_export_serves_identically_in_a_fresh_process(tmp_path):
    model = trained_model()
    path = export.save(model, str(tmp_path))
    np.save(tmp_path / "expected.npy", model.predict(QUERY, verbose=0))
    run_fresh(f"""
        import numpy as np, tensorflow as tf
        import monolith_tf  # registers the ops
        loaded = tf.saved_model.load({path!r})
        out = loaded.signatures["serving_default"](user=tf.constant([1, 2, 3, 10**12], tf.int64),
                                                    item=tf.constant([5, 6, 7, 8], tf.int64))
        np.testing.assert_allclose(out["predictions"].numpy(), np.load("expected.npy"), rtol=1e-5, atol=1e-6)
    """, tmp_path)


def test_portable_export_uses_only_stock_ops_and_loads_without_monolith(tmp_path):
    model = trained_model()
    path = export.save(model, str(tmp_path), portable=True)
    np.save(tmp_path / "expected.npy", model.predict(QUERY, verbose=0))
    run_fresh(f"""
        import sys
        import numpy as np, tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow.python.framework import op_def_registry
        assert "monolith_tf" not in sys.modules
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(open({path!r} + "/saved_model.pb", "rb").read())
        graph = proto.meta_graphs[0].graph_def
        functions = {{f.signature.name for f in graph.library.function}}
        ops = {{n.op for n in graph.node}} | {{n.op for f in graph.library.function for n in f.node_def}}
        unknown = sorted(op for op in ops if op not in functions and op_def_registry.get(op) is None)
        assert not unknown, unknown
        assert not any(op.startswith("Monolith") for op in ops)
        loaded = tf.saved_model.load({path!r})
        out = loaded.signatures["serving_default"](user=tf.constant([1, 2, 3, 10**12], tf.int64),
                                                    item=tf.constant([5, 6, 7, 8], tf.int64))
        np.testing.assert_allclose(out["predictions"].numpy(), np.load("expected.npy"), rtol=1e-5, atol=1e-6)
        # Portable tables take deltas through the same endpoint.
        table = loaded.monolith_tables["user_emb"]
        n = int(table.size())
        assert int(table.apply_delta(tf.constant([10**12], tf.int64), tf.ones([1, 4]), tf.constant([1], tf.int64))) == n
        assert "monolith_tf" not in sys.modules
    """, tmp_path)


@pytest.mark.parametrize("portable", [False, True])
def test_delta_and_dense_endpoints(tmp_path, portable):
    model = trained_model()
    path = export.save(model, str(tmp_path), portable=portable)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    # Train more, then move the changed rows and the dense weights across.
    since = {layer.name: int(layer.table.stats()["version"]) for layer in model.layers
             if isinstance(layer, HashEmbedding)}
    model.fit({"user": np.arange(50), "item": np.arange(50)}, np.ones(50), batch_size=10, verbose=0)
    for layer in model.layers:
        if isinstance(layer, HashEmbedding):
            d = layer.table.export_delta(since[layer.name])
            loaded.monolith_tables[layer.name].apply_delta(d["keys"], d["values"], d["deleted_keys"])
    meta = json.load(open(os.path.join(path, export.METADATA_FILE)))
    weights = {v.path: v for v in model.weights}
    loaded.assign_dense(*[weights[d["name"]].numpy() for d in meta["dense"]])
    got = serve(user=tf.constant(QUERY["user"]), item=tf.constant(QUERY["item"]))["predictions"].numpy()
    np.testing.assert_allclose(got, model.predict(QUERY, verbose=0), rtol=1e-5, atol=1e-6)


def test_monolith_estimator_export(tmp_path):
    from monolith_tf import Monolith
    rng = np.random.default_rng(0)
    users, items = rng.integers(1, 50, 2000), rng.integers(1, 80, 2000)
    estimator = Monolith(name="tutorial", embedding_dim=8, epochs=1, verbose=False)
    with pytest.raises(ValueError, match="call fit"):
        estimator.export(str(tmp_path))
    estimator.fit(user_ids=users, item_ids=items, ratings=rng.integers(1, 6, 2000).astype(np.float32))
    path = estimator.export(str(tmp_path), portable=True)
    meta = json.load(open(os.path.join(path, export.METADATA_FILE)))
    assert meta["model_name"] == "tutorial" and meta["mode"] == "portable"
    serve = tf.saved_model.load(path).signatures["serving_default"]
    query = {"user": np.array([1, 2], np.int64), "item": np.array([3, 4], np.int64),
             "timestamp": np.array([0, 0], np.int64)}
    got = serve(**{k: tf.constant(v) for k, v in query.items() if k in meta["inputs"]})["predictions"].numpy()
    want = estimator.keras_model.predict({k: v for k, v in query.items() if k in meta["inputs"]}, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""Checkpoint and SavedModel round trips, bit-exact, into fresh processes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import monolith_tf as mtf
from monolith_tf import optimizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("keys", "values", "slots", "last_seen", "versions", "admission_sketch", "meta")


def trained_table(name="emb"):
    table = mtf.HashTable(8, name=name, optimizer=optimizers.Adam(0.01), min_count=2, expire_after=500,
                          admission_counters=1 << 16, seed=4)
    rng = np.random.default_rng(3)
    for step in range(5):
        ids = rng.integers(0, 3000, size=2048)
        table.lookup(ids, train=True, timestamp=100 * step + rng.integers(0, 50, size=2048))
        table.apply_gradients(ids, rng.standard_normal((2048, 8)).astype(np.float32))
    return table


def sorted_export(table):
    """Export as numpy, rows in key order (row order inside a shard is not state)."""
    e = {k: v.numpy() for k, v in table.export().items()}
    order = np.argsort(e["keys"])
    for k in ("keys", "values", "slots", "last_seen", "versions"):
        e[k] = e[k][order]
    return e


def save_npz(path, export):
    np.savez(path, **export)


def assert_exports_equal(a, b):
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def run_fresh(script, tmp_path):
    """Runs `script` in a new interpreter that has imported nothing yet."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_checkpoint_round_trip_in_process(tmp_path):
    table = trained_table()
    path = tf.train.Checkpoint(table=table).save(str(tmp_path / "ckpt"))
    expected = sorted_export(table)
    table.lookup(np.arange(10_000, 10_100), train=True, timestamp=10_000)  # diverge, then restore
    tf.train.Checkpoint(table=table).restore(path).assert_consumed()
    assert_exports_equal(sorted_export(table), expected)


def test_checkpoint_round_trip_in_fresh_process(tmp_path):
    table = trained_table()
    path = tf.train.Checkpoint(table=table).save(str(tmp_path / "ckpt"))
    save_npz(tmp_path / "expected.npz", sorted_export(table))
    run_fresh(f"""
        import numpy as np, tensorflow as tf
        import monolith_tf as mtf
        from monolith_tf import optimizers
        table = mtf.HashTable(8, name="emb", optimizer=optimizers.Adam(0.01), min_count=2, expire_after=500,
                              admission_counters=1 << 16, seed=4)
        tf.train.Checkpoint(table=table).restore({path!r}).assert_consumed()
        e = {{k: v.numpy() for k, v in table.export().items()}}
        order = np.argsort(e["keys"])
        for k in ("keys", "values", "slots", "last_seen", "versions"):
            e[k] = e[k][order]
        np.savez("restored.npz", **e)
    """, tmp_path)
    restored = np.load(tmp_path / "restored.npz", allow_pickle=False)
    expected = np.load(tmp_path / "expected.npz", allow_pickle=False)
    assert_exports_equal(restored, expected)


class Scorer(tf.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def score(self, ids):
        return tf.reduce_sum(self.table.lookup(ids), axis=-1)


def test_saved_model_round_trip_in_fresh_process(tmp_path):
    table = trained_table()
    module = Scorer(table)
    export_dir = str(tmp_path / "saved")
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.score},
                        options=tf.saved_model.SaveOptions(namespace_whitelist=[mtf.SAVE_NAMESPACE]))
    ids = np.arange(-5, 3100, dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "scores.npy", module.score(ids).numpy())
    save_npz(tmp_path / "expected.npz", sorted_export(table))
    # Saving must not change the trainer's table.
    assert_exports_equal(sorted_export(table), np.load(tmp_path / "expected.npz"))
    run_fresh(f"""
        import numpy as np, tensorflow as tf
        import monolith_tf  # registers the Monolith ops before loading
        loaded = tf.saved_model.load({export_dir!r})
        ids = np.load("ids.npy")
        np.save("loaded_scores.npy", loaded.score(ids).numpy())
        out = loaded.signatures["serving_default"](ids=tf.constant(ids))
        np.save("signature_scores.npy", list(out.values())[0].numpy())
        e = {{k: v.numpy() for k, v in loaded.table.export().items()}}
        order = np.argsort(e["keys"])
        for k in ("keys", "values", "slots", "last_seen", "versions"):
            e[k] = e[k][order]
        np.savez("restored.npz", **e)
        # Two loads in one process get two independent tables.
        again = tf.saved_model.load({export_dir!r})
        grown = again.table.apply_delta(np.array([10**15]), np.zeros([1, 8], np.float32), np.zeros([0], np.int64))
        assert int(grown) == int(loaded.table.size()) + 1
    """, tmp_path)
    expected_scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "loaded_scores.npy"), expected_scores)
    np.testing.assert_array_equal(np.load(tmp_path / "signature_scores.npy"), expected_scores)
    assert_exports_equal(np.load(tmp_path / "restored.npz"), np.load(tmp_path / "expected.npz"))


def test_saved_model_graph_is_session_loadable(tmp_path):
    """The exported graph keeps its table between session runs (as TF Serving's
    session-based loader needs), restored from the SavedModel's variables."""
    table = trained_table()
    module = Scorer(table)
    export_dir = str(tmp_path / "saved")
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.score},
                        options=tf.saved_model.SaveOptions(namespace_whitelist=[mtf.SAVE_NAMESPACE]))
    ids = np.arange(0, 3000, dtype=np.int64)
    expected = module.score(ids).numpy()
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
        sig = meta.signature_def["serving_default"]
        feed = sig.inputs["ids"].name
        fetch = list(sig.outputs.values())[0].name
        first = sess.run(fetch, {feed: ids})
        second = sess.run(fetch, {feed: ids})
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)


def test_saved_model_keeps_several_tables_apart_across_loads(tmp_path):
    a = mtf.HashTable(2, name="a", initializer="zeros")
    b = mtf.HashTable(2, name="b", initializer="zeros")
    a.apply_delta([1], [[1.0, 1.0]], tf.zeros([0], tf.int64))
    b.apply_delta([1], [[2.0, 2.0]], tf.zeros([0], tf.int64))
    module = tf.Module()
    module.tables = [a, b]
    module.score = tf.function(lambda ids: a.lookup(ids) + 10 * b.lookup(ids),
                               input_signature=[tf.TensorSpec([None], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "m"))
    first, second = tf.saved_model.load(str(tmp_path / "m")), tf.saved_model.load(str(tmp_path / "m"))
    np.testing.assert_array_equal(first.score(tf.constant([1], tf.int64)).numpy(), [[21.0, 21.0]])
    first.tables[0].apply_delta(tf.constant([5], tf.int64), tf.constant([[5.0, 5.0]]), tf.zeros([0], tf.int64))
    sizes = [int(t.size()) for t in (*first.tables, *second.tables)]
    assert sizes == [2, 1, 1, 1]

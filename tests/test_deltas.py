"""The delta file format and the DeltaExporter callback."""

import os

import keras
import numpy as np
import pytest

from monolith_tf import deltas
from monolith_tf.callbacks import DeltaExporter
from monolith_tf.layers import HashEmbedding


def sample_delta(seq=1):
    rng = np.random.default_rng(seq)
    return deltas.Delta(sequence=seq, model_name="m", tables=[
        deltas.TableDelta(name="users", dim=3, since_version=4, version=9, keys=np.array([1, -5, 2**62], np.int64),
                          values=rng.standard_normal((3, 3)).astype(np.float32),
                          deleted_keys=np.array([7], np.int64)),
        deltas.TableDelta(name="items", dim=2, since_version=0, version=3, keys=np.zeros([0], np.int64),
                          values=np.zeros([0, 2], np.float32), deleted_keys=np.zeros([0], np.int64), full=True),
    ])


def test_round_trip_is_exact(tmp_path):
    original = sample_delta()
    path = deltas.write(str(tmp_path), original)
    assert os.path.basename(path) == "000000000001.delta"
    got = deltas.read(path)
    assert (got.sequence, got.model_name, got.kind) == (1, "m", "sparse")
    for a, b in zip(original.tables, got.tables):
        assert (a.name, a.dim, a.since_version, a.version, a.full) == (b.name, b.dim, b.since_version, b.version, b.full)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.deleted_keys, b.deleted_keys)
    dense = deltas.Delta(sequence=2, model_name="m", kind="dense", dense={"dense/kernel": np.eye(3, dtype=np.float32)})
    np.testing.assert_array_equal(deltas.read(deltas.write(str(tmp_path), dense)).dense["dense/kernel"], np.eye(3))
    assert deltas.list_sequences(str(tmp_path)) == [1, 2] and deltas.next_sequence(str(tmp_path)) == 3


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-40], "checksum mismatch"),                         # truncated
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),  # one flipped bit
    (lambda b: b"PK\x03\x04" + b[4:], "not a monolith_tf delta"),     # foreign file
    (lambda b: b"", "not a monolith_tf delta"),                        # empty
])
def test_damaged_files_are_rejected_naming_the_file(tmp_path, damage, message):
    path = deltas.write(str(tmp_path), sample_delta())
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(damage(blob))
    with pytest.raises(deltas.DeltaError, match=f"{os.path.basename(path)}.*{message}"):
        deltas.read(path)


def test_read_in_small_chunks_is_exact_and_returns_views_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(deltas, "_READ_CHUNK", 7)  # many readinto calls, ending mid-array
    original = sample_delta()
    got = deltas.read(deltas.write(str(tmp_path), original))
    users = got.tables[0]
    np.testing.assert_array_equal(users.keys, original.tables[0].keys)
    np.testing.assert_array_equal(users.values, original.tables[0].values)
    np.testing.assert_array_equal(users.deleted_keys, [7])
    assert (users.keys.dtype, users.values.dtype, users.values.shape) == (np.dtype("<i8"), np.dtype("<f4"), (3, 3))
    # No copies: every array is a view of the one buffer the file was read into.
    assert not users.keys.flags.owndata and not users.values.flags.owndata
    assert buffer_of(users.keys) is buffer_of(users.values) is buffer_of(got.tables[1].values)


def buffer_of(a):
    """The object that owns an array's memory."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("keep", [0, 7, 8, 16, 40, -33, -1])
def test_truncated_anywhere_is_a_delta_error_naming_the_file(tmp_path, keep):
    path = deltas.write(str(tmp_path), sample_delta())
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:keep])
    with pytest.raises(deltas.DeltaError, match=f"{os.path.basename(path)}: (not a monolith_tf|checksum mismatch)"):
        deltas.read(path)


@pytest.mark.parametrize("name,dtype,message", [
    ("tables/users/keys", "<f8", "table 'users' keys have dtype float64 and shape \\[3\\]"),
    ("tables/users/deleted_keys", "<f4", "table 'users' deleted_keys have dtype float32"),
    ("tables/users/values", "<i4", "table 'users' values have dtype int32 and shape \\[3, 3\\]"),
])
def test_arrays_a_replica_cannot_use_are_a_delta_error(tmp_path, monkeypatch, name, dtype, message):
    # The format records any dtype; write() itself never produces these.
    real_arrays_of = deltas._arrays_of
    monkeypatch.setattr(deltas, "_arrays_of", lambda d: [
        (n, a.astype(dtype) if n == name else a) for n, a in real_arrays_of(d)])
    path = deltas.write(str(tmp_path), sample_delta())
    with pytest.raises(deltas.DeltaError, match=f"{os.path.basename(path)}: {message}"):
        deltas.read(path)


def test_inconsistent_delta_is_refused_before_writing(tmp_path):
    bad = sample_delta()
    bad.tables[0].values = np.zeros([2, 3], np.float32)
    with pytest.raises(deltas.DeltaError, match="table 'users': values shape"):
        deltas.write(str(tmp_path), bad)
    assert os.listdir(tmp_path) == []


def model_with_tables(expire_after=None):
    ids = keras.Input((), dtype="int64", name="ids")
    emb = HashEmbedding(4, name="emb", expire_after=expire_after)
    model = keras.Model(ids, keras.layers.Dense(1)(emb(ids)), name="m")
    model.compile(optimizer="adam", loss="mse")
    return model, emb


def test_delta_exporter_publishes_changes_every_n_steps(tmp_path):
    model, emb = model_with_tables()
    exporter = DeltaExporter(str(tmp_path), every_n_steps=5)
    model.fit(np.arange(200), np.ones(200), batch_size=10, epochs=1, verbose=0, callbacks=[exporter])
    sparse = [deltas.read(p) for p in exporter.written if deltas.read(p).kind == "sparse"]
    dense = [deltas.read(p) for p in exporter.written if deltas.read(p).kind == "dense"]
    assert len(sparse) == 4 and len(dense) == 1  # 20 steps / 5; dense at the end
    assert sparse[0].tables[0].full and sparse[0].tables[0].since_version == 0
    for prev, cur in zip(sparse, sparse[1:]):
        assert cur.tables[0].since_version == prev.tables[0].version  # contiguous chain
    # Replaying the chain onto an empty table reproduces the trainer's rows.
    from monolith_tf import HashTable
    replica = HashTable(4, initializer="zeros")
    for d in sparse:
        t = d.tables[0]
        replica.apply_delta(t.keys, t.values, t.deleted_keys)
    got = replica.lookup(np.arange(200)).numpy()
    np.testing.assert_array_equal(got, emb.table.lookup(np.arange(200)).numpy())
    assert set(dense[0].dense) == {v.path for v in model.weights if "anchor" not in v.path}


def test_delta_exporter_time_cadence_resume_and_deletions(tmp_path):
    now = [0.0]
    model, emb = model_with_tables(expire_after=10)
    exporter = DeltaExporter(str(tmp_path), every_seconds=30, clock=lambda: now[0])
    exporter.set_model(model)
    exporter.on_train_begin()
    emb(np.array([1, 2, 3]), timestamp=100, training=True)
    exporter.on_train_batch_end(0)
    assert exporter.written == []  # not yet due
    now[0] = 31.0
    exporter.on_train_batch_end(1)
    assert len(exporter.written) == 1
    emb(np.array([4]), timestamp=200, training=True)
    emb.table.evict()  # 1, 2, 3 expire
    second = DeltaExporter(str(tmp_path), every_n_steps=1)  # same process, same table history
    second.set_model(model)
    exporter.publish()
    last = deltas.read(exporter.written[-1]).tables[0]
    first = deltas.read(exporter.written[0]).tables[0]
    assert not last.full and last.since_version == first.version
    assert sorted(last.keys.tolist()) == [4] and sorted(last.deleted_keys.tolist()) == [1, 2, 3]
    # A new exporter (a restarted trainer) cannot prove the table's history:
    # it continues the file numbering but sends each table in full.
    second.publish()
    restarted = deltas.read(second.written[0])
    assert restarted.sequence == deltas.read(exporter.written[-1]).sequence + 1
    assert restarted.tables[0].full and sorted(restarted.tables[0].keys.tolist()) == [4]


def test_delta_exporter_sends_full_copy_after_a_restore(tmp_path):
    import tensorflow as tf
    model, emb = model_with_tables()
    exporter = DeltaExporter(str(tmp_path / "d"), every_n_steps=1)
    exporter.set_model(model)
    emb(np.array([1, 2]), timestamp=1, training=True)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    emb(np.array([3]), timestamp=2, training=True)
    exporter.publish()
    tf.train.Checkpoint(model=model).restore(path)  # back to {1, 2}
    emb(np.array([5]), timestamp=3, training=True)  # version catches up exactly
    exporter.publish()
    after = deltas.read(exporter.written[-1]).tables[0]
    assert after.full and sorted(after.keys.tolist()) == [1, 2, 5]


def test_delta_exporter_argument_checks():
    with pytest.raises(ValueError, match="every_n_steps or every_seconds"):
        DeltaExporter("/tmp/x")
    with pytest.raises(ValueError, match="every_n_steps must be"):
        DeltaExporter("/tmp/x", every_n_steps=0)


def test_checkpoint_delta_export_job(tmp_path):
    import tensorflow as tf
    from monolith_tf import HashTable
    from monolith_tf.delta_export import export_once
    model, emb = model_with_tables(expire_after=10)
    ckpt = tf.train.Checkpoint(model=model)
    ckpt_dir, delta_dir = str(tmp_path / "ckpt"), str(tmp_path / "deltas")
    emb(np.array([1, 2, 3]), timestamp=100, training=True)
    ckpt.save(ckpt_dir + "/c")
    first = deltas.read(export_once(ckpt_dir, delta_dir, "m"))
    assert first.tables[0].full and sorted(first.tables[0].keys.tolist()) == [1, 2, 3]
    assert export_once(ckpt_dir, delta_dir, "m") is None  # nothing new
    emb.table.apply_gradients([2], np.ones([1, 4], np.float32))
    emb(np.array([9]), timestamp=105, training=True)
    emb.table.evict(now=112)  # 1 and 3 (seen at 100) expire; 2 was touched at 100 too
    ckpt.save(ckpt_dir + "/c")
    second = deltas.read(export_once(ckpt_dir, delta_dir, "m")).tables[0]
    assert not second.full and second.since_version == first.tables[0].version
    assert sorted(second.keys.tolist()) == [9]
    assert sorted(second.deleted_keys.tolist()) == [1, 2, 3]
    replica = HashTable(4, initializer="zeros")
    for d in (first.tables[0], second):
        replica.apply_delta(d.keys, d.values, d.deleted_keys)
    np.testing.assert_array_equal(replica.lookup(np.arange(12)).numpy(), emb.table.lookup(np.arange(12)).numpy())


def test_delta_export_job_names_a_damaged_checkpoint_and_writes_nothing(tmp_path):
    import glob

    import tensorflow as tf
    from monolith_tf.delta_export import export_once
    model, emb = model_with_tables()
    ckpt_dir, delta_dir = str(tmp_path / "ckpt"), str(tmp_path / "deltas")
    emb(np.array([1, 2, 3]), timestamp=100, training=True)
    prefix = tf.train.Checkpoint(model=model).save(ckpt_dir + "/c")
    (data,) = glob.glob(prefix + ".data-*")
    with open(data, "r+b") as f:
        f.truncate(16)  # most of the data gone
    with pytest.raises(ValueError, match=f"cannot read checkpoint {prefix}"):
        export_once(ckpt_dir, delta_dir, "m")
    assert deltas.list_sequences(delta_dir) == []


def test_malformed_header_with_valid_checksum_is_a_delta_error(tmp_path):
    import hashlib
    import struct
    for header in (b"[]", b'{"format": "monolith_tf.delta", "format_version": 1}'):
        body = deltas.MAGIC + struct.pack("<Q", len(header)) + header
        path = tmp_path / "000000000001.delta"
        path.write_bytes(body + hashlib.sha256(body).digest())
        with pytest.raises(deltas.DeltaError, match="000000000001.delta"):
            deltas.read(str(path))


def test_per_array_checksums_are_checked_on_request(tmp_path):
    """The trailer proves every byte; a bad per-array checksum under a valid
    trailer (a writer bug, not damage) is caught only with verify_arrays."""
    import hashlib
    import json
    import struct
    path = deltas.write(str(tmp_path), sample_delta())
    with open(path, "rb") as f:
        blob = f.read()
    start = len(deltas.MAGIC) + 8
    (header_len,) = struct.unpack_from("<Q", blob, len(deltas.MAGIC))
    header = json.loads(blob[start:start + header_len])
    entry = next(e for e in header["arrays"] if e["name"] == "tables/users/values")
    wrong = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    new_header = blob[start:start + header_len].replace(entry["sha256"].encode(), wrong.encode())
    body = blob[:start] + new_header + blob[start + header_len:-32]
    with open(path, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
    np.testing.assert_array_equal(deltas.read(path).tables[0].values, sample_delta().tables[0].values)
    with pytest.raises(deltas.DeltaError, match="000000000001.delta: array tables/users/values checksum mismatch"):
        deltas.read(path, verify_arrays=True)

"""monolith-serve: TF Serving's gRPC/REST API over exports, version swaps under
load, and deltas (sparse, dense, full, corrupt, gaps, foreign) applied in place.

Every server binds loopback port 0 and is stopped in a fixture or `finally`.
Nothing sleeps blindly: tests poll for a condition with a deadline, or call
`poll_now()`.
"""

import contextlib
import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow.python.ops import gen_lookup_ops
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from monolith_tf import deltas, export
from monolith_tf.layers import HashEmbedding, dense_weights
from monolith_tf.serving import ServingReplica, wait_until
from monolith_tf.serving import delta_applier

NAME = "recommender"
QUERY = {"user": np.array([1, 2, 3, 150, 10**12], np.int64), "item": np.array([5, 6, 7, 250, 8], np.int64)}
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def build_model():
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    x = keras.layers.Concatenate()([HashEmbedding(4, name="user_emb")(user), HashEmbedding(4, name="item_emb")(item)])
    model = keras.Model([user, item], keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(x)), name=NAME)
    model.compile(optimizer="adam", loss="mse")
    return model


def train(model, seed, n=1000, users=200, items=300):
    rng = np.random.default_rng(seed)
    model.fit({"user": rng.integers(0, users, n), "item": rng.integers(0, items, n)},
              rng.random(n).astype(np.float32), batch_size=100, epochs=1, verbose=0)


def tables(model):
    return {layer.name: layer.table for layer in model.layers if isinstance(layer, HashEmbedding)}


def table_versions(model):
    return {name: int(t.stats()["version"]) for name, t in tables(model).items()}


def expected(model, query=QUERY):
    return model.predict(query, verbose=0)


class Trained:
    """One trainer shared by the module (building and tracing a model is the
    slow part). Its version 1 exports are frozen with the predictions they
    give (`want`); tests that train further start replicas from a copy of
    the native export and catch them up with deltas or newer versions."""

    def __init__(self, model, native, portable):
        self.model, self.native, self.portable = model, native, portable
        self.want = expected(model)
        meta = json.load(open(os.path.join(native, "1", export.METADATA_FILE)))
        self.exported_versions = {t["name"]: t["version"] for t in meta["tables"]}

    def copy_to(self, base):
        shutil.copytree(os.path.join(self.native, "1"), os.path.join(base, "1"))
        return base


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = build_model()
    train(model, 0)
    native = str(tmp_path_factory.mktemp("native"))
    portable = str(tmp_path_factory.mktemp("portable"))
    export.save(model, native)
    export.save(model, portable, portable=True)
    return Trained(model, native, portable)


@contextlib.contextmanager
def serving(*args, **kwargs):
    replica = ServingReplica(*args, **kwargs)
    channel = None
    try:
        ports = replica.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{ports.grpc}")
        yield replica, Client(channel)
    finally:
        if channel is not None:
            channel.close()
        replica.stop()


class Client:
    """The stock tensorflow_serving stubs, plus small request builders."""

    def __init__(self, channel):
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def predict_request(self, query=QUERY, name=NAME, version=None, signature=None, dtypes=None):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        if signature is not None:
            request.model_spec.signature_name = signature
        for alias, value in query.items():
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(np.asarray(value, (dtypes or {}).get(alias))))
        return request

    def predict(self, query=QUERY, **kwargs):
        response = self.predictions.Predict(self.predict_request(query, **kwargs), timeout=30)
        return tf.make_ndarray(response.outputs["predictions"]), response

    def status(self, name=NAME, version=None):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return self.models.GetModelStatus(request, timeout=30)

    def metadata(self, name=NAME, fields=("signature_def",)):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = name
        request.metadata_field.extend(fields)
        return self.predictions.GetModelMetadata(request, timeout=30)


def rpc_error(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details()


def examples_input(target, query, drop=None):
    for u, i in zip(query["user"], query["item"]):
        example = target.example_list.examples.add()
        example.features.feature["user"].int64_list.value.append(int(u))
        if drop != "item":
            example.features.feature["item"].int64_list.value.append(int(i))


def http(port, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="GET" if data is None
                                     else "POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(trained):
    with serving(trained.native, NAME, rest_api_port=0, poll_seconds=0) as (replica, client):
        yield trained, replica, client


# -- the TF Serving API ----------------------------------------------------------

def test_predict_metadata_and_status(served):
    trained, replica, client = served
    got, response = client.predict()
    np.testing.assert_allclose(got, trained.want, rtol=1e-5, atol=1e-5)
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == (NAME, 1, "serving_default")
    pinned, _ = client.predict(version=1, signature="serving_default")
    np.testing.assert_array_equal(pinned, got)
    request = client.predict_request()
    request.output_filter.append("predictions")
    filtered = client.predictions.Predict(request, timeout=30)
    assert list(filtered.outputs) == ["predictions"]

    meta = client.metadata()
    assert meta.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(signatures)
    serving_default = signatures.signature_def["serving_default"]
    assert set(serving_default.inputs) == {"user", "item"} and list(serving_default.outputs) == ["predictions"]
    assert serving_default.inputs["user"].dtype == tf.int64.as_datatype_enum
    info = wrappers_pb2.StringValue()
    assert meta.metadata["monolith"].Unpack(info)
    info = json.loads(info.value)
    assert info["version"] == 1 and info["mode"] == "native" and info["last_delta_sequence"] is None
    assert info["table_versions"] == trained.exported_versions

    status = client.status()
    assert [(s.version, s.state, s.status.error_code) for s in status.model_version_status] == [(1, AVAILABLE, 0)]
    assert json.loads(status.model_version_status[0].status.error_message.removeprefix("monolith: "))[
        "table_versions"] == trained.exported_versions
    assert client.status(version=1).model_version_status[0].state == AVAILABLE
    assert replica.status()["version"] == 1 and replica.status()["versions"][1]["state"] == "AVAILABLE"


def test_errors_like_tf_serving(served):
    trained, _, client = served
    stub = client.predictions
    cases = [
        (client.predict_request(name="nope"), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        (client.predict_request(version=7), grpc.StatusCode.NOT_FOUND,
         f"Servable not found for request: Specific({NAME}, 7)"),
        (client.predict_request(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nope" not found.'),
        (client.predict_request({"user": QUERY["user"]}), grpc.StatusCode.INVALID_ARGUMENT,
         "Missing but required: {item}"),
        (client.predict_request({**QUERY, "age": [1] * 5}), grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {age}"),
        (client.predict_request({"user": QUERY["user"], "age": QUERY["item"]}), grpc.StatusCode.INVALID_ARGUMENT,
         "input tensor alias not found in signature: age"),
        (client.predict_request(dtypes={"item": np.float32}), grpc.StatusCode.INVALID_ARGUMENT,
         "Expects input 'item' to be int64 but float32 is provided"),
        (client.predict_request({"user": QUERY["user"].reshape(5, 1), "item": QUERY["item"]}),
         grpc.StatusCode.INVALID_ARGUMENT, "input 'user' has shape [5,1]"),
        (client.predict_request({"user": QUERY["user"], "item": QUERY["item"][:2]}),
         grpc.StatusCode.INVALID_ARGUMENT, "Dimension 0 in both shapes must be equal"),
    ]
    for request, code, message in cases:
        got_code, details = rpc_error(stub.Predict, request)
        assert got_code == code and message in details, (got_code, details)
    request = client.predict_request()
    request.model_spec.version_label = "stable"
    assert rpc_error(stub.Predict, request) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                "Unrecognized servable version label: stable")
    request = client.predict_request()
    request.output_filter.append("scores")
    assert "output tensor alias not found in signature: scores" in rpc_error(stub.Predict, request)[1]
    assert rpc_error(client.status, "nope") == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
    assert rpc_error(client.status, NAME, 9) == (grpc.StatusCode.NOT_FOUND, f"Could not find version 9 of model {NAME}")
    assert rpc_error(client.metadata, "nope")[0] == grpc.StatusCode.NOT_FOUND
    assert rpc_error(client.metadata, NAME, ("tags",)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                           "Metadata field tags is not supported")
    assert rpc_error(client.metadata, NAME, ()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    "GetModelMetadataRequest must specify at least one metadata_field")
    # Still serving after all that.
    np.testing.assert_allclose(client.predict()[0], trained.want, rtol=1e-5, atol=1e-5)


def test_classify_and_regress_parse_examples_by_input_name(served):
    trained, _, client = served
    want = trained.want[:, 0]
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = NAME
    examples_input(request.input, QUERY)
    regressed = client.predictions.Regress(request, timeout=30)
    np.testing.assert_allclose([r.value for r in regressed.result.regressions], want, rtol=1e-5, atol=1e-5)
    assert regressed.model_spec.version.value == 1

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = NAME
    examples_input(request.input, QUERY)
    classified = client.predictions.Classify(request, timeout=30)
    assert [len(c.classes) for c in classified.result.classifications] == [1] * len(want)
    np.testing.assert_allclose([c.classes[0].score for c in classified.result.classifications], want,
                               rtol=1e-5, atol=1e-5)

    # Context features are merged into every example.
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = NAME
    request.input.example_list_with_context.context.features.feature["item"].int64_list.value.append(5)
    for u in QUERY["user"]:
        request.input.example_list_with_context.examples.add().features.feature["user"].int64_list.value.append(u)
    with_context = client.predictions.Regress(request, timeout=30)
    same_item = client.predict({"user": QUERY["user"], "item": np.full(5, 5, np.int64)})[0][:, 0]
    np.testing.assert_allclose([r.value for r in with_context.result.regressions], same_item, rtol=1e-5, atol=1e-5)

    request = regression_pb2.RegressionRequest()
    request.model_spec.name = NAME
    examples_input(request.input, QUERY, drop="item")
    code, details = rpc_error(client.predictions.Regress, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "item" in details
    request = regression_pb2.RegressionRequest(model_spec={"name": NAME, "signature_name": "nope"})
    examples_input(request.input, QUERY)
    assert rpc_error(client.predictions.Regress, request) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                              "No signature was found with the name: nope")
    request = regression_pb2.RegressionRequest(model_spec={"name": NAME})
    assert rpc_error(client.predictions.Regress, request) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")


def test_rest_api(served):
    trained, replica, _ = served
    port = replica.rest_api_port
    want = trained.want
    rows = [{"user": int(u), "item": int(i)} for u, i in zip(QUERY["user"], QUERY["item"])]
    code, body = http(port, f"/v1/models/{NAME}:predict", {"instances": rows})
    assert code == 200
    np.testing.assert_allclose(body["predictions"], want, rtol=1e-5, atol=1e-5)
    code, body = http(port, f"/v1/models/{NAME}/versions/1:predict",
                      {"signature_name": "serving_default", "inputs": {k: v.tolist() for k, v in QUERY.items()}})
    assert code == 200
    np.testing.assert_allclose(body["outputs"], want, rtol=1e-5, atol=1e-5)
    code, body = http(port, f"/v1/models/{NAME}:regress", {"examples": rows})
    assert code == 200
    np.testing.assert_allclose(body["results"], want[:, 0], rtol=1e-5, atol=1e-5)
    code, body = http(port, f"/v1/models/{NAME}:classify", {"examples": rows[:2]})
    assert code == 200 and [len(r) for r in body["results"]] == [1, 1]

    code, body = http(port, f"/v1/models/{NAME}")
    assert code == 200 and [(s["version"], s["state"], s["status"]["error_code"])
                            for s in body["model_version_status"]] == [("1", "AVAILABLE", "OK")]
    code, body = http(port, f"/v1/models/{NAME}/metadata")
    assert code == 200 and body["model_spec"]["version"] == "1"
    assert set(body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]) == {"user", "item"}

    assert http(port, "/v1/models/nope:predict", {"instances": rows})[0] == 404
    assert http(port, f"/v1/models/{NAME}/versions/3:predict", {"instances": rows})[0] == 404
    code, body = http(port, f"/v1/models/{NAME}:predict", {"instances": [{"user": 1.5, "item": 2}]})
    assert code == 400 and "user" in body["error"]
    code, body = http(port, f"/v1/models/{NAME}:predict", {"instances": [{"user": 1}]})
    assert code == 400 and "Missing but required: {item}" in body["error"]
    assert http(port, f"/v1/models/{NAME}:predict", {"instances": rows, "signature_name": "x"})[0] == 400
    assert http(port, "/v1/models/nope")[0] == 404
    assert http(port, f"/v1/models/{NAME}:explode", {})[0] == 400


def test_portable_export_serves_and_takes_deltas(trained, tmp_path):
    delta_dir = str(tmp_path / "deltas")
    with serving(trained.portable, NAME, delta_dir=delta_dir, poll_seconds=0) as (replica, client):
        before, _ = client.predict()
        np.testing.assert_allclose(before, trained.want, rtol=1e-5, atol=1e-5)
        info = wrappers_pb2.StringValue()
        assert client.metadata().metadata["monolith"].Unpack(info)
        assert json.loads(info.value)["mode"] == "portable"
        # A hand-written delta gives the unseen user 10**12 a row.
        version = trained.exported_versions["user_emb"]
        deltas.write(delta_dir, deltas.Delta(sequence=1, model_name=NAME, tables=[deltas.TableDelta(
            name="user_emb", dim=4, since_version=version, version=version + 1,
            keys=np.array([10**12], np.int64), values=np.full((1, 4), 0.5, np.float32),
            deleted_keys=np.zeros([0], np.int64))]))
        status = replica.poll_now()
        assert status["last_delta_sequence"] == 1 and status["table_versions"]["user_emb"] == version + 1
        after, _ = client.predict()
        np.testing.assert_allclose(after[:4], before[:4], rtol=1e-6)
        assert abs(after[4, 0] - before[4, 0]) > 1e-6


# -- deltas ----------------------------------------------------------------------

def sparse_delta(model, seq, since, full=False):
    entries = []
    for name, table in tables(model).items():
        d = table.export_delta(0 if full else since[name])
        assert bool(d["complete"])
        entries.append(deltas.TableDelta(
            name=name, dim=table.dim, since_version=0 if full else since[name], version=int(d["version"]),
            keys=d["keys"].numpy(), values=d["values"].numpy(), deleted_keys=d["deleted_keys"].numpy(), full=full))
    return deltas.Delta(sequence=seq, model_name=NAME, tables=entries)


def dense_delta(model, seq):
    return deltas.Delta(sequence=seq, model_name=NAME, kind="dense",
                        dense={name: v.numpy() for name, v in dense_weights(model)})


def test_deltas_apply_in_order_and_bad_ones_are_rejected(trained, tmp_path, monkeypatch):
    model, exported = trained.model, trained.exported_versions
    base, delta_dir = trained.copy_to(str(tmp_path / "models")), str(tmp_path / "deltas")
    reads = []
    real_read = deltas.read
    monkeypatch.setattr(delta_applier.deltas, "read", lambda path, **kw: (reads.append(path), real_read(path, **kw))[1])

    with serving(base, NAME, delta_dir=delta_dir, poll_seconds=0) as (replica, client):
        v1 = trained.want
        train(model, 2)
        assert not np.allclose(expected(model), v1, atol=1e-4)
        deltas.write(delta_dir, sparse_delta(model, 1, exported))
        deltas.write(delta_dir, dense_delta(model, 2))
        np.testing.assert_allclose(client.predict()[0], v1, rtol=1e-5, atol=1e-5)  # not polled yet
        status = replica.poll_now()
        assert status["last_delta_sequence"] == 2 and status["table_versions"] == table_versions(model)
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)
        info = json.loads(status_message(client))
        assert info["last_delta_sequence"] == 2 and info["deltas_applied"] == 2

        # A corrupt file is rejected, read once, and serving goes on.
        good = expected(model)
        path = deltas.write(delta_dir, sparse_delta(model, 3, exported))
        blob = bytearray(open(path, "rb").read())
        blob[len(blob) // 2] ^= 0xFF
        open(path, "wb").write(bytes(blob))
        status = replica.poll_now()
        assert status["deltas_rejected"][3]["kind"] == "corrupt"
        assert "checksum" in status["deltas_rejected"][3]["reason"] and status["last_delta_sequence"] == 2
        reads_after_reject = len(reads)
        replica.poll_now()
        replica.poll_now()
        assert len(reads) == reads_after_reject
        np.testing.assert_allclose(client.predict()[0], good, rtol=1e-5, atol=1e-5)

        # A gap (starts after a version the replica does not have) is rejected.
        current = table_versions(model)
        gap = sparse_delta(model, 4, current)
        gap.tables[0].since_version = current[gap.tables[0].name] + 50
        gap.tables[0].version = current[gap.tables[0].name] + 60
        deltas.write(delta_dir, gap)
        status = replica.poll_now()
        assert status["deltas_rejected"][4]["kind"] == "gap" and status["table_versions"] == current

        # Foreign files: another model's, an unknown table.
        foreign = sparse_delta(model, 5, current)
        foreign.model_name = "someone_else"
        deltas.write(delta_dir, foreign)
        stray = deltas.Delta(sequence=6, model_name=NAME, tables=[deltas.TableDelta(
            "genre_emb", 4, 0, 1, np.zeros([0], np.int64), np.zeros([0, 4], np.float32), np.zeros([0], np.int64))])
        deltas.write(delta_dir, stray)
        status = replica.poll_now()
        assert status["deltas_rejected"][5]["kind"] == status["deltas_rejected"][6]["kind"] == "invalid"
        assert "someone_else" in status["deltas_rejected"][5]["reason"]
        assert "genre_emb" in status["deltas_rejected"][6]["reason"]

        # A later contiguous delta still applies.
        train(model, 3)
        deltas.write(delta_dir, sparse_delta(model, 7, current))
        deltas.write(delta_dir, dense_delta(model, 8))
        status = replica.poll_now()
        assert status["last_delta_sequence"] == 8 and status["table_versions"] == table_versions(model)
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)

        # Re-applying (the file touched) is harmless: already included, skipped.
        applied = status["deltas_applied"]
        os.utime(deltas.path_for(delta_dir, 7), ns=(1, 1))
        status = replica.poll_now()
        assert status["deltas_applied"] == applied and status["deltas_skipped"] >= 1
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)

        # A full table replaces the replica's rows: rows missing from it go.
        item = tables(model)["item_emb"]
        rows = item.export()
        keep = rows["keys"].numpy() < 100
        v = table_versions(model)["item_emb"]
        deltas.write(delta_dir, deltas.Delta(sequence=9, model_name=NAME, tables=[deltas.TableDelta(
            "item_emb", 4, 0, v + 1, rows["keys"].numpy()[keep], rows["values"].numpy()[keep],
            np.zeros([0], np.int64), full=True)]))
        status = replica.poll_now()
        assert status["last_delta_sequence"] == 9 and status["table_versions"]["item_emb"] == v + 1
        held = replica.manager.current().tables["item_emb"].keys().numpy()
        assert sorted(held.tolist()) == sorted(rows["keys"].numpy()[keep].tolist())

        # Fixing the corrupt file later: it is read again, and skipped (already included).
        deltas.write(delta_dir, sparse_delta(model, 3, exported))
        status = replica.poll_now()
        assert 3 not in status["deltas_rejected"]

        # A dense snapshot dated by zero-row table entries applies only when not behind the replica.
        def dated_zero_dense(seq, versions):
            empty = (np.zeros([0], np.int64), np.zeros([0, 4], np.float32), np.zeros([0], np.int64))
            return deltas.Delta(sequence=seq, model_name=NAME, kind="dense",
                                tables=[deltas.TableDelta(n, 4, v, v, *empty) for n, v in versions.items()],
                                dense={name: np.zeros_like(v.numpy()) for name, v in dense_weights(model)})
        before = client.predict()[0]
        deltas.write(delta_dir, dated_zero_dense(10, exported))
        status = replica.poll_now()
        assert status["last_delta_sequence"] == 9 and status["processed_delta_sequence"] == 10
        np.testing.assert_array_equal(client.predict()[0], before)
        deltas.write(delta_dir, dated_zero_dense(11, status["table_versions"]))
        assert replica.poll_now()["last_delta_sequence"] == 11
        np.testing.assert_array_equal(client.predict()[0], np.zeros_like(before))


def table_rows(replica, name):
    """(keys, values) of a native replica's table, sorted by key."""
    rows = replica.manager.current().tables[name].table.export()
    keys, values = rows["keys"].numpy(), rows["values"].numpy()
    order = np.argsort(keys)
    return keys[order], values[order]


def count_writes(monkeypatch, fail_at=None):
    """Wraps every table writer the applier makes; returns the list of
    (rows, deleted keys) per write call. With fail_at=N the Nth call raises."""
    calls = []
    real = delta_applier._eager_writer

    def writer(endpoint, portable):
        write = real(endpoint, portable)

        def counted(keys, values, deleted_keys):
            calls.append((int(keys.shape[0]), int(deleted_keys.shape[0])))
            if len(calls) == fail_at:
                raise tf.errors.ResourceExhaustedError(None, None, "out of memory\nmore")
            return write(keys, values, deleted_keys)
        return counted

    monkeypatch.setattr(delta_applier, "_eager_writer", writer)
    return calls


def test_sliced_apply_equals_one_apply_op_call(trained, tmp_path, monkeypatch):
    version = trained.exported_versions["user_emb"]
    rng = np.random.default_rng(11)
    # Existing rows changed, new rows, deleted rows, and key 3 both deleted
    # and written (one op call deletes first, so it ends up written).
    keys = np.concatenate([np.arange(0, 150, 3), np.arange(10**9, 10**9 + 40)]).astype(np.int64)
    values = rng.standard_normal((len(keys), 4)).astype(np.float32)
    deleted = np.array([1, 2, 3, 5, 199, 10**15], np.int64)
    delta_dir = str(tmp_path / "deltas")
    sliced_base, one_call_base = trained.copy_to(str(tmp_path / "a")), trained.copy_to(str(tmp_path / "b"))
    with serving(sliced_base, NAME, delta_dir=delta_dir, poll_seconds=0) as (sliced, _), \
            serving(one_call_base, NAME, poll_seconds=0) as (one_call, _):
        sliced.applier.slice_rows = 7  # 1 slice of deletions, 13 of rows
        calls = count_writes(monkeypatch)
        deltas.write(delta_dir, deltas.Delta(sequence=1, model_name=NAME, tables=[deltas.TableDelta(
            "user_emb", 4, version, version + 1, keys, values, deleted)]))
        assert sliced.poll_now()["table_versions"]["user_emb"] == version + 1
        assert calls == [(0, 6)] + [(7, 0)] * 12 + [(6, 0)]
        one_call.manager.current().tables["user_emb"].apply_delta(keys, values, deleted)
        got_keys, got_values = table_rows(sliced, "user_emb")
        want_keys, want_values = table_rows(one_call, "user_emb")
        np.testing.assert_array_equal(got_keys, want_keys)
        np.testing.assert_array_equal(got_values, want_values)
        assert 3 in got_keys and not {1, 2, 5, 199} & set(got_keys.tolist())
        np.testing.assert_array_equal(got_values[np.searchsorted(got_keys, keys)], values)


def test_a_file_that_fails_any_check_leaves_the_tables_bit_identical(trained, tmp_path, monkeypatch):
    exported = trained.exported_versions
    base, delta_dir = trained.copy_to(str(tmp_path / "models")), str(tmp_path / "deltas")
    rng = np.random.default_rng(12)

    def entry(name, dim=4, since=None, rows=50):
        since = exported[name] if since is None else since
        return deltas.TableDelta(name, dim, since, since + 1, np.arange(rows, dtype=np.int64),
                                 rng.standard_normal((rows, dim)).astype(np.float32), np.array([7], np.int64))

    with serving(base, NAME, delta_dir=delta_dir, poll_seconds=0) as (replica, client):
        replica.applier.slice_rows = 8
        before = {name: table_rows(replica, name) for name in exported}
        prediction = client.predict()[0]
        # In each file the user_emb entry is fine; something after it is not.
        bad = {
            1: ("gap", [entry("user_emb"), entry("item_emb", since=exported["item_emb"] + 5)]),
            2: ("invalid", [entry("user_emb"), entry("item_emb", dim=5)]),
            3: ("invalid", [entry("user_emb"), entry("genre_emb", since=0)]),
        }
        for seq, (_, tables_) in bad.items():
            deltas.write(delta_dir, deltas.Delta(sequence=seq, model_name=NAME, tables=tables_))
        # 4: float keys (the format allows any dtype string): refused when read.
        real_arrays_of = deltas._arrays_of
        monkeypatch.setattr(deltas, "_arrays_of", lambda d: [
            (n, a.astype("<f8") if n == "tables/item_emb/keys" else a) for n, a in real_arrays_of(d)])
        deltas.write(delta_dir, deltas.Delta(sequence=4, model_name=NAME,
                                             tables=[entry("user_emb"), entry("item_emb")]))
        monkeypatch.undo()
        # 5: a dense snapshot whose shapes do not match the export.
        deltas.write(delta_dir, deltas.Delta(
            sequence=5, model_name=NAME, kind="dense", tables=[entry("user_emb")],
            dense={name: np.zeros([2, 2], np.float32) for name, _ in dense_weights(trained.model)}))
        status = replica.poll_now()
        assert {seq: r["kind"] for seq, r in status["deltas_rejected"].items()} == {
            1: "gap", 2: "invalid", 3: "invalid", 4: "corrupt", 5: "invalid"}
        assert status["deltas_rejected"][4]["reason"] == (
            f"{deltas.path_for(delta_dir, 4)}: table 'item_emb' keys have dtype float64 and shape [50]")
        assert status["table_versions"] == exported and status["last_delta_sequence"] is None
        for name in exported:
            for got, want in zip(table_rows(replica, name), before[name]):
                np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(client.predict()[0], prediction)


def test_an_apply_that_fails_half_way_is_reported_and_converges_when_rewritten(trained, tmp_path, monkeypatch):
    version = trained.exported_versions["user_emb"]
    base, delta_dir = trained.copy_to(str(tmp_path / "models")), str(tmp_path / "deltas")
    keys = np.arange(100, dtype=np.int64)
    values = np.arange(400, dtype=np.float32).reshape(100, 4)
    delta = deltas.Delta(sequence=1, model_name=NAME, tables=[deltas.TableDelta(
        "user_emb", 4, version, version + 1, keys, values, np.zeros([0], np.int64))])
    with serving(base, NAME, delta_dir=delta_dir, poll_seconds=0) as (replica, _):
        replica.applier.slice_rows = 30
        calls = count_writes(monkeypatch, fail_at=3)
        path = deltas.write(delta_dir, delta)
        status = replica.poll_now()
        assert status["deltas_rejected"][1] == {"kind": "apply_failed",
                                                "reason": "applying failed: ResourceExhaustedError: out of memory"}
        assert "out of memory" in status["last_delta_error"]
        assert status["table_versions"]["user_emb"] == version and calls == [(30, 0)] * 3
        got_keys, got_values = table_rows(replica, "user_emb")
        np.testing.assert_array_equal(got_values[np.searchsorted(got_keys, keys[:60])], values[:60])
        replica.poll_now()
        assert calls == [(30, 0)] * 3  # not retried until the file changes
        count_writes(monkeypatch)  # no more failures
        os.utime(path, ns=(1, 1))
        status = replica.poll_now()
        assert status["deltas_rejected"] == {} and status["table_versions"]["user_emb"] == version + 1
        assert status["last_delta_error"] == ""  # nothing stands rejected any more
        got_keys, got_values = table_rows(replica, "user_emb")
        np.testing.assert_array_equal(got_values[np.searchsorted(got_keys, keys)], values)


@pytest.mark.parametrize("mode", ["native", "portable"])
def test_delta_rows_are_written_by_eager_ops_in_the_polling_thread(trained, mode):
    """A function call would run the write kernel on TensorFlow's shared
    inter-op threads at full priority; the replica's writes must run in the
    (lower-priority) thread that polls, and land the rows exactly."""
    with serving(getattr(trained, mode), NAME, poll_seconds=0) as (replica, _):
        endpoint = replica.manager.current().tables["user_emb"]
        write = delta_applier._eager_writer(endpoint, mode == "portable")
        assert write is not endpoint.apply_delta  # the table's handle was found
        keys = np.arange(2 * 10**12, 2 * 10**12 + 300_000, dtype=np.int64)
        values = np.random.default_rng(5).standard_normal((len(keys), 4)).astype(np.float32)
        k, v, none = tf.constant(keys), tf.constant(values), tf.zeros([0], tf.int64)
        write(k[:1], v[:1], none)  # warm-up
        ticks = {}

        def cpu_ticks():  # utime + stime of every thread of this process
            out = {}
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = int(fields[11]) + int(fields[12])
            return out

        def poller():
            me = threading.get_native_id()
            before = cpu_ticks()
            for _ in range(60):  # until this thread has used 0.2 s of CPU (1 tick = 10 ms)
                write(k, v, none)
                if cpu_ticks()[me] - before[me] >= 20:
                    break
            after = cpu_ticks()
            used = {t: after[t] - before.get(t, 0) for t in after}
            ticks["mine"], ticks["others"] = used.pop(me), max(used.values())

        t = threading.Thread(target=poller)
        t.start()
        t.join()
        assert ticks["mine"] > 2 * ticks["others"], ticks
        assert np.isin(keys, endpoint.keys().numpy()).all()
        if mode == "portable":
            got = gen_lookup_ops.lookup_table_find_v2(endpoint.table.resource_handle, k, tf.zeros([4])).numpy()
        else:
            got_keys, got_values = table_rows(replica, "user_emb")
            got = got_values[np.searchsorted(got_keys, keys)]
        np.testing.assert_array_equal(got, values)


def status_message(client):
    return client.status().model_version_status[0].status.error_message.removeprefix("monolith: ")


def test_delta_exporter_callback_end_to_end(trained, tmp_path):
    callbacks = pytest.importorskip("monolith_tf.callbacks")
    model = trained.model
    base, delta_dir = trained.copy_to(str(tmp_path / "models")), str(tmp_path / "deltas")
    with serving(base, NAME, delta_dir=delta_dir, poll_seconds=0.05) as (replica, client):
        exporter = callbacks.DeltaExporter(delta_dir, every_n_steps=3)
        rng = np.random.default_rng(5)
        model.fit({"user": rng.integers(0, 250, 1000), "item": rng.integers(0, 350, 1000)},
                  rng.random(1000).astype(np.float32), batch_size=100, epochs=1, verbose=0, callbacks=[exporter])
        last = deltas.list_sequences(delta_dir)[-1]
        wait_until(lambda: replica.status()["last_delta_sequence"] == last, timeout=30)
        status = replica.status()
        assert status["deltas_rejected"] == {} and status["table_versions"] == table_versions(model)
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)


# -- versions ----------------------------------------------------------------------

def test_new_version_swaps_in_under_load_and_bad_versions_are_skipped(trained, tmp_path):
    model = trained.model
    base, delta_dir = trained.copy_to(str(tmp_path / "models")), str(tmp_path / "deltas")
    # Version 2 and two deltas after it are prepared aside, then moved in
    # (atomically, as export.save and deltas.write themselves do) under load.
    staging = str(tmp_path / "staging")
    train(model, 7)
    export.save(model, staging, version=2)
    since = table_versions(model)
    train(model, 8)
    staged = [deltas.write(staging, sparse_delta(model, 1, since)), deltas.write(staging, dense_delta(model, 2))]
    os.makedirs(delta_dir)
    with serving(base, NAME, delta_dir=delta_dir, poll_seconds=0.05) as (replica, client):
        v1 = trained.want
        stop, failures, served_versions = threading.Event(), [], []

        def hammer():
            while not stop.is_set():
                try:
                    _, response = client.predict()
                    served_versions.append(response.model_spec.version.value)
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")

        thread = threading.Thread(target=hammer)
        thread.start()

        def more_predictions(n=5):
            count = len(served_versions)
            wait_until(lambda: len(served_versions) >= count + n, timeout=30)

        try:
            more_predictions()
            os.rename(os.path.join(staging, "2"), os.path.join(base, "2"))
            wait_until(lambda: replica.status()["version"] == 2, timeout=30)
            more_predictions()
            # Deltas apply while requests run.
            for path in staged:
                os.rename(path, os.path.join(delta_dir, os.path.basename(path)))
            wait_until(lambda: replica.status()["last_delta_sequence"] == 2, timeout=30)
            more_predictions()
        finally:
            stop.set()
            thread.join()
        assert failures == []
        assert served_versions[0] == 1 and served_versions[-1] == 2 and sorted(set(served_versions)) == [1, 2]
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)
        assert not np.allclose(expected(model), v1, atol=1e-4)
        states = {s.version: s.state for s in client.status().model_version_status}
        assert states == {2: AVAILABLE, 1: END}
        assert rpc_error(lambda: client.predict(QUERY, version=1))[0] == grpc.StatusCode.NOT_FOUND

        # A broken version 3 is reported, not retried, and version 2 keeps serving.
        os.makedirs(os.path.join(base, "3"))
        open(os.path.join(base, "3", "saved_model.pb"), "wb").write(b"not a saved model")
        status = replica.poll_now()
        assert status["version"] == 2 and status["versions"][3]["state"] == "END"
        assert "Failed to load version 3" in status["versions"][3]["error"]
        broken = client.status(version=3).model_version_status[0]
        assert broken.state == END and broken.status.error_code != 0
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)
        # Replacing it with a good one (a copy of version 2, moved in atomically)
        # loads it, caught up on the deltas written after version 2 before it serves.
        shutil.rmtree(os.path.join(base, "3"))
        shutil.copytree(os.path.join(base, "2"), os.path.join(base, ".tmp-3"))
        os.rename(os.path.join(base, ".tmp-3"), os.path.join(base, "3"))
        wait_until(lambda: replica.status()["version"] == 3, timeout=30)
        status = replica.status()
        assert status["deltas_rejected"] == {} and status["last_delta_sequence"] == 2
        np.testing.assert_allclose(client.predict()[0], expected(model), rtol=1e-5, atol=1e-5)


def test_command_line_flags_build_the_replica(trained):
    from absl import flags

    from monolith_tf.serving import __main__ as cli
    flag_values = flags.FlagValues()  # not absl's global FLAGS: other tests' command lines live there
    cli.define_flags(flag_values)
    flag_values(["monolith-serve", f"--model_base_path={trained.native}", f"--model_name={NAME}", "--port=0",
                 "--rest_api_port=0", "--file_system_poll_wait_seconds=0.5"])
    replica = cli.replica_from_flags(flag_values)
    assert (replica.host, replica.poll_seconds, replica.delta_poll_seconds, replica.delta_dir) == (
        "127.0.0.1", 0.5, 0.5, None)
    with replica:
        assert replica.rest_api_port is None  # --rest_api_port=0 means no REST, as in TF Serving
        with grpc.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            assert Client(channel).status().model_version_status[0].state == AVAILABLE


@pytest.mark.parametrize("flag", ["--port=99999", "--port=-1", "--rest_api_port=70000"])
def test_out_of_range_ports_are_rejected_naming_the_flag(trained, flag):
    from absl import flags

    from monolith_tf.serving import __main__ as cli
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError, match=flag.split("=")[0].lstrip("-")):
        flag_values(["monolith-serve", f"--model_base_path={trained.native}", flag])
    # The Python API checks too: gRPC would quietly take 99999 as 99999 - 65536.
    with pytest.raises(ValueError, match="rest_api_port must be an integer in 0..65535, got 70000"):
        ServingReplica(trained.native, NAME, rest_api_port=70000)
    with pytest.raises(ValueError, match="port must be an integer in 0..65535, got 99999"):
        ServingReplica(trained.native, NAME, port=99999)


def test_a_port_in_use_is_one_line_and_exit_1(trained):
    import socket
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "monolith_tf.serving", f"--model_base_path={trained.native}",
                              f"--model_name={NAME}", "--port=0", f"--rest_api_port={port}"],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 1, run.stderr
    assert f"monolith-serve: cannot bind REST to 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_background_threads_run_at_lower_priority_than_requests():
    import threading
    from monolith_tf.serving import server
    seen = {}

    def poller():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        server._lower_thread_priority(10)
        seen["change"] = (before, os.getpriority(os.PRIO_PROCESS, tid))

    t = threading.Thread(target=poller)
    t.start()
    t.join()
    before, after = seen["change"]
    assert after == min(19, before + 10)
    # Only that thread changed: the caller (a request thread) keeps its priority.
    me = threading.get_native_id()
    assert os.getpriority(os.PRIO_PROCESS, me) == before

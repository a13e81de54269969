"""The whole Monolith loop on loopback: train, export v1, two replicas, a
trainer-side DeltaExporter pushing a delta while a client keeps calling, a
corrupt delta rejected, then version 2 swapped in."""

import os
import threading

import grpc
import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from monolith_tf import export
from monolith_tf.callbacks import DeltaExporter
from monolith_tf.layers import HashEmbedding
from monolith_tf.serving import ServingReplica, wait_until

POLL = 0.5
QUERY = {"user": np.arange(0, 64, dtype=np.int64), "item": np.arange(100, 164, dtype=np.int64)}


def build_model():
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    x = keras.layers.Concatenate()([HashEmbedding(8, name="users")(user), HashEmbedding(8, name="items")(item)])
    model = keras.Model([user, item], keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(x)),
                        name="e2e")
    model.compile(optimizer="adam", loss="mse")
    return model


def batch(rng, n):
    users, items = rng.integers(0, 64, n), rng.integers(100, 164, n)
    return {"user": users, "item": items}, ((users % 5) + (items % 3) * 0.5).astype(np.float32)


def predict(stub, timeout=10.0):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "e2e"
    for name, values in QUERY.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    response = stub.Predict(request, timeout=timeout)
    return tf.make_ndarray(response.outputs["predictions"]), response.model_spec.version.value


def test_train_export_serve_delta_swap(tmp_path):
    rng = np.random.default_rng(0)
    model = build_model()
    model.fit(*batch(rng, 2000), batch_size=100, epochs=2, verbose=0)
    base, delta_dir = str(tmp_path / "models"), str(tmp_path / "deltas")
    export.save(model, base)
    replicas = [ServingReplica(base, "e2e", delta_dir=delta_dir, port=0, poll_seconds=POLL) for _ in range(2)]
    channels = []
    try:
        stubs = []
        for replica in replicas:
            ports = replica.start()
            channel = grpc.insecure_channel(f"127.0.0.1:{ports.grpc}")
            channels.append(channel)
            stubs.append(prediction_service_pb2_grpc.PredictionServiceStub(channel))
        expected = model.predict(QUERY, verbose=0)
        for stub in stubs:
            got, version = predict(stub)
            assert version == 1
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

        # A client keeps calling both replicas for the rest of the test.
        failures, calls, stop = [], [0], threading.Event()

        def client():
            while not stop.is_set():
                for stub in stubs:
                    try:
                        predict(stub)
                        calls[0] += 1
                    except grpc.RpcError as e:
                        failures.append(e)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            # Train more on new data; the callback publishes a sparse and a dense delta.
            exporter = DeltaExporter(delta_dir, every_n_steps=10)
            model.fit(*batch(rng, 1000), batch_size=100, epochs=1, verbose=0, callbacks=[exporter])
            assert exporter.written
            published = tf.timestamp().numpy()
            expected = model.predict(QUERY, verbose=0)
            for stub in stubs:
                assert wait_until(lambda: np.allclose(predict(stub)[0], expected, rtol=1e-5, atol=1e-5),
                                  timeout=30.0)
            # Within two poll intervals (plus slack for a loaded 2-core machine).
            assert tf.timestamp().numpy() - published < 2 * POLL + 5.0

            # A corrupt delta is rejected; both replicas keep serving the same state.
            with open(os.path.join(delta_dir, "999999999999.delta"), "wb") as f:
                f.write(b"MONODLT1 garbage that fails its checksum")
            for replica in replicas:
                replica.poll_now()
            for stub in stubs:
                np.testing.assert_allclose(predict(stub)[0], expected, rtol=1e-5, atol=1e-5)

            # Version 2 appears; the replicas swap to it without failing a request.
            model.fit(*batch(rng, 500), batch_size=100, epochs=1, verbose=0)
            export.save(model, base)
            expected = model.predict(QUERY, verbose=0)
            for stub in stubs:
                assert wait_until(lambda: predict(stub)[1] == 2, timeout=60.0)
                np.testing.assert_allclose(predict(stub)[0], expected, rtol=1e-5, atol=1e-5)
        finally:
            stop.set()
            thread.join()
        assert not failures, failures[:3]
        assert calls[0] > 0
    finally:
        for channel in channels:
            channel.close()
        for replica in replicas:
            replica.stop()

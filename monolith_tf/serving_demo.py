"""The serving half of `make demo`: Monolith's train -> export -> serve -> delta loop.

    python -m monolith_tf.serving_demo [--workdir=/tmp/monolith_serving_demo] [--port=0]

1. trains a two-tower HashEmbedding model on the first part of the built-in
   synthetic stream and exports version 1;
2. starts two serving replicas on loopback (TF Serving's gRPC API);
3. keeps training on later events while a DeltaExporter publishes sparse deltas;
4. queries both replicas with the stock TF Serving client and shows that they
   serve the trainer's new predictions without reloading the model.
"""

import os
import shutil
import time

import grpc
import keras
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from monolith_tf import deltas, export
from monolith_tf.callbacks import DeltaExporter
from monolith_tf.datasets import synthetic
from monolith_tf.layers import HashEmbedding
from monolith_tf.serving import ServingReplica, wait_until

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/monolith_serving_demo", "Where exports and deltas go (replaced).")
_POLL = flags.DEFINE_float("poll_seconds", 0.5, "How often replicas look for new deltas and versions.")
_NAME = "movielens"


def build_model():
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    x = keras.layers.Concatenate()([HashEmbedding(16, name="users", min_count=2)(user),
                                    HashEmbedding(16, name="items")(item)])
    out = keras.layers.Dense(1)(keras.layers.Dense(32, activation="relu")(x))
    model = keras.Model([user, item], out, name=_NAME)
    model.compile(optimizer=keras.optimizers.Adam(0.005), loss="mse")
    return model


def features(frame):
    return {"user": frame["user_id"].to_numpy(np.int64), "item": frame["movie_id"].to_numpy(np.int64)}


def stock_predict(stub, query):
    """One Predict call exactly as any TF Serving client makes it."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = _NAME
    for name, values in query.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    response = stub.Predict(request, timeout=10.0)
    return tf.make_ndarray(response.outputs["predictions"]).ravel(), response.model_spec.version.value


def main(argv):
    del argv
    workdir = _WORKDIR.value
    shutil.rmtree(workdir, ignore_errors=True)
    base, delta_dir = os.path.join(workdir, "models"), os.path.join(workdir, "deltas")
    ratings = synthetic.generate(num_ratings=60_000, seed=7)["ratings"].sort_values("timestamp", kind="stable")
    early, late = ratings.iloc[:40_000], ratings.iloc[40_000:]

    print("[1/4] training on the first 40,000 events, then exporting version 1")
    model = build_model()
    model.fit(features(early), early["rating"].to_numpy(np.float32), batch_size=512, epochs=2, verbose=2)
    print("      exported", export.save(model, base))

    replicas = [ServingReplica(base, _NAME, delta_dir=delta_dir, port=0, poll_seconds=_POLL.value)
                for _ in range(2)]
    channels = []
    try:
        stubs = []
        for replica in replicas:
            ports = replica.start()
            channels.append(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
            stubs.append(prediction_service_pb2_grpc.PredictionServiceStub(channels[-1]))
        print(f"[2/4] two replicas serving on 127.0.0.1:{replicas[0].port} and 127.0.0.1:{replicas[1].port}")
        query = features(late.iloc[:5])
        before = [stock_predict(stub, query)[0] for stub in stubs]
        print("      replica predictions for 5 upcoming events:", np.round(before[0], 3))

        print("[3/4] training on 20,000 later events; DeltaExporter publishes every 10 steps")
        exporter = DeltaExporter(delta_dir, every_n_steps=10, model_name=_NAME)
        model.fit(features(late), late["rating"].to_numpy(np.float32), batch_size=512, epochs=1, verbose=2,
                  callbacks=[exporter])
        published = time.time()
        rows = sum(len(t.keys) for p in exporter.written for t in deltas.read(p).tables)
        print(f"      wrote {len(exporter.written)} delta files ({rows:,} rows) to {delta_dir}")

        expected = model.predict(query, verbose=0).ravel()
        for i, stub in enumerate(stubs):
            ok = wait_until(lambda: np.allclose(stock_predict(stub, query)[0], expected, rtol=1e-5, atol=1e-5),
                            timeout=30.0)
            got, version = stock_predict(stub, query)
            print(f"[4/4] replica {i + 1} (still model version {version}) now serves: {np.round(got, 3)}"
                  f" {'== trainer' if ok else '!= trainer (not caught up)'}"
                  f" ({time.time() - published:.2f} s after the last delta)")
            if not ok:
                raise SystemExit("serving demo: a replica did not pick up the deltas")
        print("      status:", {k: v for k, v in replicas[0].status().items()
                                if k in ("version", "last_delta_sequence", "table_versions")})
    finally:
        for channel in channels:
            channel.close()
        for replica in replicas:
            replica.stop()


if __name__ == "__main__":
    app.run(main)

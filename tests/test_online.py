"""Online training (monolith_tf.online) and its event sources (monolith_tf.streams):
progressive validation, expiry and capacity during a stream, deltas, exact resume
after a crash, followed files, stdin, malformed input, metrics CSV and plot."""

import io
import json
import math
import os
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from monolith_tf import HashTable, deltas, metrics, online, optimizers, streams
from monolith_tf.datasets import synthetic
from monolith_tf.layers import HashEmbedding, embedding_layers

# CSV columns that depend on the wall clock or the process, not on the data.
WALL_COLUMNS = ["rss_bytes", "examples_per_sec", "wall_seconds"]


def ratings(n, **kwargs):
    kwargs.setdefault("num_users", 60)
    kwargs.setdefault("num_items", 90)
    return synthetic.generate(num_ratings=n, **kwargs)["ratings"]


def write_jsonl(path, frame):
    frame.to_json(path, orient="records", lines=True)
    return path


def model(**kwargs):
    kwargs.setdefault("embedding_dim", 4)
    kwargs.setdefault("hidden", (8,))
    return online.make_model(**kwargs)


def trainer(source, **kwargs):
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("batch_size", 50)
    net = kwargs.pop("model", None) or model(**kwargs.pop("model_kwargs", {}))
    return online.OnlineTrainer(net, source, **kwargs)


def table(t, name):
    return next(layer.table for layer in embedding_layers(t.model) if layer.table.name == name)


def assert_deltas_reproduce(delta_dir, tables):
    """Replays every sparse delta in delta_dir, in order, onto fresh tables: they must equal `tables`."""
    replicas = {}
    sparse = [deltas.read(deltas.path_for(str(delta_dir), q)) for q in deltas.list_sequences(str(delta_dir))]
    sparse = [d for d in sparse if d.kind == "sparse"]
    for d in sparse:
        for x in d.tables:
            if x.full or x.name not in replicas:  # a full table replaces the replica's rows
                replicas[x.name] = HashTable(x.dim, initializer="zeros")
            replicas[x.name].apply_delta(x.keys, x.values, x.deleted_keys)
    for tbl in tables:
        keys = np.sort(tbl.export()["keys"].numpy())
        replica = replicas[tbl.name]
        assert int(replica.size()) == len(keys)
        np.testing.assert_array_equal(replica.lookup(keys).numpy(), tbl.lookup(keys).numpy())
    return sparse


# ----------------------------------------------------------------------------- progressive validation


def test_each_batch_is_scored_before_training_on_it(monkeypatch):
    ids = keras.Input((), dtype="int64", name="user_id")
    ts = keras.Input((), dtype="int64", name="timestamp")
    emb = HashEmbedding(1, name="bias", initializer="zeros", optimizer=optimizers.SGD(0.5))
    net = keras.Model([ids, ts], emb(ids, timestamp=ts))
    net.compile(optimizer="sgd", loss="mse")
    # The same 10 users in every batch, each always rating 5: training moves every
    # prediction, so pre- and post-training scores differ in every batch.
    frame = pd.DataFrame({"user_id": np.tile(np.arange(10), 6), "movie_id": 1,
                          "rating": np.float32(5.0), "timestamp": np.arange(60) + 1000})
    t = online.OnlineTrainer(net, streams.FrameSource(frame), batch_size=10, window=10, verbose=0,
                             features=["user_id"])
    before, after, scored = [], [], []
    train = net.train_on_batch

    def spy(x, y):
        before.append(net.predict_on_batch(x).reshape(-1))
        out = train(x, y)
        after.append(net.predict_on_batch(x).reshape(-1))
        return out

    monkeypatch.setattr(net, "train_on_batch", spy)
    t.on_batch = lambda trainer, batch, result: scored.append(result.predictions)
    t.run()
    assert len(scored) == 6
    np.testing.assert_array_equal(scored[0], 0.0)  # nothing trained yet: zero rows
    for s, b, a in zip(scored, before, after):
        np.testing.assert_allclose(s, b, rtol=0, atol=0)
        assert np.all(np.abs(s - a) > 1e-3)
    # Window metrics are those of the pre-training scores, exactly.
    assert [r["window_rmse"] for r in t.rows] == pytest.approx(
        [math.sqrt(np.mean((5.0 - s) ** 2)) for s in scored], rel=1e-12)
    assert t.rows[0]["window_rmse"] == 5.0
    assert t.summary()["rmse"] == pytest.approx(math.sqrt(np.mean((5.0 - np.concatenate(scored)) ** 2)), rel=1e-12)


def test_probability_output_scores_the_binary_label():
    events = ratings(400, seed=6)
    labels = []
    t = trainer(streams.FrameSource(events), batch_size=100, window=200, output="probability",
                model_kwargs={"output": "probability"},
                on_batch=lambda tr, f, r: labels.append((r.targets, r.binary, r.probabilities, r.predictions)))
    s = t.run()
    targets, binary, probabilities, predictions = (np.concatenate(x) for x in zip(*labels))
    # The default label is rating >= binary_threshold, and the sigmoid output is the probability.
    np.testing.assert_array_equal(targets, (events["rating"].to_numpy() >= 4.0).astype(np.float32))
    np.testing.assert_array_equal(binary, targets == 1.0)
    np.testing.assert_array_equal(probabilities, predictions)
    assert math.isnan(s["rmse"]) and all(math.isnan(r["window_rmse"]) for r in t.rows)
    assert s["logloss"] == pytest.approx(metrics.log_loss(binary, probabilities), rel=1e-9)
    assert t.rows[0]["window_auc"] == pytest.approx(metrics.auc(binary[:200], probabilities[:200]), abs=1e-12)


# ----------------------------------------------------------------------------- expiry and capacity


@pytest.mark.parametrize("cadence", [{"expire_every_n_batches": 1}, {"expire_every_seconds": 100}])
def test_rows_expire_by_event_time_during_the_stream(cadence):
    # 600 distinct users, one per second of event time; 7 items, seen all the time.
    frame = pd.DataFrame({"user_id": np.arange(600), "movie_id": np.arange(600) % 7,
                          "rating": np.float32(4.0), "timestamp": 10_000 + np.arange(600)})
    sizes = []
    t = trainer(streams.FrameSource(frame), batch_size=20, window=200, model_kwargs={"expire_after": 50},
                on_batch=lambda tr, f, r: sizes.append(int(table(tr, "user_id_emb").size())), **cadence)
    s = t.run()
    # Reference: after each batch of 20, a due sweep keeps the ids seen in the last 50 s.
    expected, alive, last_sweep, sweeps = [], [], 10_000, 0
    for k in range(30):
        alive += range(20 * k, 20 * k + 20)
        now = 10_000 + 20 * k + 19
        if cadence.get("expire_every_n_batches") or now - last_sweep >= cadence.get("expire_every_seconds", 1e9):
            alive, last_sweep, sweeps = [i for i in alive if 10_000 + i >= now - 50], now, sweeps + 1
        expected.append(len(alive))
    assert sizes == expected and s["expiry_sweeps"] == sweeps
    assert max(sizes) <= 51 + (0 if "expire_every_n_batches" in cadence else 100 - 20) + 20
    users = table(t, "user_id_emb")
    assert sorted(users.export()["keys"].numpy().tolist()) == alive
    assert s["evicted"] == 600 - len(alive)  # items never go idle for 50 s
    assert int(table(t, "movie_id_emb").size()) == 7
    assert [r["rows_user_id_emb"] for r in t.rows] == [sizes[k] for k in (9, 19, 29)]


def test_capacity_bound_and_deltas_replay_onto_a_fresh_table(tmp_path):
    # A long tail of one-off ids overflows the tables; rows also expire; deltas carry all of it.
    source = streams.SyntheticSource(num_users=60, num_items=90, num_ratings=3000, one_off_fraction=0.4, seed=3)
    sizes = []
    t = trainer(source, batch_size=100, window=1000, delta_dir=tmp_path / "deltas", publish_every_n_batches=3,
                expire_every_n_batches=5, model_kwargs={"capacity": 64, "expire_after": 86_400},
                on_batch=lambda tr, f, r: sizes.append([int(x.size()) for x in tr.tables]))
    s = t.run()
    assert s["events"] == 3000 and max(max(x) for x in sizes) <= 64
    assert all(r["rows_user_id_emb"] <= 64 and r["rows_movie_id_emb"] <= 64 for r in t.rows)
    assert s["evicted"] > 0
    sparse = assert_deltas_reproduce(tmp_path / "deltas", t.tables)
    assert len(sparse) == 30 // 3 and sum(len(x.deleted_keys) for d in sparse for x in d.tables) > 0


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    events = ratings(2400, seed=5)
    path = write_jsonl(str(tmp_path / "events.jsonl"), events)
    common = dict(batch_size=100, window=700, checkpoint_every_n_batches=5, expire_every_n_batches=3,
                  publish_every_n_batches=4, model_kwargs={"expire_after": 86_400 * 30})

    def run(name, crash_after=None):
        def crash(tr, frame, result):
            if tr.batches == crash_after:
                raise RuntimeError("simulated crash")
        return trainer(streams.FileSource(path), checkpoint_dir=tmp_path / name / "ckpt",
                       metrics_csv=tmp_path / name / "metrics.csv", delta_dir=tmp_path / name / "deltas",
                       on_batch=crash if crash_after else None, **common)

    whole = run("a")
    whole_summary = whole.run()
    crashed = run("b", crash_after=14)  # checkpointed at batch 10; batches 11-14 are lost
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run()
    # It had written the metrics row of events 701-1400 (at batch 14), after the checkpoint.
    assert list(pd.read_csv(tmp_path / "b" / "metrics.csv")["events"]) == [700, 1400]
    assert online.read_state(str(tmp_path / "b" / "ckpt"))["events"] == 1000
    resumed = run("b")
    assert resumed.resumed_from.endswith("ckpt-0000000010") and resumed.events == 1000
    summary = resumed.run()

    # Every event exactly once, and the very same model as without the crash.
    assert summary["events"] == whole_summary["events"] == len(events) == 2400
    assert summary["events_this_run"] == 1400 and summary["batches"] == 24
    assert summary["position"] == os.path.getsize(path)
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for ta, tb in zip(whole.tables, resumed.tables):
        ea, eb = ta.export(), tb.export()
        for key in ("keys", "values", "slots", "last_seen", "versions", "meta"):
            np.testing.assert_array_equal(ea[key].numpy(), eb[key].numpy())
    for key in ("rmse", "auc", "logloss", "evicted", "expiry_sweeps", "checkpoints"):
        assert summary[key] == whole_summary[key], key
    # Rows and versions match; memory_bytes need not (a restored table is allocated afresh).
    assert ({n: (t["rows"], t["version"]) for n, t in summary["tables"].items()}
            == {n: (t["rows"], t["version"]) for n, t in whole_summary["tables"].items()})
    # Deltas published before the crash are superseded: the restart rolls replicas back to the
    # checkpoint (here with full tables, as the crashed run had published beyond it).
    assert_deltas_reproduce(tmp_path / "b" / "deltas", resumed.tables)
    assert summary["deltas_published"] > whole_summary["deltas_published"]
    # The metrics CSV too: rows written after the checkpoint were dropped on resume, then rewritten.
    csv_a, csv_b = (pd.read_csv(tmp_path / x / "metrics.csv").filter(regex=r"^(?!memory_bytes)")
                    .drop(columns=WALL_COLUMNS + ["deltas_published"]) for x in "ab")
    assert len(csv_a) == 4 and list(csv_a["window_events"]) == [700, 700, 700, 300]
    pd.testing.assert_frame_equal(csv_a, csv_b)
    # A restart after the end has nothing left to train on.
    again = run("b").run()
    assert again["events_this_run"] == 0 and again["events"] == 2400
    assert sorted(os.listdir(tmp_path / "b" / "ckpt"))[:3] == [
        "checkpoint", "ckpt-0000000015.data-00000-of-00001", "ckpt-0000000015.index"]


# ----------------------------------------------------------------------------- sources


def growing_file(tmp_path):
    """A JSONL file of 70 events, and a fake sleep that appends the next 130 over three polls
    (one line split across two of them), advancing a fake clock."""
    lines = ratings(200, seed=2).to_json(orient="records", lines=True).splitlines(keepends=True)
    path = tmp_path / "growing.jsonl"
    path.write_text("".join(lines[:70]))
    appends = [lines[70:120], lines[120:150] + [lines[150][:17]], [lines[150][17:]] + lines[151:200]]
    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
        if appends:
            with open(path, "a") as f:
                f.write("".join(appends.pop(0)))

    return path, sleep, (lambda: now[0]), sleeps, appends


def test_following_a_file_stops_after_idle_timeout(tmp_path):
    path, sleep, clock, sleeps, _ = growing_file(tmp_path)
    source = streams.FileSource(path, follow=True, poll_interval=2.0, idle_timeout=5.0, sleep=sleep, clock=clock)
    sizes = [len(b) for b in source.batches(32)]
    # Full batches, plus a short one each time the reader caught up with the writer.
    assert sizes == [32, 32, 6, 32, 18, 30, 32, 18] and source.tell() == os.path.getsize(path)
    assert sleeps == [2.0] * 6  # three polls found new lines, then 5 s idle ends it


def test_online_training_on_a_growing_jsonl_file(tmp_path):
    path, sleep, clock, sleeps, appends = growing_file(tmp_path)

    def sleep_then_stop(seconds):  # once the writer is done, stop as SIGTERM would
        if not appends:
            t.request_stop()
        sleep(seconds)

    source = streams.FileSource(path, follow=True, poll_interval=2.0, sleep=sleep_then_stop, clock=clock)
    batch_sizes = []
    t = trainer(source, batch_size=32, window=100, checkpoint_dir=tmp_path / "ckpt",
                on_batch=lambda tr, frame, result: batch_sizes.append(len(frame)))
    s = t.run()
    assert s["events"] == 200 and s["position"] == os.path.getsize(path)
    assert batch_sizes == [32, 32, 6, 32, 18, 30, 32, 18] and len(sleeps) == 4
    assert [r["events"] for r in t.rows] == [100, 200]
    assert online.read_state(str(tmp_path / "ckpt"))["position"] == os.path.getsize(path)


def test_stdin_source_and_run_online_write_metrics_csv_and_plot(tmp_path, monkeypatch):
    events = ratings(600, seed=4)
    text = events.to_csv(index=False)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    summary = online.run_online("-", batch_size=64, window=250, embedding_dim=4, hidden="8",
                                metrics_csv=str(tmp_path / "m.csv"), plot_png=str(tmp_path / "m.png"), verbose=0,
                                handle_signals=False)
    assert summary["events"] == 600 and summary["source"] == "<stdin>"
    assert summary["position"] == len(text.encode())
    rows = pd.read_csv(tmp_path / "m.csv")
    assert list(rows["events"]) == [250, 500, 600] and list(rows["partial"]) == [0, 0, 1]
    assert {"window_auc", "cum_logloss", "rows_user_id_emb", "memory_bytes_total", "rss_bytes"} <= set(rows)
    assert rows["rows_user_id_emb"].iloc[-1] == events["user_id"].nunique()
    assert 0 < rows["cum_auc"].iloc[-1] < 1 and rows["rss_bytes"].iloc[-1] > 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_malformed_lines_name_the_file_and_line(tmp_path):
    good = [json.dumps({"user_id": i, "movie_id": 2, "rating": 4, "timestamp": 100 + i}) for i in range(5)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good[:2] + ['{"user_id": 7, "movie_id": 2, "rating": 4'] + good[2:]) + "\n")
    with pytest.raises(streams.MalformedEventError, match=rf"{path}, line 3: invalid JSON"):
        list(streams.FileSource(path).batches(10))
    skipping = streams.FileSource(path, skip_malformed=True)
    assert sum(len(b) for b in skipping.batches(10)) == 5 and skipping.malformed == 1
    cases = {
        "user_id,movie_id,rating,timestamp\n1,2,3,4\n1,2,3\n": "line 3: expected 4 fields, got 3",
        "user_id,movie_id,rating,timestamp\n1,2,x,4\n": "line 2: bad rating 'x'",
        "user_id,movie_id,timestamp\n1,2,4\n": "line 1: CSV header lacks column",
        '{"user_id": 1, "movie_id": 2, "rating": 3, "timestamp": 4}\n[1, 2]\n': "line 2: expected a JSON object",
        '{"user_id": 1.5, "movie_id": 2, "rating": 3, "timestamp": 4}\n': "line 1: bad user_id 1.5",
        '{"user_id": 1, "movie_id": 2, "timestamp": 4}\n': "line 1: missing rating",
        # Past int64: ids and times become int64 arrays.
        '{"user_id": 1, "movie_id": 2, "rating": 3, "timestamp": 1e30}\n': "line 1: bad timestamp 1e\\+30 \\(outside",
        '{"user_id": 99999999999999999999, "movie_id": 2, "rating": 3, "timestamp": 4}\n':
            "line 1: bad user_id 99999999999999999999 \\(outside the int64 range",
        "user_id,movie_id,rating,timestamp\n1,2,3,4\n1,-9223372036854775809,3,4\n": "line 3: bad movie_id",
    }
    for k, (text, message) in enumerate(cases.items()):
        bad = tmp_path / (f"c{k}.csv" if text.startswith("user") else f"c{k}.jsonl")
        bad.write_text(text)
        with pytest.raises(streams.MalformedEventError, match=f"{bad}, {message}"):
            list(streams.FileSource(bad).batches(10))
    huge = tmp_path / "huge.jsonl"
    huge.write_text(good[0] + '\n{"user_id": 1, "movie_id": 2, "rating": 3, "timestamp": 1e30}\n' + good[1] + "\n")
    skipping = streams.FileSource(huge, skip_malformed=True)
    assert sum(len(b) for b in skipping.batches(10)) == 2 and skipping.malformed == 1
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(good[0].encode() + b"\n\xff\xfe\n")
    with pytest.raises(streams.MalformedEventError, match="line 2: not UTF-8"):
        list(streams.FileSource(binary).batches(10))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "synthetic", "frame"])
def test_sources_resume_exactly_from_any_reported_position(tmp_path, kind):
    events = ratings(230, seed=1)
    events["note"] = [f"n{i}" for i in range(len(events))]  # extra columns ride along

    def make():
        if kind == "jsonl":
            return streams.FileSource(write_jsonl(str(tmp_path / "e.jsonl"), events))
        if kind == "csv":
            (tmp_path / "e.csv").write_text(events.to_csv(index=False))
            return streams.FileSource(tmp_path / "e.csv")
        if kind == "synthetic":
            return streams.SyntheticSource(num_users=60, num_items=90, num_ratings=230, seed=1)
        return streams.FrameSource(events)

    source = make()
    positions, frames = [], []
    for frame in source.batches(40):
        positions.append(source.tell())
        frames.append(frame)
    whole = pd.concat(frames, ignore_index=True)
    assert len(whole) == 230 and [len(f) for f in frames] == [40] * 5 + [30]
    pd.testing.assert_frame_equal(whole[["user_id", "movie_id", "rating", "timestamp"]],
                                  events[["user_id", "movie_id", "rating", "timestamp"]])
    if kind in ("jsonl", "csv", "frame"):
        assert list(whole["note"]) == list(events["note"])
    for k, position in enumerate(positions):
        again = make()
        again.seek(position)
        rest = list(again.batches(64))
        expected = whole.iloc[40 * (k + 1):].reset_index(drop=True)
        got = pd.concat(rest, ignore_index=True) if rest else expected.iloc[:0]
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_stdin_resumes_by_skipping_forward(monkeypatch):
    text = ratings(50).to_json(orient="records", lines=True)
    first = streams.FileSource("-", stdin=io.BytesIO(text.encode()))
    batches = first.batches(20)
    next(batches)
    position = first.tell()
    batches.close()
    pipe = io.BufferedReader(io.BytesIO(text.encode()))
    pipe.seekable = lambda: False  # like a pipe
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(pipe))
    rest = streams.FileSource("-")
    rest.seek(position)
    assert sum(len(b) for b in rest.batches(100)) == 30
    with pytest.raises(ValueError, match="cannot seek back"):
        rest.seek(0)


def test_movielens_source_is_in_stable_timestamp_order(movielens_100k_dir):
    source = streams.MovieLensSource(movielens_100k_dir, with_metadata=True)
    raw = pd.read_csv(movielens_100k_dir / "u.data", sep="\t", names=["user_id", "movie_id", "rating", "timestamp"])
    expected = raw.sort_values("timestamp", kind="stable").reset_index(drop=True)
    frames = list(source.batches(30_000))
    got = pd.concat(frames, ignore_index=True)
    np.testing.assert_array_equal(got[["user_id", "movie_id", "timestamp"]].to_numpy(),
                                  expected[["user_id", "movie_id", "timestamp"]].to_numpy())
    assert {"gender", "age", "genres", "title"} <= set(got.columns) and source.tell() == 100_000
    source.seek(99_990)
    assert len(next(source.batches(100))) == 10


def test_argument_errors(tmp_path):
    events = streams.FrameSource(ratings(10))
    net = model()
    with pytest.raises(ValueError, match=r"features do not match the model's inputs .* not fed \['movie_id'\]"):
        online.OnlineTrainer(net, events, features=["user_id"])
    uncompiled = keras.Model(net.inputs, net.outputs)
    with pytest.raises(ValueError, match="compile the model first"):
        online.OnlineTrainer(uncompiled, events)
    with pytest.raises(ValueError, match="window must be"):
        online.OnlineTrainer(net, events, window=0)
    with pytest.raises(ValueError, match="lack column"):
        online.OnlineTrainer(net, streams.FrameSource(ratings(10).drop(columns="movie_id"), required=()),
                             verbose=0).run()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        streams.FileSource(tmp_path / "missing.jsonl")

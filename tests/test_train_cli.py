"""`monolith-train` (python -m monolith_tf.train) and `make demo` (python -m monolith_tf.demo),
run in subprocesses exactly as a user runs them: on small synthetic data, on a tiny
ml-100k-format folder, and with bad --data."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from monolith_tf import Monolith, train
from monolith_tf.datasets import movielens, synthetic

REPO = Path(__file__).resolve().parent.parent
METRICS = re.compile(r"test RMSE: ([0-9.]+)  MAE: ([0-9.]+)  AUC: ([0-9.]+)  \(rating >= 4 positive; (\d+) test")
REC_LINE = re.compile(r"^\s+(\d+)\. item (\d+)\s+([0-9.]+)(?:  (.*))?$")


def run_module(module, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def recommendations(stdout):
    return [REC_LINE.match(line).groups() for line in stdout.splitlines() if REC_LINE.match(line)]


def write_ml100k_folder(folder, num_users=60, num_items=90, num_ratings=1800, seed=5):
    """A tiny MovieLens 100K-format folder (u.data, u.item, u.user) from synthetic data."""
    data = synthetic.generate(num_users=num_users, num_items=num_items, num_ratings=num_ratings, seed=seed)
    folder.mkdir()
    r = data["ratings"]
    lines = [f"{u}\t{i}\t{int(x)}\t{t}" for u, i, x, t in zip(r.user_id, r.movie_id, r.rating, r.timestamp)]
    (folder / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    genres = list(movielens.ML_100K_GENRES)
    items = []
    for movie_id, genre_list in zip(data["movies"].movie_id, data["movies"].genres):
        flags = "|".join("1" if g in genre_list else "0" for g in genres)
        items.append(f"{movie_id}|Tiny Film {movie_id} (199{movie_id % 10})|01-Jan-1995||http://x|{flags}")
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    users = [f"{u}|{a}|{g}|{o}|{z}" for u, a, g, o, z in data["users"][["user_id", "age", "gender", "occupation",
                                                                         "zip_code"]].itertuples(index=False)]
    (folder / "u.user").write_text("\n".join(users) + "\n", encoding="latin-1")
    return data


def test_demo_trains_on_synthetic_data_and_saves(tmp_path):
    # `make demo` is `python -m monolith_tf.demo`; command-line flags override its defaults.
    result = run_module("monolith_tf.demo", "--synthetic_ratings=3000", "--synthetic_users=100",
                        "--synthetic_items=150", "--epochs=2", f"--model_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "data: built-in synthetic data: 3000 ratings" in out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out  # the Keras progress bar
    rmse, mae, auc, n = METRICS.search(out).groups()
    assert 0.3 < float(mae) <= float(rmse) < 1.6 and 0.5 < float(auc) <= 1.0 and int(n) == 600
    saved = tmp_path / "out" / "model.monolith"
    assert f"saved model: {saved}" in out and os.listdir(tmp_path / "out") == ["model.monolith"]
    recs = recommendations(out)
    assert len(recs) == 10 and all(title.startswith("Synthetic Movie") for *_, title in recs)
    assert [int(rank) for rank, *_ in recs] == list(range(1, 11))
    assert [float(s) for _, _, s, _ in recs] == sorted((float(s) for _, _, s, _ in recs), reverse=True)

    model = Monolith.load(saved)
    user = int(re.search(r"recommendations for user (\d+)", out).group(1))
    # The saved model recommends what was printed (scores printed to 2 decimals).
    np.testing.assert_array_equal(model.recommend(user, top_k=10), [int(item) for _, item, _, _ in recs])


def test_train_on_a_movielens_folder_with_temporal_split(tmp_path):
    data = write_ml100k_folder(tmp_path / "ml-tiny")
    user = int(data["ratings"]["user_id"].value_counts().index[3])
    result = run_module("monolith_tf.train", f"--data={tmp_path / 'ml-tiny'}", "--split=temporal",
                        "--test_fraction=0.25", "--epochs=2", "--min_count=2", "--embedding_dim=16",
                        "--hidden_units=", "--noverbose", f"--user_id={user}", "--top_k=5",
                        f"--model_dir={tmp_path / 'model'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "data: ml-100k from" in out and "split: temporal, 1350 train / 450 test" in out
    assert "Epoch" not in out  # --noverbose: no progress bar
    assert int(METRICS.search(out).group(4)) == 450
    assert "table rows: " in out and "user_embedding" in out
    recs = recommendations(out)
    assert len(recs) == 5
    assert all(title == f"Tiny Film {item} (199{int(item) % 10})" for _, item, _, title in recs)
    # Items the user rated in the training (older) part are never recommended.
    ratings = data["ratings"].sort_values("timestamp", kind="stable").iloc[:1350]
    rated = set(ratings.loc[ratings["user_id"] == user, "movie_id"].tolist())
    assert rated and not rated & {int(item) for _, item, _, _ in recs}
    assert Monolith.load(tmp_path / "model" / "model.monolith").embedding_dim == 16


def test_missing_data_folder_is_a_one_line_error(tmp_path):
    result = run_module("monolith_tf.train", f"--data={tmp_path / 'no-such-folder'}",
                        f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("monolith-train: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(r"--data: MovieLens folder .*no-such-folder does not exist", errors[0])
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def train_on_u_data(tmp_path, capsys, text):
    """Runs monolith-train on a folder whose u.data holds `text`, in process on
    private flag values (sparing another TensorFlow start-up); returns
    (exit code, stderr lines). Nothing may be written to --model_dir."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "u.data").write_text(text)
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["monolith-train", f"--data={tmp_path / 'data'}", f"--model_dir={tmp_path / 'm'}"])
    with pytest.raises(SystemExit) as exit_info:
        train.main(["monolith-train"], fv)
    assert not (tmp_path / "m").exists()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_malformed_data_file_is_a_one_line_error(tmp_path, capsys):
    code, err = train_on_u_data(tmp_path, capsys, "1\t2\t4\t881250949\n1\t2\n")
    assert code == 2
    assert len(err) == 1 and re.match(r"monolith-train: error: --data: .*u\.data, line 2: ", err[0])


def test_empty_ratings_file_is_a_one_line_error_naming_the_folder(tmp_path, capsys):
    code, err = train_on_u_data(tmp_path, capsys, "")
    assert code == 2
    assert err == [f"monolith-train: error: --data: {tmp_path / 'data'} holds no ratings "
                   "(ml-100k format, empty ratings file)"]

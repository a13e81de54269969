"""`monolith-train --mode=online`: the online trainer behind absl flags.

Most runs are in process on private FlagValues (one TensorFlow start-up for the file); the
stdin source and absl's own parse errors run `python -m monolith_tf.train` in a subprocess,
as a user runs it. Streams are a few thousand events so the file stays well under a minute.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from absl import flags

from monolith_tf import train
from monolith_tf.datasets import synthetic

REPO = Path(__file__).resolve().parent.parent


def parse(*args):
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["monolith-train", *args])
    return fv


def run_cli(*args):
    """train_online on private flags; returns the summary (problems raise train.UserError)."""
    return train.train_online(parse(*args))


def run_module(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "monolith_tf.train", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=120)


def events_frame(n, seed=3):
    return synthetic.generate(num_users=80, num_items=120, num_ratings=n, seed=seed)["ratings"]


def test_every_flag_belongs_to_batch_online_or_both():
    fv = flags.FlagValues()
    train.define_flags(fv)
    names = set(fv)
    assert set(train.BATCH_ONLY_FLAGS) <= names and set(train.ONLINE_ONLY_FLAGS) <= names
    assert not set(train.BATCH_ONLY_FLAGS) & set(train.ONLINE_ONLY_FLAGS)
    shared = names - set(train.BATCH_ONLY_FLAGS) - set(train.ONLINE_ONLY_FLAGS)
    assert shared == {"mode", "data", "synthetic_users", "synthetic_items", "synthetic_ratings", "embedding_dim",
                      "min_count", "batch_size", "learning_rate", "table_learning_rate", "hidden_units",
                      "expire_after", "seed", "verbose"}
    assert set(train.ONLINE_DEFAULTS) <= shared


def test_synthetic_stream_metrics_csv_plot_and_resume_exactly_once(tmp_path, capsys):
    common = ["--mode=online", "--synthetic_ratings=3000", "--synthetic_users=150", "--synthetic_items=200",
              "--batch_size=128", "--window=500", "--expire_after=864000", "--expire_every_seconds=86400",
              "--noverbose"]
    ckpt, csv_path, png = tmp_path / "ckpt", tmp_path / "metrics.csv", tmp_path / "metrics.png"
    outputs = [f"--checkpoint_dir={ckpt}", f"--metrics_csv={csv_path}", f"--plot_png={png}"]

    first = run_cli(*common, *outputs, "--max_batches=9", "--checkpoint_every_n_batches=4")
    assert (first["events"], first["batches"], first["position"]) == (9 * 128, 9, 9 * 128)
    state = json.loads((ckpt / "online_state.json").read_text())
    assert state["events"] == 9 * 128 and state["position"] == 9 * 128
    out = capsys.readouterr().out
    assert "trained 1,152 events in 9 batches this run" in out and f"checkpoint: {ckpt}" in out

    second = run_cli(*common, *outputs)
    out = capsys.readouterr().out
    assert second["resumed_from"] == str(ckpt / "ckpt-0000000009")
    # Exactly once: this run trains what the first did not, and the totals are the stream's length.
    assert second["events_this_run"] == 3000 - 9 * 128 and second["events"] == 3000
    assert "3,000 events in 24 batches in all" in out and "resumed from" in out

    rows = pd.read_csv(csv_path)
    assert rows["events"].tolist() == [500, 1000, 1500, 2000, 2500, 3000]
    assert (rows["window_events"] == 500).all() and (rows["partial"] == 0).all()
    assert rows["window_auc"].between(0.4, 1.0).all() and rows["window_rmse"].between(0.5, 2.0).all()
    assert rows["window_logloss"].between(0.3, 1.0).all() and rows["expiry_sweeps"].iloc[-1] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same stream uninterrupted gives the same cumulative metrics: nothing counted twice.
    whole = run_cli(*common)
    assert whole["events"] == 3000 and whole["auc"] == pytest.approx(second["auc"], abs=1e-9)
    assert whole["logloss"] == pytest.approx(second["logloss"], rel=1e-6)
    assert whole["rmse"] == pytest.approx(second["rmse"], rel=1e-6)


def test_jsonl_file_source_and_malformed_lines(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    frame = events_frame(1500)
    path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    summary = run_cli("--mode=online", f"--data={path}", "--batch_size=256", "--window=500", "--noverbose",
                      "--embedding_dim=8", "--hidden_units=16")
    assert summary["events"] == 1500 and summary["position"] == path.stat().st_size
    assert summary["source"] == str(path) and 0.3 < summary["auc"] < 1.0

    with path.open("a") as f:
        f.write('{"user_id": 1, "movie_id": oops}\n')
        f.write(json.dumps({"user_id": 2, "movie_id": 3, "rating": 4.0, "timestamp": int(frame.timestamp.max())})
                + "\n")
    capsys.readouterr()
    fv = parse("--mode=online", f"--data={path}", "--noverbose", "--batch_size=512")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["monolith-train"], fv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"monolith-train: error: --data: {re.escape(str(path))}, line 1501: "
                                      r"invalid JSON .*--skip_malformed", err[0])

    summary = run_cli("--mode=online", f"--data={path}", "--noverbose", "--batch_size=512", "--skip_malformed")
    assert summary["events"] == 1501 and summary["malformed"] == 1
    assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_stdin_source_with_python_dash_m(tmp_path):
    frame = events_frame(900, seed=4)
    result = run_module("--mode=online", "--data=-", "--input_format=csv", "--window=300", "--batch_size=100",
                        f"--metrics_csv={tmp_path / 'm.csv'}", stdin=frame.to_csv(index=False))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "online: <stdin>" in result.stdout
    assert "trained 900 events in 9 batches this run" in result.stdout
    assert re.search(r"cumulative AUC: 0\.\d{4}  log loss: 0\.\d{4}  RMSE: [01]\.\d{4}", result.stdout)
    # The progress lines go to stderr, one per window.
    assert len(re.findall(r"^\[online\] +\d[\d,]* ev ", result.stderr, re.M)) == 3
    assert pd.read_csv(tmp_path / "m.csv")["events"].tolist() == [300, 600, 900]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--mode=batch", "--checkpoint_dir=ck"], r"--checkpoint_dir only applies to --mode=online \(this is "
                                              r"--mode=batch\)"),
    (["--window=5"], r"--window only applies to --mode=online"),
    (["--mode=online", "--epochs=3", "--top_k=2"], r"--epochs, --top_k only apply to --mode=batch"),
    (["--mode=online", "--model_dir=m"], r"--model_dir only applies to --mode=batch"),
    (["--mode=online", "--data=no/such/events.jsonl"], r"--data: no/such/events\.jsonl does not exist"),
    (["--mode=online", "--publish_every_n_batches=5"], r"--publish_every_n_batches needs --delta_dir"),
    (["--mode=online", "--noresume"], r"--resume needs --checkpoint_dir"),
    (["--mode=online", "--expire_after=100"], r"--expire_after needs a sweep cadence"),
    (["--mode=online", "--follow"], r"--follow needs --data"),
    (["--mode=online", "--data=EVENTS", "--one_off_fraction=0.1"], r"--one_off_fraction only applies to the "
                                                                   r"synthetic stream"),
    (["--mode=online", "--data=EVENTS", "--with_metadata"], r"--with_metadata needs --data to be a MovieLens"),
])
def test_usage_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EVENTS").write_text('{"user_id": 1, "movie_id": 2, "rating": 4, "timestamp": 5}\n')
    fv = parse(*args)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["monolith-train"], fv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and re.match(r"monolith-train: error: " + message, err[0]), err
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == ["EVENTS"]


def test_unknown_flag_exits_without_traceback():
    result = run_module("--mode=online", "--bogus=1")
    assert result.returncode != 0 and "Unknown command line flag 'bogus'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--input_format=xml"], r"flag --input_format=xml: value should be one of <jsonl\|csv\|tsv>"),
    (["--window=0"], r"flag --window=0: 0 is not a positive integer"),
    (["--expire_every_seconds=0"], r"flag --expire_every_seconds=0.0: must be > 0"),
])
def test_bad_flag_values_name_the_flag(args, message):
    # app.run prints these parse errors in one message and exits with status 1.
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse("--mode=online", *args)

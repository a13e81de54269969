"""`monolith-train`: train the `Monolith` estimator on MovieLens, report test metrics, save it,
and print recommendations.

    python -m monolith_tf.train --data=/path/to/ml-100k --epochs=12 --model_dir=/tmp/ml100k

Without --data it trains on the built-in synthetic MovieLens-shaped data
(`monolith_tf.datasets.synthetic`). Steps: load, split (--split=random: the same rows as
sklearn's train_test_split with random_state=--seed; --split=temporal: the newest ratings are
the test set), fit with a Keras progress bar, print test RMSE, MAE and AUC (rating >= 4 is
positive), save the model to --model_dir/model.monolith, and print the top-k items for a sample
user (with titles when the data has them). A bad --data path or file is reported in one line on
stderr with exit status 2.

    python -m monolith_tf.train --mode=online --synthetic_ratings=1000000 --one_off_fraction=0.1 \
        --expire_after=2592000 --expire_every_seconds=86400 --checkpoint_dir=/tmp/online \
        --metrics_csv=/tmp/online/metrics.csv --plot_png=/tmp/online/metrics.png

--mode=online trains on a stream instead (`monolith_tf.online.run_online`, docs/online.md): each
mini-batch is scored by the current model, then trained on, once, in event-time order; --data is
a MovieLens folder, a JSON-lines/CSV events file or '-' for stdin (default: the synthetic drifting
stream). Flags that mean the same in both modes are shared (--data, --synthetic_*, --embedding_dim,
--hidden_units, --min_count, --expire_after, --batch_size, --learning_rate, --table_learning_rate,
--seed, --verbose); a few have another default online (see ONLINE_DEFAULTS). A flag of one mode given
in the other is a usage error.
"""

import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from monolith_tf import optimizers, streams
from monolith_tf.datasets import movielens, splits, synthetic
from monolith_tf.estimator import Monolith

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines monolith-train's flags on `flag_values` (once). Only the programs call this with
    the global FLAGS, so importing this module next to another absl program cannot clash."""
    if "synthetic_ratings" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("mode", "batch", ["batch", "online"],
                      "batch: fit the Monolith estimator for --epochs, test, save, recommend. online: one pass "
                      "over an event stream, scoring each mini-batch before training on it (docs/online.md).", **fv)
    flags.DEFINE_string("data", None,
                        "MovieLens folder (ml-100k, ml-1m, ml-latest...); online also a JSON-lines/CSV/TSV events "
                        "file or '-' for stdin. Default: built-in synthetic data (online: the synthetic drifting "
                        "stream).", **fv)
    flags.DEFINE_integer("synthetic_users", 943, "Users of the synthetic data (without --data); online: regular "
                         "users of the stream.", lower_bound=1, **fv)
    flags.DEFINE_integer("synthetic_items", 1682, "Items of the synthetic data (without --data); online: regular "
                         "items of the stream.", lower_bound=1, **fv)
    flags.DEFINE_integer("synthetic_ratings", 100_000, "Ratings of the synthetic data (without --data); online: "
                         "events in the stream.", lower_bound=10, **fv)
    flags.DEFINE_string("model_dir", "/tmp/monolith_model", "Where model.monolith is written.", **fv)
    flags.DEFINE_integer("epochs", 10, "Training passes over the training split.", lower_bound=1, **fv)
    flags.DEFINE_enum("split", "random", ["random", "temporal"], "How the test set is chosen.", **fv)
    flags.DEFINE_float("test_fraction", 0.2, "Share of ratings held out for testing.", lower_bound=0.0,
                       upper_bound=1.0, **fv)
    flags.DEFINE_integer("embedding_dim", 64, "Embedding width (online default: 16).", lower_bound=1, **fv)
    flags.DEFINE_integer("min_count", 10, "Frequency filter: occurrences before an id gets an embedding row "
                         "(the estimator's eviction_threshold; online default: 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", 256, "Examples per training step.", lower_bound=1, **fv)
    flags.DEFINE_float("learning_rate", 0.001, "Keras Adam learning rate of the dense weights (online default: "
                       "0.003).", lower_bound=0.0, **fv)
    flags.DEFINE_float("table_learning_rate", 0.005, "Learning rate of the embedding tables' optimizer: Adam in "
                       "batch mode, Adagrad online (online default: 0.1).", lower_bound=0.0, **fv)
    flags.DEFINE_float("l2", 4e-4, "Per-occurrence L2 on embedding rows.", lower_bound=0.0, **fv)
    flags.DEFINE_list("hidden_units", ["64"], "MLP hidden layer widths (empty for none).", **fv)
    flags.DEFINE_bool("collisionless", True, "Collisionless tables; --nocollisionless uses the hashed baseline.", **fv)
    flags.DEFINE_integer("num_buckets", None, "Rows per table of the hashed baseline (--nocollisionless).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("expire_after", None, "Evict rows idle for this many seconds of event time.",
                         lower_bound=1, **fv)
    flags.DEFINE_bool("side_features", True, "Use user attributes and movie genres when the data has them.", **fv)
    flags.DEFINE_integer("seed", 42, "Seeds the split, the synthetic data and the model (online default: 0).", **fv)
    flags.DEFINE_integer("user_id", None, "User to recommend for (default: the most active training user).", **fv)
    flags.DEFINE_integer("top_k", 10, "How many recommendations to print.", lower_bound=1, **fv)
    flags.DEFINE_bool("verbose", True, "Keras progress bar while training; online: a progress line per --window "
                      "events (stderr).", **fv)
    _define_online_flags(fv)


def _define_online_flags(fv):
    """Flags of --mode=online only, named like `online.run_online`'s keywords."""
    flags.DEFINE_enum("input_format", None, ["jsonl", "csv", "tsv"], "Format of the --data events file or "
                      "stdin. Default: from the extension, else guessed from the first line.", **fv)
    flags.DEFINE_bool("follow", False, "Keep reading the --data file as it grows, like tail -f.", **fv)
    flags.DEFINE_float("poll_interval", 1.0, "Seconds between looks at a followed file.", **fv)
    flags.DEFINE_float("idle_timeout", None, "Stop following after this many seconds without a new line "
                       "(default: never; stop with Ctrl-C).", lower_bound=0.0, **fv)
    flags.DEFINE_bool("skip_malformed", False, "Count and skip bad lines of the events file instead of failing.",
                      **fv)
    flags.DEFINE_bool("with_metadata", False, "MovieLens --data: join user and movie columns onto the events.", **fv)
    flags.DEFINE_float("drift", 1.0, "Synthetic stream: radians every taste rotates over the timeline.", **fv)
    flags.DEFINE_float("one_off_fraction", 0.0, "Synthetic stream: share of users and of items replaced by "
                       "brand-new ids seen once.", lower_bound=0.0, upper_bound=1.0, **fv)
    flags.DEFINE_list("features", None, "Id columns, one HashEmbedding each (default: user_id,movie_id).", **fv)
    flags.DEFINE_integer("capacity", None, "Hard bound on rows per table (least recently seen rows go first).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("max_batches", None, "Stop (and checkpoint) after this many batches in this run.",
                         lower_bound=1, **fv)
    flags.DEFINE_string("label", None, "Label column (default: rating; with --output=probability, "
                        "rating >= --binary_threshold).", **fv)
    flags.DEFINE_enum("output", "rating", ["rating", "probability"], "What the model predicts.", **fv)
    flags.DEFINE_float("binary_threshold", 4.0, "A rating >= this is a positive for AUC and log loss.", **fv)
    flags.DEFINE_integer("window", 10_000, "Events per metrics row and progress line.", lower_bound=1, **fv)
    flags.DEFINE_integer("expire_every_n_batches", None, "Expiry sweep every n batches.", lower_bound=1, **fv)
    flags.DEFINE_float("expire_every_seconds", None, "Expiry sweep whenever event time advanced this much.", **fv)
    flags.DEFINE_string("delta_dir", None, "Publish sparse deltas for serving replicas here.", **fv)
    flags.DEFINE_integer("publish_every_n_batches", None, "Publish a delta every n batches.", lower_bound=1, **fv)
    flags.DEFINE_float("publish_every_seconds", None, "Publish a delta every this many seconds of wall time.", **fv)
    flags.DEFINE_integer("dense_every_n_deltas", None, "Include the dense weights in every n-th delta.",
                         lower_bound=1, **fv)
    flags.DEFINE_string("checkpoint_dir", None, "Checkpoints and online_state.json; an existing state is resumed "
                        "(exactly once: from the recorded stream position).", **fv)
    flags.DEFINE_integer("checkpoint_every_n_batches", None, "Checkpoint every n batches (also at the end).",
                         lower_bound=1, **fv)
    flags.DEFINE_float("checkpoint_every_seconds", None, "Checkpoint every this many seconds of wall time.", **fv)
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept in --checkpoint_dir.", lower_bound=2, **fv)
    flags.DEFINE_bool("resume", True, "Resume from --checkpoint_dir's state if there is one.", **fv)
    flags.DEFINE_string("metrics_csv", None, "One row per --window events: AUC, log loss, RMSE, rows, RSS...", **fv)
    flags.DEFINE_string("plot_png", None, "Plot of the metrics, drawn at the end of the run.", **fv)
    for name in ("poll_interval", "expire_every_seconds", "publish_every_seconds", "checkpoint_every_seconds"):
        flags.register_validator(name, lambda v: v is None or v > 0, message="must be > 0", **fv)


_SAVE_NAME = "model.monolith"


class UserError(Exception):
    """A problem with the command line or the data, reported in one line without a traceback."""


def _load_data(fv):
    if fv.data is None:
        data = synthetic.generate(fv.synthetic_users, fv.synthetic_items, fv.synthetic_ratings,
                                  seed=fv.seed)
        return data, "built-in synthetic data"
    try:
        data = movielens.load(fv.data)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--data: {e}") from None
    if len(data["ratings"]) == 0:
        raise UserError(f"--data: {fv.data} holds no ratings ({data['format']} format, empty ratings file)")
    return data, f"{data['format']} from {fv.data}"


def _split(fv, ratings):
    if not 0.0 < fv.test_fraction < 1.0:
        raise UserError(f"--test_fraction must be in (0, 1), got {fv.test_fraction}")
    try:
        if fv.split == "random":
            return splits.random_split(ratings, fv.test_fraction, fv.seed)
        return splits.temporal_split(ratings, fv.test_fraction)
    except ValueError as e:
        raise UserError(f"--split={fv.split}: {e}") from None


def _hidden_units(fv):
    try:
        return [int(width) for width in fv.hidden_units if width.strip()]
    except ValueError:
        raise UserError(f"--hidden_units must be integers, got {','.join(fv.hidden_units)}") from None


def _titles(data):
    movies = data.get("movies")
    if movies is None or "title" not in movies.columns:
        return {}
    return dict(zip(movies["movie_id"].tolist(), movies["title"].tolist()))


def _estimator(fv):
    try:
        return Monolith(
            name="Monolith_Model", embedding_dim=fv.embedding_dim, collisionless=fv.collisionless,
            eviction_threshold=fv.min_count, epochs=fv.epochs, batch_size=fv.batch_size,
            learning_rate=fv.learning_rate, verbose=fv.verbose,
            table_optimizer=optimizers.Adam(fv.table_learning_rate), l2=fv.l2,
            hidden_units=_hidden_units(fv), num_buckets=fv.num_buckets, expire_after=fv.expire_after,
            side_features=fv.side_features, seed=fv.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def train(fv=FLAGS):
    """Runs the whole job with parsed flag values; returns (estimator, test metrics).

    Problems with the command line or the data raise `UserError`."""
    data, source = _load_data(fv)
    ratings = data["ratings"]
    train_set, test_set = _split(fv, ratings)
    print(f"data: {source}: {len(ratings)} ratings, {ratings['user_id'].nunique()} users, "
          f"{ratings['movie_id'].nunique()} items", flush=True)
    print(f"split: {fv.split}, {len(train_set)} train / {len(test_set)} test "
          f"(test_fraction={fv.test_fraction}, seed={fv.seed})", flush=True)

    model = _estimator(fv)
    fit_data = {"ratings": train_set}
    for key in ("users", "movies"):
        if key in data:
            fit_data[key] = data[key]
    start = time.time()
    model.fit(data=fit_data)
    seconds = time.time() - start

    metrics = model.evaluate(test_set["user_id"].to_numpy(), test_set["movie_id"].to_numpy(),
                             test_set["rating"].to_numpy())
    print(f"trained {fv.epochs} epochs in {seconds:.1f}s "
          f"({'collisionless' if fv.collisionless else f'hashed, {model.num_buckets} buckets'})")
    sizes = model.table_sizes()
    if sizes:
        print("table rows: " + ", ".join(f"{name} {rows}" for name, rows in sizes.items()))
    print(f"test RMSE: {metrics['rmse']:.4f}  MAE: {metrics['mae']:.4f}  "
          f"AUC: {metrics['auc']:.4f}  (rating >= 4 positive; {metrics['n']} test ratings)", flush=True)

    path = os.path.join(fv.model_dir, _SAVE_NAME)
    try:
        model.save(path)
    except OSError as e:
        raise UserError(f"--model_dir: cannot write {path}: {e}") from None
    print(f"saved model: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")

    user = fv.user_id
    if user is None:
        user = int(train_set["user_id"].value_counts().idxmax())
    items, scores = model.recommend(user, fv.top_k, return_scores=True)
    titles = _titles(data)
    print(f"top-{fv.top_k} recommendations for user {user} "
          f"({len(model.rated_items(user))} rated items excluded):")
    for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), 1):
        title = titles.get(item)
        print(f"  {rank:2d}. item {item:<7d} {score:.2f}" + (f"  {title}" if title else ""))
    return model, metrics


# ----------------------------------------------------------------------------- --mode=online

# Flags of one mode only; every other flag is shared. A flag of one mode given in the other is a
# usage error rather than silently ignored (a user passing --epochs online expects it to matter).
BATCH_ONLY_FLAGS = ("model_dir", "epochs", "split", "test_fraction", "l2", "collisionless", "num_buckets",
                    "side_features", "user_id", "top_k")
ONLINE_ONLY_FLAGS = ("input_format", "follow", "poll_interval", "idle_timeout", "skip_malformed", "with_metadata",
                     "drift", "one_off_fraction", "features", "capacity", "max_batches", "label", "output",
                     "binary_threshold", "window", "expire_every_n_batches", "expire_every_seconds", "delta_dir",
                     "publish_every_n_batches", "publish_every_seconds", "dense_every_n_deltas", "checkpoint_dir",
                     "checkpoint_every_n_batches", "checkpoint_every_seconds", "keep_checkpoints", "resume",
                     "metrics_csv", "plot_png")
# Shared flags whose batch default does not suit online training: these are run_online's defaults
# (the best of a small sweep on the synthetic stream, docs/online.md; tables use Adagrad online).
ONLINE_DEFAULTS = {"embedding_dim": 16, "min_count": 1, "learning_rate": 3e-3, "table_learning_rate": 0.1,
                   "seed": 0}

_FILE_FLAGS = ("input_format", "follow", "poll_interval", "idle_timeout", "skip_malformed")
_SYNTHETIC_FLAGS = ("synthetic_users", "synthetic_items", "synthetic_ratings", "drift", "one_off_fraction")
# flag -> the flag it needs: cadences and settings that do nothing without their feature.
_NEEDS = {"publish_every_n_batches": "delta_dir", "publish_every_seconds": "delta_dir",
          "dense_every_n_deltas": "delta_dir", "checkpoint_every_n_batches": "checkpoint_dir",
          "checkpoint_every_seconds": "checkpoint_dir", "keep_checkpoints": "checkpoint_dir",
          "resume": "checkpoint_dir", "expire_every_n_batches": "expire_after",
          "expire_every_seconds": "expire_after"}


def _verb(names, singular, plural):
    return singular if len(names) == 1 else plural


def _given(fv, name):
    return fv[name].present


def _check_mode_flags(fv):
    """Raises UserError for a flag of the other mode, or an online flag that would have no effect."""
    other = ONLINE_ONLY_FLAGS if fv.mode == "batch" else BATCH_ONLY_FLAGS
    wrong = [f"--{name}" for name in other if _given(fv, name)]
    if wrong:
        needed = "online" if fv.mode == "batch" else "batch"
        raise UserError(f"{', '.join(wrong)} only {_verb(wrong, 'applies', 'apply')} to --mode={needed} "
                        f"(this is --mode={fv.mode})")
    if fv.mode == "batch":
        return
    for name, needs in _NEEDS.items():
        if _given(fv, name) and fv[needs].value is None:
            raise UserError(f"--{name} needs --{needs}")
    if fv.expire_after is not None and fv.expire_every_n_batches is None and fv.expire_every_seconds is None:
        raise UserError("--expire_after needs a sweep cadence online: --expire_every_seconds (event time) "
                        "and/or --expire_every_n_batches")
    data = fv.data
    if data is None:
        misplaced = [f"--{n}" for n in _FILE_FLAGS + ("with_metadata",) if _given(fv, n)]
        if misplaced:
            raise UserError(f"{', '.join(misplaced)} {_verb(misplaced, 'needs', 'need')} --data (an events file, "
                            "'-', or a MovieLens folder)")
        return
    misplaced = [f"--{n}" for n in _SYNTHETIC_FLAGS if _given(fv, n)]
    if misplaced:
        raise UserError(f"{', '.join(misplaced)} only {_verb(misplaced, 'applies', 'apply')} to the synthetic "
                        "stream (without --data)")
    is_folder = data != "-" and os.path.isdir(data)
    misplaced = [f"--{n}" for n in (_FILE_FLAGS if is_folder else ("with_metadata",)) if _given(fv, n)]
    if misplaced:
        kind = "an events file or '-'" if is_folder else "a MovieLens folder"
        raise UserError(f"{', '.join(misplaced)} {_verb(misplaced, 'needs', 'need')} --data to be {kind}, "
                        f"not {data}")


def _online_value(fv, name):
    """A shared flag's value online: as given, else its online default."""
    return fv[name].value if _given(fv, name) or name not in ONLINE_DEFAULTS else ONLINE_DEFAULTS[name]


def _online_source(fv):
    """The EventSource for --data, opened here so that errors name the flag."""
    data = fv.data
    if data is None:
        return streams.SyntheticSource(fv.synthetic_users, fv.synthetic_items, fv.synthetic_ratings,
                                       seed=_online_value(fv, "seed"), drift=fv.drift,
                                       one_off_fraction=fv.one_off_fraction)
    if data != "-" and os.path.isdir(data):
        try:
            return streams.MovieLensSource(data, with_metadata=fv.with_metadata)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UserError(f"--data: {e}") from None
    if data != "-" and not os.path.exists(data):
        raise UserError(f"--data: {data} does not exist (expected a MovieLens folder, an events file "
                        "(.jsonl, .csv, .tsv) or '-' for stdin)")
    try:
        return streams.FileSource(data, format=fv.input_format, follow=fv.follow, poll_interval=fv.poll_interval,
                                  idle_timeout=fv.idle_timeout, skip_malformed=fv.skip_malformed)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--data: {e}") from None


def train_online(fv=FLAGS):
    """--mode=online: trains with `online.run_online` on parsed flag values; returns its summary.

    Problems with the command line, the data or the checkpoint directory raise `UserError`."""
    from monolith_tf import online  # imported here: batch mode does not need it

    _check_mode_flags(fv)
    hidden = _hidden_units(fv)
    events = _online_source(fv)
    if "verbosity" in FLAGS and not FLAGS["verbosity"].present:
        # app.run logs at INFO, and TensorFlow logs a line per checkpoint write at INFO: that
        # would drown the progress lines. --verbosity=0 brings them back.
        absl_logging.set_verbosity(absl_logging.WARNING)
    print(f"online: {events.name}, batch {fv.batch_size}, window {fv.window}", flush=True)
    try:
        summary = online.run_online(
            events, batch_size=fv.batch_size, max_batches=fv.max_batches,
            features=fv.features, embedding_dim=_online_value(fv, "embedding_dim"), hidden=hidden,
            expire_after=fv.expire_after, capacity=fv.capacity, min_count=_online_value(fv, "min_count"),
            learning_rate=_online_value(fv, "learning_rate"),
            table_learning_rate=_online_value(fv, "table_learning_rate"), seed=_online_value(fv, "seed"),
            label=fv.label, output=fv.output, binary_threshold=fv.binary_threshold, window=fv.window,
            expire_every_n_batches=fv.expire_every_n_batches, expire_every_seconds=fv.expire_every_seconds,
            delta_dir=fv.delta_dir, publish_every_n_batches=fv.publish_every_n_batches,
            publish_every_seconds=fv.publish_every_seconds, dense_every_n_deltas=fv.dense_every_n_deltas,
            checkpoint_dir=fv.checkpoint_dir, checkpoint_every_n_batches=fv.checkpoint_every_n_batches,
            checkpoint_every_seconds=fv.checkpoint_every_seconds, keep_checkpoints=fv.keep_checkpoints,
            resume=fv.resume, metrics_csv=fv.metrics_csv, plot_png=fv.plot_png, verbose=int(fv.verbose))
    except streams.MalformedEventError as e:
        raise UserError(f"--data: {e} (--skip_malformed skips such lines)") from None
    except (ValueError, OSError) as e:
        # The trainer's messages name its keyword, which is the flag's name.
        raise UserError(str(e)) from None
    _print_online_summary(summary)
    return summary


def _print_online_summary(s):
    resumed = f", resumed from {s['resumed_from']}" if s["resumed_from"] else ""
    print(f"trained {s['events_this_run']:,} events in {s['batches_this_run']:,} batches this run "
          f"({s['examples_per_sec']:,.0f} events/s{resumed}); {s['events']:,} events in {s['batches']:,} batches "
          f"in all, source position {s['position']}")
    print(f"cumulative AUC: {s['auc']:.4f}  log loss: {s['logloss']:.4f}  RMSE: {s['rmse']:.4f}  "
          f"(progressive validation: every event scored before training on it)")
    print("table rows: " + ", ".join(f"{name} {t['rows']:,} ({t['memory_bytes'] / 2**20:.1f} MiB)"
                                     for name, t in s["tables"].items())
          + f"; evicted {s['evicted']:,} in {s['expiry_sweeps']:,} sweeps"
          + (f"; rss {s['rss_bytes'] / 2**20:.0f} MiB" if s["rss_bytes"] else ""))
    if s["malformed"]:
        print(f"skipped {s['malformed']:,} malformed lines")
    outputs = [f"{what}: {path}" for what, path in (("checkpoint", s["last_checkpoint"]),
                                                     ("metrics", s["metrics_csv"]), ("plot", s["plot_png"])) if path]
    if s["deltas_published"]:
        outputs.append(f"deltas published: {s['deltas_published']}")
    if outputs:
        print("; ".join(outputs), flush=True)


def main(argv, flag_values=FLAGS):
    """absl main: runs `train` (or `train_online` with --mode=online), turning a UserError into one
    line on stderr and exit status 2."""
    if len(argv) > 1:
        print(f"monolith-train: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    try:
        if flag_values.mode == "online":
            train_online(flag_values)
        else:
            _check_mode_flags(flag_values)
            train(flag_values)
    except UserError as e:
        print(f"monolith-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    """Console-script entry point (`monolith-train`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()

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
"""

import os
import sys
import time

from absl import app, flags

from monolith_tf import optimizers
from monolith_tf.datasets import movielens, splits, synthetic
from monolith_tf.estimator import Monolith

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines monolith-train's flags on `flag_values` (once). Only the programs call this with
    the global FLAGS, so importing this module next to another absl program cannot clash."""
    if "synthetic_ratings" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("data", None,
                        "MovieLens folder (ml-100k, ml-1m, ml-latest...). Default: built-in synthetic data.", **fv)
    flags.DEFINE_integer("synthetic_users", 943, "Users of the synthetic data (without --data).", lower_bound=1, **fv)
    flags.DEFINE_integer("synthetic_items", 1682, "Items of the synthetic data (without --data).", lower_bound=1, **fv)
    flags.DEFINE_integer("synthetic_ratings", 100_000, "Ratings of the synthetic data (without --data).",
                         lower_bound=10, **fv)
    flags.DEFINE_string("model_dir", "/tmp/monolith_model", "Where model.monolith is written.", **fv)
    flags.DEFINE_integer("epochs", 10, "Training passes over the training split.", lower_bound=1, **fv)
    flags.DEFINE_enum("split", "random", ["random", "temporal"], "How the test set is chosen.", **fv)
    flags.DEFINE_float("test_fraction", 0.2, "Share of ratings held out for testing.", lower_bound=0.0,
                       upper_bound=1.0, **fv)
    flags.DEFINE_integer("embedding_dim", 64, "Embedding width.", lower_bound=1, **fv)
    flags.DEFINE_integer("min_count", 10, "Frequency filter: occurrences before an id gets an embedding row "
                         "(the estimator's eviction_threshold).", lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", 256, "Examples per training step.", lower_bound=1, **fv)
    flags.DEFINE_float("learning_rate", 0.001, "Keras Adam learning rate of the dense weights.", lower_bound=0.0, **fv)
    flags.DEFINE_float("table_learning_rate", 0.005, "Adam learning rate of the embedding tables.",
                       lower_bound=0.0, **fv)
    flags.DEFINE_float("l2", 4e-4, "Per-occurrence L2 on embedding rows.", lower_bound=0.0, **fv)
    flags.DEFINE_list("hidden_units", ["64"], "MLP hidden layer widths (empty for none).", **fv)
    flags.DEFINE_bool("collisionless", True, "Collisionless tables; --nocollisionless uses the hashed baseline.", **fv)
    flags.DEFINE_integer("num_buckets", None, "Rows per table of the hashed baseline (--nocollisionless).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("expire_after", None, "Evict rows idle for this many seconds of event time.",
                         lower_bound=1, **fv)
    flags.DEFINE_bool("side_features", True, "Use user attributes and movie genres when the data has them.", **fv)
    flags.DEFINE_integer("seed", 42, "Seeds the split, the synthetic data and the model.", **fv)
    flags.DEFINE_integer("user_id", None, "User to recommend for (default: the most active training user).", **fv)
    flags.DEFINE_integer("top_k", 10, "How many recommendations to print.", lower_bound=1, **fv)
    flags.DEFINE_bool("verbose", True, "Keras progress bar while training.", **fv)


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


def main(argv, flag_values=FLAGS):
    """absl main: runs `train`, turning a UserError into one line on stderr and exit status 2."""
    if len(argv) > 1:
        print(f"monolith-train: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    try:
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

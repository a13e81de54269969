"""Benchmark: examples/s of `model.fit` with HashEmbedding vs keras.layers.Embedding.

The same small rating model (user id, item id -> embedding dim 32 each ->
concat -> Dense(64, relu) -> Dense(1), mse, Keras Adam(1e-3) for the dense
weights) is built three ways and trained, in the same process, on the same
batches through the same tf.data pipeline (numpy -> from_tensor_slices ->
batch -> prefetch):

  HashEmbedding      monolith_tf.HashEmbedding for both ids, on the raw ids.
                     Rows are created on first sight and updated by the
                     table's fused optimizer (--table_optimizer, default Adam
                     with the same hyperparameters as the Keras one).
  Embedding/sparse   keras.layers.Embedding over a fixed vocabulary: the ids
                     are remapped to 0..V-1 with numpy before timing (V = every
                     distinct id of the dataset). Two changes make it the
                     fastest static alternative at large V: rows are gathered
                     from the variable itself (tf.nn.embedding_lookup, a sparse
                     read) and the model's optimizer is a lazy Adam that
                     updates only the rows in the batch (plain Adam for dense
                     weights). See "Why two Embedding variants" below.
  Embedding/stock    keras.layers.Embedding + keras.optimizers.Adam, unmodified.

Datasets:
  ml-100k    MovieLens 100k (from $MONOLITH_DATA_DIR, then
             <repo>/../shared/data/ml-100k, as tests/conftest.py looks),
             reshuffled each epoch and repeated as needed.
  synthetic  a numpy stream of --synthetic_events ratings whose user ids are a
             Zipf-ish mix: a popular core (Zipf 1.0 over distinct_users/10
             ids) plus brand-new ids seen once, so about
             --synthetic_distinct_users (10M) distinct user ids appear; items
             are Zipf 0.8 over --synthetic_items ids. Ids are scrambled into
             the whole int64 range, like hashed ids. The timed steps cover the
             whole stream after warm-up, so the hash tables grow to ~10M rows.

Method, per (dataset, steps_per_execution): build every model, warm each up
on the same first --warmup_steps batches (tracing excluded), then time the
remaining steps split into --rounds rounds; within a round the models take
turns on the same batches (one fit call each), so background load hits them
alike. Time is taken inside fit, from the end of its first execution to the
end of its last (a callback), so iterator setup and teardown are not counted
(teardown can wait seconds for tf.data's autotune thread; see timed_fit). A
model's rate is (examples timed) / (seconds timed) over all rounds. The ratio
is HashEmbedding over the fastest Embedding variant, both aggregated and as the
median of the per-round ratios; the verdict (target >= 0.7x) uses the median.

Why two Embedding variants: at 10M rows stock keras.layers.Embedding + Adam
updates every row each step (Keras 3's Adam densifies the IndexedSlices
gradient), and any sparse update instead puts the variable in copy-on-read
mode, after which Keras' Embedding.call (ops.take -> convert_to_tensor of the
whole table) copies the full table every step. So Embedding/stock only gets
--stock_steps timed steps when the vocabulary exceeds --stock_full_vocab (at
10M it takes seconds per step), outside the alternating rounds.

  .venv/bin/python bench/train_throughput.py --quick   # smoke run, ~4 minutes
  .venv/bin/python bench/train_throughput.py           # full run, ~25 minutes on 2 busy cores, ~10 GB RAM
"""

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

# Run as `python bench/train_throughput.py` from a source checkout: import the
# package next to this directory (with its freshly built op library).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["ml-100k", "synthetic"], "Datasets to run: ml-100k, synthetic.")
flags.DEFINE_integer("steps", None, "Timed steps per model and setting (default: ml-100k 4000; synthetic: "
                     "the whole stream after warm-up). Rounded down to a multiple of rounds * max(spe).")
flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
flags.DEFINE_bool("quick", False, "Smoke run: small synthetic stream (1M events, 500k users), fewer steps.")
flags.DEFINE_list("spe", ["1", "16"], "steps_per_execution settings to compare.")
flags.DEFINE_integer("warmup_steps", 300, "Untimed steps per model before timing (rounded up to a multiple "
                     "of max(spe)); they include tracing.")
flags.DEFINE_integer("rounds", 10, "Timed steps are split into this many rounds; models alternate within each.")
flags.DEFINE_integer("synthetic_events", 16_000_000, "Ratings in the synthetic stream.")
flags.DEFINE_integer("synthetic_distinct_users", 10_000_000, "Distinct user ids the synthetic stream aims for.")
flags.DEFINE_integer("synthetic_items", 100_000, "Item ids in the synthetic stream (Zipf 0.8).")
flags.DEFINE_integer("stock_steps", 16, "Timed steps for Embedding/stock on datasets whose vocabulary exceeds "
                     "--stock_full_vocab (it densifies the table each step); rounded up to a multiple of max(spe).")
flags.DEFINE_integer("stock_full_vocab", 100_000, "Vocabulary size up to which Embedding/stock gets all steps.")
flags.DEFINE_bool("stock", True, "Include the unmodified keras.layers.Embedding + Adam.")
flags.DEFINE_enum("table_optimizer", "adam", ["adam", "adagrad"], "HashEmbedding's fused optimizer.")
flags.DEFINE_string("data_dir", None, "ml-100k folder (default: $MONOLITH_DATA_DIR, then ../shared/data/ml-100k).")
flags.DEFINE_string("out_png", os.path.join(_REPO, "docs", "train_throughput.png"), "Bar chart path ('' = none).")
flags.DEFINE_string("out_json", "", "Optional path for the raw results as JSON.")
flags.DEFINE_float("target", 0.7, "Target for HashEmbedding / fastest Embedding.")
flags.DEFINE_integer("seed", 0, "Seed for data, shuffling and initializers.")

EMBED_DIM = 32
LEARNING_RATE = 1e-3
MODELS = ("HashEmbedding", "Embedding/sparse", "Embedding/stock")

_T0 = time.time()


def log(msg):
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def find_ml100k():
    """The ml-100k folder, located like tests/conftest.py does; exits if absent."""
    candidates = []
    if FLAGS.data_dir:
        candidates.append(FLAGS.data_dir)
    env = os.environ.get("MONOLITH_DATA_DIR")
    if env:
        candidates += [env, os.path.join(env, "ml-100k")]
    candidates.append(os.path.join(os.path.dirname(_REPO), "shared", "data", "ml-100k"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "u.data")):
            return folder
    sys.exit("train_throughput: MovieLens ml-100k not found (looked for u.data in: " + ", ".join(candidates) +
             "). Download https://files.grouplens.org/datasets/movielens/ml-100k.zip, unzip it and set "
             "MONOLITH_DATA_DIR (or --data_dir) to the ml-100k folder, or run with --datasets synthetic.")


def load_ml100k(total_rows, seed):
    """ml-100k ratings, reshuffled each epoch and repeated up to total_rows."""
    import numpy as np
    from monolith_tf.datasets import movielens
    folder = find_ml100k()
    ratings = movielens.load(folder)["ratings"]
    users = ratings["user_id"].to_numpy(np.int64)
    items = ratings["movie_id"].to_numpy(np.int64)
    stars = ratings["rating"].to_numpy(np.float32)
    rng = np.random.default_rng(seed)
    epochs = -(-total_rows // len(users))
    order = np.concatenate([rng.permutation(len(users)) for _ in range(epochs)])[:total_rows]
    info = f"ml-100k from {folder}: {len(users):,} ratings, {len(np.unique(users)):,} users, " \
           f"{len(np.unique(items)):,} items, repeated over {epochs} shuffled epochs"
    return users[order], items[order], stars[order], info


def _scramble(ids):
    """A fixed bijection of int64 (splitmix64's finalizer): small ids -> hash-like ids."""
    import numpy as np
    z = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.view(np.int64)


def _zipf_draws(rng, size, count, exponent):
    """`count` draws of 0..size-1 with weight rank^-exponent, ranks in random id order."""
    import numpy as np
    cumulative = np.cumsum(np.arange(1, size + 1, dtype=np.float64) ** -exponent)
    rank = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    return rng.permutation(size)[np.minimum(rank, size - 1)]


def make_synthetic(events, distinct_users, num_items, seed):
    """(users, items, ratings, info): a stream where ~distinct_users user ids appear."""
    import numpy as np
    rng = np.random.default_rng(seed)
    core = max(1, distinct_users // 10)
    users = _zipf_draws(rng, core, events, 1.0).astype(np.int64)
    seen = int(np.count_nonzero(np.bincount(users, minlength=core)))
    one_off = int(min(max(distinct_users - seen, 0), events))
    # Brand-new ids at random positions, numbered in order of appearance after the core.
    where = np.sort(rng.choice(events, one_off, replace=False))
    users[where] = core + np.arange(one_off, dtype=np.int64)
    items = _zipf_draws(rng, num_items, events, 0.8).astype(np.int64)
    stars = rng.integers(1, 6, events).astype(np.float32)  # throughput does not depend on the values
    users, items = _scramble(users), _scramble(items + (1 << 40))
    info = (f"synthetic: {events:,} events; user ids: a Zipf-1.0 core of {core:,} ids ({seen:,} drawn) + "
            f"{one_off:,} one-off ids ({one_off / events:.0%} of events); items Zipf-0.8 over {num_items:,}")
    return users, items, stars, info


def remap(ids):
    """(ids remapped to 0..V-1, V) with numpy: the static vocabulary, built before timing."""
    import numpy as np
    vocab, index = np.unique(ids, return_inverse=True)
    return index.astype(np.int64), len(vocab)


def make_dataset(users, items, stars, batch_size):
    """The one input pipeline every model uses."""
    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices(({"user": users, "item": items}, stars[:, None]))
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- models


def _lazy_adam_class():
    import keras
    import tensorflow as tf

    class LazyAdam(keras.optimizers.Adam):
        """Keras Adam, except that an IndexedSlices gradient updates only its rows
        (m, v and the variable), like tf.compat.v1's lazy Adam; dense gradients
        take the stock path."""

        def update_step(self, gradient, variable, learning_rate):
            if not isinstance(gradient, tf.IndexedSlices):
                return super().update_step(gradient, variable, learning_rate)
            dtype = variable.dtype
            rows, position = tf.unique(gradient.indices)
            grad = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.shape(rows)[0])
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            alpha = tf.cast(learning_rate, dtype) * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
            index = self._get_variable_index(variable)
            m, v = self._momentums[index], self._velocities[index]
            m_rows = beta_1 * tf.gather(m.value, rows) + (1 - beta_1) * grad
            v_rows = beta_2 * tf.gather(v.value, rows) + (1 - beta_2) * tf.square(grad)
            self.assign(m, tf.IndexedSlices(m_rows, rows))
            self.assign(v, tf.IndexedSlices(v_rows, rows))
            self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))

    return LazyAdam


def _gather_embedding_class():
    import keras
    import tensorflow as tf

    class GatherEmbedding(keras.layers.Embedding):
        """keras.layers.Embedding whose lookup reads only the batch's rows from the
        variable (ResourceGather); the stock call converts the whole table to a
        tensor first, which costs a full copy once the variable is updated sparsely."""

        def call(self, inputs):
            return tf.nn.embedding_lookup(self.embeddings.value, tf.cast(inputs, tf.int64))

    return GatherEmbedding


def build_model(kind, vocab, spe, seed):
    """The rating model with `kind`'s embeddings, compiled for model.fit."""
    import keras
    from monolith_tf import optimizers as table_optimizers
    from monolith_tf.layers import HashEmbedding

    def embedding(name, size):
        if kind == "HashEmbedding":
            table_opt = (table_optimizers.Adam(LEARNING_RATE) if FLAGS.table_optimizer == "adam"
                         else table_optimizers.Adagrad(0.05))
            return HashEmbedding(EMBED_DIM, optimizer=table_opt, seed=seed, name=name)
        cls = _gather_embedding_class() if kind == "Embedding/sparse" else keras.layers.Embedding
        return cls(size, EMBED_DIM, embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=seed),
                   name=name)

    user = keras.Input(shape=(), dtype="int64", name="user")
    item = keras.Input(shape=(), dtype="int64", name="item")
    x = keras.layers.Concatenate()([embedding("user_embedding", vocab["user"])(user),
                                    embedding("item_embedding", vocab["item"])(item)])
    x = keras.layers.Dense(64, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    model = keras.Model({"user": user, "item": item}, out, name=kind.replace("/", "_"))
    optimizer = (_lazy_adam_class() if kind == "Embedding/sparse" else keras.optimizers.Adam)(LEARNING_RATE)
    # jit_compile=False is what "auto" resolves to on CPU anyway (and our ops have no XLA kernels).
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=spe, jit_compile=False)
    return model


# ----------------------------------------------------------------------------- timing


class _CpuMeter:
    """Wall time, this process's CPU time and the machine's busy CPU time over an interval."""

    @staticmethod
    def _machine_busy():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.wall, self.own, self.busy = time.perf_counter(), self._own(), self._machine_busy()

    @staticmethod
    def _own():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def foreign_cores(self):
        """Cores other processes kept busy on average since construction."""
        wall = time.perf_counter() - self.wall
        other = (self._machine_busy() - self.busy) - (self._own() - self.own)
        return max(other, 0.0) / wall if wall > 0 else 0.0


def _progress_callback(label, steps):
    import keras

    class Progress(keras.callbacks.Callback):
        """Prints a progress line every 15 s and records when each execution ends:
        with steps_per_execution=k, on_train_batch_end(i) follows steps i-k+1..i."""

        def on_train_begin(self, logs=None):
            self.start = self.last = time.perf_counter()
            self.first = self.final = None  # (time, steps done) at the first / latest batch end

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            done = batch + 1
            if self.first is None:
                self.first = (now, done)
            self.final = (now, done)
            if now - self.last >= 15:
                self.last = now
                log(f"  {label}: step {done:,}/{steps:,}, {done * FLAGS.batch_size / (now - self.start):,.0f} ex/s")

    return Progress()


def timed_fit(model, users, items, stars, label):
    """One model.fit pass over the given rows.

    Returns (seconds, steps, wall, loss): the steps between the end of the first
    execution and the end of the last one and the seconds they took (so neither
    tracing, iterator setup nor iterator teardown is timed), the wall time of
    the whole fit call, and the epoch's mean loss. Teardown matters: destroying
    a tf.data iterator with autotuning on (the default) waits for the autotune
    thread's next wake-up (10 ms * (2^k - 1) after the iterator started,
    doubling up to every 60 s), which can double a short fit call.
    """
    dataset = make_dataset(users, items, stars, FLAGS.batch_size)
    steps = len(users) // FLAGS.batch_size
    progress = _progress_callback(label, steps)
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[progress])
    wall = time.perf_counter() - start
    (t_first, s_first), (t_last, s_last) = progress.first, progress.final
    return t_last - t_first, s_last - s_first, wall, history.history["loss"][-1]


def run_setting(name, data, spe, warmup, steps, rounds, seed):
    """One (dataset, steps_per_execution) comparison; returns per-model results."""
    import keras
    batch = FLAGS.batch_size
    kinds = [k for k in MODELS if FLAGS.stock or k != "Embedding/stock"]
    stock_limited = "Embedding/stock" in kinds and max(data["vocab"].values()) > FLAGS.stock_full_vocab
    main_kinds = [k for k in kinds if not (stock_limited and k == "Embedding/stock")]
    per_round = steps // rounds
    results = {}

    def columns(kind, lo, hi):
        ids = data["raw"] if kind == "HashEmbedding" else data["remapped"]
        return ids[0][lo * batch:hi * batch], ids[1][lo * batch:hi * batch], data["stars"][lo * batch:hi * batch]

    def measure(group, warmup, group_rounds, group_steps):
        models = {}
        for kind in group:
            keras.utils.clear_session()
            models[kind] = build_model(kind, data["vocab"], spe, seed)
            if warmup:
                start = time.perf_counter()
                timed_fit(models[kind], *columns(kind, 0, warmup), label=f"{name} spe={spe} {kind} warm-up")
                log(f"{name} spe={spe} {kind}: warm-up {warmup} steps (with tracing) "
                    f"{time.perf_counter() - start:.1f}s")
            results[kind] = {"seconds": 0.0, "steps": 0, "wall": 0.0, "round_rates": [], "foreign": []}
        for r in range(group_rounds):
            lo = warmup + r * group_steps
            for kind, model in models.items():
                meter = _CpuMeter()
                seconds, timed, wall, loss = timed_fit(model, *columns(kind, lo, lo + group_steps),
                                                       label=f"{name} spe={spe} round {r + 1}/{group_rounds} {kind}")
                res = results[kind]
                res["seconds"] += seconds
                res["steps"] += timed
                res["wall"] += wall
                res["round_rates"].append(timed * batch / seconds)
                res["foreign"].append(meter.foreign_cores())
                log(f"{name} spe={spe} round {r + 1}/{group_rounds} {kind}: {timed} steps in {seconds:.1f}s = "
                    f"{res['round_rates'][-1]:,.0f} ex/s, loss {loss:.3f}; fit() wall {wall:.1f}s; other processes: "
                    f"{res['foreign'][-1]:.2f} cores")
        models.clear()
        keras.utils.clear_session()
        gc.collect()

    measure(main_kinds, warmup, rounds, per_round)
    if stock_limited:
        # No separate warm-up: the first execution (which traces) is never timed.
        stock_steps = max(spe, -(-FLAGS.stock_steps // spe) * spe)
        log(f"{name} spe={spe} Embedding/stock: vocabulary {max(data['vocab'].values()):,} > "
            f"{FLAGS.stock_full_vocab:,}, so only {stock_steps} timed steps after one untimed execution")
        measure(["Embedding/stock"], 0, 1, stock_steps + spe)
    for res in results.values():
        res["rate"] = res["steps"] * batch / res["seconds"]
    # Paired per-round ratios: HashEmbedding against the fastest static model of the same round.
    static = [k for k in main_kinds if k != "HashEmbedding"]
    if "HashEmbedding" in main_kinds and static:
        paired = [results["HashEmbedding"]["round_rates"][r] / max(results[k]["round_rates"][r] for k in static)
                  for r in range(rounds)]
        results["HashEmbedding"]["paired_ratio_median"] = statistics.median(paired)
    return results


# ----------------------------------------------------------------------------- report


def machine_info():
    import keras
    import tensorflow as tf
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        head = subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", _REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        head += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem / 2**30, "tf": tf.__version__,
            "keras": keras.__version__, "git": head}


def ratios(res):
    """(aggregate ratio, fastest static model, paired median ratio or None, PASS/MISS).

    The verdict uses the median of the paired per-round ratios when there is
    one: each pair ran back to back on the same batches, so it is the estimate
    least moved by other processes' load. The aggregate ratio is also shown.
    """
    static = {k: r["rate"] for k, r in res.items() if k != "HashEmbedding"}
    best = max(static, key=static.get)
    aggregate = res["HashEmbedding"]["rate"] / static[best]
    paired = res["HashEmbedding"].get("paired_ratio_median")
    decisive = aggregate if paired is None else paired
    return aggregate, best, paired, "PASS" if decisive >= FLAGS.target else "MISS"


def report(all_results, infos, machine, command, wall):
    lines = []
    p = lines.append
    p(f"Command: `{command}`")
    p("")
    p(f"Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['mem_gib']:.0f} GiB RAM; "
      f"TensorFlow {machine['tf']}, Keras {machine['keras']}; commit {machine['git']}; run took {wall / 60:.1f} min.")
    p("")
    for info in infos:
        p(f"- {info}")
    p("")
    p(f"Batch {FLAGS.batch_size}; embedding dim {EMBED_DIM}; Keras Adam({LEARNING_RATE:g}) for dense weights; "
      f"HashEmbedding table optimizer: fused {FLAGS.table_optimizer}.")
    p("")
    p("| dataset | steps_per_execution | HashEmbedding ex/s | Embedding/sparse ex/s | Embedding/stock ex/s "
      f"| HashEmbedding / fastest Embedding (aggregate) | median of paired per-round ratios "
      f"| target >= {FLAGS.target:g}x |")
    p("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for (name, spe), res in all_results.items():
        aggregate, best, paired, verdict = ratios(res)
        cells = [f"{res[k]['rate']:,.0f}" if k in res else "-" for k in MODELS]
        paired = f"{paired:.2f}x" if paired is not None else "-"
        p(f"| {name} | {spe} | {' | '.join(cells)} | {aggregate:.2f}x (vs {best}) | {paired} | {verdict} |")
    p("")
    p("Per model: steps timed (between the ends of the first and last execution of each fit call), their "
      "seconds, the wall time of those fit calls (including iterator setup/teardown), examples/s of each round "
      "(min - max) and the most cores other processes kept busy during a round:")
    p("")
    p("| dataset | spe | model | timed steps | seconds | fit() wall s | ex/s per round (min - max) "
      "| other processes (cores) |")
    p("|---|---:|---|---:|---:|---:|---:|---:|")
    for (name, spe), res in all_results.items():
        for kind, r in res.items():
            p(f"| {name} | {spe} | {kind} | {r['steps']:,} | {r['seconds']:.1f} | {r['wall']:.1f} | "
              f"{min(r['round_rates']):,.0f} - {max(r['round_rates']):,.0f} | {max(r['foreign']):.2f} |")
    return "\n".join(lines)


def plot(all_results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(name for name, _ in all_results))
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5), squeeze=False)
    colors = {"HashEmbedding": "tab:blue", "Embedding/sparse": "tab:orange", "Embedding/stock": "tab:gray"}
    for ax, name in zip(axes[0], names):
        settings = [(spe, res) for (n, spe), res in all_results.items() if n == name]
        width = 0.8 / len(MODELS)
        for j, kind in enumerate(MODELS):
            xs = [i + (j - (len(MODELS) - 1) / 2) * width for i in range(len(settings))]
            ys = [res[kind]["rate"] if kind in res else 0 for _, res in settings]
            bars = ax.bar(xs, ys, width, label=kind, color=colors[kind])
            for bar, y in zip(bars, ys):
                if y:
                    ax.annotate(f"{y / 1000:,.1f}k" if y >= 1000 else f"{y:,.0f}", (bar.get_x() + bar.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=7)
        labels = []
        for spe, res in settings:
            aggregate, _, paired, verdict = ratios(res)
            shown = f"{aggregate:.2f}x" + (f", paired {paired:.2f}x" if paired is not None else "")
            labels.append(f"steps_per_execution={spe}\nHashEmbedding / fastest:\n{shown} ({verdict})")
        ax.set_xticks(range(len(settings)), labels)
        rates = [r["rate"] for _, res in settings for r in res.values()]
        if max(rates) / min(rates) > 20:  # the stock Embedding at a 10M vocabulary: log scale
            ax.set_yscale("log")
            ax.set_ylim(10 ** math.floor(math.log10(min(rates))), max(rates) * 3)
            ax.set_ylabel("examples / s (log scale)")
        else:
            ax.set_ylim(0, max(rates) * 1.25)
            ax.set_ylabel("examples / s")
        ax.set_title(f"{name}: model.fit throughput, batch {FLAGS.batch_size}")
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    wall0 = time.perf_counter()
    unknown = set(FLAGS.datasets) - {"ml-100k", "synthetic"}
    if unknown:
        raise app.UsageError(f"--datasets: unknown {sorted(unknown)}; expected ml-100k, synthetic")
    spes = [int(s) for s in FLAGS.spe]
    unit = max(spes)
    events, distinct = FLAGS.synthetic_events, FLAGS.synthetic_distinct_users
    default_steps = {"ml-100k": 4000}
    if FLAGS.quick:
        events, distinct = 1_000_000, 500_000
        default_steps = {"ml-100k": 320}
    if "ml-100k" in FLAGS.datasets:
        find_ml100k()  # fail fast, before any work
    machine = machine_info()
    log(f"{machine['nproc']} cores ({machine['cpu']}), TensorFlow {machine['tf']}, Keras {machine['keras']}")

    def rounded_down(steps):
        return max(FLAGS.rounds * unit, steps // (FLAGS.rounds * unit) * (FLAGS.rounds * unit))

    warmup = -(-FLAGS.warmup_steps // unit) * unit
    all_results, infos = {}, []
    for name in FLAGS.datasets:
        if name == "ml-100k":
            steps = rounded_down(FLAGS.steps or default_steps[name])
            users, items, stars, info = load_ml100k((warmup + steps) * FLAGS.batch_size, FLAGS.seed)
        else:
            log(f"generating the synthetic stream ({events:,} events, ~{distinct:,} distinct users)")
            users, items, stars, info = make_synthetic(events, distinct, FLAGS.synthetic_items, FLAGS.seed)
            available = len(users) // FLAGS.batch_size - warmup
            if available < FLAGS.rounds * unit:
                raise app.UsageError(f"--synthetic_events {events:,} is too small for warm-up + timed steps")
            steps = rounded_down(min(FLAGS.steps or available, available))
        log(info)
        start = time.perf_counter()
        (user_idx, num_users), (item_idx, num_items) = remap(users), remap(items)
        used = (warmup + steps) * FLAGS.batch_size
        distinct_used = len(np.unique(users[:used]))
        info += (f"; {distinct_used:,} distinct user ids in the batches used (warm-up + timed); static vocabulary "
                 f"{num_users:,} users + {num_items:,} items, remapped in {time.perf_counter() - start:.1f}s "
                 f"(untimed); {warmup} warm-up + {steps:,} timed steps per model in {FLAGS.rounds} rounds")
        infos.append(info)
        data = {"raw": (users, items), "remapped": (user_idx, item_idx), "stars": stars,
                "vocab": {"user": num_users, "item": num_items}}
        for spe in spes:
            all_results[(name, spe)] = run_setting(name, data, spe, warmup, steps, FLAGS.rounds, FLAGS.seed)
        del data, users, items, stars, user_idx, item_idx
        gc.collect()

    command = "TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/train_throughput.py " + " ".join(sys.argv[1:])
    text = report(all_results, infos, machine, command.strip(), time.perf_counter() - wall0)
    print(text, flush=True)
    if FLAGS.out_json:
        with open(FLAGS.out_json, "w") as f:
            json.dump({"machine": machine, "command": command, "datasets": infos,
                       "results": [{"dataset": name, "steps_per_execution": spe, "models": res}
                                   for (name, spe), res in all_results.items()]}, f, indent=1)
    if FLAGS.out_png:
        plot(all_results, FLAGS.out_png)
        log(f"wrote {FLAGS.out_png}")


if __name__ == "__main__":
    app.run(main)

"""Benchmark: monolith_tf.HashTable against TensorFlow's own hash tables.

Measures, on the same seeded random int64 keys, our `HashTable` against
`tf.lookup.experimental.DenseHashTable` and `MutableHashTable`:

  1. serve lookup of existing keys (ours: `lookup(ids)`, train=False);
  2. a training step over 90% existing + 10% new keys (ours:
     `lookup(ids, train=True, timestamp=t)` then `apply_gradients(ids, grads)`
     with the default Adagrad; peers: `insert` of the same keys and values --
     the baseline the target refers to, though it does strictly less work);
  3. bytes per row at --mem_size keys (dim 16, Adagrad) against the raw payload
     (key 8 B + values 4*dim + Adagrad slot 4*dim + last-seen 8 B), from
     `stats()["memory_bytes"]` and from the RSS delta of a fresh process.

Each (size, dim) runs in its own subprocess, building one table at a time and
dropping it before the next, so tables never share memory; each memory
measurement runs in a fresh subprocess of its own. Timed ops run inside a
tf.function (and eagerly), after a warm-up; every call is forced with
`.numpy()` on a scalar that depends on the op, and the reported rate is the
median over --repeats repeats of --batches_per_repeat batches.

  .venv/bin/python bench/table_ops.py                 # full run (~tens of minutes)
  .venv/bin/python bench/table_ops.py --quick         # smoke run (~1 minute)
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

# Run as `python bench/table_ops.py` from a source checkout: import the
# package next to this directory (with its freshly built op library).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1000000", "10000000"], "Table sizes (keys) for the timing runs.")
flags.DEFINE_list("dims", ["16", "64"], "Embedding widths.")
flags.DEFINE_integer("batch", 65536, "Keys per op call.")
flags.DEFINE_integer("repeats", 7, "Timed repeats per measurement; the median is reported.")
flags.DEFINE_integer("batches_per_repeat", 4, "Op calls (distinct batches) timed together in one repeat.")
flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
flags.DEFINE_integer("rounds", 1, "Run every timing config this many times (configs interleaved, each in a fresh "
                     "process) and report the median over rounds; use 3+ on a noisy machine.")
flags.DEFINE_integer("mem_size", 10_000_000, "Keys in the memory measurement.")
flags.DEFINE_list("mem_dims", ["16"], "Dims for the memory measurement (the target is for dim 16).")
flags.DEFINE_bool("eager", True, "Also time the ops eagerly (no tf.function).")
flags.DEFINE_bool("mutable", True, "Include tf.lookup.experimental.MutableHashTable.")
flags.DEFINE_integer("seed", 0, "Seed of the numpy rng that draws keys, batches and values.")
flags.DEFINE_string("out_png", "docs/table_ops.png", "Where to write the bar chart of ratios ('' = none).")
flags.DEFINE_string("out_json", "", "Optional path for the raw results as JSON.")
flags.DEFINE_bool("quick", False, "Smoke run: sizes=100000, dims=16, 3 repeats, 200000-key memory run.")
# Internal: the parent runs this file again as a worker for one measurement.
flags.DEFINE_enum("worker", "", ["", "timing", "memory"], "Internal: run one measurement and exit.")
flags.DEFINE_string("worker_kind", "", "Internal: table kind of a memory worker.")
flags.DEFINE_integer("worker_size", 0, "Internal.")
flags.DEFINE_integer("worker_dim", 0, "Internal.")
flags.DEFINE_string("worker_result", "", "Internal: JSON file the worker writes.")
flags.DEFINE_string("worker_label", "", "Internal: progress prefix.")
flags.DEFINE_float("worker_t0", 0.0, "Internal: start time of the parent, for elapsed times.")

KINDS = ("ours", "dense", "mutable")
KIND_NAMES = {"ours": "monolith HashTable", "dense": "DenseHashTable", "mutable": "MutableHashTable"}
EMPTY_KEY, DELETED_KEY = -1, -2  # DenseHashTable sentinels; keys are drawn from [0, 2**62)
NEW_FRACTION = 0.10  # share of new keys in a training batch
BASE_TIME = 1_700_000_000  # event time (seconds) of the fill; training steps count up from it

TARGETS = {"serve": 2.0, "train": 1.0, "memory": 1.3}


# -- helpers shared by parent and workers ------------------------------------

def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def machine_busy_seconds():
    """CPU-seconds all processes have spent busy (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Measures how busy the machine was with other processes over a span:
    machine busy time minus this process's (and its waited children's) own."""

    def __init__(self):
        self.start = (time.time(), machine_busy_seconds(), self._own())

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self):
        """Average cores used by other processes since construction."""
        wall0, busy0, own0 = self.start
        wall = time.time() - wall0
        other = (machine_busy_seconds() - busy0) - (self._own() - own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


def fmt_n(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return str(n)


def fmt_rate(r):
    return "-" if r is None else f"{r / 1e6:8.2f} M"


def fmt_time(s):
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


class Progress:
    """One line per step on stderr, stamped with the elapsed time of the run."""

    def __init__(self, label, t0):
        self.label, self.t0 = label, t0 or time.time()

    def __call__(self, msg):
        rss = rss_bytes() / 2**30
        print(f"[{fmt_time(time.time() - self.t0)}] {self.label} {msg}  (rss {rss:.1f} GiB)",
              file=sys.stderr, flush=True)


# -- workload ------------------------------------------------------------------

def make_keys(seed, size, extra):
    """`size` existing keys and `extra` new ones: distinct int64s in [0, 2**62),
    a pure function of (seed, size), so every process draws the same keys."""
    import numpy as np
    rng = np.random.default_rng([seed, size])
    want = size + extra
    keys = rng.integers(0, 2**62, size=want, dtype=np.int64)
    while True:
        _, first = np.unique(keys, return_index=True)
        if len(first) >= want:
            break
        keys = np.concatenate([keys, rng.integers(0, 2**62, size=want - len(first) + 1024, dtype=np.int64)])
    keys = keys[np.sort(first)][:want]
    return keys[:size], keys[size:]


class Workload:
    """Every batch the three tables see, drawn once per (size, dim)."""

    def __init__(self, size, dim, batch, calls, seed, train_calls=None):
        import numpy as np
        import tensorflow as tf
        n_new = int(round(batch * NEW_FRACTION))
        train_calls = calls if train_calls is None else train_calls
        self.existing, fresh = make_keys(seed, size, n_new * train_calls)
        rng = np.random.default_rng([seed, size, dim, 1])
        self.size, self.dim, self.batch = size, dim, batch
        # Serve lookups: `batch` distinct existing keys per call.
        self.serve = [tf.constant(self.existing[rng.choice(size, batch, replace=False)]) for _ in range(calls)]
        # Training steps: 90% existing + 10% never-seen keys, shuffled; no key
        # is new in two batches, so every step really admits n_new keys.
        self.train = []
        for c in range(train_calls):
            ids = np.concatenate([self.existing[rng.choice(size, batch - n_new, replace=False)],
                                  fresh[c * n_new:(c + 1) * n_new]])
            rng.shuffle(ids)
            self.train.append(tf.constant(ids))
        self.n_new = n_new
        # One gradient / value block reused for every call (its contents do not
        # change the cost); small values keep Adagrad well-behaved.
        self.values = tf.constant(rng.normal(0.0, 0.01, size=(batch, dim)).astype(np.float32))


def make_table(kind, dim):
    import tensorflow as tf
    import monolith_tf
    if kind == "ours":
        return monolith_tf.HashTable(dim, name="bench")  # default Adagrad, random_uniform init
    default = tf.zeros([dim], tf.float32)
    if kind == "dense":
        return tf.lookup.experimental.DenseHashTable(
            tf.int64, tf.float32, default_value=default, empty_key=EMPTY_KEY, deleted_key=DELETED_KEY,
            experimental_is_anonymous=True)
    if kind == "mutable":
        return tf.lookup.experimental.MutableHashTable(tf.int64, tf.float32, default_value=default,
                                                       experimental_is_anonymous=True)
    raise ValueError(kind)


def make_ops(kind, table, dim):
    """(fill, serve, train) tf.functions (traced here, so tracing is never
    timed) taking tensors and returning a scalar that depends on the op, so
    `.numpy()` on it waits for the op. With function=False the same bodies run
    eagerly."""
    import tensorflow as tf

    if kind == "ours":
        def fill(ids, values, t):
            return tf.reduce_sum(table.lookup(ids, train=True, timestamp=t)[-1])

        def serve(ids):
            return tf.reduce_sum(table.lookup(ids)[-1])

        def train(ids, grads, t):
            emb = table.lookup(ids, train=True, timestamp=t)
            updated = table.apply_gradients(ids, grads)  # ordered after the lookup (same resource)
            return tf.reduce_sum(emb[-1]) + tf.cast(updated, tf.float32)
    else:
        def fill(ids, values, t):
            table.insert(ids, values)
            return table.size()  # reads the table, so it runs after the insert

        def serve(ids):
            return tf.reduce_sum(table.lookup(ids)[-1])

        def train(ids, grads, t):
            table.insert(ids, grads)  # the baseline: just write the keys and values
            return table.size()
    ids = tf.TensorSpec([None], tf.int64)
    vals = tf.TensorSpec([None, dim], tf.float32)
    t = tf.TensorSpec([], tf.int64)
    traced = {}
    for name, fn, sig in (("fill", fill, (ids, vals, t)), ("serve", serve, (ids,)), ("train", train, (ids, vals, t))):
        f = tf.function(fn, input_signature=sig)
        f.get_concrete_function()
        traced[name] = f
        traced[name + "/eager"] = fn
    return traced


def time_calls(call, args_list, warmup, repeats, per_repeat):
    """keys/s: median over `repeats` of (per_repeat calls on distinct batches)."""
    it = iter(args_list)
    for _ in range(warmup):
        call(*next(it)).numpy()
    rates = []
    for _ in range(repeats):
        batch = [next(it) for _ in range(per_repeat)]
        n = sum(int(a[0].shape[0]) for a in batch)
        start = time.perf_counter()
        for args in batch:
            call(*args).numpy()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), rates


def fill_table(fill_fn, keys, batch, values, progress, name):
    import tensorflow as tf
    t = tf.constant(BASE_TIME, tf.int64)
    n = len(keys)
    start = time.perf_counter()
    step = max(1, (n // batch) // 10)
    for b, lo in enumerate(range(0, n, batch)):
        ids = tf.constant(keys[lo:lo + batch])
        fill_fn(ids, values[:ids.shape[0]], t).numpy()
        if progress and (b + 1) % step == 0 and lo + batch < n:
            progress(f"{name}: fill {100 * (lo + batch) // n}%")
    return n / (time.perf_counter() - start)


# -- workers ---------------------------------------------------------------------

def timing_worker(size, dim, progress):
    import tensorflow as tf
    warm, reps, per = FLAGS.warmup, FLAGS.repeats, FLAGS.batches_per_repeat
    calls = warm + reps * per
    modes = ["function"] + (["eager"] if FLAGS.eager else [])
    progress("drawing keys")
    wl = Workload(size, dim, FLAGS.batch, calls, FLAGS.seed, train_calls=calls * len(modes))
    kinds = [k for k in KINDS if k != "mutable" or FLAGS.mutable]
    foreign = ForeignLoad()
    out = {"size": size, "dim": dim, "tf_version": tf.__version__,
           "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
           "results": {}}
    for kind in kinds:
        name = KIND_NAMES[kind]
        rss0 = rss_bytes()
        table = make_table(kind, dim)
        ops = make_ops(kind, table, dim)
        res = {}
        res["fill"] = fill_table(ops["fill"], wl.existing, FLAGS.batch, wl.values, progress, name)
        size_now = int(table.size().numpy())
        assert size_now == size, (kind, size_now, size)
        res["rss_after_fill"] = rss_bytes() - rss0
        for m, mode in enumerate(modes):
            suffix = "" if mode == "function" else "/eager"
            progress(f"{name}: serve lookup ({mode})")
            res[f"serve/{mode}"], res[f"serve/{mode}/samples"] = time_calls(
                ops["serve" + suffix], [(ids,) for ids in wl.serve], warm, reps, per)
            progress(f"{name}: training step ({mode})")
            train_batches = wl.train[m * calls:(m + 1) * calls]
            args = [(ids, wl.values, tf.constant(BASE_TIME + 1 + i, tf.int64)) for i, ids in enumerate(train_batches)]
            res[f"train/{mode}"], res[f"train/{mode}/samples"] = time_calls(ops["train" + suffix], args, warm, reps, per)
        grown = int(table.size().numpy())
        want = size + wl.n_new * calls * len(modes)
        assert grown == want, f"{kind}: {grown} rows after training, expected {want}"
        out["results"][kind] = res
        progress(f"{name}: serve {res['serve/function'] / 1e6:.2f} M keys/s, "
                 f"train {res['train/function'] / 1e6:.2f} M keys/s")
        del table, ops
        gc.collect()
    out["foreign_cores"] = foreign.cores()
    return out


def memory_worker(kind, size, dim, progress):
    """Builds one table in this fresh process and reports what it costs."""
    import tensorflow as tf
    progress("drawing keys")
    keys, _ = make_keys(FLAGS.seed, size, 0)
    import numpy as np
    values = tf.constant(np.random.default_rng([FLAGS.seed, size, dim, 2]).normal(
        0.0, 0.01, size=(FLAGS.batch, dim)).astype(np.float32))
    # Warm up on a small throwaway table (two parallel-sized batches), so op
    # kernels and thread pools are not charged to the measured table, without
    # leaving much freed heap behind for the measured table to reuse.
    scratch = make_table(kind, dim)
    fill_table(make_ops(kind, scratch, dim)["fill"], keys[:8192], 4096, values, None, "")
    del scratch
    gc.collect()
    table = make_table(kind, dim)
    fill_f = make_ops(kind, table, dim)["fill"]
    try:  # reset VmHWM, so the peak is the fill's and not the key drawing's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = rss_bytes()
    fill_table(fill_f, keys, FLAGS.batch, values, progress, KIND_NAMES[kind])
    gc.collect()
    after, peak = rss_bytes(), rss_bytes("VmHWM")
    out = {"kind": kind, "size": size, "dim": dim, "rss_delta": after - before, "peak_delta": peak - before,
           "rows": int(table.size().numpy())}
    if kind == "ours":
        out["memory_bytes"] = int(table.stats()["memory_bytes"].numpy())
    return out


def run_worker():
    progress = Progress(FLAGS.worker_label, FLAGS.worker_t0)
    if FLAGS.worker == "timing":
        out = timing_worker(FLAGS.worker_size, FLAGS.worker_dim, progress)
    else:
        out = memory_worker(FLAGS.worker_kind, FLAGS.worker_size, FLAGS.worker_dim, progress)
    with open(FLAGS.worker_result, "w") as f:
        json.dump(out, f)


# -- parent ------------------------------------------------------------------------

def spawn(args, label, t0):
    """Runs this file as a worker; streams its progress lines, returns its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    forward = [f"--{name}={getattr(FLAGS, name)}" for name in
               ("batch", "repeats", "batches_per_repeat", "warmup", "seed")]
    forward += ["--eager" if FLAGS.eager else "--noeager", "--mutable" if FLAGS.mutable else "--nomutable"]
    cmd = [sys.executable, os.path.abspath(__file__), *forward, *args, f"--worker_result={path}",
           f"--worker_label={label}", f"--worker_t0={t0}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    other = []  # TF's start-up chatter: shown only if the worker fails
    try:
        with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr:
                if line.startswith("[") and label in line:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    other.append(line)
        if proc.returncode != 0:
            sys.stderr.write("".join(other))
            raise RuntimeError(f"worker {label} failed with exit code {proc.returncode}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def merge_rounds(outs):
    """One timing result from several rounds: the median of each table's
    per-round medians, all samples pooled, and each round's ours/Dense ratio."""
    merged = dict(outs[0], rounds=len(outs), foreign_cores=max(o["foreign_cores"] for o in outs))
    merged["results"] = {}
    for kind in outs[0]["results"]:
        res = {}
        for key in outs[0]["results"][kind]:
            vals = [o["results"][kind][key] for o in outs]
            res[key] = sum(vals, []) if key.endswith("/samples") else statistics.median(vals)
        merged["results"][kind] = res
    merged["round_ratios"] = {
        key: [o["results"]["ours"][key] / o["results"]["dense"][key] for o in outs]
        for key in outs[0]["results"]["ours"] if not key.endswith("/samples") and key != "rss_after_fill"}
    return merged


def machine_info():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = rss_field_meminfo("MemTotal")
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem / 2**30, 1)}


def cpu_family():
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def rss_field_meminfo(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def raw_row_bytes(dim):
    return 8 + 4 * dim + 4 * dim + 8  # key + values + Adagrad accumulator + last-seen


def per_round(timing, size, dim, op):
    """' [r1 r2 ...]': each round's ours/Dense ratio, when there were rounds."""
    for t in timing:
        ratios = t.get("round_ratios", {}).get(f"{op}/function", [])
        if t["size"] == size and t["dim"] == dim and len(ratios) > 1:
            return " [" + " ".join(f"{x:.2f}" for x in ratios) + "]"
    return ""


def spread_of(samples):
    if not samples:
        return 0.0
    return (max(samples) - min(samples)) / statistics.median(samples)


def verdict(ok):
    return "PASS" if ok else "MISS"


def report(timing, memory, info):
    lines = []
    p = lines.append
    p(f"Machine: {info['nproc']} cores, {info['cpu']} ({info['cpu_family']}), {info['mem_gib']} GiB RAM; "
      f"TensorFlow {info['tf_version']} (intra-op threads {info['threads']['intra_op'] or 'default = nproc'}); "
      f"load average {info['load_start']} at start, {info['load_end']} at end.")
    p(f"Other processes kept {info['foreign_cores']:.2f} of {info['nproc']} cores busy on average during the run"
      + (" -- WARNING: numbers are disturbed; rerun on a quiet machine." if info["foreign_cores"] > 0.1 else "."))
    p("  per timing config: " + ", ".join(f"{fmt_n(t['size'])}/d{t['dim']} {t['foreign_cores']:.2f}" for t in timing))
    p(f"Batch {FLAGS.batch} keys; median of {FLAGS.repeats} repeats x {FLAGS.batches_per_repeat} batches "
      f"after {FLAGS.warmup} warm-up calls" + (f", then the median over {FLAGS.rounds} rounds "
      "(each in a fresh process; [..] = each round's ratio)" if FLAGS.rounds > 1 else "") + f"; seed {FLAGS.seed}.")
    p("")
    p("Throughput in keys/s (M = million). 'train' = ours: lookup(train=True) + apply_gradients (Adagrad) over "
      f"{100 - NEW_FRACTION * 100:.0f}% existing + {NEW_FRACTION * 100:.0f}% new keys;")
    p("  peers: insert() of the same keys and values -- the baseline the training target refers to "
      "(it does no optimizer step, no admission, no timestamps).")
    p("'fill' = building the table from empty in batches (ours: lookup(train=True)); informational.")
    p("'spread' = (max - min) / median over the repeats, worst of the tables in the row.")
    p("")
    hdr = f"{'op':<7} {'mode':<8} {'size':>5} {'dim':>4} | {'ours':>10} {'Dense':>10} {'Mutable':>10} | " \
          f"{'ours/Dense':>10} {'Mut/Dense':>9} | {'spread':>6} | target"
    p(hdr)
    p("-" * len(hdr))
    rows = []
    for op in ("serve", "train", "fill"):
        for mode in (("function", "eager") if op != "fill" else ("function",)):
            for t in timing:
                r = t["results"]
                key = op if op == "fill" else f"{op}/{mode}"
                if key not in r["ours"]:
                    continue
                ours, dense = r["ours"][key], r["dense"][key]
                mut = r.get("mutable", {}).get(key)
                ratio = ours / dense
                target = ""
                if op in TARGETS and mode == "function":
                    target = f">= {TARGETS[op]:.0f}x Dense: {verdict(ratio >= TARGETS[op])}"
                    rows.append((op, t["size"], t["dim"], ratio, None if mut is None else mut / dense))
                mut_ratio = "-" if mut is None else f"{mut / dense:8.2f}x"
                spread = max((spread_of(r[k].get(key + "/samples")) for k in r), default=0.0)
                p(f"{op:<7} {mode:<8} {fmt_n(t['size']):>5} {t['dim']:>4} | {fmt_rate(ours):>10} {fmt_rate(dense):>10} "
                  f"{fmt_rate(mut):>10} | {ratio:9.2f}x {mut_ratio:>9} | {spread:5.0%} | {target}")
    p("")
    mem_rows = []
    if memory:
        p(f"Memory at {fmt_n(FLAGS.mem_size)} keys (each table built alone in a fresh process; RSS delta = VmRSS "
          "after - before the fill; peak = VmHWM - before):")
        hdr = f"{'table':<20} {'dim':>4} | {'memory_bytes':>14} {'RSS delta':>11} {'peak delta':>11} | " \
              f"{'B/row (stats)':>13} {'B/row (RSS)':>11} | {'raw B/row':>9} {'stats/raw':>9} {'RSS/raw':>8} | target"
        p(hdr)
        p("-" * len(hdr))
        for m in memory:
            raw = raw_row_bytes(m["dim"])
            rows_n = m["rows"]
            st = m.get("memory_bytes")
            st_row = None if st is None else st / rows_n
            rss_row = m["rss_delta"] / rows_n
            target = ""
            if m["kind"] == "ours":
                target = (f"<= {TARGETS['memory']}x raw: stats {verdict(st_row / raw <= TARGETS['memory'])}, "
                          f"RSS {verdict(rss_row / raw <= TARGETS['memory'])}")
                mem_rows.append((m["dim"], st_row / raw, rss_row / raw))
            else:
                target = "(stores values only: no slot, no timestamp)"
            p(f"{KIND_NAMES[m['kind']]:<20} {m['dim']:>4} | {('-' if st is None else f'{st / 2**20:.0f} MiB'):>14} "
              f"{m['rss_delta'] / 2**20:>7.0f} MiB {m['peak_delta'] / 2**20:>7.0f} MiB | "
              f"{('-' if st_row is None else f'{st_row:.1f}'):>13} {rss_row:>11.1f} | {raw:>9} "
              f"{('-' if st_row is None else f'{st_row / raw:.2f}x'):>9} {rss_row / raw:>7.2f}x | {target}")
        p("")
    p("Targets:")
    for op, label in (("serve", "serve lookup >= 2x DenseHashTable lookup"),
                      ("train", "training step >= 1x DenseHashTable insert")):
        got = [r for r in rows if r[0] == op]
        if got:
            detail = ", ".join(f"{fmt_n(s)}/d{d} {x:.2f}x{per_round(timing, s, d, op)}" for _, s, d, x, _ in got)
            p(f"  {label:<48} {verdict(all(r[3] >= TARGETS[op] for r in got))}  ({detail})")
    for dim, st, rs in mem_rows:
        p(f"  {'memory <= 1.3x raw payload (dim ' + str(dim) + ')':<48} "
          f"{verdict(max(st, rs) <= TARGETS['memory'])}  (stats {st:.2f}x {verdict(st <= 1.3)}, "
          f"RSS {rs:.2f}x {verdict(rs <= 1.3)})")
    return "\n".join(lines), rows, mem_rows


def plot(rows, mem_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("serve", "Serve lookup vs DenseHashTable.lookup"),
              ("train", "Training step vs DenseHashTable.insert")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2, 2, 1]})
    for ax, (op, title) in zip(axes, panels):
        got = [r for r in rows if r[0] == op]
        labels = [f"{fmt_n(s)}\ndim {d}" for _, s, d, _, _ in got]
        xs = range(len(got))
        bars = ax.bar([x - 0.2 for x in xs], [r[3] for r in got], width=0.4, label="monolith HashTable")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        if any(r[4] is not None for r in got):
            bars = ax.bar([x + 0.2 for x in xs], [r[4] or 0 for r in got], width=0.4, label="MutableHashTable")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(TARGETS[op], color="red", ls="--", lw=1, label=f"target {TARGETS[op]:.0f}x")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("throughput / DenseHashTable")
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    if mem_rows:
        labels, vals = [], []
        for dim, st, rs in mem_rows:
            labels += [f"stats\ndim {dim}", f"RSS\ndim {dim}"]
            vals += [st, rs]
        ax.bar_label(ax.bar(range(len(vals)), vals, width=0.6), fmt="%.2f", fontsize=8)
        ax.axhline(TARGETS["memory"], color="red", ls="--", lw=1, label="target 1.3x")
        ax.set_xticks(range(len(vals)), labels)
        ax.set_ylim(0, max(vals + [TARGETS["memory"]]) * 1.15)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel("bytes per row / raw payload")
    ax.set_title(f"Memory, {fmt_n(FLAGS.mem_size)} keys (lower = better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.worker:
        run_worker()
        return
    if FLAGS.quick:
        for name, value in (("sizes", ["100000"]), ("dims", ["16"]), ("repeats", 3), ("mem_size", 200_000)):
            if not FLAGS[name].present:
                FLAGS[name].value = value
    sizes = [int(s) for s in FLAGS.sizes]
    dims = [int(d) for d in FLAGS.dims]
    mem_dims = [int(d) for d in FLAGS.mem_dims]
    t0 = time.time()
    load_start = os.getloadavg()[0]
    foreign = ForeignLoad()
    configs = [(s, d) for s in sizes for d in dims]
    mem_kinds = [k for k in KINDS if k != "mutable" or FLAGS.mutable]
    total = len(configs) * FLAGS.rounds + len(mem_dims) * len(mem_kinds)
    step = 0
    timing, memory = [], []
    rounds = {c: [] for c in configs}
    for r in range(FLAGS.rounds):
        for size, dim in configs:
            step += 1
            tag = f" round {r + 1}/{FLAGS.rounds}" if FLAGS.rounds > 1 else ""
            rounds[(size, dim)].append(spawn(["--worker=timing", f"--worker_size={size}", f"--worker_dim={dim}"],
                                             f"[{step}/{total}] timing size={fmt_n(size)} dim={dim}{tag}", t0))
    timing = [merge_rounds(rounds[c]) for c in configs]
    for dim in mem_dims:
        for kind in mem_kinds:
            step += 1
            memory.append(spawn(["--worker=memory", f"--worker_kind={kind}", f"--worker_size={FLAGS.mem_size}",
                                 f"--worker_dim={dim}"],
                                f"[{step}/{total}] memory {KIND_NAMES[kind]} size={fmt_n(FLAGS.mem_size)} dim={dim}",
                                t0))
    info = machine_info()
    info["cpu_family"] = cpu_family()
    info["load_start"], info["load_end"] = f"{load_start:.2f}", f"{os.getloadavg()[0]:.2f}"
    info["foreign_cores"] = foreign.cores()
    info["tf_version"] = timing[0]["tf_version"] if timing else "?"
    info["threads"] = timing[0]["threads"] if timing else {"intra_op": 0}
    text, rows, mem_rows = report(timing, memory, info)
    print(f"\nbench/table_ops.py finished in {fmt_time(time.time() - t0)}\n")
    print(text)
    if FLAGS.out_png:
        plot(rows, mem_rows, FLAGS.out_png)
        print(f"\nChart: {FLAGS.out_png}")
    if FLAGS.out_json:
        with open(FLAGS.out_json, "w") as f:
            json.dump({"machine": info, "flags": {n: FLAGS[n].value for n in (
                "sizes", "dims", "batch", "repeats", "batches_per_repeat", "warmup", "rounds", "mem_size", "seed")},
                "timing": timing, "memory": memory}, f, indent=1)
        print(f"Raw results: {FLAGS.out_json}")


if __name__ == "__main__":
    app.run(main)

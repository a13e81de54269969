"""Online training at scale: memory and throughput over a stream of ~100M distinct ids.

Trains the default online model (`online.make_model`) with `OnlineTrainer` on
`streams.SyntheticSource` where `--one_off_fraction` of users and, separately,
of items are brand-new ids seen exactly once: each event brings on average
2 * one_off_fraction new ids, so 100M events at 0.5 bring ~100M distinct ids,
almost all seen once, next to a few hundred thousand regular ids that recur.
`--min_count=2` keeps one-off ids out of the tables (their counts live in the
fixed-size admission sketch) and `--expire_after` with a sweep every
`--expire_every_seconds` of event time evicts idle rows, including the ~0.5%
of one-off ids the sketch admits falsely. If memory is bounded, RSS levels off
and the events/s stay flat however many ids have gone by.

Every `--sample_every` events it records one row (events, elapsed seconds,
events/s over the last sample, RSS, peak RSS, rows and bytes per table,
evictions, distinct ids seen so far, event time, windowed/cumulative AUC, glibc
malloc bytes in use and free-but-kept, Python's allocated blocks),
prints it as a progress line, and rewrites `--csv` (atomically); `--png` (RSS
and peak RSS, throughput, table rows over events) is redrawn every
`--plot_every` samples and at the end.

Distinct ids are counted exactly with one bitmap per feature, sized from the
largest possible id (num_users or num_items + num_ratings) and filled with
zeros up front, so the bitmaps' pages are resident from the start and do not
show up as growth in the RSS curve (about 25 MiB for 100M events).

  nice -n 10 .venv/bin/python bench/online_scale.py > /tmp/online_scale.log 2>&1   # ~20-30 min on 2 cores
  .venv/bin/python bench/online_scale.py --num_ratings=2000000 --sample_every=200000 \\
      --csv=/tmp/s.csv --png=/tmp/s.png                                        # smoke run, ~30 s
"""

import csv
import ctypes
import datetime
import gc
import io
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("num_ratings", 64_000_000, "Events in the stream.", lower_bound=1)
flags.DEFINE_integer("num_users", 200_000, "Regular (recurring) users.", lower_bound=1)
flags.DEFINE_integer("num_items", 50_000, "Regular (recurring) items.", lower_bound=1)
flags.DEFINE_float("one_off_fraction", 0.8, "Share of users and of items replaced by ids seen once.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Seed of the stream and the model.")
flags.DEFINE_integer("batch_size", 4096, "Events per mini-batch.", lower_bound=1)
flags.DEFINE_integer("embedding_dim", 16, "Embedding width.", lower_bound=1)
flags.DEFINE_list("hidden", ["64"], "MLP widths of the default model.")
flags.DEFINE_integer("min_count", 2, "Occurrences before an id gets a row.", lower_bound=1)
flags.DEFINE_integer("expire_after", 7 * 86400, "Evict rows idle this many seconds of event time (0: never).",
                     lower_bound=0)
flags.DEFINE_integer("expire_every_seconds", 86400, "Expiry sweep every this many seconds of event time.",
                     lower_bound=1)
flags.DEFINE_integer("sample_every", 1_000_000, "Events per CSV row and progress line.", lower_bound=1)
flags.DEFINE_integer("plot_every", 10, "Redraw the PNG every this many samples.", lower_bound=1)
flags.DEFINE_float("max_seconds", None, "Stop (cleanly, after the current batch) after this much wall time.",
                   lower_bound=1.0)
flags.DEFINE_string("csv", os.path.join(REPO, "docs", "online_scale.csv"), "Samples CSV.")
flags.DEFINE_string("png", os.path.join(REPO, "docs", "online_scale.png"), "RSS and throughput plot.")


def proc_status():
    """(VmRSS, VmHWM) in bytes from /proc/self/status: current and peak resident set."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out.get("VmRSS"), out.get("VmHWM")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_stats():
    """(bytes in use, bytes free but kept) of glibc malloc (all arenas and mmapped chunks), or
    (None, None) elsewhere. TensorFlow's CPU tensors and the tables' rows come from malloc, so
    this tells RSS growth that is live data from RSS that is freed memory the heap keeps."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return None, None
    return info.uordblks + info.hblkhd, info.fordblks


class DistinctIds:
    """Exact count of distinct ids in [0, limit) with a bitmap, resident from the start."""

    def __init__(self, limit):
        self.bits = np.empty(((limit >> 6) + 1) * 8, np.uint8)  # whole uint64 words, for count()
        self.bits.fill(0)  # touch every page now (np.zeros would map them lazily, growing RSS as ids arrive)
        self.limit = limit

    def add(self, ids):
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.limit):
            raise ValueError(f"id outside [0, {self.limit})")
        np.bitwise_or.at(self.bits, ids >> 3, (1 << (ids & 7)).astype(np.uint8))

    def count(self):
        # Popcount per 64-bit word: no temporary larger than the bitmap (np.unpackbits would
        # allocate 8 bytes per id and show up in the peak RSS).
        return int(np.bitwise_count(self.bits.view(np.uint64)).sum(dtype=np.int64))


def iso(ts):
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_csv(path, rows):
    from monolith_tf._files import atomic_write
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def plot(path, rows, title):
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from monolith_tf._files import atomic_write
    frame = pd.DataFrame(rows)
    x = frame["events"] / 1e6
    fig = Figure(figsize=(12, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    mem_ax, rate_ax, rows_ax = fig.subplots(1, 3)
    mem_ax.plot(x, frame["rss_mib"], label="RSS")
    mem_ax.plot(x, frame["peak_rss_mib"], label="peak RSS", linestyle="--")
    if frame["malloc_in_use_mib"].notna().any():
        mem_ax.plot(x, frame["malloc_in_use_mib"], label="malloc in use")
    mem_ax.plot(x, frame["table_mib"], label="tables (table.stats)")
    mem_ax.set(title="memory", xlabel="events (M)", ylabel="MiB")
    mem_ax.set_ylim(bottom=0)
    rate_ax.plot(x, frame["events_per_sec"] / 1e3, label="events per wall second")
    rate_ax.plot(x, frame["events_per_cpu_sec"] / 1e3, label="events per CPU second (this process)")
    rate_ax.set(title="throughput (per sample)", xlabel="events (M)", ylabel="thousand events/s")
    rate_ax.set_ylim(bottom=0)
    rows_ax.plot(x, frame["distinct_total"] / 1e6, label="distinct ids seen (M, left)", color="tab:gray")
    rows_ax.set(title="ids", xlabel="events (M)", ylabel="distinct ids seen (M)")
    table_ax = rows_ax.twinx()
    for column in [c for c in frame.columns if c.startswith("rows_") and c != "rows_total"]:
        table_ax.plot(x, frame[column] / 1e3, label=f"{column[5:]} rows (k)")
    table_ax.set_ylabel("table rows (thousands)")
    table_ax.set_ylim(bottom=0)
    handles = rows_ax.get_legend_handles_labels()[0] + table_ax.get_legend_handles_labels()[0]
    rows_ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    for ax in (mem_ax, rate_ax):
        ax.legend(fontsize=8)
    for ax in (mem_ax, rate_ax, rows_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    # A figure is a web of reference cycles (~16k Python blocks) that only a
    # full collection frees, and with ~1.5M long-lived objects (TensorFlow's)
    # Python runs one rarely: without this, each redraw showed up as growth in
    # the python_blocks column.
    del fig, mem_ax, rate_ax, rows_ax
    gc.collect()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        hidden = tuple(int(h) for h in FLAGS.hidden if h.strip())
    except ValueError:
        raise app.UsageError(f"--hidden must be integers, got {','.join(FLAGS.hidden)}") from None
    from monolith_tf import online, streams

    source = streams.SyntheticSource(FLAGS.num_users, FLAGS.num_items, FLAGS.num_ratings, seed=FLAGS.seed,
                                     one_off_fraction=FLAGS.one_off_fraction)
    expire_after = FLAGS.expire_after or None
    model = online.make_model(("user_id", "movie_id"), embedding_dim=FLAGS.embedding_dim, hidden=hidden,
                              expire_after=expire_after, min_count=FLAGS.min_count, seed=FLAGS.seed)
    # One-off ids are numbered after the regular ones, one per event at most.
    seen = {"user_id": DistinctIds(FLAGS.num_users + FLAGS.num_ratings + 1),
            "movie_id": DistinctIds(FLAGS.num_items + FLAGS.num_ratings + 1)}
    rows = []
    title = (f"online_scale: {FLAGS.num_ratings:,} events, one_off_fraction={FLAGS.one_off_fraction}, "
             f"min_count={FLAGS.min_count}, expire_after={expire_after}, batch {FLAGS.batch_size}")
    state = {"next": FLAGS.sample_every, "events": 0, "time": None}

    def sample(trainer):
        now = time.monotonic()
        cpu = time.process_time()
        rss, peak = proc_status()
        heap_used, heap_free = malloc_stats()
        tables = trainer.table_stats()
        last = trainer.rows[-1] if trainer.rows else {}
        distinct = {f: s.count() for f, s in seen.items()}
        row = {
            "events": trainer.events, "elapsed_s": round(now - start, 2),
            "events_per_sec": round((trainer.events - state["events"]) / (now - state["time"]), 1),
            # CPU seconds of this process: the machine is shared, so wall-clock rates also move with
            # other jobs' load; events per CPU second show whether the trainer itself slows down.
            "cpu_s": round(cpu - cpu_start, 2),
            "events_per_cpu_sec": round((trainer.events - state["events"]) / max(cpu - state["cpu"], 1e-9), 1),
            "loadavg_1m": os.getloadavg()[0],
            "rss_mib": round(rss / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1),
            "malloc_in_use_mib": None if heap_used is None else round(heap_used / 2**20, 1),
            "malloc_free_mib": None if heap_free is None else round(heap_free / 2**20, 1),
            "python_blocks": sys.getallocatedblocks(),
            **{f"rows_{name}": t["rows"] for name, t in tables.items()},
            "rows_total": sum(t["rows"] for t in tables.values()),
            "table_mib": round(sum(t["memory_bytes"] for t in tables.values()) / 2**20, 1),
            "evicted_total": trainer.evicted, "expiry_sweeps": trainer.expiry_sweeps,
            **{f"distinct_{f}": n for f, n in distinct.items()}, "distinct_total": sum(distinct.values()),
            "event_time_utc": iso(trainer.max_event_time),
            "window_auc": round(last.get("window_auc", float("nan")), 4),
            "cum_auc": round(last.get("cum_auc", float("nan")), 4),
        }
        rows.append(row)
        state["events"], state["time"], state["cpu"] = trainer.events, now, cpu
        print(f"[scale] {row['events']:>12,} ev {row['elapsed_s']:>7.0f}s {row['events_per_sec']:>9,.0f} ev/s "
              f"({row['events_per_cpu_sec']:,.0f}/cpu-s, load {row['loadavg_1m']:.1f}) | "
              f"rss {row['rss_mib']:.0f} MiB peak {row['peak_rss_mib']:.0f} MiB | rows "
              + " ".join(f"{n}={t['rows']:,}" for n, t in tables.items())
              + f" ({row['table_mib']:.0f} MiB) | evicted {row['evicted_total']:,} | distinct "
              f"{row['distinct_total']:,} | {row['event_time_utc'][:10]} | auc {row['window_auc']}", flush=True)
        write_csv(FLAGS.csv, rows)
        if len(rows) % FLAGS.plot_every == 0:
            plot(FLAGS.png, rows, title)

    def on_batch(trainer, frame, result):
        for feature, bitmap in seen.items():
            bitmap.add(frame[feature].to_numpy())
        if trainer.events >= state["next"]:
            sample(trainer)
            state["next"] = (trainer.events // FLAGS.sample_every + 1) * FLAGS.sample_every
        if FLAGS.max_seconds and time.monotonic() - start > FLAGS.max_seconds:
            trainer.request_stop()

    # The trainer's own metrics rows give the AUC columns; one per sample keeps them aligned.
    trainer = online.OnlineTrainer(model, source, batch_size=FLAGS.batch_size, window=FLAGS.sample_every,
                                   expire_every_seconds=FLAGS.expire_every_seconds if expire_after else None,
                                   verbose=0, on_batch=on_batch)
    print(f"[scale] {title}; pid {os.getpid()}", flush=True)
    start = time.monotonic()
    cpu_start = time.process_time()
    state["time"], state["cpu"] = start, cpu_start
    trainer.run()
    if not rows or rows[-1]["events"] != trainer.events:
        sample(trainer)
    plot(FLAGS.png, rows, title)
    s = trainer.summary()
    print(f"[scale] done: {trainer.events:,} events in {rows[-1]['elapsed_s']:.0f}s "
          f"({trainer.events / rows[-1]['elapsed_s']:,.0f} ev/s), distinct ids {rows[-1]['distinct_total']:,}, "
          f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB, rows at end {rows[-1]['rows_total']:,}, "
          f"evicted {trainer.evicted:,}, cumulative AUC {s['auc']:.4f}; wrote {FLAGS.csv}, {FLAGS.png}",
          flush=True)


if __name__ == "__main__":
    app.run(main)

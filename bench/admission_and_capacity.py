"""Measures the two approximations in the table and prints markdown tables.

1. Admission sketch: the false-admission rate of one-off ids (each seen once)
   with min_count=2 and 3, as the number of distinct ids grows, for two
   sketch sizes; plus bytes per id tracked in the sketch's window.
2. Capacity eviction: how close the rows kept by a full table are to exact
   LRU (the `capacity` most recently seen ids), on a Zipf-skewed stream.

Usage: python bench/admission_and_capacity.py [--quick]
"""

import time

import numpy as np
from absl import app, flags

import monolith_tf as mtf

FLAGS = flags.DEFINE_bool("quick", False, "smaller runs for a smoke test")
BATCH = 65_536


def false_admission(num_ids, min_count, counters):
    table = mtf.HashTable(4, min_count=min_count, admission_counters=counters)
    ids = np.random.default_rng(0).permutation(np.arange(num_ids, dtype=np.int64) * 7919 + 13)
    for start in range(0, num_ids, BATCH):
        table.lookup(ids[start:start + BATCH], train=True, timestamp=0)
    return int(table.size()) / num_ids


def lru_overlap(capacity, num_events, seed=0):
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, size=num_events) + rng.integers(0, 50, size=num_events) * 10**9).astype(np.int64)
    table = mtf.HashTable(4, capacity=capacity)
    times = np.arange(num_events, dtype=np.int64)
    for start in range(0, num_events, 4096):
        table.lookup(ids[start:start + 4096], train=True, timestamp=times[start:start + 4096])
    last_seen = {}
    for t, k in enumerate(ids):
        last_seen[k] = t
    exact = set(sorted(last_seen, key=last_seen.get)[-capacity:])
    kept = set(table.export()["keys"].numpy().tolist())
    return len(kept), len(kept & exact) / len(kept)


def main(_):
    sizes = [100_000, 1_000_000] if FLAGS.value else [100_000, 1_000_000, 4_000_000, 16_000_000]
    print("## Admission sketch: false-admission rate of one-off ids\n")
    print("| distinct one-off ids | sketch counters (MiB) | min_count=2 | min_count=3 |")
    print("|---:|---:|---:|---:|")
    for counters in (1 << 20, 1 << 22):
        for n in sizes:
            start = time.time()
            rates = [false_admission(n, m, counters) for m in (2, 3)]
            print(f"| {n:,} | {counters:,} ({counters * 2 / 2**20:.0f}) | {rates[0]:.4%} | {rates[1]:.4%} |",
                  flush=True)
            del start
    print("\n## Capacity eviction vs exact LRU (Zipf 1.2 stream)\n")
    print("| capacity | events | rows kept | kept rows that exact LRU keeps |")
    print("|---:|---:|---:|---:|")
    for capacity, events in ((1_000, 50_000), (50_000, 500_000)) if FLAGS.value else \
            ((1_000, 50_000), (50_000, 500_000), (200_000, 2_000_000)):
        kept, overlap = lru_overlap(capacity, events)
        print(f"| {capacity:,} | {events:,} | {kept:,} | {overlap:.2%} |", flush=True)


if __name__ == "__main__":
    app.run(main)

"""Many threads mixing lookups, training lookups, updates, exports and expiry
on one table; afterwards the table's invariants hold."""

import threading

import numpy as np
import tensorflow as tf

import monolith_tf as mtf
from monolith_tf import optimizers


def test_concurrent_mixed_operations_keep_invariants():
    dim = 4
    table = mtf.HashTable(dim, optimizer=optimizers.SGD(1.0), initializer="zeros", capacity=1 << 20,
                          expire_after=10**9)
    errors = []
    barrier = threading.Barrier(8)

    def trainer(seed):
        rng = np.random.default_rng(seed)
        barrier.wait()
        for step in range(40):
            ids = rng.integers(0, 50_000, size=4096)
            table.lookup(ids, train=True, timestamp=step)
            table.apply_gradients(ids, np.ones((4096, dim), np.float32))

    def reader(seed):
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(60):
            values = table.lookup(rng.integers(0, 50_000, size=8192)).numpy()
            # Rows start at 0 and only ever take whole unit SGD steps down, and a
            # row is written under its shard's lock, so a reader can never see a
            # half-written or fractional row.
            if (values > 0).any() or (values != np.floor(values)).any():
                errors.append("torn or corrupt row")
            if not (values == values[:, :1]).all():
                errors.append("row elements disagree (partial write observed)")

    def exporter():
        barrier.wait()
        for _ in range(10):
            e = table.export()
            keys = e["keys"].numpy()
            if len(np.unique(keys)) != len(keys):
                errors.append("duplicate keys in a snapshot")
            table.evict()

    threads = ([threading.Thread(target=trainer, args=(s,)) for s in range(4)]
               + [threading.Thread(target=reader, args=(10 + s,)) for s in range(3)]
               + [threading.Thread(target=exporter)])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    e = table.export()
    keys = e["keys"].numpy()
    assert len(np.unique(keys)) == len(keys) == int(table.size())
    assert keys.min() >= 0 and keys.max() < 50_000
    values = e["values"].numpy()
    # Each row moved by exactly one unit per update that found it.
    assert (values == values[:, :1]).all() and (values <= -1).all()
    total_updates = -values[:, 0].sum()
    assert total_updates <= 4 * 40 * 4096
    assert int(table.stats()["newest_event_time"]) == 39

"""Keras callbacks for online training. `DeltaExporter` publishes sparse deltas.

While a model trains, `DeltaExporter` writes what changed in its tables (rows
updated, admitted, evicted or expired) to a delta directory every N steps or
every S seconds, and the dense weights as a full snapshot on a slower cadence,
as Monolith's parameter sync does. Serving replicas (`monolith_tf.serving`)
poll that directory and apply the files in place. The file format lives in
`monolith_tf.deltas`; this module only decides when and what to write.
"""

import time

import keras
import numpy as np

from monolith_tf import deltas
from monolith_tf.layers import dense_weights, embedding_layers

__all__ = ["DeltaExporter"]


class DeltaExporter(keras.callbacks.Callback):
    """Writes sparse deltas of every HashEmbedding table during `fit`.

    Args:
      delta_dir: where `<sequence>.delta` files go (created if missing).
      every_n_steps: publish after this many training steps.
      every_seconds: publish when this much time has passed since the last one.
      dense_every_n_deltas: also write a dense-weights snapshot after this many
        sparse deltas (None: only at the end of training).
      model_name: recorded in each file (default: the model's name).
      clock: a zero-argument function returning seconds (injectable for tests).

    File numbering continues the sequence found in `delta_dir`. Each table's
    first delta from this exporter is a full copy, and so is any delta after
    the table was restored (its generation changed): versions are comparable
    only within one table history, and a replica must not patch rows of one
    history with changes from another.
    """

    def __init__(self, delta_dir, every_n_steps=None, every_seconds=None, *, dense_every_n_deltas=None,
                 model_name=None, clock=time.monotonic):
        super().__init__()
        if every_n_steps is None and every_seconds is None:
            raise ValueError("DeltaExporter: give every_n_steps or every_seconds")
        for arg, value in (("every_n_steps", every_n_steps), ("dense_every_n_deltas", dense_every_n_deltas)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DeltaExporter: {arg} must be an integer >= 1, got {value!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"DeltaExporter: every_seconds must be > 0, got {every_seconds!r}")
        self.delta_dir = delta_dir
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.dense_every_n_deltas = dense_every_n_deltas
        self.model_name = model_name
        self._clock = clock
        self._since = {}          # table name -> (generation, version the next delta starts after)
        self._steps = 0
        self._last_time = None
        self._sparse_written = 0
        self.written = []         # paths written, oldest first

    def _tables(self):
        return [layer.table for layer in embedding_layers(self.model)]

    def on_train_begin(self, logs=None):
        self._last_time = self._clock()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        due = self.every_n_steps is not None and self._steps % self.every_n_steps == 0
        if self.every_seconds is not None and self._clock() - self._last_time >= self.every_seconds:
            due = True
        if due:
            self.publish()

    def on_train_end(self, logs=None):
        self.publish(dense=True)

    def publish(self, dense=False):
        """Writes a sparse delta now (if anything changed), and a dense
        snapshot when `dense` or its cadence says so. Returns the paths."""
        self._last_time = self._clock()
        name = self.model_name or self.model.name
        written = []
        tables = []
        for table in self._tables():
            stats = table.stats()
            generation, current = int(stats["generation"]), int(stats["version"])
            known_generation, since = self._since.get(table.name, (None, 0))
            if known_generation != generation or since > current:
                since = 0
            delta = table.export_delta(since)
            full = since == 0 or not bool(delta["complete"])
            if full and since != 0:
                delta = table.export_delta(0)
            if not full and len(delta["keys"]) == 0 and len(delta["deleted_keys"]) == 0:
                continue
            tables.append(deltas.TableDelta(
                name=table.name, dim=table.dim, since_version=0 if full else since,
                version=int(delta["version"]), keys=delta["keys"].numpy(), values=delta["values"].numpy(),
                deleted_keys=delta["deleted_keys"].numpy()[:0] if full else delta["deleted_keys"].numpy(),
                full=full))
        if tables:
            seq = deltas.next_sequence(self.delta_dir)
            written.append(deltas.write(self.delta_dir, deltas.Delta(sequence=seq, model_name=name, tables=tables)))
            generations = {t.name: int(t.stats()["generation"]) for t in self._tables()}
            for t in tables:
                self._since[t.name] = (generations[t.name], t.version)
            self._sparse_written += 1
        if dense or (self.dense_every_n_deltas and tables and self._sparse_written % self.dense_every_n_deltas == 0):
            weights = {n: v.numpy() for n, v in dense_weights(self.model)}
            # Zero-row entries date the snapshot: it matches the tables as of
            # these versions, so a replica behind them can tell.
            dates = [deltas.TableDelta(name=t.name, dim=t.dim, since_version=self._since.get(t.name, (0, 0))[1],
                                       version=self._since.get(t.name, (0, 0))[1], keys=np.zeros([0], np.int64),
                                       values=np.zeros([0, t.dim], np.float32), deleted_keys=np.zeros([0], np.int64))
                     for t in self._tables()]
            seq = deltas.next_sequence(self.delta_dir)
            written.append(deltas.write(self.delta_dir, deltas.Delta(sequence=seq, model_name=name, kind="dense",
                                                                     tables=dates, dense=weights)))
        self.written.extend(written)
        return written

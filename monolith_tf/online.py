"""Online training on an event stream, as Monolith trains: one pass in event-time order.

`OnlineTrainer(model, source, ...)` reads mini-batches from a
`monolith_tf.streams` source and, for each one:

  1. scores it with the current model (progressive validation: every event is
     predicted before the model has trained on it) and adds the predictions to
     the windowed and cumulative metrics (RMSE of the rating; AUC and log loss
     of the binary label rating >= binary_threshold);
  2. trains on it (`model.train_on_batch`; HashEmbedding tables step their own
     fused optimizers, dense weights the Keras one);
  3. on its cadences: expires idle rows (`table.evict()` on every
     HashEmbedding table, by event time), publishes sparse deltas
     (`callbacks.DeltaExporter.publish`), writes a metrics row per window of
     events (CSV + progress line + PNG plot) and checkpoints.

A checkpoint is a `tf.train.Checkpoint` of the model and its optimizer
(`ckpt-<batches>`) plus `online_state.json` beside it, written after it via a
temporary file and `os.replace`: the stream position just after the last
trained batch, the counters, the metric accumulators and the size of the
metrics CSV, and the name of the checkpoint they belong to. The JSON is the
commit record: a restart restores exactly that checkpoint, seeks the source to
that position and truncates the CSV to that size, so no event is lost or
counted twice. docs/online.md describes the semantics; `run_online` is the
keyword-only entry point for a command line.
"""

import csv
import datetime
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from monolith_tf import metrics as _metrics
from monolith_tf._files import atomic_write
from monolith_tf import optimizers, streams
from monolith_tf.callbacks import DeltaExporter
from monolith_tf.layers import HashEmbedding, embedding_layers

__all__ = ["OnlineTrainer", "StepResult", "run_online", "make_model", "plot_metrics", "read_state", "rss_bytes",
           "STATE_FILE"]

logger = logging.getLogger(__name__)

STATE_FILE = "online_state.json"
_STATE_FORMAT = "monolith_tf.online_state"
_STATE_VERSION = 1
_CKPT_PREFIX = "ckpt-"


# ----------------------------------------------------------------------------- helpers


def rss_bytes():
    """This process' resident set size from /proc/self/status, or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _atomic_write(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))


def read_state(checkpoint_dir):
    """The committed online state of `checkpoint_dir` (a dict), or None if there is none."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable online state: {e}") from None
    if state.get("format") != _STATE_FORMAT or state.get("format_version") != _STATE_VERSION:
        raise ValueError(f"{path}: not a monolith_tf online state (format {state.get('format')!r})")
    return state


def _check_int(name, value, low=1, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"OnlineTrainer: {name} must be an integer >= {low}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def _check_seconds(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"OnlineTrainer: {name} must be > 0 or None, got {value!r}")
    return value


def _iso(ts):
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(value, spec=".4f"):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


@dataclass
class StepResult:
    """What one mini-batch gave: scores from before training on it, and the loss."""

    targets: np.ndarray        # the training label per event
    predictions: np.ndarray    # model output before training on the batch
    probabilities: np.ndarray  # P(binary label) derived from predictions
    binary: np.ndarray         # the binary label (bool) used for AUC and log loss
    timestamps: np.ndarray     # event times (int64)
    loss: float                # the training loss of the batch


class _Running:
    """Cumulative metric sums, saved in the online state."""

    def __init__(self, auc_bins):
        self.n = 0
        self.sse = 0.0
        self.logloss_sum = 0.0
        self.positives = 0
        self.auc = _metrics.StreamingAUC(auc_bins)

    def update(self, r: StepResult, lo, hi):
        """Adds events lo..hi of a batch."""
        binary, probabilities = r.binary[lo:hi], r.probabilities[lo:hi]
        self.n += hi - lo
        self.sse += float(np.sum((r.targets[lo:hi].astype(np.float64) - r.predictions[lo:hi]) ** 2))
        self.logloss_sum += _metrics.log_loss(binary, probabilities) * (hi - lo)
        self.positives += int(binary.sum())
        self.auc.update(binary, probabilities)

    def state(self):
        return {"n": self.n, "sse": self.sse, "logloss_sum": self.logloss_sum, "positives": self.positives,
                "auc": self.auc.state()}

    def load(self, state):
        self.n, self.sse = int(state["n"]), float(state["sse"])
        self.logloss_sum, self.positives = float(state["logloss_sum"]), int(state["positives"])
        self.auc = _metrics.StreamingAUC.from_state(state["auc"])


class _Window:
    """The scored events of the current metrics window, exactly `window` long when full."""

    FIELDS = ("targets", "predictions", "probabilities", "binary", "timestamps")

    def __init__(self):
        self.parts = []
        self.count = 0

    def add(self, r: StepResult, lo, hi):
        self.parts.append(tuple(getattr(r, f)[lo:hi] for f in self.FIELDS))
        self.count += hi - lo

    def arrays(self):
        if not self.parts:
            return {f: np.zeros(0) for f in self.FIELDS}
        return {f: np.concatenate([p[i] for p in self.parts]) for i, f in enumerate(self.FIELDS)}

    def clear(self):
        self.parts, self.count = [], 0

    def state(self):
        a = self.arrays()
        return {"targets": a["targets"].astype(np.float64).tolist(),
                "predictions": a["predictions"].astype(np.float64).tolist(),
                "probabilities": a["probabilities"].astype(np.float64).tolist(),
                "binary": a["binary"].astype(np.int64).tolist(),
                "timestamps": a["timestamps"].astype(np.int64).tolist()}

    def load(self, state):
        self.clear()
        n = len(state["targets"])
        if n:
            self.parts = [(np.asarray(state["targets"], np.float32), np.asarray(state["predictions"], np.float64),
                           np.asarray(state["probabilities"], np.float64), np.asarray(state["binary"], bool),
                           np.asarray(state["timestamps"], np.int64))]
            self.count = n


# ----------------------------------------------------------------------------- trainer


class OnlineTrainer:
    """Trains a compiled Keras model on a stream, scoring each batch before training on it.

    Args:
      model: a compiled Keras model built on HashEmbedding layers, one score per
        event. Functional models are fed by input name; pass timestamps to the
        layers (`emb(ids, timestamp=ts)`) so tables stamp event time.
      source: a `monolith_tf.streams.EventSource`.
      batch_size: events per mini-batch (the last one, or one yielded when a
        followed file catches up, may be shorter).
      label: the training target: a column name or a callable(frame) -> array.
        Default: "rating" for output="rating", else (rating >= binary_threshold).
      output: "rating" (the model predicts the label, e.g. stars; RMSE is
        reported and P(positive) = sigmoid((prediction - probability_center) /
        probability_scale)) or "probability" (a sigmoid output for a 0/1 label;
        RMSE is NaN).
      binary_threshold: with output="rating", an event is positive when its
        label >= this (4.0: 4 and 5 stars). With output="probability", >= 0.5.
      probability_center: default binary_threshold - 0.5 (3.5: half-way
        between 3 and 4 stars, the boundary for whole-star ratings).
      probability_scale: in rating units (default 0.5).
      features: model input name per column: {column: input}, or a list of
        columns named like the inputs. Default: every named model input is fed
        the column of the same name. An input named like the timestamp column
        is always fed it.
      timestamp: the event-time column (int64 seconds).
      expire_every_n_batches / expire_every_seconds: run `table.evict()` on
        every table that has expire_after, each n batches and/or whenever the
        stream's event time advanced this many seconds since the last sweep.
        Eviction is by event time (the newest time each table has seen).
      delta_dir, publish_every_n_batches / publish_every_seconds (wall clock),
        dense_every_n_deltas: publish sparse deltas with a DeltaExporter (and a
        dense snapshot at the end of the run).
      checkpoint_dir, checkpoint_every_n_batches / checkpoint_every_seconds
        (wall clock), keep_checkpoints: checkpoints as described in the module
        docstring; also one at the end of a run. With resume=True (default) an
        existing state in checkpoint_dir is restored by the constructor.
      metrics_csv: a CSV with one row per `window` events (see docs/online.md).
      plot_png: a PNG of the CSV's rows, drawn at the end of the run (and every
        plot_every_n_windows rows).
      window: events per metrics window (rows fall on exact multiples).
      auc_bins: resolution of the cumulative AUC (windowed AUC is exact).
      verbose: 0 silent, 1 a progress line per window to `log` (default stderr).
      clock: wall clock (injectable), for the *_every_seconds wall cadences and rates.
      on_batch: callable(trainer, frame, StepResult) after each batch.
    """

    def __init__(self, model, source, *, batch_size=256, label=None, output="rating", binary_threshold=4.0,
                 probability_center=None, probability_scale=0.5, features=None, timestamp="timestamp",
                 expire_every_n_batches=None, expire_every_seconds=None,
                 delta_dir=None, publish_every_n_batches=None, publish_every_seconds=None, dense_every_n_deltas=None,
                 checkpoint_dir=None, checkpoint_every_n_batches=None, checkpoint_every_seconds=None,
                 keep_checkpoints=3, resume=True,
                 metrics_csv=None, plot_png=None, plot_every_n_windows=None, window=10_000, auc_bins=1 << 14,
                 verbose=1, log=None, clock=time.monotonic, on_batch=None):
        if not isinstance(source, streams.EventSource):
            raise TypeError(f"OnlineTrainer: source must be a monolith_tf.streams.EventSource, got {type(source)}")
        if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
            raise ValueError("OnlineTrainer: compile the model first (model.compile(optimizer=..., loss=...))")
        if output not in ("rating", "probability"):
            raise ValueError(f"OnlineTrainer: output must be 'rating' or 'probability', got {output!r}")
        if not probability_scale > 0:
            raise ValueError(f"OnlineTrainer: probability_scale must be > 0, got {probability_scale!r}")
        self.model = model
        self.source = source
        self.batch_size = _check_int("batch_size", batch_size, allow_none=False)
        self.output = output
        self.binary_threshold = float(binary_threshold)
        self.probability_center = (self.binary_threshold - 0.5 if probability_center is None
                                   else float(probability_center))
        self.probability_scale = float(probability_scale)
        self.timestamp = timestamp
        self.expire_every_n_batches = _check_int("expire_every_n_batches", expire_every_n_batches)
        self.expire_every_seconds = _check_seconds("expire_every_seconds", expire_every_seconds)
        self.publish_every_n_batches = _check_int("publish_every_n_batches", publish_every_n_batches)
        self.publish_every_seconds = _check_seconds("publish_every_seconds", publish_every_seconds)
        self.checkpoint_every_n_batches = _check_int("checkpoint_every_n_batches", checkpoint_every_n_batches)
        self.checkpoint_every_seconds = _check_seconds("checkpoint_every_seconds", checkpoint_every_seconds)
        self.keep_checkpoints = _check_int("keep_checkpoints", keep_checkpoints, low=2, allow_none=False)
        self.window = _check_int("window", window, allow_none=False)
        self.plot_every_n_windows = _check_int("plot_every_n_windows", plot_every_n_windows)
        self.delta_dir = None if delta_dir is None else os.fspath(delta_dir)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.metrics_csv = None if metrics_csv is None else os.fspath(metrics_csv)
        self.plot_png = None if plot_png is None else os.fspath(plot_png)
        self.verbose = verbose
        self._log = log
        self._clock = clock
        self.on_batch = on_batch

        if label is None:
            label = "rating" if output == "rating" else (
                lambda f: (f["rating"].to_numpy() >= self.binary_threshold).astype(np.float32))
        self._label = label
        self.tables = [layer.table for layer in embedding_layers(model)]
        self._inputs = self._model_inputs(model)
        self._feature_map = self._resolve_features(features)  # input name -> column
        if (self._inputs is not None and timestamp not in self._inputs
                and any(t.expire_after for t in self.tables)):
            logger.warning("OnlineTrainer: tables expire rows but the model has no '%s' input, so they stamp "
                           "the wall clock instead of event time", timestamp)

        self._exporter = None
        if self.delta_dir is not None:
            # We call publish() on our own cadence; the exporter needs some cadence to be built.
            self._exporter = DeltaExporter(
                self.delta_dir, every_n_steps=self.publish_every_n_batches or 1,
                every_seconds=self.publish_every_seconds, dense_every_n_deltas=dense_every_n_deltas,
                clock=clock)
            self._exporter.set_model(model)
        self._tf_ckpt = (tf.train.Checkpoint(model=model, optimizer=model.optimizer)
                         if self.checkpoint_dir is not None else None)

        # Progress, all saved in the online state.
        self.events = 0
        self.batches = 0
        self.max_event_time = None
        self.out_of_order = 0
        self.last_expire_event_time = None
        self.evicted = 0
        self.expiry_sweeps = 0
        self.deltas_published = 0
        self.checkpoints = 0
        self.windows = 0
        self._running = _Running(auc_bins)
        self._window = _Window()
        self._csv_bytes = 0
        self._history = []              # committed checkpoint names, oldest first
        self.resumed_from = None
        self._rolled_back = False
        self.last_checkpoint = None
        self._checkpointed_batches = None
        self.rows = []                  # metric rows written by this process
        self._stop = threading.Event()
        self._csv_file = None
        self._csv_writer = None
        self._columns = None
        if self.checkpoint_dir is not None and resume:
            self.restore()

    # -- model plumbing ------------------------------------------------------------

    @staticmethod
    def _model_inputs(model):
        """{input name: dtype} of a functional model, or None (subclassed)."""
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            return None
        if not inputs:
            return None
        return {t.name: getattr(t, "dtype", None) for t in inputs}

    def _resolve_features(self, features):
        if features is None:
            if self._inputs is None:
                raise ValueError("OnlineTrainer: the model has no named inputs (subclassed?): pass "
                                 "features={column: input name}")
            mapping = {name: name for name in self._inputs}
        elif isinstance(features, dict):
            mapping = {inp: col for col, inp in features.items()}
        elif isinstance(features, (list, tuple)):
            mapping = {col: col for col in features}
        else:
            raise TypeError(f"OnlineTrainer: features must be a dict or a list of columns, got {features!r}")
        if self._inputs is not None:
            if self.timestamp in self._inputs:
                mapping.setdefault(self.timestamp, self.timestamp)
            unknown = sorted(set(mapping) - set(self._inputs))
            missing = sorted(set(self._inputs) - set(mapping))
            if unknown or missing:
                raise ValueError(f"OnlineTrainer: features do not match the model's inputs "
                                 f"{sorted(self._inputs)}: unknown {unknown}, not fed {missing}")
        return mapping

    def _to_input(self, values, dtype):
        if values.dtype == object and len(values) and isinstance(values.iloc[0], (list, tuple, np.ndarray)):
            return tf.ragged.constant([list(v) for v in values], dtype=dtype or None)
        array = values.to_numpy()
        if dtype == "string":
            return array.astype(str)
        return array.astype(dtype) if dtype else array

    def _model_input(self, frame):
        missing = sorted({col for col in self._feature_map.values() if col not in frame.columns})
        if missing:
            raise ValueError(f"OnlineTrainer: events from {self.source.name} lack column(s) {missing} "
                             f"(columns: {list(frame.columns)})")
        dtypes = self._inputs or {}
        return {inp: self._to_input(frame[col], dtypes.get(inp)) for inp, col in self._feature_map.items()}

    def _targets(self, frame):
        if callable(self._label):
            y = np.asarray(self._label(frame), dtype=np.float32).reshape(-1)
        else:
            if self._label not in frame.columns:
                raise ValueError(f"OnlineTrainer: events lack the label column {self._label!r}")
            y = frame[self._label].to_numpy(dtype=np.float32)
        if len(y) != len(frame):
            raise ValueError(f"OnlineTrainer: the label gave {len(y)} values for {len(frame)} events")
        return y

    # -- one batch -------------------------------------------------------------------

    def step(self, frame):
        """Scores `frame` with the current model, then trains on it. Returns a StepResult.

        Only the model changes here; `run` adds the bookkeeping (metrics,
        expiry, deltas, checkpoints).
        """
        if self.timestamp not in frame.columns:
            raise ValueError(f"OnlineTrainer: events lack the timestamp column {self.timestamp!r}")
        n = len(frame)
        x = self._model_input(frame)
        y = self._targets(frame)
        raw = self.model.predict_on_batch(x)
        if isinstance(raw, (dict, list, tuple)):
            raise ValueError("OnlineTrainer: the model must have a single output (one score per event)")
        predictions = np.asarray(raw, dtype=np.float64)
        if predictions.size != n:
            raise ValueError(f"OnlineTrainer: the model must output one score per event, got shape "
                             f"{predictions.shape} for {n} events")
        predictions = predictions.reshape(n)
        if not np.isfinite(predictions).all():
            raise FloatingPointError(f"OnlineTrainer: the model predicted a non-finite score at batch "
                                     f"{self.batches + 1} (events {self.events}..{self.events + n})")
        if self.output == "rating":
            probabilities = _metrics.sigmoid((predictions - self.probability_center) / self.probability_scale)
            binary = y >= self.binary_threshold
        else:
            probabilities = np.clip(predictions, 0.0, 1.0)
            binary = y >= 0.5
        loss = self.model.train_on_batch(x, y)
        loss = float(np.asarray(loss[0] if isinstance(loss, (list, tuple)) else loss))
        timestamps = frame[self.timestamp].to_numpy(dtype=np.int64)
        return StepResult(y, predictions, probabilities, binary, timestamps, loss)

    # -- the loop ---------------------------------------------------------------------

    def request_stop(self):
        """Asks `run` to stop after the current batch (thread- and signal-safe)."""
        self._stop.set()

    def run(self, max_batches=None):
        """Trains until the source ends, `max_batches` batches, or request_stop().

        Then checkpoints, publishes a last delta (with dense weights), writes a
        final partial metrics row and the plot. Returns `summary()`. An
        exception leaves everything as the last checkpoint says (a crash).
        """
        _check_int("max_batches", max_batches)
        self._stop.clear()
        self._start_run()
        # A followed file waiting for lines must notice request_stop() too: chain its stop().
        follow_stop = getattr(self.source, "stop", None) if isinstance(self.source, streams.FileSource) else None
        if isinstance(self.source, streams.FileSource):
            self.source.stop = lambda: self._stop.is_set() or bool(follow_stop and follow_stop())
        batches = self.source.batches(self.batch_size)
        done = 0
        try:
            for frame in batches:
                if len(frame):
                    self._process(frame)
                    done += 1
                if self._stop.is_set() or (max_batches is not None and done >= max_batches):
                    break
        except BaseException:
            self._close_csv()
            raise
        finally:
            batches.close()
            if isinstance(self.source, streams.FileSource):
                self.source.stop = follow_stop
        self._finish_run()
        return self.summary()

    def _start_run(self):
        self._run_started = self._clock()
        self._run_events = self.events
        self._run_batches = self.batches
        self._window_started = self._run_started
        self._last_publish = self._run_started
        self._last_checkpoint_time = self._run_started
        self._open_csv()
        if self._exporter is not None:
            self._exporter.on_train_begin()
            if self.resumed_from is not None and not self._rolled_back:
                # Deltas published after the checkpoint describe training this run will redo
                # (maybe differently). Publishing now sends what changed since the last delta,
                # or, as the restored tables are behind it, every table in full: replicas
                # roll back to the checkpoint, dense weights included.
                self.publish(dense=True)
                self._rolled_back = True

    def _process(self, frame):
        r = self.step(frame)
        n = len(frame)
        self.events += n
        self.batches += 1
        ts = r.timestamps
        previous = np.maximum.accumulate(ts)
        if self.max_event_time is not None:
            previous = np.maximum(previous, self.max_event_time)
            before = np.concatenate([[self.max_event_time], previous[:-1]])
        else:
            before = np.concatenate([[ts[0]], previous[:-1]])
        self.out_of_order += int(np.sum(ts < before))
        self.max_event_time = int(previous[-1])
        if self.last_expire_event_time is None:
            self.last_expire_event_time = int(ts[0])

        if self._due(self.expire_every_n_batches) or (
                self.expire_every_seconds is not None
                and self.max_event_time - self.last_expire_event_time >= self.expire_every_seconds):
            self.expire()
        if self._exporter is not None and (self._due(self.publish_every_n_batches) or (
                self.publish_every_seconds is not None
                and self._clock() - self._last_publish >= self.publish_every_seconds)):
            self.publish()
        lo = 0
        while lo < n:  # windows end at exact multiples of `window` events
            hi = min(n, lo + self.window - self._window.count)
            self._window.add(r, lo, hi)
            self._running.update(r, lo, hi)  # so cumulative columns are exact at the row's event count
            lo = hi
            if self._window.count == self.window:
                self._emit_row(partial=False)
        if self.checkpoint_dir is not None and (self._due(self.checkpoint_every_n_batches) or (
                self.checkpoint_every_seconds is not None
                and self._clock() - self._last_checkpoint_time >= self.checkpoint_every_seconds)):
            self.checkpoint()
        if self.on_batch is not None:
            self.on_batch(self, frame, r)

    def _due(self, every):
        return every is not None and self.batches % every == 0

    def _finish_run(self):
        if self.checkpoint_dir is not None and self._checkpointed_batches != self.batches:
            self.checkpoint()
        # The last, partial window is reported but stays open in the checkpoint (which
        # was written before this row), so a resumed run continues the same windows.
        if self._window.count:
            self._emit_row(partial=True)
        if self._exporter is not None:
            self.publish(dense=True)
        self._close_csv()
        if self.plot_png is not None:
            self.plot()
        if self.verbose:
            s = self.summary()
            self._print(f"[online] done: {s['events']:,} events in {s['batches']:,} batches "
                        f"({s['events_this_run']:,} this run, {s['examples_per_sec']:,.0f} ev/s); "
                        f"cumulative auc {_fmt(s['auc'])} logloss {_fmt(s['logloss'])} rmse {_fmt(s['rmse'])}")

    # -- expiry, deltas ----------------------------------------------------------------

    def expire(self):
        """Evicts rows idle for longer than each table's expire_after (event time). Returns how many."""
        evicted = 0
        for table in self.tables:
            if table.expire_after is not None:
                evicted += int(table.evict())
        self.evicted += evicted
        self.expiry_sweeps += 1
        self.last_expire_event_time = self.max_event_time
        return evicted

    def publish(self, dense=False):
        """Writes a sparse delta of every table now (DeltaExporter.publish). Returns the paths."""
        if self._exporter is None:
            raise ValueError("OnlineTrainer: publish() needs delta_dir")
        written = self._exporter.publish(dense=dense)
        self.deltas_published += len(written)
        self._last_publish = self._clock()
        return written

    # -- metrics rows -------------------------------------------------------------------

    def table_stats(self):
        """{table name: {"rows", "memory_bytes", "version"}} now."""
        out = {}
        for table in self.tables:
            s = table.stats()
            out[table.name] = {"rows": int(s["size"]), "memory_bytes": int(s["memory_bytes"]),
                               "version": int(s["version"])}
        return out

    def _csv_columns(self):
        names = [t.name for t in self.tables]
        return (["events", "batches", "window_events", "event_time", "event_time_utc",
                 "window_rmse", "window_auc", "window_logloss", "window_positive_rate",
                 "cum_rmse", "cum_auc", "cum_logloss", "rows_total", "memory_bytes_total"]
                + [f"rows_{n}" for n in names] + [f"memory_bytes_{n}" for n in names]
                + ["evicted_total", "expiry_sweeps", "deltas_published", "checkpoints", "out_of_order",
                   "malformed", "partial", "rss_bytes", "examples_per_sec", "wall_seconds"])

    def _emit_row(self, partial):
        a = self._window.arrays()
        regression = self.output == "rating"
        tables = self.table_stats()
        now = self._clock()
        elapsed = now - self._window_started
        run = self._running
        row = {
            "events": self.events if partial else self.windows * self.window + self.window,
            "batches": self.batches, "window_events": self._window.count,
            "event_time": int(a["timestamps"].max()), "event_time_utc": _iso(a["timestamps"].max()),
            "window_rmse": _metrics.rmse(a["targets"], a["predictions"]) if regression else float("nan"),
            "window_auc": _metrics.auc(a["binary"], a["predictions"]),
            "window_logloss": _metrics.log_loss(a["binary"], a["probabilities"]),
            "window_positive_rate": float(a["binary"].mean()),
            "cum_rmse": math.sqrt(run.sse / run.n) if regression and run.n else float("nan"),
            "cum_auc": run.auc.result(),
            "cum_logloss": run.logloss_sum / run.n if run.n else float("nan"),
            "rows_total": sum(t["rows"] for t in tables.values()),
            "memory_bytes_total": sum(t["memory_bytes"] for t in tables.values()),
        }
        row.update({f"rows_{n}": t["rows"] for n, t in tables.items()})
        row.update({f"memory_bytes_{n}": t["memory_bytes"] for n, t in tables.items()})
        row.update({"evicted_total": self.evicted, "expiry_sweeps": self.expiry_sweeps,
                    "deltas_published": self.deltas_published, "checkpoints": self.checkpoints,
                    "out_of_order": self.out_of_order, "malformed": int(getattr(self.source, "malformed", 0)),
                    "partial": int(partial), "rss_bytes": rss_bytes(),
                    "examples_per_sec": self._window.count / elapsed if elapsed > 0 else float("nan"),
                    "wall_seconds": now - self._run_started})
        if not partial:
            self.windows += 1
            self._window.clear()
            self._window_started = now
        self.rows.append(row)
        if self._csv_writer is not None:
            self._csv_writer.writerow(["" if row[c] is None else row[c] for c in self._columns])
            self._csv_file.flush()
            if not partial:
                self._csv_bytes = self._csv_file.tell()
        if self.verbose:
            rss = row["rss_bytes"]
            self._print(
                f"[online] {row['events']:>11,} ev {row['event_time_utc'][:10]} | window auc "
                f"{_fmt(row['window_auc'])} logloss {_fmt(row['window_logloss'])} rmse {_fmt(row['window_rmse'])}"
                f" | cum auc {_fmt(row['cum_auc'])} | rows "
                + " ".join(f"{n}={t['rows']:,}" for n, t in tables.items())
                + f" | tables {row['memory_bytes_total'] / 2**20:.1f} MiB"
                + (f" rss {rss / 2**20:.0f} MiB" if rss else "")
                + f" | {_fmt(row['examples_per_sec'], ',.0f')} ev/s")
        if (self.plot_png is not None and self.plot_every_n_windows and not partial
                and self.windows % self.plot_every_n_windows == 0):
            self.plot()

    def _print(self, line):
        stream = self._log if self._log is not None else sys.stderr
        print(line, file=stream, flush=True)

    def _open_csv(self):
        if self.metrics_csv is None:
            return
        self._columns = self._csv_columns()
        header = ",".join(self._columns)
        exists = os.path.exists(self.metrics_csv)
        if exists and self._csv_bytes > 0:  # resumed, or run() again: continue the file
            with open(self.metrics_csv, "r+", newline="") as f:
                first = f.readline().rstrip("\r\n")
                if first != header:
                    raise ValueError(f"OnlineTrainer: {self.metrics_csv} has other columns than this model's "
                                     "metrics; use a new metrics_csv")
                size = os.fstat(f.fileno()).st_size
                if size < self._csv_bytes:
                    logger.warning("%s is shorter (%d bytes) than the checkpoint recorded (%d): appending",
                                   self.metrics_csv, size, self._csv_bytes)
                else:
                    f.truncate(self._csv_bytes)  # drop rows written after the checkpoint
            self._csv_file = open(self.metrics_csv, "a", newline="")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_csv)), exist_ok=True)
            self._csv_file = open(self.metrics_csv, "w", newline="")
            self._csv_file.write(header + "\n")
            self._csv_file.flush()
        self._csv_writer = csv.writer(self._csv_file, lineterminator="\n")
        self._csv_bytes = self._csv_file.tell()

    def _close_csv(self):
        if self._csv_file is not None:
            self._csv_file.close()
        self._csv_file = self._csv_writer = None

    def plot(self):
        """Draws plot_png from the metrics CSV (all rows, across restarts) or this run's rows."""
        if self.plot_png is None:
            raise ValueError("OnlineTrainer: plot() needs plot_png")
        if self._csv_file is not None:
            self._csv_file.flush()
        source = self.metrics_csv if self.metrics_csv and os.path.exists(self.metrics_csv) else self.rows
        name = self.source.name if len(self.source.name) <= 80 else self.source.name[:77] + "..."
        plot_metrics(source, self.plot_png, title=f"online training on {name}")

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint(self):
        """Checkpoints the model and optimizer, then commits the stream position
        and counters in online_state.json. Returns the checkpoint path."""
        if self.checkpoint_dir is None:
            raise ValueError("OnlineTrainer: checkpoint() needs checkpoint_dir")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        name = f"{_CKPT_PREFIX}{self.batches:010d}"
        prefix = os.path.join(self.checkpoint_dir, name)
        self._tf_ckpt.write(prefix)
        history = ([h for h in self._history if h != name] + [name])[-self.keep_checkpoints:]
        self.checkpoints += 1
        state = {
            "format": _STATE_FORMAT, "format_version": _STATE_VERSION, "checkpoint": name, "history": history,
            "saved_at": time.time(), "source": self.source.name, "position": self.source.tell(),
            "source_malformed": int(getattr(self.source, "malformed", 0)),
            "events": self.events, "batches": self.batches, "batch_size": self.batch_size,
            "max_event_time": self.max_event_time, "out_of_order": self.out_of_order,
            "last_expire_event_time": self.last_expire_event_time, "evicted": self.evicted,
            "expiry_sweeps": self.expiry_sweeps, "deltas_published": self.deltas_published,
            "checkpoints": self.checkpoints, "windows": self.windows, "window_size": self.window,
            "metrics": self._running.state(), "window": self._window.state(),
            "metrics_csv": os.path.abspath(self.metrics_csv) if self.metrics_csv else None,
            "csv_bytes": self._csv_bytes,
            "tables": self.table_stats(),
        }
        _atomic_write(os.path.join(self.checkpoint_dir, STATE_FILE),
                      json.dumps(state, sort_keys=True, allow_nan=True).encode())
        # Committed: from here on a restart resumes from `name`.
        self._history = history
        self.last_checkpoint = prefix
        self._checkpointed_batches = self.batches
        self._last_checkpoint_time = self._clock()
        index = "".join([f'model_checkpoint_path: "{name}"\n']
                        + [f'all_model_checkpoint_paths: "{h}"\n' for h in history])
        _atomic_write(os.path.join(self.checkpoint_dir, "checkpoint"), index.encode())
        for entry in os.listdir(self.checkpoint_dir):
            if entry.startswith(_CKPT_PREFIX) and entry.split(".")[0] not in history:
                os.unlink(os.path.join(self.checkpoint_dir, entry))
        return prefix

    def restore(self):
        """Restores the committed state of checkpoint_dir, if any: model,
        optimizer, stream position, counters, metrics. Returns True if it did."""
        state = read_state(self.checkpoint_dir)
        if state is None:
            return False
        prefix = os.path.join(self.checkpoint_dir, state["checkpoint"])
        if not os.path.exists(prefix + ".index"):
            raise FileNotFoundError(f"OnlineTrainer: {STATE_FILE} names checkpoint {prefix}, which is missing")
        optimizer = self.model.optimizer
        if not getattr(optimizer, "built", True):
            optimizer.build(self.model.trainable_variables)  # slots must exist to be restored into
        try:
            self._tf_ckpt.read(prefix).assert_consumed()
        except AssertionError as e:
            raise ValueError(f"OnlineTrainer: checkpoint {prefix} does not match this model and optimizer: "
                             f"{e}") from None
        if state["source"] != self.source.name:
            logger.warning("OnlineTrainer: resuming %s from a checkpoint of source %s", self.source.name,
                           state["source"])
        self.source.seek(state["position"])
        self.source.malformed = state["source_malformed"]
        for key in ("events", "batches", "max_event_time", "out_of_order", "last_expire_event_time", "evicted",
                    "expiry_sweeps", "deltas_published", "checkpoints", "windows"):
            setattr(self, key, state[key])
        self._running.load(state["metrics"])
        self._window.load(state["window"])
        if state["window_size"] != self.window:
            logger.warning("OnlineTrainer: window changed from %d to %d events on resume",
                           state["window_size"], self.window)
        self._csv_bytes = state["csv_bytes"] if (self.metrics_csv and state["metrics_csv"] ==
                                                 os.path.abspath(self.metrics_csv)) else 0
        self._history = list(state["history"])
        self.resumed_from = prefix
        self.last_checkpoint = prefix
        self._checkpointed_batches = self.batches
        return True

    # -- results -----------------------------------------------------------------------

    def summary(self):
        """Counters, cumulative metrics, the last window and the tables, as a dict."""
        run = self._running
        regression = self.output == "rating"
        elapsed = self._clock() - getattr(self, "_run_started", self._clock())
        events_this_run = self.events - getattr(self, "_run_events", self.events)
        last = next((r for r in reversed(self.rows)), None)
        return {
            "source": self.source.name, "position": self.source.tell(),
            "events": self.events, "batches": self.batches,
            "events_this_run": events_this_run, "batches_this_run": self.batches - getattr(self, "_run_batches",
                                                                                          self.batches),
            "seconds": elapsed, "examples_per_sec": events_this_run / elapsed if elapsed > 0 else float("nan"),
            "rmse": math.sqrt(run.sse / run.n) if regression and run.n else float("nan"),
            "auc": run.auc.result(), "logloss": run.logloss_sum / run.n if run.n else float("nan"),
            "positive_rate": run.positives / run.n if run.n else float("nan"),
            "last_window": None if last is None else {k: last[k] for k in (
                "events", "window_events", "window_rmse", "window_auc", "window_logloss")},
            "tables": self.table_stats(), "rss_bytes": rss_bytes(),
            "max_event_time": self.max_event_time, "out_of_order": self.out_of_order,
            "malformed": int(getattr(self.source, "malformed", 0)),
            "evicted": self.evicted, "expiry_sweeps": self.expiry_sweeps,
            "deltas_published": self.deltas_published, "checkpoints": self.checkpoints,
            "resumed_from": self.resumed_from, "last_checkpoint": self.last_checkpoint,
            "metrics_csv": self.metrics_csv, "plot_png": self.plot_png,
        }


# ----------------------------------------------------------------------------- plot


def plot_metrics(rows, png_path, title=None):
    """Draws a metrics CSV (path) or list of row dicts to a PNG: windowed and
    cumulative AUC / log loss / RMSE over events, table rows and memory / RSS
    over event time. Uses matplotlib's Agg canvas (no global backend change)."""
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frame = pd.read_csv(rows) if isinstance(rows, (str, os.PathLike)) else pd.DataFrame(list(rows))
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    (auc_ax, loss_ax), (rows_ax, mem_ax) = fig.subplots(2, 2)
    if len(frame):
        x = frame["events"]
        when = pd.to_datetime(frame["event_time"], unit="s")
        auc_ax.plot(x, frame["window_auc"], label="window AUC")
        auc_ax.plot(x, frame["cum_auc"], label="cumulative AUC", linestyle="--")
        for column, label, style in (("window_logloss", "window log loss", "-"),
                                     ("cum_logloss", "cumulative log loss", "--"),
                                     ("window_rmse", "window RMSE", "-"), ("cum_rmse", "cumulative RMSE", "--")):
            if frame[column].notna().any():
                loss_ax.plot(x, frame[column], label=label, linestyle=style)
        for column in [c for c in frame.columns if c.startswith("rows_") and c != "rows_total"]:
            rows_ax.plot(when, frame[column], label=column[len("rows_"):])
        if "rss_bytes" in frame and frame["rss_bytes"].notna().any():
            mem_ax.plot(when, frame["rss_bytes"] / 2**20, label="process RSS (MiB, left)", color="tab:orange")
        tables_ax = mem_ax.twinx()
        tables_ax.plot(when, frame["memory_bytes_total"] / 2**20, label="tables (MiB, right)", color="tab:blue")
        tables_ax.set_ylim(bottom=0)
        handles = [h for ax in (mem_ax, tables_ax) for h in ax.get_legend_handles_labels()[0]]
        mem_ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    auc_ax.set(title="AUC (progressive validation)", xlabel="events")
    loss_ax.set(title="log loss and RMSE", xlabel="events")
    rows_ax.set(title="table rows", xlabel="event time")
    mem_ax.set(title="memory", xlabel="event time", ylabel="MiB")
    for ax in (auc_ax, loss_ax, rows_ax, mem_ax):
        ax.grid(alpha=0.3)
        if ax is not mem_ax and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (rows_ax, mem_ax):
        for label in ax.get_xticklabels():
            label.set_rotation(20)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return png_path


# ----------------------------------------------------------------------------- defaults and CLI entry


def make_model(features=("user_id", "movie_id"), *, embedding_dim=16, hidden=(64,), timestamp="timestamp",
               output="rating", expire_after=None, capacity=None, min_count=1, table_optimizer=None,
               table_learning_rate=0.1, learning_rate=3e-3, mean_rating=3.5, seed=0):
    """A compiled default model for `run_online`: one HashEmbedding per feature
    (named `<feature>_emb`, fed event time from the `timestamp` input), the
    embeddings concatenated with the dot product of the first two, an MLP and
    one output (a rating starting at `mean_rating`, or a sigmoid probability).
    Tables train with `table_optimizer` (default Adagrad(table_learning_rate)),
    dense weights with Adam(learning_rate); the defaults were the best of a
    small sweep on the synthetic stream (docs/online.md).
    """
    if table_optimizer is None:
        table_optimizer = optimizers.Adagrad(table_learning_rate)
    features = list(features)
    if not features:
        raise ValueError("make_model: give at least one feature")
    inputs = [keras.Input((), dtype="int64", name=f) for f in features]
    ts = keras.Input((), dtype="int64", name=timestamp)
    embeddings = [HashEmbedding(embedding_dim, name=f"{f}_emb", seed=seed + k, expire_after=expire_after,
                                capacity=capacity, min_count=min_count, optimizer=table_optimizer)(x, timestamp=ts)
                  for k, (f, x) in enumerate(zip(features, inputs))]
    parts = list(embeddings)
    if len(embeddings) >= 2:
        parts.append(keras.layers.Dot(axes=1)(embeddings[:2]))
    x = keras.layers.Concatenate()(parts) if len(parts) > 1 else parts[0]
    for k, width in enumerate(hidden):
        x = keras.layers.Dense(width, activation="relu",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100 + k))(x)
    init = keras.initializers.GlorotUniform(seed=seed + 200)
    if output == "rating":
        out = keras.layers.Dense(1, kernel_initializer=init,
                                 bias_initializer=keras.initializers.Constant(mean_rating))(x)
        loss = "mse"
    elif output == "probability":
        out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init)(x)
        loss = "binary_crossentropy"
    else:
        raise ValueError(f"make_model: output must be 'rating' or 'probability', got {output!r}")
    model = keras.Model(inputs + [ts], out, name="online_model")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    return model


def _split(value):
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def run_online(source="synthetic", *, model=None, batch_size=256, max_batches=None,
               # where events come from
               input_format=None, follow=False, poll_interval=1.0, idle_timeout=None, skip_malformed=False,
               with_metadata=False, num_users=943, num_items=1682, num_ratings=100_000, seed=0, drift=1.0,
               one_off_fraction=0.0,
               # the default model (when `model` is None)
               features=None, embedding_dim=16, hidden=(64,), expire_after=None, capacity=None,
               min_count=1, learning_rate=3e-3, table_learning_rate=0.1,
               # the trainer
               label=None, output="rating", binary_threshold=4.0, window=10_000,
               expire_every_n_batches=None, expire_every_seconds=None,
               delta_dir=None, publish_every_n_batches=None, publish_every_seconds=None, dense_every_n_deltas=None,
               checkpoint_dir=None, checkpoint_every_n_batches=None, checkpoint_every_seconds=None,
               keep_checkpoints=3, resume=True, metrics_csv=None, plot_png=None, verbose=1, handle_signals=True):
    """One call for a command line: opens `source`, builds the default model
    unless one is given, trains online and returns the trainer's summary.

    `source`: "synthetic" (num_users, num_items, num_ratings, seed, drift,
    one_off_fraction), a MovieLens folder (with_metadata), a JSON-lines/CSV
    file (input_format, follow, poll_interval, idle_timeout, skip_malformed),
    "-" for stdin, or an EventSource. `features` and `hidden` accept
    comma-separated strings. With handle_signals, SIGINT/SIGTERM make the run
    stop after the current batch and checkpoint (a second signal aborts).
    """
    features = _split(features) if features else None
    hidden = tuple(int(h) for h in _split(hidden)) if not isinstance(hidden, int) else (hidden,)
    if isinstance(source, streams.EventSource):
        events = source
    elif source == "synthetic":
        events = streams.SyntheticSource(num_users, num_items, num_ratings, seed=seed, drift=drift,
                                         one_off_fraction=one_off_fraction)
    elif source != "-" and os.path.isdir(source):
        events = streams.MovieLensSource(source, with_metadata=with_metadata)
    else:
        events = streams.FileSource(source, format=input_format, follow=follow, poll_interval=poll_interval,
                                    idle_timeout=idle_timeout, skip_malformed=skip_malformed)
    if model is None:
        model = make_model(features or ("user_id", "movie_id"), embedding_dim=embedding_dim, hidden=hidden,
                           output=output, expire_after=expire_after, capacity=capacity, min_count=min_count,
                           learning_rate=learning_rate, table_learning_rate=table_learning_rate, seed=seed)
    trainer = OnlineTrainer(
        model, events, batch_size=batch_size, label=label, output=output, binary_threshold=binary_threshold,
        features=None if features is None else list(features), window=window,
        expire_every_n_batches=expire_every_n_batches, expire_every_seconds=expire_every_seconds, delta_dir=delta_dir,
        publish_every_n_batches=publish_every_n_batches, publish_every_seconds=publish_every_seconds,
        dense_every_n_deltas=dense_every_n_deltas, checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_batches=checkpoint_every_n_batches, checkpoint_every_seconds=checkpoint_every_seconds,
        keep_checkpoints=keep_checkpoints, resume=resume, metrics_csv=metrics_csv, plot_png=plot_png,
        verbose=verbose)
    if trainer.resumed_from and verbose:
        print(f"[online] resumed from {trainer.resumed_from}: {trainer.events:,} events already trained, "
              f"source position {events.tell()}", file=sys.stderr)
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            trainer.request_stop()
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))  # a second signal acts as usual
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        return trainer.run(max_batches=max_batches)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

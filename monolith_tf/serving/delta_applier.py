"""Applies the trainer's delta files to a loaded model, in place.

The replica keeps, per loaded model version, the version of each table it
holds (at load: the table versions recorded in the export's metadata). Delta
files are taken in sequence order; for each file:

- a table entry with `version <= current` is already included and skipped;
- a table entry with `since_version <= current < version`, or `full`, is
  applied, and `current` becomes its `version`. A full entry replaces the
  table: rows the replica has that the entry lacks are deleted;
- a table entry with `since_version > current` is a gap (a delta is missing or
  out of order): the whole file is rejected, nothing in it is applied, and it
  is looked at again only when the replica's table versions change (a later
  full delta may close the gap) or the file changes;
- a file whose tables are all already included is skipped (re-applying is
  harmless anyway: rows carry full values);
- a file that fails to read (corrupt, truncated, foreign: `DeltaError`), names
  a table the model lacks, has the wrong width, or was written for another
  model, is rejected with a logged reason and not read again until the file
  changes (its mtime or size);
- a dense file (`kind == "dense"`) overwrites the dense weights through the
  export's `assign_dense`, in the metadata's order, after checking names and
  shapes. A dense file without table entries is applied only once this model
  has applied some table delta (so it is known to be newer than the export);
  one with table entries is applied when none of them is behind the replica
  (every entry's version >= the version held), its rows as above.

A full table entry whose version is *lower* than the replica's is followed
when the replica has already applied an earlier delta file for that table:
the trainer restored an older checkpoint and starts a new history.

All of this happens in the caller's thread, which holds the replica's apply
lock (so one thread at a time changes the tables and this bookkeeping);
predictions run concurrently (the tables are internally thread-safe: the
native table write-locks one shard at a time).

A file is applied fully or not at all as far as checks go: everything that
can be checked (checksums, table names, widths, dtypes, the sequence) is
checked, and every array converted, before the first row is written. The rows
are then written in slices of `slice_rows` (deletions first, as one apply op
call does them), so that no single step holds the GIL or a shard lock for
long and requests keep being served during a large apply. The writes run as
eager ops on the table's resource handle, not through the export's
`apply_delta` function: an eager op's kernel runs in the calling thread (the
replica lowers that thread's priority), while a function's kernels run on
TensorFlow's shared inter-op threads at full priority, competing with
requests. Rows carry full values, so a file that fails half-way through the writes (an op error) is
harmless to apply again; it is reported as `apply_failed`, the version of a
table whose rows were not all written is not advanced, and the file is looked
at again when it changes.
"""

import dataclasses
import logging
import os
import time

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_lookup_ops

from monolith_tf import deltas

__all__ = ["DeltaApplier", "DeltaState"]

log = logging.getLogger("monolith_tf.serving")

CORRUPT, INVALID, GAP, FAILED = "corrupt", "invalid", "gap", "apply_failed"
# Rows per apply op call: 4 MiB of values at dim 16, about 2k rows per shard
# lock, a few ms per call with the GIL released while the op runs.
SLICE_ROWS = 65536


@dataclasses.dataclass
class _TableSummary:
    name: str
    dim: int
    since_version: int
    version: int
    full: bool


@dataclasses.dataclass
class _Summary:
    """What deciding about a file needs, without its arrays."""
    kind: str
    model_name: str
    created_at: float
    tables: list
    dense: dict  # name -> (shape tuple, numpy dtype)

    @classmethod
    def of(cls, delta):
        return cls(kind=delta.kind, model_name=delta.model_name, created_at=float(delta.created_at or 0.0),
                   tables=[_TableSummary(t.name, int(t.dim), int(t.since_version), int(t.version), bool(t.full))
                           for t in delta.tables],
                   dense={n: (tuple(np.shape(v)), np.asarray(v).dtype) for n, v in delta.dense.items()})


@dataclasses.dataclass
class _Rejection:
    fingerprint: tuple
    kind: str
    reason: str
    versions: dict  # the table versions when rejected (a gap is re-checked when they change)


@dataclasses.dataclass
class DeltaState:
    """The delta bookkeeping of one loaded model version."""
    versions: dict                      # table name -> version held
    export_versions: dict               # the versions recorded at export
    done: dict = dataclasses.field(default_factory=dict)       # seq -> fingerprint (applied or skipped)
    rejected: dict = dataclasses.field(default_factory=dict)   # seq -> _Rejection
    table_applied_seq: dict = dataclasses.field(default_factory=dict)  # table -> last seq applied to it
    last_applied_sequence: int = None
    last_applied_at: float = None
    applied: int = 0
    skipped: int = 0
    advanced: bool = False              # some table delta was applied since load
    last_error: str = ""
    _snapshot: dict = None              # as_dict() as of the last change, for readers in other threads

    def publish(self):
        """Called by the (single) writer after each change."""
        self._snapshot = self.as_dict()

    def snapshot(self):
        """A consistent copy of as_dict(), safe to take from any thread."""
        snapshot = self._snapshot
        return dict(snapshot) if snapshot is not None else self.as_dict()

    def as_dict(self):
        processed = max(self.done, default=None)
        return {
            "last_delta_sequence": self.last_applied_sequence,
            "processed_delta_sequence": processed,
            "last_delta_applied_at": self.last_applied_at,
            "table_versions": dict(self.versions),
            "export_table_versions": dict(self.export_versions),
            "deltas_applied": self.applied,
            "deltas_skipped": self.skipped,
            "deltas_rejected": {seq: {"kind": r.kind, "reason": r.reason} for seq, r in sorted(self.rejected.items())},
            # Only while some file stands rejected: once every rejected file was
            # replaced or removed, an old reason would only mislead.
            "last_delta_error": self.last_error if self.rejected else "",
        }


def _fingerprint(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class DeltaApplier:
    """Polls `delta_dir` and applies what a model is missing.

    Args:
      delta_dir: the trainer's delta directory.
      check_model_name: reject files whose `model_name` differs from the
        export metadata's `model_name`.
      slice_rows: rows (and deleted keys) per apply op call.
    """

    def __init__(self, delta_dir, *, check_model_name=True, slice_rows=SLICE_ROWS):
        if slice_rows < 1:
            raise ValueError(f"slice_rows must be >= 1, got {slice_rows}")
        self.delta_dir = delta_dir
        self.check_model_name = check_model_name
        self.slice_rows = int(slice_rows)
        self._summaries = {}  # seq -> (fingerprint, _Summary)
        self._corrupt = {}    # seq -> (fingerprint, reason): unreadable files are read once per change

    @staticmethod
    def new_state(model):
        st = DeltaState(versions=dict(model.table_versions), export_versions=dict(model.table_versions))
        st.publish()
        return st

    def process(self, model):
        """Applies every pending delta file to `model`; returns how many were applied."""
        st = model.delta_state
        if st is None:
            st = model.delta_state = self.new_state(model)
        try:
            return self._process(model, st)
        finally:
            st.publish()

    def _process(self, model, st):
        seqs = deltas.list_sequences(self.delta_dir)
        present = set(seqs)
        for cache in (self._summaries, self._corrupt, st.done, st.rejected):
            for seq in [s for s in cache if s not in present]:
                del cache[seq]
        applied = 0
        for seq in seqs:
            path = deltas.path_for(self.delta_dir, seq)
            fp = _fingerprint(path)
            if fp is None or st.done.get(seq) == fp:
                continue
            rejection = st.rejected.get(seq)
            if rejection is not None and rejection.fingerprint == fp and (
                    rejection.kind != GAP or rejection.versions == st.versions):
                continue
            corrupt = self._corrupt.get(seq)
            if corrupt is not None and corrupt[0] == fp:
                self._reject(model, st, seq, fp, CORRUPT, corrupt[1])
                continue
            delta = None
            cached = self._summaries.get(seq)
            summary = cached[1] if cached is not None and cached[0] == fp else None
            if summary is None:
                delta = self._read(seq, path, fp)
                if delta is None:
                    self._reject(model, st, seq, fp, CORRUPT, self._corrupt[seq][1])
                    continue
                summary = _Summary.of(delta)
                self._summaries[seq] = (fp, summary)
            decision, reason, plan = self._decide(model, st, seq, summary)
            if decision == "skip":
                st.done[seq] = fp
                st.rejected.pop(seq, None)
                st.skipped += 1
                log.debug("model %s version %d: delta %d skipped: %s", model.name, model.version, seq, reason)
                continue
            if decision != "apply":
                self._reject(model, st, seq, fp, decision, reason)
                continue
            if delta is None:
                delta = self._read(seq, path, fp)
                if delta is None:
                    self._reject(model, st, seq, fp, CORRUPT, self._corrupt[seq][1])
                    continue
            started = time.monotonic()
            try:
                self._apply(model, st, seq, delta, plan)
            except Exception as e:
                self._reject(model, st, seq, fp, FAILED, f"applying failed: {type(e).__name__}: "
                                                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                continue
            st.done[seq] = fp
            st.rejected.pop(seq, None)
            st.applied += 1
            st.last_applied_sequence = seq if st.last_applied_sequence is None else max(seq, st.last_applied_sequence)
            st.last_applied_at = time.time()
            applied += 1
            st.publish()
            log.info("model %s version %d: applied delta %d (%s; %d rows) in %.3fs; table versions %s",
                     model.name, model.version, seq, delta.kind, delta.num_rows, time.monotonic() - started,
                     st.versions)
        return applied

    # -- internals ---------------------------------------------------------

    def _read(self, seq, path, fp):
        try:
            return deltas.read(path)
        except deltas.DeltaError as e:
            reason = str(e)
        except Exception as e:  # a well-formed file with a malformed header
            reason = f"{path}: unreadable delta: {type(e).__name__}: {e}"
        self._corrupt[seq] = (fp, reason)
        self._summaries.pop(seq, None)
        return None

    def _reject(self, model, st, seq, fp, kind, reason):
        previous = st.rejected.get(seq)
        st.rejected[seq] = _Rejection(fp, kind, reason, dict(st.versions))
        message = f"delta {seq} rejected ({kind}): {reason}"
        st.last_error = message
        st.publish()
        if previous is None or previous.fingerprint != fp or previous.reason != reason:
            log.warning("model %s version %d: %s; still serving table versions %s", model.name, model.version,
                        message, st.versions)

    def _decide(self, model, st, seq, summary):
        """("apply", reason, plan) | ("skip", reason, None) | (GAP or INVALID, reason, None)."""
        expected = model.metadata.get("model_name")
        if self.check_model_name and expected and summary.model_name != expected:
            return INVALID, (f"written for model '{summary.model_name}', but the loaded export is model "
                             f"'{expected}' (give the producer model_name='{expected}', or turn the check off: "
                             "--nocheck_delta_model_name / check_delta_model_name=False)"), None
        tables, gaps, behind = [], [], []
        for t in summary.tables:
            if t.name not in model.tables:
                return INVALID, (f"table '{t.name}' is not in the model (it has: "
                                 f"{', '.join(sorted(model.tables)) or 'no tables'})"), None
            dim = model.table_dims.get(t.name)
            if dim is not None and dim != t.dim:
                return INVALID, f"table '{t.name}' has dim {dim}, the delta has dim {t.dim}", None
            current = st.versions.get(t.name, 0)
            if t.version > current:
                if t.full or t.since_version <= current:
                    tables.append(t.name)
                else:
                    gaps.append(f"table '{t.name}' starts after version {t.since_version} but the replica "
                                f"holds version {current}")
            elif t.full and t.version < current and st.table_applied_seq.get(t.name, seq) < seq:
                tables.append(t.name)  # the trainer went back to an older checkpoint
            elif t.version < current:
                behind.append(t.name)
        if gaps:
            return GAP, "gap: " + "; ".join(gaps), None
        dense = False
        if summary.kind == "dense" and summary.dense:
            if summary.tables:  # the snapshot's table versions date it: not behind the replica's
                fresh = not behind
            else:
                fresh = st.advanced or not model.tables or self._newer_than_export(model, summary)
            if fresh:
                problem = self._check_dense(model, summary)
                if problem:
                    return INVALID, problem, None
                dense = True
        if not tables and not dense:
            if summary.kind == "dense" and summary.dense and not summary.tables:
                return "skip", "dense snapshot not known to be newer than the loaded export", None
            return "skip", "already included (table versions <= the replica's)", None
        return "apply", "", {"tables": set(tables), "dense": dense}

    @staticmethod
    def _newer_than_export(model, summary):
        created = model.metadata.get("created_at")
        return created is not None and summary.created_at > float(created)

    @staticmethod
    def _check_dense(model, summary):
        if model.assign_dense is None or not model.dense:
            return "dense delta, but the export has no dense weights to assign (no assign_dense)"
        expected = [d["name"] for d in model.dense]
        missing = [n for n in expected if n not in summary.dense]
        extra = [n for n in summary.dense if n not in expected]
        if missing or extra:
            return f"dense weights do not match the export: missing {missing}, unexpected {extra}"
        for d in model.dense:
            shape, dtype = summary.dense[d["name"]]
            if list(shape) != list(d["shape"]):
                return f"dense weight '{d['name']}' has shape {list(shape)}, the export has {list(d['shape'])}"
            want = np.dtype(tf.as_dtype(d["dtype"]).as_numpy_dtype)
            if dtype != want and not (dtype.kind == want.kind == "f"):
                return f"dense weight '{d['name']}' has dtype {dtype}, the export has {want}"
        return ""

    def _apply(self, model, st, seq, delta, plan):
        # Everything that can fail short of the writes themselves happens
        # before the first write.
        writes = []  # (table delta, endpoint, keys, values, deleted)
        for t in delta.tables:
            if t.name not in plan["tables"]:
                continue
            endpoint = model.tables[t.name]
            keys = np.asarray(t.keys, np.int64)
            values = np.asarray(t.values, np.float32)
            deleted = np.asarray(t.deleted_keys, np.int64)
            if t.full:
                held = endpoint.keys().numpy()
                deleted = np.union1d(deleted, np.setdiff1d(held, keys))
            writes.append((t, endpoint, keys, values, deleted))
        dense = None
        if plan["dense"]:
            dense = [tf.constant(np.asarray(delta.dense[d["name"]]), dtype=tf.as_dtype(d["dtype"]))
                     for d in model.dense]
        portable = model.metadata.get("mode") == "portable"
        for t, endpoint, keys, values, deleted in writes:
            self._write_rows(endpoint, t.dim, keys, values, deleted, portable=portable)
            st.versions[t.name] = int(t.version)
            st.table_applied_seq[t.name] = seq
            st.advanced = True
        if dense is not None:
            model.assign_dense(*dense)

    def _write_rows(self, endpoint, dim, keys, values, deleted, *, portable):
        """Deletes `deleted`, then upserts `keys` -> `values`, a slice per op
        call: the same table as one call (which also deletes before it writes,
        shard by shard), without converting or locking everything at once."""
        n = self.slice_rows
        write = _eager_writer(endpoint, portable)
        no_keys, no_values = tf.zeros([0], tf.int64), tf.zeros([0, dim], tf.float32)
        for lo in range(0, len(deleted), n):
            write(no_keys, no_values, tf.constant(deleted[lo:lo + n], tf.int64))
            time.sleep(0)  # let the request threads take the GIL between calls
        for lo in range(0, len(keys), n):
            write(tf.constant(keys[lo:lo + n], tf.int64), tf.constant(values[lo:lo + n], tf.float32), no_keys)
            time.sleep(0)


def _eager_writer(endpoint, portable):
    """write(keys, values, deleted_keys) for one exported table, as eager ops in
    the calling thread (see the module docstring for why). Native tables take
    our apply-delta op, portable ones the stock remove and insert ops; an
    export whose endpoint does not expose its table falls back to the
    export's own `apply_delta` function."""
    table = getattr(endpoint, "table", None)
    handle = getattr(table, "resource_handle", None)
    if handle is None:
        return endpoint.apply_delta
    if not portable:
        from monolith_tf import _ops

        apply_delta = _ops.ops().monolith_hash_table_apply_delta

        def write(keys, values, deleted_keys):
            apply_delta(handle, keys, values, deleted_keys)
        return write

    def write(keys, values, deleted_keys):
        if deleted_keys.shape[0]:
            gen_lookup_ops.lookup_table_remove_v2(handle, deleted_keys)
        if keys.shape[0]:
            gen_lookup_ops.lookup_table_insert_v2(handle, keys, values)
    return write


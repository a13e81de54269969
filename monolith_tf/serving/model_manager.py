"""Finds, loads and swaps the model versions under a base path.

Like tensorflow_model_server with the default "latest" version policy: the
replica serves the newest numbered version under `--model_base_path`. When a
newer one appears it is loaded (and warmed up, and caught up on deltas) while
the old one keeps serving; then the two are swapped under a lock, so every
request runs on exactly one fully ready version. The old version is unloaded
once the requests running on it have finished.

A version that fails to load is reported (state END with the error) and not
retried until its files change; the replica keeps serving what it has.
"""

import contextlib
import json
import logging
import os
import re
import threading
import time

import tensorflow as tf
from tensorflow.python.saved_model import loader_impl

import monolith_tf  # noqa: F401  (registers the Monolith ops SavedModels refer to)
from monolith_tf.serving import errors

__all__ = ["LoadedModel", "ModelManager", "Signature", "VersionState", "METADATA_FILE"]

log = logging.getLogger("monolith_tf.serving")

METADATA_FILE = os.path.join("assets.extra", "monolith.json")
DEFAULT_SIGNATURE = "serving_default"
_VERSION_DIR = re.compile(r"^\d+$")
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

# ModelVersionStatus.State values (tensorflow_serving/apis/get_model_status.proto).
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


class VersionState:
    """What GetModelStatus reports for one version."""

    def __init__(self, state, error_code=None, error_message=""):
        self.state = state
        self.error_code = error_code  # a grpc.StatusCode, None for OK
        self.error_message = error_message

    def __repr__(self):
        return f"VersionState({self.state}, {self.error_message!r})"


class Signature:
    """One serving signature: its function and its SignatureDef."""

    def __init__(self, key, fn, signature_def):
        self.key = key
        self.fn = fn
        self.signature_def = signature_def
        self.method_name = signature_def.method_name if signature_def is not None else ""
        self.inputs = dict(fn.structured_input_signature[1])  # alias -> TensorSpec
        outputs = fn.structured_outputs
        if not isinstance(outputs, dict):
            outputs = {"output_0": outputs}
        self.outputs = {alias: spec for alias, spec in outputs.items()}  # alias -> TensorSpec


class LoadedModel:
    """A loaded version: signatures, delta endpoints and metadata.

    `inflight` counts requests running on it; the manager waits for them
    before dropping the model. `delta_state` belongs to the DeltaApplier.
    """

    def __init__(self, name, version, path, loaded, signature_defs, metadata):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = loaded
        self.signature_defs = signature_defs  # key -> SignatureDef proto (the whole map, as TF Serving returns)
        self.metadata = metadata              # monolith.json, {} for other SavedModels
        self.signatures = {key: Signature(key, fn, signature_defs.get(key))
                           for key, fn in loaded.signatures.items()}
        self.tables = dict(getattr(loaded, "monolith_tables", {}) or {})
        self.table_dims = {t["name"]: int(t["dim"]) for t in metadata.get("tables", [])}
        self.table_versions = {t["name"]: int(t["version"]) for t in metadata.get("tables", [])}
        self.dense = list(metadata.get("dense", []))
        self.assign_dense = getattr(loaded, "assign_dense", None)
        self.loaded_at = time.time()
        self.inflight = 0
        self.delta_state = None

    @classmethod
    def load(cls, name, version, path):
        saved_model = loader_impl.parse_saved_model(path)
        meta_graph = next((mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags),
                          saved_model.meta_graphs[0])
        signature_defs = dict(meta_graph.signature_def)
        loaded = tf.saved_model.load(path, tags=["serve"])
        metadata = {}
        meta_path = os.path.join(path, METADATA_FILE)
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                metadata = json.load(f)
        return cls(name, version, path, loaded, signature_defs, metadata)

    def signature(self, key):
        key = key or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            # tensorflow_serving/servables/tensorflow/predict_util.cc
            raise errors.failed_precondition(f'Serving signature key "{key}" not found.')
        return sig

    def warmup(self):
        """Runs each signature once on a one-row batch, so the first real
        request does not pay for graph optimization. Tables are only read."""
        for sig in self.signatures.values():
            if any(spec.shape.rank is None for spec in sig.inputs.values()):
                continue
            feeds = {}
            for alias, spec in sig.inputs.items():
                shape = [1 if d is None else d for d in spec.shape.as_list()]
                feeds[alias] = tf.zeros(shape, spec.dtype) if spec.dtype != tf.string else tf.fill(shape, "")
            try:
                sig.fn(**feeds)
            except Exception as e:  # a model may reject the dummy row; that is fine
                log.info("model %s version %d: warmup of signature %r skipped: %s",
                         self.name, self.version, sig.key, str(e).splitlines()[0] if str(e) else e)


def _stat(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _fingerprint(version_dir):
    """Changes when the version's files change: a failed load is retried then."""
    return tuple(_stat(os.path.join(version_dir, f)) for f in
                 _SAVED_MODEL_FILES + (os.path.join("variables", "variables.index"), METADATA_FILE))


class ModelManager:
    """Serves the newest loadable version under `base_path`.

    Args:
      base_path: folder of numbered SavedModel versions.
      name: the model name requests must use.
      prepare: called with a freshly loaded LoadedModel, before it serves
        (the replica catches it up on deltas there). Runs under `swap_lock`
        together with the swap itself.
      swap_lock: a lock shared with whatever else changes a model's state.
      drain_timeout: seconds to wait for requests on an old version before
        dropping it anyway (they keep their reference and finish).
    """

    def __init__(self, base_path, name, *, prepare=None, swap_lock=None, drain_timeout=30.0, warmup=True):
        self.base_path = base_path
        self.name = name
        self._prepare = prepare
        self._swap_lock = swap_lock or threading.RLock()
        self._drain_timeout = drain_timeout
        self._warmup = warmup
        self._lock = threading.Condition()   # guards _current, _states, inflight counters
        self._poll_lock = threading.Lock()   # one poll (load) at a time
        self._current = None
        self._states = {}                    # version -> VersionState
        self._failed = {}                    # version -> fingerprint of the failed attempt
        self._warned_empty = False

    # -- requests ------------------------------------------------------------

    def current(self):
        with self._lock:
            return self._current

    @contextlib.contextmanager
    def acquire(self, model_spec_name, version=None, version_label=None):
        """The model a request runs on, kept alive (not unloaded) meanwhile."""
        if model_spec_name != self.name:
            raise errors.not_found(f"Servable not found for request: {_request_string(model_spec_name, version)}")
        if version_label:
            # No version labels are configured (no --model_config_file).
            raise errors.invalid_argument(f"Unrecognized servable version label: {version_label}")
        with self._lock:
            model = self._current
            if model is None or (version is not None and version != model.version):
                raise errors.not_found(f"Servable not found for request: {_request_string(model_spec_name, version)}")
            model.inflight += 1
        try:
            yield model
        finally:
            with self._lock:
                model.inflight -= 1
                if model.inflight == 0:
                    self._lock.notify_all()

    def version_states(self):
        """{version: VersionState}, newest first, as GetModelStatus reports them."""
        with self._lock:
            return dict(sorted(self._states.items(), reverse=True))

    # -- polling ---------------------------------------------------------------

    def available_versions(self):
        """Numbered version folders holding a SavedModel, ascending."""
        try:
            names = os.listdir(self.base_path)
        except OSError:
            return []
        versions = []
        for n in names:
            if _VERSION_DIR.match(n) and any(os.path.exists(os.path.join(self.base_path, n, f))
                                             for f in _SAVED_MODEL_FILES):
                versions.append(int(n))
        return sorted(versions)

    def poll(self):
        """Loads and swaps in the newest version if it is not the one serving.

        Returns True when a new version was swapped in. Never raises for a
        bad version: it is reported in the version states and skipped.
        """
        with self._poll_lock:
            versions = self.available_versions()
            current = self.current()
            candidates = []
            for v in versions:
                fp = self._failed.get(v)
                if fp is not None and fp == _fingerprint(self._version_dir(v)):
                    continue
                candidates.append(v)
            if not candidates:
                if current is None and not self._warned_empty:
                    log.warning("model %s: no loadable version under %s yet", self.name, self.base_path)
                    self._warned_empty = True
                return False
            target = candidates[-1]
            if current is not None and target == current.version:
                return False
            return self._load_and_swap(target)

    def _version_dir(self, version):
        return os.path.join(self.base_path, str(version))

    def _set_state(self, version, state, error_code=None, error_message=""):
        with self._lock:
            self._states[version] = VersionState(state, error_code, error_message)

    def _load_and_swap(self, version):
        path = self._version_dir(version)
        fingerprint = _fingerprint(path)
        self._set_state(version, LOADING)
        log.info("model %s: loading version %d from %s", self.name, version, path)
        started = time.monotonic()
        try:
            model = LoadedModel.load(self.name, version, path)
            if self._warmup:
                model.warmup()
        except Exception as e:
            message = f"Failed to load version {version} of model {self.name} from {path}: {type(e).__name__}: {e}"
            log.error("%s", message)
            self._failed[version] = fingerprint
            self._set_state(version, END, errors.from_exception(e).code, message)
            return False
        with self._swap_lock:
            try:
                if self._prepare is not None:
                    self._prepare(model)
            except Exception as e:  # catch-up problems are logged per delta; this is a bug guard
                log.exception("model %s version %d: preparing failed: %s", self.name, version, e)
            with self._lock:
                old, self._current = self._current, model
                self._states[version] = VersionState(AVAILABLE)
                if old is not None:
                    self._states[old.version] = VersionState(UNLOADING)
        self._warned_empty = False
        log.info("model %s: version %d is serving (loaded in %.2fs)%s", self.name, version,
                 time.monotonic() - started, f", replacing version {old.version}" if old is not None else "")
        if old is not None:
            self._unload(old)
        return True

    def _unload(self, old):
        deadline = time.monotonic() + self._drain_timeout
        with self._lock:
            while old.inflight > 0 and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            leftover = old.inflight
            self._states[old.version] = VersionState(END)
        if leftover:
            log.warning("model %s: dropped version %d with %d requests still running on it (they finish on it)",
                        self.name, old.version, leftover)
        old.loaded = None
        old.signatures = {}
        old.tables = {}
        log.info("model %s: unloaded version %d", self.name, old.version)

    def close(self):
        with self._lock:
            model, self._current = self._current, None
            if model is not None:
                self._states[model.version] = VersionState(END)


def _request_string(name, version):
    # ServableRequest::DebugString in tensorflow_serving/core/servable_id.h
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


def tensor_spec_string(spec):
    dims = "?" if spec.shape.rank is None else ",".join("?" if d is None else str(d) for d in spec.shape.as_list())
    return f"{spec.dtype.name}[{dims}]"

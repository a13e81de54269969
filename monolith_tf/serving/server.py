"""`ServingReplica`: TensorFlow Serving's gRPC (and REST) API over a model
that takes Monolith deltas.

Stock TF Serving clients work unchanged: PredictionService (Predict,
Classify, Regress, GetModelMetadata) and ModelService (GetModelStatus) from
`tensorflow_serving.apis`, with TF Serving's status codes and messages. On top,
the replica applies the trainer's delta files in place (delta_applier.py) and
reports how far it got: `GetModelStatus` in the available version's
`status.error_message` ("monolith: {json}", with code OK) and
`GetModelMetadata` in a "monolith" entry (a google.protobuf.StringValue
holding the same JSON).
"""

import collections
import concurrent.futures
import json
import logging
import os
import threading
import time

import grpc
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from monolith_tf.serving import errors, inference
from monolith_tf.serving.delta_applier import DeltaApplier
from monolith_tf.serving.model_manager import ModelManager

__all__ = ["ServingReplica", "Ports"]

log = logging.getLogger("monolith_tf.serving")

Ports = collections.namedtuple("Ports", ["grpc", "rest"])

_STATE_ENUM = get_model_status_pb2.ModelVersionStatus.State
_SIGNATURE_DEF = "signature_def"
_MONOLITH = "monolith"


def _spec_version(model_spec):
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return model_spec.version.value, None
    if choice == "version_label":
        return None, model_spec.version_label
    return None, None


def _fill_spec(target, name, version, signature_name=None):
    target.name = name
    target.version.value = version
    if signature_name is not None:
        target.signature_name = signature_name


def _lower_thread_priority(niceness):
    """Raises the calling thread's nice value by `niceness` (Linux: nice is per
    thread). The pollers read, hash and apply deltas of tens of MiB; when the
    cores are busy, requests should get them first. Most of that work runs
    without the GIL, and the GIL-holding steps are short (see delta_applier),
    so a lower priority does not stall requests behind a preempted poller."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError as e:  # e.g. a sandbox that forbids it: keep the default priority
        log.warning("cannot lower the priority of background thread %s: %s", threading.current_thread().name, e)


class ServingReplica:
    """A serving replica for one model: newest version under a base path,
    kept fresh by deltas, behind TF Serving's gRPC API (and optionally REST).

    Args:
      model_base_path: folder of numbered SavedModel versions (monolith_tf.export).
      model_name: the name requests must use (ModelSpec.name).
      delta_dir: the trainer's delta directory; None for no deltas.
      port: gRPC port (0: any free port).
      rest_api_port: REST port; None: no REST server (0: any free port).
      poll_seconds: how often to look for a new version; <= 0: only at
        start and on `poll_now()`.
      delta_poll_seconds: how often to look for deltas (default poll_seconds;
        <= 0: only at start, on a version load and on `poll_now()`).
      host: the address to bind (loopback by default).
      max_workers: gRPC worker threads.
      check_delta_model_name: reject delta files written for another model
        name than the export metadata's `model_name`.
      drain_timeout: seconds to let requests on a replaced version finish.
      background_niceness: how much lower than the request threads the model
        and delta pollers run (nice levels, Linux); 0 keeps them equal.

    `start()` loads the newest version (synchronously), catches it up on
    deltas and starts the servers; it returns the bound `Ports(grpc, rest)`.
    """

    def __init__(self, model_base_path, model_name, delta_dir=None, port=0, rest_api_port=None, poll_seconds=1.0,
                 *, delta_poll_seconds=None, host="127.0.0.1", max_workers=16, check_delta_model_name=True,
                 drain_timeout=30.0, background_niceness=10):
        for what, value in (("port", port), ("rest_api_port", rest_api_port)):
            # gRPC would take 99999 as 99999 - 65536 and serve on some other port.
            if value is not None and not (isinstance(value, int) and 0 <= value <= 65535):
                raise ValueError(f"monolith-serve: {what} must be an integer in 0..65535, got {value!r}")
        self.model_base_path = model_base_path
        self.background_niceness = int(background_niceness)
        self.model_name = model_name
        self.delta_dir = delta_dir
        self.host = host
        self.poll_seconds = float(poll_seconds)
        self.delta_poll_seconds = self.poll_seconds if delta_poll_seconds is None else float(delta_poll_seconds)
        self.max_workers = max_workers
        self._requested_port = port
        self._requested_rest_port = rest_api_port
        self.port = None
        self.rest_api_port = None
        self._apply_lock = threading.RLock()
        self.applier = DeltaApplier(delta_dir, check_model_name=check_delta_model_name) if delta_dir else None
        self.manager = ModelManager(model_base_path, model_name, prepare=self._catch_up, swap_lock=self._apply_lock,
                                    drain_timeout=drain_timeout)
        self._stop = threading.Event()
        self._threads = []
        self._grpc_server = None
        self._rest_server = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        if self._started:
            return Ports(self.port, self.rest_api_port)
        self._started = True
        self._stop.clear()
        try:
            self.manager.poll()
            self._start_grpc()
            if self._requested_rest_port is not None:
                from monolith_tf.serving.rest import RestServer
                self._rest_server = RestServer(self, self.host, self._requested_rest_port)
                self.rest_api_port = self._rest_server.start()
            if self.poll_seconds > 0:
                self._spawn("monolith-model-poll", self.poll_seconds, self.manager.poll)
            if self.applier is not None and self.delta_poll_seconds > 0:
                self._spawn("monolith-delta-poll", self.delta_poll_seconds, self.poll_deltas)
        except BaseException:
            self.stop()
            raise
        log.info("serving model %s from %s on %s (gRPC port %s%s)", self.model_name, self.model_base_path, self.host,
                 self.port, f", REST port {self.rest_api_port}" if self.rest_api_port else "")
        return Ports(self.port, self.rest_api_port)

    def _start_grpc(self):
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="monolith-grpc"),
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionServicer(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        address = f"{_host_for_address(self.host)}:{int(self._requested_port)}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"monolith-serve: cannot bind gRPC to {address}: {e}") from None
        if not port:
            raise OSError(f"monolith-serve: cannot bind gRPC to {address}")
        server.start()
        self._grpc_server, self.port = server, port

    def _spawn(self, name, interval, fn):
        def loop():
            _lower_thread_priority(self.background_niceness)
            while not self._stop.wait(interval):
                try:
                    fn()
                except Exception:  # a poll never kills the replica
                    log.exception("%s failed", name)
        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, grace=1.0):
        """Stops the servers and pollers; in-flight RPCs get `grace` seconds."""
        self._stop.set()
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
            self._grpc_server = None
        if self._rest_server is not None:
            self._rest_server.stop()
            self._rest_server = None
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads = []
        self.manager.close()
        self._started = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- polling -----------------------------------------------------------------

    def _catch_up(self, model):
        """Runs (under the apply lock) before a freshly loaded version serves."""
        if self.applier is not None:
            model.delta_state = self.applier.new_state(model)
            self.applier.process(model)

    def poll_deltas(self):
        """Applies pending delta files to the serving version; returns how many."""
        if self.applier is None:
            return 0
        with self._apply_lock:
            model = self.manager.current()
            return 0 if model is None else self.applier.process(model)

    def poll_now(self):
        """Looks for a new version and for deltas now, in this thread (what the
        background pollers do every interval); returns `status()`."""
        self.manager.poll()
        self.poll_deltas()
        return self.status()

    # -- status ------------------------------------------------------------------

    def monolith_info(self, model):
        info = {"model_name": self.model_name, "version": model.version, "path": model.path,
                "mode": model.metadata.get("mode"), "export_model_name": model.metadata.get("model_name"),
                "loaded_at": model.loaded_at, "delta_dir": self.delta_dir}
        if model.delta_state is not None:
            info.update(model.delta_state.snapshot())
        else:
            info.update({"last_delta_sequence": None, "table_versions": dict(model.table_versions)})
        return info

    def status(self):
        """The serving version, version states, and delta progress."""
        model = self.manager.current()
        out = {
            "model_name": self.model_name, "model_base_path": self.model_base_path,
            "version": model.version if model is not None else None,
            "versions": {v: {"state": s.state, "error": s.error_message}
                         for v, s in self.manager.version_states().items()},
            "ports": {"grpc": self.port, "rest": self.rest_api_port},
            "last_delta_sequence": None, "table_versions": {},
        }
        if model is not None:
            info = self.monolith_info(model)
            for key in ("model_name", "version"):
                info.pop(key)
            out.update(info)
        return out

    # -- requests (transport-free; REST uses these too) ----------------------------

    def run(self, name, version, label, fn):
        """fn(model) under a request's hold on the model it resolves to."""
        with self.manager.acquire(name, version, label) as model:
            return fn(model)

    def version_statuses(self, name, version=None):
        """[(version, VersionState)] as GetModelStatus answers; raises NOT_FOUND."""
        if name != self.model_name:
            raise errors.not_found(f"Could not find any versions of model {name}")
        states = self.manager.version_states()
        if version is not None:
            if version not in states:
                raise errors.not_found(f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise errors.not_found(f"Could not find any versions of model {name}")
        current = self.manager.current()
        result = []
        for v, st in states.items():
            message = st.error_message
            if current is not None and v == current.version and st.state == "AVAILABLE" and not message:
                message = "monolith: " + json.dumps(_compact_info(self.monolith_info(current)), sort_keys=True)
            result.append((v, st.state, st.error_code, message))
        return result

    def signature_def_map(self, model):
        sdm = get_model_metadata_pb2.SignatureDefMap()
        for key, sig_def in model.signature_defs.items():
            sdm.signature_def[key].CopyFrom(sig_def)
        return sdm


def _compact_info(info):
    keys = ("last_delta_sequence", "processed_delta_sequence", "table_versions", "deltas_applied",
            "deltas_skipped", "last_delta_error")
    out = {k: info.get(k) for k in keys if k in info}
    out["deltas_rejected"] = sorted(info.get("deltas_rejected", {}))
    return out


def _host_for_address(host):
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _handle(context, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        err = errors.from_exception(e)
        if err.code == grpc.StatusCode.INTERNAL or err.code == grpc.StatusCode.UNKNOWN:
            log.exception("request failed")
    context.abort(err.code, err.message)


def _arrays_from_request(inputs):
    arrays = {}
    for alias, proto in inputs.items():
        try:
            dtype = tf.as_dtype(proto.dtype)
            array = tf.make_ndarray(proto)
        except Exception as e:
            raise errors.invalid_argument(f"tensor parsing error: {alias}: {e}") from None
        arrays[alias] = (array, dtype)
    return arrays


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):

    def __init__(self, replica):
        self._r = replica

    def Predict(self, request, context):
        return _handle(context, self._predict, request)

    def _predict(self, request):
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run(model):
            arrays = _arrays_from_request(request.inputs)
            key, outputs = inference.predict(model, spec.signature_name, arrays, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, spec.name, model.version, key)
            for alias, value in outputs.items():
                response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
            return response

        return self._r.run(spec.name, version, label, run)

    def GetModelMetadata(self, request, context):
        return _handle(context, self._metadata, request)

    def _metadata(self, request):
        if not request.HasField("model_spec"):
            raise errors.invalid_argument("Missing ModelSpec")
        fields = list(request.metadata_field)
        if not fields:
            raise errors.invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field not in (_SIGNATURE_DEF, _MONOLITH):
                raise errors.invalid_argument(f"Metadata field {field} is not supported")
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run(model):
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(response.model_spec, spec.name, model.version)
            if _SIGNATURE_DEF in fields:
                response.metadata[_SIGNATURE_DEF].Pack(self._r.signature_def_map(model))
            response.metadata[_MONOLITH].Pack(wrappers_pb2.StringValue(
                value=json.dumps(self._r.monolith_info(model), sort_keys=True)))
            return response

        return self._r.run(spec.name, version, label, run)

    def Classify(self, request, context):
        return _handle(context, self._classify, request)

    def _classify(self, request):
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run(model):
            serialized = inference.merge_examples(request.input)
            key, result = inference.classify(model, spec.signature_name, serialized)
            response = classification_pb2.ClassificationResponse()
            _fill_spec(response.model_spec, spec.name, model.version, key)
            for row in result:
                classifications = response.result.classifications.add()
                for class_label, score in row:
                    classifications.classes.add(label=class_label, score=score)
            return response

        return self._r.run(spec.name, version, label, run)

    def Regress(self, request, context):
        return _handle(context, self._regress, request)

    def _regress(self, request):
        spec = request.model_spec
        version, label = _spec_version(spec)

        def run(model):
            serialized = inference.merge_examples(request.input)
            key, values = inference.regress(model, spec.signature_name, serialized)
            response = regression_pb2.RegressionResponse()
            _fill_spec(response.model_spec, spec.name, model.version, key)
            for value in values:
                response.result.regressions.add(value=value)
            return response

        return self._r.run(spec.name, version, label, run)


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):

    def __init__(self, replica):
        self._r = replica

    def GetModelStatus(self, request, context):
        return _handle(context, self._status, request)

    def _status(self, request):
        spec = request.model_spec
        version, _ = _spec_version(spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, state, code, message in self._r.version_statuses(spec.name, version):
            status = response.model_version_status.add(version=v, state=_STATE_ENUM.Value(state))
            status.status.error_code = code.value[0] if code is not None else 0
            status.status.error_message = message
        return response


def wait_until(predicate, timeout=30.0, interval=0.02):
    """Polls `predicate()` until it returns something truthy; returns that, or
    raises TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)

"""TensorFlow Serving's REST API (the subset clients use), over the replica.

    GET  /v1/models/<name>[/versions/<v>]            model status
    GET  /v1/models/<name>[/versions/<v>]/metadata   signature defs (+ "monolith")
    POST /v1/models/<name>[/versions/<v>]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/<name>[/versions/<v>]:classify   {"examples": [...], "context": {...}}
    POST /v1/models/<name>[/versions/<v>]:regress    same

Request and response JSON follow TF Serving: the row ("instances" ->
"predictions") and columnar ("inputs" -> "outputs") formats, binary strings
as {"b64": "..."} (outputs whose name ends in "_bytes" come back that way,
as do strings that are not UTF-8), and errors as {"error": "..."} with TF
Serving's HTTP status for the error code.
"""

import base64
import http.server
import json
import logging
import re
import socket
import threading

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from monolith_tf.serving import errors, inference

__all__ = ["RestServer"]

log = logging.getLogger("monolith_tf.serving")

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<method>predict|classify|regress))?/?$")


def _is_b64(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def _strings(value, alias):
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        if _is_b64(v):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except (ValueError, TypeError) as e:
                raise errors.invalid_argument(f"input '{alias}': bad base64 in {{\"b64\": ...}}: {e}") from None
        if isinstance(v, str):
            return v.encode("utf-8")
        raise errors.invalid_argument(f"input '{alias}': expected a string or {{\"b64\": ...}}, got {json.dumps(v)}")
    array = np.array(convert(value), dtype=object)
    if any(isinstance(x, list) for x in array.flat):
        raise errors.invalid_argument(f"input '{alias}': nested lists have different lengths")
    return array


_KINDS = {"bool": "b", "int": "iu", "float": "iuf"}


def _array(value, dtype, alias):
    """A JSON value as a numpy array of the signature's dtype (or inferred)."""
    if dtype == tf.string or (dtype is None and _looks_like_strings(value)):
        return _strings(value, alias), tf.string
    try:
        array = np.asarray(value)
    except ValueError:
        raise errors.invalid_argument(f"input '{alias}': nested lists have different lengths") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise errors.invalid_argument(f"input '{alias}': expected numbers, got {json.dumps(value)[:200]}")
    if dtype is None:
        return array, tf.as_dtype(array.dtype)
    kind = "bool" if dtype == tf.bool else "int" if dtype.is_integer else "float" if dtype.is_floating else None
    if kind is None:
        raise errors.invalid_argument(f"input '{alias}': dtype {dtype.name} cannot be sent as JSON")
    if array.size and array.dtype.kind not in _KINDS[kind]:
        raise errors.invalid_argument(
            f"input '{alias}': expects {dtype.name} but the JSON holds {array.dtype.name} values")
    return array.astype(dtype.as_numpy_dtype), dtype


def _float32(value):
    """The shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _looks_like_strings(value):
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, str) or _is_b64(value)


def _json_value(array, alias):
    if array.dtype.kind in "OSU":
        as_b64 = alias.endswith("_bytes")

        def convert(v):
            if isinstance(v, list):
                return [convert(x) for x in v]
            if isinstance(v, str):
                return v
            if not as_b64:
                try:
                    return v.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(v).decode("ascii")}
        return convert(array.tolist())
    if array.dtype in (np.float32, np.float16):
        # Shortest decimal that reads back as the same float32 (0.04538724, not 0.04538724198937416).
        shortest = array.astype(str)
        return np.vectorize(float, otypes=[object])(shortest).tolist() if array.ndim else float(shortest[()])
    return array.tolist()


def _predict_arrays(sig, body):
    """{alias: (array, dtype)} and whether the request used the row format."""
    has_instances, has_inputs = "instances" in body, "inputs" in body
    if has_instances == has_inputs:
        raise errors.invalid_argument("Missing 'inputs' or 'instances' key" if not has_instances else
                                      "Request body cannot contain both 'instances' and 'inputs'")

    def dtype_of(alias):
        spec = sig.inputs.get(alias)
        return spec.dtype if spec is not None else None

    single = next(iter(sig.inputs)) if len(sig.inputs) == 1 else None
    if has_instances:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise errors.invalid_argument("'instances' must be a list")
        named = bool(instances) and all(isinstance(i, dict) and not _is_b64(i) for i in instances)
        if not named:
            if single is None:
                raise errors.invalid_argument(
                    f"'instances' must be a list of objects naming the inputs {sorted(sig.inputs)} "
                    f"(signature '{sig.key}' has {len(sig.inputs)} inputs)")
            return {single: _array(instances, dtype_of(single), single)}, True
        keys = set(instances[0])
        for i, instance in enumerate(instances):
            if set(instance) != keys:
                missing = sorted(keys - set(instance)) or sorted(set(instance) - keys)
                raise errors.invalid_argument(
                    f"Failed to process element: {i} of 'instances' list: its inputs {sorted(instance)} differ from "
                    f"the first element's {sorted(keys)} (e.g. {missing[0]})")
        return {alias: _array([inst[alias] for inst in instances], dtype_of(alias), alias) for alias in keys}, True
    inputs = body["inputs"]
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return {alias: _array(value, dtype_of(alias), alias) for alias, value in inputs.items()}, False
    if single is None:
        raise errors.invalid_argument(f"'inputs' must be an object naming the inputs {sorted(sig.inputs)}")
    return {single: _array(inputs, dtype_of(single), single)}, False


def _predict_response(outputs, row_format):
    if not row_format:
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return {"outputs": _json_value(value, alias)}
        return {"outputs": {alias: _json_value(value, alias) for alias, value in outputs.items()}}
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return {"predictions": _json_value(value, alias)}
    batch = None
    for alias, value in outputs.items():
        size = value.shape[0] if value.ndim else None
        if batch is None:
            batch = size
        if size is None or size != batch:
            raise errors.invalid_argument(f"Tensor name: {alias} has inconsistent batch size: {size} expecting: "
                                          f"{batch}")
    columns = {alias: _json_value(value, alias) for alias, value in outputs.items()}
    return {"predictions": [{alias: columns[alias][i] for alias in columns} for i in range(batch or 0)]}


def _feature(value, dtype, name):
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) and not _is_b64(v) for v in values):
        raise errors.invalid_argument(f"feature '{name}': expected a value or a flat list of values")
    if dtype == tf.string or (dtype is None and values and all(isinstance(v, str) or _is_b64(v) for v in values)):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(_strings(values, name))))
    if any(isinstance(v, (str, bool, dict)) or v is None for v in values):
        raise errors.invalid_argument(f"feature '{name}': mixed or unsupported values {json.dumps(values)[:200]}")
    if dtype is not None and dtype.is_integer or dtype is None and all(isinstance(v, int) for v in values):
        if not all(isinstance(v, int) for v in values):
            raise errors.invalid_argument(f"feature '{name}': expects integers, got {json.dumps(values)[:200]}")
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _examples(sig, body):
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise errors.invalid_argument("Request body must contain a non-empty 'examples' list")
    context = body.get("context", {})
    if not isinstance(context, dict):
        raise errors.invalid_argument("'context' must be an object")
    hints = {alias: spec.dtype for alias, spec in sig.inputs.items()} if sig is not None else {}
    serialized = []
    for example in examples:
        if not isinstance(example, dict):
            raise errors.invalid_argument("each of 'examples' must be an object of features")
        merged = dict(context)
        merged.update(example)
        proto = tf.train.Example()
        for name, value in merged.items():
            proto.features.feature[name].CopyFrom(_feature(value, hints.get(name), name))
        serialized.append(proto.SerializeToString())
    return serialized


class RestServer:
    """A threaded HTTP server speaking TF Serving's REST API for `replica`."""

    def __init__(self, replica, host, port):
        self.replica = replica
        self.host = host
        self.port = int(port)
        self._httpd = None
        self._thread = None

    def start(self):
        handler = type("Handler", (_Handler,), {"replica": self.replica})
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("Server", (http.server.ThreadingHTTPServer,),
                            {"address_family": family, "daemon_threads": True, "allow_reuse_address": True})
        try:
            self._httpd = server_class((self.host.strip("[]"), self.port), handler)
        except OSError as e:
            raise OSError(e.errno, f"monolith-serve: cannot bind REST to {self.host}:{self.port}: "
                                   f"{e.strerror}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="monolith-rest", daemon=True)
        self._thread.start()
        return self._httpd.server_address[1]

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None


class _Handler(http.server.BaseHTTPRequestHandler):
    replica = None
    protocol_version = "HTTP/1.1"
    server_version = "monolith-serve"

    def log_message(self, fmt, *args):
        log.debug("REST %s - " + fmt, self.address_string(), *args)

    def _send(self, status, body):
        data = json.dumps(body, indent=1).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method):
        try:
            match = _PATH.match(self.path.split("?", 1)[0])
            if match is None:
                raise errors.invalid_argument(f"Malformed request: {method} {self.path}")
            body = None
            if method == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw.decode("utf-8") or "null")
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise errors.invalid_argument(f"JSON Parse error: {e}") from None
                if not isinstance(body, dict):
                    raise errors.invalid_argument("JSON Value: request body must be a JSON object")
            self._send(200, self._dispatch(method, match, body))
        except Exception as e:
            err = errors.from_exception(e)
            if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                log.exception("REST request failed")
            try:
                self._send(errors.http_status(err.code), {"error": err.message})
            except OSError:
                pass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def _dispatch(self, method, match, body):
        name = match.group("name")
        version = int(match.group("version")) if match.group("version") else None
        label = match.group("label")
        action = match.group("method")
        if method == "GET" and action is None and match.group("metadata") is None:
            if label:
                raise errors.invalid_argument(f"Unrecognized servable version label: {label}")
            return {"model_version_status": [
                {"version": str(v), "state": state,
                 "status": {"error_code": (code.name if code is not None else "OK"), "error_message": message}}
                for v, state, code, message in self.replica.version_statuses(name, version)]}
        if method == "GET" and match.group("metadata"):
            return self.replica.run(name, version, label, self._metadata(name))
        if method == "POST" and action is not None:
            return self.replica.run(name, version, label, getattr(self, f"_{action}")(body))
        raise errors.invalid_argument(f"Malformed request: {method} {self.path}")

    def _metadata(self, name):
        def run(model):
            sdm = self.replica.signature_def_map(model)
            return {"model_spec": {"name": name, "signature_name": "", "version": str(model.version)},
                    "metadata": {"signature_def": json_format.MessageToDict(sdm, preserving_proto_field_name=True),
                                 "monolith": self.replica.monolith_info(model)}}
        return run

    @staticmethod
    def _signature_name(body):
        name = body.get("signature_name", "")
        if not isinstance(name, str):
            raise errors.invalid_argument("'signature_name' must be a string")
        return name

    def _predict(self, body):
        def run(model):
            sig = model.signature(self._signature_name(body))
            arrays, row_format = _predict_arrays(sig, body)
            _, outputs = inference.predict(model, sig.key, arrays)
            return _predict_response(outputs, row_format)
        return run

    def _classify(self, body):
        def run(model):
            name = self._signature_name(body)
            sig = model.signatures.get(name or "serving_default")
            _, result = inference.classify(model, name, _examples(sig, body))
            return {"results": [[[label, _float32(score)] for label, score in row] for row in result]}
        return run

    def _regress(self, body):
        def run(model):
            name = self._signature_name(body)
            sig = model.signatures.get(name or "serving_default")
            _, values = inference.regress(model, name, _examples(sig, body))
            return {"results": [_float32(v) for v in values]}
        return run

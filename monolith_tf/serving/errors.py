"""Errors the replica returns, with TensorFlow Serving's status codes.

Everything below the transport raises `ServingError(code, message)`; the gRPC
servicers turn it into `context.abort(code, message)` and the REST handler
into `{"error": message}` with the HTTP status TF Serving uses for that code.
"""

import grpc
import tensorflow as tf

__all__ = ["ServingError", "not_found", "invalid_argument", "failed_precondition", "internal", "from_exception",
           "http_status", "code_by_value"]

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# tensorflow_serving/model_servers/http_rest_api_handler: ToHTTPStatusCode.
_HTTP = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """A request failed with a canonical status `code` (a grpc.StatusCode)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self):
        return f"ServingError({self.code.name}, {self.message!r})"


def not_found(message):
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def invalid_argument(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message):
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def internal(message):
    return ServingError(grpc.StatusCode.INTERNAL, message)


def code_by_value(value):
    """grpc.StatusCode for a canonical code number (tf.errors codes are the same)."""
    return _BY_VALUE.get(int(value), grpc.StatusCode.UNKNOWN)


def from_exception(e):
    """A ServingError for anything a request may raise; keeps TF's own codes."""
    if isinstance(e, ServingError):
        return e
    if isinstance(e, tf.errors.OpError):
        # OpError messages end with the graph's call stack; the first line is the point.
        message = (e.message or str(e)).strip()
        return ServingError(code_by_value(e.error_code), message)
    if isinstance(e, (TypeError, ValueError)):
        return invalid_argument(f"{type(e).__name__}: {e}")
    return internal(f"{type(e).__name__}: {e}")


def http_status(code):
    return _HTTP.get(code, 500)

"""The `Monolith` estimator's single-file save format: the one place that reads and writes it.

`Monolith.save(path)` writes exactly one file at `path` (whatever its extension) and
`Monolith.load(path)` reads it back. There is no pickle anywhere: the file holds a JSON
header and plain numpy arrays, so loading it never runs code from the file.

Layout:

    b"MONOMDL1"                      8 bytes, magic and container version
    header length                    8 bytes, little-endian uint64
    header                           UTF-8 JSON (below)
    payload                          the arrays, each an .npy blob (np.save, allow_pickle=False),
                                     zlib-compressed when that saves over 10% (admission
                                     sketches are mostly zeros)
    sha256(everything above)         32 bytes

Header: {"format": "monolith_tf.Monolith", "format_version": 1, "created_at" (unix
seconds), "config": {...} (the estimator's own JSON state), "arrays": [{"name", "dtype",
"shape", "offset" (from the payload start), "nbytes" and "sha256" (of the stored bytes),
"compression" (null or "zlib")}]}.

Writes go to a temporary file in the destination's directory, are fsynced, then renamed over
`path` (atomic on POSIX), so a reader never sees a half-written model and a failed save leaves
any previous file intact. `read` checks the trailer checksum, the header, and every array's
checksum, dtype and shape before returning anything; any mismatch is a `ModelFileError` (a
ValueError) naming the file.
"""

import hashlib
import io
import json
import os
import struct
import time
import zlib

import numpy as np

from monolith_tf._files import atomic_write

__all__ = ["ModelFileError", "write", "read", "MAGIC", "FORMAT", "FORMAT_VERSION"]

MAGIC = b"MONOMDL1"
FORMAT = "monolith_tf.Monolith"
FORMAT_VERSION = 1
_DIGEST = 32
_MAX_HEADER = 64 * 1024 * 1024
# Plain numeric dtypes only: object arrays would need pickle, which this format never uses.
_ALLOWED_KINDS = "biuf"


class ModelFileError(ValueError):
    """A model file is corrupt, truncated, foreign or of an unsupported version."""


def write(path, config, arrays):
    """Writes `config` (JSON-serializable) and `arrays` ({name: numpy array}) to `path`."""
    path = os.fspath(path)
    blobs, manifest, offset = [], [], 0
    for name, value in arrays.items():
        value = np.asarray(value)  # (not ascontiguousarray: it turns 0-d arrays into 1-d)
        if value.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"{path}: array {name!r} has dtype {value.dtype}; only numeric arrays are saved")
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        blob, compression = buffer.getvalue(), None
        if len(blob) > 4096:
            packed = zlib.compress(blob, 1)
            if len(packed) < 0.9 * len(blob):
                blob, compression = packed, "zlib"
        manifest.append({"name": name, "dtype": value.dtype.str, "shape": list(value.shape), "offset": offset,
                         "nbytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                         "compression": compression})
        blobs.append(blob)
        offset += len(blob)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": int(time.time()),
              "config": config, "arrays": manifest}
    header_bytes = json.dumps(header, sort_keys=True, allow_nan=False).encode("utf-8")

    def write_file(f):
        digest = hashlib.sha256()
        for chunk in (MAGIC, struct.pack("<Q", len(header_bytes)), header_bytes, *blobs):
            f.write(chunk)
            digest.update(chunk)
        f.write(digest.digest())

    atomic_write(path, write_file)


def read(path):
    """Returns (config, {name: numpy array}) from a file `write` made; validates everything."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()

    def fail(problem):
        return ModelFileError(f"{path}: {problem}")

    if not blob.startswith(MAGIC):
        if blob[:6] == MAGIC[:6]:
            raise fail(f"unsupported container version {blob[6:8]!r} (this monolith_tf reads {MAGIC[6:]!r})")
        raise fail("not a Monolith model file (bad magic; expected one written by Monolith.save)")
    if len(blob) < len(MAGIC) + 8 + _DIGEST:
        raise fail(f"truncated: {len(blob)} bytes is too short for a model file")
    body, trailer = blob[:-_DIGEST], blob[-_DIGEST:]
    (header_len,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    if header_len > _MAX_HEADER or start + header_len > len(body):
        raise fail(f"truncated or corrupt: header length {header_len} does not fit in {len(blob)} bytes")
    if hashlib.sha256(body).digest() != trailer:
        raise fail("checksum mismatch: the file is truncated or corrupt")
    try:
        header = json.loads(body[start:start + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise fail(f"not a Monolith model file (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise fail(f"unsupported format_version {version!r} (this monolith_tf reads version {FORMAT_VERSION})")

    payload = body[start + header_len:]
    arrays, end = {}, 0
    try:
        for entry in header["arrays"]:
            name, offset, nbytes = entry["name"], int(entry["offset"]), int(entry["nbytes"])
            chunk = payload[offset:offset + nbytes]
            if offset < 0 or len(chunk) != nbytes:
                raise fail(f"array {name!r} lies outside the payload (truncated or corrupt)")
            if hashlib.sha256(chunk).hexdigest() != entry["sha256"]:
                raise fail(f"checksum mismatch in array {name!r}")
            compression = entry.get("compression")
            if compression == "zlib":
                try:
                    chunk = zlib.decompress(chunk)
                except zlib.error as e:
                    raise fail(f"array {name!r} does not decompress ({e})") from None
            elif compression is not None:
                raise fail(f"array {name!r} uses unknown compression {compression!r}")
            try:
                value = np.load(io.BytesIO(chunk), allow_pickle=False)
            except ValueError as e:
                raise fail(f"array {name!r} is not a plain numpy array ({e})") from None
            if value.dtype.str != entry["dtype"] or list(value.shape) != list(entry["shape"]):
                raise fail(f"array {name!r} is {value.dtype.str}{list(value.shape)}, header says "
                           f"{entry['dtype']}{entry['shape']}")
            arrays[name] = value
            end = max(end, offset + nbytes)
    except (KeyError, TypeError) as e:
        raise fail(f"corrupt array manifest ({e!r})") from None
    if end != len(payload):
        raise fail(f"payload is {len(payload)} bytes but the arrays cover {end}")
    if not isinstance(header.get("config"), dict):
        raise fail("corrupt header: no config")
    return header["config"], arrays

"""The sparse-delta file format: the one place that reads and writes it.

A trainer publishes what changed in its tables as numbered files in a delta
directory; serving replicas apply them in order, in place. docs/deltas.md is the
human description; this module is the definition.

File `<sequence:012d>.delta`:

    b"MONODLT1"                       8 bytes, magic and format version
    header length                     8 bytes, little-endian uint64
    header                            UTF-8 JSON (below)
    payload                           the arrays' raw little-endian bytes
    sha256(everything above)          32 bytes

Header: {"format": "monolith_tf.delta", "format_version": 1, "sequence", "kind"
("sparse" or "dense"), "model_name", "created_at" (unix seconds), "tables": [{"name",
"dim", "since_version", "version", "full", "num_rows", "num_deleted"}], "dense":
[{"name", "shape", "dtype"}], "arrays": [{"name", "dtype", "shape", "offset",
"nbytes", "sha256"}]}. Sparse rows carry full values (not increments), so
applying a delta twice is harmless. A table entry with "full": true lists every
row: the replica drops rows not in it.

Writes go to a temporary file in the same directory, are fsynced, then renamed,
so readers never see a partial file. Readers check the trailer checksum, the
header, and every array's checksum before returning anything.

Both sides handle files of tens of MiB while other threads of the process serve
requests, so neither copies the payload with the GIL held: arrays are hashed
and written through memoryviews, and a read fills one buffer in chunks
(`readinto` releases the GIL in the system call), hashes views of it (hashlib
releases the GIL for large inputs) and returns arrays that are views of it.
"""

import dataclasses
import hashlib
import json
import os
import re
import struct
import time

import numpy as np

from monolith_tf._files import atomic_write

__all__ = ["Delta", "TableDelta", "DeltaError", "write", "read", "list_sequences", "next_sequence", "path_for"]

MAGIC = b"MONODLT1"
FORMAT = "monolith_tf.delta"
FORMAT_VERSION = 1
_NAME = re.compile(r"^(\d{12})\.delta$")
_MAX_HEADER = 64 * 1024 * 1024
_READ_CHUNK = 8 * 1024 * 1024  # bytes per readinto: a few ms of kernel copying, without the GIL


class DeltaError(ValueError):
    """A delta file is corrupt, truncated, foreign or inconsistent."""


@dataclasses.dataclass
class TableDelta:
    name: str
    dim: int
    since_version: int   # the table version this delta starts after
    version: int         # the table version it brings the replica to
    keys: np.ndarray     # int64 [n]
    values: np.ndarray   # float32 [n, dim]
    deleted_keys: np.ndarray  # int64 [m]
    full: bool = False   # True: keys/values are the whole table


@dataclasses.dataclass
class Delta:
    sequence: int
    model_name: str
    kind: str = "sparse"                              # "sparse" or "dense"
    tables: list = dataclasses.field(default_factory=list)   # [TableDelta]
    dense: dict = dataclasses.field(default_factory=dict)    # name -> ndarray (kind "dense")
    created_at: float = 0.0

    @property
    def num_rows(self):
        return sum(len(t.keys) for t in self.tables)


def path_for(delta_dir, sequence):
    return os.path.join(delta_dir, f"{sequence:012d}.delta")


def list_sequences(delta_dir):
    """Sequence numbers of the delta files in `delta_dir`, ascending."""
    try:
        names = os.listdir(delta_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def next_sequence(delta_dir):
    seqs = list_sequences(delta_dir)
    return seqs[-1] + 1 if seqs else 1


def _bytes_of(a):
    """The raw bytes of a C-contiguous array, without copying them."""
    return memoryview(a).cast("B") if a.size else b""


def _arrays_of(delta):
    arrays = []
    for t in delta.tables:
        arrays += [(f"tables/{t.name}/keys", np.ascontiguousarray(t.keys, "<i8")),
                   (f"tables/{t.name}/values", np.ascontiguousarray(t.values, "<f4")),
                   (f"tables/{t.name}/deleted_keys", np.ascontiguousarray(t.deleted_keys, "<i8"))]
    for name, value in delta.dense.items():
        arrays.append((f"dense/{name}", np.ascontiguousarray(value, np.asarray(value).dtype.newbyteorder("<"))))
    return arrays


def _validate(delta):
    if delta.kind not in ("sparse", "dense"):
        raise DeltaError(f"delta kind must be 'sparse' or 'dense', got {delta.kind!r}")
    names = [t.name for t in delta.tables]
    if len(set(names)) != len(names):
        raise DeltaError(f"delta lists a table twice: {names}")
    for t in delta.tables:
        if np.asarray(t.values).shape != (len(t.keys), t.dim):
            raise DeltaError(f"table '{t.name}': values shape {np.asarray(t.values).shape} != "
                             f"[{len(t.keys)}, {t.dim}]")
        if not t.full and t.since_version > t.version:
            raise DeltaError(f"table '{t.name}': since_version {t.since_version} > version {t.version}")


def write(delta_dir, delta):
    """Writes `delta` atomically as `<sequence>.delta`; returns the path."""
    _validate(delta)
    os.makedirs(delta_dir, exist_ok=True)
    arrays = _arrays_of(delta)
    manifest, offset = [], 0
    for name, a in arrays:
        data = _bytes_of(a)
        manifest.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                         "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sequence": int(delta.sequence), "kind": delta.kind,
        "model_name": delta.model_name, "created_at": delta.created_at or time.time(),
        "tables": [{"name": t.name, "dim": int(t.dim), "since_version": int(t.since_version),
                    "version": int(t.version), "full": bool(t.full), "num_rows": int(len(t.keys)),
                    "num_deleted": int(len(t.deleted_keys))} for t in delta.tables],
        "dense": [{"name": n, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.str}
                  for n, v in delta.dense.items()],
        "arrays": manifest,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    path = path_for(delta_dir, delta.sequence)

    def write_file(f):
        digest = hashlib.sha256()
        for chunk in (MAGIC, struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(chunk)
            digest.update(chunk)
        for _, a in arrays:
            data = _bytes_of(a)
            f.write(data)
            digest.update(data)
        f.write(digest.digest())

    atomic_write(path, write_file)
    return path


def _read_file(path):
    """The file's bytes as a memoryview of one fresh buffer.

    Filled in chunks by readinto, so no step holds the GIL for long and no
    bytes object is built and then copied (f.read() would do both)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        view = memoryview(np.empty(size, np.uint8))  # uninitialised: pages are touched by the kernel's copy
        n = 0
        while n < size:
            got = f.readinto(view[n:n + _READ_CHUNK])
            if not got:
                break  # shorter than fstat said: the checksum below rejects it
            n += got
    return view[:n]


def read(path, *, verify_arrays=False):
    """Reads and verifies a delta file; raises DeltaError naming the file.

    The trailing checksum covers every byte, so it alone proves the file
    intact. Each array's own checksum is for tools that read one array without
    the rest; `verify_arrays=True` checks those too. The default skips that
    second pass over the payload, which on a replica is CPU taken from
    requests (about 100 ms for a 1M-row delta). The returned arrays are views
    of one buffer holding the file (no copies)."""
    try:
        blob = _read_file(path)
    except OSError as e:
        raise DeltaError(f"{path}: cannot read: {e}") from None
    if len(blob) < len(MAGIC) + 8 + 32 or blob[:len(MAGIC)] != MAGIC:
        raise DeltaError(f"{path}: not a monolith_tf delta file (bad magic or too short)")
    body, trailer = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != trailer:
        raise DeltaError(f"{path}: checksum mismatch (file corrupt or truncated)")
    (header_len,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    if header_len > _MAX_HEADER or start + header_len > len(body):
        raise DeltaError(f"{path}: header length {header_len} is out of range")
    try:
        header = json.loads(str(body[start:start + header_len], "utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise DeltaError(f"{path}: header is not a JSON object")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise DeltaError(f"{path}: unsupported format {header.get('format')!r} "
                         f"version {header.get('format_version')!r}")
    try:
        return _decode(path, header, body[start + header_len:], verify_arrays)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, DeltaError):
            raise
        raise DeltaError(f"{path}: malformed header ({type(e).__name__}: {e})") from None


def _decode(path, header, payload, verify_arrays):
    """Arrays and fields of a checksummed file whose header is a JSON object."""
    arrays = {}
    for entry in header["arrays"]:
        lo, hi = entry["offset"], entry["offset"] + entry["nbytes"]
        if hi > len(payload):
            raise DeltaError(f"{path}: array {entry['name']} runs past the end of the payload")
        data = payload[lo:hi]
        if verify_arrays and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DeltaError(f"{path}: array {entry['name']} checksum mismatch")
        dtype = np.dtype(entry["dtype"])
        if dtype.hasobject:
            raise DeltaError(f"{path}: array {entry['name']} has an object dtype")
        arrays[entry["name"]] = np.frombuffer(data, dtype=dtype).reshape(entry["shape"])
    name = os.path.basename(path)
    m = _NAME.match(name)
    if m and int(m.group(1)) != header["sequence"]:
        raise DeltaError(f"{path}: file name says sequence {int(m.group(1))}, header says {header['sequence']}")
    tables = []
    for t in header["tables"]:
        table = TableDelta(name=t["name"], dim=t["dim"], since_version=t["since_version"], version=t["version"],
                           full=t["full"], keys=arrays[f"tables/{t['name']}/keys"],
                           values=arrays[f"tables/{t['name']}/values"],
                           deleted_keys=arrays[f"tables/{t['name']}/deleted_keys"])
        # What a replica casts to int64 / float32 must be integers / floats
        # (write() produces exactly int64 and float32).
        for what, a, kind in (("keys", table.keys, "iu"), ("deleted_keys", table.deleted_keys, "iu"),
                              ("values", table.values, "f")):
            if a.dtype.kind not in kind or a.ndim != (2 if what == "values" else 1):
                raise DeltaError(f"{path}: table '{table.name}' {what} have dtype {a.dtype} and shape "
                                 f"{list(a.shape)}")
        tables.append(table)
    dense = {d["name"]: arrays[f"dense/{d['name']}"] for d in header["dense"]}
    delta = Delta(sequence=header["sequence"], model_name=header["model_name"], kind=header["kind"],
                  tables=tables, dense=dense, created_at=header["created_at"])
    _validate(delta)
    return delta

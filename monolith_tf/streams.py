"""Event sources for online training: streams of rating events in event-time order.

Every source yields pandas DataFrames of at most `batch_size` events from
`batches(batch_size)`, with at least the columns user_id, movie_id (or
item_id), rating and timestamp (int64 seconds), plus whatever other columns the
data has. A source can report its position and go back to one, so a trainer
that checkpoints `tell()` together with its model resumes exactly:

  * `tell()`: the position just after the last event of the last batch
    yielded: a byte offset for files and stdin, an event index otherwise.
  * `seek(position)`: the next `batches()` starts there.

Sources:
  * `FrameSource(frame)`: any DataFrame, sorted by timestamp (stable).
  * `MovieLensSource(folder)`: a MovieLens folder via `datasets.movielens.load`.
  * `SyntheticSource(...)`: the drifting stream of `datasets.synthetic.stream`.
  * `ChunkSource(factory)`: any re-startable iterator of DataFrames.
  * `FileSource(path)`: JSON lines or CSV, "-" for stdin; with `follow=True`
    it keeps reading a file that grows, like `tail -f`.

This module needs only numpy and pandas: nothing here touches TensorFlow.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

__all__ = ["EventSource", "FrameSource", "MovieLensSource", "SyntheticSource", "ChunkSource", "FileSource",
           "MalformedEventError", "REQUIRED_COLUMNS", "COLUMN_DTYPES"]

logger = logging.getLogger(__name__)

# Columns every event must have; a tuple inside means "one of these".
REQUIRED_COLUMNS = ("user_id", ("movie_id", "item_id"), "rating", "timestamp")
# Types enforced on known columns when parsing text. "time" is int64 seconds, floored from floats.
COLUMN_DTYPES = {"user_id": "int64", "movie_id": "int64", "item_id": "int64", "rating": "float32",
                 "timestamp": "time"}

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_MAX_SHOWN = 200  # characters of a bad line quoted in an error


class MalformedEventError(ValueError):
    """A line of an event file that cannot be parsed; names the file and line."""

    def __init__(self, path, line, reason, text):
        self.path, self.line, self.reason = path, line, reason
        shown = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
        super().__init__(f"{path}, line {line}: {reason}: {shown!r}")


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_columns(frame, required, name):
    for need in required:
        options = need if isinstance(need, tuple) else (need,)
        if not any(c in frame.columns for c in options):
            raise ValueError(f"{name}: events lack column {' or '.join(options)} "
                             f"(columns: {', '.join(map(str, frame.columns))})")


class EventSource:
    """A stream of events in event-time order, read in batches, with a position.

    Subclasses implement `batches`, `tell` and `seek`. `malformed` counts
    skipped bad input (file sources with skip_malformed=True); a trainer saves
    and restores it with the position.
    """

    name = "events"
    malformed = 0

    def batches(self, batch_size: int) -> Iterator[pd.DataFrame]:
        raise NotImplementedError

    def tell(self) -> int:
        raise NotImplementedError

    def seek(self, position: int) -> None:
        raise NotImplementedError

    def __iter__(self):
        return self.batches(1024)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, position={self.tell()})"


# ----------------------------------------------------------------------------- in memory


class FrameSource(EventSource):
    """Events from a DataFrame, stably sorted by `timestamp` unless sort=False.

    Position: the index of the next event (0..len).
    """

    def __init__(self, frame: pd.DataFrame, *, timestamp: str = "timestamp", sort: bool = True,
                 required=REQUIRED_COLUMNS, name: str = "frame"):
        self.name = name
        _check_columns(frame, required, name)
        if sort:
            frame = frame.sort_values(timestamp, kind="stable")
        self.frame = frame.reset_index(drop=True)
        self._position = 0

    def __len__(self):
        return len(self.frame)

    def tell(self):
        return self._position

    def seek(self, position):
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= len(self.frame):
            raise ValueError(f"{self.name}: position must be an event index in [0, {len(self.frame)}], "
                             f"got {position!r}")
        self._position = position

    def batches(self, batch_size):
        _check_batch_size(batch_size)
        while self._position < len(self.frame):
            start = self._position
            self._position = min(start + batch_size, len(self.frame))
            yield self.frame.iloc[start:self._position].reset_index(drop=True)


class MovieLensSource(FrameSource):
    """A MovieLens folder (ml-100k, ml-1m, ml-latest...) in timestamp order.

    Ties keep file order (a stable sort). With `with_metadata=True` the users'
    (gender, age, occupation, zip_code) and movies' (title, genres) columns are
    joined onto each rating where the files exist.
    """

    def __init__(self, folder, *, with_metadata: bool = False):
        from monolith_tf.datasets import movielens
        data = movielens.load(folder)
        ratings = data["ratings"]
        if with_metadata:
            if "users" in data:
                ratings = ratings.merge(data["users"], on="user_id", how="left", sort=False)
            if "movies" in data:
                ratings = ratings.merge(data["movies"], on="movie_id", how="left", sort=False)
        super().__init__(ratings, name=f"movielens:{os.fspath(folder)}")


class ChunkSource(EventSource):
    """Events from `factory()`, an iterator of DataFrames already in event order,
    re-batched to `batch_size`. `factory` must give the same events each call:
    `seek(n)` restarts it and skips n events.

    Position: the number of events before the next one.
    """

    def __init__(self, factory: Callable[[], Iterable[pd.DataFrame]], *, required=REQUIRED_COLUMNS,
                 name: str = "chunks"):
        self.factory = factory
        self.required = required
        self.name = name
        self._position = 0

    def tell(self):
        return self._position

    def seek(self, position):
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"{self.name}: position must be an event index >= 0, got {position!r}")
        self._position = position

    def batches(self, batch_size):
        _check_batch_size(batch_size)
        skip = self._position
        pending, pending_rows = [], 0
        for chunk in self.factory():
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk.iloc[dropped:], skip - dropped
            if not len(chunk):
                continue
            _check_columns(chunk, self.required, self.name)
            pending.append(chunk)
            pending_rows += len(chunk)
            while pending_rows >= batch_size:
                merged = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
                rest = merged.iloc[batch_size:]
                pending, pending_rows = ([rest] if len(rest) else []), len(rest)
                self._position += batch_size
                yield merged.iloc[:batch_size].reset_index(drop=True)
        if skip:
            raise ValueError(f"{self.name}: cannot seek to event {self._position}: the stream has only "
                             f"{self._position - skip}")
        if pending_rows:
            self._position += pending_rows
            yield pd.concat(pending, ignore_index=True)


class SyntheticSource(ChunkSource):
    """The seeded drifting stream of `datasets.synthetic.stream` (same arguments).

    Deterministic for a seed, whatever the batch size, so seeking regenerates
    the stream and skips the events before the position.
    """

    def __init__(self, num_users: int = 943, num_items: int = 1682, num_ratings: int = 100_000, **kwargs):
        from monolith_tf.datasets import synthetic
        kwargs.pop("chunk_size", None)  # the output does not depend on it
        synthetic.stream(num_users, num_items, num_ratings, **kwargs)  # validates the arguments now
        self.num_ratings = num_ratings
        self.options = dict(num_users=num_users, num_items=num_items, num_ratings=num_ratings, **kwargs)

        def factory():
            return synthetic.stream(num_users, num_items, num_ratings, chunk_size=1 << 16, **kwargs)

        args = ",".join(f"{k}={v}" for k, v in self.options.items())
        super().__init__(factory, name=f"synthetic:{args}")

    def __len__(self):
        return self.num_ratings


# ----------------------------------------------------------------------------- files


_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def _to_int(value, floor=False):
    """value as a Python int in the int64 range (ids and times become int64
    arrays), or ValueError with the reason."""
    out = _to_python_int(value, floor)
    if not _INT64_MIN <= out <= _INT64_MAX:
        raise ValueError("outside the int64 range")
    return out


def _to_python_int(value, floor):
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        if floor:
            return math.floor(value)
        if not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def _to_float(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("not a finite number")
    return out


_CONVERT = {"int64": _to_int, "time": lambda v: _to_int(v, floor=True), "float32": _to_float}
_NUMPY = {"int64": np.int64, "time": np.int64, "float32": np.float32}


class FileSource(EventSource):
    """Events from a JSON-lines or CSV file, or stdin ("-"), one event a line.

    Args:
      path: a file, or "-" for stdin (`stdin` overrides the stream, e.g. for tests).
      format: "jsonl", "csv" or "tsv" (header line required for CSV/TSV); by
        default from the extension, else guessed from the first line ("{" = jsonl).
      follow: at the end of the file, wait for more lines like `tail -f`
        instead of stopping. A line counts once its newline has arrived.
      poll_interval: seconds between looks at a followed file.
      idle_timeout: stop following after this many seconds without a new line.
      stop: a no-argument callable checked at each poll; True stops following.
      skip_malformed: count bad lines in `malformed` (and log the first few)
        instead of raising MalformedEventError.
      required: columns every event needs (a tuple inside = one of those).
      dtypes: column -> "int64" | "float32" | "time" (int seconds, floats
        floored) for typed columns, on top of COLUMN_DTYPES; other columns stay
        as parsed (JSON values, CSV strings).
      sleep, clock: injectable `time.sleep` and `time.monotonic`.

    Events keep file order (the writer appends in event-time order). Position:
    the byte offset after the last line of the last batch. When following, a
    batch is yielded early whenever the reader catches up with the writer, so
    events are trained on as soon as they arrive.
    """

    def __init__(self, path, *, format: str | None = None, follow: bool = False, poll_interval: float = 1.0,
                 idle_timeout: float | None = None, stop: Callable[[], bool] | None = None,
                 skip_malformed: bool = False, required=REQUIRED_COLUMNS, dtypes: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 stdin=None):
        self.path = os.fspath(path)
        self.is_stdin = self.path == "-"
        self.name = "<stdin>" if self.is_stdin else self.path
        if format is None and not self.is_stdin:
            format = _FORMATS.get(os.path.splitext(self.path)[1].lower())
        if format not in (None, "jsonl", "csv", "tsv"):
            raise ValueError(f"{self.name}: format must be 'jsonl', 'csv' or 'tsv', got {format!r}")
        if not poll_interval > 0:
            raise ValueError(f"{self.name}: poll_interval must be > 0, got {poll_interval!r}")
        if idle_timeout is not None and not idle_timeout >= 0:
            raise ValueError(f"{self.name}: idle_timeout must be >= 0 or None, got {idle_timeout!r}")
        if not self.is_stdin and not os.path.isfile(self.path):
            raise FileNotFoundError(f"event file {self.path} does not exist")
        self.format = format
        self.follow = follow
        self.poll_interval = poll_interval
        self.idle_timeout = idle_timeout
        self.stop = stop
        self.skip_malformed = skip_malformed
        self.required = required
        self.dtypes = {**COLUMN_DTYPES, **(dtypes or {})}
        for column, dtype in self.dtypes.items():
            if dtype not in _CONVERT:
                raise ValueError(f"{self.name}: dtype of {column!r} must be one of {sorted(_CONVERT)}, got {dtype!r}")
        self._sleep = sleep
        self._clock = clock
        self._stdin = stdin
        self._stream = None       # the open binary stream
        self._read = 0            # bytes consumed from the stream so far (complete lines)
        self._line = 0            # lines consumed so far
        self._header = None       # CSV column names
        self._carry = b""         # read but incomplete last line, waiting for its newline
        self._position = 0
        self.malformed = 0
        self.last_error = None

    # -- position ----------------------------------------------------------------

    def tell(self):
        return self._position

    def seek(self, position):
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"{self.name}: position must be a byte offset >= 0, got {position!r}")
        if self._stream is not None and not self._seekable() and position < self._read:
            raise ValueError(f"{self.name}: cannot seek back to byte {position} in a stream already read "
                             f"to byte {self._read}")
        self._position = position

    def _seekable(self):
        try:
            return self._stream.seekable()
        except (AttributeError, ValueError):
            return False

    def close(self):
        if self._stream is not None and not self.is_stdin:
            self._stream.close()
        self._stream = None

    # -- reading -------------------------------------------------------------------

    def _open(self):
        if self._stream is None:
            if self.is_stdin:
                self._stream = self._stdin if self._stdin is not None else sys.stdin.buffer
            else:
                self._stream = open(self.path, "rb")
            self._read = self._line = 0
            self._header, self._carry = None, b""
        if self._read == self._position:
            return
        if self._seekable():
            self._stream.seek(0)
            self._read = self._line = 0
            self._header, self._carry = None, b""
        elif self._read > self._position:
            raise ValueError(f"{self.name}: cannot seek back to byte {self._position}")
        # Read up to the position: counts lines (for messages) and reads a CSV header on the way.
        while self._read < self._position:
            line, self._carry = self._carry + self._stream.readline(), b""
            if not line or (not line.endswith(b"\n") and self._read + len(line) < self._position):
                raise ValueError(f"{self.name}: cannot seek to byte {self._position}: the input has only "
                                 f"{self._read + len(line)} bytes")
            if self._read + len(line) > self._position:
                raise ValueError(f"{self.name}: byte {self._position} is not at the start of a line "
                                 "(the file changed since the position was saved?)")
            self._consume_meta(line)

    def _consume_meta(self, line):
        """Accounts for a line read while seeking: only a CSV header matters."""
        self._read += len(line)
        self._line += 1
        text = line.decode("utf-8", errors="replace").strip()
        if text and self._header is None and self._format_for(text) in ("csv", "tsv"):
            self._header = self._parse_header(text)

    def _format_for(self, text):
        if self.format is None:
            self.format = "jsonl" if text.lstrip().startswith("{") else "csv"
        return self.format

    def _parse_header(self, text):
        names = [c.strip() for c in next(csv.reader([text], delimiter="\t" if self.format == "tsv" else ","))]
        if len(set(names)) != len(names) or not all(names):
            raise MalformedEventError(self.name, self._line, "bad CSV header (empty or repeated column names)", text)
        missing = [need for need in self.required
                   if not any(c in names for c in (need if isinstance(need, tuple) else (need,)))]
        if missing:
            raise MalformedEventError(self.name, self._line, "CSV header lacks column(s) " + ", ".join(
                " or ".join(m) if isinstance(m, tuple) else m for m in missing), text)
        return names

    def _parse(self, text):
        """One event as a dict, or raises ValueError with the reason."""
        if self.format == "jsonl":
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        else:
            fields = next(csv.reader([text], delimiter="\t" if self.format == "tsv" else ","))
            if len(fields) != len(self._header):
                raise ValueError(f"expected {len(self._header)} fields, got {len(fields)}")
            record = dict(zip(self._header, fields))
        for need in self.required:
            options = need if isinstance(need, tuple) else (need,)
            if not any(record.get(c) not in (None, "") for c in options):
                raise ValueError(f"missing {' or '.join(options)}")
        for column, dtype in self.dtypes.items():
            value = record.get(column)
            if value is None or value == "":
                continue
            try:
                record[column] = _CONVERT[dtype](value)
            except (ValueError, OverflowError) as e:
                raise ValueError(f"bad {column} {value!r} ({e})") from None
        return record

    def _frame(self, records):
        frame = pd.DataFrame.from_records(records)
        for column, dtype in self.dtypes.items():
            if column in frame.columns and not frame[column].isna().any():
                frame[column] = frame[column].to_numpy(dtype=_NUMPY[dtype])
        return frame

    def batches(self, batch_size):
        _check_batch_size(batch_size)
        self._open()
        records = []
        idle_since = self._clock()
        while True:
            chunk = self._stream.readline()
            line, self._carry = self._carry + chunk, b""
            # Without follow, a last line lacking its newline still counts.
            if line.endswith(b"\n") or (line and not self.follow):
                self._read += len(line)
                self._line += 1
                self._take(line, records)
                idle_since = self._clock()
                if len(records) == batch_size:
                    self._position = self._read
                    yield self._frame(records)
                    records = []
                continue
            self._carry = line
            # Caught up with the writer (or at the end of the input).
            if records:
                self._position = self._read
                yield self._frame(records)
                records = []
            if not self.follow:
                break
            if self.stop is not None and self.stop():
                break
            if self.idle_timeout is not None and self._clock() - idle_since >= self.idle_timeout:
                break
            if not self.is_stdin and os.path.getsize(self.path) < self._read + len(self._carry):
                raise ValueError(f"{self.name}: the file shrank below byte {self._read + len(self._carry)} while "
                                 "being followed (truncated or replaced?)")
            self._sleep(self.poll_interval)
        # Blank or malformed lines after the last event still count as read.
        self._position = self._read

    def _take(self, line, records):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(f"not UTF-8 ({e.reason} at byte {e.start})", line.decode("utf-8", errors="replace"))
        text = text.strip()
        if not text:
            return
        if self._format_for(text) in ("csv", "tsv") and self._header is None:
            self._header = self._parse_header(text)
            return
        try:
            records.append(self._parse(text))
        except ValueError as e:
            self._bad(str(e), text)

    def _bad(self, reason, text):
        error = MalformedEventError(self.name, self._line, reason, text)
        if not self.skip_malformed:
            raise error
        self.malformed += 1
        self.last_error = str(error)
        if self.malformed <= 10:
            logger.warning("skipping malformed event: %s", error)


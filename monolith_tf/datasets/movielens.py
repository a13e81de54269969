"""Read GroupLens MovieLens rating datasets into pandas frames.

`load(folder)` detects the layout from the files present and returns

    {"format":  "ml-100k" | "ml-1m" | "ml-latest",
     "ratings": DataFrame[user_id int64, movie_id int64, rating float32, timestamp int64],
     "movies":  DataFrame[movie_id int64, title str, genres list[str]]     (if a movies file exists),
     "users":   DataFrame[user_id int64, gender str, age int64, occupation str, zip_code str]
                                                                         (if a users file exists)}

Layouts:
  * ml-100k: u.data (tab), u.item / u.user / u.genre ('|', latin-1).
  * ml-1m:   ratings.dat / movies.dat / users.dat ('::', latin-1). ml-10m has the same layout
             (without users.dat) and loads as "ml-1m".
  * ml-latest, ml-latest-small, ml-20m, ml-25m: ratings.csv / movies.csv (UTF-8, quoted, header).

Parsing is done by the pandas C parser on whole files (ml-25m has 25M ratings, so nothing here
loops over lines in Python); validation runs afterwards on whole columns. A malformed file raises
ValueError naming the file, the 1-based line number of the first bad line, and that line.

This module must not import TensorFlow or the compiled monolith_tf ops (data preparation works on
machines without them) and must not download or bundle MovieLens: its license forbids
redistribution, so users fetch it from https://grouplens.org/datasets/movielens/ themselves.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from pandas.errors import DtypeWarning, ParserError, ParserWarning

__all__ = ["load", "RATINGS_COLUMNS", "MOVIES_COLUMNS", "USERS_COLUMNS"]

RATINGS_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")
MOVIES_COLUMNS = ("movie_id", "title", "genres")
USERS_COLUMNS = ("user_id", "gender", "age", "occupation", "zip_code")

# ml-100k's genre order, used when u.genre is absent (u.item only stores 19 flags).
ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

# users.dat stores occupations as codes; the names come from the ml-1m README.
ML_1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)

# ml-latest's placeholder for a movie without genres; it is not a genre, so it maps to [].
_NO_GENRES = "(no genres listed)"

# Multi-character separators ('::') are rewritten in memory to this single byte so the C parser
# can read the file; the ASCII unit separator does not occur in MovieLens text.
_SEPARATOR_BYTE = "\x1f"

# Integers are validated through float64 when pandas could not parse a column as int64;
# beyond 2**53 float64 stops being exact, so larger values are rejected.
_MAX_EXACT_INT = 2**53


@dataclass(frozen=True)
class _Field:
    """One column of a file: its name, type and the values it may hold."""

    name: str
    dtype: str  # "int64", "float32" or "str"
    required: bool = True  # False: an empty value is allowed (str fields only)
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _FileSpec:
    """How one MovieLens file is laid out."""

    name: str
    separator: str
    fields: tuple[_Field, ...]
    encoding: str
    header: str | None = None  # exact first line, for files that have one
    quoted: bool = False  # CSV quoting ("a, b" titles); off elsewhere since titles contain '"'

    @property
    def first_data_line(self) -> int:
        return 2 if self.header is not None else 1


def _id(name: str) -> _Field:
    return _Field(name, "int64", minimum=0)


_RATINGS_FIELDS = (
    _id("user_id"),
    _id("movie_id"),
    _Field("rating", "float32", minimum=0.5, maximum=5.0),
    _Field("timestamp", "int64", minimum=0),
)
_GENDER = _Field("gender", "str", choices=("M", "F"))
_ZIP = _Field("zip_code", "str")

_U_DATA = _FileSpec("u.data", "\t", _RATINGS_FIELDS, "latin-1")
_U_ITEM = _FileSpec(
    "u.item",
    "|",
    (
        _id("movie_id"),
        _Field("title", "str"),
        _Field("release_date", "str", required=False),
        _Field("video_release_date", "str", required=False),
        _Field("imdb_url", "str", required=False),
    )
    + tuple(_Field(f"genre_{i}", "int64", minimum=0, maximum=1) for i in range(len(ML_100K_GENRES))),
    "latin-1",
)
_U_USER = _FileSpec(
    "u.user",
    "|",
    (_id("user_id"), _Field("age", "int64", minimum=0, maximum=150), _GENDER,
     _Field("occupation", "str"), _ZIP),
    "latin-1",
)
_U_GENRE = _FileSpec(
    "u.genre",
    "|",
    (_Field("genre", "str"), _Field("index", "int64", minimum=0, maximum=len(ML_100K_GENRES) - 1)),
    "latin-1",
)

_RATINGS_DAT = _FileSpec("ratings.dat", "::", _RATINGS_FIELDS, "latin-1")
_MOVIES_DAT = _FileSpec(
    "movies.dat", "::", (_id("movie_id"), _Field("title", "str"), _Field("genres", "str")), "latin-1"
)
_USERS_DAT = _FileSpec(
    "users.dat",
    "::",
    (_id("user_id"), _GENDER, _Field("age", "int64", minimum=0, maximum=150),
     _Field("occupation", "int64", minimum=0, maximum=len(ML_1M_OCCUPATIONS) - 1), _ZIP),
    "latin-1",
)

_RATINGS_CSV = _FileSpec(
    "ratings.csv", ",", _RATINGS_FIELDS, "utf-8",
    header="userId,movieId,rating,timestamp", quoted=True,
)
_MOVIES_CSV = _FileSpec(
    "movies.csv", ",", (_id("movie_id"), _Field("title", "str"), _Field("genres", "str")), "utf-8",
    header="movieId,title,genres", quoted=True,
)


@dataclass(frozen=True)
class _Layout:
    """A MovieLens release family: its files and how to turn them into canonical frames."""

    format: str
    description: str
    ratings: _FileSpec
    movies: _FileSpec | None
    users: _FileSpec | None
    read_movies: Callable[[Path], pd.DataFrame] | None
    read_users: Callable[[Path], pd.DataFrame] | None


def load(path: str | os.PathLike) -> dict:
    """Load the MovieLens dataset in folder `path` (ml-100k, ml-1m/ml-10m or ml-latest/20m/25m).

    Returns a dict with "format", "ratings" and, where the files exist, "movies" and "users";
    see the module docstring for columns and dtypes. Ratings keep file order.

    Raises FileNotFoundError when `path` is missing or holds no MovieLens ratings file, and
    ValueError for an ambiguous folder or a malformed file (naming file, line number and line).
    """
    folder = Path(path)
    layout = _detect_layout(folder)
    result: dict = {"format": layout.format}
    result["ratings"] = _read_table(folder / layout.ratings.name, layout.ratings)
    if layout.movies is not None and (folder / layout.movies.name).is_file():
        result["movies"] = layout.read_movies(folder)
    if layout.users is not None and (folder / layout.users.name).is_file():
        result["users"] = layout.read_users(folder)
    return result


# ----------------------------------------------------------------------------- layouts


def _read_100k_movies(folder: Path) -> pd.DataFrame:
    raw = _read_table(folder / _U_ITEM.name, _U_ITEM)
    names = _read_100k_genre_names(folder)
    flags = raw[[f"genre_{i}" for i in range(len(ML_100K_GENRES))]].to_numpy(dtype=bool)
    return _movies_frame(raw["movie_id"], raw["title"], _flags_to_lists(flags, names))


def _read_100k_genre_names(folder: Path) -> np.ndarray:
    path = folder / _U_GENRE.name
    if not path.is_file():
        # Trimmed copies (and test fixtures) often omit u.genre; the order is fixed by the release.
        return np.asarray(ML_100K_GENRES, dtype=object)
    table = _read_table(path, _U_GENRE)
    expected = set(range(len(ML_100K_GENRES)))
    if set(table["index"]) != expected or len(table) != len(expected):
        raise ValueError(
            f"{path}: expected genre indices 0..{len(expected) - 1} once each (one per u.item "
            f"flag column), found {sorted(table['index'].tolist())}"
        )
    names = np.empty(len(expected), dtype=object)
    names[table["index"].to_numpy()] = table["genre"].to_numpy(dtype=object)
    return names


def _read_100k_users(folder: Path) -> pd.DataFrame:
    raw = _read_table(folder / _U_USER.name, _U_USER)
    return raw[list(USERS_COLUMNS)]


def _read_genre_string_movies(spec: _FileSpec) -> Callable[[Path], pd.DataFrame]:
    def read(folder: Path) -> pd.DataFrame:
        raw = _read_table(folder / spec.name, spec)
        # One list per movie (tens of thousands at most), so a comprehension is cheap here.
        genres = [[] if text == _NO_GENRES else text.split("|") for text in raw["genres"]]
        return _movies_frame(raw["movie_id"], raw["title"], genres)

    return read


def _read_1m_users(folder: Path) -> pd.DataFrame:
    raw = _read_table(folder / _USERS_DAT.name, _USERS_DAT)
    names = np.asarray(ML_1M_OCCUPATIONS, dtype=object)[raw["occupation"].to_numpy()]
    users = raw[list(USERS_COLUMNS)].copy()
    users["occupation"] = pd.Series(names, index=users.index, dtype="str")
    return users


_LAYOUTS = (
    _Layout("ml-100k", "u.data (ml-100k)", _U_DATA, _U_ITEM, _U_USER,
            _read_100k_movies, _read_100k_users),
    _Layout("ml-1m", "ratings.dat (ml-1m, ml-10m)", _RATINGS_DAT, _MOVIES_DAT, _USERS_DAT,
            _read_genre_string_movies(_MOVIES_DAT), _read_1m_users),
    _Layout("ml-latest", "ratings.csv (ml-latest, ml-latest-small, ml-20m, ml-25m)",
            _RATINGS_CSV, _MOVIES_CSV, None, _read_genre_string_movies(_MOVIES_CSV), None),
)


def _detect_layout(folder: Path) -> _Layout:
    looked_for = ", ".join(layout.description for layout in _LAYOUTS)
    if not folder.exists():
        raise FileNotFoundError(f"MovieLens folder {folder} does not exist; expected a folder holding "
                                f"one of: {looked_for}")
    if not folder.is_dir():
        raise FileNotFoundError(f"MovieLens path {folder} is not a folder; expected a folder holding "
                                f"one of: {looked_for}")
    found = [layout for layout in _LAYOUTS if (folder / layout.ratings.name).is_file()]
    if len(found) > 1:
        names = ", ".join(layout.ratings.name for layout in found)
        raise ValueError(f"MovieLens folder {folder} holds ratings files of several formats ({names}); "
                         f"keep one dataset per folder")
    if not found:
        hint = ""
        nested = sorted(child.name for child in folder.iterdir() if child.is_dir()
                        and any((child / layout.ratings.name).is_file() for layout in _LAYOUTS))
        if nested:
            hint = f" (sub-folders {', '.join(nested)} hold one: pass that folder instead)"
        raise FileNotFoundError(f"No MovieLens ratings file in {folder}: looked for {looked_for}{hint}")
    return found[0]


def _movies_frame(movie_id: pd.Series, title: pd.Series, genres: list) -> pd.DataFrame:
    return pd.DataFrame({"movie_id": movie_id.to_numpy(), "title": title.to_numpy(),
                         "genres": pd.Series(genres, dtype=object)})


def _flags_to_lists(flags: np.ndarray, names: np.ndarray) -> list[list[str]]:
    """Turns an (n_movies, n_genres) 0/1 matrix into one list of genre names per movie."""
    _, cols = np.nonzero(flags)  # row-major, so each movie's genres come out in column order
    boundaries = np.cumsum(flags.sum(axis=1))[:-1]
    return [part.tolist() for part in np.split(names[cols], boundaries)]


# ----------------------------------------------------------------------------- parsing


def _read_table(path: Path, spec: _FileSpec) -> pd.DataFrame:
    """Parses one file with the C parser, validates every field, returns typed columns."""
    if spec.header is not None:
        _check_header(path, spec)
    names = [field.name for field in spec.fields]
    if len(spec.separator) > 1:
        source = io.BytesIO(path.read_bytes().replace(spec.separator.encode(), _SEPARATOR_BYTE.encode()))
        separator = _SEPARATOR_BYTE
    else:
        source, separator = path, spec.separator
    try:
        with warnings.catch_warnings():
            # With index_col=False pandas silently drops extra fields of the first data row and
            # only warns; make that an error so no line is ever truncated unnoticed.
            warnings.simplefilter("error", ParserWarning)
            # Columns with stray text parse as mixed types; the validation below reports them.
            warnings.simplefilter("ignore", DtypeWarning)
            frame = pd.read_csv(
                source,
                sep=separator,
                engine="c",
                header=0 if spec.header is not None else None,
                names=names,
                index_col=False,
                dtype={field.name: str for field in spec.fields if field.dtype == "str"},
                # Keep blank lines as all-empty rows so row r is always line r + first_data_line
                # (and a blank line in the middle is reported instead of silently skipped).
                skip_blank_lines=False,
                keep_default_na=False,
                na_values=[""],  # a movie titled "NA" or "null" is a title, not a missing value
                quoting=csv.QUOTE_MINIMAL if spec.quoted else csv.QUOTE_NONE,
                encoding=spec.encoding,
            )
    except ParserWarning:
        raise _line_error(path, spec, spec.first_data_line,
                          f"expected {len(names)} fields separated by {spec.separator!r}") from None
    except ParserError as error:
        raise _parser_error(path, spec, error) from None
    except UnicodeDecodeError as error:
        raise _decode_error(path, spec, error) from None
    frame = _drop_trailing_blank_rows(frame)
    return _validate(path, spec, frame)


def _check_header(path: Path, spec: _FileSpec) -> None:
    with open(path, encoding=spec.encoding, errors="replace", newline="") as file:
        first = file.readline().rstrip("\r\n")
    if first != spec.header:
        raise _line_error(path, spec, 1, f"expected the header {spec.header!r}")


def _drop_trailing_blank_rows(frame: pd.DataFrame) -> pd.DataFrame:
    # A blank last line (u.genre ends with one) is harmless; only the tail is inspected.
    end = len(frame)
    while end > 0 and frame.iloc[end - 1].isna().all():
        end -= 1
    return frame if end == len(frame) else frame.iloc[:end]


def _validate(path: Path, spec: _FileSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Checks every field column-wise; raises for the first bad line, returns typed columns."""
    problems: list[tuple[int, str]] = []  # (row, message) of the first bad row of each check

    def check(bad: np.ndarray, describe: Callable[[int], str]) -> None:
        if bad.any():
            row = int(np.argmax(bad))
            problems.append((row, describe(row)))

    def describe_missing(field: _Field) -> Callable[[int], str]:
        def describe(row: int) -> str:
            if frame.iloc[row].isna().all():
                return "the line is empty"
            return (f"missing value for {field.name!r} (expected {len(spec.fields)} fields "
                    f"separated by {spec.separator!r})")
        return describe

    columns = {}
    for field in spec.fields:
        column = frame[field.name]
        missing = column.isna().to_numpy()
        if field.dtype == "str":
            if field.required:
                check(missing, describe_missing(field))
            values = column.fillna("")
            if spec.quoted:
                # No MovieLens field holds a newline: one means a quote left open swallowed the
                # following lines. Rows before the first such field are one line each, so the
                # row still maps to the line where the quote opened.
                check(values.str.contains("\n", regex=False).to_numpy(),
                      lambda row, f=field: f"{f.name!r} runs past the end of the line (unclosed quote?)")
            if field.choices is not None:
                check(~values.isin(field.choices).to_numpy() & ~missing,
                      lambda row, f=field, v=values: f"{f.name!r} must be one of {list(f.choices)}, "
                                                     f"got {v.iloc[row]!r}")
            columns[field.name] = values
            continue

        check(missing, describe_missing(field))
        if column.dtype.kind == "i":
            numbers = column
        else:
            numbers = pd.to_numeric(column, errors="coerce").astype("float64")
            check(numbers.isna().to_numpy() & ~missing,
                  lambda row, f=field, c=column: f"{f.name!r} is not a number: {_show(c.iloc[row])}")
            if field.dtype == "int64":
                as_float = numbers.to_numpy()
                check((np.mod(as_float, 1) != 0) | (np.abs(as_float) > _MAX_EXACT_INT),
                      lambda row, f=field, c=column: f"{f.name!r} is not an integer: {_show(c.iloc[row])}")
        if field.minimum is not None or field.maximum is not None:
            low = -np.inf if field.minimum is None else field.minimum
            high = np.inf if field.maximum is None else field.maximum
            values = numbers.to_numpy()
            # NaN compares False, so only present-but-out-of-range values are flagged here.
            check((values < low) | (values > high),
                  lambda row, f=field, c=column: f"{f.name!r} = {_show(c.iloc[row])} {_allowed_range(f)}")
        columns[field.name] = numbers

    if problems:
        row, message = min(problems, key=lambda problem: problem[0])
        raise _line_error(path, spec, row + spec.first_data_line, message)
    return pd.DataFrame({field.name: _typed(columns[field.name], field) for field in spec.fields})


def _show(value) -> str:
    """A field value as the user wrote it: text quoted, numbers plain (no numpy reprs)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _allowed_range(field: _Field) -> str:
    if field.minimum is not None and field.maximum is not None:
        return f"is outside [{field.minimum:g}, {field.maximum:g}]"
    if field.minimum is not None:
        return f"is below the minimum {field.minimum:g}"
    return f"is above the maximum {field.maximum:g}"


def _typed(column: pd.Series, field: _Field) -> np.ndarray | pd.Series:
    if field.dtype == "str":
        return column.reset_index(drop=True)
    return column.to_numpy().astype(field.dtype, copy=False)


# ----------------------------------------------------------------------------- error messages

_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_UNTERMINATED_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


def _parser_error(path: Path, spec: _FileSpec, error: ParserError) -> ValueError:
    text = str(error)
    if match := _FIELD_COUNT.search(text):
        expected, line, saw = (int(group) for group in match.groups())
        return _line_error(path, spec, line,
                           f"expected {expected} fields separated by {spec.separator!r}, found {saw}")
    if match := _UNTERMINATED_QUOTE.search(text):
        # pandas counts this "row" from 0 over physical lines, header included.
        return _line_error(path, spec, int(match.group(1)) + 1, "quoted field is never closed")
    return ValueError(f"{path}: cannot parse as {spec.name}: {text.strip()}")


def _decode_error(path: Path, spec: _FileSpec, error: UnicodeDecodeError) -> ValueError:
    # pandas reports offsets within its own buffer; decode the raw bytes to find the real line.
    raw = path.read_bytes()
    try:
        raw.decode(spec.encoding)
    except UnicodeDecodeError as exact:
        line = raw.count(b"\n", 0, exact.start) + 1
        return _line_error(path, spec, line, f"bytes are not valid {spec.encoding}")
    return ValueError(f"{path}: not valid {spec.encoding}: {error}")


def _line_error(path: Path, spec: _FileSpec, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {problem}: {_line_text(path, spec, line)!r}")


def _line_text(path: Path, spec: _FileSpec, line: int, limit: int = 200) -> str:
    with open(path, "rb") as file:
        raw = next(itertools.islice(file, line - 1, line), b"")
    text = raw.rstrip(b"\r\n").decode(spec.encoding, errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."

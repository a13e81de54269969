"""Tests for monolith_tf.datasets.

MovieLens: the real ml-100k (via the shared `movielens_100k_dir` fixture, skipped without data),
tiny hand-written ml-1m / ml-latest / ml-100k folders checked value by value, and malformed files
that must be reported with file name and line number. Synthetic: determinism, the MovieLens frame
shapes, and the statistical properties the generator promises (rating distribution, Zipf
popularity, arriving ids, drift, one-off ids, bounded-memory streaming).
"""

import re
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from monolith_tf.datasets import movielens, synthetic

RATINGS_DTYPES = {"user_id": "int64", "movie_id": "int64", "rating": "float32", "timestamp": "int64"}


def write_files(folder, files):
    """Writes {name: bytes} into folder (bytes, so each test controls encodings exactly)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def dtypes(frame):
    return {name: str(dtype) for name, dtype in frame.dtypes.items()}


# ----------------------------------------------------------------------------- real ml-100k


@pytest.fixture(scope="module")
def ml_100k(movielens_100k_dir):
    return movielens.load(movielens_100k_dir)


def test_ml_100k_ratings(ml_100k):
    ratings = ml_100k["ratings"]
    assert ml_100k["format"] == "ml-100k"
    assert dtypes(ratings) == RATINGS_DTYPES
    assert len(ratings) == 100_000
    assert ratings["user_id"].nunique() == 943
    assert ratings["movie_id"].nunique() == 1682
    # File order is kept: the first line of u.data is "196\t242\t3\t881250949".
    first = ratings.iloc[0]
    assert (first["user_id"], first["movie_id"], first["rating"], first["timestamp"]) == (196, 242, 3.0, 881250949)
    assert sorted(ratings["rating"].unique().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_ml_100k_movies(ml_100k):
    movies = ml_100k["movies"]
    assert list(movies.columns) == ["movie_id", "title", "genres"]
    assert len(movies) == 1682
    by_id = movies.set_index("movie_id")
    assert by_id.loc[1, "title"] == "Toy Story (1995)"
    assert by_id.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert by_id.loc[543, "title"] == "Misérables, Les (1995)"  # latin-1 in u.item
    assert by_id.loc[267, "title"] == "unknown"
    assert by_id.loc[267, "genres"] == ["unknown"]


def test_ml_100k_users(ml_100k):
    users = ml_100k["users"]
    assert list(users.columns) == ["user_id", "gender", "age", "occupation", "zip_code"]
    assert len(users) == 943
    assert users.iloc[0].tolist() == [1, "M", 24, "technician", "85711"]
    by_id = users.set_index("user_id")
    assert by_id.loc[74, "zip_code"] == "T8H1N"  # Canadian postcodes stay text
    assert by_id.loc[8, "zip_code"] == "05201"  # and leading zeros survive


# ----------------------------------------------------------------------------- hand-written folders

ML_1M_FILES = {
    "ratings.dat": b"1::1193::5::978300760\n1::661::3::978302109\n2::1357::4::978298709\n",
    "movies.dat": (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1357::Misérables, Les (1995)::Drama|Musical\n"
        '1::"Great Performances" Cats (1998)::Musical\n'
    ).encode("latin-1"),
    "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072-1234\n",
}

ML_LATEST_FILES = {
    "ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,4.5,964981247\n2,3,0.5,1445714835\n",
    "movies.csv": (
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"Misérables, Les (1995)",Drama|War\n'
        '3,"""Great Performances"" Cats (1998)",Musical\n'
        "4,Some Film (2019),(no genres listed)\n"
    ).encode("utf-8"),
}

# No u.genre: the loader falls back to the release's fixed genre order.
ML_100K_FILES = {
    "u.data": b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n",
    "u.item": (
        "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        "302|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
        '377|"Heavy" (1995)||||0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1\n'
    ).encode("latin-1"),
    "u.user": b"196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n",
}


def test_ml_1m_folder(tmp_path):
    data = movielens.load(write_files(tmp_path, ML_1M_FILES))
    assert data["format"] == "ml-1m"
    ratings = data["ratings"]
    assert dtypes(ratings) == RATINGS_DTYPES
    assert ratings.to_dict("list") == {
        "user_id": [1, 1, 2], "movie_id": [1193, 661, 1357], "rating": [5.0, 3.0, 4.0],
        "timestamp": [978300760, 978302109, 978298709],
    }
    movies = data["movies"]
    assert movies["movie_id"].tolist() == [1193, 661, 1357, 1]
    assert movies["title"].tolist() == [
        "One Flew Over the Cuckoo's Nest (1975)", "James and the Giant Peach (1996)",
        "Misérables, Les (1995)", '"Great Performances" Cats (1998)',
    ]
    assert movies["genres"].tolist() == [
        ["Drama"], ["Animation", "Children's", "Musical"], ["Drama", "Musical"], ["Musical"],
    ]
    users = data["users"]
    assert dtypes(users)["age"] == "int64"
    assert users.values.tolist() == [
        [1, "F", 1, "K-12 student", "48067"], [2, "M", 56, "self-employed", "70072-1234"],
    ]


def test_ml_latest_folder(tmp_path):
    data = movielens.load(write_files(tmp_path, ML_LATEST_FILES))
    assert data["format"] == "ml-latest"
    assert "users" not in data
    ratings = data["ratings"]
    assert dtypes(ratings) == RATINGS_DTYPES
    assert ratings.to_dict("list") == {
        "user_id": [1, 1, 2], "movie_id": [1, 11, 3], "rating": [4.0, 4.5, 0.5],
        "timestamp": [964982703, 964981247, 1445714835],
    }
    movies = data["movies"]
    assert movies["title"].tolist() == [
        "Toy Story (1995)", "Misérables, Les (1995)", '"Great Performances" Cats (1998)', "Some Film (2019)",
    ]
    assert movies["genres"].tolist() == [
        ["Adventure", "Animation", "Children", "Comedy", "Fantasy"], ["Drama", "War"], ["Musical"], [],
    ]


def test_ml_100k_folder_without_u_genre(tmp_path):
    data = movielens.load(write_files(tmp_path, ML_100K_FILES))
    assert data["format"] == "ml-100k"
    assert data["ratings"]["user_id"].tolist() == [196, 186, 22]
    movies = data["movies"]
    assert movies["title"].tolist() == ["Kolya (1996)", "Misérables, Les (1995)", '"Heavy" (1995)']
    assert movies["genres"].tolist() == [["Comedy"], ["Drama", "Musical"], ["Western"]]
    assert data["users"]["zip_code"].tolist() == ["55105", "00000", "40206"]


def test_only_the_files_present_are_loaded(tmp_path):
    data = movielens.load(write_files(tmp_path, {"ratings.dat": ML_1M_FILES["ratings.dat"]}))
    assert sorted(data) == ["format", "ratings"]


def test_trailing_blank_lines_are_accepted(tmp_path):
    data = movielens.load(write_files(tmp_path, {"u.data": ML_100K_FILES["u.data"] + b"\n\n"}))
    assert len(data["ratings"]) == 3


# ----------------------------------------------------------------------------- missing and malformed


def test_missing_folder_names_path_and_expected_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        movielens.load(missing)
    message = str(info.value)
    assert str(missing) in message
    for name in ("u.data", "ratings.dat", "ratings.csv"):
        assert name in message


def test_folder_without_ratings_points_at_sub_folder(tmp_path):
    write_files(tmp_path / "ml-100k", {"u.data": ML_100K_FILES["u.data"]})
    with pytest.raises(FileNotFoundError, match=r"u\.data.*ratings\.dat.*ratings\.csv.*ml-100k"):
        movielens.load(tmp_path)


def test_folder_with_two_formats_is_rejected(tmp_path):
    write_files(tmp_path, {"u.data": ML_100K_FILES["u.data"], "ratings.dat": ML_1M_FILES["ratings.dat"]})
    with pytest.raises(ValueError, match="several formats"):
        movielens.load(tmp_path)


def _replace(files, name, old, new):
    changed = dict(files)
    assert old in changed[name]
    changed[name] = changed[name].replace(old, new)
    return changed


MALFORMED = [
    # (id, files, bad file, 1-based line, text shown, problem)
    ("100k-extra-field", _replace(ML_100K_FILES, "u.data", b"3\t891717742", b"3\t891717742\t7"),
     "u.data", 2, "186\\t302\\t3\\t891717742\\t7", "found 5"),
    ("100k-extra-field-first-line", _replace(ML_100K_FILES, "u.data", b"3\t881250949", b"3\t881250949\t7"),
     "u.data", 1, "196\\t242", "expected 4 fields"),
    ("100k-non-numeric-id", _replace(ML_100K_FILES, "u.data", b"22\t377", b"2x\t377"),
     "u.data", 3, "2x\\t377", "'user_id' is not a number"),
    ("100k-rating-too-high", _replace(ML_100K_FILES, "u.data", b"302\t3", b"302\t6"),
     "u.data", 2, "186\\t302\\t6", "'rating' = 6 is outside [0.5, 5]"),
    ("100k-genre-flag", _replace(ML_100K_FILES, "u.item", b"|0|0|0|0|0|0|1\n", b"|0|0|0|0|0|0|2\n"),
     "u.item", 3, "377|", "'genre_18' = 2"),
    ("100k-gender", _replace(ML_100K_FILES, "u.user", b"39|F|", b"39|X|"),
     "u.user", 2, "186|39|X", "'gender' must be one of"),
    ("1m-missing-field", _replace(ML_1M_FILES, "ratings.dat", b"1::661::3::978302109", b"1::661::3"),
     "ratings.dat", 2, "1::661::3", "missing value for 'timestamp'"),
    ("1m-blank-line", _replace(ML_1M_FILES, "ratings.dat", b"978302109\n", b"978302109\n\n"),
     "ratings.dat", 3, "''", "the line is empty"),
    ("1m-fractional-id", _replace(ML_1M_FILES, "ratings.dat", b"2::1357", b"2.5::1357"),
     "ratings.dat", 3, "2.5::1357", "'user_id' is not an integer: 2.5"),
    ("1m-movie-without-genres", _replace(ML_1M_FILES, "movies.dat", b"(1996)::Animation|Children's|Musical", b"(1996)"),
     "movies.dat", 2, "James and the Giant Peach (1996)", "missing value for 'genres'"),
    ("1m-occupation-code", _replace(ML_1M_FILES, "users.dat", b"::16::", b"::21::"),
     "users.dat", 2, "2::M::56::21", "'occupation' = 21"),
    ("latest-rating-zero", _replace(ML_LATEST_FILES, "ratings.csv", b"2,3,0.5", b"2,3,0.0"),
     "ratings.csv", 4, "2,3,0.0,1445714835", "'rating' = 0 is outside"),
    ("latest-extra-field", _replace(ML_LATEST_FILES, "ratings.csv", b"4.5,964981247", b"4.5,964981247,9"),
     "ratings.csv", 3, "1,11,4.5,964981247,9", "found 5"),
    ("latest-header", _replace(ML_LATEST_FILES, "ratings.csv", b"userId,", b"user,"),
     "ratings.csv", 1, "user,movieId", "expected the header"),
    ("latest-unclosed-quote", _replace(ML_LATEST_FILES, "movies.csv", b'"Mis\xc3\xa9rables, Les (1995)"', b'"Mis\xc3\xa9rables, Les (1995)'),
     "movies.csv", 3, "Misérables", "'title' runs past the end of the line (unclosed quote?)"),
    ("latest-quote-open-at-end", _replace(ML_LATEST_FILES, "movies.csv", b"4,Some Film", b'4,"Some Film'),
     "movies.csv", 5, "4,\"Some Film", "quoted field is never closed"),
    ("latest-not-utf8", _replace(ML_LATEST_FILES, "movies.csv", b"Toy Story", b"Toy St\xf6ry"),
     "movies.csv", 2, "1,Toy St", "not valid utf-8"),
]


@pytest.mark.parametrize("files, bad_file, line, shown, problem",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_file_reports_file_line_and_text(tmp_path, files, bad_file, line, shown, problem):
    write_files(tmp_path, files)
    with pytest.raises(ValueError) as info:
        movielens.load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / bad_file}, line {line}: "), message
    assert shown in message, message
    assert problem in message, message


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_100k():
    return synthetic.generate(seed=0)


def test_generate_is_deterministic_in_the_seed():
    first = synthetic.generate(200, 300, 20_000, seed=7)
    second = synthetic.generate(200, 300, 20_000, seed=7)
    for key in ("ratings", "movies", "users"):
        pd.testing.assert_frame_equal(first[key], second[key])
    other = synthetic.generate(200, 300, 20_000, seed=8)
    assert not first["ratings"].equals(other["ratings"])
    assert not first["users"].equals(other["users"])


def test_generate_has_the_movielens_shape(synthetic_100k, tmp_path):
    data = synthetic_100k
    assert data["format"] == "synthetic"
    ratings, movies, users = data["ratings"], data["movies"], data["users"]
    assert dtypes(ratings) == RATINGS_DTYPES
    assert len(ratings) == 100_000
    # Same columns and dtypes as a loaded MovieLens folder.
    loaded = movielens.load(write_files(tmp_path, ML_100K_FILES))
    assert dtypes(movies) == dtypes(loaded["movies"])
    assert dtypes(users) == dtypes(loaded["users"])
    assert movies["movie_id"].tolist() == list(range(1, 1683))
    assert users["user_id"].tolist() == list(range(1, 944))
    assert ratings["user_id"].between(1, 943).all() and ratings["movie_id"].between(1, 1682).all()
    assert movies["title"].str.fullmatch(r"Synthetic Movie \d+ \((19|20)\d\d\)").all()
    assert movies.loc[122, "title"].startswith("Synthetic Movie 123 (")
    genres = movies["genres"]
    assert genres.map(lambda names: 1 <= len(names) <= 3 and names == sorted(names)).all()
    assert set().union(*genres) <= set(synthetic.GENRES)
    assert set(users["gender"]) == {"M", "F"}
    assert users["age"].between(7, 73).all()
    assert set(users["occupation"]) <= set(synthetic.OCCUPATIONS)
    assert users["zip_code"].str.fullmatch(r"\d{5}").all()


def test_ratings_look_like_movielens(synthetic_100k):
    rating = synthetic_100k["ratings"]["rating"]
    share = rating.value_counts(normalize=True).sort_index()
    assert share.index.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert 3.35 <= rating.mean() <= 3.75  # ml-100k: 3.53
    assert share.idxmax() == 4.0  # ml-100k: 6/11/27/34/21 % for 1..5 stars
    assert 0.02 <= share[1.0] <= 0.12 and 0.2 <= share[3.0] <= 0.35


def test_popularity_is_zipf_like(synthetic_100k):
    for column in ("movie_id", "user_id"):
        counts = synthetic_100k["ratings"][column].value_counts().to_numpy()
        top_share = counts[: len(counts) // 10].sum() / counts.sum()
        assert top_share > 0.3, column  # uniform popularity would give ~0.1; ml-100k items: 0.43
        assert counts[0] > 10 * np.median(counts), column


def test_ids_keep_arriving(synthetic_100k):
    ratings = synthetic_100k["ratings"]
    middle = ratings["timestamp"].iloc[len(ratings) // 2]
    for column, at_least in (("user_id", 0.25), ("movie_id", 0.05)):
        first_seen = ratings.groupby(column)["timestamp"].min()
        assert (first_seen > middle).mean() >= at_least, column
    early = ratings.iloc[: len(ratings) // 10]
    assert early["user_id"].nunique() < 0.6 * ratings["user_id"].nunique()


def test_drift_moves_tastes_with_time():
    # Same seed, so only the tastes differ; at the start they have not rotated yet.
    still = synthetic.generate(num_ratings=50_000, seed=3, drift=0.0)["ratings"]["rating"].to_numpy()
    moving = synthetic.generate(num_ratings=50_000, seed=3, drift=2.0)["ratings"]["rating"].to_numpy()
    share = len(still) // 20
    changed_early = np.mean(still[:share] != moving[:share])
    changed_late = np.mean(still[-share:] != moving[-share:])
    assert changed_early < 0.05 and changed_late > 0.25, (changed_early, changed_late)


def test_stream_chunks_equal_generate_for_any_chunk_size():
    whole = synthetic.generate(300, 500, 150_000, seed=5)["ratings"]
    chunks = list(synthetic.stream(300, 500, 150_000, chunk_size=7_777, seed=5))
    assert [len(chunk) for chunk in chunks] == [7_777] * 19 + [150_000 - 19 * 7_777]
    assert all(dtypes(chunk) == RATINGS_DTYPES for chunk in chunks)
    joined = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(joined, whole)
    timestamps = joined["timestamp"]
    assert timestamps.is_monotonic_increasing
    assert timestamps.iloc[0] >= synthetic.ML_100K_START
    assert timestamps.iloc[-1] < synthetic.ML_100K_START + synthetic.ML_100K_DURATION


def test_one_off_ids_appear_once_in_order():
    data = synthetic.generate(100, 200, 30_000, seed=2, one_off_fraction=0.4)
    ratings = data["ratings"]
    for column, regular in (("user_id", 100), ("movie_id", 200)):
        one_off = ratings.loc[ratings[column] > regular, column].to_numpy()
        assert 0.37 < len(one_off) / len(ratings) < 0.43
        # Each one-off id is used once, numbered in order of appearance right after the regular ids.
        assert (one_off == np.arange(regular + 1, regular + 1 + len(one_off))).all()
    assert len(data["users"]) == ratings["user_id"].max()
    assert len(data["movies"]) == ratings["movie_id"].max()


def test_stream_is_lazy_and_memory_is_bounded():
    num_ratings, chunk_size = 2_000_000, 50_000
    tracemalloc.start()
    try:
        rows = one_off_users = 0
        last_time = -1
        for chunk in synthetic.stream(1_000, 1_000, num_ratings, chunk_size=chunk_size, seed=1,
                                      one_off_fraction=0.9):
            rows += len(chunk)
            one_off_users += int((chunk["user_id"] > 1_000).sum())
            assert chunk["timestamp"].iloc[0] >= last_time
            last_time = chunk["timestamp"].iloc[-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == num_ratings
    assert 0.89 * num_ratings < one_off_users < 0.91 * num_ratings
    # The whole stream would take 2M * 28 bytes = 56 MB; generating it chunk by chunk needs
    # ~12 MB (one block's temporaries plus one chunk), the same for any num_ratings.
    assert peak < 20e6, peak


def test_invalid_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="num_users must be >= 1, got 0"):
        synthetic.stream(num_users=0)
    with pytest.raises(ValueError, match=re.escape("one_off_fraction must be in [0, 1], got 1.5")):
        synthetic.generate(one_off_fraction=1.5)

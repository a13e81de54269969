"""Shared pytest fixtures: the one place that knows where MovieLens test data lives.

MovieLens may not be redistributed, so it is never copied into this repository. Tests that
need it take the `movielens_100k_dir` fixture and are skipped when the data is not found.
"""

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
_SHARED_ML_100K = _REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def movielens_100k_dir() -> Path:
    """The ml-100k folder (holding u.data): from $MONOLITH_DATA_DIR, else <repo>/../shared/data."""
    candidates = []
    data_dir = os.environ.get("MONOLITH_DATA_DIR")
    if data_dir:
        # The variable may name the ml-100k folder itself or a folder of datasets containing it.
        candidates += [Path(data_dir), Path(data_dir) / "ml-100k"]
    candidates.append(_SHARED_ML_100K)
    for folder in candidates:
        if (folder / "u.data").is_file():
            return folder
    looked = ", ".join(str(folder) for folder in candidates)
    pytest.skip(
        f"MovieLens ml-100k not found (looked for u.data in: {looked}). Download "
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip, unzip it, and set "
        "MONOLITH_DATA_DIR to the ml-100k folder or to the folder containing it."
    )

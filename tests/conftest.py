"""pytest fixtures shared by the unit and end-to-end tests (helpers are in ``helpers.py``)."""
from __future__ import annotations

import pytest

from helpers import make_class_folders
from util.blas import select_mkl

select_mkl()  # as the entry points do, before a test imports Paddle: the suite runs the MKL users get


@pytest.fixture
def class_folders(tmp_path):
    return make_class_folders(tmp_path / "data")

"""pytest fixtures shared by the unit and end-to-end tests (helpers are in ``helpers.py``)."""
from __future__ import annotations

import pytest

from helpers import make_class_folders


@pytest.fixture
def class_folders(tmp_path):
    return make_class_folders(tmp_path / "data")

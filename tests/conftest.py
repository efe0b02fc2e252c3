import pytest

from zoo_helpers import copy_zoo


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the zoo and patches/ (no materialized files), so tests never touch the checkout's."""
    root = copy_zoo(tmp_path)
    monkeypatch.setenv("HFPATCH_ZOO", str(root))
    return root

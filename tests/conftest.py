import pytest

from zoo_helpers import copy_zoo


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the zoo and patches/ (no materialized files), so tests never touch the checkout's."""
    root = copy_zoo(tmp_path)
    monkeypatch.setenv("HFPATCH_ZOO", str(root))
    return root


@pytest.fixture(scope="session")
def session_zoo(tmp_path_factory):
    """One private zoo copy for the whole session, for tests that only build models from it: they (and their gloo
    workers) share its synced and patched files instead of patching a copy each."""
    root = copy_zoo(tmp_path_factory.mktemp("session"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HFPATCH_ZOO", str(root))
        yield root

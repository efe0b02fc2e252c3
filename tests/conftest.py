import atexit
import os
import shutil
import tempfile

import pytest

from zoo_helpers import copy_zoo

# A compile cache of this session alone (its CLI subprocesses inherit it): inductor's cache keys a graph without the
# schemas of the custom ops it calls, so a graph cached before an op's signature changed would call it wrongly.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hfpatch-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


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

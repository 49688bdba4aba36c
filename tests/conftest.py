import pytest

from fastpath import _authorize_py

try:
    from fastpath import _authorize_c
except ImportError:  # test_fastpath_compiled says whether that is allowed
    _authorize_c = None

IMPLS = [_authorize_py] + ([_authorize_c] if _authorize_c is not None else [])


@pytest.fixture(params=IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def impl(request):
    """Each fast-path implementation in turn: one suite, both twins."""
    return request.param


@pytest.fixture
def store(tmp_path):
    from storage.lmdb_store import Store

    s = Store(str(tmp_path / "data"), map_size=64 * 1024**2)
    yield s
    s.close()

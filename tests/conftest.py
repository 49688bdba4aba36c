import os

import pytest

# Every store in the tests (and every server they start) scans the ledger after each write
# group: columns sum to zero, no holder account negative.
os.environ["YIKATONG_CHECK_INVARIANTS"] = "1"

from yikatong.fastpath import _authorize_py
from yikatong.server.harness import PII_TEST_KEYS
from yikatong.storage import pii

# A store a test opens in its own process seals PII with the keys its servers get
# (server/harness.py passes them as --pii-key-file)
pii.in_process = pii.KeyRing.parse(PII_TEST_KEYS, "the tests' PII keys")

try:
    from yikatong.fastpath import _authorize_c
except ImportError:  # test_fastpath_compiled says whether that is allowed
    _authorize_c = None

IMPLS = [_authorize_py] + ([_authorize_c] if _authorize_c is not None else [])


@pytest.fixture(params=IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def impl(request):
    """Each fast-path implementation in turn: one suite, both twins."""
    return request.param


@pytest.fixture
def store(tmp_path):
    from yikatong import ledger
    from yikatong.storage.lmdb_store import Store

    s = Store(str(tmp_path / "data"), map_size=64 * 1024**2, check_command=ledger.check_invariants)
    yield s
    s.close()

"""The authorization hot path. The compiled module is used unless YIKATONG_NO_EXTENSIONS=1;
with YIKATONG_REQUIRE_EXTENSIONS=1 a missing compiled module is an error, never a silent
fallback (the aio-libs / py-lmdb convention). Both stay importable by name."""
import os

from yikatong.fastpath import _authorize_py
from yikatong.storage import records as _records

if os.environ.get("YIKATONG_NO_EXTENSIONS"):
    impl = _authorize_py
else:
    try:
        from yikatong.fastpath import _authorize_c as impl
    except ImportError:
        if os.environ.get("YIKATONG_REQUIRE_EXTENSIONS"):
            raise
        impl = _authorize_py

COMPILED = impl is not _authorize_py
Policy = impl.Policy
decide = impl.decide
# The wire paths of status-only authorizations and status batches (compiled only; None:
# the Python path alone)
authorize_wire = getattr(impl, "authorize_wire", None)
status_wire = getattr(impl, "status_wire", None)
# The wire path of authorizations with money (compiled only, as the two above; also off with
# YIKATONG_NO_WIRE_MONEY=1, which sends them through the Python path, the reference)
money_wire = None if os.environ.get("YIKATONG_NO_WIRE_MONEY") or authorize_wire is None \
    else impl.money_wire
# ... and of the writer's commonest debit, a single-phase TRANSIT fare (compiled only, off
# with the wire path: the Python path, authorize.with_money, is its reference)
Fares = None if money_wire is None else impl.Fares
money_answer = impl.money_answer
money_answers = impl.money_answers
APPROVED = _authorize_py.APPROVED
RULE_PACK = _authorize_py.RULE_PACK  # issue 28 item 4: the version of what decides a debit
walk = _authorize_py.walk  # decide, row by row (the readable twin's; the same answers)
CORRUPT = _authorize_py.CORRUPT
# The replication record's codec: compiled where the extension is (records' own, its twin,
# otherwise); a writer encodes every commit group, every follower decodes every record
encode_journal = getattr(impl, "encode_journal", _records.encode_journal)
decode_journal = getattr(impl, "decode_journal", _records.decode_journal)
journal_size = getattr(impl, "journal_size", _records.journal_size)  # a record's, plain
apply_ops = impl.apply_ops  # ... and every follower applies every record's ops

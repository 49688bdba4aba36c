"""SPEC.md section 4, rule by rule, on both implementations; then both against each other."""
import os

import pytest
from conftest import IMPLS, _authorize_c
from hypothesis import given, settings
from hypothesis import strategies as st

from yikatong import clock as clocks
from yikatong import config, fastpath
from yikatong.fastpath import _authorize_py as ref
from yikatong.model import Card, Channel, Flag, Pack, State
from yikatong.storage import records as r
from yikatong.v1 import yikatong_pb2 as pb

NOW = 1_790_000_000  # 2026-09-21 22:13:20 in Shanghai
UNTIL = clocks.end_of_days(NOW, config.temp_loss_valid_days)  # SH-18b, stored at the report


def policy(impl):
    return impl.Policy(config.generation_retired_at)


def card(**kw) -> bytes:
    fields = dict(card_number="310000000001", pack=Pack.SH, state=State.ACTIVE,
                  flags=Flag.TRANSIT | Flag.FINANCIAL_OPEN)
    fields.update(kw)
    return r.encode_card(Card(**fields))


def decide(impl, record, channel=Channel.MEDICAL, now=NOW, points=0, amount=0, available=0):
    return impl.decide(policy(impl), record, channel, now, points, amount, available)


def test_reason_values_match_the_api_enum():
    for name, value in pb.DeclineReason.items():
        if value:
            assert getattr(ref, name.removeprefix("DECLINE_REASON_")) == value


def test_fastpath_compiled_loaded_when_required():
    """CI sets YIKATONG_REQUIRE_EXTENSIONS=1: then the Cython module must be the one in use."""
    if os.environ.get("YIKATONG_REQUIRE_EXTENSIONS"):
        assert fastpath.COMPILED
        assert fastpath.decide is _authorize_c.decide
    elif os.environ.get("YIKATONG_NO_EXTENSIONS"):
        assert fastpath.decide is ref.decide
    else:  # the compiled one whenever it was built
        assert fastpath.COMPILED == (_authorize_c is not None)


def test_active_card_is_approved_on_every_channel(impl):
    for ch in Channel:
        assert decide(impl, card(), ch) == ref.APPROVED


def test_reason_1_card_not_found(impl):
    assert decide(impl, None) == ref.CARD_NOT_FOUND


def test_sh_23c_superseded_card_is_invalid_for_ever(impl):
    assert decide(impl, card(state=State.SUPERSEDED)) == ref.CARD_SUPERSEDED
    assert decide(impl, card(state=State.SUPERSEDED), Channel.FINANCIAL) == ref.CARD_SUPERSEDED


def test_gz_26_cancelled_card(impl):
    assert decide(impl, card(state=State.CANCELLED, pack=Pack.GZ)) == ref.CARD_CANCELLED


def test_sh_30_retired_generation_declines_from_2020_12_31(impl):
    """SH-30: "至2020年12月31日起停止使用": from that day, inclusive."""
    retire = config.generation_retired_at[1]
    assert retire == clocks.parse_time("2020-12-31T00:00:00+08:00")
    assert decide(impl, card(generation=1), now=retire - 1) == ref.APPROVED
    assert decide(impl, card(generation=1), now=retire) == ref.GENERATION_RETIRED
    assert decide(impl, card(generation=2), now=retire) == ref.APPROVED


def test_reason_5_not_issued(impl):
    for state in (State.APPLIED, State.VERIFIED, State.REJECTED):
        assert decide(impl, card(state=state)) == ref.CARD_NOT_ISSUED
        assert decide(impl, card(state=state), Channel.FINANCIAL) == ref.CARD_NOT_ISSUED


def test_sh_12_issued_card_is_not_activated_except_financial(impl):
    assert decide(impl, card(state=State.ISSUED)) == ref.CARD_NOT_ACTIVATED
    assert decide(impl, card(state=State.ISSUED), Channel.FINANCIAL) == ref.APPROVED


def test_sh_18c_formal_loss_stops_social_security_not_financial(impl):
    assert decide(impl, card(state=State.LOST)) == ref.CARD_LOST
    assert decide(impl, card(state=State.LOST), Channel.FINANCIAL) == ref.APPROVED


def test_gz_21_loss_suspends_the_financial_settlement_account_too(impl):
    for pack in (Pack.GZ, Pack.BJ):
        assert decide(impl, card(state=State.LOST, pack=pack), Channel.FINANCIAL) == ref.CARD_LOST


def test_sh_18a_temporary_loss_freezes_at_once(impl):
    frozen = card(state=State.TEMP_LOSS, temp_loss_until=UNTIL)
    assert decide(impl, frozen, now=NOW) == ref.CARD_FROZEN
    assert decide(impl, frozen, Channel.FINANCIAL) == ref.APPROVED


def test_sh_18b_temporary_loss_ends_at_the_stored_instant(impl):
    """"临时挂失的有效期为 5 日 ... 有效期届满后社会保障功能自动恢复": the end instant (24:00 of the
    fifth day after the report) is stored with the report; both twins compare it."""
    rec = card(state=State.TEMP_LOSS, temp_loss_until=UNTIL)
    assert decide(impl, rec, now=UNTIL - 1) == ref.CARD_FROZEN
    assert decide(impl, rec, now=UNTIL) == ref.APPROVED


def test_rc_14_not_renewed_after_validity_end(impl):
    rec = card(pack=Pack.RC, flags=0, valid_until=NOW + 10)
    assert decide(impl, rec, Channel.SERVICE, now=NOW + 9) == ref.APPROVED
    assert decide(impl, rec, Channel.SERVICE, now=NOW + 10) == ref.RC_NOT_RENEWED
    # valid_until means nothing on a social security card
    assert decide(impl, card(valid_until=NOW - 1)) == ref.APPROVED


def test_gz_6_application_locked_per_channel(impl):
    rec = card(pack=Pack.GZ, lock_mask=1 << Channel.MEDICAL)
    assert decide(impl, rec, Channel.MEDICAL) == ref.APPLICATION_LOCKED
    assert decide(impl, rec, Channel.TRANSIT) == ref.APPROVED


def test_sh_13_transit_needs_the_transit_function(impl):
    assert decide(impl, card(flags=0), Channel.TRANSIT) == ref.FUNCTION_NOT_OPEN
    assert decide(impl, card(flags=0), Channel.MEDICAL) == ref.APPROVED


def test_sh_14_financial_needs_the_financial_function(impl):
    assert decide(impl, card(flags=Flag.TRANSIT), Channel.FINANCIAL) == ref.FUNCTION_NOT_OPEN


def test_sh_20_bank_loss_freezes_financial_only(impl):
    rec = card(flags=Flag.FINANCIAL_OPEN | Flag.FINANCIAL_FROZEN)
    assert decide(impl, rec, Channel.FINANCIAL) == ref.FINANCIAL_FROZEN
    assert decide(impl, rec, Channel.MEDICAL) == ref.APPROVED


def test_rc_20_points_gated_service(impl):
    rec = card(pack=Pack.RC, flags=0, points=119)
    assert decide(impl, rec, Channel.SERVICE, points=120) == ref.NOT_ENTITLED
    assert decide(impl, rec, Channel.SERVICE, points=119) == ref.APPROVED
    # RC-20: the points are a Residence Card's; a social security card has none to show
    assert decide(impl, card(points=0), Channel.SERVICE, points=120) == ref.NOT_ENTITLED
    assert decide(impl, card(points=0), Channel.SERVICE, points=0) == ref.APPROVED


def test_reason_14_insufficient_funds_against_the_available_balance(impl):
    assert decide(impl, card(), Channel.TRANSIT, amount=300, available=300) == ref.APPROVED
    assert (decide(impl, card(), Channel.TRANSIT, amount=301, available=300)
            == ref.INSUFFICIENT_FUNDS)
    # every card rule comes first
    assert decide(impl, card(state=State.LOST), amount=301, available=0) == ref.CARD_LOST


def test_first_failing_rule_wins(impl):
    # superseded beats everything below it; lost beats locked and function checks
    rec = card(state=State.SUPERSEDED, generation=1, lock_mask=0xFF, flags=0)
    assert decide(impl, rec, Channel.TRANSIT) == ref.CARD_SUPERSEDED
    rec = card(state=State.LOST, lock_mask=0xFF, flags=0)
    assert decide(impl, rec, Channel.TRANSIT) == ref.CARD_LOST


@pytest.mark.parametrize("damage", ["short", "long", "version", "pack", "state", "empty"])
def test_corrupt_records_are_never_decided_on(impl, damage):
    good = bytearray(card())
    bad = {"short": good[:-1], "long": good + b"\0", "empty": b"",
           "version": bytes([99]) + good[1:], "pack": good[:1] + bytes([7]) + good[2:],
           "state": good[:2] + bytes([0]) + good[3:]}[damage]
    assert decide(impl, bytes(bad)) == ref.CORRUPT


def test_memoryview_records_decide_like_bytes(impl):
    rec = card(state=State.TEMP_LOSS, temp_loss_until=UNTIL)
    assert decide(impl, memoryview(rec)) == decide(impl, rec) == ref.CARD_FROZEN


# ---- differential: random records and requests, both twins, same answer

records = st.builds(
    lambda pack, state, flags, gen, locks, points, tl, vu: r.encode_card(Card(
        "1", pack, state, flags, gen, locks, points, tl, vu)),
    st.integers(1, 4), st.integers(1, 9), st.integers(0, 15), st.sampled_from([0, 1, 2, 3, 255]),
    st.integers(0, 255), st.integers(0, 65535),
    st.integers(NOW - 10 * 86400, NOW + 86400), st.sampled_from([0, NOW - 1, NOW, NOW + 1]),
)
# SH-18b across hours of the day and a month end: reported at any minute of 26 February to
# 3 March 2026 (Shanghai), the end the domain stores, and moments around it.
_REPORTS = st.integers(clocks.parse_time("2026-02-26T00:00:00"),
                       clocks.parse_time("2026-03-03T23:59:00"))
temp_losses = st.builds(
    lambda report, gen, locks, flags: r.encode_card(Card(
        "1", Pack.SH, State.TEMP_LOSS, flags, gen, locks,
        temp_loss_until=clocks.end_of_days(report, config.temp_loss_valid_days))),
    _REPORTS, st.sampled_from([1, 2]), st.integers(0, 255), st.integers(0, 15))
damaged = st.binary(max_size=r.SIZE + 12) | st.builds(
    lambda rec, i, b: rec[:i] + bytes([b]) + rec[i + 1:], records, st.integers(0, r.SIZE - 1),
    st.integers(0, 255))


@pytest.mark.skipif(_authorize_c is None, reason="compiled twin not built (fails above under "
                    "YIKATONG_REQUIRE_EXTENSIONS=1)")
@settings(max_examples=3000, deadline=None)
@given(record=st.none() | records | damaged | temp_losses, channel=st.integers(1, 6),
       now=st.integers(NOW - 86400, NOW + 7 * 86400)
       | st.integers(clocks.parse_time("2026-03-01T00:00:00"),
                     clocks.parse_time("2026-03-10T00:00:00"))
       | st.sampled_from([clocks.parse_time(f"2026-03-{d:02d}T00:00:00") + k
                          for d in range(3, 10) for k in (-1, 0)]),
       points=st.sampled_from([0, 1, 120, 65535]),
       amount=st.integers(0, 2**63 - 1) | st.integers(0, 1000),
       available=st.integers(-(2**63), 2**63 - 1) | st.integers(0, 1000))
def test_both_implementations_give_the_same_answer(record, channel, now, points, amount,
                                                   available):
    py, c = IMPLS
    assert py.decide(policy(py), record, channel, now, points, amount, available) == \
        c.decide(policy(c), record, channel, now, points, amount, available)


# ---- the replication record's codec: compiled (fastpath) against records' own, its twin

_OPS = st.lists(st.tuples(
    st.binary(min_size=1, max_size=40), st.binary(max_size=70),
    st.one_of(st.none(), st.binary(max_size=300))), max_size=30)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as error:  # noqa: BLE001 - the same error, with the same message
        return (type(error).__name__, str(error))


@pytest.mark.skipif(_authorize_c is None, reason="YIKATONG_NO_EXTENSIONS")
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), _OPS, st.data())
def test_the_compiled_replication_codec_is_its_python_twin(seq, ops, data):
    record = r.encode_journal(seq, ops)
    assert _authorize_c.encode_journal(seq, ops) == record
    assert _authorize_c.journal_size(ops) == r.journal_size(ops) == len(r.unseal_journal(record))
    assert _authorize_c.decode_journal(record) == r.decode_journal(record) == (seq, ops)
    # a log written before compression (version 1) is read alike; so is either one damaged:
    # cut, grown, or bytes changed (lengths, version, count, the frame) refused alike
    if data.draw(st.booleans()):
        record = r.unseal_journal(record)
        assert _authorize_c.decode_journal(record) == r.decode_journal(record) == (seq, ops)
    cut = data.draw(st.integers(0, len(record)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, len(record) - 1)),
                                         st.integers(0, 255)), max_size=3))
    damaged = bytearray(record[:cut] + data.draw(st.binary(max_size=8)))
    for at, byte in flips:
        if at < len(damaged):
            damaged[at] = byte
    for form in (bytes(damaged), memoryview(bytes(damaged))):
        assert _outcome(_authorize_c.decode_journal, form) == \
            _outcome(r.decode_journal, form)
    # what is not plain bytes goes to the twin: the same record, or its error
    odd = [(bytearray(n), k, v) for n, k, v in ops[:1]] + ops[1:]
    assert _outcome(_authorize_c.encode_journal, seq, odd) == _outcome(r.encode_journal, seq, odd)
    assert _outcome(_authorize_c.journal_size, odd) == _outcome(r.journal_size, odd)


@pytest.mark.skipif(_authorize_c is None, reason="YIKATONG_NO_EXTENSIONS")
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"unknown"]),
                          st.binary(min_size=1, max_size=8),
                          st.one_of(st.none(), st.binary(max_size=20))), max_size=25),
       st.integers(0, 5))
def test_the_compiled_apply_loop_is_its_python_twin(ops, start):
    """A follower's loop over a record's ops: the same puts and deletes in the same order, up
    to the same first op naming a database the store does not have."""
    import tempfile

    import lmdb

    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, impl in enumerate((_authorize_c, ref)):
            env = lmdb.open(os.path.join(tmp, str(k)), max_dbs=4, map_size=1 << 24)
            by_name = {n: env.open_db(n) for n in (b"a", b"b")}
            with env.begin(write=True) as txn:
                for db in by_name.values():  # something to delete
                    for key in (b"\0", b"x", b"\xff"):
                        txn.put(key, b"old", db=db)
                at = impl.apply_ops(txn, ops, by_name, start)
            with env.begin() as txn:
                outcomes.append((at, {n: list(txn.cursor(db=db)) for n, db in by_name.items()}))
            env.close()
    assert outcomes[0] == outcomes[1]
    first_unknown = next((i for i, op in enumerate(ops) if i >= start and op[0] == b"unknown"),
                         len(ops))
    assert outcomes[0][0] == first_unknown

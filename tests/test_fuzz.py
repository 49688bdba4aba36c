"""Fuzzing (hypothesis, bounded): request decoding and validation never fail in any other
way than INVALID_ARGUMENT; record decoding never decides on a corrupt record; a corrupt
record read from LMDB is reported (DATA_LOSS), never decided on."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yikatong import cards, fastpath
from yikatong.errors import CorruptRecord, InvalidArgument, InvalidTransition, NotEligible
from yikatong.fastpath import _authorize_py as ref
from yikatong.model import Card, Eligibility, Flag, Pack, State
from yikatong.server import validate
from yikatong.server.errors import Undecodable, decoder
from yikatong.server.harness import running
from yikatong.server.services.ledger import Ledger
from yikatong.server.services.lifecycle import validate_holder
from yikatong.storage import records as r
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def message_bytes(cls):
    """Valid messages, damaged ones, and noise."""
    valid = st.builds(lambda **kw: cls(**kw).SerializeToString(), **{
        f.name: (st.text(max_size=30) if f.type == f.TYPE_STRING else
                 st.integers(-(2**63), 2**63 - 1) if f.type == f.TYPE_INT64 else
                 st.integers(0, 20) if f.type == f.TYPE_ENUM else st.booleans())
        for f in cls.DESCRIPTOR.fields
        if f.type in (f.TYPE_STRING, f.TYPE_INT64, f.TYPE_ENUM, f.TYPE_BOOL) and not f.is_repeated
    })
    damaged = st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i + 1:], valid,
                        st.integers(0, 60), st.integers(0, 255))
    return valid | damaged | st.binary(max_size=200)


@FUZZ
@given(data=message_bytes(pb.AuthorizeRequest))
def test_authorize_requests_decode_and_validate_or_are_invalid_argument(data):
    request = decoder(pb.AuthorizeRequest)(data)
    if isinstance(request, Undecodable):
        assert isinstance(request.error(), InvalidArgument)
        return
    try:
        validate.authorize_request(request)
    except InvalidArgument:
        return
    assert 0 < len(request.request_id) <= 64 and request.card_number.isdigit()


@FUZZ
@given(data=message_bytes(pb.Holder), pack=st.integers(1, 4))
def test_holders_decode_and_validate_or_are_invalid_argument(data, pack):
    h = decoder(pb.Holder)(data)
    if isinstance(h, Undecodable):
        return
    try:
        holder = validate_holder(h)
        cards.check_eligibility(pack, Eligibility(h.household_registered, h.insured,
                                                  h.entitled_public_services, "2020-01-01", 1),
                                1_790_000_000)
        cards.merge_holder(pack, holder, None)
    except (InvalidArgument, NotEligible, InvalidTransition):
        pass


@FUZZ
@given(data=message_bytes(pb.TransferRequest))
def test_transfer_account_refs_validate_or_are_invalid_argument(data):
    t = decoder(pb.TransferRequest)(data)
    if isinstance(t, Undecodable):
        return
    for account, name in ((t.debit, "debit"), (t.credit, "credit")):
        try:
            Ledger._account_ref(account, name)
        except InvalidArgument as e:
            assert e.field.startswith(name)


@FUZZ
@given(value=st.binary(max_size=300) | st.builds(
    lambda rec, i, x: rec[:i] + bytes([x]) + rec[i + 1:],
    st.just(r.encode_card(Card("1", 1, 5))), st.integers(0, r.SIZE - 1), st.integers(0, 255)),
    channel=st.integers(1, 6))
def test_a_corrupt_card_record_is_never_decided_on(value, channel):
    policy = ref.Policy({})
    reason = ref.decide(policy, value, channel, 1_790_000_000, 0)
    try:
        r.check(value)  # what the decision may rest on: size, version, enum ranges
    except CorruptRecord:
        assert reason == ref.CORRUPT
    else:
        assert 0 <= reason <= 14
    try:
        r.decode_card("1", value)  # the status and lifecycle paths read every field
    except CorruptRecord:
        pass


@FUZZ
@given(value=st.binary(max_size=300))
def test_account_and_transfer_records_decode_or_are_corrupt(value):
    for decode in (r.decode_account, r.decode_transfer, r.decode_change):
        try:
            decode(value)
        except CorruptRecord:
            pass


def test_a_corrupt_record_in_lmdb_is_reported_not_decided(tmp_path):
    store = Store(str(tmp_path / "data"), map_size=16 * 1024**2)
    good = r.encode_card(Card("310000000001", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT))
    store.write(lambda book: book.txn.put(b"310000000001", bytes([9]) + good[1:],
                                          db=book.dbs.cards))
    store.close()
    import grpc
    with running(tmp_path) as s:
        for call in (lambda: s.authorization.Authorize(pb.AuthorizeRequest(
                         request_id="r", card_number="310000000001", channel=pb.CHANNEL_TRANSIT),
                         metadata=s.md("TRANSIT_GATE")),
                     lambda: s.status.GetStatus(pb.GetStatusRequest(card_number="310000000001"),
                                                metadata=s.md("BANK_SWITCH"))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
            assert "310000000001" in e.value.details()


_RECORD = r.encode_card(Card("310000000001", Pack.RC, State.ACTIVE, flags=Flag.TRANSIT,
                             valid_until=1, points=7))


def _get(key, default, db):
    """Every lookup finds something: a card, an electronic card's holder, a current card."""
    return {12: _RECORD, 18: b"\x00" * 8 + b"\x04"}.get(len(key), b"310000000001")


@pytest.mark.skipif(fastpath.authorize_wire is None, reason="the wire path is compiled only")
@FUZZ
@given(raw=message_bytes(pb.AuthorizeRequest) | st.binary(max_size=3000), batch=st.booleans(),
       framed=st.booleans())
def test_the_wire_reader_takes_any_bytes_without_a_crash(raw, batch, framed):
    """Random, damaged and valid requests to the Cython wire reader (authorize_wire,
    status_wire): an answer or None (the Python path's), never a crash or a read past the
    buffer. `make fuzz-asan` runs this under AddressSanitizer."""
    if framed:  # inside a batch: field 1, its length (true or not), the bytes
        raw = b"\x0a" + bytes([len(raw) % 128]) + raw
    tally = [0] * 105
    policy = fastpath.Policy({1: 1})
    answer = fastpath.authorize_wire(policy, raw, batch, _get, 0, 1, 2, 1_800_000_000, 0xffff,
                                     lambda code: 120, tally, 1000)
    assert answer is None or type(answer) is bytes
    if answer is not None:  # what it answers is a valid response for every request
        cls = pb.AuthorizeBatchResponse if batch else pb.AuthorizeResponse
        cls.FromString(answer)
    status = fastpath.status_wire(policy, raw, _get, 0, 1, 2, 1_800_000_000, 1000)
    if status is not None:
        pb.GetStatusBatchResponse.FromString(status)

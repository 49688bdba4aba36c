"""The wire path (Cython, from request bytes to response bytes) against the Python path, the
reference: for any bytes at all, a request the wire path answers gets exactly the bytes the
Python path would send, and the Python path would not have refused it; a request it does not
answer is the Python path's by construction. Plainly valid status-only batches, the common
case, are the wire path's."""
import random

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from yikatong import clock as clocks
from yikatong import config, fastpath
from yikatong.errors import YikatongError
from yikatong.model import RC_ENTITLEMENTS, Card, Channel, Flag, Pack, Role, State
from yikatong.server.clients import Client
from yikatong.server.core import Core, decode
from yikatong.server.services.authorization import CHANNEL_MASKS, Authorization
from yikatong.server.services.card_status import CardStatus
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

pytestmark = pytest.mark.skipif(fastpath.authorize_wire is None,
                                reason="YIKATONG_NO_EXTENSIONS: the wire path is compiled only")
NOW = clocks.parse_time("2026-11-25T12:00:00+08:00")
EXAMPLES = settings(max_examples=1500, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROLES = [Role.TRANSIT_GATE, Role.MEDICAL_TERMINAL, Role.BANK_SWITCH, Role.COMMUNITY_OUTLET,
         Role.CARD_AGENCY, Role.BENEFIT_COUNTER]


class FixedClock:
    def now(self) -> int:
        return NOW


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of cards of every pack, state, flag and lock, some corrupt, some behind an
    electronic card; the Authorization servicer over it."""
    store = Store(str(tmp_path_factory.mktemp("wire") / "data"), map_size=64 * 1024**2)
    rng = random.Random(20261125)
    numbers = []

    def fill(book):
        for n in range(300):
            number = f"{rng.choice('31 44 11 90'.split())}{n:010d}"
            card = Card(number, rng.choice(list(Pack)), rng.choice(list(State)),
                        flags=rng.choice([0, Flag.TRANSIT, Flag.TRANSIT | Flag.FINANCIAL_OPEN,
                                          Flag.FINANCIAL_OPEN | Flag.FINANCIAL_FROZEN]),
                        generation=rng.choice([1, 2, 2, 2]),
                        lock_mask=rng.choice([0, 0, 1 << rng.randrange(1, 7)]),
                        points=rng.choice([0, 119, 120, 65535]),
                        temp_loss_until=NOW + rng.choice([-1, 0, 1, 86400]),
                        valid_until=rng.choice([0, NOW, NOW + 1, NOW - 1]),
                        holder_id=n + 1, replaced_by=rng.choice(["", "310000009999"]),
                        service_bank=rng.choice(["", "ICBC", "中国工商银行"]))
            book.txn.put(number.encode(), records.encode_card(card), db=book.dbs.cards)
            book.set_current_card(n + 1, card.pack, number)
            numbers.append(number)
            if n % 10 == 0:  # an electronic card (SH-31) in front of it
                ecard = f"{number[:2]}9{n:015d}"
                book.put_ecard(ecard, n + 1, card.pack)
                numbers.append(ecard)
        bad_bank = bytearray(records.encode_card(Card("310000000502", Pack.GZ, State.ACTIVE)))
        bad_bank[records.SIZE - 1] = 0xff  # the service bank's last byte: not UTF-8
        for number, value in (("310000000500", b"\x02" * 10), ("310000000501", b"\x09" * 136),
                              ("310000000502", bytes(bad_bank))):
            book.txn.put(number.encode(), value, db=book.dbs.cards)  # corrupt: never decided on
            numbers.append(number)
    store.write(fill)
    servicer = Authorization(Core(store, FixedClock()))
    yield servicer, numbers
    store.close()


def run(coro):
    """A Python-path coroutine that never awaits (no money: no writer), run to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the Python path awaited (a request that moves money)")


def python_path(servicer, raw: bytes, batch: bool, client: Client):
    """("ok", response bytes) or ("refused", message), as the Python path answers."""
    try:
        if batch:
            request = decode(pb.AuthorizeBatchRequest, raw)
            if any(q.amount_fen or q.phase for q in request.requests):
                return ("money", "")
            answer = run(servicer.AuthorizeBatch(request, client))
        else:
            request = decode(pb.AuthorizeRequest, raw)
            if request.amount_fen or request.phase:
                return ("money", "")
            answer = run(servicer.Authorize(request, client))
    except YikatongError as error:
        return ("refused", str(error))
    return ("ok", answer.SerializeToString())


def wire_path(servicer, raw: bytes, batch: bool, client: Client) -> bytes | None:
    return servicer._wire(raw, client, batch)


TEXTS = ["", "r1", "x" * 64, "x" * 65, "挂失", "a\x00b", "\x7f", " ", "é" * 33]
CODES = ["", *list(RC_ENTITLEMENTS)[:3], "RC_POINTS_SCHOOL_ENTRY", "NOPE", "x" * 65, "ü"]


def rarely(draw, usual, unusual):
    """Mostly the usual value (most requests are plainly valid), sometimes anything."""
    return draw(st.sampled_from(unusual)) if draw(st.integers(0, 24)) == 0 else usual


@st.composite
def requests(draw, numbers, role):
    money = draw(st.integers(0, 19)) == 0
    allowed = [c for c in Channel if CHANNEL_MASKS[role] >> c & 1]
    return pb.AuthorizeRequest(
        request_id=rarely(draw, draw(st.sampled_from(["r1", "x" * 64, "a b"])), TEXTS),
        card_number=rarely(draw, draw(st.sampled_from(numbers)), [
            "", "31abc", "9" * 21, "310000999999", "３１", "9" * 18, "1"]),
        channel=rarely(draw, draw(st.sampled_from(allowed)), list(range(-1, 8))),
        amount_fen=draw(st.sampled_from([1, -1, 2**62])) if money else 0,
        phase=draw(st.integers(0, 4)) if money else 0,
        terminal_id=rarely(draw, "gate-7", TEXTS),
        service_code=rarely(draw, draw(st.sampled_from(CODES[:5])), CODES),
        payee_account=draw(st.sampled_from(["", "op:x"])) if money else "",
        hold_request_id=draw(st.sampled_from(["", "h1"])) if money else "",
        hold_timeout_seconds=draw(st.sampled_from([0, 5])) if money else 0)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7f) | (0x80 if n > 0x7f else 0))
        n >>= 7
        if not n:
            return bytes(out)


def overlong(n: int, extra: int) -> bytes:
    """`n` as a varint padded with `extra` bytes that add nothing: a non-canonical encoding,
    which protobuf reads up to 10 bytes for a value, up to 5 for a tag or a length."""
    out = bytearray(varint(n))
    if extra:
        out[-1] |= 0x80
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


@st.composite
def noise(draw):
    """What a newer client, a broken one or an attacker may add: unknown fields of every
    wire type, known fields in another wire type, huge and overlong varints, groups."""
    field = draw(st.sampled_from([1, 2, 3, 4, 5, 9, 11, 15, 16, 2047, 2**29 - 1]))
    wire_type = draw(st.integers(0, 7))
    tag = varint((field << 3) | wire_type)
    body = {0: varint(draw(st.sampled_from([0, 1, 300, 2**63, 2**64 - 1]))),
            1: bytes(8), 5: bytes(4),
            2: varint(3) + b"abc"}.get(wire_type, b"")
    padded = (overlong((field << 3) | 2, draw(st.integers(0, 6)))
              + overlong(3, draw(st.integers(0, 6))) + b"abc")
    return draw(st.sampled_from([tag + body, tag, b"\x80" * 10 + b"\x00", b"\xff" * 11,
                                 tag + b"\x80\x80\x00", b"\x00", padded]))


def mangle(draw, data: bytes) -> bytes:
    how = draw(st.integers(0, 19))
    if how == 0 and data:
        return data[:draw(st.integers(0, len(data) - 1))]  # truncated
    if how == 1 and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if how == 2:
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(noise()) + data[i:]
    return data


@st.composite
def batches(draw, numbers, role):
    items = draw(st.lists(requests(numbers, role), min_size=0, max_size=6))
    parts = []
    for q in items:
        inner = q.SerializeToString()
        if draw(st.integers(0, 4)) == 0:  # a field twice: the last one wins
            inner += draw(requests(numbers, role)).SerializeToString()
        inner = mangle(draw, inner)
        parts.append(b"\x0a" + varint(len(inner)) + inner)
    raw = b"".join(parts)
    return mangle(draw, raw)


@st.composite
def singles(draw, numbers, role):
    raw = draw(requests(numbers, role)).SerializeToString()
    if draw(st.integers(0, 4)) == 0:
        raw += draw(requests(numbers, role)).SerializeToString()
    return mangle(draw, raw)


def check(servicer, raw: bytes, batch: bool, role: Role) -> bool:
    client = Client("c", role)
    answer = wire_path(servicer, raw, batch, client)
    if currently_in_test_context():
        event("wire path" if answer is not None else "python path")
    if answer is None:
        return False
    assert python_path(servicer, raw, batch, client) == ("ok", answer), raw
    return True


@EXAMPLES
@given(data=st.data())
def test_a_batch_the_wire_path_answers_is_answered_as_the_python_path_would(world, data):
    servicer, numbers = world
    role = data.draw(st.sampled_from(ROLES))
    check(servicer, data.draw(batches(numbers, role)), True, role)


@EXAMPLES
@given(data=st.data())
def test_a_single_request_the_wire_path_answers_is_answered_as_the_python_path_would(
        world, data):
    servicer, numbers = world
    role = data.draw(st.sampled_from(ROLES))
    check(servicer, data.draw(singles(numbers, role)), False, role)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=400), batch=st.booleans())
def test_random_bytes_never_crash_the_wire_reader(world, raw, batch):
    """Whatever the bytes: an answer equal to the Python path's, or None; never a crash or a
    read past the buffer (the reader checks every length against the end)."""
    servicer, _ = world
    check(servicer, raw, batch, Role.CARD_AGENCY)


@pytest.mark.parametrize("extra", range(0, 7))
def test_an_overlong_tag_or_length_is_read_as_protobuf_reads_it(world, extra):
    """Protobuf reads a tag or a length of at most 5 bytes (a longer one is corrupt wire
    format), a value of up to 10: the wire path takes exactly what it takes."""
    servicer, _ = world
    card = b"310000000001"
    for raw in (overlong(0x0a, extra) + overlong(2, 0) + b"r1" + b"\x12\x0c" + card
                + b"\x18\x02",  # request_id's tag padded
                b"\x0a" + overlong(2, extra) + b"r1\x12\x0c" + card + b"\x18\x02",  # its length
                b"\x0a\x02r1\x12\x0c" + card + b"\x18" + overlong(2, extra)):  # a value
        answered = check(servicer, raw, False, Role.MEDICAL_TERMINAL)
        assert answered == (extra <= 4 or raw.endswith(overlong(2, extra)) and extra <= 9)
    batch = b"\x0a" + overlong(12, extra) + card
    assert check_status(CardStatus(servicer.core), batch) == (extra <= 4)


def test_plainly_valid_status_batches_are_the_wire_paths(world):
    """The common case is taken by the wire path, every channel a role may use, every kind
    of card and a full batch: nothing falls back for want of a case."""
    servicer, numbers = world
    rng = random.Random(7)
    for role in ROLES:
        channels = [c for c in Channel if CHANNEL_MASKS[role] >> c & 1]
        batch = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
            request_id=f"r{i}", card_number=rng.choice(numbers[:-3]), channel=rng.choice(
                channels), terminal_id="gate-1", service_code=rng.choice(CODES[:5]))
            for i in range(config.batch_size_max)])
        assert check(servicer, batch.SerializeToString(), True, role)
        assert check(servicer, batch.requests[0].SerializeToString(), False, role)
    over = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id="r", card_number="310000000001", channel=Channel.TRANSIT)] *
        (config.batch_size_max + 1))
    assert not check(servicer, over.SerializeToString(), True, Role.TRANSIT_GATE)
    for corrupt in ("310000000500", "310000000501"):
        one = pb.AuthorizeRequest(request_id="r", card_number=corrupt, channel=Channel.TRANSIT)
        assert not check(servicer, one.SerializeToString(), False, Role.TRANSIT_GATE)


def test_the_wire_path_counts_its_decisions_in_the_metrics(world):
    from yikatong.server.metrics import REASONS, metrics

    servicer, _ = world
    before = list(metrics.decisions)
    one = pb.AuthorizeRequest(request_id="r", card_number="310099999999", channel=Channel.MEDICAL)
    assert wire_path(servicer, one.SerializeToString(), False,
                     Client("c", Role.MEDICAL_TERMINAL)) is not None
    i = Channel.MEDICAL * REASONS + pb.DECLINE_REASON_CARD_NOT_FOUND
    assert metrics.decisions[i] == before[i] + 1


@st.composite
def status_batches(draw, numbers):
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        number = rarely(draw, draw(st.sampled_from(numbers)), [
            "", "31abc", "9" * 21, "310000999999", "３１", "9" * 18, "1", "\x80"])
        parts.append(mangle(draw, b"\x0a" + varint(len(number.encode())) + number.encode()))
    return mangle(draw, b"".join(parts))


def check_status(servicer, raw: bytes) -> bool:
    client = Client("c", Role.BANK_SWITCH)
    store = servicer.core.store
    with store.read() as txn:
        answer = fastpath.status_wire(servicer.core.policy, raw, txn.get, store.dbs.cards,
                                      store.dbs.ecards, store.dbs.holder_cards, NOW,
                                      config.batch_size_max)
    if currently_in_test_context():
        event("wire path" if answer is not None else "python path")
    if answer is None:
        return False
    try:
        expected = ("ok", run(servicer.GetStatusBatch(
            decode(pb.GetStatusBatchRequest, raw), client)).SerializeToString())
    except YikatongError as error:
        expected = ("refused", str(error))
    assert expected == ("ok", answer), raw
    return True


@EXAMPLES
@given(data=st.data())
def test_a_status_batch_the_wire_path_answers_is_answered_as_the_python_path_would(
        world, data):
    servicer, numbers = world
    check_status(CardStatus(servicer.core), data.draw(status_batches(numbers)))


def test_plainly_valid_status_batches_of_every_card_are_the_wire_paths(world):
    servicer, numbers = world
    statuses = CardStatus(servicer.core)
    cards = [n for n in numbers if n not in ("310000000500", "310000000501", "310000000502")]
    batch = pb.GetStatusBatchRequest(card_numbers=cards + ["310099999999"])
    assert check_status(statuses, batch.SerializeToString())
    for corrupt in ("310000000500", "310000000501", "310000000502"):  # 502: its bank's name
        batch = pb.GetStatusBatchRequest(card_numbers=["310000000001", corrupt])
        assert not check_status(statuses, batch.SerializeToString())

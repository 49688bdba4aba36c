"""Money from wire bytes (issue 27 item 3): AuthorizeStream, AuthorizeBatch and Authorize
requests that move money are parsed from the wire in Cython (fastpath money_wire) into compact
commands the writer applies through the same domain logic as the Python path. Held here to
the Python path, the reference: the same answer bytes (or the same refusal), the same decision
counts, and afterwards the same store, byte for byte (ledger, transfers, holds, remembered
answers with their fingerprints, audit trail); the compiled parse to its pure-Python twin for
any bytes; and over gRPC, a server on the wire path to one with YIKATONG_NO_WIRE_MONEY=1."""
import asyncio
import hashlib
import os
import shutil
import tempfile

import grpc
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_e2e import START, new_active_card

from yikatong import clock as clocks
from yikatong import config, fastpath, ledger, pots
from yikatong.errors import YikatongError
from yikatong.fastpath import _authorize_py
from yikatong.model import (
    AccountKind,
    Card,
    Channel,
    Flag,
    Pack,
    Role,
    State,
    holder_account_key,
    operator_account_key,
)
from yikatong.server import validate
from yikatong.server.clients import Client
from yikatong.server.core import Core, decode, fingerprint
from yikatong.server.harness import running
from yikatong.server.metrics import metrics
from yikatong.server.roles import require_channel
from yikatong.server.services.authorization import CHANNEL_MASKS, MONEY_CHANNELS, Authorization
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

pytestmark = pytest.mark.skipif(fastpath.authorize_wire is None,
                                reason="YIKATONG_NO_EXTENSIONS: the wire path is compiled only")
_authorize_c = fastpath.impl
NOW = clocks.parse_time("2026-11-25T12:00:00+08:00")
EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GATE = Client("gate-1", Role.TRANSIT_GATE)
GATE2 = Client("gate-2", Role.TRANSIT_GATE)  # another client: the same ids are not its own
CLINIC = Client("clinic-1", Role.MEDICAL_TERMINAL)
COUNTER = Client("counter-1", Role.BENEFIT_COUNTER)
SWITCH = Client("switch-1", Role.BANK_SWITCH)
CLIENTS = [GATE, GATE, GATE, GATE2, CLINIC, COUNTER, SWITCH]
CARDS = [f"31{h:010d}" for h in range(1, 7)] + ["310000099999", "31abc", ""]
# issue 28 item 2: split taps are the Python path's; with this rule in force they split
SPLIT_RULES = pots.parse({"version": "t", "split": {"medical": ["MEDICAL", "TRANSIT"]}}, "t")


class FixedClock:
    def now(self) -> int:
        return NOW


def make_store(path: str) -> Store:
    """Six cards: active with transit (1-3), active without transit (4), lost (5), cancelled
    (6); each holder's transit, medical and benefit accounts hold 1,000 fen."""
    store = Store(path, map_size=32 * 1024**2)
    store.dbs.now = FixedClock().now  # a remembered answer's time, as the server sets it
    topup = operator_account_key("op:topup")

    def fill(book):
        for h in range(1, 7):
            state = {5: State.LOST, 6: State.CANCELLED}.get(h, State.ACTIVE)
            book.put_card(Card(f"31{h:010d}", Pack.SH, state,
                               flags=Flag.TRANSIT if h != 4 else 0, holder_id=h), 1)
            for kind in (AccountKind.TRANSIT, AccountKind.MEDICAL, AccountKind.BENEFIT):
                ledger.create(book, 1, f"fund-{h}-{int(kind)}", topup,
                              holder_account_key(h, kind), 1000)
    store.write(fill)
    return store


def dump(store: Store) -> dict:
    """Every named database's every key and value."""
    with store.read() as txn:
        return {name: list(txn.cursor(db=db).iternext()) for name, db in
                sorted(store.dbs.by_name.items())}


class Pair:
    """Two stores built alike: one answered by the wire path (raw bytes in), one by the Python
    path (the decoded message in, as the servicer takes it when the wire path declines), its
    fares too (not the compiled Fares)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="wire-money-")
        self.stores = [make_store(os.path.join(self.tmp, k)) for k in ("wire", "python")]
        self.wire, self.python = (Authorization(Core(s, FixedClock())) for s in self.stores)
        self.python.fares = None  # the reference: every debit by authorize.with_money
        pots.use(SPLIT_RULES)

    def close(self):
        pots.use(pots.SplitRules())
        for s in self.stores:
            s.close()
        shutil.rmtree(self.tmp)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


async def answer(servicer, method: str, messages: list, client: Client, raw: bool):
    """("ok", answer bytes) per message, or ("refused", error class, message) once."""
    out = []
    cls = pb.AuthorizeRequest if method == "Authorize" else pb.AuthorizeBatchRequest
    try:
        if method == "AuthorizeStream":
            async def source():
                for m in messages:
                    yield m if raw else decode(cls, m)
            async for a in servicer.AuthorizeStream(source(), client):
                out.append(("ok", a if type(a) is bytes else a.SerializeToString()))
        else:
            for m in messages:
                a = await getattr(servicer, method)(m if raw else decode(cls, m), client)
                out.append(("ok", a if type(a) is bytes else a.SerializeToString()))
    except YikatongError as error:
        out.append(("refused", type(error).__name__, str(error)))
    return out


def both(pair: Pair, method: str, messages: list[bytes], client: Client):
    """Each path's answers and decision counts for the same messages; they must agree."""
    got = []
    for servicer, raw in ((pair.wire, True), (pair.python, False)):
        before = list(metrics.decisions)
        answers = asyncio.run(answer(servicer, method, messages, client, raw))
        got.append((answers, [a - b for a, b in zip(metrics.decisions, before, strict=True)]))
    assert got[0] == got[1]
    return got[0][0]


def request(rid, card, channel=Channel.TRANSIT, amount=0, **kw) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, card_number=card, channel=channel,
                               amount_fen=amount, **kw)


def batch(*requests) -> bytes:
    return pb.AuthorizeBatchRequest(requests=list(requests)).SerializeToString()


def taken(raw: bytes, client: Client, is_batch: bool = True) -> bool:
    """Whether the wire path takes this message (not the Python path)."""
    return _authorize_c.money_wire(raw, is_batch, CHANNEL_MASKS[client.role], MONEY_CHANNELS,
                                   config.batch_size_max, f"{client.id}\0Authorize\0".encode(),
                                   hashlib.sha256) is not None


def test_approvals_declines_holds_posts_voids_and_replays_answer_alike(pair):
    card, other = "310000000001", "310000000002"
    script = [
        # approvals and an insufficient-funds decline in one message; each sees the last
        ("AuthorizeStream", GATE, [batch(request("d1", card, amount=400),
                                         request("d2", card, amount=400),
                                         request("d3", card, amount=400))]),
        # declines: no such card, no transit function, lost, cancelled
        ("AuthorizeBatch", GATE, [batch(*(request(f"x{n}", f"31{n:010d}", amount=1)
                                          for n in (99999, 4, 5, 6)))]),
        # a tap-in hold, its tap-out post; a medical pre-authorisation and its void
        ("Authorize", GATE, [request("in1", other, amount=600, phase=pb.PHASE_HOLD,
                                     hold_timeout_seconds=3600).SerializeToString()]),
        ("AuthorizeStream", GATE, [batch(request("out1", other, amount=250,
                                                 phase=pb.PHASE_POST, hold_request_id="in1"))]),
        ("AuthorizeBatch", CLINIC, [batch(request("pre1", card, Channel.MEDICAL, 900,
                                                  phase=pb.PHASE_HOLD,
                                                  payee_account="op:hospital-1"))]),
        ("AuthorizeBatch", CLINIC, [batch(request("void1", card, Channel.MEDICAL,
                                                  phase=pb.PHASE_VOID, hold_request_id="pre1"))]),
        # replays: the first answer, nothing moved; on the other path's answer too
        ("AuthorizeStream", GATE, [batch(request("d1", card, amount=400),
                                         request("d3", card, amount=400))]),
        ("Authorize", GATE, [request("in1", other, amount=600, phase=pb.PHASE_HOLD,
                                     hold_timeout_seconds=3600).SerializeToString()]),
        # the benefit counter's drawl with a terminal id and a service code
        ("AuthorizeBatch", COUNTER, [batch(request("b1", other, Channel.BENEFIT, 10,
                                                   terminal_id="t-9", service_code="X1"))]),
    ]
    for method, client, messages in script:
        assert taken(messages[0], client, method != "Authorize")
        answers = both(pair, method, messages, client)
        assert all(a[0] == "ok" for a in answers), answers
    assert dump(pair.stores[0]) == dump(pair.stores[1])
    with pair.stores[0].read() as txn:  # 800 of 1,000 debited, 600 held then 250 posted
        book = pair.stores[0].book(txn)
        assert book.account(holder_account_key(1, AccountKind.TRANSIT)).credits_posted == 1000
        assert ledger.available(book, holder_account_key(1, AccountKind.TRANSIT), NOW) == 200
        assert ledger.available(book, holder_account_key(2, AccountKind.TRANSIT), NOW) == 750


def test_a_request_id_replayed_across_the_two_paths_gets_the_first_answer(pair):
    """The fingerprint the wire path stores is the Python path's, byte for byte: an id first
    answered by one path replays on the other, and another client or other fields with it
    are ID_REUSED on both."""
    store, auth = pair.stores[0], pair.wire
    first = request("r1", "310000000001", amount=300, terminal_id="g7")
    raw = batch(first)
    asyncio.run(answer(auth, "AuthorizeBatch", [raw], GATE, raw=True))
    with store.read() as txn:  # store format 6: the fingerprint's first 16 bytes are kept
        _, stored, _, _ = records.decode_answer(
            txn.get(txn.get(b"r1", db=store.dbs.requests), db=store.dbs.answers))
    assert stored == fingerprint("Authorize", GATE, pb.AuthorizeRequest.FromString(
        first.SerializeToString()))[:len(stored)] and len(stored) == 16
    replay = asyncio.run(answer(auth, "AuthorizeBatch", [raw], GATE, raw=False))
    again = asyncio.run(answer(auth, "AuthorizeBatch", [raw], GATE, raw=True))
    assert replay == again and replay[0][0] == "ok"
    for client, q in ((GATE2, first), (GATE, request("r1", "310000000001", amount=301))):
        for raw_in in (True, False):
            refused = asyncio.run(answer(auth, "AuthorizeBatch", [batch(q)], client, raw_in))
            assert refused[0][:2] == ("refused", "IdReused"), refused


BAD = [  # (fields, the field the refusal names): every one left to the Python path
    (dict(amount=-1), "amount_fen"),
    (dict(amount=config.amount_fen_max + 1), "amount_fen"),
    (dict(amount=0, phase=pb.PHASE_HOLD), "amount_fen"),
    (dict(amount=5, phase=pb.PHASE_VOID, hold_request_id="h"), "amount_fen"),
    (dict(amount=5, phase=pb.PHASE_POST), "hold_request_id"),
    (dict(amount=5, hold_request_id="h"), "hold_request_id"),
    (dict(amount=5, hold_timeout_seconds=60), "hold_timeout_seconds"),
    (dict(amount=5, phase=pb.PHASE_HOLD,
          hold_timeout_seconds=config.hold_timeout_seconds_max + 1), "hold_timeout_seconds"),
    (dict(amount=5, payee_account="metro"), "payee_account"),
    (dict(amount=5, payee_account="op:a b"), "payee_account"),
    (dict(amount=5, payee_account="op:" + "x" * 37), "payee_account"),
    (dict(amount=5, channel=Channel.FINANCIAL), "FINANCIAL"),
    (dict(amount=5, channel=Channel.MEDICAL), "MEDICAL"),  # PERMISSION_DENIED to a gate
    (dict(amount=5, phase=7), "phase"),
    (dict(amount=5, terminal_id="t\x00"), "terminal_id"),
    (dict(amount=5, service_code="x" * 65), "service_code"),
    (dict(amount=5, rid="r" * 65), "request_id"),
    (dict(amount=5, rid="挂失"), ""),  # valid, not ASCII: the Python path answers it
    (dict(amount=5, card="３１"), "card_number"),
    (dict(amount=5, card=""), "card_number"),
    (dict(amount=5, phase=pb.PHASE_POST, hold_request_id="nope"), "hold_request_id"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_fields_are_refused_alike_and_write_nothing(pair, fields, field):
    fields = dict(fields)
    q = request(fields.pop("rid", "bad-1"), fields.pop("card", "310000000001"),
                fields.pop("channel", Channel.TRANSIT), fields.pop("amount"), **fields)
    good = request("good-1", "310000000001", amount=5)
    for method, messages in (("AuthorizeStream", [batch(good, q)]),
                             ("AuthorizeBatch", [batch(q)]),
                             ("Authorize", [q.SerializeToString()])):
        answers = both(pair, method, messages, GATE)
        if field:
            assert answers[-1][0] == "refused" and field in answers[-1][2], answers
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_journeys_tap_in_and_its_tap_out_go_to_the_python_path_and_answer_alike(pair):
    """Issue 28: a request naming a journey's max fare or policy is never the wire path's
    (both twins give it to the Python path whole, even one field set to its default); the
    journey's later answers (the next tap-in told of it, its correcting tap-out) are the
    same bytes on both paths, as are the stores."""
    card = "310000000001"
    tap_in = request("j1", card, amount=600, phase=pb.PHASE_HOLD, hold_timeout_seconds=60,
                     max_fare_fen=500, on_timeout=pb.JOURNEY_TIMEOUT_SETTLE_MAX_FARE)
    void = request("j2", card, amount=100, phase=pb.PHASE_HOLD,
                   on_timeout=pb.JOURNEY_TIMEOUT_VOID)
    money = request("m1", card, amount=5).SerializeToString()
    for raw, is_batch in ((batch(tap_in), True), (batch(void), True),
                          (tap_in.SerializeToString(), False),
                          (money + b"\x80\x01\x00", False),  # max_fare_fen = 0, explicitly
                          (money + b"\x88\x01\x00", False)):  # on_timeout = 0, explicitly
        for impl in (_authorize_c, _authorize_py):
            assert impl.money_wire(raw, is_batch, *call_args(GATE)) is None
    # a status-only request with a journey's field is refused, not answered by the status path
    status = request("s1", card).SerializeToString()
    for raw in (status + b"\x80\x01\x05", status + b"\x88\x01\x01"):
        refused = both(pair, "Authorize", [raw], GATE)
        assert refused[0][:2] == ("refused", "InvalidArgument"), refused
    both(pair, "AuthorizeBatch", [batch(tap_in, void)], GATE)
    for servicer in (pair.wire, pair.python):  # past the journeys' timeout
        servicer.core.clock = type("Later", (), {"now": lambda self: NOW + 60})()
    answers = both(pair, "AuthorizeStream", [batch(request("j3", card, amount=10))], GATE)
    told = pb.AuthorizeBatchResponse.FromString(answers[0][1]).responses[0]
    assert told.incomplete_journey.hold_request_id == "j1"  # j2's timeout is hours away
    answers = both(pair, "Authorize", [request("j4", card, amount=200, phase=pb.PHASE_POST,
                                               hold_request_id="j1").SerializeToString()], GATE)
    assert pb.AuthorizeResponse.FromString(answers[0][1]).journey_refund_fen == 300
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_message_mixing_status_only_and_money_goes_to_the_python_path_whole(pair):
    raw = batch(request("m1", "310000000001", amount=5), request("s1", "310000000001"))
    assert not taken(raw, GATE)
    answers = both(pair, "AuthorizeStream", [raw], GATE)
    assert [r.decision for r in pb.AuthorizeBatchResponse.FromString(
        answers[0][1]).responses] == [pb.DECISION_APPROVED] * 2
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_split_tap_goes_to_the_python_path_whole_and_answers_alike(pair):
    """Issue 28 item 2: a request carrying AuthorizeRequest.split (field 21), alone, in a
    batch of plain debits, or without money, is taken by neither twin nor by the status-only
    wire path; both servers answer it alike (legs and all, or the same refusal) and store
    alike."""
    card = "310000000001"
    split = request("s1", card, Channel.MEDICAL, 1500, split=True)
    raws = [split.SerializeToString(), batch(request("m1", card, Channel.MEDICAL, 100), split)]
    for raw, is_batch in zip(raws, (False, True), strict=True):
        assert not taken(raw, CLINIC, is_batch)
        assert _authorize_py.money_wire(raw, is_batch, *call_args(CLINIC)) is None
    answers = both(pair, "Authorize", raws[:1], CLINIC)
    answer = pb.AuthorizeResponse.FromString(answers[0][1])
    assert [(g.account, g.amount_fen, g.transfer_id) for g in answer.legs] == [
        (AccountKind.MEDICAL, 1000, "s1#1"), (AccountKind.TRANSIT, 500, "s1#2")]
    both(pair, "AuthorizeStream", raws[1:], CLINIC)  # s1 replayed in a batch
    both(pair, "Authorize", [request("s2", card, Channel.MEDICAL, split=True)
                             .SerializeToString()], CLINIC)  # no money: refused alike
    both(pair, "AuthorizeBatch", [batch(request("s3", card, Channel.MEDICAL, 10**6, split=True))],
         CLINIC)  # more than both accounts hold: declined alike
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def twist(raw: bytes, how: int) -> bytes:
    """The same request as other bytes protobuf reads alike: an unknown field, a field given
    twice (the last wins), an overlong varint, an empty string set explicitly."""
    return raw + [b"", b"\xa0\x06\x07", b"\x2a\x00", b"\x18\x81\x00"][how] if how < 4 \
        else b"\x12\x03abc" + raw


@st.composite
def money_request(draw, channel=1):
    """Mostly plainly valid (the wire path's), each field sometimes anything."""
    def usually(valid, others):
        return draw(st.sampled_from(valid)) if draw(st.integers(0, 11)) \
            else draw(st.sampled_from(others))
    phase = usually([0, 0, 0, 1, 2, 3], [4, 5])
    q = request(usually(["a", "b", "c", "d", "e", "in", "r" * 64], ["r" * 65, "é", "a\x7f"]),
                usually(CARDS[:7], CARDS[7:]), usually([channel], [1, 2, 3, 4, 5, 0, 9]),
                usually([1, 1, 200, 999, 1000, 10**11] if phase != 3 else [0],
                        [0, -1, 10**11 + 1, 5]),
                phase=phase,
                hold_request_id=usually(["in", "a", "nope"] if phase in (2, 3) else [""],
                                        ["", "\x01", "in"]),
                payee_account=usually(["", "", "op:x"], ["op:", "op:a b"]),
                hold_timeout_seconds=usually([0, 60] if phase == 1 else [0],
                                             [60, 30 * 86400 + 1]),
                terminal_id=usually(["", "g1"], ["g\x00"]),
                service_code=usually(["", "S"], ["x" * 65]),
                split=usually([False], [True]),
                # issue 28: a journey's tap-in, valid or not, is the Python path's whole
                max_fare_fen=usually([0], [0, 1, 200, -1]),
                on_timeout=usually([0], [0, 1, 2, 3]))
    return twist(q.SerializeToString(), draw(st.integers(0, 4)))


@st.composite
def sessions(draw):
    """A few messages from one client: unary calls, batches, a stream of batches."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        method = draw(st.sampled_from(["Authorize", "AuthorizeBatch", "AuthorizeStream"]))
        client = draw(st.sampled_from(CLIENTS))
        channel = next((c for c in (1, 2, 3) if CHANNEL_MASKS[client.role] >> c & 1), 1)
        if method == "Authorize":
            out.append((method, client, [draw(money_request(channel))]))
        else:
            out.append((method, client, [
                b"".join(b"\x0a" + bytes((len(r),)) + r
                         for r in draw(st.lists(money_request(channel), min_size=1, max_size=4)))
                for _ in range(draw(st.integers(1, 2)))]))
    return out


@EXAMPLES
@given(sessions())
def test_any_money_requests_give_the_same_answers_and_the_same_store(script):
    pair = Pair()
    try:
        for method, client, messages in script:
            both(pair, method, messages, client)
        assert dump(pair.stores[0]) == dump(pair.stores[1])
    finally:
        pair.close()


def call_args(client: Client):
    return (CHANNEL_MASKS[client.role], MONEY_CHANNELS, config.batch_size_max,
            f"{client.id}\0Authorize\0".encode(), hashlib.sha256)


@EXAMPLES
@given(st.lists(money_request(), min_size=1, max_size=5), st.sampled_from(CLIENTS),
       st.binary(max_size=3), st.integers(0, 200))
def test_the_compiled_parse_is_its_twin_and_takes_only_what_the_python_path_accepts(
        requests, client, noise, at):
    """For any bytes (valid messages, and the same with bytes cut or spliced in), the
    compiled parse gives what the twin gives; what it takes, the Python path accepts, with
    the same fields and fingerprint."""
    raw = b"".join(b"\x0a" + bytes((len(r),)) + r for r in requests)
    for data, is_batch in ((raw, True), (requests[0], False),
                           (raw[:at] + noise + raw[at:], True), (raw[:at], True)):
        c = _authorize_c.money_wire(data, is_batch, *call_args(client))
        assert c == _authorize_py.money_wire(data, is_batch, *call_args(client))
        if c is None:
            continue
        qs = list(decode(pb.AuthorizeBatchRequest, data).requests) if is_batch \
            else [decode(pb.AuthorizeRequest, data)]
        assert len(qs) == len(c)
        for k, (q, command) in enumerate(zip(qs, c, strict=True)):
            validate.authorize_request(q)
            require_channel(client.role, q.channel)
            assert command == (k, q.request_id, q.card_number, q.channel, q.amount_fen, q.phase,
                               q.hold_request_id, q.payee_account, q.hold_timeout_seconds,
                               fingerprint("Authorize", client, q))


@EXAMPLES
@given(st.text(max_size=70), st.integers(0, 14), st.integers(-2**63, 2**63 - 1),
       st.lists(st.tuples(st.integers(0, 14), st.integers(1, 6)), min_size=1, max_size=5))
def test_answers_are_the_bytes_protobuf_makes(rid, reason, available, more):
    expect = pb.AuthorizeResponse(
        request_id=rid, reason=reason, available_fen=available,
        decision=pb.DECISION_APPROVED if reason == 0 else pb.DECISION_DECLINED)
    for impl in (_authorize_c, _authorize_py):
        assert impl.money_answer(rid, reason, available) == expect.SerializeToString()
    answers = [_authorize_c.money_answer(f"r{k}", r, k) for k, (r, _) in enumerate(more)]
    commands = [(k, f"r{k}", "1", ch, 1, 0, "", "", 0, b"") for k, (_, ch) in enumerate(more)]
    joined = pb.AuthorizeBatchResponse(responses=[pb.AuthorizeResponse.FromString(a)
                                                  for a in answers]).SerializeToString()
    tallies = []
    for impl in (_authorize_c, _authorize_py):
        tally = [0] * len(metrics.decisions)
        assert impl.money_answers(answers, commands, tally, True) == joined
        assert impl.money_answers(answers[:1], commands[:1], [0] * len(tally), False) \
            == answers[0]
        tallies.append(tally)
    assert tallies[0] == tallies[1] and sum(tallies[0]) == len(more)
    for r, ch in more:
        assert tallies[0][ch * 15 + r] >= 1


# ------------------------------------------------------------------ over gRPC, two servers

def raw_call(srv, method: str, message: bytes, role: str) -> tuple:
    """("ok", the answer's bytes as sent) or ("error", code, details)."""
    path = f"/yikatong.v1.Authorization/{method}"
    try:
        if method == "AuthorizeStream":
            call = srv.channel.stream_stream(path)
            return ("ok", b"|".join(call(iter([message]), metadata=srv.md(role), timeout=20)))
        return ("ok", srv.channel.unary_unary(path)(message, metadata=srv.md(role),
                                                    timeout=20))
    except grpc.RpcError as error:
        return ("error", error.code(), error.details())


def test_over_grpc_the_wire_path_server_answers_and_stores_as_the_python_path_one(tmp_path):
    """The same calls to a server on the wire path and to one with YIKATONG_NO_WIRE_MONEY=1:
    the same answer bytes and errors, then the same accounts, transfers, holds and
    remembered answers (fingerprints included) in their stores."""
    dirs, results, cards = [], [], []
    for name, env in (("wire", {}), ("python", {"YIKATONG_NO_WIRE_MONEY": "1"})):
        workdir = tmp_path / name
        workdir.mkdir()
        with running(workdir, "--clock", "manual", "--clock-start", START, env=env) as srv:
            card = new_active_card(srv, 11)
            srv.ledger.Transfer(pb.TransferRequest(
                transfer_id="top-1", debit=pb.AccountRef(operator="op:topup"),
                credit=pb.AccountRef(holder=pb.HolderAccountRef(
                    card_number=card, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=1000),
                metadata=srv.md("CARD_AGENCY"))

            def q(rid, card=card, **kw):
                return request(rid, card, **kw)
            calls = [
                ("AuthorizeStream", batch(q("s1", amount=300), q("s2", amount=300),
                                          q("s3", amount=600))),
                ("AuthorizeBatch", batch(q("in1", amount=200, phase=pb.PHASE_HOLD))),
                ("Authorize", q("out1", amount=150, phase=pb.PHASE_POST,
                                hold_request_id="in1").SerializeToString()),
                ("AuthorizeStream", batch(q("s1", amount=300))),  # a replay
                ("AuthorizeStream", batch(q("s1", amount=301))),  # ID_REUSED
                ("AuthorizeBatch", batch(q("bad", amount=-5))),  # INVALID_ARGUMENT
                ("Authorize", q("med", amount=5, channel=Channel.MEDICAL).SerializeToString()),
                ("AuthorizeBatch", batch(request("gone", "319999999999", amount=5))),
            ]
            results.append([raw_call(srv, m, raw, "TRANSIT_GATE") for m, raw in calls])
            cards.append(card)
            dirs.append(srv.data_dir)
    assert cards[0] == cards[1]
    assert results[0] == results[1]
    assert [r[0] for r in results[0]] == ["ok"] * 4 + ["error"] * 3 + ["ok"]
    assert [r[1] for r in results[0][4:7]] == [grpc.StatusCode.ALREADY_EXISTS,
                                                grpc.StatusCode.INVALID_ARGUMENT,
                                                grpc.StatusCode.PERMISSION_DENIED]
    stores = []
    for data_dir in dirs:
        env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=64, lock=False)
        with env.begin() as txn:
            stores.append({name: list(txn.cursor(db=env.open_db(name, txn=txn, create=False))
                                      .iternext())
                           for name in (b"accounts", b"transfers", b"holds_by_timeout",
                                        b"holds_by_account")})
            stores[-1][b"requests"] = [
                (k, v) for k, v in txn.cursor(db=env.open_db(b"requests", txn=txn,
                                                             create=False)).iternext()
                if k in (b"s1", b"s2", b"s3", b"in1", b"out1", b"gone")]
        env.close()
    assert stores[0] == stores[1]
    assert len(stores[0][b"requests"]) == 6

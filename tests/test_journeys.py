"""Issue 28 item 1: no journey left open. A transit tap-in hold carrying the operator's max
fare and policy is settled at that fare (or voided) at its timeout's exact second; the card's
next tap-in is told; a tap-out within the grace window corrects the charge to the real fare
(a partial reversal, audited), one outside it is refused and moves nothing. Through gRPC
on the manual clock at the boundaries, and a model-based test of every journey state."""
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_e2e import START, advance, new_active_card
from test_money_e2e import balances, error_of, pay, top_up

from yikatong import clock as clocks
from yikatong import config, journeys, ledger
from yikatong.errors import YikatongError
from yikatong.journeys import JourneyState
from yikatong.model import AccountKind, Role, holder_account_key
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.harness import running
from yikatong.server.services.authorization import Authorization
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GRACE = 3600
T0 = clocks.parse_time(START)
SETTLE, VOID = pb.JOURNEY_TIMEOUT_SETTLE_MAX_FARE, pb.JOURNEY_TIMEOUT_VOID


@pytest.fixture(params=["c", "py"])
def srv(request, tmp_path):
    env = {"YIKATONG_NO_EXTENSIONS": "1"} if request.param == "py" else {}
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--journey-grace-seconds", str(GRACE), env=env) as s:
        yield s


def tap_in(srv, card, rid, fen=800, max_fare=600, on_timeout=SETTLE, timeout=600):
    return pay(srv, card, fen, rid=rid, phase=pb.PHASE_HOLD, hold_timeout_seconds=timeout,
               max_fare_fen=max_fare if on_timeout == SETTLE else 0, on_timeout=on_timeout)


def tap_out(srv, card, rid, hold, fen):
    return pay(srv, card, fen, rid=rid, phase=pb.PHASE_POST, hold_request_id=hold)


def settled_journey(srv, n):
    """A card with 1,000 fen whose tap-in (800 held, max fare 600, 600 s) timed out: the
    clock at its settlement's second, T0 + 600."""
    card = new_active_card(srv, n)
    top_up(srv, card, 1000)
    assert tap_in(srv, card, f"in-{n}").available_fen == 200
    advance(srv, 600)
    return card


def test_a_journey_hold_is_held_at_599_and_settled_at_its_max_fare_at_600(srv):
    """'at its timeout it settles at that fare, in the writer at the exact second like every
    hold': a read at that second sees it settled, swept or not."""
    card = new_active_card(srv, 1)
    top_up(srv, card, 1000)
    tap_in(srv, card, "in-1")
    advance(srv, 599)
    assert balances(srv, card)["TRANSIT"] == (1000, 800, 200)
    advance(srv, 1)
    assert balances(srv, card)["TRANSIT"] == (400, 0, 400)


def test_the_next_tap_in_is_told_of_the_journey_left_open_once(srv):
    card = settled_journey(srv, 2)
    told = tap_in(srv, card, "in-2b")  # 800 asked of 400: declined, and told all the same
    assert told.reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS and told.available_fen == 400
    j = told.incomplete_journey
    assert (j.hold_request_id, j.outcome, j.fare_fen, j.settled_at, j.correctable_until) == (
        "in-2", SETTLE, 600, T0 + 600, T0 + 600 + GRACE)
    assert tap_in(srv, card, "in-2b") == told  # a replay: the first answer
    again = pay(srv, card, 10, rid="fare-2c")
    assert not again.HasField("incomplete_journey") and again.available_fen == 390


def test_a_tap_out_one_second_inside_the_grace_window_corrects_to_the_real_fare(srv):
    """'a later tap-out within a grace window corrects the charge to the real fare (a
    partial reversal, audited)'."""
    card = settled_journey(srv, 3)
    advance(srv, GRACE - 1)
    out = tap_out(srv, card, "out-3", "in-3", 250)
    assert out.decision == pb.DECISION_APPROVED and out.journey_refund_fen == 350
    assert out.available_fen == 750
    assert balances(srv, card)["TRANSIT"] == (750, 0, 750)
    assert tap_out(srv, card, "out-3", "in-3", 250) == out  # a replay moves nothing
    assert balances(srv, card)["TRANSIT"] == (750, 0, 750)
    e = error_of(tap_out, srv, card, "out-3b", "in-3", 100)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "JOURNEY_CORRECTED" in e.details()
    events = list(rpc.AuditStub(srv.channel).Export(pb.ExportRequest(from_sequence=0),
                                   metadata=srv.md("AUDITOR"), timeout=20))
    corrections = [ev for ev in events if "journey correction" in ev.purpose]
    assert len(corrections) == 1 and corrections[0].card_number == card
    assert "350 fen back" in corrections[0].purpose


@pytest.mark.parametrize("after", [GRACE, GRACE + 1])
def test_a_tap_out_at_or_after_the_grace_windows_end_is_refused_and_moves_nothing(srv, after):
    card = settled_journey(srv, 4)
    advance(srv, after)
    e = error_of(tap_out, srv, card, "out-4", "in-4", 250)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "JOURNEY_GRACE_ENDED" in e.details() and str(T0 + 600 + GRACE) in e.details()
    assert balances(srv, card)["TRANSIT"] == (400, 0, 400)


def test_a_tap_out_one_second_before_the_timeout_is_an_ordinary_tap_out(srv):
    card = new_active_card(srv, 5)
    top_up(srv, card, 1000)
    tap_in(srv, card, "in-5")
    advance(srv, 599)
    out = tap_out(srv, card, "out-5", "in-5", 250)
    assert out.available_fen == 750 and out.journey_refund_fen == 0
    advance(srv, 1)
    assert balances(srv, card)["TRANSIT"] == (750, 0, 750)
    assert not tap_in(srv, card, "in-5b").HasField("incomplete_journey")


def test_a_tap_out_at_the_timeout_second_corrects_the_settled_journey(srv):
    card = settled_journey(srv, 6)
    out = tap_out(srv, card, "out-6", "in-6", 600)  # the max fare: nothing back
    assert out.available_fen == 400 and out.journey_refund_fen == 0
    e = error_of(tap_out, srv, card, "out-6b", "in-6", 601)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "JOURNEY_CORRECTED" in e.details()


def test_a_real_fare_above_the_max_fare_or_a_void_after_settlement_is_refused(srv):
    card = settled_journey(srv, 7)
    e = error_of(tap_out, srv, card, "out-7", "in-7", 601)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "EXCEEDS_MAX_FARE" in e.details()
    e = error_of(pay, srv, card, 0, rid="void-7", phase=pb.PHASE_VOID, hold_request_id="in-7")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "JOURNEY_SETTLED" in e.details()
    assert balances(srv, card)["TRANSIT"] == (400, 0, 400)


def test_a_journey_the_operator_voids_at_its_timeout_charges_nothing_and_is_told(srv):
    card = new_active_card(srv, 8)
    top_up(srv, card, 1000)
    tap_in(srv, card, "in-8", on_timeout=VOID)
    advance(srv, 600)
    assert balances(srv, card)["TRANSIT"] == (1000, 0, 1000)
    j = pay(srv, card, 10, rid="fare-8").incomplete_journey
    assert (j.hold_request_id, j.outcome, j.fare_fen, j.settled_at, j.correctable_until) == (
        "in-8", VOID, 0, T0 + 600, 0)
    e = error_of(tap_out, srv, card, "out-8", "in-8", 250)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "JOURNEY_VOIDED" in e.details()


def test_another_gate_role_cannot_correct_the_journey(srv):
    card = settled_journey(srv, 9)
    e = error_of(pay, srv, card, 100, rid="out-9", channel=pb.CHANNEL_TRANSIT,
                 role="BANK_SWITCH", phase=pb.PHASE_POST, hold_request_id="in-9")
    assert e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)
    assert balances(srv, card)["TRANSIT"] == (400, 0, 400)


BAD = [  # (fields, the field the refusal names)
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=501, on_timeout=SETTLE),
     "max_fare_fen"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, on_timeout=SETTLE), "max_fare_fen"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=500), "on_timeout"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=5, on_timeout=VOID), "max_fare_fen"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=5, on_timeout=9), "on_timeout"),
    (dict(amount_fen=500, max_fare_fen=500, on_timeout=SETTLE), "on_timeout"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=-1, on_timeout=SETTLE),
     "max_fare_fen"),
    (dict(on_timeout=VOID), "on_timeout"),
    (dict(amount_fen=500, phase=pb.PHASE_HOLD, max_fare_fen=500, on_timeout=SETTLE,
          channel=pb.CHANNEL_MEDICAL), "on_timeout"),
]


def test_journey_fields_outside_a_transit_tap_in_are_invalid_argument(srv):
    card = new_active_card(srv, 10)
    top_up(srv, card, 1000)
    for fields, field in BAD:
        fields = dict(fields)
        channel = fields.pop("channel", pb.CHANNEL_TRANSIT)
        role = "MEDICAL_TERMINAL" if channel == pb.CHANNEL_MEDICAL else "TRANSIT_GATE"
        e = error_of(srv.authorization.Authorize, pb.AuthorizeRequest(
            request_id=uuid.uuid4().hex, card_number=card, channel=channel, **fields),
            metadata=srv.md(role))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.details(), (fields, e)
    assert balances(srv, card)["TRANSIT"] == (1000, 0, 1000)


def test_a_bad_grace_window_stops_the_server_from_starting_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "yikatong", "serve", "--data-dir", str(tmp_path / "d"),
         "--journey-grace-seconds", str(config.journey_grace_seconds_max + 1)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--journey-grace-seconds must be 0 to" in done.stderr


# ------------------------------------------------------------------ model-based, in-process

GATE = Client("gate-1", Role.TRANSIT_GATE)
CARD = "310000000001"
PURSE = holder_account_key(1, AccountKind.TRANSIT)


class Clock:
    def __init__(self):
        self.t = T0

    def now(self) -> int:
        return self.t


def _store(path):
    from yikatong.model import Card, Flag, Pack, State
    from yikatong.model import operator_account_key as op
    from yikatong.storage.lmdb_store import Store
    store = Store(path, map_size=16 * 1024**2, check_command=ledger.check_invariants)

    def fill(book):
        book.put_card(Card(CARD, Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=1), 1)
        ledger.create(book, 1, "fund", op("op:topup"), PURSE, 5000)
    store.write(fill)
    return store


class JourneyModel(RuleBasedStateMachine):
    """The model: each journey's state and fare, the purse's posted and held fen, and which
    journey the next tap is told of; the server: the Authorization servicer (Python path)
    on a store whose writer may or may not have swept (the `sweep` rule)."""

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="journeys-")
        self.store = _store(os.path.join(self.tmp, "s"))
        self.clock = Clock()
        self.auth = Authorization(Core(self.store, self.clock))
        self.posted, self.n = 5000, 0
        # hold id -> [state, fen held, max fare, policy, timeout_at, settled_at, fare]
        self.j: dict[str, list] = {}
        self.untold: str | None = None
        self.grace_before = self.grace = config.journey_grace_seconds

    def teardown(self):
        config.journey_grace_seconds = self.grace_before
        self.store.close()
        shutil.rmtree(self.tmp)

    def _call(self, **fields):
        self.n += 1
        q = pb.AuthorizeRequest(request_id=f"r{self.n}", card_number=CARD,
                                channel=pb.CHANNEL_TRANSIT, **fields)
        try:
            return asyncio.run(self.auth.Authorize(q, GATE)), None
        except YikatongError as error:
            return None, error

    def _timeouts(self):
        """What the server does at each due hold's second, whoever comes first."""
        for hid, j in sorted(self.j.items(), key=lambda kv: kv[1][4]):
            if j[0] == JourneyState.OPEN and j[4] <= self.clock.t:
                if j[3] == SETTLE:
                    j[0], j[6] = JourneyState.SETTLED, j[2]
                    self.posted -= j[2]
                else:
                    j[0], j[6] = JourneyState.VOIDED, 0
                j[5] = j[4]
                if self.untold is None or (self.j[self.untold][5], self.untold) < (j[5], hid):
                    self.untold = hid  # the last left open, by its timeout then its id

    def _held(self):
        return sum(j[1] for j in self.j.values() if j[0] == JourneyState.OPEN)

    @initialize()
    def start(self):
        config.journey_grace_seconds = self.grace = 100  # small: the window's ends are reached

    @rule(fen=st.integers(1, 900), fare_part=st.integers(0, 100), void=st.booleans(),
          timeout=st.integers(1, 120))
    def tap_in(self, fen, fare_part, void, timeout):
        self._timeouts()
        max_fare = max(1, fen * fare_part // 100)
        a, err = self._call(amount_fen=fen, phase=pb.PHASE_HOLD, hold_timeout_seconds=timeout,
                            max_fare_fen=0 if void else max_fare,
                            on_timeout=VOID if void else SETTLE)
        assert err is None, err
        told, self.untold = self.untold, None
        assert (a.incomplete_journey.hold_request_id or None) == told
        if told is not None:
            assert a.incomplete_journey.fare_fen == self.j[told][6]
        if fen > self.posted - self._held() or sum(
                1 for j in self.j.values() if j[0] == JourneyState.OPEN) >= 64:
            assert a.decision == pb.DECISION_DECLINED
            return
        assert a.decision == pb.DECISION_APPROVED
        self.j[q_id(self.n)] = [JourneyState.OPEN, fen, 0 if void else max_fare,
                                VOID if void else SETTLE, self.clock.t + timeout, 0, 0]

    @precondition(lambda self: self.j)
    @rule(data=st.data(), post=st.booleans(), part=st.integers(0, 110))
    def tap_out(self, data, post, part):
        """A tap-out of `part` % of the journey's max fare (of the hold, without one), or a
        void."""
        self._timeouts()
        hid = data.draw(st.sampled_from(sorted(self.j)))
        j = self.j[hid]
        fen = (j[2] if j[3] == SETTLE else j[1]) * part // 100 if post else 0
        a, err = self._call(amount_fen=fen if post else 0,
                            phase=pb.PHASE_POST if post else pb.PHASE_VOID, hold_request_id=hid)
        state = j[0]
        if state == JourneyState.OPEN:
            cap = j[2] if j[3] == SETTLE else j[1]  # a journey's fare: at most its max fare
            if post and fen > cap:
                assert err is not None and "EXCEEDS_MAX_FARE" in str(err) if j[3] == SETTLE \
                    else "EXCEEDS_PENDING" in str(err), err
                return
            assert err is None, err
            fare = (fen or cap) if post else 0
            self.posted -= fare
            j[0], j[6] = (JourneyState.COMPLETED if post else JourneyState.CANCELLED), fare
            return
        if state == JourneyState.SETTLED and post and self.clock.t < j[5] + self.grace \
                and (fen or j[2]) <= j[2]:
            assert err is None, err
            refund = j[2] - (fen or j[2])
            assert a.journey_refund_fen == refund
            self.posted += refund
            j[0], j[6] = JourneyState.CORRECTED, fen or j[2]
            return
        assert err is not None, (state, post, fen, j)

    @precondition(lambda self: self.j)
    @rule(data=st.data(), edge=st.sampled_from([-1, 0, 1]), window=st.booleans())
    def to_an_edge(self, data, edge, window):
        """The clock to one second before, at or after a journey's timeout or window end."""
        j = self.j[data.draw(st.sampled_from(sorted(self.j)))]
        at = (j[5] + self.grace if j[5] else j[4] + self.grace) if window else j[4]
        self.clock.t = max(self.clock.t, at + edge)

    @rule(seconds=st.integers(0, 150))
    def tick(self, seconds):
        self.clock.t += seconds

    @rule()
    def sweep(self):
        self.store.write(lambda book: ledger.expire_holds(book, self.clock.t))

    @invariant()
    def the_store_reads_as_the_model(self):
        self._timeouts()
        with self.store.read() as txn:
            book = self.store.book(txn)
            held, fares = ledger.due(book, PURSE, self.clock.t)
            a = book.account(PURSE)
            assert a.posted - fares == self.posted
            assert a.debits_pending - held == self._held()
            assert ledger.available(book, PURSE, self.clock.t) == self.posted - self._held()
            for hid, j in self.j.items():
                assert journeys.state(book, hid, self.clock.t) == (j[0], j[6]), (hid, j)


def q_id(n: int) -> str:
    return f"r{n}"


TestJourneyModel = JourneyModel.TestCase
TestJourneyModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

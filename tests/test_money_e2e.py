"""Money end to end: Authorize with holds and posts, Ledger transfers, replays, expiry on the
manual clock, a SIGKILL restart. Run against the server with each fast path."""
import threading
import uuid

import grpc
import pytest
from test_e2e import START, new_active_card

from yikatong.server.harness import ServerProcess, running
from yikatong.v1 import yikatong_pb2 as pb

GATE, AGENCY = "TRANSIT_GATE", "CARD_AGENCY"


@pytest.fixture(params=["c", "py"])
def srv(request, tmp_path):
    env = {"YIKATONG_NO_EXTENSIONS": "1"} if request.param == "py" else {}
    with running(tmp_path, "--clock", "manual", "--clock-start", START, env=env) as s:
        yield s


def holder_ref(card, kind=pb.ACCOUNT_KIND_TRANSIT):
    return pb.AccountRef(holder=pb.HolderAccountRef(card_number=card, kind=kind))


def top_up(srv, card, fen, kind=pb.ACCOUNT_KIND_TRANSIT, tid=None):
    return srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=tid or uuid.uuid4().hex, debit=pb.AccountRef(operator="op:topup"),
        credit=holder_ref(card, kind), amount_fen=fen), metadata=srv.md(AGENCY))


def pay(srv, card, fen, rid=None, channel=pb.CHANNEL_TRANSIT, role=GATE, **kw):
    return srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid or uuid.uuid4().hex, card_number=card, channel=channel, amount_fen=fen,
        terminal_id="gate-1", **kw), metadata=srv.md(role))


def balances(srv, card):
    out = srv.ledger.GetBalances(pb.GetBalancesRequest(card_number=card),
                                 metadata=srv.md("ONLINE_PLATFORM")).balances
    return {pb.AccountKind.Name(b.kind).removeprefix("ACCOUNT_KIND_"):
            (b.posted_fen, b.pending_fen, b.available_fen) for b in out}


def error_of(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def test_transit_tap_in_holds_the_maximum_fare_and_tap_out_posts_the_real_one(srv):
    card = new_active_card(srv, 11)
    top_up(srv, card, 1000)
    tap_in = pay(srv, card, 600, rid="tap-in-1", phase=pb.PHASE_HOLD)
    assert tap_in.decision == pb.DECISION_APPROVED and tap_in.available_fen == 400
    assert balances(srv, card)["TRANSIT"] == (1000, 600, 400)
    tap_out = pay(srv, card, 250, rid="tap-out-1", phase=pb.PHASE_POST, hold_request_id="tap-in-1")
    assert tap_out.decision == pb.DECISION_APPROVED and tap_out.available_fen == 750
    assert balances(srv, card)["TRANSIT"] == (750, 0, 750)


def test_replayed_request_id_returns_the_first_answer_and_moves_nothing(srv):
    card = new_active_card(srv, 12)
    top_up(srv, card, 500)
    first = pay(srv, card, 300, rid="fare-1")
    assert first.available_fen == 200
    assert pay(srv, card, 300, rid="fare-1") == first
    assert balances(srv, card)["TRANSIT"][0] == 200
    e = error_of(pay, srv, card, 301, rid="fare-1")
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "ID_REUSED" in e.details()


def test_reason_14_insufficient_funds_and_its_replay_stays_the_first_answer(srv):
    card = new_active_card(srv, 13)
    top_up(srv, card, 100, kind=pb.ACCOUNT_KIND_MEDICAL)
    declined = pay(srv, card, 150, rid="clinic-1", channel=pb.CHANNEL_MEDICAL,
                   role="MEDICAL_TERMINAL")
    assert declined.reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS and declined.available_fen == 100
    top_up(srv, card, 100, kind=pb.ACCOUNT_KIND_MEDICAL)
    assert pay(srv, card, 150, rid="clinic-1", channel=pb.CHANNEL_MEDICAL,
               role="MEDICAL_TERMINAL") == declined
    assert pay(srv, card, 150, channel=pb.CHANNEL_MEDICAL,
               role="MEDICAL_TERMINAL").decision == pb.DECISION_APPROVED


def test_two_taps_on_one_purse_in_one_batch_cannot_overdraw_it(srv):
    card = new_active_card(srv, 14)
    top_up(srv, card, 500)
    reqs = [pb.AuthorizeRequest(request_id=f"tap-{i}", card_number=card,
                                channel=pb.CHANNEL_TRANSIT, amount_fen=300) for i in range(2)]
    out = srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=reqs),
                                           metadata=srv.md(GATE)).responses
    assert [o.reason for o in out] == [0, pb.DECLINE_REASON_INSUFFICIENT_FUNDS]
    assert [o.available_fen for o in out] == [200, 200]


def test_a_declined_card_moves_no_money(srv):
    card = new_active_card(srv, 15)
    top_up(srv, card, 500)
    srv.lifecycle.ReportTemporaryLoss(pb.ReportTemporaryLossRequest(
        request_id=uuid.uuid4().hex, card_number=card), metadata=srv.md("SERVICE_HOTLINE"))
    assert pay(srv, card, 100).reason == pb.DECLINE_REASON_CARD_FROZEN
    assert balances(srv, card)["TRANSIT"] == (500, 0, 500)


def test_hold_expiry_at_t_minus_1_and_t_on_the_server_clock(srv):
    card = new_active_card(srv, 16)
    top_up(srv, card, 1000)
    pay(srv, card, 600, rid="hold", phase=pb.PHASE_HOLD, hold_timeout_seconds=60)
    srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=59), metadata=srv.md("ADMIN"))
    assert balances(srv, card)["TRANSIT"] == (1000, 600, 400)
    srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=1), metadata=srv.md("ADMIN"))
    assert balances(srv, card)["TRANSIT"] == (1000, 0, 1000)
    e = error_of(pay, srv, card, 100, phase=pb.PHASE_POST, hold_request_id="hold")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PENDING_TRANSFER_EXPIRED" in e.details()


def test_medical_pre_authorisation_voided(srv):
    card = new_active_card(srv, 17)
    top_up(srv, card, 5000, kind=pb.ACCOUNT_KIND_MEDICAL)
    kw = dict(channel=pb.CHANNEL_MEDICAL, role="MEDICAL_TERMINAL")
    pay(srv, card, 3000, rid="pre-auth", phase=pb.PHASE_HOLD, payee_account="op:hospital-1", **kw)
    assert balances(srv, card)["MEDICAL"] == (5000, 3000, 2000)
    assert pay(srv, card, 0, phase=pb.PHASE_VOID, hold_request_id="pre-auth",
               **kw).available_fen == 5000


def test_ledger_transfer_replay_reuse_and_partial_reversal(srv):
    card = new_active_card(srv, 18)
    first = top_up(srv, card, 1000, tid="topup-1")
    assert first.status == pb.TRANSFER_STATUS_POSTED and first.amount_fen == 1000
    assert top_up(srv, card, 1000, tid="topup-1") == first
    assert balances(srv, card)["TRANSIT"][0] == 1000
    e = error_of(top_up, srv, card, 999, tid="topup-1")
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "ID_REUSED" in e.details()
    rev = srv.ledger.Reverse(pb.ReverseRequest(transfer_id="topup-1", reversal_id="rev-1",
                                               amount_fen=400), metadata=srv.md(AGENCY))
    assert rev.amount_fen == 400 and balances(srv, card)["TRANSIT"][0] == 600
    e = error_of(srv.ledger.Reverse, pb.ReverseRequest(
        transfer_id="topup-1", reversal_id="rev-2", amount_fen=601), metadata=srv.md(AGENCY))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "EXCEEDS_REVERSIBLE_AMOUNT" in e.details()


def test_balances_belong_to_the_holder_and_follow_the_replacement(srv):
    card = new_active_card(srv, 19)
    top_up(srv, card, 700)
    srv.lifecycle.ReportLoss(pb.ReportLossRequest(request_id="l", card_number=card),
                             metadata=srv.md("ONLINE_PLATFORM"))
    new = srv.lifecycle.Replace(pb.ReplaceRequest(request_id="r", card_number=card,
                                                  reason=pb.REPLACE_REASON_LOST, instant=True),
                                metadata=srv.md("COMMUNITY_OUTLET"))
    srv.lifecycle.Activate(pb.ActivateRequest(request_id="a", card_number=new.card_number),
                           metadata=srv.md("ONLINE_PLATFORM"))
    assert balances(srv, new.card_number)["TRANSIT"] == (700, 0, 700)
    assert pay(srv, card, 100).reason == pb.DECLINE_REASON_CARD_SUPERSEDED
    assert pay(srv, new.card_number, 100).available_fen == 600


@pytest.mark.parametrize("fields, field", [
    ({"amount_fen": -5}, "amount_fen"),
    ({"amount_fen": 10**15}, "amount_fen"),
    ({"amount_fen": 0}, "amount_fen"),
    ({"amount_fen": 5, "debit": pb.AccountRef(operator="topup")}, "debit.operator"),
    ({"amount_fen": 5, "credit": pb.AccountRef(holder=pb.HolderAccountRef(
        card_number="1", kind=9))}, "credit.holder.kind"),
    ({"amount_fen": 5, "credit": pb.AccountRef()}, "credit"),
    ({"amount_fen": 5, "phase": pb.PHASE_HOLD}, "timeout_seconds"),
])
def test_bad_transfers_are_invalid_argument_and_write_nothing(srv, fields, field):
    card = new_active_card(srv, 20)
    request = pb.TransferRequest(transfer_id="bad", debit=pb.AccountRef(operator="op:topup"),
                                 credit=holder_ref(card))
    for k, v in fields.items():
        if isinstance(v, pb.AccountRef):
            getattr(request, k).CopyFrom(v)
        else:
            setattr(request, k, v)
    before = srv.digest()
    e = error_of(srv.ledger.Transfer, request, metadata=srv.md(AGENCY))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(field + ":")
    assert srv.digest() == before


@pytest.mark.parametrize("fields, field", [
    ({"channel": pb.CHANNEL_STATUS, "amount_fen": 5}, "amount_fen"),
    ({"phase": pb.PHASE_HOLD}, "amount_fen"),
    ({"phase": pb.PHASE_POST}, "hold_request_id"),
    ({"amount_fen": 5, "hold_request_id": "x"}, "hold_request_id"),
    ({"amount_fen": 5, "payee_account": "metro"}, "payee_account"),
    ({"amount_fen": 5, "hold_timeout_seconds": 5}, "hold_timeout_seconds"),
])
def test_bad_money_fields_in_authorize(srv, fields, field):
    request = pb.AuthorizeRequest(request_id="r", card_number="310000000001",
                                  channel=pb.CHANNEL_TRANSIT)
    for k, v in fields.items():
        setattr(request, k, v)
    role = "BANK_SWITCH" if request.channel == pb.CHANNEL_STATUS else GATE
    e = error_of(srv.authorization.Authorize, request, metadata=srv.md(role))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(field + ":")


def test_acknowledged_transfers_survive_sigkill_and_replays_move_nothing(tmp_path):
    """Clients top up concurrently; the server is SIGKILLed mid-stream. After a restart every
    acknowledged transfer is there with its first answer, and once every attempted id has been
    replayed the balance is exactly the sum of them all: nothing lost, nothing twice."""
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    card = new_active_card(s, 21)
    acked, attempted, lock, stop = {}, {}, threading.Lock(), threading.Event()

    def client(k):
        i = 0
        while not stop.is_set():
            tid, fen = f"c{k}-{i}", 1 + (i % 7)
            with lock:
                attempted[tid] = fen
            try:
                answer = top_up(s, card, fen, tid=tid)
            except grpc.RpcError:
                return
            with lock:
                acked[tid] = answer
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 200:
        threading.Event().wait(0.01)
    s.proc.kill()
    s.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    s.stop()
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START, data_dir=s.data_dir)
    try:
        for tid, answer in acked.items():
            assert top_up(s, card, attempted[tid], tid=tid) == answer
        for tid, fen in attempted.items():  # the unacknowledged: applied once, now or before
            top_up(s, card, fen, tid=tid)
        assert balances(s, card)["TRANSIT"][0] == sum(attempted.values())
    finally:
        s.stop()


def test_authorize_request_ids_hold_across_a_restart(tmp_path):
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    card = new_active_card(s, 22)
    top_up(s, card, 1000)
    first = pay(s, card, 400, rid="fare-before-restart")
    assert s.stop() == 0
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START, data_dir=s.data_dir)
    try:
        assert pay(s, card, 400, rid="fare-before-restart") == first
        assert balances(s, card)["TRANSIT"][0] == 600
        e = error_of(pay, s, card, 1, rid="fare-before-restart")
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        s.stop()

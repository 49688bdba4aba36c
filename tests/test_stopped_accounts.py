"""Stopped accounts on every path (cards.account_stopped; docs/DECISIONS.md, "Stopped accounts
on every path"): while one of a holder's current social security cards is reported lost,
temporarily lost or cancelled on the holder's death, no money leaves the holder's MEDICAL or
BENEFIT account by any path: not by a hold placed before the report and posted after it
(Authorize PHASE_POST, Ledger.Transfer PHASE_POST), not by a reversal that takes back a credit;
money going back into the account (a void, a reversal of a payment) is no use of the card and
is let through. A status-only authorization at MEDICAL or BENEFIT answers what a debit would.
Each through the gRPC method its caller uses (STYLE.md section 9); the articles' words quoted:

GZ-21 "After loss registration, the settlement account of the social security card will be
suspended according to law"; GZ-13 "The settlement accounts of social security cards include
personal accounts of medical insurance and financial accounts"; SH-18 "挂失后，社会保障功能即时冻结
……直接办理正式挂失的,社会保障功能停止使用"; GZ-26 "the social security card application agency shall
stop the use of his/her social security card" (household registration cancelled on death).
"""
import grpc
import pytest
from test_calls import error_info
from test_law import START, call, rid, set_clock
from test_money_e2e import balances, error_of
from test_second_reading_accounts import account, credit, two_cards

from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb

MEDICAL, BENEFIT = pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_BENEFIT
ROLE = {pb.CHANNEL_MEDICAL: "MEDICAL_TERMINAL", pb.CHANNEL_BENEFIT: "BENEFIT_COUNTER",
        pb.CHANNEL_TRANSIT: "TRANSIT_GATE"}
KIND = {pb.CHANNEL_MEDICAL: "MEDICAL", pb.CHANNEL_BENEFIT: "BENEFIT",
        pb.CHANNEL_TRANSIT: "TRANSIT"}


@pytest.fixture
def srv(tmp_path):
    rules = tmp_path / "split.toml"
    rules.write_text('version = "2026-11"\n[split]\nmedical = ["MEDICAL", "TRANSIT"]\n')
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--split-rules", str(rules)) as s:
        yield s


def use(srv, card, fen=0, channel=pb.CHANNEL_MEDICAL, request_id=None, batch=False, **kw):
    """Authorize at a terminal of `channel`: the answer."""
    request = pb.AuthorizeRequest(request_id=request_id or rid(), card_number=card,
                                  channel=channel, amount_fen=fen, terminal_id="t-1", **kw)
    md = srv.md(ROLE[channel])
    if batch:
        return srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=[request]),
                                                metadata=md).responses[0]
    return srv.authorization.Authorize(request, metadata=md)


def said(answer) -> str:
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


WEEK = 7 * 86400


def hold(srv, card, fen, channel=pb.CHANNEL_MEDICAL) -> str:
    """A pre-authorisation (PHASE_HOLD) for a week, granted: its request id."""
    hold_id = rid()
    answer = use(srv, card, fen, channel, hold_id, phase=pb.PHASE_HOLD, hold_timeout_seconds=WEEK)
    assert answer.decision == pb.DECISION_APPROVED, said(answer)
    return hold_id


def capture(srv, card, hold_id, fen=0, channel=pb.CHANNEL_MEDICAL, **kw):
    return use(srv, card, fen, channel, phase=pb.PHASE_POST, hold_request_id=hold_id, **kw)


def void(srv, card, hold_id, channel=pb.CHANNEL_MEDICAL):
    return use(srv, card, 0, channel, phase=pb.PHASE_VOID, hold_request_id=hold_id)


def refused_as(e: grpc.RpcError, reason: str, rule: str) -> bool:
    return (e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == reason
            and rule in e.details())


STOPS = [  # (n, how one of the holder's two cards stops the accounts, the reason, the rule)
    (0, lambda srv, gz, sh: call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz),
     "CARD_LOST", "GZ-21"),
    (1, lambda srv, gz, sh: call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=sh),
     "CARD_FROZEN", "SH-18a"),
    (2, lambda srv, gz, sh: call(srv, "Cancel", "CARD_AGENCY", card_number=gz,
                                 reason="died on 2026-09-20", ground=pb.CANCEL_GROUND_DEATH),
     "CARD_CANCELLED", "GZ-26"),
]
STOP_IDS = ["gz-21-lost", "sh-18a-frozen", "gz-26-death"]
STOP_ARGS = ("n", "stop", "reason", "rule")


# ---------------------------------------------------------------- item 1: holds and reversals

@pytest.mark.parametrize(STOP_ARGS, STOPS, ids=STOP_IDS)
def test_gz_21_sh_18_gz_26_a_hold_taken_before_the_stop_is_not_captured_after_it(
        srv, n, stop, reason, rule):
    """A medical pre-authorisation and a benefit hold granted on the holder's Shanghai card
    before the holder's other card stops the accounts: the capture after it (PHASE_POST) is
    DECLINED with the reason a debit gets (GZ-21 "suspended", SH-18 "即时冻结", GZ-26 "stop the
    use"), and nothing moves: the hold still stands. A void is let through (it releases the
    money to the holder: nothing leaves the account). Through the card that stops them too,
    and in a batch."""
    gz, sh = two_cards(srv, 400 + n)
    held = {ch: hold(srv, sh, 3000, ch) for ch in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT)}
    other = hold(srv, sh, 1000)
    stop(srv, gz, sh)
    for channel, hold_id in held.items():
        for batch in (False, True):
            answer = capture(srv, sh, hold_id, 2500, channel, batch=batch)
            assert (answer.decision, said(answer)) == (pb.DECISION_DECLINED, reason)
        assert balances(srv, sh)[KIND[channel]] == (10_000, 3000 + 1000 * (channel == 2),
                                                    7000 - 1000 * (channel == 2))
    answer = capture(srv, sh, other)  # the whole hold (amount 0) just the same
    assert (answer.decision, said(answer)) == (pb.DECISION_DECLINED, reason)
    assert void(srv, sh, other).decision == pb.DECISION_APPROVED
    assert balances(srv, sh)["MEDICAL"] == (10_000, 3000, 7000)


def test_gz_22_once_the_loss_is_deregistered_the_hold_is_captured(srv):
    """GZ-22 "After loss deregistration, the social security card will resume normal use": a
    hold declined at capture while the Guangzhou card stood lost is captured once it is
    deregistered (within the hold's timeout); the card that was lost captures its own hold."""
    gz, sh = two_cards(srv, 410)
    mine, theirs = hold(srv, gz, 2000), hold(srv, sh, 3000)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    assert said(capture(srv, gz, mine)) == "CARD_LOST"
    assert said(capture(srv, sh, theirs)) == "CARD_LOST"
    call(srv, "CancelLoss", "BANK_OUTLET", card_number=gz)
    assert capture(srv, gz, mine, 1500).decision == pb.DECISION_APPROVED
    assert capture(srv, sh, theirs).decision == pb.DECISION_APPROVED
    assert balances(srv, sh)["MEDICAL"] == (10_000 - 4500, 0, 10_000 - 4500)


def test_sh_13_a_transit_hold_is_still_captured_on_a_lost_card(srv):
    """The purse is not stopped (SH-13's transit function is no social security function;
    GZ-13's settlement accounts are the medical and the financial one): a tap-in made before
    the Shanghai card's formal loss report pays its fare at tap-out after it."""
    gz, sh = two_cards(srv, 420)
    credit(srv, sh, 1000, pb.ACCOUNT_KIND_TRANSIT)
    tap_in = hold(srv, sh, 600, pb.CHANNEL_TRANSIT)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=sh)
    assert capture(srv, sh, tap_in, 250, pb.CHANNEL_TRANSIT).decision == pb.DECISION_APPROVED
    assert balances(srv, sh)["TRANSIT"] == (750, 0, 750)


def ledger_hold(srv, card, fen, kind=MEDICAL) -> str:
    tid = rid()
    answer = srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=tid, debit=account(card, kind), credit=pb.AccountRef(operator="op:bank"),
        amount_fen=fen, phase=pb.PHASE_HOLD, timeout_seconds=WEEK), metadata=srv.md("BANK_SWITCH"))
    assert answer.status == pb.TRANSFER_STATUS_PENDING
    return tid


def ledger_resolve(srv, pending_id, phase, fen=0):
    return srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=rid(), pending_id=pending_id, phase=phase, amount_fen=fen),
        metadata=srv.md("BANK_SWITCH"))


@pytest.mark.parametrize(STOP_ARGS, STOPS, ids=STOP_IDS)
def test_gz_21_sh_18_gz_26_a_ledger_hold_is_not_posted_out_of_a_stopped_account(
        srv, n, stop, reason, rule):
    """Ledger.Transfer's own holds on the medical and benefit accounts, placed by a bank
    switch before the stop: the post after it is refused FAILED_PRECONDITION with the reason
    and rule Ledger.Transfer's debit gets (ErrorInfo reason CARD_LOST, CARD_FROZEN,
    CARD_CANCELLED), and the hold stands; a void releases it."""
    gz, sh = two_cards(srv, 430 + n)
    medical, benefit = ledger_hold(srv, sh, 2000), ledger_hold(srv, gz, 2000, BENEFIT)
    stop(srv, gz, sh)
    for pending_id in (medical, benefit):
        e = error_of(ledger_resolve, srv, pending_id, pb.PHASE_POST, 1500)
        assert refused_as(e, reason, rule), (e.code(), e.details())
        assert gz not in e.details() and sh not in e.details()
    assert balances(srv, sh)["MEDICAL"] == (10_000, 2000, 8000)
    assert balances(srv, sh)["BENEFIT"] == (10_000, 2000, 8000)
    assert ledger_resolve(srv, medical, pb.PHASE_VOID).status == pb.TRANSFER_STATUS_POSTED
    assert balances(srv, sh)["MEDICAL"] == (10_000, 0, 10_000)


def reverse(srv, transfer_id, fen=0):
    return srv.ledger.Reverse(pb.ReverseRequest(transfer_id=transfer_id, reversal_id=rid(),
                                                amount_fen=fen), metadata=srv.md("CARD_AGENCY"))


@pytest.mark.parametrize(STOP_ARGS, STOPS, ids=STOP_IDS)
def test_gz_21_sh_18_gz_26_a_reversal_takes_nothing_back_out_of_a_stopped_account(
        srv, n, stop, reason, rule):
    """A reversal moves money the other way. Taking back a credit (HRSS's 50 yuan into the
    medical account, reversed) debits the account: refused while it is stopped, as
    Ledger.Transfer's debit is (FAILED_PRECONDITION, the same reason and rule). Giving back a
    payment (a medical settlement made before the stop, reversed after it) credits the
    account: let through, as every credit is (the money waits for the holder)."""
    gz, sh = two_cards(srv, 440 + n)
    paid = rid()
    assert use(srv, sh, 1200, request_id=paid).decision == pb.DECISION_APPROVED
    given = rid()
    srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=given, debit=pb.AccountRef(operator="op:fund"), credit=account(gz, BENEFIT),
        amount_fen=5000), metadata=srv.md("HRSS"))
    stop(srv, gz, sh)
    e = error_of(reverse, srv, given, 1000)
    assert refused_as(e, reason, rule), (e.code(), e.details())
    assert balances(srv, sh)["BENEFIT"] == (15_000, 0, 15_000)
    assert reverse(srv, paid, 200).amount_fen == 200  # money back in
    assert balances(srv, sh)["MEDICAL"] == (10_000 - 1000, 0, 9000)


def test_gz_21_a_split_taps_legs_are_given_back_into_a_stopped_account(srv):
    """A split tap (medical first, then the purse: "One tap, several pots") made before the
    Guangzhou card's loss, reversed after it: both legs are given back, the medical leg into
    the suspended medical account too (a credit); a split tap after the loss declines
    CARD_LOST and the purse does not pay instead."""
    gz, sh = two_cards(srv, 450)
    credit(srv, sh, 5000, pb.ACCOUNT_KIND_TRANSIT)
    tap = rid()
    answer = use(srv, sh, 12_000, request_id=tap, split=True)
    assert answer.decision == pb.DECISION_APPROVED and len(answer.legs) == 2
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    assert said(use(srv, sh, 100, split=True)) == "CARD_LOST"
    back = reverse(srv, tap)
    assert [(g.account, g.amount_fen) for g in back.legs] == [
        (pb.ACCOUNT_KIND_TRANSIT, 2000), (MEDICAL, 10_000)]
    assert balances(srv, sh)["MEDICAL"] == (10_000, 0, 10_000)
    assert balances(srv, sh)["TRANSIT"] == (5000, 0, 5000)


def test_sh_18b_a_hold_is_captured_from_the_first_second_after_the_freeze_ends(srv):
    """SH-18b: a temporary loss reported on 21 September freezes the functions to 24:00 on
    26 September; a capture of a hold placed before it declines CARD_FROZEN at 23:59:59
    (Authorize and Ledger.Transfer alike) and goes through at 00:00:00."""
    gz, sh = two_cards(srv, 460)
    pre, held = hold(srv, gz, 2000), ledger_hold(srv, gz, 1000)
    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=sh)
    set_clock(srv, "2026-09-26T23:59:59+08:00")
    assert said(capture(srv, gz, pre)) == "CARD_FROZEN"
    assert error_info(error_of(ledger_resolve, srv, held, pb.PHASE_POST)).reason == "CARD_FROZEN"
    set_clock(srv, "2026-09-27T00:00:00+08:00")
    assert capture(srv, gz, pre).decision == pb.DECISION_APPROVED
    assert ledger_resolve(srv, held, pb.PHASE_POST).status == pb.TRANSFER_STATUS_POSTED
    assert balances(srv, gz)["MEDICAL"] == (7000, 0, 7000)

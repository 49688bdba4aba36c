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
import random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_calls import error_info
from test_law import START, call, rid, set_clock
from test_money_e2e import balances, error_of
from test_second_reading_accounts import account, credit, two_cards
from test_wire import EXAMPLES, NOW, FixedClock, batches, check, check_status, singles

from yikatong import cards, fastpath
from yikatong.model import CancelGround, Card, Channel, Pack, Role, State
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.harness import running
from yikatong.server.services.authorization import Authorization
from yikatong.server.services.card_status import CardStatus
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store
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


# ---------------------------------------------------------------- item 2: status-only answers

def status(srv, card, batch=False) -> pb.CardStatusResponse:
    md = srv.md("MEDICAL_TERMINAL")
    if batch:  # the wire path takes a status batch (status_wire)
        return srv.status.GetStatusBatch(pb.GetStatusBatchRequest(card_numbers=[card]),
                                         metadata=md).statuses[0]
    return srv.status.GetStatus(pb.GetStatusRequest(card_number=card), metadata=md)


def status_only(srv, card, channel) -> list[str]:
    """A status-only use (amount 0) of `card` at `channel`, every way a terminal asks it: one
    request and a batch (the wire path's), and a batch beside a debit of another card (the
    Python path's, which takes such a message whole)."""
    out = [said(use(srv, card, 0, channel)), said(use(srv, card, 0, channel, batch=True))]
    mixed = srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=[
        pb.AuthorizeRequest(request_id=rid(), card_number=card, channel=channel),
        pb.AuthorizeRequest(request_id=rid(), card_number="319999999999", channel=channel,
                            amount_fen=1)]), metadata=srv.md(ROLE[channel]))
    return [*out, said(mixed.responses[0])]


@pytest.mark.parametrize(STOP_ARGS, STOPS, ids=STOP_IDS)
def test_gz_21_sh_18_gz_26_a_status_only_use_answers_what_a_debit_would(
        srv, n, stop, reason, rule):
    """A terminal that asks whether the card may be used now (no amount) and then charges it
    must get one answer for both: while the holder's other card stops the medical and benefit
    accounts, a status-only MEDICAL or BENEFIT use of their Shanghai card declines with the
    debit's reason, on the wire path and the Python path alike, and CardStatus.reason (API.md:
    "what a MEDICAL use would get now") says it too; the card's own state stays ACTIVE, and
    STATUS and TRANSIT uses, which reach no stopped account, are approved."""
    gz, sh = two_cards(srv, 470 + n)
    for channel in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT):
        assert status_only(srv, sh, channel) == ["UNSPECIFIED"] * 3
    stop(srv, gz, sh)
    card = sh if reason != "CARD_FROZEN" else gz  # the card that does not stop them itself
    for channel in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT):
        assert status_only(srv, card, channel) == [reason] * 3
        assert said(use(srv, card, 100, channel)) == reason  # what the debit gets
    for batch in (False, True):
        answer = status(srv, card, batch)
        assert (answer.state, said(answer)) == (pb.CARD_STATE_ACTIVE, reason)
    assert said(use(srv, card, 0, pb.CHANNEL_TRANSIT)) == "UNSPECIFIED"
    assert said(use(srv, card, 0, pb.CHANNEL_TRANSIT, batch=True)) == "UNSPECIFIED"


def test_sh_18a_sh_23c_the_original_is_the_holders_card_until_its_replacement_is_issued(srv):
    """SH-23c: the original becomes invalid once the new card is issued, not before. While a
    re-application (SH-22, changed information) is being made, the original is the holder's
    Shanghai card in force: its temporary loss (SH-18a) freezes the holder's accounts, as the
    unissued new card does not (found by the gRPC lifecycle model, whose own account rule took
    the newest card, issued or not)."""
    gz, sh = two_cards(srv, 490)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=sh,
               reason=pb.REPLACE_REASON_INFO_CHANGED)
    assert new.state == pb.CARD_STATE_APPLIED
    assert status_only(srv, gz, pb.CHANNEL_MEDICAL) == ["UNSPECIFIED"] * 3
    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=sh)
    for channel in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT):
        assert status_only(srv, gz, channel) == ["CARD_FROZEN"] * 3
        assert said(use(srv, gz, 100, channel)) == "CARD_FROZEN"


def test_gz_22_gz_26_a_status_only_use_is_approved_again_when_nothing_stops_the_account(srv):
    """GZ-22: deregistered, the status-only use is approved again at once. GZ-26: a card
    cancelled because its holder is no longer entitled in Guangzhou stops only itself, so the
    holder's Shanghai card is approved status-only, as its debit is."""
    gz, sh = two_cards(srv, 480)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    assert status_only(srv, sh, pb.CHANNEL_MEDICAL) == ["CARD_LOST"] * 3
    call(srv, "CancelLoss", "BANK_OUTLET", card_number=gz)
    assert status_only(srv, sh, pb.CHANNEL_MEDICAL) == ["UNSPECIFIED"] * 3
    assert said(status(srv, sh, True)) == "UNSPECIFIED"
    call(srv, "Cancel", "CARD_AGENCY", card_number=gz, reason="moved away",
         ground=pb.CANCEL_GROUND_ENTITLEMENT_ENDED)
    assert status_only(srv, sh, pb.CHANNEL_BENEFIT) == ["UNSPECIFIED"] * 3
    assert status_only(srv, gz, pb.CHANNEL_BENEFIT) == ["CARD_CANCELLED"] * 3


def test_gz_6_gz_21_the_stopped_account_ranks_before_a_lock_status_only_as_on_a_debit(srv):
    """The account's answer ranks with rows 3, 7 and 8, before a lock (row 10): a Guangzhou
    card whose MEDICAL application is locked (GZ-6) says CARD_LOST status-only while the
    holder's Shanghai card stands lost, as its debit does; a card lost itself says so first."""
    gz, sh = two_cards(srv, 490)
    call(srv, "LockApplication", "BANK_OUTLET", card_number=gz, channel=pb.CHANNEL_MEDICAL)
    assert status_only(srv, gz, pb.CHANNEL_MEDICAL) == ["APPLICATION_LOCKED"] * 3
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=sh)
    assert status_only(srv, gz, pb.CHANNEL_MEDICAL) == ["CARD_LOST"] * 3
    assert said(use(srv, gz, 100)) == "CARD_LOST"
    assert status_only(srv, sh, pb.CHANNEL_MEDICAL) == ["CARD_LOST"] * 3


# ---------------------------------------------------------------- item 2: both paths alike

@pytest.fixture(scope="module")
def holders(tmp_path_factory):
    """Holders with one to three social security cards (SH, GZ, BJ) and sometimes a Residence
    Card, in every state (a temporary loss ending around now, cancellations on death and on
    other grounds), some behind an electronic card; the servicers over it."""
    store = Store(str(tmp_path_factory.mktemp("stopped") / "data"), map_size=64 * 1024**2)
    rng = random.Random(20261207)
    numbers: list[str] = []
    plain: list[str] = []  # cards of holders none of whose cards is cancelled

    def fill(book):
        for holder_id in range(1, 151):
            packs = rng.sample([Pack.SH, Pack.GZ, Pack.BJ, Pack.RC], rng.choice([1, 2, 2, 3, 4]))
            mine = []
            for pack in packs:
                number = f"{'00 31 44 11 90'.split()[pack]}{holder_id:06d}{pack:04d}"
                state = rng.choice([State.ACTIVE, State.ACTIVE, State.ACTIVE, State.LOST,
                                    State.TEMP_LOSS, State.CANCELLED, State.ISSUED])
                card = Card(number, pack, state, lock_mask=rng.choice([0, 0, 0, 1 << 2, 1 << 3]),
                            temp_loss_until=NOW + rng.choice([-1, 0, 1, 86400]),
                            holder_id=holder_id)
                book.txn.put(number.encode(), records.encode_card(card), db=book.dbs.cards)
                book.set_current_card(holder_id, pack, number)
                if state == State.CANCELLED:
                    book.put_card_text(number, "ground", rng.choice(
                        [CancelGround.DEATH, CancelGround.ENTITLEMENT_ENDED]).name)
                if rng.random() < 0.2:
                    ecard = f"{number[:2]}9{holder_id:010d}{pack:05d}"
                    book.put_ecard(ecard, holder_id, pack)
                    mine.append(ecard)
                mine.append(number)
            numbers.extend(mine)
            if State.CANCELLED not in (book.card(n).state for n in mine if len(n) == 12):
                plain.extend(mine)
    store.write(fill)
    core = Core(store, FixedClock())
    yield Authorization(core), CardStatus(core), numbers, plain
    store.close()


ASKERS = [Role.MEDICAL_TERMINAL, Role.BENEFIT_COUNTER, Role.BANK_SWITCH]
compiled = pytest.mark.skipif(fastpath.authorize_wire is None, reason="YIKATONG_NO_EXTENSIONS: "
                              "the wire path is compiled only (as tests/test_wire.py)")


@compiled
@EXAMPLES
@given(data=st.data())
def test_gz_21_sh_18_gz_26_a_status_only_use_is_answered_alike_on_both_paths(holders, data):
    """authorize_wire (Cython) against the Python path (authorize.without_money), for any
    bytes, on holders with several cards: the same answer, or the wire path hands the message
    to the Python path."""
    servicer, _, numbers, _ = holders
    role = data.draw(st.sampled_from(ASKERS))
    if data.draw(st.booleans()):
        check(servicer, data.draw(batches(numbers, role)), True, role)
    else:
        check(servicer, data.draw(singles(numbers, role)), False, role)


@compiled
@EXAMPLES
@given(data=st.data())
def test_gz_21_sh_18_gz_26_card_status_is_answered_alike_on_both_paths(holders, data):
    """status_wire against CardStatus's Python path, on holders with several cards."""
    _, statuses, numbers, _ = holders
    cards = data.draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=6))
    check_status(statuses, pb.GetStatusBatchRequest(card_numbers=cards).SerializeToString())


@compiled
def test_gz_21_sh_18_status_only_uses_stay_the_wire_paths(holders):
    """The wire path hands nothing to the Python path for want of a case but one: a holder's
    other card cancelled (its ground is a text the wire path does not read). Every card of the
    holders with none cancelled, at MEDICAL and BENEFIT and in CardStatus, is the wire
    path's, and some of them decline for another card's loss or freeze."""
    servicer, statuses, _, plain = holders
    said_by_wire = []
    for role, channel in ((Role.MEDICAL_TERMINAL, Channel.MEDICAL),
                          (Role.BENEFIT_COUNTER, Channel.BENEFIT)):
        for at in range(0, len(plain), 100):
            batch = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                request_id=f"r{i}", card_number=n, channel=channel)
                for i, n in enumerate(plain[at:at + 100])])
            assert check(servicer, batch.SerializeToString(), True, role)
            said_by_wire += [r.reason for r in pb.AuthorizeBatchResponse.FromString(
                servicer._wire(batch.SerializeToString(), Client("c", role), True)).responses]
    for at in range(0, len(plain), 100):
        assert check_status(statuses, pb.GetStatusBatchRequest(
            card_numbers=plain[at:at + 100]).SerializeToString())
    book_says = _other_card_answers(servicer, plain)
    assert {pb.DECLINE_REASON_CARD_LOST, pb.DECLINE_REASON_CARD_FROZEN} <= book_says
    assert pb.DECLINE_REASON_CARD_LOST in said_by_wire and 0 in said_by_wire


def _other_card_answers(servicer, numbers) -> set:
    """The reasons the holders' other cards gave (the table said the card itself is usable)."""
    store, out = servicer.core.store, set()
    with store.read() as txn:
        book = store.book(txn)
        for n in numbers:
            record = book.use_bytes(n)
            if fastpath.decide(servicer.core.policy, record, Channel.MEDICAL, NOW, 0) == 0:
                out.add(cards.account_stopped(book, records.holder_id_of(record), NOW,
                                              records.hot(record).pack)[0])
    return out

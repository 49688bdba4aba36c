"""One tap, several pots (issue 28 item 2): a medical settlement the holder asks to split
(AuthorizeRequest.split) is charged to the medical account first and the rest to the transit
purse, as the operator's rule for the channel says (--split-rules), atomically, one answer
listing each leg; Ledger.Reverse of the tap's request id undoes the legs last first. Through
gRPC against a real server on the manual clock (docs/DECISIONS.md, "One tap, several pots").

GZ-13: "Personal accounts of medical insurance may be used for such social insurance
applications as settlement of medical expenses": the medical account pays first and pays
nothing else; the purse is the holder's own money, used for the rest only when the holder asks.
"""
import signal

import grpc
import pytest
from test_audit import export
from test_e2e import new_active_card
from test_law import START, call, rid
from test_money_e2e import balances, error_of, top_up
from test_second_reading_accounts import active_card, credit, holder

from yikatong import pots
from yikatong.config_file import ConfigFileError
from yikatong.model import AccountKind, Channel
from yikatong.server.harness import running, wait_until
from yikatong.v1 import yikatong_pb2 as pb

MEDICAL, TRANSIT = pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_TRANSIT
RULES = 'version = "2026-11"\n[split]\nmedical = ["MEDICAL", "TRANSIT"]\n'


@pytest.fixture
def srv(tmp_path):
    rules = tmp_path / "split.toml"
    rules.write_text(RULES)
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--split-rules", str(rules)) as s:
        s.rules = rules
        yield s


def settle(srv, card, fen, request_id=None, split=True, role="MEDICAL_TERMINAL", **kw):
    return srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=request_id or rid(), card_number=card, channel=pb.CHANNEL_MEDICAL,
        amount_fen=fen, terminal_id="clinic-1", split=split, **kw), metadata=srv.md(role))


def reverse(srv, transfer_id, reversal_id, fen=0):
    return srv.ledger.Reverse(pb.ReverseRequest(transfer_id=transfer_id, reversal_id=reversal_id,
                                                amount_fen=fen), metadata=srv.md("CARD_AGENCY"))


def legs(answer) -> list[tuple]:
    return [(g.account, g.amount_fen, g.transfer_id, g.available_fen) for g in answer.legs]


def funded(srv, n, medical, purse) -> str:
    card = new_active_card(srv, n)  # a Shanghai card made with the transit function
    if medical:
        top_up(srv, card, medical, kind=MEDICAL)
    if purse:
        top_up(srv, card, purse)
    return card


def test_gz_13_medical_first_the_rest_from_the_purse_one_answer_two_legs(srv):
    """30 yuan at a clinic, 20 in the medical account, 50 in the purse: 20 from the medical
    account, 10 from the purse, one answer listing both legs (`<request_id>#1`, `#2`), each
    with what its account has left; one audit event names both."""
    card = funded(srv, 1, 2000, 5000)
    answer = settle(srv, card, 3000, "clinic-visit-1")
    assert answer.decision == pb.DECISION_APPROVED and answer.reason == 0
    assert answer.available_fen == 0  # the channel's own account, as API.md says
    assert legs(answer) == [(MEDICAL, 2000, "clinic-visit-1#1", 0),
                            (TRANSIT, 1000, "clinic-visit-1#2", 4000)]
    assert balances(srv, card)["MEDICAL"] == (0, 0, 0)
    assert balances(srv, card)["TRANSIT"] == (4000, 0, 4000)
    events = [e for e in export(srv) if e.method == "Authorization.Authorize"]
    assert len(events) == 1 and events[0].card_number == card
    assert events[0].purpose == ("split: MEDICAL 2000 fen (clinic-visit-1#1), "
                                 "TRANSIT 1000 fen (clinic-visit-1#2)")


def test_gz_13_a_medical_account_that_covers_it_pays_alone_one_leg(srv):
    """What the medical account covers it pays alone: the purse is not touched."""
    card = funded(srv, 2, 5000, 5000)
    answer = settle(srv, card, 3000, "visit-2")
    assert legs(answer) == [(MEDICAL, 3000, "visit-2#1", 2000)]
    assert answer.available_fen == 2000 and balances(srv, card)["TRANSIT"][0] == 5000
    # an empty medical account: the purse pays the whole, still its leg #1
    card = funded(srv, 3, 0, 5000)
    assert legs(settle(srv, card, 700, "visit-3")) == [(TRANSIT, 700, "visit-3#1", 4300)]


def test_insufficient_total_moves_nothing_and_says_so(srv):
    """Both accounts together short of the amount: INSUFFICIENT_FUNDS, no leg, nothing moved
    (no transfer `<id>#1` exists: its reversal is NOT_FOUND); one fen less is approved."""
    card = funded(srv, 4, 2000, 1000)
    answer = settle(srv, card, 3001, "visit-4")
    assert answer.decision == pb.DECISION_DECLINED
    assert answer.reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert answer.available_fen == 2000 and not answer.legs
    assert balances(srv, card) == {"MEDICAL": (2000, 0, 2000), "TRANSIT": (1000, 0, 1000),
                                   "BENEFIT": (0, 0, 0)}
    e = error_of(reverse, srv, "visit-4", "undo-4")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert settle(srv, card, 3000, "visit-4b").decision == pb.DECISION_APPROVED


def test_replay_answers_the_first_answer_and_moves_nothing(srv):
    """A replayed split tap gets its first answer, legs and all, and moves nothing twice; the
    same id without split (or another amount) is ID_REUSED."""
    card = funded(srv, 5, 2000, 5000)
    first = settle(srv, card, 3000, "visit-5")
    top_up(srv, card, 10_000, kind=MEDICAL)  # the state has changed: the answer has not
    assert settle(srv, card, 3000, "visit-5") == first
    assert balances(srv, card)["TRANSIT"][0] == 4000
    for other in (dict(split=False), dict(fen=2999)):
        e = error_of(settle, srv, card, other.pop("fen", 3000), "visit-5", **other)
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "ID_REUSED" in e.details()


def test_reversal_undoes_the_legs_last_first(srv):
    """Ledger.Reverse of the tap's request id: a partial reversal comes from the last leg first
    (the purse's part, so what stays charged is what a tap of the smaller amount would have
    charged), the rest undoes the purse's remainder then the medical leg, in that order, each
    leg's reversal `<reversal_id>#N`; nothing is left to reverse after."""
    card = funded(srv, 6, 2000, 5000)
    settle(srv, card, 3000, "visit-6")
    part = reverse(srv, "visit-6", "refund-6a", 400)
    assert (part.transfer_id, part.amount_fen, part.status) == (
        "refund-6a", 400, pb.TRANSFER_STATUS_POSTED)
    assert legs(part) == [(TRANSIT, 400, "refund-6a#2", 4400)]
    assert reverse(srv, "visit-6", "refund-6a", 400) == part  # a replay
    rest = reverse(srv, "visit-6", "refund-6b")
    assert rest.amount_fen == 2600
    assert legs(rest) == [(TRANSIT, 600, "refund-6b#2", 5000), (MEDICAL, 2000, "refund-6b#1", 2000)]
    assert balances(srv, card)["MEDICAL"][0] == 2000 and balances(srv, card)["TRANSIT"][0] == 5000
    e = error_of(reverse, srv, "visit-6", "refund-6c", 1)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "EXCEEDS_REVERSIBLE" in e.details()
    # more than is left, asked at once: refused whole, nothing undone
    settle(srv, card, 3000, "visit-6b")
    e = error_of(reverse, srv, "visit-6b", "refund-6d", 3001)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert balances(srv, card)["MEDICAL"][0] == 0 and balances(srv, card)["TRANSIT"][0] == 4000


def test_gz_21_a_stopped_medical_account_is_not_paid_round_by_the_purse(srv):
    """GZ-21 "After loss registration, the settlement account of the social security card
    will be suspended according to law" (GZ-13: the medical account is one): while the
    holder's Guangzhou card stands lost, their Shanghai card's split tap declines CARD_LOST,
    as the unsplit tap does; the purse does not pay the medical bill instead, and nothing
    moves. Deregistered (GZ-22), the split pays again."""
    same = holder(40, pb.PACK_SH).ssn
    gz = active_card(srv, 40, pb.PACK_GZ, ssn=same, household_registered=False)
    sh = active_card(srv, 40, pb.PACK_SH, ssn=same, household_registered=False)
    credit(srv, sh, 1000)
    top_up(srv, sh, 5000)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    for fen in (500, 3000):  # medical alone would cover it; it would not
        answer = settle(srv, sh, fen)
        assert answer.reason == pb.DECLINE_REASON_CARD_LOST and not answer.legs
    assert balances(srv, sh)["TRANSIT"][0] == 5000 and balances(srv, sh)["MEDICAL"][0] == 1000
    call(srv, "CancelLoss", "BANK_OUTLET", card_number=gz)
    assert [g.amount_fen for g in settle(srv, sh, 3000).legs] == [1000, 2000]


def test_a_lost_card_declines_a_split_tap_with_its_own_reason(srv):
    """SH-18c: the tapped card itself lost: CARD_LOST, no leg, nothing moves."""
    card = funded(srv, 7, 1000, 5000)
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    answer = settle(srv, card, 3000)
    assert answer.reason == pb.DECLINE_REASON_CARD_LOST and not answer.legs
    assert balances(srv, card)["TRANSIT"][0] == 5000


def test_split_in_a_batch_answers_in_order_alongside_other_debits(srv):
    """A batch with a split tap (the Python path takes it whole) answers each in order; the
    debits within it see each other's."""
    card = funded(srv, 8, 2000, 5000)
    batch = pb.AuthorizeBatchRequest(requests=[
        pb.AuthorizeRequest(request_id="b-1", card_number=card, channel=pb.CHANNEL_MEDICAL,
                            amount_fen=500),
        pb.AuthorizeRequest(request_id="b-2", card_number=card, channel=pb.CHANNEL_MEDICAL,
                            amount_fen=3000, split=True)])
    out = srv.authorization.AuthorizeBatch(batch, metadata=srv.md("MEDICAL_TERMINAL")).responses
    assert out[0].available_fen == 1500 and not out[0].legs
    assert legs(out[1]) == [(MEDICAL, 1500, "b-2#1", 0), (TRANSIT, 1500, "b-2#2", 3500)]


@pytest.mark.parametrize(("fields", "field", "words"), [
    (dict(channel=pb.CHANNEL_TRANSIT), "split", "only CHANNEL_MEDICAL"),
    (dict(channel=pb.CHANNEL_BENEFIT), "split", "BENEFIT account only"),
    (dict(phase=pb.PHASE_HOLD), "split", "single-phase only"),
    (dict(amount_fen=0), "amount_fen", "positive amount"),
    (dict(request_id="r" * 63), "request_id", "at most 62 bytes"),
])
def test_a_split_the_law_or_the_format_does_not_admit_is_invalid_argument(
        srv, fields, field, words):
    card = funded(srv, 9, 1000, 1000)
    request = dict(request_id=rid(), card_number=card, channel=pb.CHANNEL_MEDICAL,
                   amount_fen=100, split=True)
    request.update(fields)
    role = {pb.CHANNEL_TRANSIT: "TRANSIT_GATE", pb.CHANNEL_BENEFIT: "BENEFIT_COUNTER"}.get(
        request["channel"], "MEDICAL_TERMINAL")
    e = error_of(srv.authorization.Authorize, pb.AuthorizeRequest(**request),
                 metadata=srv.md(role))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(field) and words in e.details()
    assert balances(srv, card)["TRANSIT"][0] == 1000


def test_the_operators_rule_is_reloaded_on_sighup_and_without_one_no_tap_splits(srv):
    """The rule file read again on SIGHUP: emptied, a split tap is FAILED_PRECONDITION naming
    --split-rules (nothing moves); a bad file is kept out (the rule before stays)."""
    card = funded(srv, 10, 0, 5000)
    srv.rules.write_text('version = "2026-12"\n[split]\nbenefit = ["BENEFIT", "TRANSIT"]\n')
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "split rules" in srv.output() and "is not used" in srv.output())
    assert settle(srv, card, 100).decision == pb.DECISION_APPROVED  # the rule before
    srv.rules.write_text('version = "2026-12"\n[split]\n')
    reloads = srv.output().count("reloaded")
    srv.proc.send_signal(signal.SIGHUP)
    # once the reload is done (a tap before it would still split and move money)
    assert wait_until(lambda: srv.output().count("reloaded") > reloads)
    with pytest.raises(grpc.RpcError) as refused:
        settle(srv, card, 100)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--split-rules" in refused.value.details()
    assert balances(srv, card)["TRANSIT"][0] == 4900
    assert settle(srv, card, 100, split=False).reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS


@pytest.mark.parametrize(("text", "words"), [
    ('[split]\nmedical = ["MEDICAL", "TRANSIT"]\n', "needs version"),
    ('version = "1"\n[split]\nbenefit = ["BENEFIT", "TRANSIT"]\n', "not a benefit"),
    ('version = "1"\n[split]\ntransit = ["TRANSIT", "MEDICAL"]\n', "GZ-13"),
    ('version = "1"\n[split]\nmedical = ["TRANSIT", "MEDICAL"]\n', "begins with MEDICAL"),
    ('version = "1"\n[split]\nmedical = ["MEDICAL", "BENEFIT"]\n', "only TRANSIT"),
    ('version = "1"\n[split]\nmedical = ["MEDICAL", "TRANSIT", "TRANSIT"]\n', "each once"),
    ('version = "1"\n[split]\nfinancial = ["MEDICAL"]\n', "only medical"),
    ('version = "1"\n[split]\nmedical = "MEDICAL"\n', "a list of accounts"),
])
def test_a_rule_the_law_does_not_allow_is_refused_whole(tmp_path, text, words):
    path = tmp_path / "split.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as e:
        pots.load(str(path))
    assert str(path) in str(e.value) and words in str(e.value)


def test_a_good_rule_reads_as_its_accounts_in_order(tmp_path):
    path = tmp_path / "split.toml"
    path.write_text(RULES)
    rules = pots.load(str(path))
    assert rules.by_channel == {Channel.MEDICAL: (AccountKind.MEDICAL, AccountKind.TRANSIT)}
    assert rules.said() == "version 2026-11: MEDICAL from MEDICAL then TRANSIT"


def test_an_archived_split_leg_is_refused_as_archived_not_as_unknown(tmp_path):
    """A split tap's legs (`<request_id>#1`, `#2`) are transfers of no request id of their
    own; once archived (older than --retain-days), a reversal of one says ARCHIVED, as of any
    archived transfer, not NOT_FOUND; and the tap's replay answers its first answer."""
    from test_archive import DAY, advance, hot

    rules = tmp_path / "split.toml"
    rules.write_text(RULES)
    with running(tmp_path, "--clock", "manual", "--clock-start", START, "--split-rules",
                 str(rules), "--retain-days", "1") as srv:
        card = funded(srv, 2, 2000, 5000)
        first = settle(srv, card, 3000, "clinic-visit-2")
        assert [g[2] for g in legs(first)] == ["clinic-visit-2#1", "clinic-visit-2#2"]
        top_up(srv, card, 100)  # the newest change event stays hot: not a leg's
        advance(srv, DAY + 60)
        assert wait_until(lambda: hot(srv.data_dir)["transfers"][0] == 1, 30)
        for leg in ("clinic-visit-2#1", "clinic-visit-2#2", "clinic-visit-2"):
            refused = error_of(reverse, srv, leg, f"rev-{leg}")
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.details()
            assert "ARCHIVED" in refused.details()
        assert settle(srv, card, 3000, "clinic-visit-2") == first

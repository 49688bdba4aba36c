"""The law read a second time: who may hold a Residence Card (RC-9, RC-16(3), RC-32), what a
points-gated service asks of a card that is not one (RC-17, RC-18, RC-20), and whose card
reaches a holder's medical and benefit accounts while another of their cards is lost, frozen or
cancelled for death (GZ-13, GZ-21, GZ-26, SH-18, RC-6), at Authorize and at Ledger.Transfer.
Each through the gRPC method its caller uses (STYLE.md section 9); the articles' words quoted."""
import grpc
import pytest
import test_law
from test_calls import error_info
from test_e2e import ssn
from test_law import AGENCY, ORGAN, OUTLET, apply, call, holder, rid, set_clock
from test_money_e2e import error_of

from yikatong.fastpath import _authorize_py as ref
from yikatong.model import Card, Channel, Pack, State
from yikatong.storage import records as r
from yikatong.v1 import yikatong_pb2 as pb

srv = test_law.srv  # the server on the manual clock at START (2026-09-21 15:00 Shanghai)


def rc_refusal(srv, n, **kw) -> grpc.RpcError:
    """An RC application with the holder's fields `kw` changed, refused."""
    return error_of(apply, srv, n, pb.PACK_RC, holder=holder(n, pb.PACK_RC, **kw))


def refused_by(e: grpc.RpcError, rule: str) -> bool:
    return (e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == rule
            and rule in e.details())


# ---------------------------------------------------------------- item 1: who may hold an RC

def test_rc_9_rc_16_3_a_person_registered_in_shanghai_gets_no_residence_card(srv):
    """RC-9 "Chinese mainland migrants to Shanghai who left their permanent residence and
    registered for residence in this Municipality over six months ... may apply"; RC-16(3) the
    card is cancelled when "the holder has registered permanent residency of this
    Municipality": a Shanghai household registration (the application's household_registered
    flag, or a permanent registered address in Shanghai) is refused; a migrant is received."""
    e = rc_refusal(srv, 301, household_registered=True)
    assert refused_by(e, "RC-9") and "household registration in Shanghai" in e.details()
    e = rc_refusal(srv, 302, household_address="上海市黄浦区南京东路1号")
    assert refused_by(e, "RC-9") and "household_address" in e.details()
    assert refused_by(rc_refusal(srv, 303, household_address="Shanghai, Huangpu"), "RC-9")
    card = apply(srv, 304, pb.PACK_RC)  # registered in Wuhan, living in Shanghai
    assert card.state == pb.CARD_STATE_APPLIED
    # a Shanghai card for the same reading is fine: SH-8 wants that registration
    assert apply(srv, 305, pb.PACK_SH).state == pb.CARD_STATE_APPLIED


@pytest.mark.parametrize(("region", "who"), [
    ("810000", "Hong Kong"), ("820000", "Macao"), ("830000", "Taiwan")])
def test_rc_32_a_hong_kong_macao_or_taiwan_residence_permit_gets_no_residence_card(
        srv, region, who):
    """RC-32 "For the residence registration and certificate administration of the
    foreigners, stateless persons, residents in Hong Kong, Macao Special Administrative
    Regions and residents in Taiwan area, the relevant provisions of the State and this
    Municipality shall be followed": a residence permit number of theirs (address code
    810000, 820000, 830000) is no Residence Card applicant's."""
    e = rc_refusal(srv, 310, ssn=ssn(310, region))
    assert refused_by(e, "RC-32") and who in e.details()


def test_rc_32_a_foreign_national_gets_no_residence_card(srv):
    """RC-32 (foreigners and stateless persons follow the State's rules) and RC-1/RC-9 ("Chinese
    mainland migrants"): a foreign nationality, or a foreigner's permanent residence ID number
    (first character 9), is refused; Chinese nationality in its usual spellings is received."""
    e = rc_refusal(srv, 320, nationality="FR")
    assert refused_by(e, "RC-32") and "'FR'" in e.details()
    assert refused_by(rc_refusal(srv, 321, nationality="无国籍"), "RC-32")  # stateless
    e = rc_refusal(srv, 322, ssn=ssn(322, "915156"))
    assert refused_by(e, "RC-32") and "foreigner" in e.details()
    for n, spelling in enumerate(("CN", "chn", "中国", "中华人民共和国", "China")):
        assert apply(srv, 323 + n, pb.PACK_RC, holder=holder(
            323 + n, pb.PACK_RC, nationality=spelling)).state == pb.CARD_STATE_APPLIED
    # SH-29: an overseas person insured in Shanghai still gets a Shanghai card
    assert apply(srv, 330, pb.PACK_SH, holder=holder(
        330, pb.PACK_SH, nationality="FR", household_registered=False,
        ssn=ssn(330, "915156"))).state == pb.CARD_STATE_APPLIED


# ---------------------------------------------------------------- item 2: points-gated services

def service(srv, card, code, batch=False) -> str:
    request = pb.AuthorizeRequest(request_id=rid(), card_number=card,
                                  channel=pb.CHANNEL_SERVICE, service_code=code)
    md = srv.md("COMMUNITY_OUTLET")
    if batch:  # the wire path takes a batch as a batch
        answer = srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(
            requests=[request]), metadata=md).responses[0]
    else:
        answer = srv.authorization.Authorize(request, metadata=md)
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


def active_card(srv, n, pack, **kw) -> str:
    card = apply(srv, n, pack, holder=holder(n, pack, **kw)).card_number
    call(srv, "Verify", AGENCY[pack], card_number=card, approved=True)
    call(srv, "Issue", AGENCY[pack], card_number=card,
         issuing_organ=ORGAN if pack == pb.PACK_RC else "")
    if pack != pb.PACK_RC:
        call(srv, "Activate", OUTLET[pack], card_number=card)
    return card


def test_rc_20_a_points_gated_service_is_not_entitled_on_a_card_that_is_no_residence_card(srv):
    """RC-20 "The Card holders may, when their points reach the standard value, enjoy the
    corresponding public service": the points belong to a Residence Card; a Shanghai,
    Guangzhou or Beijing social security card carries none, so a points-gated SERVICE code
    (and a code no table knows) is NOT_ENTITLED on it, one request or in a batch. RC-17 and
    RC-18's entitlements and plain identification stay as they were."""
    for n, pack in enumerate((pb.PACK_SH, pb.PACK_GZ, pb.PACK_BJ)):
        card = active_card(srv, 340 + n, pack)
        for batch in (False, True):
            assert service(srv, card, "RC_POINTS_SCHOOL_ENTRY", batch) == "NOT_ENTITLED"
            assert service(srv, card, "RC_HOUSING_LOTTERY", batch) == "NOT_ENTITLED"
            assert service(srv, card, "", batch) == "UNSPECIFIED"


@pytest.mark.parametrize("pack", [Pack.SH, Pack.GZ, Pack.BJ])
def test_rc_20_points_gate_on_both_twins(impl, pack):
    """The table's row 13 on the record itself, both implementations: a gated code needs a
    Residence Card whose points reach it; an ungated one (0) needs nothing."""
    policy = impl.Policy({})
    rec = r.encode_card(Card("1", pack, State.ACTIVE, 0, points=0))
    assert impl.decide(policy, rec, Channel.SERVICE, 0, 120) == ref.NOT_ENTITLED
    assert impl.decide(policy, rec, Channel.SERVICE, 0, 0) == ref.APPROVED
    rc = r.encode_card(Card("1", Pack.RC, State.ACTIVE, 0, points=120))
    assert impl.decide(policy, rc, Channel.SERVICE, 0, 120) == ref.APPROVED


# ---------------------------------------------------------------- items 3 and 4: accounts

def pay(srv, card, fen, channel=pb.CHANNEL_MEDICAL, **kw):
    role = {pb.CHANNEL_MEDICAL: "MEDICAL_TERMINAL", pb.CHANNEL_BENEFIT: "BENEFIT_COUNTER"}
    answer = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid(), card_number=card, channel=channel, amount_fen=fen,
        terminal_id="t-1", **kw), metadata=srv.md(role[channel]))
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


def account(card, kind=pb.ACCOUNT_KIND_MEDICAL) -> pb.AccountRef:
    return pb.AccountRef(holder=pb.HolderAccountRef(card_number=card, kind=kind))


def credit(srv, card, fen, kind=pb.ACCOUNT_KIND_MEDICAL):
    srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=rid(), debit=pb.AccountRef(operator="op:fund"), credit=account(card, kind),
        amount_fen=fen), metadata=srv.md("HRSS"))


def debit(srv, card, fen, kind=pb.ACCOUNT_KIND_MEDICAL):
    """A bank switch moving money out of the holder's account (Ledger.Transfer)."""
    return srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=rid(), debit=account(card, kind), credit=pb.AccountRef(operator="op:bank"),
        amount_fen=fen), metadata=srv.md("BANK_SWITCH"))


def two_cards(srv, n, first=pb.PACK_GZ, second=pb.PACK_SH) -> tuple[str, str]:
    """One holder's active cards of two packs (same citizen ID number), money on the
    medical and benefit accounts they share (SPEC.md section 1: accounts are the holder's)."""
    same = holder(n, pb.PACK_SH).ssn  # insured in Shanghai, registered elsewhere
    one = active_card(srv, n, first, ssn=same, household_registered=False)
    two = active_card(srv, n, second, ssn=same, household_registered=False)
    credit(srv, one, 10_000)
    credit(srv, one, 10_000, pb.ACCOUNT_KIND_BENEFIT)
    return one, two


def test_rc_6_a_residence_card_pays_at_no_medical_or_benefit_terminal(srv):
    """RC-6: the Residence Card certifies residence, records information and handles
    "personal points and personal affairs relating to health and family planning, social
    insurance, education"; it carries no medical-insurance or benefit account (GZ-13 and SH-5
    put those on the social security card). An insured migrant's RC card is declined at a
    MEDICAL or BENEFIT terminal (FUNCTION_NOT_OPEN), with or without money; their Shanghai
    social security card pays from the same accounts."""
    sh, rc = two_cards(srv, 350, pb.PACK_SH, pb.PACK_RC)
    for channel in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT):
        assert pay(srv, rc, 100, channel) == "FUNCTION_NOT_OPEN"
        assert pay(srv, rc, 0, channel) == "FUNCTION_NOT_OPEN"
        assert pay(srv, sh, 100, channel) == "UNSPECIFIED"
    assert service(srv, rc, "RC_PUBLIC_HEALTH") == "UNSPECIFIED"  # RC-17(3): identification
    status = srv.status.GetStatus(pb.GetStatusRequest(card_number=rc),
                                  metadata=srv.md("BANK_SWITCH"))
    assert status.state == pb.CARD_STATE_ACTIVE  # in force; a MEDICAL use gets no money
    assert status.reason == pb.DECLINE_REASON_FUNCTION_NOT_OPEN


def test_rc_6_row_11_on_both_twins(impl):
    """RC-6 on the record itself, both implementations: FUNCTION_NOT_OPEN at MEDICAL and
    BENEFIT, after every state row (a lapsed card still says RC_NOT_RENEWED, a lost one
    CARD_LOST); SERVICE and STATUS as before."""
    policy = impl.Policy({})
    rc = r.encode_card(Card("1", Pack.RC, State.ACTIVE, 0, valid_until=100))
    for channel in (Channel.MEDICAL, Channel.BENEFIT):
        assert impl.decide(policy, rc, channel, 99, 0) == ref.FUNCTION_NOT_OPEN
        assert impl.decide(policy, rc, channel, 100, 0) == ref.RC_NOT_RENEWED
    for channel in (Channel.SERVICE, Channel.STATUS):
        assert impl.decide(policy, rc, channel, 99, 0) == ref.APPROVED
    lost = r.encode_card(Card("1", Pack.RC, State.LOST, 0))
    assert impl.decide(policy, lost, Channel.MEDICAL, 99, 0) == ref.CARD_LOST


def test_gz_21_gz_13_a_lost_cards_suspended_account_is_not_spent_through_another_card(srv):
    """GZ-21 "the settlement account of the social security card will be suspended"; GZ-13
    counts the personal medical-insurance account among them. The holder's accounts are one
    per holder, so while the Guangzhou card stands lost no card of the holder (their
    Shanghai card here) debits the medical or benefit account: CARD_LOST, ahead of the funds
    check; a hold too. GZ-22: deregistered, the accounts pay again."""
    gz, sh = two_cards(srv, 360)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    for channel in (pb.CHANNEL_MEDICAL, pb.CHANNEL_BENEFIT):
        assert pay(srv, sh, 100, channel) == "CARD_LOST"
        assert pay(srv, sh, 10**9, channel) == "CARD_LOST"  # before INSUFFICIENT_FUNDS
        assert pay(srv, gz, 100, channel) == "CARD_LOST"
    assert pay(srv, sh, 100, phase=pb.PHASE_HOLD, hold_timeout_seconds=60) == "CARD_LOST"
    call(srv, "CancelLoss", "BANK_OUTLET", card_number=gz)
    assert pay(srv, sh, 100) == "UNSPECIFIED"
    assert pay(srv, sh, 100, pb.CHANNEL_BENEFIT) == "UNSPECIFIED"


def test_sh_18_a_temporary_loss_freezes_the_account_on_the_holders_other_card(srv):
    """SH-18 "社会保障卡临时挂失……社会保障功能暂停使用" (the medical account is one of the
    social security functions): frozen to 24:00 of the fifth day, the holder's Guangzhou card
    draws nothing from it either (CARD_FROZEN); from the first second after, it pays again."""
    gz, sh = two_cards(srv, 370)
    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=sh)
    assert pay(srv, gz, 100) == "CARD_FROZEN"
    set_clock(srv, "2026-09-26T23:59:59+08:00")
    assert pay(srv, gz, 100, pb.CHANNEL_BENEFIT) == "CARD_FROZEN"
    set_clock(srv, "2026-09-27T00:00:00+08:00")
    assert pay(srv, gz, 100) == "UNSPECIFIED"


def test_gz_26_death_stops_the_holders_accounts_on_every_card_other_grounds_do_not(srv):
    """GZ-26 "household registration cancelled by the public security organ because of
    death ... the card is cancelled": nobody's card draws a dead holder's medical account
    (CARD_CANCELLED). A card cancelled because its holder is no longer entitled in Guangzhou
    stops that card only: their Shanghai card still reaches the accounts."""
    gz, sh = two_cards(srv, 380)
    call(srv, "Cancel", "CARD_AGENCY", card_number=gz, reason="moved away",
         ground=pb.CANCEL_GROUND_ENTITLEMENT_ENDED)
    assert pay(srv, gz, 100) == "CARD_CANCELLED"
    assert pay(srv, sh, 100) == "UNSPECIFIED"
    gz, sh = two_cards(srv, 381)
    call(srv, "Cancel", "CARD_AGENCY", card_number=gz, reason="died on 2026-09-20",
         ground=pb.CANCEL_GROUND_DEATH)
    assert pay(srv, sh, 100) == "CARD_CANCELLED"
    assert pay(srv, sh, 100, pb.CHANNEL_BENEFIT) == "CARD_CANCELLED"


def test_gz_21_gz_26_a_bank_switch_transfers_nothing_out_of_a_suspended_account(srv):
    """GZ-21 (lost: the settlement accounts suspended) and GZ-26 (cancelled on death): a
    bank switch's Ledger.Transfer debiting the medical or benefit account is refused
    FAILED_PRECONDITION with the reason Authorize gives for that card (CARD_LOST,
    CARD_FROZEN, CARD_CANCELLED), named through either card of the holder; money still comes
    in (a benefit credited waits), and after GZ-22's deregistration it goes out again."""
    gz, sh = two_cards(srv, 390)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=gz)
    for card in (gz, sh):
        for kind in (pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_BENEFIT):
            e = error_of(debit, srv, card, 100, kind)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(e).reason == "CARD_LOST" and "GZ-21" in e.details()
    credit(srv, gz, 500, pb.ACCOUNT_KIND_BENEFIT)
    call(srv, "CancelLoss", "BANK_OUTLET", card_number=gz)
    assert debit(srv, gz, 100).status == pb.TRANSFER_STATUS_POSTED

    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=sh)
    e = error_of(debit, srv, gz, 100)
    assert error_info(e).reason == "CARD_FROZEN" and "SH-18" in e.details()
    call(srv, "CancelLoss", "ONLINE_PLATFORM", card_number=sh)

    call(srv, "Cancel", "CARD_AGENCY", card_number=gz, reason="died on 2026-09-20",
         ground=pb.CANCEL_GROUND_DEATH)
    e = error_of(debit, srv, sh, 100)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(e).reason == "CARD_CANCELLED" and "GZ-26" in e.details()

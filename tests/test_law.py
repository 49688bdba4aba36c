"""The answers the law does not allow, put right, each through the gRPC method its caller uses
and at the rule's edges (STYLE.md section 9): the roles the article names and one it does
not, the last second of a period and the first after it. The articles' own words are quoted.
"""
import uuid

import grpc
import pytest
from test_calls import error_info
from test_e2e import ssn
from test_money_e2e import error_of

from yikatong import clock as clocks
from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

START = "2026-09-21T15:00:00+08:00"
ORGAN = "上海市公安局黄浦分局"
OUTLET = {pb.PACK_SH: "COMMUNITY_OUTLET", pb.PACK_GZ: "BANK_OUTLET", pb.PACK_BJ: "BANK_OUTLET",
          pb.PACK_RC: "COMMUNITY_OUTLET"}
REGION = {pb.PACK_SH: "310101", pb.PACK_GZ: "440103", pb.PACK_BJ: "110101",
          pb.PACK_RC: "420102"}
PACKS = {"31": pb.PACK_SH, "44": pb.PACK_GZ, "11": pb.PACK_BJ, "90": pb.PACK_RC}


@pytest.fixture
def srv(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        s.residence = rpc.ResidenceCardStub(s.channel)
        yield s


def rid() -> str:
    return uuid.uuid4().hex


def holder(n: int, pack: int, **kw) -> pb.Holder:
    fields = dict(ssn=ssn(n, REGION[pack]), name="李娜", gender="F", birth_date="1985-03-15",
                  phone="13900000000", occupation="nurse", household_registered=True,
                  insured=True, entitled_public_services=True, photo_sha256="cd" * 32,
                  nationality="CN", ethnicity="汉族", address="上海市黄浦区中山东一路1号",
                  postcode="200002")  # SH-9, GZ-9, RC-7: a complete application
    if pack == pb.PACK_RC:  # RC-9: a migrant, registered outside Shanghai
        fields.update(household_address="湖北省武汉市江汉区", residence_address="上海市黄浦区",
                      household_registered=False)
    fields.update(kw)
    return pb.Holder(**fields)


def apply(srv, n, pack=pb.PACK_SH, role=None, **kw):
    fields = dict(request_id=rid(), pack=pack, holder=holder(n, pack),
                  with_transit=pack != pb.PACK_RC,
                  service_bank="" if pack == pb.PACK_RC else "ICBC")
    if pack == pb.PACK_RC:
        fields.update(residence_registered_since="2020-01-01",
                      residence_basis=pb.RESIDENCE_BASIS_EMPLOYMENT)
    fields.update(kw)
    return srv.lifecycle.Apply(pb.ApplyRequest(**fields), metadata=srv.md(role or OUTLET[pack]))


def call(srv, method, role, **fields):
    if method != "GetCard":
        fields["request_id"] = rid()
    request = getattr(pb, method + "Request")(**fields)
    return getattr(srv.lifecycle, method)(request, metadata=srv.md(role))


def refused(srv, method, role, **fields) -> grpc.RpcError:
    return error_of(call, srv, method, role, **fields)


# who verifies and issues a card of each pack: the card agency; a Residence Card, public
# security alone (RC-11, RC-12)
AGENCY = {pb.PACK_SH: "CARD_AGENCY", pb.PACK_GZ: "CARD_AGENCY", pb.PACK_BJ: "CARD_AGENCY",
          pb.PACK_RC: "PUBLIC_SECURITY"}


def issued(srv, n, pack=pb.PACK_SH) -> str:
    card = apply(srv, n, pack).card_number
    call(srv, "Verify", AGENCY[pack], card_number=card, approved=True)
    call(srv, "Issue", AGENCY[pack], card_number=card,
         issuing_organ=ORGAN if pack == pb.PACK_RC else "")
    return card


def active(srv, n, pack=pb.PACK_SH) -> str:
    card = issued(srv, n, pack)
    if pack != pb.PACK_RC:  # RC: in force once issued
        call(srv, "Activate", OUTLET[pack], card_number=card)
    return card


def reason(srv, card, channel=pb.CHANNEL_MEDICAL) -> str:
    role = {pb.CHANNEL_MEDICAL: "MEDICAL_TERMINAL", pb.CHANNEL_FINANCIAL: "BANK_SWITCH",
            pb.CHANNEL_SERVICE: "COMMUNITY_OUTLET"}[channel]
    answer = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid(), card_number=card, channel=channel), metadata=srv.md(role))
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


def set_clock(srv, text: str):
    return srv.admin.SetClock(pb.SetClockRequest(time=text), metadata=srv.md("ADMIN"))


# ---------------------------------------------------------------- service bank

def test_sh_22_open_financial_with_another_bank_is_a_reapplication(srv):
    """SH-22(4) "更换服务银行的" requires re-application; SH-14 opens the financial function
    with the service bank chosen. GZ-24(3): a change of issuing bank is a renewal."""
    for n, pack, rule in ((1, pb.PACK_SH, "SH-22"), (2, pb.PACK_GZ, "GZ-24")):
        card = active(srv, n, pack)
        other = refused(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="BOC")
        assert other.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(other).reason == rule and "re-application" in other.details()
        opened = call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
        assert opened.financial_open and opened.service_bank == "ICBC"
        # the new bank comes with a new card
        new = call(srv, "Replace", OUTLET[pack], card_number=card,
                   reason=pb.REPLACE_REASON_INFO_CHANGED, service_bank="BOC")
        assert new.service_bank == "BOC" and not new.financial_open


def test_sh_11_a_reapplication_goes_through_verification_again(srv):
    """SH-11/SH-23a as corrected: the 15-day clock is for replacement and renewal; a
    re-application (SH-22) goes through SH-10 and SH-11 again."""
    card = active(srv, 3)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_INFO_CHANGED)
    assert new.state == pb.CARD_STATE_APPLIED
    renewal = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=active(srv, 4),
                   reason=pb.REPLACE_REASON_DAMAGED)
    assert renewal.state == pb.CARD_STATE_VERIFIED
    gz = call(srv, "Replace", "BANK_OUTLET", card_number=active(srv, 5, pb.PACK_GZ),
              reason=pb.REPLACE_REASON_INFO_CHANGED)
    assert gz.state == pb.CARD_STATE_VERIFIED  # GZ-25: issued within 12 working days


def test_gz_24_a_defaced_card_or_changed_information_is_renewed_at_a_bank_outlet(srv):
    """GZ-24: renewal for a defaced or unreadable card, or changed basic information: a new
    card, the old one superseded when it is issued; GZ-23/GZ-24 at a bank outlet or online,
    not at a community outlet."""
    for n, why in ((49, pb.REPLACE_REASON_DAMAGED), (50, pb.REPLACE_REASON_INFO_CHANGED)):
        card = active(srv, n, pb.PACK_GZ)
        denied = refused(srv, "Replace", "COMMUNITY_OUTLET", card_number=card, reason=why)
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=why)
        call(srv, "Issue", "CARD_AGENCY", card_number=new.card_number)
        assert call(srv, "GetCard", "BANK_OUTLET", card_number=card).state == \
            pb.CARD_STATE_SUPERSEDED
        assert reason(srv, card) == "CARD_SUPERSEDED"


def test_rc_15_a_lost_residence_card_is_reissued_and_the_old_one_superseded(srv):
    """RC-15: a damaged or lost card is replaced at the community service centre; the old
    card is superseded once the new one is issued (the new one keeps the validity)."""
    card = active(srv, 51, pb.PACK_RC)
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new.card_number, issuing_organ=ORGAN)
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "CARD_SUPERSEDED"
    assert reason(srv, new.card_number, pb.CHANNEL_SERVICE) == "UNSPECIFIED"
    issued_new = call(srv, "GetCard", "CARD_AGENCY", card_number=new.card_number)
    assert issued_new.valid_until == call(srv, "GetCard", "CARD_AGENCY",
                                          card_number=card).valid_until


def test_bj_7_a_beijing_bank_outlet_locks_and_unlocks_an_application(srv):
    """BJ-7 (as GZ-6): application locking and unlocking are bank services: locked, the
    channel declines APPLICATION_LOCKED; unlocked, it is served again."""
    card = active(srv, 52, pb.PACK_BJ)
    call(srv, "LockApplication", "BANK_OUTLET", card_number=card, channel=pb.CHANNEL_MEDICAL)
    assert reason(srv, card) == "APPLICATION_LOCKED"
    call(srv, "UnlockApplication", "BANK_OUTLET", card_number=card, channel=pb.CHANNEL_MEDICAL)
    assert reason(srv, card) == "UNSPECIFIED"


def test_gz_9_a_guangzhou_application_names_a_mobile_phone_and_an_occupation(srv):
    """GZ-9: occupation and mobile phone are part of a Guangzhou application (and BJ's, which
    follows it); a Shanghai one does without."""
    for missing in ("phone", "occupation"):
        e = error_of(apply, srv, 53, pb.PACK_GZ, holder=holder(53, pb.PACK_GZ, **{missing: ""}))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details().startswith(f"holder.{missing}")
    assert apply(srv, 54, holder=holder(54, pb.PACK_SH, phone="", occupation="")).state == \
        pb.CARD_STATE_APPLIED


def test_rc_10_incomplete_documents_are_named_at_once_and_a_complete_one_is_received(srv):
    """RC-10: an applicant whose documents are incomplete is told at once what is missing,
    all of it, not one item per visit; a complete application is received (its card number
    and the moment of receipt are the receipt, from which RC-12's 15 working days run)."""
    bare = holder(67, pb.PACK_RC, name="", household_address="", residence_address="")
    e = error_of(apply, srv, 67, pb.PACK_RC, holder=bare)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == ("holder.name: is required for this application and not held for "
                           "this holder; missing too: holder.household_address, "
                           "holder.residence_address")
    received = apply(srv, 67, pb.PACK_RC)
    assert received.state == pb.CARD_STATE_APPLIED
    assert received.applied_at == clocks.parse_time(START)
    assert (received.card_number, "issue", "RC-12") in [i[:3] for i in due(srv, 60)]


def test_rc_6_a_residence_card_holder_has_both_addresses_kept(srv):
    """RC-6, RC-7: the holder's household-registration address and Shanghai residence
    address are part of the Residence Card; without either the application is refused."""
    for missing in ("household_address", "residence_address"):
        e = error_of(apply, srv, 55, pb.PACK_RC, holder=holder(55, pb.PACK_RC, **{missing: ""}))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details().startswith(f"holder.{missing}")
    card = apply(srv, 56, pb.PACK_RC).card_number
    held = rpc.HoldersStub(srv.channel).GetHolder(pb.GetHolderRequest(
        card_number=card, purpose="RC-6 check"), metadata=srv.md("PUBLIC_SECURITY")).holder
    assert (held.household_address, held.residence_address) == ("湖北省武汉市江汉区",
                                                                 "上海市黄浦区")


def test_sh_29_an_overseas_person_insured_in_shanghai_may_apply(srv):
    """SH-8 with SH-29: household registration in Shanghai, or insured in Shanghai, overseas
    persons insured there included; neither is refused naming SH-8."""
    overseas = holder(57, pb.PACK_SH, nationality="FR", household_registered=False,
                      insured=True)
    assert apply(srv, 57, holder=overseas).state == pb.CARD_STATE_APPLIED
    neither = holder(58, pb.PACK_SH, nationality="FR", household_registered=False,
                     insured=False)
    e = error_of(apply, srv, 58, holder=neither)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "SH-8"


def money(srv, method, role, **fields):
    return getattr(srv.ledger, method)(getattr(pb, method + "Request")(**fields),
                                       metadata=srv.md(role))


def test_sh_5_gz_13_benefits_credited_are_drawn_and_a_lost_gz_card_stops_settlement(srv):
    """SH-5, GZ-13: the card carries the holder's accounts: benefits credited wait on it to
    be drawn at a benefit counter (no more than credited: INSUFFICIENT_FUNDS); GZ-13 counts
    the financial account among the settlement accounts a loss report suspends (GZ-21)."""
    card = active(srv, 59, pb.PACK_GZ)
    money(srv, "Transfer", "HRSS", transfer_id=rid(), debit=pb.AccountRef(operator="op:benefit"),
          credit=pb.AccountRef(holder=pb.HolderAccountRef(
              card_number=card, kind=pb.ACCOUNT_KIND_BENEFIT)), amount_fen=50_000)

    def draw(fen):
        return srv.authorization.Authorize(pb.AuthorizeRequest(
            request_id=rid(), card_number=card, channel=pb.CHANNEL_BENEFIT, amount_fen=fen,
            terminal_id="counter-1"), metadata=srv.md("BENEFIT_COUNTER"))
    assert draw(50_001).reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS
    drawn = draw(50_000)
    assert drawn.decision == pb.DECISION_APPROVED and drawn.available_fen == 0
    call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=card)
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "CARD_LOST"


def test_sh_24_a_shanghai_card_made_again_is_free(srv):
    """SH-24: making, replacing and renewing a Shanghai card costs the holder nothing."""
    card = active(srv, 60)
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    assert new.fee_fen == 0
    assert apply(srv, 61).fee_fen == 0


def test_gz_27_a_quality_fault_within_a_year_of_receipt_is_replaced_free(srv):
    """GZ-27: the first card is free, and so is the replacement of a card unusable through a
    quality fault within one year of its receipt (GZ-12: activation at the outlet, here 21
    September 2026 at 15:00, so to 24:00 on 21 September 2027); otherwise the configured
    cost, recorded as owed in the replacement's own transaction."""
    card = active(srv, 62, pb.PACK_GZ)
    assert call(srv, "GetCard", "BANK_OUTLET", card_number=card).fee_fen == 0  # the first
    set_clock(srv, "2027-09-21T23:59:59+08:00")
    free = call(srv, "Replace", "BANK_OUTLET", card_number=card,
                reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True)
    assert free.fee_fen == 0
    late = active(srv, 63, pb.PACK_GZ)  # received now: a year from 2027-09-21 23:59:59
    set_clock(srv, "2028-09-22T00:00:00+08:00")
    paid = call(srv, "Replace", "BANK_OUTLET", card_number=late,
                reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True)
    assert paid.fee_fen == 2000
    holders_fault = call(srv, "Replace", "BANK_OUTLET", card_number=active(srv, 64, pb.PACK_GZ),
                         reason=pb.REPLACE_REASON_DAMAGED)
    assert holders_fault.fee_fen == 2000
    sh = error_of(call, srv, "Replace", "COMMUNITY_OUTLET", card_number=active(srv, 65),
                  reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True)
    assert sh.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sh.details().startswith("quality_fault:")


def test_gz_27_gz_12_a_mailed_card_never_activated_has_not_begun_its_free_year(srv):
    """GZ-12, GZ-27: the free year runs from the day the holder receives the card, recorded
    at activation (API.md has no call that confirms an express delivery). A mailed card
    never activated has no recorded receipt: its year has not begun, however long ago it
    was issued, and a quality fault found on it is replaced free; an activated card's year
    runs from its activation, not from its issue."""
    mailed = issued(srv, 67, pb.PACK_GZ)  # issued, sent by express, never activated
    set_clock(srv, "2029-01-10T10:00:00+08:00")
    free = call(srv, "Replace", "BANK_OUTLET", card_number=mailed,
                reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True)
    assert free.fee_fen == 0
    late = issued(srv, 68, pb.PACK_GZ)
    set_clock(srv, "2030-06-01T10:00:00+08:00")
    call(srv, "Activate", "BANK_OUTLET", card_number=late)  # received 17 months after issue
    set_clock(srv, "2031-05-30T10:00:00+08:00")
    within = call(srv, "Replace", "BANK_OUTLET", card_number=late,
                  reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True)
    assert within.fee_fen == 0


def test_rc_33_a_residence_card_made_again_carries_the_fee(srv):
    """RC-33: a replacement carries the configured fee; the first card is free."""
    card = active(srv, 66, pb.PACK_RC)
    assert call(srv, "GetCard", "CARD_AGENCY", card_number=card).fee_fen == 0
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    assert new.fee_fen == 2000
    assert call(srv, "GetCard", "CARD_AGENCY", card_number=new.card_number).fee_fen == 2000


# ---------------------------------------------------------------- cancellation

def test_gz_26_death_stops_every_card_of_the_holder_in_the_pack(srv):
    """GZ-26: "household registration is canceled ... due to death ... the social security
    card application agency shall stop the use of his/her social security card"."""
    card = active(srv, 6, pb.PACK_GZ)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=card)
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    # public security cancels the household registration; the agency stops the card (API.md)
    call(srv, "Cancel", "CARD_AGENCY", card_number=new.card_number, reason="死亡注销户口",
         ground=pb.CANCEL_GROUND_DEATH)
    assert reason(srv, card) == reason(srv, new.card_number) == "CARD_CANCELLED"
    assert call(srv, "GetCard", "CARD_AGENCY", card_number=card).cancel_ground == \
        pb.CANCEL_GROUND_DEATH
    sh = active(srv, 7)  # an active card, with a renewal in the making
    renewal = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=sh,
                   reason=pb.REPLACE_REASON_DAMAGED)
    call(srv, "Cancel", "HRSS", card_number=sh, reason="no longer insured",
         ground=pb.CANCEL_GROUND_ENTITLEMENT_ENDED)
    assert reason(srv, sh) == reason(srv, renewal.card_number) == "CARD_CANCELLED"


def test_gz_26_a_withdrawn_replacement_leaves_the_holder_able_to_replace_again(srv):
    """Cancelling only the replacement application: the original is not stuck for ever."""
    card = active(srv, 8, pb.PACK_GZ)
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=card)
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    issued_one = refused(srv, "Cancel", "CARD_AGENCY", card_number=card, reason="x",
                         ground=pb.CANCEL_GROUND_APPLICATION_WITHDRAWN)  # LOST: issued
    assert issued_one.code() == grpc.StatusCode.FAILED_PRECONDITION
    call(srv, "Cancel", "CARD_AGENCY", card_number=new.card_number, reason="holder withdrew",
         ground=pb.CANCEL_GROUND_APPLICATION_WITHDRAWN)
    original = call(srv, "GetCard", "CARD_AGENCY", card_number=card)
    assert original.state == pb.CARD_STATE_LOST and not original.replacement_applied
    # GZ-22 deregistration is open again (no replacement stands), and so is a new replacement
    assert call(srv, "CancelLoss", "BANK_OUTLET", card_number=card).state == \
        pb.CARD_STATE_ACTIVE
    assert reason(srv, card) == "UNSPECIFIED"
    # a first application withdrawn: the holder may apply again
    first = apply(srv, 9)
    call(srv, "Cancel", "CARD_AGENCY", card_number=first.card_number, reason="withdrawn",
         ground=pb.CANCEL_GROUND_APPLICATION_WITHDRAWN)
    assert apply(srv, 9).state == pb.CARD_STATE_APPLIED


def test_gz_26_a_move_of_household_registration_alone_is_no_ground(srv):
    card = active(srv, 10, pb.PACK_GZ)
    for ground in (pb.CANCEL_GROUND_UNSPECIFIED, pb.CANCEL_GROUND_PERMANENT_RESIDENCY):
        e = refused(srv, "Cancel", "CARD_AGENCY", card_number=card, reason="户口迁出",
                    ground=ground)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("ground:")
    assert reason(srv, card) == "UNSPECIFIED"


def test_rc_16_residence_card_cancelled_on_its_own_grounds(srv):
    """RC-16: "(3) The holder has registered permanent residency of this Municipality"."""
    card = active(srv, 11, pb.PACK_RC)
    call(srv, "Cancel", "PUBLIC_SECURITY", card_number=card, reason="落户上海",
         ground=pb.CANCEL_GROUND_PERMANENT_RESIDENCY)
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "CARD_CANCELLED"


# ---------------------------------------------------------------- GZ-9b over gRPC

def test_gz_9b_held_information_is_not_asked_for_again_over_grpc(srv):
    """GZ-9: "shall not require applicants to repeatedly provide those effective information"
    held. The SH application gave phone and occupation; the GZ one need not."""
    n = 12
    first = holder(n, pb.PACK_SH)
    srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_SH, holder=first,
                                        with_transit=True, service_bank="ICBC"),
                        metadata=srv.md("COMMUNITY_OUTLET"))
    bare = pb.Holder(ssn=first.ssn, household_registered=True)  # nothing asked again
    card = srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_GZ, holder=bare,
                                               service_bank="ICBC"),
                               metadata=srv.md("ONLINE_PLATFORM"))
    assert card.state == pb.CARD_STATE_APPLIED and card.pack == pb.PACK_GZ
    never_held = pb.Holder(ssn=ssn(13, "440103"), name="x", birth_date="1990-01-01",
                           household_registered=True)
    e = error_of(srv.lifecycle.Apply, pb.ApplyRequest(
        request_id=rid(), pack=pb.PACK_GZ, holder=never_held, service_bank="ICBC"),
        metadata=srv.md("ONLINE_PLATFORM"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("holder.phone")


# ---------------------------------------------------------------- who may, per pack

def test_sh_23b_a_first_shanghai_application_is_never_instant(srv):
    """SH-23: "持卡人急需补领、换领社会保障卡的，可以到具备条件的社区受理网点、
    银行受理网点当场办理"."""
    e = error_of(apply, srv, 14, instant=True)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "SH-23b"
    for n, role in ((15, "COMMUNITY_OUTLET"), (16, "BANK_OUTLET")):
        new = call(srv, "Replace", role, card_number=active(srv, n),
                   reason=pb.REPLACE_REASON_DAMAGED, instant=True)
        assert new.state == pb.CARD_STATE_ISSUED
    online = refused(srv, "Replace", "ONLINE_PLATFORM", card_number=active(srv, 17),
                     reason=pb.REPLACE_REASON_DAMAGED, instant=True)
    assert online.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(online).reason == "SH-23b"


def test_gz_10b_instant_issue_at_the_issuing_banks_outlet_only(srv):
    """GZ-10: "he/she may apply ... at the instant card making outlet of the social security
    card issuing bank"."""
    for n, pack in ((18, pb.PACK_GZ), (19, pb.PACK_BJ)):
        assert apply(srv, n, pack, "BANK_OUTLET", instant=True).state == pb.CARD_STATE_ISSUED
        e = error_of(apply, srv, n + 100, pack, "ONLINE_PLATFORM", instant=True)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(e).reason == (
            "GZ-10b" if pack == pb.PACK_GZ else "BJ via GZ-10b")


def test_gz_7_gz_and_bj_applications_online_or_at_the_issuing_banks_outlets(srv):
    """GZ-7: "on the network service platform or at the outlets of social security card
    issuing banks" -- not a community outlet."""
    for n, pack in ((20, pb.PACK_GZ), (21, pb.PACK_BJ)):
        e = error_of(apply, srv, n, pack, "COMMUNITY_OUTLET")
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(e).reason == (
            "GZ-7" if pack == pb.PACK_GZ else "BJ via GZ-7")
        assert apply(srv, n, pack, "ONLINE_PLATFORM").state == pb.CARD_STATE_APPLIED
    assert apply(srv, 22, pb.PACK_GZ, "BANK_OUTLET").state == pb.CARD_STATE_APPLIED


def test_gz_23_replacement_online_or_at_the_issuing_banks_outlets(srv):
    card = active(srv, 23, pb.PACK_GZ)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    e = refused(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
                reason=pb.REPLACE_REASON_LOST)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(e).reason == "GZ-23"
    assert call(srv, "Replace", "ONLINE_PLATFORM", card_number=card,
                reason=pb.REPLACE_REASON_LOST).state == pb.CARD_STATE_VERIFIED


def test_sh_18a_the_online_platform_may_file_a_temporary_loss_report(srv):
    """SH-18: "通过拨打社会保障卡服务电话等方式办理临时挂失" -- the hotline "and other means"."""
    card = active(srv, 24)
    e = refused(srv, "ReportTemporaryLoss", "COMMUNITY_OUTLET", card_number=card)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert call(srv, "ReportTemporaryLoss", "ONLINE_PLATFORM", card_number=card).state == \
        pb.CARD_STATE_TEMP_LOSS


def test_rc_15b_a_lost_residence_card_is_reported_at_a_community_outlet_and_stays_lost(srv):
    """RC-15: "loss reporting and reissuance ... at the community service centers"."""
    card = active(srv, 25, pb.PACK_RC)
    for role in ("SERVICE_HOTLINE", "ONLINE_PLATFORM", "BANK_OUTLET"):
        e = refused(srv, "ReportLoss", role, card_number=card)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(e).reason in ("RC-15b", "ROLE_NOT_ALLOWED")
    assert call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card).state == \
        pb.CARD_STATE_LOST
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "CARD_LOST"
    e = refused(srv, "CancelLoss", "COMMUNITY_OUTLET", card_number=card)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "RC-15b"
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new.card_number, issuing_organ=ORGAN)
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "CARD_SUPERSEDED"
    assert reason(srv, new.card_number, pb.CHANNEL_SERVICE) == "UNSPECIFIED"


def test_rc_cards_cite_rc_rules_not_guangzhou_ones(srv):
    card = active(srv, 26, pb.PACK_RC)
    e = refused(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=card)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(e).reason == "RC-15b" and "GZ" not in e.details()


def test_rc_12_public_security_verifies_and_issues_residence_cards_only(srv):
    """RC-12: "The Residence Card shall be signed and issued by the public security
    departments"; RC-7 records the issuing organ."""
    card = apply(srv, 27, pb.PACK_RC).card_number
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    missing = refused(srv, "Issue", "PUBLIC_SECURITY", card_number=card)
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    done = call(srv, "Issue", "PUBLIC_SECURITY", card_number=card, issuing_organ=ORGAN)
    assert done.state == pb.CARD_STATE_ACTIVE and done.issuing_organ == ORGAN
    gz = apply(srv, 28, pb.PACK_GZ).card_number  # a Shanghai applicant's identity is
    # public security's to verify (SH-10: test_law_read_twice)
    e = refused(srv, "Verify", "PUBLIC_SECURITY", card_number=gz, approved=True)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


def test_rc_7_the_card_records_both_addresses(srv):
    e = error_of(apply, srv, 29, pb.PACK_RC,
                 holder=holder(29, pb.PACK_RC, residence_address=""))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("holder.residence_address")


# ---------------------------------------------------------------- periods (SPEC.md section 6)

def test_rc_14_valid_to_24_00_of_the_corresponding_day(srv):
    """Issued at 15:00 on 21 September 2026: valid to 24:00 on 21 September 2027 (Civil Code
    arts. 201, 202), not to 15:00."""
    card = active(srv, 30, pb.PACK_RC)  # at START, 15:00 Shanghai
    got = call(srv, "GetCard", "CARD_AGENCY", card_number=card)
    assert got.valid_until == clocks.parse_time("2027-09-22T00:00:00+08:00")
    set_clock(srv, "2027-09-21T23:59:59+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "UNSPECIFIED"
    set_clock(srv, "2027-09-22T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "RC_NOT_RENEWED"


def renew(srv, card, role="COMMUNITY_OUTLET") -> pb.Card:
    return srv.residence.Renew(pb.RenewRequest(request_id=rid(), card_number=card),
                               metadata=srv.md(role))


def test_rc_14_renewal_opens_30_days_before_the_expiry_date(srv):
    """Art. 14: "The Card holder shall go through the formalities at the community service
    centers for renewal 30 days before the expiry date of the one-year term." Valid to 24:00
    on 21 September 2027 (the expiry date): renewal from 00:00 on 22 August 2027, not a
    second before; renewed in time, the next year runs on to 24:00 on 21 September 2028."""
    card = active(srv, 32, pb.PACK_RC)
    set_clock(srv, "2027-08-21T23:59:59+08:00")
    early = error_of(renew, srv, card)
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert early.details() == ("RC-14: renewal opens on 2027-08-22, 30 days before the card "
                               "expires on 2027-09-21")
    assert error_info(early).reason == "RC-14"
    set_clock(srv, "2027-08-22T00:00:00+08:00")
    renewed = renew(srv, card)
    assert renewed.valid_until == clocks.parse_time("2028-09-22T00:00:00+08:00")
    again = error_of(renew, srv, card, "PUBLIC_SECURITY")  # once a year: the next is 2028's
    assert again.details().startswith("RC-14: renewal opens on 2028-08-22")


def test_rc_14_a_card_not_renewed_is_suspended_and_resumes_when_renewed(srv):
    """Art. 14: "If the Card holder fails to go through the formalities for renewal within
    the time limit, the Residence Card will be suspended; and it will be resumed when the Card
    is duly renewed." Renewed on 3 October 2027, after it lapsed: in force again at once, for
    a year from that day: 3 October 2028 is a National Day rest day, and so is 4 October
    (counted provisionally: no notice for 2028), so to 24:00 on 5 October 2028, the next
    working day (Civil Code art. 203, SPEC.md section 6)."""
    card = active(srv, 33, pb.PACK_RC)
    set_clock(srv, "2027-10-03T10:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "RC_NOT_RENEWED"
    renewed = renew(srv, card, "PUBLIC_SECURITY")
    assert renewed.valid_until == clocks.parse_time("2028-10-06T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "UNSPECIFIED"


def test_rc_14_only_a_residence_card_in_force_lapsed_or_lost_is_renewed(srv):
    """RC-14 with RC-15: a lost card is renewed in its window, its renewal carrying to the
    reissue (test_second_reading_loss); once the reissue is issued the original is superseded
    and never renewed."""
    sh = active(srv, 34)
    not_rc = error_of(renew, srv, sh)
    assert not_rc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a Residence Card is renewed" in not_rc.details()
    lost = active(srv, 35, pb.PACK_RC)
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=lost)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=lost,
               reason=pb.REPLACE_REASON_LOST).card_number
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ=ORGAN)
    set_clock(srv, "2027-09-01T00:00:00+08:00")
    e = error_of(renew, srv, lost)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-14" in e.details()
    assert "SUPERSEDED" in e.details()
    gate = error_of(renew, srv, active(srv, 36, pb.PACK_RC), "TRANSIT_GATE")
    assert gate.code() == grpc.StatusCode.PERMISSION_DENIED


def change(srv, card, changed_on, **holder):
    return srv.residence.ChangeInformation(pb.ChangeInformationRequest(
        request_id=rid(), card_number=card, changed_on=changed_on, holder=pb.Holder(**holder)),
        metadata=srv.md("COMMUNITY_OUTLET"))


@pytest.mark.parametrize("moved, filed, due_at, late", [
    ("2026-09-01", "2026-10-01T23:59:59", "2026-10-09T00:00:00", False),
    ("2026-09-01", "2026-10-08T23:59:59", "2026-10-09T00:00:00", False),
    ("2026-09-01", "2026-10-09T00:00:00", "2026-10-09T00:00:00", True),
    ("2026-09-21", "2026-10-21T23:59:59", "2026-10-22T00:00:00", False),
    ("2026-09-21", "2026-10-22T00:00:00", "2026-10-22T00:00:00", True)])
def test_rc_13_a_change_is_filed_within_30_days_and_a_late_one_is_recorded_late(
        srv, moved, filed, due_at, late):
    """RC-13: a change of residence address "must be filed within 30 days", to 24:00 of the
    30th day after it; a last day in a holiday moves to the next working day (Civil Code art.
    203): moved on 1 September 2026, the 30th day is 1 October, in the National Day week, so
    the filing is due by 24:00 on Thursday 8 October. Moved on 21 September: due by 24:00 on
    Wednesday 21 October. Filed a second later it is taken, and recorded late. The new
    address joins the residence history from the day of the move."""
    card = active(srv, 37, pb.PACK_RC)
    set_clock(srv, filed + "+08:00")
    answer = change(srv, card, moved, residence_address="上海市徐汇区漕溪北路1号")
    assert answer.late is late
    assert answer.due_at == clocks.parse_time(due_at + "+08:00")
    holders = rpc.HoldersStub(srv.channel)
    record = holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="RC-13 check",
                                                   with_history=True),
                               metadata=srv.md("CARD_AGENCY"))
    assert record.holder.residence_address == "上海市徐汇区漕溪北路1号"
    moved_on = moved
    (moved,) = [c for c in record.history if c.field == "residence_address"]
    assert moved.method == "ResidenceCard.ChangeInformation"
    assert moved.reason.startswith(f"RC-13: changed on {moved_on}, filed "
                                   + ("late" if late else "in time"))


def test_rc_13_what_a_filing_may_not_do(srv):
    card = active(srv, 38, pb.PACK_RC)
    sh = active(srv, 39)
    for bad, field in ((dict(changed_on="2027-13-01"), "changed_on"),
                       (dict(changed_on="2030-01-01"), "changed_on"),
                       (dict(changed_on="2026-09-21", ssn=ssn(1, "310101")), "holder.ssn")):
        changed_on = bad.pop("changed_on")
        e = error_of(change, srv, card, changed_on, phone="13900000038", **bad)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(field)
    nothing = error_of(change, srv, card, "2026-09-21")
    assert nothing.code() == grpc.StatusCode.INVALID_ARGUMENT
    not_rc = error_of(change, srv, sh, "2026-09-21", phone="13900000039")
    assert not_rc.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-13" in not_rc.details()


# ---------------------------------------------------------------- deadlines on working days

def due(srv, within_days=0):
    answer = rpc.DeadlinesStub(srv.channel).ListDue(pb.ListDueRequest(within_days=within_days),
                                                    metadata=srv.md("CARD_AGENCY"))
    return [(i.card_number, i.step, i.rule, clocks.format_time(i.due_at), i.overdue)
            for i in answer.items]


def test_sh_10_verification_is_due_within_3_working_days_of_receipt(srv):
    """SPEC.md section 6: "an application made on a Monday has 3 working days to 24:00 on
    Thursday (SH-10)". Received Monday 21 September 2026 at 15:00."""
    card = apply(srv, 40).card_number
    step = (card, "verification", "SH-10", "2026-09-25T00:00:00+08:00")
    assert due(srv, 3) == []  # Thursday 15:00 is within 3 days; 24:00 is not
    assert due(srv, 4) == [(*step, False)]
    set_clock(srv, "2026-09-24T23:59:59+08:00")
    assert due(srv) == []
    set_clock(srv, "2026-09-25T00:00:00+08:00")
    assert due(srv) == [(*step, True)]
    call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True)
    # SH-11: made and issued within 30 days of verification, 25 October a Sunday: to 24:00
    # of the next working day, Monday 26 October
    assert due(srv, 60) == [(card, "issue", "SH-11", "2026-10-27T00:00:00+08:00", False)]
    call(srv, "Issue", "CARD_AGENCY", card_number=card)
    assert due(srv, 60) == []


def test_gz_10_working_days_skip_the_national_day_holiday_and_count_its_make_up_day(srv):
    """GZ-10: made and issued within 12 working days of acceptance. Accepted on 30 September
    2026: 1 to 7 October are holidays (the State Council's notice for 2026), Saturday 10
    October a make-up working day; the 12th working day is Thursday 22 October."""
    set_clock(srv, "2026-09-30T09:00:00+08:00")
    card = apply(srv, 41, pb.PACK_GZ).card_number
    assert due(srv, 30) == [(card, "issue", "GZ-10", "2026-10-23T00:00:00+08:00", False)]
    rc = apply(srv, 42, pb.PACK_RC).card_number  # RC-12: 15 working days
    assert (rc, "issue", "RC-12", "2026-10-28T00:00:00+08:00", False) in due(srv, 30)
    call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=False, reason="photo")
    assert [i[0] for i in due(srv, 30)] == [rc]  # a rejection owes nothing more


def test_gz_10_working_days_skip_the_spring_festival_to_the_second(tmp_path):
    """The 2026 Spring Festival: 15 to 23 February are holidays, Saturdays 14 and 28 February
    make-up working days (the State Council's notice for 2026). Accepted on Thursday 12
    February: the 12 working days are 13, 14, 24 to 28 February and 2 to 6 March, so the issue
    is overdue from 00:00 on 7 March, not a second before."""
    with running(tmp_path, "--clock", "manual", "--clock-start",
                 "2026-02-12T10:00:00+08:00") as srv:
        card = apply(srv, 43, pb.PACK_GZ).card_number
        step = (card, "issue", "GZ-10", "2026-03-07T00:00:00+08:00")
        set_clock(srv, "2026-03-06T23:59:59+08:00")
        assert due(srv, 1) == [step + (False,)]
        set_clock(srv, "2026-03-07T00:00:00+08:00")
        assert due(srv, 0) == [step + (True,)]


def test_sh_23a_gz_25_a_replacement_is_due_in_15_days_or_12_working_days(srv):
    """SH-23a: a replacement or renewal made within 15 days of receiving it (no verification
    again); GZ-25: within 12 working days. Received Monday 21 September 2026 at 15:00: SH by
    24:00 on 6 October, a holiday, so to 24:00 of the next working day, Thursday 8 October
    (Civil Code art. 203); GZ past the Mid-Autumn and National Day holidays, counting the
    make-up Saturday 10 October, to 24:00 on Wednesday 14 October. A Shanghai
    re-application (SH-22) goes through SH-10 again."""
    sh = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=active(srv, 45),
              reason=pb.REPLACE_REASON_DAMAGED).card_number
    gz = call(srv, "Replace", "BANK_OUTLET", card_number=active(srv, 46, pb.PACK_GZ),
              reason=pb.REPLACE_REASON_DAMAGED).card_number
    again = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=active(srv, 47),
                 reason=pb.REPLACE_REASON_INFO_CHANGED).card_number
    assert due(srv, 30) == [
        (again, "verification", "SH-10", "2026-09-25T00:00:00+08:00", False),
        (sh, "replacement", "SH-23a", "2026-10-09T00:00:00+08:00", False),
        (gz, "replacement", "GZ-25", "2026-10-15T00:00:00+08:00", False)]
    set_clock(srv, "2026-10-09T00:00:00+08:00")
    assert [i[0] for i in due(srv) if i[4]] == [again, sh]
    call(srv, "Issue", "CARD_AGENCY", card_number=sh)
    assert [i[0] for i in due(srv) if i[4]] == [again]


def test_sh_27_every_step_overdue_is_listed_for_the_agency_and_hrss_only(srv):
    """SH-27(2): unjustified delay is a breach of duty: what is overdue is listed, to the
    card agency and HRSS (API.md), not to an outlet."""
    card = apply(srv, 48).card_number
    set_clock(srv, "2026-10-01T00:00:00+08:00")
    for role in ("CARD_AGENCY", "HRSS"):
        answer = rpc.DeadlinesStub(srv.channel).ListDue(pb.ListDueRequest(),
                                                        metadata=srv.md(role))
        assert [(i.card_number, i.rule, i.overdue) for i in answer.items] == [
            (card, "SH-10", True)]
    outlet = error_of(rpc.DeadlinesStub(srv.channel).ListDue, pb.ListDueRequest(),
                      metadata=srv.md("COMMUNITY_OUTLET"))
    assert outlet.code() == grpc.StatusCode.PERMISSION_DENIED


def test_yikatong_due_lists_a_stopped_servers_open_steps_with_their_rules(tmp_path):
    import subprocess
    import sys

    from yikatong.server.harness import ROOT, ServerProcess

    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    try:
        card = apply(srv, 44).card_number  # due 25 September 2026: long past by the system clock
    finally:
        srv.stop()
    out = subprocess.run([sys.executable, "-m", "yikatong", "due", "--data-dir", srv.data_dir,
                          "--within", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from yikatong import calendar

    missing = calendar.missing_year(clocks.SystemClock().now())  # this year's, or next's
    assert out.stdout.splitlines() == [
        f"{card} verification SH-10   due 2026-09-25T00:00:00+08:00  OVERDUE",
        "1 step overdue or due within 3 days"] + (
        [f"warning: no official calendar for {missing} (the State Council's notice): its ends "
         f"are counted provisionally; install {missing}.toml in --calendar-dir"] if missing else [])


@pytest.mark.parametrize("reported", ["2027-03-02T00:00:00", "2027-03-02T23:59:59"])
def test_sh_18b_a_temporary_loss_reported_on_2_march_freezes_to_24_00_on_7_march(
        srv, reported):
    """SPEC.md section 6: "a temporary loss reported at any hour of 2 March freezes the card
    to 24:00 on 7 March"."""
    card = active(srv, 31)
    set_clock(srv, reported + "+08:00")
    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=card)
    set_clock(srv, "2027-03-07T23:59:59+08:00")
    assert reason(srv, card) == "CARD_FROZEN"
    set_clock(srv, "2027-03-08T00:00:00+08:00")
    assert reason(srv, card) == "UNSPECIFIED"
    assert call(srv, "GetCard", "CARD_AGENCY", card_number=card).state == pb.CARD_STATE_ACTIVE


# ---------------------------------------------------------------- smaller rows

def test_row_7_a_lost_gz_or_bj_card_declines_financial_a_lost_sh_card_does_not(srv):
    """GZ-21: "the settlement account of the social security card will be suspended"; GZ-13:
    settlement accounts include the financial account. SH-20 is the bank's own report."""
    for n, pack, want in ((32, pb.PACK_GZ, "CARD_LOST"), (33, pb.PACK_BJ, "CARD_LOST"),
                          (34, pb.PACK_SH, "UNSPECIFIED")):
        card = active(srv, n, pack)
        call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
        call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
        assert reason(srv, card, pb.CHANNEL_FINANCIAL) == want, pack


def test_gz_12_the_day_the_holder_received_the_card_is_recorded(srv):
    card = issued(srv, 35, pb.PACK_GZ)
    now = set_clock(srv, "2026-10-08T10:00:00+08:00").now
    got = call(srv, "Activate", "BANK_OUTLET", card_number=card)
    assert got.received_at == now


def test_gz_9c_the_issuing_bank_is_on_the_configured_list(tmp_path):
    """GZ-9: "from the list of social security card issuing banks published by Guangzhou
    Municipal Human Resources and Social Security Bureau"."""
    banks = tmp_path / "banks.toml"
    banks.write_text('version = "2026-01"\nbanks = ["ICBC", "GZRCB"]\n')
    with running(tmp_path, "--issuing-banks", str(banks)) as s:
        assert "issuing-bank check (GZ-9c) on: list version 2026-01, 2 banks" in s.output()
        e = error_of(apply, s, 36, pb.PACK_GZ, service_bank="HSBC")
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "GZ-9c"
        assert apply(s, 36, pb.PACK_GZ, service_bank="GZRCB").service_bank == "GZRCB"
        assert apply(s, 37, pb.PACK_SH, service_bank="HSBC").service_bank == "HSBC"  # SH: none


def test_gz_9c_without_a_list_the_check_is_off_and_start_up_says_so(srv):
    assert "issuing-bank check (GZ-9c) off: no --issuing-banks list configured" in srv.output()


def test_sh_10_a_rejected_reapplication_leaves_the_original_replaceable(srv):
    """SH-10: verification may fail; the holder is told, and is not left without a way to a
    new card: the original may be renewed or replaced again."""
    card = active(srv, 38)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_INFO_CHANGED)
    rejected = call(srv, "Verify", "CARD_AGENCY", card_number=new.card_number, approved=False,
                    reason="photo does not match")
    assert rejected.state == pb.CARD_STATE_REJECTED
    original = call(srv, "GetCard", "CARD_AGENCY", card_number=card)
    assert original.state == pb.CARD_STATE_ACTIVE and not original.replacement_applied
    again = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
                 reason=pb.REPLACE_REASON_DAMAGED)
    assert again.state == pb.CARD_STATE_VERIFIED

"""Issue 24, second reading: loss, replacement and renewal as the seeds say, each through the
gRPC method its caller uses and at the rule's edges (STYLE.md section 9): a card lost before
it was activated (SH-17, SH-18, GZ-21), a lost Residence Card renewed in its window (RC-14),
year-long limits ending on a rest day (Civil Code art. 203), RC-9's six months to the second,
and the holder's basic needs during a replacement (GZ-28)."""
import grpc
import test_law
from test_calls import error_info
from test_law import (
    ORGAN,
    active,
    apply,
    call,
    issued,
    money,
    reason,
    refused,
    rid,
    set_clock,
)
from test_money_e2e import error_of

from yikatong import clock as clocks
from yikatong.v1 import yikatong_pb2 as pb

srv = test_law.srv  # the server on the manual clock at START, with its ResidenceCard stub


def state(srv, card) -> int:
    return call(srv, "GetCard", "CARD_AGENCY", card_number=card).state


def status_state(srv, card) -> int:
    """CardStatus as a gate or bank switch reads it, one card and in a batch (the wire path)."""
    one = srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                               metadata=srv.md("BANK_SWITCH"))
    batch = srv.status.GetStatusBatch(pb.GetStatusBatchRequest(card_numbers=[card]),
                                      metadata=srv.md("BANK_SWITCH")).statuses[0]
    assert (one.state, one.reason) == (batch.state, batch.reason)
    return one.state


# ---------------------------------------------------------------- item 1: lost before activation

def test_sh_18c_sh_17_a_card_issued_not_yet_activated_is_reported_lost_and_replaced(srv):
    """SH-17 "社会保障卡遗失的，持卡人应当及时办理挂失手续"; SH-18 "通过网上服务平台或者持有效
    身份证件到社区受理网点办理正式挂失……社会保障功能停止使用": a lost card is a lost card,
    activated or not. SH-19 "找回原卡的……解除挂失，社会保障功能即时恢复": restored as it was,
    issued and not activated; "无法找回原卡的……办理补领手续": a lost issued card is replaced."""
    card = issued(srv, 901)
    assert reason(srv, card) == "CARD_NOT_ACTIVATED"
    lost = call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    assert lost.state == pb.CARD_STATE_LOST and lost.loss_reported_at
    assert reason(srv, card) == "CARD_LOST"
    # nobody activates a lost card (the finder least of all)
    e = refused(srv, "Activate", "COMMUNITY_OUTLET", card_number=card)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "SH-12"
    found = call(srv, "CancelLoss", "COMMUNITY_OUTLET", card_number=card)
    assert found.state == pb.CARD_STATE_ISSUED  # never activated: not ACTIVE
    assert reason(srv, card) == "CARD_NOT_ACTIVATED"
    assert status_state(srv, card) == pb.CARD_STATE_ISSUED
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    call(srv, "Issue", "CARD_AGENCY", card_number=new.card_number)
    assert state(srv, card) == pb.CARD_STATE_SUPERSEDED
    assert state(srv, new.card_number) == pb.CARD_STATE_ISSUED
    call(srv, "Activate", "COMMUNITY_OUTLET", card_number=new.card_number)
    assert reason(srv, new.card_number) == "UNSPECIFIED"


def test_gz_21_a_card_lost_in_the_post_stops_its_financial_account(srv):
    """GZ-21 "If a cardholder loses his/her social security card, he/she may go through the
    loss registration formalities through the online service platform, the government service
    hotline or the bank's customer service hotline or an outlet of the social security card
    issuing bank ... the settlement account of the social security card will be suspended":
    a card issued and never received (lost in the post) whose financial account is open is
    registered lost, and FINANCIAL declines CARD_LOST. GZ-22: deregistered at the bank outlet,
    it "resumes normal use": issued, not activated. GZ-23: or a new card is applied for."""
    card = issued(srv, 902, pb.PACK_GZ)
    call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"
    lost = call(srv, "ReportLoss", "SERVICE_HOTLINE", card_number=card)
    assert lost.state == pb.CARD_STATE_LOST
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "CARD_LOST"
    assert reason(srv, card) == "CARD_LOST"
    e = refused(srv, "CancelLoss", "ONLINE_PLATFORM", card_number=card)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(e).reason == "GZ-22"
    back = call(srv, "CancelLoss", "BANK_OUTLET", card_number=card)
    assert back.state == pb.CARD_STATE_ISSUED
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"
    assert reason(srv, card) == "CARD_NOT_ACTIVATED"
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=card)
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    assert new.state == pb.CARD_STATE_VERIFIED
    e = refused(srv, "CancelLoss", "BANK_OUTLET", card_number=card)  # GZ-22: not once applied
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_sh_18b_a_temporary_loss_of_a_card_never_activated_lapses_to_issued(srv):
    """SH-18 "持卡人在临时挂失有效期内未办理正式挂失的，有效期届满后社会保障功能自动恢复":
    restored as they were; a card issued and never activated (SH-12) is issued again when
    the 5 days end (reported at 15:00 on 21 September: to 24:00 on 26 September), not
    ACTIVE. Frozen to the last second before; SH-19a's cancellation alike."""
    card = issued(srv, 903)
    frozen = call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=card)
    assert frozen.state == pb.CARD_STATE_TEMP_LOSS
    assert reason(srv, card) == "CARD_FROZEN"
    e = refused(srv, "Activate", "ONLINE_PLATFORM", card_number=card)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    set_clock(srv, "2026-09-26T23:59:59+08:00")
    assert reason(srv, card) == "CARD_FROZEN"
    assert status_state(srv, card) == pb.CARD_STATE_TEMP_LOSS
    set_clock(srv, "2026-09-27T00:00:00+08:00")
    assert reason(srv, card) == "CARD_NOT_ACTIVATED"
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "FUNCTION_NOT_OPEN"
    assert status_state(srv, card) == pb.CARD_STATE_ISSUED
    assert state(srv, card) == pb.CARD_STATE_ISSUED
    assert call(srv, "Activate", "ONLINE_PLATFORM", card_number=card).state == \
        pb.CARD_STATE_ACTIVE
    assert reason(srv, card) == "UNSPECIFIED"
    # SH-19a: a temporary loss of a card never activated, cancelled, is ISSUED again
    other = issued(srv, 904)
    call(srv, "ReportTemporaryLoss", "ONLINE_PLATFORM", card_number=other)
    assert call(srv, "CancelLoss", "ONLINE_PLATFORM", card_number=other).state == \
        pb.CARD_STATE_ISSUED
    assert reason(srv, other) == "CARD_NOT_ACTIVATED"
    # and one activated is ACTIVE again, as before
    assert call(srv, "Activate", "ONLINE_PLATFORM", card_number=other).state == \
        pb.CARD_STATE_ACTIVE
    call(srv, "ReportTemporaryLoss", "ONLINE_PLATFORM", card_number=other)
    assert call(srv, "CancelLoss", "ONLINE_PLATFORM", card_number=other).state == \
        pb.CARD_STATE_ACTIVE



# ---------------------------------------------------------------- item 3: a lost Residence Card

def lost_rc(srv, n) -> str:
    """A Residence Card issued at START (15:00 on 21 September 2026, valid to 24:00 on 21
    September 2027: renewal opens on 22 August 2027), reported lost at the community centre."""
    card = issued(srv, n, pb.PACK_RC)
    assert call(srv, "GetCard", "CARD_AGENCY", card_number=card).valid_until == \
        clocks.parse_time("2027-09-22T00:00:00+08:00")
    return card


def valid_until(srv, card) -> str:
    at = call(srv, "GetCard", "CARD_AGENCY", card_number=card).valid_until
    return clocks.format_time(at)


def test_rc_14_a_lost_residence_card_is_renewed_in_its_window_and_the_renewal_carries(srv):
    """RC-14 "The Residence Card shall be renewed once a year. The Card holder shall go
    through the formalities at the community service centers for renewal 30 days before the
    expiry date"; RC-15 "When the Residence Card is ... lost, the Card holder shall go through
    the formalities for ... loss reporting and reissuance": a holder whose card is lost in its
    renewal window renews it (from 00:00 on 22 August 2027, not a second before), and the
    renewal carries to the reissued card."""
    card = lost_rc(srv, 911)
    set_clock(srv, "2027-08-21T23:59:59+08:00")
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST).card_number
    early = error_of(srv.residence.Renew, pb.RenewRequest(request_id=rid(), card_number=card),
                     metadata=srv.md("COMMUNITY_OUTLET"))
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "renewal opens on 2027-08-22" in early.details()
    set_clock(srv, "2027-08-22T00:00:00+08:00")
    renewed = srv.residence.Renew(pb.RenewRequest(request_id=rid(), card_number=card),
                                  metadata=srv.md("COMMUNITY_OUTLET"))
    assert renewed.state == pb.CARD_STATE_LOST  # lost until reissued (RC-15b)
    assert renewed.valid_until == clocks.parse_time("2028-09-22T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "CARD_LOST"
    set_clock(srv, "2027-09-25T10:00:00+08:00")  # issued after the old year's end
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ=ORGAN)
    assert valid_until(srv, new) == "2028-09-22T00:00:00+08:00"
    assert reason(srv, new, pb.CHANNEL_SERVICE) == "UNSPECIFIED"


def test_rc_14_rc_15_a_reissued_card_is_never_issued_already_lapsed(srv):
    """RC-14 "If the Card holder fails to go through the formalities for renewal within the
    time limit, the Residence Card will be suspended": a holder who applied for the reissue
    before the card expired did not fail to; the reissue made after the expiry runs on a
    year from it (to 24:00 on 21 September 2028), not issued already suspended. Issued to the
    last second of the old year, it keeps the old end (and is renewed as any card)."""
    first, second = lost_rc(srv, 912), lost_rc(srv, 913)
    set_clock(srv, "2027-09-10T09:00:00+08:00")  # in the window, not renewed
    reissues = []
    for card in (first, second):
        call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
        reissues.append(call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
                             reason=pb.REPLACE_REASON_LOST).card_number)
    set_clock(srv, "2027-09-21T23:59:59+08:00")
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=reissues[0], issuing_organ=ORGAN)
    assert valid_until(srv, reissues[0]) == "2027-09-22T00:00:00+08:00"
    set_clock(srv, "2027-09-22T00:00:00+08:00")
    assert reason(srv, reissues[0], pb.CHANNEL_SERVICE) == "RC_NOT_RENEWED"
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=reissues[1], issuing_organ=ORGAN)
    assert valid_until(srv, reissues[1]) == "2028-09-22T00:00:00+08:00"
    assert reason(srv, reissues[1], pb.CHANNEL_SERVICE) == "UNSPECIFIED"


def test_rc_15_a_reissue_applied_for_after_the_card_lapsed_is_in_force_from_its_issue(srv):
    """RC-14 "it will be resumed when the Card is duly renewed": a card lost after it lapsed
    is reissued at the community service centre; the new card is in force for a year from
    its issue (as a lapsed card renewed), not issued already suspended."""
    card = lost_rc(srv, 914)
    set_clock(srv, "2027-10-12T09:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "RC_NOT_RENEWED"
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST).card_number
    set_clock(srv, "2027-10-20T09:00:00+08:00")
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ=ORGAN)
    assert valid_until(srv, new) == "2028-10-21T00:00:00+08:00"
    assert reason(srv, new, pb.CHANNEL_SERVICE) == "UNSPECIFIED"


# ------------------------------------------- item 5: year-long limits ending on a rest day

def test_rc_14_a_year_ending_on_a_holiday_runs_to_24_00_of_the_next_working_day(srv):
    """SPEC.md section 6, Civil Code art. 203 ("期间的最后一日是法定休假日的，以法定休假日结束
    的次日为期间的最后一日"): RC-14's year limits the holder's act, renewal at a community
    service centre. Issued on 1 October 2026, its year ends on 1 October 2027, National Day;
    1 to 5 October 2027 are rest days (counted provisionally, 2027 has no notice installed),
    so it stays in force to 24:00 on 6 October 2027, not suspended on 2 October. The renewal
    window still opens 30 days before 1 October (1 September); renewed in time, the next year
    runs on from the end the card had (to 24:00 on 6 October 2028)."""
    set_clock(srv, "2026-10-01T10:00:00+08:00")
    card, renewed = issued(srv, 921, pb.PACK_RC), issued(srv, 922, pb.PACK_RC)
    assert valid_until(srv, card) == "2027-10-07T00:00:00+08:00"
    set_clock(srv, "2027-08-31T23:59:59+08:00")
    early = error_of(srv.residence.Renew, pb.RenewRequest(request_id=rid(), card_number=renewed),
                     metadata=srv.md("COMMUNITY_OUTLET"))
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert early.details() == ("RC-14: renewal opens on 2027-09-01, 30 days before the card "
                               "expires on 2027-10-01 (a rest day: it stays in force to 24:00 "
                               "on 2027-10-06, the next working day)")
    set_clock(srv, "2027-09-01T00:00:00+08:00")
    assert srv.residence.Renew(pb.RenewRequest(request_id=rid(), card_number=renewed),
                               metadata=srv.md("COMMUNITY_OUTLET")).valid_until == \
        clocks.parse_time("2028-10-07T00:00:00+08:00")
    set_clock(srv, "2027-10-02T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "UNSPECIFIED"
    set_clock(srv, "2027-10-06T23:59:59+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "UNSPECIFIED"
    set_clock(srv, "2027-10-07T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_SERVICE) == "RC_NOT_RENEWED"
    assert reason(srv, renewed, pb.CHANNEL_SERVICE) == "UNSPECIFIED"


def test_gz_27_the_free_year_after_receipt_ending_on_a_rest_day_runs_to_the_next_working_day(
        srv):
    """GZ-27 "Those who replace social security cards that cannot be used due to quality
    problems within 1 year after receiving the cards" are exempted from the cost; the year
    limits the holder's act (SPEC.md section 6, art. 203). Received on 5 October 2026: the
    year's last day, 5 October 2027, is a rest day (provisionally: 1 to 5 October), so the
    replacement is free to 24:00 on 6 October 2027, and charged from the next second."""
    free, paid = issued(srv, 923, pb.PACK_GZ), issued(srv, 924, pb.PACK_GZ)
    set_clock(srv, "2026-10-05T10:00:00+08:00")
    for card in (free, paid):
        call(srv, "Activate", "BANK_OUTLET", card_number=card)  # GZ-12: received
    set_clock(srv, "2027-10-06T23:59:59+08:00")
    assert call(srv, "Replace", "BANK_OUTLET", card_number=free,
                reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True).fee_fen == 0
    set_clock(srv, "2027-10-07T00:00:00+08:00")
    assert call(srv, "Replace", "BANK_OUTLET", card_number=paid,
                reason=pb.REPLACE_REASON_DAMAGED, quality_fault=True).fee_fen == 2000


# ---------------------------------------------------------------- item 10: RC-9's six months

def test_rc_9_six_months_of_residence_are_complete_at_24_00_of_the_corresponding_day(srv):
    """RC-9 "registered for residence in this Municipality over six months" (居住登记满6个月:
    the number itself included, SPEC.md section 6); the day of registration is not counted
    (Civil Code art. 201), so registered on 21 March 2026 the six months are complete at 24:00
    on 21 September 2026: refused at 15:00 and at 23:59:59 that day, accepted at 00:00 on 22
    September. Registered on 20 March, accepted at 15:00 on 21 September."""
    def applying(n, since):
        return apply(srv, n, pb.PACK_RC, residence_registered_since=since)

    early = error_of(applying, 931, "2026-03-21")
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(early).reason == "RC-9"
    assert "complete at 24:00 on 2026-09-21" in early.details()
    assert applying(932, "2026-03-20").state == pb.CARD_STATE_APPLIED
    set_clock(srv, "2026-09-21T23:59:59+08:00")
    assert error_info(error_of(applying, 931, "2026-03-21")).reason == "RC-9"
    set_clock(srv, "2026-09-22T00:00:00+08:00")
    assert applying(931, "2026-03-21").state == pb.CARD_STATE_APPLIED


# ---------------------------------------------------------------- GZ-28: basic needs

def test_gz_28_basic_needs_are_met_while_a_card_is_replaced(srv):
    """GZ-28 "During the period when a cardholder replaces or regains a social security card,
    the social security card application agency shall take effective measures to ensure the
    basic needs of the cardholder for relevant public service benefits can be met"; GZ-25
    "If a cardholder is in urgent need ... he/she may apply for the card reissue or
    replacement at the instant card making outlet"; GZ-35: the electronic card has the
    physical card's effect, and follows the holder's current card (SPEC.md section 1).
    What the server does (DECISIONS.md): a lost card's electronic card declines CARD_LOST
    until the new card is issued; made on the spot, the new card is current at once, and the
    electronic card and the holder's medical account follow it as soon as it is received. A
    card renewed (defaced, unreadable) stays in use, with its electronic card, while the new
    one is made."""
    lost = active(srv, 941, pb.PACK_GZ)
    e = srv.lifecycle.IssueElectronic(pb.IssueElectronicRequest(
        request_id=rid(), card_number=lost), metadata=srv.md("ONLINE_PLATFORM")).number
    money(srv, "Transfer", "HRSS", transfer_id=rid(), debit=pb.AccountRef(operator="op:medical"),
          credit=pb.AccountRef(holder=pb.HolderAccountRef(
              card_number=lost, kind=pb.ACCOUNT_KIND_MEDICAL)), amount_fen=10_000)
    call(srv, "ReportLoss", "SERVICE_HOTLINE", card_number=lost)
    assert reason(srv, e) == "CARD_LOST"
    new = call(srv, "Replace", "BANK_OUTLET", card_number=lost, reason=pb.REPLACE_REASON_LOST,
               instant=True)
    assert new.state == pb.CARD_STATE_ISSUED  # made on the spot (GZ-25, GZ-10b)
    call(srv, "Activate", "BANK_OUTLET", card_number=new.card_number)  # received (GZ-12)
    settled = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid(), card_number=e, channel=pb.CHANNEL_MEDICAL, amount_fen=2_500,
        terminal_id="hospital-1"), metadata=srv.md("MEDICAL_TERMINAL"))
    assert settled.decision == pb.DECISION_APPROVED and settled.available_fen == 7_500
    assert reason(srv, lost) == "CARD_SUPERSEDED"

    defaced = active(srv, 942, pb.PACK_GZ)
    e2 = srv.lifecycle.IssueElectronic(pb.IssueElectronicRequest(
        request_id=rid(), card_number=defaced), metadata=srv.md("ONLINE_PLATFORM")).number
    renewal = call(srv, "Replace", "BANK_OUTLET", card_number=defaced,
                   reason=pb.REPLACE_REASON_DAMAGED)
    assert renewal.state == pb.CARD_STATE_VERIFIED  # made within 12 working days (GZ-25)
    assert reason(srv, defaced) == "UNSPECIFIED" and reason(srv, e2) == "UNSPECIFIED"

"""Issue 24, second reading: what an application must hold (SH-9, GZ-9, RC-7, RC-10), fees for
cards never made (GZ-27, RC-33), credit records on the wrongdoer (SH-26), a holder's own
points application (RC-30) and RC-12's special circumstances stated after verification. Each
through the gRPC method its caller uses (STYLE.md section 9); the articles' own words are
quoted."""
import grpc
import pytest
from test_law import OUTLET, START, active, apply, call, due, holder, rid, set_clock
from test_money_e2e import error_of

from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


@pytest.fixture
def srv(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        s.residence = rpc.ResidenceCardStub(s.channel)
        s.holders = rpc.HoldersStub(s.channel)
        yield s


MISSING = "is required for this application and not held for this holder"


def named(e: grpc.RpcError) -> list[str]:
    """Every item a refusal names as missing, in order."""
    first, _, rest = e.details().partition(": ")
    assert rest.startswith(MISSING), e.details()
    _, _, more = rest.partition("; missing too: ")
    return [first] + (more.split(", ") if more else [])


# ---------------------------------------------------------------- SH-9, GZ-9, RC-7, RC-10

def test_sh_9_the_outlet_records_nationality_ethnicity_gender_address_and_postcode(srv):
    """SH-9: "申请人申领社会保障卡时，应当交验本人有效身份证件，现场核对本人姓名、国籍、民族、性别、
    相片等信息，并提供通讯地址、邮政编码等信息". Every item missing is named in one refusal, before
    eligibility is judged: an applicant neither registered nor insured in Shanghai (SH-8) who
    left them out learns first what is missing, all of it."""
    bare = holder(201, pb.PACK_SH, nationality="", ethnicity="", gender="", address="",
                  postcode="", photo_sha256="", household_registered=False, insured=False)
    e = error_of(apply, srv, 201, holder=bare)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named(e) == ["holder.gender", "holder.nationality", "holder.ethnicity",
                        "holder.address", "holder.postcode", "holder.photo_sha256"]
    ineligible = holder(201, pb.PACK_SH, household_registered=False, insured=False)
    e = error_of(apply, srv, 201, holder=ineligible)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-8" in e.details()
    for role in ("COMMUNITY_OUTLET", "BANK_OUTLET", "ONLINE_PLATFORM"):  # each channel alike
        e = error_of(apply, srv, 202, holder=holder(202, pb.PACK_SH, postcode=""), role=role)
        assert named(e) == ["holder.postcode"]
    assert apply(srv, 202).state == pb.CARD_STATE_APPLIED


def test_gz_9_photo_mailing_address_and_issuing_bank_named_at_once(srv):
    """GZ-9: "the applicant shall provide his/her valid identity document, photo, occupation,
    mobile phone number, mailing address and other information, and determine the social
    security card issuing bank": a Guangzhou card is not made without them, and every one
    missing is named in one refusal (not the bank first, then the rest on the next visit)."""
    bare = holder(203, pb.PACK_GZ, photo_sha256="", address="", phone="",
                  household_registered=False, entitled_public_services=False)
    e = error_of(apply, srv, 203, pb.PACK_GZ, holder=bare, service_bank="")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named(e) == ["holder.phone", "holder.photo_sha256", "holder.address", "service_bank"]
    assert apply(srv, 203, pb.PACK_GZ).state == pb.CARD_STATE_APPLIED


def test_gz_9b_what_is_held_completes_an_application(srv):
    """GZ-9: "shall not require applicants to repeatedly provide those effective information":
    a holder whose photo and mailing address are held need not give them again; one of whom
    nothing is held is told everything missing."""
    first = holder(204, pb.PACK_SH)
    apply(srv, 204, holder=first)
    bare = pb.Holder(ssn=first.ssn, household_registered=True)
    card = apply(srv, 204, pb.PACK_GZ, holder=bare, role="ONLINE_PLATFORM")
    assert card.state == pb.CARD_STATE_APPLIED
    stranger = pb.Holder(ssn=holder(205, pb.PACK_GZ).ssn, household_registered=True)
    e = error_of(apply, srv, 205, pb.PACK_GZ, holder=stranger, role="ONLINE_PLATFORM")
    assert named(e) == ["holder.name", "holder.birth_date", "holder.phone", "holder.occupation",
                        "holder.photo_sha256", "holder.address"]


def test_rc_7_a_residence_card_records_sex_nationality_and_photo(srv):
    """RC-7: "The contents recorded in the Residence Card include such information as the name,
    sex, nationality, date of birth, citizen ID number, recent photo, permanent registered
    residential address, residential address"; RC-10: "if not complete, they shall inform the
    applicants at once of the contents to be completed" (the registration and its basis, RC-9's
    proofs, too), before eligibility is judged."""
    bare = holder(206, pb.PACK_RC, gender="", nationality="", photo_sha256="")
    e = error_of(apply, srv, 206, pb.PACK_RC, holder=bare, residence_registered_since="",
                 residence_basis=pb.RESIDENCE_BASIS_UNSPECIFIED)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named(e) == ["holder.gender", "holder.nationality", "holder.photo_sha256",
                        "residence_registered_since", "residence_basis"]
    e = error_of(apply, srv, 206, pb.PACK_RC, holder=bare,
                 residence_registered_since="2026-09-01")  # registered 20 days ago
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named(e) == ["holder.gender", "holder.nationality", "holder.photo_sha256"]
    e = error_of(apply, srv, 206, pb.PACK_RC, residence_registered_since="2026-09-01")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-9" in e.details()
    card = apply(srv, 206, pb.PACK_RC, role=OUTLET[pb.PACK_RC])
    assert card.state == pb.CARD_STATE_APPLIED


# ---------------------------------------------------------------- GZ-27, RC-33

def fee_events(srv, card: str) -> list[pb.AuditEvent]:
    """The audit events of a fee reversed on `card` (GZ-27, RC-33)."""
    events = rpc.AuditStub(srv.channel).Export(pb.ExportRequest(from_sequence=0),
                                               metadata=srv.md("AUDITOR"))
    return [e for e in events if e.method == "Ledger.Reverse" and e.card_number == card]


def test_gz_27_a_withdrawn_replacement_owes_no_fee(srv):
    """GZ-27: "An applicant shall pay the cost of a social security card": a cost is owed for
    a card made. A replacement withdrawn before it is made owes nothing: the fee recorded at
    its application is reversed in the same transaction, and audited; the replacement applied
    for again owes its own fee, once."""
    card = active(srv, 207, pb.PACK_GZ)
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_DAMAGED)
    assert new.fee_fen == 2000 and not fee_events(srv, new.card_number)
    withdrawn = call(srv, "Cancel", "CARD_AGENCY", card_number=new.card_number,
                     reason="the holder found the card readable after all",
                     ground=pb.CANCEL_GROUND_APPLICATION_WITHDRAWN)
    assert withdrawn.state == pb.CARD_STATE_CANCELLED and withdrawn.fee_fen == 0
    assert call(srv, "GetCard", "BANK_OUTLET", card_number=new.card_number).fee_fen == 0
    [event] = fee_events(srv, new.card_number)
    assert event.client_id and event.role == "CARD_AGENCY" and "GZ-27" in event.purpose
    again = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_DAMAGED)
    assert again.fee_fen == 2000
    issued = call(srv, "Issue", "CARD_AGENCY", card_number=again.card_number)
    assert issued.fee_fen == 2000 and not fee_events(srv, again.card_number)


def test_gz_27_a_replacement_cancelled_before_it_is_made_owes_no_fee(srv):
    """GZ-26 with GZ-27: a holder who dies while a replacement is being made is charged for no
    card: every card of the pack stops, and the replacement never made owes nothing."""
    card = active(srv, 208, pb.PACK_GZ)
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_DAMAGED)
    call(srv, "Cancel", "CARD_AGENCY", card_number=card, reason="death registered",
         ground=pb.CANCEL_GROUND_DEATH)
    gone = call(srv, "GetCard", "BANK_OUTLET", card_number=new.card_number)
    assert gone.state == pb.CARD_STATE_CANCELLED and gone.fee_fen == 0
    assert len(fee_events(srv, new.card_number)) == 1


def test_rc_33_a_withdrawn_reissue_of_a_residence_card_owes_no_fee(srv):
    """RC-33: "Fees are needed for the replacement and reissuance of the Residence Card": for
    a card reissued. A reissue withdrawn before it is made owes nothing."""
    card = active(srv, 209, pb.PACK_RC)
    call(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    assert new.fee_fen == 2000
    withdrawn = call(srv, "Cancel", "PUBLIC_SECURITY", card_number=new.card_number,
                     reason="withdrawn at the holder's request",
                     ground=pb.CANCEL_GROUND_APPLICATION_WITHDRAWN)
    assert withdrawn.fee_fen == 0
    [event] = fee_events(srv, new.card_number)
    assert event.role == "PUBLIC_SECURITY" and "RC-33" in event.purpose


# ---------------------------------------------------------------- SH-26

def credit(srv, role="PUBLIC_SECURITY", **fields):
    return srv.holders.RecordCredit(pb.RecordCreditRequest(request_id=rid(), **fields),
                                    metadata=srv.md(role))


def credit_records(srv, card: str) -> list[pb.CreditRecord]:
    return list(srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="SH-26"),
                                      metadata=srv.md("CARD_AGENCY")).credit_records)


def test_sh_26_fraud_goes_on_the_wrongdoer_never_on_the_card_s_holder(srv):
    """SH-26: "冒领、冒用、盗用他人社会保障卡，牟取非法利益的 … 有关失信信息纳入本市公共信用
    信息服务平台": the record goes on the one who fraudulently claimed, used or stole
    another's card. Named by the card's number, the fraud would land on its holder, who is the
    victim: refused; the wrongdoer is named by ssn and the card used beside it."""
    victim = active(srv, 210)
    wrongdoer = holder(211, pb.PACK_SH).ssn
    active(srv, 211)
    e = error_of(credit, srv, card_number=victim, ground=pb.CREDIT_GROUND_FRAUD,
                 evidence_ref="黄浦公安 2026-0501", illegal_gain=True)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "victim" in e.details()
    assert credit_records(srv, victim) == []
    own = error_of(credit, srv, ssn=holder(210, pb.PACK_SH).ssn, ground=pb.CREDIT_GROUND_FRAUD,
                   victim_card_number=victim, evidence_ref="x", illegal_gain=True)
    assert own.code() == grpc.StatusCode.INVALID_ARGUMENT  # one's own card is not another's
    record = credit(srv, ssn=wrongdoer, ground=pb.CREDIT_GROUND_FRAUD, victim_card_number=victim,
                    evidence_ref="黄浦公安 2026-0501", illegal_gain=True)
    assert record.rule == "SH-26" and record.illegal_gain
    assert credit_records(srv, victim) == []
    wrongdoers = srv.holders.GetHolder(pb.GetHolderRequest(ssn=wrongdoer, purpose="SH-26"),
                                       metadata=srv.md("CARD_AGENCY")).credit_records
    assert list(wrongdoers) == [record]


def test_sh_26_requires_illegal_gain(srv):
    """SH-26, first paragraph: "出借、转让本人社会保障卡 … 牟取非法利益的": lending one's own card
    is recorded when done for illegal gain, and the record states it; lent without it, no
    record."""
    card = active(srv, 212)
    e = error_of(credit, srv, card_number=card, ground=pb.CREDIT_GROUND_LENDING_CARD,
                 evidence_ref="x")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-26" in e.details()
    assert "牟取非法利益" in e.details() and credit_records(srv, card) == []
    record = credit(srv, card_number=card, ground=pb.CREDIT_GROUND_LENDING_CARD,
                    evidence_ref="x", illegal_gain=True)
    assert record.illegal_gain and credit_records(srv, card) == [record]


def test_sh_26_is_shanghai_s_and_never_recorded_on_a_guangzhou_or_beijing_holder(srv):
    """SH-26 is an article of the Shanghai Measures: a Guangzhou, Beijing or Residence Card's
    holder is not recorded under it, whether named by card or by ssn, nor is fraud with a card
    of another pack."""
    for n, pack in ((213, pb.PACK_GZ), (214, pb.PACK_BJ), (215, pb.PACK_RC)):
        card = active(srv, n, pack)
        for ground in (pb.CREDIT_GROUND_LENDING_CARD, pb.CREDIT_GROUND_FORGED_CARD):
            e = error_of(credit, srv, card_number=card, ground=ground, evidence_ref="x",
                         illegal_gain=True)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-26" in e.details()
        e = error_of(credit, srv, ssn=holder(n, pack).ssn, ground=pb.CREDIT_GROUND_LENDING_CARD,
                     evidence_ref="x", illegal_gain=True)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-26" in e.details()
        active(srv, 216 + n, pb.PACK_SH)
        e = error_of(credit, srv, ssn=holder(216 + n, pb.PACK_SH).ssn,
                     ground=pb.CREDIT_GROUND_FRAUD, victim_card_number=card, evidence_ref="x",
                     illegal_gain=True)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-26" in e.details()
        assert credit_records(srv, card) == []


# ---------------------------------------------------------------- RC-30

EMPLOYER = "91350100M000100Y43"  # a unified social credit code with a valid check character


def own_points(srv, card, **fields):
    return srv.residence.ApplyPoints(pb.ApplyPointsRequest(
        request_id=rid(), card_number=card, filer=pb.POINTS_FILER_HOLDER,
        claims=[pb.PointsClaim(indicator="education", value="bachelor")],
        evidence_ref="HR-2026-0030", **fields), metadata=srv.md("HRSS"))


def test_rc_30_a_holder_files_naming_the_employer_that_refused_or_failed(srv):
    """RC-30: "The Card holders, when their units refuse without justified reasons or fail to
    apply for the points for them, may apply themselves at the human resources and social
    security departments, and [they] shall order their work units to make correction or
    directly accept their application": the holder's own application names the work unit and
    says whether it refused or failed to file; without them it is refused, both named at once."""
    card = active(srv, 220, pb.PACK_RC)
    e = error_of(own_points, srv, card)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("employer: ") and "employer_default" in e.details()
    e = error_of(own_points, srv, card, employer=EMPLOYER)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("employer_default: ")
    e = error_of(srv.residence.ApplyPoints, pb.ApplyPointsRequest(
        request_id=rid(), card_number=card, filer=pb.POINTS_FILER_EMPLOYER, employer=EMPLOYER,
        employer_default=pb.EMPLOYER_DEFAULT_REFUSED, evidence_ref="x",
        claims=[pb.PointsClaim(indicator="education", value="bachelor")]),
        metadata=srv.md("HRSS"))
    assert e.details().startswith("employer_default: ")  # the employer filing defaults nothing
    filed = own_points(srv, card, employer=EMPLOYER,
                       employer_default=pb.EMPLOYER_DEFAULT_FAILED_TO_FILE)
    application = filed.open_application
    assert (application.filer, application.employer, application.employer_default) == (
        pb.POINTS_FILER_HOLDER, EMPLOYER, pb.EMPLOYER_DEFAULT_FAILED_TO_FILE)


# ---------------------------------------------------------------- RC-12

def special(srv, card, text="the household registration is being checked in Hubei",
            role="PUBLIC_SECURITY"):
    return srv.residence.StateSpecialCircumstances(pb.StateSpecialCircumstancesRequest(
        request_id=rid(), card_number=card, special_circumstances=text), metadata=srv.md(role))


def test_rc_12_special_circumstances_are_stated_after_verification_too(srv):
    """RC-12: "If the Residence Card cannot be made on schedule due to the special
    circumstances, the time limit for the making of the Residence Card shall not exceed 30
    working days": the circumstances may arise after the application was verified, and are
    stated then, up to the 15th working day. Accepted Monday 21 September 2026: 15 working days
    end at 24:00 on 19 October, 30 at 24:00 on 9 November."""
    card, late = (apply(srv, n, pb.PACK_RC).card_number for n in (221, 222))
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=late, approved=True)
    e = error_of(special, srv, card)  # not yet verified: Verify states them
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-12" in e.details()
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    assert [i[1:4] for i in due(srv, 60) if i[0] == card] == [
        ("issue", "RC-12", "2026-10-20T00:00:00+08:00")]
    denied = error_of(special, srv, card, role="COMMUNITY_OUTLET")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    blank = error_of(special, srv, card, text=" ")
    assert blank.details().startswith("special_circumstances: is required")
    set_clock(srv, "2026-10-19T23:59:59+08:00")  # the last second of the 15th working day
    stated = special(srv, card)
    assert stated.state == pb.CARD_STATE_VERIFIED
    assert [i[1:4] for i in due(srv, 60) if i[0] == card] == [
        ("issue", "RC-12", "2026-11-10T00:00:00+08:00")]
    set_clock(srv, "2026-10-20T00:00:00+08:00")  # the first second after it
    e = error_of(special, srv, late)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ended at 24:00 of 2026-10-19" in e.details()
    sh = apply(srv, 223).card_number
    call(srv, "Verify", "CARD_AGENCY", card_number=sh, approved=True)
    e = error_of(special, srv, sh)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-12" in e.details()

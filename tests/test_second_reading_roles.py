"""Issue 24, second reading: who may do what to which card (GZ-6/BJ-7's application locks,
RC-3/RC-11/RC-12/RC-16's public security, GZ-7/GZ-23's channels for every act), the rule each
Residence Card refusal cites, and the rules that had no test named for them (SH-17, RC-3,
RC-11, ...). Each through the gRPC method its caller uses (STYLE.md section 9); the articles'
own words are quoted."""
import grpc
import pytest
import test_law
from test_calls import error_info
from test_law import (
    ORGAN,
    active,
    apply,
    call,
    holder,
    issued,
    reason,
    refused,
)

from yikatong.v1 import yikatong_pb2 as pb

FP, PD = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED


srv = test_law.srv  # the server on the manual clock at START, with its ResidenceCard stub


def service(srv, card) -> str:
    return reason(srv, card, pb.CHANNEL_SERVICE)


# everything any pack's application records (SH-9, GZ-9, RC-7)
FULL = dict(gender="F", nationality="中国", ethnicity="汉族", address="上海市黄浦区中山南路1号",
            postcode="200010")


def applied(srv, n, pack=pb.PACK_SH, role=None) -> str:
    return apply(srv, n, pack, role, holder=holder(n, pack, **FULL)).card_number


# ---------------------------------------------------------------- item 2: application locks

def test_gz_6_application_locks_are_a_bank_service_of_guangzhou_and_beijing_only(srv):
    """GZ-6: "Social security card issuing banks shall provide such services as ...
    application locking and unlocking"; BJ-7 gives Beijing's cooperative banks the same. The
    Shanghai Measures give a Shanghai card's service bank no such service (arts. 7, 14, 20),
    and a Residence Card's uses are the holder's by RC-17 and RC-18, not a bank's to lock: a
    bank switch had locked a Residence Card's legal-aid and compulsory-education services."""
    sh, rc = active(srv, 101, pb.PACK_SH), active(srv, 102, pb.PACK_RC)
    for card, rule in ((sh, "SH-7"), (rc, "RC-17")):
        for role in ("BANK_SWITCH", "BANK_OUTLET"):
            for method in ("LockApplication", "UnlockApplication"):
                e = refused(srv, method, role, card_number=card, channel=pb.CHANNEL_SERVICE)
                assert e.code() == FP, (method, role, e.details())
                assert error_info(e).reason == rule, e.details()
    assert reason(srv, sh) == "UNSPECIFIED" and service(srv, rc) == "UNSPECIFIED"
    # a Guangzhou and a Beijing card still are, at the bank's switch and its outlet
    for n, pack in ((103, pb.PACK_GZ), (104, pb.PACK_BJ)):
        card = active(srv, n, pack)
        call(srv, "LockApplication", "BANK_SWITCH", card_number=card, channel=pb.CHANNEL_MEDICAL)
        assert reason(srv, card) == "APPLICATION_LOCKED"
        call(srv, "UnlockApplication", "BANK_OUTLET", card_number=card,
             channel=pb.CHANNEL_MEDICAL)
        assert reason(srv, card) == "UNSPECIFIED"


# ---------------------------------------------------------------- item 7: who acts on which card

def test_rc_11_rc_12_rc_16_verification_issue_and_cancellation_are_public_security_alone(srv):
    """RC-11: "The public security departments shall make information comparison for the
    application documents"; RC-12: "The Residence Card shall be signed and issued by the
    public security departments"; RC-16: "The public security departments shall cancel the
    Residence Card". Not the card agency (it had verified and issued them), not HRSS (it had
    cancelled them)."""
    card = applied(srv, 111, pb.PACK_RC)
    e = refused(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True)
    assert (e.code(), error_info(e).reason) == (PD, "RC-11"), e.details()
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    e = refused(srv, "Issue", "CARD_AGENCY", card_number=card, issuing_organ=ORGAN)
    assert (e.code(), error_info(e).reason) == (PD, "RC-12"), e.details()
    assert call(srv, "Issue", "PUBLIC_SECURITY", card_number=card,
                issuing_organ=ORGAN).state == pb.CARD_STATE_ACTIVE
    for role in ("CARD_AGENCY", "HRSS"):
        e = refused(srv, "Cancel", role, card_number=card, reason="落户上海",
                    ground=pb.CANCEL_GROUND_PERMANENT_RESIDENCY)
        assert (e.code(), error_info(e).reason) == (PD, "RC-16"), (role, e.details())
    assert service(srv, card) == "UNSPECIFIED"
    assert call(srv, "Cancel", "PUBLIC_SECURITY", card_number=card, reason="落户上海",
                ground=pb.CANCEL_GROUND_PERMANENT_RESIDENCY).state == pb.CARD_STATE_CANCELLED
    # and public security takes none of these acts on a Guangzhou card (API.md; of a
    # Shanghai application it verifies the identity: SH-10, test_law_read_twice)
    sh = applied(srv, 112, pb.PACK_GZ)
    for method, fields in (("Verify", {"approved": True}), ("Issue", {}),
                           ("Cancel", {"reason": "died", "ground": pb.CANCEL_GROUND_DEATH})):
        e = refused(srv, method, "PUBLIC_SECURITY", card_number=sh, **fields)
        assert e.code() == PD, (method, e.details())
        if method == "Verify":
            call(srv, "Verify", "CARD_AGENCY", card_number=sh, approved=True)


def test_rc_3_the_residence_card_is_public_securitys_with_the_community_centres(srv):
    """RC-3: "The public security departments shall be responsible for the residence
    registration and the administration related to the Residence Card ... The community
    service centers ... shall, with the authorization of the public security departments,
    undertake the specific work of residence registration and the handling of Residence
    Card." The card agency takes no act on a Residence Card: it neither renews it (RC-14) nor
    files its changes (RC-13); the community centre and public security do."""
    card = active(srv, 113, pb.PACK_RC)
    renew = pb.RenewRequest(request_id="r", card_number=card)
    change = pb.ChangeInformationRequest(request_id="c", card_number=card,
                                         holder=pb.Holder(residence_address="上海市徐汇区"),
                                         changed_on="2026-09-20")
    for role in ("CARD_AGENCY", "HRSS", "ONLINE_PLATFORM", "BANK_OUTLET"):
        for method, request in (("Renew", renew), ("ChangeInformation", change)):
            with pytest.raises(grpc.RpcError) as e:
                getattr(srv.residence, method)(request, metadata=srv.md(role))
            assert e.value.code() == PD, (role, method)
    filed = srv.residence.ChangeInformation(change, metadata=srv.md("COMMUNITY_OUTLET"))
    assert filed.card.card_number == card and not filed.late
    again = pb.ChangeInformationRequest(request_id="p", card_number=card,
                                        holder=pb.Holder(residence_address="上海市静安区"),
                                        changed_on="2026-09-21")
    assert srv.residence.ChangeInformation(again, metadata=srv.md("PUBLIC_SECURITY")).card \
        .card_number == card


@pytest.mark.parametrize("pack", [pb.PACK_GZ, pb.PACK_BJ])
def test_gz_7_a_community_outlet_takes_no_act_on_a_guangzhou_card(srv, pack):
    """GZ-7: "Applicants may apply for social security cards on the network service platform
    or at the outlets of social security card issuing banks"; GZ-6: the issuing banks
    provide "activation"; GZ-23 the same two for a new card. A Guangzhou card is not handled
    at a Shanghai-style community outlet for any act: not activated there (nor by a hotline),
    nor its electronic card issued there (GZ-35); Beijing follows Guangzhou."""
    card = issued(srv, 114, pack)
    rule = "GZ-7" if pack == pb.PACK_GZ else "BJ via GZ-7"  # BJ cites its own way
    for role in ("COMMUNITY_OUTLET", "SERVICE_HOTLINE"):
        e = refused(srv, "Activate", role, card_number=card)
        assert (e.code(), error_info(e).reason) == (PD, rule), (role, e.details())
    assert call(srv, "Activate", "BANK_OUTLET", card_number=card).state == pb.CARD_STATE_ACTIVE
    e = refused(srv, "IssueElectronic", "COMMUNITY_OUTLET", card_number=card)
    assert (e.code(), error_info(e).reason) == (PD, rule), e.details()
    for role in ("BANK_OUTLET", "ONLINE_PLATFORM"):
        assert call(srv, "IssueElectronic", role, card_number=card).card_number == card
    # a Shanghai card is activated at a community outlet or by the hotline (SH-12)
    for n, role in ((115, "COMMUNITY_OUTLET"), (116, "SERVICE_HOTLINE")):
        assert call(srv, "Activate", role, card_number=issued(srv, n)).state == \
            pb.CARD_STATE_ACTIVE
    assert call(srv, "IssueElectronic", "COMMUNITY_OUTLET", card_number=active(srv, 117)) \
        .card_number


# ---------------------------------------------------------------- item 11: RC refusals cite RC

def test_rc_13_an_rc_applicant_whose_information_differs_is_told_to_file_the_change(srv):
    """RC-13: "In the event that the residence address and other registered information have
    changed, the Card holder shall go through the formalities of information changes at the
    community service center". A Residence Card applicant whose information differs from what
    is held (here, from a Shanghai card) is refused citing the Residence Card's own rule, not
    Guangzhou's GZ-20; a Beijing applicant gets BJ-7 (test_law_read_twice). (An RC
    lock refusal cites RC-17:
    test_gz_6_application_locks_are_a_bank_service_of_guangzhou_and_beijing_only.)"""
    active(srv, 121)  # the holder's information is held from a Shanghai card
    given = holder(121, pb.PACK_RC, **{**FULL, "name": "李娜娜",
                                       "ssn": holder(121, pb.PACK_SH).ssn})
    e = refused_apply(srv, 121, pb.PACK_RC, given)
    assert (e.code(), error_info(e).reason) == (FP, "RC-13"), e.details()
    assert "holder.name differs" in e.details() and "GZ-20" not in e.details()
    active(srv, 122, pb.PACK_GZ)
    e = refused_apply(srv, 122, pb.PACK_BJ, holder(122, pb.PACK_BJ, **{
        **FULL, "name": "王五", "ssn": holder(122, pb.PACK_GZ).ssn}))
    assert (e.code(), error_info(e).reason) == (FP, "BJ-7"), e.details()


def refused_apply(srv, n, pack, given) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        apply(srv, n, pack, holder=given)
    return e.value

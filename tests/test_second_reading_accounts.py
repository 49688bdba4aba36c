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
from test_law import AGENCY, ORGAN, OUTLET, apply, call, holder, rid
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

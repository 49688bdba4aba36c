"""Issue 24, second reading: who may do what to which card (GZ-6/BJ-7's application locks,
RC-3/RC-11/RC-12/RC-16's public security, GZ-7/GZ-23's channels for every act), the rule each
Residence Card refusal cites, and the rules that had no test named for them (SH-17, RC-3,
RC-11, ...). Each through the gRPC method its caller uses (STYLE.md section 9); the articles'
own words are quoted."""
import grpc
import pytest
from test_calls import error_info
from test_law import ORGAN, OUTLET, START, apply, call, holder, reason, refused

from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

FP, PD = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def srv(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        s.residence = rpc.ResidenceCardStub(s.channel)
        yield s


def service(srv, card) -> str:
    return reason(srv, card, pb.CHANNEL_SERVICE)


# the agency that verifies and issues each pack's cards (API.md; RC-11, RC-12)
AGENCY = {pb.PACK_SH: "CARD_AGENCY", pb.PACK_GZ: "CARD_AGENCY", pb.PACK_BJ: "CARD_AGENCY",
          pb.PACK_RC: "PUBLIC_SECURITY"}
# everything any pack's application records (SH-9, GZ-9, RC-7)
FULL = dict(gender="F", nationality="中国", ethnicity="汉族", address="上海市黄浦区中山南路1号",
            postcode="200010")


def applied(srv, n, pack=pb.PACK_SH, role=None) -> str:
    return apply(srv, n, pack, role, holder=holder(n, pack, **FULL)).card_number


def issued(srv, n, pack=pb.PACK_SH) -> str:
    card = applied(srv, n, pack)
    call(srv, "Verify", AGENCY[pack], card_number=card, approved=True)
    call(srv, "Issue", AGENCY[pack], card_number=card,
         issuing_organ=ORGAN if pack == pb.PACK_RC else "")
    return card


def active(srv, n, pack=pb.PACK_SH) -> str:
    card = issued(srv, n, pack)
    if pack != pb.PACK_RC:  # RC: in force once issued
        call(srv, "Activate", OUTLET[pack], card_number=card)
    return card


# ---------------------------------------------------------------- item 2: application locks

def test_gz_6_application_locks_are_a_bank_service_of_guangzhou_and_beijing_only(srv):
    """GZ-6: "Social security card issuing banks shall provide such services as ...
    application locking and unlocking"; BJ-7 gives Beijing's cooperative banks the same. The
    Shanghai Measures give a Shanghai card's service bank no such service (arts. 7, 14, 20),
    and a Residence Card's uses are the holder's by RC-17 and RC-18, not a bank's to lock: a
    bank switch had locked a Residence Card's legal-aid and compulsory-education services."""
    sh, rc = active(srv, 101, pb.PACK_SH), active(srv, 102, pb.PACK_RC)
    for card, rule in ((sh, "GZ-6"), (rc, "RC-17")):
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

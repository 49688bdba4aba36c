"""Issue 25, findings 4, 5 and 6, over a real server: the audit trail shows no identity or
phone number whole in its free texts; every call that touches personal information is audited
whatever its outcome (granted, refused, not found, malformed); and a role that may not read
personal information learns nothing from CorrectHolder's answer, nor writes on a guess."""
import grpc
import pytest
from test_audit import export
from test_e2e import START, holder, new_active_card, rid

from yikatong.server.harness import ServerProcess, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

ID_NUMBER, MOBILE, LANDLINE = "310101198711090032", "13800138000", "021-62345678"
SPOKEN = f"call from {ID_NUMBER} 王伟 {MOBILE}, office {LANDLINE}"


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    s.holders = rpc.HoldersStub(s.channel)
    yield s
    s.stop()


def error_of(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw, timeout=10)
    return e.value


def whole_numbers(events) -> list[str]:
    """Every identity or phone number of SPOKEN found whole in an exported event."""
    return [n for e in events for n in (ID_NUMBER, MOBILE, "62345678") if n in str(e)]


# ---- finding 5: free texts are masked before they are hashed into the chain

def test_free_texts_show_no_identity_or_phone_number_whole(srv):
    """A purpose, a correction's reason and a credit record's evidence that quote a caller's
    identity and phone numbers are exported masked in `holder`'s style; the chain verifies."""
    card = new_active_card(srv, 1)
    srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose=SPOKEN),
                          metadata=metadata("CARD_AGENCY"), timeout=10)
    srv.holders.CorrectHolder(pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(1).ssn, postcode="200001"),
        reason=SPOKEN), metadata=metadata("CARD_AGENCY"), timeout=10)
    srv.holders.RecordCredit(pb.RecordCreditRequest(
        request_id=rid(), card_number=card, ground=pb.CREDIT_GROUND_LENDING_CARD,
        evidence_ref=SPOKEN, illegal_gain=True), metadata=metadata("PUBLIC_SECURITY"),
        timeout=10)
    events = [e for e in export(srv) if e.method.startswith("Holders.")]
    assert [e.method for e in events] == [
        "Holders.GetHolder", "Holders.CorrectHolder", "Holders.RecordCredit"]
    assert whole_numbers(events) == []
    masked = "call from 3101**********0032 王伟 138****8000, office 021-****5678"
    assert [e.purpose for e in events] == [masked] * 3
    verified = rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(),
                                                 metadata=metadata("AUDITOR"), timeout=10)
    assert verified.ok and verified.first_bad_sequence == 0

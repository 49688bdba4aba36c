"""Issue 25, findings 4, 5 and 6, over a real server: the audit trail shows no identity or
phone number whole in its free texts; every call that touches personal information is audited
whatever its outcome (granted, refused, not found, malformed); and a role that may not read
personal information learns nothing from CorrectHolder's answer, nor writes on a guess."""
import time

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


# ---- finding 6: a GetHolder refused as malformed is audited, bounded, echoing nothing

def counts(events, method: str) -> dict[tuple[str, str, str], int]:
    """(role, outcome, purpose) -> calls, over the events of `method` (refused calls are
    written once a second, one event per kind with its count)."""
    out: dict[tuple[str, str, str], int] = {}
    for e in events:
        if e.method == method:
            key = (e.role, e.outcome, e.purpose)
            out[key] = out.get(key, 0) + max(e.count, 1)
    return out


def exported_when(srv, predicate, timeout: float = 10.0) -> list[pb.AuditEvent]:
    """The trail once `predicate(events)` holds (refused calls are written within a
    second), or the last export if it never does within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        events = export(srv)
        if predicate(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


def test_a_get_holder_refused_as_malformed_is_audited_without_its_input(srv):
    """API.md: GetHolder "Every call, granted or refused, writes an audit event": a missing
    purpose, one with control characters, one of 1 MB, a malformed ssn and bytes that are no
    request each leave an event naming the refusal's code and field, never the text sent."""
    card = new_active_card(srv, 2)
    get = srv.holders.GetHolder
    big = "查" * (1024 * 1024 // 3)  # 1 MB of UTF-8
    malformed = [pb.GetHolderRequest(card_number=card),
                 pb.GetHolderRequest(card_number=card, purpose="case\x1b[2J 7"),
                 pb.GetHolderRequest(card_number=card, purpose=big),
                 pb.GetHolderRequest(ssn="310101198711090031", purpose="case 8")]  # check digit
    for request in malformed:
        e = error_of(get, request, metadata=metadata("CARD_AGENCY"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = srv.channel.unary_unary("/yikatong.v1.Holders/GetHolder")
    e = error_of(raw, b"\x0a\x05\xff\xfe\xfd\xfc\xfb", metadata=metadata("CARD_AGENCY"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    want = {("CARD_AGENCY", "INVALID_ARGUMENT", "refused: INVALID_FIELD purpose"): 3,
            ("CARD_AGENCY", "INVALID_ARGUMENT", "refused: INVALID_FIELD ssn"): 1,
            ("CARD_AGENCY", "INVALID_ARGUMENT", "refused: INVALID_FIELD request"): 1}
    events = exported_when(srv, lambda es: counts(es, "Holders.GetHolder") == want)
    assert counts(events, "Holders.GetHolder") == want
    texts = [str(e) for e in events if e.method == "Holders.GetHolder"]
    assert all(len(t) < 1024 for t in texts)
    assert not any("查查" in t or "\x1b" in t or "310101198711090031" in t for t in texts)


# ---- finding 4: no existence oracle for a role that may not read PII; every outcome audited

def test_correct_holder_tells_a_role_that_may_not_read_pii_nothing_and_writes_no_guess(srv):
    """ONLINE_PLATFORM corrects the postcode of its own user (ssn and card known): done. The
    same call with guessed ssns (one of them a real holder's, whose card it does not name) is
    answered exactly alike, corrects nothing, and each guess is in the audit trail."""
    mine = new_active_card(srv, 3, postcode="200001")
    new_active_card(srv, 4, postcode="200002")  # someone else's: the guess that hits

    def correct(ssn: str, card: str = mine, postcode: str = "200999"):
        return srv.holders.CorrectHolder(pb.CorrectHolderRequest(
            request_id=rid(), holder=pb.Holder(ssn=ssn, postcode=postcode), card_number=card,
            reason="filed online by the holder"), metadata=metadata("ONLINE_PLATFORM"),
            timeout=10)

    guesses = [holder(n).ssn for n in range(4, 24)]  # holder 4 exists, the rest do not
    for ssn in guesses:
        assert correct(ssn) == pb.HolderRecord(holder=pb.Holder(ssn=ssn, postcode="200999"))
    assert correct(holder(3).ssn, postcode="200003") == pb.HolderRecord(
        holder=pb.Holder(ssn=holder(3).ssn, postcode="200003"))

    def postcode(n: int) -> str:
        return srv.holders.GetHolder(pb.GetHolderRequest(ssn=holder(n).ssn, purpose="check"),
                                     metadata=metadata("CARD_AGENCY"), timeout=10
                                     ).holder.postcode
    assert (postcode(3), postcode(4)) == ("200003", "200002")  # the guess wrote nothing
    no_card = error_of(srv.holders.CorrectHolder, pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(4).ssn, postcode="200999"),
        reason="guess"), metadata=metadata("ONLINE_PLATFORM"))
    assert no_card.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_card.details() == "card_number: is required"
    events = [e for e in exported_when(srv, lambda es: counts(es, "Holders.CorrectHolder").get(
        ("ONLINE_PLATFORM", "INVALID_ARGUMENT", "refused: INVALID_FIELD card_number")))
        if e.method == "Holders.CorrectHolder"]
    assert [(e.outcome, e.holder, e.card_number) for e in events[:len(guesses) + 1]] == [
        ("NOT_FOUND", f"{s[:4]}**********{s[-4:]}", mine) for s in guesses] + [
        ("OK", f"{holder(3).ssn[:4]}**********{holder(3).ssn[-4:]}", mine)]
    assert (events[-1].outcome, events[-1].purpose) == (
        "INVALID_ARGUMENT", "refused: INVALID_FIELD card_number")


def test_a_pii_reader_is_told_not_found_and_every_miss_is_audited(srv):
    """A role that may read PII is told NOT_FOUND (it may read the holder anyway, audited);
    its misses of CorrectHolder and RecordCredit, a refusal by a rule, and malformed calls
    of RecordCredit and GetPoints each leave an event."""
    card = new_active_card(srv, 5)
    stranger = holder(99).ssn
    miss = error_of(srv.holders.CorrectHolder, pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=stranger, postcode="200999"), reason="typo"),
        metadata=metadata("CARD_AGENCY"))
    assert miss.code() == grpc.StatusCode.NOT_FOUND
    wrong_card = error_of(srv.holders.CorrectHolder, pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(6).ssn, postcode="200999"),
        card_number=card, reason="typo"), metadata=metadata("CARD_AGENCY"))
    assert wrong_card.code() == grpc.StatusCode.NOT_FOUND

    def credit(role="PUBLIC_SECURITY", **fields):
        return error_of(srv.holders.RecordCredit, pb.RecordCreditRequest(
            request_id=rid(), evidence_ref="黄浦公安 2026-0412", **fields),
            metadata=metadata(role))
    assert credit(ssn=stranger, ground=pb.CREDIT_GROUND_FORGED_CARD).code() == \
        grpc.StatusCode.NOT_FOUND
    assert credit(card_number="310099999999", ground=pb.CREDIT_GROUND_FORGED_CARD).code() == \
        grpc.StatusCode.NOT_FOUND
    assert credit(card_number=card, ground=pb.CREDIT_GROUND_LENDING_CARD).code() == \
        grpc.StatusCode.FAILED_PRECONDITION  # SH-26: no illegal gain stated
    assert credit(card_number=card, ground=9).code() == grpc.StatusCode.INVALID_ARGUMENT
    points = error_of(rpc.ResidenceCardStub(srv.channel).GetPoints, pb.GetPointsRequest(
        card_number="12ab", purpose="review"), metadata=metadata("HRSS"))
    assert points.code() == grpc.StatusCode.INVALID_ARGUMENT
    masked = f"{stranger[:4]}**********{stranger[-4:]}"

    def complete(events) -> bool:
        return ("HRSS", "INVALID_ARGUMENT", "refused: INVALID_FIELD card_number") in counts(
            events, "ResidenceCard.GetPoints") and ("PUBLIC_SECURITY", "INVALID_ARGUMENT",
                                                    "refused: INVALID_FIELD ground") in counts(
            events, "Holders.RecordCredit")
    events = exported_when(srv, complete)
    assert [(e.outcome, e.holder, e.card_number, e.purpose) for e in events
            if e.method == "Holders.CorrectHolder"] == [
        ("NOT_FOUND", masked, "", "typo"),
        ("NOT_FOUND", f"{holder(6).ssn[:4]}**********{holder(6).ssn[-4:]}", card, "typo")]
    assert [(e.outcome, e.holder, e.card_number, e.purpose) for e in events
            if e.method == "Holders.RecordCredit"] == [
        ("NOT_FOUND", masked, "", "黄浦公安 2026-0412"),
        ("NOT_FOUND", "", "310099999999", "黄浦公安 2026-0412"),
        ("FAILED_PRECONDITION", "", card, "黄浦公安 2026-0412"),
        ("INVALID_ARGUMENT", "", "", "refused: INVALID_FIELD ground")]
    assert complete(events)

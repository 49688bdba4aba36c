"""Personal information (SPEC.md section 7, GZ-9b, GZ-20): read for a stated purpose by the
roles API.md allows, corrected with every old value kept, never learned through Apply by a
role that may not read it, and never in an authorization, status or feed answer."""
import time

import grpc
import pytest
from test_audit import export
from test_e2e import START, holder, new_active_card, rid

from yikatong.clock import parse_time
from yikatong.model import PII_FIELDS
from yikatong.server.harness import ServerProcess, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    s.holders = rpc.HoldersStub(s.channel)
    yield s
    s.stop()


def error_of(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def test_get_holder_needs_a_purpose_and_a_role_that_may_read(srv):
    card = new_active_card(srv, 1, name="欧阳明日")
    no_purpose = error_of(srv.holders.GetHolder, pb.GetHolderRequest(card_number=card),
                          metadata=metadata("CARD_AGENCY"))
    assert no_purpose.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_purpose.details() == "purpose: is required: why the personal information is read"
    gate = error_of(srv.holders.GetHolder, pb.GetHolderRequest(card_number=card, purpose="x"),
                    metadata=metadata("TRANSIT_GATE"))
    assert gate.code() == grpc.StatusCode.PERMISSION_DENIED
    for role in ("CARD_AGENCY", "HRSS", "PUBLIC_SECURITY", "COMMUNITY_OUTLET"):
        by_card = srv.holders.GetHolder(pb.GetHolderRequest(
            card_number=card, purpose=f"case of {role}"), metadata=metadata(role))
        assert by_card.holder.name == "欧阳明日" and by_card.holder.ssn == holder(1).ssn
    by_ssn = srv.holders.GetHolder(pb.GetHolderRequest(ssn=holder(1).ssn, purpose="claim"),
                                   metadata=metadata("HRSS"))
    assert by_ssn.holder == by_card.holder
    missing = error_of(srv.holders.GetHolder, pb.GetHolderRequest(
        ssn=holder(99).ssn, purpose="fishing"), metadata=metadata("HRSS"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    events = [(e.method, e.role, e.purpose, e.outcome) for e in export(srv)
              if e.method == "Holders.GetHolder"]
    assert ("Holders.GetHolder", "HRSS", "fishing", "NOT_FOUND") in events  # refused: audited
    assert ("Holders.GetHolder", "PUBLIC_SECURITY", "case of PUBLIC_SECURITY", "OK") in events


def test_gz_20_a_correction_keeps_every_old_value_with_who_when_and_why(srv):
    card = new_active_card(srv, 2, phone="13800000001")
    corrected = srv.holders.CorrectHolder(pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(2).ssn, phone="13900000002"),
        reason="the holder's new number"), metadata=metadata("CARD_AGENCY"))
    assert corrected.holder.phone == "13900000002" and corrected.holder.name == "王芳"
    record = srv.holders.GetHolder(pb.GetHolderRequest(
        card_number=card, purpose="review", with_history=True), metadata=metadata("CARD_AGENCY"))
    assert record.holder.phone == "13900000002"
    (change,) = record.history
    assert (change.field, change.old_value, change.new_value, change.client_id, change.method,
            change.reason) == ("phone", "13800000001", "13900000002", "card_agency",
                               "Holders.CorrectHolder", "the holder's new number")
    without = srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="review"),
                                    metadata=metadata("CARD_AGENCY"))
    assert not without.history


def test_a_correction_by_a_role_that_may_not_read_pii_shows_only_what_it_sent(srv):
    card = new_active_card(srv, 3, name="司马青云", phone="13800000003")
    answer = srv.holders.CorrectHolder(pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(3).ssn, phone="13900000003"),
        card_number=card, reason="filed online by the holder"),  # issue 25: its card too
        metadata=metadata("ONLINE_PLATFORM"))
    assert answer.holder == pb.Holder(ssn=holder(3).ssn, phone="13900000003")


def apply(srv, role, n, pack=pb.PACK_SH, **kw):
    h = holder(n, **kw)
    h.household_registered = h.insured = True
    return srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pack, holder=h,
                                               service_bank="ICBC"), metadata=metadata(role))


def test_apply_is_no_pii_oracle_for_a_role_that_may_not_read_pii(srv):
    card = new_active_card(srv, 4, name="诸葛春风")
    # a guessed name: told it differs, not which field, not the value held
    guess = error_of(apply, srv, "ONLINE_PLATFORM", 4, pack=pb.PACK_GZ, name="诸葛秋雨")
    assert guess.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "name" not in guess.details() and "诸葛" not in guess.details()
    assert guess.details().endswith("the personal information given differs from the "
                                    "information held; file a correction "
                                    "(Holders.CorrectHolder) instead")
    # an SSN's card number: not told
    again = error_of(apply, srv, "BANK_OUTLET", 4, name="诸葛春风")
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and card not in again.details()
    # a role that may read PII is told which field and which card
    told = error_of(apply, srv, "COMMUNITY_OUTLET", 4, name="诸葛春风")
    assert card in told.details()


def test_planted_values_are_in_the_history_and_a_correction_repairs_them(srv):
    """Someone applies for a Guangzhou card in a holder's name with a phone of their own
    choosing (the holder's field was empty): the fill is kept in the holder's history with
    who did it; the agency corrects it; the holder's own application, with the real phone,
    then goes through (it was refused as differing from the planted one)."""
    new_active_card(srv, 5, phone="")
    apply(srv, "ONLINE_PLATFORM", 5, pack=pb.PACK_GZ, phone="13999999999")
    refused = error_of(apply, srv, "BANK_OUTLET", 5, pack=pb.PACK_BJ, phone="13800000005")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION  # the planted value stands
    record = srv.holders.GetHolder(pb.GetHolderRequest(
        ssn=holder(5).ssn, purpose="complaint 7", with_history=True),
        metadata=metadata("CARD_AGENCY"))
    fills = {c.field: (c.old_value, c.new_value, c.client_id, c.method) for c in record.history}
    assert fills["phone"] == ("", "13999999999", "online_platform", "Lifecycle.Apply")
    srv.holders.CorrectHolder(pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=holder(5).ssn, phone="13800000005"),
        reason="complaint 7: the phone was not the holder's"), metadata=metadata("CARD_AGENCY"))
    record = srv.holders.GetHolder(pb.GetHolderRequest(
        ssn=holder(5).ssn, purpose="complaint 7", with_history=True),
        metadata=metadata("CARD_AGENCY"))
    assert record.holder.phone == "13800000005"
    assert [c.new_value for c in record.history if c.field == "phone"] == [
        "13999999999", "13800000005"]
    assert apply(srv, "BANK_OUTLET", 5, pack=pb.PACK_BJ, phone="13800000005").state == \
        pb.CARD_STATE_APPLIED
    assert any(e.method == "Holders.CorrectHolder" for e in export(srv))


def record_credit(srv, role="PUBLIC_SECURITY", **fields):
    return srv.holders.RecordCredit(pb.RecordCreditRequest(request_id=rid(), **fields),
                                    metadata=metadata(role))


def test_sh_26_lending_a_card_is_a_credit_record_read_with_the_holder(srv):
    """SH-26: "the information about the dishonesty shall be recorded": on the holder, with
    who recorded it, when, and the evidence; read back only with the holder's information
    (a stated purpose, audited)."""
    card = new_active_card(srv, 6)
    record = record_credit(srv, card_number=card, ground=pb.CREDIT_GROUND_LENDING_CARD,
                           evidence_ref="黄浦公安 2026-0412", illegal_gain=True)  # 牟取非法利益
    assert (record.rule, record.client_id, record.serious, record.points_barred_until) == (
        "SH-26", "public_security", False, 0)
    read = srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="case 0412"),
                                 metadata=metadata("CARD_AGENCY"))
    assert list(read.credit_records) == [record]
    serious = error_of(record_credit, srv, card_number=card, ground=pb.CREDIT_GROUND_FRAUD,
                       evidence_ref="x", serious=True)
    assert serious.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert serious.details().startswith("serious: only a forgery of documents (RC-29)")
    no_evidence = error_of(record_credit, srv, card_number=card,
                           ground=pb.CREDIT_GROUND_FRAUD, evidence_ref=" ")
    assert no_evidence.details().startswith("evidence_ref: is required")
    gate = error_of(record_credit, srv, "TRANSIT_GATE", card_number=card,
                    ground=pb.CREDIT_GROUND_FRAUD, evidence_ref="x")
    assert gate.code() == grpc.StatusCode.PERMISSION_DENIED
    events = [(e.method, e.purpose) for e in export(srv)
              if e.method == "Holders.RecordCredit" and e.outcome == "OK"]  # refusals too
    assert events == [("Holders.RecordCredit", "黄浦公安 2026-0412")]


def test_rc_29_a_serious_forgery_bars_points_applications_for_3_years(srv):
    """RC-29: "In serious cases, they shall not apply for points within three years": marked
    serious, the record bars points applications to 24:00 of the corresponding day three years
    on (recorded 24 November 2026: to 24:00 on 24 November 2029)."""
    new_active_card(srv, 7)
    record = record_credit(srv, "HRSS", ssn=holder(7).ssn,
                           ground=pb.CREDIT_GROUND_FORGED_DOCUMENTS,
                           evidence_ref="人社 2026-77", serious=True)
    assert record.rule == "RC-29" and record.serious
    assert record.points_barred_until == parse_time("2029-11-25T00:00:00+08:00")
    missing = error_of(record_credit, srv, ssn=holder(98).ssn,
                       ground=pb.CREDIT_GROUND_FORGED_DOCUMENTS, evidence_ref="x")
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_sh_4_gz_17_bj_4_the_personal_information_kept_is_given_back_whole(srv):
    """SH-4, GZ-17, BJ-4: name, gender, ethnicity, nationality, date of birth, photo (its
    hash), address and postcode, phone, occupation are kept with the card application, and
    a reader with a purpose gets every one back."""
    fields = dict(name="欧阳明日", gender="M", ethnicity="汉", nationality="CN",
                  birth_date="1985-03-15", photo_sha256="ab" * 32, address="上海市黄浦区1号",
                  postcode="200001", phone="13800000008", occupation="engineer")
    card = new_active_card(srv, 8, **fields)
    held = srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="audit 8"),
                                 metadata=metadata("CARD_AGENCY")).holder
    assert {f: getattr(held, f) for f in fields} == fields


def test_sh_25_gz_16_bj_11_rc_26_personal_information_is_confidential(srv):
    """SH-25, GZ-16, BJ-11, RC-26: no disclosure, no unlawful inquiry. A card's status and
    an authorization name nothing of the holder; reading the holder needs a role allowed to
    and a purpose, and leaves an audit event either way."""
    card = new_active_card(srv, 9, name="上官秋月")
    status = srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                                  metadata=metadata("BANK_SWITCH"))
    assert "上官秋月" not in str(status) and holder(9).ssn not in str(status)
    for role in ("BANK_SWITCH", "TRANSIT_GATE", "ONLINE_PLATFORM", "BANK_OUTLET"):
        e = error_of(srv.holders.GetHolder, pb.GetHolderRequest(card_number=card, purpose="?"),
                     metadata=metadata(role))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, role
    e = error_of(srv.holders.GetHolder, pb.GetHolderRequest(card_number=card),
                 metadata=metadata("PUBLIC_SECURITY"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT  # no purpose, no read
    srv.holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="case 9"),
                          metadata=metadata("PUBLIC_SECURITY"))
    time.sleep(1.5)  # refused reads are written once a second
    outcomes = sorted((e.role, e.outcome) for e in export(srv)
                      if e.method == "Holders.GetHolder")
    assert ("PUBLIC_SECURITY", "OK") in outcomes
    assert {r for r, o in outcomes if o == "PERMISSION_DENIED"} == {
        "BANK_SWITCH", "TRANSIT_GATE", "ONLINE_PLATFORM", "BANK_OUTLET"}


def test_authorization_status_and_feed_messages_carry_no_pii():
    """Every field of every message an authorization, status or change-feed answer is made
    of, walked recursively: none is a PII field, none is a Holder."""
    def fields(descriptor, seen=()):
        for f in descriptor.fields:
            yield f
            if f.message_type is not None and f.message_type not in seen:
                yield from fields(f.message_type, (*seen, descriptor))

    answers = [pb.AuthorizeResponse, pb.AuthorizeBatchResponse, pb.CardStatusResponse,
               pb.GetStatusBatchResponse, pb.ChangeEvent]
    for message in answers:
        for f in fields(message.DESCRIPTOR):
            assert f.name not in PII_FIELDS + ("ssn",), (message.__name__, f.name)
            assert f.message_type is not pb.Holder.DESCRIPTOR, (message.__name__, f.name)

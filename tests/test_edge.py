"""Defects found by review and adversarial probing, each through the gRPC path a caller
takes: identity before validation, byte limits of stored ids, text that reads otherwise than
it is stored, holds resolved only by whoever placed them, a clock that cannot overflow, rich
error details, the access log, owner-only data files."""
import json
import os
import stat
import uuid

import grpc
import pytest
from test_calls import bad_request, error_info
from test_e2e import START, holder, new_active_card, ssn
from test_money_e2e import error_of, holder_ref, top_up

from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running(tmp_path_factory.mktemp("edge"), "--clock", "manual",
                 "--clock-start", START) as s:
        yield s


# Malformed on purpose: identity must be refused before any field is looked at.
BAD_FIELDS = {
    "Issue": pb.IssueRequest(request_id="", card_number="not digits"),
    "Verify": pb.VerifyRequest(request_id="", card_number="x", reason="\0"),
    "Cancel": pb.CancelRequest(request_id="", card_number="x"),
    "Replace": pb.ReplaceRequest(request_id="", card_number="x", reason=99),
    "OpenFinancial": pb.OpenFinancialRequest(request_id="", card_number="x", bank=""),
    "LockApplication": pb.LockApplicationRequest(request_id="", card_number="x", channel=99),
    "UnlockApplication": pb.UnlockApplicationRequest(request_id="", card_number="x"),
    "Apply": pb.ApplyRequest(request_id="", pack=99),
}


@pytest.mark.parametrize("method", sorted(BAD_FIELDS))
def test_identity_is_checked_before_any_field(srv, method):
    call = getattr(srv.lifecycle, method)
    none = error_of(call, BAD_FIELDS[method])
    assert none.code() == grpc.StatusCode.UNAUTHENTICATED
    forged = error_of(call, BAD_FIELDS[method], metadata=(("authorization", "Bearer nope"),))
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED
    gate = error_of(call, BAD_FIELDS[method], metadata=srv.md("TRANSIT_GATE"))
    assert gate.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(gate).reason == "ROLE_NOT_ALLOWED"


def test_a_64_character_cjk_request_id_is_refused_naming_the_byte_limit(srv):
    card = new_active_card(srv, 31)
    cjk = "挂" * 64  # 64 characters, 192 bytes of UTF-8
    for call, request, role in (
            (srv.lifecycle.ReportLoss, pb.ReportLossRequest(request_id=cjk, card_number=card),
             "ONLINE_PLATFORM"),
            (srv.ledger.Transfer, pb.TransferRequest(
                transfer_id=cjk, debit=pb.AccountRef(operator="op:topup"),
                credit=holder_ref(card), amount_fen=100), "CARD_AGENCY"),
            (srv.authorization.Authorize, pb.AuthorizeRequest(
                request_id=cjk, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=1),
             "TRANSIT_GATE")):
        error = error_of(call, request, metadata=srv.md(role))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "192 bytes" in error.details() and "at most 64 bytes" in error.details()
        (violation,) = bad_request(error).field_violations
        assert violation.field in ("request_id", "transfer_id")
    assert "挂" * 21 == cjk[:21]  # 63 bytes: allowed, and read back whole
    tid = "挂" * 21
    top_up(srv, card, 100, tid=tid)
    hold = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id="挂" * 20 + "ab", card_number=card, channel=pb.CHANNEL_TRANSIT,
        amount_fen=50, phase=pb.PHASE_HOLD), metadata=srv.md("TRANSIT_GATE"))
    assert hold.decision == pb.DECISION_APPROVED
    post = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=uuid.uuid4().hex, card_number=card, channel=pb.CHANNEL_TRANSIT,
        phase=pb.PHASE_POST, hold_request_id="挂" * 20 + "ab"), metadata=srv.md("TRANSIT_GATE"))
    assert post.available_fen == 50


@pytest.mark.parametrize("bad", ["a\0b", "line\nbreak", "tab\there", "abc\u202edcba",
                                 "x\u2066y", "del\x7f"])
def test_request_ids_refuse_control_and_bidi_characters(srv, bad):
    error = error_of(srv.lifecycle.Issue, pb.IssueRequest(request_id=bad, card_number="1"),
                     metadata=srv.md("CARD_AGENCY"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request_id:")


def test_a_replay_carrying_an_unknown_field_gets_the_first_answer(srv):
    card = new_active_card(srv, 32)
    request = pb.ReportLossRequest(request_id="loss-unknown-1", card_number=card)
    first = srv.lifecycle.ReportLoss(request, metadata=srv.md("ONLINE_PLATFORM"))
    # a newer client's field 99 (varint 7), which this server does not know
    with_unknown = request.SerializeToString() + bytes([0x98, 0x06, 0x07])
    call = srv.channel.unary_unary("/yikatong.v1.Lifecycle/ReportLoss")
    again = pb.Card.FromString(call(with_unknown, metadata=srv.md("ONLINE_PLATFORM")))
    assert again == first
    other = error_of(srv.lifecycle.ReportLoss, pb.ReportLossRequest(
        request_id="loss-unknown-1", card_number=new_active_card(srv, 33)),
        metadata=srv.md("ONLINE_PLATFORM"))
    assert other.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(other).reason == "ID_REUSED"


def test_a_gate_cannot_void_a_hold_a_bank_switch_placed_on_the_same_purse(srv):
    card = new_active_card(srv, 34)
    top_up(srv, card, 1000)
    srv.ledger.Transfer(pb.TransferRequest(
        transfer_id="bank-hold-34", debit=holder_ref(card), credit=pb.AccountRef(
            operator="op:bank"), amount_fen=700, phase=pb.PHASE_HOLD, timeout_seconds=3600),
        metadata=srv.md("BANK_SWITCH"))
    void = error_of(srv.authorization.Authorize, pb.AuthorizeRequest(
        request_id="gate-void-34", card_number=card, channel=pb.CHANNEL_TRANSIT,
        phase=pb.PHASE_VOID, hold_request_id="bank-hold-34"), metadata=srv.md("TRANSIT_GATE"))
    assert void.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(void).reason == "PENDING_TRANSFER_NOT_YOURS"
    # the card agency may move money too, but did not place this hold either
    agency = error_of(srv.ledger.Transfer, pb.TransferRequest(
        transfer_id="agency-void-34", pending_id="bank-hold-34", phase=pb.PHASE_VOID),
        metadata=srv.md("CARD_AGENCY"))
    assert error_info(agency).reason == "PENDING_TRANSFER_NOT_YOURS"
    srv.ledger.Transfer(pb.TransferRequest(  # whoever placed it resolves it
        transfer_id="bank-void-34", pending_id="bank-hold-34", phase=pb.PHASE_VOID),
        metadata=srv.md("BANK_SWITCH"))


def test_the_clock_cannot_overflow_and_the_server_keeps_answering(srv):
    for seconds in (2**63 - 1, 10**12):
        error = error_of(srv.admin.AdvanceClock, pb.AdvanceClockRequest(seconds=seconds),
                         metadata=srv.md("ADMIN"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "past its end, 2200-01-01T00:00:00+08:00" in error.details()
    error = error_of(srv.admin.SetClock, pb.SetClockRequest(time="9999-12-31T23:59:59+00:00"),
                     metadata=srv.md("ADMIN"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    now = srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=0), metadata=srv.md("ADMIN"))
    assert now.time.startswith("2026-")
    assert srv.status.GetStatus(pb.GetStatusRequest(card_number="1"),
                                metadata=srv.md("BANK_SWITCH")).found is False


def test_refusals_carry_a_stable_reason_and_the_field(srv):
    card = new_active_card(srv, 35)
    hotline = error_of(srv.lifecycle.ReportLoss, pb.ReportLossRequest(
        request_id=uuid.uuid4().hex, card_number=card), metadata=srv.md("SERVICE_HOTLINE"))
    assert hotline.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(hotline).reason == "SH-18c"
    issue = error_of(srv.lifecycle.Issue, pb.IssueRequest(
        request_id=uuid.uuid4().hex, card_number=card), metadata=srv.md("CARD_AGENCY"))
    assert issue.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(issue).reason == "SH-11" and error_info(issue).domain == "yikatong.v1"
    funds = error_of(srv.ledger.Transfer, pb.TransferRequest(
        transfer_id=uuid.uuid4().hex, debit=holder_ref(card), credit=pb.AccountRef(
            operator="op:x"), amount_fen=10**9), metadata=srv.md("CARD_AGENCY"))
    assert error_info(funds).reason == "EXCEEDS_CREDITS"
    missing = error_of(srv.status.GetStatus, pb.GetStatusRequest(card_number="12ab"),
                       metadata=srv.md("BANK_SWITCH"))
    assert error_info(missing).reason == "INVALID_FIELD"
    (violation,) = bad_request(missing).field_violations
    assert violation.field == "card_number" and violation.description
    batch = error_of(srv.authorization.AuthorizeBatch, pb.AuthorizeBatchRequest(requests=[
        pb.AuthorizeRequest(request_id="a", card_number=card, channel=pb.CHANNEL_TRANSIT),
        pb.AuthorizeRequest(request_id="b", card_number="x", channel=pb.CHANNEL_TRANSIT)]),
        metadata=srv.md("TRANSIT_GATE"))
    assert bad_request(batch).field_violations[0].field == "requests[1].card_number"
    unknown = error_of(srv.lifecycle.GetCard, pb.GetCardRequest(card_number="99"),
                       metadata=srv.md("CARD_AGENCY"))
    assert error_info(unknown).reason == "CARD_NOT_FOUND"


def test_every_call_is_one_access_log_line_without_pii(tmp_path):
    name, number = "欧阳明日", ssn(36)
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        card = new_active_card(s, 36, name=name)
        s.lifecycle.GetCard(pb.GetCardRequest(card_number=card), metadata=s.md("CARD_AGENCY"))
        error_of(s.lifecycle.GetCard, pb.GetCardRequest(card_number=card))
        assert holder(36, name=name).ssn == number
    output = s.output()  # after the server stopped: every line written
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["logger"] == "yikatong.access"]
    # new_active_card: Apply, Verify, Issue, Activate; then GetCard twice
    assert [c["method"] for c in calls] == ["Lifecycle.Apply", "Lifecycle.Verify",
                                            "Lifecycle.Issue", "Lifecycle.Activate",
                                            "Lifecycle.GetCard", "Lifecycle.GetCard"]
    assert calls[0]["role"] == "COMMUNITY_OUTLET" and calls[0]["code"] == "OK"
    assert calls[-1]["code"] == "UNAUTHENTICATED" and calls[-1]["client"] == ""
    assert all(isinstance(c["ms"], float) and c["client"] != "" for c in calls[:-1])
    for secret in (name, number, number[6:14]):  # name, SSN, birth date inside it
        assert secret not in output


def test_data_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
            new_active_card(s, 37)
            data = s.data_dir
            modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in (
                data, os.path.join(data, "lmdb"), os.path.join(data, "yikatong.lock"),
                os.path.join(data, "lmdb", "data.mdb"), os.path.join(data, "lmdb", "lock.mdb"))}
    finally:
        os.umask(old)
    assert modes == {path: (0o700 if os.path.isdir(path) else 0o600) for path in modes}


def test_a_request_id_belongs_to_the_client_that_sent_it(srv):
    """Another client replaying the same request under the same id does not get the answer,
    nor the work its own role could not do (GZ-7: a community outlet may not apply for GZ)."""
    h = holder(39, ssn=ssn(39, "440103"), household_registered=True)
    request = pb.ApplyRequest(request_id="gz-apply-39", pack=pb.PACK_GZ, holder=h,
                              service_bank="ICBC")
    first = srv.lifecycle.Apply(request, metadata=srv.md("BANK_OUTLET"))
    assert srv.lifecycle.Apply(request, metadata=srv.md("BANK_OUTLET")) == first
    other = error_of(srv.lifecycle.Apply, request, metadata=srv.md("COMMUNITY_OUTLET"))
    assert other.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(other).reason == "ID_REUSED" and first.card_number not in other.details()


def test_an_unknown_method_path_is_unimplemented_and_writes_nothing_into_the_log(tmp_path):
    forged = ('{"time": "2026-01-01T00:00:00.000+00:00", "level": "info", "logger": '
              '"yikatong.access", "msg": "call", "method": "Ledger.Transfer", "client": "x", '
              '"role": "CARD_AGENCY", "code": "OK", "ms": 1.0}')
    with running(tmp_path) as s:
        raw = s.channel.unary_unary('/yikatong.v1.Admin/SetClock"}\n' + forged + '\n{"x": "',
                                    request_serializer=lambda m: m,
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert forged not in s.output() and '"client": "x"' not in s.output()


@pytest.mark.parametrize("bad", ["a\u2028b", "zero\u200bwidth", "bom\ufeff"])
def test_request_ids_refuse_separators_and_invisible_characters(srv, bad):
    error = error_of(srv.lifecycle.Issue, pb.IssueRequest(request_id=bad, card_number="1"),
                     metadata=srv.md("CARD_AGENCY"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dates_are_yyyy_mm_dd_only(srv):
    h = holder(40, birth_date="2026-W01-1", household_registered=True)
    error = error_of(srv.lifecycle.Apply, pb.ApplyRequest(
        request_id=uuid.uuid4().hex, pack=pb.PACK_SH, holder=h),
        metadata=srv.md("COMMUNITY_OUTLET"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("holder.birth_date")

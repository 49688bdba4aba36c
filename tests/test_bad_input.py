"""Bad input, table-driven, for every method: each malformed request gets the right status
and a message naming the field; the server stays up; the store is unchanged (a digest of
every key and value, before and after)."""
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_e2e import START, new_active_card

from yikatong import config
from yikatong.cards import ssn_check_digit
from yikatong.server.harness import running, store_digest
from yikatong.v1 import yikatong_pb2 as pb

IA, FP, RE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED)
CARD = "@card"  # replaced by a real active card
LONG = "9" * (config.card_number_length_max + 1)
HOLDER = pb.AccountRef(holder=pb.HolderAccountRef(card_number=CARD, kind=pb.ACCOUNT_KIND_TRANSIT))
TOPUP = pb.AccountRef(operator="op:topup")


def auth(**kw):
    fields = dict(request_id="r1", card_number=CARD, channel=pb.CHANNEL_TRANSIT)
    fields.update(kw)
    return pb.AuthorizeRequest(**fields)


def holder(**kw):
    fields = dict(ssn="31010119800101001" + ssn_check_digit("31010119800101001"), name="x",
                  birth_date="1980-01-01", insured=True, photo_sha256="ab" * 32)
    fields.update(kw)
    return pb.Holder(**fields)


def points(**kw):
    fields = dict(request_id="p1", card_number=CARD, filer=pb.POINTS_FILER_EMPLOYER,
                  employer="91350100M000100Y43", evidence_ref="HR-1",
                  claims=[pb.PointsClaim(indicator="education", value="master")])
    fields.update(kw)
    return pb.ApplyPointsRequest(**fields)


# (service, method, request or raw bytes, role, code, message prefix)
CASES = [
    ("Authorization", "Authorize", auth(card_number=""), "TRANSIT_GATE", IA, "card_number:"),
    ("Authorization", "Authorize", auth(card_number=LONG), "TRANSIT_GATE", IA, "card_number:"),
    ("Authorization", "Authorize", auth(card_number="31abc"), "TRANSIT_GATE", IA, "card_number:"),
    ("Authorization", "Authorize", auth(card_number="３１"), "TRANSIT_GATE", IA, "card_number:"),
    ("Authorization", "Authorize", auth(request_id=""), "TRANSIT_GATE", IA, "request_id:"),
    ("Authorization", "Authorize", auth(request_id="x" * 65), "TRANSIT_GATE", IA, "request_id:"),
    ("Authorization", "Authorize", auth(channel=77), "TRANSIT_GATE", IA, "channel:"),
    ("Authorization", "Authorize", auth(phase=9, amount_fen=1), "TRANSIT_GATE", IA, "phase:"),
    ("Authorization", "Authorize", auth(amount_fen=-1), "TRANSIT_GATE", IA, "amount_fen:"),
    ("Authorization", "Authorize", auth(amount_fen=2**63 - 1), "TRANSIT_GATE", IA, "amount_fen:"),
    ("Authorization", "Authorize", auth(terminal_id="t\x00"), "TRANSIT_GATE", IA, "terminal_id:"),
    ("Authorization", "Authorize", b"\x0a\x02\xff\xfe", "TRANSIT_GATE", IA, "request:"),
    ("Authorization", "Authorize", b"\xff\xff\xff\xff", "TRANSIT_GATE", IA, "request:"),
    ("Authorization", "AuthorizeBatch", pb.AuthorizeBatchRequest(), "TRANSIT_GATE", IA,
     "requests:"),
    ("Authorization", "AuthorizeBatch", pb.AuthorizeBatchRequest(
        requests=[auth(request_id=f"b{i}") for i in range(config.batch_size_max + 1)]),
     "TRANSIT_GATE", IA, "requests:"),
    ("Authorization", "AuthorizeBatch", pb.AuthorizeBatchRequest(
        requests=[auth(), auth(amount_fen=-5)]), "TRANSIT_GATE", IA, "requests[1].amount_fen:"),
    ("Authorization", "AuthorizeBatch", pb.AuthorizeBatchRequest(requests=[auth(
        terminal_id="x" * (config.message_size_max + 1))]), "TRANSIT_GATE", RE, ""),
    ("CardStatus", "GetStatus", pb.GetStatusRequest(card_number=""), "BANK_SWITCH", IA,
     "card_number:"),
    ("CardStatus", "WatchChanges", b"\x08\xff", "BANK_SWITCH", IA, "request:"),
    # issue 28: the deny list, its keys, a gate's acknowledgement
    ("CardStatus", "GetDenyList", pb.GetDenyListRequest(page_size=config.deny_list_page_max + 1),
     "TRANSIT_GATE", IA, "page_size:"),
    ("CardStatus", "GetDenyList", pb.GetDenyListRequest(after_card_number="31x"),
     "TRANSIT_GATE", IA, "after_card_number:"),
    ("CardStatus", "GetSigningKeys", b"\x08\xff", "TRANSIT_GATE", IA, "request:"),
    ("CardStatus", "AcknowledgeChanges", pb.AcknowledgeChangesRequest(sequence=2**63),
     "TRANSIT_GATE", grpc.StatusCode.OUT_OF_RANGE, f"sequence {2**63} is past"),
    ("Holders", "GetHolder", pb.GetHolderRequest(purpose="claim"), "CARD_AGENCY", IA, "key:"),
    ("Holders", "GetHolder", pb.GetHolderRequest(card_number=CARD), "CARD_AGENCY", IA,
     "purpose:"),
    ("Holders", "GetHolder", pb.GetHolderRequest(card_number=CARD, purpose="  "), "CARD_AGENCY",
     IA, "purpose:"),
    ("Holders", "GetHolder", pb.GetHolderRequest(ssn="310101198001010010", purpose="claim"),
     "CARD_AGENCY", IA, "ssn:"),
    ("Holders", "GetHolder", pb.GetHolderRequest(card_number=LONG, purpose="x"), "CARD_AGENCY",
     IA, "card_number:"),
    ("Holders", "CorrectHolder", pb.CorrectHolderRequest(request_id="c1", holder=holder()),
     "CARD_AGENCY", IA, "reason:"),
    ("Holders", "CorrectHolder", pb.CorrectHolderRequest(
        request_id="c1", holder=pb.Holder(ssn=holder().ssn), reason="typo"), "CARD_AGENCY", IA,
     "holder:"),
    ("Holders", "CorrectHolder", pb.CorrectHolderRequest(
        request_id="c1", holder=holder(birth_date="1980-02-30"), reason="typo"), "CARD_AGENCY",
     IA, "holder.birth_date:"),
    ("Holders", "CorrectHolder", pb.CorrectHolderRequest(
        request_id="", holder=holder(), reason="typo"), "CARD_AGENCY", IA, "request_id:"),
    ("Audit", "Export", b"\x08\xff", "AUDITOR", IA, "request:"),
    ("Holders", "RecordCredit", pb.RecordCreditRequest(
        request_id="c", card_number=CARD, ground=9, evidence_ref="x"), "HRSS", IA, "ground:"),
    ("Holders", "RecordCredit", pb.RecordCreditRequest(
        request_id="c", ground=1, evidence_ref="x"), "HRSS", IA, "key:"),
    ("Deadlines", "ListDue", pb.ListDueRequest(within_days=4000), "CARD_AGENCY", IA,
     "within_days:"),
    ("ResidenceCard", "Renew", pb.RenewRequest(request_id="r", card_number=""),
     "COMMUNITY_OUTLET", IA, "card_number:"),
    ("ResidenceCard", "Renew", pb.RenewRequest(request_id="", card_number=CARD),
     "COMMUNITY_OUTLET", IA, "request_id:"),
    ("ResidenceCard", "StateSpecialCircumstances", pb.StateSpecialCircumstancesRequest(
        request_id="s", card_number=""), "PUBLIC_SECURITY", IA, "card_number:"),
    ("ResidenceCard", "StateSpecialCircumstances", pb.StateSpecialCircumstancesRequest(
        request_id="s", card_number=CARD, special_circumstances="\x00"), "PUBLIC_SECURITY", IA,
     "special_circumstances:"),
    ("ResidenceCard", "ChangeInformation", pb.ChangeInformationRequest(
        request_id="r", card_number=CARD, changed_on="yesterday"), "COMMUNITY_OUTLET", IA,
     "changed_on:"),
    ("ResidenceCard", "ChangeInformation", pb.ChangeInformationRequest(
        request_id="r", card_number=CARD, changed_on="2026-01-01",
        holder=pb.Holder(phone="\x00")), "COMMUNITY_OUTLET", IA, "holder.phone:"),
    ("CardStatus", "GetStatusBatch", pb.GetStatusBatchRequest(card_numbers=["1", "x"]),
     "BANK_SWITCH", IA, "card_numbers[1]:"),
    ("ResidenceCard", "ApplyPoints", points(card_number=""), "HRSS", IA, "card_number:"),
    ("ResidenceCard", "ApplyPoints", points(filer=0), "HRSS", IA, "filer:"),
    ("ResidenceCard", "ApplyPoints", points(employer="91350100M000100Y44"), "HRSS", IA,
     "employer: check character"),
    ("ResidenceCard", "ApplyPoints", points(evidence_ref=" "), "HRSS", IA, "evidence_ref:"),
    ("ResidenceCard", "ApplyPoints", points(claims=[]), "HRSS", IA, "claims:"),
    ("ResidenceCard", "ApplyPoints", points(claims=[pb.PointsClaim(indicator="age")]), "HRSS",
     IA, "claims[0].value:"),
    ("ResidenceCard", "ApplyPoints", points(), "HRSS", FP,  # not a Residence Card
     "ApplyPoints is not allowed on a card in state ACTIVE (RC-20)"),
    ("ResidenceCard", "DecidePoints", pb.DecidePointsRequest(request_id="d", card_number=CARD),
     "HRSS", FP, "DecidePoints is not allowed on a card in state ACTIVE (RC-20)"),
    ("ResidenceCard", "DecidePoints", pb.DecidePointsRequest(request_id="", card_number=CARD),
     "HRSS", IA, "request_id:"),
    ("ResidenceCard", "GetPoints", pb.GetPointsRequest(card_number=LONG, purpose="x"), "HRSS",
     IA, "card_number:"),
    ("ResidenceCard", "GetPoints", pb.GetPointsRequest(card_number=CARD), "HRSS", IA,
     "purpose:"),
    ("Lifecycle", "IssueElectronic", pb.IssueElectronicRequest(request_id="e", card_number=""),
     "ONLINE_PLATFORM", IA, "card_number:"),
    ("Lifecycle", "IssueElectronic", pb.IssueElectronicRequest(request_id="", card_number=CARD),
     "ONLINE_PLATFORM", IA, "request_id:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=pb.PACK_RC, holder=holder(),
                                           proxy=pb.Proxy(ssn="1", name="x")),
     "COMMUNITY_OUTLET", IA, "proxy.ssn:"),
    ("Holders", "RecordCredit", pb.RecordCreditRequest(
        request_id="c", employer="x", ground=4, evidence_ref="x"), "HRSS", IA, "employer:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=9, holder=holder()),
     "ONLINE_PLATFORM", IA, "pack:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=pb.PACK_SH, holder=holder(
        ssn="31010119800101001")), "ONLINE_PLATFORM", IA, "holder.ssn:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=pb.PACK_SH, holder=holder(
        birth_date="1980-13-01")), "ONLINE_PLATFORM", IA, "holder.birth_date:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="", pack=pb.PACK_SH, holder=holder()),
     "ONLINE_PLATFORM", IA, "request_id:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=pb.PACK_GZ, holder=holder(
        household_registered=True), service_bank="ICBC"), "ONLINE_PLATFORM", IA,
     "holder.phone:"),
    ("Lifecycle", "Apply", pb.ApplyRequest(request_id="a", pack=pb.PACK_SH, holder=holder(),
                                           service_bank="银" * 20), "ONLINE_PLATFORM", IA,
     "service_bank:"),
    ("Lifecycle", "Verify", pb.VerifyRequest(request_id="v", card_number=LONG), "CARD_AGENCY", IA,
     "card_number:"),
    ("Lifecycle", "Issue", pb.IssueRequest(request_id="", card_number=CARD), "CARD_AGENCY", IA,
     "request_id:"),
    ("Lifecycle", "Activate", pb.ActivateRequest(request_id="a", card_number=""),
     "ONLINE_PLATFORM", IA, "card_number:"),
    ("Lifecycle", "OpenFinancial", pb.OpenFinancialRequest(request_id="o", card_number=CARD),
     "BANK_OUTLET", IA, "bank:"),
    ("Lifecycle", "ReportTemporaryLoss", pb.ReportTemporaryLossRequest(
        request_id="t", card_number="x"), "SERVICE_HOTLINE", IA, "card_number:"),
    ("Lifecycle", "ReportLoss", pb.ReportLossRequest(request_id="", card_number=CARD),
     "ONLINE_PLATFORM", IA, "request_id:"),
    ("Lifecycle", "CancelLoss", pb.CancelLossRequest(request_id="c", card_number=""),
     "ONLINE_PLATFORM", IA, "card_number:"),
    ("Lifecycle", "ReportBankLoss", pb.ReportBankLossRequest(request_id="", card_number=CARD),
     "BANK_OUTLET", IA, "request_id:"),
    ("Lifecycle", "CancelBankLoss", pb.CancelBankLossRequest(request_id="c", card_number=LONG),
     "BANK_OUTLET", IA, "card_number:"),
    ("Lifecycle", "Replace", pb.ReplaceRequest(request_id="r", card_number=CARD, reason=8),
     "BANK_OUTLET", IA, "reason:"),
    ("Lifecycle", "Cancel", pb.CancelRequest(request_id="c", card_number=CARD, reason="x" * 201),
     "CARD_AGENCY", IA, "reason:"),
    ("Lifecycle", "LockApplication", pb.LockApplicationRequest(
        request_id="l", card_number=CARD, channel=pb.CHANNEL_STATUS), "BANK_OUTLET", IA,
     "channel:"),
    ("Lifecycle", "UnlockApplication", pb.UnlockApplicationRequest(
        request_id="l", card_number=CARD, channel=0), "BANK_OUTLET", IA, "channel:"),
    ("Lifecycle", "GetCard", pb.GetCardRequest(card_number="12ab"), "ONLINE_PLATFORM", IA,
     "card_number:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="", debit=TOPUP, credit=HOLDER,
                                              amount_fen=5), "CARD_AGENCY", IA, "transfer_id:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", debit=TOPUP, credit=HOLDER,
                                              amount_fen=-5), "CARD_AGENCY", IA, "amount_fen:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", debit=TOPUP, credit=HOLDER,
                                              amount_fen=2**63 - 1), "CARD_AGENCY", IA,
     "amount_fen:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", debit=TOPUP, credit=HOLDER,
                                              amount_fen=5, phase=7), "CARD_AGENCY", IA,
     "phase:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", debit=pb.AccountRef(
        operator="op:" + "x" * 50), credit=HOLDER, amount_fen=5), "CARD_AGENCY", IA,
     "debit.operator:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", debit=TOPUP, credit=HOLDER,
                                              amount_fen=5, phase=pb.PHASE_HOLD,
                                              timeout_seconds=-1), "CARD_AGENCY", IA,
     "timeout_seconds:"),
    ("Ledger", "Transfer", pb.TransferRequest(transfer_id="t", phase=pb.PHASE_POST),
     "CARD_AGENCY", IA, "pending_id:"),
    ("Ledger", "Reverse", pb.ReverseRequest(transfer_id="", reversal_id="r"), "CARD_AGENCY", IA,
     "transfer_id:"),
    ("Ledger", "Reverse", pb.ReverseRequest(transfer_id="t", reversal_id="r", amount_fen=-1),
     "CARD_AGENCY", IA, "amount_fen:"),
    ("Ledger", "GetBalances", pb.GetBalancesRequest(card_number=""), "ONLINE_PLATFORM", IA,
     "card_number:"),
    ("Admin", "AdvanceClock", pb.AdvanceClockRequest(seconds=-1), "ADMIN", IA, "seconds:"),
    ("Admin", "SetClock", pb.SetClockRequest(time="yesterday"), "ADMIN", IA, "time:"),
    ("Admin", "SetClock", pb.SetClockRequest(time="2020-01-01T00:00:00+08:00"), "ADMIN", IA,
     "time:"),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running(tmp_path_factory.mktemp("bad"), "--clock", "manual", "--clock-start",
                 START) as s:
        s.card = new_active_card(s, 40)
        yield s


def _fill(value, card):
    """Put the real card number wherever a request says CARD."""
    if isinstance(value, bytes):
        return value
    value = type(value).FromString(value.SerializeToString())
    for field, v in value.ListFields():
        if field.type == field.TYPE_STRING and v == CARD:
            setattr(value, field.name, card)
        elif field.type == field.TYPE_MESSAGE and not field.is_repeated:
            getattr(value, field.name).CopyFrom(_fill(v, card))
        elif field.type == field.TYPE_MESSAGE:
            for item in v:
                item.CopyFrom(_fill(item, card))
    return value


@pytest.mark.parametrize("service, method, request_, role, code, prefix", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_request(srv, service, method, request_, role, code, prefix):
    request_ = _fill(request_, srv.card)
    raw = srv.channel.unary_unary(f"/yikatong.v1.{service}/{method}",
                                  request_serializer=lambda m: m if isinstance(m, bytes)
                                  else m.SerializeToString(),
                                  response_deserializer=lambda b: b)
    # nothing written but the audit trail's events: a refusal of a call that touches personal
    # information is audited whatever its outcome, by the refusals' flush once a second,
    # which may land during this case or the next (a clean-clone run once saw it land during
    # GetBalances' own case)
    before = store_digest(srv.data_dir, skip=(b"audit",))
    with pytest.raises(grpc.RpcError) as e:
        raw(request_, metadata=srv.md(role), timeout=20)
    assert e.value.code() == code, e.value.details()
    assert e.value.details().startswith(prefix), e.value.details()
    assert store_digest(srv.data_dir, skip=(b"audit",)) == before
    health = health_pb2_grpc.HealthStub(srv.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_table_covers_every_method():
    methods = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    # AuthorizeStream: test_e2e's batches; Audit.Verify has no field to get wrong
    covered = {c[1] for c in CASES} | {"AuthorizeStream", "Verify"}
    assert methods == covered

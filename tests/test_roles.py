"""Every role against every method, and Authorize against every channel, as API.md's table
"Who may call what" states them, over gRPC. The table is written out again here from API.md,
independently of server/roles.py, so a slip in either shows."""
import grpc
import pytest
from test_calls import error_info

from yikatong.model import Role
from yikatong.server.harness import running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

TERMINALS = {"TRANSIT_GATE", "MEDICAL_TERMINAL", "BENEFIT_COUNTER"}
OUTLETS = {"COMMUNITY_OUTLET", "BANK_OUTLET"}
STATUS = TERMINALS | {"BANK_SWITCH"} | OUTLETS | {"CARD_AGENCY"}
APPLY = {"COMMUNITY_OUTLET", "BANK_OUTLET", "ONLINE_PLATFORM"}
BANK = {"BANK_OUTLET", "BANK_SWITCH"}
MONEY = {"CARD_AGENCY", "HRSS", "BANK_SWITCH"}

# API.md, "Identity and roles"
API_TABLE = {
    "CardStatus.GetStatus": STATUS, "CardStatus.GetStatusBatch": STATUS,
    "CardStatus.WatchChanges": STATUS,
    # issue 28 (API.md gives no row): whoever may watch; only a gate acknowledges
    "CardStatus.GetDenyList": STATUS, "CardStatus.GetSigningKeys": STATUS,
    "CardStatus.AcknowledgeChanges": {"TRANSIT_GATE"},
    "Holders.GetHolder": {"CARD_AGENCY", "HRSS", "PUBLIC_SECURITY", "COMMUNITY_OUTLET"},
    "Holders.CorrectHolder": {"CARD_AGENCY", "COMMUNITY_OUTLET", "ONLINE_PLATFORM"},
    # API.md gives no row: SH-26's "relevant departments" and public security, RC-29's HRSS
    "Holders.RecordCredit": {"CARD_AGENCY", "HRSS", "PUBLIC_SECURITY"},
    "Audit.Export": {"AUDITOR"}, "Audit.Verify": {"AUDITOR"},
    "ResidenceCard.Renew": {"COMMUNITY_OUTLET", "PUBLIC_SECURITY"},
    "ResidenceCard.ChangeInformation": {"COMMUNITY_OUTLET", "PUBLIC_SECURITY"},
    # API.md gives no row: RC-12, the public security organ that makes the card
    "ResidenceCard.StateSpecialCircumstances": {"PUBLIC_SECURITY"},
    "Deadlines.ListDue": {"CARD_AGENCY", "HRSS"},
    "Lifecycle.Apply": APPLY, "Lifecycle.Replace": APPLY, "Lifecycle.CancelLoss": APPLY,
    # PUBLIC_SECURITY: RC cards, and SH identity; HRSS: SH insurance (SH-10)
    "Lifecycle.Verify": {"CARD_AGENCY", "PUBLIC_SECURITY", "HRSS"},
    "Lifecycle.Issue": {"CARD_AGENCY", "PUBLIC_SECURITY"},
    "Lifecycle.Cancel": {"CARD_AGENCY", "HRSS", "PUBLIC_SECURITY"},
    "Lifecycle.Activate": APPLY | {"SERVICE_HOTLINE"},
    "Lifecycle.ReportTemporaryLoss": {"SERVICE_HOTLINE", "ONLINE_PLATFORM"},
    "Lifecycle.ReportLoss": APPLY | {"SERVICE_HOTLINE"},
    "Lifecycle.OpenFinancial": BANK, "Lifecycle.ReportBankLoss": BANK,
    "Lifecycle.CancelBankLoss": BANK, "Lifecycle.LockApplication": BANK,
    "Lifecycle.UnlockApplication": BANK,
    "Ledger.Transfer": MONEY, "Ledger.Reverse": MONEY,
    "Ledger.GetBalances": TERMINALS | OUTLETS | {"ONLINE_PLATFORM"},
    "Admin.AdvanceClock": {"ADMIN"}, "Admin.SetClock": {"ADMIN"},
}
# API.md gives no row for reading a card (GetCard): the outlets, the platform, the hotline
# and the agency that act on cards read them (docs/DECISIONS.md).
API_TABLE["Lifecycle.GetCard"] = APPLY | {"SERVICE_HOTLINE", "CARD_AGENCY"}
# "ResidenceCard.* ... (points: HRSS)": the points methods are HRSS's (RC-22, RC-23)
API_TABLE.update(dict.fromkeys(("ResidenceCard.ApplyPoints", "ResidenceCard.DecidePoints",
                                "ResidenceCard.GetPoints"), {"HRSS"}))
# API.md gives no row for the electronic card (SH-31, GZ-35): where cards are applied for
API_TABLE["Lifecycle.IssueElectronic"] = APPLY
CHANNELS = {pb.CHANNEL_TRANSIT: {"TRANSIT_GATE"}, pb.CHANNEL_MEDICAL: {"MEDICAL_TERMINAL"},
            pb.CHANNEL_BENEFIT: {"BENEFIT_COUNTER"}, pb.CHANNEL_FINANCIAL: {"BANK_SWITCH"},
            pb.CHANNEL_SERVICE: {"COMMUNITY_OUTLET", "HRSS", "PUBLIC_SECURITY"},
            pb.CHANNEL_STATUS: STATUS}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running(tmp_path_factory.mktemp("roles")) as s:
        yield s


def _call(srv, full_name: str, role: str):
    service, method = full_name.split(".")
    descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    request = getattr(pb, descriptor.input_type.name)()  # empty: the role is judged first
    stub = getattr(rpc, f"{service}Stub")(srv.channel)
    try:
        if descriptor.server_streaming:  # the first message, or the refusal (a live feed
            # with nothing to send yet ends at the deadline: not a refusal)
            next(iter(getattr(stub, method)(request, metadata=srv.md(role), timeout=0.5)), None)
        else:
            getattr(stub, method)(request, metadata=srv.md(role), timeout=10)
    except grpc.RpcError as error:
        return None if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else error
    return None


def test_every_role_against_every_method_as_api_md_says(srv):
    services = ("CardStatus", "Lifecycle", "ResidenceCard", "Ledger", "Deadlines", "Holders",
                "Audit", "Admin")
    described = {f"{s}.{m.name}" for s in services
                 for m in pb.DESCRIPTOR.services_by_name[s].methods}
    assert described == set(API_TABLE)
    wrong = []
    for name in sorted(API_TABLE):
        for role in Role:
            error = _call(srv, name, role.name)
            denied = error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
            if denied:
                assert error_info(error).reason == "ROLE_NOT_ALLOWED", (name, role)
            if denied == (role.name in API_TABLE[name]):
                wrong.append((name, role.name, error.code() if error else "OK"))
    assert not wrong, wrong


def test_every_role_against_every_authorize_channel(srv):
    wrong = []
    for channel, allowed in CHANNELS.items():
        for role in Role:
            try:
                srv.authorization.Authorize(pb.AuthorizeRequest(
                    request_id="r", card_number="310000000001", channel=channel),
                    metadata=srv.md(role.name), timeout=10)
                denied = False
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                denied = True
            if denied == (role.name in allowed):
                wrong.append((pb.Channel.Name(channel), role.name))
    assert not wrong, wrong

"""Who may call what: API.md's role table, in one place (default deny).

Keys are `Service.Method`. At start-up `check_table` compares the table with the services the
proto describes: a method without an entry, or an entry naming no method, stops the server
before it serves anything. Authorize is allowed per channel (`CHANNEL_ROLES`); the method
entry is the union, so a role with no channel at all is refused before any work. Where the
law names the channels of a rule for one pack (SH-18c, GZ-21, GZ-22), the domain refuses the
others (`yikatong.cards`).
"""
from yikatong.errors import PermissionDenied
from yikatong.model import Channel, Role

TERMINALS = frozenset({Role.TRANSIT_GATE, Role.MEDICAL_TERMINAL, Role.BENEFIT_COUNTER})
OUTLETS = frozenset({Role.COMMUNITY_OUTLET, Role.BANK_OUTLET})
_APPLY = frozenset({Role.COMMUNITY_OUTLET, Role.BANK_OUTLET, Role.ONLINE_PLATFORM})
_BANK = frozenset({Role.BANK_OUTLET, Role.BANK_SWITCH})
_STATUS = TERMINALS | OUTLETS | {Role.BANK_SWITCH, Role.CARD_AGENCY}
_MONEY = frozenset({Role.CARD_AGENCY, Role.HRSS, Role.BANK_SWITCH})
# RC-3, RC-13, RC-14: the community service centre, for public security; the card agency
# takes no act on a Residence Card
_RESIDENCE = frozenset({Role.PUBLIC_SECURITY, Role.COMMUNITY_OUTLET})
# who may read a holder's personal information (Holders.GetHolder); to any other role an
# answer names no held value and no card number of a holder (Apply, CorrectHolder)
PII_READERS = frozenset({Role.CARD_AGENCY, Role.HRSS, Role.PUBLIC_SECURITY,
                         Role.COMMUNITY_OUTLET})
# the calls that touch a holder's personal information: each is audited whatever its outcome
# (granted, refused, not found, malformed: issue 25), where other calls' refusals are audited
# only when PERMISSION_DENIED or UNAUTHENTICATED (server/calls.py)
AUDITED_WHATEVER_OUTCOME = frozenset({"Holders.GetHolder", "Holders.CorrectHolder",
                                      "Holders.RecordCredit", "ResidenceCard.GetPoints"})

CHANNEL_ROLES = {
    Channel.TRANSIT: frozenset({Role.TRANSIT_GATE}),
    Channel.MEDICAL: frozenset({Role.MEDICAL_TERMINAL}),
    Channel.BENEFIT: frozenset({Role.BENEFIT_COUNTER}),
    Channel.FINANCIAL: frozenset({Role.BANK_SWITCH}),
    Channel.SERVICE: frozenset({Role.COMMUNITY_OUTLET, Role.HRSS, Role.PUBLIC_SECURITY}),
    Channel.STATUS: _STATUS,
}
_AUTHORIZE = frozenset().union(*CHANNEL_ROLES.values())

METHOD_ROLES: dict[str, frozenset[Role]] = {
    "Authorization.Authorize": _AUTHORIZE,
    "Authorization.AuthorizeBatch": _AUTHORIZE,
    "Authorization.AuthorizeStream": _AUTHORIZE,
    "CardStatus.GetStatus": _STATUS,
    "CardStatus.GetStatusBatch": _STATUS,
    "CardStatus.WatchChanges": _STATUS,
    # issue 28: the signed deny list and its keys, for whoever may watch the feed; only a
    # gate acknowledges what it applied (`yikatong gates` lists TRANSIT_GATE clients)
    "CardStatus.GetDenyList": _STATUS,
    "CardStatus.GetSigningKeys": _STATUS,
    "CardStatus.AcknowledgeChanges": frozenset({Role.TRANSIT_GATE}),
    "Lifecycle.Apply": _APPLY,
    "Lifecycle.Replace": _APPLY,
    "Lifecycle.CancelLoss": _APPLY,
    # PUBLIC_SECURITY for Residence Cards, and alone for them (RC-11, RC-12, RC-16);
    # SH-6, SH-10: a Shanghai applicant's identity is public security's to verify, their
    # insurance HRSS's (medical security's too: API.md has no role for it). yikatong.cards
    # refuses the others per pack
    "Lifecycle.Verify": frozenset({Role.CARD_AGENCY, Role.PUBLIC_SECURITY, Role.HRSS}),
    "Lifecycle.Issue": frozenset({Role.CARD_AGENCY, Role.PUBLIC_SECURITY}),
    "Lifecycle.Cancel": frozenset({Role.CARD_AGENCY, Role.HRSS, Role.PUBLIC_SECURITY}),
    "Lifecycle.Activate": _APPLY | {Role.SERVICE_HOTLINE},
    "Lifecycle.ReportTemporaryLoss": frozenset({Role.SERVICE_HOTLINE, Role.ONLINE_PLATFORM}),
    "Lifecycle.ReportLoss": _APPLY | {Role.SERVICE_HOTLINE},  # hotline: GZ/BJ only (domain)
    "Lifecycle.OpenFinancial": _BANK,
    "Lifecycle.ReportBankLoss": _BANK,
    "Lifecycle.CancelBankLoss": _BANK,
    "Lifecycle.LockApplication": _BANK,
    "Lifecycle.UnlockApplication": _BANK,
    "Lifecycle.GetCard": _APPLY | {Role.SERVICE_HOTLINE, Role.CARD_AGENCY},
    "Lifecycle.IssueElectronic": _APPLY,  # SH-31, GZ-35
    "Ledger.Transfer": _MONEY,
    "Ledger.Reverse": _MONEY,
    "Ledger.GetBalances": TERMINALS | OUTLETS | {Role.ONLINE_PLATFORM},
    "ResidenceCard.Renew": _RESIDENCE,
    # RC-12: the public security organ makes the card and states why it is late
    "ResidenceCard.StateSpecialCircumstances": frozenset({Role.PUBLIC_SECURITY}),
    "ResidenceCard.ChangeInformation": _RESIDENCE,
    # RC-22, RC-23: points are the human resources and social security department's
    "ResidenceCard.ApplyPoints": frozenset({Role.HRSS}),
    "ResidenceCard.DecidePoints": frozenset({Role.HRSS}),
    "ResidenceCard.GetPoints": frozenset({Role.HRSS}),
    "Deadlines.ListDue": frozenset({Role.CARD_AGENCY, Role.HRSS}),
    # SPEC.md section 7: personal information is read for a stated purpose by these only
    "Holders.GetHolder": PII_READERS,
    "Holders.CorrectHolder": frozenset({Role.CARD_AGENCY, Role.COMMUNITY_OUTLET,
                                        Role.ONLINE_PLATFORM}),
    # SH-26 ("the relevant departments", public security), RC-29 (public security, HRSS)
    "Holders.RecordCredit": frozenset({Role.CARD_AGENCY, Role.HRSS, Role.PUBLIC_SECURITY}),
    "Audit.Export": frozenset({Role.AUDITOR}),
    "Audit.Verify": frozenset({Role.AUDITOR}),
    "Admin.AdvanceClock": frozenset({Role.ADMIN}),
    "Admin.SetClock": frozenset({Role.ADMIN}),
}


class TableError(Exception):
    """The role table and the proto disagree: the server must not start."""


def check_table(service_descriptors, table: dict = METHOD_ROLES) -> None:
    described = {f"{s.name}.{m.name}" for s in service_descriptors for m in s.methods}
    missing = sorted(described - table.keys())
    if missing:
        raise TableError(f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no entry "
                         "in the role table (server/roles.py); refusing to start")
    unknown = sorted(table.keys() - described)
    if unknown:
        raise TableError(f"the role table names {', '.join(unknown)}, which the proto does not "
                         "describe; refusing to start")


def require_channel(role: Role, channel: int) -> None:
    if role not in CHANNEL_ROLES.get(channel, ()):  # type: ignore[call-overload]
        raise PermissionDenied(f"role {role.name} may not authorize "
                               f"CHANNEL_{Channel(channel).name}")  # validated: a known value

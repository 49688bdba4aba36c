"""The domain's vocabulary: its enums and value types, in one place.

Enum values are the wire values of the same enums in proto/yikatong/v1 (a test checks them
name by name), so the server passes them through unchanged. Nothing here knows how a value is
stored: `yikatong.storage.records` encodes these types, and storage imports the domain, never
the other way round.
"""
import dataclasses
import enum
import re
import struct


class Pack(enum.IntEnum):
    SH = 1  # Shanghai social security card
    GZ = 2  # Guangzhou social security card
    BJ = 3  # Beijing social security card
    RC = 4  # Shanghai Residence Card


class State(enum.IntEnum):
    APPLIED = 1
    VERIFIED = 2
    REJECTED = 3
    ISSUED = 4
    ACTIVE = 5
    TEMP_LOSS = 6
    LOST = 7
    SUPERSEDED = 8
    CANCELLED = 9


FINAL_STATES = frozenset((State.REJECTED, State.SUPERSEDED, State.CANCELLED))


class Channel(enum.IntEnum):
    TRANSIT = 1
    MEDICAL = 2
    BENEFIT = 3
    FINANCIAL = 4
    SERVICE = 5
    STATUS = 6


class Flag(enum.IntFlag):
    TRANSIT = 1  # made with the transit function (SH-13)
    FINANCIAL_OPEN = 2  # SH-14
    FINANCIAL_FROZEN = 4  # a bank loss report stands (SH-20)
    REPLACEMENT_APPLIED = 8  # a replacement was applied for (GZ-22)
    PHOTO = 16  # made with the holder's photo on it (SH-22b)
    # lost before it was ever activated (SH-17, SH-18, GZ-21: a lost card is a lost card):
    # its loss, cancelled or lapsed, ends in ISSUED, never ACTIVE (SH-19a, SH-18b, GZ-22)
    UNACTIVATED = 32


class Reason(enum.IntEnum):
    """An authorization's answer: APPROVED, or the decline reason (SPEC.md section 4 order)."""

    APPROVED = 0
    CARD_NOT_FOUND = 1
    CARD_SUPERSEDED = 2
    CARD_CANCELLED = 3
    GENERATION_RETIRED = 4
    CARD_NOT_ISSUED = 5
    CARD_NOT_ACTIVATED = 6
    CARD_LOST = 7
    CARD_FROZEN = 8
    RC_NOT_RENEWED = 9
    APPLICATION_LOCKED = 10
    FUNCTION_NOT_OPEN = 11
    FINANCIAL_FROZEN = 12
    NOT_ENTITLED = 13
    INSUFFICIENT_FUNDS = 14


class ReplaceReason(enum.IntEnum):
    LOST = 1  # SH-19b, GZ-23: after a formal loss report
    DAMAGED = 2  # SH-21, GZ-24: defaced or unreadable
    INFO_CHANGED = 3  # SH-22, GZ-24: re-application on changed information


class CancelGround(enum.IntEnum):
    """GZ-26 and RC-16. Every ground but APPLICATION_WITHDRAWN stops every card of the holder
    in the pack; a withdrawn application cancels only a card not yet issued."""

    DEATH = 1
    ENTITLEMENT_ENDED = 2
    FALSE_DOCUMENTS = 3
    PERMANENT_RESIDENCY = 4
    OTHER_LEGAL = 5
    APPLICATION_WITHDRAWN = 6


class ResidenceBasis(enum.IntEnum):
    """RC-9: the second condition of a Residence Card application."""

    EMPLOYMENT = 1
    RESIDENCE = 2
    STUDY = 3


class ProxyRelation(enum.IntEnum):
    """RC-8: who applies on the holder's behalf."""

    GUARDIAN = 1
    CLOSE_RELATIVE = 2


class ProxyGround(enum.IntEnum):
    """RC-8: why someone else applies."""

    MINOR_UNDER_16 = 1
    ELDERLY_MOBILITY = 2  # the elderly (60 or over, Elderly Rights Law art. 2), mobility problems
    DISABLED = 3


@dataclasses.dataclass
class Proxy:
    """RC-8: a guardian or close relative applying, with their own identity document."""

    ssn: str
    name: str
    relation: int  # ProxyRelation
    ground: int  # ProxyGround


class Role(enum.IntEnum):
    """Who a client is (SPEC.md section 7). Stored in one byte where a record remembers it."""

    TRANSIT_GATE = 1
    MEDICAL_TERMINAL = 2
    BENEFIT_COUNTER = 3
    BANK_SWITCH = 4
    COMMUNITY_OUTLET = 5
    BANK_OUTLET = 6
    ONLINE_PLATFORM = 7
    SERVICE_HOTLINE = 8
    CARD_AGENCY = 9
    PUBLIC_SECURITY = 10
    HRSS = 11
    AUDITOR = 12
    ADMIN = 13


class AccountKind(enum.IntEnum):
    MEDICAL = 1
    TRANSIT = 2
    BENEFIT = 3


class Phase(enum.IntEnum):
    SINGLE = 0  # PHASE_UNSPECIFIED on the wire: single-phase
    HOLD = 1
    POST = 2
    VOID = 3


class TransferKind(enum.IntEnum):
    SINGLE = 1
    PENDING = 2  # a hold
    POST = 3
    VOID = 4
    REVERSAL = 5


class TransferStatus(enum.IntEnum):
    """A hold's status (TransferKind.PENDING); every other kind is POSTED once it exists."""

    POSTED = 1
    PENDING = 2
    VOIDED = 3
    EXPIRED = 4


class ChangeKind(enum.IntEnum):
    CARD = 1  # a card's state, flags or locks changed
    TRANSFER = 2  # money moved, or a hold was placed or resolved


class Changed(enum.IntFlag):
    """What one change event changed (the feed's ChangeEvent flags)."""

    STATE = 1
    LOCKS = 2
    FUNCTIONS = 4  # transit, financial open, financial frozen
    REPLACEMENT = 8
    BALANCE = 16
    VALIDITY = 32  # RC-14: a Residence Card renewed
    POINTS = 64  # RC-23: the holder's points score in force


# ---------------------------------------------------------------------------- cards

# SH-30: card generations. Generation 1 lacked the SH-5 basic functions and is retired
# (config.generation_retired_at); cards made now carry this one.
GENERATION_CURRENT = 2


@dataclasses.dataclass
class Card:
    card_number: str
    pack: int
    state: int
    flags: int = 0
    generation: int = GENERATION_CURRENT
    lock_mask: int = 0  # bit 1 << Channel: application locked (GZ-6)
    points: int = 0  # RC-20
    temp_loss_until: int = 0  # unix s, while TEMP_LOSS: the end of its 5 days (SH-18b)
    valid_until: int = 0  # unix s, RC-14; 0 = no end
    holder_id: int = 0
    applied_at: int = 0
    issued_at: int = 0
    loss_reported_at: int = 0
    received_at: int = 0  # GZ-12: the holder received it (activation at an outlet)
    replaced_by: str = ""
    replaces: str = ""
    service_bank: str = ""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def set(self, flag: int, on: bool = True) -> None:
        self.flags = (self.flags | flag) if on else (self.flags & ~flag)


# PII fields of a holder (SH-4, GZ-17, BJ-4), beside the key, the SSN.
PII_FIELDS = ("name", "gender", "birth_date", "nationality", "phone", "address", "ethnicity",
              "postcode", "occupation", "photo_sha256", "household_address",
              "residence_address")


@dataclasses.dataclass
class HolderInfo:
    """A holder's personal information as held (the eligibility flags are not kept)."""

    ssn: str
    name: str = ""
    gender: str = ""
    birth_date: str = ""
    nationality: str = ""
    phone: str = ""
    address: str = ""
    ethnicity: str = ""
    postcode: str = ""
    occupation: str = ""
    photo_sha256: str = ""
    household_address: str = ""  # RC-7: permanent registered residential address
    residence_address: str = ""  # RC-7: the Shanghai residence address


@dataclasses.dataclass
class Eligibility:
    """What an application states about the applicant (SH-8, GZ-4, BJ-8, RC-9); checked, not
    kept."""

    household_registered: bool = False  # in the pack's city
    insured: bool = False  # in the pack's city
    entitled_public_services: bool = False
    residence_registered_since: str = ""  # RC-9: YYYY-MM-DD
    residence_basis: int = 0  # RC-9: ResidenceBasis


@dataclasses.dataclass(frozen=True)
class BankLossRules:
    """SH-20: a service bank's own rules for the loss reports made to it (挂失有效期、解除挂失:
    "由相关服务银行确定"), as the issuing-banks file configures them. A bank with none
    configured keeps these: the report stands until cancelled, by either bank role."""

    valid_days: int = 0  # 0: until cancelled; N: lapses at 24:00 of the N-th day after it
    cancelled_by: frozenset[Role] = frozenset({Role.BANK_OUTLET, Role.BANK_SWITCH})


@dataclasses.dataclass(frozen=True)
class IssuingBanks:
    """GZ-9c: the issuing banks the HRSS department publishes (GZ-9, GZ-6, BJ-7), as
    configured: a versioned list; and SH-20: each service bank's loss rules, by its name (a
    Shanghai card's service bank need not be on the list)."""

    version: str
    names: frozenset[str]
    loss_rules: dict[str, BankLossRules] = dataclasses.field(default_factory=dict)
    # BJ-7: "The catalogue of social security card cooperative banks is announced to the
    # public by the municipal human resources and social security department" -- Beijing's
    # own list (the file's [beijing] table), never Guangzhou's; None: Beijing's check is off
    beijing: "IssuingBanks | None" = None


# ---------------------------------------------------------------------------- money

# An account is named by its key: a holder's account (holder id and kind) or an operator's
# (`op:<name>`). Holder accounts belong to the holder, so a replacement card reaches them.
ACCOUNT_KEY_BYTES_MAX = 40
_HOLDER_KEY = struct.Struct(">cQB")  # fastpath Fares makes it too (tests/test_fares.py)


def holder_account_key(holder_id: int, kind: int) -> bytes:
    return _HOLDER_KEY.pack(b"h", holder_id, kind)


def operator_account_key(name: str) -> bytes:
    return b"o" + name.encode("utf-8")


def is_holder_account(key: bytes) -> bool:
    return key[:1] == b"h"


def holder_of_account(key: bytes) -> int:
    """The holder id of a holder account key, 0 for an operator account."""
    return _HOLDER_KEY.unpack(key)[1] if is_holder_account(key) else 0


def kind_of_account(key: bytes) -> int:
    """The AccountKind of a holder account key, 0 for an operator account."""
    return _HOLDER_KEY.unpack(key)[2] if is_holder_account(key) else 0


@dataclasses.dataclass
class Account:
    """TigerBeetle's four balance columns, in integer fen."""

    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted


@dataclasses.dataclass
class Transfer:
    kind: int
    status: int
    amount: int  # what it moved, or holds
    debit: bytes  # account keys
    credit: bytes
    ref_id: str = ""  # post/void: the pending transfer; reversal: the reversed transfer
    fingerprint: bytes = b"\0" * 32
    created_at: int = 0
    timeout_at: int = 0  # pending only
    resolved: int = 0  # pending: amount posted; posted kinds: amount reversed so far
    channel: int = 0  # the Authorize channel that made it; 0 = Ledger.Transfer
    role: int = 0  # the Role of the client that made it (who may post or void a hold)
    # issue 28 item 4: the card decision that made it (records.encode_decision), b"": none
    # recorded (not an Authorize debit, or made before store format 6 recorded them)
    decided: bytes = b""


@dataclasses.dataclass
class Change:
    """One entry of the change log (SPEC.md section 1): every change of a card or an account,
    in one global sequence."""

    kind: int  # ChangeKind
    time: int
    card_number: str = ""  # the card changed, or the card named by the request that moved money
    holder_id: int = 0  # the holder whose card or account it is (0: operators only)
    state: int = 0  # CARD: the card's state after the change
    flags: int = 0  # CARD: its flags after the change
    lock_mask: int = 0  # CARD: its application locks after the change
    transfer_id: str = ""  # TRANSFER: the transfer written
    amount: int = 0  # TRANSFER: fen it moved or holds
    what: int = 0  # Changed


# RC-17 (basic public services) and RC-18 (conveniences): the SERVICE codes a Residence Card
# in force entitles its holder to, with no points needed; each with its rule. Points-gated
# services are the indicator table's (yikatong.points); any other code is NOT_ENTITLED. The
# "other" services and conveniences of 17(6) and 18(7) join this list as the State and the
# Municipality publish them (art. 19).
RC_ENTITLEMENTS = {
    # art. 17's opening words: "rights of employment, participating in social insurance,
    # paying and depositing, withdrawing and using the housing provident funds"
    "RC_EMPLOYMENT": "RC-17",
    "RC_SOCIAL_INSURANCE": "RC-17",
    "RC_HOUSING_PROVIDENT_FUND": "RC-17",
    "RC_COMPULSORY_EDUCATION": "RC-17(1)",
    "RC_PUBLIC_EMPLOYMENT": "RC-17(2)",
    "RC_PUBLIC_HEALTH": "RC-17(3)",  # basic public health and family planning services
    "RC_CULTURE_SPORTS": "RC-17(4)",
    "RC_LEGAL_AID": "RC-17(5)",
    "RC_EXIT_ENTRY_PERMIT": "RC-18(1)",
    "RC_ID_CARD_REPLACEMENT": "RC-18(2)",
    "RC_VEHICLE_REGISTRATION": "RC-18(3)",
    "RC_DRIVING_LICENCE": "RC-18(4)",
    "RC_PROFESSIONAL_EXAMS": "RC-18(5)",
    "RC_CHILDBIRTH_REGISTRATION": "RC-18(6)",
}


class CreditGround(enum.IntEnum):
    """SH-26 (a card lent, got or used by fraud, forged) and RC-29 (forged documents)."""

    LENDING_CARD = 1
    FRAUD = 2
    FORGED_CARD = 3
    FORGED_DOCUMENTS = 4


@dataclasses.dataclass
class CreditRecord:
    """A dishonesty record on a holder (SH-26, RC-29): who recorded it, when, on what
    evidence; a serious RC-29 case bars points applications for 3 years."""

    rule: str
    ground: int  # CreditGround
    evidence_ref: str
    serious: bool
    time: int
    client_id: str
    points_barred_until: int = 0
    fine_fen: int = 0  # RC-29, an employer's record: the fine imposed


@dataclasses.dataclass
class Step:
    """An open step of a card's procedure and when the law wants it done (SPEC.md section 6):
    `due_at` is the end instant, `provisional` when a day of a year without its official
    calendar was counted to find it; `kind`, `start` and `n` say how to count it again
    (yikatong.calendar.count) once that year's notice is installed. A step with `kind` 0 has a
    fixed end (a birthday)."""

    step: str  # "verification", "issue", "replacement"
    rule: str  # "SH-10"
    due_at: int
    kind: int = 0  # yikatong.calendar.WORKING_DAYS or DAYS_FOR_AN_ACT
    start: int = 0  # the event the period counts from
    n: int = 0  # days or working days
    provisional: bool = False


@dataclasses.dataclass
class HolderChange:
    """GZ-20: a held value replaced, kept with who, when and why (never overwritten
    silently). A field filled from an application (it was empty) is one too."""

    time: int
    field: str
    old_value: str
    new_value: str
    client_id: str
    method: str
    reason: str = ""


# A resident identity number (18 characters, the last a digit or X) anywhere in a text.
_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z])(\d{4})(\d{10})(\d{3}[0-9Xx])(?![0-9A-Za-z])")


def mask(text: str) -> str:
    """Every identity number in `text` with all but its first and last 4 characters hidden:
    310101199003071234 -> 3101**********1234 (SPEC.md section 7: logs and audit events)."""
    return _ID_NUMBER.sub(lambda m: m[1] + "*" * 10 + m[3], text)


# What a free text (a purpose, a reason, evidence) may hold of a person, found by shape. Digits
# are ASCII or full-width (a Chinese input method types ０-９); a number is never inside a longer
# run of letters and digits (a card number of 12 digits, a transfer id stay whole). Groups may
# be split by one space or hyphen, as people write them.
_D = "[0-9\uff10-\uff19]"
_SEP = "[ \\-]?"
_EDGE_L, _EDGE_R = "(?<![0-9A-Za-z\uff10-\uff19])", "(?![0-9A-Za-z\uff10-\uff19])"
_FREE_TEXT_PII = [
    # resident identity number, 18 characters (GB 11643), the last a digit or X
    re.compile(f"{_EDGE_L}({_D}{{4}})({_D}{{2}}{_SEP}{_D}{{8}}{_SEP})"
               f"({_D}{{3}}(?:{_D}|[Xx\uff38\uff58])){_EDGE_R}"),
    # the first-generation identity number, 15 digits
    re.compile(f"{_EDGE_L}({_D}{{4}})({_D}{{2}}{_SEP}{_D}{{5}})({_D}{_SEP}{_D}{{3}}){_EDGE_R}"),
    # a mobile number (11 digits from 1), with +86 / 86 before it or not
    re.compile(f"{_EDGE_L}((?:\\+?86{_SEP})?[1\uff11]{_D}{{2}})({_SEP}{_D}{{4}}{_SEP})"
               f"({_D}{{4}}){_EDGE_R}"),
    # a landline with its area code (010, 021, 0755, ...): 7 or 8 digits after it
    re.compile(f"{_EDGE_L}([0\uff10]{_D}{{2,3}}{_SEP})({_D}{{3,4}})({_D}{{4}}){_EDGE_R}"),
    # a passport number (E or G and 8 digits; EA and 7 digits)
    re.compile(f"{_EDGE_L}([EGeg][A-Za-z]?)({_D}{{3,4}})({_D}{{4}}){_EDGE_R}"),
]
_HIDDEN = re.compile(f"{_D}")  # the separators stay


def mask_text(text: str) -> str:
    """`text` with every identity number, phone number and passport number hidden but its
    ends, in `mask`'s style: "call from 310101198711090032 王伟 13800138000" ->
    "call from 3101**********0032 王伟 138****8000". Names are left: they cannot be told from
    other words (docs/DECISIONS.md, issue 25)."""
    for pattern in _FREE_TEXT_PII:
        text = pattern.sub(lambda m: m[1] + _HIDDEN.sub("*", m[2]) + m[3], text)
    return text


def bounded(text: str, length_max: int) -> str:
    """`text`, cut to `length_max` characters with a note of how many were cut."""
    if len(text) <= length_max:
        return text
    note = f"... ({len(text) - length_max} more characters)"
    return text[:max(0, length_max - len(note))] + note


@dataclasses.dataclass
class AuditEvent:
    """One entry of the audit trail (SPEC.md section 7): who, when, what, why, outcome;
    `hash` covers every field and `prev_hash`, so the trail is a chain."""

    sequence: int
    time: int
    client_id: str
    role: str
    method: str
    card_number: str = ""
    purpose: str = ""
    outcome: str = "OK"
    count: int = 1  # refused calls of one client and method within one second
    holder: str = ""  # masked identity number of the holder concerned
    algorithm: str = ""
    prev_hash: bytes = b""
    hash: bytes = b""

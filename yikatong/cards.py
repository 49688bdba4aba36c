"""Card lifecycle rules for SH, GZ, BJ (SPEC.md section 2) and the Residence Card's basic
procedures (section 3). Pure domain: a `Book` (typed LMDB transaction) and the time `now`
come in; records go out; a forbidden transition raises InvalidTransition naming state and rule.

No sweeper job exists: a temporary loss report lapses by arithmetic (`effective_state`) at the
exact second its 5 days end (SH-18b), and a write to such a card first normalises it.
"""
import datetime as dt
import re

from yikatong import config
from yikatong.clock import law_date
from yikatong.errors import (
    CardNotFound,
    InvalidArgument,
    InvalidTransition,
    NotEligible,
    PermissionDenied,
)
from yikatong.model import (
    FINAL_STATES,
    PII_FIELDS,
    Card,
    Channel,
    Eligibility,
    Flag,
    HolderInfo,
    Pack,
    ReplaceReason,
    ResidenceBasis,
    Role,
    State,
)

LOCKABLE_CHANNELS = (Channel.TRANSIT, Channel.MEDICAL, Channel.BENEFIT, Channel.FINANCIAL,
                     Channel.SERVICE)

_SSN = re.compile(r"[0-9]{17}[0-9X]")
_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def ssn_check_digit(first17: str) -> str:
    """GB 11643-1999 (ISO 7064 MOD 11-2) check character of a citizen ID number."""
    return _SSN_CHECK[sum(int(c) * w for c, w in zip(first17, _SSN_WEIGHTS, strict=True)) % 11]


def validate_ssn(ssn: str) -> None:
    if not _SSN.fullmatch(ssn):
        raise InvalidArgument("holder.ssn", "must be 17 digits and a digit or X (18 characters)")
    if ssn_check_digit(ssn[:17]) != ssn[17]:
        raise InvalidArgument("holder.ssn", "check digit does not match (GB 11643)")


def parse_date(field: str, text: str) -> dt.date:
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(field, f"{text!r} is not a date YYYY-MM-DD") from None


def effective_state(rec: Card, now: int) -> int:
    """The state as the law sees it at `now`: a lapsed temporary loss is ACTIVE (SH-18b)."""
    if rec.state == State.TEMP_LOSS and now >= rec.temp_loss_at + config.temp_loss_valid_seconds:
        return State.ACTIVE
    return rec.state


def load(book, card_number: str, now: int) -> Card:
    """The card for a write, with a lapsed temporary loss normalised to ACTIVE."""
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    if effective_state(rec, now) != rec.state:
        rec.state, rec.temp_loss_at = State.ACTIVE, 0
    return rec


def _require(rec: Card, allowed, operation: str, rule: str, detail: str = "") -> None:
    if rec.state not in allowed:
        raise InvalidTransition(State(rec.state).name, operation, rule, detail)


def _rule(pack: int, sh: str, gz: str, rc: str = "") -> str:
    return {Pack.SH: sh, Pack.GZ: gz, Pack.BJ: f"BJ via {gz}", Pack.RC: rc or gz}[Pack(pack)]


# ------------------------------------------------------------------ application

def check_eligibility(pack: int, who: Eligibility, now: int) -> None:
    """SH-8, GZ-4, BJ-8, RC-9: may this person apply for a card of this pack at all?"""
    if pack == Pack.SH and not (who.household_registered or who.insured):
        raise NotEligible("SH-8", "needs household registration in Shanghai or social "
                          "insurance in Shanghai (SH-29 for overseas persons)")
    if pack == Pack.GZ and not (who.household_registered or who.entitled_public_services):
        raise NotEligible("GZ-4", "needs household registration in Guangzhou or entitlement to "
                          "public services there")
    if pack == Pack.BJ and not (who.insured or who.entitled_public_services):
        raise NotEligible("BJ-8", "needs social insurance in Beijing or entitlement to public "
                          "services there (old-age care, disability aid, education)")
    if pack == Pack.RC:
        since = parse_date("residence_registered_since", who.residence_registered_since)
        today = law_date(now)
        months = ((today.year - since.year) * 12 + today.month - since.month
                  - (today.day < since.day))
        if months < config.rc_residence_months_min:
            raise NotEligible("RC-9", "residence must have been registered in Shanghai for "
                              "more than 6 months")
        if who.residence_basis not in tuple(ResidenceBasis):
            raise NotEligible("RC-9", "needs legal stable employment, legal stable residence "
                              "or continuous study (residence_basis)")


def merge_holder(given: HolderInfo, held: HolderInfo | None) -> HolderInfo:
    """GZ-9b: information already held is not asked for again (an empty field takes the held
    value). GZ-20: a held value is never silently overwritten by a different one."""
    merged = HolderInfo(given.ssn, **{f: getattr(given, f) for f in PII_FIELDS})
    if held is not None:
        for f in PII_FIELDS:
            mine, theirs = getattr(merged, f), getattr(held, f)
            if not mine:
                setattr(merged, f, theirs)
            elif theirs and mine != theirs:
                raise InvalidTransition("held", "Apply", "GZ-20",
                                        f"holder.{f} differs from the information held; "
                                        "file a correction instead")
    if not merged.name or not merged.birth_date:
        raise InvalidArgument("holder.name" if not merged.name else "holder.birth_date",
                              "is required for a first application")
    return merged


def apply(book, now: int, *, pack: int, holder: HolderInfo, eligibility: Eligibility,
          with_transit: bool, service_bank: str, instant: bool) -> Card:
    """SH-9/GZ-7/GZ-9: record an application from an eligible person (SH-8, GZ-4, BJ-8,
    RC-9), reusing the personal information already held (GZ-9b)."""
    if pack == Pack.RC and (with_transit or instant):
        raise InvalidArgument("with_transit" if with_transit else "instant",
                              "the Residence Card has no transit function or instant issue")
    check_eligibility(pack, eligibility, now)
    found = book.holder(holder.ssn)
    if found is None:
        holder_id = book.next_seq(b"holder_id")
        book.put_holder(holder_id, merge_holder(holder, None))
    else:
        holder_id, held = found
        merged = merge_holder(holder, held)
        if merged != held:
            book.put_holder(holder_id, merged)
        current = book.current_card(holder_id, pack)
        if current is not None:
            cur = load(book, current, now)
            if cur.state in (State.APPLIED, State.VERIFIED):
                raise InvalidTransition(State(cur.state).name, "Apply", "SH-9",
                                        f"application {current} is already open for this holder")
            if cur.state not in FINAL_STATES:
                raise InvalidTransition(State(cur.state).name, "Apply", "SH-23c",
                                        f"holder already has card {current}; use Replace")
    seq = book.next_seq(b"card_number")
    rec = Card(
        card_number=f"{config.pack_card_prefix[Pack(pack)]}{seq:010d}",
        pack=pack, state=State.APPLIED, holder_id=holder_id, applied_at=now,
        service_bank=service_bank,
    )
    rec.set(Flag.TRANSIT, with_transit)
    book.set_current_card(holder_id, pack, rec.card_number)
    if instant:  # SH-23b, GZ-10b: made on the spot
        _issue(book, rec, now)
    book.put_card(rec, now)
    return rec


def verify(book, now: int, card_number: str, approved: bool, reason: str) -> Card:
    rec = load(book, card_number, now)
    _require(rec, (State.APPLIED,), "Verify", "SH-10")
    if approved:
        rec.state = State.VERIFIED
    else:
        if not reason:
            raise InvalidArgument("reason",
                                  "a rejection must say why: the applicant is told (SH-10)")
        rec.state = State.REJECTED
        book.put_note(card_number, reason)
    book.put_card(rec, now)
    return rec


def _issue(book, rec: Card, now: int) -> None:
    rec.issued_at = now
    if rec.pack == Pack.RC:
        # RC has no activation step: issued is in force. RC-14: valid one year.
        rec.state = State.ACTIVE
        if not rec.valid_until:
            d = law_date(now)
            try:
                end = d.replace(year=d.year + config.rc_valid_years)
            except ValueError:  # 29 February
                end = d.replace(year=d.year + config.rc_valid_years, day=28)
            rec.valid_until = now + (end - d).days * 86400
    else:
        rec.state = State.ISSUED
    if rec.replaces:  # SH-23c: the original is invalid for ever once the new card is issued
        old = book.card(rec.replaces)
        old.state, old.temp_loss_at = State.SUPERSEDED, 0
        book.put_card(old, now)
        book.set_current_card(rec.holder_id, rec.pack, rec.card_number)


def issue(book, now: int, card_number: str) -> Card:
    rec = load(book, card_number, now)
    _require(rec, (State.VERIFIED,), "Issue", _rule(rec.pack, "SH-11", "GZ-10", "RC-12"))
    _issue(book, rec, now)
    book.put_card(rec, now)
    return rec


def activate(book, now: int, card_number: str) -> Card:
    rec = load(book, card_number, now)
    _require(rec, (State.ISSUED,), "Activate", "SH-12")
    rec.state = State.ACTIVE
    book.put_card(rec, now)
    return rec


def open_financial(book, now: int, card_number: str, bank: str) -> Card:
    rec = load(book, card_number, now)
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "OpenFinancial", "RC-17",
                                "the Residence Card has no financial function")
    _require(rec, (State.ISSUED, State.ACTIVE), "OpenFinancial", "SH-14")
    if rec.has(Flag.FINANCIAL_OPEN):
        raise InvalidTransition(State(rec.state).name, "OpenFinancial", "SH-14",
                                "the financial function is already open")
    rec.set(Flag.FINANCIAL_OPEN)
    rec.service_bank = bank
    book.put_card(rec, now)
    return rec


# ------------------------------------------------------------------ loss

def report_temporary_loss(book, now: int, card_number: str) -> Card:
    rec = load(book, card_number, now)
    if rec.pack != Pack.SH:
        raise InvalidTransition(State(rec.state).name, "ReportTemporaryLoss",
                                _rule(rec.pack, "SH-18a", "GZ-21"),
                                "this pack has no temporary loss report; use ReportLoss")
    _require(rec, (State.ACTIVE,), "ReportTemporaryLoss", "SH-18a")
    rec.state, rec.temp_loss_at, rec.loss_reported_at = State.TEMP_LOSS, now, now
    book.put_card(rec, now)
    return rec


# Where the law lets a holder file a formal loss report or cancel one, per pack. The API's role
# table is wider; the regulation wins (SH-18 and SH-19 in the Chinese original; GZ-21, GZ-22).
# BJ follows GZ; RC's loss procedure is not restricted here.
_LOSS_CHANNELS = {
    ("ReportLoss", Pack.SH): ("SH-18c", {Role.ONLINE_PLATFORM, Role.COMMUNITY_OUTLET}),
    ("ReportLoss", Pack.GZ): ("GZ-21", {Role.ONLINE_PLATFORM, Role.SERVICE_HOTLINE,
                                        Role.BANK_OUTLET}),
    ("ReportLoss", Pack.BJ): ("GZ-21", {Role.ONLINE_PLATFORM, Role.SERVICE_HOTLINE,
                                        Role.BANK_OUTLET}),
    ("CancelLoss", Pack.SH): ("SH-19a", {Role.ONLINE_PLATFORM, Role.COMMUNITY_OUTLET}),
    ("CancelLoss", Pack.GZ): ("GZ-22", {Role.BANK_OUTLET}),
    ("CancelLoss", Pack.BJ): ("GZ-22", {Role.BANK_OUTLET}),
}


def _check_loss_channel(operation: str, rec: Card, role: Role | None) -> None:
    found = _LOSS_CHANNELS.get((operation, Pack(rec.pack)))
    if found is None or role is None:
        return
    rule, roles = found
    if role not in roles:
        names = ", ".join(sorted(r.name for r in roles))
        raise PermissionDenied(f"{operation} for a {Pack(rec.pack).name} card is made via "
                               f"{names}, not {Role(role).name} ({rule})", reason=rule)


def report_loss(book, now: int, card_number: str, role: Role | None = None) -> Card:
    rec = load(book, card_number, now)
    _check_loss_channel("ReportLoss", rec, role)
    if rec.pack == Pack.SH:
        _require(rec, (State.ACTIVE, State.TEMP_LOSS), "ReportLoss", "SH-18c")
    else:
        _require(rec, (State.ACTIVE,), "ReportLoss", _rule(rec.pack, "SH-18c", "GZ-21", "RC-15"))
    if rec.state == State.ACTIVE:
        rec.loss_reported_at = now
    rec.state, rec.temp_loss_at = State.LOST, 0
    book.put_card(rec, now)
    return rec


def cancel_loss(book, now: int, card_number: str, role: Role | None = None) -> Card:
    rec = load(book, card_number, now)
    _check_loss_channel("CancelLoss", rec, role)
    if rec.pack == Pack.SH:
        _require(rec, (State.TEMP_LOSS, State.LOST), "CancelLoss", "SH-19a")
    else:
        rule = _rule(rec.pack, "SH-19a", "GZ-22")
        _require(rec, (State.LOST,), "CancelLoss", rule)
        if rec.has(Flag.REPLACEMENT_APPLIED):
            raise InvalidTransition(State(rec.state).name, "CancelLoss", rule,
                                    f"a replacement ({rec.replaced_by}) was already applied for")
    rec.state, rec.temp_loss_at = State.ACTIVE, 0
    book.put_card(rec, now)
    return rec


def report_bank_loss(book, now: int, card_number: str) -> Card:
    rec = load(book, card_number, now)
    if not rec.has(Flag.FINANCIAL_OPEN) or rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "ReportBankLoss", "SH-20",
                                "the financial function is not open")
    if rec.has(Flag.FINANCIAL_FROZEN):
        raise InvalidTransition(State(rec.state).name, "ReportBankLoss", "SH-20",
                                "a bank loss report already stands")
    rec.set(Flag.FINANCIAL_FROZEN)
    book.put_card(rec, now)
    return rec


def cancel_bank_loss(book, now: int, card_number: str) -> Card:
    rec = load(book, card_number, now)
    if not rec.has(Flag.FINANCIAL_FROZEN) or rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "CancelBankLoss", "SH-20",
                                "no bank loss report stands")
    rec.set(Flag.FINANCIAL_FROZEN, False)
    book.put_card(rec, now)
    return rec


# ------------------------------------------------------------------ replacement, cancellation

def replace(book, now: int, card_number: str, reason: int, instant: bool) -> Card:
    """SH-19b (after formal loss), SH-21 (renewal), SH-22 (re-application); GZ-23, GZ-24;
    RC-15. Returns the new card, which starts VERIFIED (the holder is known) or ISSUED when
    made on the spot (SH-23b); the original is superseded when the new card is issued."""
    old = load(book, card_number, now)
    if reason == ReplaceReason.LOST:
        _require(old, (State.LOST,), "Replace(LOST)", _rule(old.pack, "SH-19b", "GZ-23", "RC-15"),
                 "a lost card is replaced after a formal loss report")
    else:
        _require(old, (State.ISSUED, State.ACTIVE), "Replace",
                 _rule(old.pack, "SH-21", "GZ-24", "RC-15"))
    if old.has(Flag.REPLACEMENT_APPLIED):
        raise InvalidTransition(State(old.state).name, "Replace", "SH-9",
                                f"replacement {old.replaced_by} is already being made")
    if old.pack == Pack.RC and instant:
        raise InvalidArgument("instant", "the Residence Card has no instant issue")
    seq = book.next_seq(b"card_number")
    new = Card(
        card_number=f"{config.pack_card_prefix[Pack(old.pack)]}{seq:010d}",
        pack=old.pack, state=State.VERIFIED, holder_id=old.holder_id, applied_at=now,
        flags=old.flags & (Flag.TRANSIT | Flag.FINANCIAL_OPEN),
        points=old.points, valid_until=old.valid_until, replaces=old.card_number,
        service_bank=old.service_bank,
    )
    old.set(Flag.REPLACEMENT_APPLIED)
    old.replaced_by = new.card_number
    book.put_card(old, now)
    if instant:
        _issue(book, new, now)
    book.put_card(new, now)
    return new


def cancel(book, now: int, card_number: str, reason: str) -> Card:
    """GZ-26 (death, registration cancelled, no longer entitled), RC-16; applied to SH and BJ
    cards alike. A replacement still being made for the card is cancelled with it."""
    rec = load(book, card_number, now)
    rule = _rule(rec.pack, "GZ-26", "GZ-26", "RC-16")
    if rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "Cancel", rule, "the state is final")
    if not reason:
        raise InvalidArgument("reason", "a cancellation must give its legal ground")
    for target in (rec, book.card(rec.replaced_by) if rec.replaced_by else None):
        if target is not None and target.state not in FINAL_STATES:
            target.state, target.temp_loss_at = State.CANCELLED, 0
            book.put_card(target, now)
            book.put_note(target.card_number, reason)
    return rec


def lock_application(book, now: int, card_number: str, channel: int, locked: bool) -> Card:
    """GZ-6/BJ-7: application locking and unlocking, per channel."""
    if channel not in LOCKABLE_CHANNELS:
        raise InvalidArgument("channel", "must be TRANSIT, MEDICAL, BENEFIT, FINANCIAL or SERVICE")
    rec = load(book, card_number, now)
    op = "LockApplication" if locked else "UnlockApplication"
    if rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, op, "GZ-6", "the state is final")
    bit = 1 << channel
    if bool(rec.lock_mask & bit) == locked:
        raise InvalidTransition(State(rec.state).name, op, "GZ-6",
                                "already locked" if locked else "not locked")
    rec.lock_mask = (rec.lock_mask | bit) if locked else (rec.lock_mask & ~bit)
    book.put_card(rec, now)
    return rec

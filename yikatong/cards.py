"""Card lifecycle rules for SH, GZ, BJ (SPEC.md section 2) and the Residence Card's basic
procedures (section 3). Pure domain: a `Book` (typed LMDB transaction) and the time `now`
come in; records go out; a forbidden transition raises InvalidTransition naming state and rule.

No sweeper job exists: a temporary loss report lapses by arithmetic (`effective_state`) at the
exact second its 5 days end (SH-18b), and a write to such a card first normalises it.
"""
import datetime as dt
import re

from storage import records as r
from storage.records import CardRecord
from yikatong import config
from yikatong.clock import law_date
from yikatong.errors import (CardNotFound, InvalidArgument, InvalidTransition, NotEligible,
                             PermissionDenied)

SOCIAL_PACKS = (r.PACK_SH, r.PACK_GZ, r.PACK_BJ)
# BJ's Measures leave loss and replacement to implementation rules; BJ uses the GZ procedure.
GZ_PROCEDURE = (r.PACK_GZ, r.PACK_BJ, r.PACK_RC)
LOCKABLE_CHANNELS = (r.CH_TRANSIT, r.CH_MEDICAL, r.CH_BENEFIT, r.CH_FINANCIAL, r.CH_SERVICE)

_SSN = re.compile(r"[0-9]{17}[0-9X]")
_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def ssn_check_digit(first17: str) -> str:
    """GB 11643-1999 (ISO 7064 MOD 11-2) check character of a citizen ID number."""
    return _SSN_CHECK[sum(int(c) * w for c, w in zip(first17, _SSN_WEIGHTS)) % 11]


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


def effective_state(rec: CardRecord, now: int) -> int:
    """The state as the law sees it at `now`: a lapsed temporary loss is ACTIVE (SH-18b)."""
    if rec.state == r.TEMP_LOSS and now >= rec.temp_loss_at + config.temp_loss_valid_seconds:
        return r.ACTIVE
    return rec.state


def load(book, card_number: str, now: int) -> CardRecord:
    """The card for a write, with a lapsed temporary loss normalised to ACTIVE."""
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    if effective_state(rec, now) != rec.state:
        rec.state, rec.temp_loss_at = r.ACTIVE, 0
    return rec


def _require(rec: CardRecord, allowed, operation: str, rule: str, detail: str = "") -> None:
    if rec.state not in allowed:
        raise InvalidTransition(r.STATE_NAMES[rec.state], operation, rule, detail)


def _rule(pack: int, sh: str, gz: str, rc: str = "") -> str:
    return {r.PACK_SH: sh, r.PACK_GZ: gz, r.PACK_BJ: f"BJ via {gz}", r.PACK_RC: rc or gz}[pack]


# ------------------------------------------------------------------ application

def check_eligibility(pack: int, household_registered: bool, insured: bool,
                      entitled_public_services: bool, residence_since: str, residence_basis: int,
                      now: int) -> None:
    if pack == r.PACK_SH and not (household_registered or insured):
        raise NotEligible("SH-8: needs household registration in Shanghai or social insurance "
                          "in Shanghai (SH-29 for overseas persons)")
    if pack == r.PACK_GZ and not (household_registered or entitled_public_services):
        raise NotEligible("GZ-4: needs household registration in Guangzhou or entitlement to "
                          "public services there")
    if pack == r.PACK_BJ and not (insured or entitled_public_services):
        raise NotEligible("BJ-8: needs social insurance in Beijing or entitlement to public "
                          "services there (old-age care, disability aid, education)")
    if pack == r.PACK_RC:
        since = parse_date("residence_registered_since", residence_since)
        today = law_date(now)
        months = (today.year - since.year) * 12 + today.month - since.month - (today.day < since.day)
        if months < config.rc_residence_months_min:
            raise NotEligible("RC-9: residence must have been registered in Shanghai for more "
                              "than 6 months")
        if residence_basis not in (1, 2, 3):
            raise NotEligible("RC-9: needs legal stable employment, legal stable residence or "
                              "continuous study (residence_basis)")


def apply(book, now: int, *, pack: int, ssn: str, merge_pii, with_transit: bool,
          service_bank: str, instant: bool) -> CardRecord:
    """SH-9/GZ-7/GZ-9: record an application. Eligibility is checked by the caller first.
    `merge_pii(stored_bytes_or_None) -> bytes` applies GZ-9b (reuse what is held)."""
    if pack == r.PACK_RC and (with_transit or instant):
        raise InvalidArgument("with_transit" if with_transit else "instant",
                              "the Residence Card has no transit function or instant issue")
    found = book.holder(ssn)
    if found is None:
        holder_id = book.next_seq(b"holder_id")
        book.put_holder(ssn, holder_id, merge_pii(None))
    else:
        holder_id, stored = found
        merged = merge_pii(stored)
        if merged != stored:
            book.put_holder(ssn, holder_id, merged)
        current = book.current_card(holder_id, pack)
        if current is not None:
            cur = load(book, current, now)
            if cur.state in (r.APPLIED, r.VERIFIED):
                raise InvalidTransition(r.STATE_NAMES[cur.state], "Apply", "SH-9",
                                        f"application {current} is already open for this holder")
            if cur.state not in r.FINAL_STATES:
                raise InvalidTransition(r.STATE_NAMES[cur.state], "Apply", "SH-23c",
                                        f"holder already has card {current}; use Replace")
    seq = book.next_seq(b"card_number")
    rec = CardRecord(
        card_number=f"{config.pack_card_prefix[pack]}{seq:010d}",
        pack=pack, state=r.APPLIED, holder_id=holder_id, applied_at=now,
        service_bank=service_bank,
    )
    rec.set(r.FLAG_TRANSIT, with_transit)
    book.set_current_card(holder_id, pack, rec.card_number)
    if instant:  # SH-23b, GZ-10b: made on the spot
        _issue(book, rec, now)
    book.put_card(rec)
    return rec


def verify(book, now: int, card_number: str, approved: bool, reason: str) -> CardRecord:
    rec = load(book, card_number, now)
    _require(rec, (r.APPLIED,), "Verify", "SH-10")
    if approved:
        rec.state = r.VERIFIED
    else:
        if not reason:
            raise InvalidArgument("reason", "a rejection must say why: the applicant is told (SH-10)")
        rec.state = r.REJECTED
        book.put_note(card_number, reason)
    book.put_card(rec)
    return rec


def _issue(book, rec: CardRecord, now: int) -> None:
    rec.issued_at = now
    if rec.pack == r.PACK_RC:
        # RC has no activation step: issued is in force. RC-14: valid one year.
        rec.state = r.ACTIVE
        if not rec.valid_until:
            d = law_date(now)
            try:
                end = d.replace(year=d.year + config.rc_valid_years)
            except ValueError:  # 29 February
                end = d.replace(year=d.year + config.rc_valid_years, day=28)
            rec.valid_until = now + (end - d).days * 86400
    else:
        rec.state = r.ISSUED
    if rec.replaces:  # SH-23c: the original is invalid for ever once the new card is issued
        old = book.card(rec.replaces)
        old.state, old.temp_loss_at = r.SUPERSEDED, 0
        book.put_card(old)
        book.set_current_card(rec.holder_id, rec.pack, rec.card_number)


def issue(book, now: int, card_number: str) -> CardRecord:
    rec = load(book, card_number, now)
    _require(rec, (r.VERIFIED,), "Issue", _rule(rec.pack, "SH-11", "GZ-10", "RC-12"))
    _issue(book, rec, now)
    book.put_card(rec)
    return rec


def activate(book, now: int, card_number: str) -> CardRecord:
    rec = load(book, card_number, now)
    _require(rec, (r.ISSUED,), "Activate", "SH-12")
    rec.state = r.ACTIVE
    book.put_card(rec)
    return rec


def open_financial(book, now: int, card_number: str, bank: str) -> CardRecord:
    rec = load(book, card_number, now)
    if rec.pack == r.PACK_RC:
        raise InvalidTransition(r.STATE_NAMES[rec.state], "OpenFinancial", "RC-17",
                                "the Residence Card has no financial function")
    _require(rec, (r.ISSUED, r.ACTIVE), "OpenFinancial", "SH-14")
    if rec.has(r.FLAG_FINANCIAL_OPEN):
        raise InvalidTransition(r.STATE_NAMES[rec.state], "OpenFinancial", "SH-14",
                                "the financial function is already open")
    rec.set(r.FLAG_FINANCIAL_OPEN)
    rec.service_bank = bank
    book.put_card(rec)
    return rec


# ------------------------------------------------------------------ loss

def report_temporary_loss(book, now: int, card_number: str) -> CardRecord:
    rec = load(book, card_number, now)
    if rec.pack != r.PACK_SH:
        raise InvalidTransition(r.STATE_NAMES[rec.state], "ReportTemporaryLoss",
                                _rule(rec.pack, "SH-18a", "GZ-21"),
                                "this pack has no temporary loss report; use ReportLoss")
    _require(rec, (r.ACTIVE,), "ReportTemporaryLoss", "SH-18a")
    rec.state, rec.temp_loss_at, rec.loss_reported_at = r.TEMP_LOSS, now, now
    book.put_card(rec)
    return rec


# Where the law lets a holder file a formal loss report or cancel one, per pack. The API's role
# table is wider; the regulation wins (SH-18 and SH-19 in the Chinese original; GZ-21, GZ-22).
# BJ follows GZ; RC's loss procedure is not restricted here.
_LOSS_CHANNELS = {
    ("ReportLoss", r.PACK_SH): ("SH-18c", {"ONLINE_PLATFORM", "COMMUNITY_OUTLET"}),
    ("ReportLoss", r.PACK_GZ): ("GZ-21", {"ONLINE_PLATFORM", "SERVICE_HOTLINE", "BANK_OUTLET"}),
    ("ReportLoss", r.PACK_BJ): ("GZ-21", {"ONLINE_PLATFORM", "SERVICE_HOTLINE", "BANK_OUTLET"}),
    ("CancelLoss", r.PACK_SH): ("SH-19a", {"ONLINE_PLATFORM", "COMMUNITY_OUTLET"}),
    ("CancelLoss", r.PACK_GZ): ("GZ-22", {"BANK_OUTLET"}),
    ("CancelLoss", r.PACK_BJ): ("GZ-22", {"BANK_OUTLET"}),
}


def _check_loss_channel(operation: str, rec: CardRecord, role: str | None) -> None:
    rule, roles = _LOSS_CHANNELS.get((operation, rec.pack), ("", None))
    if role is not None and roles is not None and role not in roles:
        raise PermissionDenied(f"{operation} for a {r.PACK_NAMES[rec.pack]} card is made via "
                               f"{', '.join(sorted(roles))}, not {role} ({rule})")


def report_loss(book, now: int, card_number: str, role: str | None = None) -> CardRecord:
    rec = load(book, card_number, now)
    _check_loss_channel("ReportLoss", rec, role)
    if rec.pack == r.PACK_SH:
        _require(rec, (r.ACTIVE, r.TEMP_LOSS), "ReportLoss", "SH-18c")
    else:
        _require(rec, (r.ACTIVE,), "ReportLoss", _rule(rec.pack, "SH-18c", "GZ-21", "RC-15"))
    if rec.state == r.ACTIVE:
        rec.loss_reported_at = now
    rec.state, rec.temp_loss_at = r.LOST, 0
    book.put_card(rec)
    return rec


def cancel_loss(book, now: int, card_number: str, role: str | None = None) -> CardRecord:
    rec = load(book, card_number, now)
    _check_loss_channel("CancelLoss", rec, role)
    if rec.pack == r.PACK_SH:
        _require(rec, (r.TEMP_LOSS, r.LOST), "CancelLoss", "SH-19a")
    else:
        rule = _rule(rec.pack, "SH-19a", "GZ-22")
        _require(rec, (r.LOST,), "CancelLoss", rule)
        if rec.has(r.FLAG_REPLACEMENT_APPLIED):
            raise InvalidTransition(r.STATE_NAMES[rec.state], "CancelLoss", rule,
                                    f"a replacement ({rec.replaced_by}) was already applied for")
    rec.state, rec.temp_loss_at = r.ACTIVE, 0
    book.put_card(rec)
    return rec


def report_bank_loss(book, now: int, card_number: str) -> CardRecord:
    rec = load(book, card_number, now)
    if not rec.has(r.FLAG_FINANCIAL_OPEN) or rec.state in r.FINAL_STATES:
        raise InvalidTransition(r.STATE_NAMES[rec.state], "ReportBankLoss", "SH-20",
                                "the financial function is not open")
    if rec.has(r.FLAG_FINANCIAL_FROZEN):
        raise InvalidTransition(r.STATE_NAMES[rec.state], "ReportBankLoss", "SH-20",
                                "a bank loss report already stands")
    rec.set(r.FLAG_FINANCIAL_FROZEN)
    book.put_card(rec)
    return rec


def cancel_bank_loss(book, now: int, card_number: str) -> CardRecord:
    rec = load(book, card_number, now)
    if not rec.has(r.FLAG_FINANCIAL_FROZEN) or rec.state in r.FINAL_STATES:
        raise InvalidTransition(r.STATE_NAMES[rec.state], "CancelBankLoss", "SH-20",
                                "no bank loss report stands")
    rec.set(r.FLAG_FINANCIAL_FROZEN, False)
    book.put_card(rec)
    return rec


# ------------------------------------------------------------------ replacement, cancellation

REPLACE_LOST, REPLACE_DAMAGED, REPLACE_INFO_CHANGED = 1, 2, 3


def replace(book, now: int, card_number: str, reason: int, instant: bool) -> CardRecord:
    """SH-19b (after formal loss), SH-21 (renewal), SH-22 (re-application); GZ-23, GZ-24;
    RC-15. Returns the new card, which starts VERIFIED (the holder is known) or ISSUED when
    made on the spot (SH-23b); the original is superseded when the new card is issued."""
    old = load(book, card_number, now)
    if reason == REPLACE_LOST:
        _require(old, (r.LOST,), "Replace(LOST)", _rule(old.pack, "SH-19b", "GZ-23", "RC-15"),
                 "a lost card is replaced after a formal loss report")
    else:
        _require(old, (r.ISSUED, r.ACTIVE), "Replace", _rule(old.pack, "SH-21", "GZ-24", "RC-15"))
    if old.has(r.FLAG_REPLACEMENT_APPLIED):
        raise InvalidTransition(r.STATE_NAMES[old.state], "Replace", "SH-9",
                                f"replacement {old.replaced_by} is already being made")
    if old.pack == r.PACK_RC and instant:
        raise InvalidArgument("instant", "the Residence Card has no instant issue")
    seq = book.next_seq(b"card_number")
    new = CardRecord(
        card_number=f"{config.pack_card_prefix[old.pack]}{seq:010d}",
        pack=old.pack, state=r.VERIFIED, holder_id=old.holder_id, applied_at=now,
        flags=old.flags & (r.FLAG_TRANSIT | r.FLAG_FINANCIAL_OPEN),
        points=old.points, valid_until=old.valid_until, replaces=old.card_number,
        service_bank=old.service_bank,
    )
    old.set(r.FLAG_REPLACEMENT_APPLIED)
    old.replaced_by = new.card_number
    book.put_card(old)
    if instant:
        _issue(book, new, now)
    book.put_card(new)
    return new


def cancel(book, now: int, card_number: str, reason: str) -> CardRecord:
    """GZ-26 (death, registration cancelled, no longer entitled), RC-16; applied to SH and BJ
    cards alike. A replacement still being made for the card is cancelled with it."""
    rec = load(book, card_number, now)
    rule = _rule(rec.pack, "GZ-26", "GZ-26", "RC-16")
    if rec.state in r.FINAL_STATES:
        raise InvalidTransition(r.STATE_NAMES[rec.state], "Cancel", rule, "the state is final")
    if not reason:
        raise InvalidArgument("reason", "a cancellation must give its legal ground")
    for target in (rec, book.card(rec.replaced_by) if rec.replaced_by else None):
        if target is not None and target.state not in r.FINAL_STATES:
            target.state, target.temp_loss_at = r.CANCELLED, 0
            book.put_card(target)
            book.put_note(target.card_number, reason)
    return rec


def lock_application(book, now: int, card_number: str, channel: int, locked: bool) -> CardRecord:
    """GZ-6/BJ-7: application locking and unlocking, per channel."""
    if channel not in LOCKABLE_CHANNELS:
        raise InvalidArgument("channel", "must be TRANSIT, MEDICAL, BENEFIT, FINANCIAL or SERVICE")
    rec = load(book, card_number, now)
    op = "LockApplication" if locked else "UnlockApplication"
    if rec.state in r.FINAL_STATES:
        raise InvalidTransition(r.STATE_NAMES[rec.state], op, "GZ-6", "the state is final")
    bit = 1 << channel
    if bool(rec.lock_mask & bit) == locked:
        raise InvalidTransition(r.STATE_NAMES[rec.state], op, "GZ-6",
                                "already locked" if locked else "not locked")
    rec.lock_mask = (rec.lock_mask | bit) if locked else (rec.lock_mask & ~bit)
    book.put_card(rec)
    return rec

"""Card lifecycle rules for SH, GZ, BJ (SPEC.md section 2) and the Residence Card's basic
procedures (section 3). Pure domain: a `Book` (typed LMDB transaction), the time `now` and
the caller's role come in; records go out; a forbidden transition raises InvalidTransition
naming state and rule, a role the law does not name for a pack PermissionDenied naming it.

No sweeper job exists: a temporary loss report lapses by arithmetic (`effective_state`) at the
instant its 5 days end, stored when it was made (SH-18b), and a write to such a card first
normalises it. `role=None` (tools, the demo loader, in-process tests) skips the checks of who
may act; every gRPC call passes its caller's role.
"""
import dataclasses
import datetime as dt
import re

from yikatong import calendar, config, ledger
from yikatong.calendar import DAYS_FOR_AN_ACT, WORKING_DAYS
from yikatong.clock import (
    end_of_days,
    end_of_months,
    end_of_years,
    format_time,
    law_date,
    start_of_day,
)
from yikatong.errors import (
    CardNotFound,
    HolderNotFound,
    InvalidArgument,
    InvalidTransition,
    NotEligible,
    PermissionDenied,
    Refused,
)
from yikatong.model import (
    FINAL_STATES,
    PII_FIELDS,
    AccountKind,
    BankLossRules,
    CancelGround,
    Card,
    Channel,
    CreditGround,
    CreditRecord,
    Eligibility,
    Flag,
    HolderChange,
    HolderInfo,
    IssuingBanks,
    Pack,
    Proxy,
    ProxyGround,
    ProxyRelation,
    Reason,
    ReplaceReason,
    ResidenceBasis,
    Role,
    State,
    Step,
    holder_of_account,
    kind_of_account,
    operator_account_key,
)

LOCKABLE_CHANNELS = (Channel.TRANSIT, Channel.MEDICAL, Channel.BENEFIT, Channel.FINANCIAL,
                     Channel.SERVICE)

_SSN = re.compile(r"[0-9]{17}[0-9X]")
_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def ssn_check_digit(first17: str) -> str:
    """GB 11643-1999 (ISO 7064 MOD 11-2) check character of a citizen ID number."""
    return _SSN_CHECK[sum(int(c) * w for c, w in zip(first17, _SSN_WEIGHTS, strict=True)) % 11]


def validate_ssn(ssn: str, field: str = "holder.ssn") -> None:
    if not _SSN.fullmatch(ssn):
        raise InvalidArgument(field, "must be 17 digits and a digit or X (18 characters)")
    if ssn_check_digit(ssn[:17]) != ssn[17]:
        raise InvalidArgument(field, "check digit does not match (GB 11643)")


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_date(field: str, text: str) -> dt.date:
    try:
        if not _DATE.fullmatch(text):  # fromisoformat also takes week dates (2026-W01-1)
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(field, f"{text!r} is not a date YYYY-MM-DD") from None


def effective_state(rec: Card, now: int) -> int:
    """The state as the law sees it at `now`: a lapsed temporary loss is ACTIVE (SH-18b), or
    ISSUED for a card reported lost before it was ever activated (Flag.UNACTIVATED)."""
    if rec.state == State.TEMP_LOSS and now >= rec.temp_loss_until:
        return _restored(rec)
    return rec.state


def _restored(rec: Card) -> int:
    """What a loss report ends in (SH-18b lapse, SH-19a, GZ-22): the functions as they were
    before it, so a card never activated is ISSUED again, not ACTIVE (SH-12)."""
    return State.ISSUED if rec.has(Flag.UNACTIVATED) else State.ACTIVE


def load(book, card_number: str, now: int) -> Card:
    """The card for a write, with a lapsed temporary loss normalised to ACTIVE."""
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    if effective_state(rec, now) != rec.state:
        rec.state, rec.temp_loss_until = _restored(rec), 0
        rec.set(Flag.UNACTIVATED, False)
    return rec


def _require(rec: Card, allowed, operation: str, rule: str, detail: str = "") -> None:
    if rec.state not in allowed:
        raise InvalidTransition(State(rec.state).name, operation, rule, detail)


def _rule(pack: int, sh: str, gz: str, rc: str, bj: str = "") -> str:
    """The rule id for a pack: BJ's Measures leave loss and replacement to implementation
    rules and follow Guangzhou's procedure (`bj`: where a Beijing article names the act
    itself); a Residence Card cites its own Procedures. A refusal never cites another city's
    rule as the card's own."""
    return {Pack.SH: sh, Pack.GZ: gz, Pack.BJ: bj or f"BJ via {gz}", Pack.RC: rc}[Pack(pack)]


# ------------------------------------------------------------------ who may act, per pack

_ONLINE, _COMMUNITY, _BANK = Role.ONLINE_PLATFORM, Role.COMMUNITY_OUTLET, Role.BANK_OUTLET
# Where the law names the channels of an act for one pack, only those may do it there (API.md:
# "that pack allows only those"); the API's role table is the outer bound for the rest.
# SH-18 and SH-19 as the Chinese original reads them; GZ-7, GZ-21, GZ-22, GZ-23 (BJ follows
# GZ); RC-8 and RC-15: a Residence Card is applied for, replaced and reported lost at the
# community service centre.
_CHANNELS: dict[tuple[str, Pack], tuple[str, frozenset[Role]]] = {
    ("Apply", Pack.GZ): ("GZ-7", frozenset({_ONLINE, _BANK})),
    ("Apply", Pack.BJ): ("BJ via GZ-7", frozenset({_ONLINE, _BANK})),
    ("Apply", Pack.RC): ("RC-8", frozenset({_COMMUNITY})),
    ("Replace", Pack.GZ): ("GZ-23", frozenset({_ONLINE, _BANK})),
    ("Replace", Pack.BJ): ("BJ via GZ-23", frozenset({_ONLINE, _BANK})),
    ("Replace", Pack.RC): ("RC-15", frozenset({_COMMUNITY})),
    ("ReportTemporaryLoss", Pack.SH): ("SH-18a", frozenset({Role.SERVICE_HOTLINE, _ONLINE})),
    ("ReportLoss", Pack.SH): ("SH-18c", frozenset({_ONLINE, _COMMUNITY})),
    ("ReportLoss", Pack.GZ): ("GZ-21", frozenset({_ONLINE, Role.SERVICE_HOTLINE, _BANK})),
    ("ReportLoss", Pack.BJ): ("BJ via GZ-21", frozenset({_ONLINE, Role.SERVICE_HOTLINE, _BANK})),
    ("ReportLoss", Pack.RC): ("RC-15b", frozenset({_COMMUNITY})),
    ("CancelLoss", Pack.SH): ("SH-19a", frozenset({_ONLINE, _COMMUNITY})),
    ("CancelLoss", Pack.GZ): ("GZ-22", frozenset({_BANK})),
    ("CancelLoss", Pack.BJ): ("BJ via GZ-22", frozenset({_BANK})),
    # GZ-21: a loss registered at the issuing bank, at its outlet or by its customer-service
    # hotline (银行客服热线), which reaches us through the bank's switch (BANK_SWITCH: API.md
    # has no role of its own for it), is the card's loss registration; GZ-22: deregistered
    # only at the bank's outlet, with an identity document
    ("ReportBankLoss", Pack.GZ): ("GZ-21", frozenset({_BANK, Role.BANK_SWITCH})),
    ("ReportBankLoss", Pack.BJ): ("BJ via GZ-21", frozenset({_BANK, Role.BANK_SWITCH})),
    ("CancelBankLoss", Pack.GZ): ("GZ-22", frozenset({_BANK})),
    ("CancelBankLoss", Pack.BJ): ("BJ via GZ-22", frozenset({_BANK})),
    # GZ-7, GZ-23 (and GZ-6's bank services): a Guangzhou or Beijing card is handled online
    # or at the issuing bank's outlet for every act, not only its application and reissue
    ("Activate", Pack.GZ): ("GZ-7", frozenset({_ONLINE, _BANK})),
    ("Activate", Pack.BJ): ("BJ via GZ-7", frozenset({_ONLINE, _BANK})),
    ("IssueElectronic", Pack.GZ): ("GZ-7", frozenset({_ONLINE, _BANK})),
    ("IssueElectronic", Pack.BJ): ("BJ via GZ-7", frozenset({_ONLINE, _BANK})),
    # RC-3, RC-11, RC-12, RC-16: information comparison, issue and cancellation of a Residence
    # Card are the public security organ's alone
    ("Verify", Pack.RC): ("RC-11", frozenset({Role.PUBLIC_SECURITY})),
    ("Issue", Pack.RC): ("RC-12", frozenset({Role.PUBLIC_SECURITY})),
    ("Cancel", Pack.RC): ("RC-16", frozenset({Role.PUBLIC_SECURITY})),
}
# SH-23b: Shanghai's on-the-spot issue is for replacement and renewal only ("急需补领、换领"),
# at community or bank outlets; GZ-10b and GZ-25: a first card, a reissue or a renewal at the
# issuing bank's instant outlet. The Residence Card has none.
_INSTANT = {Pack.SH: ("SH-23b", frozenset({_COMMUNITY, _BANK})),
            Pack.GZ: ("GZ-10b", frozenset({_BANK})), Pack.BJ: ("BJ via GZ-10b", frozenset({_BANK}))}
# API.md: Verify, Issue and Cancel are the card agency's (Cancel HRSS's too); of Residence
# Cards the public security organ's alone (RC-11, RC-12, RC-16: `_CHANNELS`). The role table
# lets PUBLIC_SECURITY call them at all.
_PUBLIC_SECURITY_PACKS = frozenset({Pack.RC})


def check_channel(operation: str, pack: int, role: Role | None) -> None:
    found = _CHANNELS.get((operation, Pack(pack)))
    if found is None or role is None:
        return
    rule, roles = found
    if role not in roles:
        names = ", ".join(sorted(r.name for r in roles))
        raise PermissionDenied(f"{operation} for a {Pack(pack).name} card is made via {names}, "
                               f"not {Role(role).name} ({rule})", reason=rule)


def _check_instant(operation: str, pack: int, role: Role | None) -> None:
    if pack == Pack.RC:
        raise InvalidArgument("instant", "the Residence Card has no instant issue")
    rule, roles = _INSTANT[Pack(pack)]
    if role is not None and role not in roles:
        names = ", ".join(sorted(r.name for r in roles))
        raise PermissionDenied(f"instant issue of a {Pack(pack).name} card is made at {names}, "
                               f"not {Role(role).name} ({rule})", reason=rule)


# SH-6, SH-10: "公安、人力资源社会保障、医疗保障部门……分别对申请人的基本信息、参加本市社会保险的
# 情况进行核验": each verifies its own part of a Shanghai application (medical security has no
# role in API.md: HRSS carries its part). The card agency, API.md's verifier, records both.
SH_VERIFIERS = {Role.PUBLIC_SECURITY: "identity", Role.HRSS: "insurance"}


def _check_agency(operation: str, rec: Card, role: Role | None) -> None:
    if operation == "Verify" and rec.pack == Pack.SH and role in SH_VERIFIERS:
        return
    if role == Role.PUBLIC_SECURITY and rec.pack not in _PUBLIC_SECURITY_PACKS:
        raise PermissionDenied(f"{operation} of a {Pack(rec.pack).name} card is the card "
                               "agency's; PUBLIC_SECURITY verifies, issues and cancels "
                               "Residence Cards, and verifies a Shanghai applicant's "
                               "identity (SH-10)")
    if role == Role.HRSS and operation == "Verify" and rec.pack in (Pack.GZ, Pack.BJ):
        raise PermissionDenied(f"Verify of a {Pack(rec.pack).name} card is the card agency's; "
                               "HRSS verifies a Shanghai applicant's insurance (SH-10)")
    check_channel(operation, rec.pack, role)


def _sh_part_verified(book, rec: Card, role: Role | None) -> bool:
    """SH-10: one department's part of a Shanghai verification approved; True when none is
    left. The part still owed is the open step's name ("verify insurance" once public
    security has verified the identity), so Deadlines.ListDue says whose it is."""
    part = SH_VERIFIERS.get(role)  # type: ignore[arg-type]
    if part is None:  # the card agency (API.md) records both departments' results at once
        return True
    steps = book.steps_of(rec.card_number)
    other = SH_VERIFIERS[Role.HRSS if part == "identity" else Role.PUBLIC_SECURITY]
    if any(s.step == f"verify {other}" for s in steps):
        raise InvalidTransition(State(rec.state).name, "Verify", "SH-10", (
            f"the applicant's {part} is already verified; the {other} verification by "
            f"{'HRSS' if other == 'insurance' else 'PUBLIC_SECURITY'} is awaited"))
    if any(s.step == f"verify {part}" for s in steps):
        return True  # the other part was done: this one was the last
    step = next((s for s in steps if s.rule == "SH-10"), None) or deadline(
        "verification", "SH-10", WORKING_DAYS, rec.applied_at, 3)
    book.put_steps(rec.card_number, [s for s in steps if s.rule != "SH-10"] + [
        dataclasses.replace(step, step=f"verify {other}")])
    return False


def check_bank(pack: int, bank: str, banks: IssuingBanks | None, field: str) -> None:
    """GZ-9c: a Guangzhou card's issuing bank is on the list Guangzhou's HRSS bureau publishes;
    BJ-7: a Beijing card's cooperative bank on Beijing's own catalogue (each when configured;
    with none that city's check is off, and start-up says so)."""
    rule, listed, whose = "GZ-9c", banks, "Guangzhou's issuing-bank list"
    if pack == Pack.BJ:
        rule, listed = "BJ-7", banks.beijing if banks is not None else None
        whose = "Beijing's catalogue of cooperative banks"
    if listed is not None and pack in (Pack.GZ, Pack.BJ) and bank not in listed.names:
        raise Refused(rule, f"{field} {bank!r} is not on {whose} (version {listed.version}): "
                      f"one of {', '.join(sorted(listed.names))}")


def beijing_banks_said(banks: IssuingBanks | None) -> str:
    """The start-up line's words for BJ-7's list (Beijing's own, never Guangzhou's)."""
    bj = banks.beijing if banks is not None else None
    return "Beijing's cooperative-bank check (BJ-7) " + (
        f"on: list version {bj.version}, {len(bj.names)} banks" if bj is not None else
        "off: no [beijing] list in --issuing-banks")


# ------------------------------------------------------------------ application

# RC-1, RC-5, RC-9: the Residence Card is for "Chinese mainland migrants to Shanghai"; RC-32:
# foreigners, stateless persons and residents of Hong Kong, Macao and Taiwan follow the State's
# own rules. The application's identity number tells some of them: a residence permit of Hong
# Kong, Macao or Taiwan residents bears the address code 810000, 820000 or 830000 (港澳台居民
# 居住证申领发放办法, 2018), a foreigner's permanent residence ID card (2023) begins with 9.
_NOT_MAINLAND = {"81": "a Hong Kong resident's residence permit",
                 "82": "a Macao resident's residence permit",
                 "83": "a Taiwan resident's residence permit",
                 "9": "a foreigner's permanent residence ID card"}
# RC-7 records the nationality; these spellings say Chinese (compared without case or spaces).
_CHINESE = frozenset({"CN", "CHN", "156", "中国", "中华人民共和国", "中国籍", "CHINA", "CHINESE",
                      "PRC", "P.R.C.", "P.R.CHINA", "PEOPLE'SREPUBLICOFCHINA"})


def _in_shanghai(address: str) -> bool:
    """A permanent registered address (户籍地址) in Shanghai."""
    return address.startswith("上海") or address.strip().lower().startswith("shanghai")


def check_eligibility(pack: int, who: Eligibility, now: int,
                      holder: HolderInfo | None = None) -> None:
    """SH-8, GZ-4, BJ-8, RC-9: may this person apply for a card of this pack at all? `holder`
    is the application's personal information as merged with what is held (RC-9, RC-32 read
    its identity number, nationality and registered address)."""
    if pack == Pack.RC:
        _check_mainland_migrant(who, holder)
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
        # SPEC.md section 6: the day of registration is not counted, and "满6个月" is complete
        # at 24:00 of the corresponding day six months on (registered on 21 March: from 00:00
        # on 22 September), not at its start
        complete = end_of_months(start_of_day(since), config.rc_residence_months_min)
        if now < complete:
            raise NotEligible("RC-9", "residence must have been registered in Shanghai for "
                              f"6 months or more (registered on {since.isoformat()}: complete "
                              f"at 24:00 on {law_date(complete - 1).isoformat()})")
        if who.residence_basis not in tuple(ResidenceBasis):
            raise NotEligible("RC-9", "needs legal stable employment, legal stable residence "
                              "or continuous study (residence_basis)")


def _check_mainland_migrant(who: Eligibility, holder: HolderInfo | None) -> None:
    """RC-9 (and RC-16(3), which cancels the card of a holder who registers permanent
    residency in Shanghai): a person with household registration in Shanghai holds no
    Residence Card; RC-32: neither do foreigners, stateless persons and residents of Hong Kong,
    Macao and Taiwan, so far as the application tells them."""
    if who.household_registered:
        raise NotEligible("RC-9", "the Residence Card is for migrants from outside Shanghai; "
                          "an applicant with household registration in Shanghai holds none "
                          "(household_registered; RC-16(3))")
    if holder is None:
        return
    if _in_shanghai(holder.household_address):
        raise NotEligible("RC-9", "the Residence Card is for migrants from outside Shanghai; "
                          "the permanent registered address (household_address) is in "
                          "Shanghai (RC-16(3))")
    for prefix, document in _NOT_MAINLAND.items():
        if holder.ssn.startswith(prefix):
            raise NotEligible("RC-32", f"the identity number is {document}; the Residence "
                              "Card is for Chinese mainland migrants, and foreigners and "
                              "residents of Hong Kong, Macao and Taiwan follow the State's "
                              "own rules")
    spelled = "".join(holder.nationality.split()).upper()
    if spelled not in _CHINESE:
        raise NotEligible("RC-32", f"nationality {holder.nationality!r} is not Chinese (say "
                          "CN, CHN or 中国); the Residence Card is for Chinese mainland "
                          "migrants, and foreigners and stateless persons follow the State's "
                          "own rules")


def _points_in_force(book, holder_id: int, pack: int) -> int:
    """RC-20: a holder's score in force, as the card record holds it (0 to 65,535): a new
    Residence Card carries it (art. 31: points need not be applied for again)."""
    record = book.points(holder_id) if pack == Pack.RC else None
    return max(0, min(record.points, 65535)) if record is not None else 0


# What each article makes the outlet record at application (API.md `Apply`), in the order
# a refusal names them. SH-9: "交验本人有效身份证件，现场核对本人姓名、国籍、民族、性别、
# 相片等信息，并提供通讯地址、邮政编码" (the photo from 7 full years: below). GZ-9: "valid
# identity document, photo, occupation, mobile phone number, mailing address", and the
# issuing bank. RC-7: "name, sex, nationality, date of birth, citizen ID number, recent photo,
# permanent registered residential address, residential address". BJ's Measures name none
# (BJ-17 leaves it to implementation rules): the identity document's name and date of birth.
APPLICATION_RECORDS: dict[Pack, tuple[str, ...]] = {
    Pack.SH: ("name", "birth_date", "gender", "nationality", "ethnicity", "address",
              "postcode"),
    Pack.GZ: ("name", "birth_date", "phone", "occupation", "photo_sha256", "address"),
    Pack.BJ: ("name", "birth_date"),
    Pack.RC: ("name", "birth_date", "household_address", "residence_address", "gender",
              "nationality", "photo_sha256"),
}


def application_missing(pack: int, service_bank: str, who: Eligibility) -> list[str]:
    """The items of an application itself (not the holder's information) that are missing:
    GZ-9's issuing bank; RC-9's residence registration and its basis (the document proofs)."""
    missing = []
    if pack == Pack.GZ and not service_bank:
        missing.append("service_bank")
    if pack == Pack.RC:
        if not who.residence_registered_since:
            missing.append("residence_registered_since")
        if not who.residence_basis:
            missing.append("residence_basis")
    return missing


def merge_holder(pack: int, given: HolderInfo, held: HolderInfo | None,
                 reveal: bool = True, now: int | None = None,
                 also_missing: list[str] | None = None) -> HolderInfo:
    """GZ-9b: information already held is not asked for again (an empty field takes the held
    value). GZ-20: a held value is never silently overwritten by a different one. What the
    pack's application needs is checked on the merged information (as of `now`, for what
    depends on the holder's age), with the application's own missing items (`also_missing`):
    every one named in one refusal (RC-10). `reveal` False (a role that may not read PII): a
    refusal does not say which held value differs."""
    merged = HolderInfo(given.ssn, **{f: getattr(given, f) for f in PII_FIELDS})
    if held is not None:
        for f in PII_FIELDS:
            mine, theirs = getattr(merged, f), getattr(held, f)
            if not mine:
                setattr(merged, f, theirs)
            elif theirs and mine != theirs:
                # RC-13: a Residence Card holder's changed information is filed as a change
                # SH-9: what the outlet checked against the identity document and the
                # applicant confirmed; GZ-20, BJ-7: a correction or information change
                raise InvalidTransition("held", "Apply", _rule(pack, "SH-9", "GZ-20", "RC-13",
                                                               "BJ-7"), (
                    f"holder.{f} differs from the information held" if reveal else
                    "the personal information given differs from the information held")
                    + "; file a correction (Holders.CorrectHolder) instead")
    required = list(APPLICATION_RECORDS[Pack(pack)])
    if pack == Pack.SH and now is not None and merged.birth_date and \
            now >= age_reached(merged.birth_date, 7):
        # SH-9: the outlet checks the applicant's photo (art. 9, 现场核对…相片); SH-22b: from
        # 7 full years a Shanghai card is printed with one. A younger child's may be without.
        required.append("photo_sha256")
    missing = [f"holder.{f}" for f in required if not getattr(merged, f)]
    missing += also_missing or []
    if missing:  # RC-10: what is missing is told at once, all of it
        raise InvalidArgument(missing[0], "is required for this application and not held for "
                              "this holder" + (f"; missing too: {', '.join(missing[1:])}"
                                               if missing[1:] else ""))
    return merged


def apply(book, now: int, *, pack: int, holder: HolderInfo, eligibility: Eligibility,
          with_transit: bool, service_bank: str, instant: bool, role: Role | None = None,
          banks: IssuingBanks | None = None, client_id: str = "", reveal: bool = True,
          proxy: Proxy | None = None) -> Card:
    """SH-9/GZ-7/GZ-9/RC-8: record an application from an eligible person (SH-8, GZ-4, BJ-8,
    RC-9), reusing the personal information already held (GZ-9b). A held field that was
    empty and is filled by this application is kept in the holder's history (GZ-20), so a
    value planted by someone else's application is seen and corrected. `reveal` False (the
    caller's role may not read PII): refusals name no held value and no card number."""
    check_channel("Apply", pack, role)
    if pack == Pack.RC and with_transit:
        raise InvalidArgument("with_transit", "the Residence Card has no transit function")
    if instant:
        if pack == Pack.SH:
            raise Refused("SH-23b", "a first Shanghai application is never made on the spot; "
                          "instant issue is for replacement and renewal (急需补领、换领)")
        _check_instant("Apply", pack, role)
    found = book.holder(holder.ssn)
    # RC-10 (and good service everywhere): completeness first, every missing item in one
    # refusal, before eligibility is judged
    merged = merge_holder(pack, holder, found[1] if found is not None else None, reveal, now,
                          application_missing(pack, service_bank, eligibility))
    check_eligibility(pack, eligibility, now, merged)
    check_bank(pack, service_bank, banks, "service_bank")
    held_residence = ""
    if found is None:
        holder_id = book.next_seq(b"holder_id")
        book.put_holder(holder_id, merged)
    else:
        holder_id, held = found
        held_residence = held.residence_address
        current = book.current_card(holder_id, pack)
        if current is not None:
            cur = load(book, current, now)
            named = current if reveal else "of this pack"
            if cur.state in (State.APPLIED, State.VERIFIED):
                raise InvalidTransition(State(cur.state).name, "Apply",
                                        _rule(pack, "SH-9", "GZ-9", "RC-9"),
                                        f"application {named} is already open for this holder")
            if cur.state not in FINAL_STATES:
                raise InvalidTransition(State(cur.state).name, "Apply",
                                        _rule(pack, "SH-23c", "GZ-23", "RC-15"),
                                        f"holder already has a card {named}; use Replace")
        if merged != held:
            for f in PII_FIELDS:
                if getattr(merged, f) != getattr(held, f):  # only ever an empty field filled
                    book.add_holder_change(holder_id, HolderChange(
                        now, f, getattr(held, f), getattr(merged, f), client_id,
                        "Lifecycle.Apply", "filled from an application (GZ-9b)"))
            book.put_holder(holder_id, merged)
    if proxy is not None:
        check_proxy(pack, proxy, merged, now)
    if merged.residence_address != held_residence:  # RC-13: the history starts here
        book.add_residence(holder_id, now, merged.residence_address)
    seq = book.next_seq(b"card_number")
    rec = Card(
        card_number=f"{config.pack_card_prefix[Pack(pack)]}{seq:010d}",
        pack=pack, state=State.APPLIED, holder_id=holder_id, applied_at=now,
        service_bank=service_bank, points=_points_in_force(book, holder_id, pack),
    )
    rec.set(Flag.TRANSIT, with_transit)
    book.set_current_card(holder_id, pack, rec.card_number)
    if proxy is not None:
        book.put_card_text(rec.card_number, "proxy", " ".join((
            ProxyRelation(proxy.relation).name, ProxyGround(proxy.ground).name, proxy.ssn,
            proxy.name)))
    if instant:  # GZ-10b: made on the spot
        _issue(book, rec, now)
    else:
        book.put_steps(rec.card_number, _steps_of_an_application(rec))
    book.put_card(rec, now)
    return rec


def age_reached(birth_date: str, years: int) -> int:
    """The instant a person born on `birth_date` is `years` full years old (周岁): 24:00 of
    that birthday, the day of birth not being counted (SPEC.md section 6)."""
    return end_of_years(start_of_day(parse_date("holder.birth_date", birth_date)), years)


# RC-8's grounds, as ages: under 16 until the instant of 16 full years; the elderly from 60
ELDERLY_AGE = 60


def check_proxy(pack: int, proxy: Proxy, holder: HolderInfo, now: int) -> None:
    """RC-8: minors under 16, the elderly with mobility problems and disabled persons may
    apply through a guardian or close relative, who shows their own identity document."""
    if pack != Pack.RC:
        raise InvalidArgument("proxy", "is RC-8's: an application on another's behalf is for a "
                              "Residence Card")
    if proxy.ssn == holder.ssn:
        raise InvalidArgument("proxy.ssn", "is the holder's own; leave proxy empty")
    if proxy.ground == ProxyGround.MINOR_UNDER_16:
        sixteen = age_reached(holder.birth_date, 16)
        if now >= sixteen:
            raise Refused("RC-8", "the holder is 16 or over (since "
                          f"{law_date(sixteen).isoformat()}): applies in person, or on "
                          "another RC-8 ground")
    elif proxy.ground == ProxyGround.ELDERLY_MOBILITY:
        sixty = age_reached(holder.birth_date, ELDERLY_AGE)
        if now < sixty:
            raise Refused("RC-8", f"the holder is under {ELDERLY_AGE} (until "
                          f"{law_date(sixty).isoformat()}): not among the elderly")


def verify(book, now: int, card_number: str, approved: bool, reason: str,
           role: Role | None = None, special_circumstances: str = "") -> Card:
    """SH-10, GZ-10, RC-11. RC-12: where special circumstances keep a Residence Card from
    being made within 15 working days of acceptance, the verifier says why, and its issue is
    due within 30."""
    rec = load(book, card_number, now)
    _check_agency("Verify", rec, role)
    _require(rec, (State.APPLIED,), "Verify", _rule(rec.pack, "SH-10", "GZ-10", "RC-11"))
    if special_circumstances and (rec.pack != Pack.RC or not approved):
        raise InvalidArgument("special_circumstances", "is RC-12's: for a Residence Card "
                              "application that is approved")
    if approved and rec.pack == Pack.SH and not _sh_part_verified(book, rec, role):
        return rec  # APPLIED still: the other department's part is owed (its step names it)
    if approved:
        rec.state = State.VERIFIED
        steps = [s for s in book.steps_of(card_number) if s.rule != "SH-10"]
        if rec.pack == Pack.SH:  # SH-11 (a re-application too): made and issued in 30 days
            steps.append(deadline("issue", "SH-11", DAYS_FOR_AN_ACT, now, 30))
        if special_circumstances:
            steps = _special(book, now, rec, special_circumstances, steps)
        book.put_steps(card_number, steps)
    else:
        book.put_steps(card_number, [])
        if not reason:
            raise InvalidArgument("reason",
                                  "a rejection must say why: the applicant is told (SH-10)")
        rec.state = State.REJECTED
        book.put_card_text(card_number, "note", reason)
        _free_original(book, now, rec)
    book.put_card(rec, now)
    return rec


def _special(book, now: int, rec: Card, text: str, steps: list[Step]) -> list[Step]:
    """RC-12: special circumstances stated up to the 15th working day's end move the card's
    issue to at most 30 working days from acceptance; `steps` with the issue step moved."""
    for s in steps:
        if s.rule == "RC-12" and s.due_at and s.due_at <= now:
            raise Refused("RC-12", "the 15 working days ended at 24:00 of "
                          f"{law_date(s.due_at - 1).isoformat()}: special "
                          "circumstances are stated before the card is late")
    book.put_card_text(rec.card_number, "special", text)
    return [s for s in steps if s.rule != "RC-12"] + [
        deadline("issue", "RC-12", WORKING_DAYS, rec.applied_at, 30)]


def state_special_circumstances(book, now: int, card_number: str, text: str,
                                role: Role | None = None) -> Card:
    """RC-12: "If the Residence Card cannot be made on schedule due to the special
    circumstances, the time limit ... shall not exceed 30 working days": circumstances that
    arise after verification are stated then, by public security, before the card is made."""
    rec = load(book, card_number, now)
    if rec.pack != Pack.RC:
        raise InvalidTransition(State(rec.state).name, "StateSpecialCircumstances", "RC-12",
                                "special circumstances are a Residence Card's")
    _check_agency("StateSpecialCircumstances", rec, role)
    _require(rec, (State.VERIFIED,), "StateSpecialCircumstances", "RC-12",
             "stated after verification and before issue; at verification, with Verify")
    if not text.strip():
        raise InvalidArgument("special_circumstances", "is required: why the card cannot be "
                              "made within 15 working days (RC-12)")
    if book.card_text(card_number, "special"):
        raise Refused("RC-12", "special circumstances were already stated for this card")
    book.put_steps(card_number, _special(book, now, rec, text, book.steps_of(card_number)))
    book.put_card(rec, now)
    return rec


def _free_original(book, now: int, rec: Card) -> None:
    """A replacement that will never be issued (rejected, withdrawn): its original may be
    replaced again (and, GZ-22, deregistered), so the holder is never stuck; and it owes no
    fee (GZ-27, RC-33)."""
    _reverse_fee(book, now, rec)
    if rec.replaces:
        original = book.card(rec.replaces)
        if original is not None and original.replaced_by == rec.card_number:
            original.set(Flag.REPLACEMENT_APPLIED, False)
            original.replaced_by = ""
            book.put_card(original, now)


POINTS_STEP = "points decision"  # RC-23 (yikatong.points): moves with the current card
PHOTO_STEP = "photo card"  # SH-22b


def _issue(book, rec: Card, now: int) -> None:
    rec.issued_at = now
    steps = _photo(book, rec)  # every step of its making is done
    if rec.replaces:  # an open points application follows the holder's current card
        steps += [s for s in book.steps_of(rec.replaces) if s.step == POINTS_STEP]
        book.put_steps(rec.replaces, [])
    book.put_steps(rec.card_number, steps)
    if rec.pack == Pack.RC:
        # RC has no activation step: issued is in force. RC-14: valid one year, to 24:00 of
        # the corresponding day (SPEC.md section 6).
        rec.state = State.ACTIVE
        if not rec.valid_until:
            rec.valid_until = rc_year_end(now)
    else:
        rec.state = State.ISSUED
    if rec.replaces:  # SH-23c: the original is invalid for ever once the new card is issued
        old = book.card(rec.replaces)
        if rec.pack == Pack.RC:  # RC-14, RC-20: a renewal or a points decision on the
            # original while this card was made holds for it too
            rec.valid_until, rec.points = reissued_validity(old, rec, now), old.points
        old.state, old.temp_loss_until = State.SUPERSEDED, 0
        book.put_card(old, now)
        book.set_current_card(rec.holder_id, rec.pack, rec.card_number)


def rc_year_end(t: int) -> int:
    """RC-14: a Residence Card's year from `t`, to 24:00 of the corresponding day (SPEC.md
    section 6): issued on 21 September 2026, valid to 24:00 on 21 September 2027. A year that
    ends on a rest day runs to 24:00 of the next working day (art. 203: the holder renews it
    at a community service centre, open then). One stored instant: an end counted through a
    year without its notice is the provisional count, kept (DECISIONS.md)."""
    return calendar.end_of_years_for_an_act(t, config.rc_valid_years).at


def reissued_validity(old: Card, new: Card, now: int) -> int:
    """RC-14 on a card reissued or replaced under RC-15: the original's validity as it is now
    (renewed while the new card was made, lost or not, or not renewed), but never one that
    issues the new card already lapsed: a reissue applied for before the original expired
    runs on for the next year from its expiry (the holder is not suspended for the time the
    card took to make); one applied for after it had lapsed is in force for a year from its
    issue, as a lapsed card renewed at the same community service centre (DECISIONS.md)."""
    if old.valid_until > now or not old.valid_until:
        return old.valid_until
    if new.applied_at < old.valid_until:
        return rc_year_end(old.valid_until - 1)
    return rc_year_end(now)


def _photo(book, rec: Card) -> list[Step]:
    """The card is made with the holder's photo when one is held (SH-4, GZ-17, BJ-4).
    SH-22b: "a child who has reached 7 full years shall exchange for a card printed with a
    photo": a Shanghai card made without one owes that from the 7th birthday (a Deadlines
    item, closed when the card is superseded)."""
    ssn = book.holder_ssn(rec.holder_id)
    found = book.holder(ssn) if ssn else None
    if found is not None and found[1].photo_sha256:
        rec.set(Flag.PHOTO)
        return []
    if rec.pack == Pack.SH and found is not None and found[1].birth_date:
        # a child's card; or one made again for a holder past 7 who still has no photo held
        # (a replacement of a child's card): owed since the 7th birthday, overdue at once
        return [Step(PHOTO_STEP, "SH-22b", age_reached(found[1].birth_date, 7))]
    return []


def issue(book, now: int, card_number: str, role: Role | None = None,
          issuing_organ: str = "") -> Card:
    rec = load(book, card_number, now)
    _check_agency("Issue", rec, role)
    _require(rec, (State.VERIFIED,), "Issue", _rule(rec.pack, "SH-11", "GZ-10", "RC-12"))
    if rec.pack == Pack.RC:
        if not issuing_organ:
            raise InvalidArgument("issuing_organ", "is required for a Residence Card: the "
                                  "public security organ that issues it (RC-7, RC-12)")
        book.put_card_text(card_number, "organ", issuing_organ)
    elif issuing_organ:
        raise InvalidArgument("issuing_organ", "is only for a Residence Card (RC-7)")
    _issue(book, rec, now)
    book.put_card(rec, now)
    return rec


def activate(book, now: int, card_number: str, role: Role | None = None) -> Card:
    """SH-12: activation opens the social security functions. GZ-12: the day the holder
    receives the card is recorded (GZ-27's free year counts from it). GZ-6, GZ-7: a
    Guangzhou or Beijing card online or at the issuing bank's outlet."""
    rec = load(book, card_number, now)
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "Activate", "RC-12",
                                "a Residence Card is in force once issued")
    check_channel("Activate", rec.pack, role)
    _require(rec, (State.ISSUED,), "Activate",
             _rule(rec.pack, "SH-12", "GZ-6", "RC-12", "BJ-7"))  # GZ-6, BJ-7: a bank service
    rec.state = State.ACTIVE
    rec.received_at = now
    book.put_card(rec, now)
    return rec


def open_financial(book, now: int, card_number: str, bank: str) -> Card:
    """SH-14: the financial function is opened at the holder's choice, with the service bank
    the card was made for; SH-22(4), GZ-24(3): another bank is a new card."""
    rec = load(book, card_number, now)
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "OpenFinancial", "RC-17",
                                "the Residence Card has no financial function")
    rule = _rule(rec.pack, "SH-14", "GZ-13", "RC-17", "BJ-2")  # GZ-13: the financial account
    _require(rec, (State.ISSUED, State.ACTIVE), "OpenFinancial", rule)
    if rec.has(Flag.FINANCIAL_OPEN):
        raise InvalidTransition(State(rec.state).name, "OpenFinancial", rule,
                                "the financial function is already open")
    if rec.service_bank and bank != rec.service_bank:
        raise InvalidTransition(
            State(rec.state).name, "OpenFinancial", _rule(rec.pack, "SH-22", "GZ-24", "RC-17"),
            f"this card's service bank is {rec.service_bank!r}, chosen with its application; a "
            "change of service bank is a re-application that makes a new card (Replace with "
            "REPLACE_REASON_INFO_CHANGED and the new service_bank)")
    rec.set(Flag.FINANCIAL_OPEN)
    rec.service_bank = bank
    book.put_card(rec, now)
    return rec


# ------------------------------------------------------------------ loss

def report_temporary_loss(book, now: int, card_number: str, role: Role | None = None) -> Card:
    """SH-18a: frozen at once; SH-18b: for 5 days counted as SPEC.md section 6 says, to
    24:00 of the fifth day after the report, an instant stored now. SH-17: a lost card is
    reported lost whether or not it was activated; one never activated lapses to ISSUED."""
    rec = load(book, card_number, now)
    if rec.pack != Pack.SH:
        raise InvalidTransition(State(rec.state).name, "ReportTemporaryLoss",
                                _rule(rec.pack, "SH-18a", "GZ-21", "RC-15b"),
                                "this pack has no temporary loss report; use ReportLoss")
    check_channel("ReportTemporaryLoss", rec.pack, role)
    _require(rec, (State.ISSUED, State.ACTIVE), "ReportTemporaryLoss", "SH-18a")
    rec.set(Flag.UNACTIVATED, rec.state == State.ISSUED)
    rec.state, rec.loss_reported_at = State.TEMP_LOSS, now
    rec.temp_loss_until = end_of_days(now, config.temp_loss_valid_days)
    book.put_card(rec, now)
    return rec


# The longest run of rest days a State Council notice has set (Spring Festival 2026: 15 to 23
# February, 9 days), and a day more: no official count ends later than a provisional one by more.
PROVISIONAL_MARGIN_DAYS = 10


def deadline(step: str, rule: str, kind: int, start: int, n: int) -> Step:
    """A step due at the end of `n` days or working days (`kind`) from `start`, kept with how
    it was counted: one counted through a year without its notice is provisional, and
    `recount` counts it again when that year's file is installed."""
    end = calendar.count(kind, start, n)
    return Step(step, rule, end.at, kind, start, n, end.provisional)


def recount(book) -> list[tuple[str, Step, Step]]:
    """Count every provisional step again on the calendar now installed (at start and on a
    reload of the calendar files); returns (card, before, after) for each one changed: its
    end moved, or it is no longer provisional."""
    changed = []
    for card_number, steps in list(book.open_steps()):
        if isinstance(steps, Exception) or not any(s.provisional for s in steps):
            continue  # an unreadable record is ListDue's to report
        new = [deadline(s.step, s.rule, s.kind, s.start, s.n) if s.provisional else s
               for s in steps]
        if new != steps:
            book.put_steps(card_number, new)
            changed += [(card_number, a, b) for a, b in zip(steps, new, strict=True) if a != b]
            for s in new:
                if s.rule == "RC-23":  # the points application shows its end too
                    _recount_points_application(book, card_number, calendar.End(
                        s.due_at, s.provisional))
    return changed


def _recount_points_application(book, card_number: str, due_at: calendar.End) -> None:
    rec = book.card(card_number)
    record = book.points(rec.holder_id) if rec is not None else None
    if record is not None and record.HasField("open_application"):
        record.open_application.due_at = due_at.at
        record.open_application.due_provisional = due_at.provisional
        book.put_points(rec.holder_id, record)


def _steps_of_an_application(rec: Card) -> list[Step]:
    """What the agency owes an application from its acceptance (SPEC.md, SH-10, SH-11,
    GZ-10, SH-23a, GZ-25, RC-12): the clock starts at `applied_at`."""
    t = rec.applied_at
    if rec.pack == Pack.SH:
        if rec.state == State.VERIFIED:  # a replacement or renewal: no verification (SH-23a)
            return [deadline("replacement", "SH-23a", DAYS_FOR_AN_ACT, t, 15)]
        # a first application, or a re-application (SH-22): SH-10, then SH-11
        return [deadline("verification", "SH-10", WORKING_DAYS, t, 3)]
    if rec.pack == Pack.RC:
        return [deadline("issue", "RC-12", WORKING_DAYS, t, 15)]
    if rec.replaces:  # GZ-25 (BJ follows GZ)
        return [deadline("replacement", "GZ-25", WORKING_DAYS, t, 12)]
    return [deadline("issue", "GZ-10", WORKING_DAYS, t, 12)]


def due(book, now: int, within_days: int) -> list[tuple[str, Step]]:
    """Deadlines.ListDue: every open step overdue or due within `within_days` days, soonest
    first (SH-27(2): unjustified delay is a breach of duty). An end counted provisionally
    (a year without its notice) is listed, marked so; a card whose steps cannot be read is
    listed with the error instead of a Step (first), and never stops the listing."""
    horizon = now + within_days * 86400
    out: list = []
    for card_number, steps in book.open_steps():
        if isinstance(steps, Exception):  # listed as a problem: the rest are still listed
            out.append((card_number, steps))
            continue
        for s in steps:
            if s.due_at <= horizon:
                out.append((card_number, s))
    return sorted(out, key=lambda item: (getattr(item[1], "due_at", 0), item[0]))


def renewal_opens(valid_until: int) -> int:
    """RC-14: renewal is done from 30 days before the expiry date, the last day of validity
    (the day before `valid_until`, which is 24:00 of it): 00:00 of that day less 30 days. A
    card valid to 24:00 on 21 September 2027 may be renewed from 22 August 2027. Art. 203
    moves a last day that is a rest day to the next working day, not the window's start: it
    opens 30 days before the first of the rest days just before the last day (the earliest
    day the year can have ended on), never later than it would have opened unmoved."""
    expiry_date = law_date(valid_until - 1)
    while not calendar.is_working_day(expiry_date - dt.timedelta(days=1)):
        expiry_date -= dt.timedelta(days=1)
    return start_of_day(expiry_date - dt.timedelta(days=30))


def renew(book, now: int, card_number: str) -> Card:
    """RC-14: a Residence Card is renewed once a year, from 30 days before it expires; renewed
    in time, the new year runs on from the old expiry; not renewed in time, the card is
    suspended (RC_NOT_RENEWED) and resumes when renewed, valid one year from that day."""
    rec = load(book, card_number, now)
    if rec.pack != Pack.RC:
        raise InvalidTransition(State(rec.state).name, "Renew", "RC-14",
                                "only a Residence Card is renewed")
    # RC-14 with RC-15: a lost card is renewed in its window too (the holder reported the
    # loss and asks for the reissue at the same centre): its renewal carries to the reissued
    # card when that is issued (_issue), as a renewal during any replacement does
    _require(rec, (State.ACTIVE, State.LOST), "Renew", "RC-14",
             "a card in force, suspended for want of renewal, or lost is renewed")
    opens = renewal_opens(rec.valid_until)
    if now < opens:
        ends, last = law_date(opens) + dt.timedelta(days=30), law_date(rec.valid_until - 1)
        raise Refused("RC-14", f"renewal opens on {law_date(opens).isoformat()}, 30 days "
                      f"before the card expires on {ends.isoformat()}" + (
                          "" if ends == last else " (a rest day: it stays in force to 24:00 "
                          f"on {last.isoformat()}, the next working day)"))
    if now < rec.valid_until:  # in time: the next year follows on
        rec.valid_until = rc_year_end(rec.valid_until - 1)
    else:  # lapsed: resumes now, for a year from today
        rec.valid_until = rc_year_end(now)
    book.put_card(rec, now)
    return rec


def change_information(book, now: int, card_number: str, given: HolderInfo, changed_on: str,
                       client_id: str) -> tuple[Card, calendar.End, bool]:
    """RC-13: a change of the Shanghai residence address or other registered information is
    filed within 30 days of the change (to 24:00 of the 30th day after it, or of the next
    working day when that one is a rest day, Civil Code art. 203). A late filing is
    taken and recorded as late. Every value replaced is kept in the holder's history (GZ-20's
    way), the residence address's history gets the new one from the day it changed. Returns
    (the card, when the filing was due, whether it was late).

    A holder's filing is judged late only on the official count (SPEC.md section 6): where
    the end was counted through a year without its notice, a filing after it is late only
    once it is past any end that year's notice could set, the longest run of official rest
    days (PROVISIONAL_MARGIN_DAYS) after the provisional one."""
    rec = load(book, card_number, now)
    if rec.pack != Pack.RC:
        raise InvalidTransition(State(rec.state).name, "ChangeInformation", "RC-13",
                                "only a Residence Card holder files changes here")
    _require(rec, (State.ACTIVE, State.LOST), "ChangeInformation", "RC-13")
    changed = start_of_day(parse_date("changed_on", changed_on))
    if changed > now:
        raise InvalidArgument("changed_on", "is in the future")
    due = calendar.end_of_days_for_an_act(changed, 30)  # a rest day's end moves on (art. 203)
    late = now >= due.at + (PROVISIONAL_MARGIN_DAYS * 86400 if due.provisional else 0)
    ssn = book.holder_ssn(rec.holder_id)
    if ssn is None:
        raise HolderNotFound(f"no holder record for card {card_number}")
    reason = (f"RC-13: changed on {changed_on}, filed "
              + ("late (due by 24:00 of " if late else "in time (due by 24:00 of ")
              + f"{law_date(due.at - 1).isoformat()}"
              + (", counted provisionally)" if due.provisional else ")"))
    _, info, fields = correct_holder(book, now, HolderInfo(ssn, **{
        f: getattr(given, f) for f in PII_FIELDS}), reason, client_id,
        "ResidenceCard.ChangeInformation", residence_since=changed)
    if not fields:
        raise InvalidArgument("holder", "changes nothing that is held")
    return rec, due, late


def report_loss(book, now: int, card_number: str, role: Role | None = None) -> Card:
    """SH-18c, GZ-21, RC-15b: a formal loss report, directly or within a temporary one's 5
    days. SH-17, GZ-21: "社会保障卡遗失的": a card issued and not yet activated (one lost in
    the post) is reported lost too, and stops as any lost card does (GZ: FINANCIAL too)."""
    rec = load(book, card_number, now)
    check_channel("ReportLoss", rec.pack, role)
    if rec.pack == Pack.SH:
        _require(rec, (State.ISSUED, State.ACTIVE, State.TEMP_LOSS), "ReportLoss", "SH-18c")
    else:
        _require(rec, (State.ISSUED, State.ACTIVE), "ReportLoss",
                 _rule(rec.pack, "SH-18c", "GZ-21", "RC-15b"))
    if rec.state in (State.ISSUED, State.ACTIVE):
        rec.loss_reported_at = now
        rec.set(Flag.UNACTIVATED, rec.state == State.ISSUED)
    rec.state, rec.temp_loss_until = State.LOST, 0
    book.put_card(rec, now)
    return rec


def cancel_loss(book, now: int, card_number: str, role: Role | None = None) -> Card:
    rec = load(book, card_number, now)
    if rec.pack == Pack.RC:  # RC-15b: lost until reissued under RC-15
        raise InvalidTransition(State(rec.state).name, "CancelLoss", "RC-15b",
                                "a lost Residence Card stays lost until it is reissued")
    check_channel("CancelLoss", rec.pack, role)
    if rec.pack == Pack.SH:
        _require(rec, (State.TEMP_LOSS, State.LOST), "CancelLoss", "SH-19a")
    else:
        rule = _rule(rec.pack, "SH-19a", "GZ-22", "RC-15b")
        _require(rec, (State.LOST,), "CancelLoss", rule)
        if rec.has(Flag.REPLACEMENT_APPLIED):
            raise InvalidTransition(State(rec.state).name, "CancelLoss", rule,
                                    f"a replacement ({rec.replaced_by}) was already applied for")
    # SH-19a "社会保障功能即时恢复", GZ-22 "resume normal use": as they were before the
    # loss, so a card never activated is ISSUED again (SH-12's activation is still owed)
    rec.state, rec.temp_loss_until = _restored(rec), 0
    rec.set(Flag.UNACTIVATED, False)
    book.put_card(rec, now)
    return rec


_BANK_LOSS_DEFAULT = BankLossRules()


def bank_loss_rules(banks: IssuingBanks | None, bank: str) -> BankLossRules:
    """SH-20: the rules of the service bank `bank` for its loss reports, as configured; a bank
    with none configured (or no file): the report stands until cancelled, by either bank
    role (API.md)."""
    return banks.loss_rules.get(bank, _BANK_LOSS_DEFAULT) if banks is not None \
        else _BANK_LOSS_DEFAULT


def _roles(roles) -> str:
    return " or ".join(sorted(Role(r).name for r in roles))


def bank_loss_rules_said(banks: IssuingBanks | None) -> str:
    """The start-up and reload line's words for SH-20's rules, every configured bank named."""
    def said(r: BankLossRules) -> str:
        by = _roles(r.cancelled_by)
        if not r.valid_days:
            return f"stand until cancelled by {by}"
        return (f"lapse at 24:00 of the {_ordinal(r.valid_days)} day after the report, "
                + (f"cancelled by {by}" if by else "never cancelled before"))

    rules = banks.loss_rules if banks is not None else {}
    parts = [f"{name}'s {said(rules[name])}" for name in sorted(rules)]
    parts.append(("any other bank's " if parts else "")
                 + f"stand until cancelled by {_roles(_BANK_LOSS_DEFAULT.cancelled_by)}")
    return "bank loss reports (SH-20)" + (": " if len(parts) > 1 else " ") + "; ".join(parts)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def financial_frozen(book, rec: Card, now: int) -> bool:
    """SH-20: a bank loss report stands on the card at `now`: reported and not cancelled, and
    its bank's days (stored when it was made) not over."""
    if not rec.has(Flag.FINANCIAL_FROZEN):
        return False
    end = book.bank_loss_end(rec.card_number)
    return end == 0 or now < end


def report_bank_loss(book, now: int, card_number: str, role: Role | None = None,
                     banks: IssuingBanks | None = None) -> Card:
    """SH-20: the financial function's own loss report, at the bank (frozen for FINANCIAL
    only); valid as the service bank's rules say: until cancelled, or to 24:00 of its N-th
    day after the report (counted as SPEC.md section 6 says), an instant stored now.

    A financial-only loss is Shanghai's. GZ-21: a Guangzhou (and Beijing) card's loss
    registered at the bank, at its outlet or by its customer-service hotline, "the settlement
    account of the social security card will be suspended" (GZ-13: the medical and the
    financial account): the card's loss registration, LOST, whether or not its financial
    function was opened. The Residence Card has no financial function (RC-17)."""
    rec = load(book, card_number, now)
    if rec.pack in (Pack.GZ, Pack.BJ):
        check_channel("ReportBankLoss", rec.pack, role)
        return report_loss(book, now, card_number)  # the bank's channel, checked above
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "ReportBankLoss", "RC-17",
                                "the Residence Card has no financial function")
    if not rec.has(Flag.FINANCIAL_OPEN) or rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "ReportBankLoss", "SH-20",
                                "the financial function is not open")
    if financial_frozen(book, rec, now):
        raise InvalidTransition(State(rec.state).name, "ReportBankLoss", "SH-20",
                                "a bank loss report already stands")
    days = bank_loss_rules(banks, rec.service_bank).valid_days
    rec.set(Flag.FINANCIAL_FROZEN)
    book.put_bank_loss_end(card_number, end_of_days(now, days) if days else 0)
    book.put_card(rec, now)
    return rec


def cancel_bank_loss(book, now: int, card_number: str, role: Role | None = None,
                     banks: IssuingBanks | None = None) -> Card:
    """SH-20: cancelled by whom the service bank's rules say; a report whose days are over no
    longer stands, and there is nothing to cancel. GZ-22: a Guangzhou or Beijing card's loss
    registered at the bank is deregistered at the issuing bank's outlet (a financial-only
    freeze an earlier release put on such a card is lifted as it was)."""
    rec = load(book, card_number, now)
    if rec.pack in (Pack.GZ, Pack.BJ) and not rec.has(Flag.FINANCIAL_FROZEN):
        check_channel("CancelBankLoss", rec.pack, role)
        return cancel_loss(book, now, card_number)  # the bank's outlet, checked above
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "CancelBankLoss", "RC-17",
                                "the Residence Card has no financial function")
    if not rec.has(Flag.FINANCIAL_FROZEN) or rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "CancelBankLoss", "SH-20",
                                "no bank loss report stands")
    rules = bank_loss_rules(banks, rec.service_bank)
    if role is not None and role not in rules.cancelled_by:
        by = (f"is cancelled by {_roles(rules.cancelled_by)}" if rules.cancelled_by
              else "is not cancelled: it lapses")
        raise PermissionDenied(f"a bank loss report at {rec.service_bank} {by} by that bank's "
                               f"rules, not by {Role(role).name} (SH-20)", reason="SH-20")
    if not financial_frozen(book, rec, now):
        end = format_time(book.bank_loss_end(card_number))
        raise InvalidTransition(State(rec.state).name, "CancelBankLoss", "SH-20",
                                f"no bank loss report stands: it lapsed at {end} by "
                                f"{rec.service_bank}'s rules")
    rec.set(Flag.FINANCIAL_FROZEN, False)
    book.put_bank_loss_end(card_number, 0)
    book.put_card(rec, now)
    return rec


# ------------------------------------------------------------------ the holder's accounts

# The cards that carry the holder's medical and benefit accounts (GZ-2, GZ-13, SH-5): the social
# security cards. A Residence Card carries none (RC-6: it certifies residence, records
# information and handles personal affairs; the decision table declines it at MEDICAL and
# BENEFIT terminals).
_ACCOUNT_PACKS = (Pack.SH, Pack.GZ, Pack.BJ)


def account_stopped(book, holder_id: int, now: int, but_pack: int = 0) -> tuple[int, str]:
    """GZ-21 ("the settlement account of the social security card will be suspended"; GZ-13:
    the personal medical-insurance account is one), SH-18 (a loss report stops or freezes the
    social security functions) and GZ-26 (the holder died): is the holder's MEDICAL or BENEFIT
    account, one per holder whatever their cards (SPEC.md section 1), stopped by the state of
    one of their current social security cards? (reason, why): the decline reason that card
    gets (model.Reason) and words naming its pack and rule; (0, "") when none stops it.
    `but_pack`: a pack whose current card the caller has already decided on. A card
    cancelled on another ground (no longer entitled in that city, withdrawn) stops only
    itself: the holder's other cards reach the accounts. Read where money leaves the account
    (a debit, a capture, a reversal of a credit: debit_stopped) and on a status-only use at
    MEDICAL or BENEFIT (authorize.other_cards), which answers what the debit would."""
    for pack in _ACCOUNT_PACKS:
        if pack == but_pack:
            continue
        number = book.current_card(holder_id, pack)
        rec = book.card(number) if number is not None else None
        if rec is None:
            continue
        state, name = effective_state(rec, now), Pack(pack).name
        if state == State.LOST:
            return Reason.CARD_LOST, (f"the holder's {name} card is reported lost and its "
                                      f"accounts are suspended "
                                      f"({_rule(pack, 'SH-18c', 'GZ-21', 'RC-15b')})")
        if state == State.TEMP_LOSS:
            return Reason.CARD_FROZEN, (f"the holder's {name} card is reported lost "
                                        "temporarily and its social security functions are "
                                        "frozen (SH-18a)")
        if state == State.CANCELLED and book.card_text(number, "ground") == CancelGround.DEATH.name:
            return Reason.CARD_CANCELLED, (f"the holder's {name} card is cancelled: the holder "
                                           f"died ({_rule(pack, 'GZ-26', 'GZ-26', 'RC-16')})")
    return 0, ""


_STOPPABLE_KINDS = frozenset({AccountKind.MEDICAL, AccountKind.BENEFIT})


def debit_stopped(book, key: bytes, now: int) -> tuple[int, str]:
    """`account_stopped` for money leaving the account `key` by whatever path: a debit, the
    post of a hold placed before the stop, a reversal taking a credit back (docs/DECISIONS.md,
    "Stopped accounts on every path"). (0, "") for an operator account and the TRANSIT purse,
    which no loss report stops. Money coming in (a credit, a void, a reversal of a payment)
    is never asked."""
    if kind_of_account(key) not in _STOPPABLE_KINDS:  # 0 for an operator account
        return 0, ""
    return account_stopped(book, holder_of_account(key), now)


# ------------------------------------------------------------------ replacement, cancellation

def replace(book, now: int, card_number: str, reason: int, instant: bool,
            role: Role | None = None, service_bank: str = "",
            banks: IssuingBanks | None = None, quality_fault: bool = False) -> Card:
    """SH-19b (after formal loss), SH-21 (renewal), SH-22 (re-application); GZ-23, GZ-24;
    RC-15. Returns the new card: a re-application in Shanghai starts APPLIED (SH-10 and SH-11
    again); every other starts VERIFIED (the holder is known), or ISSUED when made on the spot
    (SH-23b, GZ-10b). The original is superseded when the new card is issued (SH-23c)."""
    old = load(book, card_number, now)
    check_channel("Replace", old.pack, role)
    if reason == ReplaceReason.LOST:
        _require(old, (State.LOST,), "Replace(LOST)", _rule(old.pack, "SH-19b", "GZ-23", "RC-15"),
                 "a lost card is replaced after a formal loss report")
    else:
        rule = (_rule(old.pack, "SH-21", "GZ-24", "RC-15") if reason == ReplaceReason.DAMAGED
                else _rule(old.pack, "SH-22", "GZ-24", "RC-13"))
        if old.pack == Pack.RC and reason == ReplaceReason.INFO_CHANGED:
            raise InvalidTransition(State(old.state).name, "Replace(INFO_CHANGED)", "RC-13",
                                    "a Residence Card's changed information is filed, not "
                                    "made into a new card")
        _require(old, (State.ISSUED, State.ACTIVE), "Replace", rule)
    if service_bank and reason != ReplaceReason.INFO_CHANGED:
        raise InvalidArgument("service_bank", "a new service bank is a re-application: only "
                              "with REPLACE_REASON_INFO_CHANGED (SH-22, GZ-24)")
    if old.has(Flag.REPLACEMENT_APPLIED):
        raise InvalidTransition(State(old.state).name, "Replace",
                                _rule(old.pack, "SH-9", "GZ-23", "RC-15"),
                                f"replacement {old.replaced_by} is already being made")
    reapplication = old.pack == Pack.SH and reason == ReplaceReason.INFO_CHANGED
    if instant:
        if reapplication:
            raise Refused("SH-23b", "a re-application is never made on the spot; instant "
                          "issue is for replacement and renewal (急需补领、换领)")
        _check_instant("Replace", old.pack, role)
    bank = service_bank or old.service_bank
    if bank != old.service_bank:
        check_bank(old.pack, bank, banks, "service_bank")
    seq = book.next_seq(b"card_number")
    flags = old.flags & Flag.TRANSIT
    if bank == old.service_bank:  # the financial account is the same bank's
        flags |= old.flags & Flag.FINANCIAL_OPEN
    new = Card(
        card_number=f"{config.pack_card_prefix[Pack(old.pack)]}{seq:010d}",
        pack=old.pack, state=State.APPLIED if reapplication else State.VERIFIED,
        holder_id=old.holder_id, applied_at=now, flags=flags, points=old.points,
        valid_until=old.valid_until, replaces=old.card_number, service_bank=bank,
    )
    _charge_fee(book, now, old, new, reason, quality_fault)
    old.set(Flag.REPLACEMENT_APPLIED)
    old.replaced_by = new.card_number
    book.put_card(old, now)
    if instant:
        _issue(book, new, now)
    else:
        book.put_steps(new.card_number, _steps_of_an_application(new))
    book.put_card(new, now)
    return new


def replacement_fee(old: Card, reason: int, quality_fault: bool, now: int) -> tuple[int, str]:
    """(fen, rule): SH-24 free; GZ-27 (BJ alike) free for a card unusable through a quality
    fault within a year of its receipt (GZ-12), else the configured cost; RC-33 the configured
    cost (a first card is always free: this is only for cards made again)."""
    rule = _rule(old.pack, "SH-24", "GZ-27", "RC-33")
    if old.pack in (Pack.GZ, Pack.BJ) and reason == ReplaceReason.DAMAGED and quality_fault:
        if old.state == State.ISSUED or old.has(Flag.UNACTIVATED):
            # never activated: no receipt recorded (a mailed card's delivery has no call in
            # API.md), so its year has not begun (DECISIONS)
            return 0, rule
        # receipt is recorded at activation; issue, for a card activated before it was kept
        received = old.received_at or old.issued_at
        if received and now < calendar.end_of_years_for_an_act(received, 1).at:
            # GZ-27's year after receipt limits the holder's act: a last day that is a rest
            # day runs to 24:00 of the next working day (art. 203, SPEC.md section 6)
            return 0, rule
    return config.replacement_fee_fen[Pack(old.pack)], rule


def _charge_fee(book, now: int, old: Card, new: Card, reason: int, quality_fault: bool) -> None:
    """The fee is recorded as owed, in this transaction: a transfer `fee:<new card>` from
    `op:fees-owed` (what holders owe the agency, collected at the counter) to `op:fees`. No
    holder account pays it: medical insurance funds and benefits may not, and a holder's
    purse is not the counter's till; nor is a replacement refused for want of it."""
    if quality_fault and old.pack not in (Pack.GZ, Pack.BJ):
        raise InvalidArgument("quality_fault", "is GZ-27's (Guangzhou and Beijing cards)")
    fee, _ = replacement_fee(old, reason, quality_fault, now)
    if fee:
        ledger.create(book, now, f"fee:{new.card_number}",
                      operator_account_key(config.fee_owed_account),
                      operator_account_key(config.fee_account), fee,
                      card_number=new.card_number)


FEE_REVERSED = "fee-reversed:"  # + card number: the reversal of `fee:<card>`


def _reverse_fee(book, now: int, rec: Card) -> None:
    """GZ-27 ("shall pay the cost of a social security card"), RC-33 ("fees are needed for
    the replacement and reissuance"): the cost is owed for a card made. A replacement
    rejected, withdrawn or cancelled before it is made owes nothing: what is left of the fee
    recorded at its application is reversed here, in the same transaction as the act."""
    fee = ledger.get(book, f"fee:{rec.card_number}")
    if fee is not None and fee.resolved < fee.amount:
        ledger.reverse(book, now, FEE_REVERSED + rec.card_number, f"fee:{rec.card_number}",
                       card_number=rec.card_number)


def fees_reversed(book, now: int, rec: Card) -> list[str]:
    """The cards (`rec`, and the replacement it names) whose fee was reversed at `now`: the
    call that did it audits each (server/services/)."""
    numbers = dict.fromkeys(n for n in (rec.card_number, rec.replaced_by) if n)
    return [n for n in numbers
            if (t := ledger.get(book, FEE_REVERSED + n)) is not None and t.created_at == now]


_GROUNDS = {
    # GZ-26 (SH and BJ alike): death, or no longer entitled; not a move of registration alone
    Pack.SH: frozenset({CancelGround.DEATH, CancelGround.ENTITLEMENT_ENDED,
                        CancelGround.APPLICATION_WITHDRAWN}),
    Pack.RC: frozenset(CancelGround),  # RC-16 (1) to (4); death is among (4)'s legal grounds
}
_GROUNDS[Pack.GZ] = _GROUNDS[Pack.BJ] = _GROUNDS[Pack.SH]


def cancel(book, now: int, card_number: str, reason: str, ground: int,
           role: Role | None = None) -> Card:
    """GZ-26, RC-16. For death or loss of entitlement (and RC-16's other grounds) every card
    of the holder in the pack stops: the current one and a replacement in the making. A
    withdrawn application cancels only the card not yet issued, and an original card whose
    replacement is withdrawn may be replaced again (and used, if it was usable). A Residence
    Card is cancelled by public security alone (RC-16)."""
    rec = load(book, card_number, now)
    _check_agency("Cancel", rec, role)
    rule = _rule(rec.pack, "SH-8", "GZ-26", "RC-16")  # SH-8: who holds a Shanghai card
    if ground not in _GROUNDS[Pack(rec.pack)]:
        names = ", ".join(f"CANCEL_GROUND_{g.name}" for g in sorted(_GROUNDS[Pack(rec.pack)]))
        raise InvalidArgument("ground", f"a {Pack(rec.pack).name} card is cancelled on one of "
                              f"{names} ({rule}); a move of household registration alone is "
                              "no ground")
    if not reason:
        raise InvalidArgument("reason", "a cancellation must state its facts")
    if rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, "Cancel", rule, "the state is final")
    if ground == CancelGround.APPLICATION_WITHDRAWN:
        _require(rec, (State.APPLIED, State.VERIFIED), "Cancel(APPLICATION_WITHDRAWN)", rule,
                 "an issued card is cancelled only on a ground of GZ-26 or RC-16")
        _cancel_one(book, now, rec, reason, ground)
        _free_original(book, now, rec)
        return rec
    current = book.current_card(rec.holder_id, rec.pack)
    targets = [rec, book.card(current) if current else None]
    targets += [book.card(t.replaced_by) for t in targets if t is not None and t.replaced_by]
    done: set[str] = set()
    for target in targets:
        if target is not None and target.card_number not in done:
            done.add(target.card_number)
            if target.state not in FINAL_STATES:
                _cancel_one(book, now, target, reason, ground)
    return rec


def _cancel_one(book, now: int, target: Card, reason: str, ground: int) -> None:
    if target.state in (State.APPLIED, State.VERIFIED):  # never made: owes no fee
        _reverse_fee(book, now, target)
    target.state, target.temp_loss_until = State.CANCELLED, 0
    book.put_steps(target.card_number, [])  # nothing is owed on a cancelled card
    book.put_card(target, now)
    book.put_card_text(target.card_number, "note", reason)
    book.put_card_text(target.card_number, "ground", CancelGround(ground).name)


def lock_application(book, now: int, card_number: str, channel: int, locked: bool) -> Card:
    """GZ-6/BJ-7: application locking and unlocking, per channel: a service of Guangzhou's
    issuing banks and Beijing's cooperative banks, on their cards only. A Shanghai card's
    service bank has none (SH-7, SH-14, SH-20), and a Residence Card's uses are its holder's
    by RC-17 and RC-18. A lock an earlier release let stand on such a card may be lifted."""
    if channel not in LOCKABLE_CHANNELS:
        raise InvalidArgument("channel", "must be TRANSIT, MEDICAL, BENEFIT, FINANCIAL or SERVICE")
    rec = load(book, card_number, now)
    op = "LockApplication" if locked else "UnlockApplication"
    if rec.pack not in (Pack.GZ, Pack.BJ) and (locked or not rec.lock_mask & (1 << channel)):
        if rec.pack == Pack.RC:
            raise Refused("RC-17", f"{op}: a Residence Card's services are its holder's by "
                          "RC-17 and RC-18; no bank locks them (application locks are a bank "
                          "service of GZ-6 and BJ-7)")
        raise Refused("SH-7", f"{op}: a Shanghai card's bank outlets take applications, issue "
                      "cards, open functions and take loss reports (SH-7); application locking "
                      "is a service of Guangzhou's and Beijing's banks (GZ-6, BJ-7)")
    rule = _rule(rec.pack, "SH-7", "GZ-6", "RC-17", "BJ-7")
    if rec.state in FINAL_STATES:
        raise InvalidTransition(State(rec.state).name, op, rule, "the state is final")
    bit = 1 << channel
    if bool(rec.lock_mask & bit) == locked:
        raise InvalidTransition(State(rec.state).name, op, rule,
                                "already locked" if locked else "not locked")
    rec.lock_mask = (rec.lock_mask | bit) if locked else (rec.lock_mask & ~bit)
    book.put_card(rec, now)
    return rec


def correct_holder(book, now: int, given: HolderInfo, reason: str, client_id: str,
                   method: str = "Holders.CorrectHolder",
                   residence_since: int | None = None) -> tuple[int, HolderInfo, list[str]]:
    """GZ-20: correct a holder's personal information; every value replaced is kept in the
    holder's history with who, when and why. Empty fields of `given` stay as they are.
    Returns (holder id, the information now held, the fields changed)."""
    found = book.holder(given.ssn)
    if found is None:
        raise HolderNotFound("no holder with that ssn")
    holder_id, held = found
    merged = HolderInfo(held.ssn, **{f: getattr(held, f) for f in PII_FIELDS})
    changed = []
    for f in PII_FIELDS:
        new = getattr(given, f)
        if new and new != getattr(held, f):
            book.add_holder_change(holder_id, HolderChange(now, f, getattr(held, f), new,
                                                           client_id, method, reason))
            setattr(merged, f, new)
            changed.append(f)
    if changed:
        book.put_holder(holder_id, merged)
        if "residence_address" in changed:  # RC-13: the address history goes on
            book.add_residence(holder_id, now if residence_since is None else residence_since,
                               merged.residence_address)
    return holder_id, merged, changed


_CREDIT_RULES = {CreditGround.LENDING_CARD: "SH-26", CreditGround.FRAUD: "SH-26",
                 CreditGround.FORGED_CARD: "SH-26", CreditGround.FORGED_DOCUMENTS: "RC-29"}


def record_credit(book, now: int, ssn: str, ground: int, evidence_ref: str, serious: bool,
                  client_id: str, fine_fen: int = 0, *, card_number: str = "",
                  victim_card_number: str = "",
                  illegal_gain: bool = False) -> tuple[int, CreditRecord]:
    """SH-26, RC-29: a dishonesty record on the wrongdoer (`ssn`, or the holder of
    `card_number`), kept for ever with who recorded it, when and on what evidence. A serious
    RC-29 forgery bars points applications for 3 years (to 24:00 of the corresponding day,
    SPEC.md section 6); seriousness is RC-29's alone."""
    rule = _CREDIT_RULES[CreditGround(ground)]
    if serious and rule != "RC-29":
        raise InvalidArgument("serious", "only a forgery of documents (RC-29) is marked serious")
    if fine_fen:
        raise InvalidArgument("fine_fen", "RC-29's fine is an employer's; a holder's record has "
                              "none")
    if rule != "SH-26" and (illegal_gain or victim_card_number):
        raise InvalidArgument("illegal_gain" if illegal_gain else "victim_card_number",
                              "is SH-26's")
    found = book.holder(ssn)
    if found is None:
        raise HolderNotFound("no holder with that ssn")
    holder_id, _ = found
    if rule == "SH-26":
        _check_sh_26(book, holder_id, ground, card_number, victim_card_number, illegal_gain)
    record = CreditRecord(rule, ground, evidence_ref, serious, now, client_id,
                          end_of_years(now, 3) if serious else 0)
    book.add_credit_record(holder_id, record)
    return holder_id, record


# SH-26's first paragraph: "出借、转让本人社会保障卡，冒领、冒用、盗用他人社会保障卡，
# 牟取非法利益的"
SH_26_FOR_GAIN = frozenset({CreditGround.LENDING_CARD, CreditGround.FRAUD})


def _not_shanghai(what: str, pack: int) -> Refused:
    return Refused("SH-26", f"SH-26 is an article of the Shanghai Measures: {what} is a "
                   f"{Pack(pack).name} card, not a Shanghai social security card")


def _check_sh_26(book, holder_id: int, ground: int, card_number: str, victim_card_number: str,
                 illegal_gain: bool) -> None:
    """SH-26 puts the record on the wrongdoer: the holder who lends or transfers their own
    card (LENDING_CARD, named by card or ssn), the person who fraudulently claims, uses or
    steals another's (FRAUD: named by ssn, the card in `victim_card_number`, whose holder is
    the victim), the one who forges, alters or trades cards (FORGED_CARD, second paragraph).
    The first paragraph's acts are recorded when done for illegal gain. A Shanghai card's
    acts only: not a Guangzhou, Beijing or Residence Card's."""
    if ground in SH_26_FOR_GAIN and not illegal_gain:
        raise Refused("SH-26", "a card lent or transferred, or another's claimed, used or "
                      "stolen, is recorded when done for illegal gain (牟取非法利益): state "
                      "illegal_gain, on the evidence")
    if ground == CreditGround.FRAUD:
        if card_number:
            raise InvalidArgument("card_number", "fraud is recorded on the person who claimed, "
                                  "used or stole another's card, not on the card's holder, who "
                                  "is the victim: name the wrongdoer by ssn and the card in "
                                  "victim_card_number (SH-26)")
        if not victim_card_number:
            raise InvalidArgument("victim_card_number", "is required for fraud: the other "
                                  "person's card claimed, used or stolen (SH-26)")
        victim = book.card(victim_card_number)
        if victim is None:
            raise CardNotFound(victim_card_number)
        if victim.pack != Pack.SH:
            raise _not_shanghai("the card used", victim.pack)
        if victim.holder_id == holder_id:
            raise InvalidArgument("victim_card_number", "is the wrongdoer's own card: lending "
                                  "or transferring one's own card is "
                                  "CREDIT_GROUND_LENDING_CARD (SH-26)")
        return
    if victim_card_number:
        raise InvalidArgument("victim_card_number", "is for CREDIT_GROUND_FRAUD (SH-26)")
    if card_number:
        rec = book.card(card_number)
        if rec is not None and rec.pack != Pack.SH:
            raise _not_shanghai(f"card {card_number}", rec.pack)
    elif ground == CreditGround.LENDING_CARD and book.current_card(holder_id, Pack.SH) is None:
        raise Refused("SH-26", "SH-26 is an article of the Shanghai Measures: this person "
                      "holds no Shanghai social security card to lend or transfer")


# RC-29: "a fine of not less than 30,000 yuan but not more than 50,000 yuan"
EMPLOYER_FINE_FEN = (3_000_000, 5_000_000)


def record_employer_credit(book, now: int, employer: str, ground: int, evidence_ref: str,
                           serious: bool, fine_fen: int, client_id: str) -> CreditRecord:
    """RC-29: a work unit that forged documents in its staff's points applications is fined
    30,000 to 50,000 yuan and recorded; in serious cases it may not apply for its staff for 3
    years (to 24:00 of the corresponding day)."""
    if ground != CreditGround.FORGED_DOCUMENTS:
        raise InvalidArgument("ground", "an employer's record is for forged documents in its "
                              "staff's points applications (RC-29): CREDIT_GROUND_FORGED_DOCUMENTS")
    low, high = EMPLOYER_FINE_FEN
    if not low <= fine_fen <= high:
        raise InvalidArgument("fine_fen", f"RC-29 fines a work unit {low // 100:,} to "
                              f"{high // 100:,} yuan: {low} to {high} fen")
    record = CreditRecord("RC-29", ground, evidence_ref, serious, now, client_id,
                          end_of_years(now, 3) if serious else 0, fine_fen)
    book.add_employer_credit(employer, record)
    return record


def issue_electronic(book, now: int, card_number: str,
                     role: Role | None = None) -> tuple[str, Card]:
    """SH-31, GZ-35: the holder's electronic social security card, bound to their current
    physical card of the pack (a decision on its number is that card's, whatever card that
    is later: yikatong.storage Book.use_bytes). One per holder and pack: asked again, the same.
    Returns (its number, the physical card)."""
    rec = load(book, card_number, now)
    rule = _rule(rec.pack, "SH-31", "GZ-35", "SH-31")
    if rec.pack == Pack.RC:
        raise InvalidTransition(State(rec.state).name, "IssueElectronic", "RC-6",
                                "the Residence Card has no electronic social security card")
    check_channel("IssueElectronic", rec.pack, role)  # GZ-7: where a GZ card is handled
    if book.current_card(rec.holder_id, rec.pack) != card_number:
        raise InvalidTransition(State(rec.state).name, "IssueElectronic", rule,
                                "an electronic card is bound to the holder's current card")
    _require(rec, (State.ISSUED, State.ACTIVE), "IssueElectronic", rule,
             "an electronic card is bound to an issued card in use")
    number = book.ecard_of(rec.holder_id, rec.pack)
    if number is None:
        seq = book.next_seq(b"ecard_number")
        number = f"{config.pack_card_prefix[Pack(rec.pack)]}9{seq:015d}"
        assert len(number) == config.ecard_number_digits
        book.put_ecard(number, rec.holder_id, rec.pack)
    return number, rec

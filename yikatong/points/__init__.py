"""Residence Card points (RC-20 to RC-23, RC-29, RC-30).

The indicator table is data, not code (RC-22: formulated by HRSS with other departments,
published, adjusted dynamically): a TOML file with its `version`, the standard value, the
SERVICE codes it unlocks and the indicators of RC-21. The package ships `example.toml`, marked
as an example and not the official values; `yikatong serve --points-table FILE` runs on the
table in force.

An application (`apply`) is filed by the holder's employer, or by the holder at HRSS where the
employer will not (RC-30); it claims indicator values with their proofs and is decided within
20 working days (a step on the working-day calendar, RC-23). The decision (`decide`) scores the
claims on the table in force and records that table's version with the score; the score in
force is written to the holder's current card, where the hot path compares it with a gated
service's points (RC-20). A serious forgery bars the holder's applications, and the employer's
for its staff, for 3 years (RC-29: credit records, yikatong.cards.record_credit).

The records are the API's own messages (PointsRecord), stored whole per holder.
"""
import dataclasses
import re
from importlib import resources

from yikatong import cards, config_file
from yikatong.calendar import WORKING_DAYS
from yikatong.clock import law_date
from yikatong.errors import CardNotFound, InvalidArgument, InvalidTransition, Refused
from yikatong.model import RC_ENTITLEMENTS, Pack, State
from yikatong.v1 import yikatong_pb2 as pb

KINDS = ("basic", "increase", "decrease", "veto")
POINTS_MAX = 65535  # the card record's field (a score above it is kept whole in the record)
NO_SUCH_SERVICE = POINTS_MAX + 1  # more points than any card holds: not entitled
STEP = cards.POINTS_STEP  # the Deadlines item of an open application (RC-23)
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclasses.dataclass(frozen=True)
class Indicator:
    name: str
    kind: str  # one of KINDS
    levels: dict[str, int]  # a levels indicator: level -> points
    per_unit: int = 0  # a counted indicator: points per unit, at most units_max units
    units_max: int = 0
    points: int = 0  # an increase or decrease indicator: its points when it applies

    def value_points(self, value: str, field: str) -> int:
        """The points of a claimed value, or InvalidArgument naming `field` and what is
        allowed."""
        if self.levels:
            if value not in self.levels:
                raise InvalidArgument(field, f"{value!r} is not a level of {self.name!r}: one of "
                                      f"{', '.join(sorted(self.levels))}")
            return self.levels[value]
        if self.per_unit:
            if not (value.isascii() and value.isdigit() and len(value) <= 4
                    and int(value) <= self.units_max):
                raise InvalidArgument(field, f"{self.name!r} is counted: a whole number from 0 "
                                      f"to {self.units_max}")
            return int(value) * self.per_unit
        if value != "yes":
            raise InvalidArgument(field, f"{self.name!r} is claimed with \"yes\" when it applies")
        return self.points


@dataclasses.dataclass(frozen=True)
class Table:
    version: str
    example: bool
    standard_value: int
    services: dict[str, int]  # gated SERVICE code -> points needed
    indicators: dict[str, Indicator]

    def check_claims(self, claims, field: str = "claims") -> None:
        """Every claim names an indicator of this table, once, with a value it allows."""
        seen = set()
        for i, claim in enumerate(claims):
            at = f"{field}[{i}]"
            found = self.indicators.get(claim.indicator)
            if found is None:
                raise InvalidArgument(f"{at}.indicator", f"{claim.indicator!r} is not an "
                                      f"indicator of table {self.version}: one of "
                                      f"{', '.join(sorted(self.indicators))}")
            if claim.indicator in seen:
                raise InvalidArgument(f"{at}.indicator", f"{claim.indicator!r} is claimed twice")
            seen.add(claim.indicator)
            found.value_points(claim.value, f"{at}.value")

    def score(self, claims) -> tuple[int, list[pb.PointsLine], str]:
        """(points, lines, veto): RC-21's indicators summed; a one-vote veto indicator that
        applies makes the score 0 and is named."""
        lines = [pb.PointsLine(indicator=c.indicator, value=c.value,
                               points=self.indicators[c.indicator].value_points(c.value, ""))
                 for c in claims]
        vetoes = [c.indicator for c in claims if self.indicators[c.indicator].kind == "veto"]
        if vetoes:
            return 0, lines, vetoes[0]
        return sum(line.points for line in lines), lines, ""

    def points_required(self, service_code: str) -> int:
        """RC-17, RC-18, RC-20: the points a SERVICE use of a Residence Card needs: none for
        plain identification (no code) and the entitlements every holder has; the gated
        services' points; for any other code more than any card holds (NOT_ENTITLED)."""
        if not service_code or service_code in RC_ENTITLEMENTS:
            return 0
        return self.services.get(service_code, NO_SUCH_SERVICE)


_in_force: Table | None = None


def in_force() -> Table:
    """The table this process decides on: the one `use` set at start-up, else the example."""
    global _in_force
    if _in_force is None:
        _in_force = load()
    return _in_force


def use(table: Table) -> None:
    global _in_force
    _in_force = table


def load(path: str | None = None) -> Table:
    """The table in `path` (the shipped example when None), checked whole: ValueError with
    one line saying what is wrong."""
    where = path or "the example table"
    try:
        if path is None:
            text = resources.files(__package__).joinpath("example.toml").read_text("utf-8")
            doc = config_file.parse_toml(text, f"points table {where}")
        else:
            doc = config_file.read_toml(path, f"points table {where}")
        return _table(doc)
    except _Bad as error:
        raise ValueError(f"points table {where}: {error}") from None


class _Bad(Exception):
    pass


def _tables(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise _Bad(f"{key} must be a table ([{key}])")
    return value


def _int(value, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Bad(f"{what} must be a whole number from {low} to {high}")
    return value


def _table(doc: dict) -> Table:
    version = doc.get("version")
    if not isinstance(version, str) or not 0 < len(version.encode()) <= 32:
        raise _Bad('needs version = "..." (at most 32 bytes)')
    example = doc.get("example", False)
    if not isinstance(example, bool):
        raise _Bad("example must be true or false")
    standard = _int(doc.get("standard_value"), "standard_value", 0, POINTS_MAX)
    services = {}
    for code, need in _tables(doc, "services").items():
        if not _CODE.fullmatch(code) or code in RC_ENTITLEMENTS:
            raise _Bad(f"services.{code}: a code is A-Z, 0-9 and _ and not an entitlement "
                       "every holder has (RC-17, RC-18)")
        services[code] = _int(need, f"services.{code}", 0, POINTS_MAX)
    indicators = {}
    for name, spec in _tables(doc, "indicators").items():
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise _Bad(f"indicators.{name}: kind must be one of {', '.join(KINDS)}")
        kind, levels = spec["kind"], spec.get("levels", {})
        if not isinstance(levels, dict):
            raise _Bad(f"indicators.{name}.levels must be a table of level = points")
        levels = {str(k): _int(v, f"indicators.{name}.levels.{k}", -1000, 1000)
                  for k, v in levels.items()}
        per_unit = _int(spec.get("per_unit", 0), f"indicators.{name}.per_unit", 0, 1000)
        units_max = _int(spec.get("units_max", 0), f"indicators.{name}.units_max", 0, 100)
        points = _int(spec.get("points", 0), f"indicators.{name}.points", -1000, 1000)
        shapes = {"basic": bool(levels) != bool(per_unit) and not points,
                  "increase": points > 0 and not levels and not per_unit,
                  "decrease": points < 0 and not levels and not per_unit,
                  "veto": not (levels or per_unit or points)}
        if not shapes[kind] or (per_unit and not units_max):
            raise _Bad(f"indicators.{name}: a basic indicator has levels or per_unit with "
                       "units_max; an increase one positive points, a decrease one negative "
                       "points; a veto one nothing")
        indicators[name] = Indicator(name, kind, levels, per_unit, units_max, points)
    if not any(i.kind == "basic" for i in indicators.values()):
        raise _Bad("needs at least one basic indicator (RC-21)")
    return Table(version, example, standard, services, indicators)


# ------------------------------------------------------------------ GB 32100 codes

_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_USCC = re.compile(f"[{_USCC_CHARS}]{{18}}")


def validate_employer(code: str, field: str = "employer") -> None:
    """A unified social credit code (GB 32100-2015): 18 characters of its alphabet, the last
    a check character (weights 3^i mod 31)."""
    if not _USCC.fullmatch(code):
        raise InvalidArgument(field, "must be a unified social credit code: 18 characters of "
                              "0-9 and A-Y without I, O, S, V, Z")
    total = sum(_USCC_CHARS.index(c) * w for c, w in zip(code, _USCC_WEIGHTS, strict=False))
    if _USCC_CHARS[-total % 31] != code[17]:
        raise InvalidArgument(field, "check character does not match (GB 32100)")


# ------------------------------------------------------------------ the procedure

def barred_until(credit_records, now: int) -> int:
    """RC-29: the end of the latest bar a serious forgery set that still runs (0: none)."""
    return max((r.points_barred_until for r in credit_records if r.points_barred_until > now),
               default=0)


def check_may_apply(record: pb.PointsRecord | None, holder_bar: int, employer_bar: int,
                    filer: int, employer: str) -> None:
    """RC-23: one open application per holder; RC-29: not while the holder is barred, nor
    filed by a barred employer (the holder may still file at HRSS, RC-30)."""
    if record is not None and record.HasField("open_application"):
        raise Refused("RC-23", "an application filed on "
                      f"{law_date(record.open_application.accepted_at).isoformat()} is "
                      "waiting for its decision")
    if holder_bar:
        raise Refused("RC-29", "a serious forgery bars this holder's points applications to "
                      f"24:00 of {law_date(holder_bar - 1).isoformat()}")
    if employer_bar and filer == pb.POINTS_FILER_EMPLOYER:
        raise Refused("RC-29", f"employer {employer} may not apply for its staff until 24:00 "
                      f"of {law_date(employer_bar - 1).isoformat()} (a serious forgery); the "
                      "holder may file at HRSS (RC-30)")


def clamp(points: int) -> int:
    """A score as the card record holds it (0 to POINTS_MAX)."""
    return max(0, min(points, POINTS_MAX))


def _holder_card(book, now: int, card_number: str, operation: str):
    """The holder's Residence Card, in force (RC-20: points are for holders residing and
    working here; a card suspended for want of renewal is renewed first, RC-14)."""
    rec = residence_card(book, card_number, operation)
    if rec.state != State.ACTIVE:
        raise InvalidTransition(State(rec.state).name, operation, "RC-20",
                                "needs a Residence Card in force")
    if now >= rec.valid_until:
        raise Refused("RC-14", f"card {card_number} lapsed on "
                      f"{law_date(rec.valid_until - 1).isoformat()}: renewed first, it is in "
                      "force again at once")
    return rec


def check_filer(filer: int, employer: str, employer_default: int) -> None:
    """RC-23: the employer files for its staff. RC-30: the holder files at HRSS "when their
    units refuse without justified reasons or fail to apply": the holder names that work unit
    and says which it did (both missing: both named at once)."""
    if filer != pb.POINTS_FILER_HOLDER:
        if employer_default:
            raise InvalidArgument("employer_default", "is RC-30's: for a holder filing because "
                                  "the employer refused or failed to (POINTS_FILER_HOLDER)")
        return
    missing = ([] if employer else ["employer"]) + ([] if employer_default in (
        pb.EMPLOYER_DEFAULT_REFUSED, pb.EMPLOYER_DEFAULT_FAILED_TO_FILE) else ["employer_default"])
    if missing:
        raise InvalidArgument(missing[0], "is required: RC-30 is for a holder whose employer "
                              "refused without justification (EMPLOYER_DEFAULT_REFUSED) or "
                              "failed to file (EMPLOYER_DEFAULT_FAILED_TO_FILE): name the "
                              "employer and what it did" + (
                                  f"; missing too: {missing[1]}" if missing[1:] else ""))


def apply(book, now: int, table: Table, card_number: str, filer: int, employer: str,
          claims, evidence_ref: str, client_id: str,
          employer_default: int = 0) -> tuple[int, pb.PointsRecord]:
    """RC-23, RC-30: accept an application; its decision is due within 20 working days.
    Returns (holder id, the holder's points record)."""
    check_filer(filer, employer, employer_default)
    rec = _holder_card(book, now, card_number, "ApplyPoints")
    table.check_claims(claims)
    record = book.points(rec.holder_id)
    check_may_apply(record, barred_until(book.credit_records(rec.holder_id), now),
                    barred_until(book.employer_credit_records(employer), now) if employer
                    else 0, filer, employer)
    step = cards.deadline(STEP, "RC-23", WORKING_DAYS, now, 20)
    record = record or pb.PointsRecord()
    record.open_application.CopyFrom(pb.PointsApplication(
        card_number=card_number, filer=pb.PointsFiler.Name(filer), employer=employer, claims=claims,
        evidence_ref=evidence_ref, accepted_at=now, due_at=step.due_at, client_id=client_id,
        due_provisional=step.provisional,
        employer_default=pb.EmployerDefault.Name(employer_default)))
    book.put_points(rec.holder_id, record)
    book.put_steps(card_number, [*book.steps_of(card_number), step])
    return rec.holder_id, record


def decide(book, now: int, table: Table, card_number: str, approved: bool, reason: str,
           client_id: str) -> tuple[int, pb.PointsRecord]:
    """RC-23: score the holder's open application on the table in force, or refuse it. An
    approved score becomes the score in force, on the holder's current card too."""
    rec = residence_card(book, card_number, "DecidePoints")
    record = book.points(rec.holder_id)
    if record is None or not record.HasField("open_application"):
        raise Refused("RC-23", "the holder has no points application waiting for a decision")
    application = record.open_application
    decision = pb.PointsDecision(approved=approved, table_version=table.version,
                                 decided_at=now, client_id=client_id, reason=reason)
    decision.application.CopyFrom(application)
    if approved:
        table.check_claims(application.claims, "application.claims")  # the table may be new
        points, lines, veto = table.score(application.claims)
        decision.points = points
        decision.lines.extend(lines)
        if veto:
            decision.reason = f"one-vote veto: {veto} (RC-21)"
        record.points, record.table_version = points, table.version
        current = book.current_card(rec.holder_id, Pack.RC)
        card = book.card(current) if current else None
        if card is not None and card.points != clamp(points):
            card.points = clamp(points)
            book.put_card(card, now)
    elif not reason.strip():
        raise InvalidArgument("reason", "a refusal must say why: the applicant is told (RC-23)")
    record.decisions.append(decision)
    record.ClearField("open_application")
    book.put_points(rec.holder_id, record)
    for number in {application.card_number, book.current_card(rec.holder_id, Pack.RC) or ""}:
        if number:
            book.put_steps(number, [s for s in book.steps_of(number) if s.step != STEP])
    return rec.holder_id, record


def residence_card(book, card_number: str, operation: str):
    """A Residence Card of the holder whose points are meant (RC-20: points are for Residence
    Card holders; a social security card of the same person names no points)."""
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    if rec.pack != Pack.RC:
        raise InvalidTransition(State(rec.state).name, operation, "RC-20",
                                "points are for Residence Card holders")
    return rec


def view(book, now: int, table: Table, holder_id: int) -> pb.PointsRecord:
    """GetPoints: the holder's record, with what the table in force and RC-29 say today."""
    record = book.points(holder_id) or pb.PointsRecord()
    record.standard_value = table.standard_value
    record.meets_standard = record.points >= table.standard_value
    record.barred_until = barred_until(book.credit_records(holder_id), now)
    record.table_in_force = table.version
    return record

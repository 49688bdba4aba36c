"""Working days (SPEC.md section 6): weekends, and each year's public holidays and make-up
working days as the State Council General Office's notice for that year sets them: one file a
year (`2026.toml`, naming its notice) shipped beside this module, and any an operator installs
in a `--calendar-dir` (read at start and on reload; an operator's year wins over a shipped one).

A year without its notice is never a reason to refuse or to stop listing: it is counted
provisionally from the statutory holidays themselves (全国年节及纪念日放假办法, 2024 revision,
with a weekday off for a holiday on a weekend, art. 6) as python-holidays' `China` computes
them for any year, plus weekends; every end so counted is marked provisional (`End`), and
counted again when the year's file is installed (`Count`, kept with each stored step).

Periods count as the Civil Code says (arts. 200 to 204): the day of the event is not counted;
a period ends at 24:00 Asia/Shanghai of its last day (the first instant of the next day); a
deadline in days whose last day is a rest day ends at 24:00 of the next working day."""
import datetime as dt
import os
import threading
from functools import cache
from importlib import resources
from typing import NamedTuple

from yikatong import config_file
from yikatong.clock import end_of_days, end_of_years, law_date, start_of_day

_DAY = dt.timedelta(days=1)
WARN_FROM = (11, 1)  # from 1 November, next year's missing notice is warned of

# How a stored period is counted again (Step.kind): n working days, or n days for an act.
WORKING_DAYS, DAYS_FOR_AN_ACT = 1, 2


class CalendarFileError(ValueError):
    """A calendar file that is not a whole, valid year: it is not used."""


class End(NamedTuple):
    """The end instant of a period, and whether a day of a year without its official
    notice was counted to find it."""

    at: int
    provisional: bool


Year = tuple[frozenset[dt.date], frozenset[dt.date]]  # (holidays, make-up working days)

_lock = threading.Lock()
_official: dict[int, Year] = {}  # every installed year: shipped, then the operator's


def parse_year(year: int, text: str, name: str) -> Year:
    """A year's file checked whole: TOML with `notice`, `holidays`, `workdays`, every date
    in `year`, no day both a holiday and a working day. CalendarFileError naming the file."""
    try:
        doc = config_file.parse_toml(text, name)
        if not isinstance(doc.get("notice"), str) or not doc["notice"].strip():
            raise CalendarFileError("names no notice (notice = \"...\")")
        days = {k: frozenset(dt.date.fromisoformat(d) for d in doc[k])
                for k in ("holidays", "workdays")}
    except CalendarFileError as e:
        raise CalendarFileError(f"{name}: {e}") from None
    except config_file.ConfigFileError as e:
        raise CalendarFileError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CalendarFileError(f"{name}: {type(e).__name__}: {e}") from None
    wrong = sorted(d for v in days.values() for d in v if d.year != year)
    if wrong:
        raise CalendarFileError(f"{name}: {wrong[0].isoformat()} is not in {year}")
    both = sorted(days["holidays"] & days["workdays"])
    if both:
        raise CalendarFileError(f"{name}: {both[0].isoformat()} is both a holiday and a "
                                "working day")
    if not days["holidays"]:
        raise CalendarFileError(f"{name}: no holidays")
    return days["holidays"], days["workdays"]


def _read_dir(files) -> dict[int, Year]:
    years = {}
    for name, read in files:
        stem = name.removesuffix(".toml")
        if name.endswith(".toml") and stem.isdigit() and len(stem) == 4:
            years[int(stem)] = parse_year(int(stem), read(), name)
    return years


def _read_text(path: str) -> str:
    name = os.path.basename(path)
    try:
        data = config_file.read_bytes(path, name)
        return data.decode("utf-8")
    except config_file.ConfigFileError as e:
        raise CalendarFileError(str(e)) from None
    except UnicodeDecodeError as e:
        raise CalendarFileError(f"{name}: not UTF-8 (byte {e.start})") from None


def load(calendar_dir: str = "") -> dict[int, Year]:
    """Every installed year: the shipped files, then `calendar_dir`'s over them; raises
    CalendarFileError (nothing used) if any file is bad."""
    shipped = resources.files(__package__)
    years = _read_dir((f.name, lambda f=f: f.read_text("utf-8")) for f in shipped.iterdir())
    if calendar_dir:
        try:
            names = sorted(os.listdir(calendar_dir))
        except OSError as e:
            raise CalendarFileError(f"--calendar-dir {calendar_dir}: {e.strerror}") from None
        years.update(_read_dir((n, lambda n=n: _read_text(os.path.join(calendar_dir, n)))
                               for n in names))
    return years


def use(years: dict[int, Year]) -> list[int]:
    """Count with `years` from now on (as `load` made them). Returns the years that became
    official."""
    global _official
    with _lock:
        new = sorted(set(years) - set(_official))
        _official = dict(years)
    return new


def official_years() -> list[int]:
    return sorted(_official)


def is_official(year: int) -> bool:
    return year in _official


@cache
def _provisional(year: int) -> Year:
    """The statutory holidays of a year with no notice installed, and their substitute days
    (a holiday on a weekend gives the next weekday off); no make-up working days."""
    import holidays

    return frozenset(holidays.China(years=year)), frozenset()


def _year(year: int) -> Year:
    official = _official.get(year)
    return official if official is not None else _provisional(year)


def is_working_day(day: dt.date) -> bool:
    holidays, workdays = _year(day.year)
    if day in workdays:
        return True
    return day not in holidays and day.weekday() < 5


def _end(t: int, last: dt.date) -> End:
    """24:00 of `last`, provisional if a day from the one after `t` to `last` lies in a
    year with no notice installed."""
    first = law_date(t).year
    return End(start_of_day(last + _DAY),
               any(not is_official(y) for y in range(first, last.year + 1)))


def end_of_working_days(t: int, n: int) -> End:
    """The end of `n` working days from an event at `t` (its day not counted): 24:00 of the
    n-th working day after it. SH-10: received on a Monday, 3 working days end at 24:00 on
    Thursday."""
    day, counted = law_date(t), 0
    while counted < n:
        day += _DAY
        counted += is_working_day(day)
    return _end(t, day)


def end_of_days_for_an_act(t: int, n: int) -> End:
    """The end of `n` days from an event at `t`, for an act: 24:00 of the n-th day, or of the
    next working day if that one is a rest day (Civil Code art. 203)."""
    last = law_date(end_of_days(t, n) - 1)
    while not is_working_day(last):
        last += _DAY
    return _end(t, last)


def end_of_years_for_an_act(t: int, n: int) -> End:
    """The end of `n` years from an event at `t` that limit a holder's act (RC-14's year of
    validity, in which the card is renewed; GZ-27's free year after receipt): 24:00 of the
    corresponding day (art. 202), or of the next working day if that one is a rest day (art.
    203, SPEC.md section 6). A Residence Card issued on 1 October 2026 is in force to 24:00
    of the first working day after the National Day holiday of 2027."""
    last = law_date(end_of_years(t, n) - 1)
    while not is_working_day(last):
        last += _DAY
    return _end(t, last)


def count(kind: int, t: int, n: int) -> End:
    """A stored period counted (again): `kind` WORKING_DAYS or DAYS_FOR_AN_ACT."""
    if kind == WORKING_DAYS:
        return end_of_working_days(t, n)
    if kind == DAYS_FOR_AN_ACT:
        return end_of_days_for_an_act(t, n)
    raise ValueError(f"no count of kind {kind}")


def missing_year(now: int) -> int:
    """The year whose notice is needed and not installed: this one (1 January came without
    it: its ends are provisional now), or from 1 November next year; else 0."""
    today = law_date(now)
    if not is_official(today.year):
        return today.year
    if (today.month, today.day) >= WARN_FROM and not is_official(today.year + 1):
        return today.year + 1
    return 0


use(load())

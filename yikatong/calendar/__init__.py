"""Working days (SPEC.md section 6): weekends, and each year's public holidays and make-up
working days as the State Council General Office's notice for that year sets them, one file a
year beside this module (`2026.toml`, naming its notice). No year's holidays are guessed: a
period that reaches into a year without a file is CalendarMissing, naming the year.

Periods count as the Civil Code says (arts. 200 to 204): the day of the event is not counted;
a period ends at 24:00 Asia/Shanghai of its last day (the first instant of the next day); a
deadline in days whose last day is a rest day ends at 24:00 of the next working day."""
import datetime as dt
import tomllib
from functools import cache
from importlib import resources

from yikatong.clock import end_of_days, law_date, start_of_day
from yikatong.errors import CalendarMissing

_DAY = dt.timedelta(days=1)


@cache
def _year(year: int) -> tuple[frozenset[dt.date], frozenset[dt.date]]:
    """(holidays, make-up working days) of `year`."""
    try:
        doc = tomllib.loads(resources.files(__package__).joinpath(f"{year}.toml").read_text(
            "utf-8"))
    except FileNotFoundError:
        raise CalendarMissing(year) from None
    days = {k: frozenset(dt.date.fromisoformat(d) for d in doc[k])
            for k in ("holidays", "workdays")}
    assert all(d.year == year for v in days.values() for d in v), year
    return days["holidays"], days["workdays"]


def is_working_day(day: dt.date) -> bool:
    holidays, workdays = _year(day.year)
    if day in workdays:
        return True
    return day not in holidays and day.weekday() < 5


def end_of_working_days(t: int, n: int) -> int:
    """The end of `n` working days from an event at `t` (its day not counted): 24:00 of the
    n-th working day after it. SH-10: received on a Monday, 3 working days end at 24:00 on
    Thursday."""
    day, counted = law_date(t), 0
    while counted < n:
        day += _DAY
        counted += is_working_day(day)
    return start_of_day(day + _DAY)


def end_of_days_for_an_act(t: int, n: int) -> int:
    """The end of `n` days from an event at `t`, for an act: 24:00 of the n-th day, or of the
    next working day if that one is a rest day (Civil Code art. 203)."""
    last = law_date(end_of_days(t, n) - 1)
    while not is_working_day(last):
        last += _DAY
    return start_of_day(last + _DAY)

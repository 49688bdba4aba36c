"""The one clock. All time in the server comes from here, in integer unix seconds, so
tests can move it (`--clock manual`)."""
import contextlib
import datetime as _dt
import fcntl
import mmap
import os
import struct
import threading
import time

from yikatong import config

_NOW = struct.Struct("<q")
LAW_TZ = _dt.timezone(_dt.timedelta(seconds=config.law_utc_offset_seconds), "Asia/Shanghai")


class SystemClock:
    manual = False

    def now(self) -> int:
        return int(time.time())


class ManualClock:
    """Moves only when told to. Never moves backwards: a backwards step is refused, since
    every deadline and hold in the store was computed against the time already shown.

    Shared by every worker process: the time lives in 8 bytes of shared memory made before
    the workers are forked, so AdvanceClock on one worker moves the clock all of them decide
    with. A move takes a POSIX record lock on that memory (per process, released if the
    process dies) and a thread lock (record locks do not exclude threads of one process)."""

    manual = True

    def __init__(self, start: int):
        self._fd = os.memfd_create("yikatong-clock")
        os.ftruncate(self._fd, _NOW.size)
        self._shared = mmap.mmap(self._fd, _NOW.size)
        self._thread_lock = threading.Lock()
        _NOW.pack_into(self._shared, 0, check_time(int(start)))

    @classmethod
    def attach(cls, fd: int) -> "ManualClock":
        """The clock another process made, by its shared memory's descriptor (`fd`,
        inherited): a worker started anew by exec (server/workers.py) moves and reads the one
        clock its siblings do."""
        clock = cls.__new__(cls)
        clock._fd = fd
        clock._shared = mmap.mmap(fd, _NOW.size)
        clock._thread_lock = threading.Lock()
        return clock

    @property
    def fd(self) -> int:
        """The shared memory's descriptor, for `attach` in another process."""
        return self._fd

    def now(self) -> int:
        return _NOW.unpack_from(self._shared)[0]

    @contextlib.contextmanager
    def _locked(self):
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield self.now()
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def advance(self, seconds: int) -> int:
        if seconds < 0:
            raise ValueError("seconds must not be negative: the clock never moves backwards")
        with self._locked() as now:
            if seconds > config.time_max - now:
                raise ValueError(f"{seconds} seconds would move the clock past its end, "
                                 f"{format_time(config.time_max)}")
            _NOW.pack_into(self._shared, 0, now + seconds)
            return now + seconds

    def set(self, t: int) -> int:
        check_time(t)
        with self._locked() as now:
            if t < now:
                raise ValueError(
                    f"time {format_time(t)} is before the clock's {format_time(now)}: "
                    "the clock never moves backwards"
                )
            _NOW.pack_into(self._shared, 0, t)
            return t


def check_time(t: int) -> int:
    """A moment the clock may show (config.time_min to time_max), else ValueError."""
    if not config.time_min <= t <= config.time_max:
        raise ValueError(f"the clock runs from {format_time(config.time_min)} to "
                         f"{format_time(config.time_max)}")
    return t


def parse_time(text: str) -> int:
    """ISO-8601 to unix seconds; a time without an offset is Shanghai time."""
    t = _dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=LAW_TZ)
    return int(t.timestamp())


def format_time(t: int) -> str:
    return _dt.datetime.fromtimestamp(t, LAW_TZ).isoformat()


def law_date(t: int) -> _dt.date:
    """The calendar date in Shanghai at unix time t."""
    return _dt.datetime.fromtimestamp(t, LAW_TZ).date()


# ---- periods, as the Civil Code counts them (arts. 200 to 204; SPEC.md section 6): the day
# of the event is not counted, and a period ends at 24:00 Asia/Shanghai of its last day, which
# is the first instant of the next day. Each end is one exact instant, computed when the
# period starts and stored, so the hot path compares two integers and no job is needed.

def start_of_day(d: _dt.date) -> int:
    """00:00 Shanghai on `d`, in unix seconds."""
    return int(_dt.datetime(d.year, d.month, d.day, tzinfo=LAW_TZ).timestamp())


def end_of_days(t: int, days: int) -> int:
    """The end of a period of `days` days from an event at `t` (art. 201: the event's day is
    not counted): 24:00 of the `days`-th day after it. SH-18b: reported at any hour of 2 March,
    5 days end at 24:00 on 7 March."""
    return start_of_day(law_date(t) + _dt.timedelta(days=days + 1))


def end_of_months(t: int, months: int) -> int:
    """The end of a period of `months` months from an event at `t` (art. 202: the last day is
    the corresponding day of the last month, or that month's last day if it has none): 24:00
    of it. RC-9: residence registered on 21 March, 6 months are complete at 24:00 on 21
    September ("满6个月")."""
    d = law_date(t)
    year, month = divmod(d.month - 1 + months, 12)
    year, month = d.year + year, month + 1
    days_in_month = (_dt.date(year + month // 12, month % 12 + 1, 1) - _dt.timedelta(days=1)).day
    last = _dt.date(year, month, min(d.day, days_in_month))
    return start_of_day(last + _dt.timedelta(days=1))


def end_of_years(t: int, years: int) -> int:
    """The end of a period of `years` years from an event at `t` (art. 202: the last day is
    the corresponding day of the last year, or that month's last day if it has none): 24:00 of
    it. RC-14: issued on 21 September 2026, valid to 24:00 on 21 September 2027."""
    d = law_date(t)
    try:
        last = d.replace(year=d.year + years)
    except ValueError:  # 29 February, in a year without one: the month's last day
        last = d.replace(year=d.year + years, day=28)
    return start_of_day(last + _dt.timedelta(days=1))

"""The one clock. All time in the server comes from here, in integer unix seconds, so
tests can move it (`--clock manual`)."""
import datetime as _dt
import threading
import time

from yikatong import config

LAW_TZ = _dt.timezone(_dt.timedelta(seconds=config.law_utc_offset_seconds), "Asia/Shanghai")


class SystemClock:
    manual = False

    def now(self) -> int:
        return int(time.time())


class ManualClock:
    """Moves only when told to. Never moves backwards: a backwards step is refused, since
    every deadline and hold in the store was computed against the time already shown."""

    manual = True

    def __init__(self, start: int):
        self._now = check_time(int(start))
        self._lock = threading.Lock()

    def now(self) -> int:
        return self._now

    def advance(self, seconds: int) -> int:
        if seconds < 0:
            raise ValueError("seconds must not be negative: the clock never moves backwards")
        with self._lock:
            if seconds > config.time_max - self._now:
                raise ValueError(f"{seconds} seconds would move the clock past its end, "
                                 f"{format_time(config.time_max)}")
            self._now += seconds
            return self._now

    def set(self, t: int) -> int:
        check_time(t)
        with self._lock:
            if t < self._now:
                raise ValueError(
                    f"time {format_time(t)} is before the clock's {format_time(self._now)}: "
                    "the clock never moves backwards"
                )
            self._now = t
            return self._now


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

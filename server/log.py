"""Structured logs: one JSON object per line on stderr. Never a full social security number,
a name or any other holder PII: log card numbers and client ids.

Events and errors go through `logging` (JsonFormatter). The access log, one line per call, is
on the hot path of every call, so it does not: `AccessLog` formats its fixed fields itself and
writes what it gathered every `flush_seconds` (and at shutdown), in the same JSON shape.
"""
import datetime
import json
import logging
import os
import select
import sys
import time

from yikatong.model import mask


class JsonFormatter(logging.Formatter):
    """Every text of the line masked (`mask`): the code never logs holder PII, and an
    exception message that carried an identity number by mistake does not either."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return mask(json.dumps(line, ensure_ascii=False))


class AccessLog:
    """One JSON line per call: time, method, client id, role, status code, milliseconds. The
    fields are ASCII names the server controls (client ids are checked at load), so no
    escaping is needed. Lines are written in batches from the event loop; a SIGKILL loses at
    most the last `flush_seconds` of them."""

    flush_seconds = 0.2
    lines_max = 10_000  # written at once beyond this, whatever the timer

    def __init__(self):
        self.enabled = False  # until setup(); in-process tests log nothing
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""
        self._timer = None
        self._pid = os.getpid()

    def call(self, method: str, client_id: str, role: str, code: str, ms: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S")
        self._lines.append(
            f'{{"time": "{self._stamp}.{int(now * 1000) % 1000:03d}+00:00", "level": "info", '
            f'"logger": "yikatong.access", "msg": "call", "method": "{method}", '
            f'"client": "{client_id}", "role": "{role}", "code": "{code}", "ms": {ms:.3f}, '
            f'"pid": {self._pid}}}\n')
        if len(self._lines) >= self.lines_max:
            self.flush()

    def flush(self) -> None:
        """Whole lines only, each write at most PIPE_BUF bytes: the workers of one server
        share stderr, and writes that size are never interleaved with another process's."""
        if not self._lines:
            return
        data, self._lines = "".join(self._lines).encode(), []
        sys.stderr.flush()
        while data:
            end = len(data) if len(data) <= select.PIPE_BUF else \
                data.rfind(b"\n", 0, select.PIPE_BUF) + 1 or len(data)
            written = os.write(sys.stderr.fileno(), data[:end])
            data = data[written:]

    def start(self, loop) -> None:
        self._pid = os.getpid()  # this worker's
        def tick():
            self.flush()
            self._timer = loop.call_later(self.flush_seconds, tick)
        self._timer = loop.call_later(self.flush_seconds, tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


access = AccessLog()


def setup(level: str = "info") -> None:
    access.enabled = logging.getLevelName(level.upper()) <= logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("yikatong")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # gRPC's own logger had no handler: what it reports (an exception in a handler it ran)
    # was lost. It goes to the same place now.
    grpc_logger = logging.getLogger("grpc")
    grpc_logger.handlers[:] = [handler]
    grpc_logger.setLevel(logging.WARNING)
    grpc_logger.propagate = False


def started(**fields) -> None:
    """The start-up line: what this server is and how it serves."""
    logging.getLogger("yikatong.server").info("started", extra={"fields": fields})


def archived(**fields) -> None:
    """A segment written to the archive (storage/archive.py move): what it took from LMDB."""
    logging.getLogger("yikatong.archive").info("archived", extra={"fields": fields})


def recounted(changed) -> None:
    """The steps counted again on the calendar now installed (yikatong.cards.recount): one
    line each, saying how its end moved."""
    from yikatong.clock import format_time

    for card, before, after in changed:
        logging.getLogger("yikatong.server").info("step recounted", extra={"fields": {
            "card": card, "rule": after.rule, "step": after.step,
            "from": format_time(before.due_at), "to": format_time(after.due_at),
            "provisional": after.provisional}})

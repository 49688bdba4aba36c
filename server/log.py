"""Structured logs: one JSON object per line on stderr. Never a full social security number,
a name or any other holder PII: log card numbers and client ids, and mask an SSN with `mask`.
"""
import datetime
import json
import logging
import sys

access = logging.getLogger("yikatong.access")  # one line per call


class JsonFormatter(logging.Formatter):
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
        return json.dumps(line, ensure_ascii=False)


def setup(level: str = "info") -> None:
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


def mask(ssn: str) -> str:
    """3101********1234: the region and the last four, never the birth date."""
    return ssn[:4] + "*" * max(len(ssn) - 8, 0) + ssn[-4:] if len(ssn) > 8 else "*" * len(ssn)

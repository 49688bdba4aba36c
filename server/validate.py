"""Checks at the edge: every field from outside, with a message naming the field. A field
that is stored in a fixed width is checked here in bytes, so nothing is ever cut short on
disk (storage/records.py asserts the same before writing)."""
import re

from yikatong import config
from yikatong.errors import InvalidArgument
from yikatong.storage import records
from yikatong.v1 import yikatong_pb2 as pb

# Control characters (C0, DEL, C1), line and paragraph separators, zero-width characters and
# the bidirectional controls that make a text read otherwise than it is stored (Trojan
# Source): refused in every text field.
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def card_number(value: str, field: str = "card_number") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > config.card_number_length_max:
        raise InvalidArgument(field, f"is longer than {config.card_number_length_max} digits")
    if not (value.isascii() and value.isdigit()):
        raise InvalidArgument(field, "must be ASCII digits only")
    return value


def request_id(value: str, field: str = "request_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required (it is the idempotency key)")
    size = len(value.encode("utf-8"))
    if size > config.request_id_bytes_max:
        raise InvalidArgument(field, f"is {size} bytes in UTF-8; at most "
                              f"{config.request_id_bytes_max} bytes")
    if _FORBIDDEN.search(value):
        raise InvalidArgument(field, "must not contain control or bidirectional-control "
                              "characters")
    return value


def plain_request_id(value: str) -> bool:
    """The common case, cheaply: printable ASCII within the limit (else `request_id` says why)."""
    return 0 < len(value) <= config.request_id_bytes_max and value.isascii() and value.isprintable()


def text(value: str, field: str, *, required: bool = False,
         length_max: int = config.text_field_length_max) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > length_max:
        raise InvalidArgument(field, f"is longer than {length_max} characters")
    if _FORBIDDEN.search(value):
        raise InvalidArgument(field, "must not contain control or bidirectional-control "
                              "characters")
    return value


def bank(value: str, field: str, *, required: bool) -> str:
    text(value, field, required=required)
    if len(value.encode("utf-8")) > records.SERVICE_BANK_BYTES:
        raise InvalidArgument(field, f"is longer than {records.SERVICE_BANK_BYTES} bytes")
    return value


def enum(value: int, enum_type, field: str, *, allow_unspecified: bool = False) -> int:
    if value not in enum_type.values() or (value == 0 and not allow_unspecified):
        names = ", ".join(n for n in enum_type.keys() if not n.endswith("_UNSPECIFIED"))
        raise InvalidArgument(field, f"unknown value {value}; one of {names}")
    return value


def batch(items, field: str) -> None:
    if not items:
        raise InvalidArgument(field, "is empty")
    if len(items) > config.batch_size_max:
        raise InvalidArgument(field, f"has {len(items)} entries; batch_size_max is "
                                     f"{config.batch_size_max}")


_CHANNELS = frozenset(v for v in pb.Channel.values() if v)
_PHASES = frozenset(pb.Phase.values())


def authorize_request(req, field: str = "") -> None:
    """The hot path's check: cheap comparisons first; the detailed checks (and their
    messages) run only for a request that is not plainly valid."""
    rid, number = req.request_id, req.card_number
    if not plain_request_id(rid):
        request_id(rid, field + "request_id")
    if not (0 < len(number) <= config.card_number_length_max and number.isdigit()
            and number.isascii()):
        card_number(number, field + "card_number")
    if req.channel not in _CHANNELS:
        enum(req.channel, pb.Channel, field + "channel")
    if req.phase not in _PHASES:
        enum(req.phase, pb.Phase, field + "phase", allow_unspecified=True)
    if req.terminal_id:
        text(req.terminal_id, field + "terminal_id", length_max=config.request_id_bytes_max)
    if req.service_code:
        text(req.service_code, field + "service_code", length_max=config.request_id_bytes_max)
    if (req.amount_fen or req.phase or req.hold_timeout_seconds or req.hold_request_id
            or req.payee_account or req.max_fare_fen or req.on_timeout):
        _money_fields(req, field)


def _money_fields(req, field: str) -> None:
    amount(req.amount_fen, field + "amount_fen", zero_ok=True)
    if req.hold_timeout_seconds and req.phase != pb.PHASE_HOLD:
        raise InvalidArgument(field + "hold_timeout_seconds", "is only for PHASE_HOLD")
    timeout(req.hold_timeout_seconds, field + "hold_timeout_seconds")
    if not req.amount_fen and not req.phase:
        if req.max_fare_fen or req.on_timeout:
            _journey_fields(req, field)
        if req.payee_account:
            raise InvalidArgument(field + "payee_account", "is only for requests that move money")
        raise InvalidArgument(field + "hold_request_id", "is only for PHASE_POST/PHASE_VOID")
    if req.channel not in config.channel_money:
        raise InvalidArgument(field + "amount_fen", f"{pb.Channel.Name(req.channel)} moves no "
                              "money here (only TRANSIT, MEDICAL and BENEFIT do)")
    if req.payee_account:
        operator(req.payee_account, field + "payee_account")
    if req.phase in (pb.PHASE_POST, pb.PHASE_VOID):
        request_id(req.hold_request_id, field + "hold_request_id")
        if req.phase == pb.PHASE_VOID and req.amount_fen:
            raise InvalidArgument(field + "amount_fen", "a void moves no money; send 0")
    else:
        if req.hold_request_id:
            raise InvalidArgument(field + "hold_request_id", "is only for PHASE_POST/PHASE_VOID")
        if not req.amount_fen:
            raise InvalidArgument(field + "amount_fen", "a hold needs a positive amount")
    if req.max_fare_fen or req.on_timeout:
        _journey_fields(req, field)


def _journey_fields(req, field: str) -> None:
    """Issue 28: a journey's policy, on a transit tap-in only (docs/DECISIONS.md)."""
    enum(req.on_timeout, pb.JourneyTimeout, field + "on_timeout", allow_unspecified=True)
    if req.phase != pb.PHASE_HOLD or req.channel != pb.CHANNEL_TRANSIT:
        raise InvalidArgument(field + ("on_timeout" if req.on_timeout else "max_fare_fen"),
                              "is only for a TRANSIT PHASE_HOLD (a tap-in)")
    if req.on_timeout == pb.JOURNEY_TIMEOUT_SETTLE_MAX_FARE:
        if not 0 < req.max_fare_fen <= req.amount_fen:
            raise InvalidArgument(field + "max_fare_fen", f"is {req.max_fare_fen}; "
                                  "JOURNEY_TIMEOUT_SETTLE_MAX_FARE needs 1 to amount_fen "
                                  f"({req.amount_fen}): the hold must cover what its timeout "
                                  "settles")
    elif req.on_timeout == pb.JOURNEY_TIMEOUT_VOID:
        if req.max_fare_fen:
            raise InvalidArgument(field + "max_fare_fen", "is only for "
                                  "JOURNEY_TIMEOUT_SETTLE_MAX_FARE (a void charges nothing)")
    else:
        raise InvalidArgument(field + "on_timeout", "is required with max_fare_fen: "
                              "JOURNEY_TIMEOUT_SETTLE_MAX_FARE or JOURNEY_TIMEOUT_VOID")


def amount(value: int, field: str, *, zero_ok: bool) -> int:
    if value < 0 or (value == 0 and not zero_ok):
        raise InvalidArgument(field, "must be a positive number of fen" if not zero_ok
                              else "must not be negative (integer fen)")
    if value > config.amount_fen_max:
        raise InvalidArgument(field, f"is more than amount_fen_max ({config.amount_fen_max})")
    return value


def timeout(value: int, field: str) -> int:
    if not 0 <= value <= config.hold_timeout_seconds_max:
        raise InvalidArgument(field, f"must be 0 to {config.hold_timeout_seconds_max} seconds")
    return value


def operator(value: str, field: str) -> str:
    name = value[3:]
    if (not value.startswith("op:") or not name
            or len(value.encode("utf-8")) > config.operator_name_bytes_max
            or not all(c.isascii() and (c.isalnum() or c in "-_.:") for c in name)):
        raise InvalidArgument(field, "must be 'op:<name>' with letters, digits, '-', '_', '.', "
                              f"':' ({config.operator_name_bytes_max} bytes at most)")
    return value

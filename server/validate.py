"""Checks at the edge: every field from outside, with a message naming the field."""
from storage import records
from yikatong import config
from yikatong.errors import InvalidArgument
from yikatong.v1 import yikatong_pb2 as pb


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
    if len(value) > config.request_id_length_max:
        raise InvalidArgument(field, f"is longer than {config.request_id_length_max} characters")
    return value


def text(value: str, field: str, *, required: bool = False,
         length_max: int = config.text_field_length_max) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > length_max:
        raise InvalidArgument(field, f"is longer than {length_max} characters")
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def bank(value: str, field: str, *, required: bool) -> str:
    text(value, field, required=required)
    if len(value.encode("utf-8")) > records.service_bank_bytes_max:
        raise InvalidArgument(field, f"is longer than {records.service_bank_bytes_max} bytes")
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


def authorize_request(req, field: str = "") -> None:
    request_id(req.request_id, field + "request_id")
    card_number(req.card_number, field + "card_number")
    enum(req.channel, pb.Channel, field + "channel")
    enum(req.phase, pb.Phase, field + "phase", allow_unspecified=True)
    text(req.terminal_id, field + "terminal_id", length_max=config.request_id_length_max)
    text(req.service_code, field + "service_code", length_max=config.request_id_length_max)
    if req.amount_fen < 0:
        raise InvalidArgument(field + "amount_fen", "must not be negative (integer fen)")

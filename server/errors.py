"""The one place where domain errors become gRPC status codes."""
import functools

import grpc
from google.protobuf.message import DecodeError

from storage.records import CorruptRecord
from yikatong import errors as e
from yikatong.ledger import TransferNotFound, TransferRefused

_CODES = (
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.CardNotFound, grpc.StatusCode.NOT_FOUND),
    (e.NotEligible, grpc.StatusCode.FAILED_PRECONDITION),
    (e.InvalidTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.IdReused, grpc.StatusCode.ALREADY_EXISTS),
    (CorruptRecord, grpc.StatusCode.DATA_LOSS),
    (TransferRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (TransferNotFound, grpc.StatusCode.NOT_FOUND),
    (e.StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_of(error: BaseException) -> grpc.StatusCode | None:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return None


class Undecodable:
    """What the server's request decoder hands a handler for bytes that are not a valid
    message of the method's request type (corrupt wire format, bad UTF-8 in a string)."""

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str):
        self.type_name, self.reason = type_name, reason

    def error(self) -> e.InvalidArgument:
        return e.InvalidArgument("request", f"not a valid {self.type_name}: {self.reason}")


def decoder(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(error).split(": ")[-1])
    return decode


def grpc_errors(handler):
    """Turn domain errors raised by a unary handler into their gRPC status."""

    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await handler(self, request, context)
        except (e.YikatongError, CorruptRecord) as error:
            await context.abort(status_of(error), str(error))

    return wrapped

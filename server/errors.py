"""The one place where domain errors become gRPC status codes."""
import functools

import grpc

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


def grpc_errors(handler):
    """Turn domain errors raised by a unary handler into their gRPC status."""

    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except (e.YikatongError, CorruptRecord) as error:
            await context.abort(status_of(error), str(error))

    return wrapped

"""The one place where errors become gRPC statuses.

Each refusal carries gRPC's rich status (`grpc-status-details-bin`, read with
`grpc_status.rpc_status.from_call`): a `google.rpc.ErrorInfo` whose `reason` is stable (a rule
id such as `SH-18c`, `ID_REUSED`, `EXCEEDS_CREDITS`, ...) so a gate's or a bank's client acts on
a code, never on parsing the message; and for a malformed field a `google.rpc.BadRequest`
naming it. The message text is for people.
"""
import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from yikatong import errors as e

DOMAIN = "yikatong.v1"
DETAILS_KEY = "grpc-status-details-bin"

_CODES = (
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.CardNotFound, grpc.StatusCode.NOT_FOUND),
    (e.HolderNotFound, grpc.StatusCode.NOT_FOUND),
    (e.TransferNotFound, grpc.StatusCode.NOT_FOUND),
    (e.NotEligible, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.InvalidTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TransferRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.IdReused, grpc.StatusCode.ALREADY_EXISTS),
    (e.CorruptRecord, grpc.StatusCode.DATA_LOSS),
    (e.StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.WriterBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.TooManyCalls, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.StreamStalled, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.RequestLate, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.PastTheEnd, grpc.StatusCode.OUT_OF_RANGE),
    (e.Archived, grpc.StatusCode.OUT_OF_RANGE),
    (e.WriterDown, grpc.StatusCode.UNAVAILABLE),
    (e.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.Fenced, grpc.StatusCode.UNAVAILABLE),  # another node writes: ask it
    (e.LogUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.LogBehind, grpc.StatusCode.UNAVAILABLE),  # not applied that far yet: wait, or ask the writer
    (e.ReplicationGap, grpc.StatusCode.DATA_LOSS),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_of(error: e.YikatongError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL  # InvalidRecord, and any class not listed: a bug


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich(code: grpc.StatusCode, message: str, reason: str, field: str = "",
         description: str = "", **metadata: str) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries the rich status of a refusal."""
    details = [_packed(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                                   metadata=metadata))]
    if field:
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)])))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return ((DETAILS_KEY, status.SerializeToString()),)


def trailers_of(error: e.YikatongError, code: grpc.StatusCode) -> tuple[tuple[str, bytes], ...]:
    if isinstance(error, e.InvalidArgument):
        return rich(code, str(error), error.reason, error.field, error.description)
    if isinstance(error, (e.Fenced, e.LogBehind)) and error.writer:  # where to go instead
        return rich(code, str(error), error.reason, writer=error.writer)
    return rich(code, str(error), error.reason)


def with_prefix(error: e.YikatongError, prefix: str) -> e.YikatongError:
    """The same error for entry `prefix` of a batch (`requests[3].`): the message, and for a
    malformed field the field's path, name the entry."""
    if isinstance(error, e.InvalidArgument):
        return error.within(prefix)
    error.args = (f"{prefix}{error}",)
    return error


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

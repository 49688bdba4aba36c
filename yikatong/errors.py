"""One hierarchy of errors. Each carries a stable machine-readable `reason` (a rule id, a
TigerBeetle-style code, ...) that callers act on; the message is for people. The server maps
the classes to gRPC status codes in exactly one place (server/errors.py); the domain never
knows about gRPC."""


class YikatongError(Exception):
    """Base of every error raised on purpose."""

    reason = "ERROR"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidArgument(YikatongError):
    """The request itself is malformed; `field` names what is wrong."""

    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message

    def within(self, prefix: str) -> "InvalidArgument":
        """The same error for a field inside a batch entry (`requests[3].`)."""
        return InvalidArgument(prefix + self.field, self.description)


class CardNotFound(YikatongError):
    reason = "CARD_NOT_FOUND"

    def __init__(self, card_number: str):
        super().__init__(f"card {card_number} not found")


class HolderNotFound(YikatongError):
    reason = "HOLDER_NOT_FOUND"


class NotEligible(YikatongError):
    """An application the law does not allow (SH-8, GZ-4, BJ-8, RC-9); reason = the rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{rule}: {message}", reason=rule)


class Refused(YikatongError):
    """What a rule does not allow, apart from a card's state (a first Shanghai application
    made on the spot, an issuing bank not on the list); reason = the rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{rule}: {message}", reason=rule)


class InvalidTransition(YikatongError):
    """A transition the card's state forbids; the message names the state and the rule, and
    the rule id is the reason."""

    def __init__(self, state_name: str, operation: str, rule: str, detail: str = ""):
        text = f"{operation} is not allowed on a card in state {state_name} ({rule})"
        super().__init__(text + (f": {detail}" if detail else ""), reason=rule)
        self.state_name = state_name
        self.rule = rule


class IdReused(YikatongError):
    """The same request id came back with other fields (TigerBeetle's ID_REUSED)."""

    reason = "ID_REUSED"

    def __init__(self, request_id: str):
        super().__init__(
            f"ID_REUSED: request id {request_id!r} was already used for a different request"
        )


class TransferRefused(YikatongError):
    """A transfer the ledger's rules refuse; the reason is TigerBeetle-style (EXCEEDS_CREDITS)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}", reason=code)
        self.code = code


class TransferNotFound(YikatongError):
    reason = "TRANSFER_NOT_FOUND"

    def __init__(self, transfer_id: str):
        super().__init__(f"transfer {transfer_id!r} not found")


class Unauthenticated(YikatongError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(YikatongError):
    """A role calling what it may not, by the API's role table (reason ROLE_NOT_ALLOWED) or by
    the law's channels (reason = the rule id)."""

    reason = "ROLE_NOT_ALLOWED"


class CorruptRecord(YikatongError):
    """A stored value that is not a record this code understands: never decide on it."""

    reason = "CORRUPT_RECORD"


class InvalidRecord(YikatongError):
    """A record that cannot be written exactly as it is (a field too long for its width, a
    value out of range): refused before the write. The edge should have refused it first, so
    this is a bug found, answered INTERNAL."""

    reason = "INVALID_RECORD"


class StoreFull(YikatongError):
    """The LMDB map is full: writes are refused (nothing half-written), reads go on."""

    reason = "STORE_FULL"


class StoreUnavailable(YikatongError):
    """The data dir cannot be served: locked by another server, unreadable, not a store."""

    reason = "STORE_UNAVAILABLE"


class StoreFormat(StoreUnavailable):
    """The data dir's store format is not the one this release serves: an older one is
    migrated first (`yikatong migrate`), a newer one needs a newer release
    (yikatong.storage.migrate); or a migration could not be done (nothing changed)."""

    reason = "STORE_FORMAT"


class StoreUnreadable(StoreUnavailable):
    """LMDB's own file cannot be read: shorter than its meta page says (cut short), or a
    page of a database damaged. The message names the file or database and where; `after`:
    the last event (or record) read whole before it, when something was read in order."""

    reason = "STORE_UNREADABLE"

    def __init__(self, message: str, after: int = 0):
        super().__init__(message)
        self.after = after


class WriterBusy(YikatongError):
    """The writer's queue is at writer_queue_max: refused now rather than queued without end."""

    reason = "WRITER_QUEUE_FULL"


class WriterDown(YikatongError):
    """The writer thread has stopped: no write can be done until the server restarts."""

    reason = "WRITER_DOWN"


class TooManyCalls(YikatongError):
    """One client already has client_calls_max calls in progress on this worker."""

    reason = "CLIENT_CALLS_MAX"


class RequestLate(YikatongError):
    """A call's request message did not arrive within request_arrival_seconds_max."""

    reason = "REQUEST_ARRIVAL_TIMEOUT"


class StreamStalled(YikatongError):
    """A server stream's caller took no message for stream_stall_seconds_max."""

    reason = "STREAM_STALLED"


class PastTheEnd(YikatongError):
    """A position asked for lies past the end of a log (the change feed's, the audit
    trail's): the message names the end."""

    reason = "PAST_THE_END"


class Archived(YikatongError):
    """A position asked for lies before what the hot store holds: older records were moved
    to the archive (--retain-days); the message names the oldest one kept and what to do."""

    reason = "ARCHIVED"


class Fenced(YikatongError):
    """The replicated log moved on without this node, or it does not hold the write lease:
    it is not the writer (issue 18). `writer`: the writer's address, when known."""

    reason = "FENCED"

    def __init__(self, message: str, writer: str = ""):
        super().__init__(message)
        self.writer = writer


class LogBehind(YikatongError):
    """A read asked for `min_sequence` and this node had not applied the log that far in
    the time the call allowed. `writer`: the writer's address, when known."""

    reason = "LOG_BEHIND"

    def __init__(self, message: str, writer: str = ""):
        super().__init__(message)
        self.writer = writer


class LogUnavailable(YikatongError):
    """The replicated log did not take or give a record in time."""

    reason = "LOG_UNAVAILABLE"


class ReplicationGap(YikatongError):
    """A replication record that does not follow the last one applied: one is missing."""

    reason = "REPLICATION_GAP"

"""One hierarchy of domain errors. The server maps them to gRPC status codes in exactly one
place (server/errors.py); the domain never knows about gRPC."""


class YikatongError(Exception):
    """Base of every error the domain raises on purpose."""


class InvalidArgument(YikatongError):
    """The request itself is malformed; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class CardNotFound(YikatongError):
    def __init__(self, card_number: str):
        super().__init__(f"card {card_number} not found")


class NotEligible(YikatongError):
    """An application the law does not allow (SH-8, GZ-4, BJ-8, RC-9)."""


class InvalidTransition(YikatongError):
    """A transition the card's state forbids; the message names the state and the rule."""

    def __init__(self, state_name: str, operation: str, rule: str, detail: str = ""):
        text = f"{operation} is not allowed on a card in state {state_name} ({rule})"
        super().__init__(text + (f": {detail}" if detail else ""))
        self.state_name = state_name
        self.rule = rule


class IdReused(YikatongError):
    """The same request id came back with other fields (TigerBeetle's ID_REUSED)."""

    def __init__(self, request_id: str):
        super().__init__(
            f"ID_REUSED: request id {request_id!r} was already used for a different request"
        )


class StoreFull(YikatongError):
    """The LMDB map is full: writes are refused (nothing half-written), reads go on."""


class StoreUnavailable(YikatongError):
    """The data dir cannot be served: locked by another server, unreadable, not a store."""


class Unauthenticated(YikatongError):
    pass


class PermissionDenied(YikatongError):
    """A role calling what it may not, by the API's role table or by the law's channels."""

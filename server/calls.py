"""Every call passes here, once, before and after its handler: identity, the role table,
decoding, error mapping and the access log. Handlers are registered from the proto's own
service descriptors (as the generated add_*_to_server would), so a method the servicer lacks,
or one missing from the role table, stops the server at start-up instead of answering
UNKNOWN at run time.

In order, for every call:
1. who is calling (bearer token): UNAUTHENTICATED before anything else is looked at;
2. may that role call this method (server/roles.py): PERMISSION_DENIED;
3. is the request a message at all (corrupt wire format, bad UTF-8): INVALID_ARGUMENT;
4. the handler, `behaviour(request, client)`, which validates its fields and does the work;
5. a refusal (`YikatongError`) becomes its status with a rich status (server/errors.py); an
   unexpected exception is logged with its traceback and a reference, and the caller gets
   INTERNAL with that reference only;
6. one access-log line: method, client, role, status code, duration. No PII.
"""
import contextvars
import logging
import time
import uuid

import grpc

from yikatong.errors import PermissionDenied, Unauthenticated, YikatongError
from yikatong.server import errors, roles
from yikatong.server.errors import Undecodable
from yikatong.server.log import access

log = logging.getLogger("yikatong.server")
_HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}


def register(server, servicers, clients, message_module, table=roles.METHOD_ROLES) -> None:
    """Register each servicer (named as its proto service) behind the one call path."""
    services = [message_module.DESCRIPTOR.services_by_name[type(s).__name__] for s in servicers]
    roles.check_table(services, table)
    for servicer, service in zip(servicers, services, strict=True):
        handlers = {}
        for m in service.methods:
            name = f"{service.name}.{m.name}"
            behaviour = getattr(servicer, m.name, None)
            if behaviour is None:
                raise roles.TableError(f"{name} is in the proto but {type(servicer).__name__} "
                                       "does not implement it; refusing to start")
            wrap = _streaming if m.server_streaming else _unary
            handlers[m.name] = _HANDLER[(m.client_streaming, m.server_streaming)](
                wrap(name, table[name], clients, behaviour, m.client_streaming),
                request_deserializer=errors.decoder(getattr(message_module, m.input_type.name)),
                response_serializer=getattr(message_module, m.output_type.name).SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),))


class Doorman(grpc.aio.ServerInterceptor):
    """Step 1 from the headers alone, before gRPC waits for a request message or runs a
    handler: a call whose bearer token is missing or unknown is answered UNAUTHENTICATED at
    once, so callers that send headers and never a message hold no call slot for longer than
    it takes to refuse them. Under mTLS a call without a token may still be identified by its
    certificate (the handshake already checked it), which the handler looks up."""

    def __init__(self, clients, tls: bool, methods: dict[str, str]):
        """`methods`: the path of every method served ("/yikatong.v1.Ledger/Transfer") and
        its name ("Ledger.Transfer"); any other path is gRPC's to refuse (UNIMPLEMENTED)."""
        self._clients, self._tls, self._methods = clients, tls, methods

    async def intercept_service(self, continuation, details):
        name = self._methods.get(details.method)
        if name is not None:
            metadata = details.invocation_metadata
            if not (self._tls and not any(k == "authorization" for k, _ in metadata)):
                try:
                    _IDENTIFIED.set(self._clients.identify(metadata))
                except Unauthenticated as error:
                    return _refuser(name, error)
        return await continuation(details)


def served_methods(message_module, servicers) -> dict[str, str]:
    """{"/yikatong.v1.Ledger/Transfer": "Ledger.Transfer", ...} for the servicers given."""
    out = {}
    for servicer in servicers:
        service = message_module.DESCRIPTOR.services_by_name[type(servicer).__name__]
        for m in service.methods:
            out[f"/{service.full_name}/{m.name}"] = f"{service.name}.{m.name}"
    return out

# The client the Doorman identified, for the handler of the same call (gRPC runs the
# interceptor and the handler in the call's own task, so this never crosses calls).
_IDENTIFIED: contextvars.ContextVar = contextvars.ContextVar("yikatong_client", default=None)


def _refuser(name: str, error: Exception):
    """A handler that refuses without reading a request message (a request-streaming handler
    is called at once; the caller, unary or not, gets the status)."""
    async def refuse(requests, context):
        call = _Call(name)
        try:
            await call.refuse(context, error)
        finally:
            call.log()
    return grpc.stream_stream_rpc_method_handler(refuse)


def _admitted(name: str, allowed, clients, context, request, client_streaming: bool):
    """Steps 1 to 3: (the client, the request) or a refusal."""
    client = _IDENTIFIED.get() or clients.identify(context.invocation_metadata(), context)
    if client.role not in allowed:
        raise PermissionDenied(f"role {client.role.name} may not call {name}")
    if client_streaming:
        return client, _decoded(request)
    if type(request) is Undecodable:
        raise request.error()
    return client, request


async def _decoded(requests):
    async for request in requests:
        if type(request) is Undecodable:
            raise request.error()
        yield request


class _Call:
    """What the access log says of one call: who, and how it ended."""

    __slots__ = ("name", "client", "code", "started")

    def __init__(self, name: str):
        self.name, self.client, self.code, self.started = name, None, None, time.perf_counter()

    async def refuse(self, context, error: Exception) -> None:
        status, message, trailers = _refusal(self.name, error)
        self.code = status.name
        await context.abort(status, message, trailing_metadata=trailers)

    def log(self) -> None:
        _log(self.name, self.client, self.code, self.started)


def _unary(name, allowed, clients, behaviour, client_streaming):
    async def handle(request, context):
        call = _Call(name)
        try:
            call.client, request = _admitted(name, allowed, clients, context, request,
                                             client_streaming)
            response = await behaviour(request, call.client)
            call.code = "OK"
            return response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every refusal and bug is answered here
            await call.refuse(context, error)
        finally:
            call.log()
    return handle


def _streaming(name, allowed, clients, behaviour, client_streaming):
    async def handle(request, context):
        call = _Call(name)
        try:
            call.client, request = _admitted(name, allowed, clients, context, request,
                                             client_streaming)
            async for response in behaviour(request, call.client):
                yield response
            call.code = "OK"
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every refusal and bug is answered here
            await call.refuse(context, error)
        finally:
            call.log()
    return handle


def _refusal(name: str, error: Exception) -> tuple[grpc.StatusCode, str, tuple]:
    """(status, message, trailing metadata) for what a handler raised."""
    if isinstance(error, YikatongError):
        status = errors.status_of(error)
        if status is not grpc.StatusCode.INTERNAL:
            return status, str(error), errors.trailers_of(error, status)
    # A bug (an InvalidRecord refused before a write, any unexpected exception): the details
    # go to the log with a reference; the caller sees the reference only.
    reference = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (reference %s)", name, reference, exc_info=error,
              extra={"fields": {"method": name, "reference": reference}})
    message = f"internal error; reference {reference} (the server logged it)"
    status = grpc.StatusCode.INTERNAL
    return status, message, errors.rich(status, message, "INTERNAL", reference=reference)


def _log(name: str, client, code, started: float) -> None:
    if access.enabled:
        access.call(name, client.id if client else "", client.role.name if client else "",
                    code or "CANCELLED", (time.perf_counter() - started) * 1000)

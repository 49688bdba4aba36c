"""Every call passes here, once, before and after its handler: identity, the role table,
decoding, error mapping and the access log. Handlers are registered from the proto's own
service descriptors (as the generated add_*_to_server would), so a method the servicer lacks,
or one missing from the role table, stops the server at start-up instead of answering
UNKNOWN at run time.

Every handler is registered request-streaming (the same wire for the caller), so gRPC runs
it as soon as a call's headers are in, before any request message is read. In order:
1. who is calling (bearer token, or the client certificate under mTLS): UNAUTHENTICATED
   before anything else is looked at, so a caller without an identity holds nothing;
2. may that role call this method (server/roles.py): PERMISSION_DENIED; has this client
   already client_calls_max calls in progress here: RESOURCE_EXHAUSTED (Limits);
3. did the request message (a stream's first) arrive in time (DEADLINE_EXCEEDED), and is it
   a message at all (corrupt wire format, bad UTF-8): INVALID_ARGUMENT;
4. the handler, `behaviour(request, client)`, which validates its fields and does the work;
5. a refusal (`YikatongError`) becomes its status with a rich status (server/errors.py); an
   unexpected exception is logged with its traceback and a reference, and the caller gets
   INTERNAL with that reference only;
6. one access-log line: method, client, role, status code, duration. No PII.
"""
import asyncio
import collections
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from yikatong import config
from yikatong.errors import (
    CorruptRecord,
    InvalidArgument,
    LogBehind,
    PermissionDenied,
    RequestLate,
    StreamStalled,
    TooManyCalls,
    Unauthenticated,
    YikatongError,
)
from yikatong.server import errors, roles
from yikatong.server.errors import Undecodable
from yikatong.server.log import access
from yikatong.server.metrics import metrics

log = logging.getLogger("yikatong.server")
_HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}


# grpc.aio runs each call in two tasks: an outer one (grpc's `_schedule_rpc_coro`) that holds
# the call's server slot (maximum_concurrent_rpcs) until the core says the call is closed, and
# the handler's task, which the outer one creates (`_handle_exceptions`). grpc.aio gives a
# server no way to cancel a call (RST_STREAM): an abort only queues a status, which waits
# behind data the peer's flow-control window refuses, so a peer that stopped reading held its
# slot for ever (issue 25, finding 1). A call's outer task, once known, is what (1) tells
# when the call has really finished (its client's share is given back then, as grpc gives
# back the slot) and (2) ends it for good: cancelling both tasks drops the last reference to
# the call, and grpc_call_unref cancels a call not yet closed (RST_STREAM to the peer).
# This leans on grpc.aio internals (grpcio 1.85's aio/server.pyx.pxi): the factory below is
# the only place that knows them, and tests/test_attack_streams.py fails if they change.
_outer_of: "weakref.WeakKeyDictionary[asyncio.Task, asyncio.Task]" = weakref.WeakKeyDictionary()


def track_calls(loop) -> None:
    """Install the task factory that records each call's outer task (before server.start)."""
    if loop.get_task_factory() is not None:
        return  # someone else's factory: calls are given back as their handler ends

    def factory(loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if getattr(coro, "__name__", "") == "_handle_exceptions":  # a call's handler task
            outer = asyncio.current_task(loop)
            if outer is not None:
                _outer_of[task] = outer
        return task
    loop.set_task_factory(factory)


def _cancel_call(handler: asyncio.Task, outer: asyncio.Task) -> None:
    """End a call for good (RST_STREAM), whatever the peer reads: see _outer_of."""
    if not outer.done():
        outer.cancel()
    if not handler.done():
        handler.cancel()


class Limits:
    """What one client may hold on this worker: at most `client_calls_max` calls in progress,
    counted until each has really finished (its stream closed, not only its status queued),
    a call's first request message must arrive within `arrival_seconds` of its headers (a
    stream's too), and each message of a server stream must be taken within `stall_seconds`;
    a stream ended for that gets `end_grace_seconds` to take its status, then it is cancelled.
    Every handler is registered request-streaming (the wire is the same for the caller), so it
    runs as soon as the headers are in and reads the one request itself, against this clock;
    one timer per worker ends the calls still waiting (no timer per call)."""

    def __init__(self, client_calls_max: int = config.client_calls_max,
                 arrival_seconds: float = config.request_arrival_seconds_max,
                 stall_seconds: float = config.stream_stall_seconds_max,
                 end_grace_seconds: float = config.stream_end_grace_seconds_max):
        self.client_calls_max = client_calls_max
        self.arrival_seconds = arrival_seconds
        self.stall_seconds = stall_seconds
        self.end_grace_seconds = end_grace_seconds
        self.calls: collections.Counter[str] = collections.Counter()  # client id -> in progress
        self._waiting: dict[asyncio.Task, float] = {}  # task -> when its request is late
        self._late: set[asyncio.Task] = set()
        # handler task -> (its call's outer task, when the call is cancelled if not closed):
        # calls that have ended (answered, refused, or their status queued) but not closed
        self._ending: dict[asyncio.Task, tuple[asyncio.Task, float]] = {}
        self._clients: dict[asyncio.Task, Any] = {}  # handler task -> the client it runs as
        self._revoked: set[asyncio.Task] = set()  # ended by a reload that revoked its client
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop) -> None:
        period = min(1.0, self.arrival_seconds / 4, self.stall_seconds / 4,
                     self.end_grace_seconds / 4)

        def sweep():
            now = time.monotonic()
            for task, late_at in list(self._waiting.items()):
                if late_at <= now:
                    del self._waiting[task]
                    self._late.add(task)
                    task.cancel()
            for task, (outer, cancel_at) in list(self._ending.items()):
                if cancel_at <= now:
                    del self._ending[task]
                    _cancel_call(task, outer)
            self._timer = loop.call_later(period, sweep)
        self._timer = loop.call_later(period, sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def enter(self, client) -> bool:
        """Count the call in; True when it is counted out by itself once it has really
        finished (its outer task known), False when the caller must `leave`."""
        if self.calls[client.id] >= self.client_calls_max:
            raise TooManyCalls(f"client {client.id} already has {self.client_calls_max} calls "
                               "in progress (client_calls_max); retry when some have ended")
        self.calls[client.id] += 1
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = client
        outer = _outer_of.get(task)
        if outer is None:
            return False

        def finished(_outer, client=client, task=task):
            self._ending.pop(task, None)
            self._clients.pop(task, None)
            self._revoked.discard(task)
            self.leave(client)
        outer.add_done_callback(finished)
        return True

    def ended(self, task: asyncio.Task) -> None:
        """The call has ended here (its handler returned, or it queued its last status): it
        closes within end_grace_seconds, or is cancelled (RST_STREAM). Calls counted out by
        Limits.enter only."""
        outer = _outer_of.get(task)
        if outer is not None and not outer.done() and task not in self._ending:
            self._ending[task] = (outer, time.monotonic() + self.end_grace_seconds)

    def revoke(self, revoked: dict) -> int:
        """A reload revoked these clients (by object: id -> client): each call admitted as
        one and still running is ended, UNAUTHENTICATED (`revoked`). How many."""
        ended = 0
        for task, client in list(self._clients.items()):
            if id(client) in revoked and not task.done() and task not in self._revoked:
                self._revoked.add(task)
                task.cancel()
                ended += 1
        return ended

    def revoked(self, task) -> bool:
        """The call of `task` (cancelled) was ended by `revoke`: its refusal is owed."""
        if task not in self._revoked:
            return False
        self._revoked.discard(task)
        task.uncancel()
        return True

    def leave(self, client) -> None:
        task = asyncio.current_task()
        if task is not None and self._clients.get(task) is client:
            del self._clients[task]
            self._revoked.discard(task)
        left = self.calls[client.id] - 1
        if left:
            self.calls[client.id] = left
        else:
            del self.calls[client.id]

    async def write(self, context, response, last) -> None:
        """One message of a server stream, which the caller must take within
        stream_stall_seconds_max: a caller that stopped reading is ended (StreamStalled,
        naming the last sequence written where messages have one), holding nothing."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = time.monotonic() + self.stall_seconds
        try:
            await context.write(response)
        except asyncio.CancelledError:
            if task not in self._late:
                raise
            self._late.discard(task)
            task.uncancel()
            # the status queued next waits behind the message the peer refuses: it gets
            # end_grace_seconds to take it, then the call is cancelled (RST_STREAM)
            self.ended(task)
            where = getattr(last, "sequence", None)
            raise StreamStalled(
                f"the caller took no message for {self.stall_seconds:g} s "
                "(stream_stall_seconds_max)"
                + ("" if where is None else f"; resume after sequence {where} (the last one "
                   "surely sent; the next may have arrived too: resume after the last you "
                   "received)")) from None
        finally:
            self._waiting.pop(task, None)

    async def read_one(self, context):
        """The call's one request message, or RequestLate / INVALID_ARGUMENT."""
        request = await self.read_first(context)
        if request is grpc.aio.EOF:
            raise InvalidArgument("request", "the call ended without its request message")
        return request

    async def read_first(self, context):
        """The call's first request message (a stream's too), or EOF, or RequestLate: a
        caller that sends headers and then nothing holds its slot arrival_seconds at most."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = time.monotonic() + self.arrival_seconds
        try:
            request = await context.read()
        except asyncio.CancelledError:
            if task not in self._late:
                raise  # the caller cancelled, or its deadline passed
            self._late.discard(task)
            task.uncancel()
            raise RequestLate(f"no request message arrived within {self.arrival_seconds:g} s "
                              "of the call's headers (request_arrival_seconds_max)") from None
        finally:
            self._waiting.pop(task, None)
        return request


class LogPosition:
    """Read-your-writes on a node of a replicated store (issue 18; `node`:
    storage.replication.Node). Every answer (not a refusal) carries in its trailing metadata
    `log_sequence`: on the writer, the last record of the log committed there when it
    answered (a write's own record included); on a follower, the last record it had applied
    when the call's work began (the answer reflects at least that much). A caller that sends
    `min_sequence: N` in its request metadata (say, a write's `log_sequence`) is answered
    only once this node has applied record N: it waits up to the call's deadline, at most
    min_sequence_wait_seconds, then UNAVAILABLE (LOG_BEHIND) naming how far this node is
    and where the writer is."""

    def __init__(self, node):
        self.node, self.store = node, node.store

    async def reach(self, context) -> int:
        """After identity and the request's arrival, before the work: the sequence the
        work will reflect at least."""
        wanted = next((v for k, v in context.invocation_metadata() if k == "min_sequence"),
                      None)
        if wanted is None:
            return self.store.applied_sequence
        if not (wanted.isascii() and wanted.isdigit() and len(wanted) <= 19):
            raise InvalidArgument("min_sequence", "request metadata min_sequence must be a "
                                  f"log sequence (a decimal number), not {wanted[:40]!r}")
        target = int(wanted)
        if self.store.applied_sequence < target:  # another process of the node applied it?
            self.node.refresh()
        if self.node.leading and self.store.applied_sequence < target:  # the log's end here
            raise LogBehind(f"the log ends at record {self.store.applied_sequence}; there is "
                            f"no record {target} (min_sequence) yet")
        if self.store.applied_sequence < target:
            remaining = context.time_remaining()
            # the answer must reach the caller before its deadline: a fifth of what is left
            # (at least 50 ms) is kept for the way back, more on a busy machine's loop
            wait = config.min_sequence_wait_seconds if remaining is None else min(
                config.min_sequence_wait_seconds, max(0.0, remaining - max(0.05, remaining / 5)))
            deadline, pause = time.monotonic() + wait, 0.001
            while self.store.applied_sequence < target:
                if time.monotonic() >= deadline:
                    writer = self.node.writer
                    raise LogBehind(
                        f"this node has applied the log to record {self.store.applied_sequence}"
                        f", not yet {target} (min_sequence), in {wait:.2g} s; ask again, or "
                        "ask the writer" + (f" ({writer[0]} at {writer[1]})" if writer else ""),
                        writer[1] if writer else "")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)  # a caller far ahead costs few wake-ups
                self.node.refresh()
        return self.store.applied_sequence

    def trailer(self, before: int) -> tuple[tuple[str, str], ...]:
        return (("log_sequence", str(self.store.applied_sequence if self.node.leading
                                     else before)),)


def register(server, servicers, clients, message_module, table=roles.METHOD_ROLES,
             limits: Limits | None = None, position: LogPosition | None = None) -> None:
    """Register each servicer (named as its proto service) behind the one call path."""
    limits = limits or Limits()
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
            handler_type = (grpc.stream_stream_rpc_method_handler if m.server_streaming else
                            grpc.stream_unary_rpc_method_handler)
            raw = m.name in getattr(servicer, "RAW_METHODS", ())  # bytes in, bytes or message out
            handlers[m.name] = handler_type(
                wrap(name, table[name], clients, behaviour, m.client_streaming, limits,
                     position),
                request_deserializer=None if raw else
                errors.decoder(getattr(message_module, m.input_type.name)),
                response_serializer=_raw_or_message if raw else
                getattr(message_module, m.output_type.name).SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _raw_or_message(response) -> bytes:
    return response if type(response) is bytes else response.SerializeToString()


def _admit(call, allowed, clients, context, limits: Limits) -> bool:
    """Steps 1 and 2, and the client's share of the worker: `call.client`, counted in (a
    refusal names the client it refused, for the log and the audit trail). True: counted
    out by itself once the call has really finished (Limits.enter)."""
    call.client = clients.identify(context.invocation_metadata(), context)
    if call.client.role not in allowed:
        raise PermissionDenied(f"role {call.client.role.name} may not call {call.name}")
    return limits.enter(call.client)


async def _request(requests, context, limits: Limits, client_streaming: bool):
    """Step 3: the request (one message, in time) or the stream of them, decoded."""
    if client_streaming:  # its first message is awaited here, against the arrival limit
        return _decoded(await limits.read_first(context), requests)
    request = await limits.read_one(context)
    if type(request) is Undecodable:
        raise request.error()
    return request


async def _decoded(first, requests):
    if first is grpc.aio.EOF:
        return
    if type(first) is Undecodable:
        raise first.error()
    yield first
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
        if isinstance(error, CorruptRecord) and on_data_loss is not None:
            on_data_loss()  # a record read is corrupt: health NOT_SERVING (Store.note)
        if status in _AUDITED:
            refusals.add(self.client, self.name, status.name, _reason_code(self.name, error))
        elif self.name in roles.AUDITED_WHATEVER_OUTCOME and not getattr(error, "audited", False):
            # issue 25: a call touching personal information is audited however it ends (a
            # handler that audited its refusal with the holder says so: `audited`)
            refusals.add(self.client, self.name, status.name, _reason_code(self.name, error))
        await context.abort(status, message, trailing_metadata=trailers)

    def log(self) -> None:
        _log(self.name, self.client, self.code, self.started)


def _unary(name, allowed, clients, behaviour, client_streaming, limits, position):
    async def handle(requests, context):
        call, counted_out = _Call(name), False
        try:
            counted_out = _admit(call, allowed, clients, context, limits)
            try:
                request = await _request(requests, context, limits, client_streaming)
                if position is None:
                    response = await behaviour(request, call.client)
                else:
                    before = await position.reach(context)
                    response = await behaviour(request, call.client)
                    context.set_trailing_metadata(position.trailer(before))
            finally:
                if not counted_out:
                    limits.leave(call.client)
            call.code = "OK"
            return response
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if not limits.revoked(asyncio.current_task()):
                raise
            await call.refuse(context, REVOKED)
        except Exception as error:  # noqa: BLE001 - every refusal and bug is answered here
            await call.refuse(context, error)
        finally:
            call.log()
            if counted_out:
                limits.ended(asyncio.current_task())
    return handle


def _streaming(name, allowed, clients, behaviour, client_streaming, limits, position):
    async def handle(requests, context):
        call, counted_out = _Call(name), False
        try:
            counted_out = _admit(call, allowed, clients, context, limits)
            try:
                request = await _request(requests, context, limits, client_streaming)
                if position is not None:  # a stream's trailer: where its first answer stood
                    context.set_trailing_metadata(position.trailer(await position.reach(context)))
                last = None
                async for response in behaviour(request, call.client):
                    await limits.write(context, response, last)
                    last = response
            finally:
                if not counted_out:
                    limits.leave(call.client)
            call.code = "OK"
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if not limits.revoked(asyncio.current_task()):
                raise
            await call.refuse(context, REVOKED)
        except Exception as error:  # noqa: BLE001 - every refusal and bug is answered here
            await call.refuse(context, error)
        finally:
            call.log()
            if counted_out:
                limits.ended(asyncio.current_task())
    return handle


_AUDITED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
REVOKED = Unauthenticated("this call's credential was revoked by a reload of the clients file "
                          "(a token rotated or removed); call again with a current one")


class Refusals:
    """SPEC.md section 7: every refused call (PERMISSION_DENIED, UNAUTHENTICATED) is an
    audit event. A flood of them (a misconfigured gate) must not flood the writer: they are
    counted per client, method and status, and written once a second, one event per key with
    its `count`; at most refusal_keys_max keys a second, the rest counted under client `*`."""

    def __init__(self):
        self.counts: collections.Counter[tuple[str, str, str, str, str]] = \
            collections.Counter()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, client, method: str, code: str, reason: str = "") -> None:
        """`reason`: what the event's purpose says of why (a code and a field, never a text
        the caller sent)."""
        key = ((client.id, client.role.name, method, code, reason) if client else
               ("", "", method, code, reason))
        if key not in self.counts and len(self.counts) >= config.refusal_keys_max:
            key = ("*", "", "*", code, "")
        self.counts[key] += 1

    def start(self, loop, store, clock) -> None:
        def flush():
            self.flush(store, clock)
            self._timer = loop.call_later(1.0, flush)
        self._timer = loop.call_later(1.0, flush)

    def flush(self, store, clock) -> None:
        if not self.counts:
            return
        counts, self.counts = self.counts, collections.Counter()
        now = clock.now()

        def command(book):
            for (client_id, role, method, code, reason), n in counts.items():
                book.append_audit(now, client_id, role, method, purpose=reason, outcome=code,
                                  count=n)
        try:
            future = store.submit(command)
        except YikatongError as error:  # the writer is busy or down: kept for the next try
            self.counts.update(counts)
            log.error("refused calls not yet audited: %s", error)
            return
        future.add_done_callback(lambda f: f.exception() and log.error(
            "audit events of refused calls were not written", exc_info=f.exception()))

    def stop(self, store, clock) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush(store, clock)


refusals = Refusals()


def _reason_code(name: str, error: Exception) -> str:
    """Why a call touching personal information was refused, for its audit event: the
    refusal's stable reason and the field it names (`refused: INVALID_FIELD ssn`); nothing
    the caller sent. Other calls' refusal events say nothing here, as before."""
    if name not in roles.AUDITED_WHATEVER_OUTCOME:
        return ""
    reason = error.reason if isinstance(error, YikatongError) else "INTERNAL"
    field = getattr(error, "field", "") if isinstance(error, InvalidArgument) else ""
    return f"refused: {reason}" + (f" {field}" if field else "")


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


# Called when a call is refused for a corrupt record it read (DATA_LOSS): the server makes
# its health NOT_SERVING (Store.note), so an operator and a load balancer see it.
on_data_loss: Callable[[], None] | None = None


def _log(name: str, client, code, started: float) -> None:
    seconds = time.perf_counter() - started
    if access.enabled:
        access.call(name, client.id if client else "", client.role.name if client else "",
                    code or "CANCELLED", seconds * 1000)
    if metrics.enabled:
        metrics.call(name, code or "CANCELLED", seconds)

"""The gRPC servicers and the server's life: start, serve, drain on SIGTERM, close."""
import asyncio
import hashlib
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import fastpath
from server import validate
from server.clients import Clients
from server.errors import grpc_errors, status_of
from storage import records as r
from storage.lmdb_store import Store
from storage.records import CardRecord, CorruptRecord
from yikatong import cards, clock as clocks, config
from yikatong.errors import InvalidArgument, InvalidTransition, Unimplemented
from yikatong.v1 import yikatong_pb2 as pb, yikatong_pb2_grpc as rpc

SHUTDOWN_GRACE_SECONDS = 10.0
SERVICES = ("yikatong.v1.Authorization", "yikatong.v1.CardStatus", "yikatong.v1.Lifecycle",
            "yikatong.v1.Admin")


class Core:
    """What every servicer shares: the store, the clock, the clients, the fast path's policy."""

    def __init__(self, store: Store, clock, clients: Clients):
        self.store = store
        self.clock = clock
        self.clients = clients
        self.policy = fastpath.Policy(config.generation_retired_at,
                                      config.temp_loss_valid_seconds)

    def caller(self, context, method: str | None = None):
        client = self.clients.identify(context.invocation_metadata())
        if method is not None:
            client.require(method)
        return client


# --------------------------------------------------------------------- Authorization

class Authorization(rpc.AuthorizationServicer):
    def __init__(self, core: Core):
        self.core = core

    def _check(self, client, req, field: str = "") -> None:
        validate.authorize_request(req, field)
        client.require_channel(req.channel, pb.Channel.Name(req.channel))
        if req.amount_fen or req.phase:
            raise Unimplemented(f"{field}amount_fen/phase: money movement is not served yet; "
                                "send amount_fen=0 for a decision without money")

    def _decide(self, txn, req, now: int) -> pb.AuthorizeResponse:
        record = txn.get(req.card_number.encode("ascii"), db=self.core.store.dbs.cards)
        points = (config.service_points_required.get(req.service_code, 0)
                  if req.channel == r.CH_SERVICE else 0)
        reason = fastpath.decide(self.core.policy, record, req.channel, now, points)
        if reason == fastpath.CORRUPT:
            raise CorruptRecord(f"card record {req.card_number} is corrupt; not deciding on it")
        return pb.AuthorizeResponse(
            request_id=req.request_id,
            decision=pb.DECISION_APPROVED if reason == 0 else pb.DECISION_DECLINED,
            reason=reason,
        )

    def _decide_all(self, client, requests):
        validate.batch(requests, "requests")
        for i, req in enumerate(requests):
            self._check(client, req, f"requests[{i}].")
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            return [self._decide(txn, req, now) for req in requests]

    @grpc_errors
    async def Authorize(self, request, context):
        client = self.core.caller(context)
        self._check(client, request)
        with self.core.store.read() as txn:
            return self._decide(txn, request, self.core.clock.now())

    @grpc_errors
    async def AuthorizeBatch(self, request, context):
        client = self.core.caller(context)
        return pb.AuthorizeBatchResponse(responses=self._decide_all(client, request.requests))

    async def AuthorizeStream(self, request_iterator, context):
        try:
            client = self.core.caller(context)
            async for batch in request_iterator:
                yield pb.AuthorizeBatchResponse(responses=self._decide_all(client, batch.requests))
        except Exception as error:
            code = status_of(error)
            if code is None:
                raise
            await context.abort(code, str(error))


# --------------------------------------------------------------------- CardStatus

class CardStatus(rpc.CardStatusServicer):
    def __init__(self, core: Core):
        self.core = core

    def _status(self, book, number: str, now: int) -> pb.CardStatusResponse:
        raw = book.card_bytes(number)
        if raw is None:
            return pb.CardStatusResponse(card_number=number, found=False,
                                         reason=pb.DECLINE_REASON_CARD_NOT_FOUND)
        reason = fastpath.decide(self.core.policy, raw, r.CH_MEDICAL, now, 0)
        rec = CardRecord.decode(number, raw)  # raises CorruptRecord where decide said CORRUPT
        return pb.CardStatusResponse(
            card_number=number, found=True, pack=rec.pack,
            state=cards.effective_state(rec, now), reason=reason,
            transit_function=rec.has(r.FLAG_TRANSIT),
            financial_open=rec.has(r.FLAG_FINANCIAL_OPEN),
            financial_frozen=rec.has(r.FLAG_FINANCIAL_FROZEN),
            replaced_by=rec.replaced_by,
        )

    @grpc_errors
    async def GetStatus(self, request, context):
        self.core.caller(context, "GetStatus")
        validate.card_number(request.card_number)
        with self.core.store.read() as txn:
            return self._status(self.core.store.book(txn), request.card_number,
                                self.core.clock.now())

    @grpc_errors
    async def GetStatusBatch(self, request, context):
        self.core.caller(context, "GetStatusBatch")
        validate.batch(request.card_numbers, "card_numbers")
        for i, number in enumerate(request.card_numbers):
            validate.card_number(number, f"card_numbers[{i}]")
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            return pb.GetStatusBatchResponse(
                statuses=[self._status(book, n, now) for n in request.card_numbers])


# --------------------------------------------------------------------- Lifecycle

def card_message(book, rec: CardRecord, now: int) -> pb.Card:
    return pb.Card(
        card_number=rec.card_number, pack=rec.pack, state=cards.effective_state(rec, now),
        transit_function=rec.has(r.FLAG_TRANSIT), financial_open=rec.has(r.FLAG_FINANCIAL_OPEN),
        financial_frozen=rec.has(r.FLAG_FINANCIAL_FROZEN), service_bank=rec.service_bank,
        generation=rec.generation, replaced_by=rec.replaced_by, replaces=rec.replaces,
        applied_at=rec.applied_at, issued_at=rec.issued_at,
        loss_reported_at=rec.loss_reported_at, valid_until=rec.valid_until,
        locked_channels=[c for c in cards.LOCKABLE_CHANNELS if rec.lock_mask & (1 << c)],
        reject_reason=book.note(rec.card_number) if rec.state in r.FINAL_STATES else "",
        replacement_applied=rec.has(r.FLAG_REPLACEMENT_APPLIED),
    )


_PII_FIELDS = ("name", "gender", "birth_date", "nationality", "phone", "address", "ethnicity",
               "postcode", "occupation", "photo_sha256")


def pii_merger(given: pb.Holder):
    """GZ-9b: information already held is not asked for again (empty fields take the stored
    value). GZ-20: a stored value is never silently overwritten by a different one."""
    pii = pb.Holder(ssn=given.ssn, **{f: getattr(given, f) for f in _PII_FIELDS})

    def merge(stored: bytes | None) -> bytes:
        if stored is not None:
            held = pb.Holder.FromString(stored)
            for f in _PII_FIELDS:
                mine, theirs = getattr(pii, f), getattr(held, f)
                if not mine:
                    setattr(pii, f, theirs)
                elif theirs and mine != theirs:
                    raise InvalidTransition("held", "Apply", "GZ-20",
                                            f"holder.{f} differs from the information held; "
                                            "file a correction instead")
        if not pii.name or not pii.birth_date:
            raise InvalidArgument("holder.name" if not pii.name else "holder.birth_date",
                                  "is required for a first application")
        return pii.SerializeToString(deterministic=True)

    return merge


def validate_holder(h: pb.Holder, pack: int) -> None:
    cards.validate_ssn(h.ssn)
    for f in _PII_FIELDS:
        validate.text(getattr(h, f), f"holder.{f}")
    if h.birth_date:
        cards.parse_date("holder.birth_date", h.birth_date)
    if pack == r.PACK_GZ:  # GZ-9: occupation and mobile phone are part of the application
        validate.text(h.phone, "holder.phone", required=True)
        validate.text(h.occupation, "holder.occupation", required=True)


class Lifecycle(rpc.LifecycleServicer):
    def __init__(self, core: Core):
        self.core = core

    async def _write(self, context, method: str, request, op) -> pb.Card:
        """Run `op(book, now) -> CardRecord` in the writer, once per request id (a replay
        answers the first answer; the same id with other fields is ID_REUSED)."""
        self.core.caller(context, method)
        validate.request_id(request.request_id)
        fingerprint = hashlib.sha256(
            method.encode() + b"\0" + request.SerializeToString(deterministic=True)).digest()
        clock = self.core.clock

        def command(book):
            answer = book.replay(request.request_id, fingerprint)
            if answer is None:
                now = clock.now()
                answer = card_message(book, op(book, now), now).SerializeToString()
                book.remember(request.request_id, fingerprint, answer)
            return answer

        answer = await asyncio.wrap_future(self.core.store.submit(command))
        return pb.Card.FromString(answer)

    def _card_op(self, context, method, request, fn, *args):
        validate.card_number(request.card_number)
        return self._write(context, method, request,
                           lambda book, now: fn(book, now, request.card_number, *args))

    @grpc_errors
    async def Apply(self, request, context):
        self.core.caller(context, "Apply")
        validate.enum(request.pack, pb.Pack, "pack")
        validate_holder(request.holder, request.pack)
        validate.bank(request.service_bank, "service_bank", required=request.pack == r.PACK_GZ)
        validate.enum(request.residence_basis, pb.ResidenceBasis, "residence_basis",
                      allow_unspecified=True)
        h = request.holder
        cards.check_eligibility(request.pack, h.household_registered, h.insured,
                                h.entitled_public_services, request.residence_registered_since,
                                request.residence_basis, self.core.clock.now())
        merge = pii_merger(h)
        return await self._write(context, "Apply", request, lambda book, now: cards.apply(
            book, now, pack=request.pack, ssn=h.ssn, merge_pii=merge,
            with_transit=request.with_transit, service_bank=request.service_bank,
            instant=request.instant))

    @grpc_errors
    async def Verify(self, request, context):
        validate.text(request.reason, "reason")
        return await self._card_op(context, "Verify", request, cards.verify, request.approved,
                                   request.reason)

    @grpc_errors
    async def Issue(self, request, context):
        return await self._card_op(context, "Issue", request, cards.issue)

    @grpc_errors
    async def Activate(self, request, context):
        return await self._card_op(context, "Activate", request, cards.activate)

    @grpc_errors
    async def OpenFinancial(self, request, context):
        validate.bank(request.bank, "bank", required=True)
        return await self._card_op(context, "OpenFinancial", request, cards.open_financial,
                                   request.bank)

    @grpc_errors
    async def ReportTemporaryLoss(self, request, context):
        return await self._card_op(context, "ReportTemporaryLoss", request,
                                   cards.report_temporary_loss)

    @grpc_errors
    async def ReportLoss(self, request, context):
        client = self.core.caller(context, "ReportLoss")
        return await self._card_op(context, "ReportLoss", request, cards.report_loss,
                                   client.role)

    @grpc_errors
    async def CancelLoss(self, request, context):
        client = self.core.caller(context, "CancelLoss")
        return await self._card_op(context, "CancelLoss", request, cards.cancel_loss,
                                   client.role)

    @grpc_errors
    async def ReportBankLoss(self, request, context):
        return await self._card_op(context, "ReportBankLoss", request, cards.report_bank_loss)

    @grpc_errors
    async def CancelBankLoss(self, request, context):
        return await self._card_op(context, "CancelBankLoss", request, cards.cancel_bank_loss)

    @grpc_errors
    async def Replace(self, request, context):
        validate.enum(request.reason, pb.ReplaceReason, "reason")
        return await self._card_op(context, "Replace", request, cards.replace, request.reason,
                                   request.instant)

    @grpc_errors
    async def Cancel(self, request, context):
        validate.text(request.reason, "reason", required=True)
        return await self._card_op(context, "Cancel", request, cards.cancel, request.reason)

    @grpc_errors
    async def LockApplication(self, request, context):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op(context, "LockApplication", request, cards.lock_application,
                                   request.channel, True)

    @grpc_errors
    async def UnlockApplication(self, request, context):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op(context, "UnlockApplication", request,
                                   cards.lock_application, request.channel, False)

    @grpc_errors
    async def GetCard(self, request, context):
        self.core.caller(context, "GetCard")
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            rec = book.card(request.card_number)
            if rec is None:
                raise cards.CardNotFound(request.card_number)
            return card_message(book, rec, now)


# --------------------------------------------------------------------- Admin

class Admin(rpc.AdminServicer):
    def __init__(self, core: Core):
        self.core = core

    def _manual_clock(self, context, method: str):
        self.core.caller(context, method)
        if not self.core.clock.manual:
            raise InvalidTransition("clock=system", method, "--clock manual",
                                    "the clock can be moved only under --clock manual")
        return self.core.clock

    @staticmethod
    def _answer(now: int) -> pb.ClockResponse:
        return pb.ClockResponse(now=now, time=clocks.format_time(now))

    @grpc_errors
    async def AdvanceClock(self, request, context):
        clock = self._manual_clock(context, "AdvanceClock")
        if request.seconds < 0:
            raise InvalidArgument("seconds", "must not be negative: the clock never goes back")
        return self._answer(clock.advance(request.seconds))

    @grpc_errors
    async def SetClock(self, request, context):
        clock = self._manual_clock(context, "SetClock")
        try:
            t = clocks.parse_time(request.time)
        except ValueError:
            raise InvalidArgument("time", f"{request.time!r} is not ISO-8601") from None
        try:
            return self._answer(clock.set(t))
        except ValueError as error:
            raise InvalidArgument("time", str(error)) from None


# --------------------------------------------------------------------- serving

async def serve(store: Store, clock, clients: Clients, listen: str, on_ready=None) -> None:
    core = Core(store, clock, clients)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.message_size_max),
        ("grpc.max_send_message_length", config.message_size_max),
        ("grpc.so_reuseport", 0),  # one server per port until --workers shares it on purpose
    ])
    rpc.add_AuthorizationServicer_to_server(Authorization(core), server)
    rpc.add_CardStatusServicer_to_server(CardStatus(core), server)
    rpc.add_LifecycleServicer_to_server(Lifecycle(core), server)
    rpc.add_AdminServicer_to_server(Admin(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        server.add_insecure_port(listen)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {listen}: {error}") from None
    await server.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    # Graceful: say NOT_SERVING, refuse new calls, let in-flight calls finish, then close.
    await health_servicer.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_SECONDS)

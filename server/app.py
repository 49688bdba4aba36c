"""The gRPC servicers and the server's life: start, serve, drain on SIGTERM, close."""
import asyncio
import hashlib
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import fastpath
from server import validate
from server.clients import Clients
from server.errors import Undecodable, decoder, grpc_errors, status_of
from storage import records as r
from storage.lmdb_store import Store
from storage.records import CardRecord, CorruptRecord
from yikatong import cards, clock as clocks, config, ledger
from yikatong.errors import InvalidArgument, InvalidTransition, YikatongError
from yikatong.v1 import yikatong_pb2 as pb, yikatong_pb2_grpc as rpc

SHUTDOWN_GRACE_SECONDS = 10.0
_APPROVED, _DECLINED = pb.DECISION_APPROVED, pb.DECISION_DECLINED
SERVICES = ("yikatong.v1.Authorization", "yikatong.v1.CardStatus", "yikatong.v1.Lifecycle",
            "yikatong.v1.Ledger", "yikatong.v1.Admin")


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

    async def write_once(self, method: str, request_id: str, request, op) -> bytes:
        """Run `op(book, now, fingerprint) -> answer bytes` in the writer, once per id: a
        replay gets the first answer; the same id with other fields is ID_REUSED. One id
        space for every write (lifecycle request ids, transfer ids, Authorize request ids)."""
        fp = fingerprint(method, request)
        clock = self.clock
        return await asyncio.wrap_future(self.store.submit(
            lambda book: book.once(request_id, fp, lambda: op(book, clock.now(), fp))))


def fingerprint(method: str, request) -> bytes:
    """What a request id is bound to: the method and every field of the request."""
    return hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)).digest()


# --------------------------------------------------------------------- Authorization

class Authorization(rpc.AuthorizationServicer):
    """Decisions without money are pure reads (no write, no wait for the writer); a replayed
    request id gets the answer for the card as it is now. Decisions with money run in the
    writer: decided, debited and remembered under the request id in one transaction, answered
    after its fsync; a replay returns the first answer and moves nothing."""

    def __init__(self, core: Core):
        self.core = core
        self.cards_db = core.store.dbs.cards

    def _check(self, client, req, field: str = "") -> None:
        validate.authorize_request(req, field)
        client.require_channel(req.channel)

    def _reason(self, txn, req, now: int) -> int:
        """The decision without money: one LMDB read and the fast path."""
        record = txn.get(req.card_number.encode("ascii"), db=self.cards_db)
        points = (config.service_points_required.get(req.service_code, 0)
                  if req.channel == r.CH_SERVICE else 0)
        reason = fastpath.decide(self.core.policy, record, req.channel, now, points)
        if reason == fastpath.CORRUPT:
            raise CorruptRecord(f"card record {req.card_number} is corrupt; not deciding on it")
        return reason

    def _money(self, book, now: int, fingerprint: bytes, req) -> bytes:
        """One decision with money, inside the writer's transaction."""
        kind, default_payee, default_timeout = config.channel_money[req.channel]
        record = book.card_bytes(req.card_number)
        holder_id = r.holder_id_of(record)
        debit = r.holder_account_key(holder_id, kind) if holder_id is not None else None
        if req.phase in (pb.PHASE_POST, pb.PHASE_VOID):
            hold = ledger.get(book, req.hold_request_id)
            if hold is None or hold.kind != r.T_PENDING or hold.debit != debit:
                raise InvalidArgument("hold_request_id", f"{req.hold_request_id!r} is not a hold "
                                      f"on card {req.card_number}'s {pb.Channel.Name(req.channel)} "
                                      "account")
            ledger.resolve(book, now, req.request_id, req.hold_request_id,
                           post=req.phase == pb.PHASE_POST, amount=req.amount_fen,
                           fingerprint=fingerprint)
            reason, left = 0, ledger.available(book, debit, now)
        else:
            left = ledger.settle(book, debit, now) if debit is not None else 0
            reason = fastpath.decide(self.core.policy, record, req.channel, now, 0,
                                     req.amount_fen, left)
            if reason == fastpath.CORRUPT:
                raise CorruptRecord(f"card record {req.card_number} is corrupt")
            if reason == 0:
                credit = r.operator_account_key(req.payee_account or default_payee)
                ledger.create(book, now, req.request_id, debit, credit, req.amount_fen,
                              pending=req.phase == pb.PHASE_HOLD,
                              timeout=req.hold_timeout_seconds or default_timeout,
                              channel=req.channel, fingerprint=fingerprint, settled=left)
                left -= req.amount_fen
        return pb.AuthorizeResponse(
            request_id=req.request_id, available_fen=left if debit is not None else 0,
            decision=pb.DECISION_APPROVED if reason == 0 else pb.DECISION_DECLINED,
            reason=reason).SerializeToString()

    async def _answer(self, client, requests) -> pb.AuthorizeBatchResponse:
        """Check every request, then answer in order: decisions without money at once from
        one read transaction, those with money through the writer in one command, so that
        decisions within one batch see each other's debits."""
        validate.batch(requests, "requests")
        check = self._check
        for i, q in enumerate(requests):
            try:
                check(client, q)
            except YikatongError as error:
                error.args = (f"requests[{i}].{error}",)
                raise
        now = self.core.clock.now()
        out = pb.AuthorizeBatchResponse()
        add = out.responses.add
        money = []
        with self.core.store.read() as txn:
            reason_of = self._reason
            for i, q in enumerate(requests):
                if q.amount_fen or q.phase:
                    money.append((i, q))
                    add()
                else:
                    reason = reason_of(txn, q, now)
                    add(request_id=q.request_id, reason=reason,
                        decision=_APPROVED if reason == 0 else _DECLINED)
        if money:
            answers = await asyncio.wrap_future(
                self.core.store.submit(self.money_command(money, True)))
            for (i, _), answer in zip(money, answers):
                out.responses[i].ParseFromString(answer)
        return out

    def money_command(self, money, field_prefix: bool = False):
        """The writer command for [(index, request)] that move money: each decided, debited
        and remembered under its request id, in order, in one transaction."""
        fingerprints = [fingerprint("Authorize", q) for _, q in money]
        clock, decide = self.core.clock, self._money

        def command(book):
            out = []
            for (i, q), fp in zip(money, fingerprints):
                try:
                    answer = book.once(q.request_id, fp,
                                       lambda: decide(book, clock.now(), fp, q))
                except YikatongError as error:
                    if field_prefix:
                        error.args = (f"requests[{i}].{error}",)
                    raise
                out.append(answer)
            return out
        return command

    @grpc_errors
    async def Authorize(self, request, context):
        client = self.core.caller(context)
        self._check(client, request)
        if request.amount_fen or request.phase:
            answer = await asyncio.wrap_future(
                self.core.store.submit(self.money_command([(0, request)])))
            return pb.AuthorizeResponse.FromString(answer[0])
        with self.core.store.read() as txn:
            reason = self._reason(txn, request, self.core.clock.now())
        return pb.AuthorizeResponse(request_id=request.request_id, reason=reason,
                                    decision=_APPROVED if reason == 0 else _DECLINED)

    @grpc_errors
    async def AuthorizeBatch(self, request, context):
        return await self._answer(self.core.caller(context), request.requests)

    async def AuthorizeStream(self, request_iterator, context):
        try:
            client = self.core.caller(context)
            async for batch in request_iterator:
                if isinstance(batch, Undecodable):
                    raise batch.error()
                yield await self._answer(client, batch.requests)
        except (YikatongError, CorruptRecord) as error:
            await context.abort(status_of(error), str(error))


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
        """Run `op(book, now) -> CardRecord` in the writer, once per request id."""
        self.core.caller(context, method)
        validate.request_id(request.request_id)
        answer = await self.core.write_once(
            method, request.request_id, request,
            lambda book, now, _: card_message(book, op(book, now), now).SerializeToString())
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


# --------------------------------------------------------------------- Ledger

_TRANSFER_STATUS = {r.S_POSTED: pb.TRANSFER_STATUS_POSTED, r.S_PENDING: pb.TRANSFER_STATUS_PENDING,
                    r.S_VOIDED: pb.TRANSFER_STATUS_VOIDED, r.S_EXPIRED: pb.TRANSFER_STATUS_EXPIRED}


def transfer_answer(transfer_id: str, t) -> bytes:
    return pb.TransferResponse(transfer_id=transfer_id, status=_TRANSFER_STATUS[t.status],
                               amount_fen=t.amount, timeout_at=t.timeout_at).SerializeToString()


def _holder_of(book, card_number: str) -> int:
    rec = book.card(card_number)
    if rec is None:
        raise cards.CardNotFound(card_number)
    return rec.holder_id


class Ledger(rpc.LedgerServicer):
    def __init__(self, core: Core):
        self.core = core

    @staticmethod
    def _account_ref(ref, field: str):
        """Validate an AccountRef at the edge; returns book -> account key."""
        which = ref.WhichOneof("account")
        if which == "operator":
            key = r.operator_account_key(validate.operator(ref.operator, f"{field}.operator"))
            return lambda book: key
        if which != "holder":
            raise InvalidArgument(field, "is required: a holder account or an operator account")
        number = validate.card_number(ref.holder.card_number, f"{field}.holder.card_number")
        kind = validate.enum(ref.holder.kind, pb.AccountKind, f"{field}.holder.kind")
        return lambda book: r.holder_account_key(_holder_of(book, number), kind)

    @grpc_errors
    async def Transfer(self, request, context):
        self.core.caller(context, "Transfer")
        tid = validate.request_id(request.transfer_id, "transfer_id")
        validate.enum(request.phase, pb.Phase, "phase", allow_unspecified=True)
        validate.timeout(request.timeout_seconds, "timeout_seconds")
        if request.phase in (pb.PHASE_POST, pb.PHASE_VOID):
            pending_id = validate.request_id(request.pending_id, "pending_id")
            if request.HasField("debit") or request.HasField("credit"):
                raise InvalidArgument("debit", "a post or void names only pending_id")
            if request.phase == pb.PHASE_VOID and request.amount_fen:
                raise InvalidArgument("amount_fen", "a void moves no money; send 0")
            validate.amount(request.amount_fen, "amount_fen", zero_ok=True)

            def op(book, now, fingerprint):
                return transfer_answer(tid, ledger.resolve(
                    book, now, tid, pending_id, post=request.phase == pb.PHASE_POST,
                    amount=request.amount_fen, fingerprint=fingerprint))
        else:
            if request.pending_id:
                raise InvalidArgument("pending_id", "is only for PHASE_POST/PHASE_VOID")
            if request.timeout_seconds and request.phase != pb.PHASE_HOLD:
                raise InvalidArgument("timeout_seconds", "is only for PHASE_HOLD")
            if request.phase == pb.PHASE_HOLD and not request.timeout_seconds:
                raise InvalidArgument("timeout_seconds", "a hold needs a timeout")
            debit = self._account_ref(request.debit, "debit")
            credit = self._account_ref(request.credit, "credit")
            amount = validate.amount(request.amount_fen, "amount_fen", zero_ok=False)

            def op(book, now, fingerprint):
                return transfer_answer(tid, ledger.create(
                    book, now, tid, debit(book), credit(book), amount,
                    pending=request.phase == pb.PHASE_HOLD, timeout=request.timeout_seconds,
                    fingerprint=fingerprint))
        return pb.TransferResponse.FromString(
            await self.core.write_once("Transfer", tid, request, op))

    @grpc_errors
    async def Reverse(self, request, context):
        self.core.caller(context, "Reverse")
        original = validate.request_id(request.transfer_id, "transfer_id")
        rid = validate.request_id(request.reversal_id, "reversal_id")
        validate.amount(request.amount_fen, "amount_fen", zero_ok=True)

        def op(book, now, fingerprint):
            return transfer_answer(rid, ledger.reverse(book, now, rid, original,
                                                       request.amount_fen, fingerprint))
        return pb.TransferResponse.FromString(
            await self.core.write_once("Reverse", rid, request, op))

    @grpc_errors
    async def GetBalances(self, request, context):
        self.core.caller(context, "GetBalances")
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            holder_id = _holder_of(book, request.card_number)
            out = []
            for kind in (pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_TRANSIT, pb.ACCOUNT_KIND_BENEFIT):
                key = r.holder_account_key(holder_id, kind)
                a = ledger.account(book, key)
                pending = a.debits_pending - ledger.expired_held(book, key, now)
                out.append(pb.Balance(kind=kind, posted_fen=a.posted, pending_fen=pending,
                                      available_fen=a.posted - pending))
        return pb.GetBalancesResponse(balances=out)


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

_HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(server, servicer) -> None:
    """Register a servicer from the proto's own description, as the generated
    add_*_to_server would, but with a request decoder that turns bytes that are not a valid
    message into INVALID_ARGUMENT instead of gRPC's UNKNOWN."""
    name = type(servicer).__name__
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: _HANDLER[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name),
            request_deserializer=decoder(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def serve(store: Store, clock, clients: Clients, listen: str, on_ready=None,
                concurrent_rpcs_max: int = config.concurrent_rpcs_max) -> None:
    core = Core(store, clock, clients)
    # Too many callers: new calls beyond the limit are refused at once (RESOURCE_EXHAUSTED);
    # calls already in progress are unaffected.
    server = grpc.aio.server(maximum_concurrent_rpcs=concurrent_rpcs_max, options=[
        ("grpc.max_receive_message_length", config.message_size_max),
        ("grpc.max_send_message_length", config.message_size_max),
        ("grpc.so_reuseport", 0),  # one server per port until --workers shares it on purpose
    ])
    for servicer in (Authorization(core), CardStatus(core), Lifecycle(core), Ledger(core),
                     Admin(core)):
        add_service(server, servicer)
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

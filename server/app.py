"""The gRPC servicers and the server's life: start, serve, drain on SIGTERM, close.

Servicers translate: wire messages to the domain's arguments and the domain's answers back.
Identity, roles, error mapping and the access log are not here: every call passes through
server/calls.py first. The rules are the domain's (yikatong/).
"""
import asyncio
import contextlib
import hashlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from yikatong import authorize, cards, config, fastpath, ledger, points
from yikatong import clock as clocks
from yikatong.errors import (
    CardNotFound,
    HolderNotFound,
    InvalidArgument,
    InvalidTransition,
    PermissionDenied,
    YikatongError,
)
from yikatong.model import (
    FINAL_STATES,
    PII_FIELDS,
    AuditEvent,
    CancelGround,
    Card,
    Changed,
    ChangeKind,
    Channel,
    CreditRecord,
    Eligibility,
    Flag,
    HolderInfo,
    IssuingBanks,
    Pack,
    Phase,
    Proxy,
    ProxyRelation,
    Role,
    State,
    TransferStatus,
    holder_account_key,
    mask,
    operator_account_key,
)
from yikatong.server import calls, errors, validate
from yikatong.server import log as log_module
from yikatong.server.clients import Client, Clients
from yikatong.server.errors import Undecodable, with_prefix
from yikatong.server.metrics import REASONS, metrics
from yikatong.server.roles import CHANNEL_ROLES, PII_READERS, require_channel
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

log = logging.getLogger("yikatong.server")
SHUTDOWN_GRACE_SECONDS = 10.0
_APPROVED, _DECLINED = pb.DECISION_APPROVED, pb.DECISION_DECLINED


class Core:
    """What every servicer shares: the store, the clock, the fast path's policy."""

    def __init__(self, store: Store, clock, banks: IssuingBanks | None = None):
        self.store = store
        self.clock = clock
        self.banks = banks  # GZ-9c; None: no list configured, the check is off
        self.policy = fastpath.Policy(config.generation_retired_at)
        self.feed = Feed(store)

    async def write(self, command):
        """Run `command(book)` in the writer; answered after its commit."""
        return await asyncio.wrap_future(self.store.submit(command))

    async def write_once(self, method: str, client: Client, request_id: str, request,
                         op) -> bytes:
        """Run `op(book, now, fingerprint) -> answer bytes` in the writer, once per id: a
        replay gets the first answer; the same id with other fields is ID_REUSED. One id
        space for every write (lifecycle request ids, transfer ids, Authorize request ids)."""
        fp = fingerprint(method, client, request)
        clock = self.clock
        return await self.write(
            lambda book: book.once(request_id, fp, lambda: op(book, clock.now(), fp)))


class Feed:
    """What the change feed's watchers on this worker wait on: the last committed change
    sequence, looked for every config.watch_poll_seconds while anyone watches (whichever
    worker committed it: the store is the one place they all see), and one event that
    wakes every watcher when it moves."""

    def __init__(self, store: Store):
        self.store = store
        self.watchers = 0
        self.head = 0
        self._moved = asyncio.Event()
        self._poller: asyncio.Task | None = None

    @contextlib.contextmanager
    def watching(self):
        self.watchers += 1
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            yield
        finally:
            self.watchers -= 1

    async def beyond(self, sequence: int) -> None:
        """Return once a change after `sequence` is committed."""
        while self.head <= sequence:
            await self._moved.wait()

    async def _poll(self) -> None:
        try:
            while self.watchers:
                with self.store.read() as txn:
                    head = self.store.book(txn).last_change()
                if head != self.head:
                    self.head = head
                    moved, self._moved = self._moved, asyncio.Event()
                    moved.set()
                await asyncio.sleep(config.watch_poll_seconds)
        finally:
            self._poller = None


def fingerprint(method: str, client: Client, request) -> bytes:
    """What a request id is bound to: the client that sent it, the method, and every field of
    the request the server understands (unknown fields, which a newer client may send, are
    not part of it). Another client replaying the id is ID_REUSED: it never sees the answer
    (nor skips the checks of who may act that the first call passed)."""
    request.DiscardUnknownFields()
    return hashlib.sha256(f"{client.id}\0{method}\0".encode()
                          + request.SerializeToString(deterministic=True)).digest()


# --------------------------------------------------------------------- Authorization

class Authorization:
    """Decisions without money are pure reads (no write, no wait for the writer); a replayed
    request id gets the answer for the card as it is now. Decisions with money run in the
    writer (yikatong.authorize.with_money): a replay returns the first answer and moves
    nothing."""

    # Registered bytes in, bytes out (server/calls.py) when the compiled wire path is there:
    # a plainly valid status-only request is answered from its wire bytes by Cython
    # (fastpath authorize_wire); anything else is decoded and taken by the Python path below.
    RAW_METHODS = ("Authorize", "AuthorizeBatch", "AuthorizeStream") \
        if fastpath.authorize_wire else ()

    def __init__(self, core: Core):
        self.core = core

    def _wire(self, raw: bytes, client: Client, batch: bool) -> bytes | None:
        """The wire path's answer, or None: the Python path takes it."""
        store = self.core.store
        with store.read() as txn:
            return fastpath.authorize_wire(
                self.core.policy, raw, batch, txn.get, store.dbs.cards, store.dbs.ecards,
                store.dbs.holder_cards, self.core.clock.now(), CHANNEL_MASKS[client.role],
                points.in_force().points_required, metrics.decisions, config.batch_size_max,
                store.dbs.bank_losses)

    @staticmethod
    def _check(client: Client, req) -> None:
        validate.authorize_request(req)
        require_channel(client.role, req.channel)

    async def _answer(self, client: Client, requests, method: str) -> pb.AuthorizeBatchResponse:
        """Check every request, then answer in order: decisions without money at once from
        one read transaction, those with money through the writer in one command, so that
        decisions within one batch see each other's debits."""
        validate.batch(requests, "requests")
        check = self._check
        for i, q in enumerate(requests):
            try:
                check(client, q)
            except YikatongError as error:
                raise with_prefix(error, f"requests[{i}].") from None
        now = self.core.clock.now()
        out = pb.AuthorizeBatchResponse()
        add = out.responses.add
        money = []
        policy, decide, tally = self.core.policy, authorize.without_money, metrics.decisions
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            for i, q in enumerate(requests):
                if q.amount_fen or q.phase:
                    money.append((i, q))
                    add()
                else:
                    reason = decide(policy, book, q.card_number, q.channel, q.service_code, now)
                    add(request_id=q.request_id, reason=reason,
                        decision=_APPROVED if reason == 0 else _DECLINED)
                    tally[q.channel * REASONS + reason] += 1
        if money:
            answers = await self.core.write(self.money_command(money, client, method, True))
            for (i, q), answer in zip(money, answers, strict=True):
                response = out.responses[i]
                response.ParseFromString(answer)
                tally[q.channel * REASONS + response.reason] += 1
        return out

    def money_command(self, money, client: Client, method: str, field_prefix: bool = False):
        """The writer command for [(index, request)] that move money: each decided, debited
        and remembered under its request id, in order, in one transaction; a debit that
        moved money has its audit event there too."""
        fingerprints = [fingerprint("Authorize", client, q) for _, q in money]
        clock, policy, role = self.core.clock, self.core.policy, client.role
        client_id, role_name = client.id, role.name

        def decide(book, q, fp) -> bytes:
            now = clock.now()
            reason, left = authorize.with_money(  # positional: once per debit, on the hot path
                policy, book, now, q.request_id, q.card_number, q.channel, q.amount_fen,
                q.phase, q.hold_request_id, q.payee_account, q.hold_timeout_seconds, role, fp)
            if reason == 0:
                book.append_audit(now, client_id, role_name, method, q.card_number)
            return pb.AuthorizeResponse(
                request_id=q.request_id, available_fen=left, reason=reason,
                decision=_APPROVED if reason == 0 else _DECLINED).SerializeToString()

        def command(book):
            out = []
            for (i, q), fp in zip(money, fingerprints, strict=True):
                try:
                    out.append(book.once(q.request_id, fp, lambda q=q, fp=fp: decide(book, q, fp)))
                except YikatongError as error:
                    raise (with_prefix(error, f"requests[{i}].") if field_prefix else error) \
                        from None
            return out
        return command

    async def Authorize(self, request, client: Client):
        if type(request) is bytes:
            answer = self._wire(request, client, False)
            if answer is not None:
                return answer
            request = decode(pb.AuthorizeRequest, request)
        self._check(client, request)
        if request.amount_fen or request.phase:
            answer = await self.core.write(self.money_command([(0, request)], client,
                                                              "Authorization.Authorize"))
            response = pb.AuthorizeResponse.FromString(answer[0])
            metrics.decisions[request.channel * REASONS + response.reason] += 1
            return response
        with self.core.store.read() as txn:
            reason = authorize.without_money(
                self.core.policy, self.core.store.book(txn), request.card_number,
                request.channel, request.service_code, self.core.clock.now())
        metrics.decisions[request.channel * REASONS + reason] += 1
        return pb.AuthorizeResponse(request_id=request.request_id, reason=reason,
                                    decision=_APPROVED if reason == 0 else _DECLINED)

    async def AuthorizeBatch(self, request, client: Client):
        if type(request) is bytes:
            answer = self._wire(request, client, True)
            if answer is not None:
                return answer
            request = decode(pb.AuthorizeBatchRequest, request)
        return await self._answer(client, request.requests, "Authorization.AuthorizeBatch")

    async def AuthorizeStream(self, requests, client: Client):
        async for batch in requests:
            if type(batch) is bytes:
                answer = self._wire(batch, client, True)
                if answer is not None:
                    yield answer
                    continue
                batch = decode(pb.AuthorizeBatchRequest, batch)
            yield await self._answer(client, batch.requests, "Authorization.AuthorizeStream")


# the channels each role may authorize, as the wire path takes them (bit 1 << channel)
CHANNEL_MASKS = {role: sum(1 << ch for ch, roles in CHANNEL_ROLES.items() if role in roles)
                 for role in Role}


def decode(message_class, raw: bytes):
    """A request the wire path left to Python: decoded, or INVALID_ARGUMENT as calls.py
    says of any undecodable request."""
    request = errors.decoder(message_class)(raw)
    if type(request) is Undecodable:
        raise request.error()
    return request


# --------------------------------------------------------------------- CardStatus

class CardStatus:
    RAW_METHODS = ("GetStatusBatch",) if fastpath.status_wire else ()  # as Authorization's

    def __init__(self, core: Core):
        self.core = core

    def _status(self, book, number: str, now: int) -> pb.CardStatusResponse:
        raw = book.use_bytes(number)  # read once: decided on, then decoded
        if raw is None:
            return pb.CardStatusResponse(card_number=number, found=False,
                                         reason=pb.DECLINE_REASON_CARD_NOT_FOUND)
        reason = authorize.on_record(self.core.policy, raw, number, Channel.MEDICAL, "", now)
        rec = records.decode_card(number, raw)  # CorruptRecord (DATA_LOSS): not served
        return pb.CardStatusResponse(
            card_number=number, found=True, pack=rec.pack,
            state=cards.effective_state(rec, now), reason=reason,
            transit_function=rec.has(Flag.TRANSIT),
            financial_open=rec.has(Flag.FINANCIAL_OPEN),
            financial_frozen=cards.financial_frozen(book, rec, now),  # as status_wire
            replaced_by=rec.replaced_by,
        )

    async def GetStatus(self, request, client: Client):
        validate.card_number(request.card_number)
        with self.core.store.read() as txn:
            return self._status(self.core.store.book(txn), request.card_number,
                                self.core.clock.now())

    async def WatchChanges(self, request, client: Client):
        """History from LMDB, then live: each batch read in a read transaction closed before
        anything is sent, so a slow watcher holds no transaction and no buffer of ours (a
        stalled one is ended by calls.Limits.write, naming where to resume)."""
        feed, after = self.core.feed, request.from_sequence
        with feed.watching():
            while True:
                events = self._changes(after)
                if not events:
                    await feed.beyond(after)
                    continue
                for event in events:
                    yield event
                after = events[-1].sequence

    def _changes(self, after: int) -> list[pb.ChangeEvent]:
        now, policy = self.core.clock.now(), self.core.policy
        out: list[pb.ChangeEvent] = []
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            for seq, change in book.changes(after):
                raw = book.card_bytes(change.card_number) if change.card_number else None
                reason, until, state = pb.DECLINE_REASON_CARD_NOT_FOUND, 0, change.state
                if raw is not None:
                    reason = authorize.on_record(policy, raw, change.card_number,
                                                 Channel.TRANSIT, "", now)
                    rec = records.decode_card(change.card_number, raw)
                    if change.kind != ChangeKind.CARD:
                        state = cards.effective_state(rec, now)
                    if reason == pb.DECLINE_REASON_CARD_FROZEN:
                        until = rec.temp_loss_until  # SH-18b: the report lapses then
                    elif reason == 0 and rec.pack == Pack.RC:
                        until = rec.valid_until  # RC-14
                what = change.what
                out.append(pb.ChangeEvent(
                    sequence=seq, card_number=change.card_number, state=state,
                    time=change.time, state_changed=bool(what & Changed.STATE),
                    locks_changed=bool(what & Changed.LOCKS),
                    functions_changed=bool(what & Changed.FUNCTIONS),
                    replacement_changed=bool(what & Changed.REPLACEMENT),
                    balance_changed=bool(what & Changed.BALANCE),
                    validity_changed=bool(what & Changed.VALIDITY),
                    points_changed=bool(what & Changed.POINTS),
                    transit_reason=reason, transit_reason_until=until))
                if len(out) >= config.watch_batch_max:
                    break
        return out

    async def GetStatusBatch(self, request, client: Client):
        if type(request) is bytes:
            store = self.core.store
            with store.read() as txn:
                answer = fastpath.status_wire(
                    self.core.policy, request, txn.get, store.dbs.cards, store.dbs.ecards,
                    store.dbs.holder_cards, self.core.clock.now(), config.batch_size_max,
                    store.dbs.bank_losses)
            if answer is not None:
                return answer
            request = decode(pb.GetStatusBatchRequest, request)
        validate.batch(request.card_numbers, "card_numbers")
        for i, number in enumerate(request.card_numbers):
            validate.card_number(number, f"card_numbers[{i}]")
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            return pb.GetStatusBatchResponse(
                statuses=[self._status(book, n, now) for n in request.card_numbers])


# --------------------------------------------------------------------- Lifecycle

def card_message(book, rec: Card, now: int) -> pb.Card:
    return pb.Card(
        card_number=rec.card_number, pack=rec.pack, state=cards.effective_state(rec, now),
        transit_function=rec.has(Flag.TRANSIT), financial_open=rec.has(Flag.FINANCIAL_OPEN),
        financial_frozen=cards.financial_frozen(book, rec, now), service_bank=rec.service_bank,
        generation=rec.generation, replaced_by=rec.replaced_by, replaces=rec.replaces,
        applied_at=rec.applied_at, issued_at=rec.issued_at,
        loss_reported_at=rec.loss_reported_at, valid_until=rec.valid_until,
        locked_channels=[c for c in cards.LOCKABLE_CHANNELS if rec.lock_mask & (1 << c)],
        reject_reason=book.card_text(rec.card_number, "note") if rec.state in FINAL_STATES
        else "",
        replacement_applied=rec.has(Flag.REPLACEMENT_APPLIED),
        received_at=rec.received_at,
        issuing_organ=book.card_text(rec.card_number, "organ") if rec.pack == Pack.RC else "",
        cancel_ground=_cancel_ground(book, rec),
        fee_fen=_fee(book, rec),
        photo=rec.has(Flag.PHOTO),
        applied_by_proxy=_proxy_relation(book, rec),
    )


def _proxy_relation(book, rec: Card) -> int:
    text = book.card_text(rec.card_number, "proxy") if rec.pack == Pack.RC else ""
    return ProxyRelation[text.split(" ", 1)[0]] if text else 0


def _fee(book, rec: Card) -> int:
    """What making this card again cost the holder (SH-24, GZ-27, RC-33), 0 for a first."""
    if not rec.replaces:
        return 0
    fee = book.transfer(f"fee:{rec.card_number}")  # less what was reversed (GZ-27, RC-33)
    return fee.amount - fee.resolved if fee is not None else 0


_FEE_RULE = {Pack.SH: "SH-24", Pack.GZ: "GZ-27", Pack.BJ: "BJ via GZ-27", Pack.RC: "RC-33"}


def _cancel_ground(book, rec: Card) -> int:
    if rec.state != State.CANCELLED:
        return 0
    name = book.card_text(rec.card_number, "ground")
    return CancelGround[name] if name else 0


def validate_proxy(p: pb.Proxy) -> Proxy:
    """RC-8: the proxy's own identity document, name, relation and ground."""
    cards.validate_ssn(p.ssn, "proxy.ssn")
    validate.text(p.name, "proxy.name", required=True)
    validate.enum(p.relation, pb.ProxyRelation, "proxy.relation")
    validate.enum(p.ground, pb.ProxyGround, "proxy.ground")
    return Proxy(p.ssn, p.name, p.relation, p.ground)


def validate_holder(h: pb.Holder) -> HolderInfo:
    """The edge's checks of an application's personal information; the domain's value."""
    cards.validate_ssn(h.ssn)
    for f in PII_FIELDS:
        validate.text(getattr(h, f), f"holder.{f}")
    if h.birth_date:
        cards.parse_date("holder.birth_date", h.birth_date)
    # What each pack's application needs is checked after the held information is merged
    # (GZ-9b: what is held is not asked for again): yikatong.cards.merge_holder.
    return HolderInfo(h.ssn, **{f: getattr(h, f) for f in PII_FIELDS})


class CardWrites:
    """The one write path of the operations on a card (Lifecycle, ResidenceCard)."""

    service = ""

    def __init__(self, core: Core):
        self.core = core

    async def _write(self, method: str, request, client: Client, op) -> pb.Card:
        """Run `op(book, now) -> Card` in the writer, once per request id, with its audit
        event in the same transaction."""
        validate.request_id(request.request_id)

        def produce(book, now, _) -> bytes:
            rec = op(book, now)
            book.append_audit(now, client.id, client.role.name, f"{self.service}.{method}",
                              rec.card_number)
            if method in ("Verify", "Cancel"):  # GZ-27, RC-33: a card never made owes nothing
                for number in cards.fees_reversed(book, now, rec):
                    book.append_audit(now, client.id, client.role.name, "Ledger.Reverse", number,
                                      f"fee:{number} reversed: the card was never made "
                                      f"({_FEE_RULE[book.card(number).pack]})")
            return card_message(book, rec, now).SerializeToString()
        answer = await self.core.write_once(method, client, request.request_id, request, produce)
        return pb.Card.FromString(answer)

    def _card_op(self, method, request, client, fn, *args):
        validate.card_number(request.card_number)
        return self._write(method, request, client,
                           lambda book, now: fn(book, now, request.card_number, *args))


class Lifecycle(CardWrites):
    service = "Lifecycle"

    async def Apply(self, request, client: Client):
        validate.enum(request.pack, pb.Pack, "pack")
        holder = validate_holder(request.holder)
        # GZ-9's issuing bank is named missing with the rest (cards.application_missing)
        validate.bank(request.service_bank, "service_bank", required=False)
        validate.enum(request.residence_basis, pb.ResidenceBasis, "residence_basis",
                      allow_unspecified=True)
        proxy = validate_proxy(request.proxy) if request.HasField("proxy") else None
        h = request.holder
        eligibility = Eligibility(h.household_registered, h.insured, h.entitled_public_services,
                                  request.residence_registered_since, request.residence_basis)
        return await self._write("Apply", request, client, lambda book, now: cards.apply(
            book, now, pack=request.pack, holder=holder, eligibility=eligibility,
            with_transit=request.with_transit, service_bank=request.service_bank,
            instant=request.instant, role=client.role, banks=self.core.banks,
            client_id=client.id, reveal=client.role in PII_READERS, proxy=proxy))

    async def Verify(self, request, client: Client):
        validate.text(request.reason, "reason")
        validate.text(request.special_circumstances, "special_circumstances")
        return await self._card_op("Verify", request, client, cards.verify, request.approved,
                                   request.reason, client.role, request.special_circumstances)

    async def Issue(self, request, client: Client):
        validate.text(request.issuing_organ, "issuing_organ")
        return await self._card_op("Issue", request, client, cards.issue, client.role,
                                   request.issuing_organ)

    async def Activate(self, request, client: Client):
        return await self._card_op("Activate", request, client, cards.activate, client.role)

    async def OpenFinancial(self, request, client: Client):
        validate.bank(request.bank, "bank", required=True)
        return await self._card_op("OpenFinancial", request, client, cards.open_financial,
                                   request.bank)

    async def ReportTemporaryLoss(self, request, client: Client):
        return await self._card_op("ReportTemporaryLoss", request, client,
                                   cards.report_temporary_loss, client.role)

    async def ReportLoss(self, request, client: Client):
        return await self._card_op("ReportLoss", request, client, cards.report_loss, client.role)

    async def CancelLoss(self, request, client: Client):
        return await self._card_op("CancelLoss", request, client, cards.cancel_loss, client.role)

    async def ReportBankLoss(self, request, client: Client):
        return await self._card_op("ReportBankLoss", request, client, cards.report_bank_loss,
                                   client.role, self.core.banks)

    async def CancelBankLoss(self, request, client: Client):
        return await self._card_op("CancelBankLoss", request, client, cards.cancel_bank_loss,
                                   client.role, self.core.banks)

    async def Replace(self, request, client: Client):
        validate.enum(request.reason, pb.ReplaceReason, "reason")
        validate.bank(request.service_bank, "service_bank", required=False)
        return await self._card_op("Replace", request, client, cards.replace, request.reason,
                                   request.instant, client.role, request.service_bank,
                                   self.core.banks, request.quality_fault)

    async def Cancel(self, request, client: Client):
        validate.text(request.reason, "reason", required=True)
        validate.enum(request.ground, pb.CancelGround, "ground")
        return await self._card_op("Cancel", request, client, cards.cancel, request.reason,
                                   request.ground, client.role)

    async def LockApplication(self, request, client: Client):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op("LockApplication", request, client, cards.lock_application,
                                   request.channel, True)

    async def UnlockApplication(self, request, client: Client):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op("UnlockApplication", request, client, cards.lock_application,
                                   request.channel, False)

    async def GetCard(self, request, client: Client):
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            rec = book.card(request.card_number)
            if rec is None:
                raise CardNotFound(request.card_number)
            return card_message(book, rec, now)

    async def IssueElectronic(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)

        def op(book, now, _) -> bytes:
            number, rec = cards.issue_electronic(book, now, request.card_number, client.role)
            book.append_audit(now, client.id, client.role.name, "Lifecycle.IssueElectronic",
                              rec.card_number)
            return pb.ElectronicCard(number=number, card_number=rec.card_number,
                                     pack=rec.pack).SerializeToString()
        return pb.ElectronicCard.FromString(await self.core.write_once(
            "IssueElectronic", client, request.request_id, request, op))


# --------------------------------------------------------------------- Ledger

def transfer_answer(transfer_id: str, t) -> bytes:
    return pb.TransferResponse(transfer_id=transfer_id, status=t.status, amount_fen=t.amount,
                               timeout_at=t.timeout_at).SerializeToString()


assert all(pb.TransferStatus.Value(f"TRANSFER_STATUS_{s.name}") == s for s in TransferStatus)


def _holder_of(book, card_number: str) -> int:
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    return rec.holder_id


class Ledger:
    def __init__(self, core: Core):
        self.core = core

    @staticmethod
    def _account_ref(ref, field: str):
        """Validate an AccountRef at the edge; returns (book -> account key, card number)."""
        which = ref.WhichOneof("account")
        if which == "operator":
            key = operator_account_key(validate.operator(ref.operator, f"{field}.operator"))
            return (lambda book: key), ""
        if which != "holder":
            raise InvalidArgument(field, "is required: a holder account or an operator account")
        number = validate.card_number(ref.holder.card_number, f"{field}.holder.card_number")
        kind = validate.enum(ref.holder.kind, pb.AccountKind, f"{field}.holder.kind")
        return (lambda book: holder_account_key(_holder_of(book, number), kind)), number

    async def Transfer(self, request, client: Client):
        tid = validate.request_id(request.transfer_id, "transfer_id")
        validate.enum(request.phase, pb.Phase, "phase", allow_unspecified=True)
        validate.timeout(request.timeout_seconds, "timeout_seconds")
        role = client.role
        if request.phase in (Phase.POST, Phase.VOID):
            pending_id = validate.request_id(request.pending_id, "pending_id")
            if request.HasField("debit") or request.HasField("credit"):
                raise InvalidArgument("debit", "a post or void names only pending_id")
            if request.phase == Phase.VOID and request.amount_fen:
                raise InvalidArgument("amount_fen", "a void moves no money; send 0")
            validate.amount(request.amount_fen, "amount_fen", zero_ok=True)

            def op(book, now, fingerprint):
                answer = transfer_answer(tid, ledger.resolve(
                    book, now, tid, pending_id, post=request.phase == Phase.POST,
                    amount=request.amount_fen, role=role, fingerprint=fingerprint))
                book.append_audit(now, client.id, role.name, "Ledger.Transfer")
                return answer
        else:
            if request.pending_id:
                raise InvalidArgument("pending_id", "is only for PHASE_POST/PHASE_VOID")
            if request.timeout_seconds and request.phase != Phase.HOLD:
                raise InvalidArgument("timeout_seconds", "is only for PHASE_HOLD")
            if request.phase == Phase.HOLD and not request.timeout_seconds:
                raise InvalidArgument("timeout_seconds", "a hold needs a timeout")
            debit, debit_card = self._account_ref(request.debit, "debit")
            credit, credit_card = self._account_ref(request.credit, "credit")
            amount = validate.amount(request.amount_fen, "amount_fen", zero_ok=False)

            def op(book, now, fingerprint):
                answer = transfer_answer(tid, ledger.create(
                    book, now, tid, debit(book), credit(book), amount,
                    pending=request.phase == Phase.HOLD, timeout=request.timeout_seconds,
                    role=role, card_number=debit_card or credit_card, fingerprint=fingerprint))
                book.append_audit(now, client.id, role.name, "Ledger.Transfer",
                                  debit_card or credit_card)
                return answer
        return pb.TransferResponse.FromString(
            await self.core.write_once("Transfer", client, tid, request, op))

    async def Reverse(self, request, client: Client):
        original = validate.request_id(request.transfer_id, "transfer_id")
        rid = validate.request_id(request.reversal_id, "reversal_id")
        validate.amount(request.amount_fen, "amount_fen", zero_ok=True)
        role = client.role

        def op(book, now, fingerprint):
            answer = transfer_answer(rid, ledger.reverse(book, now, rid, original,
                                                         request.amount_fen, role=role,
                                                         fingerprint=fingerprint))
            book.append_audit(now, client.id, role.name, "Ledger.Reverse")
            return answer
        return pb.TransferResponse.FromString(
            await self.core.write_once("Reverse", client, rid, request, op))

    async def GetBalances(self, request, client: Client):
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            holder_id = _holder_of(book, request.card_number)
            out = []
            for kind in (pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_TRANSIT, pb.ACCOUNT_KIND_BENEFIT):
                key = holder_account_key(holder_id, kind)
                a = book.account(key)
                pending = a.debits_pending - ledger.expired_held(book, key, now)
                out.append(pb.Balance(kind=kind, posted_fen=a.posted, pending_fen=pending,
                                      available_fen=a.posted - pending))
        return pb.GetBalancesResponse(balances=out)


# --------------------------------------------------------------------- ResidenceCard

class ResidenceCard(CardWrites):
    service = "ResidenceCard"

    async def Renew(self, request, client: Client):
        return await self._card_op("Renew", request, client, cards.renew)

    async def StateSpecialCircumstances(self, request, client: Client):
        validate.text(request.special_circumstances, "special_circumstances")
        return await self._card_op("StateSpecialCircumstances", request, client,
                                   cards.state_special_circumstances,
                                   request.special_circumstances, client.role)

    async def ChangeInformation(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        if request.holder.ssn:
            raise InvalidArgument("holder.ssn", "is not changed here; leave it empty")
        for f in PII_FIELDS:
            validate.text(getattr(request.holder, f), f"holder.{f}")
        if request.holder.birth_date:
            cards.parse_date("holder.birth_date", request.holder.birth_date)
        cards.parse_date("changed_on", request.changed_on)
        given = HolderInfo("", **{f: getattr(request.holder, f) for f in PII_FIELDS})

        def op(book, now, _) -> bytes:
            rec, due, late = cards.change_information(book, now, request.card_number, given,
                                                      request.changed_on, client.id)
            book.append_audit(now, client.id, client.role.name,
                              "ResidenceCard.ChangeInformation", rec.card_number)
            return pb.ChangeInformationResponse(card=card_message(book, rec, now), due_at=due.at,
                                                late=late, provisional=due.provisional
                                                ).SerializeToString()
        return pb.ChangeInformationResponse.FromString(await self.core.write_once(
            "ChangeInformation", client, request.request_id, request, op))

    # RC-20 to RC-23, RC-29, RC-30: points (yikatong.points), on the table in force
    async def ApplyPoints(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        validate.enum(request.filer, pb.PointsFiler, "filer")
        validate.enum(request.employer_default, pb.EmployerDefault, "employer_default",
                      allow_unspecified=True)
        if request.employer or request.filer == pb.POINTS_FILER_EMPLOYER:
            points.validate_employer(request.employer)
        evidence = _stated(request.evidence_ref, "evidence_ref", "the document proofs (RC-23)")
        if not request.claims:
            raise InvalidArgument("claims", "an application claims at least one indicator")
        if len(request.claims) > 64:
            raise InvalidArgument("claims", "at most 64 claims")
        for i, c in enumerate(request.claims):
            validate.text(c.indicator, f"claims[{i}].indicator", required=True)
            validate.text(c.value, f"claims[{i}].value", required=True)
        table = points.in_force()

        def op(book, now, _) -> bytes:
            holder_id, _record = points.apply(book, now, table, request.card_number,
                                              request.filer, request.employer, request.claims,
                                              evidence, client.id, request.employer_default)
            return self._points_answer(book, now, table, holder_id, "ResidenceCard.ApplyPoints",
                                       request.card_number, evidence, client)
        return pb.PointsRecord.FromString(await self.core.write_once(
            "ApplyPoints", client, request.request_id, request, op))

    async def DecidePoints(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        validate.text(request.reason, "reason")
        table = points.in_force()

        def op(book, now, _) -> bytes:
            holder_id, _record = points.decide(book, now, table, request.card_number,
                                               request.approved, request.reason, client.id)
            return self._points_answer(book, now, table, holder_id,
                                       "ResidenceCard.DecidePoints", request.card_number,
                                       request.reason, client)
        return pb.PointsRecord.FromString(await self.core.write_once(
            "DecidePoints", client, request.request_id, request, op))

    async def GetPoints(self, request, client: Client):
        """A read of the holder's points and credit bars, for a stated purpose: in the
        writer, audited (granted or refused) before anything leaves."""
        validate.card_number(request.card_number)
        purpose = _stated(request.purpose, "purpose", "why the holder's points are read")
        table, clock = points.in_force(), self.core.clock

        def read(book):
            now = clock.now()
            try:
                rec = points.residence_card(book, request.card_number, "GetPoints")
            except YikatongError as refused:
                book.append_audit(now, client.id, client.role.name, "ResidenceCard.GetPoints",
                                  request.card_number, purpose,
                                  errors.status_of(refused).name)
                return refused
            return self._points_answer(book, now, table, rec.holder_id,
                                       "ResidenceCard.GetPoints", request.card_number, purpose,
                                       client)
        answer = await self.core.write(read)
        if isinstance(answer, YikatongError):
            raise answer
        return pb.PointsRecord.FromString(answer)

    @staticmethod
    def _points_answer(book, now: int, table, holder_id: int, method: str, card_number: str,
                       purpose: str, client: Client) -> bytes:
        ssn = book.holder_ssn(holder_id) or ""
        book.append_audit(now, client.id, client.role.name, method, card_number, purpose,
                          holder=mask(ssn))
        return points.view(book, now, table, holder_id).SerializeToString()


# --------------------------------------------------------------------- Deadlines

class Deadlines:
    def __init__(self, core: Core):
        self.core = core

    async def ListDue(self, request, client: Client):
        if request.within_days > 3660:
            raise InvalidArgument("within_days", "at most 3660 (ten years)")
        return list_due(self.core.store, self.core.clock.now(), request.within_days)


def list_due(store: Store, now: int, within_days: int) -> pb.ListDueResponse:
    with store.read() as txn:
        found = cards.due(store.book(txn), now, within_days)
    return pb.ListDueResponse(items=[
        pb.DueItem(card_number=card, problem=f"steps not readable: {s}") if isinstance(s, Exception)
        else pb.DueItem(card_number=card, step=s.step, rule=s.rule, due_at=s.due_at,
                        overdue=s.due_at <= now, provisional=s.provisional)
        for card, s in found])


# --------------------------------------------------------------------- Holders

def holder_message(info: HolderInfo, fields=PII_FIELDS) -> pb.Holder:
    return pb.Holder(ssn=info.ssn, **{f: getattr(info, f) for f in fields})


class Holders:
    """Personal information for a stated purpose (SPEC.md section 7). A read is done in the
    writer, so its audit event is committed before the holder's information leaves; a read
    refused for want of a holder is audited too (as every refused call is, calls.Refusals)."""

    def __init__(self, core: Core):
        self.core = core

    async def GetHolder(self, request, client: Client):
        key = _holder_key(request)
        purpose = _stated(request.purpose, "purpose", "why the personal information is read")
        clock = self.core.clock

        def read(book):
            now = clock.now()
            ssn = _ssn_of(book, request, key)
            found = book.holder(ssn) if ssn else None
            book.append_audit(now, client.id, client.role.name, "Holders.GetHolder",
                              request.card_number, purpose, "OK" if found else "NOT_FOUND",
                              holder=mask(ssn or ""))
            if found is None:
                return None
            holder_id, info = found
            history = book.holder_history(holder_id) if request.with_history else []
            return pb.HolderRecord(holder=holder_message(info), history=[
                pb.HolderChange(field=c.field, old_value=c.old_value, new_value=c.new_value,
                                time=c.time, client_id=c.client_id, method=c.method,
                                reason=c.reason) for c in history],
                credit_records=[credit_message(r) for r in book.credit_records(holder_id)])
        answer = await self.core.write(read)
        if answer is None:  # audited as refused; nothing said of what is held
            if key == "card_number":
                raise CardNotFound(request.card_number)
            raise HolderNotFound("no holder with that ssn")
        return answer

    async def CorrectHolder(self, request, client: Client):
        validate.request_id(request.request_id)
        reason = _stated(request.reason, "reason", "why the information is corrected")
        given = validate_holder(request.holder)
        if not any(getattr(given, f) for f in PII_FIELDS):
            raise InvalidArgument("holder", "names no field to correct")
        reveal = client.role in PII_READERS

        def op(book, now, _) -> bytes:
            _, info, changed = cards.correct_holder(book, now, given, reason, client.id)
            book.append_audit(now, client.id, client.role.name, "Holders.CorrectHolder",
                              purpose=reason, holder=mask(info.ssn))
            # a role that may not read PII learns nothing beyond what it sent
            fields = PII_FIELDS if reveal else [f for f in PII_FIELDS if getattr(given, f)]
            return pb.HolderRecord(holder=holder_message(info, fields)).SerializeToString()
        return pb.HolderRecord.FromString(await self.core.write_once(
            "CorrectHolder", client, request.request_id, request, op))

    async def RecordCredit(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.enum(request.ground, pb.CreditGround, "ground")
        evidence = _stated(request.evidence_ref, "evidence_ref",
                           "the case file or decision the record rests on")
        if request.WhichOneof("key") == "employer":
            if client.role != Role.HRSS:  # art. 29 para. 2
                raise PermissionDenied("RC-29: a work unit's fine is imposed by the human "
                                       "resources and social security department (HRSS)",
                                       reason="RC-29")
            points.validate_employer(request.employer)

            def employer_op(book, now, _) -> bytes:
                record = cards.record_employer_credit(
                    book, now, request.employer, request.ground, evidence, request.serious,
                    request.fine_fen, client.id)
                book.append_audit(now, client.id, client.role.name, "Holders.RecordCredit",
                                  purpose=f"employer {request.employer}: {evidence}")
                message = credit_message(record)
                message.employer = request.employer
                return message.SerializeToString()
            return pb.CreditRecord.FromString(await self.core.write_once(
                "RecordCredit", client, request.request_id, request, employer_op))
        key = _holder_key(request)
        if request.victim_card_number:  # SH-26: the other person's card, in fraud
            validate.card_number(request.victim_card_number, "victim_card_number")
        if (request.ground == pb.CREDIT_GROUND_FORGED_DOCUMENTS
                and client.role not in (Role.PUBLIC_SECURITY, Role.HRSS)):  # art. 29 para. 1
            raise PermissionDenied("RC-29: forged documents in a Residence Card or points "
                                   "application are recorded by public security or HRSS",
                                   reason="RC-29")

        def op(book, now, _) -> bytes:
            ssn = _ssn_of(book, request, key)
            if ssn is None:
                raise CardNotFound(request.card_number)
            _, record = cards.record_credit(
                book, now, ssn, request.ground, evidence, request.serious, client.id,
                request.fine_fen, card_number=request.card_number if key == "card_number" else "",
                victim_card_number=request.victim_card_number, illegal_gain=request.illegal_gain)
            book.append_audit(now, client.id, client.role.name, "Holders.RecordCredit",
                              request.card_number, purpose=evidence, holder=mask(ssn))
            return credit_message(record).SerializeToString()
        return pb.CreditRecord.FromString(await self.core.write_once(
            "RecordCredit", client, request.request_id, request, op))


def _holder_key(request) -> str:
    """Which of `card_number` and `ssn` a Holders request names, validated."""
    key = request.WhichOneof("key")
    if key == "card_number":
        validate.card_number(request.card_number)
    elif key == "ssn":
        cards.validate_ssn(request.ssn, "ssn")
    else:
        raise InvalidArgument("key", "name the holder: card_number or ssn")
    return key


def _ssn_of(book, request, key: str) -> str | None:
    """The holder's ssn, from the request or through its card (None: no such card; "": a
    card whose holder has no record)."""
    if key == "ssn":
        return request.ssn
    rec = book.card(request.card_number)
    return None if rec is None else book.holder_ssn(rec.holder_id) or ""


def _stated(value: str, field: str, why: str) -> str:
    """A free text the call must state (a purpose, a reason, evidence): not blank."""
    text = validate.text(value, field)
    if not text.strip():
        raise InvalidArgument(field, f"is required: {why}")
    return text


def credit_message(r: CreditRecord) -> pb.CreditRecord:
    return pb.CreditRecord(rule=r.rule, ground=r.ground, evidence_ref=r.evidence_ref,
                           serious=r.serious, time=r.time, client_id=r.client_id,
                           points_barred_until=r.points_barred_until, fine_fen=r.fine_fen,
                           # SH-26's first paragraph is recorded for illegal gain alone
                           illegal_gain=r.rule == "SH-26" and r.ground in cards.SH_26_FOR_GAIN)


# --------------------------------------------------------------------- Audit

class Audit:
    """The audit trail, to AUDITOR only: exported in order, verified link by link."""

    def __init__(self, core: Core):
        self.core = core

    async def Export(self, request, client: Client):
        after = request.from_sequence
        while True:
            with self.core.store.read() as txn:
                batch = []
                for _, value in self.core.store.book(txn).audit_records(after):
                    batch.append(audit_message(records.decode_audit(value)))
                    if len(batch) >= config.watch_batch_max:
                        break
            if not batch:
                return
            for event in batch:
                yield event
            after = batch[-1].sequence

    async def Verify(self, request, client: Client):
        def verify():
            with self.core.store.read() as txn:
                return self.core.store.book(txn).verify_audit()
        ok, events, bad, problem = await asyncio.to_thread(verify)
        return pb.VerifyAuditResponse(ok=ok, events=events, first_bad_sequence=bad,
                                      problem=problem)


def audit_message(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(sequence=e.sequence, time=e.time, client_id=e.client_id, role=e.role,
                         method=e.method, card_number=e.card_number, purpose=e.purpose,
                         outcome=e.outcome, prev_hash=e.prev_hash.hex(), hash=e.hash.hex(),
                         algorithm=e.algorithm, count=e.count, holder=e.holder)


# --------------------------------------------------------------------- Admin

class Admin:
    def __init__(self, core: Core):
        self.core = core

    def _manual_clock(self, method: str):
        if not self.core.clock.manual:
            raise InvalidTransition("clock=system", method, "--clock manual",
                                    "the clock can be moved only under --clock manual")
        return self.core.clock

    @staticmethod
    def _answer(now: int) -> pb.ClockResponse:
        return pb.ClockResponse(now=now, time=clocks.format_time(now))

    async def AdvanceClock(self, request, client: Client):
        clock = self._manual_clock("AdvanceClock")
        if request.seconds < 0:
            raise InvalidArgument("seconds", "must not be negative: the clock never goes back")
        try:
            return self._answer(clock.advance(request.seconds))
        except ValueError as error:
            raise InvalidArgument("seconds", str(error)) from None

    async def SetClock(self, request, client: Client):
        clock = self._manual_clock("SetClock")
        try:
            t = clocks.parse_time(request.time)
        except ValueError:
            raise InvalidArgument("time", f"{request.time!r} is not ISO-8601") from None
        try:
            return self._answer(clock.set(t))
        except ValueError as error:
            raise InvalidArgument("time", str(error)) from None


# --------------------------------------------------------------------- serving

SERVICES = (Authorization, CardStatus, Lifecycle, ResidenceCard, Ledger, Deadlines, Holders,
            Audit, Admin)


def build(core: Core, clients: Clients, concurrent_rpcs_max: int = config.concurrent_rpcs_max,
          table=None, reuse_port: bool = False,
          limits: calls.Limits | None = None, node=None):
    """The grpc.aio server with every service registered (not yet bound or started), and its
    health servicer. A role table that does not match the proto raises roles.TableError."""
    # Too many callers: new calls beyond the limit are refused at once (RESOURCE_EXHAUSTED);
    # calls already in progress are unaffected.
    servicers = [cls(core) for cls in SERVICES]
    server = grpc.aio.server(maximum_concurrent_rpcs=concurrent_rpcs_max, options=[
        ("grpc.max_receive_message_length", config.message_size_max),
        ("grpc.max_send_message_length", config.message_size_max),
        # one server per port, unless the workers of one server share it on purpose
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_connection_idle_ms", config.connection_idle_seconds_max * 1000),
        ("grpc.max_connection_age_ms", config.connection_age_seconds_max * 1000),
        ("grpc.max_connection_age_grace_ms", config.connection_age_grace_seconds * 1000),
        ("grpc.keepalive_time_ms", config.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_seconds * 1000),
        ("grpc.max_concurrent_streams", config.streams_per_connection_max),
    ])
    kwargs = {} if table is None else {"table": table}
    calls.register(server, servicers, clients, pb, limits=limits,
                   position=calls.LogPosition(node) if node is not None else None, **kwargs)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def _set_health(health_servicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *(f"yikatong.v1.{cls.__name__}" for cls in SERVICES)):
        await health_servicer.set(name, status)


async def serve(store: Store, clock, clients: Clients, listen: str, on_ready=None,
                concurrent_rpcs_max: int = config.concurrent_rpcs_max,
                stop: asyncio.Event | None = None, banks: IssuingBanks | None = None,
                tls: tuple[bytes, bytes, bytes] | None = None, reflection: bool = False,
                drain_seconds: float = config.drain_seconds, reuse_port: bool = False,
                limits: calls.Limits | None = None, node=None, reloads=None) -> None:
    """`node`: with --replicate, the store's place in the cluster (storage.replication.Node).
    `tls` = (key, certificate chain, client CA), PEM, or reload.ServerCertificates (the same,
    replaceable on SIGHUP): mTLS, a client certificate signed by that CA required on every
    connection (a caller without one never reaches a handler). `reloads`: a
    reload.Registry, run on SIGHUP once this serves.
    On `stop` (SIGTERM, SIGINT): health NOT_SERVING while still answering for
    `drain_seconds` (load balancers and gates see it before the port closes), then new calls
    are refused and calls in flight get SHUTDOWN_GRACE_SECONDS to finish."""
    core = Core(store, clock, banks)
    limits = limits or calls.Limits()
    server, health_servicer = build(core, clients, concurrent_rpcs_max, reuse_port=reuse_port,
                                    limits=limits, node=node)
    if reflection:
        service_names = [pb.DESCRIPTOR.services_by_name[cls.__name__].full_name
                         for cls in SERVICES]
        grpc_reflection.enable_server_reflection(
            (*service_names, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME), server)
    try:
        if tls is None:
            server.add_insecure_port(listen)
        else:
            server.add_secure_port(listen, tls.credentials() if hasattr(tls, "credentials")
                                   else grpc.ssl_server_credentials(
                                       [(tls[0], tls[1])], root_certificates=tls[2],
                                       require_client_auth=True))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {listen}: {error}") from None
    await server.start()
    loop = asyncio.get_running_loop()
    log_module.access.start(loop)
    limits.start(loop)
    metrics.start(loop, store, lambda: core.feed.watchers, node, clock)
    calls.on_data_loss = lambda: store.note("corrupt_record", True)
    calls.refusals.start(loop, store, clock)
    await _set_health(health_servicer, store.healthy)
    # The writer reports from its own thread when it dies or its periodic jobs keep failing:
    # health follows at once (NOT_SERVING), and back to SERVING if a job recovers.
    store.on_health = lambda healthy: asyncio.run_coroutine_threadsafe(
        _set_health(health_servicer, healthy), loop)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if reloads is not None:
        reloads.serving(loop, core)  # SIGHUP reloads from now on (server/reload.py)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    store.on_health = None
    await health_servicer.enter_graceful_shutdown()  # NOT_SERVING, and stays so
    if drain_seconds > 0:
        log.info("draining", extra={"fields": {"seconds": drain_seconds}})
        await asyncio.sleep(drain_seconds)
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    limits.stop()
    calls.refusals.stop(store, clock)
    metrics.stop()
    log_module.access.stop()

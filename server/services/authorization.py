"""The Authorization service (API.md)."""
import asyncio
import collections
import hashlib
import typing

from yikatong import authorize, config, fastpath, points, pots
from yikatong.errors import (
    InvalidArgument,
    InvalidRecord,
    Refused,
    YikatongError,
)
from yikatong.model import (
    AccountKind,
    Channel,
    Role,
    operator_account_key,
)
from yikatong.server import validate
from yikatong.server.clients import Client
from yikatong.server.core import _APPROVED, _DECLINED, Core, decode, fingerprint
from yikatong.server.errors import with_prefix
from yikatong.server.metrics import REASONS, metrics
from yikatong.server.roles import CHANNEL_ROLES, require_channel
from yikatong.storage import archive, records
from yikatong.storage.lmdb_store import AUDIT_ALGORITHM, AUDIT_HASHES
from yikatong.v1 import yikatong_pb2 as pb


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
        # the compiled fares (None: every debit by the Python path, which tests hold it to)
        self.fares = fastpath.Fares

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
        if req.split:
            _check_split(req)

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
        commands = [
            (i, q.request_id, q.card_number, q.channel, q.amount_fen, q.phase, q.hold_request_id,
             q.payee_account, q.hold_timeout_seconds, fingerprint("Authorize", client, q))
            + ((q.max_fare_fen, q.on_timeout) if q.on_timeout else ())  # issue 28: a journey
            for i, q in money]
        if any(q.split for _, q in money):
            commands = _with_rules(money, commands, field_prefix)
        return self.debits(commands, client, method, field_prefix, _answer_message)

    def debits(self, commands, client: Client, method: str, field_prefix: bool = False,
               answer=fastpath.money_answer):
        """`money_command` of compact commands, as the Python path makes them from requests
        and the wire path from wire bytes (fastpath money_wire): (index, request_id,
        card_number, channel, amount_fen, phase, hold_request_id, payee_account,
        hold_timeout_seconds, fingerprint) each; then, on the Python path only, a split tap's
        operator's accounts in order as an 11th (issue 28 item 2), or a journey's tap-in's
        max_fare_fen and on_timeout as an 11th and 12th (item 1; never both: a split is
        single-phase, a journey a hold); `answer(request_id, reason, available_fen)` the
        AuthorizeResponse's bytes (the compiled fares answer with fastpath.money_answer,
        which tests/test_wire_money.py holds to protobuf's bytes)."""
        clock, policy, role = self.core.clock, self.core.policy, client.role
        client_id, role_name = client.id, role.name
        with_money = authorize.with_money

        def split(book, now: int, c) -> bytes:
            reason, left, legs = authorize.with_split(
                policy, book, now, c[1], c[2], c[3], c[4], c[7], role, c[9], c[10])
            if reason == 0:  # one audit event for the tap, naming each leg
                book.append_audit(now, client_id, role_name, method, c[2], purpose="split: " + (
                    ", ".join(f"{AccountKind(k).name} {fen} fen ({tid})"
                              for k, fen, tid, _ in legs)))
            return pb.AuthorizeResponse(
                request_id=c[1], reason=reason, available_fen=left,
                decision=_APPROVED if reason == 0 else _DECLINED,
                legs=[pb.Leg(account=k, amount_fen=fen, transfer_id=tid, available_fen=after)
                      for k, fen, tid, after in legs]).SerializeToString()

        fares = self._fares(client, method)
        fare = fares.fare if fares is not None else None

        def command(book):
            def decide(c) -> bytes:
                now = clock.now()
                if len(c) == 11:  # a split tap (issue 28 item 2)
                    return split(book, now, c)
                reason, left, told = with_money(  # positional: once per debit, on the hot path
                    policy, book, now, c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], role,
                    c[9], *c[10:])
                if told is not None:  # issue 28: the answer tells of a journey
                    if reason == 0:
                        book.append_audit(now, client_id, role_name, method, c[2],
                                          _journey_purpose(c[6], told))
                    return answer(c[1], reason, left) + _journey_bytes(told)
                if reason == 0:
                    book.append_audit(now, client_id, role_name, method, c[2])
                return answer(c[1], reason, left)

            out = []
            once = book.once
            book.hold_accounts()  # the command fails whole if one debit raises (Store._apply)
            for c in commands:
                try:
                    # a plain fare compiled (fastpath Fares), else (None) the Python path
                    fared = fare(book, c, clock.now()) if fare is not None else None
                    out.append(fared if fared is not None else
                               once(c[1], c[9], lambda c=c: decide(c)))
                except YikatongError as error:
                    raise (with_prefix(error, f"requests[{c[0]}].") if field_prefix
                           else error) from None
            book.write_held()
            return out
        return command

    def _fares(self, client: Client, method: str):
        """The compiled fares' constants for one command of `client`'s (None: the Python
        path takes every debit): its audit events' texts but the card number, encoded."""
        if self.fares is None:
            return None
        texts = (client.id, client.role.name, method, "", "", "OK", "")
        try:
            parts = [records.audit_text(i, t) for i, t in enumerate(texts)]
        except InvalidRecord:
            return None  # the Python path refuses it where it would
        store = self.core.store
        return self.fares(
            self.core.policy, client.role, fastpath.RULE_PACK, (tuple(parts[:3]),
                                                                tuple(parts[4:])),
            AUDIT_ALGORITHM, AUDIT_HASHES[AUDIT_ALGORITHM], archive.ID_HASH, store.dbs,
            operator_account_key(config.channel_money[Channel.TRANSIT][1]))

    def _money_wire(self, raw: bytes, client: Client, batch: bool, method: str):
        """The writer command and its compact commands for a message of requests that all
        move money, from its wire bytes; None: the Python path takes it."""
        commands = fastpath.money_wire(
            raw, batch, CHANNEL_MASKS[client.role], MONEY_CHANNELS, config.batch_size_max,
            f"{client.id}\0Authorize\0".encode(), hashlib.sha256)
        if commands is None:
            return None
        return commands, self.debits(commands, client, method, batch)

    async def Authorize(self, request, client: Client):
        if type(request) is bytes:
            answer = self._wire(request, client, False)
            if answer is not None:
                return answer
            if fastpath.money_wire is not None:
                money = self._money_wire(request, client, False, "Authorization.Authorize")
                if money is not None:
                    return fastpath.money_answers(await self.core.write(money[1]), money[0],
                                                  metrics.decisions, False)
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
            if fastpath.money_wire is not None:
                money = self._money_wire(request, client, True, "Authorization.AuthorizeBatch")
                if money is not None:
                    return fastpath.money_answers(await self.core.write(money[1]), money[0],
                                                  metrics.decisions, True)
            request = decode(pb.AuthorizeBatchRequest, request)
        return await self._answer(client, request.requests, "Authorization.AuthorizeBatch")

    async def AuthorizeStream(self, requests, client: Client):
        """Answers in the order of the messages. A message of debits the wire path takes goes
        to the writer as it arrives, behind the messages before it (the writer runs commands
        in the order queued): up to stream_messages_in_flight_max messages of a stream are
        worked on at once, and their debits share commit groups (replicated: log records in
        flight). Any other message waits until every message before it is answered, so it
        sees their debits. A failed message ends the stream after the answers before it;
        none after it is run (`_Chain`)."""
        # (its answer to come; a message of debits queued: the writer's answers, made the
        # message's by money_answers when it is answered, and its compact commands)
        working: collections.deque[tuple[asyncio.Future, list | None]] = collections.deque()
        chain = _Chain()
        reading: asyncio.Future | None = None  # the next message, read while others work
        more: typing.AsyncIterator | None = aiter(requests)
        try:
            while working or more is not None:
                if working and working[0][0].done():
                    future, commands = working.popleft()
                    answer = future.result()  # a failed message raises here
                    yield answer if commands is None else fastpath.money_answers(
                        answer, commands, metrics.decisions, True)
                    continue
                if more is None or len(working) >= config.stream_messages_in_flight_max:
                    await asyncio.wait((working[0][0],))
                    continue
                if working:  # an answer may be ready before the next message arrives
                    if reading is None:
                        reading = asyncio.ensure_future(anext(more))
                    await asyncio.wait((reading, working[0][0]),
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done():
                        continue
                arriving, reading = reading or anext(more), None
                try:
                    batch = await arriving
                except StopAsyncIteration:
                    more = None
                    continue
                except Exception as error:  # noqa: BLE001 - answered after those before
                    more, batch = None, error
                if not working and type(batch) is bytes:  # the status-only wire path
                    answer = self._wire(batch, client, True)
                    if answer is not None:
                        yield answer
                        continue
                working.append(self._stream_message(batch, client, working, chain))
        finally:
            chain.broken = True  # nothing of this stream not yet begun in the writer runs
            if reading is not None:
                reading.cancel()
            for future, commands in working:
                if not future.done():
                    future.cancel()  # a command still queued is skipped
                elif not future.cancelled() and future.exception() is None and commands:
                    # committed, never answered: its decisions are counted all the same
                    fastpath.money_answers(future.result(), commands, metrics.decisions, True)

    def _stream_message(self, batch, client: Client, working, chain: "_Chain"
                        ) -> tuple[asyncio.Future, list | None]:
        """A message's answer to come (the status-only wire path declined it): its debits
        queued for the writer now if every message still worked on before it was (the
        writer's answers to come, and the commands), else a task that waits for those
        before it (and None)."""
        if isinstance(batch, Exception):  # it did not arrive whole
            return _failed(batch), None
        try:
            if (type(batch) is bytes and fastpath.money_wire is not None
                    and all(commands is not None for _, commands in working)):
                money = self._money_wire(batch, client, True, "Authorization.AuthorizeStream")
                if money is not None:
                    return chain.submit(self.core.store, money[1]), money[0]
            before = tuple(future for future, _ in working)
            return asyncio.ensure_future(self._after(before, batch, client, chain)), None
        except Exception as error:  # noqa: BLE001 - answered after those before
            return _failed(error), None

    async def _after(self, before: tuple, batch, client: Client, chain: "_Chain"):
        """A stream's message answered once those before it are (not at all if one
        failed: the stream ends there); none before: by the Python path."""
        if before:
            await asyncio.wait(before)
            if any(f.cancelled() or f.exception() is not None for f in before):
                return None
            if type(batch) is bytes:
                answer = self._wire(batch, client, True)
                if answer is not None:
                    return answer
            future, commands = self._stream_message(batch, client, (), chain)
            answer = await future
            return answer if commands is None else fastpath.money_answers(
                answer, commands, metrics.decisions, True)
        if type(batch) is bytes:
            batch = decode(pb.AuthorizeBatchRequest, batch)
        return await self._answer(client, batch.requests, "Authorization.AuthorizeStream")


class _Chain:
    """The messages of one stream queued for the writer ahead of their answers: each runs
    only if every one queued before it ran and committed. The writer runs them in order,
    and an earlier one's failure is known when a later one runs: it raised in this group
    (`broken`, set by its command), or its group failed (its future is answered before the
    writer begins the next group). So a failed message ends the stream with nothing after
    it written, as when messages went one at a time."""

    __slots__ = ("broken",)

    def __init__(self):
        self.broken = False

    def submit(self, store, command) -> asyncio.Future:
        def linked(book):
            if self.broken:
                raise Refused("STREAM_BROKEN", "not run: a message before it in its stream "
                              "failed, and the stream ended there")
            try:
                return command(book)
            except BaseException:
                self.broken = True
                raise

        def answered(future) -> None:
            if future.cancelled() or future.exception() is not None:
                self.broken = True
        queued = store.submit(linked)
        queued.add_done_callback(answered)
        return asyncio.wrap_future(queued)


def _failed(error: BaseException) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


# the channels each role may authorize, as the wire path takes them (bit 1 << channel)
CHANNEL_MASKS = {role: sum(1 << ch for ch, roles in CHANNEL_ROLES.items() if role in roles)
                 for role in Role}
# the channels that move money (validate._money_fields), as the wire path takes them
MONEY_CHANNELS = sum(1 << ch for ch in config.channel_money)


def _check_split(req) -> None:
    """A split tap as docs/DECISIONS.md, "One tap, several pots", admits it."""
    if req.channel != Channel.MEDICAL:
        raise InvalidArgument("split", "only CHANNEL_MEDICAL splits: the medical account pays "
                              "medical expenses only (GZ-13), a fare is paid from the purse "
                              "(SH-13) and a benefit drawl from the BENEFIT account only")
    if req.phase:
        raise InvalidArgument("split", "is single-phase only: a hold is on one account")
    if not req.amount_fen:
        raise InvalidArgument("amount_fen", "a split tap needs a positive amount")
    if len(req.request_id.encode("utf-8")) > config.request_id_bytes_max - 2:
        raise InvalidArgument("request_id", f"a split tap's request_id has at most "
                              f"{config.request_id_bytes_max - 2} bytes: its legs are "
                              "<request_id>#1, #2, ...")


def _with_rules(money, commands, field_prefix: bool):
    """Each split tap's command with the operator's accounts for its channel appended (the
    rule in force now: yikatong.pots), or FAILED_PRECONDITION when there is none."""
    rules = pots.in_force().by_channel
    out = []
    for (i, q), c in zip(money, commands, strict=True):
        if q.split:
            kinds = rules.get(q.channel)
            if kinds is None:
                raise Refused("SPLIT_RULES", (f"requests[{i}]: " if field_prefix else "")
                              + f"no split rule for {Channel(q.channel).name} on this server "
                              "(the operator's --split-rules file): ask without split")
            c += (kinds,)
        out.append(c)
    return out


def _journey_bytes(told) -> bytes:
    """The AuthorizeResponse's journey fields (16, 17), as protobuf writes them after fields
    1-4: appended to the answer's bytes they are the whole message's."""
    if told.refund is not None:
        return pb.AuthorizeResponse(journey_refund_fen=told.refund).SerializeToString()
    return pb.AuthorizeResponse(incomplete_journey=pb.IncompleteJourney(
        hold_request_id=told.hold_id, outcome=told.outcome, fare_fen=told.fare,
        settled_at=told.settled_at, correctable_until=told.correctable_until)
    ).SerializeToString()


def _journey_purpose(hold_request_id: str, told) -> str:
    """The audit event's purpose for an answer that tells of a journey."""
    if told.refund is not None:
        return (f"journey correction: tap-out of {hold_request_id}, settled at its max fare; "
                f"{told.refund} fen back to the card")
    return f"told of journey {told.hold_id} left open ({told.fare} fen charged)"


def _answer_message(request_id: str, reason: int, available: int) -> bytes:
    """The Python path's AuthorizeResponse bytes, made by protobuf (the reference the wire
    path's money_answer is held to)."""
    return pb.AuthorizeResponse(request_id=request_id, available_fen=available, reason=reason,
                                decision=_APPROVED if reason == 0 else _DECLINED
                                ).SerializeToString()

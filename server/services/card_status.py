"""The CardStatus service (API.md)."""
import time

from yikatong import authorize, cards, config, fastpath
from yikatong.errors import Archived, InvalidArgument, PastTheEnd, Refused, StreamStalled
from yikatong.model import (
    Changed,
    ChangeKind,
    Channel,
    Flag,
    Pack,
)
from yikatong.server import validate
from yikatong.server.clients import Client
from yikatong.server.core import Core, decode
from yikatong.storage import archive, records
from yikatong.v1 import yikatong_pb2 as pb


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
        reason = authorize.other_cards(book, raw, Channel.MEDICAL, now, reason)  # as a debit
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
        signing = self._signing("signed WatchChanges") if request.signed else None
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            end, archived = book.last_change(), archive.changes_through(book)
            oldest = next(iter(book.changes(archived)), (end, None))[0]
        if after < archived:  # what follows it is in the archive, not the feed
            raise Archived(
                f"from_sequence {after} is older than the change feed holds: changes up to "
                f"{archived} are archived (older than --retain-days), the oldest kept is "
                f"{oldest}. Re-sync: GetStatusBatch of your card list, then watch from the "
                f"head ({end})")
        if after > end:  # from the end itself: only changes to come
            raise PastTheEnd(f"from_sequence {after} is past the change feed's end: the last "
                             f"change is {end}; watch from {end} for the changes to come")
        # a replay (from farther behind than watch_lag_max) is budgeted per client; a
        # watcher whose lag stays that large and does not shrink for a stall period is
        # stalled, whether or not its writes block (issue 25, finding 2)
        history, lag_max = feed.history, config.watch_lag_max
        replaying = end - after >= lag_max
        if replaying:
            history.start(client.id)
        lag_then, judged_at = end - after, time.monotonic() + history.stall_seconds
        try:
            with feed.watching():
                while True:
                    events = self._changes(after)
                    if not events:
                        await feed.beyond(after)
                        continue
                    lag = max(feed.head, end) - after
                    if replaying and lag < lag_max:
                        replaying = False  # caught up: no longer a replay
                        history.end(client.id)
                    if replaying:
                        await history.take(client.id, len(events))
                    if time.monotonic() >= judged_at:
                        if lag >= lag_max and lag >= lag_then:
                            raise StreamStalled(
                                f"{lag} changes behind the feed's head and not catching up "
                                f"for {history.stall_seconds:g} s (watch_lag_max "
                                f"{lag_max}); resume after sequence {after}")
                        lag_then = lag
                        judged_at = time.monotonic() + history.stall_seconds
                    if request.signed:  # the key as of this batch (a SIGHUP may rotate it)
                        signing = self.core.signing or signing
                        for event in events:
                            signing.sign_event(event)
                    for event in events:
                        yield event
                    after = events[-1].sequence
        finally:
            if replaying:
                history.end(client.id)

    def _changes(self, after: int) -> list[pb.ChangeEvent]:
        now, policy = self.core.clock.now(), self.core.policy
        out: list[pb.ChangeEvent] = []
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            archived = archive.changes_through(book)
            if after < archived:  # moved to the archive while this watcher was replaying
                raise Archived(
                    f"changes up to {archived} were archived (older than --retain-days) while "
                    f"this watcher was at {after}. Re-sync: GetStatusBatch of your card list, "
                    f"then watch from the head ({book.last_change()})")
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

    def _signing(self, what: str):
        signing = self.core.signing
        if signing is None:
            raise Refused("NO_SIGNING_KEY", f"{what}: the server has no signing key "
                          "(--signing-key-file); ask its operator")
        return signing

    async def GetSigningKeys(self, request, client: Client):
        signing = self.core.signing
        if signing is None:
            return pb.GetSigningKeysResponse()
        return pb.GetSigningKeysResponse(keys=[
            pb.SigningKey(key_id=kid, algorithm=pb.SIGNATURE_ALGORITHM_ED25519, public_key=pub,
                          current=not until, until=until)
            for kid, pub, until in signing.published(self.core.clock.now())])

    async def GetDenyList(self, request, client: Client):
        """One page: every card after `after_card_number` a TRANSIT tap is refused on now,
        up to page_size entries or deny_list_scan_max cards read, in one read transaction,
        signed whole."""
        after = request.after_card_number
        if after:
            validate.card_number(after, "after_card_number")
        size = request.page_size or config.deny_list_page_default
        if size > config.deny_list_page_max:
            raise InvalidArgument("page_size", f"is {size}; at most "
                                  f"{config.deny_list_page_max} (0: the default, "
                                  f"{config.deny_list_page_default})")
        signing = self._signing("GetDenyList")
        now, policy = self.core.clock.now(), self.core.policy
        page = pb.GetDenyListResponse(time=now, after_card_number=after,
                                      through_card_number=after, complete=True)
        entries, scanned = page.entries, 0
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            page.sequence = book.last_change()
            for number, raw in book.cards_after(after):
                if scanned >= config.deny_list_scan_max or len(entries) >= size:
                    page.complete = False
                    break
                scanned += 1
                page.through_card_number = number
                reason = authorize.on_record(policy, raw, number, Channel.TRANSIT, "", now)
                if reason:
                    until = 0
                    if reason == pb.DECLINE_REASON_CARD_FROZEN:
                        until = records.decode_card(number, raw).temp_loss_until  # SH-18b
                    entries.add(card_number=number, reason=reason, until=until)
        signing.sign_page(page)
        return page

    async def AcknowledgeChanges(self, request, client: Client):
        """A gate's word that it applied the feed through `sequence`: stored (one small
        write, group-committed by the writer) with the server's clock."""
        sequence, gate, clock = request.sequence, client.id, self.core.clock

        def store(book):
            head = book.last_change()  # inside the write: what every worker has committed
            if sequence > head:
                raise PastTheEnd(f"sequence {sequence} is past the change feed's end: the last "
                                 f"change is {head}; acknowledge only what you applied")
            now = clock.now()
            book.put_gate_ack(gate, sequence, now)
            return pb.AcknowledgeChangesResponse(sequence=sequence, head=head, time=now)

        return await self.core.write(store)

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

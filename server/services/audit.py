"""The Audit service (API.md)."""
import asyncio
import os

from yikatong import config
from yikatong.errors import PastTheEnd, StoreUnreadable
from yikatong.model import (
    AuditEvent,
)
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.storage import archive, records
from yikatong.v1 import yikatong_pb2 as pb


class Audit:
    """The audit trail, to AUDITOR only: exported in order, verified link by link."""

    def __init__(self, core: Core):
        self.core = core

    async def Export(self, request, client: Client):
        after = request.from_sequence
        with self.core.store.read() as txn:
            end = _audit_end(self.core.store.book(txn))
        if after > end:
            raise PastTheEnd(f"from_sequence {after} is past the audit trail's end: the last "
                             f"event is {end}")
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            segments, (archived, archived_hash) = archive.head(book)[0], archive.audit_through(book)
            # each event's prev_hash is the event before's hash (store format 6 does not keep
            # it in the event): carried along the walk from the event `after`
            prev = _hot_hash(book, after, archived, archived_hash)
        if after < archived:  # the archive's events first: one chain with the store's
            where = archive.archive_dir(self.core.store.data_dir)
            n = await asyncio.to_thread(archive.first_holding, where, segments, "audit",
                                        max(after - 1, 0))
            while n <= segments:
                segment = await asyncio.to_thread(archive.read, where, n)
                batch = []
                for key, value in segment.records["audit"]:
                    event = records.decode_audit(value, prev)
                    prev = event.hash
                    if int.from_bytes(key, "big") > after:
                        batch.append(audit_message(event))
                for event in batch:
                    yield event
                if batch:
                    after = batch[-1].sequence
                n += 1
        while True:
            with self.core.store.read() as txn:
                batch = []
                for _, value in self.core.store.book(txn).audit_records(after):
                    event = records.decode_audit(value, prev)
                    prev = event.hash
                    batch.append(audit_message(event))
                    if len(batch) >= config.watch_batch_max:
                        break
            if not batch:
                return
            for event in batch:
                yield event
            after = batch[-1].sequence

    async def Verify(self, request, client: Client):
        store = self.core.store

        def verify():
            with store.read() as txn:  # the pages checked in the file first (issue 25, 8)
                # from the archive's first event (its segments) into the store: one chain
                return archive.verify_audit(store.book(txn), archive.archive_dir(store.data_dir),
                                            os.path.join(store.env.path(), "data.mdb"))
        try:
            ok, events, bad, problem = await asyncio.to_thread(verify)
        except StoreUnreadable as error:  # the store itself is damaged: said, not INTERNAL
            store.note("corrupt_record", True)  # health NOT_SERVING until a restart
            return pb.VerifyAuditResponse(ok=False, events=error.after,
                                          first_bad_sequence=error.after + 1,
                                          problem=f"the store cannot be read: {error}")
        return pb.VerifyAuditResponse(ok=ok, events=events, first_bad_sequence=bad,
                                      problem=problem)


def _audit_end(book) -> int:
    """The sequence of the trail's last event (0: none)."""
    with book.txn.cursor(db=book.dbs.audit) as cur:
        return int.from_bytes(cur.key(), "big") if cur.last() else 0


def _hot_hash(book, seq: int, archived: int, archived_hash: bytes) -> bytes:
    """The hash of event `seq` when it is the last archived one or still hot (32 zero bytes
    for 0, and for one further in the archive: the archive's walk finds it)."""
    if seq == 0 or seq < archived:
        return bytes(32)
    if seq == archived:
        return archived_hash
    value = book.txn.get(seq.to_bytes(8, "big"), db=book.dbs.audit)
    return bytes(32) if value is None else records.audit_hash_of(value)


def audit_message(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(sequence=e.sequence, time=e.time, client_id=e.client_id, role=e.role,
                         method=e.method, card_number=e.card_number, purpose=e.purpose,
                         outcome=e.outcome, prev_hash=e.prev_hash.hex(), hash=e.hash.hex(),
                         algorithm=e.algorithm, count=e.count, holder=e.holder)

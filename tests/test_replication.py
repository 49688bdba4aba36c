"""A commit group as one replication record (issue 18, storage level): every put and delete
of the group's write transaction, in order, with the group's log sequence, handed over
before the group commits; a follower store that applies the records in order holds the same
bytes, records the last sequence it applied in the same transaction as the data, and never
applies one twice or one that skips ahead. No NATS here: the records are kept in a list."""
import hashlib
import threading
import time

import pytest

from yikatong import clock as clocks
from yikatong import config, ledger
from yikatong.errors import (
    CorruptRecord,
    Fenced,
    InvalidRecord,
    LogUnavailable,
    ReplicationGap,
)
from yikatong.model import operator_account_key
from yikatong.server import demo
from yikatong.server.harness import wait_until
from yikatong.storage import records
from yikatong.storage.lmdb_store import ApplyRecord, Store

NOW = clocks.parse_time("2026-11-25T12:00:00+08:00")


@pytest.fixture
def pair(tmp_path):
    log: list[bytes] = []
    leader = Store(str(tmp_path / "leader"), map_size=256 * 1024**2, replicate=log.append,
                   periodic=lambda book: ledger.expire_holds(book, NOW + 7200))
    follower = Store(str(tmp_path / "follower"), map_size=256 * 1024**2)
    yield leader, follower, log
    leader.close()
    follower.close()


def digest(store: Store) -> str:
    """Every key and value of every database of an open store (as harness.store_digest, in
    this process)."""
    h = hashlib.sha256()
    with store.read() as txn:
        for name in sorted(store.dbs.by_name):
            for k, v in txn.cursor(db=store.dbs.by_name[name]):
                h.update(name + b"\0" + k + b"\0" + v)
    return h.hexdigest()


def apply_all(follower: Store, log: list[bytes]) -> list[bool]:
    return [follower.write(lambda book, r=r: book.apply_journal(r)) for r in log]


def test_a_follower_that_applies_every_record_holds_the_same_bytes(pair):
    leader, follower, log = pair
    demo.load(leader, NOW)  # thousands of cards, holders, accounts, changes, audit events
    topup, fee = operator_account_key("op:topup"), operator_account_key("op:fees")

    def moves(book):  # a hold placed and a transfer: deletes come when the hold expires
        ledger.create(book, NOW, "t1", topup, fee, 500)
        ledger.create(book, NOW, "h1", fee, topup, 200, pending=True, timeout=60)
    leader.write(moves)
    leader.write(lambda book: None)  # a group that writes nothing is no record
    assert [records.decode_journal(r)[0] for r in log] == list(range(1, len(log) + 1))
    # the hold sweep runs in a group of its own once the writer is idle; its deletes too
    assert wait_until(lambda: any(value is None for r in log
                                  for _, _, value in records.decode_journal(r)[1]), 10)
    assert all(apply_all(follower, log))
    assert digest(follower) == digest(leader)
    with follower.read() as txn:
        assert follower.book(txn).log_sequence() == len(log)


def test_a_replicated_sweep_of_many_expired_holds_goes_in_records_the_log_takes(tmp_path):
    """Ten thousand holds expiring in one group were a 5 MB record, past the log's
    max_payload: a replicated writer's sweep stops once its writes pass `bytes_max` (the
    server gives half its record bound) and the next sweep goes on. (No periodic sweep of
    its own here, as `pair`'s leader has: only these sweeps run.)"""
    log: list[bytes] = []
    leader = Store(str(tmp_path / "leader"), map_size=256 * 1024**2, replicate=log.append)
    follower = Store(str(tmp_path / "follower"), map_size=256 * 1024**2)
    try:
        topup = operator_account_key("op:topup")
        fees = [operator_account_key(f"op:fees-{n}") for n in range(10)]  # 64 holds each at most
        leader.write(lambda book: [ledger.create(book, NOW, f"t{n}", topup, fee, 100)
                                   for n, fee in enumerate(fees)])
        leader.write(lambda book: [ledger.create(book, NOW, f"h{i:04d}", fees[i % 10], topup, 1,
                                                 pending=True, timeout=60) for i in range(300)])
        before = len(log)
        swept = []
        while not swept or swept[-1]:
            swept.append(leader.write(lambda book: ledger.expire_holds(book, NOW + 7200,
                                                                       bytes_max=20_000)))
        assert sum(swept) == 300 and len(swept) > 3, swept
        sizes = [len(records.unseal_journal(r)) for r in log[before:]]
        # past the bound by one hold's writes (about 500 bytes) and the record's head at most
        assert all(size <= 21_000 for size in sizes) and sum(sizes) > 100_000, sizes
        assert all(apply_all(follower, log))
        assert digest(follower) == digest(leader)
    finally:
        leader.close()
        follower.close()


def test_a_failure_met_on_every_turn_is_logged_whole_once_then_once_a_minute(caplog):
    """A loop's failure on every turn (every 0.5 s while the NATS servers lack a quorum: an
    operator's probe counted 182 tracebacks in 55 s) is logged with its traceback once,
    then one line a minute with how often it came again, and a line when it stops; another
    failure is logged whole at once."""
    import logging

    from yikatong.storage.replication import Repeated

    said = Repeated("node n1: a step of the lease failed")
    timeout = TimeoutError("nats: timeout")
    with caplog.at_level(logging.INFO, logger="yikatong"):
        for _ in range(6):
            said.failed(timeout)
        assert [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records] \
            == [("ERROR", "node n1: a step of the lease failed", True)]
        said.since -= 61  # a minute on
        said.failed(timeout)
        assert caplog.records[-1].getMessage().startswith(
            "node n1: a step of the lease failed, again 6 times in the last 61 s: nats: timeout")
        said.failed(OSError("closed"))
        assert caplog.records[-1].exc_info[1].args == ("closed",)
        said.ok()
        said.ok()
        assert [r.getMessage() for r in caplog.records[-1:]] == \
            ["node n1: a step of the lease failed no more"] and len(caplog.records) == 4


def test_a_record_applied_twice_changes_nothing_and_one_that_skips_ahead_is_refused(pair):
    leader, follower, log = pair
    for i in range(3):
        leader.write(lambda book, i=i: book.put_meta(f"k{i}".encode(), b"v"))
    assert apply_all(follower, log[:2]) == [True, True]
    before = digest(follower)
    assert follower.write(lambda book: book.apply_journal(log[0])) is False
    assert digest(follower) == before
    leader.write(lambda book: book.put_meta(b"k3", b"v"))
    with pytest.raises(ReplicationGap, match="replication record 4 after 2: 3 is missing"):
        follower.write(lambda book: book.apply_journal(log[3]))
    assert apply_all(follower, log[2:]) == [True, True]
    assert digest(follower) == digest(leader)


def test_a_group_whose_record_is_not_taken_is_not_committed(tmp_path):
    """`replicate` refusing (the log would not take it: a fenced publish) fails every
    command of the group and commits nothing, the log sequence included."""
    taken: list[bytes] = []
    refuse = [True]

    def replicate(record: bytes) -> None:
        if refuse[0]:
            raise OSError("the log refused the record")
        taken.append(record)
    store = Store(str(tmp_path / "s"), replicate=replicate)
    try:
        with pytest.raises(OSError, match="refused"):
            store.write(lambda book: book.put_meta(b"a", b"1"))
        with store.read() as txn:
            book = store.book(txn)
            assert book.meta(b"a") is None and book.log_sequence() == 0
        refuse[0] = False
        store.write(lambda book: book.put_meta(b"a", b"2"))
        assert [records.decode_journal(r) for r in taken] == [(1, [(b"meta", b"a", b"2")])]
    finally:
        store.close()


def test_a_follower_refuses_each_write_alone_and_still_applies_the_log(tmp_path, monkeypatch):
    """On a follower (`check_writer` raises Fenced) a client's write queued with a record
    of the log is refused on its own: the record is applied (in a group of its own), a
    command that only reads is answered and sees it, nothing is published; the periodic job
    (the hold sweep, the writer's to do) does not run there."""
    monkeypatch.setattr(config, "writer_idle_seconds", 0.02)
    published: list[bytes] = []
    swept: list[int] = []

    def check_writer() -> None:
        raise Fenced("this node is not the writer; the writer is n1 at 10.0.0.1:50051",
                     "10.0.0.1:50051")
    store = Store(str(tmp_path / "f"), replicate=published.append, check_writer=check_writer,
                  periodic=lambda book: swept.append(1) or book.put_meta(b"swept", b"1"))
    try:
        gate, started = threading.Event(), threading.Event()
        blocker = store.submit(lambda book: started.set() or gate.wait(10))
        assert started.wait(10)  # the writer is busy: the next three make one group
        record = records.encode_journal(1, [(b"meta", b"from-the-writer", b"1")])
        write = store.submit(lambda book: book.put_meta(b"mine", b"1"))
        applied = store.submit(ApplyRecord(record))  # a group of its own, between the two
        read = store.submit(lambda book: book.meta(b"from-the-writer"))
        gate.set()
        blocker.result(10)
        assert applied.result(10) is True
        with pytest.raises(Fenced, match="the writer is n1 at 10.0.0.1:50051"):
            write.result(10)
        assert read.result(10) == b"1"
        time.sleep(0.3)  # fifteen idle periods
        with store.read() as txn:
            book = store.book(txn)
            assert book.log_sequence() == 1 and book.meta(b"mine") is None
            assert book.meta(b"swept") is None
        assert published == [] and swept == []
    finally:
        store.close()


def test_a_followers_audit_events_go_to_the_writer_and_nothing_else_is_written(tmp_path):
    """A command on a follower whose only writes are audit events (a read of personal
    information, refused calls) is answered once they are handed over (`divert_audit`),
    nothing written here; one that also writes anything else is refused as a write. The
    writer takes a handed-over record into its trail once (`take_intake`)."""
    handed: list = []

    def check_writer() -> None:
        raise Fenced("this node is not the writer")
    follower = Store(str(tmp_path / "f"), replicate=lambda r: None, check_writer=check_writer)
    writer = Store(str(tmp_path / "w"))
    try:
        follower.divert_audit = handed.append

        def pii_read(book):
            book.append_audit(NOW, "agency-1", "CARD_AGENCY", "Holders.GetHolder", "310000000006",
                              "claim 7", holder="3101**********1234")
            return "the holder"
        assert follower.write(pii_read) == "the holder"
        with pytest.raises(Fenced):
            follower.write(lambda book: pii_read(book) and book.put_meta(b"x", b"1"))
        with follower.read() as txn:
            assert list(follower.book(txn).audit_records()) == []
        assert [(e.method, e.purpose, e.holder) for e in handed[0]] == [
            ("Holders.GetHolder", "claim 7", "3101**********1234")]
        assert len(handed) == 1
        gate, started = threading.Event(), threading.Event()  # two reads in one group:
        blocker = follower.submit(lambda book: started.set() or gate.wait(10))
        assert started.wait(10)
        reads = [follower.submit(pii_read) for _ in range(2)]
        gate.set()
        blocker.result(10)
        assert [r.result(10) for r in reads] == ["the holder"] * 2
        assert len(handed) == 2 and len(handed[1]) == 2  # handed over together, once

        def intake_down(events):
            raise LogUnavailable("the writer's audit intake did not take this node's events")
        follower.divert_audit = intake_down  # nothing leaves unaudited
        with pytest.raises(LogUnavailable, match="audit intake"):
            follower.write(pii_read)
        assert follower.write(lambda book: book.meta(b"x")) is None  # the rest goes on
        assert writer.write(lambda book: book.take_intake(1, handed[0])) is True
        assert writer.write(lambda book: book.take_intake(1, handed[0])) is False  # once
        with writer.read() as txn:
            book = writer.book(txn)
            events = [records.decode_audit(v) for _, v in book.audit_records()]
            assert [(e.sequence, e.method, e.client_id) for e in events] == [
                (1, "Holders.GetHolder", "agency-1")]
            assert book.verify_audit()[0] and book.intake_sequence() == 1
    finally:
        follower.close()
        writer.close()


def test_a_pii_read_queued_behind_a_record_with_audit_events_is_still_audited(tmp_path):
    """A record of the log that carries audit events, and a follower's PII read queued right
    behind it: the record commits in a group of its own, so the read's event is chained
    after the record's (not on counters read before it, where LMDB would refuse the key as
    not after the last and the event would be lost), and handed over."""
    log: list[bytes] = []
    writer = Store(str(tmp_path / "w"), replicate=log.append)
    handed: list = []

    def check_writer() -> None:
        raise Fenced("this node is not the writer")
    follower = Store(str(tmp_path / "f"), replicate=lambda r: None, check_writer=check_writer)
    follower.divert_audit = handed.append
    try:
        writer.write(lambda book: book.append_audit(NOW, "gate-1", "TRANSIT_GATE",
                                                    "Authorization.Authorize"))
        gate, started = threading.Event(), threading.Event()
        blocker = follower.submit(lambda book: started.set() or gate.wait(10))
        assert started.wait(10)
        applied = follower.submit(ApplyRecord(log[0]))
        read = follower.submit(lambda book: book.append_audit(
            NOW, "agency-1", "CARD_AGENCY", "Holders.GetHolder", purpose="claim 8") and "held")
        gate.set()
        blocker.result(10)
        assert applied.result(10) is True and read.result(10) == "held"
        assert [(e.sequence, e.method) for e in handed[0]] == [(2, "Holders.GetHolder")]
    finally:
        writer.close()
        follower.close()


def test_a_cut_or_padded_record_is_corrupt():
    record = records.encode_journal(7, [(b"meta", b"k", b"v"), (b"cards", b"1", None)])
    assert record[0] == records.JOURNAL_VERSION == 2
    assert records.decode_journal(record) == (7, [(b"meta", b"k", b"v"), (b"cards", b"1", None)])
    for bad in (record[:-1], record + b"\0", record[:5], record[:14], b"\x03" + record[1:],
                record[:20] + bytes([record[20] ^ 1]) + record[21:],  # a block's header
                record[:-1] + bytes([record[-1] ^ 1]),  # the frame's checksum
                V1_RECORD[:-1], V1_RECORD + b"\0"):
        with pytest.raises(CorruptRecord):
            records.decode_journal(bad)
    empty = records.encode_journal(5, [])  # a frame of nothing is read whole too
    assert records.decode_journal(empty) == (5, [])
    for bad in (empty + b"GARBAGE", empty[:-1], empty[:-4] + b"\0\0\0\0"):
        with pytest.raises(CorruptRecord):
            records.decode_journal(bad)


# A record of the log as releases before 0.5.0 wrote it (version 1: the operations plain): a
# log outlives a release, so a follower catching up after an upgrade reads it as ever.
V1_RECORD = bytes.fromhex("01070000000000000002000000046d657461010000006b01000000760563617264"
                          "730100000031ffffffff")


def test_a_version_1_record_is_read_as_ever_and_the_same_operations_are_smaller_now(tmp_path):
    ops = [(b"meta", b"k", b"v"), (b"cards", b"1", None)]
    assert records.decode_journal(V1_RECORD) == (7, ops)
    assert records.unseal_journal(records.encode_journal(7, ops)) == V1_RECORD
    store = Store(str(tmp_path / "follower"))
    old = records.unseal_journal(records.encode_journal(1, [(b"meta", b"old", b"1")]))
    assert old[0] == 1  # the plain layout: V1_RECORD's, byte for byte
    try:  # a follower applies an old record, then a new one, in order
        assert store.write(lambda book: book.apply_journal(old))
        assert store.write(lambda book: book.apply_journal(records.encode_journal(
            2, [(b"meta", b"new", b"2" * 1000)])))
        with store.read() as txn:
            book = store.book(txn)
            assert book.log_sequence() == 2
            assert txn.get(b"old", db=store.dbs.meta) == b"1"
            assert txn.get(b"new", db=store.dbs.meta) == b"2" * 1000
    finally:
        store.close()
    # a debit's operations repeat their shape: compressed, a record of many is far smaller
    many = [(b"transfers", f"gate-1-{i:08d}".encode(), b"\x03\x11" + i.to_bytes(8, "little")
             + b"\0" * 30 + b"op:transit") for i in range(1000)]
    assert len(records.encode_journal(9, many)) * 3 < records.journal_size(many)
    assert records.decode_journal(records.encode_journal(9, many)) == (9, many)


def test_a_frame_that_says_it_holds_more_than_the_bound_is_refused_unread(monkeypatch):
    record = records.encode_journal(7, [(b"meta", b"k", b"v" * 5000)])
    monkeypatch.setattr(config, "log_record_bytes_max", 1000)
    with pytest.raises(CorruptRecord, match="say 50"):
        records.decode_journal(record)
    with pytest.raises(InvalidRecord, match="at most 1,000"):
        records.encode_journal(7, [(b"meta", b"k", b"v" * 5000)])

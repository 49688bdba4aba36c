"""Issue 27 item 2: the replicated writer gathers and applies the next commit groups while the
log answers for the first (`Store._pipeline`), at most `log_in_flight_max` records in flight,
each chained to the one before it. A refused record: nothing after it commits, its callers
and theirs are refused, and a retry by request id is decided once. A real 3-node JetStream
cluster on loopback ports (harness.NatsCluster), started and stopped by each test."""
import asyncio
import concurrent.futures
import hashlib
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from test_cluster import balance, start, top_up, writer_of
from test_e2e import new_active_card
from test_nats import write_until
from test_replication import digest

from yikatong.errors import Fenced, LogUnavailable
from yikatong.server.harness import ROOT, NatsCluster, free_address, store_digest, wait_until
from yikatong.storage import records
from yikatong.storage.lmdb_store import ApplyRecord, Store
from yikatong.storage.replication import Follower, Log
from yikatong.v1 import yikatong_pb2 as pb

_U64 = struct.Struct(">Q")


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


def charge(request_id: str):
    """A debit-like command: the balance (meta key `balance`) less 1, remembered under
    `request_id` (a second one replays the first answer and charges nothing)."""
    def command(book):
        def produce() -> bytes:
            left = _U64.unpack(book.meta(b"balance") or _U64.pack(1000))[0] - 1
            book.put_meta(b"balance", _U64.pack(left))
            return _U64.pack(left)
        return book.once(request_id, hashlib.sha256(request_id.encode()).digest(), produce)
    return command


def balance_of(store) -> int:
    with store.read() as txn:
        return _U64.unpack(store.book(txn).meta(b"balance") or _U64.pack(1000))[0]


TERM = b"replication:term"


def rival_record(seq: int, term: int) -> bytes:
    """Another writer's record at `seq`, the first of its `term` (it writes the term, as
    Store._stamp_term does)."""
    return records.encode_journal(seq, [(b"meta", b"rival", b"1"),
                                        (b"meta", TERM, _U64.pack(term))])


class Gate:
    """Store.append in front of a real Log: the log's answers to the records in `hold` are
    given to the writer only once record `release` has been handed to the log (bounded:
    20 s), so that the records up to it are in flight together, as on a slow log. The
    records in `together` go to the log at once when the last of them is handed (all of them
    admitted before the log answers the first: a slow network's reordering), and before
    they go, another writer (term `rival_term`) appends its own record at `rival_at`."""

    def __init__(self, store: Store, log: Log, hold: set[int], release: int,
                 rival: Log | None = None, rival_at: int = 0, rival_term: int = 0,
                 together: frozenset[int] = frozenset()):
        self.store, self.log, self.hold, self.release = store, log, hold, release
        self.rival, self.rival_at, self.rival_term = rival, rival_at, rival_term
        self.together, self._gathered = together, []
        self.appended: list[int] = []  # sequences, in the order handed to the log
        self.sent: dict[int, concurrent.futures.Future] = {}  # the log's own answers
        self.answered_at: dict[int, list[int]] = {}  # held record -> what was out by then
        self.handed = threading.Condition()
        self._released = threading.Event()
        self._threads: list[threading.Thread] = []

    def __call__(self, record: bytes, first: bool):
        seq = records.journal_sequence(record)
        if seq in self.together:
            future = self.sent[seq] = concurrent.futures.Future()
            self._gathered.append((record, first, future))
            if seq == max(self.together):
                self._hand_together()
        else:
            future = self.sent[seq] = self.log.append_async(record, self.store.term, first)
        with self.handed:
            self.appended.append(seq)
            self.handed.notify_all()
        if seq == self.release:
            self._released.set()
        if seq not in self.hold:
            return future
        held: concurrent.futures.Future = concurrent.futures.Future()

        def settle():
            self._released.wait(20)
            self.answered_at[seq] = list(self.appended)
            try:
                held.set_result(future.result(20))
            except Exception as e:  # noqa: BLE001 - the log's refusal, handed on
                held.set_exception(e)
        thread = threading.Thread(target=settle, daemon=True)
        thread.start()
        self._threads.append(thread)
        return held

    def _hand_together(self) -> None:
        if self.rival is not None:  # once the log holds ours before it
            self.sent[self.rival_at - 1].result(20)
            self.rival.ends_at(self.rival_at - 1)  # as a node that has just taken the lease
            self.rival.append(rival_record(self.rival_at, self.rival_term), self.rival_term)

        def start() -> None:  # one callback on the log's loop: admitted one after another
            for record, first, future in self._gathered:
                task = asyncio.ensure_future(self.log.admitted(record, self.store.term, first,
                                                               None))
                task.add_done_callback(
                    lambda t, f=future: f.set_exception(t.exception()) if t.exception()
                    else f.set_result(None))
        self.log._loop.call_soon_threadsafe(start)

    def wait_appended(self, seq: int) -> None:
        with self.handed:
            assert self.handed.wait_for(lambda: seq in self.appended, 20), self.appended

    def join(self) -> None:
        for thread in self._threads:
            thread.join(30)


def test_groups_gathered_while_the_log_answers_commit_together_and_reach_a_follower(
        cluster, tmp_path):
    """Record 1's answer is held back while three more groups are applied in the same
    transaction and handed to the log; once all are acknowledged all commit together and
    every caller is answered; then many writes at once from many threads. A follower holds
    the same bytes, every acknowledged charge in it."""
    log, follower_log = Log(cluster.urls), Log(cluster.urls)
    store = Store(str(tmp_path / "writer"), log_in_flight_max=4)
    store.term = 3
    follower_store = Store(str(tmp_path / "follower"))
    gate = Gate(store, log, hold={1}, release=4)
    store.append = gate
    follower = Follower(follower_store, follower_log)
    try:
        futures = []
        for i in range(4):
            futures.append(store.submit(charge(f"c{i}")))
            gate.wait_appended(i + 1)
        assert [f.result(30) for f in futures] == [_U64.pack(999 - i) for i in range(4)]
        assert gate.answered_at[1] == [1, 2, 3, 4]  # four in flight before the first answer
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: store.write(charge(f"m{i}")), range(400)))
        assert sorted(_U64.unpack(a)[0] for a in answers) == list(range(596, 996))
        with store.read() as txn:
            last = store.book(txn).log_sequence()
            assert store.book(txn).term() == 3
        assert log.last_sequence() == last
        assert wait_until(lambda: follower.applied == last, 30), follower.error
        assert balance_of(follower_store) == 1000 - 404
        assert digest(follower_store) == digest(store)
    finally:
        gate.join()
        follower.stop()
        for s in (store, follower_store):
            s.close()
        log.close()
        follower_log.close()


def test_nothing_after_a_refused_record_commits_and_retries_charge_once(cluster, tmp_path):
    """Four groups in flight (term 3): record 1 is acknowledged; a newer writer (term 7)
    takes sequence 2 before ours goes out, so record 2 is refused (record 1's answer held
    back until record 4 is out, and 2 to 4 handed to the log together, admitted before it
    answers 2, as over a slow network). Records 3 and 4 follow the newer
    writer's into the log, but as an older term's they are void: a follower applies them as
    nothing (no fork). Record 1 commits and its caller is answered; the callers of 2, 3 and
    4 get Fenced (UNAVAILABLE) and nothing of theirs is in the store. Caught up from the log
    and writing again under a newer term, their retries by request id are decided once;
    record 1's retry replays its answer. The follower ends with the writer's bytes."""
    log, rival, follower_log = Log(cluster.urls), Log(cluster.urls), Log(cluster.urls)
    store = Store(str(tmp_path / "writer"), log_in_flight_max=4)
    store.term = 3
    follower_store = Store(str(tmp_path / "follower"))
    gate = Gate(store, log, hold={1}, release=4, rival=rival, rival_at=2, rival_term=7,
                together=frozenset({2, 3, 4}))
    store.append = gate
    follower = Follower(follower_store, follower_log)
    try:
        futures = []
        for i in range(4):
            futures.append(store.submit(charge(f"c{i}")))
            gate.wait_appended(i + 1)
        assert futures[0].result(30) == _U64.pack(999)
        errors = [f.exception(30) for f in futures[1:]]
        assert all(isinstance(e, Fenced) for e in errors), errors
        assert "moved past sequence 1" in str(errors[0])
        assert all("nothing after a refused record commits" in str(e) for e in errors[1:])
        with store.read() as txn:
            book = store.book(txn)
            assert book.log_sequence() == 1
            assert [book.replay(f"c{i}", hashlib.sha256(f"c{i}".encode()).digest())
                    for i in range(4)] == [_U64.pack(999), None, None, None]
        assert balance_of(store) == 999
        # ours at 3 and 4 (their answers not waited for), after the newer writer's 2
        assert wait_until(lambda: log.last_sequence() == 4, 20)
        assert wait_until(lambda: follower.applied == 4, 30), follower.error
        assert balance_of(follower_store) == 999  # 3 and 4 void: charged nothing
        with follower_store.read() as txn:
            assert follower_store.book(txn).meta(b"rival") == b"1"
        for seq in (2, 3, 4):  # caught up from the log, as a Node does
            record, _, term = log.read(seq)
            store.write(ApplyRecord(record, term))
        with pytest.raises(Fenced, match="a newer writer's records are in the log"):
            store.write(charge("c1"))  # still term 3: it may not write
        store.term = 8  # the lease taken again
        # (its first record waits for the log's end to be read again after the refusal)
        retried = [write_until(store, charge(f"c{i}"), 10) for i in range(4)]
        assert retried == [_U64.pack(n) for n in (999, 998, 997, 996)]
        assert balance_of(store) == 996  # four charges, each once
        assert log.last_sequence() == 7  # c0's retry wrote nothing: a replay
        assert wait_until(lambda: follower.applied == 7, 30), follower.error
        assert digest(follower_store) == digest(store)
    finally:
        gate.join()
        follower.stop()
        for s in (store, follower_store):
            s.close()
        for each in (log, rival, follower_log):
            each.close()


def test_a_group_past_the_record_size_goes_on_in_the_next_record(cluster, tmp_path):
    """Commands gathered into one group write more than a record may hold (the log takes
    messages up to its max_payload; here the bound is lowered to 300 bytes): the group is
    cut after the command that passed it, the rest go on in the next records of the same
    transaction, every caller is answered, and a follower holds the same bytes."""
    log, follower_log = Log(cluster.urls), Log(cluster.urls)
    store = Store(str(tmp_path / "writer"), log_in_flight_max=2)
    store.append = lambda record, first: log.append_async(record, 0, first)
    store.record_bytes_max = 300
    follower_store = Store(str(tmp_path / "follower"))
    follower = Follower(follower_store, follower_log)
    busy = threading.Event()
    try:
        blocker = store.submit(lambda book: busy.wait(20))  # the writer waits: the rest queue
        futures = [store.submit(lambda book, i=i: book.put_meta(f"k{i}".encode(), b"v" * 400))
                   for i in range(5)]
        busy.set()
        blocker.result(30)
        assert [f.result(30) for f in futures] == [None] * 5
        assert log.last_sequence() == 5  # one record each: each passed the bound alone
        assert [len(records.decode_journal(log.read(s)[0])[1]) for s in range(1, 6)] == [1] * 5
        assert wait_until(lambda: follower.applied == 5, 30), follower.error
        assert digest(follower_store) == digest(store)
    finally:
        busy.set()
        follower.stop()
        for s in (store, follower_store):
            s.close()
        log.close()
        follower_log.close()


def test_no_transaction_builds_on_a_record_of_another_that_did_not_commit(cluster):
    """Transactions of one writer (the workers of a node and its log keeper: the same term).
    A's record 1 is in the log but A never commits it (its worker was killed). B, from the
    store A left (at 0), hands its own 1 and, built on it, 2: the log's expected last
    sequence would refuse B's 1 and take B's 2 on top of A's 1 (a ledger out of balance
    on every node). The log admits neither: B's 1 does not follow the log's end, and 2
    follows a refused record; nothing of B is sent. The same between two transactions of
    one worker (A's 2 in the log, not committed; A's next transaction's 2 and 3), and a first
    record while another transaction's is unanswered is refused. And where the log's end is
    not proven (it read an end a record answered as lost then passed), a transaction's later
    record waits for its first one's answer: refused with it, never sent."""
    log = Log(cluster.urls)

    def hand(seq: int, first: bool, who: str) -> concurrent.futures.Future:
        record = records.encode_journal(seq, [(b"meta", who.encode(), _U64.pack(seq))])
        return asyncio.run_coroutine_threadsafe(log.admitted(record, 1, first, who), log._loop)

    def holder(seq: int) -> bytes:
        return records.decode_journal(log.read(seq)[0])[1][0][1]
    try:
        hand(1, True, "A").result(20)
        refused = [hand(1, True, "B"), hand(2, False, "B")]
        assert "the replicated log ends at 1" in str(refused[0].exception(20))
        assert "the record before it in its transaction was refused" in str(
            refused[1].exception(20))
        assert log.last_sequence() == 1 and holder(1) == b"A"

        assert wait_until(lambda: hand(2, True, "A").exception(20) is None, 10)  # not kept
        again = [hand(2, True, "A"), hand(3, False, "A")]  # A's next, from its store at 1
        assert "the replicated log ends at 2" in str(again[0].exception(20))
        assert "refused" in str(again[1].exception(20))
        assert log.last_sequence() == 2

        a3, b3 = hand(3, True, "A"), hand(3, True, "B")  # A's still in flight
        assert "still awaiting the log's answer" in str(b3.exception(20))
        assert a3.result(20) is None and log.last_sequence() == 3

        log.ends_at(2)  # an end read before record 3 landed (answered as lost, then landed)
        stale = [hand(3, True, "C"), hand(4, False, "C")]
        assert isinstance(stale[0].exception(20), Fenced)  # the log's own check
        assert "the first record of its transaction was refused" in str(
            stale[1].exception(20))
        assert log.last_sequence() == 3 and holder(3) == b"A"
    finally:
        log.close()


def debit_stream(srv, card: str, run: str, messages: int) -> list[pb.AuthorizeBatchResponse]:
    requests = iter([pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"{run}-{m}-{i}", card_number=card, channel=pb.CHANNEL_TRANSIT,
        amount_fen=1, terminal_id="gate-1") for i in range(10)]) for m in range(messages)])
    return list(srv.authorization.AuthorizeStream(requests, metadata=srv.md("TRANSIT_GATE"),
                                                  timeout=60))


def test_debits_from_many_streams_with_records_in_flight_reach_a_follower(cluster, tmp_path):
    """Two `serve --replicate --log-in-flight-max 4` nodes: debits from eight streams at once
    on the writer, every one approved; the follower holds every acknowledged debit (each
    purse less exactly its count) and the same bytes as the writer."""
    nodes = [start(tmp_path, cluster, i, "--log-in-flight-max", "4") for i in range(2)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        (follower,) = [n for n in nodes if n is not writer]
        cards = [new_active_card(writer, n) for n in range(1, 5)]
        for card in cards:
            top_up(writer, card, 100_000)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda s: debit_stream(writer, cards[s % 4], f"s{s}", 20),
                                    range(8)))
        approved = [sum(r.decision == pb.DECISION_APPROVED for m in a for r in m.responses)
                    for a in answers]
        assert approved == [200] * 8
        for card in cards:
            assert wait_until(lambda c=card: balance(follower, c) == 100_000 - 400, 30)
        for node in nodes:
            node.stop()
        assert store_digest(writer.data_dir) == store_digest(follower.data_dir)
    finally:
        for node in nodes:
            node.stop()


def test_log_in_flight_max_out_of_range_is_refused_in_one_line(tmp_path):
    for value in ("0", "257"):
        out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                              str(tmp_path / "d"), "--listen", free_address(), "--replicate",
                              "nats://127.0.0.1:1", "--node-id", "a", "--log-in-flight-max",
                              value], cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [
            f"yikatong: --log-in-flight-max must be 1 to 256, not {value}"], out.stderr


def test_a_follower_that_cannot_apply_a_record_says_not_serving(cluster, tmp_path):
    """A record a follower cannot apply (here an archive segment that does not follow its
    archive; in life an archive dir it cannot write, or a writer of a later release): it
    tries every second, and from the third failure in a row health says NOT_SERVING
    (`replication_stalled`: it would fall behind for good, serving ever staler answers);
    nothing of the record is written, no segment of it either."""
    from yikatong.storage import archive

    log = Log(cluster.urls)
    store = Store(str(tmp_path / "follower"))
    manifest = {"segment": 2, "prev_hash": bytes(32).hex(), "payload_kinds": []}
    data, _ = archive.encode(manifest, {})
    record = records.encode_journal(1, [(archive.SEGMENT_OP, archive.name_of(2).encode(),
                                         data), (b"meta", b"k", b"v")])
    deadline = time.monotonic() + 30
    while True:  # a fresh cluster's first append may go unanswered in 5 s (seen once in CI)
        try:
            log.append(record, 0)
            break
        except LogUnavailable:
            if log.last_sequence() == 1:  # it landed; its answer did not
                break
            assert time.monotonic() < deadline
    follower = Follower(store, log)
    try:
        assert wait_until(lambda: "replication_stalled" in store.not_serving, 20)
        assert "does not follow this store's archive" in str(follower.error)
        assert follower.applied == 0
        assert not os.path.exists(os.path.join(store.data_dir, "archive"))
    finally:
        follower.stop()
        store.close()
        log.close()


def test_records_waiting_for_their_first_ones_answer_go_in_the_order_handed():
    """Where the log's end is not proven (here: a log just opened), a transaction's later
    records wait for its first one's acknowledgement; the first's answer and a record handed
    just then land in one turn of the loop: the waiting ones still go first, in the order
    handed (found by review: record 4 overtook 2 and 3, and was refused as out of order).
    A waiting record cancelled (its caller gone) does not fail the first, which landed; the
    ones after it are refused. The log's expected-sequence check is modelled in memory."""
    class InMemory(Log):
        def __init__(self):  # the admission alone: no NATS
            self._init_admission()
            self._end, self.sent, self.acks = 0, [], {}

        async def _publish(self, record: bytes, term: int) -> None:
            seq = records.journal_sequence(record)
            self.sent.append(seq)
            ack = self.acks[seq] = asyncio.get_running_loop().create_future()
            await ack

    def rec(seq: int) -> bytes:
        return records.encode_journal(seq, [(b"meta", b"k", _U64.pack(seq))])

    async def in_order() -> list:
        log = InMemory()
        log._loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(log.admitted(rec(1), 1, True, None))]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(log.admitted(rec(s), 1, False, None)) for s in (2, 3)]
        await asyncio.sleep(0)
        log.acks[1].set_result(None)  # the first's answer, and record 4 handed, one turn
        tasks.append(asyncio.ensure_future(log.admitted(rec(4), 1, False, None)))
        for _ in range(20):
            await asyncio.sleep(0)
            for ack in list(log.acks.values()):
                if not ack.done():
                    ack.set_result(None)
        return [await asyncio.gather(*tasks, return_exceptions=True), log.sent]

    answers, sent = asyncio.run(in_order())
    assert sent == [1, 2, 3, 4] and answers == [None] * 4

    async def cancelled() -> list:
        log = InMemory()
        log._loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(log.admitted(rec(1), 1, True, None))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(log.admitted(rec(s), 1, False, None)) for s in (2, 3)]
        await asyncio.sleep(0)
        later[0].cancel()
        await asyncio.sleep(0)
        log.acks[1].set_result(None)
        return [await asyncio.gather(first, *later, return_exceptions=True), log.sent]

    answers, sent = asyncio.run(cancelled())
    assert answers[0] is None and isinstance(answers[1], asyncio.CancelledError)
    assert isinstance(answers[2], LogUnavailable) and sent == [1]

"""The replicated log (issue 18): a NATS JetStream stream whose every message is one commit
group's replication record (records.encode_journal), stream sequence = log sequence.

The writer appends a group before it commits locally, naming the sequence it believes the
log ends at (`Nats-Expected-Last-Sequence`): JetStream takes it only if no one else appended
since, so a node that is no longer the writer can never append (fencing by the log itself),
and its group is not committed. JetStream acknowledges once a quorum of the stream's
replicas holds the record. A follower reads the log from the sequence after its own and
applies each record in order, the sequence with the data, in one transaction.

nats-py is asyncio and the store's writer is a thread, so a `Log` runs its own event loop
in a thread of its own; the writer waits on it for each append.

A transaction's records are appended while the log answers (docs/SCALE.md, "Gathering while
the log answers"): record s+1 is handed on before record s is answered, built on it. The
expected last sequence alone cannot tell that the record the log holds at s is the one s+1
was built on: if another transaction (an ended one's record still in flight or answered as
lost and landing late, a worker of the node that died with its records in the log, the
writer before this one) put its own s there, s+1 would be taken on top of it. So the `Log`
admits records as chains (`_admit`): a transaction's first record only when nothing is
unanswered and it follows the log's last record as this node knows it; each later record
only right after its own transaction's previous one, none after a refusal, and, while the
log's end is not proven by an acknowledgement of this node's own, only once the first is
acknowledged.
"""
import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
import uuid

import nats
import nats.errors
import nats.js.api
import nats.js.errors

from yikatong import config
from yikatong.errors import Fenced, LogUnavailable, ReplicationGap
from yikatong.model import AuditEvent
from yikatong.storage import records
from yikatong.storage.lmdb_store import ApplyRecord

log = logging.getLogger("yikatong.replication")
STREAM = "YIKATONG"
SUBJECT = "yikatong.log"
# followers' audit events (PII reads, refused calls), for the writer to take into the trail
INTAKE_STREAM = "YIKATONG_AUDIT_INTAKE"
INTAKE_SUBJECT = "yikatong.audit-intake"
INTAKE_PURGE_SECONDS = 5.0
_INTAKE_FIELDS = ("time", "client_id", "role", "method", "card_number", "purpose", "outcome",
                  "count", "holder")
EXPECTED = "Nats-Expected-Last-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence check
# the writer's term (the lease's revision when it took it) on every record: a record of an
# older term than one already in the log is void, applied as nothing (issue 27 item 2)
TERM = "Yikatong-Term"
_UNREACHABLE = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError, nats.errors.ConnectionClosedError)


_NOT_TAKEN = ("the writer's audit intake did not take this node's audit events; nothing was "
              "answered")
NO_PEERS = 10005  # JetStream: "no suitable peers for placement" (a cluster still forming)


class NoQuorum(LogUnavailable):
    """A NATS server answers, but JetStream does not: too few of the servers are up to elect
    its meta leader (`cluster status` exits 1: the cluster is there and unhealthy)."""


class Repeated:
    """A failure a loop meets on every turn (the NATS servers short of their quorum: every
    0.5 s, for as long as it lasts) logged whole once, then one line a minute saying how
    often it came again, and a line when it stops: a journal an operator can still read."""

    def __init__(self, what: str):
        self.what = what
        self.key: tuple[type, str] | None = None
        self.count, self.since = 0, 0.0

    def failed(self, error: BaseException) -> None:
        key, now = (type(error), str(error)), time.monotonic()
        if key != self.key:
            self.key, self.count, self.since = key, 0, now
            log.error("%s", self.what, exc_info=error)
            return
        self.count += 1
        if now - self.since >= config.repeated_failure_log_seconds:
            log.error("%s, again %d times in the last %.0f s: %s", self.what, self.count,
                      now - self.since, str(error) or type(error).__name__)
            self.count, self.since = 0, now

    def ok(self) -> None:
        if self.key is not None:
            log.info("%s no more", self.what)
            self.key = None


def forming(error: BaseException) -> bool:
    """An answer of a JetStream cluster that is still coming up: worth asking again."""
    return isinstance(error, nats.js.errors.ServiceUnavailableError) or (
        isinstance(error, nats.js.errors.APIError) and error.err_code == NO_PEERS)


def starting(what: str, call, bound: float | None = None):
    """call(), tried again while a cluster started at the same moment makes its streams and
    buckets and elects their leaders (timeouts and "unavailable" answers, not only servers
    out of reach), for up to config.cluster_start_seconds; then LogUnavailable naming
    `what`."""
    bound = config.cluster_start_seconds if bound is None else bound
    deadline = time.monotonic() + bound
    while True:
        try:
            return call()
        except (*_UNREACHABLE, nats.js.errors.APIError, concurrent.futures.TimeoutError,
                LogUnavailable) as error:
            if isinstance(error, nats.js.errors.APIError) and not forming(error):
                raise
            if time.monotonic() > deadline:
                raise LogUnavailable(f"{what} did not answer within {bound:g} s "
                                     f"({error or type(error).__name__})") from None
            time.sleep(0.25)


def term_of(headers: dict | None) -> int | None:
    """A record's writer's term (`TERM`), None for a record without one."""
    value = (headers or {}).get(TERM)
    return int(value) if value is not None and value.isdigit() else None


def not_the_writer(writer: tuple[str, str] | None) -> Fenced:
    """A write refused on a node that does not hold the lease, naming the one that does."""
    return Fenced("this node is not the writer" + (
        f"; the writer is {writer[0]} at {writer[1]}" if writer else
        "; no node holds the write lease yet"), writer[1] if writer else "")


def shown(url: str) -> str:
    """A NATS URL for a message or a log line: any user:password in it masked."""
    return re.sub(r"//[^/@]*@", "//***@", url)


class Log:
    """A connection to the replicated log. `urls`: the NATS servers; the stream is made with
    `replicas` replicas if it does not exist."""

    def __init__(self, urls: list[str], replicas: int = 3, timeout: float = 5.0,
                 create: bool = True):
        """`create=False`: only an existing log (a reader such as `cluster status`)."""
        self.timeout, self.create = timeout, create
        self._init_admission()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="yikatong-log",
                                        daemon=True)
        self._thread.start()
        try:
            self._run(self._connect(urls, replicas), timeout * 4)
        except concurrent.futures.TimeoutError:
            quorum = self.no_quorum(timeout * 4)
            self.close()
            if quorum is not None:
                raise quorum from None
            raise LogUnavailable(f"no NATS server of {', '.join(map(shown, urls))} answered within "
                                 f"{timeout * 4:g} s") from None
        except Exception:
            self.close()
            raise

    def no_quorum(self, waited: float) -> "NoQuorum | None":
        """What to say when JetStream did not answer within `waited` seconds though a NATS
        server did: most likely too few servers are up to elect its meta leader (None: no
        server answered)."""
        nc = getattr(self, "_nc", None)
        if nc is None or not nc.is_connected:
            return None
        return NoQuorum(f"NATS server {shown(nc.connected_url.geturl())} answered, but its "
                        f"JetStream did not within {waited:g} s: most likely fewer than a "
                        "quorum of the NATS servers are up (no meta leader elected), and then "
                        "no node can write or hold the lease")

    def _init_admission(self) -> None:
        """The admission of records (`_admit`), kept on the log's loop: the log's last
        sequence as its answers tell it (None: unknown, read again once all are answered),
        the records handed on and not yet answered, and (who, sequence) of the last one
        admitted: the chain a transaction's next record must follow; whether the log's end
        is proven by this node's own acknowledged record (until it is, a transaction's later
        records wait for its first one's answer, `_gate`, each after the one before it,
        `_turn`)."""
        self._end: int | None = None
        self._unanswered = 0
        self._admitted = 0  # records admitted, ever
        self._chain: tuple[object, int] | None = None
        self._proven = False
        self._gate: asyncio.Future | None = None  # the chain's first record acknowledged
        self._turn: asyncio.Future | None = None  # its last later record gone
        self._reading_end: asyncio.Task | None = None

    def _run(self, coro, timeout: float | None = None):
        """`coro` on the log's loop, cancelled there if it has not finished within `timeout`
        (a call left running would go on holding what it holds: a snapshot's copy, a
        subscription)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self.timeout * 2)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def _connect(self, urls: list[str], replicas: int) -> None:
        async def quiet(error: Exception) -> None:  # nats-py logs a traceback per attempt
            log.debug("replicated log connection: %s", error)

        self._nc = await nats.connect(servers=urls, max_reconnect_attempts=-1,
                                      reconnect_time_wait=0.2, connect_timeout=self.timeout,
                                      error_cb=quiet)
        self._js = self._nc.jetstream(timeout=self.timeout)
        deadline = self._loop.time() + self.timeout * 4
        while True:  # a new cluster elects its meta leader first
            try:
                for name, subject in ((STREAM, SUBJECT), (INTAKE_STREAM, INTAKE_SUBJECT)):
                    if self.create:
                        await self._js.add_stream(name=name, subjects=[subject],
                                                  num_replicas=replicas)
                infos = [await self._js.stream_info(name) for name in (STREAM, INTAKE_STREAM)]
                if all(i.cluster is None or i.cluster.leader for i in infos):  # elected
                    self._end = infos[0].state.last_seq
                    return
                await asyncio.sleep(0.1)
            except (*_UNREACHABLE, nats.js.errors.APIError) as error:
                if isinstance(error, nats.js.errors.APIError) and not forming(error):
                    raise
                if self._loop.time() > deadline:
                    raise LogUnavailable("the replicated log's stream cannot be made or "
                                         "found") from None
                await asyncio.sleep(0.1)

    def append(self, record: bytes, term: int = 0) -> None:
        """Store(replicate=...): a transaction of one record, appended after the sequence
        before its own, or Fenced (the log moved on: this node is not the writer) or
        LogUnavailable; in both cases the group is not committed. `term`: the writer's
        (`TERM`)."""
        try:
            self._run(self.admitted(record, term, True, None))
        except concurrent.futures.TimeoutError:
            raise LogUnavailable(f"the replicated log did not acknowledge record "
                                 f"{records.journal_sequence(record)} in time; nothing was "
                                 "committed") from None

    def append_async(self, record: bytes, term: int, first: bool = True
                     ) -> concurrent.futures.Future:
        """Store.append: the record handed to the log now; a future of the log's answer
        (None, or Fenced or LogUnavailable as `append` raises them). Records handed one after
        another reach the log in that order. `first`: the first record of its transaction
        (else it was built on the one handed just before it)."""
        return asyncio.run_coroutine_threadsafe(self.admitted(record, term, first, None),
                                                self._loop)

    async def admitted(self, record: bytes, term: int, first: bool, who: object) -> None:
        """`record` appended if `_admit` lets it in (on the log's loop, before anything is
        awaited: records reach the log in the order of these calls). `who`: the
        transaction's writer (a worker's connection to the log keeper; None in a node of
        one process)."""
        seq = records.journal_sequence(record)
        try:
            turn = self._admit(seq, first, who)
        except LogUnavailable:
            if first and self._end is not None and seq > self._end + 1:  # another node
                self._end = None  # wrote since this one last did: where the log ends, again
                self._read_end_soon()
            raise
        mine = self._gate if first else None  # this chain's, answered with this record
        self._unanswered += 1
        self._admitted += 1
        try:
            if turn is not None:  # after the record before it has gone (and the first
                before, own = turn  # is acknowledged), in the order handed
                ok = before.result() if before.done() else await asyncio.shield(before)
                if not ok:
                    raise LogUnavailable(f"record {seq} was not sent: the first record of "
                                         "its transaction was refused; nothing after a "
                                         "refused record commits")
                own.set_result(True)  # the next may go: this one's PUB is sent in this step
            await self._publish(record, term)
        except BaseException:
            self._end, self._chain, self._proven = None, None, False  # read again
            for future in (mine, turn[1] if turn is not None else None):
                if future is not None and not future.done():
                    future.set_result(False)
            raise
        else:
            self._proven = True
            if mine is not None and not mine.done():
                mine.set_result(True)
            if self._end is not None:
                self._end = max(self._end, seq)
        finally:
            self._unanswered -= 1
            self._read_end_soon()

    def _read_end_soon(self) -> None:
        if self._end is None and self._reading_end is None and not self._unanswered:
            self._reading_end = asyncio.ensure_future(self._read_end())

    def ends_at(self, end: int) -> None:
        """Where the log ends, as a node that has just read it to its end knows (before it
        takes the lease: its first record follows it without a spurious refusal; a record
        of the writer before it may still land, so the end is not proven)."""
        async def set_end() -> None:
            self._chain, self._proven, self._gate, self._turn = None, False, None, None
            self._end = None if self._unanswered else end  # (read again once answered)
            self._read_end_soon()
        self._run(set_end())

    def break_chain(self, who: object) -> None:
        """A record of `who`'s transaction refused before it reached `admitted` (the log
        keeper's own checks): nothing later of that transaction may follow its chain."""
        if self._chain is not None and self._chain[0] is who:
            self._chain = None

    def _admit(self, seq: int, first: bool, who: object
               ) -> tuple[asyncio.Future, asyncio.Future] | None:
        """A transaction's first record only while no record is unanswered and right after
        the log's last; a later one only right after its transaction's previous record and
        while nothing of the chain was refused. Refused here: nothing was sent. Returns,
        while the log's end is not proven by an acknowledgement of this node's own (after a
        refusal, a timeout, a start or a change of writer: a record answered as lost may
        still land), a later record's turn: (what it waits for: the record before it gone,
        and the first acknowledged; what it sets once it goes), so the waiting ones go in
        the order handed and none handed after them overtakes them."""
        if first:
            self._chain = None  # whatever went before: a transaction ended
            if self._unanswered or self._end is None:
                raise LogUnavailable(f"record {seq} was not sent: records of a transaction "
                                     "that ended are still awaiting the log's answer, or "
                                     "where the log ends is being read again; nothing was "
                                     "committed, retry shortly")
            if seq != self._end + 1:
                raise LogUnavailable(
                    f"record {seq} was not sent: the replicated log ends at {self._end} (a "
                    "record this node's store does not hold yet: a transaction that did "
                    "not commit, or another node's); nothing was committed, retry shortly")
            self._gate = None if self._proven else self._loop.create_future()
            self._turn = self._gate
            self._chain = (who, seq)
            return None
        if self._chain != (who, seq - 1):
            self._chain = None
            raise LogUnavailable(f"record {seq} was not sent: the record before it in its "
                                 "transaction was refused; nothing after a refused record "
                                 "commits")
        self._chain = (who, seq)
        if self._gate is None:
            return None
        before, self._turn = self._turn, self._loop.create_future()
        assert before is not None
        return before, self._turn

    async def _read_end(self) -> None:
        """Where the log ends, from the log itself (after a refused or unanswered record,
        once nothing is unanswered); taken only if no record was admitted meanwhile."""
        admitted = self._admitted
        try:
            end = (await self._js.stream_info(STREAM)).state.last_seq
        except Exception:  # noqa: BLE001 - out of reach: asked again shortly
            self._loop.call_later(0.1, self._read_end_soon)
            return
        finally:
            self._reading_end = None
        if self._end is None and not self._unanswered and self._admitted == admitted:
            self._end = end
        else:
            self._read_end_soon()

    async def _publish(self, record: bytes, term: int) -> None:
        seq = records.journal_sequence(record)
        try:
            ack = await self._js.publish(SUBJECT, record, timeout=self.timeout, headers={
                EXPECTED: str(seq - 1), TERM: str(term)})
        except nats.js.errors.APIError as error:
            if error.err_code == WRONG_LAST_SEQUENCE:
                raise Fenced(f"the replicated log has moved past sequence {seq - 1}: this node "
                             "is not the writer; nothing was committed") from None
            raise LogUnavailable(f"the replicated log refused record {seq}: {error}") from None
        except _UNREACHABLE:
            raise LogUnavailable(f"the replicated log did not acknowledge record {seq} in "
                                 f"{self.timeout:g} s; nothing was committed") from None
        except nats.errors.MaxPayloadError:
            raise LogUnavailable(f"record {seq} is {len(record):,} bytes, more than the log's "
                                 f"max_payload ({self._nc.max_payload:,}); nothing was "
                                 "committed") from None
        if ack.seq != seq:
            raise Fenced(f"the replicated log put record {seq} at {ack.seq}")

    def purge(self, below: int, stream: str = STREAM) -> None:
        """Drop `stream`'s records up to and including `below` (kept elsewhere now: the log's
        in a snapshot, the intake's in the trail)."""
        async def purge():
            await self._js.purge_stream(stream, seq=below + 1)
        self._run(purge())

    def first_sequence(self, stream: str = STREAM) -> int:
        """`stream`'s first record still kept (last + 1 when it keeps none)."""
        state = self._run(self._js.stream_info(stream)).state
        return state.first_seq if state.messages else state.last_seq + 1

    def read(self, seq: int) -> tuple[bytes, float, int | None] | None:
        """Record `seq`, when the log took it (unix seconds) and its writer's term (None: a
        record from before terms), None if the log does not reach it yet."""
        try:
            message = self._run(self._js.get_msg(STREAM, seq))
        except nats.js.errors.NotFoundError:
            return None
        except _UNREACHABLE:
            raise LogUnavailable(f"the replicated log did not answer for record {seq}") from None
        return (message.data, message.time.timestamp() if message.time else time.time(),
                term_of(message.headers))

    def hand_over(self, events: list[AuditEvent]) -> None:
        """A follower's audit events, into the writer's intake (a quorum holds them when
        this returns), or LogUnavailable."""
        try:
            self._run(self.hand_over_data(self.intake_data(events)))
        except concurrent.futures.TimeoutError:
            raise LogUnavailable(_NOT_TAKEN) from None

    async def hand_over_data(self, data: bytes) -> None:
        """`hand_over` on the log's loop, of events already encoded (`intake_data`)."""
        try:
            await self._js.publish(INTAKE_SUBJECT, data, timeout=self.timeout,
                                   headers={"Nats-Msg-Id": uuid.uuid4().hex})
        except (nats.js.errors.APIError, *_UNREACHABLE):
            raise LogUnavailable(_NOT_TAKEN) from None

    @staticmethod
    def intake_data(events: list[AuditEvent]) -> bytes:
        return json.dumps([[getattr(e, f) for f in _INTAKE_FIELDS] for e in events]).encode()

    @staticmethod
    def intake_events(data: bytes) -> list[AuditEvent]:
        return [AuditEvent(0, **dict(zip(_INTAKE_FIELDS, row, strict=True)))
                for row in json.loads(data)]

    def subscribe(self, start: int, subject: str = SUBJECT):
        """An ordered consumer of the log (or of the audit intake) from record `start` on
        (JetStream pushes the records in order, re-creating itself on a gap), for `take`."""
        async def subscribe():
            return await self._js.subscribe(
                subject, ordered_consumer=True, config=nats.js.api.ConsumerConfig(
                    deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start))
        try:
            return self._run(subscribe())
        except (*_UNREACHABLE, concurrent.futures.TimeoutError):
            raise LogUnavailable(f"the replicated log cannot be followed from {start}") from None

    def take(self, subscription, most: int, wait: float
             ) -> list[tuple[int, bytes, float, int | None]]:
        """(sequence, record, when the log took it, its writer's term) of the next records
        the subscription holds, at most `most`: the first waited for up to `wait` seconds,
        the rest only if already here. [] when none came."""
        async def take():
            taken = []
            try:
                message = await subscription.next_msg(timeout=wait)
                while True:
                    meta = message.metadata
                    taken.append((meta.sequence.stream, message.data,
                                  meta.timestamp.timestamp(), term_of(message.headers)))
                    if len(taken) >= most or subscription.pending_msgs == 0:
                        return taken
                    message = await subscription.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                return taken
        return self._run(take())

    def unsubscribe(self, subscription) -> None:
        try:
            self._run(subscription.unsubscribe())
        except Exception:  # noqa: BLE001 - a connection that is already gone
            pass

    def last_sequence(self) -> int:
        return self._run(self._js.stream_info(STREAM)).state.last_seq

    def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            try:
                self._run(nc.close())
            except Exception:  # noqa: BLE001 - closing a connection that is already gone
                pass
        def stop() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.call_soon(self._loop.stop)  # after the cancellations have run
        self._loop.call_soon_threadsafe(stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


class Follower:
    """Applies the log to a store, in order, from the sequence after the store's own, in a
    thread of its own, until stopped. `applied` is the last sequence applied. The records
    come pushed by an ordered consumer; those already here are handed to the store's writer
    together, which commits them as one group."""

    def __init__(self, store, log: Log, on_applied=None, batch_max: int = 256):
        """`on_applied(seconds)`: after each record, how long after the log took it."""
        self.store, self.log, self.batch_max = store, log, batch_max
        self.on_applied = on_applied
        with store.read() as txn:
            self.applied = store.book(txn).log_sequence()
        self.error: BaseException | None = None
        self.failures = 0  # in a row, of one record: health NOT_SERVING from
        # config.periodic_failures_max on (`replication_stalled`: it falls behind for good)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yikatong-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        subscription = None
        failing = Repeated("the follower's subscription failed")
        try:
            while not self._stop.is_set():
                try:
                    if subscription is None:
                        subscription = self.log.subscribe(self.applied + 1)
                    batch = self.log.take(subscription, self.batch_max, 0.2)
                    applied = not batch or self._apply(batch)  # a record it cannot apply:
                    failing.ok()  # logged by _apply, its own failure
                    if applied:
                        continue
                except LogUnavailable:
                    pass
                except Exception as error:  # noqa: BLE001 - a stream electing its leader, a
                    failing.failed(error)  # closed connection...
                if subscription is not None:  # from the last applied one again
                    self.log.unsubscribe(subscription)
                    subscription = None
                self._stop.wait(0.5)
        finally:
            if subscription is not None:
                self.log.unsubscribe(subscription)

    def _apply(self, batch: list[tuple[int, bytes, float, int | None]]) -> bool:
        futures = []
        for seq, record, _, term in batch:
            try:
                futures.append(self.store.submit(ApplyRecord(record, term)))
            except Exception as error:  # noqa: BLE001 - the writer busy or down: again later
                log.error("the follower cannot hand record %d to the writer: %s", seq, error)
                break
        for (seq, _, taken, _), future in zip(batch, futures, strict=False):
            try:
                future.result()
            except Exception as error:  # noqa: BLE001 - kept, logged, tried again
                if self.error is None or repr(error) != repr(self.error):
                    log.error("the follower cannot apply record %d (%s); trying again every "
                              "second", seq, str(error) or type(error).__name__,
                              exc_info=error)
                if isinstance(error, ReplicationGap):
                    # records this store needs are gone from the log (purged below a snapshot
                    # while this node was away): what it serves grows stale, never current
                    # again without a rebuild; health says so (move the data dir aside)
                    self.store.note("replication_gap", True)
                self.failures += 1  # a record it cannot apply (an archive dir it cannot
                if self.failures >= config.periodic_failures_max:  # write, a release
                    self.store.note("replication_stalled", True)  # before the writer's)
                self.error = error
                return False
            if self.failures:
                self.failures = 0
                self.store.note("replication_stalled", False)
            self.error = None
            self.applied = max(self.applied, seq)
            if self.on_applied is not None:
                self.on_applied(time.time() - taken)
        return len(futures) == len(batch)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


LEASE_BUCKET = "YIKATONG_LEASE"
LEASE_KEY = "writer"
NODES_BUCKET = "YIKATONG_NODES"  # each node's report, every tick: `yikatong cluster status`


async def _reports(js, kv) -> dict[str, dict]:
    """Each node's last report in the nodes bucket (`kv`), read without a consumer: the keys
    from the bucket stream's subjects, each value by a get. (nats-py's `keys()` leaves an
    ordered consumer behind on the server for five minutes: every node asking every lease
    tick ran a NATS cluster out of consumers in four minutes.)"""
    prefix = f"$KV.{NODES_BUCKET}."
    info = await js.stream_info(f"KV_{NODES_BUCKET}", subjects_filter=prefix + ">")
    out = {}
    for subject in info.state.subjects or {}:
        try:
            entry = await kv.get(subject[len(prefix):])
        except nats.js.errors.KeyNotFoundError:  # deleted (`nats kv del`), or purged
            continue
        out[subject[len(prefix):]] = json.loads(entry.value or b"{}")
    return out


async def _bucket(log: Log, name: str, ttl: float | None, replicas: int, wait: float):
    """The key-value bucket `name`, made if it does not exist yet (a new cluster elects
    its meta leader first: retried for `wait` seconds)."""
    deadline = log._loop.time() + wait
    while True:
        try:
            return await log._js.create_key_value(bucket=name, ttl=ttl, history=1,
                                                  replicas=replicas)
        except (*_UNREACHABLE, nats.js.errors.APIError) as error:
            if isinstance(error, nats.js.errors.APIError) and not forming(error):
                raise
            if log._loop.time() > deadline:
                raise LogUnavailable(f"the key-value bucket {name} cannot be made or "
                                     "found") from None
            await asyncio.sleep(0.1)


class Lease:
    """The write lease: one key in a JetStream key-value bucket whose entries live `ttl`
    seconds unless renewed. Taken with create (only if no one holds it), renewed with a
    compare-and-set on the revision this node last wrote: a node whose lease lapsed and was
    taken by another cannot renew it."""

    def __init__(self, log: Log, node_id: str, address: str, ttl: float, replicas: int = 3):
        self.log, self.ttl = log, ttl
        self.value = f"{node_id} {address}".encode()
        self.revision = 0
        self.kv = log._run(_bucket(log, LEASE_BUCKET, ttl, replicas, ttl * 10), ttl * 10)

    def holder(self) -> tuple[str, str] | None:
        """(node id, address) of the writer, None when no one holds the lease."""
        try:
            entry = self.log._run(self.kv.get(LEASE_KEY))
        except nats.js.errors.KeyNotFoundError:
            return None
        except (*_UNREACHABLE, concurrent.futures.TimeoutError):
            raise LogUnavailable("the lease bucket did not answer") from None
        node, _, address = (entry.value or b"").decode().partition(" ")
        return (node, address) if node else None

    def take(self) -> bool:
        try:
            self.revision = self.log._run(self.kv.create(LEASE_KEY, self.value))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False  # held (or lapsing right now: nats-py reads it back to tell)
        except (nats.js.errors.APIError, *_UNREACHABLE, concurrent.futures.TimeoutError):
            return False  # unknown: taken or not, the log fences this node's appends
        return True

    def take_back(self) -> bool:
        """The lease this node's id and address hold still, taken back by a new process of
        the same node (the log keeper started again after its predecessor ended: that one
        can renew it no more), without waiting for it to lapse. False if it is not ours."""
        try:
            entry = self.log._run(self.kv.get(LEASE_KEY))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.APIError, *_UNREACHABLE,
                concurrent.futures.TimeoutError):
            return False
        return entry.value == self.value and self._update(entry.revision)

    def renew(self) -> bool:
        """False when the lease is not (known to be) renewed: the node stops writing."""
        return self._update(self.revision)

    def release(self) -> None:
        """Given up at a clean stop, if still ours: the next node takes it at its next tick
        instead of waiting for it to lapse."""
        try:
            self.log._run(self.kv.delete(LEASE_KEY, last=self.revision))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError,
                *_UNREACHABLE, concurrent.futures.TimeoutError):
            pass  # not ours any more, or the log away: it lapses

    def _update(self, last: int) -> bool:
        """Written again if its revision is still `last` (compare-and-set)."""
        try:
            self.revision = self.log._run(self.kv.update(LEASE_KEY, self.value, last=last))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError,
                nats.js.errors.APIError, *_UNREACHABLE, concurrent.futures.TimeoutError):
            return False
        return True


class Node:
    """One node of a replicated store: `store`, the log at `urls`, the lease. A follower
    applies the log; when the lease lapses and it has applied the whole log, it takes the
    lease and becomes the writer. The writer appends each commit group to the log before it
    commits (a write on a follower is refused, naming the writer) and renews the lease every
    ttl/4; a writer that cannot renew goes back to following. A writer fenced by the log
    (another appended since) catches up from the log before it writes again.

    A follower's own audit events (a read of personal information, refused calls) cannot be
    written where it is: they go to the audit intake, a stream of their own, before the
    caller is answered, and the writer takes them into the trail (`_intake`), each intake
    record once: its sequence is kept in the same transaction as the events."""

    remote = False  # the node itself (storage.keeper.Link: a worker's view of it)

    def __init__(self, store, urls: list[str], node_id: str, address: str, ttl: float = 2.0,
                 snapshots=None, work: str = "", take_back: bool = False,
                 retain_days: float | None = None):
        """`snapshots`: a storage.snapshots.Policy (None: this node takes none), staged in
        `work` (a directory on the data dir's file system). `take_back`: a lease held under
        this node's id and address is taken back at once (`Lease.take_back`), not waited
        out: the log keeper of `--workers` (storage/keeper.py), the one process of the node
        that holds it, started again by its supervisor."""
        from yikatong.storage import snapshots as snapshot_module

        self.store, self.node_id, self.address, self.ttl = store, node_id, address, ttl
        self.take_back = take_back
        self.retain_days = retain_days  # in its reports (`cluster status`): alike on each node
        self._applied_before = -1  # the store's sequence at the last tick, as the writer
        self.log = Log(urls)
        try:
            self._join(store, node_id, address, ttl, snapshots, work, snapshot_module)
        except BaseException:
            self.log.close()
            raise
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="yikatong-node", daemon=True)
        self._thread.start()
        self._intake_thread = threading.Thread(target=self._intake, name="yikatong-intake",
                                               daemon=True)
        self._intake_thread.start()

    def _join(self, store, node_id, address, ttl, snapshots, work, snapshot_module) -> None:
        """Everything a node reads and makes in the cluster before it serves, each step
        retried while a cluster started with it comes up (`starting`)."""
        first = starting("the replicated log", lambda: self.log.first_sequence())
        if store.applied_sequence + 1 < first:
            raise ReplicationGap(
                f"this node's store ends at log sequence {store.applied_sequence} and the log "
                f"keeps records from {first} on (older ones are in snapshots): move the data "
                "dir aside and start the node again to rebuild it from the newest snapshot")
        self.lease = starting("the lease bucket", lambda: Lease(self.log, node_id, address, ttl))
        self.leading = False
        # as of the last tick
        self.writer: tuple[str, str] | None = starting("the lease bucket", self.lease.holder)
        self._asked = 0.0  # when a refused write last looked the writer up
        self.log_end = starting("the replicated log", self.log.last_sequence)  # as of the last tick
        self.on_lag = None  # metrics: called with each applied record's lag, in seconds
        self.reports = starting("the nodes bucket", lambda: self.log._run(
            _bucket(self.log, NODES_BUCKET, None, 3, ttl * 10), ttl * 10))
        other = starting("the nodes bucket", lambda: self._reported(node_id))
        if other and other.get("address") != address and time.time() - other.get("at", 0) \
                < ttl * 4:
            raise Fenced(f"node id {node_id} is in use: the node at {other.get('address')} "
                         f"reported under it {time.time() - other.get('at', 0):.1f} s ago")
        self.taker = starting("the snapshot bucket", lambda: snapshot_module.Taker(
            self, snapshots, work)) if snapshots else None
        self.follower: Follower | None = self._follow()
        store.replicate, store.check_writer = self._append, self._check_writer
        store.append = self._append_async
        store.record_bytes_max = self.log._nc.max_payload // 2  # a command's writes past it
        store.divert_audit = self.log.hand_over

    def _intake(self) -> None:
        """On the writer: the followers' audit events into the trail, in order; the intake
        purged of those taken, at most every INTAKE_PURGE_SECONDS."""
        subscription = None
        taken = purged = 0
        purge_at = time.monotonic()
        intake_failing = Repeated(f"node {self.node_id}: the audit intake failed; trying again")
        while not self._stop.is_set():
            try:
                if not self.leading:
                    if subscription is not None:
                        self.log.unsubscribe(subscription)
                        subscription = None
                    self._stop.wait(0.1)
                    continue
                if subscription is None:
                    with self.store.read() as txn:
                        start = self.store.book(txn).intake_sequence() + 1
                    subscription = self.log.subscribe(start, INTAKE_SUBJECT)
                batch = self.log.take(subscription, 64, 0.2)
                if batch:
                    self.store.write(lambda book, b=batch: [
                        book.take_intake(seq, Log.intake_events(data)) for seq, data, *_ in b])
                    taken = batch[-1][0]
                if taken > purged and time.monotonic() >= purge_at:
                    # in the trail now, on the log's quorum: the intake need not keep them
                    # (a writer taking over resumes from its own store's intake sequence)
                    self.log.purge(taken, INTAKE_STREAM)
                    purged, purge_at = taken, time.monotonic() + INTAKE_PURGE_SECONDS
                intake_failing.ok()
            except Exception as error:  # noqa: BLE001 - from the last one taken, again
                if not isinstance(error, (LogUnavailable, Fenced)):
                    intake_failing.failed(error)
                if subscription is not None:
                    self.log.unsubscribe(subscription)
                    subscription = None
                self._stop.wait(0.5)
        if subscription is not None:
            self.log.unsubscribe(subscription)

    def _reported(self, node_id: str) -> dict | None:
        try:
            entry = self.log._run(self.reports.get(node_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value or b"{}")

    def reports_up(self) -> list[dict]:
        """The last report of each node that reported within four lease ticks, with its
        `node` id."""
        now = time.time()
        return [{**r, "node": node} for node, r in
                self.log._run(_reports(self.log._js, self.reports)).items()
                if now - r.get("at", 0) < self.ttl * 4]

    def _snapshot_is_mine(self) -> bool:
        """A follower that is up takes the snapshots (the first by node id); the writer
        only when it is alone."""
        followers = sorted(r["node"] for r in self.reports_up() if not r.get("leading"))
        return followers[0] == self.node_id if followers else self.leading

    def _follow(self) -> Follower:
        return Follower(self.store, self.log, on_applied=self._lagged)

    def _lagged(self, seconds: float) -> None:
        if self.on_lag is not None:
            self.on_lag(seconds)

    def _report(self) -> None:
        """Where this node stands, for `yikatong cluster status`, and the log's end, for
        the lag metrics."""
        self.log_end = self.log.last_sequence()
        self.log._run(self.reports.put(self.node_id, json.dumps({
            "address": self.address, "leading": self.leading,
            "applied": self.store.applied_sequence, "at": time.time(),
            "retain_days": self.retain_days,
            "not_serving": sorted(self.store.not_serving),
            "warnings": ["archive_failing"] if self.store.archive_failing else []}).encode()))

    def _check_writer(self) -> None:
        if not self.leading:
            if self.writer is None and time.monotonic() > self._asked + 0.25:  # none as of
                self._asked = time.monotonic()  # the last tick: ask, at most 4 times a second
                try:
                    self.writer = self.lease.holder()
                except LogUnavailable:
                    pass
            raise not_the_writer(self.writer)

    def refresh(self) -> None:
        """`store.applied_sequence` as of now (here the store's writer keeps it)."""

    def _append(self, record: bytes) -> None:
        self._check_writer()
        self.log.append(record, self.store.record_term)

    def _append_async(self, record: bytes, first: bool) -> concurrent.futures.Future:
        self._check_writer()
        return self.log.append_async(record, self.store.record_term, first)

    def _catch_up(self, until: int | None = None) -> None:
        """Apply what the log holds beyond this store (after a fenced append, or before
        taking the lease), up to record `until` (None: its end)."""
        while (until is None or self.store.applied_sequence < until) and (
                found := self.log.read(self.store.applied_sequence + 1)) is not None:
            self.store.write(ApplyRecord(found[0], found[2]))

    def _watch(self) -> None:
        step_failing = Repeated(f"node {self.node_id}: a step of the lease failed")
        first = True  # at once after joining (a keeper started again takes the lease back)
        while first or not self._stop.wait(self.ttl / 4):
            first = False
            if self._paused.is_set():
                continue
            try:
                self._step()
                self._report()
                if self.taker is not None:
                    self.taker.tick(self._snapshot_is_mine())
                step_failing.ok()
            except LogUnavailable:
                pass
            except Exception as error:  # noqa: BLE001 - the node goes on; the next tick tries
                step_failing.failed(error)  # again
            if not self.leading and (self.follower is None or not self.follower.alive()):
                self.follower = self._follow()  # whatever failed on the way

    def _step(self) -> None:
        self.store.refresh_sequence()  # the node's workers commit in processes of their own
        if self.leading:
            if not self.lease.renew():
                self.leading, self.writer = False, None  # who holds it: asked next tick
                log.info("node %s: the write lease is lost; following", self.node_id)
            elif self.store.applied_sequence < (end := self.log.last_sequence()) and (
                    not self.take_back or self.store.applied_sequence == self._applied_before):
                # fenced: another appended while this one stalled; or (a log keeper, whose
                # workers' records are in the log before their commit) a record whose worker
                # died before committing it: this store has not moved since the last tick
                self._catch_up(end)
            self._applied_before = self.store.applied_sequence
            return
        self.writer = self.lease.holder()
        mine = self.take_back and self.writer == (self.node_id, self.address)
        if self.writer is None or mine:
            if self.follower is not None:
                self.follower.stop()
                self.follower = None
            self._catch_up()
            self.log.ends_at(self.store.applied_sequence)
            if self.lease.take_back() if mine else self.lease.take():
                with self.store.read() as txn:  # newer than any term in the log: the lease's
                    known = self.store.book(txn).term()  # revision grows, but a bucket
                self.store.term = known + self.lease.revision  # made again starts over
                self.leading = True
            if self.leading:
                self.writer = (self.node_id, self.address)
                log.info("node %s: holds the write lease from log sequence %d; writing",
                         self.node_id, self.store.applied_sequence)

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) renewing and watching the lease: a stalled process, in tests."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def stop(self, release: bool = True) -> None:
        """`release`: a writer gives the lease up (a clean stop: another node writes at its
        next tick); False: kept, for a successor of this node to take back (a log keeper's
        rolling restart)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._intake_thread.join(timeout=10)
        if self.leading and release:
            self.leading = False
            self.lease.release()
            log.info("node %s: gave the write lease up at its stop", self.node_id)
        if self.taker is not None:
            self.taker.stop()
        if self.follower is not None:
            self.follower.stop()
        self.log.close()


def cluster_status(urls: list[str], stale_seconds: float = 10.0) -> dict:
    """`yikatong cluster status`: the log's last sequence, the writer (the lease), and each
    node's last report: its address, role, applied sequence, lag in records, why it is not
    serving, its warnings (`archive_failing`: it serves, its hot store grows), and how long
    ago it reported (`down` once that is longer than `stale_seconds`)."""
    try:
        # a status read: JetStream answers in milliseconds, an operator waits for seconds
        log = Log(urls, timeout=config.cluster_status_seconds / 4, create=False)
    except nats.js.errors.NotFoundError:
        raise LogUnavailable("no replicated store on this NATS cluster (no stream "
                             f"{STREAM}): no node has started on it") from None
    try:
        async def read() -> tuple[int, dict, bytes | None]:
            end = (await log._js.stream_info(STREAM)).state.last_seq
            reports: dict = {}
            try:
                reports = await _reports(log._js, await log._js.key_value(NODES_BUCKET))
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                pass
            try:
                lease = await (await log._js.key_value(LEASE_BUCKET)).get(LEASE_KEY)
                writer = lease.value
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
                writer = None
            return end, reports, writer
        try:
            end, reports, writer = log._run(read(), config.cluster_status_seconds)
        except (*_UNREACHABLE, concurrent.futures.TimeoutError):
            raise log.no_quorum(config.cluster_status_seconds) or LogUnavailable(
                "the NATS cluster stopped answering") from None
    finally:
        log.close()
    now = time.time()
    node, _, address = (writer or b"").decode().partition(" ")
    return {"log_sequence": end,
            "writer": {"node": node, "address": address} if node else None,
            "nodes": [{"node": name, "address": r.get("address", ""),
                       # the lease's holder, not a report's word: a writer killed meanwhile
                       # reported `leading` last
                       "role": "writer" if node and name == node else "follower",
                       "applied": r.get("applied", 0),
                       "retain_days": r.get("retain_days"),
                       "not_serving": r.get("not_serving", []),
                       "warnings": r.get("warnings", []),
                       "lag": max(0, end - r.get("applied", 0)),
                       "reported_seconds_ago": round(now - r.get("at", 0), 1),
                       "down": now - r.get("at", 0) > stale_seconds}
                      for name, r in sorted(reports.items())]}

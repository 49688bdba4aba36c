"""A replicated node with `--workers N` (issue 27 item 1): one log keeper, N workers.

The keeper is one process of the node (a companion of the workers' supervisor, started again
when it ends: server/keeper.py). It holds what must be one per node: the NATS connection,
the write lease, the follower, the audit intake and the snapshots (storage.replication.Node,
as a one-process node runs it). The workers serve gRPC from the node's LMDB store, as the
workers of a single node do, and write into it themselves, under LMDB's write lock, which
serialises write transactions across processes. A worker's transaction reads the log
sequence inside it, as every writer does, and hands each record to the keeper (`Link`, on a
Unix socket in the data dir) instead of to the log; the keeper appends it (the expected last
sequence and the writer's term, exactly as a one-process node does) and answers with the
log's acknowledgement or refusal. The worker commits only once every record of its
transaction is acknowledged (storage/lmdb_store.py `_pipeline`), and only then releases the
lock: so the records of all workers reach the log in the order of their commits, one
transaction after another, and no two interleave.

The keeper tells every worker where the node stands (`State`: leading, term, the writer, the
applied sequence, the log's end, health), when it changes and every second; a worker takes
writes only while the keeper says the node leads, and refuses them as a follower does,
naming the writer. A keeper that goes away fails every record in flight (LogUnavailable:
nothing committed, the callers retry by request id) and health says NOT_SERVING
(`log_keeper_down`) until its successor answers; the successor takes the lease back at once
(`Node(take_back=True)`), after applying what the log holds beyond the store.

Frames, both ways: a head (payload length, kind, id) and the payload. A worker sends CHAINED
(term u64, 1 if the record is its transaction's first, the record: the keeper's log admits it
as `Log.admitted` says, the worker's connection its transaction's chain) and HAND_OVER (a
follower's audit events, `Log.intake_data`); the keeper answers each by its id with ANSWER
(a status byte + a message), and sends STATE (JSON) unasked. A keeper says `chains` in its
state; to one that does not (the release before, in a rolling restart, which renews the
workers first) a worker sends APPEND (term u64 + the record) as that release did, and a
keeper takes a worker's APPEND as a transaction's first record (safe: a later one is refused
while the one before it is unanswered).
"""
import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import threading

from yikatong import config
from yikatong.errors import Fenced, LogUnavailable
from yikatong.storage import replication

log = logging.getLogger("yikatong.keeper")
SOCKET_NAME = "keeper.sock"  # in the data dir (0700): the server's user alone reaches it
HEAD = struct.Struct("<IBI")  # payload length, kind, id
_TERM = struct.Struct("<Q")  # APPEND: the record's term
_CHAINED = struct.Struct("<QB")  # CHAINED: the record's term; 1: its transaction's first
_PEER = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
APPEND, HAND_OVER, ANSWER, STATE, CHAINED = b"AHRSC"
OK, FENCED, UNAVAILABLE = range(3)
FRAME_MAX = 64 << 20  # a record is cut under the log's max_payload (at most 64 MiB in NATS)
STATE_SECONDS = 1.0  # the keeper's state reaches every worker at least this often
SILENT_SECONDS = 5.0  # a keeper silent this long is taken as gone (hung)
# the keeper's health reasons every worker says too (a follower's workers write nothing, so
# never look at the map or the disk themselves)
_FORWARDED = ("replication_gap", "replication_stalled", "map_full", "disk_full")
VERSION = 1  # of the frames: a worker and a keeper of different versions do not talk


def socket_path(data_dir: str) -> str:
    """The keeper's socket, as a path short enough for AF_UNIX (108 bytes): through
    /proc/self/fd when the data dir's own path is longer (its descriptor kept open)."""
    path = os.path.join(os.path.abspath(data_dir), SOCKET_NAME)
    if len(path.encode()) < 100:
        return path
    fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY)  # for the process's life
    return f"/proc/self/fd/{fd}/{SOCKET_NAME}"


def _frame(kind: int, ident: int, payload: bytes) -> bytes:
    return HEAD.pack(len(payload), kind, ident) + payload


# --------------------------------------------------------------------- in the keeper

class Server:
    """The keeper's side: `node`'s log, lease and state, served to the workers on `path`,
    on the log's own event loop (records are appended there in the order they arrive)."""

    def __init__(self, node: replication.Node, path: str):
        self.node, self.path = node, path
        self._loop = node.log._loop
        self._peers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._sent = b""
        self._server = node.log._run(self._start())

    async def _start(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a predecessor's, killed
        server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)  # in the owner-only data dir already
        self._tick = self._loop.call_later(0.05, self._push)
        return server

    def state(self) -> bytes:
        node, store = self.node, self.node.store
        writer = node.writer  # this node, not leading (yet): its predecessor's lease
        resuming = not node.leading and writer == (node.node_id, node.address)
        return json.dumps({
            "version": VERSION, "chains": True, "leading": node.leading, "term": store.term,
            "writer": None if resuming else writer, "resuming": resuming,
            "applied": store.applied_sequence, "log_end": node.log_end,
            "record_bytes_max": store.record_bytes_max,
            "not_serving": sorted(set(store.not_serving) & set(_FORWARDED))}).encode()

    def _push(self, every: int = int(STATE_SECONDS / 0.05)) -> None:
        """Every 50 ms: the state to every worker if it changed, and at least every second."""
        try:
            self._count = (getattr(self, "_count", 0) + 1) % every
            state = self.state()
            if state != self._sent or self._count == 0:
                self._sent = state
                frame = _frame(STATE, 0, state)
                for peer in list(self._peers):
                    peer.write(frame)
        except Exception:  # noqa: BLE001 - logged; the workers hear again at the next
            log.exception("the log keeper could not tell its workers its state")
        finally:
            self._tick = self._loop.call_later(0.05, self._push)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        _, uid, _ = _PEER.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEER.size))
        if uid != os.getuid():  # the socket is owner-only in an owner-only dir: never seen
            log.error("the log keeper refused a connection from uid %d", uid)
            writer.close()
            return
        try:
            self._peers.add(writer)
            writer.write(_frame(STATE, 0, self.state()))
            while True:
                size, kind, ident = HEAD.unpack(await reader.readexactly(HEAD.size))
                if size > FRAME_MAX or kind not in (APPEND, CHAINED, HAND_OVER):
                    log.error("the log keeper dropped a worker's connection: a frame of kind "
                              "%d and %d bytes", kind, size)
                    return
                payload = await reader.readexactly(size)
                # a task each, made in the order they came: they reach the log in that order
                work = self._hand_over(payload) if kind == HAND_OVER else \
                    self._append(payload, writer, kind == CHAINED)
                task = asyncio.ensure_future(self._answer(writer, ident, work))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._peers.discard(writer)
            writer.close()

    async def _hand_over(self, payload: bytes) -> None:
        """A follower's audit events, into the intake once they are known to be events
        (a record the writer could not take would stop its intake for good)."""
        try:
            replication.Log.intake_events(payload)
        except (ValueError, TypeError) as error:
            raise LogUnavailable(f"the audit events handed over are not events ({error}); "
                                 "nothing was answered") from None
        await self.node.log.hand_over_data(payload)

    async def _append(self, payload: bytes, peer: asyncio.StreamWriter, chained: bool
                      ) -> None:
        """A worker's record, appended as the node's own are (`Log.admitted`): the chain
        of a transaction is the worker's connection."""
        if chained:
            term, first = _CHAINED.unpack_from(payload)
            record = payload[_CHAINED.size:]
        else:  # a worker of the release before: each record taken as a first
            (term,), first, record = _TERM.unpack_from(payload), 1, payload[_TERM.size:]
        refusal = replication.not_the_writer(self.node.writer) if not self.node.leading \
            else Fenced(f"the record is of term {term}, this node writes in term "  # stamped
                        f"{self.node.store.term} now; nothing was committed") \
            if term != self.node.store.term else None  # before the lease changed hands here
        if refusal is not None:
            self.node.log.break_chain(peer)  # nothing later of its transaction follows
            raise refusal
        await self.node.log.admitted(record, term, first == 1, peer)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, ident: int, work) -> None:
        try:
            await work
            status, text = OK, b""
        except Fenced as error:
            status, text = FENCED, json.dumps([str(error), error.writer]).encode()
        except Exception as error:  # noqa: BLE001 - LogUnavailable, or what the log raised
            status, text = UNAVAILABLE, str(error).encode()
        if not writer.is_closing():
            writer.write(_frame(ANSWER, ident, bytes((status,)) + text))

    def close(self) -> None:
        async def close():
            self._tick.cancel()
            self._server.close()
            for peer in list(self._peers):
                peer.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with contextlib.suppress(Exception):
            self.node.log._run(close())


# --------------------------------------------------------------------- in a worker

class Link:
    """A worker's view of its node (in place of storage.replication.Node): what the keeper
    last said (`leading`, `writer`, `log_end`), and the store's hooks (`check_writer`,
    `append`, `replicate`, `divert_audit`) going to the keeper. Waits up to `wait` seconds
    for the keeper's first word (LogUnavailable if none came)."""

    remote = True
    taker = None  # snapshots are the keeper's (it keeps their metrics too)

    def __init__(self, store, path: str, wait: float):
        self.store, self.path = store, path
        self.leading = self.resuming = False
        self._chains = False  # the keeper takes CHAINED frames (not the release before)
        self.writer: tuple[str, str] | None = None
        self.log_end = 0
        self.on_lag = None  # the keeper observes the lag (its metrics)
        self._sock: socket.socket | None = None
        self._send = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._heard = threading.Event()
        self._stop = threading.Event()
        store.check_writer, store.append = self.check_writer, self.append_async
        store.replicate, store.divert_audit = self.append, self.hand_over
        self._thread = threading.Thread(target=self._run, name="yikatong-keeper-link",
                                        daemon=True)
        self._thread.start()
        if not self._heard.wait(wait):
            self.stop()
            raise LogUnavailable(f"the node's log keeper did not answer on {path} within "
                                 f"{wait:g} s (its reason is above)")

    def check_writer(self) -> None:
        if self._sock is None:  # no keeper: whether this node leads is not known, and no
            raise Fenced("this node's log keeper is not answering (it is started again); "
                         "nothing was written, retry shortly", "")  # writer is named
        if not self.leading:
            if self.resuming:
                raise Fenced("this node's log keeper was started again and is taking the "
                             "node's write lease back; retry shortly", "")
            raise replication.not_the_writer(self.writer)

    def refresh(self) -> None:
        """`store.applied_sequence` as of now: another worker, or the keeper applying the
        log, may have committed since this one last did."""
        self.store.refresh_sequence()

    def append_async(self, record: bytes, first: bool) -> concurrent.futures.Future:
        self.check_writer()
        if self._chains:
            return self._ask(CHAINED, _CHAINED.pack(self.store.record_term, first) + record)
        return self._ask(APPEND, _TERM.pack(self.store.record_term) + record)

    def append(self, record: bytes) -> None:
        self._wait(self.append_async(record, True))

    def hand_over(self, events) -> None:
        self._wait(self._ask(HAND_OVER, replication.Log.intake_data(events)))

    @staticmethod
    def _wait(future: concurrent.futures.Future) -> None:
        try:
            future.result(config.log_ack_wait_seconds)
        except concurrent.futures.TimeoutError:
            raise LogUnavailable(f"the node's log keeper did not answer in "
                                 f"{config.log_ack_wait_seconds:g} s; nothing was committed") \
                from None

    def _ask(self, kind: int, payload: bytes) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        ident = next(self._ids) & 0xFFFFFFFF
        with self._send:
            if self._sock is None:
                raise LogUnavailable("the node's log keeper is not answering (it is started "
                                     "again); nothing was committed")
            self._pending[ident] = future
            try:
                self._sock.sendall(_frame(kind, ident, payload))
            except OSError:  # gone, or not reading for SILENT_SECONDS: a frame may be cut,
                self._pending.pop(ident, None)  # so the connection is given up (reader)
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                raise LogUnavailable("the node's log keeper went away; nothing was "
                                     "committed") from None
        return future

    def _run(self) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(SILENT_SECONDS)  # a stopped keeper's full backlog: no hang here
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                self._stop.wait(0.05)
                continue
            with self._send:
                self._sock = sock
            try:
                self._read(sock)
            except Exception as error:  # noqa: BLE001 - gone, hung, or not speaking our frames
                if not self._stop.is_set():
                    log.warning("the node's log keeper went away (%s); writes wait for its "
                                "successor", error or type(error).__name__,
                                extra={"fields": {"pid": os.getpid()}})
            finally:
                self._lost(sock)
            self._stop.wait(0.2)  # not in a spin: a keeper that answers and then drops

    def _read(self, sock: socket.socket) -> None:
        buffer = bytearray()
        while not self._stop.is_set():
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            buffer += data
            while len(buffer) >= HEAD.size:
                size, kind, ident = HEAD.unpack_from(buffer)
                if size > FRAME_MAX:
                    raise ValueError(f"a frame of {size} bytes from the keeper")
                if len(buffer) < HEAD.size + size:
                    break
                payload = bytes(buffer[HEAD.size:HEAD.size + size])
                del buffer[:HEAD.size + size]
                if kind == STATE:
                    self._take(json.loads(payload))
                elif kind == ANSWER:
                    self._answered(ident, payload)
                else:
                    raise ValueError(f"a frame of kind {kind} from the keeper")

    def _take(self, state: dict) -> None:
        if state.get("version") != VERSION:
            raise ValueError(f"the keeper speaks frames of version {state.get('version')}, "
                             f"this worker {VERSION}: restart the server")
        store = self.store
        self._chains = bool(state.get("chains"))
        store.term = state["term"]
        store.record_bytes_max = state["record_bytes_max"]
        if state["applied"] > store.applied_sequence:
            store.applied_sequence = state["applied"]
        self.writer = tuple(state["writer"]) if state["writer"] else None
        self.log_end = state["log_end"]
        self.resuming = state["resuming"]
        self.leading = state["leading"]
        for reason in _FORWARDED:
            store.note(reason, reason in state["not_serving"])
        store.note("log_keeper_down", False)
        self._heard.set()

    def _answered(self, ident: int, payload: bytes) -> None:
        status, text = payload[0], payload[1:]  # read whole before the future is taken
        outcome = (None if status == OK else Fenced(*json.loads(text)) if status == FENCED
                   else LogUnavailable(text.decode(errors="replace")))
        future = self._pending.pop(ident, None)
        if future is None:
            return
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)

    def _lost(self, sock: socket.socket) -> None:
        """Every record in flight refused (its transaction aborts: nothing committed), no
        write taken and health NOT_SERVING until the keeper answers again."""
        with self._send:
            self._sock = None
            pending, self._pending = self._pending, {}
        sock.close()
        self.leading, self.writer = False, None
        if not self._stop.is_set():
            self.store.note("log_keeper_down", True)
        for future in pending.values():
            if not future.done():
                future.set_exception(LogUnavailable(
                    "the node's log keeper went away before the log answered; nothing was "
                    "committed (a retry with the same request id is decided once)"))

    def stop(self) -> None:
        self._stop.set()
        with self._send:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)

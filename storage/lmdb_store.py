"""The LMDB store: one environment per process, one writer thread, group commit.

Sync mode: `sync=True, metasync=True, writemap=False` (LMDB's default, stated here on
purpose). A commit returns only after the data and meta pages are fsync'ed, so everything a
caller was told is done survives a crash or power cut, and the environment reopens at the
last committed transaction; an uncommitted group is simply absent. The cost of that fsync is
paid once per *group*: the writer thread folds every command waiting in its queue (up to
`config.writer_group_max`) into one write transaction, each command in a nested transaction of
its own so a refused command rolls back alone. Callers are answered after the commit.

Readers (authorization, status) use their own read-only transactions and never wait for the
writer (LMDB MVCC).
"""
import concurrent.futures
import fcntl
import os
import queue
import struct
import threading
import time

import lmdb

from storage.records import CHANGE, CardRecord
from yikatong import config
from yikatong.errors import IdReused, StoreFull, StoreUnavailable

_U64 = struct.Struct(">Q")  # big-endian so LMDB's key order is numeric order
_STOP = object()


class Store:
    def __init__(self, data_dir: str, *, map_size: int = config.lmdb_map_size,
                 idle_command=None, check_command=None, group_max: int = config.writer_group_max):
        """`idle_command(book)` runs in its own group when the writer has been idle for
        `config.writer_idle_seconds` (the hold sweep); `check_command(book)` runs at the end of
        every group before it commits (invariants, in tests and debug runs)."""
        self.data_dir = data_dir
        self._group_max = group_max  # 1 = one fsync per command (the benchmark's baseline)
        self._idle_command = idle_command
        self._check_command = check_command
        try:
            os.makedirs(data_dir, exist_ok=True)
            self._lock_fd = os.open(os.path.join(data_dir, "yikatong.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"cannot use data dir {data_dir}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreUnavailable(f"data dir {data_dir} is locked by another running server") from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        # Opened here, in the process that uses it (after any fork), never inherited.
        try:
            self.env = self._open(data_dir, map_size)
        except lmdb.Error as e:
            os.close(self._lock_fd)
            raise StoreUnavailable(f"cannot open the LMDB store in {data_dir}: {e}") from e
        self.env.reader_check()  # clear reader slots left by dead processes
        self.dbs = Dbs(self.env)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="lmdb-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def _open(data_dir: str, map_size: int):
        return lmdb.open(
            os.path.join(data_dir, "lmdb"),
            map_size=map_size,
            max_dbs=config.lmdb_max_dbs,
            max_readers=config.lmdb_max_readers,
            sync=True,
            metasync=True,
            writemap=False,
            readahead=False,  # random card look-ups; readahead only pollutes the page cache
            lock=True,
        )

    # ---- reads: any thread, never blocked by the writer
    def read(self) -> lmdb.Transaction:
        return self.env.begin(write=False)

    def book(self, txn) -> "Book":
        return Book(txn, self.dbs)

    # ---- writes: only the writer thread
    def submit(self, command) -> concurrent.futures.Future:
        """Run `command(book)` in the writer thread; the future resolves after the commit."""
        future = concurrent.futures.Future()
        self._queue.put((command, future))
        return future

    def write(self, command):
        """Blocking form of submit(), for tools and tests outside the event loop."""
        return self.submit(command).result()

    def _write_loop(self) -> None:
        idle_due = time.monotonic() + config.writer_idle_seconds
        while True:
            try:
                item = self._queue.get(timeout=config.writer_idle_seconds)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            group = [] if item is None else [item]
            if self._idle_command is not None and time.monotonic() >= idle_due:
                # when idle, and at least this often under load
                group.insert(0, (self._idle_command, concurrent.futures.Future()))
                idle_due = time.monotonic() + config.writer_idle_seconds
            if not group:
                continue
            while len(group) < self._group_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)  # finish this group, then stop
                    break
                group.append(nxt)
            self._commit_group(group)

    def _commit_group(self, group) -> None:
        # A caller that gave up (a cancelled gRPC call) cancelled its future: its command is
        # skipped, nothing done. Every other future is marked running, so it can no longer be
        # cancelled and its answer can always be delivered.
        group = [(c, f) for c, f in group if f.set_running_or_notify_cancel()]
        if not group:
            return
        outcomes = []
        try:
            with self.env.begin(write=True) as txn:
                for command, future in group:
                    child = self.env.begin(write=True, parent=txn)
                    try:
                        result = command(Book(child, self.dbs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        child.abort()
                        outcomes.append((future, None, self._full(e)))
                    else:
                        child.commit()
                        outcomes.append((future, result, None))
                if self._check_command is not None:
                    self._check_command(Book(txn, self.dbs))
        except BaseException as e:  # noqa: BLE001 - the whole group failed to commit
            for _, future in group:
                future.set_exception(self._full(e))
            return
        for future, result, error in outcomes:  # durable now: answer the callers
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _full(self, error: BaseException) -> BaseException:
        if isinstance(error, lmdb.MapFullError):
            size = self.env.info()["map_size"] // 2**20
            return StoreFull(f"the store is full (LMDB map_size {size} MiB reached); nothing was "
                             f"written. Restart the server with a larger --map-size-mib "
                             f"(e.g. {size * 2}); reads keep working meanwhile")
        return error

    def close(self) -> None:
        self._queue.put(_STOP)
        self._writer.join()
        self.env.close()
        os.close(self._lock_fd)


class Dbs:
    def __init__(self, env):
        self.cards = env.open_db(b"cards")  # card number (ASCII) -> CardRecord
        self.holders = env.open_db(b"holders")  # ssn (ASCII) -> u64 holder_id + Holder proto
        self.holder_cards = env.open_db(b"holder_cards")  # u64 holder_id + u8 pack -> card
        self.requests = env.open_db(b"requests")  # request id -> 32-byte fingerprint + answer
        self.notes = env.open_db(b"notes")  # card number -> UTF-8 reason (reject, cancel)
        self.meta = env.open_db(b"meta")  # name -> u64 counter
        self.accounts = env.open_db(b"accounts")  # account key -> Account
        self.transfers = env.open_db(b"transfers")  # transfer id -> Transfer
        # open holds, two ways: for the sweep, and per debited account for the lazy check
        self.holds_by_timeout = env.open_db(b"holds_by_timeout")  # u64 timeout + id -> b""
        self.holds_by_account = env.open_db(b"holds_by_account")  # key40 + u64 timeout + id -> i64
        self.changes = env.open_db(b"changes")  # u64 sequence -> change record (records.CHANGE)
        # The change sequence lives in the writer's memory: only the writer appends. A command
        # that rolls back leaves a gap, which readers of the log simply skip.
        with env.begin() as txn, txn.cursor(db=self.changes) as cur:
            self.change_seq = _U64.unpack(cur.key())[0] if cur.last() else 0


class Book:
    """Typed access to the databases inside one transaction."""

    __slots__ = ("txn", "dbs")

    def __init__(self, txn, dbs: Dbs):
        self.txn = txn
        self.dbs = dbs

    # cards
    def card_bytes(self, card_number: str) -> bytes | None:
        return self.txn.get(card_number.encode("ascii"), db=self.dbs.cards)

    def card(self, card_number: str) -> CardRecord | None:
        value = self.card_bytes(card_number)
        return None if value is None else CardRecord.decode(card_number, value)

    def put_card(self, rec: CardRecord) -> None:
        self.txn.put(rec.card_number.encode("ascii"), rec.encode(), db=self.dbs.cards)
        self.append_change(rec.card_number, rec.state)

    def append_change(self, card_number: str, state: int, transfer_id: str = "",
                      amount: int = 0) -> int:
        """Every change of a card or an account, in one global sequence (SPEC.md section 1)."""
        self.dbs.change_seq = seq = self.dbs.change_seq + 1
        self.txn.put(_U64.pack(seq), CHANGE.pack(card_number.encode("ascii"), state,
                                                 transfer_id.encode("utf-8"), amount),
                     db=self.dbs.changes, append=True)
        return seq

    def note(self, card_number: str) -> str:
        value = self.txn.get(card_number.encode("ascii"), db=self.dbs.notes)
        return "" if value is None else bytes(value).decode("utf-8")

    def put_note(self, card_number: str, text: str) -> None:
        self.txn.put(card_number.encode("ascii"), text.encode("utf-8"), db=self.dbs.notes)

    # holders
    def holder(self, ssn: str) -> tuple[int, bytes] | None:
        value = self.txn.get(ssn.encode("ascii"), db=self.dbs.holders)
        if value is None:
            return None
        return _U64.unpack_from(value)[0], bytes(value[8:])

    def put_holder(self, ssn: str, holder_id: int, pii: bytes) -> None:
        self.txn.put(ssn.encode("ascii"), _U64.pack(holder_id) + pii, db=self.dbs.holders)

    def current_card(self, holder_id: int, pack: int) -> str | None:
        value = self.txn.get(_U64.pack(holder_id) + bytes((pack,)), db=self.dbs.holder_cards)
        return None if value is None else bytes(value).decode("ascii")

    def set_current_card(self, holder_id: int, pack: int, card_number: str) -> None:
        self.txn.put(_U64.pack(holder_id) + bytes((pack,)), card_number.encode("ascii"),
                     db=self.dbs.holder_cards)

    # counters
    def next_seq(self, name: bytes) -> int:
        value = self.txn.get(name, db=self.dbs.meta)
        n = (_U64.unpack(value)[0] if value is not None else 0) + 1
        self.txn.put(name, _U64.pack(n), db=self.dbs.meta)
        return n

    # idempotency: request id -> (fingerprint of the request, the first answer)
    def replay(self, request_id: str, fingerprint: bytes) -> bytes | None:
        """The first answer to `request_id`, None if unseen; IdReused if it asked otherwise."""
        value = self.txn.get(request_id.encode("utf-8"), db=self.dbs.requests)
        if value is None:
            return None
        value = bytes(value)
        if value[:32] != fingerprint:
            raise IdReused(request_id)
        return value[32:]

    def remember(self, request_id: str, fingerprint: bytes, answer: bytes) -> None:
        assert len(fingerprint) == 32
        self.txn.put(request_id.encode("utf-8"), fingerprint + answer, db=self.dbs.requests)

    def once(self, request_id: str, fingerprint: bytes, produce) -> bytes:
        """The first answer to `request_id`, or `produce()`'s, remembered in this transaction."""
        answer = self.replay(request_id, fingerprint)
        if answer is None:
            answer = produce()
            self.remember(request_id, fingerprint, answer)
        return answer

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

The writer cannot fail silently: its queue is bounded (`WriterBusy` beyond
`config.writer_queue_max`); a periodic job that raises is logged and counted, and after
`config.periodic_failures_max` failures in a row the store reports itself unhealthy; if the
writer thread itself dies, every waiting and later write fails with `WriterDown` and the store
reports itself unhealthy (the server turns health NOT_SERVING).

The data dir holds personal information: it is created owner-only (0700, files 0600) whatever
the umask, and an existing one is narrowed to that at open.
"""
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import lmdb

from yikatong import config, fastpath
from yikatong.errors import (
    CorruptRecord,
    Fenced,
    IdReused,
    LogUnavailable,
    ReplicationGap,
    StoreFull,
    StoreUnavailable,
    StoreUnreadable,
    WriterBusy,
    WriterDown,
)
from yikatong.model import ACCOUNT_KEY_BYTES_MAX as _KEY_WIDTH
from yikatong.model import (
    Account,
    AuditEvent,
    Card,
    Change,
    Changed,
    ChangeKind,
    CreditRecord,
    HolderChange,
    HolderInfo,
    Step,
    Transfer,
    bounded,
    mask_text,
)
from yikatong.storage import archive, migrate, pii, records

log = logging.getLogger("yikatong.storage")
_U64 = struct.Struct(">Q")  # big-endian so LMDB's key order is numeric order
_I64 = struct.Struct("<q")
_TOTALS = struct.Struct("<qqqq")
_TOTALS_KEY = b"ledger:totals"
_LOG_SEQ_KEY = b"replication:log_seq"  # the replicated log's last sequence held here
# the last followers' audit record taken into the trail (the writer's, replicated with it)
_INTAKE_SEQ_KEY = b"replication:audit_intake_seq"
_GATE_ACK = b"gate_ack:"  # + client id: (sequence, time) the gate acknowledged
_GATE_ACK_VALUE = struct.Struct("<Qq")
# the newest writer's term among the records applied (storage.replication.TERM)
_TERM_KEY = b"replication:term"
_STOP = object()
_ACKED = object()  # put by a log acknowledgement's callback: wakes the writer (Store._pipeline)


class _Refused(Exception):
    """Aborts a pipelined transaction: a record in it was refused or a group failed."""

DIR_MODE, FILE_MODE = 0o700, 0o600

Command = Callable[["Book"], Any]


# SM3 (GB/T 32905, the national standard) where this OpenSSL has it, else SHA-256; each event
# names the one that made its hash. Each hash is a copy of an empty one (no look-up by name).
AUDIT_HASHES = {}
for _n, _name in records.AUDIT_ALGORITHMS.items():
    try:
        AUDIT_HASHES[_n] = hashlib.new(_name)
    except ValueError:  # pragma: no cover - an OpenSSL without SM3
        pass
AUDIT_ALGORITHM = 1 if 1 in AUDIT_HASHES else 2
del _n, _name


def audit_mismatch(value, key: int, before: int) -> str:
    """What a hash that does not hold says: a version-1 event stored its link (checked
    apart); a version-2 event's hash covers the event before's hash, not stored in it."""
    if value[0] == 1:
        return f"event {key}'s hash does not match its fields"
    return (f"event {key}'s hash does not match its fields and event {before}'s hash (one of "
            "the two was changed)")


def audit_hash(prev_hash: bytes, body: bytes, algorithm: int = 0) -> bytes:
    algorithm = algorithm or AUDIT_ALGORITHM
    empty = AUDIT_HASHES.get(algorithm)
    h = empty.copy() if empty is not None else hashlib.new(records.AUDIT_ALGORITHMS[algorithm])
    h.update(prev_hash)
    h.update(body)
    return h.digest()


def lock_data_dir(data_dir: str) -> int:
    """Take the data dir for this server (an exclusive flock on `yikatong.lock`, which holds
    the pid): a second server on the same data dir is refused. The lock lasts as long as the
    returned descriptor is open in any process (forked workers inherit it)."""
    try:
        os.makedirs(data_dir, mode=DIR_MODE, exist_ok=True)
        os.chmod(data_dir, DIR_MODE)
        fd = os.open(os.path.join(data_dir, "yikatong.lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise StoreUnavailable(f"cannot use data dir {data_dir}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreUnavailable(
            f"data dir {data_dir} is locked by another running server") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# LMDB's own layout (mdb.c, 64-bit), read before LMDB maps a file or walks a tree: a file cut
# short or a damaged page is said in words instead of a SIGBUS or an abort (issue 25, finding 8)
_PAGE_HEADER = struct.Struct("=QHHHH")  # pgno, pad, flags, lower, upper
_NODE = struct.Struct("=HHHH")  # data size (lo, hi) or child page (lo, hi, flags), flags, ksize
_META_BYTES = 152  # page header, magic, version, address, map size, two databases, last page, txn
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01
_P_INVALID = 2**64 - 1
# what LMDB raises reading a damaged page or file
LMDB_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadValsizeError,
               lmdb.InvalidError, lmdb.PanicError, lmdb.DiskError, lmdb.BadTxnError,
               lmdb.VersionMismatchError)


def _meta(fd: int, offset: int) -> tuple[int, int, int] | None:
    """(transaction id, last page, page size) of the meta page at `offset`; None if it is not
    one."""
    raw = os.pread(fd, _META_BYTES, offset)
    if len(raw) < _META_BYTES or not _PAGE_HEADER.unpack_from(raw)[2] & _P_META:
        return None
    magic, version, psize = struct.unpack_from("=II", raw, 16) + struct.unpack_from("=I", raw, 40)
    if magic != 0xBEEFC0DE or version != 1:
        return None
    last, txnid = struct.unpack_from("=QQ", raw, 136)
    return txnid, last, psize


def check_data_file(lmdb_dir: str) -> None:
    """StoreUnreadable if `lmdb_dir`'s data.mdb is shorter than its newer meta page says
    (its last page + 1, times its page size): LMDB would map it, and the first read past the
    end would kill the process (SIGBUS). No file, an empty one or one whose meta pages are not
    LMDB's: left to LMDB (a new store; or LMDB refuses it)."""
    path = os.path.join(lmdb_dir, "data.mdb")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreUnreadable(f"cannot read {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        first = _meta(fd, 0)
        if first is None or first[2] not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
            return
        second = _meta(fd, first[2])
        if second is None:
            return
        txnid, last, psize = max(first, second)
    finally:
        os.close(fd)
    need = (last + 1) * psize
    if size < need:
        raise StoreUnreadable(
            f"{path} is {size} bytes but its last transaction ({txnid}) needs {need} "
            f"({last + 1} pages of {psize}): the file is cut short; not opened (restore it "
            "from a backup)")


def check_tree(txn: lmdb.Transaction, data_file: str, name: bytes) -> None:
    """StoreUnreadable naming the first damaged page of database `name`'s B-tree as `txn`
    sees it, read from `data_file` with pread (never the map: a page past the file's end is
    said, not a SIGBUS). LMDB trusts its pages, and a damaged one (zeros, garbage) can make
    it abort the process or read out of bounds. The open transaction keeps its snapshot's
    pages from being reused while this walks them."""
    record = txn.get(name)  # the database's record in the main database (MDB_db)
    what = f"the {name.decode()} database"
    if record is None:
        return
    if len(record) != 48:
        raise StoreUnreadable(f"{what}'s record in the main database is {len(record)} bytes, "
                              "not 48")
    depth = struct.unpack_from("=H", record, 6)[0]
    root = struct.unpack_from("=Q", record, 40)[0]
    if root == _P_INVALID:
        return  # empty
    fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        psize = struct.unpack_from("=I", os.pread(fd, 44, 0).ljust(44, b"\0"), 40)[0]
        if psize < 512:
            raise StoreUnreadable(f"{data_file}: its first meta page is damaged")
        pages, seen, todo = size // psize, set(), [(root, depth)]
        while todo:
            pgno, level = todo.pop()
            where = f"{what}'s page {pgno}"
            if not 2 <= pgno < pages:
                raise StoreUnreadable(f"{where} is past the end of {data_file} ({size} bytes)")
            if pgno in seen or level < 1:
                raise StoreUnreadable(f"{where} is reached twice or too deep: a branch page "
                                      "above it is damaged")
            seen.add(pgno)
            page = os.pread(fd, psize, pgno * psize)
            number, _, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
            kind = _P_LEAF if level == 1 else _P_BRANCH
            if number != pgno or flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META) != kind \
                    or not 16 < lower <= upper <= psize or lower % 2:
                raise StoreUnreadable(f"{where} is damaged: its header says page {number}, "
                                      f"flags {flags:#x}, bounds {lower}-{upper}, where a "
                                      f"{'leaf' if level == 1 else 'branch'} page belongs")
            for i in range((lower - 16) // 2):
                at = struct.unpack_from("=H", page, 16 + 2 * i)[0]
                if not upper <= at <= psize - _NODE.size:
                    raise StoreUnreadable(f"{where} is damaged: entry {i} lies outside it")
                lo, hi, node_flags, ksize = _NODE.unpack_from(page, at)
                data = at + _NODE.size + ksize
                if level > 1:
                    end = data
                    todo.append((lo | hi << 16 | node_flags << 32, level - 1))
                elif node_flags & _F_BIGDATA:
                    end = data + 8
                    if end <= psize:
                        first = struct.unpack_from("=Q", page, data)[0]
                        count = (15 + (lo | hi << 16)) // psize + 1
                        head = os.pread(fd, 16, first * psize) if 2 <= first < pages else b""
                        if first + count > pages or len(head) < 16 \
                                or _PAGE_HEADER.unpack(head)[0] != first \
                                or not _PAGE_HEADER.unpack(head)[2] & _P_OVERFLOW:
                            raise StoreUnreadable(f"{where}: entry {i}'s value (overflow page "
                                                  f"{first}) is damaged or past the end")
                else:
                    end = data + (lo | hi << 16)
                if end > psize:
                    raise StoreUnreadable(f"{where} is damaged: entry {i} runs past its end")
    finally:
        os.close(fd)


class ApplyRecord:
    """The command that applies one record of the replicated log (`Book.apply_journal`).
    The writer commits these in groups of their own, never with other commands: a command
    grouped after one would work from counters (the change sequence, the audit chain's head)
    read before the record wrote past them, and one grouped before it on the writer (catching
    up) would be published after the record though it saw the state before it."""

    __slots__ = ("record", "term")

    def __init__(self, record: bytes, term: int | None = None):
        self.record, self.term = record, term

    def __call__(self, book: "Book") -> bool:
        return book.apply_journal(self.record, self.term)


class _Readers:
    """Transactions open in this process, and the map's resize, which may run only while none
    is (LMDB: mdb_env_set_mapsize). A transaction pays one uncontended lock to be counted; a
    resize holds new ones back, waits (bounded) for the open ones to end, and runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0
        self._resizing = False
        self._resized = threading.Event()

    def enter(self) -> None:
        while True:
            with self._lock:
                if not self._resizing:
                    self._open += 1
                    return
            self._resized.wait()

    def leave(self) -> None:
        with self._lock:
            self._open -= 1

    def exclusive(self, fn: Callable[[], None], timeout: float) -> bool:
        """Run `fn` with no transaction open; False if the open ones did not end in
        `timeout`."""
        with self._lock:
            if self._resizing:  # another thread's resize: it is done when this returns
                return False
            self._resizing = True
            self._resized.clear()
        try:
            deadline = time.monotonic() + timeout
            while True:
                with self._lock:
                    if not self._open:
                        fn()
                        return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0005)
        finally:
            with self._lock:
                self._resizing = False
            self._resized.set()


class _Read:
    """`with store.read() as txn`: a read transaction, counted for the map's resize."""

    __slots__ = ("_store", "_txn")

    def __init__(self, store: "Store"):
        self._store = store

    def __enter__(self) -> lmdb.Transaction:
        self._txn = self._store._begin(write=False)
        return self._txn

    def __exit__(self, *exc) -> None:
        try:
            self._txn.abort()
        finally:
            self._store._readers.leave()


class Store:
    def __init__(self, data_dir: str, *, map_size: int = config.lmdb_map_size,
                 map_size_max: int = config.lmdb_map_size_max,
                 high_water: float = config.lmdb_map_high_water,
                 periodic: Command | None = None, check_command: Command | None = None,
                 group_max: int = config.writer_group_max,
                 queue_max: int = config.writer_queue_max, lock: bool = True,
                 replicate: Callable[[bytes], None] | None = None,
                 check_writer: Callable[[], None] | None = None, metasync: bool = True,
                 pii_keys: "pii.KeyRing | None | str" = "in_process",
                 log_in_flight_max: int = config.log_in_flight_max):
        """`lock=False`: the caller holds the data dir's lock (lock_data_dir), as the parent
        of `--workers` does for the worker processes that share the data dir on purpose.
        `periodic(book)` runs in a group of its own when the writer has been idle for
        `config.writer_idle_seconds`, and at least that often under load (the hold sweep);
        `check_command(book)` runs at the end of every group before it commits (invariants,
        in tests and debug runs). `replicate(record)` gets each group that wrote anything as
        one replication record (every put and delete, in order, with the group's log
        sequence, the next after the store's) before the group commits, in the writer; if
        it raises, nothing of the group is committed and every caller gets the error.
        `check_writer()` raises (errors.Fenced) when this store may not write now (a
        follower): then each command that would write is refused on its own, so a group
        that also applies the log, or answers a replayed request, is not failed by it; the
        periodic job is not run. `metasync=False`: one flush per commit instead of two (LMDB's
        NOMETASYNC: a crash of the machine may undo the last commit, never half of one), for
        a replicated store, whose every commit is on a quorum of the log's disks before it
        commits here, and whose node replays the log from its last sequence on start.
        `pii_keys`: the key ring that seals holders' personal information (storage/pii.py);
        None: none loaded (PII reads and writes refused, naming the key); by default
        `pii.in_process` (tests and tools in one process; None in the server).
        `log_in_flight_max`: with `append` set (a replicated node's writer), how many
        groups' records may wait for the log's acknowledgement at once while the writer
        gathers and applies the next groups in the same transaction (`_pipeline`)."""
        self.data_dir = data_dir
        self.map_size_max = max(map_size, map_size_max)
        self.high_water = high_water
        # why health says NOT_SERVING besides the writer: "map_full" (past the high-water mark
        # of map_size_max), "disk_full" (past it of the data dir's file system),
        # "corrupt_record" (a read answered DATA_LOSS; until a restart)
        self.not_serving: set[str] = set()
        # the archive's move failed periodic_failures_max times in a row (storage/archive.py
        # Mover): a warning, not NOT_SERVING; the hot store grows until disk_full says so
        self.archive_failing = False
        self._readers = _Readers()
        self._disk_checked = -1e9
        self._group_max = group_max  # 1 = one fsync per command (the benchmark's baseline)
        self._queue_max = queue_max
        self._periodic = periodic
        self._check_command = check_command
        self.replicate = replicate
        # append(record, first: its transaction's first record) -> a future of its
        # acknowledgement: the log's asynchronous append, records handed in order reaching
        # the log in order (`Log.admitted`); set by storage.replication.Node
        self.append: Callable[[bytes, bool], concurrent.futures.Future] | None = None
        self._in_flight_max = max(1, log_in_flight_max)
        # the writer's term (storage.replication.Node, when it takes the lease): its records
        # carry it, and its first record of a term writes it into the store (`_TERM_KEY`)
        self.term = 0
        self.record_term = 0  # the term the writer last stamped a record with (_stamp_term)
        # a group's record grows past this (bytes, about): the rest of the group's commands go
        # in the next record (the log takes messages up to its max_payload); None: no bound
        self.record_bytes_max: int | None = None
        self.check_writer = check_writer
        # a follower's audit events (a PII read, refused calls): handed to the writer through
        # the log's intake (storage.replication) before the command's caller is answered
        self.divert_audit: Callable[[list[AuditEvent]], None] | None = None
        # the log's last record committed here, kept after each group's commit when this store
        # is replicated (before its callers are answered: a write's answer includes its record)
        self.applied_sequence = 0
        self.periodic_failures = 0  # in a row; reset by a success
        self.periodic_failures_total = 0
        self.writer_error: BaseException | None = None
        self.on_health: Callable[[bool], None] | None = None  # called from the writer thread
        # (commands, seconds) after each group's commit, from the writer thread (metrics)
        self.on_commit: Callable[[int, float], None] | None = None
        lmdb_dir = os.path.join(data_dir, "lmdb")
        try:
            for d in (data_dir, lmdb_dir):
                os.makedirs(d, mode=DIR_MODE, exist_ok=True)
                os.chmod(d, DIR_MODE)
        except OSError as e:
            raise StoreUnavailable(f"cannot use data dir {data_dir}: {e.strerror}") from e
        self._lock_fd = lock_data_dir(data_dir) if lock else None
        # Opened here, in the process that uses it (after any fork), never inherited.
        try:
            self.env = self._open(lmdb_dir, map_size, metasync)
            for name in os.listdir(lmdb_dir):
                os.chmod(os.path.join(lmdb_dir, name), FILE_MODE)
        except (lmdb.Error, OSError, StoreUnreadable) as e:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            if isinstance(e, StoreUnreadable):
                raise
            raise StoreUnavailable(f"cannot open the LMDB store in {data_dir}: {e}") from e
        self.env.reader_check()  # clear reader slots left by dead processes
        try:  # before any database is opened (which would create format 2's in an older one)
            self.format = migrate.check_format(self.env, data_dir)
        except (StoreUnavailable, lmdb.Error) as e:
            self.env.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            if isinstance(e, StoreUnavailable):
                raise
            raise StoreUnavailable(f"cannot read the store format in {data_dir}: {e}") from e
        self.dbs = Dbs(self.env)
        self.dbs.data_dir = data_dir
        self.dbs.pii = pii.in_process if pii_keys == "in_process" else pii_keys  # type: ignore
        try:  # the index key must be the one the store's holders are indexed with
            self.dbs.pii_index = _pii_index(self.env, self.dbs, data_dir)
        except StoreUnavailable:
            self.env.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self.refresh_sequence()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._carry = None  # the item that ended the last group (a record among commands)
        self._drain_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="lmdb-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def _open(path: str, map_size: int, metasync: bool):
        check_data_file(path)  # a file cut short: refused here, not a SIGBUS later
        return lmdb.open(
            path,
            map_size=map_size,
            max_dbs=config.lmdb_max_dbs,
            max_readers=config.lmdb_max_readers,
            sync=True,
            metasync=metasync,
            writemap=False,
            readahead=False,  # random card look-ups; readahead only pollutes the page cache
            lock=True,
            mode=FILE_MODE,
        )

    @property
    def healthy(self) -> bool:
        return (self.writer_error is None and not self.not_serving
                and self.periodic_failures < config.periodic_failures_max)

    def note(self, reason: str, holds: bool) -> None:
        """A reason for health NOT_SERVING found (`holds`) or gone; health follows."""
        if (reason in self.not_serving) != holds:
            was = self.healthy
            (self.not_serving.add if holds else self.not_serving.discard)(reason)
            log.log(logging.ERROR if holds else logging.INFO, "health: %s %s", reason,
                    "holds: NOT_SERVING" if holds else "cleared")
            if self.healthy != was:
                self._notify_health()

    # ---- reads: any thread, never blocked by the writer (but for the map's resize)
    def read(self) -> _Read:
        return _Read(self)

    def _begin(self, write: bool) -> lmdb.Transaction:
        """A transaction counted with this process's open ones (`_Readers`): the caller
        leaves them once it has ended it. A map grown by another worker is taken first."""
        self._readers.enter()
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:  # another worker grew the map: take its size, again
            self._readers.leave()
            self._adopt_map_size()
            self._readers.enter()
            try:
                return self.env.begin(write=write)
            except BaseException:
                self._readers.leave()
                raise
        except BaseException:
            self._readers.leave()
            raise

    def _adopt_map_size(self) -> None:
        """Another process grew the map: take its size (0: the size in the file)."""
        self._readers.exclusive(lambda: self.env.set_mapsize(0), timeout=5.0)

    def _grow_map(self) -> None:
        """In the writer, before a write transaction: double the map once it is
        `config.lmdb_map_grow_at` full, up to map_size_max (logged each time); NOT_SERVING
        past the high-water mark of map_size_max, when it can grow no more."""
        used, size = self.map_use()
        if used >= config.lmdb_map_grow_at * size and size < self.map_size_max:
            new = min(self.map_size_max, size * 2)
            if self._readers.exclusive(lambda: self.env.set_mapsize(new), timeout=1.0):
                log.warning("the LMDB map grew from %d to %d MiB (%d MiB in use; at most %d "
                            "MiB, --map-size-max-mib)", size >> 20, new >> 20, used >> 20,
                            self.map_size_max >> 20)
                size = new
        self.note("map_full", used >= self.high_water * self.map_size_max)
        now = time.monotonic()
        if now >= self._disk_checked + 10:  # the map is address space; the disk is the limit
            self._disk_checked = now
            fs = os.statvfs(self.data_dir)
            self.note("disk_full", fs.f_bavail < (1 - self.high_water) * fs.f_blocks)

    def book(self, txn) -> "Book":
        return Book(txn, self.dbs)

    # ---- writes: only the writer thread
    def submit(self, command: Command) -> concurrent.futures.Future:
        """Run `command(book)` in the writer thread; the future resolves after the commit."""
        if self.writer_error is not None:
            raise self._down()
        if self._queue.qsize() >= self._queue_max:
            raise WriterBusy(f"the writer has {self._queue_max} commands waiting "
                             "(writer_queue_max); retry shortly")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((command, future))
        if self.writer_error is not None:  # it died while this was queued: answer it here
            self._fail_waiting()
        return future

    def write(self, command: Command):
        """Blocking form of submit(), for tools and tests outside the event loop."""
        return self.submit(command).result()

    def _down(self) -> WriterDown:
        return WriterDown(f"the store's writer has stopped ({self.writer_error!r}); no write "
                          "can be done until the server is restarted")

    def _write_loop(self) -> None:
        try:
            self._write_forever()
        except BaseException as error:  # noqa: BLE001 - recorded, logged, and answered
            self.writer_error = error
            log.critical("the LMDB writer thread died; writes fail until a restart",
                         exc_info=error)
            self._notify_health()
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        """After the writer's death: answer everything queued, so nobody waits for ever."""
        with self._drain_lock:
            while True:
                try:
                    item, self._carry = self._carry or self._queue.get_nowait(), None
                except queue.Empty:
                    return
                if item is not _STOP and item is not _ACKED and \
                        item[1].set_running_or_notify_cancel():
                    item[1].set_exception(self._down())

    def _write_forever(self) -> None:
        periodic_due = time.monotonic() + config.writer_idle_seconds
        while True:
            try:
                item, self._carry = self._carry or self._queue.get(
                    timeout=config.writer_idle_seconds), None
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if self._periodic is not None and time.monotonic() >= periodic_due:
                # when idle, and at least this often under load; in a group of its own
                self._run_periodic()
                periodic_due = time.monotonic() + config.writer_idle_seconds
            if item is None or item is _ACKED:
                continue
            self._commit_group(self._gather(item))

    def _gather(self, item) -> list:
        """A group: `item` and what is queued behind it, up to group_max, records (or
        commands) only."""
        group = [item]
        applying = type(item[0]) is ApplyRecord
        while len(group) < self._group_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _ACKED:
                continue
            if nxt is _STOP:
                self._queue.put(_STOP)  # finish this group, then stop
                break
            if (type(nxt[0]) is ApplyRecord) is not applying:
                self._carry = nxt  # the next group's first
                break
            group.append(nxt)
        return group

    def _run_periodic(self) -> None:
        """A periodic job's failure is never silent: logged with its traceback, counted, and
        after periodic_failures_max in a row the store is unhealthy until one succeeds."""
        assert self._periodic is not None
        was_healthy = self.healthy
        if self.check_writer is not None:
            try:
                self.check_writer()
            except Fenced:
                return  # a follower: the writer's job, which reaches here through the log
        try:
            replicate = self.replicate
            journal: list | None = [] if replicate is not None else None
            with self._begin_write() as txn:
                self._periodic(Book(txn, self.dbs, journal))
                self._publish(txn, journal, replicate)
        except Exception as error:  # noqa: BLE001 - logged and counted, never swallowed
            self.periodic_failures += 1
            self.periodic_failures_total += 1
            log.error("periodic job %s failed (%d in a row)", getattr(
                self._periodic, "__name__", "job"), self.periodic_failures, exc_info=error)
        else:
            self.periodic_failures = 0
            if self.check_writer is not None:
                self.refresh_sequence()
        if self.healthy != was_healthy:
            self._notify_health()

    def _notify_health(self) -> None:
        if self.on_health is not None:
            self.on_health(self.healthy)

    def _commit_group(self, group) -> None:
        # A caller that gave up (a cancelled gRPC call) cancelled its future: its command is
        # skipped, nothing done. Every other future is marked running, so it can no longer be
        # cancelled and its answer can always be delivered.
        group = [(c, f) for c, f in group if f.set_running_or_notify_cancel()]
        if not group:
            return
        if self.append is not None and type(group[0][0]) is not ApplyRecord:
            self._pipeline(group)
            return
        started = time.perf_counter()
        replicate = self.replicate  # the same for the whole group
        journal: list | None = [] if replicate is not None else None
        try:
            with self._begin_write() as txn:
                outcomes, handed, diverted_futures, _ = self._apply(txn, group, journal)
                if self._check_command is not None:
                    self._check_command(Book(txn, self.dbs))
                self._publish(txn, journal, replicate)
        except Exception as e:  # noqa: BLE001 - the whole group failed to commit
            for _, future in group:
                future.set_exception(self._full(e))
            return
        except BaseException as e:  # the writer is dying: nobody in this group waits for ever
            for _, future in group:
                future.set_exception(WriterDown(f"the store's writer stopped ({e!r})"))
            raise
        if self.check_writer is not None:
            self.refresh_sequence()
        self._answer(outcomes, handed, diverted_futures)
        if self.on_commit is not None:
            self.on_commit(len(group), time.perf_counter() - started)

    def _apply(self, txn, group, journal: list | None, size_max: int | None = None):
        """Each command of `group` in a child transaction of `txn` (one that raises leaves
        nothing); what they write appended to `journal`. (outcomes, a follower's audit
        events to hand over, the futures answered only once they are, the commands left for
        the next record once the journal passed `size_max` bytes)."""
        outcomes: list[tuple[concurrent.futures.Future, Any, BaseException | None]] = []
        handed: list[AuditEvent] = []  # a follower's audit events, handed over once a group
        diverted_futures: set[concurrent.futures.Future] = set()
        size = 0
        for i, (command, future) in enumerate(group):
            if size_max is not None and size > size_max:
                return outcomes, handed, diverted_futures, group[i:]
            child = self.env.begin(write=True, parent=txn)
            heads = self.dbs.change_seq, self.dbs.audit_head, self.dbs.answer_seq
            mine: list | None = [] if journal is not None else None
            try:
                result = command(Book(child, self.dbs, mine))
                diverted = (mine is not None and len(mine) > 0
                            and self.check_writer is not None and self._not_here(mine))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                child.abort()
                # the audit chain goes on from the last event that stays
                self.dbs.change_seq, self.dbs.audit_head, self.dbs.answer_seq = heads
                outcomes.append((future, None, self._full(e)))
            else:
                if diverted:  # audited by the writer; nothing written here
                    child.abort()
                    self.dbs.change_seq, self.dbs.audit_head, self.dbs.answer_seq = heads
                    handed.extend(records.decode_audit(v) for _, _, v in mine or ())
                    diverted_futures.add(future)
                    outcomes.append((future, result, None))
                    continue
                child.commit()
                outcomes.append((future, result, None))
                if mine:
                    journal.extend(mine)  # type: ignore[union-attr]
                    if size_max is not None:
                        size += fastpath.journal_size(mine) - records.JOURNAL_HEAD_BYTES
        return outcomes, handed, diverted_futures, []

    def _answer(self, outcomes, handed, diverted_futures) -> None:
        """A committed group's callers (the diverted ones once the intake holds their
        events)."""
        if handed:  # the diverted commands are answered only once the intake holds them
            try:
                self.divert_audit(handed)  # type: ignore[misc]
            except Exception as e:  # noqa: BLE001 - none of them answered but with this
                failed = self._full(e)
                outcomes = [(f, None, failed) if f in diverted_futures else (f, r, err)
                            for f, r, err in outcomes]
        for future, result, error in outcomes:  # durable now: answer the callers
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _pipeline(self, group) -> None:
        """A replicated writer's transaction (issue 27 item 2, docs/SCALE.md "Gathering
        while the log answers"): each group is applied and its record handed to `append`
        at once; while its last record's acknowledgement is outstanding the writer gathers
        and applies the next groups in the same transaction, their records handed on in
        order, at most `log_in_flight_max` records. Once every record handed is acknowledged
        (or the bound is reached) the transaction takes no more; it commits once every record
        in it is acknowledged, and only then are its callers answered. If a record is
        refused (fenced, unacknowledged, or its group failed to apply), nothing from it on
        commits: the transaction is aborted, the records acknowledged before it are applied
        again from their bytes and committed (they are in the log), their groups answered;
        every later group's callers get the refusal (UNAVAILABLE: a retry by request id
        replays or decides anew)."""
        started = time.perf_counter()
        # (group, outcomes, handed, diverted, records up to its own, its record's index or -1)
        groups: list[tuple[list, list, list, set, int, int]] = []
        flight: list[tuple[bytes, concurrent.futures.Future]] = []  # in order
        broken: tuple[int, BaseException] | None = None  # a group that failed to apply
        good = 0  # leading records acknowledged
        refusal: BaseException | None = None
        try:
            with self._begin_write() as txn:
                while True:
                    journal: list = []
                    own, rest = -1, []
                    try:
                        outcomes, handed, diverted, rest = self._apply(
                            txn, group, journal, self.record_bytes_max)
                        if rest:  # the record is full: they go in the next one
                            group = group[:len(group) - len(rest)]
                        if self._check_command is not None:
                            self._check_command(Book(txn, self.dbs))
                        if journal:
                            book = Book(txn, self.dbs)
                            self._stamp_term(txn, journal)
                            seq = book.log_sequence() + 1
                            book.set_log_sequence(seq)
                            record = fastpath.encode_journal(seq, journal)
                            try:  # the transaction's first record, or built on the last
                                future = self.append(record, not flight)  # type: ignore[misc]
                            except Exception as e:  # noqa: BLE001 - refused before it left
                                future = concurrent.futures.Future()
                                future.set_exception(e)
                            else:
                                future.add_done_callback(self._acked)
                            own = len(flight)
                            flight.append((record, future))
                    except Exception as e:  # noqa: BLE001 - this group failed to apply
                        broken = (len(groups), self._full(e))
                        groups.append((group + rest, [], [], set(), len(flight), -1))
                        break
                    groups.append((group, outcomes, handed, diverted, len(flight), own))
                    # a group cut by size goes on in the next record, whatever the bound
                    group = rest or self._next_in_flight(flight)
                    if group is None:
                        break
                # every record answered before the transaction ends (the log admits the
                # next transaction's first record only then): the first refusal decides
                deadline = time.monotonic() + config.log_ack_wait_seconds
                for _, future in flight:
                    try:
                        future.result(timeout=max(0.0, deadline - time.monotonic()))
                    except Exception as e:  # noqa: BLE001 - refused: nothing after commits
                        if refusal is None:
                            refusal = e if not isinstance(e, concurrent.futures.TimeoutError) \
                                else LogUnavailable("the replicated log did not acknowledge a "
                                                    "record in "
                                                    f"{config.log_ack_wait_seconds:g} s")
                        continue
                    if refusal is None:
                        good += 1
                if broken is not None or refusal is not None:
                    raise _Refused
        except _Refused:
            self._commit_acknowledged(groups, flight, good, broken, refusal)
            return
        except Exception as e:  # noqa: BLE001 - the commit failed: nothing of it is here
            # (its records may be in the log: the node applies them from there)
            for g in self._every(groups, group):
                for _, future in g:
                    future.set_exception(self._full(e))
            return
        except BaseException as e:  # the writer is dying: nobody waits for ever
            for g in self._every(groups, group):
                for _, future in g:
                    if not future.done():
                        future.set_exception(WriterDown(f"the store's writer stopped ({e!r})"))
            raise
        self.refresh_sequence()
        for g, outcomes, handed, diverted, _, _ in groups:
            self._answer(outcomes, handed, diverted)
            if self.on_commit is not None:
                self.on_commit(len(g), time.perf_counter() - started)

    @staticmethod
    def _every(groups: list, group: list) -> list:
        """Every group of a transaction, the one being applied (or begun) included."""
        every = [g for g, *_ in groups]
        return every if any(g is group for g in every) else [*every, group]

    def _acked(self, _future) -> None:
        self._queue.put(_ACKED)

    def _next_in_flight(self, flight: list) -> list | None:
        """The next group for the open transaction, gathered while the log answers; None
        when it takes no more: nothing awaited, the bound reached, the last record handed
        answered (so every one is: the log answers in order), a log record to apply next
        (never grouped with commands), or the writer stopping."""
        while True:
            if (not flight or len(flight) >= self._in_flight_max
                    or flight[-1][1].done() or self._carry is not None):
                return None
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                return None
            if item is _ACKED:
                continue
            if item is _STOP:
                self._queue.put(_STOP)
                return None
            if type(item[0]) is ApplyRecord:
                self._carry = item
                return None
            group = [(c, f) for c, f in self._gather(item) if f.set_running_or_notify_cancel()]
            if group:
                return group

    def _commit_acknowledged(self, groups, flight, good: int, broken, refusal) -> None:
        """After a refused record or a group that failed to apply: the records acknowledged
        before it applied from their bytes and committed, their groups answered; every group
        from the first that depends on what was refused gets the refusal."""
        try:
            if good:
                with self._begin_write() as txn:
                    book = Book(txn, self.dbs)
                    for record, _ in flight[:good]:
                        book.apply_journal(record)
        except Exception as e:  # noqa: BLE001 - not committed here; the log holds them
            refusal, good = self._full(e), 0
        self.refresh_sequence()
        first_refused = flight[good][0] if good < len(flight) else None
        for i, (g, outcomes, handed, diverted, before, own) in enumerate(groups):
            if broken is not None and i >= broken[0]:
                error: BaseException = broken[1] if i == broken[0] else \
                    self._after_refused(None, None, broken)
            elif before <= good:  # all it saw is acknowledged and committed
                self._answer(outcomes, handed, diverted)
                continue
            elif own == good and refusal is not None:
                error = refusal  # the group whose record was refused
            else:
                error = self._after_refused(first_refused, refusal, broken)
            for _, future in g:
                future.set_exception(error)

    @staticmethod
    def _after_refused(first_refused: bytes | None, refusal, broken) -> BaseException:
        seq = records.journal_sequence(first_refused) if first_refused else None
        why = (f"log record {seq} before it was refused ({refusal})" if seq is not None
               and refusal is not None else f"a group before it failed ({broken[1]})")
        message = (f"not committed: {why}; nothing after a refused record commits. Retry with "
                   "the same request id: it is decided once")
        if isinstance(refusal, Fenced):
            return Fenced(message, refusal.writer)
        return LogUnavailable(message)

    def _not_here(self, journal: list) -> bool:
        """A command that would write, on a store that may not (a follower): refused
        (errors.Fenced), unless all it writes is audit events and they can be handed to the
        writer (`divert_audit`, once for the group, before its callers are answered): then
        True."""
        assert self.check_writer is not None
        try:
            self.check_writer()
            return False
        except Fenced:
            if self.divert_audit is None or any(db != b"audit" for db, _, _ in journal):
                raise
        return True

    def refresh_sequence(self) -> None:
        """`applied_sequence` read again from the store (another process of the node, a
        worker or its log keeper, may have committed since)."""
        with self.read() as txn:
            self.applied_sequence = Book(txn, self.dbs).log_sequence()

    def _publish(self, txn, journal: list | None, replicate) -> None:
        """A group that wrote anything is one replication record, handed to `replicate`
        before the group commits; its log sequence is recorded with the data."""
        if journal:
            book = Book(txn, self.dbs)
            self._stamp_term(txn, journal)
            seq = book.log_sequence() + 1
            book.set_log_sequence(seq)
            replicate(fastpath.encode_journal(seq, journal))

    def _stamp_term(self, txn, journal: list) -> None:
        """A new term's first record writes it (replicated with the record): the applier of
        any later record of an older term knows it is void (`Book.apply_journal`)."""
        book = Book(txn, self.dbs, journal)
        known, term = book.term(), self.term  # read once: `term` may change meanwhile
        if term < known:  # its records would be void: another node writes now
            raise Fenced(f"a newer writer's records are in the log (term {known}, this node's "
                         f"{term}): this node is not the writer; nothing was committed")
        if term > known:
            book.put_meta(_TERM_KEY, _U64.pack(term))
        self.record_term = term  # the record's header says the term stamped here

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def map_use(self) -> tuple[int, int]:
        """(bytes of pages in use, the map size)"""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"], info["map_size"]

    @contextlib.contextmanager
    def _begin_write(self):
        """A write transaction, with the change sequence read inside it: LMDB lets one
        write transaction at a time into the environment, across every process (`--workers`),
        so the last key of the change log is the truth, and no two writers hand out a sequence
        twice. A command that rolls back leaves a gap, which readers of the log skip. Counted
        with the readers: no resize while it is open."""
        self._grow_map()
        txn = self._begin(write=True)
        try:
            with txn:  # committed at the end of the block, aborted on an exception
                with txn.cursor(db=self.dbs.changes) as cur:
                    self.dbs.change_seq = _U64.unpack(cur.key())[0] if cur.last() else 0
                with txn.cursor(db=self.dbs.answers) as cur:  # likewise (every one archived:
                    last = (cur.key() if cur.last()  # on from the last archived)
                            else txn.get(archive.ANSWERS_KEY, db=self.dbs.meta))
                    self.dbs.answer_seq = _U64.unpack(last)[0] if last is not None else 0
                with txn.cursor(db=self.dbs.audit) as cur:  # the audit chain's head, likewise
                    self.dbs.audit_head = ((_U64.unpack(cur.key())[0],
                                            records.audit_hash_of(cur.value()))
                                           if cur.last() else (0, bytes(32)))
                yield txn
        finally:
            self._readers.leave()

    def _full(self, error: BaseException) -> BaseException:
        if isinstance(error, lmdb.MapFullError):
            size = self.env.info()["map_size"] // 2**20
            return StoreFull(f"the store is full (LMDB map_size {size} MiB reached, the most "
                             f"is {self.map_size_max >> 20} MiB); nothing was written. Restart "
                             f"the server with a larger --map-size-max-mib (e.g. "
                             f"{max(size, self.map_size_max >> 20) * 2}); reads keep working "
                             "meanwhile")
        return error

    def close(self) -> None:
        self._queue.put(_STOP)
        self._writer.join()
        self.env.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)


def _pii_index(env, dbs: "Dbs", data_dir: str) -> str:
    """The id of the index key the store's holders are keyed by (meta `pii:index`: the id and
    an HMAC of a fixed text under it), recorded by the first key ring that opens it;
    StoreUnavailable if the loaded ring's index key is another (its look-ups would miss every
    holder, and Apply would make a second holder of each)."""
    ring = dbs.pii
    with env.begin(write=ring is not None) as txn:
        value = txn.get(pii.META_INDEX, db=dbs.meta)
        if value is None:
            if ring is None:
                return ""
            txn.put(pii.META_INDEX, ring.index_id.encode("ascii") + b"\0" + ring.index_check(),
                    db=dbs.meta)
            return ring.index_id
        recorded, _, check = bytes(value).partition(b"\0")
        index_id = recorded.decode("ascii", "replace")
        if ring is not None and (ring.index_id != index_id or ring.index_check() != check):
            raise StoreUnavailable(
                f"{ring.source or 'the PII key file'}: its index key {ring.index_id!r} is not "
                f"the one the holders of {data_dir} are indexed with ({index_id!r}); start with "
                "the key file that holds it")
        return index_id


class Dbs:
    """The named databases of one environment. A replication record names each by its name
    (`name_of`), so adding one never renumbers another."""

    def __init__(self, env):
        self.name_of: dict[Any, bytes] = {}
        self.by_name: dict[bytes, Any] = {}

        def db(name: bytes):
            handle = env.open_db(name)
            self.name_of[handle], self.by_name[name] = name, handle
            return handle

        self.cards = db(b"cards")  # card number (ASCII) -> card record
        self.holders = db(b"holders")  # ssn (ASCII) -> u64 holder_id + Holder proto
        self.holder_cards = db(b"holder_cards")  # u64 holder_id + u8 pack -> card
        self.requests = db(b"requests")  # request id -> u64 BE sequence in `answers`
        self.notes = db(b"notes")  # "<kind>:<card number>" -> UTF-8 text
        self.meta = db(b"meta")  # name -> u64 counter
        self.accounts = db(b"accounts")  # account key -> account record
        self.transfers = db(b"transfers")  # transfer id -> transfer record
        # open holds, two ways: for the sweep, and per debited account for the lazy check
        self.holds_by_timeout = db(b"holds_by_timeout")  # u64 timeout + id -> b""
        self.holds_by_account = db(b"holds_by_account")  # key40 + u64 timeout + id -> i64
        self.changes = db(b"changes")  # u64 sequence -> change record
        # RC-13: a holder's Shanghai residence addresses, oldest first
        self.residences = db(b"residences")  # u64 holder_id + u32 n -> i64 since + UTF-8
        self.holder_ssn = db(b"holder_ssn")  # u64 holder_id -> ssn (ASCII)
        self.steps = db(b"steps")  # card number -> its open steps and their ends
        self.credit = db(b"credit")  # u64 holder_id + u32 n -> credit record
        # GZ-20: earlier values of a holder's fields
        self.holder_history = db(b"holder_history")  # u64 holder_id + u32 n -> record
        # RC-20 to RC-23: a holder's points, the API's PointsRecord message
        self.points = db(b"points")  # u64 holder_id -> PointsRecord
        # RC-29: an employer's credit records: unified social credit code + u32 n -> record
        self.employer_credit = db(b"employer_credit")
        # SH-31, GZ-35: electronic card number (ASCII, 18 digits) -> u64 holder_id + u8 pack,
        # and u64 holder_id + u8 pack -> number (9-byte keys never equal 18-byte ones)
        self.ecards = db(b"ecards")
        # SH-20: card number (ASCII) -> i64 LE end of its bank loss report, by its bank's
        # rules (config: loss_valid_days); none, or no such database: until cancelled
        self.bank_losses = db(b"bank_losses")
        # issue 28, no journey left open (yikatong/journeys.py): new databases, no record's
        # layout changed (a release that knows neither leaves them alone: its holds release
        # at their timeout, as before). Hold id (UTF-8) -> journey record; the debited
        # account's key -> the hold id of its last journey left open that no tap was told of
        self.journeys = db(b"journeys")
        self.journeys_untold = db(b"journeys_untold")
        self.change_seq = 0  # the last sequence handed out: read in each write (_begin_write)
        # append-only audit trail, hash-chained: u64 sequence -> audit event
        self.audit = db(b"audit")
        self.audit_head: tuple[int, bytes] = (0, bytes(32))  # (sequence, hash), as change_seq
        # store format 6: u64 sequence -> remembered answer (records.encode_answer), appended
        # in order (the archive takes the oldest first); the last one handed out is read in
        # each write (_begin_write), as change_seq
        self.answers = db(b"answers")
        self.answer_seq = 0
        # 16 bytes of an archived request id's SHA-256 -> u32 LE segment
        self.archived_ids = db(b"archived_ids")
        self.data_dir = ""  # the archive's segments are in data_dir/archive (storage/archive.py)
        # the server's clock (a remembered answer's time); the system's until the server sets it
        self.now: Callable[[], int] = lambda: int(time.time())
        # holders' personal information is sealed with these keys (storage/pii.py; None: not
        # loaded), and indexed with the index key recorded in meta under this id
        self.pii: pii.KeyRing | None = None
        self.pii_index = ""


class Book:
    """Typed access to the databases inside one transaction: the only way the domain reads
    and writes the store."""

    __slots__ = ("txn", "dbs", "journal", "_held", "_changed", "_totals")

    def __init__(self, txn, dbs: Dbs, journal: list | None = None):
        """`journal`: every put and delete this book makes is appended to it, in order, as
        (database name, key, value, or None for a delete): a commit group's replication
        record (Store's `replicate`)."""
        self.txn = txn
        self.dbs = dbs
        self.journal = journal
        self._held: dict[bytes, Account] | None = None  # hold_accounts()
        self._changed: dict[bytes, None] = {}
        self._totals: tuple[int, int, int, int] | None = None

    def _put(self, key: bytes, value: bytes, db, append: bool = False,
             overwrite: bool = True) -> bool:
        # positional, as the Book's gets (key, default, db): py-lmdb parses keywords each
        # call, 75-175 ns of the writer's time, many times a debit
        done = self.txn.put(key, value, False, overwrite, append, db)
        if append and not done:  # LMDB says False for a key not after the last: a lost write
            raise CorruptRecord(f"{self.dbs.name_of[db].decode()} key {bytes(key).hex()} is "
                                "not after the last; nothing of this command is written")
        if done and self.journal is not None:
            self.journal.append((self.dbs.name_of[db], bytes(key), bytes(value)))
        return done

    def _delete(self, key: bytes, db) -> bool:
        done = self.txn.delete(key, b"", db)
        if done and self.journal is not None:
            self.journal.append((self.dbs.name_of[db], bytes(key), None))
        return done

    def apply_journal(self, record: bytes, term: int | None = None) -> bool:
        """A follower's step: the puts and deletes of the leader's commit group with log
        sequence `seq`, in order, with `seq` as the last one applied, in this transaction.
        False (nothing done) for a record applied before; ReplicationGap for one that
        skips ahead. A record of a writer's `term` older than the newest one applied is void:
        only its sequence is taken (a stale writer's record that followed its own refused one
        into the log after the new writer's: docs/SCALE.md, "Gathering while the log
        answers"); None: a record from before terms."""
        seq, ops = fastpath.decode_journal(record)
        last = self.log_sequence()
        if seq <= last:
            return False
        if seq != last + 1:
            raise ReplicationGap(f"replication record {seq} after {last}: {last + 1} is missing")
        if term is not None and term < self.term():
            self.set_log_sequence(seq)
            return True
        at, apply, by_name = 0, fastpath.apply_ops, self.dbs.by_name
        while (at := apply(self.txn, ops, by_name, at)) < len(ops):  # up to an unknown name
            name, key, value = ops[at]
            if name == archive.SEGMENT_OP and value is not None:
                archive.write_replicated(self, key, value)  # before the deletes
            else:
                raise CorruptRecord(f"replication record {seq} names database {name!r}, which "
                                    "this store does not have")
            at += 1
        self.set_log_sequence(seq)
        return True

    def log_sequence(self) -> int:
        """The replicated log's last sequence this store holds (0: none)."""
        value = self.txn.get(_LOG_SEQ_KEY, None, self.dbs.meta)
        return 0 if value is None else _U64.unpack(value)[0]

    def term(self) -> int:
        """The newest writer's term among the records this store holds (0: none)."""
        value = self.txn.get(_TERM_KEY, None, self.dbs.meta)
        return 0 if value is None else _U64.unpack(value)[0]

    def intake_sequence(self) -> int:
        """The last record of the followers' audit intake taken into this trail."""
        value = self.txn.get(_INTAKE_SEQ_KEY, None, self.dbs.meta)
        return 0 if value is None else _U64.unpack(value)[0]

    def take_intake(self, seq: int, events: list[AuditEvent]) -> bool:
        """The writer's step for record `seq` of the followers' audit intake: its events
        appended to the trail (chained here, as the writer's own), the sequence recorded in
        the same transaction (and so replicated with them); False for a record taken
        before."""
        if seq <= self.intake_sequence():
            return False
        for e in events:
            self.append_audit(e.time, e.client_id, e.role, e.method, e.card_number, e.purpose,
                              e.outcome, e.count, e.holder)
        self._put(_INTAKE_SEQ_KEY, _U64.pack(seq), db=self.dbs.meta)
        return True

    def set_log_sequence(self, seq: int) -> None:
        self.txn.put(_LOG_SEQ_KEY, _U64.pack(seq), db=self.dbs.meta)

    # ---- cards
    def card_bytes(self, card_number: str) -> bytes | None:
        return self.txn.get(card_number.encode("ascii"), None, self.dbs.cards)

    def use_bytes(self, number: str) -> bytes | None:
        """The record a use of `number` is decided on: the card's own; for an electronic card
        (SH-31, GZ-35: same effect, follows the physical card) its holder's current card's."""
        if len(number) != config.ecard_number_digits:
            return self.txn.get(number.encode("ascii"), None, self.dbs.cards)
        value = self.txn.get(number.encode("ascii"), None, self.dbs.ecards)
        if value is None:
            return None
        current = self.txn.get(value[:9], None, self.dbs.holder_cards)  # holder id + pack
        return None if current is None else self.txn.get(current, None, self.dbs.cards)

    def card_with_holder(self, number: str) -> tuple[bytes | None, int | None]:
        """The record a use of `number` is decided on and its holder id (None: no card, or
        not a valid record)."""
        value = self.use_bytes(number)
        return value, records.holder_id_of(value)

    def card(self, card_number: str) -> Card | None:
        value = self.card_bytes(card_number)
        return None if value is None else records.decode_card(card_number, value)

    def put_card(self, card: Card, now: int) -> None:
        key = card.card_number.encode("ascii")
        old = self.txn.get(key, None, self.dbs.cards)
        what = int(Changed.STATE | Changed.LOCKS | Changed.FUNCTIONS | Changed.REPLACEMENT
                   | Changed.VALIDITY | Changed.POINTS)
        if old is not None:
            was = records.decode_card(card.card_number, old)
            what = ((Changed.STATE if was.state != card.state else 0)
                    | (Changed.LOCKS if was.lock_mask != card.lock_mask else 0)
                    | (Changed.FUNCTIONS if was.flags != card.flags else 0)
                    | (Changed.REPLACEMENT if was.replaced_by != card.replaced_by else 0)
                    | (Changed.VALIDITY if was.valid_until != card.valid_until else 0)
                    | (Changed.POINTS if was.points != card.points else 0))
        self._put(key, records.encode_card(card), db=self.dbs.cards)
        self.append_change(ChangeKind.CARD, now, card.card_number, card.holder_id, card.state,
                           card.flags, card.lock_mask, what=what)

    # ---- SH-20: when a bank loss report lapses, by its bank's rules (0: until cancelled)
    def bank_loss_end(self, number: str) -> int:
        """The stored end of the bank loss report on the card a use of `number` is decided
        on (as use_bytes: an electronic card's is its holder's current card's); 0 for none."""
        key: bytes | None = number.encode("ascii")
        if len(number) == config.ecard_number_digits:
            value = self.txn.get(key, None, self.dbs.ecards)
            key = None if value is None else self.txn.get(value[:9], None, self.dbs.holder_cards)
        value = None if key is None else self.txn.get(key, None, self.dbs.bank_losses)
        if value is None:
            return 0
        if len(value) != _I64.size:
            raise CorruptRecord(f"bank loss end of card {number} is {len(value)} bytes, not 8")
        return _I64.unpack(value)[0]

    def put_bank_loss_end(self, card_number: str, end: int) -> None:
        key = card_number.encode("ascii")
        if end:
            self._put(key, _I64.pack(end), db=self.dbs.bank_losses)
        else:
            self._delete(key, db=self.dbs.bank_losses)

    # ---- open steps of a card's procedure, with when each is due (SPEC.md section 6)
    def steps_of(self, card_number: str) -> list[Step]:
        value = self.txn.get(card_number.encode("ascii"), None, self.dbs.steps)
        return [] if value is None else records.decode_steps(value)

    def put_steps(self, card_number: str, steps: list[Step]) -> None:
        key = card_number.encode("ascii")
        if steps:
            self._put(key, records.encode_steps(steps), db=self.dbs.steps)
        else:
            self._delete(key, db=self.dbs.steps)

    def open_steps(self) -> Iterator[tuple[str, list[Step] | CorruptRecord]]:
        """Every card's open steps; a record that cannot be read is yielded as its error, so
        one bad record never hides the others."""
        for key, value in self.txn.cursor(db=self.dbs.steps):
            card_number = bytes(key).decode("ascii", "replace")
            try:
                yield card_number, records.decode_steps(value)
            except CorruptRecord as e:
                yield card_number, e

    # A card's texts, kept beside the hot record: "note" (why it was rejected or cancelled),
    # "ground" (CancelGround name), "organ" (RC-7: the organ that issued a Residence Card),
    # "special" (RC-12: why it takes up to 30 working days), "proxy" (RC-8: who applied on
    # the holder's behalf: relation, ground, name and identity number).
    CARD_TEXTS = ("note", "ground", "organ", "special", "proxy")

    def card_text(self, card_number: str, kind: str) -> str:
        """A proxy's note is its relation and ground in clear (GetCard says the relation) and
        the proxy's identity number and name sealed: without the key, the clear part."""
        assert kind in self.CARD_TEXTS, kind
        key = f"{kind}:{card_number}".encode("ascii")
        value = self.txn.get(key, None, self.dbs.notes)
        if value is None:
            return ""
        value = bytes(value)
        if kind != "proxy" or b"\0" not in value:
            return value.decode("utf-8")
        clear, _, sealed = value.partition(b"\0")
        try:
            return " ".join((clear.decode("utf-8"),
                             self._unseal(self.dbs.notes, key, sealed).decode("utf-8")))
        except (pii.PiiKeyMissing, pii.PiiErased):
            return clear.decode("utf-8")

    def put_card_text(self, card_number: str, kind: str, text: str) -> None:
        assert kind in self.CARD_TEXTS, kind
        key = f"{kind}:{card_number}".encode("ascii")
        value = text.encode("utf-8")
        if kind == "proxy":  # "RELATION GROUND ssn name": the person sealed
            relation, ground, person = text.split(" ", 2)
            value = (f"{relation} {ground}".encode("utf-8") + b"\0"
                     + self._seal(self.dbs.notes, key, person.encode("utf-8")))
        self._put(key, value, db=self.dbs.notes)

    def cards_after(self, after: str) -> Iterator[tuple[str, bytes]]:
        """(card number, record bytes) of every card after `after` ("": all), in order."""
        with self.txn.cursor(db=self.dbs.cards) as cur:
            key = after.encode("ascii")
            if not cur.set_range(key):
                return
            for k, v in cur:
                if k != key:
                    yield bytes(k).decode("ascii"), v

    def card_count(self) -> int:
        return self.txn.stat(self.dbs.cards)["entries"]

    # ---- change log
    def append_change(self, kind: int, time: int, card_number: str, holder_id: int,
                      state: int = 0, flags: int = 0, lock_mask: int = 0, transfer_id: str = "",
                      amount: int = 0, what: int = Changed.BALANCE) -> int:
        """Every change of a card or an account, in one global sequence (SPEC.md section 1);
        the fields of a model.Change."""
        value = records.encode_change(kind, time, card_number, holder_id, state, flags,
                                      lock_mask, transfer_id, amount, what)
        self.dbs.change_seq = seq = self.dbs.change_seq + 1
        self._put(_U64.pack(seq), value, db=self.dbs.changes, append=True)
        return seq

    def changes(self, after: int = 0) -> Iterator[tuple[int, Change]]:
        with self.txn.cursor(db=self.dbs.changes) as cur:
            if cur.set_range(_U64.pack(after + 1)):
                for k, v in cur:
                    yield _U64.unpack(k)[0], records.decode_change(v)

    def last_change(self) -> int:
        """The sequence of the last change committed (0: none)."""
        with self.txn.cursor(db=self.dbs.changes) as cur:
            return _U64.unpack(cur.key())[0] if cur.last() else 0

    # ---- audit trail (SPEC.md section 7): append-only, each event's hash over its fields and
    # the previous event's hash, in the transaction of the change it records
    def append_audit(self, time: int, client_id: str, role: str, method: str,
                     card_number: str = "", purpose: str = "", outcome: str = "OK",
                     count: int = 1, holder: str = "") -> int:
        seq, prev = self.dbs.audit_head
        seq += 1
        # issue 25: an identity or phone number in a free text is masked before it is hashed
        # in (the trail is read by auditors, who need whose file, not the number), and the
        # text is bounded; events written before are not rewritten (the chain holds them)
        if purpose:
            purpose = bounded(mask_text(purpose), config.audit_text_length_max)
        body, tail = records.audit_forms(seq, time, count, (client_id, role, method,
                                                            card_number, purpose, outcome,
                                                            holder))
        digest = audit_hash(prev, body)
        # store format 6: stored without prev_hash, role and method as codes (records.py)
        self._put(_U64.pack(seq), records.stored_audit(AUDIT_ALGORITHM, digest, tail),
                  db=self.dbs.audit, append=True)
        self.dbs.audit_head = (seq, digest)
        return seq

    def verify_audit(self, data_file: str = "", start: tuple[int, bytes] = (0, bytes(32))
                     ) -> tuple[bool, int, int, str]:
        """Walk the chain: (ok, events, first bad sequence, what is wrong with it). An edited
        event fails its own hash; a deleted one leaves a gap; an event moved or replaced breaks
        the next one's prev_hash. (Cutting events off the end is what a chain alone cannot
        show: compare `events` with an export kept elsewhere.)
        `data_file` (the store's data.mdb): the audit database's pages are checked in it
        first (check_tree). A store that cannot be read there (a damaged page, a file cut
        short) raises StoreUnreadable naming the database and the last event read.
        `start`: the (sequence, hash) of the event before the first one here, the last one
        archived (storage/archive.py verify_audit walks the archive's first)."""
        if data_file:
            check_tree(self.txn, data_file, b"audit")
        (seq, prev_hash), n = start, 0
        try:
            for key, value in self.audit_records():
                n += 1
                if key != seq + 1:
                    return False, n, seq + 1, f"event {seq + 1} is missing (next is {key})"
                try:
                    algorithm, prev, digest, body = records.split_audit(value, prev_hash)
                    event = records.decode_audit(value, prev_hash)
                except CorruptRecord as error:
                    return False, n, key, str(error)
                if event.sequence != key:
                    return False, n, key, f"event {key} says it is {event.sequence}"
                if prev != prev_hash:
                    return False, n, key, f"event {key}'s prev_hash is not event {seq}'s hash"
                if audit_hash(prev, body, algorithm) != digest:
                    return False, n, key, audit_mismatch(value, key, seq)
                seq, prev_hash = key, digest
        except LMDB_DAMAGE as error:
            raise StoreUnreadable(f"the audit database cannot be read after event {seq}: "
                                  f"{error}", after=seq) from None
        return True, n, 0, ""

    def audit_records(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """(sequence key, stored bytes) of every audit event after `after`, in order."""
        with self.txn.cursor(db=self.dbs.audit) as cur:
            if cur.set_range(_U64.pack(after + 1)):
                for k, v in cur:
                    yield _U64.unpack(k)[0], bytes(v)

    # ---- holders: their personal information sealed (storage/pii.py), each value with its
    # database and key as associated data; the holders keyed by HMAC-SM3 of the identity
    # number, never the number
    def _index(self, ssn: str) -> bytes:
        ring = self.dbs.pii
        if ring is None:
            raise pii.PiiKeyMissing(self.dbs.pii_index or "(none recorded)",
                                    "the holder index (a look-up by identity number)")
        return ring.index(ssn)

    def _seal(self, db, key: bytes, plain: bytes, deterministic: bool = False) -> bytes:
        ring = self.dbs.pii
        if ring is None:
            raise pii.PiiKeyMissing(self.dbs.pii_index or "(none recorded)",
                                    "a holder's personal information (a write)")
        return ring.seal(self.dbs.name_of[db] + b"\0" + key, plain, deterministic)

    def _unseal(self, db, key: bytes, sealed) -> bytes:
        ring = self.dbs.pii
        if ring is None:
            raise pii.PiiKeyMissing(pii.key_id_of(sealed))
        return ring.open(self.dbs.name_of[db] + b"\0" + bytes(key), bytes(sealed))

    def holder(self, ssn: str) -> tuple[int, HolderInfo] | None:
        key = self._index(ssn)
        value = self.txn.get(key, None, self.dbs.holders)
        return None if value is None else records.decode_holder(
            ssn, value, lambda sealed: self._unseal(self.dbs.holders, key, sealed))

    def put_holder(self, holder_id: int, info: HolderInfo) -> None:
        key = self._index(info.ssn)
        self._put(key, records.encode_holder(
            holder_id, info, lambda plain: self._seal(self.dbs.holders, key, plain)),
            db=self.dbs.holders)
        self._put(_U64.pack(holder_id), key, db=self.dbs.holder_ssn)

    def holder_ssn(self, holder_id: int) -> str | None:
        """The holder's identity number, read from its sealed record (the key needed)."""
        key = self.txn.get(_U64.pack(holder_id), None, self.dbs.holder_ssn)
        value = None if key is None else self.txn.get(key, None, self.dbs.holders)
        if value is None:
            return None
        key = bytes(key)
        return records.decode_holder(
            None, value, lambda sealed: self._unseal(self.dbs.holders, key, sealed))[1].ssn

    def holder_history(self, holder_id: int) -> list[HolderChange]:
        """GZ-20: every earlier value of the holder's fields, oldest first."""
        return [records.decode_holder_change(self._unseal(self.dbs.holder_history, k, v))
                for k, v in self._prefixed(self.dbs.holder_history, _U64.pack(holder_id))]

    def add_holder_change(self, holder_id: int, change: HolderChange) -> None:
        n = sum(1 for _ in self._prefixed(self.dbs.holder_history, _U64.pack(holder_id)))
        key = _U64.pack(holder_id) + n.to_bytes(4, "big")
        self._put(key, self._seal(self.dbs.holder_history, key,
                                  records.encode_holder_change(change)),
                  db=self.dbs.holder_history)

    # the databases whose values are sealed, and where the sealed part of a value starts
    # (holders: after the u64 holder id; notes: after the clear part and a NUL, proxies only)
    # (Not `requests`: a CorrectHolder answer kept for its request id stays under the key that
    # sealed it; walking every request id of a city to find the few would cost a pass for
    # nothing. Once that key is removed, a replay of the correction is PII_ERASED.)
    SEALED = ((b"holders", 8), (b"holder_history", 0), (b"residences", 0), (b"notes", -1))

    def _sealed_part(self, name: bytes, at: int, key: bytes, value: bytes) -> int | None:
        if at >= 0:
            return at
        if not key.startswith(b"proxy:") or b"\0" not in value:
            return None
        return value.index(b"\0") + 1

    def sealed_records(self, start: tuple[int, bytes | None] = (0, None)
                       ) -> Generator[tuple[int, bytes, bytes, int], None, None]:
        """(database number in SEALED, key, value, where its sealed part starts) of every
        sealed value from `start` (database number, the key after which to go on)."""
        for n in range(start[0], len(self.SEALED)):
            name, at = self.SEALED[n]
            after = start[1] if n == start[0] else None
            with self.txn.cursor(db=self.dbs.by_name[name]) as cur:
                more = cur.set_range(after + b"\0") if after is not None else cur.first()
                while more:
                    key, value = bytes(cur.key()), bytes(cur.value())
                    begins = self._sealed_part(name, at, key, value)
                    if begins is not None:
                        yield n, key, value, begins
                    more = cur.next()

    def pii_key_counts(self) -> dict[str, int]:
        """How many sealed values each key id sealed (rotation: the old key's count goes to 0,
        then it may be removed from the key file)."""
        counts: dict[str, int] = {}
        for _, _, value, at in self.sealed_records():
            key_id = pii.key_id_of(value[at:])
            counts[key_id] = counts.get(key_id, 0) + 1
        return counts

    def reseal(self, start: tuple[int, bytes | None], visit_max: int, reseal_max: int,
               deterministic: bool = False) -> tuple[tuple[int, bytes | None] | None, int, int]:
        """Rotation's step: from `start`, every value sealed with a key other than the current
        one sealed again with the current one, up to `reseal_max` of them and `visit_max`
        values looked at. (where to go on, None at the end; resealed; erased: sealed with a
        key the ring no longer holds, left as they are). `deterministic`: nonces as a
        migration's (pii.KeyRing.seal), for a stopped store that every node rotates alike."""
        ring = self.dbs.pii
        if ring is None:
            raise pii.PiiKeyMissing(self.dbs.pii_index or "(none recorded)", "rotation")
        done = erased = visited = 0
        todo = []
        walk = self.sealed_records(start)
        for n, key, value, at in walk:
            visited += 1
            key_id = pii.key_id_of(value[at:])
            if key_id != ring.current:
                if key_id not in ring.keys:
                    erased += 1
                else:
                    todo.append((n, key, value, at))
            if visited >= visit_max or len(todo) >= reseal_max:
                break
        else:
            n, key = -1, None  # the end
        walk.close()  # its cursor, before the writes
        for m, k, value, at in todo:
            db = self.dbs.by_name[self.SEALED[m][0]]
            self._put(k, value[:at] + self._seal(db, k, self._unseal(db, k, value[at:]),
                                                 deterministic), db=db)
            done += 1
        return (None if n < 0 else (n, key)), done, erased

    def credit_records(self, holder_id: int) -> list[CreditRecord]:
        """SH-26, RC-29: the holder's dishonesty records, oldest first."""
        return [records.decode_credit(v)
                for _, v in self._prefixed(self.dbs.credit, _U64.pack(holder_id))]

    def add_credit_record(self, holder_id: int, record: CreditRecord) -> None:
        n = sum(1 for _ in self._prefixed(self.dbs.credit, _U64.pack(holder_id)))
        self._put(_U64.pack(holder_id) + n.to_bytes(4, "big"), records.encode_credit(record),
                     db=self.dbs.credit)

    def employer_credit_records(self, employer: str) -> list[CreditRecord]:
        """RC-29: an employer's records (forged documents in its staff's applications)."""
        return [records.decode_credit(v)
                for _, v in self._prefixed(self.dbs.employer_credit, employer.encode("ascii"))]

    def add_employer_credit(self, employer: str, record: CreditRecord) -> None:
        key = employer.encode("ascii")
        n = sum(1 for _ in self._prefixed(self.dbs.employer_credit, key))
        self._put(key + n.to_bytes(4, "big"), records.encode_credit(record),
                     db=self.dbs.employer_credit)

    # ---- RC-20 to RC-23: a holder's points
    def points(self, holder_id: int):
        """The holder's PointsRecord (yikatong.points), None if there is none."""
        value = self.txn.get(_U64.pack(holder_id), None, self.dbs.points)
        return None if value is None else records.decode_points(value)

    def put_points(self, holder_id: int, record) -> None:
        self._put(_U64.pack(holder_id), records.encode_points(record), db=self.dbs.points)

    # ---- SH-31, GZ-35: electronic cards
    def ecard_of(self, holder_id: int, pack: int) -> str | None:
        """The holder's electronic card of a pack, if one was issued."""
        value = self.txn.get(_U64.pack(holder_id) + bytes((pack,)), None, self.dbs.ecards)
        return None if value is None else bytes(value).decode("ascii")

    def put_ecard(self, number: str, holder_id: int, pack: int) -> None:
        """Both ways: number -> holder id + pack (a key of holder_cards), and back."""
        key = _U64.pack(holder_id) + bytes((pack,))
        self._put(number.encode("ascii"), key, db=self.dbs.ecards)
        self._put(key, number.encode("ascii"), db=self.dbs.ecards)

    def _prefixed(self, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:len(prefix)] != prefix:
                        return
                    yield k, v

    def residences(self, holder_id: int) -> list[tuple[int, str]]:
        """RC-13: (since, address) of every residence address the holder filed, oldest first."""
        prefix = _U64.pack(holder_id)
        out = []
        with self.txn.cursor(db=self.dbs.residences) as cur:
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:8] != prefix:
                        break
                    v = self._unseal(self.dbs.residences, k, v)
                    out.append((_I64.unpack_from(v)[0], bytes(v[8:]).decode("utf-8")))
        return out

    def add_residence(self, holder_id: int, since: int, address: str) -> None:
        n = sum(1 for _ in self._prefixed(self.dbs.residences, _U64.pack(holder_id)))
        key = _U64.pack(holder_id) + n.to_bytes(4, "big")
        self._put(key, self._seal(self.dbs.residences, key,
                                  _I64.pack(since) + address.encode("utf-8")),
                  db=self.dbs.residences)

    def current_card(self, holder_id: int, pack: int) -> str | None:
        value = self.txn.get(_U64.pack(holder_id) + bytes((pack,)), None,
                             self.dbs.holder_cards)
        return None if value is None else bytes(value).decode("ascii")

    def set_current_card(self, holder_id: int, pack: int, card_number: str) -> None:
        self._put(_U64.pack(holder_id) + bytes((pack,)), card_number.encode("ascii"),
                     db=self.dbs.holder_cards)

    # ---- counters
    def next_seq(self, name: bytes) -> int:
        value = self.txn.get(name, None, self.dbs.meta)
        n = (_U64.unpack(value)[0] if value is not None else 0) + 1
        self._put(name, _U64.pack(n), db=self.dbs.meta)
        return n

    def meta(self, name: bytes) -> bytes | None:
        value = self.txn.get(name, None, self.dbs.meta)
        return None if value is None else bytes(value)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._put(name, value, db=self.dbs.meta)

    # ---- issue 28: each gate's acknowledged change sequence, in meta under `gate_ack:ID`
    # (additive keys: a release that knows none of them ignores them; no format change)
    def gate_ack(self, client_id: str) -> tuple[int, int] | None:
        """(sequence, time) the gate last acknowledged, or None."""
        value = self.txn.get(_GATE_ACK + client_id.encode("utf-8"), None, self.dbs.meta)
        return None if value is None else _GATE_ACK_VALUE.unpack(value)

    def put_gate_ack(self, client_id: str, sequence: int, time: int) -> None:
        self._put(_GATE_ACK + client_id.encode("utf-8"), _GATE_ACK_VALUE.pack(sequence, time),
                  db=self.dbs.meta)

    def gate_acks(self) -> Iterator[tuple[str, int, int]]:
        """(client id, sequence, time) of every gate that acknowledged, by id."""
        for k, v in self._prefixed(self.dbs.meta, _GATE_ACK):
            yield (bytes(k[len(_GATE_ACK):]).decode("utf-8"), *_GATE_ACK_VALUE.unpack(v))

    # ---- issue 28: journeys (yikatong/journeys.py encodes the record)
    def journey(self, hold_id: str) -> bytes | None:
        value = self.txn.get(hold_id.encode("utf-8"), None, self.dbs.journeys)
        return None if value is None else bytes(value)

    def put_journey(self, hold_id: str, record: bytes) -> None:
        self._put(hold_id.encode("utf-8"), record, db=self.dbs.journeys)

    def forget_journey(self, hold_id: str) -> None:
        """A journey whose hold is archived, once the tap owed its telling was told."""
        self._delete(hold_id.encode("utf-8"), db=self.dbs.journeys)

    def journey_untold(self, key: bytes, take: bool = False) -> str | None:
        """The hold id of the account's last journey left open that no tap was told of;
        `take`: and forget it (it is being told)."""
        value = self.txn.get(key, None, self.dbs.journeys_untold)
        if value is None:
            return None
        hold_id = bytes(value).decode("utf-8")
        if take:
            self._delete(key, db=self.dbs.journeys_untold)
        return hold_id

    def put_journey_untold(self, key: bytes, hold_id: str) -> None:
        self._put(key, hold_id.encode("utf-8"), db=self.dbs.journeys_untold)

    # ---- idempotency: request id -> (fingerprint of the request, when, the first answer)
    def replay(self, request_id: str, fingerprint: bytes) -> bytes | None:
        """The first answer to `request_id`, None if unseen; IdReused if it asked otherwise.
        An id moved to the archive (storage/archive.py) is answered from its segment."""
        key = request_id.encode("utf-8")
        seq = self.txn.get(key, None, self.dbs.requests)
        if seq is not None:
            value = self.txn.get(seq, None, self.dbs.answers)
            if value is None:
                raise CorruptRecord(f"request id {request_id[:24]!r} names remembered answer "
                                    f"{_U64.unpack(seq)[0]}, which is not stored")
            stored_id, kept, _, answer = records.decode_answer(value)
            if stored_id != key:
                raise CorruptRecord(f"remembered answer {_U64.unpack(seq)[0]} is not request "
                                    f"id {request_id[:24]!r}'s")
        else:
            found = archive.request(self, key)
            if found is None:
                return None
            kept, answer = found
        if fingerprint[:len(kept)] != kept:
            raise IdReused(request_id)
        return answer

    def archived(self, request_id: str) -> bool:
        """Whether `request_id` (a transfer's id too) was moved to the archive."""
        return self.txn.get(archive.id_digest(request_id.encode("utf-8")), None,
                            self.dbs.archived_ids) is not None

    def remember(self, request_id: str, fingerprint: bytes, answer: bytes) -> None:
        """Store format 6: the answer under the next sequence of `answers` (appended: the
        oldest first, for the archive), with the id, the time (the server's clock) and the
        fingerprint's first 16 bytes; `requests` maps the id to that sequence."""
        assert len(fingerprint) == 32
        key, now = request_id.encode("utf-8"), max(0, self.dbs.now())
        self.dbs.answer_seq = seq = self.dbs.answer_seq + 1
        self._put(_U64.pack(seq), records.encode_answer(key, fingerprint, now, answer),
                  db=self.dbs.answers, append=True)
        self._put(key, _U64.pack(seq), db=self.dbs.requests)

    def once_sealed(self, request_id: str, fingerprint: bytes,
                    produce: Callable[[], bytes]) -> bytes:
        """`once`, the answer stored sealed: for an answer that holds a holder's personal
        information (a replay needs the key). A clear answer stored by store format 3 is
        given back as it is."""
        key = request_id.encode("utf-8")
        answer = self.replay(request_id, fingerprint)
        if answer is not None:
            if answer[:1] != bytes((pii.SEALED_VERSION,)):
                return answer
            return self._unseal(self.dbs.requests, key, answer)
        answer = produce()
        self.remember(request_id, fingerprint, self._seal(self.dbs.requests, key, answer))
        return answer

    def once(self, request_id: str, fingerprint: bytes, produce: Callable[[], bytes]) -> bytes:
        """The first answer to `request_id`, or `produce()`'s, remembered in this transaction."""
        answer = self.replay(request_id, fingerprint)
        if answer is None:
            answer = produce()
            self.remember(request_id, fingerprint, answer)
        return answer

    # ---- accounts
    def hold_accounts(self) -> None:
        """From here to `write_held()`, the accounts read or changed and the ledger's totals
        are kept in this book and written once at the end: a money command's hundred debits
        credit one operator account and move the totals a hundred times (one write each, not
        a hundred). Only for a command that fails whole if anything in it raises (its child
        transaction is dropped with this book), and that reads accounts only through it
        (fastpath Fares reads and changes `_held` and `_changed` as `account` and
        `put_account` do)."""
        self._held, self._changed, self._totals = {}, {}, None

    def write_held(self) -> None:
        """Write what changed since `hold_accounts()`, in the order first changed."""
        held, self._held = self._held, None
        assert held is not None, "write_held() without hold_accounts()"
        for key in self._changed:
            self._put(key, records.encode_account(held[key]), db=self.dbs.accounts)
        if self._totals is not None:
            self._put(_TOTALS_KEY, _TOTALS.pack(*self._totals), db=self.dbs.meta)
        self._changed, self._totals = {}, None

    def account(self, key: bytes) -> Account:
        held = self._held
        a = held.get(key) if held is not None else None
        if a is None:
            value = self.txn.get(key, None, self.dbs.accounts)
            a = Account() if value is None else records.decode_account(value)
            if held is not None:
                held[key] = a
        return a

    def put_account(self, key: bytes, account: Account) -> None:
        if self._held is not None:
            records.encode_account(account)  # refused now (beyond int64), not at the end
            self._held[key] = account
            self._changed[key] = None
            return
        self._put(key, records.encode_account(account), db=self.dbs.accounts)

    def accounts(self) -> Iterator[tuple[bytes, Account]]:
        assert self._held is None, "accounts() while accounts are held"
        for key, value in self.txn.cursor(db=self.dbs.accounts):
            yield bytes(key), records.decode_account(value)

    def ledger_totals(self) -> tuple[int, int, int, int]:
        """The running totals of the four balance columns: debits pending and posted,
        credits pending and posted."""
        if self._totals is not None:
            return self._totals
        value = self.txn.get(_TOTALS_KEY, None, self.dbs.meta)
        return _TOTALS.unpack(value) if value is not None else (0, 0, 0, 0)

    def add_to_ledger_totals(self, pending: int, posted: int) -> tuple[int, int, int, int]:
        """Add one movement (both sides) to the running totals; returns them."""
        dp, dpost, cp, cpost = self.ledger_totals()
        totals = (dp + pending, dpost + posted, cp + pending, cpost + posted)
        if self._held is not None:
            self._totals = totals
        else:
            self._put(_TOTALS_KEY, _TOTALS.pack(*totals), db=self.dbs.meta)
        return totals

    # ---- transfers
    def transfer(self, transfer_id: str) -> Transfer | None:
        value = self.txn.get(transfer_id.encode("utf-8"), None, self.dbs.transfers)
        return None if value is None else records.decode_transfer(value)

    def put_transfer(self, transfer_id: str, t: Transfer, *, new: bool = False) -> bool:
        """Store a transfer; False (nothing written) if `new` and the id exists."""
        return self._put(transfer_id.encode("utf-8"), records.encode_transfer(t),
                            db=self.dbs.transfers, overwrite=not new)

    # ---- open holds, indexed by timeout (for the sweep) and by debited account
    def add_hold(self, transfer_id: str, t: Transfer) -> None:
        self._put(_U64.pack(t.timeout_at) + transfer_id.encode("utf-8"), b"",
                     db=self.dbs.holds_by_timeout)
        self._put(_held_key(t.debit, t.timeout_at, transfer_id), _I64.pack(t.amount),
                     db=self.dbs.holds_by_account)

    def drop_hold(self, transfer_id: str, t: Transfer) -> None:
        self._delete(_U64.pack(t.timeout_at) + transfer_id.encode("utf-8"),
                        db=self.dbs.holds_by_timeout)
        self._delete(_held_key(t.debit, t.timeout_at, transfer_id),
                        db=self.dbs.holds_by_account)

    def holds(self, key: bytes) -> list[tuple[int, str, int]]:
        """The open holds on an account as (timeout_at, transfer id, fen), soonest first."""
        prefix = key.ljust(_KEY_WIDTH, b"\0")
        out = []
        with self.txn.cursor(db=self.dbs.holds_by_account) as cur:
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:_KEY_WIDTH] != prefix:
                        break
                    out.append((_U64.unpack_from(k, _KEY_WIDTH)[0],
                                bytes(k[_KEY_WIDTH + 8:]).decode("utf-8"), _I64.unpack(v)[0]))
        return out

    def holds_due(self, now: int, limit: int) -> list[str]:
        """Ids of up to `limit` open holds whose timeout has come (timeout_at <= now)."""
        due: list[str] = []
        with self.txn.cursor(db=self.dbs.holds_by_timeout) as cur:
            if cur.first():
                for k in cur.iternext(values=False):
                    if _U64.unpack_from(k)[0] > now or len(due) >= limit:
                        break
                    due.append(bytes(k[8:]).decode("utf-8"))
        return due


def _held_key(key: bytes, timeout_at: int, transfer_id: str) -> bytes:
    return key.ljust(_KEY_WIDTH, b"\0") + _U64.pack(timeout_at) + transfer_id.encode("utf-8")

"""What every servicer shares: the core (store, clock, fast-path policy, change feed), the
fingerprint a request id is bound to, and the decoding of requests the wire path left to
Python."""
import asyncio
import collections
import contextlib
import hashlib
import time

from yikatong import config, fastpath
from yikatong.errors import TooManyCalls
from yikatong.model import (
    IssuingBanks,
)
from yikatong.server import errors
from yikatong.server.clients import Client
from yikatong.server.errors import Undecodable
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

_APPROVED, _DECLINED = pb.DECISION_APPROVED, pb.DECISION_DECLINED


class Core:
    """What every servicer shares: the store, the clock, the fast path's policy."""

    def __init__(self, store: Store, clock, banks: IssuingBanks | None = None):
        self.store = store
        self.clock = clock
        self.banks = banks  # GZ-9c; None: no list configured, the check is off
        self.policy = fastpath.Policy(config.generation_retired_at)
        self.feed = Feed(store)
        self.signing = None  # issue 28: server.signing.Signing, --signing-key-file

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
        if method in SEALED_ANSWERS:  # stored sealed, as the holder's record (storage/pii.py)
            return await self.write(lambda book: book.once_sealed(
                request_id, fp, lambda: op(book, clock.now(), fp)))
        return await self.write(
            lambda book: book.once(request_id, fp, lambda: op(book, clock.now(), fp)))


# the writes whose answer holds a holder's personal information (CorrectHolder's HolderRecord)
SEALED_ANSWERS = frozenset({"CorrectHolder"})


class History:
    """What one client may spend on this worker replaying the feed's history (issue 25,
    finding 2): `replays_max` replays at once, and `events_per_second` events among them (a
    token bucket run into debt: a replay that takes more than is left waits the debt out, so
    a flood of replays costs the loop that rate at most, whatever their number)."""

    def __init__(self, replays_max: int = config.history_replays_max,
                 events_per_second: float = config.history_events_per_second_max,
                 stall_seconds: float = config.stream_stall_seconds_max):
        self.replays_max, self.rate = replays_max, events_per_second
        self.stall_seconds = stall_seconds  # how long a lag may stay without shrinking
        self.replays: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # client id -> (tokens, when)

    def start(self, client_id: str) -> None:
        if self.replays[client_id] >= self.replays_max:
            raise TooManyCalls(f"client {client_id} already has {self.replays_max} history "
                               "replays in progress (history_replays_max); retry when one "
                               "has caught up, or watch from nearer the head")
        self.replays[client_id] += 1

    def end(self, client_id: str) -> None:
        left = self.replays[client_id] - 1
        if left:
            self.replays[client_id] = left
        else:
            del self.replays[client_id]

    async def take(self, client_id: str, events: int) -> None:
        now = time.monotonic()
        tokens, then = self._buckets.get(client_id, (self.rate, now))
        tokens = min(self.rate, tokens + (now - then) * self.rate) - events
        self._buckets[client_id] = (tokens, now)
        if tokens < 0:
            await asyncio.sleep(-tokens / self.rate)


class Feed:
    """What the change feed's watchers on this worker wait on: the last committed change
    sequence, looked for every config.watch_poll_seconds while anyone watches (whichever
    worker committed it: the store is the one place they all see), and one event that
    wakes every watcher when it moves. `history`: each client's budget for replays."""

    def __init__(self, store: Store):
        self.store = store
        self.history = History()
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



def decode(message_class, raw: bytes):
    """A request the wire path left to Python: decoded, or INVALID_ARGUMENT as calls.py
    says of any undecodable request."""
    request = errors.decoder(message_class)(raw)
    if type(request) is Undecodable:
        raise request.error()
    return request

"""AuthorizeStream works on several messages of a stream at once (config
stream_messages_in_flight_max): a message of debits the wire path takes goes to the writer as
it arrives, behind those before it, so one stream's messages share a commit group; answers
come in the order of the messages; a message the wire path does not take waits for those
before it; a message that fails ends the stream with nothing after it written. Each case is
checked against the Python path (every message decoded, one after another) where the two
must agree."""
import asyncio
import contextlib
import gc
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire_money import GATE, Pair, answer, batch, both, dump, request

from yikatong import config, fastpath
from yikatong.model import Channel
from yikatong.server.metrics import REASONS, metrics
from yikatong.v1 import yikatong_pb2 as pb

pytestmark = pytest.mark.skipif(fastpath.money_wire is None,
                                reason="YIKATONG_NO_EXTENSIONS: the wire path is compiled only")
CARD = f"31{1:010d}"  # active, its transit purse holds 1,000 fen (test_wire_money.make_store)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@contextlib.contextmanager
def writer_held(store):
    """The writer busy with a command that waits until the block ends: whatever is queued
    meanwhile is applied after it, in the order queued."""
    release, began = threading.Event(), threading.Event()

    def hold(book):
        began.set()
        release.wait(10)
    done = store.submit(hold)
    began.wait(10)
    try:
        yield
    finally:
        release.set()
        done.result(10)


def stream(servicer, store, messages, raw=True, queued=None):
    """The answers to `messages` sent on one stream while the writer is held until
    `queued` commands wait in its queue (the stream read ahead), then released."""
    async def run():
        with writer_held(store):
            task = asyncio.ensure_future(answer(servicer, "AuthorizeStream", messages, GATE,
                                                raw))
            for _ in range(2000 if queued is not None else 0):  # 2 s at most
                if store._queue.qsize() >= queued or task.done():
                    break
                await asyncio.sleep(0.001)
            assert queued is None or store._queue.qsize() >= queued, "not read ahead"
        return await task
    return asyncio.run(run())


def decisions(answers):
    return [[(r.request_id, r.decision) for r in pb.AuthorizeBatchResponse.FromString(a).responses]
            for _, a in answers]


def test_a_streams_debit_messages_are_queued_together_and_answered_in_order(pair):
    store = pair.stores[0]
    groups = []
    store.on_commit = lambda size, _: groups.append(size)
    messages = [batch(request(f"m{m}", CARD, amount=10)) for m in range(5)]
    answers = stream(pair.wire, store, messages, queued=5)  # all five read ahead
    assert decisions(answers) == [[(f"m{m}", pb.DECISION_APPROVED)] for m in range(5)]
    assert groups == [1, 5]  # the held command's group, then one group of all five
    assert answers == asyncio.run(
        answer(pair.python, "AuthorizeStream", messages, GATE, False))
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_stream_reads_ahead_no_more_than_its_bound(pair):
    store = pair.stores[0]
    messages = [batch(request(f"b{m}", CARD, amount=1))
                for m in range(config.stream_messages_in_flight_max + 3)]

    async def run():
        with writer_held(store):
            task = asyncio.ensure_future(answer(pair.wire, "AuthorizeStream", messages, GATE,
                                                True))
            for _ in range(200):
                await asyncio.sleep(0.002)
            queued = store._queue.qsize()
        return queued, await task
    queued, answers = asyncio.run(run())
    assert queued == config.stream_messages_in_flight_max
    assert len(answers) == len(messages) and all(kind == "ok" for kind, _ in answers)


def test_a_message_the_wire_path_leaves_waits_for_those_before_it_and_so_does_the_next(pair):
    """1,000 fen: 600 (wire), then 400 in a message mixing a status-only check (the Python
    path's, after the first commits: approved), then 300 (wire; behind the second, so
    declined). Had the third gone ahead of the second, it would be approved."""
    messages = [batch(request("a", CARD, amount=600)),
                batch(request("b", CARD, amount=400),
                      request("b-status", CARD, channel=Channel.STATUS)),
                batch(request("c", CARD, amount=300))]
    answers = both(pair, "AuthorizeStream", messages, GATE)
    assert decisions(answers) == [[("a", pb.DECISION_APPROVED)],
                                  [("b", pb.DECISION_APPROVED), ("b-status", pb.DECISION_APPROVED)],
                                  [("c", pb.DECISION_DECLINED)]]
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_failed_message_ends_the_stream_and_nothing_queued_after_it_is_written(pair):
    """The second message reuses the first's request id with another amount (ID_REUSED,
    found in the writer); the third was queued behind it before it ran, and is not run."""
    asyncio.run(answer(pair.wire, "AuthorizeStream", [batch(request("x", CARD, amount=5))],
                       GATE, True))
    asyncio.run(answer(pair.python, "AuthorizeStream", [batch(request("x", CARD, amount=5))],
                       GATE, False))
    messages = [batch(request("y", CARD, amount=7)), batch(request("x", CARD, amount=6)),
                batch(request("z", CARD, amount=9))]
    answers = stream(pair.wire, pair.stores[0], messages, queued=3)
    assert [a[0] for a in answers] == ["ok", "refused"]
    assert answers[1][1] == "IdReused"
    assert answers == asyncio.run(answer(pair.python, "AuthorizeStream", messages, GATE, False))
    assert dump(pair.stores[0]) == dump(pair.stores[1])  # no "z" in either
    with pair.stores[0].read() as txn:
        assert txn.get(b"z", db=pair.stores[0].dbs.requests) is None
        assert txn.get(b"y", db=pair.stores[0].dbs.requests) is not None


def test_a_message_that_does_not_parse_ends_the_stream_after_the_answers_before_it(pair):
    messages = [batch(request("p", CARD, amount=3)), b"\xff\xff\xff",
                batch(request("q", CARD, amount=4))]
    got = both(pair, "AuthorizeStream", messages, GATE)
    assert [a[0] for a in got] == ["ok", "refused"] and got[1][1] == "InvalidArgument"
    assert dump(pair.stores[0]) == dump(pair.stores[1])


def test_a_message_queued_as_the_one_before_it_fails_is_not_run_and_leaves_nothing_behind(
        caplog):
    """The failure of the head and the next message's arrival seen in one wake-up (found by
    a review): the next, queued for the writer, is cancelled or refused by the chain, and
    no future is left with an error nobody reads (asyncio logs those as they go)."""
    pair = Pair()
    store = pair.stores[0]
    try:
        asyncio.run(answer(pair.wire, "AuthorizeStream", [batch(request("x", CARD, amount=5))],
                           GATE, True))

        async def run():
            arrive = asyncio.Event()

            async def source():
                yield batch(request("x", CARD, amount=6))  # ID_REUSED, found in the writer
                await arrive.wait()
                yield batch(request("n", CARD, amount=1))
                await asyncio.sleep(100)
            got = []

            async def consumer():  # as calls._streaming: a write between answers
                try:
                    async for a in pair.wire.AuthorizeStream(source(), GATE):
                        got.append(a)
                        await asyncio.sleep(0.001)
                except Exception as error:  # noqa: BLE001 - the stream's end
                    got.append(type(error).__name__)
            with writer_held(store):
                task = asyncio.ensure_future(consumer())
                await asyncio.sleep(0.05)
                arrive.set()  # "n" arrives as the writer, released, fails "x"
            time.sleep(0.2)  # the loop busy meanwhile: both are seen in one wake-up
            await task
            await asyncio.sleep(0.3)  # the writer has answered "n" (refused or skipped)
            return got
        assert asyncio.run(run()) == ["IdReused"]
        with store.read() as txn:
            assert txn.get(b"n", db=store.dbs.requests) is None
    finally:
        pair.close()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@st.composite
def any_message(draw):
    """Mostly debits the wire path takes, on a few cards and request ids (replays and
    ID_REUSED come); else status-only, mixed, a hold and its post, refused or undecodable."""
    def rid(prefix=""):
        return prefix + draw(st.sampled_from("abcdef"))

    def card():
        return draw(st.sampled_from([f"31{h:010d}" for h in (1, 2, 3, 5)]))
    kind = draw(st.sampled_from(["money"] * 3 + ["status", "mixed", "bad", "junk", "hold",
                                                  "post", "channel"]))
    if kind == "money":
        return batch(*[request(rid(), card(), amount=draw(st.sampled_from([1, 300, 600])))
                       for _ in range(draw(st.integers(1, 3)))])
    return {
        "status": lambda: batch(request(rid(), card(), channel=Channel.STATUS)),
        "mixed": lambda: batch(request(rid(), card(), amount=400),
                               request(rid("s"), card(), channel=Channel.STATUS)),
        "bad": lambda: batch(request(rid(), card(), amount=-1)),
        "junk": lambda: b"\xff\xff\xff",
        "hold": lambda: batch(request(rid("h"), card(), amount=700, phase=pb.PHASE_HOLD,
                                      hold_timeout_seconds=60)),
        "post": lambda: batch(request(rid("p"), card(), amount=50, phase=pb.PHASE_POST,
                                      hold_request_id=rid("h"))),
        "channel": lambda: batch(request(rid(), card(), channel=Channel.MEDICAL, amount=5)),
    }[kind]()


def counted(servicer, store, messages, raw: bool, held: bool):
    """A stream's answers and the decisions counted meanwhile; `held`: the writer busy until
    the stream has read ahead as far as it will."""
    before = list(metrics.decisions)

    async def run():
        if not held:
            return await answer(servicer, "AuthorizeStream", messages, GATE, raw)
        with writer_held(store):
            task = asyncio.ensure_future(answer(servicer, "AuthorizeStream", messages, GATE,
                                                raw))
            for _ in range(20):
                await asyncio.sleep(0.001)
        return await task
    return asyncio.run(run()), [a - b for a, b in zip(metrics.decisions, before, strict=True)]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(any_message(), min_size=1, max_size=10), min_size=1, max_size=3),
       st.booleans())
def test_any_streams_answer_and_write_as_one_message_after_another(streams, held):
    """The Python path's side decides each message after the one before it is answered."""
    pair = Pair()
    try:
        for messages in streams:
            assert counted(pair.wire, pair.stores[0], messages, True, held) == \
                counted(pair.python, pair.stores[1], messages, False, False)
        assert dump(pair.stores[0]) == dump(pair.stores[1])
    finally:
        pair.close()


def test_debits_committed_for_a_stream_that_ended_before_their_answers_are_counted(pair):
    store = pair.stores[0]
    messages = [batch(request(f"c{m}", CARD, amount=2)) for m in range(3)]

    async def source():
        for m in messages:
            yield m

    async def run():
        stream = pair.wire.AuthorizeStream(source(), GATE)
        with writer_held(store):
            first = asyncio.ensure_future(anext(stream))
            for _ in range(2000):
                if store._queue.qsize() >= 3:
                    break
                await asyncio.sleep(0.001)
        await first
        await asyncio.sleep(0.2)  # the other two committed meanwhile, never asked for
        await stream.aclose()
    before = metrics.decisions[Channel.TRANSIT * REASONS]
    asyncio.run(run())
    assert metrics.decisions[Channel.TRANSIT * REASONS] - before == 3
    with store.read() as txn:
        assert all(txn.get(f"c{m}".encode(), db=store.dbs.requests) for m in range(3))

"""The replicated log replication will stand on (issue 18): a 3-node NATS JetStream cluster on
loopback ports, started and stopped by the test (server.harness.NatsCluster). A stream with 3
replicas takes a publish only with the expected last sequence, so a writer that lost its
place can never append (fencing by the log itself), and keeps taking them with one node of
three killed."""
import asyncio
import shutil
import time
import urllib.request

import nats
import pytest
from nats.js.errors import APIError, NoStreamResponseError

from yikatong.server.harness import NatsCluster, wait_until

EXPECTED = "Nats-Expected-Last-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence check


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


async def publish_until(js, data: bytes, last: int, seconds: float) -> int:
    """The sequence the log gave `data` appended after `last`; retried while the stream has
    no leader (an election after a node died), for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            ack = await js.publish("yk.log", data, headers={EXPECTED: str(last)}, timeout=2)
            return ack.seq
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                NoStreamResponseError):
            if time.monotonic() > deadline:
                raise


def test_a_fenced_append_survives_one_node_of_three(cluster):
    async def main():
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2)
        js = nc.jetstream()
        for _ in range(100):  # a new cluster elects its meta leader first
            try:
                await js.add_stream(name="YK", subjects=["yk.log"], num_replicas=3)
                break
            except (TimeoutError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        assert await publish_until(js, b"group 1", 0, 10) == 1
        assert await publish_until(js, b"group 2", 1, 10) == 2
        with pytest.raises(APIError) as stale:  # a writer that believes the log ends at 1
            await js.publish("yk.log", b"stale", headers={EXPECTED: "1"})
        assert stale.value.err_code == WRONG_LAST_SEQUENCE
        info = await js.stream_info("YK")
        assert info.state.messages == 2 and len(info.cluster.replicas) == 2
        victim = int(info.cluster.leader.removeprefix("n"))  # the stream's leader dies
        cluster.kill(victim)
        started = time.monotonic()
        assert await publish_until(js, b"group 3", 2, 20) == 3
        elected = time.monotonic() - started
        message = await js.get_msg("YK", 3)
        assert message.data == b"group 3"
        await nc.close()
        return elected

    elected = asyncio.run(main())
    assert elected < 20  # bounded: the next append after the leader's death


def test_a_leader_s_groups_reach_a_follower_and_a_stale_writer_is_fenced(cluster, tmp_path):
    """Each commit group is appended to the log before it commits: a follower store reading
    the log converges to the leader's bytes; a store that is behind the log and tries to
    write is fenced and commits nothing; with one log node of three dead, the leader still
    writes and the follower still follows."""
    from test_replication import digest

    from yikatong.errors import Fenced
    from yikatong.storage.lmdb_store import Store
    from yikatong.storage.replication import Follower, Log

    leader_log, follower_log, stale_log = (Log(cluster.urls) for _ in range(3))
    leader = Store(str(tmp_path / "leader"), replicate=leader_log.append)
    follower_store = Store(str(tmp_path / "follower"))
    stale = Store(str(tmp_path / "stale"), replicate=stale_log.append)
    follower = Follower(follower_store, follower_log)
    try:
        for i in range(50):
            leader.write(lambda book, i=i: book.put_meta(f"k{i}".encode(), b"v" * i))
        assert wait_until(lambda: follower.applied == 50, 20), follower.error
        assert digest(follower_store) == digest(leader)
        with pytest.raises(Fenced, match="moved past sequence 0"):
            stale.write(lambda book: book.put_meta(b"mine", b"x"))
        with stale.read() as txn:
            assert stale.book(txn).meta(b"mine") is None
        cluster.kill(0)
        started = time.monotonic()
        for i in range(50, 60):
            write_until(leader, lambda book, i=i: book.put_meta(f"k{i}".encode(), b"w"), 20)
        assert time.monotonic() - started < 30
        assert wait_until(lambda: follower.applied == 60, 20), follower.error
        assert digest(follower_store) == digest(leader)
    finally:
        follower.stop()
        for store in (leader, follower_store, stale):
            store.close()
        for log in (leader_log, follower_log, stale_log):
            log.close()


def write_until(store, command, seconds: float):
    """A write retried while the log elects a new leader for the stream (LogUnavailable:
    nothing was committed, so a retry is safe)."""
    from yikatong.errors import LogUnavailable

    deadline = time.monotonic() + seconds
    while True:
        try:
            return store.write(command)
        except LogUnavailable:
            if time.monotonic() > deadline:
                raise


def test_the_write_lease_moves_when_its_holder_stalls_and_the_old_writer_follows(
        cluster, tmp_path):
    """Three nodes: one takes the write lease and writes, the others follow and refuse
    writes naming it. The writer stalls (renews nothing): within the lease's time another
    node that has applied the whole log takes it and writes. The old writer, back, cannot
    renew, follows again, and refuses writes; every node ends with the same bytes."""
    from test_replication import digest

    from yikatong.errors import Fenced
    from yikatong.storage.lmdb_store import Store
    from yikatong.storage.replication import Node

    stores = [Store(str(tmp_path / f"node{i}")) for i in range(3)]
    nodes = [Node(store, cluster.urls, f"node{i}", f"127.0.0.1:{7000 + i}", ttl=2.0)
             for i, store in enumerate(stores)]
    try:
        assert wait_until(lambda: sum(n.leading for n in nodes) == 1, 30)
        (first,) = [n for n in nodes if n.leading]
        for i in range(20):
            first.store.write(lambda book, i=i: book.put_meta(f"a{i}".encode(), b"1"))
        other = next(n for n in nodes if n is not first)
        refused = error_of_write(other.store)
        assert f"the writer is {first.node_id} at 127.0.0.1:" in str(refused)
        first.pause()
        started = time.monotonic()
        assert wait_until(lambda: any(n.leading for n in nodes if n is not first), 30)
        took = time.monotonic() - started
        (second,) = [n for n in nodes if n.leading and n is not first]
        for i in range(20):
            write_until(second.store, lambda book, i=i: book.put_meta(f"b{i}".encode(), b"2"),
                        10)
        first.pause(False)
        assert wait_until(lambda: not first.leading, 10)
        with pytest.raises(Fenced):
            first.store.write(lambda book: book.put_meta(b"late", b"x"))
        assert wait_until(lambda: len({digest(s) for s in stores}) == 1, 20)
        assert took < 2.0 * 4  # the lease's time and an election, well within
    finally:
        for node in nodes:
            node.stop()
        for store in stores:
            store.close()


def error_of_write(store):
    from yikatong.errors import Fenced

    with pytest.raises(Fenced) as refused:
        store.write(lambda book: book.put_meta(b"follower", b"x"))
    return refused.value


def test_a_log_server_whose_disk_died_is_caught_up_and_holds_the_records(cluster, tmp_path):
    """docs/OPERATIONS.md, "The NATS JetStream cluster": a server started again with its name
    and an empty store_dir is caught up by the other two (a current replica, no lag); then,
    with one of those two dead, it is one of the quorum of two: appends go on and every
    record is still read."""
    def healthy(i: int) -> bool:  # /healthz: JetStream current with the cluster's meta leader
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{cluster.monitors[i]}/healthz",
                                        timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    async def main():
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2)
        js = nc.jetstream()
        for _ in range(100):
            try:
                await js.add_stream(name="YK", subjects=["yk.log"], num_replicas=3)
                break
            except (TimeoutError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        for n in range(1, 51):
            assert await publish_until(js, f"group {n}".encode(), n - 1, 10) == n
        info = await js.stream_info("YK")
        victim = next(i for i in range(3) if f"n{i}" != info.cluster.leader)
        cluster.kill(victim)
        shutil.rmtree(tmp_path / f"js-{victim}")  # its disk died
        cluster.start(victim)

        electing = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    NoStreamResponseError, APIError)  # the stream has no leader for a while

        async def caught_up() -> bool:
            try:
                info = await js.stream_info("YK")
            except electing:
                return False
            peers = {info.cluster.leader: (True, 0)} | {
                r.name: (r.current, r.lag or 0) for r in info.cluster.replicas or ()}
            return peers.get(f"n{victim}") == (True, 0) and len(peers) == 3
        deadline = time.monotonic() + 30
        while not await caught_up() or not healthy(victim):
            assert time.monotonic() < deadline, "the new server never caught up"
            await asyncio.sleep(0.2)
        other = next(i for i in range(3) if i != victim)
        cluster.kill(other)  # the records now live on the victim and one more
        assert await publish_until(js, b"group 51", 50, 30) == 51
        for n in (1, 25, 50, 51):
            for _ in range(100):
                try:
                    message = await js.get_msg("YK", n)
                    break
                except electing:
                    await asyncio.sleep(0.2)
            assert message.data == f"group {n}".encode()
        await nc.close()

    asyncio.run(main())

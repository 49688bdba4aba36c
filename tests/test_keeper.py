"""Issue 27 item 1: a replicated node on every core. `serve --replicate --workers 2`: a log
keeper process holds the node's lease, log, follower and intake (storage/keeper.py); both
workers serve reads from the node's LMDB and write into it, their records reaching the log
through the keeper in the order of their commits. Every process started and stopped here,
on loopback ports, beside a 3-node NATS JetStream cluster."""
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_calls import error_info
from test_cluster import balance, probe, start, top_up, writer_of
from test_e2e import new_active_card
from test_workers import answering_pids, fresh_channel, scrape

from yikatong.server.harness import NatsCluster, store_digest, wait_until
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


def health(node) -> int:
    try:
        return health_pb2_grpc.HealthStub(node.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return -1


def debits_from_many_connections(node, card: str, prefix: str, count: int,
                                 channels: int = 6) -> dict[str, bytes]:
    """`count` debits of 1 fen, spread over `channels` connections (the kernel hands each
    to one worker), acknowledged answers by request id."""
    acked: dict[str, bytes] = {}
    lock = threading.Lock()

    def run(c: int) -> None:
        channel = fresh_channel(node.address)
        stub = rpc.AuthorizationStub(channel)
        try:
            for n in range(c, count, channels):
                rid = f"{prefix}-{n}"
                answer = stub.Authorize(pb.AuthorizeRequest(
                    request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=1,
                    terminal_id="gate-1"), metadata=node.md("TRANSIT_GATE"), timeout=20)
                with lock:
                    acked[rid] = answer.SerializeToString()
        finally:
            channel.close()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(channels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return acked


def test_a_writer_of_two_workers_appends_both_workers_writes_in_one_order(cluster, tmp_path):
    """Node 0 (two workers and their keeper) takes the lease and writes; debits from many
    connections are answered by both workers; every follower applies the same log, and
    every node ends with the same bytes. A single node and a node of workers agree."""
    nodes = [start(tmp_path, cluster, 0, "--workers", "2")]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        nodes += [start(tmp_path, cluster, i) for i in (1, 2)]
        writer = nodes[0]
        assert writer_of(nodes) is writer
        keeper = writer.keeper_pid()
        assert keeper is not None
        sock = os.stat(os.path.join(writer.data_dir, "keeper.sock"))  # the server's user only
        assert sock.st_mode & 0o777 == 0o600 and sock.st_uid == os.getuid()
        cards = [new_active_card(writer, n) for n in (1, 2)]
        for card in cards:
            top_up(writer, card, 10_000)
        acked = {}
        for card in cards:
            acked.update(debits_from_many_connections(writer, card, card[-4:], 200))
        assert len(acked) == 400
        pids = set(answering_pids(writer, "Authorization.Authorize"))
        assert len(pids) == 2 and keeper not in pids, pids  # both workers wrote
        for node in nodes:
            for card in cards:
                assert wait_until(lambda n=node, c=card: balance(n, c) == 10_000 - 200, 20)
        for rid, answer in acked.items():  # a replay on either worker: the first answer
            card = cards[0] if rid.startswith(cards[0][-4:]) else cards[1]
            assert debit_1(writer, card, rid) == answer
        legacy_and_chained_frames_are_admitted_as_chains(writer.data_dir)
        metrics = scrape(writer.metrics)
        assert metrics[("yikatong_replication_writer", frozenset())] == 1
        assert metrics[("yikatong_not_serving_reason",
                        frozenset({("reason", "log_keeper_down")}))] == 0
    finally:
        for node in nodes:
            node.stop()
    assert len({store_digest(n.data_dir) for n in nodes}) == 1


def legacy_and_chained_frames_are_admitted_as_chains(data_dir: str) -> None:
    """On the keeper's socket, as a worker: the keeper says it takes chains (frames of
    version 1 still: a rolling restart renews the workers before the keeper); an APPEND of
    the release before is taken as a transaction's first record (here one far behind the
    log: refused, not sent), and a CHAINED later record after it is refused too."""
    import json
    import socket
    import struct

    from yikatong.storage import keeper, records

    def frame(sock) -> tuple[int, bytes]:
        head = sock.recv(keeper.HEAD.size, socket.MSG_WAITALL)
        size, kind, ident = keeper.HEAD.unpack(head)
        return kind, sock.recv(size, socket.MSG_WAITALL) if size else b""

    def answer(sock) -> bytes:
        while True:
            kind, payload = frame(sock)
            if kind == keeper.ANSWER:
                return payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(keeper.socket_path(data_dir))
        kind, payload = frame(sock)
        state = json.loads(payload)
        assert kind == keeper.STATE and state["version"] == 1 and state["chains"] is True
        old = records.encode_journal(1, [(b"meta", b"legacy", b"1")])
        sock.sendall(keeper.HEAD.pack(8 + len(old), keeper.APPEND, 1)
                     + struct.pack("<Q", state["term"]) + old)
        refused = answer(sock)
        assert refused[0] == keeper.UNAVAILABLE and b"the replicated log ends at" in refused
        later = records.encode_journal(2, [(b"meta", b"legacy", b"2")])
        sock.sendall(keeper.HEAD.pack(9 + len(later), keeper.CHAINED, 2)
                     + struct.pack("<QB", state["term"], 0) + later)
        refused = answer(sock)
        assert refused[0] == keeper.UNAVAILABLE and b"was refused" in refused


def debit_1(node, card: str, rid: str) -> bytes:
    return node.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=1,
        terminal_id="gate-1"), metadata=node.md("TRANSIT_GATE"), timeout=20).SerializeToString()


def test_a_follower_of_two_workers_refuses_writes_naming_the_writer_and_reads_its_own(
        cluster, tmp_path):
    """Both workers of a following node refuse a write (UNAVAILABLE, the writer named),
    answer a read once they hold a write's record (min_sequence), and serve a read of
    personal information, its audit event handed to the writer's trail through the keeper."""
    nodes = [start(tmp_path, cluster, 1)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = nodes[0]
        follower = start(tmp_path, cluster, 0, "--workers", "2")
        nodes.append(follower)
        for _ in range(8):  # new connections: the kernel hands them to either worker
            channel = fresh_channel(follower.address)
            with pytest.raises(grpc.RpcError) as refused:
                rpc.LedgerStub(channel).Transfer(pb.TransferRequest(
                    transfer_id=f"t{_}", debit=pb.AccountRef(operator="op:probe-a"),
                    credit=pb.AccountRef(operator="op:probe-b"), amount_fen=1),
                    metadata=follower.md("CARD_AGENCY"), timeout=10)
            channel.close()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(refused.value).metadata.get("writer") == writer.address
        card = new_active_card(writer, 3)
        top_up(writer, card, 5_000)
        answer, call = writer.authorization.Authorize.with_call(pb.AuthorizeRequest(
            request_id="ryw", card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=100,
            terminal_id="gate-1"), metadata=writer.md("TRANSIT_GATE"), timeout=10)
        seq = int(dict(call.trailing_metadata())["log_sequence"])
        for _ in range(6):
            channel = fresh_channel(follower.address)
            read, call = rpc.LedgerStub(channel).GetBalances.with_call(
                pb.GetBalancesRequest(card_number=card), timeout=10,
                metadata=(*follower.md("TRANSIT_GATE"), ("min_sequence", str(seq))))
            channel.close()
            assert next(b.posted_fen for b in read.balances
                        if b.kind == pb.ACCOUNT_KIND_TRANSIT) == 4_900
            assert int(dict(call.trailing_metadata())["log_sequence"]) >= seq
        holder = rpc.HoldersStub(follower.channel).GetHolder(pb.GetHolderRequest(
            card_number=card, purpose="claim 2026-9"), metadata=follower.md("CARD_AGENCY"),
            timeout=10)
        assert holder.holder.ssn
        read = ("Holders.GetHolder", card, "claim 2026-9")  # in the writer's trail, and so
        for node in nodes:  # in the follower's, from the log
            assert wait_until(lambda n=node: read in [
                (e.method, e.card_number, e.purpose) for e in rpc.AuditStub(n.channel).Export(
                    pb.ExportRequest(), metadata=n.md("AUDITOR"), timeout=10)], 20)
        assert health(follower) == health_pb2.HealthCheckResponse.SERVING
        metrics = scrape(follower.metrics)  # the keeper's: lag observed, not the writer
        assert metrics[("yikatong_replication_writer", frozenset())] == 0
        assert metrics[("yikatong_replication_lag_seconds_count", frozenset())] >= 2
    finally:
        for node in nodes:
            node.stop()
    assert len({store_digest(n.data_dir) for n in nodes}) == 1


def test_a_killed_keeper_loses_nothing_acknowledged_and_its_successor_writes_on(
        cluster, tmp_path):
    """SIGKILL the writer's log keeper under debits: the records in flight are refused
    (nothing committed, the callers retry by request id), the supervisor starts another,
    which applies what the log holds and takes the node's lease back; every acknowledged
    debit is there once, every retried one charged once, on every node."""
    nodes = [start(tmp_path, cluster, 0, "--workers", "2")]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        nodes += [start(tmp_path, cluster, i) for i in (1, 2)]
        writer = nodes[0]
        card = new_active_card(writer, 4)
        top_up(writer, card, 100_000)
        attempted: list[str] = []
        acked: dict[str, bytes] = {}
        stop = threading.Event()

        def client(c: int) -> None:
            channel = fresh_channel(writer.address)
            stub = rpc.AuthorizationStub(channel)
            n = 0
            while not stop.is_set():
                rid = f"c{c}-{n}"
                n += 1
                attempted.append(rid)
                try:
                    acked[rid] = stub.Authorize(pb.AuthorizeRequest(
                        request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT,
                        amount_fen=1, terminal_id="gate-1"), metadata=writer.md("TRANSIT_GATE"),
                        timeout=10).SerializeToString()
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    time.sleep(0.05)
            channel.close()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        keeper = writer.keeper_pid()
        os.kill(keeper, signal.SIGKILL)
        assert wait_until(lambda: writer.keeper_pid() not in (None, keeper), 15)
        took = len(acked)
        assert wait_until(lambda: len(acked) > took + 20, 30), "no write after the keeper died"
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert f"the log keeper (pid {keeper}) ended" in writer.output()
        assert wait_until(lambda: scrape(writer.metrics).get(
            ("yikatong_log_keeper_restarts_total", frozenset())) == 1, 10)
        now = writer_of(nodes)
        assert now is writer  # the lease taken back, not waited out
        for rid in attempted:  # every one decided once: the acknowledged ones as answered
            answer = debit_1(now, card, rid)
            if rid in acked:
                assert answer == acked[rid], rid
        for node in nodes:
            assert wait_until(lambda n=node: balance(n, card) == 100_000 - len(attempted), 20)
    finally:
        for node in nodes:
            node.stop()
    assert len({store_digest(n.data_dir) for n in nodes}) == 1


def test_a_hung_keeper_is_not_serving_and_the_cluster_writes_elsewhere(cluster, tmp_path):
    """A keeper that stops answering (SIGSTOP) is taken as gone by its workers within
    storage.keeper.SILENT_SECONDS: health NOT_SERVING (`log_keeper_down`), writes refused;
    the lease lapses and another node writes. Resumed, the keeper finds it lost the lease:
    the node serves again as a follower, naming the new writer."""
    nodes = [start(tmp_path, cluster, 0, "--workers", "2")]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        nodes += [start(tmp_path, cluster, i) for i in (1, 2)]
        node0 = nodes[0]
        keeper = node0.keeper_pid()
        os.kill(keeper, signal.SIGSTOP)
        try:
            assert wait_until(lambda: health(node0) == health_pb2.HealthCheckResponse
                              .NOT_SERVING, 20)
            with pytest.raises(grpc.RpcError) as refused:
                probe(node0)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert wait_until(lambda: writer_of(nodes[1:]) is not None, 30)
        finally:
            os.kill(keeper, signal.SIGCONT)
        new = writer_of(nodes[1:])
        assert wait_until(lambda: health(node0) == health_pb2.HealthCheckResponse.SERVING, 20)

        def named() -> str | None:  # the new writer, once the keeper has seen the lease
            try:
                probe(node0)
            except grpc.RpcError as refused:
                return error_info(refused).metadata.get("writer")
            return "node0 wrote"
        assert wait_until(lambda: named() == new.address, 10), named()
        card = new_active_card(new, 5)
        top_up(new, card, 700)
        assert wait_until(lambda: balance(node0, card) == 700, 20)
    finally:
        for node in nodes:
            node.stop()


def test_a_keeper_that_cannot_join_stops_the_server_before_it_serves(cluster, tmp_path):
    """The keeper's start is the node's join: one that cannot join (here: the node id is in
    use by a running node at another address) stops the server with exit 2 and its reason,
    before any worker serves, as a one-process node does."""
    import subprocess
    import sys

    from yikatong.server.harness import ROOT, free_address

    nodes = [start(tmp_path, cluster, 0)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                              str(tmp_path / "twin"), "--listen", free_address(),
                              "--replicate", ",".join(cluster.urls), "--node-id", "node0",
                              "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "node id node0 is in use" in out.stderr
        assert "the log keeper" in out.stderr and "could not start" in out.stderr
        assert "starting it again" not in out.stderr  # one word: it stops the server
        assert "serving on" not in out.stdout
        assert not (tmp_path / "twin" / "keeper.sock").exists()
    finally:
        for node in nodes:
            node.stop()


def test_a_rolling_restart_renews_the_workers_and_then_the_keeper(cluster, tmp_path):
    """SIGUSR2 on a replicated node of 2 workers: each worker started anew and serving
    before the old one drains, then the keeper, whose successor takes the lease back; the
    node writes throughout but for the keeper's second, and every debit is decided once."""
    nodes = [start(tmp_path, cluster, 0, "--workers", "2")]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        node0 = nodes[0]
        before = node0.children()
        keeper = node0.keeper_pid()
        card = new_active_card(node0, 6)
        top_up(node0, card, 1_000)
        os.kill(node0.proc.pid, signal.SIGUSR2)
        assert wait_until(lambda: "rolling restart done" in node0.output(), 60)
        assert wait_until(lambda: node0.keeper_pid() not in (None, keeper), 20)
        assert wait_until(lambda: not set(before) & set(node0.children()), 20)  # all new
        assert "rolling restart: the log keeper" in node0.output()
        assert wait_until(lambda: writer_of(nodes) is node0, 20)
        for i in range(10):
            debit_1(node0, card, f"after-{i}")
        assert balance(node0, card) == 990
    finally:
        for node in nodes:
            node.stop()


def test_the_keepers_socket_is_reached_through_a_data_dir_path_too_long_for_af_unix(tmp_path):
    """AF_UNIX takes 108 bytes; a data dir deeper than that is reached through
    /proc/self/fd (each process its own descriptor of the directory)."""
    import socket

    from yikatong.storage.keeper import SOCKET_NAME, socket_path

    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    path = socket_path(str(deep))
    assert path.startswith("/proc/self/fd/") and len(path) < 100
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        assert (deep / SOCKET_NAME).exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(socket_path(str(deep)))
            accepted, _ = server.accept()
            client.sendall(b"ok")
            assert accepted.recv(2) == b"ok"
            accepted.close()
    assert socket_path(str(tmp_path)) == str(tmp_path / SOCKET_NAME)


def test_nodes_read_each_others_reports_without_leaving_nats_consumers(cluster, tmp_path):
    """Every lease tick a node reads the others' reports (who takes the snapshots), and
    `yikatong cluster status` reads them too: none of it may leave a consumer behind on the
    NATS servers (nats-py's `keys()` left one for five minutes each: a 3-node cluster reached
    NATS's 1,000 consumers in about four minutes, and every tick failed from then on)."""
    from test_cluster import cluster_status

    from yikatong.storage.replication import NODES_BUCKET, Log

    nodes = [start(tmp_path, cluster, 0, "--workers", "2"), start(tmp_path, cluster, 1)]
    log = Log(cluster.urls, create=False)
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        code, status = cluster_status(cluster)
        assert code == 0 and len(status["nodes"]) == 2, status
        time.sleep(4)  # about 5 lease ticks of each node
        consumers = log._run(log._js.consumers_info(f"KV_{NODES_BUCKET}"))
        assert consumers == [], [c.name for c in consumers]
    finally:
        log.close()
        for node in nodes:
            node.stop()


def test_a_writer_stopped_cleanly_gives_the_lease_up_at_once(cluster, tmp_path):
    """SIGTERM to the writer (here a supervisor of 2 workers and a keeper; a one-process node
    gives it up by the same `Node.stop`): once
    it has stopped, the lease no longer names it (another node writes at its next tick, not
    after the lease lapses); a keeper's rolling restart keeps it (the test above)."""
    from yikatong.storage.replication import LEASE_BUCKET, LEASE_KEY, Log

    nodes = [start(tmp_path, cluster, 0, "--workers", "2")]
    log = Log(cluster.urls, create=False)
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        nodes.append(start(tmp_path, cluster, 1))
        assert nodes[0].stop() == 0
        assert "gave the write lease up at its stop" in nodes[0].output()

        async def holder():
            kv = await log._js.key_value(LEASE_BUCKET)
            try:
                return (await kv.get(LEASE_KEY)).value
            except Exception:  # noqa: BLE001 - deleted: no one holds it
                return None
        assert log._run(holder()) in (None, f"node1 {nodes[1].address}".encode())
        assert wait_until(lambda: writer_of(nodes[1:]) is nodes[1], 20)
    finally:
        log.close()
        for node in nodes:
            node.stop()

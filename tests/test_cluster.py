"""Issue 18 end to end: three `yikatong serve --replicate` nodes on a 3-node NATS JetStream
cluster, every process started and stopped by the test on loopback ports. One node holds the
write lease and takes writes; the others serve reads from the log and refuse writes with
UNAVAILABLE naming the writer. SIGKILL the writer under debits: another node takes over
within a bounded time, every acknowledged debit is there exactly once, the balance is exact;
the old writer, restarted, rejoins as a follower and every node ends with the same bytes;
with one NATS server of three SIGKILLed the cluster keeps serving. On the way: read-your-writes
(`min_sequence`), `yikatong cluster status` and the replication metrics."""
import json
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from test_calls import error_info
from test_e2e import new_active_card
from test_workers import scrape

from yikatong.server.harness import (
    ROOT,
    NatsCluster,
    ServerProcess,
    free_address,
    store_digest,
    wait_until,
)
from yikatong.storage.replication import INTAKE_STREAM, Log
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

TAKEOVER_SECONDS_MAX = 20  # the lease (3 s), its expiry, the catch-up and an election


def start(tmp_path, cluster, i: int, *extra: str, address: str | None = None) -> ServerProcess:
    """Node i of a replicated store on `cluster`, its metrics at `.metrics`."""
    workdir = tmp_path / f"node{i}"
    workdir.mkdir(exist_ok=True)
    srv = ServerProcess(workdir, "--replicate", ",".join(cluster.urls), "--node-id",
                        f"node{i}", "--metrics-listen", (metrics := free_address()), *extra,
                        address=address, data_dir=str(workdir / "data"))
    srv.metrics = metrics
    return srv


def cluster_status(cluster) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "yikatong", "cluster", "status", "--replicate",
                          ",".join(cluster.urls), "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def top_up(srv, card: str, fen: int):
    return srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=uuid.uuid4().hex, debit=pb.AccountRef(operator="op:topup"),
        credit=pb.AccountRef(holder=pb.HolderAccountRef(card_number=card,
                                                        kind=pb.ACCOUNT_KIND_TRANSIT)),
        amount_fen=fen), metadata=srv.md("CARD_AGENCY"), timeout=10)


def debit(srv, card: str, request_id: str):
    return srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=request_id, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=100,
        terminal_id="gate-1"), metadata=srv.md("TRANSIT_GATE"), timeout=10)


def probe(srv):
    """A write that changes nothing of a holder: 1 fen between two operator accounts."""
    return srv.ledger.Transfer(pb.TransferRequest(
        transfer_id=uuid.uuid4().hex, debit=pb.AccountRef(operator="op:probe-a"),
        credit=pb.AccountRef(operator="op:probe-b"), amount_fen=1),
        metadata=srv.md("CARD_AGENCY"), timeout=10)


def writer_of(nodes) -> ServerProcess | None:
    """The node that takes a write now (a follower answers UNAVAILABLE)."""
    for node in nodes:
        try:
            probe(node)
            return node
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
    return None


def balance(srv, card: str) -> int | None:
    """The card's transit purse as this node has it (None: the card has not reached it)."""
    try:
        answer = srv.ledger.GetBalances(pb.GetBalancesRequest(card_number=card),
                                        metadata=srv.md("TRANSIT_GATE"), timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return next(b.posted_fen for b in answer.balances if b.kind == pb.ACCOUNT_KIND_TRANSIT)


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


def test_three_nodes_one_writer_failover_and_rejoin(cluster, tmp_path):
    nodes = [start(tmp_path, cluster, i) for i in range(3)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        followers = [n for n in nodes if n is not writer]

        def refusal(node) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as refused:
                probe(node)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            return refused.value
        # a follower names the writer once it has seen the lease (its next tick, 0.75 s)
        assert wait_until(lambda: error_info(refusal(followers[0])).metadata.get("writer")
                          == writer.address, 5)
        card = new_active_card(writer, 1)
        top_up(writer, card, 100_000)
        acked = {}
        for i in range(30):
            rid = f"d{i}"
            acked[rid] = debit(writer, card, rid).SerializeToString()
        for follower in followers:  # reads follow the log
            assert wait_until(lambda f=follower: balance(f, card) == 100_000 - 3_000, 20)
        # read-your-writes: a write's answer names its record of the log; a follower asked
        # for that record (min_sequence) answers once it holds it, at once here
        answer, call = writer.authorization.Authorize.with_call(pb.AuthorizeRequest(
            request_id="ryw", card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=100,
            terminal_id="gate-1"), metadata=writer.md("TRANSIT_GATE"), timeout=10)
        acked["ryw"] = answer.SerializeToString()
        seq = int(dict(call.trailing_metadata())["log_sequence"])
        for follower in followers:
            read, call = follower.ledger.GetBalances.with_call(
                pb.GetBalancesRequest(card_number=card), timeout=10,
                metadata=(*follower.md("TRANSIT_GATE"), ("min_sequence", str(seq))))
            assert next(b.posted_fen for b in read.balances
                        if b.kind == pb.ACCOUNT_KIND_TRANSIT) == 100_000 - 3_100
            assert int(dict(call.trailing_metadata())["log_sequence"]) >= seq
        ahead = time.monotonic()
        with pytest.raises(grpc.RpcError) as behind:  # a record the log does not hold yet
            followers[0].ledger.GetBalances(pb.GetBalancesRequest(card_number=card), timeout=1,
                                            metadata=(*followers[0].md("TRANSIT_GATE"),
                                                      ("min_sequence", str(seq + 10**6))))
        assert behind.value.code() == grpc.StatusCode.UNAVAILABLE, behind.value.details()
        assert time.monotonic() - ahead < 1.5  # answered within the caller's deadline
        assert error_info(behind.value).reason == "LOG_BEHIND"
        assert error_info(behind.value).metadata["writer"] == writer.address
        with pytest.raises(grpc.RpcError) as bad:
            followers[0].ledger.GetBalances(pb.GetBalancesRequest(card_number=card), timeout=5,
                                            metadata=(*followers[0].md("TRANSIT_GATE"),
                                                      ("min_sequence", "soon")))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_sequence" in bad.value.details()
        ahead = time.monotonic()  # the writer knows where the log ends: no wait there
        with pytest.raises(grpc.RpcError) as beyond:
            writer.ledger.GetBalances(pb.GetBalancesRequest(card_number=card), timeout=10,
                                      metadata=(*writer.md("TRANSIT_GATE"),
                                                ("min_sequence", str(seq + 10**6))))
        assert beyond.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the log ends at record" in beyond.value.details()
        assert time.monotonic() - ahead < 1
        # a second node under a node id in use does not start
        (tmp_path / "twin").mkdir()
        with pytest.raises(RuntimeError, match="node id node1 is in use"):
            ServerProcess(tmp_path / "twin", "--replicate", ",".join(cluster.urls),
                          "--node-id", "node1", data_dir=str(tmp_path / "twin" / "data"))
        # a follower serves a read of personal information, and a refused call, with their
        # audit events handed to the writer's trail first (the audit intake)
        holder = rpc.HoldersStub(followers[0].channel).GetHolder(pb.GetHolderRequest(
            card_number=card, purpose="claim 2026-7"), metadata=followers[0].md("CARD_AGENCY"),
            timeout=10)
        assert holder.holder.ssn
        with pytest.raises(grpc.RpcError) as denied:
            rpc.HoldersStub(followers[1].channel).GetHolder(
                pb.GetHolderRequest(card_number=card, purpose="x"),
                metadata=followers[1].md("TRANSIT_GATE"), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        def trail(srv) -> list:
            return list(rpc.AuditStub(srv.channel).Export(
                pb.ExportRequest(), metadata=srv.md("AUDITOR"), timeout=10))
        read = ("Holders.GetHolder", "CARD_AGENCY", card, "claim 2026-7", "OK")
        assert wait_until(lambda: read in [(e.method, e.role, e.card_number, e.purpose,
                                            e.outcome) for e in trail(writer)], 10)
        assert wait_until(lambda: any(e.method == "Holders.GetHolder" and e.role ==
                                      "TRANSIT_GATE" and e.outcome == "PERMISSION_DENIED"
                                      for e in trail(writer)), 10)
        intake = Log(cluster.urls, create=False)
        try:  # in the trail now: the intake keeps none of them (purged every 5 s)
            assert wait_until(lambda: intake.first_sequence(INTAKE_STREAM) > 1 and intake._run(
                intake._js.stream_info(INTAKE_STREAM)).state.messages == 0, 20)
        finally:
            intake.close()
        for node in nodes:  # one chain, the same on every node
            assert wait_until(lambda n=node: len(trail(n)) == len(trail(writer)), 10)
            assert rpc.AuditStub(node.channel).Verify(pb.VerifyAuditRequest(),
                                                      metadata=node.md("AUDITOR")).ok
        # operations: every node's applied sequence and lag, from the nodes' own reports
        code, status = cluster_status(cluster)
        assert code == 0 and status["writer"]["address"] == writer.address, status
        seen: list = []  # one report where every node has caught up, asserted on whole

        def caught_up() -> bool:
            seen[:] = [cluster_status(cluster)[1]]
            return len(seen[0]["nodes"]) == len(nodes) and all(
                n["lag"] == 0 and not n["down"] and n["not_serving"] == []
                for n in seen[0]["nodes"])
        assert wait_until(caught_up, 10)
        status = seen[0]
        assert sorted(n["address"] for n in status["nodes"]) == sorted(n.address for n in nodes)
        assert [n["role"] for n in status["nodes"]].count("writer") == 1
        assert {n["applied"] for n in status["nodes"]} == {status["log_sequence"]}
        assert status["log_sequence"] >= seq
        for follower in followers:  # and their metrics: lag in records and in seconds
            assert wait_until(lambda f=follower: scrape(f.metrics).get(
                ("yikatong_replication_applied_sequence", frozenset()), 0) >= seq, 5)
            sample = scrape(follower.metrics)
            assert sample[("yikatong_replication_writer", frozenset())] == 0
            assert sample[("yikatong_replication_lag_seconds_count", frozenset())] >= 30
        assert scrape(writer.metrics)[("yikatong_replication_writer", frozenset())] == 1
        writer.kill()  # SIGKILL, mid-run
        started = time.monotonic()
        survivors = followers
        new_writer = None
        i = 30
        while time.monotonic() - started < TAKEOVER_SECONDS_MAX + 10:
            rid = f"d{i}"
            for node in survivors:
                try:
                    acked[rid] = debit(node, card, rid).SerializeToString()
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    continue
                new_writer = new_writer or node
                i += 1
                break
            else:
                time.sleep(0.2)
            if len(acked) >= 46:
                break
        took = time.monotonic() - started
        assert new_writer is not None and len(acked) >= 46, took
        assert took < TAKEOVER_SECONDS_MAX + 10
        for rid, answer in acked.items():  # each acknowledged debit is there, once
            assert debit(new_writer, card, rid).SerializeToString() == answer
        assert balance(new_writer, card) == 100_000 - 100 * len(acked)
        # `cluster status`: the killed writer's last report said it led; its row's role is
        # the lease's word, so one writer, the new one
        seen[:] = []

        def one_writer() -> bool:
            seen[:] = [cluster_status(cluster)[1]]
            return (seen[0]["writer"] or {}).get("address") == new_writer.address
        assert wait_until(one_writer, 10), seen
        roles = {n["address"]: n["role"] for n in seen[0]["nodes"]}
        assert roles[writer.address] == "follower" and roles[new_writer.address] == "writer"
        assert list(roles.values()).count("writer") == 1, seen
        old = start(tmp_path, cluster, nodes.index(writer), address=writer.address)
        nodes[nodes.index(writer)] = old
        assert wait_until(lambda: balance(old, card) == 100_000 - 100 * len(acked), 30)
        with pytest.raises(grpc.RpcError) as again:
            probe(old)
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        # every node, caught up, holds the same bytes (the log's, in the log's order)
        assert wait_until(lambda: len({store_digest(n.data_dir) for n in nodes}) == 1, 30)
        assert wait_until(lambda: cluster_status(cluster)[1]["writer"]["address"]
                          == new_writer.address, 10)
        # one NATS server of three SIGKILLed: the log keeps a quorum, and the nodes (connected
        # to all three) go on: debits acknowledged, followers following, one history
        cluster.kill(0)
        started, n = time.monotonic(), 0
        while n < 10 and time.monotonic() - started < TAKEOVER_SECONDS_MAX + 10:
            for node in nodes:  # the writer, or whichever node took over meanwhile
                try:
                    acked[f"n{n}"] = debit(node, card, f"n{n}").SerializeToString()
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    continue
                n += 1
                break
            else:
                time.sleep(0.2)
        assert n == 10, f"{n} debits acknowledged with one NATS server down"
        for node in nodes:
            assert wait_until(lambda n=node: balance(n, card) == 100_000 - 100 * len(acked), 30)
        assert wait_until(lambda: len({store_digest(n.data_dir) for n in nodes}) == 1, 30)
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.stop()


def test_cluster_status_of_a_cluster_no_node_started_on_makes_nothing(cluster):
    out = subprocess.run([sys.executable, "-m", "yikatong", "cluster", "status", "--replicate",
                          ",".join(cluster.urls)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "no replicated store on this NATS cluster" in out.stderr
    again = subprocess.run([sys.executable, "-m", "yikatong", "cluster", "status",
                            "--replicate", ",".join(cluster.urls)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.stderr == out.stderr  # the first made no stream either


def test_replicate_refuses_to_start_without_what_it_needs(tmp_path):
    """One line and exit 2: no node id, the demo set, a node id that
    cannot be a key of the cluster's buckets, an address other nodes could not hand to a
    client, a URL that is not NATS's, or no NATS server answering (`--replicate` on a port
    nothing listens on); a password in a URL is never printed back."""
    base = [sys.executable, "-m", "yikatong", "serve", "--data-dir", str(tmp_path / "d"),
            "--listen", free_address()]
    nats = ["--replicate", "nats://127.0.0.1:1"]
    for extra, says in (
            (nats, "--replicate needs --node-id"),
            (nats + ["--node-id", "a", "--demo"], "--replicate needs --node-id and no --demo"),
            (["--node-id", "a"], "--node-id and --advertise are for --replicate"),
            (nats + ["--node-id", "a b"], "--node-id must be 1 to 64 letters, digits"),
            (nats + ["--node-id", "n" * 10240], "--node-id must be 1 to 64 letters, digits"),
            (nats + ["--node-id", "x.>"], "--node-id must be 1 to 64 letters, digits"),
            (nats + ["--node-id", "a", "--advertise", "not an address"],
             "--advertise must be HOST:PORT"),
            (nats + ["--node-id", "a", "--listen", "0.0.0.0:5000"],
             "is every interface: give --advertise HOST:PORT"),
            (["--replicate", "ftp://127.0.0.1:1", "--node-id", "a"],
             "--replicate takes the cluster's NATS servers as nats://HOST:PORT"),
            # (no NATS server answering waits out the start-up bound: one case, 20 s)
            (["--replicate", "nats://ops:s3cret@127.0.0.1:1", "--node-id", "a"],
             "no NATS server of nats://***@127.0.0.1:1 answered within")):
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True,
                             timeout=90)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr
        assert "s3cret" not in out.stderr + out.stdout


def test_three_nodes_started_at_once_on_a_fresh_cluster_all_come_up(cluster, tmp_path):
    """A power cut and the rack restarts: every node starts at the same moment, while the
    new cluster makes its streams and buckets and elects their leaders (issue 27). Each
    waits for it (config.cluster_start_seconds) instead of giving up; one becomes the
    writer."""
    import threading

    started: list = [None] * 3

    def go(i: int) -> None:
        try:
            started[i] = start(tmp_path, cluster, i)
        except RuntimeError as error:
            started[i] = error

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    nodes = [n for n in started if isinstance(n, ServerProcess)]
    try:
        assert len(nodes) == 3, [str(n)[-300:] for n in started if not isinstance(n, ServerProcess)]
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        card = new_active_card(writer, 9)
        top_up(writer, card, 1_000)
        assert wait_until(lambda: all(balance(n, card) == 1_000 for n in nodes), 20)
    finally:
        for n in nodes:
            n.stop()


def test_cluster_status_names_a_writer_whose_archive_fails_and_still_exits_0(cluster, tmp_path):
    """A node whose archive's move fails (here `archive` is a file, not a directory) serves
    rightly and holds the lease, so `cluster status` exits 0, but its line and its report say
    `archive_failing` (the hot store grows), until a move succeeds."""
    from test_archive import DAY, advance
    from test_e2e import START
    from test_money_e2e import top_up as top_up_card

    data = tmp_path / "node0" / "data"
    data.mkdir(parents=True, mode=0o700)
    (data / "archive").write_text("not a directory")
    node = start(tmp_path, cluster, 0, "--clock", "manual", "--clock-start", START,
                 "--retain-days", "1")

    def warnings() -> list | None:
        code, status = cluster_status(cluster)
        nodes = status["nodes"]
        return nodes[0]["warnings"] if code == 0 and len(nodes) == 1 else None
    try:
        assert wait_until(lambda: writer_of([node]) is not None, 30)
        card = new_active_card(node, 1)
        top_up_card(node, card, 1000)
        debit(node, card, "d1")
        assert warnings() == []
        advance(node, DAY + 60)  # the debit is past the window: due for the archive
        assert wait_until(lambda: warnings() == ["archive_failing"], 30)
        line = subprocess.run([sys.executable, "-m", "yikatong", "cluster", "status",
                               "--replicate", ",".join(cluster.urls)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert line.returncode == 0 and "WARNING (archive_failing)" in line.stdout, line.stdout
        (data / "archive").unlink()
        assert wait_until(lambda: warnings() == [], 30)
    finally:
        node.stop()


def test_cluster_status_without_a_quorum_of_nats_servers_says_so_and_exits_1(cluster, tmp_path):
    """Two NATS servers of three down: the one left answers, but JetStream cannot (no meta
    leader), so no node can write. `cluster status` says that, not that no server answered,
    and exits 1 as for a cluster with no writer (2 is for one it cannot reach at all);
    `--json` says it too."""
    node = start(tmp_path, cluster, 0)
    try:
        assert wait_until(lambda: writer_of([node]) is not None, 30)
        assert wait_until(lambda: cluster_status(cluster)[1]["nodes"], 20)
        cluster.kill(1)
        cluster.kill(2)
        runs: list = []

        def status_fails() -> bool:  # the server left notices its lost peers within seconds
            runs.append(subprocess.run(
                [sys.executable, "-m", "yikatong", "cluster", "status", "--replicate",
                 ",".join(cluster.urls), "--json"], cwd=ROOT, capture_output=True, text=True,
                timeout=60))
            return runs[-1].returncode != 0
        assert wait_until(status_fails, 60), runs[-1].stdout
        out = runs[-1]
        assert out.returncode == 1, out.stdout + out.stderr
        error = json.loads(out.stdout)["error"]
        assert "answered, but its JetStream did not" in error and "quorum" in error, error
        assert "no NATS server" not in out.stderr and "quorum" in out.stderr
    finally:
        node.stop()

"""Snapshots of a replicated store (issue 26): taken by a follower into the JetStream object
store, the log purged below them; a node whose disk is wiped starts from the newest snapshot
and the log's tail and ends with the same bytes as the others; `yikatong restore --replicate
--to-sequence N` rebuilds the state as of any covered log sequence. Three `yikatong serve
--replicate` nodes on a 3-node NATS cluster, all started and stopped by the test."""
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
from test_cluster import balance, cluster_status, debit, start, top_up, writer_of
from test_e2e import new_active_card
from test_workers import scrape

from yikatong.server.harness import (
    ROOT,
    NatsCluster,
    ServerProcess,
    store_digest,
    wait_until,
)
from yikatong.storage import snapshots
from yikatong.storage.replication import Log
from yikatong.v1 import yikatong_pb2 as pb


def in_log(cluster) -> tuple[list, int, int]:
    """(snapshot manifests, the log's first kept sequence, its last)."""
    log = Log(cluster.urls, create=False)
    try:
        return (snapshots.Snapshots(log).list(), log.first_sequence(),
                log.last_sequence())
    finally:
        log.close()


def log_sequence_of(srv, card: str, request_id: str) -> int:
    _, call = srv.authorization.Authorize.with_call(pb.AuthorizeRequest(
        request_id=request_id, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=100,
        terminal_id="gate-1"), metadata=srv.md("TRANSIT_GATE"), timeout=10)
    return int(dict(call.trailing_metadata())["log_sequence"])


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


def test_a_wiped_follower_starts_from_the_newest_snapshot_and_the_log_tail(cluster, tmp_path):
    every = ("--snapshot-every", "25", "--snapshots-keep", "1", "--log-purge-margin", "5")
    nodes = [start(tmp_path, cluster, i, *every) for i in range(3)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        card = new_active_card(writer, 1)
        top_up(writer, card, 1_000_000)
        for i in range(60):
            debit(writer, card, f"d{i}")
        # a follower takes the snapshot; the log keeps only what follows the one kept
        assert wait_until(lambda: (s := in_log(cluster))[0] and s[1] > 1, 30), in_log(cluster)
        taken = [n for n in nodes if "taken in" in n.output() and "snapshot snapshot-" in
                 n.output()]
        assert taken and writer not in taken
        kept, first, _ = in_log(cluster)
        # and the margin below it (a node whose power was cut comes back a commit behind)
        assert len(kept) == 1 and first <= kept[0].log_sequence + 1 - 5

        # the disk of a follower dies: its data dir is gone; it starts again from nothing
        wiped = next(n for n in nodes if n is not writer)
        i = nodes.index(wiped)
        wiped.stop()
        shutil.rmtree(wiped.data_dir)
        for k in range(60, 70):
            debit(writer, card, f"d{k}")
        nodes[i] = start(tmp_path, cluster, i, *every, address=wiped.address)
        assert "laid out from snapshot" in nodes[i].output()
        for k in range(70, 80):
            debit(writer, card, f"d{k}")
        want = 1_000_000 - 80 * 100
        assert wait_until(lambda: all(balance(n, card) == want for n in nodes), 30)
        # every node holds the same bytes once each has applied the whole log
        assert wait_until(lambda: len({store_digest(n.data_dir) for n in nodes}) == 1, 30)
    finally:
        for n in nodes:
            n.stop()


def test_a_follower_behind_the_purged_log_is_refused_in_one_line(cluster, tmp_path):
    every = ("--snapshot-every", "10", "--snapshots-keep", "1", "--log-purge-margin", "0")
    nodes = [start(tmp_path, cluster, i, *every) for i in range(3)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        behind = next(n for n in nodes if n is not writer)
        behind.stop()
        card = new_active_card(writer, 2)
        top_up(writer, card, 100_000)
        for i in range(40):
            debit(writer, card, f"b{i}")
        # purged past the first snapshot (10 records on, beyond what the stopped node holds:
        # it stopped before the card was made), not only past a lagging follower's report
        assert wait_until(lambda: in_log(cluster)[1] > 10, 30), in_log(cluster)
        i = nodes.index(behind)
        with pytest.raises(RuntimeError) as refused:
            start(tmp_path, cluster, i, *every, address=behind.address)
        assert "move the data dir aside" in str(refused.value)
        assert "Traceback" not in str(refused.value)
    finally:
        for n in nodes:
            n.stop()


def test_restore_to_the_log_sequence_before_a_bad_write(cluster, tmp_path):
    nodes = [start(tmp_path, cluster, i, "--snapshot-every", "15", "--snapshots-keep", "3")
             for i in range(3)]
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        card = new_active_card(writer, 3)
        top_up(writer, card, 100_000)
        for i in range(30):
            debit(writer, card, f"g{i}")
        assert wait_until(lambda: in_log(cluster)[0], 30)
        good = log_sequence_of(writer, card, "good")
        bad = log_sequence_of(writer, card, "bad")  # found later to be wrong
        assert bad > good
    finally:
        for n in nodes:
            n.stop()
    restored = str(tmp_path / "restored")
    done = subprocess.run([sys.executable, "-m", "yikatong", "restore", "--replicate",
                           ",".join(cluster.urls), "--to-sequence", str(bad - 1),
                           "--data-dir", restored], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "snapshot" in done.stdout
    workdir = tmp_path / "check"
    workdir.mkdir()
    srv = ServerProcess(workdir, data_dir=restored)
    try:
        # as of the record before the bad debit: the 30 and the good one, not the bad one
        assert balance(srv, card) == 100_000 - 31 * 100
    finally:
        srv.stop()
    # killed midway (at points along its way): no store is left where it was going unless
    # the whole one is (moved in last: checked below, served); the next restore completes
    again = str(tmp_path / "again")
    argv = [sys.executable, "-m", "yikatong", "restore", "--replicate", ",".join(cluster.urls),
            "--to-sequence", str(bad - 1), "--data-dir", again]
    for delay in (0.3, 0.8, 1.3, 1.8):
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait(10)
        if os.path.exists(os.path.join(again, "lmdb", "data.mdb")):
            break  # the store was moved in before the kill: it must be the whole one
    if not os.path.exists(os.path.join(again, "lmdb", "data.mdb")):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    srv = ServerProcess(workdir, data_dir=again)
    try:
        assert balance(srv, card) == 100_000 - 31 * 100
    finally:
        srv.stop()
    beyond = subprocess.run([sys.executable, "-m", "yikatong", "restore", "--replicate",
                             ",".join(cluster.urls), "--to-sequence", str(10**9),
                             "--data-dir", str(tmp_path / "r2")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert beyond.returncode == 2 and "numbered 1 to" in beyond.stderr


def test_a_single_node_on_the_log_loses_nothing_acknowledged_when_its_disk_dies(cluster,
                                                                                 tmp_path):
    """The log as the continuous backup of one node: every debit acknowledged, up to the
    one before the disk died, is there after a restart on an empty disk, and a gate's retry
    of any of them gets its first answer (never charged twice)."""
    every = ("--snapshot-every", "20", "--snapshots-keep", "1", "--log-purge-margin", "0")
    node = start(tmp_path, cluster, 0, *every)
    try:
        assert wait_until(lambda: writer_of([node]) is not None, 30)
        card = new_active_card(node, 4)
        top_up(node, card, 100_000)
        answers = {f"s{i}": debit(node, card, f"s{i}").SerializeToString() for i in range(50)}
        assert wait_until(lambda: in_log(cluster)[0], 30)  # the writer, alone, took one
        newest = ("yikatong_snapshot_newest_sequence", frozenset())
        assert wait_until(lambda: scrape(node.metrics).get(newest) ==
                          in_log(cluster)[0][-1].log_sequence, 20)
        assert scrape(node.metrics)[("yikatong_snapshot_failing", frozenset())] == 0
        for i in range(50, 60):  # after the snapshot: only in the log
            answers[f"s{i}"] = debit(node, card, f"s{i}").SerializeToString()
        node.proc.kill()
        node.proc.wait()
        node.stop()
        shutil.rmtree(node.data_dir)
        node = start(tmp_path, cluster, 0, *every, address=node.address)
        assert "laid out from snapshot" in node.output()
        assert wait_until(lambda: writer_of([node]) is not None, 30)
        assert balance(node, card) == 100_000 - 60 * 100
        for rid, first in answers.items():  # retried: the first answer, nothing charged
            assert debit(node, card, rid).SerializeToString() == first
        assert balance(node, card) == 100_000 - 60 * 100
    finally:
        node.stop()


def test_a_replicated_store_archives_on_every_node_through_a_failover_and_a_snapshot(
        cluster, tmp_path):
    """`--retain-days` on a replicated store: the writer moves the records past the window
    into a segment, which travels in the log ahead of the deletes; every node writes the same
    segment. After a failover the new writer replays an archived request id from its own
    archive (its first answer, nothing charged) and archives on, chained to the old writer's
    segment. A node whose disk died starts from a snapshot that carries the segments. Every
    node ends with the same archive and store bytes, and `yikatong archive verify` passes on
    each."""
    from test_archive import DAY, advance, hot, segments
    from test_e2e import START

    flags = ("--clock", "manual", "--clock-start", START, "--retain-days", "1",
             "--snapshot-every", "20", "--snapshots-keep", "1", "--log-purge-margin", "5")
    nodes = [start(tmp_path, cluster, i, *flags) for i in range(3)]

    def archives(node) -> dict[str, bytes]:
        where = os.path.join(node.data_dir, "archive")
        return {n: pathlib.Path(where, n).read_bytes() for n in segments(node.data_dir)}
    try:
        assert wait_until(lambda: writer_of(nodes) is not None, 30)
        writer = writer_of(nodes)
        card = new_active_card(writer, 1)
        top_up(writer, card, 1_000_000)
        firsts = {f"d{i}": debit(writer, card, f"d{i}") for i in range(30)}
        assert wait_until(lambda: [n["retain_days"] for n in cluster_status(cluster)[1]["nodes"]]
                          == [1, 1, 1], 20)  # each node's, in its reports
        advance(writer, DAY + 60)  # the writer's clock: its records are past the window
        assert wait_until(lambda: hot(writer.data_dir)["requests"][0] < 10, 30), \
            hot(writer.data_dir)
        assert wait_until(lambda: all(segments(n.data_dir) == ["0000000001.seg"]
                                      for n in nodes), 30)
        assert len({tuple(archives(n).items()) for n in nodes}) == 1  # the same bytes
        for i in range(25):  # a snapshot after the archive's first segment
            debit(writer, card, f"x{i}")
        assert wait_until(lambda: in_log(cluster)[0] and
                          in_log(cluster)[0][-1].archive_segments == 1, 30), in_log(cluster)

        writer.stop()  # a clean stop gives the lease up: another node writes
        rest = [n for n in nodes if n is not writer]
        assert wait_until(lambda: writer_of(rest) is not None, 30)
        second = writer_of(rest)
        assert debit(second, card, "d7") == firsts["d7"]  # from its own archive
        assert balance(second, card) == 1_000_000 - 55 * 100
        for i in range(10):
            debit(second, card, f"e{i}")
        advance(second, 3 * DAY)
        assert wait_until(lambda: all(len(segments(n.data_dir)) >= 2 for n in rest), 30)

        # the old writer's disk dies: it starts from the newest snapshot and the log's tail
        i = nodes.index(writer)
        shutil.rmtree(writer.data_dir)
        nodes[i] = start(tmp_path, cluster, i, *flags, address=writer.address)
        assert "laid out from snapshot" in nodes[i].output()
        want = 1_000_000 - 65 * 100
        assert wait_until(lambda: all(balance(n, card) == want for n in nodes), 30)
        assert wait_until(lambda: len({tuple(archives(n).items()) for n in nodes}) == 1, 30)
        assert len(archives(nodes[0])) >= 2
        assert wait_until(lambda: len({store_digest(n.data_dir) for n in nodes}) == 1, 30)
    finally:
        for n in nodes:
            n.stop()
    for n in nodes:
        done = subprocess.run([sys.executable, "-m", "yikatong", "archive", "verify",
                               "--data-dir", n.data_dir], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{len(archives(n))} archive segments" in done.stdout, done.stdout


def test_a_failed_snapshot_is_tried_again_after_a_wait_that_doubles(monkeypatch, tmp_path):
    """Every attempt copies the whole store (`yikatong backup` in a child), and the taker
    is asked at every lease tick (0.75 s): a cause that stays (the bucket's room) made copy
    after copy, back to back. After a failure the next try waits 60 s, doubling up to 30 min;
    `last_error` (the metric yikatong_snapshot_failing) holds meanwhile."""
    import types

    from yikatong import config
    from yikatong.storage import snapshots
    from yikatong.storage.backup import BackupError

    class Bucket:  # no snapshot in it yet
        def __init__(self, log):
            pass

        def list(self):
            return []

        def _moving(self, used):
            return 60.0
    monkeypatch.setattr(snapshots, "Snapshots", Bucket)
    store = types.SimpleNamespace(applied_sequence=10, data_dir=str(tmp_path / "data"),
                                  map_use=lambda: (1 << 20, 1 << 30))
    taker = snapshots.Taker(types.SimpleNamespace(log=None, store=store),
                            snapshots.Policy(every_records=5), str(tmp_path))
    copies = []

    def copy(data_dir, path, timeout):
        copies.append(path)
        raise BackupError("the bucket YIKATONG_SNAPSHOTS is full")
    monkeypatch.setattr(taker, "_copy", copy)

    def tick():
        taker.tick(True)
        if taker._running is not None:
            taker._running.result(timeout=10)
    try:
        tick()
        assert len(copies) == 1 and "is full" in taker.last_error
        for _ in range(20):  # the lease's next ticks: no copy until the wait is over
            tick()
        assert len(copies) == 1
        assert taker.retry_at - time.monotonic() > config.snapshot_retry_seconds - 5
        waits = []
        for _ in range(8):
            taker.retry_at = 0.0  # the wait is over
            waits.append(taker.retry_seconds)
            tick()
        assert len(copies) == 9
        assert waits == [120, 240, 480, 960, 1800, 1800, 1800, 1800]
    finally:
        taker._pool.shutdown()

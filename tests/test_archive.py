"""A hot store that stays bounded (issue 26, part 3): records older than --retain-days move
from LMDB into hash-chained, compressed archive segments, in the writer's periodic group; a
replay of an archived request id gets its first answer (never charged twice), the audit trail
reads as one chain across archive and store, the change feed says where it starts, and a
damaged archive is named by `yikatong archive verify`. Real servers, the manual clock."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import grpc
import lmdb
import pytest
from test_e2e import START, new_active_card
from test_money_e2e import balances, error_of, pay, top_up

from yikatong import config
from yikatong.server.harness import ROOT, ServerProcess, free_address, metadata, wait_until
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

DAY = 86400
HOT_KINDS = (b"changes", b"audit", b"transfers", b"requests", b"answers")


def serve(tmp_path, *extra: str, data_dir=None) -> ServerProcess:
    return ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START, *extra,
                         data_dir=data_dir)


def advance(srv, seconds: int) -> None:
    srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=seconds), metadata=srv.md("ADMIN"),
                           timeout=10)


def hot(data_dir: str) -> dict[str, tuple[int, int]]:
    """(entries, bytes of keys and values) of the databases the archive takes from, read
    beside the running server."""
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    out = {}
    with env.begin() as txn:
        for name in HOT_KINDS:
            db = env.open_db(name, txn=txn, create=False)
            sizes = [len(k) + len(v) for k, v in txn.cursor(db=db)]
            out[name.decode()] = (len(sizes), sum(sizes))
    env.close()
    return out


def open_holds(data_dir: str) -> int:
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    with env.begin() as txn:
        n = txn.stat(env.open_db(b"holds_by_timeout", txn=txn, create=False))["entries"]
    env.close()
    return n


def segments(data_dir: str) -> list[str]:
    where = os.path.join(data_dir, "archive")
    return sorted(n for n in os.listdir(where) if n.endswith(".seg")) if os.path.isdir(where) \
        else []


def export(srv, after: int = 0) -> list[pb.AuditEvent]:
    return list(rpc.AuditStub(srv.channel).Export(pb.ExportRequest(from_sequence=after),
                                                  metadata=metadata("AUDITOR"), timeout=20))


def yikatong(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def archived_all(srv) -> bool:
    """The periodic job has taken every debit's records (the newest change and audit event
    stay, and the transfer the newest change names: the next sequence and the chain's head
    are read from them)."""
    h = hot(srv.data_dir)
    return h["requests"][0] == 0 and h["transfers"][0] <= 1 and h["changes"][0] <= 1


def test_debits_beyond_the_window_move_to_the_archive_and_replay_their_first_answer(tmp_path):
    srv = serve(tmp_path, "--retain-days", "1")
    try:
        card = new_active_card(srv, 1)
        top_up(srv, card, 100_000, tid="topup-1")
        firsts = {f"fare-{i}": pay(srv, card, 100 + i, rid=f"fare-{i}") for i in range(30)}
        assert all(a.decision == pb.DECISION_APPROVED for a in firsts.values())
        spent = balances(srv, card)
        before = export(srv)
        within = hot(srv.data_dir)
        assert within["requests"][0] >= 31 and within["transfers"][0] == 31
        time.sleep(1.5)  # a periodic group inside the window: nothing is old enough
        assert segments(srv.data_dir) == []

        advance(srv, DAY + 60)  # the day's records are older than the window now
        assert wait_until(lambda: archived_all(srv), 30), hot(srv.data_dir)
        beyond = hot(srv.data_dir)
        for kind in ("changes", "audit", "transfers", "requests"):
            assert beyond[kind][1] < within[kind][1] / 10, (kind, within, beyond)
        names = segments(srv.data_dir)
        assert names and names[0] == "0000000001.seg"
        where = os.path.join(srv.data_dir, "archive")
        assert os.stat(where).st_mode & 0o777 == 0o700
        assert all(os.stat(os.path.join(where, n)).st_mode & 0o777 == 0o600 for n in names)

        # a replay of an archived request id: its first answer, nothing charged
        for rid in ("fare-0", "fare-17"):
            again = pay(srv, card, 100 + int(rid.split("-")[1]), rid=rid)
            assert again == firsts[rid]
        assert balances(srv, card) == spent
        # the same id with other fields: refused, never done
        reused = error_of(pay, srv, card, 999, rid="fare-3")
        assert reused.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "ID_REUSED" in reused.details()
        assert balances(srv, card) == spent
        again = top_up(srv, card, 100_000, tid="topup-1")  # Ledger.Transfer's id likewise
        assert again.status == pb.TRANSFER_STATUS_POSTED and balances(srv, card) == spent
        # an archived transfer is not reversed here: said, naming the archive
        refused = error_of(srv.ledger.Reverse, pb.ReverseRequest(
            transfer_id="topup-1", reversal_id="rev-1"), metadata=srv.md("CARD_AGENCY"))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ARCHIVED" in refused.details() and "archive" in refused.details()

        # the audit trail: one chain across archive and store, exported and verified whole
        after = export(srv)
        assert after[:len(before)] == before
        assert [e.sequence for e in after] == list(range(1, len(after) + 1))
        assert export(srv, 5)[0].sequence == 6
        verified = rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(),
                                                     metadata=metadata("AUDITOR"), timeout=20)
        assert verified.ok and verified.events == len(after), verified

        # the change feed starts where the store does: OUT_OF_RANGE, naming the oldest kept
        with pytest.raises(grpc.RpcError) as old:
            list(srv.status.WatchChanges(pb.WatchChangesRequest(from_sequence=0),
                                         metadata=srv.md("TRANSIT_GATE"), timeout=10))
        assert old.value.code() == grpc.StatusCode.OUT_OF_RANGE
        text = old.value.details()
        assert "archived" in text and "oldest kept" in text and "GetStatusBatch" in text
    finally:
        assert srv.stop() == 0
    for command in ("audit", "archive"):
        done = yikatong(command, "verify", "--data-dir", srv.data_dir)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "every segment decodes" in done.stdout


def archived_store(tmp_path) -> str:
    """A stopped server's data dir whose early records are in the archive (two segments)."""
    os.makedirs(tmp_path, exist_ok=True)
    srv = serve(tmp_path, "--retain-days", "1")
    try:
        card = new_active_card(srv, 2)
        top_up(srv, card, 10_000)
        for i in range(5):
            pay(srv, card, 10, rid=f"a-{i}")
        advance(srv, DAY + 60)
        assert wait_until(lambda: len(segments(srv.data_dir)) == 1, 30)
        for i in range(5):
            pay(srv, card, 10, rid=f"b-{i}")
        advance(srv, DAY + 60)
        assert wait_until(lambda: len(segments(srv.data_dir)) == 2, 30)
    finally:
        assert srv.stop() == 0
    return srv.data_dir


def test_archive_verify_names_an_edited_segment_and_a_removed_one(tmp_path):
    data_dir = archived_store(tmp_path)
    assert yikatong("archive", "verify", "--data-dir", data_dir).returncode == 0
    first = os.path.join(data_dir, "archive", "0000000001.seg")
    with open(first, "rb") as f:
        kept = f.read()
    edited = bytearray(kept)
    edited[len(edited) // 2] ^= 0x01
    with open(first, "wb") as f:
        f.write(edited)
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 1 and "0000000001.seg" in done.stdout \
        and "hash does not match" in done.stdout, done.stdout + done.stderr
    audit = yikatong("audit", "verify", "--data-dir", data_dir)
    assert audit.returncode == 1, audit.stdout

    with open(first, "wb") as f:
        f.write(kept)
    os.remove(os.path.join(data_dir, "archive", "0000000002.seg"))
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 1 and "0000000002.seg is missing" in done.stdout, done.stdout

    os.remove(first)  # the first one gone: the rest no longer links to anything
    os.rename(os.path.join(data_dir, "lmdb"), os.path.join(data_dir, "kept"))
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 2 and "no store" in done.stderr


def test_a_segment_the_store_never_recorded_is_removed_and_written_again(tmp_path):
    """A crash after a segment's rename and before its transaction's commit leaves a file
    the store does not record: the next move removes it and writes that segment anew."""
    data_dir = archived_store(tmp_path)
    where = os.path.join(data_dir, "archive")
    with open(os.path.join(where, "0000000003.seg"), "wb") as f:
        f.write(b"YKAR\x01 a segment whose transaction never committed")
    with open(os.path.join(where, "0000000003.seg.tmp"), "wb") as f:
        f.write(b"half")
    assert yikatong("archive", "verify", "--data-dir", data_dir).returncode == 0  # not its own
    srv = serve(tmp_path, "--retain-days", "1", data_dir=data_dir)
    try:
        card = new_active_card(srv, 3)
        top_up(srv, card, 1000)
        advance(srv, DAY + 60)
        assert wait_until(lambda: hot(data_dir)["requests"][0] == 0, 30)
        assert "removed 0000000003.seg from the archive" in srv.output()
    finally:
        assert srv.stop() == 0
    assert segments(data_dir)[-1] == "0000000003.seg"
    assert not [n for n in os.listdir(where) if n.endswith(".tmp")]
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 0, done.stdout + done.stderr


def test_retain_days_is_checked_at_start(tmp_path):
    for value in ("-1", "36501", "1e-9", "nan"):  # 1e-9: rounds to 0 s, archiving nothing
        done = yikatong("serve", "--data-dir", str(tmp_path / "d"), "--retain-days", value)
        assert done.returncode == 2 and "--retain-days must be" in done.stderr
        assert "Traceback" not in done.stderr


def test_sigkill_while_archiving_loses_no_acknowledged_debit(tmp_path):
    """Debits under load while the clock runs past a window of about 90 s, the server killed
    (SIGKILL) three times: the store and the archive verify, and every acknowledged debit is
    there (its replay answers as first, and nothing is charged by any replay)."""
    rng = random.Random(26)
    data_dir = str(tmp_path / "data")
    srv = serve(tmp_path, "--retain-days", "0.001", data_dir=data_dir)
    card = new_active_card(srv, 4)
    top_up(srv, card, 10_000_000)
    acknowledged: dict[str, int] = {}
    for _ in range(3):
        had = len(segments(data_dir))
        stop = threading.Event()

        def load(srv=srv, stop=stop):
            while not stop.is_set():
                rid, fen = uuid.uuid4().hex, rng.randint(1, 50)
                try:
                    answer = pay(srv, card, fen, rid=rid)
                except grpc.RpcError:
                    continue  # in flight when the server died: not acknowledged
                if answer.decision == pb.DECISION_APPROVED:
                    acknowledged[rid] = fen

        def clock(srv=srv, stop=stop):
            while not stop.wait(0.1):
                try:
                    advance(srv, 30)
                except grpc.RpcError:
                    return

        threads = [threading.Thread(target=load), threading.Thread(target=load),
                   threading.Thread(target=clock)]
        for t in threads:
            t.start()
        try:
            # killed once segments are being written (bounded wait), at a random moment
            assert wait_until(lambda had=had: len(segments(data_dir)) > had + 1, 30)
            time.sleep(rng.uniform(0.0, 1.0))
            srv.kill()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        srv.close()
        srv = serve(tmp_path, "--retain-days", "0.001", data_dir=data_dir)
    try:
        assert len(acknowledged) > 50 and segments(data_dir)
        spent = balances(srv, card)
        for rid, fen in acknowledged.items():
            again = pay(srv, card, fen, rid=rid)
            assert again.decision == pb.DECISION_APPROVED, rid
        assert balances(srv, card) == spent  # nothing acknowledged was lost: no replay charged
        verified = rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(),
                                                     metadata=metadata("AUDITOR"), timeout=30)
        assert verified.ok, verified
    finally:
        assert srv.stop() == 0
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 0, done.stdout + done.stderr


def test_answers_migrated_from_format_4_get_a_time_are_archived_and_still_replayed(tmp_path):
    """Store format 5 keeps when each answer was given; format 4 did not: the migration gives
    every one the store's last recorded time. Once that is older than the window they are
    archived, and a replay still gets the first answer."""
    import json
    import shutil
    import struct

    from yikatong.server.harness import write_pii_keys

    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    data_dir = str(tmp_path / "format4")
    shutil.copytree(os.path.join(fixtures, "format4"), data_dir,
                    ignore=shutil.ignore_patterns("answers.json"))
    os.chmod(data_dir, 0o700)
    with open(os.path.join(fixtures, "format4", "answers.json")) as f:
        was = json.load(f)
    keys = write_pii_keys(str(tmp_path / "keys.toml"))
    done = yikatong("migrate", "--data-dir", data_dir, "--pii-key-file", keys)
    assert done.returncode == 0, done.stderr
    assert "format 4->5: remembered answers timed 3" in done.stdout, done.stdout
    assert "format 5->6: remembered answers in sequence 3" in done.stdout, done.stdout
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs)
    with env.begin() as txn:
        requests = env.open_db(b"requests", txn=txn, create=False)
        answers = env.open_db(b"answers", txn=txn, create=False)
        times = {struct.unpack_from("<q", v, 1)[0] for _, v in txn.cursor(db=answers)}
        indexed = {bytes(k): struct.unpack(">Q", v)[0] for k, v in txn.cursor(db=requests)}
    env.close()
    assert len(times) == 1 and 0 < times.pop() <= 1796529600  # the fixture's last write
    # in the old index's order (time, then id)
    assert indexed == {b"apply-c3": 1, b"tap-1": 2, b"topup-1": 3}

    clients = str(tmp_path / "fx.toml")
    from test_migrate import ask

    ask.write_clients(clients)
    srv = ServerProcess(tmp_path, "--clients", clients, "--clock", "manual", "--clock-start",
                        was["clock_start"], "--retain-days", "1", clients=False,
                        data_dir=data_dir)
    try:
        srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=2 * DAY), timeout=10,
                               metadata=(("authorization", "Bearer fixture-admin"),))
        assert wait_until(lambda: hot(data_dir)["requests"][0] == 0, 30), hot(data_dir)
        sh = [n for n in ask.card_numbers(data_dir) if n.startswith("31")][:1]
        replay = ask.ask(srv.address, sh, feed=False)["replay"]
        assert replay == was["replay"]
    finally:
        assert srv.stop() == 0
    assert yikatong("archive", "verify", "--data-dir", data_dir).returncode == 0


def test_a_backup_carries_the_archive_and_a_restore_lays_it_out_again(tmp_path):
    """`yikatong backup` copies the segments its copy records (0600 in 0700), verifies their
    chain with the copy, and refuses to call a backup with a damaged segment one; `restore`
    lays them out again, and the restored server replays an archived id's first answer."""
    data_dir = archived_store(tmp_path / "a")
    backup = str(tmp_path / "backup")
    done = yikatong("backup", "--data-dir", data_dir, "--to", backup)
    assert done.returncode == 0 and "2 archive segments" in done.stdout, done.stderr
    where = os.path.join(backup, "archive")
    assert os.stat(where).st_mode & 0o777 == 0o700
    assert sorted(os.listdir(where)) == ["0000000001.seg", "0000000002.seg"]
    assert all(os.stat(os.path.join(where, n)).st_mode & 0o777 == 0o600
               for n in os.listdir(where))
    assert yikatong("backup", "--verify", backup).returncode == 0
    with open(os.path.join(backup, "manifest.json")) as f:
        manifest = json.load(f)
    # the manifest names the last segment's hash (not an audit event's bytes)
    with open(os.path.join(where, "0000000002.seg"), "rb") as f:
        last_segment = f.read()
    assert manifest["archive_segments"] == 2 and len(manifest["archive_head"]) == 64
    assert manifest["archive_head"] == last_segment[-32:].hex()  # its hash ends the file

    # a data dir holding another store's archive is not restored into
    other = tmp_path / "other"
    (other / "archive").mkdir(parents=True)
    (other / "archive" / "0000000001.seg").write_bytes(b"another store's")
    done = yikatong("restore", "--from", backup, "--data-dir", str(other))
    assert done.returncode == 2 and "holds an archive" in done.stderr
    assert (other / "archive" / "0000000001.seg").read_bytes() == b"another store's"

    restored = str(tmp_path / "restored")
    done = yikatong("restore", "--from", backup, "--data-dir", restored)
    assert done.returncode == 0, done.stderr
    assert yikatong("archive", "verify", "--data-dir", restored).returncode == 0
    os.makedirs(tmp_path / "b")
    srv = serve(tmp_path / "b", "--retain-days", "1", data_dir=restored)
    try:
        card = next(iter(_cards(restored)))
        before = balances(srv, card)
        assert pay(srv, card, 10, rid="a-0").decision == pb.DECISION_APPROVED
        assert balances(srv, card) == before
    finally:
        assert srv.stop() == 0

    first = os.path.join(where, "0000000001.seg")
    with open(first, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes((byte[0] ^ 1,)))
    done = yikatong("backup", "--verify", backup)
    assert done.returncode == 1 and "0000000001.seg" in done.stderr, done.stderr
    done = yikatong("restore", "--from", backup, "--data-dir", str(tmp_path / "again"))
    assert done.returncode == 1 and not os.path.exists(str(tmp_path / "again" / "lmdb"))


def _cards(data_dir: str) -> list[str]:
    from yikatong.server.harness import card_numbers

    return card_numbers(data_dir)


def test_an_archive_that_cannot_be_written_stops_no_hold_sweep_and_is_said_by_a_metric(
        tmp_path):
    """The move runs in the writer's periodic group beside the hold sweep: a segment that
    cannot be written (here `archive` is a file, not a directory) rolls back the move alone,
    the due hold is still released, and after three failures in a row the metric
    yikatong_archive_failing says so, until a move succeeds; health stays SERVING throughout
    (the server answers rightly: a load balancer must not stop sending it calls, and on a
    cluster it holds the write lease)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir, mode=0o700)
    blocker = os.path.join(data_dir, "archive")
    with open(blocker, "w") as f:
        f.write("not a directory")
    metrics = free_address()
    srv = serve(tmp_path, "--retain-days", "1", "--metrics-listen", metrics, data_dir=data_dir)

    def health():
        return health_pb2_grpc.HealthStub(srv.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status

    def failing() -> float | None:
        try:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            return None
        found = re.search(r"^yikatong_archive_failing (\S+)$", body, re.M)
        return float(found[1]) if found else None

    try:
        card = new_active_card(srv, 5)
        top_up(srv, card, 1000)
        pay(srv, card, 300, rid="hold-1", phase=pb.PHASE_HOLD, hold_timeout_seconds=600)
        assert balances(srv, card)["TRANSIT"][1] == 300 and open_holds(data_dir) == 1
        advance(srv, DAY + 60)
        assert wait_until(lambda: open_holds(data_dir) == 0, 30)  # the sweep committed
        assert wait_until(lambda: failing() == 1, 30)
        assert "the archive's move failed (3 in a row: " in srv.output()
        assert "archive failing: the hot store grows" in srv.output()
        assert health() == health_pb2.HealthCheckResponse.SERVING
        assert segments(data_dir) == [] and hot(data_dir)["requests"][0] > 0
        os.remove(blocker)
        assert wait_until(lambda: failing() == 0, 30)
        assert wait_until(lambda: hot(data_dir)["requests"][0] == 0, 30)
        assert health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert srv.stop() == 0
    assert yikatong("archive", "verify", "--data-dir", data_dir).returncode == 0


def test_a_journey_goes_to_the_archive_with_its_hold_once_no_tap_is_owed_its_telling(tmp_path):
    """Issue 28's journey records are archived with their holds (the hot store grew by one
    per journey for ever): a completed journey's record leaves with its posted hold; a
    journey settled at its timeout, whose card's next tap is still to be told of it, stays
    hot (that tap reads it) even once its hold is archived, and is forgotten when told."""
    from test_journeys import tap_in, tap_out

    from yikatong.storage import archive

    def hot_journeys() -> list[bytes]:
        env = lmdb.open(os.path.join(srv.data_dir, "lmdb"), readonly=True,
                        max_dbs=config.lmdb_max_dbs, lock=True)
        with env.begin() as txn:
            keys = [bytes(k) for k, _ in txn.cursor(db=env.open_db(b"journeys", txn=txn,
                                                                   create=False))]
        env.close()
        return keys

    srv = serve(tmp_path, "--retain-days", "1")
    try:
        done, left = new_active_card(srv, 5), new_active_card(srv, 6)
        for card in (done, left):
            top_up(srv, card, 10_000)
        assert tap_in(srv, done, "in-done").decision == pb.DECISION_APPROVED
        assert tap_out(srv, done, "out-done", "in-done", 300).decision == pb.DECISION_APPROVED
        assert tap_in(srv, left, "in-left").decision == pb.DECISION_APPROVED
        advance(srv, 600)  # the second tap-in's hold times out: settled at its max fare
        assert balances(srv, left)["TRANSIT"][0] == 10_000 - 600
        assert sorted(hot_journeys()) == [b"in-done", b"in-left"]

        advance(srv, DAY + 60)
        assert wait_until(lambda: hot_journeys() == [b"in-left"], 30), hot_journeys()
        where = os.path.join(srv.data_dir, "archive")
        archived = {k for n in range(1, len(segments(srv.data_dir)) + 1)
                    for k, _ in archive.read(where, n).records["journeys"]}
        assert archived == {b"in-done"}
        told = pay(srv, left, 10, rid="fare-left")  # told of the journey, which then goes
        assert told.incomplete_journey.hold_request_id == "in-left"
        assert hot_journeys() == []
    finally:
        assert srv.stop() == 0
    done_ = yikatong("archive", "verify", "--data-dir", srv.data_dir)
    assert done_.returncode == 0, done_.stdout + done_.stderr


def test_a_replicated_segment_and_its_deletes_fit_the_room_left_in_the_record(tmp_path):
    """On a replicated writer the segment travels in the periodic group's record with its
    deletes: measured as encoded, they fit the room the group leaves (fewer records of each
    kind until they do); if one of each cannot, TooLarge and nothing is moved (the Mover
    counts it: archive_failing), never a record the log refuses for ever."""
    from yikatong.storage import archive, records
    from yikatong.storage.lmdb_store import Book, Store

    store = Store(str(tmp_path / "d"))
    try:
        def old_events(book):
            for i in range(400):
                book.append_audit(1000 + i, "gate-1", "TRANSIT_GATE", "Authorize",
                                  "3100" + "0" * 8, "x" * 40, "OK", 1, "")
        store.write(old_events)

        def moved(room):
            journal: list = []
            out = store.write(lambda book: archive.move(
                Book(book.txn, book.dbs, journal), 10**9, 10, bytes_max=room))
            return out, records.journal_size(journal)
        with pytest.raises(archive.TooLarge):
            moved(200)
        assert segments(store.data_dir) == []
        out, size = moved(6_000)
        assert 0 < out["audit"] < 399 and size <= 6_000  # fewer, to fit
        first = out["audit"]
        out, _ = moved(None)  # a single node's: no bound, the rest (the newest stays)
        assert out["segment"] == 2 and out["audit"] == 399 - first
    finally:
        store.close()


def test_an_archive_written_before_journeys_were_archived_reads_and_grows_on(tmp_path):
    """tests/fixtures/archive-0.5.0: a data dir whose segment 1 was written by the release
    before segments named their payload's kinds (no `payload_kinds`: four kinds; written by
    dfb2d5f). This release verifies it, replays an id archived in it with its first answer,
    and archives on: segment 2, of five kinds, chained to it."""
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                           "archive-0.5.0")
    with open(os.path.join(fixture, "answers.json")) as f:
        known = json.load(f)
    data_dir = str(tmp_path / "data")
    shutil.copytree(fixture, data_dir, ignore=shutil.ignore_patterns("answers.json"))
    os.chmod(data_dir, 0o700)
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 0 and "1 archive segments" in done.stdout, done.stdout + done.stderr
    srv = serve(tmp_path, "--retain-days", "1", data_dir=data_dir)
    try:
        card = known["card"]
        for rid in ("fare-0", "fare-3"):  # from the old segment: its first answer
            again = pay(srv, card, 100 + int(rid.split("-")[1]), rid=rid)
            assert again.SerializeToString().hex() == known["answers"][rid]
        pay(srv, card, 50, rid="after-1")
        advance(srv, 3 * DAY)
        assert wait_until(lambda: len(segments(data_dir)) == 2, 30)
    finally:
        assert srv.stop() == 0
    done = yikatong("archive", "verify", "--data-dir", data_dir)
    assert done.returncode == 0 and "2 archive segments" in done.stdout, done.stdout + done.stderr

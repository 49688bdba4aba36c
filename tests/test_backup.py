"""Backups (issue 26): `yikatong backup` beside a server under write load, verified before it
is done, owner-only; `yikatong restore` refuses one that does not verify and makes a data dir
a server opens with every debit acknowledged before the backup in it."""
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid

from test_e2e import START, new_active_card
from test_money_e2e import balances, pay, top_up

from yikatong.server.harness import ROOT, ServerProcess, running
from yikatong.storage import backup as backups
from yikatong.storage import migrate
from yikatong.v1 import yikatong_pb2 as pb


def yikatong(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def modes(path: str) -> set[tuple[str, int]]:
    out = {(path, stat.S_IMODE(os.stat(path).st_mode))}
    for d, dirs, files in os.walk(path):
        out |= {(os.path.join(d, n), stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode))
                for n in dirs + files}
    return out


def test_a_backup_under_write_load_restores_every_debit_acknowledged_before_it(tmp_path):
    backup, restored = str(tmp_path / "backup"), str(tmp_path / "restored")
    with running(_dir(tmp_path, "a"), "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 1)
        top_up(srv, card, 10_000_000)
        acked: list[tuple[str, int, float]] = []  # (request id, available after, when)
        stop = threading.Event()

        def load():
            while not stop.is_set():
                rid = uuid.uuid4().hex
                answer = pay(srv, card, 1, rid=rid)
                assert answer.decision == pb.DECISION_APPROVED
                acked.append((rid, answer.available_fen, time.monotonic()))

        writer = threading.Thread(target=load)
        writer.start()
        try:
            while len(acked) < 200:
                time.sleep(0.01)
            started = time.monotonic()
            took = yikatong("backup", "--data-dir", srv.data_dir, "--to", backup)
            ended = time.monotonic()
            while len(acked) < 400 or acked[-1][2] < ended:  # load goes on after it
                time.sleep(0.01)
        finally:
            stop.set()
            writer.join(timeout=30)
        assert took.returncode == 0, took.stderr
        assert "taken and verified" in took.stdout
    before = [a for a in acked if a[2] < started]
    assert len(before) >= 200 and len(acked) > len(before)

    # owner-only: the copy holds personal information
    assert {m for _, m in modes(backup)} <= {0o700, 0o600}, modes(backup)
    with open(os.path.join(backup, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == migrate.FORMAT and manifest["records"]["cards"] >= 1
    assert manifest["audit_events"] > 0 and len(manifest["audit_head"]) == 64

    done = yikatong("restore", "--from", backup, "--data-dir", restored)
    assert done.returncode == 0, done.stderr
    assert {m for _, m in modes(restored)} <= {0o700, 0o600}
    assert yikatong("audit", "verify", "--data-dir", restored).returncode == 0

    again = ServerProcess(_dir(tmp_path, "b"), "--clock", "manual", "--clock-start", START,
                          data_dir=restored)
    try:
        # every debit acknowledged before the backup began is in it: its replay gets the
        # first answer (a debit the copy lacked would be charged now, and answer less)
        for rid, available, _ in before:
            assert pay(again, card, 1, rid=rid).available_fen == available
        posted = balances(again, card)["TRANSIT"][0]
        held = 10_000_000 - posted  # the debits the copy holds, one fen each
        assert len(before) <= held <= len(acked)
        # and nothing half: what is left is what one acknowledged debit answered
        assert posted in {available for _, available, _ in acked}
        assert again.status.GetStatus(pb.GetStatusRequest(card_number=card),
                                           metadata=again.md("BANK_SWITCH")).state \
            == pb.CARD_STATE_ACTIVE
    finally:
        again.stop()


def _dir(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.mkdir()
    return str(path)


def test_restore_refuses_a_backup_that_does_not_verify(tmp_path):
    with running(_dir(tmp_path, "a"), "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 2)
        top_up(srv, card, 500)
        pay(srv, card, 120)
        backup = str(tmp_path / "backup")
        assert yikatong("backup", "--data-dir", srv.data_dir, "--to", backup).returncode == 0
        # a second backup never overwrites the first
        again = yikatong("backup", "--data-dir", srv.data_dir, "--to", backup)
        assert again.returncode == 2 and "exists" in again.stderr
    assert yikatong("backup", "--verify", backup).returncode == 0

    manifest_path = os.path.join(backup, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)

    # a manifest that lies about what the copy holds
    os.chmod(manifest_path, 0o600)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "change_sequence": manifest["change_sequence"] + 5}, f)
    refused = yikatong("restore", "--from", backup, "--data-dir", str(tmp_path / "r1"))
    assert refused.returncode == 1 and "change_sequence" in refused.stderr, refused.stderr
    assert not os.path.exists(tmp_path / "r1")

    # one byte of the copy changed
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    data = os.path.join(backup, "lmdb", "data.mdb")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    refused = yikatong("restore", "--from", backup, "--data-dir", str(tmp_path / "r2"))
    assert refused.returncode == 1 and "sha256" in refused.stderr, refused.stderr
    assert not os.path.exists(tmp_path / "r2")

    # no manifest: an unfinished backup
    os.remove(manifest_path)
    refused = yikatong("backup", "--verify", backup)
    assert refused.returncode == 1 and "unfinished" in refused.stderr


def test_a_copy_whose_records_do_not_hold_is_not_called_a_backup(tmp_path):
    """The manifest is rewritten to match a copy whose ledger was edited: the file hash
    holds, the records do not."""
    import lmdb

    from yikatong.storage import backup as backups

    with running(_dir(tmp_path, "a"), "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 3)
        top_up(srv, card, 500)
        backup = str(tmp_path / "backup")
        assert yikatong("backup", "--data-dir", srv.data_dir, "--to", backup).returncode == 0
    env = lmdb.open(os.path.join(backup, "lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        accounts = env.open_db(b"accounts", txn=txn, create=False)
        key, value = next(iter(txn.cursor(db=accounts)))
        edited = bytearray(value)
        edited[-1] ^= 0x01  # a balance column off by a little
        txn.put(key, bytes(edited), db=accounts)
    env.close()
    size, digest = backups._hash(os.path.join(backup, "lmdb", "data.mdb"))
    manifest_path = os.path.join(backup, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "data_bytes": size, "data_sha256": digest}, f)
    refused = yikatong("backup", "--verify", backup)
    assert refused.returncode == 1, refused.stdout
    assert "ledger" in refused.stderr or "does not read back" in refused.stderr, refused.stderr


def test_backup_and_restore_say_in_one_line_what_stops_them(tmp_path):
    nothing = yikatong("backup", "--data-dir", str(tmp_path / "none"), "--to",
                       str(tmp_path / "b"))
    assert nothing.returncode == 2 and "no store in" in nothing.stderr
    assert "Traceback" not in nothing.stderr
    half = yikatong("backup", "--to", str(tmp_path / "b"))
    assert half.returncode == 2 and "--data-dir" in half.stderr
    with running(_dir(tmp_path, "a")) as srv:
        backup = str(tmp_path / "backup")
        assert yikatong("backup", "--data-dir", srv.data_dir, "--to", backup).returncode == 0
        refused = yikatong("restore", "--from", backup, "--data-dir", srv.data_dir)
    assert refused.returncode == 2 and "holds a store" in refused.stderr


def test_a_backup_or_restore_killed_midway_leaves_nothing_that_passes_for_one(tmp_path):
    """SIGKILL `yikatong backup` and `yikatong restore` at points along their way: what is at
    the backup's path either verifies or is refused, the source store still verifies, and
    a restore killed midway leaves no store where it was going (the next one completes)."""
    import random

    rng = random.Random(7)
    with running(_dir(tmp_path, "a"), "--demo") as srv:
        for n in range(6):
            to = str(tmp_path / f"b{n}")
            proc = subprocess.Popen([sys.executable, "-m", "yikatong", "backup", "--data-dir",
                                     srv.data_dir, "--to", to], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 1.2))
            proc.kill()
            proc.wait()
            if os.path.exists(to):  # it finished before the kill: a whole backup
                assert yikatong("backup", "--verify", to).returncode == 0
            else:
                refused = yikatong("backup", "--verify", to)
                assert refused.returncode == 1
            # a new backup to the same path is taken whole (a partial one is cleared)
            if not os.path.exists(to):
                assert yikatong("backup", "--data-dir", srv.data_dir, "--to", to).returncode \
                    == 0
        assert yikatong("audit", "verify", "--data-dir", srv.data_dir).returncode == 0
    backup = str(tmp_path / "b0")
    for n in range(4):
        target = str(tmp_path / f"r{n}")
        proc = subprocess.Popen([sys.executable, "-m", "yikatong", "restore", "--from", backup,
                                 "--data-dir", target], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.0))
        proc.kill()
        proc.wait()
        store = os.path.join(target, "lmdb", "data.mdb")
        finished = os.path.exists(store)
        if finished:  # the whole store, as backed up
            assert backups._hash(store)[1] == backups.verify(backup).data_sha256
        done = yikatong("restore", "--from", backup, "--data-dir", target)
        if finished:
            assert done.returncode == 2 and "holds a store" in done.stderr
        else:
            assert done.returncode == 0, done.stderr
        assert yikatong("audit", "verify", "--data-dir", target).returncode == 0


def test_a_backup_takes_the_map_a_running_server_grew_after_it_opened_the_store(tmp_path):
    """MDB_MAP_RESIZED: the server (another process) grew the map past the size this process
    saw at open; the backup takes the new size and copies (a backup under write load failed
    so once the writer got faster)."""
    import lmdb

    from yikatong import config
    from yikatong.storage.lmdb_store import Store

    data_dir = str(tmp_path / "data")
    Store(data_dir, map_size=1024**2).close()
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, lock=True,
                    max_dbs=config.lmdb_max_dbs)
    try:
        grow = ("import sys\nfrom yikatong.storage.lmdb_store import Store\n"
                "s = Store(sys.argv[1], map_size=64 * 1024**2)\n"
                "s.write(lambda b: [b.put_meta(b'filler:%d' % i, bytes(4000)) "
                "for i in range(4000)])\ns.close()\n")  # 16 MB: past the 10 MiB seen here
        subprocess.run([sys.executable, "-c", grow, data_dir], check=True, timeout=60)
        manifest = backups.take_env(env, str(tmp_path / "backup"))
    finally:
        env.close()
    assert manifest.data_bytes > 1024**2
    assert backups.verify(str(tmp_path / "backup")).data_sha256 == manifest.data_sha256

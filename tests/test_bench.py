"""The load-test tooling works: the data generator on a small N, and each Locust user class
for a few seconds against a real server (requests made and succeeded; not a speed check)."""
import csv
import os
import subprocess
import sys

import pytest

from yikatong import ledger
from yikatong.server.harness import ROOT, ServerProcess
from yikatong.storage import records as r
from yikatong.storage.lmdb_store import Store

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gen_data  # noqa: E402

from yikatong.model import AccountKind, State, holder_account_key

HOLDERS = 3000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "data")
    gen_data.generate(path, HOLDERS, chunk=1000)
    return path


def test_generator_fills_a_realistic_mix_with_funded_accounts(data_dir):
    with open(os.path.join(data_dir, "cards-ok.txt")) as f:
        ok = f.read().split()
    with open(os.path.join(data_dir, "cards-hot.txt")) as f:
        hot = f.read().split()
    store = Store(data_dir)
    try:
        with store.read() as txn:
            book = store.book(txn)
            ledger.check_invariants(book)
            states = {}
            for _, value in txn.cursor(db=store.dbs.cards):
                state = value[r.OFF_STATE]
                states[state] = states.get(state, 0) + 1
            assert sum(states.values()) >= HOLDERS
            assert states[State.SUPERSEDED] > 0.02 * HOLDERS and states[State.LOST] > 0
            assert states[State.ACTIVE] > 0.8 * HOLDERS
            assert all(book.card(n).state == State.ACTIVE for n in ok[:50])
            assert all(book.card(n).state != State.ACTIVE for n in hot[:50])
            purse = book.account(holder_account_key(1, AccountKind.TRANSIT))
            assert purse.posted == gen_data.FUNDING[AccountKind.TRANSIT]
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("user", ["TransitGate", "MedicalTerminal", "BankSwitch",
                                  "BenefitCounter", "Concentrator"])
def test_each_locust_user_makes_requests_that_succeed(data_dir, tmp_path, user):
    server = ServerProcess(tmp_path, "--clients", os.path.join(data_dir, "clients.toml"),
                           clients=False, data_dir=data_dir)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
             "--host", server.address, "--users", "4", "--spawn-rate", "4", "--run-time", "4s",
             "--cards-dir", data_dir, "--csv", str(tmp_path / "run"), "--only-summary", user],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert rows, "no named requests"


def test_server_bench_runs_h2load_against_ours_and_the_bare_server_at_each_worker_count():
    """A tiny run of every part of bench/server_bench.py. h2load and nghttp are installed by the
    script when missing (bench/h2load_grpc.py), never skipped: each answer is checked there."""
    out = subprocess.run([sys.executable, "bench/server_bench.py", "--seconds", "0.5",
                          "--repeat", "1", "--workers", "1,2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ")]
    rates = {(call.strip(), name.strip(), n.strip()): float(rate.replace(",", ""))
             for call, name, n, rate, *_ in rows if n.strip() in ("1", "2")}
    assert set(rates) == {(call, name, n) for n in "12" for name in
                          ("bare grpc.aio echo", "Yikatong `serve --workers N`")
                          for call in ("unary Authorize", "AuthorizeStream 10x100")}
    assert all(rate > 0 for rate in rates.values())
    assert "h2load -D 500ms -c 32" in out.stdout and "stream.bin" in out.stdout


def test_wire_bench_compares_the_wire_path_with_the_python_path():
    out = subprocess.run([sys.executable, "bench/wire_bench.py", "--rounds", "5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "wire path" in out.stdout and "Cursor.getmulti" in out.stdout


def test_money_wire_bench_compares_debits_from_wire_bytes_with_the_python_path():
    out = subprocess.run([sys.executable, "bench/money_wire_bench.py", "--seconds", "0.3",
                          "--repeat", "1", "--unary", "4"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| wire / Python |" in out.stdout and "event loop's thread" in out.stdout



def test_request_ids_bench_times_each_shape_of_request_id():
    out = subprocess.run([sys.executable, "bench/request_ids_bench.py", "--debits", "500",
                          "--before", "500", "--holders", "50", "--repeat", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in
            line and "debits/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| sequential", "| time-ordered",
                                                  "| random (UUIDv4)"], out.stdout

def test_nats_bench_times_fenced_appends_at_both_sync_settings():
    out = subprocess.run([sys.executable, "bench/nats_bench.py", "--appends", "20",
                          "--sizes", "512"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 2m") or
            line.startswith("| always")]
    assert len(rows) == 2


def test_replication_bench_compares_replicated_with_single_node_debits():
    out = subprocess.run([sys.executable, "bench/replication_bench.py", "--seconds", "0.5",
                          "--repeat", "1", "--streams", "1", "--workers", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| replicated, 3 nodes |" in out.stdout and "identical: True" in out.stdout
    assert "| a follower, 2 workers |" in out.stdout and "the followers " in out.stdout


def test_backup_bench_times_backup_and_restore_under_write_load():
    out = subprocess.run([sys.executable, "bench/backup_bench.py", "--gigabytes", "0.01",
                          "--cards", "50"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| backup under write load" in out.stdout and "| restore" in out.stdout
    assert "taken and verified" in out.stdout

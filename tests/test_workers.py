"""`--workers 2`: two server processes on one port and one data dir, under a parent that
supervises them. Real subprocesses; each check makes its own connections (a fresh
subchannel each), which the kernel spreads over the workers (SO_REUSEPORT), and the access
log's `pid` says which worker answered."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_e2e import START, new_active_card
from test_money_e2e import balances, top_up

from yikatong.server.harness import ROOT, ServerProcess, metadata, wait_until
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = "TRANSIT_GATE"


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "--workers", "2", "--clock", "manual", "--clock-start", START)
    yield s
    s.stop()


def fresh_channel(address: str) -> grpc.Channel:
    """A connection of its own (not shared through gRPC's global subchannel pool)."""
    return grpc.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))


def worker_pids(srv) -> set[int]:
    """The supervisor's workers: its children but the metrics endpoint's process (with
    --metrics-listen, a child too: counted as a worker, a kill of one looked replaced at once
    and a quick replacement made three, so the test waited for two in vain)."""
    parent = srv.proc.pid
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(parent)], capture_output=True,
                         text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines()
            if line.strip() and "yikatong.server.exporter" not in line}


def answering_pids(srv, method: str) -> list[int]:
    """The pid of every access-log line for `method` so far (whole lines: the last may still
    be being written by one worker as it is read)."""
    lines = srv.output().split("\n")[:-1]  # what follows the last newline is not whole yet
    return [line["pid"] for line in map(json.loads, (
        t for t in lines if t.startswith('{"time"') and '"call"' in t))
        if line.get("method") == method]


def test_calls_from_fresh_connections_spread_over_both_workers(srv):
    card = new_active_card(srv, 1)
    for _ in range(16):
        with fresh_channel(srv.address) as channel:
            reply = rpc.CardStatusStub(channel).GetStatus(
                pb.GetStatusRequest(card_number=card), metadata=metadata(GATE), timeout=10)
            assert reply.state == pb.CARD_STATE_ACTIVE
    assert wait_until(lambda: len(answering_pids(srv, "CardStatus.GetStatus")) == 16)
    assert set(answering_pids(srv, "CardStatus.GetStatus")) == worker_pids(srv)
    assert len(worker_pids(srv)) == 2


def pay_until_answered(address: str, card: str, rid: str, fen: int) -> pb.AuthorizeResponse:
    """One debit, retried with the same request id until some worker answers it (a worker
    may be killed under it): applied exactly once, whoever answers."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with fresh_channel(address) as channel:
                return rpc.AuthorizationStub(channel).Authorize(pb.AuthorizeRequest(
                    request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=fen,
                    terminal_id="gate-1"), metadata=metadata(GATE), timeout=5)
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or time.monotonic() > deadline:
                raise


def test_a_sigterm_while_a_replacement_worker_starts_is_a_clean_stop(srv):
    """The supervisor starts a worker again at once; a SIGTERM that reaches the new one
    before it serves (it has nothing in flight) still ends the server with 0, not with the
    worker's death by the signal (a race CI once hit)."""
    victim = sorted(worker_pids(srv))[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(worker_pids(srv) - {victim}) == 2, 10)
    assert srv.stop() == 0  # the replacement is still importing: SIGTERM reaches it early


def test_writes_from_both_workers_land_once_and_a_killed_worker_is_replaced(srv):
    card = new_active_card(srv, 2)
    top_up(srv, card, 100_000)
    rids = [f"fare-{k}" for k in range(120)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(pay_until_answered, srv.address, card, rid, 7) for rid in rids]
        time.sleep(0.3)
        victim = sorted(worker_pids(srv))[0]
        os.kill(victim, signal.SIGKILL)  # under load
        answers = [f.result() for f in futures]
    assert all(a.decision == pb.DECISION_APPROVED for a in answers)
    # every acknowledged debit, replayed through fresh connections, is the first answer
    for rid, first in zip(rids[:20], answers[:20], strict=True):
        assert pay_until_answered(srv.address, card, rid, 7) == first
    assert balances(srv, card)["TRANSIT"] == (100_000 - 7 * 120, 0, 100_000 - 7 * 120)
    assert wait_until(lambda: len(worker_pids(srv)) == 2 and victim not in worker_pids(srv))
    assert "ended (exit -9); starting another" in srv.output()
    assert set(answering_pids(srv, "Authorization.Authorize")) - {victim}, "both answered"
    assert srv.stop() == 0
    # one audit chain across both workers, an event for each debit, none twice
    from yikatong.storage import records
    from yikatong.storage.lmdb_store import Store

    store = Store(srv.data_dir)
    try:
        with store.read() as txn:
            book = store.book(txn)
            assert book.verify_audit()[0]
            debits = [e for e in map(records.decode_audit, (v for _, v in book.audit_records()))
                      if e.method == "Authorization.Authorize"]
    finally:
        store.close()
    assert len(debits) == 120


def test_the_change_sequence_is_one_sequence_across_workers(srv):
    cards = [new_active_card(srv, 10 + k) for k in range(2)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: top_up(srv, cards[k % 2], 1 + k, tid=f"t-{k}") and
                      pay_until_answered(srv.address, cards[k % 2], f"p-{k}", 1), range(64)))
    assert srv.stop() == 0
    from yikatong.storage.lmdb_store import Store

    store = Store(srv.data_dir)
    try:
        with store.read() as txn:
            seqs = [seq for seq, _ in store.book(txn).changes()]
    finally:
        store.close()
    assert seqs == sorted(set(seqs)) and len(seqs) > 64 * 2


def test_the_manual_clock_moved_through_one_worker_is_every_workers_clock(srv):
    moved = srv.admin.SetClock(pb.SetClockRequest(time="2027-03-02T10:00:00+08:00"),
                               metadata=metadata("ADMIN"))
    seen = set()
    for _ in range(16):
        with fresh_channel(srv.address) as channel:
            seen.add(rpc.AdminStub(channel).AdvanceClock(
                pb.AdvanceClockRequest(seconds=0), metadata=metadata("ADMIN"), timeout=10).now)
    assert seen == {moved.now}
    assert wait_until(lambda: len(answering_pids(srv, "Admin.AdvanceClock")) == 16)
    assert len(set(answering_pids(srv, "Admin.AdvanceClock"))) == 2


def test_sigterm_drains_health_not_serving_while_answering_then_exits_0(tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "2", "--drain-seconds", "3")
    card_ok = None
    try:
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with fresh_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            card_ok = rpc.CardStatusStub(channel).GetStatus(
                pb.GetStatusRequest(card_number="310000000001"), metadata=metadata(GATE),
                timeout=5)
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()
    assert card_ok is not None and not card_ok.found  # still answered during the drain
    assert "yikatong: stopped" in srv.output()


def serve(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_second_server_on_the_data_dir_or_the_port_is_one_clear_line(srv, tmp_path):
    other = serve(tmp_path, "--workers", "2", "--data-dir", srv.data_dir,
                  "--listen", "127.0.0.1:0")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"yikatong: data dir {srv.data_dir} is locked by another running server"]
    taken = serve(tmp_path, "--workers", "2", "--data-dir", str(tmp_path / "other"),
                  "--listen", srv.address)
    assert taken.returncode == 2
    assert taken.stderr.strip().splitlines() == [
        f"yikatong: cannot listen on {srv.address}: Address already in use"]
    # the first server still serves
    assert not srv.status.GetStatus(pb.GetStatusRequest(card_number="310000000001"),
                                    metadata=metadata(GATE)).found


def test_workers_out_of_range_is_one_clear_line(tmp_path):
    bad = serve(tmp_path, "--workers", "-1", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == "yikatong: --workers must be 0 (one per core) to 64"


def test_workers_0_is_one_per_core(tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        assert f"{os.cpu_count()} worker" in srv.banner[-1]
        assert wait_until(lambda: len(worker_pids(srv)) == (os.cpu_count() or 1)
                          if (os.cpu_count() or 1) > 1 else True)
    finally:
        assert srv.stop() == 0


def test_a_data_dir_lmdb_cannot_open_is_one_clear_line_before_any_worker(tmp_path):
    lmdb_dir = tmp_path / "d" / "lmdb"
    lmdb_dir.mkdir(parents=True)
    (lmdb_dir / "data.mdb").write_bytes(b"garbage" * 1000)
    bad = serve(tmp_path, "--workers", "2", "--data-dir", str(tmp_path / "d"),
                "--listen", "127.0.0.1:0")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith(
        f"yikatong: cannot open the LMDB store in {tmp_path / 'd'}: ")
    assert len(bad.stderr.strip().splitlines()) == 1


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} of one scrape of the Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_one_scrape_sums_the_metrics_of_both_workers(tmp_path):
    from yikatong.server.harness import free_address

    listen = free_address()
    srv = ServerProcess(tmp_path, "--workers", "2", "--metrics-listen", listen)
    try:
        for k in range(16):
            with fresh_channel(srv.address) as channel:
                reply = rpc.AuthorizationStub(channel).Authorize(pb.AuthorizeRequest(
                    request_id=f"m-{k}", card_number="310000000001", channel=pb.CHANNEL_TRANSIT),
                    metadata=metadata(GATE), timeout=10)
                assert reply.reason == pb.DECLINE_REASON_CARD_NOT_FOUND
        assert wait_until(lambda: len(set(answering_pids(srv, "Authorization.Authorize"))) == 2)
        calls = ("yikatong_calls_total", frozenset({("method", "Authorization.Authorize"),
                                                    ("code", "OK")}))
        decided = ("yikatong_decisions_total", frozenset({("channel", "TRANSIT"),
                                                          ("reason", "CARD_NOT_FOUND")}))
        assert wait_until(lambda: scrape(listen).get(decided) == 16, timeout=5)
        values = scrape(listen)
        assert values[calls] == 16
        assert values[("yikatong_call_seconds_count",
                       frozenset({("method", "Authorization.Authorize")}))] == 16
        assert values[("yikatong_lmdb_map_size_bytes", frozenset())] == 8 * 2**30
        # a worker killed: its counts stay, its replacement adds to them, none doubled
        victim = sorted(worker_pids(srv))[0]
        os.kill(victim, signal.SIGKILL)
        # a replacement is a fresh interpreter, started after a pause: slow on a busy machine
        assert wait_until(lambda: len(worker_pids(srv)) == 2 and victim not in worker_pids(srv),
                          timeout=30)
        time.sleep(0.5)
        for k in range(16):
            with fresh_channel(srv.address) as channel:
                rpc.AuthorizationStub(channel).Authorize(pb.AuthorizeRequest(
                    request_id=f"n-{k}", card_number="310000000001", channel=pb.CHANNEL_TRANSIT),
                    metadata=metadata(GATE), timeout=10)
        assert wait_until(lambda: scrape(listen).get(decided) == 32, timeout=5)
        assert scrape(listen)[calls] == 32
    finally:
        assert srv.stop() == 0


def test_no_line_any_worker_writes_holds_a_holders_pii(tmp_path):
    """Both workers at debug level through applications, refusals, replacement and a
    cancellation; then every line the server wrote is searched for each holder's SSN, name,
    birth date, phone and address."""
    from test_e2e import call, holder, rid

    # 12 applications, each on a connection of its own: both workers take some (the chance
    # that SO_REUSEPORT sends all twelve to one is 1 in 2,048)
    names = [f"{family}{given}" for family in ("欧阳", "司马", "诸葛", "上官")
             for given in ("明日", "青云", "春风")]
    people = [holder(40 + k, name=name, phone=f"1390000{k:04d}", address=f"上海市静安区{k}号")
              for k, name in enumerate(names)]
    srv = ServerProcess(tmp_path, "--workers", "2", "--log-level", "debug")
    try:
        for k, person in enumerate(people):
            with fresh_channel(srv.address) as channel:
                stub = rpc.LifecycleStub(channel)
                person.household_registered = person.insured = True
                card = stub.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_SH,
                                                  holder=person, with_transit=True),
                                  metadata=metadata("COMMUNITY_OUTLET"), timeout=10)
                other = pb.Holder()
                other.CopyFrom(person)
                other.name = "张三丰"
                with pytest.raises(grpc.RpcError):  # the held information differs
                    stub.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_RC, holder=other),
                               metadata=metadata("ONLINE_PLATFORM"), timeout=10)
            call(srv, "Verify", "CARD_AGENCY", card_number=card.card_number, approved=k != 3,
                 reason="" if k != 3 else "photo unclear")
    finally:
        srv.stop()
    output = srv.output()
    assert len(set(answering_pids(srv, "Lifecycle.Apply"))) == 2
    for person in people:
        for secret in (person.ssn, person.name, person.ssn[6:14], person.birth_date,
                       person.phone, person.address):
            assert secret not in output, secret


def test_an_identity_number_in_an_exception_message_is_masked_in_the_log():
    import logging

    from yikatong.server.log import JsonFormatter

    try:
        raise ValueError("holder 310101198503150401 is odd")
    except ValueError:
        record = logging.LogRecord("yikatong", logging.ERROR, __file__, 1,
                                   "about 31010119850315040X", None, sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "about 3101**********040X"
    assert "3101**********0401 is odd" in line["traceback"]
    assert "310101198503150401" not in json.dumps(line)


def test_both_workers_serve_every_method(srv):
    """Each method of every service, with an empty request, by a role API.md allows, on a
    connection of its own, twice: answered by the method itself (its validation or its work:
    never UNIMPLEMENTED, INTERNAL or a refusal of the caller)."""
    from test_roles import API_TABLE, CHANNELS

    table = {**API_TABLE, "Authorization.Authorize": CHANNELS[pb.CHANNEL_TRANSIT],
             "Authorization.AuthorizeBatch": CHANNELS[pb.CHANNEL_TRANSIT]}
    wrong = []
    for name, roles in sorted(table.items()):
        service, method = name.split(".")
        descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        request = getattr(pb, descriptor.input_type.name)()
        for _ in range(2):
            with fresh_channel(srv.address) as channel:
                stub = getattr(rpc, f"{service}Stub")(channel)
                try:
                    getattr(stub, method)(request, metadata=metadata(sorted(roles)[0]),
                                          timeout=10)
                except grpc.RpcError as error:
                    if error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                        grpc.StatusCode.UNKNOWN,
                                        grpc.StatusCode.UNAUTHENTICATED,
                                        grpc.StatusCode.PERMISSION_DENIED):
                        wrong.append((name, error.code(), error.details()))
    assert not wrong, wrong
    assert wait_until(lambda: {pid for name in table for pid in answering_pids(srv, name)}
                      == worker_pids(srv))


def test_a_worker_restart_is_counted_for_the_operators_alert(tmp_path):
    """yikatong_worker_restarts_total (deploy/prometheus/alerts.yml: YikatongWorkerRestarts):
    a worker killed is counted once, in the parent, beside the workers' own metrics."""
    import urllib.request

    from yikatong.server.harness import free_address

    address = free_address()
    srv = ServerProcess(tmp_path, "--workers", "2", "--metrics-listen", address)
    try:
        def restarts() -> list[str]:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                return [line for line in r.read().decode().splitlines()
                        if line.startswith("yikatong_worker_restarts_total")]

        assert restarts() == []
        victim = sorted(worker_pids(srv))[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: restarts() == ["yikatong_worker_restarts_total 1.0"], 15)
    finally:
        assert srv.stop() == 0

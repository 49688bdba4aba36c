"""Issue 23 item 4, reload without a gap: SIGHUP reads the clients file, the TLS files, the
issuing banks, the points table and the calendar files again while the server serves (a bad
file is one log line and the old one kept); under --workers, SIGUSR2 to the parent is a
rolling restart, each worker replaced by one started anew (new code) before it drains. Real
subprocesses; every wait is bounded."""
import hashlib
import json
import os
import signal
import socket
import ssl
import threading
import time

import grpc
import pytest
from test_tls import CA, credentials
from test_workers import fresh_channel, worker_pids

from yikatong.server.harness import ServerProcess, metadata, wait_until, write_clients
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = "TRANSIT_GATE"
CARD = "310000000001"  # not in the store: a cheap read answered OK, found=False


def log_lines(srv, msg_prefix: str) -> list[dict]:
    """The server's JSON log lines whose message starts with `msg_prefix`."""
    return [line for line in (json.loads(t) for t in srv.output().splitlines()
                              if t.startswith('{"time"'))
            if line.get("msg", "").startswith(msg_prefix)]


def reloaded(srv, count: int, timeout: float = 15) -> bool:
    """Until `count` processes have logged the end of a reload."""
    return wait_until(lambda: len(log_lines(srv, "reloaded")) >= count, timeout)


def status(address: str, md, fresh: bool = True, creds=None) -> pb.CardStatusResponse:
    if creds is not None:
        channel = grpc.secure_channel(address, creds, options=(
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.use_local_subchannel_pool", 1)))
    else:
        channel = fresh_channel(address)
    with channel:
        return rpc.CardStatusStub(channel).GetStatus(pb.GetStatusRequest(card_number=CARD),
                                                     metadata=md, timeout=10)


def refused(address: str, md) -> grpc.StatusCode | None:
    try:
        status(address, md)
    except grpc.RpcError as error:
        return error.code()
    return None


# What docs/OPERATIONS.md asks of a client that must ride through a rolling restart: gRPC's
# retry of a call the server never processed. A worker's gRPC server that stops cancels a call
# that reaches it in that instant (gRPC core, grpc/grpc#41785), and a connection set up in the
# instant a worker's listener closes is reset (Linux SO_REUSEPORT, unless
# net.ipv4.tcp_migrate_req=1); every call of the API may be sent again (writes carry ids).
RETRY = json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": {
    "maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}]})
# a new channel whose first connection was reset tries again in 0.1 s, not gRPC's 1 s: within
# the retries above
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100))


class Probe(threading.Thread):
    """A cheap read every 20 ms, on one long-lived connection or on a new connection each
    time (the kernel spreads those over the workers), with the retry above or without any;
    every failure is kept."""

    def __init__(self, address: str, fresh: bool, retry: bool):
        super().__init__(daemon=True)
        self.address, self.fresh, self.retry = address, fresh, retry
        self.calls, self.failures = 0, []
        self.done = threading.Event()

    def channel(self) -> grpc.Channel:
        options = [("grpc.use_local_subchannel_pool", 1)]
        if self.retry:
            options += [("grpc.enable_retries", 1), ("grpc.service_config", RETRY), *RECONNECT]
        return grpc.insecure_channel(self.address, options=options)

    def run(self) -> None:
        shared = None if self.fresh else self.channel()
        try:
            while not self.done.is_set():
                began = time.monotonic()
                channel = self.channel() if self.fresh else shared
                try:
                    rpc.CardStatusStub(channel).GetStatus(
                        pb.GetStatusRequest(card_number=CARD), metadata=metadata(GATE),
                        timeout=5)
                    self.calls += 1
                except grpc.RpcError as error:
                    self.failures.append((error.code(), error.details()))
                finally:
                    if self.fresh:
                        channel.close()
                self.done.wait(max(0.0, 0.02 - (time.monotonic() - began)))
        finally:
            if shared is not None:
                shared.close()

    def __repr__(self) -> str:
        return (f"Probe({'new connections' if self.fresh else 'one connection'}, "
                f"{'retry' if self.retry else 'no retry'}: {self.calls} calls, "
                f"failures {self.failures})")


def probing(address: str, retry: bool) -> list[Probe]:
    probes = [Probe(address, fresh, retry) for fresh in (False, True)]
    for p in probes:
        p.start()
    return probes


def stop_probing(probes: list[Probe]) -> None:
    for p in probes:
        p.done.set()
    for p in probes:
        p.join(timeout=15)
        assert not p.is_alive()


# The two ways a call without retry can fail in a rolling restart (above), both for a call
# the server never processed. A gap, no worker listening, would be "Connection refused".
def race_lost(code: grpc.StatusCode, details: str) -> bool:
    return (code == grpc.StatusCode.CANCELLED and details == "CANCELLED"
            or code == grpc.StatusCode.UNAVAILABLE
            and ("Socket closed" in details or "Connection reset by peer" in details))


def test_a_probe_every_20_ms_sees_no_failed_call_through_a_reload_and_a_rolling_restart(
        tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "2", "--drain-seconds", "1")
    plain, retrying = [], []
    try:
        # a reload: nothing closes, so not one call of a client without retry fails
        plain = probing(srv.address, retry=False)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 2)
        time.sleep(0.5)
        stop_probing(plain)
        for probe in plain:
            assert probe.failures == [] and probe.calls > 20, probe
        # a rolling restart: not one call of a client with gRPC's retry fails, and one
        # without retry loses at most the race of a worker's last instant, never to a gap
        plain, retrying = probing(srv.address, retry=False), probing(srv.address, retry=True)
        time.sleep(0.3)
        before = worker_pids(srv)
        srv.proc.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: log_lines(srv, "rolling restart done"), 90)
        time.sleep(0.5)
        after = worker_pids(srv)
    finally:
        stop_probing(plain + retrying)
        code = srv.stop()
    assert code == 0
    assert len(after) == 2 and not after & before
    for probe in retrying:
        assert probe.failures == [] and probe.calls > 50, probe
    for probe in plain:
        assert all(race_lost(*f) for f in probe.failures) and len(probe.failures) <= 4, probe
        assert probe.calls > 50, probe
    drained = log_lines(srv, "rolling restart: old worker")
    assert sorted(line["pid"] for line in drained) == sorted(before)
    assert all(line["exit"] == 0 for line in drained)


def test_a_rolling_restart_replaces_every_worker_with_new_code_and_keeps_serving(tmp_path):
    """Each new worker is a fresh interpreter started from the command line: it runs the
    code on disk now (here, a sitecustomize changed after the start), not a fork's copy."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nprint('test-code: v1', file=sys.stderr, flush=True)\n")
    path = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    srv = ServerProcess(tmp_path, "--workers", "2", "--clock", "manual",
                        env={"PYTHONPATH": path})
    try:
        first = worker_pids(srv)
        assert len(first) == 2
        (site / "sitecustomize.py").write_text(
            "import sys\nprint('test-code: v2, the new one', file=sys.stderr, flush=True)\n")
        srv.proc.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: log_lines(srv, "rolling restart done"), 90), srv.output()
        now = worker_pids(srv)
        assert len(now) == 2 and not now & first
        # the new workers ran the new code; started anew, by the supervisor, with the spec
        assert srv.output().count("test-code: v2, the new one") == 2
        for pid in now:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"--worker-of" in f.read()
        # still serving, on both new workers, with the one manual clock
        moved = srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=60),
                                       metadata=metadata("ADMIN"), timeout=10).now
        seen = set()
        for _ in range(12):
            with fresh_channel(srv.address) as channel:
                seen.add(rpc.AdminStub(channel).AdvanceClock(
                    pb.AdvanceClockRequest(seconds=0), metadata=metadata("ADMIN"),
                    timeout=10).now)
        assert seen == {moved}
        answered = {line["pid"] for line in (json.loads(t) for t in srv.output().splitlines()
                                             if '"yikatong.access"' in t)
                    if line["method"] == "Admin.AdvanceClock"}
        assert wait_until(lambda: answered | {
            line["pid"] for line in (json.loads(t) for t in srv.output().splitlines()
                                     if '"yikatong.access"' in t)} >= now, 5)
        # a second rolling restart, and a worker killed after it: started anew again
        srv.proc.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: len(log_lines(srv, "rolling restart done")) == 2, 90)
        victim = sorted(worker_pids(srv))[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(worker_pids(srv)) == 2 and victim not in worker_pids(srv))
        assert wait_until(lambda: srv.output().count("test-code: v2, the new one") == 5, 30)
        assert not status(srv.address, metadata(GATE)).found
    finally:
        assert srv.stop() == 0
    assert "yikatong: stopped" in srv.output()


def test_a_rolling_restart_whose_new_worker_cannot_start_stops_and_the_old_ones_serve(
        tmp_path):
    clients = tmp_path / "clients.toml"
    write_clients(str(clients))
    srv = ServerProcess(tmp_path, "--workers", "2", "--clients", str(clients), clients=False)
    try:
        first = worker_pids(srv)
        clients.write_text("[[client]\nid = \n")  # broken, and never reloaded
        srv.proc.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: log_lines(srv, "rolling restart stopped"), 60)
        assert wait_until(lambda: worker_pids(srv) == first, 10)
        assert not status(srv.address, metadata(GATE)).found
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0


def test_a_sigterm_during_a_rolling_restart_stops_every_worker_cleanly(tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "2", "--drain-seconds", "1")
    try:
        srv.proc.send_signal(signal.SIGUSR2)
        assert wait_until(lambda: len(worker_pids(srv)) == 3, 30)  # a new one is starting
    finally:
        code = srv.stop(sig_timeout=30)
    assert code == 0
    assert "yikatong: stopped" in srv.output()


def test_a_replacement_that_cannot_start_is_tried_again_while_the_other_worker_serves(
        tmp_path):
    """A worker that dies is replaced by one started anew, which reads the files as they are
    now: a clients file left broken keeps it from starting. The server does not stop while
    another worker serves; it tries again (1 s, 2 s, ...) until the file is mended."""
    clients = tmp_path / "clients.toml"
    write_clients(str(clients))
    good = clients.read_text()
    srv = ServerProcess(tmp_path, "--workers", "2", "--clients", str(clients), clients=False)
    try:
        clients.write_text("[[client]\n")
        first = worker_pids(srv)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: "could not start (exit 2); trying again in 1 s"
                          in srv.output(), 30), srv.output()
        for _ in range(4):
            assert not status(srv.address, metadata(GATE)).found
        assert srv.proc.poll() is None
        clients.write_text(good)
        assert wait_until(lambda: [line for line in log_lines(srv, "worker ")
                                   if line["msg"].endswith(" serves")], 30)
        (back,) = [line["pid"] for line in log_lines(srv, "worker ")
                   if line["msg"].endswith(" serves")]
        assert worker_pids(srv) == first - {victim} | {back}
        assert not status(srv.address, metadata(GATE)).found
    finally:
        assert srv.stop() == 0


def write_tokens(path, entries: dict[str, str]) -> None:
    """A clients file: {client id: token}, every client a TRANSIT_GATE."""
    path.write_text("".join(
        f'[[client]]\nid = "{cid}"\nrole = "{GATE}"\n'
        f'token_sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n\n'
        for cid, tok in entries.items()))


def bearer(tok: str):
    return (("authorization", f"Bearer {tok}"),)


def test_after_sighup_an_added_token_works_and_a_removed_one_is_refused_by_every_worker(
        tmp_path):
    clients = tmp_path / "clients.toml"
    write_tokens(clients, {"gate-a": "token-a", "gate-b": "token-b"})
    srv = ServerProcess(tmp_path, "--workers", "2", "--clients", str(clients), clients=False)
    try:
        assert refused(srv.address, bearer("token-c")) == grpc.StatusCode.UNAUTHENTICATED
        write_tokens(clients, {"gate-a": "token-a", "gate-c": "token-c"})
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 2)
        for _ in range(8):  # new connections: both workers answer some
            assert refused(srv.address, bearer("token-c")) is None
            assert refused(srv.address, bearer("token-a")) is None
            assert refused(srv.address, bearer("token-b")) == grpc.StatusCode.UNAUTHENTICATED
        assert {line["parts"]["clients file"] for line in log_lines(srv, "reloaded")} == {
            "reloaded: 2 identities"}
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("bad, says", [
    ('[[client]]\nid = "gate-a"\nrole = \n', "Invalid value"),
    ('[[client]]\nid = "gate-a"\nrole = "GATEKEEPER"\ntoken_sha256 = "' + "a" * 64 + '"\n',
     "client gate-a: unknown role 'GATEKEEPER'"),
    ("", "no [[client]] in it"),
])
def test_a_bad_clients_file_is_one_log_line_and_the_old_tokens_still_work(tmp_path, bad, says):
    clients = tmp_path / "clients.toml"
    write_tokens(clients, {"gate-a": "token-a"})
    srv = ServerProcess(tmp_path, "--clients", str(clients), clients=False)
    try:
        clients.write_text(bad)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 1)
        (line,) = log_lines(srv, "reload: clients file")
        assert line["level"] == "error" and line["file"] == str(clients)
        assert says in line["problem"] and str(clients) in line["msg"]
        assert "kept" in line["msg"]
        assert log_lines(srv, "reloaded")[0]["parts"] == {"clients file": "kept"}
        assert refused(srv.address, bearer("token-a")) is None
        # mended: the next SIGHUP takes it
        write_tokens(clients, {"gate-b": "token-b"})
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 2)
        assert refused(srv.address, bearer("token-b")) is None
        assert refused(srv.address, bearer("token-a")) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert srv.stop() == 0


def test_the_server_survives_sighup_and_sigusr2_and_stops_with_0(tmp_path):
    srv = ServerProcess(tmp_path)
    try:
        for _ in range(3):
            srv.proc.send_signal(signal.SIGHUP)
        srv.proc.send_signal(signal.SIGUSR2)  # one process: no rolling restart, said
        assert reloaded(srv, 1)
        assert wait_until(lambda: log_lines(srv, "SIGUSR2 ignored"), 10)
        assert srv.proc.poll() is None
        assert not status(srv.address, metadata(GATE)).found
    finally:
        code = srv.stop()
    assert code == 0
    assert "yikatong: stopped" in srv.output()


def test_banks_and_points_files_reload_and_a_bad_one_is_kept_while_the_others_reload(
        tmp_path):
    from importlib import resources

    banks = tmp_path / "banks.toml"
    banks.write_text('version = "2026-1"\nbanks = ["Bank of Shanghai"]\n')
    table = tmp_path / "points.toml"
    table.write_text(resources.files("yikatong.points").joinpath("example.toml").read_text(
        "utf-8"))
    clients = tmp_path / "clients.toml"
    write_tokens(clients, {"gate-a": "token-a"})
    srv = ServerProcess(tmp_path, "--issuing-banks", str(banks), "--points-table", str(table),
                        "--clients", str(clients), clients=False)
    try:
        banks.write_text('version = "2026-2"\nbanks = ["Bank of Shanghai", "Bank of Beijing"]\n')
        table.write_text("version = \n")  # broken
        write_tokens(clients, {"gate-b": "token-b"})
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 1)
        (line,) = log_lines(srv, "reloaded")
        assert line["parts"] == {"issuing banks": "reloaded: version 2026-2, 2 banks",
                                 "points table": "kept", "clients file": "reloaded: 1 identities"}
        (bad,) = log_lines(srv, "reload: points table")
        assert bad["file"] == str(table)
        assert refused(srv.address, bearer("token-b")) is None
    finally:
        assert srv.stop() == 0


def test_a_years_calendar_file_installed_is_taken_on_sighup_by_every_worker(tmp_path):
    """Issue 23 item 1's --calendar-dir, read again on SIGHUP: a bad file is kept out (one
    line per worker, naming it), a good one becomes the official year."""
    calendar_dir = tmp_path / "calendar"
    calendar_dir.mkdir()
    srv = ServerProcess(tmp_path, "--workers", "2", "--calendar-dir", str(calendar_dir))
    try:
        (calendar_dir / "2027.toml").write_text('notice = "test"\nholidays = ["2026-10-01"]\n'
                                                'workdays = []\n')
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 2)
        bad = log_lines(srv, "reload: calendar files")
        assert len(bad) == 2 and all("2027.toml: 2026-10-01 is not in 2027" in line["problem"]
                                     for line in bad)
        (calendar_dir / "2027.toml").write_text(
            'notice = "test"\nholidays = ["2027-01-01", "2027-10-01"]\nworkdays = []\n')
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 4)
        assert [line["parts"]["calendar files"] for line in log_lines(srv, "reloaded")][2:] == \
            ["reloaded: new official years [2027]"] * 2
    finally:
        assert srv.stop() == 0


# --------------------------------------------------------------------- TLS

def served_certificate(address: str, ca_pem: bytes, client: tuple[bytes, bytes],
                       tmp_path) -> bytes:
    """The DER certificate the server presents to a new connection (a TLS handshake with a
    client certificate, as gRPC's would be)."""
    key_file, cert_file = tmp_path / "probe.key", tmp_path / "probe.crt"
    key_file.write_bytes(client[0])
    cert_file.write_bytes(client[1])
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.load_cert_chain(str(cert_file), str(key_file))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def serial(pem_or_der: bytes) -> int:
    from cryptography import x509

    if pem_or_der.startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number


def test_after_sighup_new_connections_get_the_new_certificate_and_ca(tmp_path):
    """The server's certificate and key, and the CA of client certificates, replaced: new
    connections get the new ones, a connection already open keeps working, and a bad key
    is refused with one line (the certificate in use kept)."""
    ca, other = CA("Yikatong test CA"), CA("Yikatong next CA")
    pki = tmp_path / "pki"
    pki.mkdir()
    key1, cert1 = ca.issue("localhost", server=True)
    key2, cert2 = ca.issue("localhost", server=True)
    gate, next_gate = ca.issue("gate-0001"), other.issue("gate-0001")
    (pki / "server.key").write_bytes(key1)
    (pki / "server.crt").write_bytes(cert1)
    (pki / "ca.crt").write_bytes(ca.pem)
    clients = pki / "clients.toml"
    clients.write_text('[[client]]\nid = "gate-0001"\nrole = "TRANSIT_GATE"\n'
                       'cert_cn = "gate-0001"\n')
    tls = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
           "--tls-ca", str(pki / "ca.crt"), "--clients", str(clients))
    srv = ServerProcess(tmp_path, "--workers", "2", *tls, clients=False,
                        credentials=credentials(ca.pem, gate))
    try:
        assert not status(srv.address, (), creds=credentials(ca.pem, gate)).found
        assert serial(served_certificate(srv.address, ca.pem, gate, tmp_path)) == serial(cert1)
        with pytest.raises(grpc.RpcError) as e:  # the next CA's clients: not yet
            status(srv.address, (), creds=credentials(ca.pem, next_gate))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # a bad key first: refused, one line per worker, the certificate in use kept
        (pki / "server.key").write_bytes(key2)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 2)
        assert len(log_lines(srv, "reload: TLS certificate")) == 2
        assert "not a certificate and its key" in log_lines(srv, "reload: TLS")[0]["problem"]
        assert serial(served_certificate(srv.address, ca.pem, gate, tmp_path)) == serial(cert1)
        # then the new certificate, and a CA file that holds the next CA too
        (pki / "server.crt").write_bytes(cert2)
        (pki / "ca.crt").write_bytes(ca.pem + other.pem)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 4)
        for _ in range(6):  # new connections, over both workers
            assert serial(served_certificate(srv.address, ca.pem, gate,
                                             tmp_path)) == serial(cert2)
            assert not status(srv.address, (), creds=credentials(ca.pem, next_gate)).found
        # the connection opened before the reloads still answers
        assert not srv.status.GetStatus(pb.GetStatusRequest(card_number=CARD),
                                        timeout=10).found
    finally:
        assert srv.stop() == 0


def test_a_rotated_tokens_open_stream_is_ended_and_another_clients_goes_on(tmp_path):
    """A token leaks and is rotated at noon: after the reload no new call takes it, and the
    calls it opened before (a gate's AuthorizeStream, held open for hours) are ended too,
    UNAUTHENTICATED, saying why; another client's stream, whose token stayed, goes on, and
    so does one opened with the new token."""
    import queue

    clients = tmp_path / "clients.toml"
    write_tokens(clients, {"gate-a": "token-a", "gate-b": "token-b"})
    srv = ServerProcess(tmp_path, "--clients", str(clients), clients=False)

    def stream(token: str):
        sent: queue.Queue = queue.Queue()

        def requests():
            while (item := sent.get()) is not None:
                yield item
        channel = fresh_channel(srv.address)
        answers = rpc.AuthorizationStub(channel).AuthorizeStream(
            requests(), metadata=bearer(token), timeout=60)

        def ask(n: int) -> pb.AuthorizeBatchResponse:
            sent.put(pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                request_id=f"{token}-{n}", card_number=CARD, channel=pb.CHANNEL_TRANSIT,
                terminal_id="gate-1")]))
            return next(answers)
        return ask, sent, channel
    def rotate(tokens: dict[str, str], reloads: int) -> None:
        write_tokens(clients, tokens)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, reloads)

    def ended(ask, n: int) -> str:
        with pytest.raises(grpc.RpcError) as refusal:
            ask(n)
        assert refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return refusal.value.details()
    ask_a, sent_a, channel_a = stream("token-a")
    ask_b, sent_b, channel_b = stream("token-b")
    try:
        assert len(ask_a(1).responses) == 1 and len(ask_b(1).responses) == 1
        rotate({"gate-a": "token-a2", "gate-b": "token-b"}, 1)
        assert "revoked by a reload of the clients file" in ended(ask_a, 2)
        assert len(ask_b(2).responses) == 1  # gate-b's token stayed: its stream goes on
        assert refused(srv.address, bearer("token-a")) == grpc.StatusCode.UNAUTHENTICATED
        ask_a2, sent_a2, channel_a2 = stream("token-a2")
        assert len(ask_a2(1).responses) == 1
        [line] = log_lines(srv, "reloaded")
        assert line["parts"]["clients file"] == \
            "reloaded: 2 identities; 1 open calls of 1 revoked clients ended"
        # gate-b's token rotated in a second reload: its stream, opened before the first
        # (which kept gate-b as it was), is ended too; gate-a's new one goes on
        rotate({"gate-a": "token-a2", "gate-b": "token-b2"}, 2)
        assert "revoked by a reload of the clients file" in ended(ask_b, 3)
        assert len(ask_a2(2).responses) == 1
        sent_a2.put(None)
        channel_a2.close()
    finally:
        for sent, channel in ((sent_a, channel_a), (sent_b, channel_b)):
            sent.put(None)
            channel.close()
        assert srv.stop() == 0

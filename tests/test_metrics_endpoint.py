"""Issue 25, finding 3: "998 half-sent `GET /metrics` requests held 1,024 descriptors (one
thread each, no read timeout), and new gRPC connections failed. The endpoint has no TLS or
authentication even under mTLS. Serve metrics with a read timeout and a connection cap,
outside the gRPC worker's process, with optional TLS and basic or bearer authentication
(Prometheus's own scrape options)." And finding 12's second half: "metrics directories under
`/tmp` are left behind after a SIGKILL (use one under the data dir, cleaned at start)".

Every test runs real servers and scrapes them over real sockets."""
import base64
import datetime
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yikatong.server.harness import ROOT, ServerProcess, free_address
from yikatong.v1 import yikatong_pb2 as pb

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: scraper\r\n"  # never the blank line that ends it


def _wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def _get(address: str, headers=None, context: ssl.SSLContext | None = None,
         timeout: float = 10) -> tuple[int, dict, str]:
    host, port = address.rsplit(":", 1)
    conn = (http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
            if context is not None else http.client.HTTPConnection(host, int(port),
                                                                   timeout=timeout))
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


def _scrape_when_answered(address: str, seconds: float = 20, **kw) -> str:
    """The body of the first scrape answered 200, trying until `seconds` pass."""
    def once():
        try:
            status, _, body = _get(address, **kw)
        except (OSError, http.client.HTTPException):
            return ""
        return body if status == 200 else ""
    return _wait(once, seconds, f"a scrape of {address} answered")


def _sample(body: str, name: str, **labels) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def _endpoint_pids(server_pid: int) -> list[int]:
    """The metrics endpoint processes the server with this pid started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"yikatong.server.exporter" in argv and b"--parent" in argv \
                and argv[argv.index(b"--parent") + 1] == str(server_pid).encode():
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _grpc_answers(address: str) -> bool:
    """A new connection to the server is accepted and its health answers."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
    return health.status == health_pb2.HealthCheckResponse.SERVING


def test_stalled_metrics_requests_take_no_grpc_descriptor_and_are_dropped(tmp_path):
    """300 half-sent `GET /metrics` against a server allowed 256 descriptors: before, each
    held a thread and a descriptor of the gRPC process and new gRPC connections failed. Now
    the endpoint is a process of its own: gRPC accepts new connections, the stalled requests
    are dropped after --metrics-read-seconds (default 5), those beyond the connection cap at
    once, and a proper scrape is answered again."""
    metrics = free_address()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the server inherits it
    try:
        srv = ServerProcess(tmp_path, "--metrics-listen", metrics)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    stalled: list[socket.socket] = []
    try:
        host, port = metrics.rsplit(":", 1)
        for _ in range(300):
            try:
                s = socket.create_connection((host, int(port)), timeout=5)
                stalled.append(s)
                s.sendall(HALF_SENT)
            except OSError:  # refused or reset at once: that is a cap doing its work
                pass
        # while they are held: a new gRPC connection is accepted and answered
        assert _grpc_answers(srv.address)
        assert not srv.status.GetStatus(pb.GetStatusRequest(card_number="319999999999"),
                                        metadata=srv.md("BANK_SWITCH"), timeout=10).found
        # every stalled connection is closed by the server, none is kept past its timeout
        for s in stalled:
            s.settimeout(20)
            try:
                assert s.recv(4096) == b""
            except ConnectionResetError:
                pass
        body = _scrape_when_answered(metrics)
        assert _sample(body, "yikatong_metrics_refused_total", reason="connections_max") > 0
        assert _sample(body, "yikatong_metrics_refused_total", reason="timeout") > 0
        assert "yikatong_writer_queue_depth" in body  # the workers' values, summed
        assert _endpoint_pids(srv.proc.pid)  # a process of its own, not the gRPC one
        assert _grpc_answers(srv.address)
    finally:
        for s in stalled:
            s.close()
        assert srv.stop() == 0


# --------------------------------------------------------------------- TLS and credentials

def _certificate(tmp_path) -> tuple[str, str, ssl.SSLContext]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert file, key file, a client
    context that trusts it)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "metrics.crt", tmp_path / "metrics.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(cafile=str(cert_path))
    return str(cert_path), str(key_path), context


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _auth_file(path, password: str, token: str) -> str:
    path.write_text(f'[[scraper]]\nid = "prometheus-a"\nusername = "prometheus"\n'
                    f'password_sha256 = "{_sha(password)}"\n\n'
                    f'[[scraper]]\nid = "prometheus-b"\ntoken_sha256 = "{_sha(token)}"\n')
    return str(path)


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_tls_and_credentials_a_scrape_needs_both_and_a_wrong_one_is_401(tmp_path):
    cert, key, context = _certificate(tmp_path)
    auth = _auth_file(tmp_path / "scrapers.toml", "s3cret-pass", "t0ken-for-prometheus")
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--metrics-listen", metrics, "--metrics-tls-cert", cert,
                        "--metrics-tls-key", key, "--metrics-auth", auth)
    try:
        # basic auth (Prometheus basic_auth) and bearer (authorization: credentials), over TLS
        status, _, body = _get(metrics, _basic("prometheus", "s3cret-pass"), context)
        assert status == 200 and "yikatong_writer_queue_depth" in body
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive
            status, _, body = _get(metrics, {"Authorization": f"{scheme} t0ken-for-prometheus"},
                                   context)
            assert status == 200 and "yikatong_health_serving" in body
        # wrong or missing: 401, one answer whatever part was wrong
        answers = set()
        for headers in ({}, _basic("prometheus", "wrong"), _basic("someone", "s3cret-pass"),
                        {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"},
                        {"Authorization": "Digest x"}):
            status, got, body = _get(metrics, headers, context)
            assert status == 401, headers
            assert got["WWW-Authenticate"] == 'Basic realm="yikatong metrics"'
            answers.add(body)
        assert len(answers) == 1 and "s3cret" not in answers.pop()
        # plain HTTP to the TLS port is no scrape
        with pytest.raises((OSError, http.client.HTTPException)):
            status, _, _ = _get(metrics, _basic("prometheus", "s3cret-pass"), timeout=10)
            assert status != 200
            raise OSError("answered, but not with metrics")
        # SIGHUP: a new credentials file is read again (a bad one is kept out, in one line)
        _auth_file(tmp_path / "scrapers.toml", "rotated-pass", "t0ken-for-prometheus")
        srv.proc.send_signal(signal.SIGHUP)
        _wait(lambda: _get(metrics, _basic("prometheus", "rotated-pass"), context)[0] == 200,
              15, "the rotated password accepted after SIGHUP")
        assert _get(metrics, _basic("prometheus", "s3cret-pass"), context)[0] == 401
        (tmp_path / "scrapers.toml").write_text('[[scraper]]\nid = "x"\ntoken_sha256 = "no"\n')
        srv.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "metrics endpoint reload: metrics credentials file" in srv.output(), 15,
              "the bad credentials file logged")
        assert _get(metrics, _basic("prometheus", "rotated-pass"), context)[0] == 200
        assert "rotated-pass" not in srv.output() and "s3cret-pass" not in srv.output()
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("flags, says", [
    (["--metrics-tls-cert", "{cert}"], "--metrics-tls-cert and --metrics-tls-key go together"),
    (["--metrics-tls-cert", "{key}", "--metrics-tls-key", "{cert}"],
     "are not a PEM certificate chain and its private key"),
    (["--metrics-auth", "{bad_auth}"], "the hash must be 64 lowercase hex digits"),
    (["--metrics-auth", "/dev/null"], "needs [[scraper]] entries"),
    (["--metrics-auth", "{missing}"], "No such file or directory"),
    (["--metrics-read-seconds", "0"], "--metrics-read-seconds must be above 0"),
    (["--metrics-connections-max", "0"], "--metrics-connections-max must be 1 to 10000"),
])
def test_bad_metrics_flags_and_files_are_one_line_and_exit_2(tmp_path, flags, says):
    cert, key, _ = _certificate(tmp_path)
    (tmp_path / "bad.toml").write_text('[[scraper]]\nid = "p"\nusername = "p"\n'
                                       'password_sha256 = "S3CRET"\n')
    given = [f.format(cert=cert, key=key, bad_auth=tmp_path / "bad.toml",
                      missing=tmp_path / "absent.toml") for f in flags]
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "data"), "--listen", free_address(),
                          "--metrics-listen", free_address(), *given],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "S3CRET" not in out.stderr


def test_metrics_flags_without_metrics_listen_are_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "data"), "--listen", free_address(),
                          "--metrics-auth", "/dev/null"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("yikatong: --metrics-tls-cert, --metrics-tls-key and "
                                  "--metrics-auth need --metrics-listen")


# --------------------------------------------------------------------- its process's life

def test_the_endpoint_dying_leaves_grpc_serving_and_is_started_again(tmp_path):
    """Under --workers 2 the supervisor keeps the endpoint: killed, it is started again
    (logged, counted) and gRPC never stops answering."""
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--workers", "2", "--metrics-listen", metrics)
    try:
        _scrape_when_answered(metrics)
        (pid,) = _endpoint_pids(srv.proc.pid)
        os.kill(pid, signal.SIGKILL)
        assert _grpc_answers(srv.address)
        body = _scrape_when_answered(metrics)
        assert _sample(body, "yikatong_metrics_endpoint_restarts_total") == 1
        (again,) = _endpoint_pids(srv.proc.pid)
        assert again != pid
        assert "metrics endpoint (pid %d) ended (exit -9); gRPC is not affected" % pid \
            in srv.output()
    finally:
        assert srv.stop() == 0
    _wait(lambda: not _alive(again), 10, "the endpoint stopped with the server")


def test_a_rolling_restart_starts_the_endpoint_anew_too(tmp_path):
    """SIGUSR2 under --workers is an upgrade onto the code installed now: the endpoint is
    started anew after the workers, not counted as a death."""
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--workers", "2", "--metrics-listen", metrics)
    try:
        (before,) = _endpoint_pids(srv.proc.pid)
        srv.proc.send_signal(signal.SIGUSR2)
        _wait(lambda: "rolling restart done" in srv.output(), 90, "the rolling restart done")
        _wait(lambda: _endpoint_pids(srv.proc.pid) not in ([], [before]), 20,
              "a new endpoint process")
        body = _scrape_when_answered(metrics)
        assert _sample(body, "yikatong_metrics_endpoint_restarts_total") is None
        assert not _alive(before)
        assert f"rolling restart: the metrics endpoint (pid {before}) stopped; started anew" \
            in srv.output()
    finally:
        assert srv.stop() == 0


def test_one_worker_keeps_its_endpoint_too(tmp_path):
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--metrics-listen", metrics)
    try:
        (pid,) = _endpoint_pids(srv.proc.pid)
        os.kill(pid, signal.SIGKILL)
        assert _grpc_answers(srv.address)
        body = _scrape_when_answered(metrics)
        assert _sample(body, "yikatong_metrics_endpoint_restarts_total") == 1
    finally:
        assert srv.stop() == 0


def test_the_metrics_dir_is_under_the_data_dir_and_a_killed_servers_values_are_gone(tmp_path):
    """Finding 12: nothing is left in the temporary directory; a SIGKILLed server's values stay
    in `metrics/` of its data dir until the next start empties it: they are not served."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    metrics = free_address()
    env = {"TMPDIR": str(scratch)}
    srv = ServerProcess(tmp_path, "--metrics-listen", metrics, env=env)
    values = os.path.join(srv.data_dir, "metrics")
    assert os.path.isdir(values) and not [n for n in os.listdir(scratch) if "metrics" in n]
    for _ in range(3):
        assert not srv.status.GetStatus(pb.GetStatusRequest(card_number="319999999999"),
                                        metadata=srv.md("BANK_SWITCH"), timeout=10).found
    body = _scrape_when_answered(metrics)
    assert _sample(body, "yikatong_calls_total", method="CardStatus.GetStatus", code="OK") == 3
    (endpoint,) = _endpoint_pids(srv.proc.pid)
    killed = srv.proc.pid
    srv.kill()
    srv.close()
    _wait(lambda: not _alive(endpoint), 10, "the endpoint ends with its killed server")
    assert os.stat(values).st_mode & 0o777 == 0o700
    assert any(str(killed) in name for name in os.listdir(values))  # left, in the data dir
    assert not [n for n in os.listdir(scratch) if "metrics" in n]  # nothing in the temp dir
    again = ServerProcess(tmp_path, "--metrics-listen", metrics, env=env,
                          data_dir=srv.data_dir)
    try:
        assert not any(str(killed) in name for name in os.listdir(values))
        body = _scrape_when_answered(metrics)
        assert _sample(body, "yikatong_calls_total", method="CardStatus.GetStatus", code="OK") \
            is None
        assert "yikatong_writer_queue_depth" in body
        # a second server refused on the locked data dir empties nothing of the running one's
        held = sorted(os.listdir(values))
        second = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                                 again.data_dir, "--listen", free_address(),
                                 "--metrics-listen", free_address()],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "locked by another running server" in second.stderr
        assert held and set(held) <= set(os.listdir(values))
    finally:
        assert again.stop() == 0
    assert not os.path.exists(values)  # a clean stop removes it
    assert not [n for n in os.listdir(scratch) if "metrics" in n]


# --------------------------------------------------------------------- Prometheus itself

SCRAPE = os.path.join(ROOT, "deploy", "prometheus", "scrape.yml")


def test_a_real_prometheus_scrapes_over_tls_with_the_shipped_scrape_config(tmp_path):
    """deploy/prometheus/scrape.yml, as shipped (its paths and target replaced): Prometheus's
    own `tls_config` and `basic_auth` get the target up; a wrong password gets it down."""
    binary = shutil.which("prometheus")
    assert binary is not None, "install Debian's prometheus package (make test-tools)"
    cert, key, _ = _certificate(tmp_path)
    auth = _auth_file(tmp_path / "scrapers.toml", "s3cret-pass", "unused-token")
    metrics = free_address().replace("127.0.0.1", "localhost")
    srv = ServerProcess(tmp_path, "--metrics-listen", metrics, "--metrics-tls-cert", cert,
                        "--metrics-tls-key", key, "--metrics-auth", auth)
    with open(SCRAPE) as f:
        shipped = f.read()

    def run(password: str, name: str):
        (tmp_path / f"{name}.password").write_text(password)
        config = tmp_path / f"{name}.yml"
        config.write_text("global: {scrape_interval: 1s}\n" + shipped
                          .replace("/etc/prometheus/yikatong/metrics-ca.pem", cert)
                          .replace("/etc/prometheus/yikatong/metrics-password",
                                   str(tmp_path / f"{name}.password"))
                          .replace("yikatong.example:9464", metrics))
        address = free_address()
        log = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / name}",
                                 f"--web.listen-address={address}"],
                                stdout=log, stderr=subprocess.STDOUT)
        return proc, log, address

    def up(address: str) -> str:
        url = f"http://{address}/api/v1/query?query=" + urllib.parse.quote('up{job="yikatong"}')
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                result = json.load(r)["data"]["result"]
        except OSError:
            return ""
        return result[0]["value"][1] if result else ""

    started = []
    try:
        for password, want in (("s3cret-pass", "1"), ("wrong-pass", "0")):
            proc, log, address = run(password, f"prometheus-{want}")
            started.append((proc, log))
            _wait(lambda a=address, w=want: up(a) == w, 60,
                  f"Prometheus sees the target up == {want} with the password {password!r}")
    finally:
        for proc, log in started:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        assert srv.stop() == 0

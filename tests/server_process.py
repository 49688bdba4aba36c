"""Start the real server as a subprocess on a free port, with a temporary data dir."""
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time

import grpc
import lmdb

from server.clients import ROLES
from yikatong.v1 import yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token(role: str) -> str:
    return f"test-token-{role.lower()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, tmp_path, *extra, clients=True, env=None, data_dir=None):
        self.data_dir = data_dir or str(tmp_path / "data")
        self.address = f"127.0.0.1:{free_port()}"
        args = [sys.executable, "-m", "server", "--data-dir", self.data_dir,
                "--listen", self.address, *extra]
        if clients:
            path = tmp_path / "clients.toml"
            path.write_text("".join(
                f'[[client]]\nid = "{r.lower()}"\nrole = "{r}"\n'
                f'token_sha256 = "{hashlib.sha256(token(r).encode()).hexdigest()}"\n\n'
                for r in ROLES))
            args += ["--clients", str(path)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.banner = []
        for line in self.proc.stdout:
            self.banner.append(line)
            if line.startswith("yikatong: serving on"):
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.banner))
        if "--demo" in extra:  # the banner ends with the example command
            for line in self.proc.stdout:
                self.banner.append(line)
                if "CARD_NOT_FOUND" in line:
                    break
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.authorization = rpc.AuthorizationStub(self.channel)
        self.status = rpc.CardStatusStub(self.channel)
        self.lifecycle = rpc.LifecycleStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        self.ledger = rpc.LedgerStub(self.channel)

    @staticmethod
    def md(role: str):
        return (("authorization", f"Bearer {token(role)}"),)

    def stop(self, sig_timeout: float = 15) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=sig_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc.stdout.close()
        return rc

    def digest(self) -> str:
        """A digest of every key and value in the store, read beside the running server."""
        env = lmdb.open(os.path.join(self.data_dir, "lmdb"), readonly=True, max_dbs=16, lock=True)
        h = hashlib.sha256()
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for k, v in txn.cursor(db=db):
                    h.update(name + b"\0" + k + b"\0" + v)
        env.close()
        return h.hexdigest()


@contextlib.contextmanager
def running(tmp_path, *extra, clients=True, env=None):
    server = ServerProcess(tmp_path, *extra, clients=clients, env=env)
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False

"""The metrics endpoint (`--metrics-listen`): a small process of its own, never the gRPC
worker's (issue 25, finding 3: 998 half-sent `GET /metrics` held 1,024 descriptors of the
worker, one thread each, and new gRPC connections failed).

It reads the values every serving process writes to PROMETHEUS_MULTIPROC_DIR (server/metrics.py)
and sums them on each scrape. One event loop, one thread rendering scrapes one at a time, and
a bound on everything a caller can hold:
- a connection must have sent its whole request head (and finished its TLS handshake) within
  `--metrics-read-seconds` of its accept, and must take the answer within as long again, or it
  is dropped;
- at most `--metrics-connections-max` connections are open; beyond it a new one is closed at
  once (so a flood of stalled ones is refused until they time out, and costs no descriptor);
- a request head is at most `HEAD_BYTES_MAX` bytes; one request per connection.
Optional TLS (`--metrics-tls-cert/--metrics-tls-key`) and authentication (`--metrics-auth
FILE`: Prometheus's `basic_auth` or `authorization: credentials`, stored as SHA-256 hashes as in
the clients file). Wrong or missing credentials: 401, the same answer whatever was wrong.
SIGHUP reads the certificate, key and credentials file again (a bad one is logged in one line
and the one in use kept); SIGTERM stops it. Its parent (server/metrics.py, `Exporter`) restarts
it if it dies; it ends with its parent (PR_SET_PDEATHSIG).

`python -m yikatong.server.exporter ...` is started by the server, not by hand.
"""
import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import ctypes
import gzip
import hashlib
import hmac
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import tomllib

log = logging.getLogger("yikatong.server")

HEAD_BYTES_MAX = 8192  # request line and headers
AUTH_FILE_BYTES_MAX = 1024 * 1024
SCRAPERS_MAX = 1000  # entries in a credentials file
REALM = 'realm="yikatong metrics"'
_HEX = frozenset("0123456789abcdef")


# --------------------------------------------------------------------- files it reads

def load_tls(cert: str, key: str) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and key; ValueError saying what is wrong
    (never the key's content)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError:  # an OSError too: first
        raise ValueError(f"metrics TLS: {cert} and {key} are not a PEM certificate chain and "
                         "its private key") from None
    except OSError as error:
        raise ValueError(f"metrics TLS: cannot read {error.filename or cert}: "
                         f"{error.strerror or error}") from None
    return context


class Auth:
    """Who may scrape: `[[scraper]]` entries of a TOML file, each with an `id` and either
    `username` + `password_sha256` (Prometheus `basic_auth`) or `token_sha256` (Prometheus
    `authorization: {credentials: ...}`, the Bearer scheme). Only hashes are stored."""

    def __init__(self, basic: dict[str, str], bearer: list[str]):
        self.basic = basic  # username -> password_sha256
        self.bearer = bearer  # token_sha256 values

    def challenge(self) -> str:
        return f"Basic {REALM}" if self.basic else f"Bearer {REALM}"

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()  # RFC 7235: the scheme is case-insensitive
        if scheme == "bearer" and self.bearer:
            digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()
            ok = False
            for known in self.bearer:  # every entry compared, in constant time
                ok |= hmac.compare_digest(digest, known)
            return ok
        if scheme == "basic" and self.basic:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            digest = hashlib.sha256(password.encode()).hexdigest()
            known = self.basic.get(user, "0" * 64)
            return bool(sep) and hmac.compare_digest(digest, known) and user in self.basic
        return False


def load_auth(path: str) -> Auth:
    """The credentials file, checked whole; ValueError naming the entry and what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(AUTH_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise ValueError(f"metrics credentials file {path}: {error.strerror}") from None
    if len(data) > AUTH_FILE_BYTES_MAX:
        raise ValueError(f"metrics credentials file {path}: larger than "
                         f"{AUTH_FILE_BYTES_MAX} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as error:
        raise ValueError(f"metrics credentials file {path}: not TOML ({error})") from None
    entries = doc.get("scraper")
    unknown = sorted(set(doc) - {"scraper"})
    if unknown or not isinstance(entries, list) or not entries:
        raise ValueError(f"metrics credentials file {path}: needs [[scraper]] entries (and "
                         "nothing else), each with id and either username + password_sha256 "
                         "or token_sha256")
    if len(entries) > SCRAPERS_MAX:
        raise ValueError(f"metrics credentials file {path}: more than {SCRAPERS_MAX} scrapers")
    basic: dict[str, str] = {}
    bearer: list[str] = []
    for n, entry in enumerate(entries, 1):
        where = f"metrics credentials file {path}: scraper {n}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a table")
        keys = set(entry)
        if keys not in ({"id", "username", "password_sha256"}, {"id", "token_sha256"}):
            raise ValueError(f"{where}: give id and either username + password_sha256 or "
                             f"token_sha256 (it has {', '.join(sorted(map(str, keys))) or 'none'})")
        if not isinstance(entry["id"], str) or not 0 < len(entry["id"]) <= 64:
            raise ValueError(f"{where}: id must be 1 to 64 characters")
        digest = entry.get("password_sha256", entry.get("token_sha256"))
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"{where} ({entry['id']}): the hash must be 64 lowercase hex "
                             "digits, the SHA-256 of the password or token")
        if "username" in entry:
            user = entry["username"]
            if not isinstance(user, str) or not 0 < len(user) <= 64 or ":" in user:
                raise ValueError(f"{where} ({entry['id']}): username must be 1 to 64 "
                                 "characters, without ':'")
            if user in basic:
                raise ValueError(f"{where} ({entry['id']}): username {user!r} is given twice")
            basic[user] = digest
        else:
            bearer.append(digest)
    return Auth(basic, bearer)


# --------------------------------------------------------------------- the endpoint

class Endpoint:
    def __init__(self, args):
        from prometheus_client import CollectorRegistry, multiprocess

        self.args = args
        self.tls = load_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
        self.auth = load_auth(args.auth) if args.auth else None
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry)
        self.registry.register(self)  # its own counters, below
        self.open = 0
        self.tasks: set[asyncio.Task] = set()
        self.refused = {"connections_max": 0, "timeout": 0, "unauthorized": 0,
                        "bad_request": 0}
        self.render_pool = concurrent.futures.ThreadPoolExecutor(1, "metrics-render")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        refused = CounterMetricFamily(
            "yikatong_metrics_refused", "Connections to the metrics endpoint dropped or "
            "refused, by reason (connections_max, timeout, unauthorized, bad_request)",
            labels=["reason"])
        for reason, n in self.refused.items():
            refused.add_metric([reason], n)
        yield refused
        yield GaugeMetricFamily("yikatong_metrics_connections", "Connections open on the "
                                "metrics endpoint now", value=self.open)

    def reload(self) -> None:
        args, said = self.args, []
        try:
            if args.tls_cert:
                self.tls = load_tls(args.tls_cert, args.tls_key)
                said.append("TLS certificate and key")
            if args.auth:
                self.auth = load_auth(args.auth)
                said.append("credentials")
        except ValueError as error:
            log.error("metrics endpoint reload: %s; the one in use is kept", error)
            return
        log.info("metrics endpoint reloaded: %s", ", ".join(said) or "nothing to read")

    async def accept(self, listener: socket.socket) -> None:
        """The accept loop: the cap is applied here, before any TLS handshake or read."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as error:  # out of descriptors: the cap is above the limit
                log.warning("metrics endpoint: cannot accept: %s", error.strerror or error)
                await asyncio.sleep(0.1)
                continue
            if self.open >= self.args.connections_max:
                self.refused["connections_max"] += 1
                # closed at once, with a reset: no descriptor and no TIME_WAIT kept for it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            self.open += 1
            task = loop.create_task(self.handle(sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.read_seconds
        transport = None
        try:
            reader = asyncio.StreamReader(limit=HEAD_BYTES_MAX)
            protocol = asyncio.StreamReaderProtocol(reader)
            # with TLS the handshake is part of the time given to send the request
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.tls,
                ssl_handshake_timeout=self.args.read_seconds if self.tls else None)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          max(0.0, deadline - loop.time()))
            status, headers, body = await self.answer(head)
            writer.write(_response(status, headers, body))
            await asyncio.wait_for(writer.drain(), self.args.read_seconds)
            writer.close()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ssl.SSLError, OSError, ValueError) as error:
            # ConnectionAbortedError: asyncio's TLS handshake timeout
            if isinstance(error, TimeoutError | ConnectionAbortedError):
                self.refused["timeout"] += 1
            elif isinstance(error, asyncio.LimitOverrunError | ValueError):
                self.refused["bad_request"] += 1
            self._drop(transport, sock)
        except Exception:  # noqa: BLE001 - a bug of ours: logged, the endpoint goes on
            log.exception("metrics endpoint: a scrape failed")
            self._drop(transport, sock)
        finally:
            self.open -= 1

    @staticmethod
    def _drop(transport, sock: socket.socket) -> None:
        if transport is not None:
            transport.abort()
        else:
            sock.close()

    async def answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.refused["bad_request"] += 1
            return "400 Bad Request", [], b"a request is GET /metrics HTTP/1.1\n"
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if self.auth is not None and not self.auth.allows(headers.get("authorization")):
            self.refused["unauthorized"] += 1
            return ("401 Unauthorized", [("WWW-Authenticate", self.auth.challenge())],
                    b"valid credentials are needed for /metrics\n")
        method, path = parts[0], parts[1].partition("?")[0]
        if path not in ("/metrics", "/"):
            return "404 Not Found", [], b"metrics are at /metrics\n"
        if method != "GET":
            return "405 Method Not Allowed", [("Allow", "GET")], b"GET /metrics\n"
        gzipped = "gzip" in headers.get("accept-encoding", "")
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self.render_pool, self.render, gzipped)
        from prometheus_client import CONTENT_TYPE_LATEST

        extra = [("Content-Encoding", "gzip")] if gzipped else []
        return "200 OK", [("Content-Type", CONTENT_TYPE_LATEST), *extra], body

    def render(self, gzipped: bool) -> bytes:
        from prometheus_client import generate_latest

        text = generate_latest(self.registry)
        return gzip.compress(text, 1) if gzipped else text


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers)]
    if not any(k == "Content-Type" for k, _ in headers):
        head.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _serve(endpoint: Endpoint, args) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    # Ctrl-C reaches the whole process group: the server stops this process itself (SIGTERM)
    # once it has stopped, so scrapes go on while it drains
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGHUP, endpoint.reload)
    # the spawning process may have these blocked (the --workers supervisor does)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    host, _, port = args.listen.rpartition(":")
    infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    listener = socket.socket(infos[0][0], socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(infos[0][4])
    listener.listen(128)
    listener.setblocking(False)
    accepting = asyncio.get_running_loop().create_task(endpoint.accept(listener))
    log.info("metrics endpoint serves on %s (%s, %s; at most %d connections, %g s to send a "
             "request)", args.listen, "TLS" if endpoint.tls else "plain HTTP",
             f"{len(endpoint.auth.basic) + len(endpoint.auth.bearer)} scrapers' credentials"
             if endpoint.auth else "no authentication", args.connections_max, args.read_seconds,
             extra={"fields": {"pid": os.getpid()}})
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    await stopped.wait()
    accepting.cancel()
    listener.close()
    endpoint.render_pool.shutdown(wait=False, cancel_futures=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m yikatong.server.exporter")
    p.add_argument("--listen", required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--auth")
    p.add_argument("--read-seconds", type=float, required=True)
    p.add_argument("--connections-max", type=int, required=True)
    p.add_argument("--ready-fd", type=int, default=-1)
    p.add_argument("--parent", type=int, default=0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from yikatong.server import log as logs

    logs.setup(args.log_level)
    if args.parent:
        _die_with_parent(args.parent)
    try:
        endpoint = Endpoint(args)
        asyncio.run(_serve(endpoint, args))
    except (ValueError, OSError) as error:
        print(f"yikatong: metrics endpoint {args.listen}: {error}", file=sys.stderr)
        return 2
    return 0


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the server that started it dies (even SIGKILLed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took effect
        sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())

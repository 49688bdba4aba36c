"""SIGHUP (`systemctl reload`): the files the server was started with, read again while it
serves. No call in flight is dropped and no connection is closed.

A `Registry` is a list of named parts. Each part's `load()` reads and checks its whole file
and returns what it holds, or raises with a message that says what is wrong; `apply(value)`
swaps it in (on the event loop, between calls). A part whose file is bad is logged in one
line naming the file and the problem, and the one in use is kept; the others still reload.
Loads run in a thread, one reload at a time (a SIGHUP during a reload runs one more after it).

Under `--workers N` the supervising parent passes SIGHUP to every worker (server/workers.py)
and each worker reloads itself, so each logs its own lines (with its pid). A worker started
later reads the files as they are then.

TLS: the server's credentials are grpc's dynamic ones (`ServerCertificates`): gRPC asks for
the certificate before each new connection's handshake, so new connections get the new
certificate, key and CA, and connections already open keep theirs.
"""
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

import grpc

from yikatong import config_file

log = logging.getLogger("yikatong.server")

# A SIGHUP that arrives before the event loop serves (the process is still starting): noted
# here (`before_serving`), and the reload runs as soon as it serves (`Registry.serving`).
_requested = False


def before_serving() -> None:
    """Until the server serves, a SIGHUP is noted, and SIGUSR2 ignored, not their default
    (the end of the process)."""
    def note(signum, frame) -> None:
        global _requested
        _requested = True
    signal.signal(signal.SIGHUP, note)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    name: str  # what the log calls it: "clients file"
    path: str  # the file (or directory) it reads
    load: Callable[[], Any]  # the whole file, checked; raises saying what is wrong
    apply: Callable[[Any], str | None]  # swaps it in; may say what changed


class Registry:
    """The reloadable parts of one serving process."""

    def __init__(self):
        self.parts: list[Part] = []
        self.core = None  # the serving process's server.core.Core, once it serves (`serving`)
        self._task: asyncio.Task | None = None
        self._again = False

    def add(self, name: str, path: str, load: Callable[[], Any],
            apply: Callable[[Any], str | None] = lambda value: None) -> None:
        if any(p.name == name for p in self.parts):
            raise ValueError(f"reload part {name!r} is registered twice")
        self.parts.append(Part(name, path, load, apply))

    def serving(self, loop: asyncio.AbstractEventLoop, core) -> None:
        """From now on SIGHUP reloads (on `loop`); a SIGHUP noted while starting runs now.
        SIGUSR2 (a rolling restart) means nothing to a process that serves: said, not fatal."""
        global _requested
        self.core = core
        loop.add_signal_handler(signal.SIGHUP, self.request)
        loop.add_signal_handler(signal.SIGUSR2, lambda: log.warning(
            "SIGUSR2 ignored: a rolling restart is asked of the parent of --workers 2 or more "
            "(kill -USR2 <parent pid>); a single process is restarted"))
        if _requested:
            _requested = False
            self.request()

    def request(self) -> None:
        """A SIGHUP: reload now, or once more after the reload under way."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> dict[str, str]:
        """Every part: loaded whole (in a thread), then applied. {name: outcome}."""
        started = time.monotonic()
        outcome: dict[str, str] = {}
        for part in self.parts:
            try:
                value = await asyncio.to_thread(part.load)
            except Exception as error:  # noqa: BLE001 - a bad file is reported, the old kept
                problem = " ".join(str(error).split()) or type(error).__name__
                log.error("reload: %s %s is not used, the one loaded before is kept: %s",
                          part.name, part.path, problem,
                          extra={"fields": {"part": part.name, "file": part.path,
                                            "problem": problem}})
                outcome[part.name] = "kept"
                continue
            try:
                said = part.apply(value)
            except Exception:  # noqa: BLE001 - a bug in a part: the others still reload
                log.exception("reload: %s %s could not be applied; the one before is kept",
                              part.name, part.path,
                              extra={"fields": {"part": part.name, "file": part.path}})
                outcome[part.name] = "kept"
                continue
            outcome[part.name] = f"reloaded: {said}" if said else "reloaded"
        log.info("reloaded" if all(o.startswith("reloaded") for o in outcome.values())
                 else "reloaded, some files kept as they were",
                 extra={"fields": {"parts": outcome, "pid": os.getpid(),
                                   "ms": round((time.monotonic() - started) * 1000, 1)}})
        return outcome


# --------------------------------------------------------------------- the server's parts

def server_parts(args, clients, certs: "ServerCertificates | None", store) -> Registry:
    """The files `yikatong serve` was started with, as reloadable parts of one serving
    process: `clients` (server/clients.py) and `certs` are swapped in place; the issuing
    banks go to the Core once it serves; the points table and the calendar are the domain's
    (module state, per process)."""
    from yikatong import cards, points
    from yikatong.server import clients as clients_file
    from yikatong.server import demo
    from yikatong.server.cli import _issuing_banks

    reloads = Registry()
    if args.clients:
        more = demo.add_demo_clients if args.demo else None
        reloads.add("clients file", args.clients,
                    lambda: clients_file.reread(args.clients, more), clients.take)
    if certs is not None:
        reloads.add("TLS certificate, key and CA", args.tls_cert,
                    lambda: load_tls(args.tls_key, args.tls_cert, args.tls_ca), certs.use)
    if args.issuing_banks:
        def banks(value) -> str:
            reloads.core.banks = value
            rules = f"; {cards.bank_loss_rules_said(value)}" if value.loss_rules else ""
            bj = value.beijing  # BJ-7: Beijing's own list
            return (f"version {value.version}, {len(value.names)} banks" + (
                f"; Beijing's (BJ-7) version {bj.version}, {len(bj.names)} banks"
                if bj is not None else "") + rules)
        reloads.add("issuing banks", args.issuing_banks,
                    lambda: _issuing_banks(args.issuing_banks), banks)
    if getattr(args, "signing_key_file", None):
        from yikatong.server import signing

        def signer(value) -> str:
            reloads.core.signing = value
            return value.describe()
        reloads.add("signing key file", args.signing_key_file,
                    lambda: signing.Signing.load(args.signing_key_file, args.data_dir), signer)
    if args.points_table:
        def table(value) -> str:
            points.use(value)
            return f"version {value.version}"
        reloads.add("points table", args.points_table, lambda: points.load(args.points_table),
                    table)
    if getattr(args, "split_rules", None):
        from yikatong import pots

        def split(value) -> str:
            pots.use(value)
            return value.said()
        reloads.add("split rules", args.split_rules, lambda: pots.load(args.split_rules), split)
    if args.calendar_dir:
        from yikatong import calendar
        reloads.add("calendar files", args.calendar_dir,
                    lambda: calendar.load(args.calendar_dir),
                    lambda years: _calendar(calendar, years, store))
    return reloads


def _calendar(calendar, years, store) -> str:
    """The calendar files in use from now on; the stored ends counted provisionally are
    counted again (in the writer, not waited for here: every worker asks, the first does it;
    of a replicated store's nodes, the writer)."""
    from yikatong import cards
    from yikatong.errors import Fenced
    from yikatong.server import log as log_module

    new = calendar.use(years)

    def done(future) -> None:
        try:
            log_module.recounted(future.result())
        except Fenced:
            log.info("reload: the provisional ends are counted again by the writer")
        except Exception:  # noqa: BLE001 - reported; the next reload or start counts again
            log.exception("reload: the provisional ends could not be counted again")

    try:
        store.submit(cards.recount).add_done_callback(done)
    except Exception as error:  # noqa: BLE001 - the writer is down or full: said, not fatal
        log.error("reload: the provisional ends could not be counted again: %s", error)
    return f"new official years {new}" if new else "no new official year"


# --------------------------------------------------------------------- TLS

def load_tls(key_path: str, cert_path: str, ca_path: str) -> tuple[bytes, bytes, bytes]:
    """(key, certificate chain, client CA), PEM, each read once and checked whole: the key is
    the certificate's and unencrypted, and the CA file holds certificates. ValueError naming
    the file and the problem."""
    files = {}
    for flag, path in (("--tls-key", key_path), ("--tls-cert", cert_path),
                       ("--tls-ca", ca_path)):
        files[flag] = config_file.read_bytes(path, f"{flag} {path}")
    for flag, marker in (("--tls-key", b"PRIVATE KEY-----"),
                         ("--tls-cert", b"-----BEGIN CERTIFICATE-----"),
                         ("--tls-ca", b"-----BEGIN CERTIFICATE-----")):
        if marker not in files[flag]:
            raise ValueError(f"{flag} is not a PEM file with a {marker.strip(b'-').decode()}")
    key, chain, ca = files["--tls-key"], files["--tls-cert"], files["--tls-ca"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def encrypted() -> bytes:
        raise ValueError("the key is encrypted; the server needs it unencrypted")

    # OpenSSL reads files only: the bytes already read, from memory, never from the disk again
    with _in_memory(chain) as chain_file, _in_memory(key) as key_file:
        try:
            context.load_cert_chain(chain_file, key_file, password=encrypted)
        except ssl.SSLError as error:
            raise ValueError(f"--tls-cert {cert_path} and --tls-key {key_path} are not a "
                             f"certificate and its key: {error.reason or error}") from None
        except ValueError as error:
            raise ValueError(f"--tls-key {key_path}: {error}") from None
    try:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    except ssl.SSLError as error:
        raise ValueError(f"--tls-ca {ca_path}: {error.reason or error}") from None
    return key, chain, ca


@contextlib.contextmanager
def _in_memory(data: bytes):
    fd = os.memfd_create("yikatong-pem")
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class ServerCertificates:
    """The server's certificate, key and client CA, replaceable while it serves (mTLS: a
    client certificate signed by the CA is required on every connection)."""

    def __init__(self, key: bytes, chain: bytes, ca: bytes):
        self._initial = self._configuration(key, chain, ca)
        self._next = None

    @staticmethod
    def _configuration(key: bytes, chain: bytes, ca: bytes):
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=True)

    def _fetch(self):
        """gRPC's question before each new connection's handshake: a new configuration once
        after `use`, else None (keep the one it has; a configuration returned every time
        would rebuild its TLS state on every connection)."""
        new, self._next = self._next, None
        return new

    def use(self, pems: tuple[bytes, bytes, bytes]) -> str:
        self._next = self._configuration(*pems)
        return "new connections get it"

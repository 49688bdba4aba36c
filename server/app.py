"""The server's life: build the grpc.aio server with every service (server/services/, one
module each), start, serve, drain on SIGTERM, close.

Servicers translate: wire messages to the domain's arguments and the domain's answers back.
Identity, roles, error mapping and the access log are not here: every call passes through
server/calls.py first. The rules are the domain's (yikatong/).
"""
import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from yikatong import config
from yikatong.model import (
    IssuingBanks,
)
from yikatong.server import calls
from yikatong.server import log as log_module
from yikatong.server.clients import Clients
from yikatong.server.core import Core, History
from yikatong.server.metrics import metrics
from yikatong.server.services import SERVICES
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

log = logging.getLogger("yikatong.server")
SHUTDOWN_GRACE_SECONDS = 10.0



def build(core: Core, clients: Clients, concurrent_rpcs_max: int = config.concurrent_rpcs_max,
          table=None, reuse_port: bool = False,
          limits: calls.Limits | None = None, node=None):
    """The grpc.aio server with every service registered (not yet bound or started), and its
    health servicer. A role table that does not match the proto raises roles.TableError."""
    # Too many callers: new calls beyond the limit are refused at once (RESOURCE_EXHAUSTED);
    # calls already in progress are unaffected.
    servicers = [cls(core) for cls in SERVICES]
    server = grpc.aio.server(maximum_concurrent_rpcs=concurrent_rpcs_max, options=[
        ("grpc.max_receive_message_length", config.message_size_max),
        ("grpc.max_send_message_length", config.message_size_max),
        # one server per port, unless the workers of one server share it on purpose
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_connection_idle_ms", config.connection_idle_seconds_max * 1000),
        ("grpc.max_connection_age_ms", config.connection_age_seconds_max * 1000),
        ("grpc.max_connection_age_grace_ms", config.connection_age_grace_seconds * 1000),
        ("grpc.keepalive_time_ms", config.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_seconds * 1000),
        ("grpc.max_concurrent_streams", config.streams_per_connection_max),
    ])
    kwargs = {} if table is None else {"table": table}
    calls.register(server, servicers, clients, pb, limits=limits,
                   position=calls.LogPosition(node) if node is not None else None, **kwargs)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def _set_health(health_servicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *(f"yikatong.v1.{cls.__name__}" for cls in SERVICES)):
        await health_servicer.set(name, status)


async def serve(store: Store, clock, clients: Clients, listen: str, on_ready=None,
                concurrent_rpcs_max: int = config.concurrent_rpcs_max,
                stop: asyncio.Event | None = None, banks: IssuingBanks | None = None,
                tls: tuple[bytes, bytes, bytes] | None = None, reflection: bool = False,
                drain_seconds: float = config.drain_seconds, reuse_port: bool = False,
                limits: calls.Limits | None = None, node=None, reloads=None,
                history: History | None = None, signing=None) -> None:
    """`node`: with --replicate, the store's place in the cluster (storage.replication.Node).
    `tls` = (key, certificate chain, client CA), PEM, or reload.ServerCertificates (the same,
    replaceable on SIGHUP): mTLS, a client certificate signed by that CA required on every
    connection (a caller without one never reaches a handler). `reloads`: a
    reload.Registry, run on SIGHUP once this serves.
    On `stop` (SIGTERM, SIGINT): health NOT_SERVING while still answering for
    `drain_seconds` (load balancers and gates see it before the port closes), then new calls
    are refused and calls in flight get SHUTDOWN_GRACE_SECONDS to finish."""
    core = Core(store, clock, banks)
    core.signing = signing  # issue 28: server.signing.Signing (--signing-key-file) or None
    if history is not None:  # each client's budget for replaying the feed's history
        core.feed.history = history
    limits = limits or calls.Limits()
    clients.on_revoke = limits.revoke  # a reload that revokes a client ends its open calls
    server, health_servicer = build(core, clients, concurrent_rpcs_max, reuse_port=reuse_port,
                                    limits=limits, node=node)
    if reflection:
        service_names = [pb.DESCRIPTOR.services_by_name[cls.__name__].full_name
                         for cls in SERVICES]
        grpc_reflection.enable_server_reflection(
            (*service_names, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME), server)
    try:
        if tls is None:
            server.add_insecure_port(listen)
        else:
            server.add_secure_port(listen, tls.credentials() if hasattr(tls, "credentials")
                                   else grpc.ssl_server_credentials(
                                       [(tls[0], tls[1])], root_certificates=tls[2],
                                       require_client_auth=True))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {listen}: {error}") from None
    calls.track_calls(asyncio.get_running_loop())  # before any call's task is made
    await server.start()
    loop = asyncio.get_running_loop()
    log_module.access.start(loop)
    limits.start(loop)
    metrics.start(loop, store, lambda: core.feed.watchers, node, clock, clients)
    calls.on_data_loss = lambda: store.note("corrupt_record", True)
    calls.refusals.start(loop, store, clock)
    # The writer reports from its own thread when it dies or its periodic jobs keep failing
    # (a replicated worker: when its log keeper goes away): health follows at once
    # (NOT_SERVING), and back to SERVING if a job recovers. Set before the first health is
    # published, so a change in between is not lost.
    store.on_health = lambda healthy: asyncio.run_coroutine_threadsafe(
        _set_health(health_servicer, healthy), loop)
    await _set_health(health_servicer, store.healthy)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if reloads is not None:
        reloads.serving(loop, core)  # SIGHUP reloads from now on (server/reload.py)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    store.on_health = None
    await health_servicer.enter_graceful_shutdown()  # NOT_SERVING, and stays so
    if drain_seconds > 0:
        log.info("draining", extra={"fields": {"seconds": drain_seconds}})
        await asyncio.sleep(drain_seconds)
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    limits.stop()
    calls.refusals.stop(store, clock)
    metrics.stop()
    log_module.access.stop()

"""The one call path (server/calls.py) and a writer that cannot fail silently: identity before
anything else, the role table checked at start-up, rich error details, INTERNAL with a
reference for a bug, the writer's death and its periodic jobs' failures seen by health."""
import asyncio
import contextlib
import hashlib
import logging
import subprocess
import sys
import threading
import time
import types

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from yikatong import clock as clocks
from yikatong import config, points
from yikatong.errors import WriterBusy, WriterDown
from yikatong.model import Role
from yikatong.server import app
from yikatong.server.clients import Clients
from yikatong.server.harness import ROOT, free_address, metadata, token, wait_until
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

T0 = 1_790_000_000
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def in_process(tmp_path, **store_options):
    """The real server (app.serve) on a thread of this process, so a test can reach into its
    store: kill the writer, make a periodic job fail, make a handler raise."""
    store = Store(str(tmp_path / "data"), map_size=64 * 1024**2, **store_options)
    clients = Clients()
    for role in Role:
        clients.add(role.name.lower(), role.name,
                    hashlib.sha256(token(role.name).encode()).hexdigest())
    address = free_address()
    ready, holder = threading.Event(), {}

    def run():
        async def main():
            holder["stop"], holder["loop"] = asyncio.Event(), asyncio.get_running_loop()
            await app.serve(store, clocks.ManualClock(T0), clients, address,
                            on_ready=ready.set, stop=holder["stop"])
        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    channel = grpc.insecure_channel(address)
    try:
        yield types.SimpleNamespace(
            store=store, channel=channel, health=health_pb2_grpc.HealthStub(channel),
            lifecycle=rpc.LifecycleStub(channel), authorization=rpc.AuthorizationStub(channel),
            ledger=rpc.LedgerStub(channel))
    finally:
        channel.close()
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(20)
        store.close()


def health_of(s, service="yikatong.v1.Lifecycle"):
    return s.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def top_up(s, transfer_id="t1"):
    return s.ledger.Transfer(pb.TransferRequest(
        transfer_id=transfer_id, debit=pb.AccountRef(operator="op:topup"),
        credit=pb.AccountRef(operator="op:elsewhere"), amount_fen=100),
        metadata=metadata("CARD_AGENCY"), timeout=5)


class Boom(BaseException):
    """Not an Exception: escapes every handler, as a bug in the writer itself would."""


def test_a_killed_writer_turns_health_not_serving_and_callers_get_unavailable(tmp_path):
    with in_process(tmp_path) as s:
        assert health_of(s) == SERVING
        top_up(s, "before")
        gate, waiting = threading.Event(), {}
        s.store.submit(lambda book: gate.wait(10))  # hold the writer

        def queued_call():  # a caller already waiting in the queue when the writer dies
            try:
                top_up(s, "queued")
            except grpc.RpcError as error:
                waiting["code"] = error.code()

        caller = threading.Thread(target=queued_call)
        caller.start()
        time.sleep(0.3)
        doomed = s.store.submit(lambda book: (_ for _ in ()).throw(Boom("writer bug")))
        started = time.monotonic()
        gate.set()
        with pytest.raises(WriterDown):
            doomed.result(5)
        caller.join(5)
        assert waiting["code"] == grpc.StatusCode.UNAVAILABLE
        assert wait_until(lambda: health_of(s) == NOT_SERVING, timeout=1.0)
        assert health_of(s, "") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as later:
            top_up(s, "after")
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "writer has stopped" in later.value.details()
        assert time.monotonic() - started < 1.0 + 5  # answered, nobody waits for ever
        with pytest.raises(WriterDown):
            s.store.write(lambda book: None)


def test_a_failing_periodic_job_is_logged_counted_and_turns_health_not_serving(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(config, "writer_idle_seconds", 0.05)
    fail = threading.Event()
    fail.set()

    def sweep_expired_holds(book):
        if fail.is_set():
            raise RuntimeError("sweep broke")

    caplog.set_level(logging.ERROR, logger="yikatong.storage")
    with in_process(tmp_path, periodic=sweep_expired_holds) as s:
        assert wait_until(lambda: s.store.periodic_failures_total >= config.periodic_failures_max)
        assert wait_until(lambda: health_of(s) == NOT_SERVING, timeout=2)
        records = [r for r in caplog.records if "sweep_expired_holds failed" in r.getMessage()]
        assert records and records[0].exc_info and "sweep broke" in str(records[0].exc_info[1])
        fail.clear()  # the job recovers: health follows
        assert wait_until(lambda: health_of(s) == SERVING, timeout=2)


def test_the_writer_queue_is_bounded(tmp_path):
    store = Store(str(tmp_path / "data"), map_size=16 * 1024**2, queue_max=3)
    gate = threading.Event()
    try:
        store.submit(lambda book: gate.wait(10))
        time.sleep(0.2)  # the writer has taken it; the queue is empty again
        futures = [store.submit(lambda book: None) for _ in range(3)]
        with pytest.raises(WriterBusy, match="writer_queue_max"):
            store.submit(lambda book: None)
        gate.set()
        for f in futures:
            f.result(5)
    finally:
        gate.set()
        store.close()


def test_an_unexpected_exception_is_logged_with_a_reference_and_answered_internal(
        tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("secret-internal-detail")

    monkeypatch.setattr(points, "in_force", broken)  # consulted by every authorization path
    caplog.set_level(logging.ERROR, logger="yikatong.server")
    with in_process(tmp_path) as s:
        with pytest.raises(grpc.RpcError) as caught:
            s.authorization.Authorize(pb.AuthorizeRequest(
                request_id="r1", card_number="310000000001", channel=pb.CHANNEL_TRANSIT),
                metadata=metadata("TRANSIT_GATE"), timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "KeyError" not in error.details()
    reference = error.details().split("reference ")[1].split()[0]
    (record,) = [r for r in caplog.records if reference in r.getMessage()]
    assert record.exc_info[0] is KeyError  # the traceback is in the log
    info = error_info(error)
    assert info.reason == "INTERNAL" and info.metadata["reference"] == reference


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            out = error_details_pb2.BadRequest()
            detail.Unpack(out)
            return out
    raise AssertionError("no BadRequest")


def test_a_method_missing_from_the_role_table_stops_start_up_with_one_clear_line(tmp_path):
    script = ("import sys; from yikatong.server import roles; "
              "del roles.METHOD_ROLES['Ledger.Reverse']; "
              "from yikatong.server.cli import main; "
              f"sys.exit(main(['serve', '--data-dir', {str(tmp_path / 'd')!r}, "
              f"'--listen', {free_address()!r}]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "yikatong: Ledger.Reverse has no entry in the role table (server/roles.py); "
        "refusing to start")


def test_every_described_method_has_a_role_table_entry():
    from yikatong.server import roles

    services = [pb.DESCRIPTOR.services_by_name[cls.__name__] for cls in app.SERVICES]
    roles.check_table(services)  # what start-up checks
    with pytest.raises(roles.TableError, match="names Lifecycle.Aply"):
        roles.check_table(services, {**roles.METHOD_ROLES, "Lifecycle.Aply": frozenset()})

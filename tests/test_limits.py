"""What a caller can hold: calls that send headers and never a message, one client's share of
a worker, and a caller's deadline on a write. Real server subprocesses."""
import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest
from test_e2e import START, new_active_card
from test_money_e2e import balances, top_up

from yikatong.server.harness import ServerProcess, metadata
from yikatong.v1 import yikatong_pb2 as pb

AUTHORIZE = "/yikatong.v1.Authorization/Authorize"
STATUS = pb.AuthorizeRequest(request_id="s", card_number="310000000001",
                             channel=pb.CHANNEL_STATUS)


def headers_only(channel, md):
    """A unary call as a client that sends its headers and then nothing."""
    call = channel.stream_unary(AUTHORIZE, request_serializer=pb.AuthorizeRequest.SerializeToString,
                                response_deserializer=pb.AuthorizeResponse.FromString)
    return call(metadata=md, timeout=60)


async def served_within(address: str, seconds: float, role="BANK_SWITCH") -> float:
    """Time for one real call, on a connection of its own."""
    async with grpc.aio.insecure_channel(address, options=(
            ("grpc.use_local_subchannel_pool", 1),)) as channel:
        started = time.monotonic()
        await channel.unary_unary(AUTHORIZE, pb.AuthorizeRequest.SerializeToString,
                                  pb.AuthorizeResponse.FromString)(
            STATUS, metadata=metadata(role), timeout=seconds)
        return time.monotonic() - started


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.RpcError:
        pass
    return await call.code()


def test_callers_without_a_token_sending_only_headers_hold_no_slot(tmp_path):
    srv = ServerProcess(tmp_path, "--max-concurrent-rpcs", "32")

    async def attack():
        async with grpc.aio.insecure_channel(srv.address) as channel:
            idle = [headers_only(channel, ()) for _ in range(40)]
            await asyncio.sleep(0.5)
            elapsed = await served_within(srv.address, 5)
            codes = await asyncio.wait_for(asyncio.gather(*map(code_of, idle)), 5)
            return elapsed, codes
    try:
        elapsed, codes = asyncio.run(attack())
    finally:
        srv.stop()
    assert elapsed < 1.0
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}  # ended at once, not left open


def test_a_known_caller_sending_only_headers_is_ended_when_its_message_is_late(tmp_path):
    srv = ServerProcess(tmp_path, "--max-concurrent-rpcs", "32", "--request-arrival-seconds", "1")

    async def stall():
        async with grpc.aio.insecure_channel(srv.address) as channel:
            idle = [headers_only(channel, metadata("TRANSIT_GATE")) for _ in range(40)]
            started = time.monotonic()
            codes = await asyncio.wait_for(asyncio.gather(*map(code_of, idle)), 10)
            ended = time.monotonic() - started
            late = next(c for c, code in zip(idle, codes, strict=True)
                        if code == grpc.StatusCode.DEADLINE_EXCEEDED)
            details = await late.details()  # (which calls were over the limit varies)
            return codes, ended, details, await served_within(srv.address, 5)
    try:
        codes, ended, details, elapsed = asyncio.run(stall())
    finally:
        srv.stop()
    # the slots they took came back: those beyond the limit were refused at once, the others
    # ended when their message was late
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 32
    assert ended < 4
    assert "no request message arrived within 1 s" in details
    assert elapsed < 1.0


def test_one_client_cannot_take_every_slot(tmp_path):
    srv = ServerProcess(tmp_path, "--client-calls-max", "4", "--request-arrival-seconds", "30")

    async def hog():
        async with grpc.aio.insecure_channel(srv.address) as channel:
            idle = [headers_only(channel, metadata("TRANSIT_GATE")) for _ in range(6)]
            await asyncio.sleep(0.5)
            refused = [c for c in idle if c.done()]
            codes = [await c.code() for c in refused]
            details = [await c.details() for c in refused]
            other = await served_within(srv.address, 5, role="BANK_SWITCH")
            for c in idle:
                c.cancel()
            return codes, details, other
    try:
        codes, details, other = asyncio.run(hog())
    finally:
        srv.stop()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert details[0] == ("client transit_gate already has 4 calls in progress "
                          "(client_calls_max); retry when some have ended")
    assert other < 1.0


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    yield s
    s.stop()


def test_a_write_whose_deadline_passes_is_applied_once_or_not_at_all(srv):
    """Debits sent with deadlines too short to be answered while other writers keep the
    writer busy: DEADLINE_EXCEEDED (or, if quick, the answer). The caller retries each with
    the same request id: whatever happened the first time, each is applied exactly once."""
    card, busy_card = new_active_card(srv, 1), new_active_card(srv, 2)
    top_up(srv, card, 100_000)
    top_up(srv, busy_card, 10**9)
    stop = threading.Event()

    def keep_the_writer_busy(k):
        n = 0
        while not stop.is_set():
            srv.authorization.Authorize(pb.AuthorizeRequest(
                request_id=f"busy-{k}-{n}", card_number=busy_card, channel=pb.CHANNEL_TRANSIT,
                amount_fen=1, terminal_id="gate-2"), metadata=metadata("TRANSIT_GATE"))
            n += 1

    outcomes = {"answered": 0, "deadline": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(keep_the_writer_busy, k) for k in range(8)]
        try:
            for k in range(200):
                request = pb.AuthorizeRequest(request_id=f"fare-{k}", card_number=card,
                                              channel=pb.CHANNEL_TRANSIT, amount_fen=10,
                                              terminal_id="gate-1")
                try:
                    srv.authorization.Authorize(request, metadata=metadata("TRANSIT_GATE"),
                                                timeout=0.001 * (k % 5 + 1))
                    outcomes["answered"] += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                    outcomes["deadline"] += 1
                again = srv.authorization.Authorize(request, metadata=metadata("TRANSIT_GATE"),
                                                    timeout=10)
                assert again.decision == pb.DECISION_APPROVED
                if k >= 30 and min(outcomes.values()):
                    break
        finally:
            stop.set()
        for f in busy:
            f.result()
    assert outcomes["deadline"], outcomes
    n = sum(outcomes.values())
    assert balances(srv, card)["TRANSIT"] == (100_000 - 10 * n, 0, 100_000 - 10 * n)

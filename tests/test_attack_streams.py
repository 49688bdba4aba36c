"""Issue 25, the stream attacks (findings 1, 2, 7 and 11), through gRPC against real servers
on the demo data set: a gate that opens stream after stream and never reads them, a gate that
replays the whole history on many streams, sequences past the log's end, and streams that
send headers and never a message. What a bank switch's GetStatus and a medical terminal's
Authorize get meanwhile is what each test checks."""
import asyncio
import json
import time

import grpc
import pytest

from yikatong.server.harness import ServerProcess, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = metadata("TRANSIT_GATE", "demo")
BANK = metadata("BANK_SWITCH", "demo")
MEDICAL = metadata("MEDICAL_TERMINAL", "demo")
AUDITOR = metadata("AUDITOR", "demo")
CARD = "310000000006"  # a demo card
# what the attacker's channels say: no BDP probing, a 1 KiB stream window (never grown)
STALLING = (("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024))


def others_served(address: str) -> list[str]:
    """A bank switch's GetStatus and a medical terminal's Authorize, each on a connection of
    its own: the codes they got."""
    codes = []
    with grpc.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),)) as ch:
        for ask in (lambda: rpc.CardStatusStub(ch).GetStatus(
                        pb.GetStatusRequest(card_number=CARD), metadata=BANK, timeout=10),
                    lambda: rpc.AuthorizationStub(ch).Authorize(
                        pb.AuthorizeRequest(request_id="t", card_number=CARD,
                                            channel=pb.CHANNEL_MEDICAL),
                        metadata=MEDICAL, timeout=10)):
            try:
                ask()
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
    return codes


def end_of(stream) -> grpc.StatusCode:
    """How a stream ended, reading whatever it still holds (bounded by its deadline)."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_gate_stalling_stream_after_stream_cannot_take_the_server_slots(tmp_path):
    """Finding 1: round after round, a gate opens 16 WatchChanges(0) and never reads them.
    Each is ended after the stall limit; one that does not take its status either is
    cancelled (RST_STREAM) after the grace, and only then gives back its server slot and its
    client's share. So the gate holds at most its --client-calls-max, and the bank switch and
    the medical terminal are served in every round."""
    srv = ServerProcess(tmp_path, "--demo", "--max-concurrent-rpcs", "64",
                        "--client-calls-max", "16", "--stream-stall-seconds", "1",
                        "--stream-end-grace-seconds", "1", clients=False)
    channels, streams, seen = [], [], []
    try:
        for _ in range(8):
            channel = grpc.insecure_channel(srv.address, options=STALLING)
            channels.append(channel)
            streams += [rpc.CardStatusStub(channel).WatchChanges(
                pb.WatchChangesRequest(), metadata=GATE, timeout=30) for _ in range(16)]
            time.sleep(1.5)
            seen.append(others_served(srv.address))
        ends = [end_of(stream) for stream in streams]
    finally:
        for channel in channels:
            channel.close()
        srv.stop()
    assert seen == [["OK", "OK"]] * 8
    # every one of the gate's streams ended: stalled (its status taken or the stream reset)
    # or refused beyond the gate's share; none was left to the caller's own deadline
    assert set(ends) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, ends
    assert grpc.StatusCode.CANCELLED in ends  # some were reset: their status never went


def _log_lines(srv) -> list[dict]:
    return [json.loads(line) for line in srv.output().splitlines() if line.startswith("{")]


def test_streams_that_send_headers_and_no_message_end_when_their_message_is_late(tmp_path):
    """Finding 11: AuthorizeStream calls that send their headers and then nothing are ended
    DEADLINE_EXCEEDED once --request-arrival-seconds has passed without a first message,
    like a unary call's, and give their slots back."""
    srv = ServerProcess(tmp_path, "--demo", "--max-concurrent-rpcs", "32",
                        "--request-arrival-seconds", "1", clients=False)

    async def attack():
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = rpc.AuthorizationStub(channel)
            idle = [stub.AuthorizeStream(metadata=GATE, timeout=60) for _ in range(40)]
            started = time.monotonic()
            codes = await asyncio.wait_for(asyncio.gather(*(c.code() for c in idle)), 15)
            ended = time.monotonic() - started
            late = next(c for c, code in zip(idle, codes, strict=True)
                        if code == grpc.StatusCode.DEADLINE_EXCEEDED)
            return codes, ended, await late.details()
    try:
        codes, ended, details = asyncio.run(attack())
        after = others_served(srv.address)
    finally:
        srv.stop()
    # the first 32 took every slot and ended late; the rest were refused at once
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 32
    assert ended < 10  # (a bound on a hang, not a speed: the limit is 1 s)
    assert "no request message arrived within 1 s" in details
    assert after == ["OK", "OK"]


def test_a_stream_that_sends_its_message_in_time_is_served(tmp_path):
    """Finding 11's limit applies to the first message only: a gate's AuthorizeStream that
    sends one message, waits past the arrival limit, then sends another, gets both answers."""
    srv = ServerProcess(tmp_path, "--demo", "--request-arrival-seconds", "1", clients=False)

    async def gate():
        async with grpc.aio.insecure_channel(srv.address) as channel:
            call = rpc.AuthorizationStub(channel).AuthorizeStream(metadata=GATE, timeout=30)
            tap = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                request_id="s", card_number=CARD, channel=pb.CHANNEL_STATUS)])
            await call.write(tap)
            first = await call.read()
            await asyncio.sleep(1.5)
            await call.write(tap)
            second = await call.read()
            await call.done_writing()
            return first, second, await call.code()
    try:
        first, second, code = asyncio.run(gate())
    finally:
        srv.stop()
    assert code == grpc.StatusCode.OK
    assert len(first.responses) == len(second.responses) == 1


def _end_named(error: grpc.RpcError, what: str) -> int:
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE, error
    return int(error.details().split(f"the last {what} is ")[1].split(";")[0])


def test_sequences_past_the_end_are_out_of_range_naming_the_end(tmp_path):
    """Finding 7: from_sequence 2^64-1, or one past the last change (or audit event), is
    OUT_OF_RANGE naming the log's end, with no traceback in the log. From the end itself, a
    watcher waits for the changes to come; an export from its end is empty."""
    srv = ServerProcess(tmp_path, "--demo", clients=False)
    try:
        status, audit = rpc.CardStatusStub(srv.channel), rpc.AuditStub(srv.channel)
        errors = {}
        for name, ask in (
                ("watch", lambda n: list(status.WatchChanges(
                    pb.WatchChangesRequest(from_sequence=n), metadata=GATE, timeout=10))),
                ("export", lambda n: list(audit.Export(
                    pb.ExportRequest(from_sequence=n), metadata=AUDITOR, timeout=10)))):
            for _ in range(50):  # a flood of them: each one answered, none logged as a bug
                with pytest.raises(grpc.RpcError) as error:
                    ask(2**64 - 1)
            errors[name] = error.value
        head = _end_named(errors["watch"], "change")
        assert head > 40_000  # the demo's history
        with pytest.raises(grpc.RpcError) as error:
            list(status.WatchChanges(pb.WatchChangesRequest(from_sequence=head + 1),
                                     metadata=GATE, timeout=10))
        assert _end_named(error.value, "change") == head
        # from the end: no error, the stream waits for what comes next (here, nothing)
        with pytest.raises(grpc.RpcError) as error:
            list(status.WatchChanges(pb.WatchChangesRequest(from_sequence=head),
                                     metadata=GATE, timeout=2))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        last_event = _end_named(errors["export"], "event")
        assert list(audit.Export(pb.ExportRequest(from_sequence=last_event),
                                 metadata=AUDITOR, timeout=10)) == []
        with pytest.raises(grpc.RpcError) as error:
            list(audit.Export(pb.ExportRequest(from_sequence=last_event + 1),
                              metadata=AUDITOR, timeout=10))
        assert _end_named(error.value, "event") == last_event
    finally:
        srv.stop()
    lines = _log_lines(srv)
    assert not [line for line in lines if line.get("level") == "error"]
    assert "Traceback" not in srv.output()
    refused = [line for line in lines if line.get("code") == "OUT_OF_RANGE"]
    assert len(refused) == 102


def test_history_replays_are_budgeted_per_client(tmp_path):
    """Finding 2: a client's replays of the feed's history (watchers from far behind the
    head) are limited at once per worker (--history-replays-max) and share its events a
    second; a watcher from the head on the same token, and another client's replay, are
    served as before."""
    srv = ServerProcess(tmp_path, "--demo", "--history-replays-max", "2",
                        "--history-events-per-second", "200", clients=False)
    try:
        status = rpc.CardStatusStub(srv.channel)
        replays = [status.WatchChanges(pb.WatchChangesRequest(), metadata=GATE, timeout=30)
                   for _ in range(2)]
        assert [next(r).sequence for r in replays] == [1, 1]  # both replaying
        with pytest.raises(grpc.RpcError) as error:
            next(status.WatchChanges(pb.WatchChangesRequest(), metadata=GATE, timeout=10))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("client demo-transit_gate already has 2 history replays in progress "
                "(history_replays_max)") in error.value.details()
        assert next(status.WatchChanges(pb.WatchChangesRequest(), metadata=BANK,
                                        timeout=10)).sequence == 1  # another client's
        with pytest.raises(grpc.RpcError) as error:
            list(status.WatchChanges(pb.WatchChangesRequest(from_sequence=2**64 - 1),
                                     metadata=GATE, timeout=10))
        head = _end_named(error.value, "change")
        with pytest.raises(grpc.RpcError) as error:  # live, from the head: not a replay
            list(status.WatchChanges(pb.WatchChangesRequest(from_sequence=head),
                                     metadata=GATE, timeout=2))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for r in replays:
            r.cancel()
    finally:
        srv.stop()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])

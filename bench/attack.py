"""`make attack`: issue 25's stream attacks against a real server on the demo data set, and
what real callers saw meanwhile. Not a test: nothing is asserted; it prints, for each phase,
a bank switch's GetStatus and a medical terminal's Authorize (each a call after another, on a
connection of its own, from a process of its own): answers, error codes, p50/p99.

Phases, each --seconds long (loopback, bounded, everything stopped at the end):
- quiet: nobody attacks (the usual range);
- headers only: a gate keeps 200 unary calls and 200 AuthorizeStream calls open that send
  their headers and never a message;
- stalled streams: round after round, a gate opens 16 WatchChanges(0) with BDP probing off
  and a 1 KiB window, and never reads them;
- history flood: 1,000 WatchChanges(0) on one gate token, each reading the demo's whole
  history as fast as it can.
The history flood runs twice: on the server as configured (replays budgeted per client), and
on one started with the budget lifted (--history-replays-max 100000
--history-events-per-second 1e9), side by side in one run.

    .venv/bin/python bench/attack.py [--seconds 8]
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from yikatong.server.harness import ServerProcess, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = metadata("TRANSIT_GATE", "demo")
CARD = "310000000006"
LIMITS = ("--max-concurrent-rpcs", "512", "--client-calls-max", "128",
          "--request-arrival-seconds", "2", "--stream-stall-seconds", "2",
          "--stream-end-grace-seconds", "2")
STREAMS = ("--stream-stall-seconds", "2", "--stream-end-grace-seconds", "2")  # 1,024 a client
UNBUDGETED = ("--history-replays-max", "100000", "--history-events-per-second", "1e9")
STALLING = (("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024))
OWN = (("grpc.use_local_subchannel_pool", 1),)


def caller(address: str, seconds: float) -> None:
    """The real callers, in a process of their own: one JSON line of what each saw."""
    seen = {"GetStatus": [], "Authorize": []}
    with grpc.insecure_channel(address, options=OWN) as channel:
        status, authz = rpc.CardStatusStub(channel), rpc.AuthorizationStub(channel)
        asks = {"GetStatus": lambda: status.GetStatus(
                    pb.GetStatusRequest(card_number=CARD),
                    metadata=metadata("BANK_SWITCH", "demo"), timeout=5),
                "Authorize": lambda: authz.Authorize(
                    pb.AuthorizeRequest(request_id="a", card_number=CARD,
                                        channel=pb.CHANNEL_MEDICAL),
                    metadata=metadata("MEDICAL_TERMINAL", "demo"), timeout=5)}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, ask in asks.items():
                started = time.perf_counter()
                try:
                    ask()
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                seen[name].append((code, (time.perf_counter() - started) * 1000))
            time.sleep(0.01)
    print(json.dumps(seen))


def start_caller(address: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--caller", address,
                             "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)


def summary(proc: subprocess.Popen) -> dict[str, str]:
    out, _ = proc.communicate(timeout=120)
    seen = json.loads(out)
    lines = {}
    for name, calls in seen.items():
        ms = sorted(t for code, t in calls if code == "OK")
        codes: dict[str, int] = {}
        for code, _ in calls:
            codes[code] = codes.get(code, 0) + 1
        errors = ", ".join(f"{c} {n}" for c, n in sorted(codes.items()) if c != "OK") or "none"
        p99 = ms[max(0, int(len(ms) * 0.99) - 1)] if ms else 0.0
        p = f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms" if ms else "no answer"
        lines[name] = f"{codes.get('OK', 0)} ok, errors: {errors}; {p}"
    return lines


async def headers_only(address: str, seconds: float) -> str:
    async with grpc.aio.insecure_channel(address, options=OWN) as channel:
        unary = channel.stream_unary("/yikatong.v1.Authorization/Authorize",
                                     request_serializer=pb.AuthorizeRequest.SerializeToString,
                                     response_deserializer=pb.AuthorizeResponse.FromString)
        stub = rpc.AuthorizationStub(channel)
        codes: dict[str, int] = {}
        open_calls: set = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            while len(open_calls) < 400:
                call = (unary(metadata=GATE, timeout=30) if len(open_calls) % 2 else
                        stub.AuthorizeStream(metadata=GATE, timeout=30))
                open_calls.add(call)
            await asyncio.sleep(0.1)
            for call in [c for c in open_calls if c.done()]:
                open_calls.discard(call)
                code = (await call.code()).name
                codes[code] = codes.get(code, 0) + 1
        for call in open_calls:
            call.cancel()
    return f"the gate's calls ended: {codes}"


async def stalled(address: str, seconds: float) -> str:
    channels, streams = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        channel = grpc.aio.insecure_channel(address, options=STALLING)
        channels.append(channel)
        stub = rpc.CardStatusStub(channel)
        streams += [stub.WatchChanges(pb.WatchChangesRequest(), metadata=GATE, timeout=60)
                    for _ in range(16)]
        await asyncio.sleep(0.5)
    codes: dict[str, int] = {}
    for stream in streams:
        code = (await stream.code()).name if stream.done() else "still open"
        codes[code] = codes.get(code, 0) + 1
    for channel in channels:
        await channel.close()
    return f"{len(streams)} streams opened; at the phase's end: {codes}"


async def flood(address: str, seconds: float, watchers: int = 1000) -> str:
    channels = [grpc.aio.insecure_channel(address, options=OWN) for _ in range(watchers // 100)]
    events, codes = [0], {}

    async def watch(channel):
        try:
            async for _ in rpc.CardStatusStub(channel).WatchChanges(
                    pb.WatchChangesRequest(), metadata=GATE, timeout=seconds):
                events[0] += 1
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        codes[code] = codes.get(code, 0) + 1
    await asyncio.gather(*(watch(channels[k % len(channels)]) for k in range(watchers)))
    for channel in channels:
        await channel.close()
    return f"{watchers} watchers took {events[0]:,} events; they ended: {codes}"


async def phase(srv, name: str, seconds: float, attack) -> None:
    proc = start_caller(srv.address, seconds)
    await asyncio.sleep(0.5)  # the callers' connections first
    said = await attack(srv.address, seconds - 1) if attack else "no attack"
    seen = summary(proc)
    print(f"\n## {name}\n{said}")
    for who, line in seen.items():
        print(f"  {who:9} {line}")
    sys.stdout.flush()


async def run(tmp: str, seconds: float) -> None:
    """One event loop for every attack (grpc.aio keeps to the first)."""
    servers = (("a", LIMITS, (("quiet", None), ("headers only", headers_only),
                              ("stalled streams", stalled))),
               ("b", STREAMS, (("quiet", None),
                               ("history flood, replays budgeted per client", flood))),
               ("c", STREAMS + UNBUDGETED, (("quiet, budget lifted", None),
                                            ("history flood, budget lifted", flood))))
    for name, flags, phases in servers:
        os.makedirs(os.path.join(tmp, name))
        print(f"\n# a server on the demo data set: {' '.join(flags)}", flush=True)
        srv = ServerProcess(os.path.join(tmp, name), "--demo", *flags, clients=False)
        try:
            for title, attack in phases:
                await phase(srv, title, seconds, attack)
        finally:
            srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--caller", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.caller:
        caller(args.caller, args.seconds)
        return 0
    print(f"yikatong attack: each phase {args.seconds:g} s; what a bank switch's GetStatus and "
          "a medical terminal's Authorize saw meanwhile")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(tmp, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

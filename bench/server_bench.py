"""Server throughput over gRPC on loopback, side by side in one run: our unary Authorize vs a
bare grpc.aio echo server (bench/echo_server.py) answering the same call, and AuthorizeStream
(100 per message) vs unary. Status-only checks (CHANNEL_STATUS, no money) on the demo data set.
Servers run as their own processes; the client is grpc.aio in this process. Each figure is the
median of --repeat runs of --seconds each; latencies are the median run's p50/p99.

    .venv/bin/python bench/server_bench.py [--seconds 5] [--repeat 3]
"""
import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from yikatong.server.harness import ServerProcess, card_numbers, free_address, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD = metadata("BANK_SWITCH", "demo")


def start(args: list[str], ready: str) -> subprocess.Popen:
    """The bare echo server (not ours: the harness is for Yikatong servers)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(ready):  # drain the rest, so a full pipe never blocks it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"{args} did not start")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else 0.0


async def unary(address: str, cards: list[str], seconds: float, concurrency: int):
    """(calls/s, p50 ms, p99 ms)"""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.AuthorizationStub(channel)
        done = 0
        latencies = []
        deadline = time.perf_counter() + seconds

        async def worker(k):
            nonlocal done
            rng = random.Random(k)
            i = 0
            while (start := time.perf_counter()) < deadline:
                await stub.Authorize(pb.AuthorizeRequest(
                    request_id=f"u{k}-{i}", card_number=rng.choice(cards),
                    channel=pb.CHANNEL_STATUS), metadata=MD)
                latencies.append((time.perf_counter() - start) * 1000)
                done += 1
                i += 1
        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return (done / (time.perf_counter() - t), percentile(latencies, 0.5),
                percentile(latencies, 0.99))


async def stream(address: str, cards: list[str], seconds: float, streams: int, per: int,
                 depth: int) -> float:
    rng = random.Random(1)
    batches = [pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"s{b}-{i}", card_number=rng.choice(cards), channel=pb.CHANNEL_STATUS)
        for i in range(per)]) for b in range(64)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.AuthorizationStub(channel)
        done = 0
        deadline = time.perf_counter() + seconds

        async def one(k):
            nonlocal done
            call = stub.AuthorizeStream(metadata=MD)
            sent = in_flight = 0
            for _ in range(depth):  # keep `depth` messages in flight
                await call.write(batches[sent % len(batches)])
                sent += 1
                in_flight += 1
            while in_flight:
                reply = await call.read()
                in_flight -= 1
                done += len(reply.responses)
                if time.perf_counter() < deadline:
                    await call.write(batches[sent % len(batches)])
                    sent += 1
                    in_flight += 1
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        t = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(streams)))
        return done / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64, help="unary calls in flight")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--per-message", type=int, default=100)
    p.add_argument("--depth", type=int, default=4, help="messages in flight per stream")
    args = p.parse_args()
    echo = free_address()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(tmp, "--demo", clients=False)
        ours = server.address
        procs = []
        try:
            procs.append(start(["bench/echo_server.py", echo], "echo: serving on"))
            cards = card_numbers(server.data_dir)
            u, e, st = [], [], []
            for _ in range(args.repeat):  # interleaved, so drift hits all three alike
                u.append(asyncio.run(unary(ours, cards, args.seconds, args.concurrency)))
                e.append(asyncio.run(unary(echo, cards, args.seconds, args.concurrency)))
                st.append(asyncio.run(stream(ours, cards, args.seconds, args.streams,
                                             args.per_message, args.depth)))
        finally:
            server.stop()
            for proc in procs:
                proc.terminate()
                proc.wait()
    ours_u = sorted(u)[len(u) // 2]
    echo_u = sorted(e)[len(e) // 2]
    stream_rate = statistics.median(st)
    print(f"# server over loopback, status-only decisions, {len(cards):,} demo cards, median of "
          f"{args.repeat} x {args.seconds:g} s; {os.cpu_count()} cores shared by server and "
          f"client; Python {platform.python_version()}, grpcio {grpc.__version__}")
    print("| call | decisions/s | p50 ms | p99 ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| bare grpc.aio echo, unary, {args.concurrency} in flight | {echo_u[0]:,.0f} | "
          f"{echo_u[1]:.2f} | {echo_u[2]:.2f} | |")
    print(f"| Yikatong unary Authorize, {args.concurrency} in flight | {ours_u[0]:,.0f} | "
          f"{ours_u[1]:.2f} | {ours_u[2]:.2f} | {ours_u[0] / echo_u[0]:.2f}x of echo |")
    print(f"| Yikatong AuthorizeStream, {args.per_message} per message, {args.streams} streams x "
          f"{args.depth} in flight | {stream_rate:,.0f} | | | {stream_rate / ours_u[0]:.1f}x "
          "of unary |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

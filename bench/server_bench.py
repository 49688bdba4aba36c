"""Server throughput over gRPC on loopback: AuthorizeStream (100 per message) vs unary
Authorize, side by side in one run, status-only checks (CHANNEL_STATUS, no money) on the demo
data set. The server runs as its own process (`python -m server`); the client is grpc.aio in
this process. Each figure is the median of --repeat runs of --seconds each.

    .venv/bin/python bench/server_bench.py [--seconds 5] [--repeat 3]
"""
import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from yikatong.v1 import yikatong_pb2 as pb, yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD = (("authorization", "Bearer demo-bank-switch"),)


def start_server(data_dir: str, address: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "server", "--demo", "--data-dir", data_dir,
                             "--listen", address], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("yikatong: serving on"):
            return proc
    raise RuntimeError("server did not start")


def card_numbers(data_dir: str) -> list[str]:
    import lmdb
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=16, lock=True)
    with env.begin() as txn:
        db = env.open_db(b"cards", txn=txn, create=False)
        numbers = [bytes(k).decode() for k in txn.cursor(db=db).iternext(values=False)]
    env.close()
    return numbers


async def unary(address: str, cards: list[str], seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.AuthorizationStub(channel)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(k):
            nonlocal done
            rng = random.Random(k)
            i = 0
            while time.perf_counter() < deadline:
                await stub.Authorize(pb.AuthorizeRequest(
                    request_id=f"u{k}-{i}", card_number=rng.choice(cards),
                    channel=pb.CHANNEL_STATUS), metadata=MD)
                done += 1
                i += 1
        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - t)


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(tmp, address)
        try:
            cards = card_numbers(tmp)
            u, st = [], []
            for _ in range(args.repeat):
                u.append(asyncio.run(unary(address, cards, args.seconds, args.concurrency)))
                st.append(asyncio.run(stream(address, cards, args.seconds, args.streams,
                                             args.per_message, args.depth)))
        finally:
            proc.terminate()
            proc.wait()
    unary_rate, stream_rate = statistics.median(u), statistics.median(st)
    print(f"# server over loopback, status-only decisions, {len(cards):,} demo cards, median of "
          f"{args.repeat} x {args.seconds:g} s; {os.cpu_count()} cores shared by server and "
          f"client; Python {platform.python_version()}, grpcio {grpc.__version__}")
    print("| call | decisions/s | vs unary |")
    print("| --- | ---: | ---: |")
    print(f"| unary Authorize, {args.concurrency} in flight | {unary_rate:,.0f} | 1.0x |")
    print(f"| AuthorizeStream, {args.per_message} per message, {args.streams} streams x "
          f"{args.depth} in flight | {stream_rate:,.0f} | {stream_rate / unary_rate:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

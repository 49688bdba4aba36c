"""Server throughput over gRPC on loopback, side by side in one run; status-only checks
(CHANNEL_STATUS, no money) on the demo data set, every server its own process(es):

- unary Authorize: ours (`yikatong serve --workers N`) beside the bare grpc.aio echo server
  (bench/echo_server.py --workers N: the cost of gRPC itself) with the same process count, for
  each N of --workers. The load comes from h2load (bench/h2load_grpc.py: C, one thread, little
  client CPU, none of our code), every call the same request, checked to be answered;
- AuthorizeStream (100 per message) on ours with one worker, from a grpc.aio client in this
  process (h2load cannot keep a stream open), against unary.

Runs are interleaved, so drift hits all alike; each figure is the median of --repeat runs of
--seconds each, latencies the median run's. "CPU" is CPU time over wall time (1.0 = one core)
of the server's processes and of h2load.

    .venv/bin/python bench/server_bench.py [--seconds 5] [--repeat 3] [--workers 1,2]
"""
import argparse
import asyncio
import contextlib
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from h2load_grpc import Unary, median_run

from yikatong.server.harness import ServerProcess, card_numbers, free_address, metadata, token
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD = metadata("BANK_SWITCH", "demo")
TOKEN = token("BANK_SWITCH", "demo")
AUTHORIZE = "/yikatong.v1.Authorization/Authorize"


def start(args: list[str], ready: str) -> subprocess.Popen:
    """The bare echo server (not ours: the harness is for Yikatong servers)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(ready):  # drain the rest, so a full pipe never blocks it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"{args} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time so far of a process and its descendants (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += map(int, f.read().split())
    except FileNotFoundError:
        return 0.0  # it ended meanwhile
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return own + sum(cpu_seconds(child) for child in children)


def machine_cpu_seconds() -> float:
    """CPU time so far of the whole machine, every core, without idle and I/O wait."""
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def approved(server: ServerProcess, cards: list[str]) -> tuple[pb.AuthorizeRequest, bytes]:
    """The first card a real gRPC client sees APPROVED: the request and the answer's bytes."""
    for card in cards:
        request = pb.AuthorizeRequest(request_id="h2load", card_number=card,
                                      channel=pb.CHANNEL_STATUS)
        reply, call = server.authorization.Authorize.with_call(request, metadata=MD)
        if call.code() == grpc.StatusCode.OK and reply.decision == pb.DECISION_APPROVED:
            return request, reply.SerializeToString()
    raise RuntimeError("no demo card is APPROVED for a status check")


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
    p.add_argument("--workers", default="1,2", help="process counts to compare, e.g. 1,2")
    p.add_argument("--connections", type=int, default=32,
                   help="h2load -c (SO_REUSEPORT spreads connections, not calls)")
    p.add_argument("--in-flight", type=int, default=2, help="h2load -m: calls per connection")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--per-message", type=int, default=100)
    p.add_argument("--depth", type=int, default=4, help="messages in flight per stream")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    h2load = (args.seconds, args.connections, args.in_flight)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = {}  # (server, processes) -> (address, pid, the answer to expect)
        for n in counts:
            workdir = os.path.join(tmp, f"workers-{n}")
            os.mkdir(workdir)
            server = ServerProcess(workdir, "--demo", "--workers", str(n), clients=False)
            stack.callback(server.stop)
            if n == counts[0]:
                first, cards = server, card_numbers(server.data_dir)
                request, answer = approved(server, cards)
                unary = Unary(AUTHORIZE, request.SerializeToString(), TOKEN, tmp)
            elif approved(server, [request.card_number])[1] != answer:
                raise RuntimeError(f"--workers {n} answers differently")
            targets["ours", n] = (server.address, server.proc.pid, answer)
            echo = start(["bench/echo_server.py", address := free_address(), "--workers",
                          str(n)], "echo: serving on")
            stack.callback(stop, echo)
            targets["bare", n] = (address, echo.pid, pb.AuthorizeResponse(
                request_id=request.request_id, decision=pb.DECISION_APPROVED).SerializeToString())
        for address, _, expected in targets.values():  # the exact request h2load sends
            if unary.call(address) != expected:
                raise RuntimeError(f"{address}: not the expected answer over HTTP/2")
            unary.run(address, min(1.0, args.seconds), *h2load[1:], expected)  # warm-up
        runs = {key: [] for key in targets}
        others = []  # cores used by anything but the server and h2load: a busy machine shows
        stream_rates = []
        for _ in range(args.repeat):
            for key, (address, pid, expected) in targets.items():
                cpu, machine, t = cpu_seconds(pid), machine_cpu_seconds(), time.perf_counter()
                run = unary.run(address, *h2load, expected)
                wall = time.perf_counter() - t
                run.server_cpu = (cpu_seconds(pid) - cpu) / wall
                others.append((machine_cpu_seconds() - machine) / wall - run.server_cpu
                              - run.client_cpu)
                runs[key].append(run)
            stream_rates.append(asyncio.run(stream(first.address, cards, args.seconds,
                                                   args.streams, args.per_message,
                                                   args.depth)))
        command = shlex.join(unary.command("HOST:PORT", *h2load)).replace(tmp + "/", "")
    best = {key: median_run(r) for key, r in runs.items()}
    print(f"# server over loopback, unary Authorize from h2load, status-only decisions, "
          f"{len(cards):,} demo cards; median of {args.repeat} x {args.seconds:g} s; "
          f"{os.cpu_count()} cores shared by servers and client; Python "
          f"{platform.python_version()}, grpcio {grpc.__version__}; anything else used at most "
          f"{max(0.0, *others):.2f} core during a unary run")
    print("| server | processes | calls/s | p50 ms | p99 ms | server CPU | calls per server "
          "CPU-s | h2load CPU | ours / bare |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, n) in sorted(best, key=lambda key: (key[1], key[0] == "ours")):
        run = best[name, n]
        label = "Yikatong `serve --workers N`" if name == "ours" else "bare grpc.aio echo"
        ratio = f"{run.rate / best['bare', n].rate:.2f}x" if name == "ours" else ""
        print(f"| {label} | {n} | {run.rate:,.0f} | {run.p50:.2f} | {run.p99:.2f} | "
              f"{run.server_cpu:.2f} | {run.rate / run.server_cpu:,.0f} | {run.client_cpu:.2f} | "
              f"{ratio} |")
    if len(counts) > 1:
        a, b = counts[0], counts[-1]
        print(f"\nscaling {b} processes / {a}: Yikatong "
              f"{best['ours', b].rate / best['ours', a].rate:.2f}x, bare echo "
              f"{best['bare', b].rate / best['bare', a].rate:.2f}x")
    stream_rate = statistics.median(stream_rates)
    ours1 = best["ours", counts[0]].rate
    print(f"\n| call (Yikatong, {counts[0]} process) | decisions/s | ratio |\n"
          "| --- | ---: | ---: |")
    print(f"| unary Authorize, h2load above | {ours1:,.0f} | |")
    print(f"| AuthorizeStream, {args.per_message} per message, {args.streams} streams x "
          f"{args.depth} in flight, grpc.aio client in the benchmark's process | "
          f"{stream_rate:,.0f} | {stream_rate / ours1:.1f}x of unary |")
    print(f"\nh2load, every unary run (body.bin: one gRPC message, AuthorizeRequest "
          f"request_id={request.request_id!r} card_number={request.card_number!r} "
          f"channel=CHANNEL_STATUS, answered APPROVED, checked):\n\n    {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

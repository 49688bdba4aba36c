"""Server throughput over gRPC on loopback, side by side in one run; status-only checks
(CHANNEL_STATUS, no money) on the demo data set, every server its own process(es): ours
(`yikatong serve --workers N`) beside the bare grpc.aio echo server (bench/echo_server.py
--workers N: the cost of gRPC itself, constant approvals, no identity, no validation, no
store) with the same process count, for each N of --workers, for two calls:

- unary Authorize, every call the same request;
- AuthorizeStream, every call 10 messages of 100 requests on demo cards (1,000 decisions),
  sent whole and closed, answered with 10 messages.

The load comes from h2load (bench/h2load_grpc.py: C, one thread, little client CPU, none of
our code); every call's answer is checked to be the bytes the server answered first (ours:
its decisions, which a grpc.aio client confirms; the echo: all approved). Runs are
interleaved, so drift hits all alike; each figure is the median of --repeat runs of --seconds
each, latencies the median run's. "CPU" is CPU time over wall time (1.0 = one core) of the
server's processes and of h2load.

    .venv/bin/python bench/server_bench.py [--seconds 5] [--repeat 3] [--workers 1,2]
"""
import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from h2load_grpc import Call, frame, median_run

from yikatong.server.harness import ServerProcess, card_numbers, free_address, metadata, token
from yikatong.v1 import yikatong_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD = metadata("BANK_SWITCH", "demo")
TOKEN = token("BANK_SWITCH", "demo")
CHANNEL = pb.CHANNEL_STATUS  # --channel medical: MEDICAL, asked by a medical terminal
AUTHORIZE = "/yikatong.v1.Authorization/Authorize"
STREAM = "/yikatong.v1.Authorization/AuthorizeStream"


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
                                      channel=CHANNEL)
        reply, call = server.authorization.Authorize.with_call(request, metadata=MD)
        if call.code() == grpc.StatusCode.OK and reply.decision == pb.DECISION_APPROVED:
            return request, reply.SerializeToString()
    raise RuntimeError(f"no demo card is APPROVED for a {pb.Channel.Name(CHANNEL)} check")


def stream_batches(cards: list[str], messages: int, per: int) -> list[pb.AuthorizeBatchRequest]:
    step = max(1, len(cards) // (messages * per))
    return [pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"s{m}-{i}", card_number=cards[(m * per + i) * step % len(cards)],
        channel=CHANNEL) for i in range(per)]) for m in range(messages)]


def stream_answer(server: ServerProcess, batches) -> bytes:
    """What a grpc.aio client gets for the stream, as the frames h2load must receive."""
    replies = server.authorization.AuthorizeStream(iter(batches), metadata=MD)
    return b"".join(frame(r.SerializeToString()) for r in replies)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="process counts to compare, e.g. 1,2")
    p.add_argument("--connections", type=int, default=32,
                   help="h2load -c (SO_REUSEPORT spreads connections, not calls)")
    p.add_argument("--in-flight", type=int, default=2, help="h2load -m: calls per connection")
    p.add_argument("--messages", type=int, default=10, help="AuthorizeStream: per call")
    p.add_argument("--per-message", type=int, default=100, help="AuthorizeStream: requests")
    p.add_argument("--calls", default="unary,stream", help="which of unary,stream to run")
    p.add_argument("--channel", choices=("status", "medical"), default="status",
                   help="medical: status-only MEDICAL uses by a medical terminal (a usable "
                   "card's holder's other cards are asked too)")
    args = p.parse_args()
    if args.channel == "medical":
        global MD, TOKEN, CHANNEL
        MD, TOKEN = metadata("MEDICAL_TERMINAL", "demo"), token("MEDICAL_TERMINAL", "demo")
        CHANNEL = pb.CHANNEL_MEDICAL
    counts = [int(n) for n in args.workers.split(",")]
    kinds = args.calls.split(",")
    load = (args.seconds, args.connections, args.in_flight)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = {}  # (call, server, processes) -> (address, pid, the answer to expect)
        for n in counts:
            workdir = os.path.join(tmp, f"workers-{n}")
            os.mkdir(workdir)
            server = ServerProcess(workdir, "--demo", "--workers", str(n), clients=False)
            stack.callback(server.stop)
            if n == counts[0]:
                cards = card_numbers(server.data_dir)
                request, answer = approved(server, cards)
                batches = stream_batches(cards, args.messages, args.per_message)
                streamed = stream_answer(server, batches)
                calls = {"unary": Call(AUTHORIZE, [request.SerializeToString()], TOKEN, tmp,
                                       "unary"),
                         "stream": Call(STREAM, [b.SerializeToString() for b in batches], TOKEN,
                                        tmp, "stream")}
            elif (approved(server, [request.card_number])[1] != answer
                  or stream_answer(server, batches) != streamed):
                raise RuntimeError(f"--workers {n} answers differently")
            echo = start(["bench/echo_server.py", address := free_address(), "--workers",
                          str(n)], "echo: serving on")
            stack.callback(stop, echo)
            bare_stream = b"".join(frame(pb.AuthorizeBatchResponse(responses=[
                pb.AuthorizeResponse(request_id=q.request_id, decision=pb.DECISION_APPROVED)
                for q in b.requests]).SerializeToString()) for b in batches)
            bare_unary = frame(pb.AuthorizeResponse(request_id=request.request_id,
                                                    decision=pb.DECISION_APPROVED)
                               .SerializeToString())
            for kind in kinds:
                targets[kind, "ours", n] = (server.address, server.proc.pid,
                                            frame(answer) if kind == "unary" else streamed)
                targets[kind, "bare", n] = (address, echo.pid,
                                            bare_unary if kind == "unary" else bare_stream)
        for (kind, _, _), (address, _, expected) in targets.items():  # h2load's exact call
            if calls[kind].call(address) != expected:
                raise RuntimeError(f"{address}: not the expected {kind} answer over HTTP/2")
            calls[kind].run(address, min(1.0, args.seconds), *load[1:], expected)  # warm-up
        runs = {key: [] for key in targets}
        others = []  # cores used by anything but the server and h2load: a busy machine shows
        for _ in range(args.repeat):
            for key, (address, pid, expected) in targets.items():
                cpu, machine, t = cpu_seconds(pid), machine_cpu_seconds(), time.perf_counter()
                run = calls[key[0]].run(address, *load, expected)
                wall = time.perf_counter() - t
                run.server_cpu = (cpu_seconds(pid) - cpu) / wall
                others.append((machine_cpu_seconds() - machine) / wall - run.server_cpu
                              - run.client_cpu)
                runs[key].append(run)
        commands = {kind: shlex.join(c.command("HOST:PORT", *load)).replace(tmp + "/", "")
                    for kind, c in calls.items() if kind in kinds}
    best = {key: median_run(r) for key, r in runs.items()}
    per_call = {"unary": 1, "stream": args.messages * args.per_message}
    print(f"# server over loopback, load from h2load, status-only decisions, {len(cards):,} demo "
          f"cards; median of {args.repeat} x {args.seconds:g} s; {os.cpu_count()} cores shared "
          f"by servers and client; Python {platform.python_version()}, grpcio "
          f"{grpc.__version__}; anything else used at most {max(0.0, *others):.2f} core "
          "during a run")
    print("| call | server | processes | calls/s | decisions/s | p50 ms | p99 ms | server CPU | "
          "decisions per server CPU-s | h2load CPU | ours / bare |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (kind, name, n) in sorted(best, key=lambda k: (kinds.index(k[0]), k[2], k[1] == "ours")):
        run = best[kind, name, n]
        label = "Yikatong `serve --workers N`" if name == "ours" else "bare grpc.aio echo"
        call = ("unary Authorize" if kind == "unary" else
                f"AuthorizeStream {args.messages}x{args.per_message}")
        ratio = f"**{run.rate / best[kind, 'bare', n].rate:.2f}x**" if name == "ours" else ""
        decisions = run.rate * per_call[kind]
        print(f"| {call} | {label} | {n} | {run.rate:,.0f} | {decisions:,.0f} | {run.p50:.2f} | "
              f"{run.p99:.2f} | {run.server_cpu:.2f} | {decisions / run.server_cpu:,.0f} | "
              f"{run.client_cpu:.2f} | {ratio} |")
    if len(counts) > 1:
        a, b = counts[0], counts[-1]
        for kind in kinds:
            print(f"\nscaling of {kind}, {b} processes / {a}: Yikatong "
                  f"{best[kind, 'ours', b].rate / best[kind, 'ours', a].rate:.2f}x, bare echo "
                  f"{best[kind, 'bare', b].rate / best[kind, 'bare', a].rate:.2f}x")
    print(f"\nh2load, every run (unary.bin: one gRPC message, AuthorizeRequest "
          f"request_id={request.request_id!r} card_number={request.card_number!r} "
          f"channel={pb.Channel.Name(CHANNEL)}, answered APPROVED; stream.bin: "
          f"{args.messages} messages of {args.per_message}; every answer checked):\n")
    for command in commands.values():
        print(f"    {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Durable debits over gRPC with money from wire bytes (issue 27 item 3) against the Python
path, side by side in one run: two servers up at once, one on the wire path (fastpath
money_wire, the default), one with YIKATONG_NO_WIRE_MONEY=1 (every request with money decoded
and validated by protobuf and server/validate.py), measured in turn --repeat times, medians.

For each server: durable debits/s through AuthorizeStream (100 per message, --streams streams
x 4 messages in flight, feed_bench's client: messages made before the clock starts, only
approvals counted) and through unary Authorize with money (--unary calls in flight); and the
server's CPU seconds per debit (/proc: user + system over the run), which on a machine shared
with other work says more than the rate (there, each busy thread gets its share of a core,
and the writer's is the bound), split between the event loop's thread and the others. The
client runs on the same cores.

    .venv/bin/python bench/money_wire_bench.py [--seconds 3] [--repeat 5] [--workers 1]
"""
import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time

import grpc
from feed_bench import LOCAL, debits, fund

from yikatong.server.harness import ServerProcess, card_numbers, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

MODES = (("wire", {}), ("python", {"YIKATONG_NO_WIRE_MONEY": "1"}))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu(server) -> float:
    """The server's main thread: the event loop (gRPC's calls, our handlers)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(server) -> float:
    """The server's processes: the supervisor and its workers (children)."""
    pids = [server.proc.pid]
    try:
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return sum(cpu_seconds(p) for p in pids)


async def unary(address: str, cards: list[str], seconds: float, inflight: int, tag: str):
    """Unary Authorize with money (1 fen, TRANSIT), `inflight` calls at a time."""
    done = 0

    async def one(k: int):
        nonlocal done
        async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
            call = rpc.AuthorizationStub(channel).Authorize
            md = metadata("TRANSIT_GATE", "demo")
            n = 0
            while time.perf_counter() < deadline:
                reply = await call(pb.AuthorizeRequest(
                    request_id=f"{tag}-{k}-{n}", card_number=cards[(k * 7919 + n) % len(cards)],
                    channel=pb.CHANNEL_TRANSIT, amount_fen=1, terminal_id="bench"), metadata=md)
                done += reply.decision == pb.DECISION_APPROVED
                n += 1
    t = time.perf_counter()
    deadline = t + seconds
    await asyncio.gather(*(one(k) for k in range(inflight)))
    return done / (time.perf_counter() - t)


def debit_rate(server, cards: list[str], kind: str, args, rep: int, mode: str) -> float:
    """One run's durable debits/s: AuthorizeStream (`kind` "stream") or unary Authorize."""
    return asyncio.run(
        debits(server.address, cards, args.seconds, args.streams, f"debit-{rep}")
        if kind == "stream" else
        unary(server.address, cards, args.seconds, args.unary, f"{mode}-{rep}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--unary", type=int, default=64, help="unary calls in flight")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    samples: dict[str, dict[str, list[float]]] = {m: {} for m, _ in MODES}
    with contextlib.ExitStack() as stack:
        servers, cards = {}, {}
        for mode, env in MODES:  # both up at once, measured in turn
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            servers[mode] = ServerProcess(tmp, "--demo", "--workers", str(args.workers),
                                          clients=False, env=env)
            stack.callback(servers[mode].stop)
            cards[mode] = [c for c in card_numbers(servers[mode].data_dir)
                           if c.startswith("31")][:500]
            asyncio.run(fund(servers[mode].address, cards[mode]))
            asyncio.run(debits(servers[mode].address, cards[mode], 1, args.streams, "warm"))
        for rep in range(args.repeat):  # alternated, so the machine's drift hits both alike
            for kind in ("stream", "unary"):
                for mode, _ in MODES:
                    server = servers[mode]
                    c0, l0, t0 = server_cpu(server), loop_cpu(server), time.perf_counter()
                    rate = debit_rate(server, cards[mode], kind, args, rep, mode)
                    wall = time.perf_counter() - t0
                    samples[mode].setdefault(kind, []).append(rate)
                    samples[mode].setdefault(kind + "_us", []).append(
                        (server_cpu(server) - c0) / (rate * wall) * 1e6)
                    samples[mode].setdefault(kind + "_loop_us", []).append(
                        (loop_cpu(server) - l0) / (rate * wall) * 1e6)
    med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    w, py = med["wire"], med["python"]
    print(f"# durable debits over gRPC, --workers {args.workers}, {args.seconds:g} s each, "
          f"median of {args.repeat} alternated; {os.cpu_count()} cores shared by server and "
          f"client, load {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    print("| path | AuthorizeStream debits/s | server CPU us/debit | unary Authorize "
          "debits/s | server CPU us/debit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, m in (("money from wire bytes", w), ("Python path (YIKATONG_NO_WIRE_MONEY=1)", py)):
        print(f"| {name} | {m['stream']:,.0f} | {m['stream_us']:.1f} | {m['unary']:,.0f} | "
              f"{m['unary_us']:.1f} |")
    print(f"| wire / Python | {w['stream'] / py['stream']:.2f}x | "
          f"{w['stream_us'] / py['stream_us']:.2f}x | {w['unary'] / py['unary']:.2f}x | "
          f"{w['unary_us'] / py['unary_us']:.2f}x |")
    print("\nOf the server CPU per streamed debit, the event loop's thread (gRPC's calls and "
          "our handlers) / the others' (the LMDB writer, gRPC's own): " + "; ".join(
              f"{name} {m['stream_loop_us']:.1f} / {m['stream_us'] - m['stream_loop_us']:.1f} us"
              for name, m in (("wire", w), ("Python path", py))))
    print("\nruns (stream debits/s): " + "; ".join(
        f"{m} " + ", ".join(f"{v:,.0f}" for v in samples[m]["stream"]) for m, _ in MODES))
    return 0


if __name__ == "__main__":
    sys.exit(main())

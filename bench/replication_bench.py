"""Durable debits/s through AuthorizeStream, replicated against single-node, side by side in
one run (issue 18). Single node: `yikatong serve` on its own LMDB. Replicated: three
`yikatong serve --replicate` nodes on a 3-node NATS JetStream cluster (`sync_interval:
always`, as docs/SCALE.md decides), debits sent to the writer; every commit group is appended
to the log and acknowledged by a quorum before it commits. Everything runs on this machine's
cores, the nodes, the NATS servers and the client alike.

Each run: 100 debits of 1 fen per message, 4 messages in flight per stream, `--streams`
streams, `--seconds` long; only approved debits count. Interleaved, median of `--repeat`.
During each replicated run, replication lag as a reader sees it: every 20 ms a write on the
writer (its answer names its log sequence), then a read on a follower that asks for that
sequence (`min_sequence`); the time from the write's answer to the follower's. After the
last replicated run, how far behind the followers were and the time until both had it all.
Then reads: status-only AuthorizeStream (the same shape, no money, `--streams` x 2 streams)
on a follower of one worker, on a follower of `--workers` workers (issue 27 item 1: a log
keeper and N workers), and on the single node, interleaved, median of `--repeat`. For each
debit run, the CPU each process spent a debit (from /proc): on 2 cores shared by all, the
cluster's sum is what bounds the replicated rate; the writer's own is what would on
machines of their own.

`--followers-stopped`: each round also runs the replicated debits with both followers
SIGSTOPped (resumed after, they catch up): what the ratio would be if the followers cost
nothing, on machines of their own. For each replicated run with `--workers 1`, how busy the
writer's busiest thread was (its LMDB writer, as `py-spy dump` showed): far below one core,
the writer waits, not works.

`--workers N` (default 1): the single node, the writer (node 0) and node 2 (a follower) run
N workers; node 1 runs one. Every stream is a connection of its own (the kernel spreads
them over a node's workers).

    .venv/bin/python bench/replication_bench.py [--seconds 5] [--repeat 3]
        [--log-in-flight-max N] [--workers N] [--followers-stopped] [--streams N]
"""
import argparse
import asyncio
import collections
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc

from yikatong.server.harness import (
    NatsCluster,
    ServerProcess,
    metadata,
    store_digest,
    token,
    wait_until,
    writer_of,
)
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

CARDS = 200


def make_cards(srv: ServerProcess) -> list[str]:
    """Active Shanghai cards with transit purses funded, made through the writer."""
    from test_e2e import new_active_card  # the tests' own walk: apply, verify, issue, activate

    cards = [new_active_card(srv, n) for n in range(1, CARDS + 1)]
    for card in cards:
        srv.ledger.Transfer(pb.TransferRequest(
            transfer_id=uuid.uuid4().hex, debit=pb.AccountRef(operator="op:topup"),
            credit=pb.AccountRef(holder=pb.HolderAccountRef(
                card_number=card, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=10**9),
            metadata=srv.md("CARD_AGENCY"), timeout=30)
    return cards


async def debits(address: str, cards: list[str], seconds: float, streams: int, run: str,
                 amount_fen: int = 1, latencies: list | None = None) -> float:
    """Approved decisions/s; `amount_fen=0`: status-only decisions (reads). `latencies`:
    each message's seconds from its sending to its answer (its 100 debits acknowledged)."""
    per_stream = int(seconds * (60_000 if amount_fen else 600_000) / 100 / streams) + 8
    batches = [[pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"{run}-{s}-{b}-{i}", card_number=cards[(b * 100 + i) % len(cards)],
        channel=pb.CHANNEL_TRANSIT, amount_fen=amount_fen, terminal_id="bench")
        for i in range(100)]) for b in range(per_stream)] for s in range(streams)]
    done = 0

    async def one(mine):
        nonlocal done
        async with grpc.aio.insecure_channel(address, options=(
                ("grpc.use_local_subchannel_pool", 1),)) as channel:  # a connection each
            call = rpc.AuthorizationStub(channel).AuthorizeStream(
                metadata=metadata("TRANSIT_GATE"))
            sent = in_flight = 0
            times: collections.deque = collections.deque()
            for _ in range(4):
                times.append(time.perf_counter())
                await call.write(mine[sent])
                sent += 1
                in_flight += 1
            while in_flight:
                reply = await call.read()
                if latencies is not None:
                    latencies.append(time.perf_counter() - times.popleft())
                in_flight -= 1
                done += sum(r.decision == pb.DECISION_APPROVED for r in reply.responses)
                if time.perf_counter() < deadline and sent < len(mine):
                    times.append(time.perf_counter())
                    await call.write(mine[sent])
                    sent += 1
                    in_flight += 1
            await call.done_writing()
    t = time.perf_counter()
    deadline = t + seconds
    await asyncio.gather(*(one(mine) for mine in batches))
    return done / (time.perf_counter() - t)


def h2load_reads(srv: ServerProcess, cards: list[str], tmp: str, name: str):
    """An h2load call of status-only AuthorizeStream (10 messages of 100 decisions) on
    `srv`, and the answer every call must get (checked first with nghttp)."""
    from h2load_grpc import Call

    batches = [pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"r-{b}-{i}", card_number=cards[(b * 100 + i) % len(cards)],
        channel=pb.CHANNEL_TRANSIT, terminal_id="bench") for i in range(100)])
        for b in range(10)]
    call = Call("/yikatong.v1.Authorization/AuthorizeStream",
                [b.SerializeToString() for b in batches], token("TRANSIT_GATE"), tmp,
                name.replace(" ", "-").replace(",", ""))
    expected = call.call(srv.address)
    call.run(srv.address, 1.0, 32, 2, expected)  # warm-up
    return call, expected


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its children (a node's workers and log
    keeper) so far, from /proc (Linux)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                              text=True).stdout.split()
    total = 0
    for p in (pid, *map(int, children)):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of one process so far, from /proc (Linux)."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(task)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def signal_followers(followers: list, signum: int) -> None:
    """SIGSTOP or SIGCONT to every process of each follower (its workers and keeper too)."""
    for f in followers:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(f.proc.pid)],
                                  capture_output=True, text=True).stdout.split()
        for pid in (f.proc.pid, *map(int, children)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def log_sequence(data_dir: str) -> int:
    import lmdb

    from yikatong import config

    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, lock=True,
                    max_dbs=config.lmdb_max_dbs)
    with env.begin() as txn:
        value = txn.get(b"replication:log_seq", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()
    return int.from_bytes(value, "big") if value else 0


def lag_probe(writer: ServerProcess, follower: ServerProcess, card: str, stop, samples: list):
    """Until `stop`: a write on the writer, then a follower's read of its record; the time
    between the two answers, in seconds."""
    while not stop.wait(0.02):
        _, call = writer.ledger.Transfer.with_call(pb.TransferRequest(
            transfer_id=uuid.uuid4().hex, debit=pb.AccountRef(operator="op:probe-a"),
            credit=pb.AccountRef(operator="op:probe-b"), amount_fen=1),
            metadata=writer.md("CARD_AGENCY"), timeout=10)
        acked = time.perf_counter()
        follower.status.GetStatus(pb.GetStatusRequest(card_number=card), timeout=10, metadata=(
            *follower.md("TRANSIT_GATE"),
            ("min_sequence", dict(call.trailing_metadata())["log_sequence"])))
        samples.append(time.perf_counter() - acked)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--reads-client", choices=("grpc", "h2load"), default="grpc",
                   help="the status-only reads' client: this script's grpc.aio (one Python "
                        "process, a core at about 500,000 decisions/s) or h2load (C, one "
                        "thread; bench/h2load_grpc.py)")
    p.add_argument("--log-in-flight-max", type=int, default=None,
                   help="the replicated nodes' --log-in-flight-max (default: theirs)")
    p.add_argument("--workers", type=int, default=1,
                   help="the single node's, the writer's and one follower's (default: 1)")
    p.add_argument("--followers-stopped", action="store_true",
                   help="also the replicated debits with both followers SIGSTOPped")
    args = p.parse_args()
    h2load = args.reads_client == "h2load"  # C, one thread: the client is not the bound
    workers = ("--workers", str(args.workers))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        os.mkdir(os.path.join(tmp, "single"))
        single = ServerProcess(os.path.join(tmp, "single"), *workers)
        stack.callback(single.stop)
        cluster = NatsCluster(tmp)
        stack.callback(cluster.stop)
        nodes = []
        for i in range(3):
            workdir = os.path.join(tmp, f"node{i}")
            os.mkdir(workdir)
            node = ServerProcess(workdir, "--replicate", ",".join(cluster.urls), "--node-id",
                                 f"node{i}", *(("--log-in-flight-max",
                                                str(args.log_in_flight_max))
                                               if args.log_in_flight_max else ()),
                                 *(workers if i != 1 else ()))
            stack.callback(node.stop)
            nodes.append(node)
            if i == 0 and not wait_until(lambda: writer_of(nodes) is not None, 60):
                raise RuntimeError("no node took the write lease")
        writer = writer_of(nodes)
        followers = [n for n in nodes if n is not writer]  # node 1, node 2
        # resumed before they are stopped, whatever a stopped run meets (SIGCONT to a running
        # process does nothing)
        stack.callback(signal_followers, followers, signal.SIGCONT)
        targets = {"single node": (single, make_cards(single)),
                   "replicated, 3 nodes": (writer, make_cards(writer))}
        stopped = "replicated, followers stopped"
        if args.followers_stopped:
            targets[stopped] = targets["replicated, 3 nodes"]
        rates: dict[str, list[float]] = {name: [] for name in targets}
        # where the CPU goes, microseconds a debit: each process (tree) of each setup
        procs = {"single node": {"the server": [single.proc.pid]},
                 "replicated, 3 nodes": {
                     "the writer": [writer.proc.pid],
                     "the followers": [f.proc.pid for f in followers],
                     "the NATS servers": [p.pid for p in cluster.procs if p is not None]}}
        if args.followers_stopped:
            procs[stopped] = {k: v for k, v in procs["replicated, 3 nodes"].items()
                              if k != "the followers"}
        cpu: dict[str, dict[str, list[float]]] = {
            name: {k: [] for k in [*parts, "the client"]} for name, parts in procs.items()}
        waits: dict[str, list[float]] = {name: [] for name in targets}
        busiest: dict[str, list[float]] = {  # one process: its writer thread is the node's
            name: [] for name in targets if name != "single node" and args.workers == 1}
        lags: list[float] = []
        for r in range(args.repeat):
            for name, (srv, cards) in targets.items():
                stop = threading.Event()
                probe = threading.Thread(target=lag_probe, args=(
                    writer, followers[0], cards[0], stop, lags))
                if name == stopped:
                    signal_followers(followers, signal.SIGSTOP)
                elif srv is writer:
                    probe.start()
                before = {k: sum(map(cpu_seconds, pids)) for k, pids in procs[name].items()}
                threads = thread_seconds(writer.proc.pid) if name in busiest else {}
                client, started = time.process_time(), time.perf_counter()
                run = f"r{r}-{list(targets).index(name)}"  # request ids of its own
                rates[name].append(asyncio.run(debits(srv.address, cards, args.seconds,
                                                      args.streams, run,
                                                      latencies=waits[name])))
                count = rates[name][-1] * (time.perf_counter() - started)
                for k, pids in procs[name].items():
                    cpu[name][k].append((sum(map(cpu_seconds, pids)) - before[k]) / count)
                cpu[name]["the client"].append((time.process_time() - client) / count)
                if name in busiest:
                    after = thread_seconds(writer.proc.pid)
                    busiest[name].append(max(after[t] - threads.get(t, 0) for t in after)
                                         / (time.perf_counter() - started))
                stop.set()
                if name == stopped:
                    signal_followers(followers, signal.SIGCONT)
                elif srv is writer:
                    probe.join()
        last = log_sequence(writer.data_dir)
        behind = [last - log_sequence(f.data_dir) for f in followers]
        t = time.monotonic()
        while any(log_sequence(f.data_dir) < last for f in followers):
            time.sleep(0.01)
        caught_up = time.monotonic() - t
        same = len({store_digest(n.data_dir) for n in nodes}) == 1
        readers = {"single node": (single, targets["single node"][1]),
                   "a follower, 1 worker": (followers[0], targets["replicated, 3 nodes"][1])}
        if args.workers > 1:
            readers[f"a follower, {args.workers} workers"] = (
                followers[1], targets["replicated, 3 nodes"][1])
        reads: dict[str, list[float]] = {name: [] for name in readers}
        cores: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
        if h2load:
            reads_calls = {name: h2load_reads(srv, cards, tmp, name)
                           for name, (srv, cards) in readers.items()}
        for r in range(args.repeat):
            for name, (srv, cards) in readers.items():
                if h2load:
                    call, expected = reads_calls[name]
                    server, t = cpu_seconds(srv.proc.pid), time.perf_counter()
                    run = call.run(srv.address, args.seconds, 32, 2, expected)
                    reads[name].append(run.rate * 1000)
                    cores[name].append((run.client_cpu, (cpu_seconds(srv.proc.pid) - server)
                                        / (time.perf_counter() - t)))
                    continue
                reads[name].append(asyncio.run(debits(srv.address, cards, args.seconds,
                                                      args.streams * 2, f"q{r}",
                                                      amount_fen=0)))
    single_rate = statistics.median(rates["single node"])
    print(f"# durable debits/s through AuthorizeStream (100 per message, {args.streams} streams "
          f"x 4 in flight), median of {args.repeat} x {args.seconds:g} s; {os.cpu_count()} "
          "cores shared by every node, NATS server and the client")
    print(f"(--workers {args.workers} on the single node and the writer; "
          f"--log-in-flight-max {args.log_in_flight_max or 'default'}; a debit is "
          "acknowledged when the answer to its message of 100 arrives: p50/p99 from a "
          "message's sending to its answer, over every run)")
    print("| server | debits/s | runs | against single node | acknowledged p50 ms | p99 ms |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, values in rates.items():
        median = statistics.median(values)
        w = sorted(waits[name])
        print(f"| {name} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | "
              f"{median / single_rate:.2f}x | {w[len(w) // 2] * 1000:.1f} | "
              f"{w[int(len(w) * 0.99)] * 1000:.1f} |")
    for name, values in busiest.items():
        print(f"- {name}: the writer's busiest thread (its LMDB writer's, as py-spy "
              f"showed) {statistics.median(values):.2f} of a core")
    print("\nCPU a debit (user + system, every thread and child process), medians; the "
          "client is the debits' share of this script (the lag probe's too when replicated)")
    for name, parts in cpu.items():
        print(f"- {name}: " + ", ".join(f"{k} {statistics.median(v) * 1e6:.1f} us"
                                          for k, v in parts.items())
              + f"; {sum(statistics.median(v) for v in parts.values()) * 1e6:.1f} us in all")
    lags.sort()
    print(f"\nreplication lag as a reader sees it, during the replicated runs ({len(lags)} "
          f"probes: a write's answer on the writer to a follower's answer with its "
          f"min_sequence): p50 {lags[len(lags) // 2] * 1000:.1f} ms, p99 "
          f"{lags[int(len(lags) * 0.99)] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")
    single_reads = statistics.median(reads["single node"])
    client = ("h2load, 32 connections x 2 calls of 10 messages of 100" if h2load
              else f"this script, {args.streams * 2} streams")
    print(f"\n| status-only decisions/s (AuthorizeStream, no money; {client}) "
          "| decisions/s | runs | against single node |"
          + (" cores: h2load, the server | server CPU a decision |" if h2load else ""))
    print("| --- | ---: | --- | ---: |" + (" ---: | ---: |" if h2load else ""))
    for name, values in reads.items():
        median = statistics.median(values)
        used = ""
        if h2load:  # where the two cores went (the server: its workers and log keeper)
            client_cores = statistics.median(c for c, _ in cores[name])
            server_cores = statistics.median(s for _, s in cores[name])
            used = (f" {client_cores:.2f}, {server_cores:.2f} | "
                    f"{server_cores / median * 1e6:.2f} us |")
        print(f"| {name} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | "
              f"{median / single_reads:.2f}x |" + used)
    print(f"\nafter the last run: the writer at log sequence {last:,}, the followers "
          f"{', '.join(str(b) for b in behind)} records behind, all applied {caught_up:.2f} s "
          f"later; every node's store identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

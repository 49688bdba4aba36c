"""Change-feed delivery: how long after a change is committed a gate watching the feed has
it, with --watchers watchers (default 100) spread over the server's workers, and durable
debits/s through AuthorizeStream (100 per message) with the feed and the audit trail on.

One write at a time: a top-up to a demo card (Ledger.Transfer, durable before its answer),
every --interval seconds. For each, the delay at each watcher is measured from the moment
the write was *sent*: that is the write's own latency (fsync included) plus the feed's, an
upper bound on commit-to-delivery; the write latency alone is reported beside it, so the
feed's share is the difference. Percentiles over every (write, watcher) pair.

    .venv/bin/python bench/feed_bench.py [--workers 2] [--watchers 100] [--writes 200]
"""
import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time

import grpc
import lmdb

from yikatong.server.harness import ServerProcess, card_numbers, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

LOCAL = (("grpc.use_local_subchannel_pool", 1),)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


async def feed(address: str, cards: list[str], head: int, watchers: int, writes: int,
               interval: float, signed: bool = False):
    sent: dict[str, float] = {}  # card -> when its top-up was sent
    delays: list[float] = []
    ready = asyncio.Event()
    caught_up = [0]

    async def watch():
        async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
            stream = rpc.CardStatusStub(channel).WatchChanges(
                pb.WatchChangesRequest(from_sequence=head, signed=signed),
                metadata=metadata("BANK_SWITCH", "demo"))
            caught_up[0] += 1
            if caught_up[0] == watchers:
                ready.set()
            mine = 0
            async for event in stream:
                at = time.perf_counter()
                if event.balance_changed and event.card_number in sent:
                    delays.append(at - sent[event.card_number])
                    mine += 1
                    if mine == writes:
                        return

    async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
        # watchers start at the feed's current end, so they see only the writes below
        tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
        await ready.wait()
        await asyncio.sleep(1)  # every stream open and waiting
        ledger = rpc.LedgerStub(channel)
        write_latency = []
        for k in range(writes):
            card = cards[k % len(cards)]
            sent[card] = time.perf_counter()
            await ledger.Transfer(pb.TransferRequest(
                transfer_id=f"feed-{int(signed)}-{k}", debit=pb.AccountRef(operator="op:topup"),
                credit=pb.AccountRef(holder=pb.HolderAccountRef(
                    card_number=card, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=1),
                metadata=metadata("CARD_AGENCY", "demo"))
            write_latency.append(time.perf_counter() - sent[card])
            await asyncio.sleep(interval)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return delays, write_latency


async def fund(address: str, cards: list[str]) -> None:
    async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
        ledger = rpc.LedgerStub(channel)
        for i in range(0, len(cards), 64):  # within the server's streams per connection
            await asyncio.gather(*(ledger.Transfer(pb.TransferRequest(
                transfer_id=f"fund-{card}", debit=pb.AccountRef(operator="op:topup"),
                credit=pb.AccountRef(holder=pb.HolderAccountRef(
                    card_number=card, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=10**9),
                metadata=metadata("CARD_AGENCY", "demo")) for card in cards[i:i + 64]))


async def debits(address: str, cards: list[str], seconds: float, streams: int,
                 tag: str = "debit") -> float:
    """Durable debits/s: AuthorizeStream, 100 debits per message, 4 messages in flight per
    stream; only approved debits (money moved, audited) count; request ids start with `tag`
    (a new one for each run on the same server, or its debits are replays). The messages are
    made before the clock starts, so the client's protobuf work is not on the 2 cores during
    the run."""
    per_stream = int(seconds * 60_000 / 100 / streams) + 8
    batches = [[pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
        request_id=f"{tag}-{s}-{b}-{i}", card_number=cards[(b * 100 + i) % len(cards)],
        channel=pb.CHANNEL_TRANSIT, amount_fen=1, terminal_id="bench") for i in range(100)])
        for b in range(per_stream)] for s in range(streams)]
    done = 0

    async def one(mine):
        nonlocal done
        async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
            call = rpc.AuthorizationStub(channel).AuthorizeStream(
                metadata=metadata("TRANSIT_GATE", "demo"))
            sent = in_flight = 0
            for _ in range(4):
                await call.write(mine[sent])
                sent += 1
                in_flight += 1
            while in_flight:
                reply = await call.read()
                in_flight -= 1
                done += sum(r.decision == pb.DECISION_APPROVED for r in reply.responses)
                if time.perf_counter() < deadline and sent < len(mine):
                    await call.write(mine[sent])
                    sent += 1
                    in_flight += 1
            await call.done_writing()
    t = time.perf_counter()
    deadline = t + seconds
    await asyncio.gather(*(one(mine) for mine in batches))
    return done / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--debit-seconds", type=float, default=5)
    p.add_argument("--streams", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # issue 28: the server has a signing key; watchers unsigned, then signed, side by side
        key_file = os.path.join(tmp, "signing.toml")
        subprocess.run([sys.executable, "-m", "yikatong", "signing", "new", "--key-file",
                        key_file], check=True, capture_output=True)
        server = ServerProcess(tmp, "--demo", "--workers", str(args.workers),
                               "--signing-key-file", key_file, clients=False)
        runs = {}
        try:
            cards = card_numbers(server.data_dir)
            active = [c for c in cards if c.startswith("31")][:500]
            for signed in (False, True):
                env = lmdb.open(os.path.join(server.data_dir, "lmdb"), readonly=True,
                                max_dbs=32)
                with env.begin() as txn, txn.cursor(db=env.open_db(b"changes", txn=txn,
                                                                   create=False)) as cur:
                    head = int.from_bytes(cur.key(), "big") if cur.last() else 0
                env.close()
                runs[signed] = asyncio.run(feed(server.address, active, head, args.watchers,
                                                args.writes, args.interval, signed))
            asyncio.run(fund(server.address, active))
            rate = asyncio.run(debits(server.address, active, args.debit_seconds, args.streams))
        finally:
            server.stop()
    print(f"# change feed, --workers {args.workers}, {args.watchers} watchers, {args.writes} "
          f"top-ups {args.interval * 1000:.0f} ms apart; {os.cpu_count()} cores shared by "
          f"server and client; Python {platform.python_version()}")
    print("| measure | p50 ms | p99 ms | max ms | samples |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for signed, (delays, latency) in runs.items():
        ms = [d * 1000 for d in delays]
        lat = [d * 1000 for d in latency]
        said = "signed (Ed25519 per event, per watcher)" if signed else "unsigned"
        print(f"| {said}: write sent -> event at a watcher (upper bound of commit -> "
              f"delivery) | {percentile(ms, .5):.1f} | {percentile(ms, .99):.1f} | "
              f"{max(ms):.1f} | {len(ms):,} |")
        print(f"| {said}: write sent -> write answered (durable) | "
              f"{percentile(lat, .5):.1f} | {percentile(lat, .99):.1f} | {max(lat):.1f} | "
              f"{len(lat):,} |")
    print(f"\n| durable debits/s through AuthorizeStream (100 per message, {args.streams} "
          f"streams x 4 in flight, feed and audit trail on) | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

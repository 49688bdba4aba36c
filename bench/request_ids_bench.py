"""Durable debits/s in the writer by the shape of the callers' request ids, side by side in one
run: a gate's own counter (sequential), time-ordered ids (a millisecond clock then random
bits, as UUIDv7 and ULID are), and random ones (UUIDv4). A request id keys two B-trees (the
transfer and the remembered answer), so a random one lands on a random leaf page of each: a
commit group then writes a page per debit per tree, where ordered ids fill a few pages at the
right-hand edge. Each run: a store of --holders funded purses that has seen --before fares
of the same shape, then --debits more, timed; 100 fares to a command as AuthorizeStream
hands them to the writer (the wire path, fastpath money_wire; ledger_bench's run), 20
commands in flight.
Interleaved, median of --repeat.

    .venv/bin/python bench/request_ids_bench.py [--debits 100000] [--before 200000]
"""
import argparse
import collections
import random
import statistics
import sys
import tempfile
import uuid

from ledger_bench import run, setup

from yikatong import config
from yikatong.v1 import yikatong_pb2 as pb


def request_ids(shape: str, n: int, rng: random.Random) -> list[str]:
    if shape == "sequential":
        return [f"gate-7-{i:012d}" for i in range(n)]
    if shape == "time-ordered":  # 50 fares a millisecond, then 64 random bits
        return [f"{1_790_000_000_000 + i // 50:012x}-{rng.getrandbits(64):016x}"
                for i in range(n)]
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def timed(store, rids: list[str], holders: int, rng: random.Random) -> float:
    """Seconds to debit one fare for each request id (ledger_bench.run: 100 a command as
    wire bytes, 20 commands in flight)."""
    requests = [pb.AuthorizeRequest(request_id=r, card_number=f"31{rng.randint(1, holders):010d}",
                                    channel=pb.CHANNEL_TRANSIT, amount_fen=1) for r in rids]
    wire = [pb.AuthorizeBatchRequest(requests=requests[i:i + 100]).SerializeToString()
            for i in range(0, len(requests), 100)]
    return run(store, requests, 2_000, 100, wire)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--debits", type=int, default=100_000)
    p.add_argument("--before", type=int, default=200_000)
    p.add_argument("--holders", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(5)
    rates = collections.defaultdict(list)
    for _ in range(args.repeat):
        for shape in ("sequential", "time-ordered", "random (UUIDv4)"):
            with tempfile.TemporaryDirectory() as tmp:
                store = setup(tmp, args.holders, config.writer_group_max)
                ids = request_ids(shape, args.before + args.debits, rng)
                timed(store, ids[:args.before], args.holders, rng)
                rates[shape].append(
                    args.debits / timed(store, ids[args.before:], args.holders, rng))
                with store.read() as txn:  # every one landed
                    assert txn.stat(store.dbs.requests)["entries"] == args.before + args.debits
                store.close()
    print(f"# durable debits/s in the writer by request id shape ({args.debits:,} after "
          f"{args.before:,}, {args.holders:,} holders, 100 a command), median of {args.repeat}")
    print("| request ids | debits/s | runs | against sequential |")
    print("| --- | ---: | --- | ---: |")
    base = statistics.median(rates["sequential"])
    for shape, values in rates.items():
        median = statistics.median(values)
        print(f"| {shape} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | "
              f"{median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

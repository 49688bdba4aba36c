"""In-process fast-path throughput: Cython vs pure Python, side by side in one run.

Two measurements per implementation, each the median of --repeat runs:
  decide      the decision alone, on record bytes already in memory;
  lmdb+decide the real read path of Authorize: txn.get() from LMDB, then the decision
              (one read transaction per batch of --batch requests, as AuthorizeBatch does).
The data set is --cards card records in a fresh LMDB store, in a realistic mix of states.

    .venv/bin/python bench/fastpath_bench.py [--cards 100000] [--requests 200000]
"""
import argparse
import platform
import random
import statistics
import sys
import tempfile
import time

from yikatong import config
from yikatong.fastpath import _authorize_c, _authorize_py
from yikatong.model import Card, Channel, Flag, Pack, State
from yikatong.storage.lmdb_store import Store

NOW = 1_790_000_000


def build(store: Store, n: int, rng: random.Random) -> list[bytes]:
    states = [State.ACTIVE] * 92 + [State.TEMP_LOSS, State.LOST, State.SUPERSEDED,
                                    State.SUPERSEDED, State.SUPERSEDED, State.ISSUED,
                                    State.CANCELLED, State.APPLIED]
    keys = []

    def fill(start, stop):
        def command(book):
            for i in range(start, stop):
                number = f"31{i:010d}"
                book.put_card(Card(
                    number, rng.choice((Pack.SH, Pack.SH, Pack.GZ, Pack.BJ, Pack.RC)),
                    rng.choice(states),
                    flags=rng.choice((Flag.TRANSIT, Flag.TRANSIT | Flag.FINANCIAL_OPEN, 0)),
                    temp_loss_until=NOW + rng.randint(-2 * 86400, 5 * 86400),
                    generation=rng.choice((2,) * 50 + (1,))), NOW)
                keys.append(number.encode())
        return command

    for start in range(0, n, 50_000):
        store.write(fill(start, min(n, start + 50_000)))
    return keys


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cards", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp, map_size=4 * 1024**3)
        keys = build(store, args.cards, rng)
        requests = [(rng.choice(keys) if rng.random() < 0.99 else b"3199999999999",
                     rng.randint(Channel.TRANSIT, Channel.STATUS))
                    for _ in range(args.requests)]
        with store.read() as txn:
            in_memory = [(txn.get(k, db=store.dbs.cards), ch) for k, ch in requests]
        cards_db = store.dbs.cards
        results = {}
        for impl in (_authorize_py, _authorize_c):
            policy = impl.Policy(config.generation_retired_at)

            def decide_only(decide=impl.decide, policy=policy):
                for rec, ch in in_memory:
                    decide(policy, rec, ch, NOW, 0)

            def lmdb_decide(decide=impl.decide, policy=policy):
                for i in range(0, len(requests), args.batch):
                    with store.read() as txn:
                        get = txn.get
                        for key, ch in requests[i:i + args.batch]:
                            decide(policy, get(key, db=cards_db), ch, NOW, 0)

            name = impl.__name__.rsplit(".", 1)[1]
            for label, fn in (("decide", decide_only), ("lmdb+decide", lmdb_decide)):
                secs = statistics.median(timed(fn) for _ in range(args.repeat))
                results[(name, label)] = args.requests / secs
        store.close()
    print(f"# fast path, {args.cards:,} cards in LMDB, {args.requests:,} requests, median of "
          f"{args.repeat}; Python {platform.python_version()}, {platform.machine()}, one core")
    print("| measurement | pure Python (decisions/s) | Cython (decisions/s) | Cython / Python |")
    print("| --- | ---: | ---: | ---: |")
    for label in ("decide", "lmdb+decide"):
        py, c = results[("_authorize_py", label)], results[("_authorize_c", label)]
        print(f"| {label} | {py:,.0f} | {c:,.0f} | {c / py:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

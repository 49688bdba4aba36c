"""Growth: LMDB-backed decisions per second (Cython fast path, status checks on random active
cards) and bytes on disk per card, at 10k, 100k and 1M holders made by bench/gen_data.py.
Bytes per card count everything in the store (the card record, its holder's three funded
accounts, the B+tree pages) divided by the number of cards.

    .venv/bin/python bench/growth_bench.py [--sizes 10000,100000,1000000] [--repeat 3]
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import gen_data

from yikatong import config
from yikatong.fastpath import _authorize_c
from yikatong.model import Channel
from yikatong.storage.lmdb_store import Store

REQUESTS = 200_000


def measure(data_dir: str, rng: random.Random, repeat: int) -> tuple[float, int]:
    with open(os.path.join(data_dir, "cards-ok.txt")) as f:
        ok = f.read().split()
    keys = [rng.choice(ok).encode() for _ in range(REQUESTS)]
    store = Store(data_dir)
    policy = _authorize_c.Policy(config.generation_retired_at)
    decide, db, now = _authorize_c.decide, store.dbs.cards, int(time.time())
    status = int(Channel.STATUS)  # a plain int in the hot loop, as the server passes

    def run():
        t = time.perf_counter()
        for i in range(0, REQUESTS, 100):
            with store.read() as txn:
                get = txn.get
                for k in keys[i:i + 100]:
                    decide(policy, get(k, db=db), status, now, 0)
        return REQUESTS / (time.perf_counter() - t)

    rate = statistics.median(run() for _ in range(repeat))
    info, stat = store.env.info(), store.env.stat()
    with store.read() as txn:
        cards = txn.stat(db)["entries"]
    used = (info["last_pgno"] + 1) * stat["psize"]
    store.close()
    return rate, used // cards


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(11)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            made = gen_data.generate(tmp, n)
            rate, per_card = measure(tmp, rng, args.repeat)
            rows.append((n, made["cards"], made["seconds"], rate, per_card))
    base = rows[0][3]
    print(f"# growth: LMDB-backed status decisions (Cython, one core, 100 per read txn), "
          f"median of {args.repeat}")
    print("| holders | cards | generate s | decisions/s | vs smallest | bytes on disk per card |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, cards, secs, rate, per_card in rows:
        print(f"| {n:,} | {cards:,} | {secs:.1f} | {rate:,.0f} | {rate / base:.2f}x | {per_card} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

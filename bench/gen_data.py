"""Fill a data dir with N holders and their cards for benchmarks and load tests.

Bulk: records are written straight into LMDB in write transactions of --chunk holders (no
lifecycle call per card, no change event per card), in a realistic mix of states across
SH, GZ, BJ and RC: 0.5% temporary loss (frozen), 1% lost, 5% superseded originals (each
with its active replacement), 0.5% issued but not activated, 0.5% cancelled, the rest
active. Every holder's MEDICAL, TRANSIT and BENEFIT accounts are funded from `op:topup`.

Writes into the data dir, beside the store:
  cards-ok.txt   active cards with the transit function (what gates mostly see)
  cards-hot.txt  hot-listed cards: frozen, lost, superseded, cancelled
  clients.toml   one client per role, token "bench-<role>" (bench only)

    .venv/bin/python bench/gen_data.py DATA_DIR [--holders 1000000]
"""
import argparse
import hashlib
import os
import random
import struct
import sys
import time

from yikatong.server.clients import ROLES
from yikatong.storage import records as r
from yikatong.storage.lmdb_store import Store
from yikatong.storage.records import CardRecord
from yikatong import config, ledger

NOW = int(time.time())
FUNDING = {r.KIND_MEDICAL: 500_000, r.KIND_TRANSIT: 100_000, r.KIND_BENEFIT: 200_000}


def token(role: str) -> str:
    return "bench-" + role.lower().replace("_", "-")


def generate(data_dir: str, holders: int, chunk: int = 50_000, seed: int = 1) -> dict:
    rng = random.Random(seed)
    store = Store(data_dir)
    with store.read() as txn:
        if txn.stat(store.dbs.cards)["entries"]:
            store.close()
            raise SystemExit(f"{data_dir} already holds cards; give an empty data dir")
    ok, hot = [], []
    seq = 0
    topup = r.operator_account_key("op:topup")

    def fill(start: int, stop: int):
        def command(book):
            nonlocal seq
            put = book.txn.put
            cards_db = book.dbs.cards
            funding = []
            for h in range(start, stop):
                pack = rng.choices((r.PACK_SH, r.PACK_GZ, r.PACK_BJ, r.PACK_RC), (40, 25, 20, 15))[0]
                roll = rng.random()
                seq += 1
                rec = CardRecord(f"{config.pack_card_prefix[pack]}{seq:010d}", pack, r.ACTIVE,
                                 holder_id=h, applied_at=NOW - 400 * 86400,
                                 issued_at=NOW - 390 * 86400)
                if pack != r.PACK_RC:
                    rec.flags = r.FLAG_TRANSIT | (r.FLAG_FINANCIAL_OPEN if rng.random() < 0.6 else 0)
                else:
                    rec.valid_until = NOW + rng.randint(1, 365) * 86400
                if roll < 0.005 and pack == r.PACK_SH:
                    rec.state, rec.temp_loss_at = r.TEMP_LOSS, NOW - rng.randint(0, 4 * 86400)
                elif roll < 0.015:
                    rec.state, rec.loss_reported_at = r.LOST, NOW - 86400
                elif roll < 0.065:  # superseded original, and its active replacement
                    seq += 1
                    new = CardRecord(f"{config.pack_card_prefix[pack]}{seq:010d}", pack, r.ACTIVE,
                                     flags=rec.flags, holder_id=h, replaces=rec.card_number,
                                     valid_until=rec.valid_until, issued_at=NOW - 86400)
                    rec.state, rec.replaced_by = r.SUPERSEDED, new.card_number
                    rec.set(r.FLAG_REPLACEMENT_APPLIED)
                    put(new.card_number.encode(), new.encode(), db=cards_db)
                    if new.has(r.FLAG_TRANSIT):
                        ok.append(new.card_number)
                elif roll < 0.070:
                    rec.state = r.ISSUED
                elif roll < 0.075:
                    rec.state = r.CANCELLED
                put(rec.card_number.encode(), rec.encode(), db=cards_db)
                if rec.state == r.ACTIVE and rec.has(r.FLAG_TRANSIT):
                    ok.append(rec.card_number)
                elif rec.state in (r.TEMP_LOSS, r.LOST, r.SUPERSEDED, r.CANCELLED):
                    hot.append(rec.card_number)
                funding += [(r.holder_account_key(h, k), fen) for k, fen in FUNDING.items()]
            ledger.open_balances(book, topup, funding)
            put(b"card_number", struct.pack(">Q", seq), db=book.dbs.meta)
            put(b"holder_id", struct.pack(">Q", stop - 1), db=book.dbs.meta)
        return command

    t = time.perf_counter()
    for start in range(1, holders + 1, chunk):
        store.write(fill(start, min(holders + 1, start + chunk)))
    seconds = time.perf_counter() - t
    store.close()
    for name, numbers in (("cards-ok.txt", ok), ("cards-hot.txt", hot)):
        with open(os.path.join(data_dir, name), "w") as f:
            f.write("\n".join(numbers) + "\n")
    with open(os.path.join(data_dir, "clients.toml"), "w") as f:
        for role in ROLES:
            f.write(f'[[client]]\nid = "bench-{role.lower()}"\nrole = "{role}"\n'
                    f'token_sha256 = "{hashlib.sha256(token(role).encode()).hexdigest()}"\n\n')
    return {"holders": holders, "cards": seq, "ok": len(ok), "hot": len(hot), "seconds": seconds,
            "bytes": os.path.getsize(os.path.join(data_dir, "lmdb", "data.mdb"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--holders", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=50_000, help="holders per write transaction")
    args = p.parse_args()
    out = generate(args.data_dir, args.holders, args.chunk)
    print(f"{out['holders']:,} holders, {out['cards']:,} cards ({out['ok']:,} ok, {out['hot']:,} "
          f"hot-listed) in {out['seconds']:.1f} s; data.mdb {out['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

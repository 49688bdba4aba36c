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
import os
import random
import sys
import time

from yikatong import config, ledger
from yikatong.clock import end_of_days
from yikatong.model import (
    AccountKind,
    Card,
    Flag,
    Pack,
    State,
    holder_account_key,
    operator_account_key,
)
from yikatong.server.harness import write_clients
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store

NOW = int(time.time())
FUNDING = {AccountKind.MEDICAL: 500_000, AccountKind.TRANSIT: 100_000,
           AccountKind.BENEFIT: 200_000}
TOKEN_PREFIX = "bench"  # clients.toml: token "bench-<role>", e.g. bench-transit-gate


def generate(data_dir: str, holders: int, chunk: int = 50_000, seed: int = 1) -> dict:
    rng = random.Random(seed)
    store = Store(data_dir)
    with store.read() as txn:
        if store.book(txn).card_count():
            store.close()
            raise SystemExit(f"{data_dir} already holds cards; give an empty data dir")
    ok, hot = [], []
    seq = 0
    topup = operator_account_key("op:topup")
    packs = (Pack.SH, Pack.GZ, Pack.BJ, Pack.RC)

    def fill(start: int, stop: int):
        def command(book):
            # Bulk: raw puts of encoded records, no change event per card (the lifecycle
            # functions would write one each); the counters are set at the end.
            nonlocal seq
            put = book.txn.put
            cards_db = book.dbs.cards
            funding = []
            for h in range(start, stop):
                pack = rng.choices(packs, (40, 25, 20, 15))[0]
                roll = rng.random()
                seq += 1
                rec = Card(f"{config.pack_card_prefix[pack]}{seq:010d}", pack, State.ACTIVE,
                           holder_id=h, applied_at=NOW - 400 * 86400,
                           issued_at=NOW - 390 * 86400)
                if pack != Pack.RC:
                    rec.flags = Flag.TRANSIT | (Flag.FINANCIAL_OPEN if rng.random() < 0.6 else 0)
                else:
                    rec.valid_until = NOW + rng.randint(1, 365) * 86400
                if roll < 0.005 and pack == Pack.SH:
                    rec.state = State.TEMP_LOSS
                    rec.temp_loss_until = end_of_days(NOW - rng.randint(0, 4 * 86400), 5)
                elif roll < 0.015:
                    rec.state, rec.loss_reported_at = State.LOST, NOW - 86400
                elif roll < 0.065:  # superseded original, and its active replacement
                    seq += 1
                    new = Card(f"{config.pack_card_prefix[pack]}{seq:010d}", pack, State.ACTIVE,
                               flags=rec.flags, holder_id=h, replaces=rec.card_number,
                               valid_until=rec.valid_until, issued_at=NOW - 86400)
                    rec.state, rec.replaced_by = State.SUPERSEDED, new.card_number
                    rec.set(Flag.REPLACEMENT_APPLIED)
                    put(new.card_number.encode(), records.encode_card(new), db=cards_db)
                    if new.has(Flag.TRANSIT):
                        ok.append(new.card_number)
                elif roll < 0.070:
                    rec.state = State.ISSUED
                elif roll < 0.075:
                    rec.state = State.CANCELLED
                put(rec.card_number.encode(), records.encode_card(rec), db=cards_db)
                if rec.state == State.ACTIVE and rec.has(Flag.TRANSIT):
                    ok.append(rec.card_number)
                elif rec.state in (State.TEMP_LOSS, State.LOST, State.SUPERSEDED,
                                   State.CANCELLED):
                    hot.append(rec.card_number)
                funding += [(holder_account_key(h, k), fen) for k, fen in FUNDING.items()]
            ledger.open_balances(book, topup, funding)
            book.put_meta(b"card_number", seq.to_bytes(8, "big"))
            book.put_meta(b"holder_id", (stop - 1).to_bytes(8, "big"))
        return command

    t = time.perf_counter()
    for start in range(1, holders + 1, chunk):
        store.write(fill(start, min(holders + 1, start + chunk)))
    seconds = time.perf_counter() - t
    store.close()
    for name, numbers in (("cards-ok.txt", ok), ("cards-hot.txt", hot)):
        with open(os.path.join(data_dir, name), "w") as f:
            f.write("\n".join(numbers) + "\n")
    write_clients(os.path.join(data_dir, "clients.toml"), TOKEN_PREFIX)
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

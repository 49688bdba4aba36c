"""Storage, side by side in one run: the same two operations on our LMDB store and on SQLite
in WAL mode (synchronous=FULL, so a commit is durable as LMDB's sync=True is).

  status look-ups/s  read one card by number and decode it (LMDB: one read transaction per
                     100 look-ups; SQLite: one SELECT by primary key each, one transaction per 100)
  durable debits/s   debit a holder account and credit an operator, record the transfer
                     (LMDB: the ledger's own `create` through the group-committing writer,
                     100 debits per commit; SQLite: UPDATE, UPDATE, INSERT, 100 per commit)

PostgreSQL is not measured here yet (see bench/README.md).

    .venv/bin/python bench/storage_bench.py [--cards 100000] [--debits 20000] [--repeat 3]
"""
import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time

from storage import records as r
from storage.lmdb_store import Store
from storage.records import CardRecord
from yikatong import ledger

NOW = 1_790_000_000
PER_COMMIT = 100


def lmdb_setup(path: str, n: int) -> Store:
    store = Store(path, map_size=4 * 1024**3)
    topup = r.operator_account_key("op:topup")

    def fill(start, stop):
        def command(book):
            for h in range(start, stop):
                book.txn.put(f"31{h:010d}".encode(), CardRecord(
                    f"31{h:010d}", r.PACK_SH, r.ACTIVE, flags=1, holder_id=h).encode(),
                    db=book.dbs.cards)
            ledger.open_balances(book, topup, [(r.holder_account_key(h, r.KIND_TRANSIT), 10**9)
                                               for h in range(start, stop)])
        return command
    for start in range(1, n + 1, 50_000):
        store.write(fill(start, min(n + 1, start + 50_000)))
    return store


def sqlite_setup(path: str, n: int) -> sqlite3.Connection:
    db = sqlite3.connect(os.path.join(path, "bench.sqlite"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE cards (number TEXT PRIMARY KEY, pack INT, state INT, flags INT, "
               "holder_id INT, temp_loss_at INT, valid_until INT) WITHOUT ROWID")
    db.execute("CREATE TABLE accounts (key BLOB PRIMARY KEY, debits INT, credits INT)")
    db.execute("CREATE TABLE transfers (id TEXT PRIMARY KEY, debit BLOB, credit BLOB, amount INT)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO cards VALUES (?, 1, 5, 1, ?, 0, 0)",
                   ((f"31{h:010d}", h) for h in range(1, n + 1)))
    db.executemany("INSERT INTO accounts VALUES (?, 0, 1000000000)",
                   ((r.holder_account_key(h, r.KIND_TRANSIT),) for h in range(1, n + 1)))
    db.execute("INSERT INTO accounts VALUES (?, 0, 0)", (r.operator_account_key("op:metro"),))
    db.execute("COMMIT")
    return db


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cards", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=200_000)
    p.add_argument("--debits", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(5)
    numbers = [f"31{rng.randint(1, args.cards):010d}" for _ in range(args.lookups)]
    holders = [rng.randint(1, args.cards) for _ in range(args.debits)]
    metro = r.operator_account_key("op:metro")
    rates = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        store = lmdb_setup(os.path.join(tmp, "lmdb"), args.cards)
        db = sqlite_setup(tmp, args.cards)

        def lmdb_lookups():
            for i in range(0, len(numbers), PER_COMMIT):
                with store.read() as txn:
                    book = store.book(txn)
                    for n in numbers[i:i + PER_COMMIT]:
                        book.card(n)

        def sqlite_lookups():
            for i in range(0, len(numbers), PER_COMMIT):
                db.execute("BEGIN")
                for n in numbers[i:i + PER_COMMIT]:
                    row = db.execute("SELECT pack, state, flags, holder_id, temp_loss_at, "
                                     "valid_until FROM cards WHERE number = ?", (n,)).fetchone()
                    CardRecord(n, row[0], row[1], row[2], holder_id=row[3], temp_loss_at=row[4],
                               valid_until=row[5])
                db.execute("COMMIT")

        run = [0]

        def lmdb_debits():
            run[0] += 1
            futures = []
            for i in range(0, len(holders), PER_COMMIT):
                def command(book, chunk=holders[i:i + PER_COMMIT], base=i):
                    for j, h in enumerate(chunk):
                        ledger.create(book, NOW, f"d{run[0]}-{base + j}",
                                      r.holder_account_key(h, r.KIND_TRANSIT), metro, 200)
                futures.append(store.submit(command))
            for f in futures:
                f.result()

        def sqlite_debits():
            run[0] += 1
            for i in range(0, len(holders), PER_COMMIT):
                db.execute("BEGIN")
                for j, h in enumerate(holders[i:i + PER_COMMIT]):
                    key = r.holder_account_key(h, r.KIND_TRANSIT)
                    debits, credits = db.execute("SELECT debits, credits FROM accounts WHERE key "
                                                 "= ?", (key,)).fetchone()
                    assert credits - debits >= 200
                    db.execute("UPDATE accounts SET debits = debits + 200 WHERE key = ?", (key,))
                    db.execute("UPDATE accounts SET credits = credits + 200 WHERE key = ?",
                               (metro,))
                    db.execute("INSERT INTO transfers VALUES (?, ?, ?, 200)",
                               (f"d{run[0]}-{i + j}", key, metro))
                db.execute("COMMIT")

        for name, fn, n in (("lmdb lookups", lmdb_lookups, args.lookups),
                            ("sqlite lookups", sqlite_lookups, args.lookups),
                            ("lmdb debits", lmdb_debits, args.debits),
                            ("sqlite debits", sqlite_debits, args.debits)):
            rates[name] = n / statistics.median(timed(fn) for _ in range(args.repeat))
        store.close()
        db.close()
    print(f"# storage, {args.cards:,} cards, median of {args.repeat}; {PER_COMMIT} operations "
          f"per transaction; SQLite {sqlite3.sqlite_version} WAL synchronous=FULL, LMDB sync=True")
    print("| operation | LMDB (ours) /s | SQLite WAL /s | LMDB / SQLite |")
    print("| --- | ---: | ---: | ---: |")
    for op in ("lookups", "debits"):
        a, b = rates[f"lmdb {op}"], rates[f"sqlite {op}"]
        label = "status look-ups" if op == "lookups" else "durable debits"
        print(f"| {label} | {a:,.0f} | {b:,.0f} | {a / b:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Storage, side by side in one run: the same two operations on our LMDB store and on SQLite
in WAL mode (synchronous=FULL, so a commit is durable as LMDB's sync=True is).

  status look-ups/s  read one card by number and decode it (LMDB: one read transaction per
                     100 look-ups; SQLite: one SELECT by primary key each, one transaction per 100)
  durable debits/s   debit a holder account and credit an operator, record the transfer
                     (LMDB: the ledger's own `create` through the group-committing writer,
                     100 debits per commit; SQLite: UPDATE, UPDATE, INSERT, 100 per commit)

With --with-postgres, the same on PostgreSQL (fsync=on, synchronous_commit=on), run from a
throw-away cluster in a temporary dir on a unix socket. The server binaries come from the OS
packages (`apt-get install postgresql`, done here when missing) and the driver from PyPI
(`psycopg[binary]`, likewise); neither is ever needed by the tests.

    .venv/bin/python bench/storage_bench.py [--cards 100000] [--debits 20000] [--repeat 3]
                                            [--with-postgres]
"""
import argparse
import contextlib
import glob
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from yikatong import ledger
from yikatong.model import (
    AccountKind,
    Card,
    Flag,
    Pack,
    State,
    holder_account_key,
    operator_account_key,
)
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store

NOW = 1_790_000_000
PER_COMMIT = 100


def lmdb_setup(path: str, n: int) -> Store:
    store = Store(path, map_size=4 * 1024**3)
    topup = operator_account_key("op:topup")

    def fill(start, stop):
        def command(book):
            for h in range(start, stop):
                book.txn.put(f"31{h:010d}".encode(), records.encode_card(Card(
                    f"31{h:010d}", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=h)),
                    db=book.dbs.cards)
            ledger.open_balances(book, topup, [(holder_account_key(h, AccountKind.TRANSIT), 10**9)
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
               "holder_id INT, temp_loss_until INT, valid_until INT) WITHOUT ROWID")
    db.execute("CREATE TABLE accounts (key BLOB PRIMARY KEY, debits INT, credits INT)")
    db.execute("CREATE TABLE transfers (id TEXT PRIMARY KEY, debit BLOB, credit BLOB, amount INT)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO cards VALUES (?, 1, 5, 1, ?, 0, 0)",
                   ((f"31{h:010d}", h) for h in range(1, n + 1)))
    db.executemany("INSERT INTO accounts VALUES (?, 0, 1000000000)",
                   ((holder_account_key(h, AccountKind.TRANSIT),) for h in range(1, n + 1)))
    db.execute("INSERT INTO accounts VALUES (?, 0, 0)", (operator_account_key("op:metro"),))
    db.execute("COMMIT")
    return db


def _pg_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        print("storage_bench: installing PostgreSQL from the OS packages", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1])


@contextlib.contextmanager
def postgres(tmp: str):
    """A throw-away cluster on a unix socket in `tmp`; yields a psycopg connection."""
    try:
        import psycopg
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "psycopg[binary]==3.3.9"],
                       check=True)
        import psycopg
    bin_dir = _pg_bin()
    data, sock = os.path.join(tmp, "pg"), os.path.join(tmp, "pgsock")
    os.makedirs(sock)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:  # initdb refuses root: the cluster belongs to the postgres user
        shutil.chown(tmp, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run([*as_pg, f"{bin_dir}/initdb", "-D", data, "-U", "bench", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_pg, f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l",
                    os.path.join(tmp, "pg.log"), "-o",
                    f"-k {sock} -c listen_addresses='' -c fsync=on -c synchronous_commit=on",
                    "start"], check=True, capture_output=True)
    try:
        with psycopg.connect(host=sock, user="bench", dbname="postgres",
                             autocommit=True) as conn:
            yield conn
    finally:
        subprocess.run([*as_pg, f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def pg_setup(conn, n: int) -> None:
    conn.execute("CREATE TABLE cards (number TEXT PRIMARY KEY, pack INT, state INT, flags INT, "
                 "holder_id BIGINT, temp_loss_until BIGINT, valid_until BIGINT)")
    conn.execute("CREATE TABLE accounts (key BYTEA PRIMARY KEY, debits BIGINT, credits BIGINT)")
    conn.execute("CREATE TABLE transfers (id TEXT PRIMARY KEY, debit BYTEA, credit BYTEA, "
                 "amount BIGINT)")
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY cards FROM STDIN") as copy:
            for h in range(1, n + 1):
                copy.write_row((f"31{h:010d}", 1, 5, 1, h, 0, 0))
        with cur.copy("COPY accounts FROM STDIN") as copy:
            for h in range(1, n + 1):
                copy.write_row((holder_account_key(h, AccountKind.TRANSIT), 0, 10**9))
            copy.write_row((operator_account_key("op:metro"), 0, 0))
    conn.execute("ANALYZE")


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
    p.add_argument("--with-postgres", action="store_true")
    args = p.parse_args()
    rng = random.Random(5)
    numbers = [f"31{rng.randint(1, args.cards):010d}" for _ in range(args.lookups)]
    holders = [rng.randint(1, args.cards) for _ in range(args.debits)]
    metro = operator_account_key("op:metro")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
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
                    row = db.execute("SELECT pack, state, flags, holder_id, temp_loss_until, "
                                     "valid_until FROM cards WHERE number = ?", (n,)).fetchone()
                    Card(n, row[0], row[1], row[2], holder_id=row[3], temp_loss_until=row[4],
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
                                      holder_account_key(h, AccountKind.TRANSIT), metro, 200)
                futures.append(store.submit(command))
            for f in futures:
                f.result()

        def sqlite_debits():
            run[0] += 1
            for i in range(0, len(holders), PER_COMMIT):
                db.execute("BEGIN")
                for j, h in enumerate(holders[i:i + PER_COMMIT]):
                    key = holder_account_key(h, AccountKind.TRANSIT)
                    debits, credits = db.execute("SELECT debits, credits FROM accounts WHERE key "
                                                 "= ?", (key,)).fetchone()
                    assert credits - debits >= 200
                    db.execute("UPDATE accounts SET debits = debits + 200 WHERE key = ?", (key,))
                    db.execute("UPDATE accounts SET credits = credits + 200 WHERE key = ?",
                               (metro,))
                    db.execute("INSERT INTO transfers VALUES (?, ?, ?, 200)",
                               (f"d{run[0]}-{i + j}", key, metro))
                db.execute("COMMIT")

        work = [("lmdb lookups", lmdb_lookups, args.lookups),
                ("sqlite lookups", sqlite_lookups, args.lookups),
                ("lmdb debits", lmdb_debits, args.debits),
                ("sqlite debits", sqlite_debits, args.debits)]
        with contextlib.ExitStack() as stack:
            if args.with_postgres:
                pg = stack.enter_context(postgres(tempfile.mkdtemp()))
                pg_setup(pg, args.cards)

                def pg_lookups():
                    for i in range(0, len(numbers), PER_COMMIT):
                        with pg.transaction(), pg.cursor() as cur:
                            for n in numbers[i:i + PER_COMMIT]:
                                row = cur.execute(
                                    "SELECT pack, state, flags, holder_id, temp_loss_until, "
                                    "valid_until FROM cards WHERE number = %s", (n,)).fetchone()
                                Card(n, row[0], row[1], row[2], holder_id=row[3],
                                     temp_loss_until=row[4], valid_until=row[5])

                def pg_debits():
                    run[0] += 1
                    for i in range(0, len(holders), PER_COMMIT):
                        with pg.transaction(), pg.cursor() as cur:
                            for j, h in enumerate(holders[i:i + PER_COMMIT]):
                                key = holder_account_key(h, AccountKind.TRANSIT)
                                debits, credits = cur.execute(
                                    "SELECT debits, credits FROM accounts WHERE key = %s "
                                    "FOR UPDATE", (key,)).fetchone()
                                assert credits - debits >= 200
                                cur.execute("UPDATE accounts SET debits = debits + 200 "
                                            "WHERE key = %s", (key,))
                                cur.execute("UPDATE accounts SET credits = credits + 200 "
                                            "WHERE key = %s", (metro,))
                                cur.execute("INSERT INTO transfers VALUES (%s, %s, %s, 200)",
                                            (f"d{run[0]}-{i + j}", key, metro))

                work += [("postgres lookups", pg_lookups, args.lookups),
                         ("postgres debits", pg_debits, args.debits)]
            for name, fn, n in work:
                rates[name] = n / statistics.median(timed(fn) for _ in range(args.repeat))
        store.close()
        db.close()
    pg = "postgres lookups" in rates
    print(f"# storage, {args.cards:,} cards, median of {args.repeat}; {PER_COMMIT} operations "
          f"per transaction; SQLite {sqlite3.sqlite_version} WAL synchronous=FULL, LMDB sync=True"
          + ("; PostgreSQL fsync=on synchronous_commit=on, unix socket" if pg else ""))
    print("| operation | LMDB (ours) /s | SQLite WAL /s | LMDB / SQLite |"
          + (" PostgreSQL /s | LMDB / PostgreSQL |" if pg else ""))
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if pg else ""))
    for op in ("lookups", "debits"):
        a, b = rates[f"lmdb {op}"], rates[f"sqlite {op}"]
        label = "status look-ups" if op == "lookups" else "durable debits"
        extra = (f" {rates[f'postgres {op}']:,.0f} | {a / rates[f'postgres {op}']:.1f}x |"
                 if pg else "")
        print(f"| {label} | {a:,.0f} | {b:,.0f} | {a / b:.1f}x |" + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())

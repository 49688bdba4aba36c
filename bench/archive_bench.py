"""The hot store within and beyond the retention window, and the archive (issue 26, part 3):
bytes per debit, measured on a real server (`python -m yikatong serve --demo --clock manual
--retain-days 1`) on a fresh data dir.

1. The demo data set is loaded and funded, then the clock is moved two days on and the
   periodic job archives all of it (the base: what the debits are measured against).
2. Debits (Authorize with amount_fen, TRANSIT, 1 fen each, AuthorizeStream 100 a message):
   the hot store's growth divided by the approved debits, within the window (each debit's
   transfer, remembered answer and its id's entry, change event and audit event).
3. The clock is moved two days on again; once the periodic job has moved every debit out
   (bounded wait): the hot store's growth over the base per debit, beyond the window (the
   16-byte digest of each archived request id, and what LMDB keeps of the rest), and the
   archive's new segments' bytes per debit.

B-tree bytes: every database's branch, leaf and overflow pages (mdb_stat -a), as
bench/sizing.py counts them; LMDB reuses the pages the move frees before the file grows.

    .venv/bin/python bench/archive_bench.py [--debits 30000]
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time

import lmdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sizing import active_funded, streamed, used  # noqa: E402

from yikatong import config  # noqa: E402
from yikatong.server.harness import ServerProcess, card_numbers, metadata  # noqa: E402
from yikatong.v1 import yikatong_pb2 as pb  # noqa: E402

DAY = 86400


def per_db(data_dir: str) -> dict[str, int]:
    """B-tree bytes of each database."""
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            names = [bytes(k) for k in txn.cursor().iternext(values=False)]
            out = {}
            for name in names:
                s = txn.stat(env.open_db(name, txn=txn, create=False))
                out[name.decode()] = (s["branch_pages"] + s["leaf_pages"]
                                      + s["overflow_pages"]) * psize
            return out
    finally:
        env.close()


def hot_left(data_dir: str) -> int:
    """Remembered answers, change and audit events still hot (the newest change and audit
    event always stay)."""
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    try:
        with env.begin() as txn:
            return sum(txn.stat(env.open_db(name, txn=txn, create=False))["entries"]
                       for name in (b"answers", b"changes", b"audit")) - 2
    finally:
        env.close()


def archive_bytes(data_dir: str) -> tuple[int, int]:
    where = os.path.join(data_dir, "archive")
    names = [n for n in os.listdir(where) if n.endswith(".seg")] if os.path.isdir(where) else []
    return len(names), sum(os.path.getsize(os.path.join(where, n)) for n in names)


def archive_all(server: ServerProcess, timeout: float) -> float:
    """Move the clock two days on; wait (bounded) until no remembered answer, change or
    audit event is left hot but the newest. Returns the seconds it took."""
    server.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=2 * DAY),
                              metadata=metadata("ADMIN", "demo"), timeout=10)
    started = time.monotonic()
    while hot_left(server.data_dir) > 0:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"the archive did not take every record in {timeout:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--debits", type=int, default=30_000, help="debits through AuthorizeStream")
    p.add_argument("--cards", type=int, default=2_000, help="cards the debits are spread over")
    p.add_argument("--per-day", type=int, default=5_000_000, help="debits a day, for the total")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(tmp, "--demo", "--clock", "manual", "--retain-days", "1",
                               clients=False)
        try:
            cards = asyncio.run(active_funded(server.address, card_numbers(server.data_dir),
                                              args.cards))
            archive_all(server, 600)
            base, base_pages, _ = used(server.data_dir)
            base_dbs = per_db(server.data_dir)
            base_segments, base_archive = archive_bytes(server.data_dir)
            approved = asyncio.run(streamed(server.address, cards, args.debits))
            within, within_pages, _ = used(server.data_dir)
            within_dbs = per_db(server.data_dir)
            took = archive_all(server, 600)
            beyond, beyond_pages, _ = used(server.data_dir)
            beyond_dbs = per_db(server.data_dir)
            segments, archived = archive_bytes(server.data_dir)
        finally:
            server.stop()
    rows = (("hot store, within the window", within - base, within_pages - base_pages),
            ("hot store, beyond the window", beyond - base, beyond_pages - base_pages))
    print(f"# archive: {approved:,} debits (AuthorizeStream, 100 a message) over {len(cards):,} "
          f"cards; --retain-days 1, the clock moved 2 days on")
    print("| measure | B-tree bytes | per debit | pages in use, bytes | per debit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, trees, pages in rows:
        print(f"| {name} | {trees:,} | {trees / approved:,.0f} | {pages:,} | "
              f"{pages / approved:,.0f} |")
    for name in sorted(beyond_dbs):
        grew = (within_dbs.get(name, 0) - base_dbs.get(name, 0),
                beyond_dbs[name] - base_dbs.get(name, 0))
        if any(grew):
            print(f"| - {name}: within, beyond | {grew[0]:,} / {grew[1]:,} | "
                  f"{grew[0] / approved:,.0f} / {grew[1] / approved:,.0f} | | |")
    new = archived - base_archive
    print(f"| archive (zstd level {config.archive_zstd_level}, {segments - base_segments} "
          f"segments) | {new:,} | {new / approved:,.0f} | | |")
    print(f"\nmoved in {took:.1f} s ({approved / took:,.0f} debits a second, "
          f"archive_batch_max {config.archive_batch_max:,} of each kind a periodic group); "
          f"{args.per_day:,} debits a day beyond the window: "
          f"{(beyond - base) / approved * args.per_day / 2**20:,.0f} MiB a day hot, "
          f"{new / approved * args.per_day / 2**20:,.0f} MiB a day archived")
    return 0


if __name__ == "__main__":
    sys.exit(main())

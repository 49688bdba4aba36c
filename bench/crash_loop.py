"""Crash loop: SIGKILL the server at random moments under a mixed workload, restart, check.

Several concurrent clients send top-ups (Ledger.Transfer), fares (Authorize TRANSIT with
money) and lifecycle changes (Lock/UnlockApplication), each with a unique id, and one gate
sends fares on an AuthorizeStream (1 to 5 a message, 4 messages in flight: the server works
on them together), while the server is killed with SIGKILL after a random moment. After each kill:
  - the store opens cleanly, in this process, and the ledger's columns sum to zero with no
    holder account negative (ledger.check_invariants);
  - after the restart, every acknowledged request replayed returns its first answer, and the
    replays move nothing (balances before and after are equal): nothing lost, none twice;
  - the audit trail's chain holds, and every acknowledged change has its audit event (each
    card and method has at least as many events as acknowledged changes: an unacknowledged
    change that was applied has one too).
At the end every attempted id is replayed once more (an unacknowledged one is applied now or
was before), and each purse must equal its opening balance plus all top-ups less all fares.

    .venv/bin/python bench/crash_loop.py [--kills 1000] [--seed 1]
"""
import argparse
import collections
import os
import random
import sys
import tempfile
import threading
import time

import grpc

from yikatong import ledger
from yikatong.server.harness import ServerProcess, free_address, metadata, write_clients
from yikatong.storage import records
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

OPENING = 10**9  # fen per purse: fares never decline, so the exact sum is known
START = "2026-11-24T09:00:00+08:00"
TOKENS = "crash"


def md(role):
    return metadata(role, TOKENS)


class Server(ServerProcess):
    """The real server on a manual clock, its invariants checked after every write group."""

    def __init__(self, workdir: str, data_dir: str, clients: str, address: str):
        super().__init__(workdir, "--clients", clients, "--clock", "manual", "--clock-start",
                         START, clients=False, data_dir=data_dir, address=address,
                         env={"YIKATONG_CHECK_INVARIANTS": "1"})

    def call(self, op):
        """op = (method name, request, role) -> response (a fare first sent on a stream is
        asked again alone: the same request id and fields, the same answer)"""
        method, request, role = op
        method = "Authorize" if method == "AuthorizeStream" else method
        stub = {"Transfer": self.ledger, "Authorize": self.authorization,
                "CorrectHolder": rpc.HoldersStub(self.channel)}.get(method, self.lifecycle)
        return getattr(stub, method)(request, metadata=md(role), timeout=10)

    def purses(self, cards):
        out = {}
        for c in cards:
            b = self.ledger.GetBalances(pb.GetBalancesRequest(card_number=c),
                                        metadata=md("ONLINE_PLATFORM"), timeout=10).balances
            out[c] = {x.kind: (x.posted_fen, x.pending_fen) for x in b}
        return out


def ssn(i: int) -> str:
    from yikatong.cards import ssn_check_digit
    first17 = f"31010119800101{i:03d}"
    return first17 + ssn_check_digit(first17)


def setup(server: Server, n_cards: int) -> list[str]:
    cards = []
    for i in range(n_cards):
        # Guangzhou cards: application locks are a bank service there (GZ-6), not in Shanghai
        h = pb.Holder(ssn=ssn(i), name="测试",
                      birth_date="1980-01-01", insured=True, entitled_public_services=True,
                      photo_sha256="ab" * 32, phone="13900000000", occupation="clerk",
                      address="广州市越秀区府前路1号")
        c = server.lifecycle.Apply(pb.ApplyRequest(request_id=f"apply-{i}", pack=pb.PACK_GZ,
                                                   holder=h, with_transit=True,
                                                   service_bank="ICBC"),
                                   metadata=md("BANK_OUTLET"))  # GZ-7
        for step, request in (("Verify", pb.VerifyRequest(request_id=f"verify-{i}",
                                                          card_number=c.card_number,
                                                          approved=True)),
                              ("Issue", pb.IssueRequest(request_id=f"issue-{i}",
                                                        card_number=c.card_number))):
            getattr(server.lifecycle, step)(request, metadata=md("CARD_AGENCY"))
        server.lifecycle.Activate(pb.ActivateRequest(request_id=f"act-{i}",
                                                     card_number=c.card_number),
                                  metadata=md("ONLINE_PLATFORM"))
        server.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"open-{i}", debit=pb.AccountRef(operator="op:topup"),
            credit=pb.AccountRef(holder=pb.HolderAccountRef(card_number=c.card_number,
                                                            kind=pb.ACCOUNT_KIND_TRANSIT)),
            amount_fen=OPENING), metadata=md("CARD_AGENCY"))
        cards.append(c.card_number)
    return cards


def make_op(rng: random.Random, cards: list[str], uid: str):
    c = rng.choice(cards)
    roll = rng.random()
    if roll < 0.4:
        return ("Transfer", pb.TransferRequest(
            transfer_id=uid, debit=pb.AccountRef(operator="op:topup"),
            amount_fen=rng.randint(1, 999), credit=pb.AccountRef(holder=pb.HolderAccountRef(
                card_number=c, kind=pb.ACCOUNT_KIND_TRANSIT))),
            "CARD_AGENCY")
    if roll < 0.85:
        return ("Authorize", pb.AuthorizeRequest(request_id=uid, card_number=c,
                                                 channel=pb.CHANNEL_TRANSIT,
                                                 amount_fen=rng.randint(1, 999)), "TRANSIT_GATE")
    if roll < 0.9:  # personal information sealed (issue 25): the holder, its history, the answer
        return ("CorrectHolder", pb.CorrectHolderRequest(
            request_id=uid, holder=pb.Holder(ssn=ssn(cards.index(c)),
                                             phone=f"139{rng.randint(0, 10**8 - 1):08d}"),
            reason="crash loop"), "CARD_AGENCY")
    method = rng.choice(("LockApplication", "UnlockApplication"))
    return (method, getattr(pb, method + "Request")(request_id=uid, card_number=c,
                                                    channel=pb.CHANNEL_SERVICE), "BANK_OUTLET")


AUDITED_AS = {"Transfer": "Ledger.Transfer", "Authorize": "Authorization.Authorize",
              "AuthorizeStream": "Authorization.AuthorizeStream",
              "LockApplication": "Lifecycle.LockApplication",
              "UnlockApplication": "Lifecycle.UnlockApplication",
              "CorrectHolder": "Holders.CorrectHolder"}


def check_store(data_dir: str, attempted: dict, acked: dict) -> int:
    """The ledger's invariants; then the number of acknowledged changes without their audit
    event (0), after checking the chain."""
    store = Store(data_dir)
    try:
        store.write(ledger.check_invariants)
        with store.read() as txn:
            book = store.book(txn)
            ok, _, bad, problem = book.verify_audit()
            assert ok, f"audit chain broken at {bad}: {problem}"
            events = collections.Counter(
                (e.method, e.card_number) for e in map(records.decode_audit, (
                    v for _, v in book.audit_records())))
    finally:
        store.close()
    wanted = collections.Counter()
    for uid in acked:
        method, request, _ = attempted[uid]
        card = (request.credit.holder.card_number if method == "Transfer"
                else "" if method == "CorrectHolder" else request.card_number)
        wanted[(AUDITED_AS[method], card)] += 1
    return sum(max(0, n - events[key]) for key, n in wanted.items())


def crash_loop(kills: int, seed: int = 1, workdir: str | None = None, clients_n: int = 4,
               log=print) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        data = os.path.join(tmp, "data")
        clients = write_clients(os.path.join(tmp, "clients.toml"), TOKENS)
        address = free_address()  # the same one across restarts
        server = Server(tmp, data, clients, address)
        try:
            cards = setup(server, 8)
            attempted, acked = {}, {}  # uid -> op ; uid -> answer
            lost = doubled = unaudited = 0
            for k in range(kills):
                stop = threading.Event()

                def client(cid, server=server, k=k, stop=stop):
                    crng = random.Random(seed * 1_000_003 + k * 101 + cid)
                    i = 0
                    while not stop.is_set():
                        uid = f"k{k}-c{cid}-{i}"
                        op = make_op(crng, cards, uid)
                        attempted[uid] = op
                        try:
                            acked[uid] = server.call(op)
                        except grpc.RpcError as e:
                            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                            grpc.StatusCode.DEADLINE_EXCEEDED):
                                return
                        i += 1

                def gate(cid, server=server, k=k, stop=stop):
                    """Fares on one stream, 4 messages in flight."""
                    crng = random.Random(seed * 1_000_003 + k * 101 + cid)
                    window, sent = threading.Semaphore(4), collections.deque()

                    def messages():
                        i = 0
                        while not stop.is_set():
                            if not window.acquire(timeout=0.05):
                                continue
                            fares = []
                            for _ in range(crng.randint(1, 5)):
                                fares.append(pb.AuthorizeRequest(
                                    request_id=f"k{k}-s{cid}-{i}", card_number=crng.choice(cards),
                                    channel=pb.CHANNEL_TRANSIT, amount_fen=crng.randint(1, 999)))
                                attempted[fares[-1].request_id] = ("AuthorizeStream", fares[-1],
                                                                   "TRANSIT_GATE")
                                i += 1
                            sent.append(fares)
                            yield pb.AuthorizeBatchRequest(requests=fares)
                    try:
                        for reply in server.authorization.AuthorizeStream(
                                messages(), metadata=md("TRANSIT_GATE"), timeout=60):
                            for fare, answer in zip(sent.popleft(), reply.responses,
                                                    strict=True):
                                acked[fare.request_id] = answer
                            window.release()
                    except grpc.RpcError as e:
                        if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                            grpc.StatusCode.CANCELLED,
                                            grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise

                threads = [threading.Thread(target=client, args=(c,)) for c in range(clients_n)]
                threads.append(threading.Thread(target=gate, args=(clients_n,)))
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.05, 0.4))
                server.kill()
                stop.set()
                for t in threads:
                    t.join()
                server.close()
                unaudited += check_store(data, attempted, acked)
                server = Server(tmp, data, clients, address)
                before = server.purses(cards)
                this_round = [u for u in acked if u.startswith(f"k{k}-")]
                older = rng.sample(sorted(acked.keys() - set(this_round)),
                                   min(100, len(acked) - len(this_round)))
                checked = this_round + older  # this round's, and a sample of all before
                fares = [u for u in checked if attempted[u][0] == "AuthorizeStream"]
                for uid in checked:
                    if attempted[uid][0] != "AuthorizeStream" and \
                            server.call(attempted[uid]) != acked[uid]:
                        lost += 1
                for at in range(0, len(fares), 500):  # the stream's fares asked again together
                    again = server.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(
                        requests=[attempted[u][1] for u in fares[at:at + 500]]),
                        metadata=md("TRANSIT_GATE"), timeout=30).responses
                    lost += sum(a != acked[u] for a, u in zip(again, fares[at:at + 500],
                                                              strict=True))
                if server.purses(cards) != before:
                    doubled += 1
                if (k + 1) % 50 == 0:
                    log(f"crash loop: {k + 1} kills, {len(acked):,} acknowledged, lost {lost}, "
                        f"twice {doubled}")
            # every attempted id once more: applied now, or before; then the exact sum
            fares = [op[1] for op in attempted.values() if op[0] == "AuthorizeStream"]
            for at in range(0, len(fares), 500):
                server.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(
                    requests=fares[at:at + 500]), metadata=md("TRANSIT_GATE"), timeout=30)
            for op in attempted.values():
                if op[0] == "AuthorizeStream":
                    continue
                try:
                    server.call(op)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # a lock already undone
                        raise
            expected = {c: OPENING for c in cards}
            for op in attempted.values():
                if op[0] == "Transfer":
                    expected[op[1].credit.holder.card_number] += op[1].amount_fen
                elif op[0] in ("Authorize", "AuthorizeStream"):
                    expected[op[1].card_number] -= op[1].amount_fen
            final = server.purses(cards)
            mismatched = sum(final[c][pb.ACCOUNT_KIND_TRANSIT][0] != expected[c] for c in cards)
            server.kill()
            server.close()
            unaudited += check_store(data, attempted, acked)
        finally:  # on any error on the way, leave no server running
            if server.proc.poll() is None:
                server.stop()
    return {"kills": kills, "acknowledged": len(acked), "attempted": len(attempted),
            "lost": lost, "twice": doubled, "purses_off": mismatched, "unaudited": unaudited}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    t = time.perf_counter()
    out = crash_loop(args.kills, args.seed)
    print(f"crash loop: {out['kills']} kills survived in {time.perf_counter() - t:.0f} s; "
          f"{out['acknowledged']:,} acknowledged of {out['attempted']:,} attempted; lost "
          f"{out['lost']}, applied twice {out['twice']}, purses off {out['purses_off']}, "
          f"changes without their audit event {out['unaudited']}")
    return 0 if out["lost"] == out["twice"] == out["purses_off"] == out["unaudited"] == 0 \
        else 1


if __name__ == "__main__":
    sys.exit(main())

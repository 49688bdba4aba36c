"""Crash loop of a replicated store (issue 18): three `yikatong serve --replicate` nodes on a
3-node NATS JetStream cluster, node 0 with `--workers 2` (issue 27: a log keeper and two
workers; when it is the writer, one worker, its keeper, or the whole node is killed, in
turn). Clients send fares (Authorize TRANSIT with money), each with a unique request id,
to whichever node takes writes (a follower says UNAVAILABLE: they try the next), and a gate
sends them on an AuthorizeStream (1 to 5 a message, 4 messages in flight), begun again on
the next node when a stream ends. After a
random moment the writer is SIGKILLed (a whole node is restarted on its data dir); a
follower, or the node's next log keeper, takes the write lease meanwhile. After every kill:
  - a node takes writes again within the bound (`--takeover-max`);
  - every fare acknowledged in that round, replayed on the new writer, returns its first
    answer.
At the end every attempted id is replayed once more (an unacknowledged one is applied now,
or was before), each purse must equal its opening balance less 1 fen per attempted fare,
exactly, on every node, and every node must hold the same bytes.

    .venv/bin/python bench/crash_loop_cluster.py [--kills 100] [--seed 1]
"""
import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import threading
import time

import grpc

from yikatong.server.harness import (
    NatsCluster,
    ServerProcess,
    store_digest,
    wait_until,
    writer_of,
)
from yikatong.v1 import yikatong_pb2 as pb

OPENING = 10**9
CARDS = 20


def fare(node: ServerProcess, card: str, request_id: str) -> bytes:
    return node.authorization.Authorize(pb.AuthorizeRequest(
        request_id=request_id, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=1,
        terminal_id="gate-1"), metadata=node.md("TRANSIT_GATE"), timeout=5).SerializeToString()


def fares_again(node: ServerProcess, fares: list[tuple[str, str]]) -> list[bytes]:
    """Each (request id, card)'s fare asked again, 500 to a batch: the answers' bytes."""
    out = []
    for at in range(0, len(fares), 500):
        out += [a.SerializeToString() for a in node.authorization.AuthorizeBatch(
            pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT, amount_fen=1,
                terminal_id="gate-1") for rid, card in fares[at:at + 500]]),
            metadata=node.md("TRANSIT_GATE"), timeout=30).responses]
    return out


def gate(nodes: list[ServerProcess], cards: list[str], prefix: str, stop: threading.Event,
         rng: random.Random, lock: threading.Lock, attempted: dict, acked: dict) -> None:
    """Fares on an AuthorizeStream to whichever node takes them, 4 messages in flight; a
    stream that ends (a follower's UNAVAILABLE, a killed node) is begun on the next node."""
    n = 0
    while not stop.is_set():
        for node in list(nodes):
            if stop.is_set() or node.proc.poll() is not None:
                continue
            window, sent = threading.Semaphore(4), collections.deque()

            def messages(window=window, sent=sent):
                nonlocal n
                while not stop.is_set():
                    if not window.acquire(timeout=0.05):
                        continue
                    fares = []
                    for _ in range(rng.randint(1, 5)):
                        rid, card = f"{prefix}-{n}", rng.choice(cards)
                        n += 1
                        with lock:
                            attempted[rid] = card
                        fares.append(pb.AuthorizeRequest(
                            request_id=rid, card_number=card, channel=pb.CHANNEL_TRANSIT,
                            amount_fen=1, terminal_id="gate-1"))
                    sent.append(fares)
                    yield pb.AuthorizeBatchRequest(requests=fares)
            try:
                for reply in node.authorization.AuthorizeStream(
                        messages(), metadata=node.md("TRANSIT_GATE"), timeout=60):
                    with lock:
                        for q, answer in zip(sent.popleft(), reply.responses, strict=True):
                            acked[q.request_id] = answer.SerializeToString()
                    window.release()
            except (grpc.RpcError, ValueError):  # ValueError: a killed node's channel
                continue
        time.sleep(0.05)  # no node took them (a takeover under way): not a tight loop


def purse(node: ServerProcess, card: str) -> int:
    answer = node.ledger.GetBalances(pb.GetBalancesRequest(card_number=card),
                                     metadata=node.md("TRANSIT_GATE"), timeout=10)
    return next(b.posted_fen for b in answer.balances if b.kind == pb.ACCOUNT_KIND_TRANSIT)


KILLS = ("worker", "keeper", "node")  # of a writer with --workers 2, in turn


def crash_loop(kills: int, seed: int, workdir: str, takeover_max: float = 20,
               workers: int = 2, retain_days: float = 0) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    from test_e2e import new_active_card

    rng = random.Random(seed)
    cluster = NatsCluster(workdir)
    nodes: list[ServerProcess] = []

    def start(i: int, address: str | None = None) -> ServerProcess:
        node_dir = os.path.join(workdir, f"node{i}")
        os.makedirs(node_dir, exist_ok=True)
        return ServerProcess(node_dir, "--replicate", ",".join(cluster.urls), "--node-id",
                             f"node{i}", "--workers", str(workers if i == 0 else 1),
                             "--retain-days", str(retain_days), address=address,
                             data_dir=os.path.join(node_dir, "data"))
    try:
        nodes = [start(i) for i in range(3)]
        assert wait_until(lambda: writer_of(nodes) is not None, 60), "no writer"
        writer = writer_of(nodes)
        cards = [new_active_card(writer, n) for n in range(1, CARDS + 1)]
        for card in cards:
            writer.ledger.Transfer(pb.TransferRequest(
                transfer_id=f"open-{card}", debit=pb.AccountRef(operator="op:topup"),
                credit=pb.AccountRef(holder=pb.HolderAccountRef(
                    card_number=card, kind=pb.ACCOUNT_KIND_TRANSIT)), amount_fen=OPENING),
                metadata=writer.md("CARD_AGENCY"), timeout=10)
        attempted: dict[str, str] = {}
        acked: dict[str, bytes] = {}
        lock = threading.Lock()
        takeovers = []
        killed = {what: 0 for what in KILLS}
        for k in range(kills):
            stop = threading.Event()

            def client(cid: int, stop=stop, k=k):
                n = 0
                while not stop.is_set():
                    rid, card = f"k{k}-c{cid}-{n}", rng.choice(cards)
                    n += 1
                    with lock:
                        attempted[rid] = card
                    for node in list(nodes):
                        if node.proc.poll() is not None:
                            continue
                        try:
                            answer = fare(node, card, rid)
                        except (grpc.RpcError, ValueError):  # ValueError: a killed node's
                            continue                          # channel is closed
                        with lock:
                            acked[rid] = answer
                        break
                    else:  # no node took it (a takeover under way): not a tight loop
                        time.sleep(0.05)
            threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
            threads.append(threading.Thread(target=gate, args=(
                nodes, cards, f"k{k}-s", stop, rng, lock, attempted, acked)))
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 1.5))
            victim = writer_of(nodes)
            if victim is not None:
                # node 0's processes: one worker, its log keeper, or all at once, in turn
                what = KILLS[k % len(KILLS)] if victim is nodes[0] and workers > 1 else "node"
                if what == "node":
                    victim.kill()
                else:
                    keeper = victim.keeper_pid()
                    pid = keeper if what == "keeper" else next(
                        p for p, args in victim.children().items()
                        if "--keeper-of" not in args and "exporter" not in args)
                    os.kill(pid, 9)
                killed[what] += 1
                started = time.monotonic()
                assert wait_until(lambda: writer_of(nodes) is not None, takeover_max), \
                    f"kill {k} ({what}): no node took writes within {takeover_max} s"
                takeovers.append(time.monotonic() - started)
                if what == "node":
                    index = nodes.index(victim)
                    nodes[index] = start(index, victim.address)
            stop.set()
            for t in threads:
                t.join()
            writer = writer_of(nodes)
            assert writer is not None
            mine = [rid for rid in acked if rid.startswith(f"k{k}-")]  # this round's
            again = fares_again(writer, [(rid, attempted[rid]) for rid in mine])
            changed = [rid for rid, answer in zip(mine, again, strict=True) if answer != acked[rid]]
            assert not changed, f"kill {k}: {changed[:5]} changed"
        writer = writer_of(nodes)
        fares_again(writer, list(attempted.items()))  # every attempted fare, applied once
        spent = {card: 0 for card in cards}
        for card in attempted.values():
            spent[card] += 1
        for node in nodes:
            for card in cards:
                assert wait_until(lambda n=node, c=card: purse(n, c) == OPENING - spent[c], 30), \
                    f"{node.address}: purse of {card} is not {OPENING - spent[card]}"
        assert wait_until(lambda: len({store_digest(n.data_dir) for n in nodes}) == 1, 30), \
            "the nodes' stores differ"
        archives = [archive_of(n.data_dir) for n in nodes]  # --retain-days: alike on each
        assert all(a == archives[0] for a in archives), "the nodes' archives differ"
        takeovers.sort()
        return (f"{kills} kills of the writer ({killed['node']} whole nodes, "
                f"{killed['keeper']} log keepers and {killed['worker']} workers of a node of "
                f"{workers}), {len(attempted):,} fares attempted, "
                f"{len(acked):,} acknowledged, every acknowledged one there once, every purse "
                f"exact on every node, every store identical"
                + (f", {len(archives[0])} archive segments identical on every node"
                   if retain_days else "") + "; takeover median "
                f"{takeovers[len(takeovers) // 2]:.1f} s, max {takeovers[-1]:.1f} s"
                if takeovers else f"{kills} kills: no writer was found to kill")
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.stop()
        cluster.stop()


def archive_of(data_dir: str) -> dict[str, bytes]:
    where = os.path.join(data_dir, "archive")
    names = sorted(n for n in os.listdir(where) if n.endswith(".seg")) \
        if os.path.isdir(where) else []
    out = {}
    for name in names:
        with open(os.path.join(where, name), "rb") as f:
            out[name] = f.read()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--takeover-max", type=float, default=20)
    p.add_argument("--workers", type=int, default=2, help="node 0's (default: %(default)s)")
    p.add_argument("--retain-days", type=float, default=0,
                   help="every node's: records older move to the archive during the loop "
                        "(e.g. 0.0005: 43 s)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="crash-loop-cluster-")
    try:
        print(crash_loop(args.kills, args.seed, tmp, args.takeover_max, args.workers,
                         args.retain_days))
    except AssertionError as e:
        print(f"FAILED: {e}; the nodes' logs are kept in {tmp}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

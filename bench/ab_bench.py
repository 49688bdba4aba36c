"""Before and after a change, side by side in one run: money_wire_bench's durable debits
(AuthorizeStream 100 per message, and unary Authorize with money) and status-only
AuthorizeStream decisions (server_bench's h2load call: 10 messages of 100, 32 connections x
2 calls, each answer checked) against two servers up at once, this tree's and another
build's (`--baseline-dir`: a worktree at the commit before, with its .venv; its server runs
from that directory, so `python -m yikatong` finds that tree's package, not this one's),
measured in turn --repeat times, medians. Both on the default paths (money from wire bytes).
`--split-rules`: this tree's server runs with a split rule in force (issue 28 item 2; it
changes nothing for a tap that does not ask to split).

    git worktree add --detach /tmp/base BASE_COMMIT && (cd /tmp/base && python3.11 -m venv .venv
        && .venv/bin/pip install -q -e .)
    .venv/bin/python bench/ab_bench.py --baseline-dir /tmp/base
"""
import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time

from feed_bench import debits, fund
from h2load_grpc import Call
from money_wire_bench import debit_rate, server_cpu
from server_bench import STREAM, TOKEN, stream_answer, stream_batches

from yikatong.server.harness import ServerProcess, card_numbers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-dir", required=True, help="the other build's tree (with .venv)")
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--unary", type=int, default=64, help="unary calls in flight")
    p.add_argument("--split-rules", action="store_true",
                   help="this tree's server with a split rule in force (medical, then purse)")
    args = p.parse_args()
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in ("after", "before")}
    with contextlib.ExitStack() as stack:
        # ServerProcess runs `sys.executable -m yikatong` in this tree: the baseline's
        # interpreter is started through a script that runs it in its own tree instead
        wrapper = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "python")
        base = os.path.abspath(args.baseline_dir)
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\ncd '{base}' && exec '{base}/.venv/bin/python' \"$@\"\n")
        os.chmod(wrapper, 0o700)
        modes = (("after", sys.executable), ("before", wrapper))
        servers, cards, reads = {}, {}, {}
        for mode, python in modes:  # both up at once, measured in turn
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            extra = ["--demo"]
            if mode == "after" and args.split_rules:
                rules = os.path.join(tmp, "split.toml")
                with open(rules, "w") as f:
                    f.write('version = "bench"\n[split]\nmedical = ["MEDICAL", "TRANSIT"]\n')
                extra += ["--split-rules", rules]
            mine, sys.executable = sys.executable, python  # ServerProcess starts sys.executable
            try:
                servers[mode] = ServerProcess(tmp, *extra, clients=False)
            finally:
                sys.executable = mine
            stack.callback(servers[mode].stop)
            cards[mode] = [c for c in card_numbers(servers[mode].data_dir)
                           if c.startswith("31")][:500]
            asyncio.run(fund(servers[mode].address, cards[mode]))
            asyncio.run(debits(servers[mode].address, cards[mode], 1, args.streams, "warm"))
            batches = stream_batches(card_numbers(servers[mode].data_dir), 10, 100)
            reads[mode] = (Call(STREAM, [b.SerializeToString() for b in batches], TOKEN, tmp,
                                "reads"), stream_answer(servers[mode], batches))
        for rep in range(args.repeat):  # alternated, so the machine's drift hits both alike
            for kind in ("stream", "unary", "reads"):
                for mode, _ in (modes if rep % 2 else modes[::-1]):
                    server = servers[mode]
                    c0, t0 = server_cpu(server), time.perf_counter()
                    if kind == "reads":
                        call, expected = reads[mode]
                        rate = call.run(server.address, args.seconds, 32, 2, expected).rate * 1000
                    else:
                        rate = debit_rate(server, cards[mode], kind, args, rep, mode)
                    wall = time.perf_counter() - t0
                    samples[mode].setdefault(kind, []).append(rate)
                    samples[mode].setdefault(kind + "_us", []).append(
                        (server_cpu(server) - c0) / (rate * wall) * 1e6)
    med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    a, b = med["after"], med["before"]
    print(f"# durable debits over gRPC, {args.seconds:g} s each, median of {args.repeat} "
          f"alternated; {os.cpu_count()} cores shared by servers and client, load "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    print("| build | AuthorizeStream debits/s | server CPU us/debit | unary Authorize "
          "debits/s | server CPU us/debit | status-only decisions/s | server CPU us/decision |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    this = "after (this tree" + (", --split-rules in force)" if args.split_rules else ")")
    for name, m in ((this, a), ("before (--baseline-dir)", b)):
        print(f"| {name} | {m['stream']:,.0f} | {m['stream_us']:.1f} | {m['unary']:,.0f} | "
              f"{m['unary_us']:.1f} | {m['reads']:,.0f} | {m['reads_us']:.2f} |")
    print("| after / before | " + " | ".join(f"{a[k] / b[k]:.3f}x" for k in (
        "stream", "stream_us", "unary", "unary_us", "reads", "reads_us")) + " |")
    print("\nruns (stream debits/s): " + "; ".join(
        f"{m} " + ", ".join(f"{v:,.0f}" for v in samples[m]["stream"]) for m in samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 28 item 2 (one tap, several pots) leaves the hot path as fast: durable debits over
gRPC, this tree against a baseline tree (another revision with its own .venv, e.g. the commit
before the change: `git archive REV | tar -x -C DIR && cd DIR && python3.11 -m venv .venv &&
.venv/bin/pip install -e .`), side by side in one run: both servers up at once, measured in
turn --repeat times, medians; money_wire_bench's clients (AuthorizeStream, 100 debits a
message; unary Authorize with money) and its server CPU per debit. This tree's server runs
with --split-rules in force (the rule changes nothing for a tap that does not ask to split).

    .venv/bin/python bench/pots_bench.py --baseline DIR [--seconds 3] [--repeat 5]
"""
import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time

from feed_bench import debits, fund
from money_wire_bench import server_cpu, unary

from yikatong.server import harness
from yikatong.server.harness import ServerProcess, card_numbers


@contextlib.contextmanager
def tree(root: str | None):
    """ServerProcess starts `python -m yikatong` of `root`'s .venv in `root` (None: this)."""
    if root is None:
        yield
        return
    executable, cwd = sys.executable, harness.ROOT
    sys.executable, harness.ROOT = os.path.join(root, ".venv", "bin", "python"), root
    try:
        yield
    finally:
        sys.executable, harness.ROOT = executable, cwd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", required=True, help="a tree of another revision with .venv")
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--unary", type=int, default=64, help="unary calls in flight")
    args = p.parse_args()
    modes = (("this", None), ("baseline", os.path.abspath(args.baseline)))
    samples: dict[str, dict[str, list[float]]] = {m: {} for m, _ in modes}
    with contextlib.ExitStack() as stack:
        servers, cards = {}, {}
        for mode, root in modes:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            extra = ["--demo"]
            if root is None:
                rules = os.path.join(tmp, "split.toml")
                with open(rules, "w") as f:
                    f.write('version = "bench"\n[split]\nmedical = ["MEDICAL", "TRANSIT"]\n')
                extra += ["--split-rules", rules]
            with tree(root):
                servers[mode] = ServerProcess(tmp, *extra, clients=False)
            stack.callback(servers[mode].stop)
            cards[mode] = [c for c in card_numbers(servers[mode].data_dir)
                           if c.startswith("31")][:500]
            asyncio.run(fund(servers[mode].address, cards[mode]))
            asyncio.run(debits(servers[mode].address, cards[mode], 1, args.streams, "warm"))
        for rep in range(args.repeat):  # alternated, so the machine's drift hits both alike
            for kind in ("stream", "unary"):
                for mode, _ in (modes if rep % 2 == 0 else modes[::-1]):
                    server = servers[mode]
                    c0, t0 = server_cpu(server), time.perf_counter()
                    rate = asyncio.run(
                        debits(server.address, cards[mode], args.seconds, args.streams,
                               f"debit-{rep}")
                        if kind == "stream" else
                        unary(server.address, cards[mode], args.seconds, args.unary,
                              f"{mode}-{rep}"))
                    wall = time.perf_counter() - t0
                    samples[mode].setdefault(kind, []).append(rate)
                    samples[mode].setdefault(kind + "_us", []).append(
                        (server_cpu(server) - c0) / (rate * wall) * 1e6)
    med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    a, b = med["this"], med["baseline"]
    print(f"# durable debits over gRPC, {args.seconds:g} s each, median of {args.repeat} "
          f"alternated; {os.cpu_count()} cores shared, load {os.getloadavg()[0]:.1f}")
    print("| tree | AuthorizeStream debits/s | server CPU us/debit | unary Authorize debits/s "
          "| server CPU us/debit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, m in (("this (--split-rules in force)", a), ("baseline", b)):
        print(f"| {name} | {m['stream']:,.0f} | {m['stream_us']:.1f} | {m['unary']:,.0f} | "
              f"{m['unary_us']:.1f} |")
    print(f"| this / baseline | {a['stream'] / b['stream']:.3f}x | "
          f"{a['stream_us'] / b['stream_us']:.3f}x | {a['unary'] / b['unary']:.3f}x | "
          f"{a['unary_us'] / b['unary_us']:.3f}x |")
    print("\nruns (stream debits/s): " + "; ".join(
        f"{m} " + ", ".join(f"{v:,.0f}" for v in samples[m]["stream"]) for m, _ in modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

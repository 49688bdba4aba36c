"""The crash loop, bounded for CI: 50 SIGKILLs under a mixed concurrent workload. The
1,000-kill run is `make crash-loop` (bench/crash_loop.py)."""
import os
import re
import sys

import pytest

from yikatong.server.harness import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
from crash_loop import crash_loop  # noqa: E402


@pytest.mark.slow
def test_50_sigkills_lose_nothing_and_apply_nothing_twice(tmp_path):
    out = crash_loop(50, seed=7, workdir=str(tmp_path), log=lambda _: None)
    assert out["kills"] == 50 and out["acknowledged"] > 1000
    assert out["lost"] == 0  # every acknowledged id replays to its first answer
    assert out["twice"] == 0  # and replaying moves nothing
    assert out["purses_off"] == 0  # every attempted id applied exactly once in the end
    assert out["unaudited"] == 0  # every acknowledged change has its audit event


@pytest.mark.slow
def test_the_replicated_crash_loop_loses_nothing_across_3_writer_kills(tmp_path):
    """The cluster variant, bounded (`make crash-loop-cluster` runs 100 kills): the writer
    SIGKILLed three times under fares (node 0 of 2 workers: its log keeper, a worker, or
    the whole node); the checks are the loop's own assertions."""
    from crash_loop_cluster import crash_loop as cluster_crash_loop
    out = cluster_crash_loop(3, seed=3, workdir=str(tmp_path))
    assert out.startswith("3 kills of the writer"), out
    # node 0 (2 workers) writes first: one of its workers, then its log keeper are killed
    # (a worker's transaction left in the log: docs/SCALE.md, "the log admits chains")
    assert re.search(r"whole nodes, [1-9]\d* log keepers and [1-9]\d* workers", out), out

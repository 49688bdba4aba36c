"""The crash loop, bounded for CI: 50 SIGKILLs under a mixed concurrent workload. The
1,000-kill run is `make crash-loop` (bench/crash_loop.py)."""
import os
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

"""Run a test module on the fast path built with AddressSanitizer (`make fuzz-asan`): the
instrumented extension (its path, argv[1]) is put in place of the regular one before anything
imports it, the rest of argv goes to pytest. Python itself is not instrumented, so the
sanitizer's runtime is preloaded (LD_PRELOAD) and leak detection is off (the interpreter's
own allocations at exit are not ours)."""
import importlib.util
import sys

NAME = "yikatong.fastpath._authorize_c"
spec = importlib.util.spec_from_file_location(NAME, sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[NAME] = module
spec.loader.exec_module(module)

import pytest  # noqa: E402 (after the instrumented module is in place)

from yikatong import fastpath  # noqa: E402

assert fastpath.impl is module, "the instrumented fast path is not the one in use"
sys.exit(pytest.main(sys.argv[2:]))

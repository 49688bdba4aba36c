# The same commands for everyone. `make run` and `make test` each set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= 127.0.0.1:50051
DATA ?= .data/demo

.PHONY: run test test-tools lint bench attack crash-loop crash-loop-cluster soak fuzz-asan clean

# Exact versions from constraints.txt (the package metadata gives ranges).
$(BIN)/.installed: pyproject.toml setup.py constraints.txt fastpath/_authorize_c.pyx $(wildcard proto/yikatong/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=constraints.txt $(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/yikatong serve --demo --data-dir $(DATA) --listen $(LISTEN)

# CI sets nothing else: the compiled fast path must load, or the run fails.
test: $(BIN)/.installed test-tools
	YIKATONG_REQUIRE_EXTENSIONS=1 $(BIN)/pytest

# promtool and Prometheus for tests/test_operations.py: Debian's `prometheus` package, and
# Node for tests/test_gates.py (examples/gate_verify.js): Debian's `nodejs`, unless each is on
# the PATH already (sudo when not root).
test-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& { command -v node >/dev/null || command -v nodejs >/dev/null; } || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus nodejs; }

# ruff (pyflakes, pycodestyle, import order, bugbear) everywhere; mypy on the domain and storage.
TYPECHECK := build/typecheck
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/yikatong
	ln -s $(CURDIR)/yikatong/*.py $(CURDIR)/yikatong/v1 $(CURDIR)/yikatong/calendar \
		$(CURDIR)/yikatong/points \
		$(TYPECHECK)/yikatong/
	ln -s $(CURDIR)/storage $(TYPECHECK)/yikatong/storage
	ln -s $(CURDIR)/fastpath $(TYPECHECK)/yikatong/fastpath
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		-p yikatong.storage -p yikatong.calendar -p yikatong.points -m yikatong.model -m yikatong.cards -m yikatong.ledger \
		-m yikatong.authorize -m yikatong.errors -m yikatong.config -m yikatong.clock

# A bounded run (about 5 minutes on 2 cores); results in bench/results/<date>/summary.md.
# BENCH_ARGS=--with-postgres adds PostgreSQL to the storage comparison.
bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Issue 25's stream attacks (headers only, stalled streams, a history flood) against real
# servers on loopback, and what a bank switch and a medical terminal saw (about 2 minutes).
attack: $(BIN)/.installed
	$(BIN)/python bench/attack.py

# 1,000 SIGKILLs under load (about 20 minutes); CI runs 50 of them in `make test`.
crash-loop: $(BIN)/.installed
	$(BIN)/python bench/crash_loop.py --kills 1000

# 100 SIGKILLs of the writer of a 3-node replicated store on a 3-node JetStream cluster
# (issue 18; about 15 minutes); CI runs 3 of them in `make test`.
crash-loop-cluster: $(BIN)/.installed
	$(BIN)/python bench/crash_loop_cluster.py --kills 100

# The Locust mix for 10 minutes: RSS, descriptors and LMDB readers must not grow.
soak: $(BIN)/.installed
	$(BIN)/python bench/soak.py

# The wire reader's fuzz and differential tests on the fast path built with AddressSanitizer
# (about 1 minute): every Python object from malloc (PYTHONMALLOC), so a read past a request's
# bytes is caught; the sanitizer's runtime preloaded, as Python itself is not instrumented.
fuzz-asan: $(BIN)/.installed
	rm -rf build/asan
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g" LDFLAGS="-fsanitize=address" \
		$(BIN)/python setup.py -q build_ext --build-temp build/asan/tmp --build-lib build/asan/lib
	PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
		$(BIN)/python tests/asan.py build/asan/lib/yikatong/fastpath/_authorize_c*.so tests/test_fuzz.py tests/test_wire.py \
		tests/test_fastpath.py tests/test_wire_money.py -k "not over_grpc" -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info dist fastpath/*.c fastpath/*.so yikatong/v1/*_pb2*.py* .data

"""`--workers N`: N server processes on one port, one data dir, supervised by their parent.

The parent forks each worker before any gRPC or LMDB object exists in it; a worker opens its
own LMDB environment and binds the port with SO_REUSEPORT, so the kernel spreads connections
over the workers. What must agree across workers lives where they all see it: the store
(LMDB serialises write transactions across processes; the change sequence is read inside
each one), and the manual clock (shared memory, yikatong/clock.py). The hold sweep runs in
every worker: it is one idempotent write transaction, so whichever runs first does the work.

The parent holds the data dir's lock for the life of the server (a second server on it is
refused), waits until every worker says it is ready, then supervises:
- a worker that dies is replaced (logged, counted); one that could not start at all (its
  reason is already on stderr) stops the server, since its siblings would fail alike;
- SIGTERM or SIGINT is passed to every worker, each drains (health NOT_SERVING while still
  answering, then in-flight calls finish) and the parent exits 0 once all have stopped;
- a worker whose parent dies gets SIGTERM (PR_SET_PDEATHSIG): no orphan keeps the port.
"""
import ctypes
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("yikatong.server")
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1
RESTART_PAUSE_SECONDS = 1.0  # a worker that dies this soon after its start is restarted late
START_FAILED = 2  # a worker's exit code when it could not start (cli._fail)


def supervise(n: int, run_worker: Callable[[Callable[[], None]], int],
              on_ready: Callable[[], None], stop_seconds: float,
              on_ended: Callable[[int], None] = lambda pid: None) -> int:
    """Run `run_worker(ready)` in each of `n` worker processes (it returns an exit code and
    calls `ready()` once it serves); `on_ready()` once all n serve; `on_ended(pid)` after a
    worker has ended. Returns the exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    parent = os.getpid()
    ready_r, ready_w = os.pipe()
    os.set_blocking(ready_r, False)
    workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 70
            try:
                os.close(ready_r)
                # stopped before it serves (a SIGTERM while a replacement starts): nothing is
                # in flight, so that is a clean stop, until the server's own handler is set
                signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
                _die_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                code = run_worker(lambda: os.write(ready_w, bytes((slot,))))
            except BaseException:  # noqa: BLE001 - reported, then the process ends
                traceback.print_exc()
            finally:
                os._exit(code)
        workers[pid] = (slot, time.monotonic())

    for slot in range(n):
        spawn(slot)
    ready: set[int] = set()
    announced = False
    restarts = 0
    while True:
        info = signal.sigtimedwait(_SIGNALS, 0.05)
        try:
            ready.update(os.read(ready_r, 256))
        except BlockingIOError:
            pass
        if not announced and len(ready) == n:
            announced = True
            on_ready()
        if info is None:
            continue
        if info.si_signo != signal.SIGCHLD:
            log.info("stopping: %d workers drain", len(workers),
                     extra={"fields": {"signal": signal.Signals(info.si_signo).name}})
            return _stop(workers, stop_seconds)
        for pid, code in _reap():
            slot, started = workers.pop(pid)
            ready.discard(slot)
            on_ended(pid)
            if not announced or code == START_FAILED:
                log.error("worker %d (pid %d) could not start (exit %s); stopping the server",
                          slot, pid, code)
                _stop(workers, stop_seconds)
                return START_FAILED
            restarts += 1
            log.warning("worker %d (pid %d) ended (exit %s); starting another", slot, pid, code,
                        extra={"fields": {"worker": slot, "pid": pid, "exit": code,
                                          "restarts": restarts}})
            if time.monotonic() - started < RESTART_PAUSE_SECONDS:
                time.sleep(RESTART_PAUSE_SECONDS)  # no hot loop of crashing workers
            spawn(slot)


def _reap() -> list[tuple[int, int]]:
    """(pid, exit code; -N for signal N) of every worker that has ended."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, os.waitstatus_to_exitcode(status)))


def _stop(workers: dict[int, tuple[int, float]], seconds: float) -> int:
    """SIGTERM every worker, wait up to `seconds` for all, SIGKILL what is left. 0 if every
    worker stopped cleanly."""
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    clean = True
    deadline = time.monotonic() + seconds
    while workers and time.monotonic() < deadline:
        signal.sigtimedwait({signal.SIGCHLD}, 0.1)
        for pid, code in _reap():
            workers.pop(pid, None)
            clean = clean and code == 0
    for pid in workers:
        log.error("worker pid %d did not stop in %.0f s; killed", pid, seconds)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        clean = False
    workers.clear()
    return 0 if clean else 1


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when its parent dies (a SIGKILLed supervisor)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

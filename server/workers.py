"""`--workers N`: N server processes on one port, one data dir, supervised by their parent.

The parent forks each first worker before any gRPC or LMDB object exists in it; a worker
opens its own LMDB environment and binds the port with SO_REUSEPORT, so the kernel spreads
connections over the workers. What must agree across workers lives where they all see it: the
store (LMDB serialises write transactions across processes; the change sequence is read
inside each one), and the manual clock (shared memory, yikatong/clock.py). The hold sweep runs
in every worker: it is one idempotent write transaction, so whichever runs first does the work.

The parent holds the data dir's lock for the life of the server (a second server on it is
refused), waits until every worker says it is ready, then supervises:
- a worker that dies is replaced (logged, counted); one that could not start at all (its
  reason is already on stderr) stops the server if it was one of the first N, since its
  siblings would fail alike; later, while other workers serve, it is tried again (1 s, then
  doubling up to 30 s), and the server stops only when no worker serves;
- SIGTERM or SIGINT is passed to every worker, each drains (health NOT_SERVING while still
  answering, then in-flight calls finish) and the parent exits 0 once all have stopped;
- SIGHUP is passed to every worker, and each reloads its files (server/reload.py);
- SIGUSR2 is a rolling restart: one worker at a time, a new one is started and serving first,
  then the old one drains (as on SIGTERM), so no call is refused;
- a worker whose parent dies gets SIGTERM (PR_SET_PDEATHSIG): no orphan keeps the port.

Every worker after the first N (a replacement of one that died, and each of a rolling
restart) is started anew, `command --worker-of SPEC` (`python -m yikatong serve ...`, the
parent's own arguments): a fresh interpreter that imports the code as installed now and reads
the files as they are now, where a fork would copy the parent's code and state of its start.
That is what makes a rolling restart an upgrade of the workers' code; the parent itself (this
module and the command line) keeps the code it started with until the server is restarted.
"""
import ctypes
import dataclasses
import logging
import os
import signal
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable

from yikatong.server import reload

log = logging.getLogger("yikatong.server")
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2}
_PR_SET_PDEATHSIG = 1
_READY = struct.Struct("<i")  # a worker's pid on the ready pipe: 4 bytes, written atomically
RESTART_PAUSE_SECONDS = 1.0  # a worker that dies this soon after its start is restarted late
RETRY_SECONDS_MAX = 30.0  # the longest pause between tries of a worker that cannot start
START_SECONDS_MAX = 120.0  # a rolling restart gives up on a new worker not serving by then
START_FAILED = 2  # a worker's exit code when it could not start (cli._fail)


@dataclasses.dataclass(slots=True)
class _Worker:
    slot: int
    started: float  # time.monotonic()


def supervise(n: int, run_worker: Callable[[Callable[[], None]], int],
              on_ready: Callable[[], None], stop_seconds: float,
              on_ended: Callable[[int], None] = lambda pid: None,
              on_restart: Callable[[], None] = lambda: None,
              command: list[str] | None = None, fds: dict[str, int] | None = None,
              companions=()) -> int:
    """Run `run_worker(ready)` in each of `n` forked worker processes (it returns an exit
    code and calls `ready()` once it serves); `on_ready()` once all n serve; `on_ended(pid)`
    after a worker has ended; `on_restart()` when one that served ended by itself and is
    replaced (not a rolling restart's drain). `command`: the argument vector that starts one
    worker anew (`--worker-of SPEC` is appended; `fds`, named descriptors it inherits, are in SPEC);
    without it, replacements are forked and SIGUSR2 is refused. `companions`: processes kept
    beside the workers (the metrics endpoint, server/metrics.py `Exporter`; a replicated
    node's log keeper, server/keeper.py): started once the workers are forked, passed SIGHUP,
    reaped here and started again when they end (`spawn`, `hup`, `ended(pid, code)`,
    `poll()`; `renew()` at the end of a rolling restart). One that is `vital` and ends before
    every worker serves stops the server (its reason is on stderr). Returns the exit code."""
    supervisor = _Supervisor(n, run_worker, on_ready, stop_seconds, on_ended, command,
                             fds or {})
    supervisor.on_restart = on_restart
    supervisor.companions = list(companions)
    return supervisor.run()


class _Supervisor:
    def __init__(self, n, run_worker, on_ready, stop_seconds, on_ended, command, fds):
        self.n, self.run_worker, self.on_ready = n, run_worker, on_ready
        self.stop_seconds, self.on_ended = stop_seconds, on_ended
        self.command, self.fds = command, fds
        self.parent = os.getpid()
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        self.workers: dict[int, _Worker] = {}  # pid -> worker
        self.ready: set[int] = set()  # pids of workers that serve
        self.unread = b""  # a part of a ready message (never seen: the writes are atomic)
        self.announced = False
        self.restarts = 0
        self.due: dict[int, float] = {}  # slot -> when to start a worker in it again
        self.retry: dict[int, float] = {}  # slot -> the pause after its next failed start
        self.gone: set[int] = set()  # pids killed on purpose: their end is no news
        # the rolling restart (SIGUSR2)
        self.rolling = False
        self.to_replace: list[int] = []  # old pids, in slot order
        self.incoming: tuple[int, int, float] | None = None  # (old pid, new pid, give up at)
        self.outgoing: tuple[int, float] | None = None  # (old pid draining, kill at)
        self.companions: list = []  # kept beside the workers (supervise)

    # ----------------------------------------------------------------- the loop

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        if self.command is not None:  # a worker started anew inherits these
            for fd in (self.ready_w, *self.fds.values()):
                os.set_inheritable(fd, True)
        for slot in range(self.n):
            self.fork(slot)
        for companion in self.companions:  # after the forks: no worker holds any of theirs
            companion.spawn()
        while True:
            info = signal.sigtimedwait(_SIGNALS, 0.05)
            self.take_ready()
            if not self.announced and len(self.ready) == self.n:
                self.announced = True
                self.on_ready()
            if info is not None:
                code = self.on_signal(info.si_signo)
                if code is not None:
                    return code
            self.roll()
            self.start_due()
            for companion in self.companions:
                companion.poll()

    def on_signal(self, signo: int) -> int | None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            log.info("stopping: %d workers drain", len(self.workers),
                     extra={"fields": {"signal": signal.Signals(signo).name}})
            return _stop(self.workers, self.stop_seconds, self.ready)
        if signo == signal.SIGHUP:
            for pid in self.workers:
                _signal(pid, signal.SIGHUP)
            for companion in self.companions:
                companion.hup()
            log.info("reload: SIGHUP passed to %d workers", len(self.workers),
                     extra={"fields": {"pids": sorted(self.workers)}})
        elif signo == signal.SIGUSR2:
            self.start_rolling()
        else:
            for pid, code in _reap():
                companion = next((c for c in self.companions if c.pid == pid), None)
                if companion is not None:
                    if companion.vital and not self.announced:  # not started again: it
                        companion.stopping.set()  # could not start, and neither will the next
                        companion.ended(pid, code)
                        log.error("%s (pid %d) could not start (exit %s); stopping the server",
                                  companion.name, pid, code)
                        _stop(self.workers, self.stop_seconds, self.ready)
                        return START_FAILED
                    companion.ended(pid, code)
                    continue
                stopped = self.ended(pid, code)
                if stopped is not None:
                    return stopped
        return None

    def take_ready(self) -> None:
        try:
            data = self.unread + os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        whole = len(data) - len(data) % _READY.size
        for (pid,) in _READY.iter_unpack(data[:whole]):
            if pid in self.workers:  # not one that has ended since
                self.ready.add(pid)
                slot = self.workers[pid].slot
                if self.announced and (self.incoming is None or pid != self.incoming[1]):
                    log.info("worker %d (pid %d) serves", slot, pid,
                             extra={"fields": {"worker": slot, "pid": pid}})
                self.retry.pop(slot, None)
        self.unread = data[whole:]

    # ----------------------------------------------------------------- starting workers

    def fork(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 70
            try:
                os.close(self.ready_r)
                begin_worker(self.parent)
                code = self.run_worker(lambda: os.write(self.ready_w,
                                                        _READY.pack(os.getpid())))
            except BaseException:  # noqa: BLE001 - reported, then the process ends
                traceback.print_exc()
            finally:
                os._exit(code)
        self.workers[pid] = _Worker(slot, time.monotonic())

    def start_anew(self, slot: int) -> int | None:
        """A worker in `slot` from a fresh interpreter (the code as installed now): its pid,
        or None if it could not even be spawned (logged)."""
        spec = ",".join((f"parent={self.parent}", f"ready={self.ready_w}",
                         *(f"{name}={fd}" for name, fd in self.fds.items())))
        argv = [*self.command, "--worker-of", spec]
        try:
            # the signal mask is inherited: SIGTERM, SIGHUP, ... wait until the worker has
            # its handlers (begin_worker), none can end it half-started
            pid = os.posix_spawn(argv[0], argv, os.environ)
        except OSError as error:
            log.error("worker %d could not be started: %s", slot, error)
            return None
        self.workers[pid] = _Worker(slot, time.monotonic())
        return pid

    def start(self, slot: int) -> None:
        if self.command is None:
            self.fork(slot)
        elif self.start_anew(slot) is None:
            self.later(slot, "could not be started")

    def later(self, slot: int, why: str) -> None:
        pause = self.retry.get(slot, RESTART_PAUSE_SECONDS)
        self.retry[slot] = min(pause * 2, RETRY_SECONDS_MAX)
        self.due[slot] = time.monotonic() + pause
        log.error("worker %d %s; trying again in %.0f s", slot, why, pause,
                  extra={"fields": {"worker": slot, "retry_seconds": pause}})

    def start_due(self) -> None:
        now = time.monotonic()
        for slot, when in sorted(self.due.items()):
            if when <= now:
                del self.due[slot]
                self.start(slot)

    # ----------------------------------------------------------------- workers ending

    def ended(self, pid: int, code: int) -> int | None:
        """A worker has ended: replace it, or stop the server (its exit code)."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None
        served = pid in self.ready
        self.ready.discard(pid)
        self.on_ended(pid)
        if pid in self.gone:
            self.gone.discard(pid)
            return None
        slot = worker.slot
        if self.outgoing is not None and pid == self.outgoing[0]:
            self.outgoing = None
            (log.info if code == 0 else log.warning)(
                "rolling restart: old worker %d (pid %d) drained and stopped (exit %s)",
                slot, pid, code, extra={"fields": {"worker": slot, "pid": pid, "exit": code}})
            return None
        if self.incoming is not None and pid == self.incoming[1]:
            old = self.incoming[0]
            self.stop_rolling()
            if old:  # it still serves the slot
                log.error("rolling restart stopped: the new worker %d (pid %d) ended (exit %s; "
                          "its reason is above) before it took over; the old one, pid %d, "
                          "keeps serving", slot, pid, code, old,
                          extra={"fields": {"worker": slot, "pid": pid, "exit": code}})
                return None
            # the old one is gone too: the slot is empty, replaced as below
        if not self.announced:
            log.error("worker %d (pid %d) could not start (exit %s); stopping the server",
                      slot, pid, code)
            _stop(self.workers, self.stop_seconds, self.ready)
            return START_FAILED
        if self.incoming is not None and pid == self.incoming[0]:
            # the old one died by itself while its replacement starts: that one takes over
            self.restarts += 1
            self.on_restart()
            self.incoming = (0, *self.incoming[1:])  # nothing left to drain
            log.warning("worker %d (pid %d) ended (exit %s) while its replacement starts",
                        slot, pid, code, extra={"fields": {"worker": slot, "pid": pid,
                                                           "exit": code,
                                                           "restarts": self.restarts}})
            return None
        if not served:
            if not self.ready:
                log.error("worker %d (pid %d) could not start (exit %s) and no worker "
                          "serves; stopping the server", slot, pid, code)
                _stop(self.workers, self.stop_seconds, self.ready)
                return START_FAILED
            self.later(slot, f"(pid {pid}) could not start (exit {code})")
            return None
        self.restarts += 1
        self.on_restart()
        log.warning("worker %d (pid %d) ended (exit %s); starting another", slot, pid, code,
                    extra={"fields": {"worker": slot, "pid": pid, "exit": code,
                                      "restarts": self.restarts}})
        now = time.monotonic()
        if now - worker.started < RESTART_PAUSE_SECONDS:  # no hot loop of crashing workers
            self.due[slot] = now + RESTART_PAUSE_SECONDS
        else:
            self.start(slot)
        return None

    # ----------------------------------------------------------------- rolling restart

    def start_rolling(self) -> None:
        why = ("" if self.command is not None and self.announced and not self.rolling else
               "no command to start a worker anew" if self.command is None else
               "the workers are still starting" if not self.announced else
               "a rolling restart is already under way")
        if why:
            log.warning("rolling restart (SIGUSR2) ignored: %s", why)
            return
        self.rolling = True
        self.to_replace = sorted(self.workers, key=lambda pid: self.workers[pid].slot)
        log.info("rolling restart: %d workers, one at a time, each drained once its "
                 "replacement serves", len(self.to_replace),
                 extra={"fields": {"pids": self.to_replace}})

    def stop_rolling(self) -> None:
        self.rolling, self.to_replace, self.incoming = False, [], None

    def roll(self) -> None:
        """One step of the rolling restart, if one is under way."""
        if not self.rolling:
            return
        now = time.monotonic()
        if self.incoming is not None:
            old, new, give_up = self.incoming
            if new in self.ready:
                self.incoming = None
                slot = self.workers[new].slot
                if old in self.workers:
                    _signal(old, signal.SIGTERM)  # it drains as on a stop of the server
                    self.outgoing = (old, now + self.stop_seconds)
                log.info("rolling restart: worker %d: new pid %d serves"
                         + ("; old pid %d drains" if old in self.workers else ""),
                         slot, new, *((old,) if old in self.workers else ()),
                         extra={"fields": {"worker": slot, "new": new, "old": old}})
            elif now > give_up:
                log.error("rolling restart stopped: the new worker %d (pid %d) did not serve "
                          "within %.0f s; it is killed, and the old one, pid %d, keeps "
                          "serving", self.workers[new].slot, new, START_SECONDS_MAX, old)
                self.gone.add(new)
                _signal(new, signal.SIGKILL)
                self.stop_rolling()
            return
        if self.outgoing is not None:
            old, kill_at = self.outgoing
            if now > kill_at:
                log.error("rolling restart: old worker pid %d did not stop in %.0f s; killed",
                          old, self.stop_seconds)
                _signal(old, signal.SIGKILL)
                self.outgoing = (old, float("inf"))  # reaped as it ends
            return
        while self.to_replace:
            old = self.to_replace.pop(0)
            # one that has ended meanwhile was replaced by a worker started anew already
            if old in self.workers and old in self.ready:
                new = self.start_anew(self.workers[old].slot)
                if new is None:
                    log.error("rolling restart stopped: pid %d keeps serving", old)
                    self.stop_rolling()
                else:
                    self.incoming = (old, new, now + START_SECONDS_MAX)
                return
        self.rolling = False
        log.info("rolling restart done: every worker was started anew"
                 + (", and now " + " and ".join(c.name for c in self.companions)
                    if self.companions else ""),
                 extra={"fields": {"pids": sorted(self.workers)}})
        for companion in self.companions:  # and its companions, on the code installed now
            companion.renew()


# --------------------------------------------------------------------- beside the workers

class Companion:
    """A process kept beside the workers (`supervise(companions=...)`; the metrics endpoint,
    server/metrics.py `Exporter`; a replicated node's log keeper, server/keeper.py `Keeper`):
    started once the workers are forked, reaped by the supervisor (`ended`) and started
    again (`poll`): after `first_pause` if it had lived `settled` seconds, else after a pause
    doubling from 1 s up to RETRY_SECONDS_MAX; started anew at the end of a rolling
    restart (`renew`); passed SIGHUP; stopped last (`stop`). It says it serves by writing to
    a pipe whose descriptor `command(fd)` puts on its command line; `fds` are inherited too.
    Subclasses name it, say what its ending means meanwhile, and give its command."""

    name = "a companion"
    meanwhile = ""  # what its ending means until it is back, for the log line
    vital = False  # one that ends before every worker serves stops the server
    first_pause = 1.0
    settled = 60.0
    renew_signal = signal.SIGTERM  # how `renew` asks it to stop

    def __init__(self, fds=(), on_ended: Callable[[int], None] = lambda pid: None):
        self.fds, self.on_ended = tuple(fds), on_ended
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.pause = 0.0
        self.due: float | None = None
        self.restarts = 0
        self.stopping = threading.Event()
        self._ready_r = -1
        self._renewing = 0  # the pid stopped to be started anew (`renew`)
        self._lock = threading.Lock()  # a spawn and a stop: one at a time

    def command(self, ready_fd: int) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def spawn(self) -> None:
        with self._lock:
            if self.stopping.is_set():
                return
            read, write = os.pipe()
            try:
                self.proc = subprocess.Popen(self.command(write), pass_fds=(write, *self.fds),
                                             stdin=subprocess.DEVNULL)
            except OSError as error:
                os.close(read)
                self.proc = None
                self.later(f"could not be started ({error})")
                return
            finally:
                os.close(write)
            if self._ready_r >= 0:
                os.close(self._ready_r)
            self._ready_r = read
            self.started = time.monotonic()

    def ended(self, pid: int, code: int) -> bool:
        """A child has ended (reaped by the supervisor): True if it was this one."""
        if self.proc is None or pid != self.proc.pid:
            return False
        self.proc.returncode = code  # reaped already: Popen must not wait for it
        self.on_ended(pid)
        if pid == self._renewing:
            self._renewing = 0
            log.info("rolling restart: %s (pid %d) stopped; started anew", self.name, pid)
            self.spawn()
        elif not self.stopping.is_set():
            self.restarts += 1
            self.counted()
            self.later(f"(pid {pid}) ended (exit {code})")
        return True

    def counted(self) -> None:
        """After it ended by itself (a metric of it, in a subclass)."""

    def later(self, why: str) -> None:
        lived = time.monotonic() - self.started
        self.pause = (self.first_pause if lived > self.settled else
                      min(max(self.pause * 2, 1.0), RETRY_SECONDS_MAX))
        self.due = time.monotonic() + self.pause
        log.error("%s %s; %s; starting it again in %.0f s", self.name, why, self.meanwhile,
                  self.pause, extra={"fields": {"retry_seconds": self.pause,
                                                "restarts": self.restarts}})

    def poll(self) -> None:
        """The supervisor's loop: start it again once its pause is over."""
        if self.due is not None and time.monotonic() >= self.due \
                and not self.stopping.is_set():
            self.due = None
            self.spawn()

    def renew(self) -> None:
        """The end of a rolling restart: started anew on the code installed now."""
        if self.proc is not None and self.proc.returncode is None \
                and not self.stopping.is_set():
            self._renewing = self.proc.pid
            self.proc.send_signal(self.renew_signal)

    def hup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self, seconds: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `seconds` (one reaped already is not signalled:
        Popen knows it ended)."""
        with self._lock:
            self.stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop in %.0f s; killed", self.name, proc.pid,
                          seconds)
                proc.kill()
                proc.wait()
            self.on_ended(proc.pid)
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1


# --------------------------------------------------------------------- in a worker

def begin_worker(parent: int) -> None:
    """A worker's first steps, forked or started anew (the parent's signals are blocked in
    it until here): stopped before it serves (a SIGTERM while it starts) it has nothing in
    flight, so that is a clean stop, until the server's own handler is set; a SIGHUP is
    kept for when it serves; SIGUSR2 is the parent's."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    reload.before_serving()
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerOf:
    """`serve ... --worker-of SPEC`: this process is a worker started anew by its parent.
    SPEC is `parent=PID,ready=FD[,NAME=FD...]`: the supervisor, the pipe to say it serves
    on, and named descriptors it inherited (`clock`: the manual clock's shared memory)."""

    parent: int
    ready_fd: int
    fds: dict[str, int]

    @classmethod
    def parse(cls, spec: str) -> "WorkerOf":
        try:
            fields = {k: int(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
            return cls(fields.pop("parent"), fields.pop("ready"), fields)
        except (KeyError, ValueError):
            raise ValueError(f"--worker-of {spec!r}: expected parent=PID,ready=FD[,NAME=FD]; "
                             "it is given by the supervisor, not by hand") from None

    def begin(self) -> None:
        begin_worker(self.parent)

    def ready(self) -> None:
        os.write(self.ready_fd, _READY.pack(os.getpid()))


# --------------------------------------------------------------------- helpers

def _signal(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except ProcessLookupError:  # ended; reaped on its SIGCHLD
        pass


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


def _stop(workers: dict, seconds: float, ready=frozenset()) -> int:
    """SIGTERM every worker, wait up to `seconds` for all, SIGKILL what is left. 0 if every
    worker stopped cleanly (one that had not served yet may end of the SIGTERM itself: it had
    nothing in flight)."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    clean = True
    deadline = time.monotonic() + seconds
    while workers and time.monotonic() < deadline:
        signal.sigtimedwait({signal.SIGCHLD}, 0.1)
        for pid, code in _reap():
            workers.pop(pid, None)
            clean = clean and (code == 0 or (code == -signal.SIGTERM and pid not in ready))
    for pid in workers:
        log.error("worker pid %d did not stop in %.0f s; killed", pid, seconds)
        _signal(pid, signal.SIGKILL)
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

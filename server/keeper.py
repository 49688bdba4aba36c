"""The log keeper of a replicated node with `--workers N` (storage/keeper.py): its process,
kept beside the workers by their supervisor (server/workers.py, a `companion`).

It is started anew (`serve ... --keeper-of SPEC`, the server's own arguments in a fresh
interpreter, inheriting the data dir's lock and the manual clock) once the workers are
forked; the workers wait for its first word before they serve. One that ends before every
worker serves stops the server (exit 2: it could not join the cluster, and its reason is on
stderr). Later, one that ends is started again (at once if it lived a minute, else after a
pause doubling from 1 s to 30 s), and its successor takes the lease back; meanwhile the
workers refuse writes (UNAVAILABLE) and health says NOT_SERVING (`log_keeper_down`). The
server's stop stops it last, after the workers have drained; a rolling restart (SIGUSR2)
starts it anew at the end.
"""
import logging
import os
import signal
import struct
import time

log = logging.getLogger("yikatong.server")
_PID = struct.Struct("<i")
RESTART_PAUSE_SECONDS = 1.0
RETRY_SECONDS_MAX = 30.0


class Keeper:
    vital = True  # one that cannot start stops the server (server/workers.py)
    name = "the log keeper"

    def __init__(self, command: list[str], fds: dict[str, int], on_ended=lambda pid: None):
        """`command`: the argument vector of `serve` as given; `fds`: the descriptors it
        inherits (`lock`, and `clock` with --clock manual)."""
        self.command, self.fds, self.on_ended = command, fds, on_ended
        self.pid = 0
        self.started = 0.0
        self.due: float | None = None
        self.renewing = False
        self.stopping = False
        self.restarts = 0
        self.pause = 0.0  # before the next start, after one that ended
        self._ready_r = -1

    def spawn(self) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        spec = ",".join((f"parent={os.getpid()}", f"ready={write}",
                         *(f"{name}={fd}" for name, fd in self.fds.items())))
        argv = [*self.command, "--keeper-of", spec]
        for fd in (write, *self.fds.values()):
            os.set_inheritable(fd, True)
        try:
            self.pid = os.posix_spawn(argv[0], argv, os.environ)
        except OSError as error:
            os.close(read)
            log.error("%s could not be started: %s", self.name, error)
            self.due = time.monotonic() + RESTART_PAUSE_SECONDS
            return
        finally:
            os.close(write)
        if self._ready_r >= 0:
            os.close(self._ready_r)
        self._ready_r = read
        self.started = time.monotonic()

    def ended(self, pid: int, code: int) -> bool:
        if pid != self.pid or not pid:
            return False
        self.pid = 0
        self.on_ended(pid)
        if self.stopping:
            return True
        if self.renewing:
            self.renewing = False
            log.info("rolling restart: %s (pid %d) stopped; started anew", self.name, pid)
            self.spawn()
            return True
        self.restarts += 1
        # one that lived a minute is started again at once; one that keeps failing, after a
        # pause doubling from a second up to RETRY_SECONDS_MAX
        lived = time.monotonic() - self.started
        self.pause = 0.0 if lived > 60 else min(max(self.pause * 2, RESTART_PAUSE_SECONDS),
                                                RETRY_SECONDS_MAX)
        pause = self.pause
        log.error("%s (pid %d) ended (exit %s); writes wait for its successor, started in "
                  "%.0f s", self.name, pid, code, pause,
                  extra={"fields": {"pid": pid, "exit": code, "restarts": self.restarts}})
        self.due = time.monotonic() + pause
        return True

    def poll(self) -> None:
        if self._ready_r >= 0:
            try:
                said = os.read(self._ready_r, 64)
            except BlockingIOError:
                said = b""
            if len(said) >= _PID.size:
                log.info("%s (pid %d) serves the workers", self.name, _PID.unpack_from(said)[0])
        if self.due is not None and time.monotonic() >= self.due and not self.stopping:
            self.due = None
            self.spawn()

    def hup(self) -> None:
        """Nothing of the keeper's is read again on SIGHUP."""

    def renew(self) -> None:
        """The end of a rolling restart: started anew on the code installed now."""
        if self.pid and not self.stopping:
            self.renewing = True
            _kill(self.pid, signal.SIGTERM)

    def stop(self, seconds: float = 15.0) -> None:
        """After the workers have stopped: SIGTERM, then SIGKILL after `seconds`."""
        self.stopping = True
        if self.pid:
            try:  # reaped already with the workers (workers._stop): nothing to signal
                reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                reaped = True
            if reaped:
                self.on_ended(self.pid)
                self.pid = 0
        if self.pid:
            _kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped already, with the workers
                    break
                if done:
                    break
                time.sleep(0.05)
            else:
                log.error("%s (pid %d) did not stop in %.0f s; killed", self.name, self.pid,
                          seconds)
                _kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.on_ended(self.pid)
            self.pid = 0
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1


def _kill(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        pass

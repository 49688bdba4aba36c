"""The log keeper of a replicated node with `--workers N` (storage/keeper.py): its process,
kept beside the workers by their supervisor (server/workers.py, a `Companion`).

It is started anew (`serve ... --keeper-of SPEC`, the server's own arguments in a fresh
interpreter, inheriting the data dir's lock and the manual clock) once the workers are
forked; the workers wait for its first word before they serve. One that ends before every
worker serves stops the server (exit 2: it could not join the cluster, and its reason is on
stderr). Later, one that ends is started again (at once if it lived a second, else after a
pause doubling from 1 s to 30 s), and its successor takes the lease back; meanwhile the
workers refuse writes (UNAVAILABLE) and health says NOT_SERVING (`log_keeper_down`). The
server's stop stops it last, after the workers have drained; a rolling restart (SIGUSR2)
starts it anew at the end.
"""
import logging
import os
import signal
import struct

from yikatong.server.workers import Companion

log = logging.getLogger("yikatong.server")
_PID = struct.Struct("<i")


def _gauges_dropped(pid: int) -> None:
    from yikatong.server import metrics

    metrics.process_ended(pid)


class Keeper(Companion):
    name = "the log keeper"
    meanwhile = "writes wait for its successor"
    vital = True
    # the lease lapses 3 s after its last renewal: a keeper that had served is followed at
    # once; one that ends as it starts (broken code, a bad file) after a growing pause
    first_pause = 0.0
    settled = 1.0
    # a rolling restart's stop keeps the node's lease for the successor to take back; a
    # server's stop (SIGTERM) gives it up, for another node to write at once
    renew_signal = signal.SIGUSR1

    def __init__(self, command: list[str], fds: dict[str, int], metrics: bool = False):
        """`command`: the argument vector of `serve` as given; `fds`: the descriptors it
        inherits (`lock`, and `clock` with --clock manual); `metrics`: with --metrics-listen
        (its restarts counted, its live gauges dropped when it ends)."""
        super().__init__(fds.values(), _gauges_dropped if metrics else lambda pid: None)
        self.serve_command, self.named_fds = command, fds
        self.metrics = metrics
        self._restarts = None

    def counted(self) -> None:
        if not self.metrics:
            return
        from prometheus_client import Counter

        if self._restarts is None:
            self._restarts = Counter("yikatong_log_keeper_restarts", "Times a replicated "
                                     "node's log keeper ended by itself and was started again")
        self._restarts.inc()

    def command(self, ready_fd: int) -> list[str]:
        spec = ",".join((f"parent={os.getpid()}", f"ready={ready_fd}",
                         *(f"{name}={fd}" for name, fd in self.named_fds.items())))
        return [*self.serve_command, "--keeper-of", spec]

    def poll(self) -> None:
        if self._ready_r >= 0:  # its pid on the pipe once it serves the workers: said once
            try:
                said = os.read(self._ready_r, 64)
            except BlockingIOError:
                said = b""
            if len(said) >= _PID.size:
                log.info("%s (pid %d) serves the workers", self.name,
                         _PID.unpack_from(said)[0])
        super().poll()

    def spawn(self) -> None:
        super().spawn()
        if self._ready_r >= 0:
            os.set_blocking(self._ready_r, False)

"""Prometheus metrics, on `--metrics-listen HOST:PORT` (off by default).

Always prometheus-client's multiprocess mode: every serving process writes its values to files
in `metrics/` under the data dir (PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is
first imported), emptied at every start once the data dir's lock is held, so values a killed
server left behind are never served, and removed at a clean stop. The endpoint is a process of
its own (server/exporter.py, started and restarted by `Exporter` below) that sums the files on
each scrape: so one scrape shows every worker, and no scraper holds a gRPC worker's descriptors
or threads. A worker that dies leaves its counters behind (not lost), and its replacement
writes files of its own (not doubled); its live gauges are dropped (`process_ended`).

The call path pays little: a call is two bound-child updates (counter, histogram). Decisions
are tallied in a plain list per process and added to their counter once a second, since a
streamed batch makes 100 of them per message.
"""
import logging
import os
import select
import shutil
import sys
import threading
import time

from yikatong.model import Channel, Reason
from yikatong.server.workers import Companion

_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0
GATES_SECONDS = 5.0  # each gate's acknowledgement age is looked at this often
DIR_NAME = "metrics"  # under the data dir
READY_SECONDS_MAX = 20.0  # the endpoint process says it listens within this, or is logged
log = logging.getLogger("yikatong.server")


def prepare(data_dir: str) -> str:
    """Point prometheus-client at this data dir's value directory: call before the first
    import of this module's users (the server). Nothing is written yet (`clean`, once the
    data dir's lock is held). Returns the directory."""
    path = os.path.join(os.path.abspath(data_dir), DIR_NAME)
    os.environ[_DIR_ENV] = path
    return path


def clean(path: str) -> None:
    """With the data dir's lock held, before any process writes a value: whatever a server
    killed without a clean stop left there is gone, and the directory is owner-only."""
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Exporter(Companion):
    """The metrics endpoint's process (server/exporter.py), kept running by the process that
    starts it: the only process of one worker (`keep`, a thread waiting on it) or the parent of
    --workers N (a companion of the supervisor: server/workers.py). It ending never touches
    gRPC: it is logged, counted (`yikatong_metrics_endpoint_restarts`) and started again
    after a pause (1 s, doubling up to 30 s while it keeps dying within a minute)."""

    name = "the metrics endpoint"
    meanwhile = "gRPC is not affected"

    def __init__(self, args):
        super().__init__()
        self.argv = [sys.executable, "-m", "yikatong.server.exporter",
                     "--listen", args.metrics_listen,
                     "--read-seconds", str(args.metrics_read_seconds),
                     "--connections-max", str(args.metrics_connections_max),
                     "--log-level", args.log_level]
        if args.metrics_tls_cert:
            self.argv += ["--tls-cert", os.path.abspath(args.metrics_tls_cert),
                          "--tls-key", os.path.abspath(args.metrics_tls_key)]
        if args.metrics_auth:
            self.argv += ["--auth", os.path.abspath(args.metrics_auth)]
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._restarts = None

    def command(self, ready_fd: int) -> list[str]:
        return [*self.argv, "--ready-fd", str(ready_fd), "--parent", str(os.getpid())]

    def wait_ready(self, seconds: float = READY_SECONDS_MAX) -> bool:
        """Until the endpoint listens (True), ends, or `seconds` pass."""
        if self._thread is not None:
            return self.ready.wait(seconds)
        if self._ready_r < 0:
            return False
        ready, _, _ = select.select([self._ready_r], [], [], seconds)
        said = os.read(self._ready_r, 1) if ready else b""
        if not said:
            log.error("metrics endpoint (pid %d) did not start listening within %.0f s",
                      self.pid, seconds)
        return bool(said)

    def counted(self) -> None:
        from prometheus_client import Counter

        if self._restarts is None:
            self._restarts = Counter("yikatong_metrics_endpoint_restarts", "Times the metrics "
                                     "endpoint's process ended by itself and was started again")
        self._restarts.inc()

    def keep(self) -> None:
        """One worker: a thread starts the endpoint and waits on it, again and again (the
        process spawned from it ends with it, PR_SET_PDEATHSIG, so it lives until `stop`)."""
        def run() -> None:
            while not self.stopping.is_set():
                self.proc = None
                self.spawn()
                if self.proc is not None:
                    ready, _, _ = select.select([self._ready_r], [], [], READY_SECONDS_MAX)
                    if ready and os.read(self._ready_r, 1):
                        self.ready.set()
                    code = self.proc.wait()
                    if self.stopping.is_set():
                        return
                    self.counted()
                    self.later(f"(pid {self.proc.pid}) ended (exit {code})")
                if self.due is None:  # stopped before it was started
                    return
                self.stopping.wait(max(0.0, self.due - time.monotonic()))
                self.due = None

        self._thread = threading.Thread(target=run, name="metrics-endpoint", daemon=True)
        self._thread.start()

    def stop(self, seconds: float = 5.0) -> None:
        super().stop(seconds)
        if self._thread is not None:
            self._thread.join(seconds)


_restarts = None


def worker_restarted() -> None:
    """In the parent of --workers: a worker that served ended by itself and is replaced."""
    global _restarts
    from prometheus_client import Counter

    if _restarts is None:
        _restarts = Counter("yikatong_worker_restarts", "Workers that ended by themselves "
                            "and were replaced (a rolling restart's are not counted)")
    _restarts.inc()


def process_ended(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


class NodeMetrics:
    """A replicated node's metrics (storage.replication.Node), in the process that holds it:
    the one process of one worker, or the log keeper of --workers N (`keep`). Live gauges:
    a keeper that ended and was started again leaves none behind."""

    def __init__(self, node):
        from prometheus_client import Gauge, Histogram

        self.node = node
        self._applied = Gauge("yikatong_replication_applied_sequence", "The last record "
                              "of the replicated log applied here", multiprocess_mode="livemax")
        self._log_end = Gauge("yikatong_replication_log_sequence", "The replicated log's "
                              "last sequence, as of this node's last look (every lease "
                              "tick)", multiprocess_mode="livemax")
        self._lag = Gauge("yikatong_replication_lag_records", "Records of the log not yet "
                          "applied here", multiprocess_mode="livemax")
        self._leading = Gauge("yikatong_replication_writer", "1 while this node holds the "
                              "write lease", multiprocess_mode="livemax")
        lag_seconds = Histogram("yikatong_replication_lag_seconds", "From the log taking a "
                                "record to this follower applying it",
                                buckets=_SECONDS_BUCKETS)
        node.on_lag = lag_seconds.observe
        self._snapshot_seq = Gauge(
            "yikatong_snapshot_newest_sequence", "The log sequence of the newest snapshot "
            "in the object store, as this node last looked (0: none)",
            multiprocess_mode="livemax")
        self._snapshot_age = Gauge(
            "yikatong_snapshot_newest_age_seconds", "Seconds since the newest snapshot was "
            "taken (0: none)", multiprocess_mode="livemax")
        self._snapshot_failing = Gauge(
            "yikatong_snapshot_failing", "1 while this node's last snapshot failed",
            multiprocess_mode="livemax")
        self._stop = threading.Event()

    def flush(self) -> None:
        node = self.node
        applied = node.store.applied_sequence
        self._applied.set(applied)
        self._log_end.set(node.log_end)
        self._lag.set(max(0, node.log_end - applied))
        self._leading.set(int(node.leading))
        taker = node.taker
        if taker is not None:
            newest = taker.newest
            self._snapshot_seq.set(newest.log_sequence if newest else 0)
            self._snapshot_age.set(time.time() - taker.newest_at if newest else 0)
            self._snapshot_failing.set(int(bool(taker.last_error)))

    def keep(self) -> None:
        """In the log keeper (no event loop): flushed by a thread of its own until `stop`."""
        def run() -> None:
            while not self._stop.wait(FLUSH_SECONDS):
                self.flush()
        threading.Thread(target=run, name="node-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.node.on_lag = None
        self.flush()


class Metrics:
    """One process's metrics. `enabled` False (no --metrics-listen): every update is skipped
    by its caller's check, and prometheus-client is never imported."""

    def __init__(self):
        self.enabled = False
        self.decisions = [0] * ((max(Channel) + 1) * REASONS)  # [channel * REASONS + reason]

    def start(self, loop, store, watchers=lambda: 0, node=None, clock=None,
              clients=None) -> None:
        """In the serving process, once its event loop runs. `node`: with --replicate,
        the store's place in the cluster (storage.replication.Node); `clock`: the server's
        (the calendar's warning from 1 November); `clients`: the clients file's
        (server/clients.py), whose TRANSIT_GATE clients get a gate's metrics (issue 28)."""
        if _DIR_ENV not in os.environ:
            return
        from prometheus_client import Counter, Gauge, Histogram

        self.enabled = True
        self._calls = Counter("yikatong_calls", "Calls answered, by method and status code",
                              ["method", "code"])
        self._seconds = Histogram("yikatong_call_seconds", "Call duration, by method",
                                  ["method"], buckets=_SECONDS_BUCKETS)
        self._decided = Counter("yikatong_decisions", "Authorization decisions, by channel "
                                "and reason (APPROVED for an approval)", ["channel", "reason"])
        self.group_size = Histogram("yikatong_commit_group_commands", "Commands per "
                                    "group-committed write transaction", buckets=_GROUP_BUCKETS)
        self.commit_seconds = Histogram("yikatong_commit_seconds", "Time of one group "
                                        "commit, from its first command to fsync'ed",
                                        buckets=_SECONDS_BUCKETS)
        self._queue = Gauge("yikatong_writer_queue_depth", "Commands waiting for the writer",
                            multiprocess_mode="livesum")
        self._map_used = Gauge("yikatong_lmdb_map_used_bytes", "LMDB pages in use, in bytes",
                               multiprocess_mode="max")
        self._map_size = Gauge("yikatong_lmdb_map_size_bytes", "LMDB map size now (the writer "
                               "doubles it at 80% used)", multiprocess_mode="max")
        Gauge("yikatong_lmdb_map_size_max_bytes", "The most the LMDB map may grow to "
              "(--map-size-max-mib)", multiprocess_mode="max").set(store.map_size_max)
        self._watchers = Gauge("yikatong_watchers", "Open WatchChanges streams",
                               multiprocess_mode="livesum")
        from yikatong import __version__

        Gauge("yikatong_build_info", "The running release", ["version"],
              multiprocess_mode="livemax").labels(__version__).set(1)
        self._serving = Gauge("yikatong_health_serving", "1 while health says SERVING (0 if "
                              "any worker does not)", multiprocess_mode="livemin")
        self._reason = Gauge("yikatong_not_serving_reason", "1 while this reason keeps health "
                             "NOT_SERVING", ["reason"], multiprocess_mode="livemax")
        self._archive_failing = Gauge(
            "yikatong_archive_failing", "1 while the archive's move has failed "
            "periodic_failures_max times in a row (the hot store grows; health stays SERVING)",
            multiprocess_mode="livemax")
        self._free = Gauge("yikatong_data_dir_free_bytes", "Free bytes on the data dir's "
                           "file system", multiprocess_mode="livemin")
        self._size = Gauge("yikatong_data_dir_size_bytes", "Bytes of the data dir's file "
                           "system (alert YikatongDiskNearlyFull: free under 20% of it)",
                           multiprocess_mode="livemax")
        self._next_year = Gauge("yikatong_calendar_next_year_official", "1 when this year's "
                                "State Council notice is installed and next year's too, or "
                                "before 1 November (0 on 1 January without this year's)",
                                multiprocess_mode="livemin")
        self._provisional = Gauge("yikatong_calendar_provisional_steps", "Open steps whose "
                                  "end is counted provisionally (no notice for its year)",
                                  multiprocess_mode="livemax")
        # issue 28: one series per TRANSIT_GATE client of the clients file (bounded by it)
        self._gate_age = Gauge("yikatong_gate_ack_age_seconds", "Seconds (the server's clock) "
                               "since the gate last acknowledged the change sequence it "
                               "applied; +Inf: never", ["gate"], multiprocess_mode="livemax")
        self._gate_lag = Gauge("yikatong_gate_ack_lag_changes", "Changes of the feed after "
                               "the one the gate last acknowledged; +Inf: never",
                               ["gate"], multiprocess_mode="livemax")
        self._gates: set[str] = set()
        self._clients = clients
        self._gates_due = 0.0
        self._clock = clock
        self._slow_due = 0.0
        self._watching = watchers
        # the node's own metrics where the node is (a worker's Link: in its log keeper)
        self._node = NodeMetrics(node) if node is not None and not node.remote else None
        self._children: dict[tuple[str, str], tuple] = {}
        self._store = store
        self._loop = loop
        store.on_commit = self.committed
        self._timer = loop.call_later(FLUSH_SECONDS, self._flush)

    def call(self, method: str, code: str, seconds: float) -> None:
        child = self._children.get((method, code))
        if child is None:
            child = self._children[(method, code)] = (
                self._calls.labels(method, code), self._seconds.labels(method))
        child[0].inc()
        child[1].observe(seconds)

    def committed(self, commands: int, seconds: float) -> None:
        """From the writer thread, after each group's commit."""
        self.group_size.observe(commands)
        self.commit_seconds.observe(seconds)

    def _flush(self) -> None:
        tally = self.decisions
        for i, n in enumerate(tally):
            if n:
                tally[i] = 0
                self._decided.labels(Channel(i // REASONS).name,
                                     Reason(i % REASONS).name).inc(n)
        self._queue.set(self._store.queue_depth())
        self._watchers.set(self._watching())
        if self._node is not None:
            self._node.flush()
        used, size = self._store.map_use()
        self._map_used.set(used)
        self._map_size.set(size)
        store = self._store
        self._serving.set(int(store.healthy))
        self._archive_failing.set(int(store.archive_failing))
        for reason in REASONS_NOT_SERVING:
            self._reason.labels(reason).set(int(reason in store.not_serving
                                                or (reason == "writer_down"
                                                    and store.writer_error is not None)))
        now = time.monotonic()
        if now >= self._gates_due and self._clients is not None and self._clock is not None:
            self._gates_due = now + GATES_SECONDS  # a read of the gates' acks, off the loop
            self._loop.run_in_executor(None, self._gate_acks)
        if now >= self._slow_due:  # a scan of the open steps and a statvfs: every 30 s
            self._slow_due = now + 30
            fs = os.statvfs(store.data_dir)
            self._free.set(fs.f_bavail * fs.f_frsize)
            self._size.set(fs.f_blocks * fs.f_frsize)
            # a scan of the open steps: off the event loop, in the executor
            self._loop.run_in_executor(None, self._calendar)
        self._timer = self._loop.call_later(FLUSH_SECONDS, self._flush)

    def _calendar(self) -> None:
        from yikatong import calendar

        if self._clock is not None:
            self._next_year.set(int(not calendar.missing_year(self._clock.now())))
        with self._store.read() as txn:
            self._provisional.set(sum(
                sum(s.provisional for s in steps) for _, steps in
                self._store.book(txn).open_steps() if not isinstance(steps, Exception)))

    def _gate_acks(self) -> None:
        from yikatong.model import Role

        gates = {c.id for c in self._clients.all() if c.role == Role.TRANSIT_GATE}
        with self._store.read() as txn:
            book = self._store.book(txn)
            head = book.last_change()
            acks = {g: (s, t) for g, s, t in book.gate_acks() if g in gates}
        now = self._clock.now()
        for gate in gates:
            seq, at = acks.get(gate, (None, None))
            self._gate_age.labels(gate).set(float("inf") if at is None else max(0, now - at))
            self._gate_lag.labels(gate).set(float("inf") if seq is None
                                            else max(0, head - seq))
        for gate in self._gates - gates:  # left the clients file: a series that never alerts
            self._gate_age.labels(gate).set(float("nan"))
            self._gate_lag.labels(gate).set(float("nan"))
        self._gates = gates

    def stop(self) -> None:
        if self.enabled:
            self._timer.cancel()
            self._store.on_commit = None
            if self._node is not None:
                self._node.stop()
            self._slow_due = float("inf")  # no executor job as the server stops
            self._gates_due = float("inf")
            self._flush()
            self._timer.cancel()


REASONS = max(Reason) + 1
REASONS_NOT_SERVING = ("map_full", "disk_full", "corrupt_record", "writer_down",
                       "replication_gap", "replication_stalled", "log_keeper_down")
_SECONDS_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                    2.5, 5, 10)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

metrics = Metrics()

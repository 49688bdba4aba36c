"""Prometheus metrics, on `--metrics-listen HOST:PORT` (off by default).

Always prometheus-client's multiprocess mode: every process writes its values to files in one
directory made for this run (PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is first
imported), and the endpoint sums them. So one scrape shows every worker; a worker that dies
leaves its counters behind (not lost), and its replacement writes files of its own (not
doubled); its live gauges are dropped (`process_ended`).

The call path pays little: a call is two bound-child updates (counter, histogram). Decisions
are tallied in a plain list per process and added to their counter once a second, since a
streamed batch makes 100 of them per message.
"""
import os
import shutil
import tempfile
import time

from yikatong.model import Channel, Reason

_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0


def prepare() -> str:
    """Make this run's value directory and point prometheus-client at it: call before the
    first import of this module's users (the server). Returns the directory."""
    path = tempfile.mkdtemp(prefix="yikatong-metrics-")
    os.environ[_DIR_ENV] = path
    return path


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def serve(listen: str) -> None:
    """The HTTP endpoint (a daemon thread), summing every process's values."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)


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


class Metrics:
    """One process's metrics. `enabled` False (no --metrics-listen): every update is skipped
    by its caller's check, and prometheus-client is never imported."""

    def __init__(self):
        self.enabled = False
        self.decisions = [0] * ((max(Channel) + 1) * REASONS)  # [channel * REASONS + reason]

    def start(self, loop, store, watchers=lambda: 0, node=None, clock=None) -> None:
        """In the serving process, once its event loop runs. `node`: with --replicate,
        the store's place in the cluster (storage.replication.Node); `clock`: the server's
        (the calendar's warning from 1 November)."""
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
        self._free = Gauge("yikatong_data_dir_free_bytes", "Free bytes on the data dir's "
                           "file system", multiprocess_mode="livemin")
        self._next_year = Gauge("yikatong_calendar_next_year_official", "1 when next year's "
                                "State Council notice is installed, or before 1 November",
                                multiprocess_mode="livemin")
        self._provisional = Gauge("yikatong_calendar_provisional_steps", "Open steps whose "
                                  "end is counted provisionally (no notice for its year)",
                                  multiprocess_mode="livemax")
        self._clock = clock
        self._slow_due = 0.0
        self._watching = watchers
        self._node = node
        if node is not None:
            self._applied = Gauge("yikatong_replication_applied_sequence", "The last record "
                                  "of the replicated log applied here", multiprocess_mode="max")
            self._log_end = Gauge("yikatong_replication_log_sequence", "The replicated log's "
                                  "last sequence, as of this node's last look (every lease "
                                  "tick)", multiprocess_mode="max")
            self._lag = Gauge("yikatong_replication_lag_records", "Records of the log not yet "
                              "applied here", multiprocess_mode="max")
            self._leading = Gauge("yikatong_replication_writer", "1 while this node holds the "
                                  "write lease", multiprocess_mode="max")
            lag_seconds = Histogram("yikatong_replication_lag_seconds", "From the log taking a "
                                    "record to this follower applying it",
                                    buckets=_SECONDS_BUCKETS)
            node.on_lag = lag_seconds.observe
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
            applied = self._store.applied_sequence
            self._applied.set(applied)
            self._log_end.set(self._node.log_end)
            self._lag.set(max(0, self._node.log_end - applied))
            self._leading.set(int(self._node.leading))
        used, size = self._store.map_use()
        self._map_used.set(used)
        self._map_size.set(size)
        store = self._store
        self._serving.set(int(store.healthy))
        for reason in REASONS_NOT_SERVING:
            self._reason.labels(reason).set(int(reason in store.not_serving
                                                or (reason == "writer_down"
                                                    and store.writer_error is not None)))
        now = time.monotonic()
        if now >= self._slow_due:  # a scan of the open steps and a statvfs: every 30 s
            self._slow_due = now + 30
            fs = os.statvfs(store.data_dir)
            self._free.set(fs.f_bavail * fs.f_frsize)
            # a scan of the open steps: off the event loop, in the executor
            self._loop.run_in_executor(None, self._calendar)
        self._timer = self._loop.call_later(FLUSH_SECONDS, self._flush)

    def _calendar(self) -> None:
        from yikatong import calendar

        if self._clock is not None:
            self._next_year.set(int(not calendar.missing_next_year(self._clock.now())))
        with self._store.read() as txn:
            self._provisional.set(sum(
                sum(s.provisional for s in steps) for _, steps in
                self._store.book(txn).open_steps() if not isinstance(steps, Exception)))

    def stop(self) -> None:
        if self.enabled:
            self._timer.cancel()
            self._store.on_commit = None
            if self._node is not None:
                self._node.on_lag = None
            self._slow_due = float("inf")  # no executor job as the server stops
            self._flush()
            self._timer.cancel()


REASONS = max(Reason) + 1
REASONS_NOT_SERVING = ("map_full", "disk_full", "corrupt_record", "writer_down")
_SECONDS_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                    2.5, 5, 10)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

metrics = Metrics()

"""Snapshots of a replicated store in the JetStream object store (issue 26).

A snapshot is a backup (storage/backup.py: LMDB's compacted copy, verified, with its
manifest) of one node's store at some log sequence, put in the object store bucket
YIKATONG_SNAPSHOTS as the object `snapshot-<log sequence, 20 digits>`, its manifest as the
object's description. With snapshots, the log need not keep every record since the first:
a node that starts with no store (new, or its disk wiped) lays out the newest snapshot (with
the archive's segments it records, objects `archive-NNNNNNNNNN.seg`, each put once) and
applies the log's tail (whose records carry the segments archived since); `yikatong restore
--replicate` rebuilds the state as of any log sequence a snapshot and the log still cover.

Who takes one (Node, every tick): a follower when one is up (the first by node id: it
spends its own disk and CPU, not the writer's), the writer when it is alone; once its store
is `every_records` past the newest snapshot, or `every_seconds` after it. Then the oldest
beyond `keep` are deleted and the log is purged below the oldest kept snapshot, never below
a record a node that is up still has to apply.
"""
import asyncio
import base64
import concurrent.futures
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nats.errors
import nats.js.api
import nats.js.errors

from yikatong import config
from yikatong.errors import LogUnavailable
from yikatong.storage import archive, backup

log = logging.getLogger("yikatong.snapshots")
BUCKET = "YIKATONG_SNAPSHOTS"
PREFIX = "snapshot-"
SEGMENT_PREFIX = "archive-"  # + the segment's file name: the archive's segments (--retain-days)
PRUNE_SECONDS = 5.0
_UNREACHABLE = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError, concurrent.futures.TimeoutError)


def name_of(sequence: int) -> str:
    return f"{PREFIX}{sequence:020d}"


class Snapshots:
    """The snapshot bucket, through a replication.Log's connection."""

    def __init__(self, log_, replicas: int = 3, timeout: float = 60.0):
        self.log, self.timeout = log_, timeout
        self.obs = self._run(self._bucket(replicas), 30)
        # segments known to be in the bucket, these very bytes (a committed segment never
        # changes): not read, hashed and asked about again at every snapshot
        self._segments_put: set[int] = set()

    def _run(self, coro, timeout: float | None = None):
        """`coro` on the log's loop (Log._run: cancelled when its time runs out)."""
        try:
            return self.log._run(coro, timeout or self.timeout)
        except _UNREACHABLE:
            raise LogUnavailable(f"the snapshot bucket {BUCKET} did not answer") from None

    def _moving(self, size: int) -> float:
        """The time an upload or download of `size` bytes may take: the base timeout, plus
        a second per 4 MB (a snapshot of a city's store is gigabytes)."""
        return self.timeout + size / 4e6

    async def _bucket(self, replicas: int):
        js = self.log._js
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                try:
                    return await js.object_store(BUCKET)
                except nats.js.errors.BucketNotFoundError:
                    return await js.create_object_store(BUCKET, nats.js.api.ObjectStoreConfig(
                        description="yikatong: snapshots of the replicated store",
                        replicas=replicas))
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as error:
                from yikatong.storage.replication import forming

                if isinstance(error, nats.js.errors.APIError) and not forming(error):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def list(self) -> list[backup.Manifest]:
        """Every snapshot's manifest, oldest first."""
        async def listed():
            try:
                return await self.obs.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:
                return []
        out = []
        for info in self._run(listed()):
            if info.deleted or not (info.name or "").startswith(PREFIX):
                continue
            try:
                out.append(backup.Manifest(**json.loads(info.description or "")))
            except (ValueError, TypeError):
                log.error("snapshot %s has no readable manifest; ignored", info.name)
        return sorted(out, key=lambda m: m.log_sequence)

    def put(self, path: str, manifest: backup.Manifest, segments_in: str) -> None:
        """The copy of the store alone at `path` (`backup --store-only`) as the snapshot at
        its sequence: the archive's segments it records first, from `segments_in` (the data
        dir's archive; each an object of its own, put once: a segment never changes), then
        the copy, its manifest the description."""
        name = name_of(manifest.log_sequence)
        for n in range(1, manifest.archive_segments + 1):
            if n not in self._segments_put:  # this process put it, or saw it there, before
                self._put_segment(segments_in, n)
                self._segments_put.add(n)

        async def put():
            with open(os.path.join(path, "lmdb", "data.mdb"), "rb") as f:
                await self.obs.put(name, f, meta=nats.js.api.ObjectMeta(
                    name=name, description=json.dumps(dataclasses.asdict(manifest),
                                                      sort_keys=True)))
        self._run(put(), self._moving(manifest.data_bytes))

    def _put_segment(self, where: str, n: int) -> None:
        """Segment `n` as an object, unless the bucket holds these very bytes already (put
        by an earlier snapshot: a segment never changes); one whose put was cut, or of
        another history, is put again."""
        name, path = SEGMENT_PREFIX + archive.name_of(n), archive.path_of(where, n)
        with open(path, "rb") as f:
            data = f.read()
        digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()

        async def put():
            try:
                info = await self.obs.get_info(name)
                if info.digest == digest and info.size == len(data):
                    return
            except nats.js.errors.NotFoundError:  # (ObjectNotFoundError, deleted)
                pass
            await self.obs.put(name, data)
        self._run(put(), self._moving(len(data)))

    def fetch(self, manifest: backup.Manifest, to: str) -> backup.Manifest:
        """The snapshot of `manifest` laid out as a backup at `to` (a new path), verified
        (backup.verify: the bytes the manifest hashed, every record, the ledger, the audit
        chain); backup.Unverified if it does not."""
        os.mkdir(to, backup.DIR_MODE)
        os.mkdir(os.path.join(to, "lmdb"), backup.DIR_MODE)
        fd = os.open(os.path.join(to, "lmdb", "data.mdb"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     backup.FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            self._run(self.obs.get(name_of(manifest.log_sequence), writeinto=f),
                      self._moving(manifest.data_bytes))
        if manifest.archive_segments:  # the segments it records: backup.verify checks them
            os.mkdir(os.path.join(to, archive.DIR), archive.DIR_MODE)
        for n in range(1, manifest.archive_segments + 1):
            fd = os.open(archive.path_of(os.path.join(to, archive.DIR), n),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, archive.FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                self._run(self.obs.get(SEGMENT_PREFIX + archive.name_of(n), writeinto=f))
        fd = os.open(os.path.join(to, backup.MANIFEST), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     backup.FILE_MODE)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(manifest), f)
        return backup.verify(to)

    def delete(self, manifest: backup.Manifest) -> None:
        self._run(self.obs.delete(name_of(manifest.log_sequence)))


def bootstrap(log_, data_dir: str, work: str) -> backup.Manifest | None:
    """A node starting with no store: the newest snapshot laid out as its store (verified
    first; an older one if the newest does not verify). None when there is no snapshot
    (the log from record 1 builds the store)."""
    from yikatong.storage.replication import starting

    snapshots = starting("the snapshot bucket", lambda: Snapshots(log_))
    failed = ""
    for manifest in reversed(starting("the snapshot bucket", snapshots.list)):
        staging = tempfile.mkdtemp(prefix="snapshot-", dir=work)
        shutil.rmtree(staging)
        try:
            started = time.monotonic()
            snapshots.fetch(manifest, staging)
            backup.restore(staging, data_dir)
            log.info("store laid out from snapshot %s in %.1f s",
                     name_of(manifest.log_sequence), time.monotonic() - started,
                     extra={"fields": {"log_sequence": manifest.log_sequence}})
            return manifest
        except (backup.BackupError, LogUnavailable, OSError, nats.errors.Error) as error:
            failed = f"snapshot {name_of(manifest.log_sequence)}: {error}"
            log.error("%s; trying an older one", failed)
            shutil.rmtree(os.path.join(data_dir, "lmdb"), ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if failed:  # snapshots there are, none laid out: no empty store in their place
        raise LogUnavailable(f"no snapshot could be laid out (the last tried: {failed})")
    return None


@dataclasses.dataclass
class Policy:
    every_records: int = 0  # 0: not by count
    every_seconds: float = 0  # 0: not by time
    keep: int = 2
    margin: int = config.log_purge_margin_records  # records kept below the purge floor


class Taker:
    """A node's snapshots: `tick()` each lease tick, from the node's own thread; the copy and
    the upload run in a thread of their own, one at a time."""

    def __init__(self, node, policy: Policy, work: str):
        self.node, self.policy, self.work = node, policy, work
        self.snapshots = Snapshots(node.log)
        kept = self.snapshots.list()
        self.newest: backup.Manifest | None = None
        self.newest_at = time.time()  # when the newest was taken (now, if there is none)
        self._saw(kept)
        self.taken = 0
        self.last_error = ""
        # after a failed snapshot, the next try not before `retry_at` (monotonic), the wait
        # doubling from config.snapshot_retry_seconds up to its max: every attempt copies the
        # whole store, and a cause that stays (the bucket's room) would copy it back to back
        self.retry_at = 0.0
        self.retry_seconds = config.snapshot_retry_seconds
        self._pruned_at = time.monotonic()
        self._running: concurrent.futures.Future | None = None
        self._child: subprocess.Popen | None = None  # a copy under way (take)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "yikatong-snapshot")

    def due(self) -> bool:
        applied = self.node.store.applied_sequence
        since = self.newest.log_sequence if self.newest else 0
        if applied <= since:
            return False
        if self.policy.every_records and applied - since >= self.policy.every_records:
            return True
        return bool(self.policy.every_seconds) and \
            time.time() - self.newest_at >= self.policy.every_seconds

    def tick(self, mine: bool) -> None:
        """`mine`: this node is the one to take snapshots now. Between snapshots it purges
        the log again every PRUNE_SECONDS: a node that lagged when the last snapshot was
        taken held the purge back, and has caught up since."""
        if self._running is not None and not self._running.done():
            return
        if mine and self.due() and time.monotonic() >= self.retry_at:
            self._running = self._pool.submit(self.take)
        elif time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self._pruned_at = time.monotonic()
            self._running = self._pool.submit(self._look, mine)

    def _saw(self, kept: list[backup.Manifest]) -> None:
        """The newest snapshot in the bucket, whoever took it (due() and the metrics)."""
        if kept and (self.newest is None or kept[-1].log_sequence > self.newest.log_sequence):
            self.newest = kept[-1]
            try:
                self.newest_at = _dt.datetime.strptime(
                    self.newest.taken_at, "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=_dt.UTC).timestamp()
            except ValueError:
                self.newest_at = time.time()

    def _look(self, mine: bool) -> None:
        """Between snapshots: the bucket looked at again, and (on the node that takes them)
        the log purged again."""
        try:
            self._saw(self.snapshots.list())
            if mine and self.newest is not None:
                self.prune()
        except Exception as error:  # noqa: BLE001 - logged; tried again later
            log.error("looking at the snapshots or purging the log failed: %s", error)

    def take(self) -> backup.Manifest | None:
        """The copy is `yikatong backup` in a child process: a read transaction open in this
        process for the whole copy (seconds per GB) would hold back the map's growth
        (mdb_env_set_mapsize waits for every transaction of its process), and every write
        group meanwhile. The child's transaction keeps the copy's pages, nothing else."""
        store = self.node.store
        path = os.path.join(self.work, f"snapshot-{os.getpid()}-{time.monotonic_ns()}")
        try:
            started = time.monotonic()
            self._copy(store.data_dir, path, self.snapshots._moving(store.map_use()[0]))
            manifest = backup.manifest_of(path)  # the store alone: the segments from the
            self.snapshots.put(path, manifest, archive.archive_dir(store.data_dir))  # data dir
            self.newest, self.newest_at, self.taken = manifest, time.time(), self.taken + 1
            log.info("snapshot %s taken in %.1f s", name_of(manifest.log_sequence),
                     time.monotonic() - started,
                     extra={"fields": {"bytes": manifest.data_bytes}})
            self.prune()
            self.last_error = ""
            self.retry_at, self.retry_seconds = 0.0, config.snapshot_retry_seconds
            return manifest
        except Exception as error:  # noqa: BLE001 - logged; tried again after a wait
            self.last_error = str(error)
            log.error("a snapshot failed: %s; the next try in %.0f s", error, self.retry_seconds)
            self.retry_at = time.monotonic() + self.retry_seconds
            self.retry_seconds = min(2 * self.retry_seconds, config.snapshot_retry_seconds_max)
            return None
        finally:
            for leftover in (path, f"{path}.partial"):  # .partial: a child that was stopped
                shutil.rmtree(leftover, ignore_errors=True)

    def _copy(self, data_dir: str, path: str, timeout: float) -> None:
        """`yikatong backup --data-dir DATA_DIR --to PATH --store-only` (verified before it
        says done; the archive's segments are not copied: each goes to the bucket once, from
        the data dir), in a child process that `stop` ends; BackupError with its one line if
        it fails."""
        child = subprocess.Popen(
            [sys.executable, "-m", "yikatong", "backup", "--data-dir", data_dir, "--to", path,
             "--store-only"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._child = child
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise backup.BackupError(f"the copy took more than {timeout:.0f} s") from None
        finally:
            self._child = None
        if child.returncode:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            raise backup.BackupError(lines[-1] if lines and child.returncode > 0 else
                                     f"the copy ended with status {child.returncode}")

    def prune(self) -> None:
        """Keep the newest `keep`; purge the log below the oldest kept, but never past a
        record a node that is up has yet to apply, less the policy's margin (a
        node whose power was cut may come back a commit or so before what it reported)."""
        kept = self.snapshots.list()
        for old in kept[:-self.policy.keep] if self.policy.keep else []:
            self.snapshots.delete(old)
        kept = kept[-self.policy.keep:] if self.policy.keep else kept
        if not kept:
            return
        floor = kept[0].log_sequence
        for report in self.node.reports_up():
            floor = min(floor, report.get("applied", 0))
        floor -= self.policy.margin
        if floor >= self.node.log.first_sequence():  # something left to purge
            self.node.log.purge(floor)

    def stop(self) -> None:
        """A copy under way is ended (a snapshot is only ever a finished one): the node
        stops at once, not when the copy would have."""
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGKILL)
        self._pool.shutdown(wait=True, cancel_futures=True)


def restore_to(urls: list[str], sequence: int, data_dir: str) -> tuple[int, int]:
    """`yikatong restore --replicate URLS --to-sequence N --data-dir NEW`: the store as of log
    sequence N in `data_dir` (holding no store): the newest snapshot at or before N, then the
    log's records after it up to N. (the snapshot's sequence, 0 for none; records applied).
    backup.BackupError when the snapshots and the log do not cover N."""
    from yikatong.storage.replication import Log

    log_ = Log(urls, create=False)
    try:
        last, first = log_.last_sequence(), log_.first_sequence()
        if not 0 < sequence <= last:
            raise backup.BackupError(f"--to-sequence {sequence}: the log's records are "
                                     f"numbered 1 to {last}")
        snapshots = Snapshots(log_)
        covering = [m for m in snapshots.list() if m.log_sequence <= sequence]
        base = covering[-1] if covering else None
        start = (base.log_sequence if base else 0) + 1
        if start < first:
            raise backup.BackupError(
                f"sequence {sequence} is not covered: the newest snapshot at or before it ends "
                f"at {start - 1} and the log keeps records from {first} on")
        if os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
            raise backup.BackupError(f"{data_dir} holds a store: restore never overwrites one")
        # built beside it and moved in whole: a restore that fails or is killed leaves no
        # store in data_dir that passes for the state as of `sequence`
        building = os.path.abspath(data_dir).rstrip("/") + ".restoring"
        shutil.rmtree(building, ignore_errors=True)  # one left by a restore that was killed
        try:
            _build(log_, snapshots, base, start, sequence, building)
            os.makedirs(data_dir, backup.DIR_MODE, exist_ok=True)
            names = sorted(set(os.listdir(building)) - {"yikatong.lock", "lmdb"}) + ["lmdb"]
            for name in names:
                if os.path.exists(os.path.join(data_dir, name)):
                    raise backup.BackupError(f"{data_dir} holds {name}: restore never "
                                             "overwrites one")
            for name in names:  # the store last: there is none until all of it is there
                os.rename(os.path.join(building, name), os.path.join(data_dir, name))
        finally:
            shutil.rmtree(building, ignore_errors=True)
        return (base.log_sequence if base else 0), sequence - start + 1
    finally:
        log_.close()


def _build(log_, snapshots: Snapshots, base, start: int, sequence: int, data_dir: str) -> None:
    """restore_to's store in `data_dir` (new): the snapshot `base` (None: none), then the
    log's records `start` to `sequence`."""
    from yikatong.storage.lmdb_store import Book, Store

    if base is not None:
        os.makedirs(data_dir, backup.DIR_MODE, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="snapshot-", dir=data_dir)
        shutil.rmtree(staging)
        try:
            snapshots.fetch(base, staging)
            backup.restore(staging, data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    store = Store(data_dir)
    try:
        seq = start
        while seq <= sequence:
            batch: list[tuple[bytes, int | None]] = []
            while seq <= sequence and len(batch) < 256:
                found = log_.read(seq)
                if found is None:
                    raise backup.BackupError(f"log record {seq} is gone from the log")
                batch.append((found[0], found[2]))
                seq += 1

            def apply(book: Book, batch=batch) -> None:
                for record, term in batch:
                    book.apply_journal(record, term)
            store.write(apply)
    finally:
        store.close()


def clean_staging(data_dir: str) -> None:
    """Staging directories (`snapshot-*` in the data dir) left by a node killed while it
    took or fetched a snapshot: each a copy of every holder's data."""
    if not os.path.isdir(data_dir):
        return
    for name in os.listdir(data_dir):
        if name.startswith("snapshot-"):
            shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)

"""Backups anyone can take and trust (issue 26).

`take(data_dir, to)` copies a live store: LMDB's own compacted copy, made in one read
transaction beside the running server (which keeps writing: the copy is the state as of
one commit), into `to`, a new directory (0700) of owner-only files (0600: it holds personal
information). It is verified before it is called done, and a manifest is written beside it:

    to/lmdb/data.mdb        the copy, laid out as a data dir of its own
    to/archive/NNN.seg      the archive's segments the copy records (--retain-days,
                            storage/archive.py), their chain verified with the copy
    to/manifest.json        what the copy holds (Manifest), last: a backup without one is
                            unfinished

`verify(path)` checks a backup against its manifest and its own records: every record decodes
with this release's decoders, the ledger's columns sum to zero and no holder account is
negative, the audit chain holds, and the file is the one the manifest hashed. `restore`
verifies first and refuses a backup that does not verify, then lays it out as a new data dir.
What a copy cannot hold is anything acknowledged after it: docs/OPERATIONS.md says how often
to take one and where the log (`--replicate`) keeps the rest.
"""
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
from types import SimpleNamespace
from typing import Any

import lmdb

from yikatong import __version__, config, ledger
from yikatong.errors import CorruptRecord, StoreFormat
from yikatong.storage import archive, migrate, records

MANIFEST = "manifest.json"
DIR_MODE, FILE_MODE = 0o700, 0o600


class BackupError(Exception):
    """A backup that cannot be taken, verified or restored: one line saying why."""


class Unverified(BackupError):
    """A copy whose records, ledger, audit chain or manifest do not hold."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    format: int  # the store format of the copy
    written_by: str  # the release that took it
    taken_at: str  # UTC, ISO 8601
    change_sequence: int  # the last change event the copy holds (WatchChanges' sequence)
    log_sequence: int  # the replicated log's last record it holds (0: not replicated)
    audit_events: int
    audit_head: str  # hex hash of the last audit event (64 zeros: none)
    ledger_totals: list[int]  # debits pending, posted; credits pending, posted (fen)
    records: dict[str, int]  # named database -> entries
    data_bytes: int
    data_sha256: str
    archive_segments: int = 0  # the archive's segments the copy records (storage/archive.py)
    archive_head: str = ""  # hex hash of the last one ("": none)


def take(data_dir: str, to: str, now: _dt.datetime | None = None,
         archive_too: bool = True) -> Manifest:
    """Copy the store of `data_dir` (running or stopped) to `to`, verify it, write its
    manifest. `to` must not exist: a backup never overwrites one. BackupError if it cannot;
    nothing is left at `to` then. `archive_too=False` (a snapshot's copy: its segments go to
    the snapshot bucket once each, from the data dir): the store alone, its audit chain
    verified from the archive's recorded end on."""
    source = os.path.join(data_dir, "lmdb")
    if not os.path.exists(os.path.join(source, "data.mdb")):
        raise BackupError(f"no store in {data_dir}")
    try:
        env = lmdb.open(source, readonly=True, max_dbs=config.lmdb_max_dbs, lock=True)
    except lmdb.Error as error:
        raise BackupError(f"cannot open the store in {data_dir}: {error}") from None
    try:
        return take_env(env, to, now, archive_too=archive_too)
    finally:
        env.close()


def take_env(env, to: str, now: _dt.datetime | None = None, read=None,
             archive_too: bool = True) -> Manifest:
    """take() of an open environment (a running Store's own `env`: LMDB forbids opening one
    twice in a process). `read()`: the read transaction to copy in (a Store's `read`, which
    holds its map still while the copy runs); env.begin by default."""
    if os.path.lexists(to):
        raise BackupError(f"{to} exists: a backup goes to a new path")
    parent = os.path.dirname(os.path.abspath(to))
    if not os.path.isdir(parent):
        raise BackupError(f"{parent} is not a directory")
    partial = f"{to}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # one left by a backup that was killed
    try:
        found, _ = _grown(env, lambda: migrate.stored_format(env))
        if found != migrate.FORMAT:
            raise BackupError(f"the store in {env.path()} is format {found}; this release "
                              f"backs up format {migrate.FORMAT} (`yikatong migrate` first)")
        for d in (partial, os.path.join(partial, "lmdb")):
            os.mkdir(d, DIR_MODE)
            os.chmod(d, DIR_MODE)
        copy = os.path.join(partial, "lmdb", "data.mdb")
        # created owner-only before LMDB writes a byte into it (LMDB's own would be 0644)
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with _grown(env, read or env.begin) as txn:
                env.copyfd(fd, compact=True, txn=txn)
            os.fsync(fd)
        finally:
            os.close(fd)
        if archive_too:
            _copy_archive(env, copy, partial)
        manifest = _read(copy, now or _dt.datetime.now(_dt.UTC), archive_too)
        _write_manifest(partial, manifest)
        os.rename(partial, to)
        _fsync_dir(parent)
    except (lmdb.Error, OSError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(f"cannot copy the store in {env.path()}: {error}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _grown(env, begin):
    """begin(), again after taking the map's new size when the running server grew it since
    this process opened the store (MDB_MAP_RESIZED: LMDB's remedy, mdb_env_set_mapsize 0;
    a backup under write load met it once the writer got faster)."""
    try:
        return begin()
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        return begin()


def manifest_of(path: str) -> Manifest:
    """The manifest the backup at `path` states (Unverified if it has none): what `verify`
    checks the copy against."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            stated = Manifest(**json.load(f))
    except FileNotFoundError:
        raise Unverified(f"{path} has no {MANIFEST}: not a backup, or an unfinished one") \
            from None
    except (OSError, ValueError, TypeError) as error:
        raise Unverified(f"{path}/{MANIFEST} is unreadable: {error}") from None
    return stated


def verify(path: str) -> Manifest:
    """The manifest of the backup at `path` if the backup is whole and its records hold;
    BackupError naming the first thing wrong otherwise."""
    stated = manifest_of(path)
    copy = os.path.join(path, "lmdb", "data.mdb")
    if not os.path.isfile(copy):
        raise Unverified(f"{path} has no lmdb/data.mdb")
    size, digest = _hash(copy)
    if (size, digest) != (stated.data_bytes, stated.data_sha256):
        raise Unverified(f"{copy} is not the file its manifest describes ({size:,} bytes, "
                          f"sha256 {digest[:16]}..., manifest: {stated.data_bytes:,}, "
                          f"{stated.data_sha256[:16]}...)")
    found = _read(copy, None)
    for field in dataclasses.fields(Manifest):
        if field.name in ("taken_at", "written_by"):
            continue
        if getattr(found, field.name) != getattr(stated, field.name):
            raise Unverified(f"{path}: {field.name} is {getattr(found, field.name)!r}, its "
                              f"manifest says {getattr(stated, field.name)!r}")
    return stated


def restore(path: str, data_dir: str) -> Manifest:
    """Lay out the backup at `path` as the store of `data_dir` (which holds none yet), once
    it verifies."""
    manifest = verify(path)
    lmdb_dir = os.path.join(data_dir, "lmdb")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise BackupError(f"{data_dir} is not a directory")
    if os.path.exists(os.path.join(lmdb_dir, "data.mdb")):
        raise BackupError(f"{data_dir} holds a store: restore never overwrites one (move it "
                          "aside, or restore into a new data dir)")
    kept = archive.archive_dir(data_dir)
    ours = {os.path.basename(archive.path_of(kept, n)): n
            for n in range(1, manifest.archive_segments + 1)}
    for name in os.listdir(kept) if os.path.isdir(kept) else []:
        if name.endswith(".partial"):  # a copy cut short
            os.remove(os.path.join(kept, name))
            continue
        # only what a restore of this very backup cut short left there is written over
        n = ours.get(name)
        if n is None or _hash(os.path.join(kept, name))[1] != _hash(
                archive.path_of(os.path.join(path, archive.DIR), n))[1]:
            raise BackupError(f"{data_dir} holds an archive: restore never overwrites one "
                              "(move it aside with its store)")
    target = os.path.join(lmdb_dir, "data.mdb")
    partial = target + ".partial"
    try:
        for d in (data_dir, lmdb_dir):
            os.makedirs(d, DIR_MODE, exist_ok=True)
            os.chmod(d, DIR_MODE)
        _restore_archive(path, data_dir, manifest.archive_segments)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with open(os.path.join(path, "lmdb", "data.mdb"), "rb") as src:
                while chunk := src.read(1 << 20):
                    os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        # checked before it becomes the store: a bad copy never stands in a data dir
        if _hash(partial)[1] != manifest.data_sha256:
            raise BackupError(f"{target} does not match the backup after copying: disk "
                              "error? nothing was restored")
        os.rename(partial, target)
        _fsync_dir(lmdb_dir)
    except OSError as error:
        raise BackupError(f"cannot restore into {data_dir}: {error}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return manifest


def _read(copy: str, now: _dt.datetime | None, archive_too: bool = True) -> Manifest:
    """What the copy holds, once every check passes (`archive_too`: the archive's segments
    beside it too)."""
    try:
        env = lmdb.open(os.path.dirname(copy), readonly=True, lock=False, subdir=True,
                        max_dbs=config.lmdb_max_dbs)
    except lmdb.Error as error:
        raise Unverified(f"the copy {copy} does not open: {error}") from None
    try:
        with env.begin() as txn:
            names = {bytes(k) for k in txn.cursor().iternext(values=False)}
            dbs = {n: env.open_db(n, txn=txn, create=False) for n in names}
            found, by = migrate.stored_format(env)
            if found != migrate.FORMAT:
                raise Unverified(f"the copy is store format {found}, not {migrate.FORMAT}")
            migrate.check_records(env, txn)
            from yikatong.storage.lmdb_store import Book

            book = Book(txn, SimpleNamespace(  # type: ignore[arg-type]
                **{n.decode(): db for n, db in dbs.items()}, audit_head=(0, bytes(32))))
            try:
                ledger.check_invariants(book)
            except AssertionError as error:
                raise Unverified(f"the copy's ledger does not hold: {error}") from None
            segments, last = archive.head(book) if b"meta" in dbs else (0, b"")
            # the archive's chain (its segments beside the copy), then the copy's own
            ok, events, bad, problem = archive.verify_audit(
                book, os.path.join(os.path.dirname(os.path.dirname(copy)), archive.DIR),
                segments=archive_too) if b"audit" in dbs else (True, 0, 0, "")
            if not ok:
                raise Unverified(f"the copy's audit chain is broken at event {bad}: {problem}")
            head = bytes(32)
            for _, event in book.audit_records(max(events - 1, 0)):
                head = records.audit_hash_of(event)
            manifest: dict[str, Any] = dict(
                format=found, written_by=f"yikatong {__version__}",
                taken_at=(now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                change_sequence=book.last_change() if b"changes" in dbs else 0,
                log_sequence=book.log_sequence() if b"meta" in dbs else 0,
                audit_events=events, audit_head=head.hex(),
                ledger_totals=list(book.ledger_totals()) if b"meta" in dbs else [0, 0, 0, 0],
                records={n.decode(): txn.stat(db)["entries"] for n, db in sorted(dbs.items())},
                archive_segments=segments, archive_head=last.hex() if segments else "")
    except (CorruptRecord, StoreFormat, UnicodeError) as error:
        raise Unverified(f"the copy does not read back: {error}") from None
    except lmdb.Error as error:
        raise Unverified(f"the copy {copy} is unreadable: {error}") from None
    finally:
        env.close()
    size, digest = _hash(copy)
    return Manifest(**manifest, data_bytes=size, data_sha256=digest)


def _copy_archive(env, copy: str, partial: str) -> None:
    """The archive's segments that the copy records (1 to its meta archive:head count), from
    beside the store into the backup (0700, 0600). Segments are written once and never
    changed, and the store records one only after it is on disk: every one the copy names is
    there, whole, whatever the server archives meanwhile."""
    source = os.path.join(os.path.dirname(os.path.abspath(env.path())), archive.DIR)
    count = _segments_of(copy)
    if not count:
        return
    target = os.path.join(partial, archive.DIR)
    os.mkdir(target, DIR_MODE)
    os.chmod(target, DIR_MODE)
    for n in range(1, count + 1):
        _copy_file(archive.path_of(source, n), archive.path_of(target, n))
    _fsync_dir(target)


def _segments_of(copy: str) -> int:
    env = lmdb.open(os.path.dirname(copy), readonly=True, lock=False, subdir=True,
                    max_dbs=config.lmdb_max_dbs)
    try:
        with env.begin() as txn:
            try:
                meta = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.NotFoundError:
                return 0
            value = txn.get(archive.HEAD_KEY, db=meta)
    finally:
        env.close()
    return 0 if value is None else int.from_bytes(bytes(value)[:4], "little")


def _copy_file(source: str, target: str) -> None:
    """Copied whole under a temporary name, then renamed: a copy cut short is never taken
    for the file."""
    partial = target + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with open(source, "rb") as src:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, target)


def _restore_archive(path: str, data_dir: str, count: int) -> None:
    """The backup's segments laid out again in the new data dir's archive (before its
    data.mdb, which comes last: a restore cut short leaves no store)."""
    if not count:
        return
    target = archive.archive_dir(data_dir)
    os.makedirs(target, DIR_MODE, exist_ok=True)
    os.chmod(target, DIR_MODE)
    for n in range(1, count + 1):
        _copy_file(archive.path_of(os.path.join(path, archive.DIR), n),
                   archive.path_of(target, n))
    _fsync_dir(target)


def _write_manifest(path: str, manifest: Manifest) -> None:
    fd = os.open(os.path.join(path, MANIFEST), os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(manifest), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)


def _hash(path: str) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

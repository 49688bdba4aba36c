"""The archive: records older than the retention window, out of LMDB (issue 26, part 3).

`move(book, now, retain_seconds)` runs in the writer's periodic group (the server's
`--retain-days`): from the oldest on, up to `config.archive_batch_max` of each kind whose time
is before `now - retain_seconds` leave the hot store for one new segment:

- change events (never the newest: the next sequence is read from it),
- audit events (never the newest: the chain's head is read from it),
- transfers in a final state (posted, voided, expired: never an open hold), each when the
  change event that names it goes,
- remembered answers (the `answers` database, oldest first; meta `archive:answers` keeps
  the last sequence moved, where the next one given goes on from when none is left hot); for
  each, a digest of its id stays hot (`archived_ids`: 16 bytes of SHA-256 -> the u32 segment
  number), so a replay of it is answered from its segment, never done twice.

A segment, data_dir/archive/NNNNNNNNNN.seg (0600 in a 0700 directory), append-only, written
once and never changed:

    b"YKAR\\x01"            magic and layout version
    u32 LE                  manifest length
    manifest                JSON, sorted keys: what it holds (kinds, counts, sequences, times),
                            `prev_hash` (the segment before's hash), `through` (the last
                            change and audit sequence archived up to and including it)
    payload                 one zstd frame: for each kind in KINDS (the manifest's
                            `payload_kinds`; without it the first four), u32 count, then each
                            record as u32 key length, key, u32 value length, value (the bytes
                            LMDB held, read back by storage/records.py's decoders)
    32 bytes                SHA-256 over everything before it: the segment's hash

Crash-safe: a segment is written to NAME.tmp, fsynced, renamed and its directory fsynced, and
only then does the LMDB transaction that deletes the moved records and records the archive's
head (meta `archive:head`: the segment count and the last one's hash) commit. A segment on disk
beyond the recorded count (a crash between the two) is removed by the next move, which writes
it again from the records still in the hot store.

Replicated (`--replicate`): the writer moves, and the segment's bytes travel in the commit
group's replication record ahead of its deletes (`SEGMENT_OP`); every node applying the
record writes the same segment the same way (`write_replicated`, its hash checked) before
the deletes commit, so every node holds the same archive and a new writer after a failover
goes on from it. Snapshots carry the segments their store records (storage/snapshots.py).
"""
import bisect
import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator

import zstandard

from yikatong import __version__, config
from yikatong.errors import CorruptRecord, YikatongError
from yikatong.model import TransferStatus
from yikatong.storage import records

log = logging.getLogger("yikatong.archive")
DIR = "archive"
MAGIC = b"YKAR\x01"
KINDS = ("changes", "audit", "transfers", "requests", "journeys")
# a segment's payload holds these kinds, in this order, unless its manifest names its own
# (`payload_kinds`): segments before journeys were archived (2026-12-07) hold the first four
_KINDS_BEFORE_JOURNEYS = KINDS[:4]
# in a replication record: a segment's bytes (key: its file name), written by every node
# applying the record before its deletes (records.encode_journal's database name)
SEGMENT_OP = b"archive:segment"
HASH_BYTES, DIGEST_BYTES = 32, 16
DIR_MODE, FILE_MODE = 0o700, 0o600
_LEN = struct.Struct("<I")
_U64 = struct.Struct(">Q")
_TIME = struct.Struct("<q")
# meta keys of the hot store
HEAD_KEY = b"archive:head"  # u32 LE segments + the last one's hash
CHANGES_KEY = b"archive:changes"  # u64 BE: the last change sequence archived
AUDIT_KEY = b"archive:audit"  # u64 BE + 32 bytes: the last audit event archived, its hash
ANSWERS_KEY = b"archive:answers"  # u64 BE: the last remembered answer archived (sequence)
_HEAD = struct.Struct("<I32s")
_AUDIT = struct.Struct(">Q32s")


def name_of(n: int) -> str:
    return f"{n:010d}.seg"


def path_of(archive_dir: str, n: int) -> str:
    return os.path.join(archive_dir, name_of(n))


ID_HASH = hashlib.sha256(b"yikatong archived id\0")  # copied per id (fastpath Fares too)


def id_digest(request_id: bytes) -> bytes:
    """What stays hot of an archived request id: 16 bytes of SHA-256 (a collision among a
    city's ids is 2^-64-unlikely; it would answer one id from the other's segment, whose
    fingerprint then differs: ID_REUSED, never a second charge)."""
    h = ID_HASH.copy()
    h.update(request_id)
    return h.digest()[:DIGEST_BYTES]



# ---------------------------------------------------------------------------- the hot store's

def head(book) -> tuple[int, bytes]:
    """(segments the store records, the last one's hash; zeros: none)."""
    value = book.txn.get(HEAD_KEY, None, book.dbs.meta)
    if value is None:
        return 0, bytes(HASH_BYTES)
    if len(value) != _HEAD.size:
        raise CorruptRecord(f"meta archive:head is {len(value)} bytes, not {_HEAD.size}")
    return _HEAD.unpack(value)


def changes_through(book) -> int:
    """The last change sequence archived (0: none)."""
    value = book.txn.get(CHANGES_KEY, None, book.dbs.meta)
    return 0 if value is None else _U64.unpack(value)[0]


def audit_through(book) -> tuple[int, bytes]:
    """(sequence, hash) of the last audit event archived; (0, zeros): none."""
    value = book.txn.get(AUDIT_KEY, None, book.dbs.meta)
    return (0, bytes(HASH_BYTES)) if value is None else _AUDIT.unpack(value)


def archive_dir(data_dir: str) -> str:
    return os.path.join(data_dir, DIR)


# ---------------------------------------------------------------------------- the move

class TooLarge(YikatongError):
    """A segment of one record of each kind does not fit the replication record's room."""


def move(book, now: int, retain_seconds: int, batch_max: int = config.archive_batch_max,
         bytes_max: int | None = None) -> dict[str, int] | None:
    """One segment's worth moved out of the hot store (in the writer's transaction, which
    commits after the segment is on disk); None if nothing is older than the window.

    On a replicated writer (`book.journal` kept) the segment's bytes go in the group's
    replication record too (`SEGMENT_OP`), before the deletes: every node writes the same
    segment before it applies them (`write_replicated`). `bytes_max`: the room left in that
    record (the log's message size less what the group holds already), which the segment
    and its deletes, measured as encoded, must fit: fewer records of each kind until they
    do; TooLarge if one of each does not."""
    while True:
        prepared = _prepare(book, now, retain_seconds, batch_max)
        if prepared is None:
            return None
        batches, answers, n, through_changes, audit_seq, audit_hash, data, digest = prepared
        ops = _ops(book.txn, book.dbs, batches, answers, n, through_changes, audit_seq,
                   audit_hash, digest)
        if bytes_max is None:
            break
        size = records.journal_size([(SEGMENT_OP, name_of(n).encode(), data)] + ops)
        if size <= bytes_max:
            break
        if batch_max == 1:
            raise TooLarge(f"segment {n} of one record of each kind is {size:,} bytes with its "
                           f"deletes, more than the {bytes_max:,} bytes left in the "
                           "replication record; the records stay in the hot store")
        batch_max //= 2
    dbs = book.dbs
    write(archive_dir(dbs.data_dir), n, data)
    if book.journal is not None:  # replicated: every node writes it before the deletes
        book.journal.append((SEGMENT_OP, name_of(n).encode(), data))
    # only now, with the segment on disk: the records leave, and the head is recorded
    for db, key, value in ops:
        if value is None:
            book._delete(key, db=dbs.by_name[db])
        else:
            book._put(key, value, db=dbs.by_name[db])
    moved = {kind: len(batches[kind]) for kind in KINDS}
    moved["segment"], moved["bytes"] = n, len(data)
    return moved


def _ops(txn, dbs, batches, answers, n, through_changes, audit_seq, audit_hash, digest
         ) -> list:
    """What a move writes in the hot store, in order: (database name, key, value or None
    for a delete), as a replication record holds them."""
    ops: list[tuple[bytes, bytes, bytes | None]] = []
    for kind, db in (("changes", dbs.changes), ("audit", dbs.audit),
                     ("transfers", dbs.transfers), ("journeys", dbs.journeys)):
        name = dbs.name_of[db]
        ops += [(name, key, None) for key, _ in batches[kind]]
    segment = _LEN.pack(n)
    requests, answers_db = dbs.name_of[dbs.requests], dbs.name_of[dbs.answers]
    ids = dbs.name_of[dbs.archived_ids]
    for (key, _), seq in zip(batches["requests"], answers, strict=True):
        ops += [(requests, key, None), (answers_db, seq, None), (ids, id_digest(key), segment)]
    # a transfer whose id is no request id (a split tap's legs, `<request id>#1`...): its
    # digest kept as a request's is, so a reversal says ARCHIVED (not "not found") and
    # `yikatong explain` finds its segment; never one a request's digest is or will be
    # under (its replay reads the segment that digest names)
    told = {key for key, _ in batches["requests"]}
    ops += [(ids, id_digest(key), segment) for key, _ in batches["transfers"]
            if key not in told and txn.get(key, db=dbs.requests) is None
            and txn.get(id_digest(key), db=dbs.archived_ids) is None]
    meta = dbs.name_of[dbs.meta]
    ops += [(meta, HEAD_KEY, _HEAD.pack(n, digest)),
            (meta, CHANGES_KEY, _U64.pack(through_changes))]
    if answers:  # the next sequence goes on from it when every answer is archived
        ops.append((meta, ANSWERS_KEY, answers[-1]))
    ops.append((meta, AUDIT_KEY, _AUDIT.pack(audit_seq, audit_hash)))
    return ops


def write_replicated(book, name: bytes, data: bytes) -> None:
    """A node applying a replication record that holds a segment (`SEGMENT_OP`), in the
    record's transaction (`book`): the same bytes written where its own archive is, whole,
    before the record's deletes commit; CorruptRecord (nothing written, nothing removed)
    unless it is whole and the next of this store's archive (its number and the hash it
    chains to): a segment already committed is never written over."""
    number = name.decode("ascii", "replace").split(".", 1)[0]
    if not (number.isdigit() and name == name_of(int(number)).encode()):
        raise CorruptRecord(f"the replicated archive segment's name {name!r} is not one")
    manifest, _ = _manifest(data, name.decode())  # (its magic and length checked there)
    if hashlib.sha256(data[:-HASH_BYTES]).digest() != data[-HASH_BYTES:]:
        raise CorruptRecord(f"the replicated archive segment {name.decode()} is not whole")
    count, last = head(book)
    if int(number) != count + 1 or manifest.get("segment") != count + 1 or \
            manifest.get("prev_hash") != last.hex():
        raise CorruptRecord(f"the replicated archive segment {name.decode()} does not follow "
                            f"this store's archive (segment {count}, hash {last.hex()[:16]}); "
                            "nothing of it written")
    write(archive_dir(book.dbs.data_dir), count + 1, data)
    log.info("archive segment %s written from the replicated log", name.decode(),
             extra={"fields": {"segment": count + 1, "bytes": len(data)}})


def _prepare(book, now: int, retain_seconds: int, batch_max: int):
    """The records of one segment and the segment itself; None if nothing is older than
    the window."""
    txn, dbs = book.txn, book.dbs
    cutoff = now - retain_seconds
    batches: dict[str, list[tuple[bytes, bytes]]] = {kind: [] for kind in KINDS}
    times: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for kind, db in (("changes", dbs.changes), ("audit", dbs.audit)):
        with txn.cursor(db=db) as cur:
            if not cur.last():
                continue
            newest = bytes(cur.key())
            more = cur.first()
            # time 0: not kept (format 1's change events): as old as the next timed one
            untimed: list[tuple[bytes, bytes]] = []
            while more and len(batches[kind]) + len(untimed) < batch_max:
                key, value = bytes(cur.key()), bytes(cur.value())
                if key == newest:
                    break
                time = (records.decode_change(value).time if kind == "changes"
                        else records.decode_audit(value).time)
                if time >= cutoff:
                    break
                if time == 0:
                    untimed.append((key, value))
                else:
                    batches[kind] += untimed + [(key, value)]
                    times[kind] += [time] * (len(untimed) + 1)
                    untimed = []
                more = cur.next()
    seen: set[bytes] = set()
    for _, value in batches["changes"]:
        change = records.decode_change(value)
        tid = change.transfer_id.encode("utf-8")
        if not tid or tid in seen:
            continue
        seen.add(tid)
        stored = txn.get(tid, db=dbs.transfers)
        if stored is None:
            continue  # archived with an earlier event of it
        t = records.decode_transfer(stored)
        if t.status == TransferStatus.PENDING:
            continue  # an open hold stays; it goes with the event that resolves it
        batches["transfers"].append((tid, bytes(stored)))
        times["transfers"].append(t.created_at)
        journey = txn.get(tid, db=dbs.journeys)  # issue 28: a hold's journey goes with it,
        if journey is not None and txn.get(t.debit, db=dbs.journeys_untold) != tid:  # once
            batches["journeys"].append((tid, bytes(journey)))  # no tap is still to be told
            times["journeys"].append(t.created_at)  # of it (journeys.untold forgets it then)
    answers: list[bytes] = []  # their sequence keys in `answers`
    with txn.cursor(db=dbs.answers) as cur:  # store format 6: in the order they were given
        more = cur.first()
        while more and len(batches["requests"]) < batch_max:
            key, value = bytes(cur.key()), bytes(cur.value())
            request_id, _, time, _ = records.decode_answer(value)
            if time >= cutoff:
                break
            answers.append(key)
            batches["requests"].append((request_id, value))
            times["requests"].append(time)
            more = cur.next()
    if not any(batches.values()):
        return None

    count, prev = head(book)
    n = count + 1
    through_changes = (_U64.unpack(batches["changes"][-1][0])[0] if batches["changes"]
                       else changes_through(book))
    audit_seq, audit_hash = audit_through(book)
    if batches["audit"]:
        audit_seq = _U64.unpack(batches["audit"][-1][0])[0]
        audit_hash = records.audit_hash_of(batches["audit"][-1][1])
    manifest = {
        "segment": n, "prev_hash": prev.hex(), "created_at": now, "retain_seconds":
        retain_seconds, "written_by": f"yikatong {__version__}", "algorithm": "sha256",
        "through": {"changes": through_changes, "audit": audit_seq},
        "audit_last_hash": audit_hash.hex(),
        "kinds": {kind: _summary(kind, batches[kind], times[kind]) for kind in KINDS},
        "payload_kinds": list(KINDS),
        # store format 6: each request's value is a remembered answer record of this version
        # (records.decode_answer); none: format 5's (fingerprint, time, answer)
        "answer_version": records.ANSWER_VERSION,
    }
    data, digest = encode(manifest, batches)
    return batches, answers, n, through_changes, audit_seq, audit_hash, data, digest


def _summary(kind: str, batch: list[tuple[bytes, bytes]], times: list[int]) -> dict:
    out: dict = {"count": len(batch)}
    if batch:
        out["time_min"], out["time_max"] = min(times), max(times)
        if kind in ("changes", "audit"):
            out["first"] = _U64.unpack(batch[0][0])[0]
            out["last"] = _U64.unpack(batch[-1][0])[0]
    return out


def encode(manifest: dict, batches: dict[str, list[tuple[bytes, bytes]]]) -> tuple[bytes, bytes]:
    raw: list[bytes] = []
    for kind in manifest.get("payload_kinds", _KINDS_BEFORE_JOURNEYS):  # what it says it holds
        raw.append(_LEN.pack(len(batches[kind])))
        for key, value in batches[kind]:
            raw += [_LEN.pack(len(key)), key, _LEN.pack(len(value)), value]
    plain = b"".join(raw)
    manifest["raw_bytes"] = len(plain)
    payload = zstandard.ZstdCompressor(level=config.archive_zstd_level).compress(plain)
    manifest["payload_bytes"] = len(payload)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = MAGIC + _LEN.pack(len(text)) + text + payload
    digest = hashlib.sha256(body).digest()
    return body + digest, digest


def write(where: str, n: int, data: bytes) -> None:
    """Segment `n` on disk, whole or not at all: a temporary name, fsync, rename, the
    directory fsynced. Anything at `n` or beyond is a leftover of a move that did not commit
    (a crash between the rename and the commit): removed first."""
    os.makedirs(where, mode=DIR_MODE, exist_ok=True)
    os.chmod(where, DIR_MODE)
    m = n  # from n on, while there are any (not a listing of the whole archive)
    while True:
        found = [p for p in (path_of(where, m), path_of(where, m) + ".tmp")
                 if os.path.lexists(p)]
        if not found:
            break
        for path in found:
            os.remove(path)
            log.warning("removed %s from the archive: written by a move that did not commit; "
                        "written again now", os.path.basename(path))
        m += 1
    final = path_of(where, n)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fd = os.open(where, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Mover:
    """The periodic job's archive step (`--retain-days`), in a nested transaction of its own:
    a move that fails (a segment that cannot be written: a full disk, the archive directory's
    permissions) is logged and rolled back alone, so the hold sweep of the same group still
    commits; after config.periodic_failures_max in a row the store says `archive_failing`
    (the metric yikatong_archive_failing, a warning: the server answers every call rightly
    meanwhile, so health stays SERVING; the hot store grows, and a disk that fills says
    NOT_SERVING for itself, disk_full) until one succeeds."""

    def __init__(self, retain_seconds: int):
        self.retain_seconds = retain_seconds
        self.store = None  # set once the store is open (its writer may call step before)
        self.failures = 0
        self._last_error = ""

    def step(self, book, now: int) -> dict[str, int] | None:
        store = self.store
        if store is None:
            return None
        from yikatong.storage.lmdb_store import Book

        child = store.env.begin(write=True, parent=book.txn)
        mine: list | None = [] if book.journal is not None else None  # replicated if it
        room = None                                                    # commits
        if mine is not None and store.record_bytes_max:  # what the group holds already
            room = store.record_bytes_max - records.journal_size(book.journal)
        try:
            moved = move(Book(child, book.dbs, mine), now, self.retain_seconds,
                         bytes_max=room)
        except Exception as error:  # noqa: BLE001 - logged, counted, said by the metric
            child.abort()
            self.failures += 1
            again = repr(error) == self._last_error  # its traceback once, not every second
            self._last_error = repr(error)
            log.error("the archive's move failed (%d in a row: %s); the records stay in the "
                      "hot store", self.failures, error or type(error).__name__,
                      exc_info=None if again else error)
            if self.failures == config.periodic_failures_max:
                log.error("archive failing: the hot store grows until a move succeeds "
                          "(health stays SERVING)")
            store.archive_failing = self.failures >= config.periodic_failures_max
            return None
        child.commit()
        if mine:
            book.journal.extend(mine)
        if store.archive_failing:
            log.info("archive failing: cleared (a move succeeded)")
        self.failures, self._last_error, store.archive_failing = 0, "", False
        return moved


# ---------------------------------------------------------------------------- reading

class Segment:
    __slots__ = ("n", "manifest", "records", "hash")

    def __init__(self, n: int, manifest: dict, recs: dict[str, list[tuple[bytes, bytes]]],
                 digest: bytes):
        self.n, self.manifest, self.records, self.hash = n, manifest, recs, digest


def _manifest(data: bytes, where: str) -> tuple[dict, int]:
    if len(data) < len(MAGIC) + 4 + HASH_BYTES or data[:len(MAGIC)] != MAGIC:
        raise CorruptRecord(f"{where} is not an archive segment ({len(data)} bytes)")
    (size,) = _LEN.unpack_from(data, len(MAGIC))
    at = len(MAGIC) + 4
    if at + size > len(data) - HASH_BYTES:
        raise CorruptRecord(f"{where}: its manifest runs past its end")
    try:
        manifest = json.loads(data[at:at + size].decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptRecord(f"{where}: its manifest does not read: {e}") from None
    return manifest, at + size


def decode(data: bytes, n: int, where: str) -> Segment:
    """Segment `n` from its bytes: CorruptRecord naming what is wrong unless its hash holds,
    its manifest reads and says it is `n`, and its payload decodes to what the manifest
    says."""
    manifest, at = _manifest(data, where)
    digest = data[-HASH_BYTES:]
    if hashlib.sha256(data[:-HASH_BYTES]).digest() != digest:
        raise CorruptRecord(f"{where}: its hash does not match its content (edited or damaged)")
    if manifest.get("segment") != n:
        raise CorruptRecord(f"{where}: its manifest says segment {manifest.get('segment')}")
    raw_bytes = manifest.get("raw_bytes")
    if not isinstance(raw_bytes, int) or not 0 <= raw_bytes <= config.archive_segment_bytes_max:
        raise CorruptRecord(f"{where}: its manifest's raw_bytes is {raw_bytes!r}")
    try:
        plain = zstandard.ZstdDecompressor().decompress(data[at:-HASH_BYTES],
                                                        max_output_size=raw_bytes)
    except zstandard.ZstdError as e:
        raise CorruptRecord(f"{where}: its payload does not decompress: {e}") from None
    if len(plain) != raw_bytes:
        raise CorruptRecord(f"{where}: its payload is {len(plain)} bytes, its manifest says "
                            f"{raw_bytes}")
    recs: dict[str, list[tuple[bytes, bytes]]] = {}
    pos = 0
    try:
        kinds = manifest.get("payload_kinds", list(_KINDS_BEFORE_JOURNEYS))
        if not isinstance(kinds, list) or any(k not in KINDS for k in kinds):
            raise CorruptRecord(f"{where}: its manifest's payload_kinds is {kinds!r}")
        for kind in kinds:
            (count,) = _LEN.unpack_from(plain, pos)
            pos += 4
            items = []
            for _ in range(count):
                (k,) = _LEN.unpack_from(plain, pos)
                key = plain[pos + 4:pos + 4 + k]
                pos += 4 + k
                (v,) = _LEN.unpack_from(plain, pos)
                value = plain[pos + 4:pos + 4 + v]
                pos += 4 + v
                if len(key) != k or len(value) != v:
                    raise struct.error("cut")
                items.append((key, value))
            recs[kind] = items
            said = manifest.get("kinds", {}).get(kind, {}).get("count")
            if said != count:
                raise CorruptRecord(f"{where}: {count} {kind}, its manifest says {said}")
    except struct.error:
        raise CorruptRecord(f"{where}: its payload is cut") from None
    if pos != len(plain):
        raise CorruptRecord(f"{where}: {len(plain) - pos} bytes after its records")
    for kind in KINDS:  # an older segment's: none of the kinds it predates
        recs.setdefault(kind, [])
    return Segment(n, manifest, recs, digest)


def read(where: str, n: int) -> Segment:
    path = path_of(where, n)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptRecord(f"archive segment {path} is missing") from None
    except OSError as e:
        raise CorruptRecord(f"archive segment {path} cannot be read: {e.strerror}") from None
    return decode(data, n, path)


def read_manifest(where: str, n: int) -> dict:
    """Segment `n`'s manifest alone (its hash is checked when the segment is read)."""
    path = path_of(where, n)
    try:
        with open(path, "rb") as f:
            head_ = f.read(len(MAGIC) + 4)
            if len(head_) < len(MAGIC) + 4:
                raise CorruptRecord(f"archive segment {path} is cut")
            (size,) = _LEN.unpack_from(head_, len(MAGIC))
            data = head_ + f.read(min(size, 1 << 20)) + bytes(HASH_BYTES)
    except FileNotFoundError:
        raise CorruptRecord(f"archive segment {path} is missing") from None
    except OSError as e:
        raise CorruptRecord(f"archive segment {path} cannot be read: {e.strerror}") from None
    return _manifest(data, path)[0]


_REQUEST_5 = struct.Struct("<32sq")  # format 5's remembered answer: fingerprint, time; answer


def request(book, key: bytes) -> tuple[bytes, bytes] | None:
    """(the fingerprint kept, the answer) of an archived request id, read from its segment;
    None if the id was never archived. CorruptRecord (DATA_LOSS: nothing done) if its segment
    is missing or damaged. Segments written by store format 5 keep the whole fingerprint."""
    value = book.txn.get(id_digest(key), None, book.dbs.archived_ids)
    if value is None:
        return None
    (n,) = _LEN.unpack(value)
    # a digest shared with another id: this one was never archived (None)
    where = archive_dir(book.dbs.data_dir)
    try:
        st = os.stat(path_of(where, n))
    except OSError:
        st = None  # read() says what is wrong
    return _requests_of(where, n, st and (st.st_ino, st.st_size, st.st_mtime_ns)).get(key)


def transfer(book, transfer_id: str) -> bytes | None:
    """The stored bytes of an archived transfer (`yikatong explain`), from the segment its id's
    digest names; None if it was never archived. CorruptRecord if its segment is missing or
    damaged."""
    key = transfer_id.encode("utf-8")
    value = book.txn.get(id_digest(key), None, book.dbs.archived_ids)
    if value is None:
        return None
    (n,) = _LEN.unpack(value)
    for k, v in read(archive_dir(book.dbs.data_dir), n).records["transfers"]:
        if k == key:
            return v
    return None  # a digest shared with another id


@functools.lru_cache(maxsize=8)
def _requests_of(where: str, n: int, _file: tuple | None
                 ) -> dict[bytes, tuple[bytes, bytes]]:
    """Segment n's remembered answers by request id: (the fingerprint kept, the answer). A
    segment does not change once its transaction commits, so the few read last are kept (by
    the file's identity too: one written again after a crash is read again): retries of
    archived ids (a gate's backlog, or someone replaying old ids on purpose) do not make the
    writer decompress a segment each."""
    segment = read(where, n)
    out = {}
    for k, v in segment.records["requests"]:
        if segment.manifest.get("answer_version") is None:  # store format 5's layout
            if len(v) < _REQUEST_5.size:
                raise CorruptRecord(f"archive segment {n}: a remembered answer of {len(v)} "
                                    "bytes")
            out[k] = v[:32], v[_REQUEST_5.size:]
        else:
            _, kept, _, answer = records.decode_answer(v)
            out[k] = kept, answer
    return out


def first_holding(where: str, count: int, kind: str, after: int) -> int:
    """The first segment (1..count) holding a `kind` (changes, audit) sequence after `after`;
    count + 1 if none does. A binary search on each manifest's `through`."""
    class Through:
        def __getitem__(self, i: int) -> int:
            return read_manifest(where, i + 1)["through"][kind]

        def __len__(self) -> int:
            return count

    return bisect.bisect_right(Through(), after) + 1  # type: ignore[arg-type]


def audit_records(where: str, count: int, after: int) -> Iterator[tuple[int, bytes]]:
    """(sequence, stored bytes) of every archived audit event after `after`, in order."""
    for n in range(first_holding(where, count, "audit", after), count + 1):
        for key, value in read(where, n).records["audit"]:
            seq = _U64.unpack(key)[0]
            if seq > after:
                yield seq, value


# ---------------------------------------------------------------------------- verifying

def verify(where: str, count: int, last_hash: bytes
           ) -> tuple[bool, int, str, tuple[int, bytes], int]:
    """Every segment 1..count: it decodes, its hash holds, it links to the one before, its
    audit events chain on from the ones before, the last one's hash is `last_hash` (the
    store's record of it). (ok, the first bad segment or 0, what is wrong, the last audit
    event's (sequence, hash), audit events walked)."""
    from yikatong.storage.lmdb_store import audit_hash

    prev, seq, chain, events = bytes(HASH_BYTES), 0, bytes(HASH_BYTES), 0
    changes = 0
    for n in range(1, count + 1):
        try:
            segment = read(where, n)
        except CorruptRecord as e:
            return False, n, str(e), (seq, chain), events
        m = segment.manifest
        if m.get("prev_hash") != prev.hex():
            return False, n, (f"segment {n}'s prev_hash is not segment {n - 1}'s hash (a "
                              "segment removed, replaced or reordered)"), (seq, chain), events
        for key, value in segment.records["changes"]:
            s = _U64.unpack(key)[0]
            if s <= changes:
                return False, n, f"segment {n}: change {s} after {changes}", (seq, chain), \
                    events
            changes = s
            records.decode_change(value)
        for key, value in segment.records["audit"]:
            s = _U64.unpack(key)[0]
            try:
                algorithm, prev_hash, digest, body = records.split_audit(value, chain)
                event = records.decode_audit(value, chain)
            except CorruptRecord as e:
                return False, n, f"segment {n}: audit event {s}: {e}", (seq, chain), events
            if s != seq + 1 or event.sequence != s:
                return False, n, f"segment {n}: audit event {seq + 1} is missing (next is " \
                    f"{s})", (seq, chain), events
            if prev_hash != chain or audit_hash(prev_hash, body, algorithm) != digest:
                return False, n, f"segment {n}: audit event {s}'s link or hash does not " \
                    "hold", (seq, chain), events
            seq, chain, events = s, digest, events + 1
        for _, value in segment.records["transfers"]:
            records.decode_transfer(value)
        if m.get("through", {}).get("audit") != seq or m.get("audit_last_hash") != chain.hex():
            return False, n, f"segment {n}'s manifest says the audit trail is archived through " \
                f"{m.get('through', {}).get('audit')}; its events end at {seq}", \
                (seq, chain), events
        prev = segment.hash
    if prev != last_hash:
        return False, count, ("the last segment's hash is not the one the store recorded (a "
                              "segment replaced, or the archive is another store's)"), \
            (seq, chain), events
    extra = [name for name in (os.listdir(where) if os.path.isdir(where) else [])
             if name.endswith(".seg") and name.split(".", 1)[0].isdigit()
             and int(name.split(".", 1)[0]) > count]
    if extra:
        log.info("archive %s: %s beyond the %d recorded (a move that did not commit: the next "
                 "one removes it)", where, ", ".join(sorted(extra)), count)
    return True, 0, "", (seq, chain), events


def verify_audit(book, where: str, data_file: str = "", segments: bool = True
                 ) -> tuple[bool, int, int, str]:
    """The audit trail as one chain, archive then hot store: (ok, events, first bad sequence,
    what is wrong), as Book.verify_audit. `segments=False`: the store's part alone, from the
    archive's recorded end on (its events counted as the store records them)."""
    count, last = head(book)
    recorded = audit_through(book)
    if count and not segments:
        events = recorded[0]
    elif count:
        ok, bad, problem, reached, events = verify(where, count, last)
        if not ok:
            return False, events, reached[0] + 1, f"archive segment {bad}: {problem}"
        if reached != recorded:
            return False, events, reached[0] + 1, (
                f"the archive's audit events end at {reached[0]}; the store records "
                f"{recorded[0]}")
    else:
        events = 0
    ok, hot, bad, problem = book.verify_audit(data_file, start=recorded)
    return ok, events + hot, bad, problem

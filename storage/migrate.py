"""Store formats and the migrations between them.

A data dir records the format of its records and the release that wrote it, in the `meta`
database: `format` (ASCII digits) and `written_by` ("yikatong 0.2.0"). The store opens only a
store of the format it serves (`check_format`, called where `Store` opens the environment):
an older one is refused with one line naming the command that migrates it, a newer one with
one line saying no migration goes back. `migrate` (`yikatong migrate --data-dir DIR`,
`yikatong serve --migrate`) brings an older store to `FORMAT`.

The formats:

- 1: the release of 24 November 2026 (commit 6b43753, called 0.1.0). 11 databases; card
  records of 128 bytes (version 1, `temp_loss_at` where format 2 has the end instant
  `temp_loss_until`, no `received_at`); account records of version 1; transfer records of
  version 1 without the role that made them; change records of 93 bytes with no version byte
  (card number, state, transfer id, amount: no kind, time, holder or what changed); notes keyed
  by the bare card number; no holder_ssn index, no open steps, no audit trail.
- 2: the release of 6 December 2026 (commit 5ab1cc2, also called 0.1.0). A store without the
  `format` key is told by its content (`stored_format`). Development builds between the two
  releases wrote mixtures of both layouts; a record of neither stops a migration, naming it,
  with nothing changed.
- 3: 0.2.0, the first release to record its format. Open steps keep how each end was counted
  (a version byte, then step, rule, due_at, kind, start, days, provisional); the card flag
  UNACTIVATED (32: lost before it was activated, SH-17) and the `bank_losses` database (SH-20:
  a bank loss report's stored end; none: it stands until cancelled, format 2's meaning) are
  new in it, neither read differently from what format 2 held.
- 4: 0.3.0. Holders' personal information sealed (issue 25; storage/pii.py): `holders` keyed by the
  HMAC-SM3 of the identity number under the index key (format 3: the number itself), its
  value the u64 holder id and the Holder message sealed with SM4-GCM; `holder_ssn` maps a
  holder id to that HMAC (format 3: to the number); `holder_history` (GZ-20) and `residences`
  (RC-13) values sealed whole; an RC-8 proxy note keeps its relation and ground in clear and
  seals the proxy's identity number and name after a NUL; meta `pii:index` names the index
  key. Migrating to it needs the key file (`--pii-key-file`); the migrated store is compacted
  so that no page of data.mdb keeps the clear text (the pre-migrate copy does: delete it).
- 5: 0.4.0. A bounded hot store (issue 26; storage/archive.py): a remembered answer (the
  `requests` database) keeps its time, fingerprint (32) + i64 LE time + answer (format 4:
  fingerprint + answer), indexed by it in `requests_by_time` (u64 BE time + request id ->
  b""); `archived_ids` (16 bytes of an archived id's SHA-256 -> u32 LE segment) and the
  archive's meta keys (`archive:head`, `archive:changes`, `archive:audit`) are new. The
  migration gives every answer the store's last recorded time (its newest change or audit
  event's): deterministic, and no older than the moment the store was last written.
- 6: 0.5.0. Smaller hot records, the same meaning (issue 26; storage/records.py): a transfer
  record is a 39-byte head (version 3, kind, status, channel, role, amount, created_at,
  timeout_at, resolved, the two account keys' lengths) then the keys and the reference as long
  as they are (format 5: version 2, 213 bytes, NUL-padded, with the request's fingerprint,
  which only the remembered answer keeps now); a change record a 31-byte head (version 3,
  ..., amount, the card number's length) then the card number and the transfer id (format 5:
  version 2, 114 bytes, padded to 20 and 64); an audit event (version 2) keeps no prev_hash
  (the event before's hash) and stores role and method as codes of fixed tables, its hash
  unchanged (over prev_hash and version 1's canonical body), so old and new events are one
  chain. A remembered answer moves to `answers` (u64 BE sequence -> version 1, i64 time, the
  id's length, the fingerprint's first 16 bytes, the id, the answer), appended in order, and
  `requests` maps the id to that sequence (format 5: the id to fingerprint (32), time and
  answer, indexed by `requests_by_time`, which is dropped: the migration numbers the answers
  in its order). Archive segments keep the records as they were written: the decoders read
  both (a segment's manifest says `answer_version` from format 6 on).

Adding a format: bump `FORMAT`, add `MIGRATIONS[FORMAT - 1]` (a function of the write
transaction that converts every record of the old layout and returns what it did, with the
old and new layouts spelled out in it, never read from `records`, which moves on), and a
fixture data dir of the old format made by tests/fixtures/make_fixtures.py, with what the
release that wrote it answered (tests/test_migrate.py runs every fixture).

A migration is deterministic (no clock, no random): every node of a replicated store, migrated
while stopped, ends with the same bytes.
"""
import datetime as _dt
import os
import struct
from collections.abc import Callable
from types import SimpleNamespace

import lmdb

from yikatong import __version__, config
from yikatong.calendar import DAYS_FOR_AN_ACT, WORKING_DAYS
from yikatong.errors import CorruptRecord, StoreFormat
from yikatong.model import State
from yikatong.storage import pii, records
from yikatong.v1 import yikatong_pb2 as pb

FORMAT = 6  # the format this release serves
FORMAT_KEY, WRITTEN_BY_KEY = b"format", b"written_by"
WRITTEN_BY = f"yikatong {__version__}"
UNRECORDED = "a release that did not record it"
_BATCH = 10_000  # records read per cursor walk; the writes of a batch follow it


# ---------------------------------------------------------------------------- at open

def stored_format(env) -> tuple[int | None, str | None]:
    """(format, written_by) of a store: as recorded in `meta`, else told by content with
    written_by None. (None, None) for a store that holds nothing yet."""
    with env.begin() as txn:
        names = _names(txn)
        meta = _db(env, txn, b"meta", names)
        value = txn.get(FORMAT_KEY, db=meta) if meta is not None else None
        if value is not None:
            by = txn.get(WRITTEN_BY_KEY, db=meta)
            try:
                found = int(bytes(value).decode("ascii"))
            except ValueError:
                raise StoreFormat(f"the store's meta `format` is {bytes(value)!r}, not a "
                                  "format number") from None
            return found, bytes(by).decode("utf-8", "replace") if by is not None else UNRECORDED
        return _by_content(env, txn, names), None


def check_format(env, data_dir: str, write: bool = True) -> int:
    """The store's format if this release serves it; StoreFormat, in one line naming what to
    do, if not. `write`: a store that holds nothing yet, or a format-2 store written before
    formats were recorded, gets `format` and `written_by` now."""
    found, by = stored_format(env)
    if found is not None and found != FORMAT:
        raise StoreFormat(refusal(data_dir, found, by))
    if by is None and write:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(FORMAT_KEY, str(FORMAT).encode("ascii"), db=meta)
            txn.put(WRITTEN_BY_KEY, WRITTEN_BY.encode("utf-8"), db=meta)
    return FORMAT


def refusal(data_dir: str, found: int, by: str | None) -> str:
    written = f"written by {by or UNRECORDED}"
    if found < FORMAT:
        return (f"data dir {data_dir} is store format {found} ({written}); yikatong "
                f"{__version__} serves format {FORMAT}: run `yikatong migrate --data-dir "
                f"{data_dir}" + (" --pii-key-file FILE" if found < 4 else "") + "` first (or "
                "start with `yikatong serve --migrate`)")
    return (f"data dir {data_dir} is store format {found} ({written}); yikatong {__version__} "
            f"serves format {FORMAT} and no migration goes back: run the release that wrote "
            "it, or a later one")


def _names(txn) -> set[bytes]:
    """The named databases of an environment (the keys of its main database)."""
    return {bytes(k) for k in txn.cursor().iternext(values=False)}


def _db(env, txn, name: bytes, names: set[bytes]):
    return env.open_db(name, txn=txn, create=False) if name in names else None


def _first(txn, db) -> bytes | None:
    if db is None:
        return None
    with txn.cursor(db=db) as cur:
        return bytes(cur.value()) if cur.first() else None


def _by_content(env, txn, names: set[bytes]) -> int | None:
    """A store that did not record its format: format 1 or 2 by its records, None if it holds
    none. Format 1 if its first change record or its first card is format 1's: the change log
    is append-only and every card or transfer written added to it, so its first record is as
    old as the store (a format-1 store that a format-2 server opened and wrote to still begins
    with format 1's), and format 2 could not rewrite a format-1 card (DATA_LOSS)."""
    dbs = {n: env.open_db(n, txn=txn, create=False) for n in names}
    if not any(txn.stat(db)["entries"] for db in dbs.values()):
        return None
    change, card = _first(txn, dbs.get(b"changes")), _first(txn, dbs.get(b"cards"))
    if (change is not None and len(change) == _CHANGE_1.size
            or card is not None and len(card) == _CARD_1.size):
        return 1
    if change is not None:
        if len(change) in (113, _CHANGE_2.size) and change[0] in (1, 2):
            return 2  # format 2 reads both change record versions
        raise StoreFormat(f"the store's first change record is {len(change)} bytes: not of "
                          f"format 1 or 2, and it did not record its format")
    if card is not None:
        if len(card) == _CARD_2.size:
            return 2
        raise StoreFormat(f"the store's first card record is {len(card)} bytes: not of format "
                          "1 or 2, and it did not record its format")
    return 1 if names <= _FORMAT_1_DBS else 2


# ---------------------------------------------------------------------------- migrate

def migrate(data_dir: str, *, map_size: int = config.lmdb_map_size,
            say: Callable[[str], None] = print,
            pii_keys: "pii.KeyRing | None | str" = "in_process") -> dict[str, dict[str, int]]:
    """Bring the store in `data_dir` to FORMAT: a compacted copy of it kept first (the way
    back), the audit trail verified, every record converted in one write transaction and
    checked by this release's decoders before it commits, then `format` and `written_by`
    set, the audit trail verified again. The caller holds the data dir (lock_data_dir): no
    server runs on it. Returns {"<from>-><to>": {what: count}}; {} when already current.
    StoreFormat (nothing changed) when it cannot."""
    from yikatong.storage.lmdb_store import Store

    lmdb_dir = os.path.join(data_dir, "lmdb")
    ring = pii.in_process if pii_keys == "in_process" else pii_keys
    env = Store._open(lmdb_dir, map_size, True)
    compacted = ""
    try:
        done = _migrate(env, data_dir, say, ring)  # type: ignore[arg-type]
        if "3->4" in done:  # the clear text is in freed pages until the file is rewritten
            compacted = _compacted_copy(env, data_dir)
        return done
    except lmdb.MapFullError:
        raise StoreFormat(f"the migration of {data_dir} needs a larger map than "
                          f"{map_size // 2**20} MiB (--map-size-mib); nothing was "
                          "changed") from None
    finally:
        env.close()
        if compacted:
            os.replace(os.path.join(compacted, "data.mdb"), os.path.join(lmdb_dir, "data.mdb"))
            os.rmdir(compacted)
            say(f"  compacted {os.path.join(lmdb_dir, 'data.mdb')}: no page of it keeps "
                "personal information in clear (the pre-migrate copy does: delete it once the "
                "migrated store serves)")


def _compacted_copy(env, data_dir: str) -> str:
    """LMDB's compacting copy of the migrated store, beside it (owner-only)."""
    path = os.path.join(data_dir, "lmdb.compacting")
    if os.path.exists(path):
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        os.rmdir(path)
    os.makedirs(path, mode=0o700)
    env.copy(path, compact=True)
    os.chmod(os.path.join(path, "data.mdb"), 0o600)
    return path


def _migrate(env, data_dir: str, say, ring: "pii.KeyRing | None") -> dict[str, dict[str, int]]:
    found, by = stored_format(env)
    if found is None or found == FORMAT:
        say(f"data dir {data_dir} is already store format {FORMAT} (written by "
            f"{by or UNRECORDED}): nothing to migrate")
        return {}
    if found > FORMAT:
        raise StoreFormat(refusal(data_dir, found, by))
    if found < 4 and ring is None:
        raise StoreFormat(f"the migration of {data_dir} to store format 4 seals the holders' "
                          "personal information: give the key file (yikatong migrate "
                          f"--data-dir {data_dir} --pii-key-file FILE); nothing was changed")
    say(f"migrating data dir {data_dir} from store format {found} (written by "
        f"{by or UNRECORDED}) to {FORMAT}")
    say("  audit trail before: " + _verify_audit(env, data_dir, found))
    copy = _keep_copy(env, data_dir, found)
    size = os.path.getsize(os.path.join(copy, "lmdb", "data.mdb"))
    say(f"  kept a compacted copy of the store as it was, a data dir of its own: {copy} "
        f"({size} bytes); to roll back, stop the server and run the release that wrote it on "
        f"that copy (or move its lmdb/ in place of {os.path.join(data_dir, 'lmdb')})")
    done: dict[str, dict[str, int]] = {}
    try:
        with env.begin(write=True) as txn:
            for step in range(found, FORMAT):
                done[f"{step}->{step + 1}"] = MIGRATIONS[step](env, txn, ring)
            check_records(env, txn)
            meta = env.open_db(b"meta", txn=txn)
            txn.put(FORMAT_KEY, str(FORMAT).encode("ascii"), db=meta)
            txn.put(WRITTEN_BY_KEY, WRITTEN_BY.encode("utf-8"), db=meta)
    except (CorruptRecord, struct.error, UnicodeError) as error:
        raise StoreFormat(f"the migration of {data_dir} stopped, nothing was changed: "
                          f"{error}") from None
    for name, counts in done.items():
        say(f"  format {name}: " + ", ".join(f"{what} {n}" for what, n in counts.items()))
    for name, counts in done.items():
        for what, note in NOTES.get(name, {}).items():
            if not what or counts.get(what):
                say(f"  note: {note}")
    after = _verify_audit(env, data_dir, FORMAT)
    say(f"  audit trail after: {after}")
    say(f"data dir {data_dir} is now store format {FORMAT} (written by {WRITTEN_BY})")
    return done


def _verify_audit(env, data_dir: str, found: int) -> str:
    from yikatong.storage.lmdb_store import Book

    with env.begin() as txn:
        audit = _db(env, txn, b"audit", _names(txn))
        if audit is None:
            return f"none (format {found} kept no audit trail)"
        # the chain alone: Book reads nothing but dbs.audit for it (as `yikatong audit verify`)
        book = Book(txn, SimpleNamespace(audit=audit))  # type: ignore[arg-type]
        ok, events, bad, problem = book.verify_audit()
    if not ok:
        raise StoreFormat(f"the audit trail of {data_dir} is broken at event {bad}: {problem}; "
                          "not migrating (see `yikatong audit verify`)")
    return f"{events} events, every link holds"


def _keep_copy(env, data_dir: str, found: int) -> str:
    """A compacted copy of the store (LMDB's own copy: a consistent snapshot), laid out as a
    data dir of its own, DIR/pre-migrate-<format>-<UTC time>/lmdb/data.mdb; owner-only (0700,
    0600): it holds personal information."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(data_dir, f"pre-migrate-{found}-{stamp}")
    for d in (path, os.path.join(path, "lmdb")):
        os.makedirs(d, mode=0o700)
        os.chmod(d, 0o700)
    env.copy(os.path.join(path, "lmdb"), compact=True)
    for name in os.listdir(os.path.join(path, "lmdb")):
        os.chmod(os.path.join(path, "lmdb", name), 0o600)
    return path


def _rewrite(txn, db, convert: Callable[[bytes, bytes], bytes | None]) -> tuple[int, int]:
    """convert(key, value) for every record of `db`: the new value, or None to keep it.
    Read in batches, each written after its walk (a cursor never walks what is being
    written). (converted, kept)."""
    converted = kept = 0
    after = None
    while True:
        batch: list[tuple[bytes, bytes]] = []
        with txn.cursor(db=db) as cur:
            more = cur.set_range(after + b"\0") if after is not None else cur.first()
            while more and len(batch) < _BATCH:
                batch.append((bytes(cur.key()), bytes(cur.value())))
                more = cur.next()
        for key, value in batch:
            new = convert(key, value)
            if new is None:
                kept += 1
            else:
                txn.put(key, new, db=db)
                converted += 1
        if len(batch) < _BATCH:
            return converted, kept
        after = batch[-1][0]


def check_records(env, txn) -> None:
    """Every record read back by this release's own decoders: after a migration, before its
    commit (TIGER_STYLE: assert right after writing: CorruptRecord rolls it back), and in a
    backup before it is called done (storage/backup.py)."""
    from yikatong.storage.lmdb_store import Book

    names = _names(txn)
    decoders = {
        b"cards": lambda k, v: records.decode_card(k.decode("ascii"), v),
        b"holders": _check_holder,
        b"accounts": lambda k, v: records.decode_account(v),
        b"transfers": lambda k, v: records.decode_transfer(v),
        b"changes": lambda k, v: records.decode_change(v),
        b"steps": lambda k, v: records.decode_steps(v),
        b"notes": lambda k, v: _check_note(k, Book.CARD_TEXTS),
        b"requests": lambda k, v: _check_request(txn, _db(env, txn, b"answers", names), k, v),
        b"answers": lambda k, v: records.decode_answer(v),
    }
    for name, decode in decoders.items():
        db = _db(env, txn, name, names)
        if db is None:
            continue
        for key, value in txn.cursor(db=db):
            try:
                decode(bytes(key), bytes(value))
            except (CorruptRecord, UnicodeError) as error:
                raise CorruptRecord(f"{name.decode()} record {bytes(key)[:24]!r} does not "
                                    f"read back: {error}") from None


def _check_request(txn, answers, key: bytes, value: bytes) -> None:
    """Format 6: a request id names the sequence of its remembered answer, which names it."""
    found = txn.get(value, db=answers) if answers is not None and len(value) == 8 else None
    if found is None or records.decode_answer(found)[0] != key:
        raise CorruptRecord(f"request id names no remembered answer of its own ({len(value)} "
                            "bytes)")


def _check_holder(key: bytes, value: bytes) -> None:
    """Format 4's holder record, as far as it reads without the key: an HMAC-SM3 for a key,
    a holder id and a sealed value."""
    if len(key) != pii.INDEX_BYTES or len(value) <= 8:
        raise CorruptRecord(f"a holder record of key {len(key)} / value {len(value)} bytes")
    pii.split(value[8:])


def _check_note(key: bytes, kinds) -> None:
    kind, sep, card = key.decode("ascii").partition(":")
    if not sep or kind not in kinds or not card:
        raise CorruptRecord(f"note key {key!r} is not <kind>:<card number>")


# ---------------------------------------------------------------------------- 1 -> 2

_FORMAT_1_DBS = frozenset((b"cards", b"holders", b"holder_cards", b"requests", b"notes",
                           b"meta", b"accounts", b"transfers", b"holds_by_timeout",
                           b"holds_by_account", b"changes"))
_FORMAT_2_NEW_DBS = frozenset((b"residences", b"holder_ssn", b"steps", b"credit",
                               b"holder_history", b"points", b"employer_credit", b"ecards",
                               b"audit"))
# The layouts, as each format wrote them (frozen here: records.py moves on).
_CARD_1 = struct.Struct("<BBBBBBHqqQqqq20s20s32s")  # ... temp_loss_at ... no received_at
_CARD_2 = struct.Struct("<BBBBBBHqqQqqqq20s20s32s")  # ... temp_loss_until ... received_at
_TRANSFER_1 = struct.Struct("<BBBBqqqq40s40s64s32s")  # version kind status channel amount ...
_TRANSFER_2 = struct.Struct("<BBBBBqqqq40s40s64s32s")  # ... channel role amount ...
_CHANGE_1 = struct.Struct("<20sB64sq")  # card number, state, transfer id, amount
_CHANGE_2 = struct.Struct("<BBBBBBqQq20s64s")  # version kind state flags locks what time ...
_CHANGE_2_V1 = struct.Struct("<BBBBBqQq20s64s")  # format 2's change version 1: no `what`
# open steps: format 2's step, rule, due_at, the year without a calendar if due_at is 0;
# format 3's, after a version byte: step, rule, due_at, kind, start, n, provisional
_STEP_2 = struct.Struct("<16s8sqH")
_STEPS_3_VERSION, _STEP_3 = 2, struct.Struct("<16s8sqBqHB")
_ACCOUNT_SIZE = 33
assert (_CARD_1.size, _CARD_2.size, _CHANGE_1.size, _CHANGE_2.size) == (128, 136, 93, 114)
assert (_TRANSFER_1.size, _TRANSFER_2.size) == (212, 213)
_TEMP_LOSS, _APPLIED, _VERIFIED = 6, 1, 2  # model.State
_PENDING = 2  # TransferKind.PENDING, TransferStatus.PENDING
_CARD_KIND, _TRANSFER_KIND = 1, 2  # ChangeKind
_BALANCE, _ALL_BUT_BALANCE = 16, 127 - 16  # Changed
# Format 1 let exactly one role use each money channel (its server/clients.py CHANNEL_ROLES):
# TRANSIT by TRANSIT_GATE, MEDICAL by MEDICAL_TERMINAL, BENEFIT by BENEFIT_COUNTER (model.Role
# 1, 2, 3). Ledger.Transfer (channel 0) was open to three roles and did not record which.
_ROLE_OF_CHANNEL = {1: 1, 2: 2, 3: 3}
_TEMP_LOSS_SECONDS = 5 * 86400  # format 1's config.temp_loss_valid_seconds (SH-18b)
_U64 = struct.Struct(">Q")


def _card_1_to_2(key: bytes, value: bytes) -> bytes | None:
    """Format 1 kept when a temporary loss was reported, and lapsed it 5 x 24 hours later;
    format 2 keeps the instant it lapses: that same instant, so the card answers as it did.
    (Format 2 counts a new report to 24:00 of the fifth day, SH-18b as SPEC.md section 6
    counts periods; a migration carries over what was decided and told, it does not decide
    again: docs/DECISIONS.md.) A Residence Card's valid_until likewise stays as it was.
    received_at (GZ-12) was not kept: 0, as format 2 has it for a card never activated (a
    fee then counts from issued_at)."""
    if len(value) == _CARD_2.size and value[0] == 2:
        return None
    if len(value) != _CARD_1.size or value[0] != 1:
        raise CorruptRecord(f"card record {key!r} of {len(value)} bytes, version "
                            f"{value[:1]!r}: neither format 1's nor format 2's")
    (_, pack, state, flags, generation, locks, points, temp_loss_at, valid_until, holder,
     applied, issued, loss, replaced_by, replaces, bank) = _CARD_1.unpack(value)
    until = temp_loss_at + _TEMP_LOSS_SECONDS if state == _TEMP_LOSS and temp_loss_at else 0
    return _CARD_2.pack(2, pack, state, flags, generation, locks, points, until, valid_until,
                        holder, applied, issued, loss, 0, replaced_by, replaces, bank)


def _account_1_to_2(key: bytes, value: bytes) -> bytes | None:
    if len(value) != _ACCOUNT_SIZE or value[0] not in (1, 2):
        raise CorruptRecord(f"account record {key!r} of {len(value)} bytes")
    return None if value[0] == 2 else b"\x02" + value[1:]


def _transfer_1_to_2(key: bytes, value: bytes) -> bytes | None:
    if len(value) == _TRANSFER_2.size and value[0] == 2:
        return None
    if len(value) != _TRANSFER_1.size or value[0] != 1:
        raise CorruptRecord(f"transfer record {key!r} of {len(value)} bytes")
    (_, kind, status, channel, amount, created, timeout, resolved, debit, credit, ref,
     fingerprint) = _TRANSFER_1.unpack(value)
    return _TRANSFER_2.pack(2, kind, status, channel, _ROLE_OF_CHANNEL.get(channel, 0), amount,
                            created, timeout, resolved, debit, credit, ref, fingerprint)


def _holder_of_transfer(txn, transfers, transfer_id: bytes) -> int:
    """The holder whose account a transfer moved (the debit's, else the credit's), as format 2's
    ledger names it in the change log; 0 for operators only."""
    value = txn.get(transfer_id, db=transfers)
    if value is None:
        raise CorruptRecord(f"change record names transfer {transfer_id!r}, which is not stored")
    at = 5 if value[0] == 2 else 4  # the debit key follows the fixed fields
    at += 32
    debit, credit = bytes(value[at:at + 40]), bytes(value[at + 40:at + 80])
    for key in (debit, credit):
        if key[:1] == b"h":
            return _U64.unpack_from(key, 1)[0]
    return 0


def _from_1(env, txn, ring=None) -> dict[str, int]:
    """Format 1 -> 2. Change sequence numbers stay; each change record gets format 2's fields:
    kind (a transfer id says TRANSFER), the holder (of the card, or of the transfer's holder
    account), flags and locks (the card's own for its last change, which wrote the card as it
    is; not known for earlier ones: 0), what changed (format 1 did not say: BALANCE for a
    transfer, everything else for a card, as format 2 reads an unversioned-what record) and
    time 0 (format 1 did not keep it). Requests stay as they are: format 2 binds a request id
    to the client that sent it, which format 1 did not keep, so a pre-upgrade id replayed is
    ID_REUSED, never done twice."""
    # every database of format 2, made here (empty) so the store is whole when it commits
    dbs = {name: env.open_db(name, txn=txn)
           for name in sorted(_FORMAT_1_DBS | _FORMAT_2_NEW_DBS)}
    cards, transfers = dbs[b"cards"], dbs[b"transfers"]
    counts: dict[str, int] = {}

    # changes first: they read the cards' holders, flags and locks (same offsets in both)
    last_of: dict[bytes, int] = {}  # card -> the sequence of its last change
    with txn.cursor(db=dbs[b"changes"]) as cur:
        for key, value in cur:
            if len(value) == _CHANGE_1.size:
                card = bytes(value[:20]).rstrip(b"\0")
                if card and not bytes(value[21:85]).rstrip(b"\0"):
                    last_of[card] = _U64.unpack(key)[0]

    def change(key: bytes, value: bytes) -> bytes | None:
        if len(value) in (113, _CHANGE_2.size) and value[0] in (1, 2):
            return None
        if len(value) != _CHANGE_1.size:
            raise CorruptRecord(f"change record {_U64.unpack(key)[0]} of {len(value)} bytes")
        card, state, transfer_id, amount = _CHANGE_1.unpack(value)
        card, transfer_id = card.rstrip(b"\0"), transfer_id.rstrip(b"\0")
        if transfer_id:
            return _CHANGE_2.pack(2, _TRANSFER_KIND, state, 0, 0, _BALANCE, 0,
                                  _holder_of_transfer(txn, transfers, transfer_id), amount,
                                  card, transfer_id)
        record = txn.get(card, db=cards)
        if record is None:
            raise CorruptRecord(f"change record {_U64.unpack(key)[0]} names card {card!r}, "
                                "which is not stored")
        holder = struct.unpack_from("<Q", record, 24)[0]
        flags, locks = ((record[3], record[5]) if last_of.get(card) == _U64.unpack(key)[0]
                        else (0, 0))
        return _CHANGE_2.pack(2, _CARD_KIND, state, flags, locks, _ALL_BUT_BALANCE, 0, holder,
                              amount, card, b"")

    counts["changes converted"] = _rewrite(txn, dbs[b"changes"], change)[0]
    counts["cards converted"] = _rewrite(txn, cards, _card_1_to_2)[0]
    counts["accounts converted"] = _rewrite(txn, dbs[b"accounts"], _account_1_to_2)[0]
    counts["transfers converted"] = _rewrite(txn, transfers, _transfer_1_to_2)[0]

    # notes: "<card>" -> "note:<card>" (why a card was rejected or cancelled)
    old_notes = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=dbs[b"notes"])
                 if b":" not in bytes(k)]
    for key, value in old_notes:
        txn.delete(key, db=dbs[b"notes"])
        txn.put(b"note:" + key, value, db=dbs[b"notes"])
    counts["notes renamed"] = len(old_notes)

    # holder_ssn: holder id -> identity number, the index format 2 keeps beside holders
    added = 0
    for key, value in txn.cursor(db=dbs[b"holders"]):
        if txn.put(bytes(value[:8]), bytes(key), db=dbs[b"holder_ssn"], overwrite=False):
            added += 1
    counts["holder_ssn added"] = added

    counts["requests kept"] = txn.stat(dbs[b"requests"])["entries"]
    counts["holders kept"] = txn.stat(dbs[b"holders"])["entries"]
    # what format 1 did not keep, counted for the operator (NOTES says what follows)
    counts["open holds with no role"] = sum(
        1 for _, v in txn.cursor(db=transfers)
        if v[1] == _PENDING and v[2] == _PENDING and v[3] == 0)
    counts["cards in progress with no steps"] = sum(
        1 for _, v in txn.cursor(db=cards) if v[2] in (_APPLIED, _VERIFIED))
    return counts


# The periods of format 2's steps, by rule: (kind of count, days, what it counts from).
_PERIODS = {"SH-10": (WORKING_DAYS, 3, "applied"), "SH-23a": (DAYS_FOR_AN_ACT, 15, "applied"),
            "GZ-10": (WORKING_DAYS, 12, "applied"), "GZ-25": (WORKING_DAYS, 12, "applied"),
            "RC-12": (WORKING_DAYS, 15, "applied"), "SH-11": (DAYS_FOR_AN_ACT, 30, "verified"),
            "RC-23": (WORKING_DAYS, 20, "points")}


def _from_2(env, txn, ring=None) -> dict[str, int]:
    """Format 2 -> 3: each card's open steps keep how their end was counted (SPEC.md section
    6), so that one counted through a year without its notice is counted again when the
    notice is installed. A format-2 step counted on official years keeps its end, fixed
    (kind 0: never counted again). One whose year had no file (due_at 0, the year kept) is
    counted now, provisionally where a year still has no file, from its start: the card's
    application (SH-10, SH-23a, GZ-10, GZ-25, RC-12: 30 working days where special
    circumstances were stated), its verification as the change log has it (SH-11), or the
    points application's acceptance (RC-23). Stores made by builds that already wrote this
    layout under format 2 are left as they are."""
    from yikatong.calendar import count

    steps_db, cards_db = env.open_db(b"steps", txn=txn), env.open_db(b"cards", txn=txn)
    notes_db, points_db = env.open_db(b"notes", txn=txn), env.open_db(b"points", txn=txn)
    verified: dict[bytes, int] = {}  # card -> when it was last verified (SH-11's start)

    def verified_at(card: bytes) -> int:
        if not verified:
            for _, value in txn.cursor(db=env.open_db(b"changes", txn=txn)):
                if len(value) == _CHANGE_2.size and value[0] == 2:
                    fields = _CHANGE_2.unpack(value)
                    state, time, number = fields[2], fields[6], fields[9]
                elif len(value) == _CHANGE_2_V1.size and value[0] == 1:
                    fields = _CHANGE_2_V1.unpack(value)
                    state, time, number = fields[2], fields[5], fields[8]
                else:
                    raise CorruptRecord(f"a change record of {len(value)} bytes in format 2")
                if state == State.VERIFIED and number.rstrip(b"\0"):
                    verified[number.rstrip(b"\0")] = time
            verified.setdefault(b"", 0)
        return verified.get(card, 0)

    def start_of(card: bytes, rule: str, since: str) -> int:
        value = txn.get(card, db=cards_db)
        if value is None or len(value) != _CARD_2.size:
            raise CorruptRecord(f"steps of card {card!r}, whose card record is not format 2's")
        fields = _CARD_2.unpack(value)
        holder_id, applied_at = fields[9], fields[10]
        if since == "applied":
            return applied_at
        if since == "verified":
            return verified_at(card) or applied_at
        points = txn.get(_U64.pack(holder_id), db=points_db)
        record = pb.PointsRecord.FromString(bytes(points)[1:]) if points is not None else None
        if record is None or not record.HasField("open_application"):
            raise CorruptRecord(f"an RC-23 step of card {card!r} with no points application")
        return record.open_application.accepted_at

    counted = [0, 0]  # steps counted now, of them provisional

    def convert(key: bytes, value: bytes) -> bytes | None:
        if value and value[0] == _STEPS_3_VERSION and (len(value) - 1) % _STEP_3.size == 0:
            return None  # the new layout already (odd: 1 + 44n bytes; format 2's are 34n)
        if len(value) % _STEP_2.size:
            raise CorruptRecord(f"steps of card {key!r}: {len(value)} bytes")
        steps = []
        for step, rule_bytes, due_at, missing_year in _STEP_2.iter_unpack(value):
            rule = rule_bytes.rstrip(b"\0").decode("ascii")
            if due_at or not missing_year:  # counted on official years: fixed (kind 0)
                steps.append(_STEP_3.pack(step, rule_bytes, due_at, 0, 0, 0, False))
                continue
            if rule not in _PERIODS:
                raise CorruptRecord(f"a step of card {key!r} under rule {rule}, uncounted, "
                                    "that no period is known for")
            kind, n, since = _PERIODS[rule]
            if rule == "RC-12" and txn.get(b"special:" + key, db=notes_db):
                n = 30
            start = start_of(key, rule, since)
            end = count(kind, start, n)
            steps.append(_STEP_3.pack(step, rule_bytes, end.at, kind, start, n, end.provisional))
            counted[0] += 1
            counted[1] += end.provisional
        return bytes((_STEPS_3_VERSION,)) + b"".join(steps)

    counts = {"steps converted": _rewrite(txn, steps_db, convert)[0]}
    counts["steps counted now"], counts["of them provisional"] = counted
    return counts


# from_format -> the function converting every record of it, in the migration's transaction
def _from_3(env, txn, ring) -> dict[str, int]:
    """Format 3 -> 4: every holder's personal information sealed (storage/pii.py): holders
    re-keyed by the HMAC of their identity number, holder_ssn pointing at that HMAC, the
    history, residence and proxy values sealed, the index key recorded in meta."""
    holders, holder_ssn = env.open_db(b"holders", txn=txn), env.open_db(b"holder_ssn", txn=txn)
    counts = {"holders sealed": 0}
    after: bytes | None = None
    while True:  # format 3's keys are identity numbers (18 ASCII); format 4's 32-byte HMACs
        batch: list[tuple[bytes, bytes]] = []
        with txn.cursor(db=holders) as cur:
            more = cur.set_range(after + b"\0") if after is not None else cur.first()
            while more and len(batch) < _BATCH:
                if len(cur.key()) != pii.INDEX_BYTES:
                    batch.append((bytes(cur.key()), bytes(cur.value())))
                more = cur.next()
        for old_key, value in batch:
            if len(value) <= 8:
                raise CorruptRecord(f"a holder record of {len(value)} bytes")
            key = ring.index(old_key.decode("ascii"))
            txn.delete(old_key, db=holders)
            txn.put(key, value[:8] + ring.seal(b"holders\0" + key, value[8:], True), db=holders)
            txn.put(value[:8], key, db=holder_ssn)
            counts["holders sealed"] += 1
        if len(batch) < _BATCH:
            break
        after = batch[-1][0]
    left = sum(1 for _, v in txn.cursor(db=holder_ssn) if len(v) != pii.INDEX_BYTES)
    if left:
        raise CorruptRecord(f"{left} holder_ssn entries name no holder record")

    def sealed(name: bytes):
        return lambda key, value: ring.seal(name + b"\0" + key, value, True)

    for name in (b"holder_history", b"residences"):
        counts[f"{name.decode()} sealed"] = _rewrite(txn, env.open_db(name, txn=txn),
                                                     sealed(name))[0]

    def proxy(key: bytes, value: bytes) -> bytes | None:
        if not key.startswith(b"proxy:"):
            return None
        relation, ground, person = value.decode("utf-8").split(" ", 2)
        return (f"{relation} {ground}".encode("utf-8") + b"\0"
                + ring.seal(b"notes\0" + key, person.encode("utf-8"), True))

    counts["proxy notes sealed"] = _rewrite(txn, env.open_db(b"notes", txn=txn), proxy)[0]
    txn.put(pii.META_INDEX, ring.index_id.encode("ascii") + b"\0" + ring.index_check(),
            db=env.open_db(b"meta", txn=txn))
    return counts


_REQUEST_5 = struct.Struct("<32sq")  # format 5's remembered answer: fingerprint, time; answer
_AUDIT_HEAD_4 = 66  # format 4's audit event: version, algorithm, prev_hash, hash; then the body
_AUDIT_TIME_4 = struct.Struct("<Qq")  # the body's sequence and time


def _from_4(env, txn, ring=None) -> dict[str, int]:
    """Format 4 -> 5: every remembered answer gets a time, the store's last recorded one (its
    newest change or audit event's: format 4 did not keep when an answer was given), and an
    entry under it in requests_by_time; the archive's databases are made (empty)."""
    requests = env.open_db(b"requests", txn=txn)
    by_time = env.open_db(b"requests_by_time", txn=txn)
    env.open_db(b"archived_ids", txn=txn)
    last = 0
    with txn.cursor(db=env.open_db(b"changes", txn=txn)) as cur:
        if cur.last():
            value = bytes(cur.value())
            if len(value) == _CHANGE_2.size and value[0] == 2:
                last = max(last, struct.unpack_from("<q", value, 6)[0])
    with txn.cursor(db=env.open_db(b"audit", txn=txn)) as cur:
        if cur.last():
            value = bytes(cur.value())
            if len(value) >= _AUDIT_HEAD_4 + _AUDIT_TIME_4.size:
                last = max(last, _AUDIT_TIME_4.unpack_from(value, _AUDIT_HEAD_4)[1])

    def convert(key: bytes, value: bytes) -> bytes | None:
        if len(value) < 32:
            raise CorruptRecord(f"remembered answer {key[:24]!r} of {len(value)} bytes")
        txn.put(_U64.pack(last) + key, b"", db=by_time)
        return value[:32] + struct.pack("<q", last) + value[32:]

    return {"remembered answers timed": _rewrite(txn, requests, convert)[0],
            "at (unix seconds)": last}


# Format 5's records that format 6 writes smaller, and format 6's, spelled out (records.py
# moves on; these stay as they were written)
_TRANSFER_5 = _TRANSFER_2  # version 2: ... debit(40) credit(40) ref_id(64) fingerprint(32)
# version 3, kind | status << 4, channel | role << 3, has, amount created_at (i64: the wide
# head, has bit 3), len(debit) len(credit); then timeout_at if set (has bit 0), resolved if
# set (has bit 1), debit, credit, ref_id
_TRANSFER_6 = struct.Struct("<BBBBqqBB")
_CHANGE_6 = struct.Struct("<BBBBBBqQqB")  # version 3, ..., amount, len(card); card, transfer id
_AUDIT_5 = struct.Struct("<BB32s32s")  # version 1, algorithm, prev_hash, hash; then the body
_AUDIT_BODY_5 = struct.Struct("<QqI")  # sequence time count; 7 texts, each u16 LE length + UTF-8
_AUDIT_6 = struct.Struct("<BB32s")  # version 2, algorithm, hash; then sequence time count, texts
_ANSWER_6 = struct.Struct("<BqB16s")  # version 1, time, len(id), fingerprint[:16]; id, answer
# format 6's code tables for the audit texts role (the 2nd) and method (the 3rd): 1 + index
_ROLES_6 = ("TRANSIT_GATE", "MEDICAL_TERMINAL", "BENEFIT_COUNTER", "BANK_SWITCH",
            "COMMUNITY_OUTLET", "BANK_OUTLET", "ONLINE_PLATFORM", "SERVICE_HOTLINE",
            "CARD_AGENCY", "PUBLIC_SECURITY", "HRSS", "AUDITOR", "ADMIN")
_METHODS_6 = (
    "Authorization.Authorize", "Authorization.AuthorizeBatch", "Authorization.AuthorizeStream",
    "CardStatus.GetStatus", "CardStatus.GetStatusBatch", "CardStatus.WatchChanges",
    "Lifecycle.Apply", "Lifecycle.Verify", "Lifecycle.Issue", "Lifecycle.Activate",
    "Lifecycle.OpenFinancial", "Lifecycle.ReportTemporaryLoss", "Lifecycle.ReportLoss",
    "Lifecycle.CancelLoss", "Lifecycle.ReportBankLoss", "Lifecycle.CancelBankLoss",
    "Lifecycle.Replace", "Lifecycle.Cancel", "Lifecycle.LockApplication",
    "Lifecycle.UnlockApplication", "Lifecycle.GetCard", "Lifecycle.IssueElectronic",
    "Ledger.Transfer", "Ledger.Reverse", "Ledger.GetBalances", "ResidenceCard.Renew",
    "ResidenceCard.StateSpecialCircumstances", "ResidenceCard.ChangeInformation",
    "ResidenceCard.ApplyPoints", "ResidenceCard.DecidePoints", "ResidenceCard.GetPoints",
    "Deadlines.ListDue", "Holders.GetHolder", "Holders.CorrectHolder", "Holders.RecordCredit",
    "Audit.Export", "Audit.Verify", "Admin.AdvanceClock", "Admin.SetClock")


def _from_5(env, txn, ring=None) -> dict[str, int]:
    """Format 5 -> 6: smaller hot records, the same meaning. Transfers lose their padding and
    the request's fingerprint (kept once, with the remembered answer); change events their
    padding; audit events the previous event's hash (the chain has it: each event's hash is
    unchanged, over the same canonical body) and their role and method names (codes)."""

    def transfer(key: bytes, value: bytes) -> bytes | None:
        if len(value) != _TRANSFER_5.size or value[0] != 2:
            raise CorruptRecord(f"transfer {key[:24]!r} of {len(value)} bytes, not format 5's")
        (_, kind, status, channel, role, amount, created, timeout, resolved, debit, credit,
         ref, _fingerprint) = _TRANSFER_5.unpack(value)
        debit, credit, ref = debit.rstrip(b"\0"), credit.rstrip(b"\0"), ref.rstrip(b"\0")
        has = (1 if timeout else 0) | (2 if resolved else 0) | 8  # 8: the wide head
        return (_TRANSFER_6.pack(3, kind | status << 4, channel | role << 3, has, amount,
                                 created, len(debit), len(credit))
                + (struct.pack("<q", timeout) if timeout else b"")
                + (struct.pack("<q", resolved) if resolved else b"") + debit + credit + ref)

    def change(key: bytes, value: bytes) -> bytes | None:
        if len(value) == _CHANGE_2.size and value[0] == 2:
            (_, kind, state, flags, locks, what, time, holder, amount, card,
             tid) = _CHANGE_2.unpack(value)
        elif len(value) == _CHANGE_2_V1.size and value[0] == 1:  # no `what`: as format 5 read it
            (_, kind, state, flags, locks, time, holder, amount, card,
             tid) = _CHANGE_2_V1.unpack(value)
            what = _BALANCE if kind == _TRANSFER_KIND else _ALL_BUT_BALANCE
        else:
            raise CorruptRecord(f"change record {_U64.unpack(key)[0]} of {len(value)} bytes, "
                                "not format 5's")
        card, tid = card.rstrip(b"\0"), tid.rstrip(b"\0")
        return _CHANGE_6.pack(3, kind, state, flags, locks, what, time, holder, amount,
                              len(card)) + card + tid

    codes = ({n: i + 1 for i, n in enumerate(_ROLES_6)},
             {n: i + 1 for i, n in enumerate(_METHODS_6)})

    def audit(key: bytes, value: bytes) -> bytes | None:
        if len(value) < _AUDIT_5.size + _AUDIT_BODY_5.size or value[0] != 1:
            raise CorruptRecord(f"audit event {_U64.unpack(key)[0]} of {len(value)} bytes, not "
                                "format 5's")
        _, algorithm, _prev, digest = _AUDIT_5.unpack_from(value)
        at = _AUDIT_5.size + _AUDIT_BODY_5.size
        out = [_AUDIT_6.pack(2, algorithm, digest), value[_AUDIT_5.size:at]]
        for i in range(7):  # client_id role method card_number purpose outcome holder
            (n,) = struct.unpack_from("<H", value, at)
            raw = value[at + 2:at + 2 + n]
            if len(raw) != n:
                raise CorruptRecord(f"audit event {_U64.unpack(key)[0]} is cut")
            at += 2 + n
            if i in (1, 2):
                code = codes[i - 1].get(raw.decode("utf-8"), 0)
                out.append(bytes((code,)))
                if code:
                    continue
            out.append((bytes((n,)) if n < 255 else b"\xff" + struct.pack("<H", n)) + raw)
        if at != len(value):
            raise CorruptRecord(f"audit event {_U64.unpack(key)[0]} has bytes too many")
        return b"".join(out)

    # remembered answers: format 5's `requests` (id -> fingerprint, time, answer) and its
    # `requests_by_time` index become `answers` (u64 BE sequence, in the index's order: time,
    # then id -> the answer record) and `requests` (id -> that sequence)
    requests, by_time = env.open_db(b"requests", txn=txn), env.open_db(b"requests_by_time",
                                                                        txn=txn)
    answers = env.open_db(b"answers", txn=txn)
    seq = 0

    def answer(key: bytes, value: bytes, time: int) -> None:
        nonlocal seq
        if len(value) < _REQUEST_5.size:
            raise CorruptRecord(f"remembered answer {key[:24]!r} of {len(value)} bytes")
        if not 0 < len(key) <= 255:
            raise CorruptRecord(f"a request id of {len(key)} bytes")
        seq += 1
        txn.put(_U64.pack(seq), _ANSWER_6.pack(1, time, len(key), value[:16]) + key
                + value[_REQUEST_5.size:], db=answers, append=True)
        txn.put(key, _U64.pack(seq), db=requests)

    after = None
    while True:  # the index in its order, in batches (a cursor never walks what is written)
        batch: list[bytes] = []
        with txn.cursor(db=by_time) as cur:
            more = cur.set_range(after + b"\0") if after is not None else cur.first()
            while more and len(batch) < _BATCH:
                batch.append(bytes(cur.key()))
                more = cur.next()
        for key in batch:
            value = txn.get(key[8:], db=requests)
            if value is not None and len(value) != 8:  # (8 bytes: converted already)
                answer(key[8:], bytes(value), _U64.unpack_from(key)[0])
        if len(batch) < _BATCH:
            break
        after = batch[-1]
    unindexed = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=requests) if len(v) != 8]
    for key, value in unindexed:  # (none in a store format 5 wrote; by id if there are)
        answer(key, value, struct.unpack_from("<q", value, 32)[0])
    txn.drop(by_time, delete=True)
    counted = {"remembered answers in sequence": seq, "of them not indexed": len(unindexed)}

    return counted | {"transfers made smaller": _rewrite(txn, env.open_db(b"transfers", txn=txn),
                                               transfer)[0],
            "change events made smaller": _rewrite(txn, env.open_db(b"changes", txn=txn),
                                                   change)[0],
            "audit events made smaller": _rewrite(txn, env.open_db(b"audit", txn=txn),
                                                  audit)[0]}


MIGRATIONS: dict[int, Callable[..., dict[str, int]]] = {1: _from_1, 2: _from_2, 3: _from_3,
                                                        4: _from_4, 5: _from_5}
# what a migration could not carry over, said to the operator after it: {count: note}, said
# when that count is not 0 ("": always)
NOTES: dict[str, dict[str, str]] = {
    "1->2": {
        "open holds with no role": "open holds with no role were placed through "
        "Ledger.Transfer, whose caller's role format 1 did not keep: no caller can post or "
        "void them now; each is released at its timeout",
        "cards in progress with no steps": "format 1 kept no deadlines, nor when a card was "
        "verified: Deadlines.ListDue and `yikatong due` do not list the cards in progress",
        "": "format 1's change records carry time 0 (it was not kept); a request id sent "
        "before the upgrade and sent again is ID_REUSED (format 1 did not keep which client "
        "sent it), never done twice",
    },
}
assert set(MIGRATIONS) == set(range(1, FORMAT)), "every older format has its migration"

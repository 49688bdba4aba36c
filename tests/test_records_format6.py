"""Store format 6's smaller hot records (issue 26, part 3): each layout round-trips, refuses
what is not its own, and reads format 5's records where they stay (archive segments written
before the upgrade). Format 5's layouts are spelled out here, as format 5 wrote them."""
import dataclasses
import hashlib
import itertools
import struct

import pytest

from yikatong.errors import CorruptRecord, IdReused, InvalidRecord
from yikatong.model import ChangeKind, Transfer, TransferKind, TransferStatus
from yikatong.storage import archive
from yikatong.storage import records as r
from yikatong.storage.lmdb_store import AUDIT_ALGORITHM, Store, audit_hash

TRANSFER_5 = struct.Struct("<BBBBBqqqq40s40s64s32s")
CHANGE_5 = struct.Struct("<BBBBBBqQq20s64s")
AUDIT_HEAD_5, AUDIT_BODY_5 = struct.Struct("<BB32s32s"), struct.Struct("<QqI")
REQUEST_5 = struct.Struct("<32sq")
U64 = struct.Struct(">Q")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "data"), map_size=16 * 2**20)
    yield s
    s.close()


# ---------------------------------------------------------------------------- transfers

@pytest.mark.parametrize("timeout_at, resolved, ref_id", list(itertools.product(
    (0, 1_790_003_600), (0, 250), ("", "hold-1", "挂" * 21))))
def test_a_transfer_round_trips_and_is_as_long_as_what_it_holds(timeout_at, resolved, ref_id):
    t = Transfer(TransferKind.PENDING, TransferStatus.PENDING, 500, b"h" + bytes(8) + b"\x02",
                 b"oop:transit", ref_id, bytes(32), 1_790_000_000, timeout_at, resolved, 1, 1)
    value = r.encode_transfer(t)
    assert value[0] == r.TRANSFER_VERSION == 3
    assert len(value) == (14 + 10 + 11 + len(ref_id.encode()) + 8 * bool(timeout_at)
                          + 8 * bool(resolved))
    assert r.decode_transfer(value) == t
    # an amount or a time past a u32: the wide head (i64 each), 8 bytes more
    for wide in (dict(amount=2**32), dict(created_at=2**32), dict(created_at=-1)):
        w = dataclasses.replace(t, **wide)
        assert len(r.encode_transfer(w)) == len(value) + 8
        assert r.decode_transfer(r.encode_transfer(w)) == w


def test_a_plain_debit_is_35_bytes_where_format_5_wrote_213():
    t = Transfer(TransferKind.SINGLE, TransferStatus.POSTED, 1, b"h" + bytes(8) + b"\x02",
                 b"oop:transit", "", hashlib.sha256(b"request").digest(), 1_790_000_000,
                 channel=1, role=1)
    assert len(r.encode_transfer(t)) == 35 and TRANSFER_5.size == 213
    # the fingerprint is the remembered answer's to keep, not the transfer's
    assert r.decode_transfer(r.encode_transfer(t)).fingerprint == bytes(32)


def test_a_format_5_transfer_is_still_read():
    fp = hashlib.sha256(b"x").digest()
    old = TRANSFER_5.pack(2, TransferKind.REVERSAL, TransferStatus.POSTED, 1, 9, 100,
                          1_790_000_000, 0, 0, b"oop:transit", b"h" + bytes(8) + b"\x02",
                          b"tap-1", fp)
    assert r.decode_transfer(old) == Transfer(
        TransferKind.REVERSAL, TransferStatus.POSTED, 100, b"oop:transit",
        b"h" + bytes(8) + b"\x02", "tap-1", fp, 1_790_000_000, 0, 0, 1, 9)


def test_a_corrupt_transfer_is_refused():
    t = Transfer(TransferKind.SINGLE, TransferStatus.POSTED, 1, b"h" * 10, b"oop:transit",
                 "", bytes(32), 1_790_000_000, 1_790_000_060, 7)
    good = r.encode_transfer(t)
    for bad in (bytes([9]) + good[1:],  # an unknown version
                good[:30],  # cut inside the keys
                good[:3] + bytes([16]) + good[4:],  # an unknown `has` bit (4: decision, 8: wide)
                good[:12] + bytes([41]) + good[13:],  # a debit key longer than any
                good + b"x" * 65,  # a reference longer than any
                good[:1] + bytes([7 | 1 << 4]) + good[2:]):  # an unknown kind
        with pytest.raises(CorruptRecord):
            r.decode_transfer(bad)
    with pytest.raises(InvalidRecord, match="account keys"):
        r.encode_transfer(Transfer(TransferKind.SINGLE, TransferStatus.POSTED, 1, b"h" * 41,
                                   b"o:x"))


# ---------------------------------------------------------------------------- change events

def test_a_change_event_round_trips_and_format_5_s_is_still_read():
    value = r.encode_change(ChangeKind.TRANSFER, 1_790_000_000, "310000000001", 7,
                            transfer_id="batch-1", amount=1, what=16)
    assert value[0] == r.CHANGE_VERSION == 3 and len(value) == 31 + 12 + 7
    change = r.decode_change(value)
    assert (change.kind, change.time, change.card_number, change.holder_id, change.transfer_id,
            change.amount, change.what) == (2, 1_790_000_000, "310000000001", 7, "batch-1", 1,
                                            16)
    old = CHANGE_5.pack(2, 2, 0, 0, 0, 16, 1_790_000_000, 7, 1, b"310000000001", b"batch-1")
    assert r.decode_change(old) == change
    for bad in (bytes([9]) + value[1:], value[:40], value[:30] + bytes([21]) + value[31:],
                value + b"x" * 60):
        with pytest.raises(CorruptRecord):
            r.decode_change(bad)


# ---------------------------------------------------------------------------- audit events

TEXTS = ("transit_gate", "TRANSIT_GATE", "Authorization.AuthorizeStream", "310000000001", "",
         "OK", "")


def test_an_audit_event_keeps_its_hash_and_leaves_out_what_the_chain_says():
    """Version 2 stores no prev_hash and codes role and method; its hash is version 1's, over
    the same canonical body, so a chain may hold both."""
    prev = hashlib.sha256(b"event 6").digest()
    body = r.audit_body(7, 1_790_000_000, 1, *TEXTS)
    digest = audit_hash(prev, body)
    v1 = AUDIT_HEAD_5.pack(1, AUDIT_ALGORITHM, prev, digest) + body
    v2 = r.encode_audit_event(AUDIT_ALGORITHM, digest, 7, 1_790_000_000, 1, TEXTS)
    assert len(v2) == 87 and len(v1) == 167
    assert r.split_audit(v2, prev) == r.split_audit(v1) == (AUDIT_ALGORITHM, prev, digest, body)
    assert r.decode_audit(v2, prev) == r.decode_audit(v1)
    assert r.encode_audit(AUDIT_ALGORITHM, prev, digest, body) == v2
    assert r.audit_hash_of(v1) == r.audit_hash_of(v2) == digest
    # a role or method not in the tables is kept as text
    odd = ("c", "SOMEONE_NEW", "New.Method", "", "p" * 300, "DENIED", "h")
    v2 = r.encode_audit_event(AUDIT_ALGORITHM, digest, 8, 5, 2, odd)
    event = r.decode_audit(v2, prev)
    assert (event.role, event.method, event.purpose, event.count) == odd[1:3] + (odd[4], 2)


def test_a_corrupt_audit_event_is_refused():
    good = r.encode_audit_event(AUDIT_ALGORITHM, bytes(32), 7, 5, 1, TEXTS)
    at_role = 34 + 20 + 1 + len(TEXTS[0])
    for bad in (good[:-1] + b"", good + b"x", good[:at_role] + bytes([250]) + good[at_role + 1:],
                good[:at_role + 1] + bytes([200]) + good[at_role + 2:], good[:60]):
        with pytest.raises(CorruptRecord):
            r.decode_audit(bad)


def test_a_chain_of_format_5_events_goes_on_in_format_6_and_verifies(store):
    prev = bytes(32)
    with store.env.begin(write=True) as txn:  # two events as format 5 wrote them
        for seq in (1, 2):
            body = r.audit_body(seq, 100 + seq, 1, *TEXTS)
            digest = audit_hash(prev, body)
            txn.put(U64.pack(seq), AUDIT_HEAD_5.pack(1, AUDIT_ALGORITHM, prev, digest) + body,
                    db=store.dbs.audit)
            prev = digest
    store.write(lambda book: book.append_audit(103, *TEXTS[:4]))
    with store.read() as txn:
        book = store.book(txn)
        values = [v for _, v in book.audit_records()]
        assert [v[0] for v in values] == [1, 1, 2]
        assert book.verify_audit() == (True, 3, 0, "")
        events = list(r.audit_chain(values))
    assert events[2].prev_hash == events[1].hash == prev


# ---------------------------------------------------------------------------- answers

def test_a_remembered_answer_round_trips_and_a_corrupt_one_is_refused():
    fp = hashlib.sha256(b"request").digest()
    value = r.encode_answer(b"batch-1", fp, 1_790_000_000, b"\x0a\x07batch-1")
    assert len(value) == 26 + 7 + 9
    assert r.decode_answer(value) == (b"batch-1", fp[:16], 1_790_000_000, b"\x0a\x07batch-1")
    for bad in (bytes([2]) + value[1:], value[:20], value[:9] + bytes([0]) + value[10:],
                value[:9] + bytes([200]) + value[10:]):
        with pytest.raises(CorruptRecord):
            r.decode_answer(bad)
    with pytest.raises(InvalidRecord):
        r.encode_answer(b"", fp, 0, b"")


def test_a_replay_is_answered_from_the_store_and_from_a_format_5_segment(store):
    """A format-5 segment keeps (fingerprint, time, answer) under the id, and no
    answer_version: read as it was written."""
    fp, other = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    store.write(lambda book: book.remember("new-1", fp, b"first answer"))
    old_value = REQUEST_5.pack(fp, 1_790_000_000) + b"archived answer"
    manifest = {"segment": 1, "prev_hash": bytes(32).hex(), "through": {"changes": 0,
                "audit": 0}, "audit_last_hash": bytes(32).hex(),
                "kinds": {"changes": {"count": 0}, "audit": {"count": 0},
                          "transfers": {"count": 1}, "requests": {"count": 1}}}
    data, digest = archive.encode(manifest, {"changes": [], "audit": [], "transfers": [
        (b"tap-1", TRANSFER_5.pack(2, 1, 1, 1, 1, 300, 1, 0, 0, b"h" * 10, b"oop:transit", b"",
                                   fp))], "requests": [(b"old-1", old_value)]})
    archive.write(archive.archive_dir(store.data_dir), 1, data)

    def recorded(book):
        book._put(archive.HEAD_KEY, struct.pack("<I32s", 1, digest), db=book.dbs.meta)
        book._put(archive.id_digest(b"old-1"), struct.pack("<I", 1), db=book.dbs.archived_ids)
    store.write(recorded)
    with store.read() as txn:
        book = store.book(txn)
        assert book.replay("new-1", fp) == b"first answer"
        assert book.replay("old-1", fp) == b"archived answer"
        assert book.replay("never", fp) is None
        for request_id in ("new-1", "old-1"):
            with pytest.raises(IdReused):
                book.replay(request_id, other)
    ok, bad, problem, _, _ = archive.verify(archive.archive_dir(store.data_dir), 1, digest)
    assert ok, problem

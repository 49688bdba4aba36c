"""The card record layout and the LMDB store's promises."""
import threading

import pytest

from yikatong.errors import CorruptRecord, InvalidRecord, StoreUnavailable
from yikatong.model import (
    Card,
    Change,
    Changed,
    ChangeKind,
    Flag,
    Pack,
    State,
    Transfer,
    TransferKind,
    TransferStatus,
)
from yikatong.storage import records as r
from yikatong.storage.lmdb_store import Store


def test_record_round_trip_is_fixed_width_with_a_version_byte():
    rec = Card("31000000000000000001", Pack.GZ, State.LOST, flags=5, generation=2,
                     lock_mask=0b100, points=65535, temp_loss_until=-1, valid_until=2**62,
                     holder_id=2**64 - 1, replaced_by="44000000000000000002",
                     replaces="4400", service_bank="工商银行")
    value = r.encode_card(rec)
    assert len(value) == r.SIZE == 136 and value[0] == r.VERSION == 2
    assert r.decode_card(rec.card_number, value) == rec


@pytest.mark.parametrize("value", [b"", b"\x02" * 135, bytes([1]) + bytes(135)])
def test_record_decode_refuses_what_it_does_not_understand(value):
    with pytest.raises(CorruptRecord):
        r.decode_card("1", value)


def test_a_data_dir_is_served_by_one_server_only(store):
    with pytest.raises(StoreUnavailable, match="locked by another running server"):
        Store(store.data_dir)


def test_a_refused_command_rolls_back_alone_in_its_group(store):
    gate = threading.Event()
    store.submit(lambda book: gate.wait())  # hold the writer so the next three share a group

    def put(n):
        return lambda book: book.put_card(Card(n, Pack.SH, State.ACTIVE), 0)

    def put_then_fail(book):
        book.put_card(Card("2", Pack.SH, State.ACTIVE), 0)
        raise ValueError("refused")

    futures = [store.submit(put("1")), store.submit(put_then_fail), store.submit(put("3"))]
    gate.set()
    futures[0].result(), futures[2].result()
    with pytest.raises(ValueError):
        futures[1].result()
    with store.read() as txn:
        book = store.book(txn)
        assert book.card("1") and book.card("3") and book.card("2") is None


def test_readers_do_not_wait_for_the_writer(store):
    store.write(lambda book: book.put_card(Card("1", Pack.SH, State.ACTIVE), 0))
    inside, release = threading.Event(), threading.Event()

    def slow(book):
        book.put_card(Card("1", Pack.SH, State.LOST), 0)
        inside.set()
        release.wait()

    future = store.submit(slow)
    inside.wait()
    with store.read() as txn:  # the write is open and uncommitted: we see the old state
        assert store.book(txn).card("1").state == State.ACTIVE
    release.set()
    future.result()
    with store.read() as txn:
        assert store.book(txn).card("1").state == State.LOST


def test_committed_writes_survive_a_reopen(tmp_path):
    s = Store(str(tmp_path / "d"), map_size=16 * 1024**2)
    s.write(lambda book: book.put_card(Card("7", Pack.BJ, State.ISSUED), 0))
    s.close()
    s = Store(str(tmp_path / "d"), map_size=16 * 1024**2)
    with s.read() as txn:
        assert s.book(txn).card("7").state == State.ISSUED
    s.close()


def test_a_cancelled_caller_is_skipped_and_the_writer_lives_on(store):
    """A gRPC call cancelled while its command waits cancels the command's future; the writer
    must neither run it nor die delivering its answer (found by the Locust run)."""
    gate = threading.Event()
    store.submit(lambda book: gate.wait())
    given_up = store.submit(lambda book: book.put_card(Card("9", Pack.SH, State.ACTIVE), 0))
    assert given_up.cancel()
    gate.set()
    store.submit(lambda book: book.put_card(Card("8", Pack.SH, State.ACTIVE), 0)).result(10)
    with store.read() as txn:
        assert store.book(txn).card("9") is None and store.book(txn).card("8") is not None


# ---- records are checked when written as strictly as when read (TIGER_STYLE)

@pytest.mark.parametrize("field, value, says", [
    ("service_bank", "银" * 11, "service_bank is 33 bytes"),  # in a 32-byte field
    ("replaced_by", "4" * 21, "replaced_by is 21 bytes"),
    ("replaces", "3100\u00e9", "replaces .* is not ascii"),
    ("state", 10, "state 10"), ("pack", 0, "pack 0"),
    # integers beyond their field's width: struct refuses them, named as the card's
    ("points", 65536, "card record"), ("flags", 256, "card record"),
    ("generation", -1, "card record"), ("valid_until", 2**63, "card record"),
])
def test_encode_refuses_a_card_it_cannot_write_exactly(field, value, says):
    rec = Card("310000000001", Pack.SH, State.ACTIVE)
    setattr(rec, field, value)
    with pytest.raises(InvalidRecord, match=says):
        r.encode_card(rec)


def test_encode_refuses_a_transfer_whose_ref_id_would_be_cut():
    t = Transfer(TransferKind.POST, TransferStatus.POSTED, 5, b"h" * 9, b"o:x",
                 ref_id="挂" * 22)  # 66 bytes in a 64-byte field
    with pytest.raises(InvalidRecord, match="ref_id is 66 bytes"):
        r.encode_transfer(t)
    t.ref_id = "挂" * 21
    assert r.decode_transfer(r.encode_transfer(t)) == t


def test_change_records_are_versioned_with_time_kind_card_and_holder(store):
    card = Card("310000000009", Pack.SH, State.LOST, flags=Flag.TRANSIT, lock_mask=4,
                holder_id=77)
    store.write(lambda book: book.put_card(card, 1_790_000_123))
    with store.read() as txn:
        (seq, change), = store.book(txn).changes()
        raw = txn.get(seq.to_bytes(8, "big"), db=store.dbs.changes)
    assert raw[0] == r.CHANGE_VERSION
    new = ~Changed.BALANCE  # a new card: everything of a card is new
    assert change == Change(ChangeKind.CARD, 1_790_000_123, "310000000009", 77, State.LOST,
                            Flag.TRANSIT, 4, what=new)
    with pytest.raises(CorruptRecord):
        r.decode_change(bytes([9]) + raw[1:])
    # what a later write changed, and only that
    card.lock_mask = 0
    store.write(lambda book: book.put_card(card, 1_790_000_124))
    with store.read() as txn:
        (_, change), = store.book(txn).changes(seq)
    assert change.what == Changed.LOCKS


def test_the_audit_chain_links_each_event_and_a_rolled_back_command_leaves_no_hole(store):
    store.write(lambda book: [book.append_audit(5, "gate-1", "TRANSIT_GATE", "X.Y", "31")
                              for _ in range(2)])

    def refused(book):
        book.append_audit(6, "gate-1", "TRANSIT_GATE", "X.Z")
        raise ValueError("refused: rolled back with its event")
    with pytest.raises(ValueError):
        store.write(refused)
    store.write(lambda book: book.append_audit(7, "agency", "CARD_AGENCY", "Holders.GetHolder",
                                               purpose="claim 7", holder="3101**********1234"))
    with store.read() as txn:
        book = store.book(txn)
        events = list(r.audit_chain(v for _, v in book.audit_records()))
        assert book.verify_audit() == (True, 3, 0, "")
    assert [e.sequence for e in events] == [1, 2, 3]
    assert events[0].prev_hash == bytes(32)
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    assert events[2].purpose == "claim 7" and events[2].algorithm == "sm3"


def test_the_domain_enums_are_the_wire_enums():
    from yikatong import model
    from yikatong.v1 import yikatong_pb2 as pb

    pairs = [(model.Pack, pb.Pack, "PACK_"), (model.State, pb.CardState, "CARD_STATE_"),
             (model.Channel, pb.Channel, "CHANNEL_"), (model.AccountKind, pb.AccountKind,
                                                       "ACCOUNT_KIND_"),
             (model.ReplaceReason, pb.ReplaceReason, "REPLACE_REASON_"),
             (model.ResidenceBasis, pb.ResidenceBasis, "RESIDENCE_BASIS_"),
             (model.TransferStatus, pb.TransferStatus, "TRANSFER_STATUS_"),
             (model.CreditGround, pb.CreditGround, "CREDIT_GROUND_")]
    for ours, wire, prefix in pairs:
        assert {prefix + m.name: m.value for m in ours} == {
            k: v for k, v in wire.items() if v != 0}, ours
    assert {m.name: m.value for m in model.Reason if m} == {
        k.removeprefix("DECLINE_REASON_"): v for k, v in pb.DeclineReason.items() if v}
    assert [p.value for p in model.Phase] == [pb.PHASE_UNSPECIFIED, pb.PHASE_HOLD,
                                              pb.PHASE_POST, pb.PHASE_VOID]

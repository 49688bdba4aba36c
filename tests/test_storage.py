"""The card record layout and the LMDB store's promises."""
import threading

import pytest

from yikatong.storage import records as r
from yikatong.storage.lmdb_store import Store
from yikatong.errors import CorruptRecord
from yikatong.errors import StoreUnavailable
from yikatong.model import Card, Pack, State


def test_record_round_trip_is_fixed_width_with_a_version_byte():
    rec = Card("31000000000000000001", Pack.GZ, State.LOST, flags=5, generation=2,
                     lock_mask=0b100, points=65535, temp_loss_at=-1, valid_until=2**62,
                     holder_id=2**64 - 1, replaced_by="44000000000000000002",
                     replaces="4400", service_bank="工商银行")
    value = r.encode_card(rec)
    assert len(value) == r.SIZE == 128 and value[0] == r.VERSION
    assert r.decode_card(rec.card_number, value) == rec


@pytest.mark.parametrize("value", [b"", b"\x01" * 127, bytes([2]) + bytes(127)])
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

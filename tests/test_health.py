"""Health that tells the truth (issue 23): NOT_SERVING, with the reason in a metric, when the
store is past its high-water mark or a record read is corrupt; the map grows by itself before
it is full."""
import os
import threading
import urllib.request

import lmdb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_law import active, refused, set_clock

from yikatong.server.harness import ServerProcess, free_address
from yikatong.storage.lmdb_store import Store

MIB = 2**20


def _fill(store: Store, n: int, size: int, start: int) -> None:
    def put(i):
        return lambda book: book.txn.put(f"fill:{i}".encode(), os.urandom(size),
                                         db=book.dbs.notes)
    for i in range(start, start + n):
        store.write(put(i))


def test_the_writer_grows_the_map_before_it_is_full_up_to_its_most(tmp_path, caplog):
    store = Store(str(tmp_path), map_size=1 * MIB, map_size_max=4 * MIB, high_water=0.9)
    try:
        stop = threading.Event()

        def read_all_the_time():  # readers in other threads: the resize waits for them
            while not stop.is_set():
                with store.read() as txn:
                    txn.get(b"fill:1", db=store.dbs.notes)

        reader = threading.Thread(target=read_all_the_time)
        reader.start()
        try:
            n = 0
            while store.map_use()[1] < 4 * MIB:  # grown at 80% of 1 MiB, then of 2
                _fill(store, 10, 1000, n)
                n += 10
                assert n < 5000
        finally:
            stop.set()
            reader.join()
        assert sum("the LMDB map grew" in r.getMessage() for r in caplog.records) == 2
        assert store.healthy and not store.not_serving
        while store.healthy:  # at most 4 MiB: past 90% of it, NOT_SERVING
            assert store.map_use()[0] < 0.9 * 4 * MIB
            _fill(store, 10, 1000, n)
            n += 10
        assert store.not_serving == {"map_full"} and store.map_use()[0] >= 0.9 * 4 * MIB
    finally:
        store.close()
    # another process opening the store at its last size sees every record
    again = Store(str(tmp_path), map_size=1 * MIB, map_size_max=4 * MIB)
    try:
        with again.read() as txn:
            assert txn.get(f"fill:{n - 1}".encode(), db=again.dbs.notes) is not None
    finally:
        again.close()


def _health(srv) -> int:
    return health_pb2_grpc.HealthStub(srv.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5).status


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def _wait(predicate, seconds=10.0):
    import time

    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_health_is_not_serving_past_the_high_water_mark(tmp_path):
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start",
                        "2026-09-21T15:00:00+08:00", "--map-size-mib", "1",
                        "--map-size-max-mib", "1", "--map-high-water", "0.05",
                        "--metrics-listen", metrics)
    try:
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING
        active(srv, 60)  # the writes take it past 5% of 1 MiB
        _wait(lambda: _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING)
        _wait(lambda: 'yikatong_not_serving_reason{reason="map_full"} 1.0' in _metrics(metrics))
        assert "yikatong_health_serving 0.0" in _metrics(metrics)
        set_clock(srv, "2026-09-22T15:00:00+08:00")  # still answers: only health says so
    finally:
        assert srv.stop() == 0


def test_a_corrupt_record_read_turns_health_not_serving(tmp_path):
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start",
                        "2026-09-21T15:00:00+08:00")
    try:
        card = active(srv, 61)
    finally:
        srv.stop()
    env = lmdb.open(os.path.join(srv.data_dir, "lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        cards = env.open_db(b"cards", txn=txn)
        txn.put(card.encode(), b"\x63" + bytes(txn.get(card.encode(), db=cards))[1:], db=cards)
    env.close()
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start",
                        "2026-09-21T16:00:00+08:00", data_dir=srv.data_dir)
    try:
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING
        e = refused(srv, "GetCard", "CARD_AGENCY", card_number=card)
        assert e.code().name == "DATA_LOSS", e
        _wait(lambda: _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert "health: corrupt_record holds: NOT_SERVING" in srv.output()
    finally:
        srv.stop()

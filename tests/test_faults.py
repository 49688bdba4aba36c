"""Resource faults: a full store, too many callers, a data dir that cannot be used."""
import os
import queue
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from test_e2e import START, new_active_card
from test_money_e2e import balances, error_of, top_up

from yikatong.server.harness import ROOT, running
from yikatong.v1 import yikatong_pb2 as pb


def test_map_full_refuses_writes_with_how_to_grow_and_reads_go_on(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--map-size-mib", "1", "--map-size-max-mib", "1") as s:
        card = new_active_card(s, 30)
        top_up(s, card, 10**9)
        md = s.md("TRANSIT_GATE")
        for n in range(200):  # noqa: B007 - n is read after the loop
            batch = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                request_id=uuid.uuid4().hex, card_number=card, channel=pb.CHANNEL_TRANSIT,
                amount_fen=1) for _ in range(100)])
            try:
                s.authorization.AuthorizeBatch(batch, metadata=md)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--map-size-max-mib" in e.details()
                break
        else:
            pytest.fail("a 1 MiB store never filled")
        before = s.digest()
        spent = 10**9 - balances(s, card)["TRANSIT"][0]
        assert spent == 100 * n  # the refused batch moved nothing, not even in part
        e = error_of(s.authorization.AuthorizeBatch, batch, metadata=md)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.digest() == before
        status = s.status.GetStatus(pb.GetStatusRequest(card_number=card), metadata=md)
        assert status.state == pb.CARD_STATE_ACTIVE  # reads keep working


def test_too_many_callers_are_refused_and_calls_in_progress_go_on(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--max-concurrent-rpcs", "2") as s:
        md = s.md("TRANSIT_GATE")
        batch = pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
            request_id="r", card_number="310000000001", channel=pb.CHANNEL_TRANSIT)])
        feeds = [queue.Queue() for _ in range(2)]
        calls = [s.authorization.AuthorizeStream(iter(feed.get, None), metadata=md)
                 for feed in feeds]
        # two calls in progress, holding both slots
        for feed, call in zip(feeds, calls, strict=True):
            feed.put(batch)
            assert len(next(call).responses) == 1
        e = error_of(s.authorization.Authorize, batch.requests[0], metadata=md)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the calls already in progress are unaffected
        for feed, call in zip(feeds, calls, strict=True):
            feed.put(batch)
            assert next(call).responses[0].reason == pb.DECLINE_REASON_CARD_NOT_FOUND
            feed.put(None)
            assert list(call) == []


def test_a_data_dir_that_is_not_a_directory_is_a_clear_startup_error(tmp_path):
    (tmp_path / "file").write_text("x")
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve",
                          "--data-dir", str(tmp_path / "file"),
                          "--listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(f"yikatong: cannot use data dir {tmp_path / 'file'}")


def test_a_read_only_data_dir_is_a_clear_startup_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make the directory immutable instead
        made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
        if not made:
            pytest.skip("running as root on a file system without chattr +i")
    else:
        ro.chmod(0o555)
    try:
        out = subprocess.run([sys.executable, "-m", "yikatong", "serve",
                          "--data-dir", str(ro), "--listen",
                              "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)])
        else:
            ro.chmod(0o755)
    assert out.returncode == 2
    assert out.stderr.startswith(f"yikatong: cannot use data dir {ro}:")
    assert len(out.stderr.strip().splitlines()) == 1


def test_callers_without_a_token_that_never_send_a_message_hold_no_call_slot(tmp_path):
    """The slot attack: more calls than --max-concurrent-rpcs, headers only, no token, no
    message. Identity is checked on the headers, so each is refused at once; a bank switch
    with a token is served within a second."""
    with running(tmp_path, "--max-concurrent-rpcs", "8") as s:
        feeds = [queue.Queue() for _ in range(20)]
        raw = s.channel.stream_unary("/yikatong.v1.Authorization/Authorize",
                                     request_serializer=lambda m: m,
                                     response_deserializer=lambda b: b)
        idle = [raw.future(iter(feed.get, None)) for feed in feeds]  # never a message
        try:
            time.sleep(0.5)
            started = time.monotonic()
            reply = s.status.GetStatus(pb.GetStatusRequest(card_number="1"),
                                       metadata=s.md("BANK_SWITCH"), timeout=5)
            assert time.monotonic() - started < 1.0 and reply.found is False
            # the idle calls were ended, not left holding slots: refused on their headers,
            # or (20 arriving at once) by gRPC's own limit before they were begun
            codes = [call.exception(timeout=5).code() for call in idle]
            assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert grpc.StatusCode.UNAUTHENTICATED in codes
        finally:
            for feed in feeds:
                feed.put(None)

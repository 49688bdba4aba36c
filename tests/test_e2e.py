"""End to end: the real server as a subprocess, a manual clock, real gRPC calls."""
import hashlib
import signal
import subprocess
import sys
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yikatong import cards
from yikatong import clock as clocks
from yikatong.server.harness import ROOT, ServerProcess, running
from yikatong.v1 import yikatong_pb2 as pb

START = "2026-11-24T09:00:00+08:00"


@pytest.fixture
def srv(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        yield s


def rid() -> str:
    return uuid.uuid4().hex


def ssn(n: int, region="310101") -> str:
    first17 = f"{region}19850315{n:03d}"
    return first17 + cards.ssn_check_digit(first17)


def photo(ssn: str) -> str:
    """A holder's photo as the card system holds it: a content hash (SH-10, SH-22b)."""
    return hashlib.sha256(ssn.encode()).hexdigest()


def holder(n: int, **kw) -> pb.Holder:
    fields = dict(ssn=ssn(n), name="王芳", gender="F", birth_date="1985-03-15",
                  nationality="CN", phone="13800000000", address="上海市黄浦区",
                  ethnicity="汉族", postcode="200001",  # SH-9: a complete application
                  occupation="teacher", photo_sha256=photo(ssn(n)))
    fields.update(kw)
    return pb.Holder(**fields)


def authorize(srv, card: str, channel=pb.CHANNEL_TRANSIT, role="TRANSIT_GATE", **kw):
    return srv.authorization.Authorize(
        pb.AuthorizeRequest(request_id=rid(), card_number=card, channel=channel, **kw),
        metadata=srv.md(role))


def reason(srv, card, channel=pb.CHANNEL_TRANSIT, role="TRANSIT_GATE"):
    return pb.DeclineReason.Name(authorize(srv, card, channel, role).reason)


def call(srv, method: str, role: str, **fields):
    request = getattr(pb, method + "Request")(request_id=rid(), **fields)
    return getattr(srv.lifecycle, method)(request, metadata=srv.md(role))


def new_active_card(srv, n: int, pack=pb.PACK_SH, **holder_kw) -> str:
    h = holder(n, **holder_kw)
    h.household_registered = True
    h.insured = True
    outlet = "COMMUNITY_OUTLET" if pack == pb.PACK_SH else "BANK_OUTLET"  # GZ-7
    card = srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pack, holder=h,
                                               with_transit=True, service_bank="ICBC"),
                               metadata=srv.md(outlet))
    assert card.state == pb.CARD_STATE_APPLIED
    call(srv, "Verify", "CARD_AGENCY", card_number=card.card_number, approved=True)
    call(srv, "Issue", "CARD_AGENCY", card_number=card.card_number)
    role = "BANK_OUTLET" if pack != pb.PACK_SH else "COMMUNITY_OUTLET"
    assert call(srv, "Activate", role, card_number=card.card_number).state == pb.CARD_STATE_ACTIVE
    return card.card_number


def advance(srv, seconds: int):
    return srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=seconds), metadata=srv.md("ADMIN"))


def test_sh_card_walk_through_loss_and_replacement(srv):
    card = new_active_card(srv, 1)
    assert reason(srv, card) == "DECLINE_REASON_UNSPECIFIED"
    assert authorize(srv, card).decision == pb.DECISION_APPROVED
    reported = call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=card)
    assert reason(srv, card) == "DECLINE_REASON_CARD_FROZEN"
    until = clocks.end_of_days(reported.loss_reported_at, 5)  # SH-18b, SPEC.md section 6
    advance(srv, until - 1 - advance(srv, 0).now)
    assert reason(srv, card) == "DECLINE_REASON_CARD_FROZEN"
    advance(srv, 1)
    assert reason(srv, card) == "DECLINE_REASON_UNSPECIFIED"
    status = srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                                  metadata=srv.md("TRANSIT_GATE"))
    assert status.state == pb.CARD_STATE_ACTIVE and status.transit_function
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    assert reason(srv, card) == "DECLINE_REASON_CARD_LOST"
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_LOST)
    assert new.state == pb.CARD_STATE_VERIFIED and new.replaces == card
    assert reason(srv, card) == "DECLINE_REASON_CARD_LOST"  # until the new card is issued
    call(srv, "Issue", "CARD_AGENCY", card_number=new.card_number)
    assert reason(srv, card) == "DECLINE_REASON_CARD_SUPERSEDED"
    assert reason(srv, new.card_number) == "DECLINE_REASON_CARD_NOT_ACTIVATED"
    call(srv, "Activate", "ONLINE_PLATFORM", card_number=new.card_number)
    assert reason(srv, new.card_number) == "DECLINE_REASON_UNSPECIFIED"
    status = srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                                  metadata=srv.md("BANK_SWITCH"))
    assert status.state == pb.CARD_STATE_SUPERSEDED and status.replaced_by == new.card_number
    with pytest.raises(grpc.RpcError) as e:
        call(srv, "CancelLoss", "COMMUNITY_OUTLET", card_number=card)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUPERSEDED" in e.value.details() and "SH-19a" in e.value.details()


def test_gz_card_loss_then_deregistration_refused_after_replacement_applied(srv):
    card = new_active_card(srv, 2, pack=pb.PACK_GZ, ssn=ssn(2, "440103"))
    call(srv, "ReportLoss", "BANK_OUTLET", card_number=card)
    assert reason(srv, card, pb.CHANNEL_MEDICAL, "MEDICAL_TERMINAL") == "DECLINE_REASON_CARD_LOST"
    call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    with pytest.raises(grpc.RpcError) as e:
        call(srv, "CancelLoss", "BANK_OUTLET", card_number=card)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GZ-22" in e.value.details() and "LOST" in e.value.details()


def test_gz_22_deregistration_before_replacement_restores_use(srv):
    card = new_active_card(srv, 3, pack=pb.PACK_GZ, ssn=ssn(3, "440103"))
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    assert call(srv, "CancelLoss", "BANK_OUTLET", card_number=card).state == pb.CARD_STATE_ACTIVE
    assert reason(srv, card) == "DECLINE_REASON_UNSPECIFIED"


def test_ineligible_application_is_refused_with_the_rule(srv):
    h = holder(4)  # neither household-registered nor insured in Shanghai
    before = srv.digest()
    with pytest.raises(grpc.RpcError) as e:
        srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_SH, holder=h),
                            metadata=srv.md("ONLINE_PLATFORM"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SH-8" in e.value.details()
    assert srv.digest() == before


@pytest.mark.parametrize("card, channel, request_id, field", [
    ("", pb.CHANNEL_TRANSIT, "r1", "card_number"),
    ("3" * 21, pb.CHANNEL_TRANSIT, "r1", "card_number"),
    ("31000000000A", pb.CHANNEL_TRANSIT, "r1", "card_number"),
    ("310000000001", 99, "r1", "channel"),
    ("310000000001", pb.CHANNEL_UNSPECIFIED, "r1", "channel"),
    ("310000000001", pb.CHANNEL_TRANSIT, "", "request_id"),
])
def test_bad_authorize_input_is_invalid_argument_naming_the_field(srv, card, channel,
                                                                   request_id, field):
    before = srv.digest()
    with pytest.raises(grpc.RpcError) as e:
        srv.authorization.Authorize(
            pb.AuthorizeRequest(request_id=request_id, card_number=card, channel=channel),
            metadata=srv.md("TRANSIT_GATE"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":")
    assert srv.digest() == before


@pytest.mark.parametrize("method, fields, field", [
    ("Activate", {"card_number": ""}, "card_number"),
    ("Activate", {"card_number": "9" * 40}, "card_number"),
    ("Replace", {"card_number": "310000000001"}, "reason"),
    ("Cancel", {"card_number": "310000000001"}, "reason"),
    ("LockApplication", {"card_number": "310000000001", "channel": 42}, "channel"),
])
def test_bad_lifecycle_input_writes_nothing(srv, method, fields, field):
    card = new_active_card(srv, 5)
    before = srv.digest()
    role = {"Activate": "ONLINE_PLATFORM", "Replace": "BANK_OUTLET", "Cancel": "CARD_AGENCY",
            "LockApplication": "BANK_OUTLET"}[method]
    fields = {k: (card if v == "310000000001" else v) for k, v in fields.items()}
    with pytest.raises(grpc.RpcError) as e:
        call(srv, method, role, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":")
    assert srv.digest() == before


def test_bad_holder_input_names_the_field(srv):
    for h, field in ((holder(6, ssn="310101198503150000"), "holder.ssn"),
                     (holder(6, birth_date="1985-02-30"), "holder.birth_date"),
                     (holder(6, name="x" * 500), "holder.name")):
        h.insured = True
        with pytest.raises(grpc.RpcError) as e:
            srv.lifecycle.Apply(pb.ApplyRequest(request_id=rid(), pack=pb.PACK_SH, holder=h),
                                metadata=srv.md("ONLINE_PLATFORM"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":")


def test_unknown_or_missing_token_is_unauthenticated_and_roles_are_checked(srv):
    req = pb.AuthorizeRequest(request_id="r", card_number="1", channel=pb.CHANNEL_TRANSIT)
    for md in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as e:
            srv.authorization.Authorize(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:  # a gate may not authorize MEDICAL
        srv.authorization.Authorize(
            pb.AuthorizeRequest(request_id="r", card_number="1", channel=pb.CHANNEL_MEDICAL),
            metadata=srv.md("TRANSIT_GATE"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=1), metadata=srv.md("TRANSIT_GATE"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_lifecycle_replay_returns_the_first_answer_and_other_fields_are_id_reused(srv):
    card = new_active_card(srv, 7)
    req = pb.ReportTemporaryLossRequest(request_id="hotline-call-1", card_number=card)
    first = srv.lifecycle.ReportTemporaryLoss(req, metadata=srv.md("SERVICE_HOTLINE"))
    advance(srv, 60)
    before = srv.digest()
    again = srv.lifecycle.ReportTemporaryLoss(req, metadata=srv.md("SERVICE_HOTLINE"))
    assert again == first and srv.digest() == before
    with pytest.raises(grpc.RpcError) as e:
        srv.lifecycle.Activate(pb.ActivateRequest(request_id="hotline-call-1", card_number=card),
                               metadata=srv.md("SERVICE_HOTLINE"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "ID_REUSED" in e.value.details()


def test_batches_answer_in_order_and_a_bad_entry_names_its_index(srv):
    card = new_active_card(srv, 8)
    reqs = [pb.AuthorizeRequest(request_id=f"b{i}", card_number=c, channel=pb.CHANNEL_TRANSIT)
            for i, c in enumerate([card, "310099999999", card])]
    out = srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=reqs),
                                           metadata=srv.md("TRANSIT_GATE"))
    assert [r.request_id for r in out.responses] == ["b0", "b1", "b2"]
    assert [r.reason for r in out.responses] == [0, pb.DECLINE_REASON_CARD_NOT_FOUND, 0]
    stream = srv.authorization.AuthorizeStream(
        iter([pb.AuthorizeBatchRequest(requests=reqs)] * 3), metadata=srv.md("TRANSIT_GATE"))
    assert [len(b.responses) for b in stream] == [3, 3, 3]
    reqs[2].card_number = ""
    with pytest.raises(grpc.RpcError) as e:
        srv.authorization.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=reqs),
                                         metadata=srv.md("TRANSIT_GATE"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("requests[2].card_number:")
    with pytest.raises(grpc.RpcError) as e:
        list(srv.authorization.AuthorizeStream(iter([pb.AuthorizeBatchRequest(requests=reqs)]),
                                               metadata=srv.md("TRANSIT_GATE")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("requests[2].card_number:")
    with pytest.raises(grpc.RpcError) as e:
        list(srv.authorization.AuthorizeStream(iter([pb.AuthorizeBatchRequest(requests=reqs)])))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    statuses = srv.status.GetStatusBatch(
        pb.GetStatusBatchRequest(card_numbers=[card, "310099999999"]),
        metadata=srv.md("BANK_SWITCH")).statuses
    assert [s.found for s in statuses] == [True, False]


def test_clock_never_moves_backwards(srv):
    with pytest.raises(grpc.RpcError) as e:
        srv.admin.SetClock(pb.SetClockRequest(time="2026-01-01T00:00:00+08:00"),
                           metadata=srv.md("ADMIN"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    now = srv.admin.SetClock(pb.SetClockRequest(time="2026-12-01T00:00:00+08:00"),
                             metadata=srv.md("ADMIN"))
    assert now.time == "2026-12-01T00:00:00+08:00"


def test_health_serving_then_sigterm_exits_0(tmp_path):
    s = ServerProcess(tmp_path)
    health = health_pb2_grpc.HealthStub(s.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="yikatong.v1.Authorization"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0
    assert "yikatong: stopped" in s.output()
    s.stop()


def test_system_clock_refuses_admin_clock_moves(tmp_path):
    with running(tmp_path) as s:
        with pytest.raises(grpc.RpcError) as e:
            advance(s, 10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unusable_data_dir_is_a_clear_startup_error(tmp_path):
    (tmp_path / "lmdb").mkdir()
    (tmp_path / "lmdb" / "data.mdb").write_bytes(b"this is not an LMDB file" * 200)
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve",
                          "--data-dir", str(tmp_path),
                          "--listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith("yikatong: cannot open the LMDB store")
    assert len(out.stderr.strip().splitlines()) == 1


def test_port_taken_is_a_clear_startup_error(srv, tmp_path):
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve",
                          "--data-dir", str(tmp_path / "other"),
                          "--listen", srv.address], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(f"yikatong: cannot listen on {srv.address}")


def test_second_server_on_the_same_data_dir_is_refused(srv):
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve",
                          "--data-dir", srv.data_dir,
                          "--listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0
    assert "locked by another running server" in out.stderr


def test_demo_shows_every_decline_reason(tmp_path):
    """Run every command the demo banner tells a newcomer to paste; each prints its answer."""
    with running(tmp_path, "--demo", clients=False) as s:
        lines = [line.strip() for line in s.banner]
        pairs = [(lines[i], lines[i + 1].removeprefix("-> ")) for i in range(len(lines) - 1)
                 if lines[i].startswith(".venv/bin/yikatong authorize")]
        assert len(pairs) == 15
        seen = set()
        for command, answer in pairs:
            args = command.split()[1:]
            out = subprocess.run([sys.executable, "-c", "import sys; from server.cli import "
                                  "main; sys.exit(main(sys.argv[1:]))", *args],
                                 cwd=ROOT, capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == answer, (command, out.stderr)
            seen.add(answer)
        assert len(seen) == 13  # APPROVED and reasons 2..13 (1 is any unknown number)

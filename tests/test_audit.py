"""The audit trail (SPEC.md section 7) over a real server: an event for every change, transfer,
PII read and refused call, in the transaction of what it records; exported to an AUDITOR
only; hash-chained, so an edited or deleted event is found by Audit.Verify and by
`yikatong audit verify` on a stopped server's data dir."""
import shutil
import subprocess
import sys
import time

import grpc
import lmdb
import pytest
from test_e2e import START, call, new_active_card
from test_money_e2e import pay, top_up

from yikatong.server.harness import ROOT, ServerProcess, metadata, wait_until
from yikatong.storage import records
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    yield s
    s.stop()


def export(srv, after: int = 0) -> list[pb.AuditEvent]:
    return list(rpc.AuditStub(srv.channel).Export(pb.ExportRequest(from_sequence=after),
                                                  metadata=metadata("AUDITOR"), timeout=10))


def test_every_change_transfer_pii_read_and_refusal_is_one_event(srv):
    card = new_active_card(srv, 1)
    top_up(srv, card, 1000)
    pay(srv, card, 300, rid="fare-1")
    pay(srv, card, 300, rid="fare-1")  # a replay: no new change, no new event
    pay(srv, card, 5000, rid="fare-2")  # declined: nothing moved, no event
    holders = rpc.HoldersStub(srv.channel)
    holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="claim 2026-118"),
                      metadata=metadata("CARD_AGENCY"))
    for _ in range(5):  # a gate that may not read PII, five times in a row
        with pytest.raises(grpc.RpcError) as denied:
            holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="curious"),
                              metadata=metadata("TRANSIT_GATE"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError):
        srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                             metadata=(("authorization", "Bearer nobody"),))
    assert wait_until(lambda: any(e.outcome == "UNAUTHENTICATED" for e in export(srv)), 5)
    events = export(srv)
    granted = [(e.method, e.role, e.card_number, e.purpose) for e in events if e.outcome == "OK"]
    assert granted == [
        ("Lifecycle.Apply", "COMMUNITY_OUTLET", card, ""),
        ("Lifecycle.Verify", "CARD_AGENCY", card, ""),
        ("Lifecycle.Issue", "CARD_AGENCY", card, ""),
        ("Lifecycle.Activate", "COMMUNITY_OUTLET", card, ""),
        ("Ledger.Transfer", "CARD_AGENCY", card, ""),
        ("Authorization.Authorize", "TRANSIT_GATE", card, ""),
        ("Holders.GetHolder", "CARD_AGENCY", card, "claim 2026-118"),
    ]
    read = next(e for e in events if e.method == "Holders.GetHolder" and e.outcome == "OK")
    assert read.holder.startswith("3101") and "*" * 10 in read.holder  # masked, never whole
    refused = [e for e in events if e.outcome == "PERMISSION_DENIED"]
    assert sum(e.count for e in refused) == 5 and len(refused) <= 2  # counted, not one each
    assert {(e.client_id, e.role, e.method) for e in refused} == {
        ("transit_gate", "TRANSIT_GATE", "Holders.GetHolder")}
    unknown = [e for e in events if e.outcome == "UNAUTHENTICATED"]
    assert [(e.client_id, e.method, e.count) for e in unknown] == [
        ("", "CardStatus.GetStatus", 1)]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {e.algorithm for e in events} == {"sm3"}
    verdict = rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(),
                                                metadata=metadata("AUDITOR"))
    assert verdict.ok and verdict.events == len(events) and verdict.first_bad_sequence == 0
    assert [e.sequence for e in export(srv, after=3)] == list(range(4, len(events) + 1))


def test_the_trail_is_for_auditors_only(srv):
    for role in ("ADMIN", "CARD_AGENCY", "TRANSIT_GATE"):
        with pytest.raises(grpc.RpcError) as denied:
            list(rpc.AuditStub(srv.channel).Export(pb.ExportRequest(), metadata=metadata(role)))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as denied:
            rpc.AuditStub(srv.channel).Verify(pb.VerifyAuditRequest(), metadata=metadata(role))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def audit_verify(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", "audit", "verify",
                           "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def tamper(data_dir, fn) -> None:
    env = lmdb.open(str(data_dir / "lmdb"), max_dbs=32)
    with env.begin(write=True) as txn:
        fn(txn, env.open_db(b"audit", txn=txn, create=False))
    env.close()


def test_an_edited_or_deleted_event_is_found_naming_its_sequence(srv, tmp_path):
    for k in range(3):
        new_active_card(srv, 10 + k)
    assert srv.stop() == 0
    ok = audit_verify(srv.data_dir)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("12 events, every link holds")

    edited = tmp_path / "edited"
    shutil.copytree(srv.data_dir, edited)

    def flip_one_byte(txn, db):
        key = (6).to_bytes(8, "big")
        value = bytearray(txn.get(key, db=db))
        at = 34 + 20  # store format 6: version, algorithm, hash; sequence, time, count
        at += 1 + value[at] + 1  # past client_id and the role's code: the method's code
        assert value[at] == 1 + records.AUDIT_METHODS.index("Lifecycle.Verify")
        value[at] += 1  # "Lifecycle.Verify" becomes "Lifecycle.Issue"
        txn.put(key, bytes(value), db=db)
    tamper(edited, flip_one_byte)
    bad = audit_verify(edited)
    assert bad.returncode == 1
    assert bad.stdout.strip() == (f"audit trail of {edited}: broken at sequence 6: "
                                  "event 6's hash does not match its fields and event 5's "
                                  "hash (one of the two was changed)")

    cut = tmp_path / "cut"  # a length that runs past the end
    shutil.copytree(srv.data_dir, cut)

    def lengthen(txn, db):
        key = (8).to_bytes(8, "big")
        value = bytearray(txn.get(key, db=db))
        value[-1] = 0x01  # the holder text (empty) now says 256 bytes
        txn.put(key, bytes(value), db=db)
    tamper(cut, lengthen)
    assert "broken at sequence 8: audit event 8: holder is cut" in audit_verify(cut).stdout

    deleted = tmp_path / "deleted"
    shutil.copytree(srv.data_dir, deleted)
    tamper(deleted, lambda txn, db: txn.delete((7).to_bytes(8, "big"), db=db))
    bad = audit_verify(deleted)
    assert bad.returncode == 1
    assert "broken at sequence 7: event 7 is missing (next is 8)" in bad.stdout

    replaced = tmp_path / "replaced"  # an event rewritten whole, with a hash of its own
    shutil.copytree(srv.data_dir, replaced)

    def rewrite(txn, db):
        from yikatong.storage.lmdb_store import audit_hash

        key = (6).to_bytes(8, "big")  # the second card's Verify
        before = records.audit_hash_of(txn.get((5).to_bytes(8, "big"), db=db))
        algorithm, prev, _, body = records.split_audit(txn.get(key, db=db), before)
        assert b"CARD_AGENCY" in body
        body = body.replace(b"CARD_AGENCY", b"CARD_AGENCX")
        txn.put(key, records.encode_audit(algorithm, prev, audit_hash(prev, body), body), db=db)
    tamper(replaced, rewrite)
    bad = audit_verify(replaced)
    # (store format 6 keeps no prev_hash in an event: the next event's hash covers it)
    assert "broken at sequence 7: event 7's hash does not match its fields and event 6's " \
        "hash" in bad.stdout


def test_audit_verify_says_plainly_when_there_is_nothing_to_verify(tmp_path):
    none = audit_verify(tmp_path / "nothing")
    assert none.returncode == 2
    assert none.stderr.strip() == f"yikatong: no store in {tmp_path}/nothing"


def test_a_change_and_its_event_commit_together_under_load(srv):
    """Every acknowledged debit has its event: both are in one transaction."""
    card = new_active_card(srv, 20)
    top_up(srv, card, 10_000)
    acknowledged = [pay(srv, card, 1, rid=f"d-{k}").request_id for k in range(50)]
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    time.sleep(0.1)
    events = export(srv)
    assert sum(e.method == "Authorization.Authorize" for e in events) == len(acknowledged)
    assert events[-1].method == "Lifecycle.ReportLoss"


def test_a_refused_call_of_every_method_is_an_event_and_a_granted_read_is_none(srv):
    """Every method of every service called by a role API.md does not allow: one
    PERMISSION_DENIED event per method. Every read without PII by a role allowed: none."""
    from test_roles import API_TABLE, _call

    from yikatong.model import Role

    for name, allowed in sorted(API_TABLE.items()):
        denied = next(r.name for r in Role if r.name not in allowed)
        error = _call(srv, name, denied)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, name
    reads = ["CardStatus.GetStatus", "CardStatus.GetStatusBatch", "CardStatus.WatchChanges",
             "Lifecycle.GetCard", "Ledger.GetBalances", "Audit.Export", "Audit.Verify"]
    for name in reads:
        _call(srv, name, sorted(API_TABLE[name])[0])  # empty requests: refused or answered
    assert wait_until(lambda: sum(e.outcome == "PERMISSION_DENIED" for e in export(srv))
                      == len(API_TABLE), 5)
    events = export(srv)
    assert {e.method for e in events} == set(API_TABLE)
    assert all(e.outcome == "PERMISSION_DENIED" and e.count == 1 for e in events)

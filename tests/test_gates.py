"""Issue 28, item 3: a deny list a gate can trust offline, and an operator who knows which gate
is stale. Through gRPC on real servers: signed WatchChanges events and signed deny-list pages
verified by the vendors' examples (examples/gate_verify.py, examples/gate_verify.js) with the
public key alone, a tampered one refused; a key rotated by SIGHUP, both keys published for the
window; gates' acknowledgements, and a gate that stops acknowledging listed stale by
`yikatong gates` and the metric once the configured age has passed (the manual clock)."""
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import grpc
import pytest
from google.protobuf import json_format
from test_e2e import START, call, new_active_card
from test_workers import scrape

from yikatong import clock as clocks
from yikatong.server.harness import ROOT, ServerProcess, free_address, metadata, wait_until
from yikatong.v1 import yikatong_pb2 as pb

GATE = "TRANSIT_GATE"
EXAMPLES = os.path.join(ROOT, "examples")


def yikatong(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def new_key(path) -> str:
    done = yikatong("signing", "new", "--key-file", str(path))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[2]  # "<key id>  ed25519  <public key hex>  current"


def verifiers():
    """The Python example, and the Node one (Node's own crypto): `make test` installs
    Debian's nodejs when it is missing, so a missing node is a failure, not a skip."""
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "node is missing: `make test-tools` installs Debian's nodejs"
    return [[sys.executable, os.path.join(EXAMPLES, "gate_verify.py")],
            [node, os.path.join(EXAMPLES, "gate_verify.js")]]


def verified(tmp_path, kind: str, message, *public_keys: str) -> list[str]:
    """Each example's verdict ("verified" or "REFUSED: ...") on `message` (a dict or a
    protobuf message)."""
    if not isinstance(message, dict):
        message = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                            use_integers_for_enums=True)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(message))
    keys = [a for k in public_keys for a in ("--public-key", k)]
    out = []
    for verifier in verifiers():
        done = subprocess.run([*verifier, kind, *keys, str(path)], capture_output=True,
                              text=True, timeout=60)
        said = done.stdout.strip() or done.stderr.strip()
        assert (done.returncode == 0) == (said == "verified"), said
        out.append(said)
    return out


def events(srv, after: int, n: int, signed: bool = True) -> list[pb.ChangeEvent]:
    stream = srv.status.WatchChanges(pb.WatchChangesRequest(from_sequence=after, signed=signed),
                                     metadata=metadata(GATE), timeout=30)
    got = []
    try:
        for event in stream:
            got.append(event)
            if len(got) == n:
                break
    finally:
        stream.cancel()
    return got


def published(srv) -> list[pb.SigningKey]:
    return list(srv.status.GetSigningKeys(pb.GetSigningKeysRequest(),
                                          metadata=metadata(GATE)).keys)


@pytest.fixture
def signed_srv(tmp_path):
    key_file = tmp_path / "signing.toml"
    new_key(key_file)
    metrics = free_address()
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START,
                        "--signing-key-file", str(key_file), "--metrics-listen", metrics)
    srv.key_file, srv.metrics = key_file, metrics
    try:
        yield srv
    finally:
        srv.stop()


def test_a_signed_event_verifies_and_a_tampered_one_is_refused(signed_srv, tmp_path):
    srv = signed_srv
    card = new_active_card(srv, 1)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    [key] = published(srv)
    assert key.current and key.algorithm == pb.SIGNATURE_ALGORITHM_ED25519
    public = key.public_key.hex()
    got = events(srv, 0, 5)
    lost = got[-1]
    assert lost.card_number == card and lost.state == pb.CARD_STATE_LOST
    assert lost.transit_reason == pb.DECLINE_REASON_CARD_LOST
    assert lost.key_id == key.key_id and len(lost.signature) == 64
    for event in got:
        assert verified(tmp_path, "event", event, public) == ["verified"] * 2
    tampered = pb.ChangeEvent()
    tampered.CopyFrom(lost)
    tampered.state = pb.CARD_STATE_ACTIVE  # the card shown usable again
    tampered.transit_reason = pb.DECLINE_REASON_UNSPECIFIED
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "event", tampered, public))
    tampered.CopyFrom(lost)
    tampered.sequence -= 1  # replayed at another place in the feed
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "event", tampered, public))
    tampered.CopyFrom(lost)
    tampered.key_id = "00" * 8  # claimed under a key not given
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "event", tampered, public))
    other = new_key(tmp_path / "other.toml")
    assert other != key.key_id
    other_public = yikatong("signing", "show", "--key-file", str(tmp_path / "other.toml"))
    assert all(v.startswith("REFUSED") for v in verified(
        tmp_path, "event", lost, other_public.stdout.split()[2]))
    # unsigned watchers pay nothing: no signature asked, none made
    plain = events(srv, 0, 5, signed=False)
    assert [e.signature for e in plain] == [b""] * 5 and not plain[-1].key_id


def test_the_deny_list_pages_verify_chain_and_a_tampered_page_is_refused(signed_srv, tmp_path):
    srv = signed_srv
    active = new_active_card(srv, 1)
    lost = new_active_card(srv, 2)
    frozen = new_active_card(srv, 3)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=lost)
    call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=frozen)
    public = published(srv)[0].public_key.hex()
    pages, after = [], ""
    for _ in range(10):  # 3 cards, a page each: bounded
        page = srv.status.GetDenyList(pb.GetDenyListRequest(after_card_number=after,
                                                            page_size=1),
                                      metadata=metadata(GATE))
        assert page.after_card_number == after
        pages.append(page)
        after = page.through_card_number
        if page.complete:
            break
    assert pages[-1].complete and len(pages) >= 2
    denied = {e.card_number: e for p in pages for e in p.entries}
    assert set(denied) == {lost, frozen} and active not in denied
    assert denied[lost].reason == pb.DECLINE_REASON_CARD_LOST and denied[lost].until == 0
    assert denied[frozen].reason == pb.DECLINE_REASON_CARD_FROZEN and denied[frozen].until > 0
    head = events(srv, 0, 1)[0].sequence
    assert all(p.sequence >= head for p in pages)
    for page in pages:
        assert verified(tmp_path, "page", page, public) == ["verified"] * 2
    with_entry = next(p for p in pages if p.entries)
    as_dict = json_format.MessageToDict(with_entry, preserving_proto_field_name=True,
                                        use_integers_for_enums=True)
    dropped = {**as_dict, "entries": []}  # a card taken off the list
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "page", dropped, public))
    dropped["entries_sha256"] = base64.b64encode(hashlib.sha256(b"").digest()).decode()
    # and its digest made to match: the signature still refuses it
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "page", dropped, public))
    skipped = {**as_dict, "through_card_number": "9" * 12}  # a range claimed covered
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "page", skipped, public))
    complete = {**as_dict, "complete": not as_dict.get("complete", False)}
    assert all(v.startswith("REFUSED") for v in verified(tmp_path, "page", complete, public))


def test_rotation_publishes_both_keys_for_the_window_and_signs_with_the_new(signed_srv,
                                                                           tmp_path):
    srv = signed_srv
    new_active_card(srv, 1)
    [old] = published(srv)
    done = yikatong("signing", "rotate", "--key-file", str(srv.key_file), "--window-hours", "2")
    assert done.returncode == 0, done.stderr
    assert f"the old key {old.key_id} stays published until" in done.stdout
    assert oct(os.stat(srv.key_file).st_mode & 0o777) == "0o600"
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(published(srv)) == 2, 20), srv.output()
    new, previous = published(srv)
    assert new.current and new.key_id != old.key_id and new.until == 0
    assert not previous.current and previous.key_id == old.key_id
    assert previous.public_key == old.public_key and previous.until > 0
    event = events(srv, 0, 1)[0]
    assert event.key_id == new.key_id
    both = (old.public_key.hex(), new.public_key.hex())
    assert verified(tmp_path, "event", event, *both) == ["verified"] * 2
    assert verified(tmp_path, "event", event, old.public_key.hex())[0].startswith("REFUSED")
    # the window is the system clock's at rotation; past its end only the new key is
    # published (the server's clock: set it past `until`)
    srv.admin.SetClock(pb.SetClockRequest(time=clocks.format_time(previous.until)),
                       metadata=metadata("ADMIN"))
    assert [k.key_id for k in published(srv)] == [new.key_id]


def gates(srv, now: int, stale_after: int = 300) -> subprocess.CompletedProcess:
    return yikatong("gates", "--data-dir", srv.data_dir, "--clients",
                    os.path.join(os.path.dirname(srv.data_dir), "clients.toml"),
                    "--stale-after", str(stale_after), "--now", clocks.format_time(now))


def gate_metric(srv) -> float | None:
    return scrape(srv.metrics).get(("yikatong_gate_ack_age_seconds",
                                    frozenset({("gate", "transit_gate")})))


def test_a_gate_that_stops_acknowledging_is_stale_after_the_configured_age(signed_srv):
    srv = signed_srv
    start = clocks.parse_time(START)
    never = gates(srv, start)
    assert never.returncode == 1 and "transit_gate  never acknowledged  STALE" in never.stdout
    assert wait_until(lambda: gate_metric(srv) == float("inf"), 20)
    new_active_card(srv, 1)
    head = events(srv, 0, 4)[-1].sequence
    ack = srv.status.AcknowledgeChanges(pb.AcknowledgeChangesRequest(sequence=head),
                                        metadata=metadata(GATE))
    assert (ack.sequence, ack.head, ack.time) == (head, head, start)
    fresh = gates(srv, start + 300)  # exactly the configured age: not yet stale
    assert fresh.returncode == 0, fresh.stdout
    assert f"transit_gate  sequence {head}  lag 0  age 300 s" in fresh.stdout
    assert "STALE" not in fresh.stdout
    assert wait_until(lambda: gate_metric(srv) == 0, 20)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=events(srv, 0, 1)[0].card_number)
    srv.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=301), metadata=metadata("ADMIN"))
    stale = gates(srv, start + 301)
    assert stale.returncode == 1
    assert f"transit_gate  sequence {head}  lag 1  age 301 s" in stale.stdout
    assert "STALE" in stale.stdout and "1 gates, 1 stale" in stale.stdout
    assert wait_until(lambda: gate_metric(srv) == 301, 20)
    # it acknowledges again: fresh again; a lower sequence is stored as the gate says
    ack = srv.status.AcknowledgeChanges(pb.AcknowledgeChangesRequest(sequence=head - 1),
                                        metadata=metadata(GATE))
    assert ack.sequence == head - 1 and ack.head == head + 1
    again = gates(srv, start + 301)
    assert again.returncode == 0 and "lag 2  age 0 s" in again.stdout
    assert wait_until(lambda: gate_metric(srv) == 0, 20)


def test_bad_input_gets_clear_errors(signed_srv, tmp_path):
    srv = signed_srv
    head = srv.status.AcknowledgeChanges(pb.AcknowledgeChangesRequest(sequence=0),
                                         metadata=metadata(GATE)).head
    with pytest.raises(grpc.RpcError) as e:
        srv.status.AcknowledgeChanges(pb.AcknowledgeChangesRequest(sequence=head + 1),
                                      metadata=metadata(GATE))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"sequence {head + 1} is past the change feed's end: the last change is {head}" \
        in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # only a gate acknowledges
        srv.status.AcknowledgeChanges(pb.AcknowledgeChangesRequest(sequence=0),
                                      metadata=metadata("BANK_SWITCH"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        srv.status.GetDenyList(pb.GetDenyListRequest(page_size=10_001), metadata=metadata(GATE))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        srv.status.GetDenyList(pb.GetDenyListRequest(after_card_number="12a"),
                               metadata=metadata(GATE))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a key file is never overwritten by `new`
    done = yikatong("signing", "new", "--key-file", str(srv.key_file))
    assert done.returncode != 0 and "never overwritten" in done.stderr


def test_without_a_key_nothing_is_signed_and_signing_is_refused(tmp_path):
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    try:
        assert published(srv) == []
        with pytest.raises(grpc.RpcError) as e:
            events(srv, 0, 1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no signing key (--signing-key-file)" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            srv.status.GetDenyList(pb.GetDenyListRequest(), metadata=metadata(GATE))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()


@pytest.mark.parametrize("problem", ["missing", "world-readable", "not a key"])
def test_a_bad_key_file_stops_the_start_in_one_line(tmp_path, problem):
    key_file = tmp_path / "signing.toml"
    if problem != "missing":
        new_key(key_file)
    if problem == "world-readable":
        os.chmod(key_file, 0o644)
    if problem == "not a key":
        key_file.write_text('private_key = "abcd"\n')
    with pytest.raises(RuntimeError) as e:
        ServerProcess(tmp_path, "--signing-key-file", str(key_file), ready_timeout=30)
    said = {"missing": "cannot read --signing-key-file", "world-readable": "is mode 0644: it "
            "must be readable by its owner only", "not a key": "private_key must be 64 hex "
            "digits"}[problem]
    assert said in str(e.value)
    assert "Traceback" not in str(e.value)

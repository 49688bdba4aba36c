"""Personal information at rest (issue 25, "PII at rest"; PIPL art. 51: "take corresponding
technical security measures such as encryption and de-identification"). Holders' personal
information is sealed with SM4-GCM under keys from a key file outside the data dir, looked up
by HMAC-SM3 of the identity number; a store opened without its key serves every authorization
and refuses PII reads naming the key; a key removed erases what it sealed; rotation seals
everything again under the new key in the background; format 3's clear store migrates."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import grpc
import pytest
from test_e2e import START, holder, new_active_card, rid

from yikatong.errors import CorruptRecord
from yikatong.server.harness import PII_TEST_KEYS, ROOT, ServerProcess, wait_until, write_pii_keys
from yikatong.storage import migrate, pii
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
_spec = importlib.util.spec_from_file_location("make_fixtures",
                                               os.path.join(FIXTURES, "make_fixtures.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

TEST_1 = "00112233445566778899aabbccddeeff"  # PII_TEST_KEYS' test-1
INDEX = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # and its index key
TEST_2 = "ffeeddccbbaa99887766554433221100"


def keys(current: str, **sealing: str) -> str:
    lines = [f'current = "{current}"', 'index = "test-index"', "", "[keys]"]
    lines += [f'{k.replace("_", "-")} = "{v}"' for k, v in sealing.items()]
    return "\n".join(lines + ["", "[index_keys]", f'test-index = "{INDEX}"', ""])


ROTATED = keys("test-2", test_1=TEST_1, test_2=TEST_2)  # test-2 current, test-1 kept
ONLY_2 = keys("test-2", test_2=TEST_2)  # test-1 removed: what it sealed is erased


def serve(tmp_path, data_dir, *extra, pii=True, clients=True) -> ServerProcess:
    s = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START, *extra,
                      data_dir=str(data_dir), pii=pii, clients=clients)
    s.holders = rpc.HoldersStub(s.channel)
    return s


def yikatong(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def get_holder(srv, **key):
    return srv.holders.GetHolder(pb.GetHolderRequest(purpose="case 17", **key),
                                 metadata=srv.md("CARD_AGENCY"), timeout=10)


def refused(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def raw(data_dir) -> bytes:
    with open(os.path.join(data_dir, "lmdb", "data.mdb"), "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- the sealing

def test_a_sealed_value_reads_back_only_in_its_own_record():
    ring = pii.KeyRing.parse(PII_TEST_KEYS)
    sealed = ring.seal(b"holders\0A", b"310101198503150018")
    again = ring.seal(b"holders\0A", b"310101198503150018")
    assert sealed != again  # a fresh nonce each write
    assert b"310101198503150018" not in sealed and pii.key_id_of(sealed) == "test-1"
    assert ring.open(b"holders\0A", sealed) == b"310101198503150018"
    with pytest.raises(CorruptRecord, match="fails its tag"):  # moved to another record
        ring.open(b"holders\0B", sealed)
    tampered = bytearray(sealed)
    tampered[-20] ^= 1
    with pytest.raises(CorruptRecord, match="fails its tag"):
        ring.open(b"holders\0A", bytes(tampered))
    # the index: keyed, not the number's plain hash, and the same for the same number
    assert ring.index("310101198503150018") == ring.index("310101198503150018")
    assert len(ring.index("310101198503150018")) == 32
    other = pii.KeyRing.parse(PII_TEST_KEYS.replace(INDEX, TEST_2))
    assert other.index("310101198503150018") != ring.index("310101198503150018")
    erased = pii.KeyRing.parse(ONLY_2)
    with pytest.raises(pii.PiiErased, match="'test-1'"):
        erased.open(b"holders\0A", sealed)


@pytest.mark.parametrize("text, said", [
    ("current = 1", "[keys] must be a table"),
    (keys("test-1", test_1="abc"), "32 hex digits"),
    (keys("nope", test_1=TEST_1), "current must name a key of [keys]"),
    ("extra = 1\n" + PII_TEST_KEYS, "unknown entries extra"),
    ("[" * 5000, "is not TOML"),
])
def test_a_bad_key_file_is_refused_at_start_in_one_line(tmp_path, text, said):
    path = write_pii_keys(str(tmp_path / "keys.toml"), text)
    done = yikatong("serve", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                    "--pii-key-file", path)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert TEST_1 not in done.stderr  # never the key


def test_a_key_file_readable_by_others_or_inside_the_data_dir_is_refused(tmp_path):
    data_dir = tmp_path / "d"
    open_file = write_pii_keys(str(tmp_path / "keys.toml"))
    os.chmod(open_file, 0o644)
    os.makedirs(data_dir)
    inside = write_pii_keys(str(data_dir / "keys.toml"))
    for path, said in ((open_file, "is mode 0644: it must be readable by its owner only"),
                       (inside, "is inside the data dir"),
                       (str(tmp_path / "absent.toml"), "cannot read --pii-key-file")):
        for args in (("serve", "--listen", "127.0.0.1:0"), ("migrate",)):
            done = yikatong(*args, "--data-dir", str(data_dir), "--pii-key-file", path)
            if args[0] == "migrate" and not os.path.exists(data_dir / "lmdb" / "data.mdb"):
                assert done.returncode == 2 and "no store in" in done.stderr
                continue
            assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
            assert done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------- the server

def test_no_identity_number_or_name_reaches_the_disk_in_clear(tmp_path):
    data_dir = tmp_path / "d"
    srv = serve(tmp_path, data_dir)
    try:
        card = new_active_card(srv, 7, name="欧阳明日", address="上海市黄浦区福州路318号")
        srv.holders.CorrectHolder(pb.CorrectHolderRequest(
            request_id=rid(), holder=pb.Holder(ssn=holder(7).ssn, phone="13912345678"),
            reason="new phone"), metadata=srv.md("CARD_AGENCY"), timeout=10)
        got = get_holder(srv, card_number=card, with_history=True)
        assert got.holder.name == "欧阳明日" and got.holder.phone == "13912345678"
        assert got.history[0].old_value == "13800000000"
        assert get_holder(srv, ssn=holder(7).ssn).holder.name == "欧阳明日"
    finally:
        assert srv.stop() == 0
    data = raw(data_dir)
    for clear in (holder(7).ssn, "欧阳明日", "上海市黄浦区福州路318号", "13912345678",
                  "13800000000"):
        assert clear.encode() not in data, clear


def test_without_its_key_the_store_authorizes_and_refuses_pii_naming_the_key(tmp_path):
    data_dir = tmp_path / "d"
    srv = serve(tmp_path, data_dir)
    try:
        card = new_active_card(srv, 8)
    finally:
        assert srv.stop() == 0
    srv = serve(tmp_path, data_dir, pii=False)
    try:
        assert "WARNING: no --pii-key-file" in srv.output()
        answer = srv.authorization.Authorize(pb.AuthorizeRequest(
            request_id=rid(), card_number=card, channel=pb.CHANNEL_TRANSIT),
            metadata=srv.md("TRANSIT_GATE"), timeout=10)
        assert answer.decision == pb.DECISION_APPROVED
        status = srv.status.GetStatus(pb.GetStatusRequest(card_number=card),
                                      metadata=srv.md("BANK_SWITCH"), timeout=10)
        assert status.state == pb.CARD_STATE_ACTIVE
        by_card = refused(get_holder, srv, card_number=card)
        assert by_card.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "key 'test-1'" in by_card.details() and "--pii-key-file" in by_card.details()
        by_ssn = refused(get_holder, srv, ssn=holder(8).ssn)
        assert by_ssn.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "key 'test-index'" in by_ssn.details()
        h = holder(9)
        h.household_registered = h.insured = True
        apply = refused(srv.lifecycle.Apply, pb.ApplyRequest(
            request_id=rid(), pack=pb.PACK_SH, holder=h, service_bank="ICBC"),
            metadata=srv.md("COMMUNITY_OUTLET"), timeout=10)
        assert apply.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "key 'test-index'" in apply.details()
        for error in (by_card, by_ssn, apply):
            assert TEST_1 not in error.details() and INDEX not in error.details()
            assert "PII_KEY_MISSING" in error.details()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.output()


def test_a_removed_key_erases_what_it_sealed_and_the_card_still_works(tmp_path):
    data_dir = tmp_path / "d"
    srv = serve(tmp_path, data_dir)
    try:
        card = new_active_card(srv, 10)
    finally:
        assert srv.stop() == 0
    only_2 = write_pii_keys(str(tmp_path / "only-2.toml"), ONLY_2)
    srv = serve(tmp_path, data_dir, "--pii-key-file", only_2)
    try:
        erased = refused(get_holder, srv, card_number=card)
        assert erased.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "PII_ERASED" in erased.details() and "'test-1'" in erased.details()
        assert "erased" in erased.details()
        answer = srv.authorization.Authorize(pb.AuthorizeRequest(
            request_id=rid(), card_number=card, channel=pb.CHANNEL_TRANSIT),
            metadata=srv.md("TRANSIT_GATE"), timeout=10)
        assert answer.decision == pb.DECISION_APPROVED
        # a new holder is sealed with test-2 and reads back
        other = new_active_card(srv, 11, name="新人")
        assert get_holder(srv, card_number=other).holder.name == "新人"
    finally:
        assert srv.stop() == 0


def test_another_index_key_is_refused_at_start(tmp_path):
    data_dir = tmp_path / "d"
    serve(tmp_path, data_dir).stop()
    wrong = write_pii_keys(str(tmp_path / "wrong.toml"), PII_TEST_KEYS.replace(INDEX, TEST_2))
    done = yikatong("serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
                    "--pii-key-file", wrong)
    assert done.returncode == 2, done.stderr
    assert "index key 'test-index' is not the one the holders of" in done.stderr
    assert done.stderr.count("\n") == 1 and TEST_2 not in done.stderr


# ---------------------------------------------------------------------------- rotation

def test_rotation_seals_everything_again_in_the_background_then_the_old_key_goes(tmp_path):
    data_dir = tmp_path / "d"
    srv = serve(tmp_path, data_dir)
    try:
        cards = [new_active_card(srv, n, name=f"旧钥{n}") for n in (20, 21, 22)]
        srv.holders.CorrectHolder(pb.CorrectHolderRequest(
            request_id=rid(), holder=pb.Holder(ssn=holder(20).ssn, phone="13700000000"),
            reason="rotation"), metadata=srv.md("CARD_AGENCY"), timeout=10)
    finally:
        assert srv.stop() == 0
    rotated = write_pii_keys(str(tmp_path / "rotated.toml"), ROTATED)
    srv = serve(tmp_path, data_dir, "--pii-key-file", rotated)
    try:
        assert wait_until(lambda: "PII rotation done" in srv.output(), timeout=30), \
            srv.output()[-3000:]
        assert re.search(r"PII rotation: values sealed with keys test-1 are sealed again",
                         srv.output())
        assert get_holder(srv, card_number=cards[0]).holder.phone == "13700000000"
    finally:
        assert srv.stop() == 0
    done = yikatong("pii", "status", "--data-dir", str(data_dir), "--pii-key-file", rotated)
    assert done.returncode == 0, done.stderr
    assert "every readable value is sealed with the current key 'test-2'" in done.stdout
    assert "test-1" not in done.stdout.split("by key:")[1].splitlines()[0]
    only_2 = write_pii_keys(str(tmp_path / "only-2.toml"), ONLY_2)
    srv = serve(tmp_path, data_dir, "--pii-key-file", only_2)
    try:
        for n, card in zip((20, 21, 22), cards, strict=True):
            record = get_holder(srv, card_number=card, with_history=True)
            assert record.holder.name == f"旧钥{n}"
        assert get_holder(srv, card_number=cards[0], with_history=True).history
    finally:
        assert srv.stop() == 0


def test_pii_rotate_on_a_stopped_store(tmp_path):
    data_dir = tmp_path / "d"
    srv = serve(tmp_path, data_dir)
    try:
        card = new_active_card(srv, 30)
    finally:
        assert srv.stop() == 0
    rotated = write_pii_keys(str(tmp_path / "rotated.toml"), ROTATED)
    before = yikatong("pii", "status", "--data-dir", str(data_dir), "--pii-key-file", rotated)
    assert "keys still in use besides the current 'test-2': test-1" in before.stdout
    done = yikatong("pii", "rotate", "--data-dir", str(data_dir), "--pii-key-file", rotated)
    assert done.returncode == 0, done.stderr
    assert re.search(r"sealed \d+ values again with key 'test-2'", done.stdout)
    assert "every readable value is sealed with the current key 'test-2'" in done.stdout
    assert yikatong("pii", "rotate", "--data-dir", str(data_dir)).returncode == 2
    only_2 = write_pii_keys(str(tmp_path / "only-2.toml"), ONLY_2)
    srv = serve(tmp_path, data_dir, "--pii-key-file", only_2)
    try:
        assert get_holder(srv, card_number=card).holder.ssn == holder(30).ssn
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------------------- format 3

def format3(tmp_path) -> str:
    path = str(tmp_path / "format3")
    shutil.copytree(os.path.join(FIXTURES, "format3"), path,
                    ignore=shutil.ignore_patterns("answers.json"))
    os.chmod(path, 0o700)
    return path


def test_format_3_migrates_to_sealed_holders_read_as_before(tmp_path):
    data_dir = format3(tmp_path)
    wang = fixtures.ssn(fixtures.SH, "1980-05-17", 1)  # holder 1 of the fixture: 王伟
    proxy = fixtures.ssn(fixtures.RC, "1990-01-01", 77)
    clear = raw(data_dir)
    for text in (wang, "王伟", proxy, "上海市长宁区fixture路4号", "13800000002"):
        assert text.encode() in clear, text  # the fixture holds them in clear, as 0.2.0 did
    without = yikatong("migrate", "--data-dir", data_dir)
    assert without.returncode == 2 and "--pii-key-file" in without.stderr
    assert without.stderr.count("\n") == 1 and "nothing was changed" in without.stderr
    key_file = write_pii_keys(str(tmp_path / "keys.toml"))
    done = yikatong("migrate", "--data-dir", data_dir, "--pii-key-file", key_file)
    assert done.returncode == 0, done.stderr
    assert "holders sealed 14" in done.stdout and "proxy notes sealed 1" in done.stdout
    assert "residences sealed 2" in done.stdout and "holder_history sealed 1" in done.stdout
    assert f"is now store format {migrate.FORMAT}" in done.stdout
    sealed = raw(data_dir)
    for text in (wang, "王伟", proxy, "孙红", "上海市长宁区fixture路4号", "13800000002",
                 "13800000001"):
        assert text.encode() not in sealed, text
    srv = serve(tmp_path, data_dir, "--clients", fixtures_clients(tmp_path), clients=False)
    try:
        record = srv.holders.GetHolder(pb.GetHolderRequest(
            ssn=wang, purpose="after the upgrade", with_history=False),
            metadata=(("authorization", "Bearer fixture-card-agency"),), timeout=10)
        assert record.holder.name == "王伟" and record.holder.ssn == wang
        two = fixtures.ssn(fixtures.GZ, "1975-03-02", 2)
        history = srv.holders.GetHolder(pb.GetHolderRequest(
            ssn=two, purpose="after the upgrade", with_history=True),
            metadata=(("authorization", "Bearer fixture-card-agency"),), timeout=10)
        assert [(c.field, c.old_value, c.new_value) for c in history.history] == [
            ("phone", "13800000001", "13800000002")]
        card = srv.lifecycle.GetCard(pb.GetCardRequest(card_number="900000000012"),
                                     metadata=(("authorization",
                                                "Bearer fixture-card-agency"),), timeout=10)
        assert card.applied_by_proxy == pb.PROXY_RELATION_CLOSE_RELATIVE
    finally:
        assert srv.stop() == 0


def fixtures_clients(tmp_path) -> str:
    spec = importlib.util.spec_from_file_location(
        "record_answers", os.path.join(FIXTURES, "record_answers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_clients(str(tmp_path / "fx.toml"))


# ---------------------------------------------------------------------------- the demo

def test_the_demo_makes_its_own_key_file_beside_the_data_dir(tmp_path):
    data_dir = tmp_path / "demo" / "data"
    srv = ServerProcess(tmp_path, "--demo", data_dir=str(data_dir), pii=False,
                        ready_timeout=120)
    try:
        assert "DEMO KEYS" in srv.output()
    finally:
        assert srv.stop() == 0
    path = str(data_dir) + ".demo-pii-keys.toml"
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as f:
        assert f.readline().startswith("# DEMO KEYS")
    assert pii.KeyRing.load(path, str(data_dir)).current == "k1"

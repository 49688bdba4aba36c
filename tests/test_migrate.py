"""Store formats and upgrades (issue 23, part 2): every earlier format's fixture data dir
(tests/fixtures/format<N>, made by tests/fixtures/make_fixtures.py from the old record
layouts) is refused at open with one line naming the command, migrated by `yikatong migrate`
(or `serve --migrate`), and then answers exactly what the release that wrote it answered
(format<N>/answers.json, recorded by running that release: tests/fixtures/record_answers.py).
Fixtures are copied first, never changed in place."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tomllib

import lmdb
import pytest

from yikatong import __version__, config
from yikatong.errors import StoreFormat
from yikatong.server.harness import ROOT, ServerProcess, store_digest, write_pii_keys
from yikatong.storage import migrate, records
from yikatong.storage.lmdb_store import Store

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FORMATS = sorted(int(n[len("format"):]) for n in os.listdir(FIXTURES) if n.startswith("format"))
OLDER = [f for f in FORMATS if f < migrate.FORMAT]  # every format a migration starts from
_spec = importlib.util.spec_from_file_location("record_answers",
                                               os.path.join(FIXTURES, "record_answers.py"))
ask = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ask)


def fixture(tmp_path, fmt: int) -> str:
    """A copy of format<fmt>'s data dir (owner-only, as a data dir is)."""
    path = str(tmp_path / f"format{fmt}")
    shutil.copytree(os.path.join(FIXTURES, f"format{fmt}"), path,
                    ignore=shutil.ignore_patterns("answers.json"))
    os.chmod(path, 0o700)
    return path


def answers(fmt: int) -> dict:
    with open(os.path.join(FIXTURES, f"format{fmt}", "answers.json")) as f:
        return json.load(f)


PII_KEYS = ""  # the tests' PII key file (format 4 seals PII: a migration to it needs it)


@pytest.fixture(autouse=True, scope="module")
def _pii_keys(tmp_path_factory):
    global PII_KEYS
    PII_KEYS = write_pii_keys(str(tmp_path_factory.mktemp("keys") / "pii-keys.toml"))


def yikatong(*args: str) -> subprocess.CompletedProcess:
    if args[0] == "migrate":
        args += ("--pii-key-file", PII_KEYS)
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def serve(tmp_path, data_dir: str, clock: str, *extra: str) -> ServerProcess:
    return ServerProcess(tmp_path, "--clients", ask.write_clients(str(tmp_path / "fx.toml")),
                         "--clock", "manual", "--clock-start", clock, *extra, clients=False,
                         data_dir=data_dir)


def meta(data_dir: str) -> dict[bytes, bytes]:
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs)
    with env.begin() as txn:
        db = env.open_db(b"meta", txn=txn, create=False)
        out = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    env.close()
    return out


# ---------------------------------------------------------------------------- the version

def test_one_version_everywhere():
    """`yikatong --version` and the package metadata read yikatong/__init__.py's."""
    assert __version__ == "0.5.0"
    assert yikatong("--version").stdout.strip() == f"yikatong {__version__}"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "yikatong.__version__"}


def test_every_older_format_has_its_migration_and_its_fixture():
    assert set(migrate.MIGRATIONS) == set(OLDER) == set(range(1, migrate.FORMAT))


def test_a_new_store_records_its_format_and_writer(tmp_path):
    store = Store(str(tmp_path / "d"), map_size=16 * 2**20)
    assert store.format == migrate.FORMAT
    store.close()
    held = meta(str(tmp_path / "d"))
    assert held[b"format"] == str(migrate.FORMAT).encode()
    assert held[b"written_by"] == f"yikatong {__version__}".encode()


# ---------------------------------------------------------------------------- older formats

@pytest.mark.parametrize("fmt", OLDER)
def test_an_older_format_is_refused_at_open_in_one_line(tmp_path, fmt):
    data_dir = fixture(tmp_path, fmt)
    before = store_digest(data_dir)
    with pytest.raises(StoreFormat) as refused:
        Store(data_dir, map_size=16 * 2**20)
    line = str(refused.value)
    assert f"store format {fmt}" in line and f"yikatong migrate --data-dir {data_dir}" in line
    assert "\n" not in line
    # the server, `due` and `audit verify`: that line on stderr, exit 2, no traceback
    for args in (("serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0"),
                 ("due", "--data-dir", data_dir), ("audit", "verify", "--data-dir", data_dir)):
        done = yikatong(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr == f"yikatong: {line}\n", args
    assert store_digest(data_dir) == before  # nothing written: not even format 2's databases


def upgraded(tmp_path, fmt: int) -> str:
    """A copy of format<fmt>'s data dir as today's release serves it: migrated by `yikatong
    migrate` when older (its copy kept, owner-only), as it is when current."""
    data_dir = fixture(tmp_path, fmt)
    done = yikatong("migrate", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    if fmt == migrate.FORMAT:
        assert "nothing to migrate" in done.stdout
        return data_dir
    assert f"is now store format {migrate.FORMAT}" in done.stdout
    copies = [n for n in os.listdir(data_dir) if n.startswith(f"pre-migrate-{fmt}-")]
    assert len(copies) == 1  # the way back, owner-only: it holds personal information
    copy = os.path.join(data_dir, copies[0])
    assert os.stat(copy).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(copy, "lmdb")).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(copy, "lmdb", "data.mdb")).st_mode & 0o777 == 0o600
    assert store_digest(copy) == store_digest(fixture(tmp_path / "as-shipped", fmt))
    return data_dir


def ask_today(tmp_path, data_dir: str, was: dict) -> tuple[dict, dict]:
    """Today's server on `data_dir` at the fixture's clock: every question, then again."""
    server = serve(tmp_path, data_dir, was["clock_start"])
    try:
        numbers = ask.card_numbers(data_dir)
        now = ask.ask(server.address, numbers, feed=True)
        again = ask.ask(server.address, numbers, feed=False)  # after the replay
    finally:
        assert server.stop() == 0
    return now, again


RC_PROBE = "probe-9"  # the fixtures' Residence Cards are numbered 9...


def lawful_now(what: str, answered: dict) -> dict:
    """An old release's answer as this one gives it where the law, read again, changed it on
    purpose (each change named by its rule and release); every other answer stays the same.
    - RC-6 (0.5.0): a Residence Card pays at no medical terminal, so a status answer's
      `reason` (what a MEDICAL use would get) is FUNCTION_NOT_OPEN for an RC card in force.
      Its MEDICAL (2) and BENEFIT (3) probes are declined so.
    """
    if (what == "status" and answered.get("pack") == "PACK_RC" and "reason" not in answered
            and answered.get("state") == "CARD_STATE_ACTIVE"):
        return {**answered, "reason": "DECLINE_REASON_FUNCTION_NOT_OPEN"}
    if what == "authorize" and answered["request_id"].rsplit("-", 1)[1] in ("2", "3") \
            and answered["request_id"].startswith(RC_PROBE) \
            and answered["decision"] == "DECISION_APPROVED":
        return {**answered, "decision": "DECISION_DECLINED",
                "reason": "DECLINE_REASON_FUNCTION_NOT_OPEN"}
    return answered


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_answers_what_its_release_answered(tmp_path, fmt):
    data_dir = upgraded(tmp_path, fmt)
    was = answers(fmt)
    now, again = ask_today(tmp_path, data_dir, was)
    numbers = sorted(was["status"])
    for what, message in (("status", "CardStatusResponse"), ("card", "Card"),
                          ("balances", "GetBalancesResponse")):
        fields = set(was["fields"][message])  # what that release's answer had
        for number in numbers:
            for answered in (now, again):
                assert {k: v for k, v in answered[what][number].items() if k in fields} \
                    == lawful_now(what, was[what][number]), (what, number)
    assert now["authorize"] == {number: {channel: lawful_now("authorize", answer)
                                         for channel, answer in by_channel.items()}
                                for number, by_channel in was["authorize"].items()}
    # a request id answered before the upgrade is never done again (the balances above are
    # the same after it): format 1 did not keep which client sent it, so it is refused
    assert was["replay"]["status"] == "TRANSFER_STATUS_POSTED"
    assert now["replay"] == again["replay"] == (
        {"error": "ALREADY_EXISTS"} if fmt == 1 else was["replay"])
    assert yikatong("audit", "verify", "--data-dir", data_dir).returncode == 0
    held = meta(data_dir)  # recorded now, by whichever opened it
    assert held[b"format"] == str(migrate.FORMAT).encode()
    assert held[b"written_by"] == f"yikatong {__version__}".encode()
    if fmt >= 2:  # the change feed and the audit trail, as that release served them
        assert now["changes"] == was["changes"]
        assert now["audit"] == was["audit"]
        return
    # format 1 had no change feed: today's serves its stored log, under the same sequences
    stored, feed = was["changes_stored"], now["changes"]
    assert [int(e["sequence"]) for e in feed] == [c["sequence"] for c in stored]
    for event, change in zip(feed, stored, strict=True):
        assert event.get("card_number", "") == change["card_number"]
        if change["transfer_id"]:
            assert event.get("balance_changed") is True
        else:
            assert event["state"] == _state_name(change["state"])
            assert event.get("state_changed") is True
    store = Store(data_dir, map_size=16 * 2**20)
    with store.read() as txn:
        kept = [(seq, c.transfer_id, c.amount) for seq, c in store.book(txn).changes()]
    store.close()
    assert kept == [(c["sequence"], c["transfer_id"], c["amount"]) for c in stored]
    assert now["audit"] == {"ok": True}  # a trail begun empty by the migration


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f >= 2])
def test_every_format_lists_the_deadlines_its_release_listed(tmp_path, fmt):
    data_dir = upgraded(tmp_path, fmt)
    was = answers(fmt)
    now, _ = ask_today(tmp_path, data_dir, was)
    assert now["due"] == was["due"]


def test_format_1_migration_says_what_it_converted(tmp_path):
    data_dir = fixture(tmp_path, 1)
    done = yikatong("migrate", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    for said in ("audit trail before: none (format 1 kept no audit trail)",
                 "changes converted 77", "cards converted 16", "accounts converted 7",
                 "transfers converted 11", "notes renamed 2", "holder_ssn added 14",
                 "requests kept 3", "open holds with no role 1",
                 "cards in progress with no steps 2",
                 "audit trail after: 0 events, every link holds"):
        assert said in done.stdout, said


def _state_name(state: int) -> str:
    from yikatong.v1 import yikatong_pb2 as pb

    return pb.CardState.Name(state)


@pytest.mark.parametrize("fmt", OLDER)
def test_serve_migrate_migrates_then_serves(tmp_path, fmt):
    data_dir = fixture(tmp_path, fmt)
    was = answers(fmt)
    server = serve(tmp_path, data_dir, was["clock_start"], "--migrate")
    try:
        assert f"is now store format {migrate.FORMAT}" in server.output()
        numbers = ask.card_numbers(data_dir)[:4]
        assert ask.ask(server.address, numbers, feed=False)["authorize"] \
            == {n: was["authorize"][n] for n in numbers}
    finally:
        assert server.stop() == 0
    assert meta(data_dir)[b"format"] == str(migrate.FORMAT).encode()


@pytest.mark.parametrize("fmt", OLDER)
def test_migrating_twice_is_a_no_op_and_every_copy_migrates_alike(tmp_path, fmt):
    """Deterministic: two copies migrated give the same records (the nodes of a replicated
    store, each migrated while stopped, stay identical)."""
    first, second = fixture(tmp_path / "a", fmt), fixture(tmp_path / "b", fmt)
    said: list[str] = []
    for data_dir in (first, second):
        assert migrate.migrate(data_dir, map_size=16 * 2**20, say=said.append)
    assert store_digest(first) == store_digest(second)
    before, copies = store_digest(first), len(os.listdir(first))
    said.clear()
    assert migrate.migrate(first, map_size=16 * 2**20, say=said.append) == {}
    assert said == [f"data dir {first} is already store format {migrate.FORMAT} (written by "
                    f"yikatong {__version__}): nothing to migrate"]
    assert store_digest(first) == before and len(os.listdir(first)) == copies
    done = yikatong("migrate", "--data-dir", first)
    assert done.returncode == 0 and "nothing to migrate" in done.stdout


def test_format_1_ends_stay_where_format_1_put_them(tmp_path):
    """Format 1 kept when a temporary loss was reported (lapsing 5 x 24 h later) where format
    2 keeps when it lapses: the same instant, so the card answers as it did (a migration
    carries over what was decided, it does not count again: docs/DECISIONS.md)."""
    data_dir = fixture(tmp_path, 1)
    env = lmdb.open(os.path.join(data_dir, "lmdb"), readonly=True, max_dbs=config.lmdb_max_dbs)
    with env.begin() as txn:
        cards = env.open_db(b"cards", txn=txn, create=False)
        old = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=cards)}
    env.close()
    migrate.migrate(data_dir, map_size=16 * 2**20, say=lambda line: None)
    store = Store(data_dir, map_size=16 * 2**20)
    frozen = 0
    with store.read() as txn:
        book = store.book(txn)
        for number, value in old.items():
            (_, _, state, *_, temp_loss_at, valid_until, _, _, _, _, _, _, _) = \
                struct.unpack("<BBBBBBHqqQqqq20s20s32s", value)
            card = book.card(number)
            assert card.temp_loss_until == (temp_loss_at + 5 * 86400 if state == 6 else 0)
            assert card.valid_until == valid_until and card.received_at == 0
            frozen += state == 6
    store.close()
    assert frozen == 2


def test_a_format_1_store_a_format_2_server_wrote_to_migrates_whole(tmp_path):
    """The outage of issue 23: 5ab1cc2 opened a format-1 store (adding its databases) and
    wrote records of its own beside the old ones. The first change record still says format
    1; the migration converts what is old and keeps what is new."""
    data_dir = fixture(tmp_path, 1)
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=config.lmdb_max_dbs,
                    map_size=16 * 2**20)
    new_card = migrate._CARD_2.pack(2, 1, 1, 0, 2, 0, 0, 0, 0, 99, 1, 0, 0, 0, b"", b"", b"")
    with env.begin(write=True) as txn:
        for name in sorted(migrate._FORMAT_2_NEW_DBS):
            env.open_db(name, txn=txn)
        cards, changes = env.open_db(b"cards", txn=txn), env.open_db(b"changes", txn=txn)
        txn.put(b"310000000099", new_card, db=cards)
        txn.put(struct.pack(">Q", 78), migrate._CHANGE_2.pack(  # as format 2 wrote it
            2, 1, 1, 0, 0, 0, 1, 99, 0, b"310000000099", b""), db=changes)
    env.close()
    with pytest.raises(StoreFormat, match="store format 1"):
        Store(data_dir, map_size=16 * 2**20)
    migrate.migrate(data_dir, map_size=16 * 2**20, say=lambda line: None)
    store = Store(data_dir, map_size=16 * 2**20)
    with store.read() as txn:
        book = store.book(txn)
        assert book.card_bytes("310000000099") == new_card
        assert [seq for seq, _ in book.changes()] == list(range(1, 79))
        assert book.card("310000000001").state == 5
    store.close()


# ---------------------------------------------------------------------------- newer formats

def test_a_newer_format_is_refused_and_never_migrated(tmp_path):
    data_dir = str(tmp_path / "d")
    Store(data_dir, map_size=16 * 2**20).close()
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=config.lmdb_max_dbs)
    with env.begin(write=True) as txn:
        db = env.open_db(b"meta", txn=txn)
        txn.put(b"format", str(migrate.FORMAT + 1).encode(), db=db)
        txn.put(b"written_by", b"yikatong 9.0.0", db=db)
    env.close()
    before = store_digest(data_dir)
    with pytest.raises(StoreFormat) as refused:
        Store(data_dir, map_size=16 * 2**20)
    line = str(refused.value)
    assert f"store format {migrate.FORMAT + 1} (written by yikatong 9.0.0)" in line
    assert "no migration goes back" in line
    for args in (("serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0"),
                 ("serve", "--migrate", "--data-dir", data_dir, "--listen", "127.0.0.1:0"),
                 ("migrate", "--data-dir", data_dir)):
        done = yikatong(*args)
        assert (done.returncode, done.stderr) == (2, f"yikatong: {line}\n"), args
    assert store_digest(data_dir) == before
    assert not [n for n in os.listdir(data_dir) if n.startswith("pre-migrate")]


def test_format_2_steps_whose_year_had_no_calendar_are_counted_by_the_migration(tmp_path):
    """Format 2 kept a step whose end reached a year without its notice as due_at 0 and the
    year: format 3 counts it from its start (here GZ-10's 12 working days from the
    application), provisionally where a year still has no notice; a step counted on official
    years keeps its end, fixed (kind 0)."""
    from yikatong import calendar

    STEP_2 = struct.Struct("<16s8sqH")  # format 2's open step, as it wrote them
    data_dir = fixture(tmp_path, 2)
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=config.lmdb_max_dbs)
    with env.begin(write=True) as txn:
        steps, cards = (env.open_db(n, txn=txn, create=False) for n in (b"steps", b"cards"))
        txn.put(b"110000000003", STEP_2.pack(b"issue", b"GZ-10", 0, 2027), db=steps)
        applied_at = records.decode_card("110000000003", txn.get(b"110000000003", db=cards)
                                         ).applied_at
        kept = [(s.rstrip(b"\0").decode(), r.rstrip(b"\0").decode(), due, year)
                for s, r, due, year in STEP_2.iter_unpack(txn.get(b"440000000015", db=steps))]
    env.close()
    done = yikatong("migrate", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "steps counted now 1" in done.stdout
    store = Store(data_dir)
    try:
        with store.read() as txn:
            book = store.book(txn)
            (counted,) = book.steps_of("110000000003")
            (fixed,) = book.steps_of("440000000015")
    finally:
        store.close()
    end = calendar.end_of_working_days(applied_at, 12)
    assert (counted.due_at, counted.provisional) == end
    assert (counted.kind, counted.start, counted.n) == (calendar.WORKING_DAYS, applied_at, 12)
    assert (fixed.step, fixed.rule, fixed.due_at, fixed.kind) == (*kept[0][:3], 0)

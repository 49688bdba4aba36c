"""Disputes re-decided exactly (issue 28 item 4): every debit and hold Authorize makes records
the rule pack and the card state it was decided on, and `yikatong explain --transfer ID` walks
that decision again through the table, row by row, with the same answer, and says what
today's rules answer when they are another pack. Real servers on the manual clock; the CLI
reads their data dirs beside them (docs/DECISIONS.md, "Disputes re-decided exactly")."""
import ast
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys

import lmdb
from hypothesis import given, settings
from hypothesis import strategies as st
from test_archive import advance, archived_all
from test_e2e import START, new_active_card
from test_law import call
from test_money_e2e import pay, top_up
from test_pots import funded, settle

from yikatong import cards, config, explain, fastpath
from yikatong.fastpath import _authorize_py
from yikatong.model import Channel, Pack, State, Transfer, TransferKind, TransferStatus
from yikatong.server.harness import ROOT, ServerProcess, running, wait_until, write_pii_keys
from yikatong.storage import records
from yikatong.v1 import yikatong_pb2 as pb

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def yikatong(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def explained(data_dir: str, transfer_id: str) -> tuple[int, dict]:
    done = yikatong("explain", "--data-dir", data_dir, "--transfer", transfer_id, "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.returncode, json.loads(done.stdout)


def test_a_debit_approved_re_decides_row_by_row_and_prints_no_card_number(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 1)
        top_up(srv, card, 1000)
        assert pay(srv, card, 300, rid="fare-1").decision == pb.DECISION_APPROVED
        done = yikatong("explain", "--data-dir", srv.data_dir, "--transfer", "fare-1")
        assert done.returncode == 0, done.stderr
        assert "re-decided answer: APPROVED" in done.stdout
        assert "recorded answer: APPROVED" in done.stdout
        assert "300 fen asked of 1000 fen available" in done.stdout
        assert "today's rules are the recorded rule pack (1)" in done.stdout
        assert card not in done.stdout  # no card number (no personal information either)
        code, out = explained(srv.data_dir, "fare-1")
    assert code == 0 and out["recorded"] and out["same"] and out["rule_pack"] == 1
    assert out["channel"] == "TRANSIT" and out["inputs"]["card"]["state"] == "ACTIVE"
    assert [r["number"] for r in out["rows"]] == list(range(1, 18))  # every row asked
    assert out["rows"][-1]["answer"] == "APPROVED"
    assert not out["inputs"]["holders_other_cards_asked"]  # TRANSIT: the purse alone


def test_a_hold_and_its_post_are_the_hold_s_decision(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 2)
        top_up(srv, card, 1000)
        pay(srv, card, 600, rid="tap-in", phase=pb.PHASE_HOLD)
        pay(srv, card, 250, rid="tap-out", phase=pb.PHASE_POST, hold_request_id="tap-in")
        code, hold = explained(srv.data_dir, "tap-in")
        assert code == 0 and hold["kind"] == "PENDING" and hold["same"]
        assert hold["inputs"]["amount_fen"] == 600 and hold["inputs"]["available_fen"] == 1000
        code, post = explained(srv.data_dir, "tap-out")
    assert code == 0 and post["kind"] == "POST" and post["decided_by"] == "tap-in"
    assert "resolves hold 'tap-in'" in post["note"] and post["rows"] == hold["rows"]


def test_gz_13_a_split_tap_s_legs_each_re_decide_the_whole_tap(tmp_path):
    rules = tmp_path / "split.toml"
    rules.write_text('version = "2026-11"\n[split]\nmedical = ["MEDICAL", "TRANSIT"]\n')
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--split-rules", str(rules)) as srv:
        card = funded(srv, 3, 2000, 5000)
        assert settle(srv, card, 3000, "visit-1").decision == pb.DECISION_APPROVED
        results = {tid: explained(srv.data_dir, tid) for tid in ("visit-1#1", "visit-1#2",
                                                                 "visit-1")}
    for tid, (code, out) in results.items():
        assert code == 0 and out["same"], tid
        assert out["inputs"]["split_legs"] == ["visit-1#1", "visit-1#2"]
        # the table asked the medical account for the whole tap: short alone, the split pays
        assert out["inputs"]["amount_fen"] == 3000 and out["inputs"]["available_fen"] == 2000
        assert out["inputs"]["holders_other_cards_asked"]  # MEDICAL: GZ-21's rule asked
        assert out["rows"][-1]["answer"] == "APPROVED"
        assert [r["number"] for r in out["rows"]][-4:] == [18, 19, 19, 20]


def test_sh_18_a_debit_whose_card_was_later_frozen_re_decides_on_its_recorded_state(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as srv:
        card = new_active_card(srv, 4)
        top_up(srv, card, 1000)
        pay(srv, card, 300, rid="before-loss")
        call(srv, "ReportTemporaryLoss", "SERVICE_HOTLINE", card_number=card)
        assert pay(srv, card, 300).reason == pb.DECLINE_REASON_CARD_FROZEN  # today's state
        code, out = explained(srv.data_dir, "before-loss")
    assert code == 0 and out["same"] and out["inputs"]["card"]["state"] == "ACTIVE"


def test_a_format_5_store_s_transfer_says_not_recorded(tmp_path):
    data = str(tmp_path / "format5")
    shutil.copytree(os.path.join(FIXTURES, "format5"), data,
                    ignore=shutil.ignore_patterns("answers.json"))
    os.chmod(data, 0o700)
    keys = write_pii_keys(str(tmp_path / "pii-keys.toml"))
    done = yikatong("migrate", "--data-dir", data, "--pii-key-file", keys)
    assert done.returncode == 0, done.stderr
    code, out = explained(data, "tap-1")
    assert code == 0 and not out["recorded"] and "not recorded" in out["note"]
    code, out = explained(data, "topup-1")  # Ledger.Transfer: no card decision
    assert code == 0 and not out["recorded"] and "Ledger.Transfer" in out["note"]


def _tamper(data_dir: str, transfer_id: str, change) -> None:
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=config.lmdb_max_dbs)
    with env.begin(write=True) as txn:
        db = env.open_db(b"transfers", txn=txn, create=False)
        t = records.decode_transfer(txn.get(transfer_id.encode(), db=db))
        t.decided = change(t.decided)
        txn.put(transfer_id.encode(), records.encode_transfer(t), db=db)
    env.close()


def test_a_tampered_recorded_state_does_not_re_decide(tmp_path):
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START)
    try:
        card = new_active_card(srv, 5)
        top_up(srv, card, 1000)
        for n in range(3):
            pay(srv, card, 300, rid=f"fare-{n}")
    finally:
        srv.stop()
    transit_locked = lambda d: d[:4] + bytes((d[4] | 1 << Channel.TRANSIT,)) + d[5:]  # noqa
    lost = lambda d: d[:1] + bytes((d[1] & 0xf0 | State.LOST,)) + d[2:]  # noqa: E731
    _tamper(srv.data_dir, "fare-0", transit_locked)
    _tamper(srv.data_dir, "fare-1", lost)
    _tamper(srv.data_dir, "fare-2", lambda d: d[:6])  # cut: not a decision record
    for tid, why in (("fare-0", "APPLICATION_LOCKED"), ("fare-1", "CARD_LOST"),
                     ("fare-2", "")):
        done = yikatong("explain", "--data-dir", srv.data_dir, "--transfer", tid)
        assert done.returncode == 1, (tid, done.stdout, done.stderr)
        assert "the recorded decision does not re-decide" in done.stdout and why in done.stdout


def test_an_unknown_transfer_is_named_exit_2(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as srv:
        done = yikatong("explain", "--data-dir", srv.data_dir, "--transfer", "no-such-tap")
    assert done.returncode == 2 and "no transfer 'no-such-tap'" in done.stderr
    done = yikatong("explain", "--data-dir", str(tmp_path / "nothing"), "--transfer", "x")
    assert done.returncode == 2 and "no store" in done.stderr


def test_a_transfer_archived_beyond_the_window_is_explained_from_the_archive(tmp_path):
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START,
                        "--retain-days", "1")
    try:
        card = new_active_card(srv, 6)
        top_up(srv, card, 1000)
        pay(srv, card, 300, rid="old-fare")
        pay(srv, card, 1, rid="newest")  # the newest change stays hot with its transfer
        advance(srv, 2 * 86400)
        assert wait_until(lambda: archived_all(srv), timeout=60)
        code, out = explained(srv.data_dir, "old-fare")
    finally:
        srv.stop()
    assert code == 0 and out["same"] and out["archived"]


def _transfer(decided: bytes, channel=Channel.TRANSIT, amount=300) -> Transfer:
    return Transfer(TransferKind.SINGLE, TransferStatus.POSTED, amount, b"h" + bytes(7)
                    + b"\x01\x02", b"oop:transit", created_at=1_790_000_000, channel=channel,
                    role=1, decided=decided)


def _card(**kw) -> bytes:
    fields = dict(pack=Pack.SH, state=State.ACTIVE, flags=1, generation=2, lock_mask=0,
                  points=0, temp_loss_until=0, valid_until=0)
    fields.update(kw)
    return records.hot_record(records.HotCard(records.VERSION, **fields))


def test_today_s_rules_say_when_they_would_answer_otherwise(monkeypatch):
    """A decision recorded under rule pack 1, read by a release whose pack 2 retires the
    card's generation: re-decided under pack 1 (APPROVED, the same), and today's answer is
    said (GENERATION_RETIRED)."""
    t = _transfer(records.encode_decision(1, _card(), 1000, 0))
    monkeypatch.setattr(_authorize_py, "RULE_PACK", 2)
    monkeypatch.setitem(explain.PACKS, 2, explain.RulePack(_authorize_py.walk, {2: 1}))
    out = explain.explain(lambda tid: t if tid == "fare" else None, "fare")
    assert out.same and out.redecided_answer == "APPROVED" and out.rule_pack == 1
    assert out.today_pack == 2 and out.today_answer == "GENERATION_RETIRED"
    # a pack this release does not keep: said, not guessed
    unknown = _transfer(records.encode_decision(9, _card(), 1000, 0))
    try:
        explain.explain(lambda tid: unknown, "fare")
    except explain.UnknownPack as error:
        assert "rule pack 9" in str(error)
    else:
        raise AssertionError("an unknown rule pack was re-decided")


# ----------------------------------------------------------------- walk() is decide()

_hot_headers = st.builds(
    lambda pack, state, flags, gen, locks, points, tlu, vu: records.HOT.pack(
        records.VERSION, pack, state, flags, gen, locks, points, tlu, vu)
    + bytes(records.SIZE - records.HOT.size),
    st.integers(min(Pack), max(Pack)), st.integers(min(State), max(State)),
    st.integers(0, 255), st.integers(0, 3), st.integers(0, 255), st.integers(0, 2**16 - 1),
    st.sampled_from([0, 999, 1000, 1001, 2**40]), st.sampled_from([0, 999, 1000, 1001]))


@settings(max_examples=400, deadline=None)
@given(record=st.one_of(_hot_headers, st.none(), st.binary(max_size=140)),
       channel=st.integers(1, 6), now=st.sampled_from([0, 999, 1000, 1001, 5000]),
       points=st.integers(0, 300), amount=st.integers(0, 2000),
       available=st.integers(0, 2000), bank_loss=st.sampled_from([0, 999, 1000, 1001]),
       retired=st.sampled_from([{}, {1: 1000}, {2: 1}]))
def test_walk_gives_decide_s_answer_for_every_input(record, channel, now, points, amount,
                                                    available, bank_loss, retired):
    args = (record, channel, now, points, amount, available, bank_loss)
    rows = list(_authorize_py.walk(_authorize_py.Policy(retired), *args))
    assert all(r.answer is None for r in rows[:-1]) and rows[-1].answer is not None
    want = _authorize_py.decide(_authorize_py.Policy(retired), *args)
    assert rows[-1].answer == want == fastpath.decide(fastpath.Policy(retired), *args)


@settings(max_examples=200, deadline=None)
@given(record=_hot_headers, available=st.integers(0, 2**40), asked=st.integers(0, 3))
def test_a_recorded_decision_keeps_what_the_table_reads(record, available, asked):
    d = records.decode_decision(records.encode_decision(1, record, available, asked))
    card = records.hot(record)
    assert (d.rule_pack, d.available, d.asked) == (1, available, asked)
    assert d.card == card._replace(
        points=0, temp_loss_until=card.temp_loss_until if card.state == State.TEMP_LOSS else 0,
        valid_until=card.valid_until if card.pack == Pack.RC else 0)
    # what a money channel reads decides alike on the recorded header and the real one
    for channel in config.channel_money:
        for now in (999, 1000, 1001):
            policy = _authorize_py.Policy(config.generation_retired_at)
            assert (_authorize_py.decide(policy, records.hot_record(d.card), channel, now, 0,
                                         300, available)
                    == _authorize_py.decide(policy, record, channel, now, 0, 300, available))


# ----------------------------------------------------------------- the rule pack's version

# The digest of what rule pack 1 is: the table (decide, walk and their helpers), the Policy's
# facts and with_money's rule of the holder's other cards. When this test fails, the rules
# changed: if any answer changes, bump fastpath RULE_PACK and keep the old table in
# yikatong/explain.py PACKS; then (or if no answer changes) write the new digest here.
RULE_PACK_1 = "d1dbb1919b0357e71830095bf9d8cf87ce9c1608d1d304f70b100f1429684940"


def _rule_pack_digest() -> str:
    parts = [ast.dump(ast.parse(inspect.getsource(f)))
             for f in (_authorize_py.decide, _authorize_py.walk, _authorize_py.retired,
                       _authorize_py.frozen, _authorize_py.bank_loss_stands,
                       _authorize_py.lapsed_unactivated, _authorize_py.loss_stops_financial,
                       cards.account_stopped)]
    parts.append(repr(sorted(config.generation_retired_at.items())))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def test_the_rule_pack_is_bumped_when_its_rules_change():
    assert _authorize_py.RULE_PACK == 1
    assert _rule_pack_digest() == RULE_PACK_1, (
        f"the decision rules changed (digest {_rule_pack_digest()}): bump RULE_PACK if an "
        "answer changes, and write the new digest in RULE_PACK_1")

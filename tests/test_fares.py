"""The writer's compiled fares (issue 27: fastpath Fares): a single-phase TRANSIT debit
decided, debited, audited and remembered in Cython, held to the Python path
(authorize.with_money through Authorization.debits), its reference: for any sequence of money
commands, the same answers (or the same refusal), the same records in every database byte for
byte, and the same replication journal, in the same order; and every debit the compiled path
does not take (a replay, a hold, a journey to tell, holds on the purse, an electronic card, a
wide amount, another channel) is left to the Python path with nothing written."""
import dataclasses
import hashlib
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yikatong import config, fastpath, journeys, ledger
from yikatong.model import (
    ACCOUNT_KEY_BYTES_MAX,
    AccountKind,
    Card,
    Changed,
    ChangeKind,
    Channel,
    Flag,
    Pack,
    Phase,
    Role,
    State,
    TransferKind,
    TransferStatus,
    holder_account_key,
    operator_account_key,
)
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.services.authorization import Authorization
from yikatong.storage import archive, records
from yikatong.storage.lmdb_store import Store

pytestmark = pytest.mark.skipif(fastpath.Fares is None,
                                reason="the compiled fares need the extension and the wire path")
NOW = 1_796_000_000
GATE = Client("gate-1", Role.TRANSIT_GATE)
METHOD = "Authorization.AuthorizeStream"
BIG = 5_000_000_000  # beyond a u32: a fare of more than 4,294,967,295 fen is a wide transfer
CARDS = {  # holder id: (card, fen in the purse)
    1: (Card("310000000001", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=1), 1_000),
    2: (Card("310000000002", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=2), 3 * BIG),
    3: (Card("310000000003", Pack.RC, State.ACTIVE, flags=Flag.TRANSIT, holder_id=3,
             valid_until=NOW + 86_400), 1_000),
    4: (Card("310000000004", Pack.SH, State.TEMP_LOSS, flags=Flag.TRANSIT, holder_id=4,
             temp_loss_until=NOW - 10), 1_000),  # SH-18b: its five days are over
    5: (Card("310000000005", Pack.SH, State.TEMP_LOSS, flags=Flag.TRANSIT, holder_id=5,
             temp_loss_until=NOW + 3_600), 1_000),
    6: (Card("310000000006", Pack.SH, State.LOST, flags=Flag.TRANSIT, holder_id=6), 1_000),
    7: (Card("310000000007", Pack.GZ, State.ACTIVE, flags=0, holder_id=7), 1_000),
    8: (Card("310000000008", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=8), 1_000),
    9: (Card("310000000009", Pack.BJ, State.ACTIVE, flags=Flag.TRANSIT, holder_id=9), 1_000),
    10: (Card("310000000010", Pack.SH, State.CANCELLED, flags=Flag.TRANSIT, holder_id=10), 9),
    11: (Card("310000000011", Pack.BJ, State.ACTIVE, flags=Flag.TRANSIT, holder_id=11), 1_000),
    12: (Card("310000000012", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=12), 100),
    13: (Card("310000000013", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=13),
         100_000),  # the decision's varint of the fen available: 1, 2 (above), 3, 5 bytes
    14: (Card("310000000014", Pack.RC, State.TEMP_LOSS, flags=Flag.TRANSIT, holder_id=14,
              temp_loss_until=NOW - 10, valid_until=NOW + 86_400), 1_000),  # both tails
    15: (Card("310000000015", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=0), 1_000),
    16: (Card("310000000016", Pack.SH, State.ACTIVE, flags=Flag.TRANSIT, holder_id=16), 1_000),
}
OTHER_NUMBERS = ["310000099999", "310101198711090032"]  # no such card; an e-card's length
NUMBERS = [c.card_number for c, _ in CARDS.values()] + OTHER_NUMBERS


class Clock:
    def __init__(self):
        self.at = NOW

    def now(self) -> int:
        return self.at


class Counted(fastpath.Fares or object):  # type: ignore[misc]
    """The compiled fares, counting the debits they took and the refusals they raised."""
    taken = raised = 0

    def fare(self, book, c, now):
        try:
            answer = super().fare(book, c, now)
        except Exception:
            Counted.raised += 1
            raise
        Counted.taken += answer is not None
        return answer


def make(path: str, clock: Clock) -> Store:
    """The cards above; holder 8's purse holds a tap-in's hold (holds on the purse: the
    Python path releases what is due first), holder 9's a journey left to tell, holder 16's
    is corrupt; and an id was archived."""
    store = Store(path, map_size=64 * 1024**2, check_command=ledger.check_invariants)
    store.dbs.now = clock.now
    topup = operator_account_key("op:topup")

    def fill(book):
        for h, (card, fen) in CARDS.items():
            book.put_card(card, 1)
            ledger.create(book, 1, f"fund-{h}", topup,
                          holder_account_key(card.holder_id, AccountKind.TRANSIT), fen)
        # holder 16's purse corrupt (a negative column: ledger._move refuses to move it)
        purse = holder_account_key(16, AccountKind.TRANSIT)
        book.put_account(purse, dataclasses.replace(book.account(purse), credits_pending=-1))
        # (and op:topup's, so that the columns still sum to zero for check_invariants)
        book.put_account(topup, dataclasses.replace(book.account(topup), debits_pending=-1))
        # an id moved to the archive (its segment is not there: CorruptRecord, not a charge)
        book._put(archive.id_digest(b"archived-1"), b"\1\0\0\0", book.dbs.archived_ids)
        ledger.create(book, NOW - 60, "tap-in-8", holder_account_key(8, AccountKind.TRANSIT),
                      operator_account_key("op:transit"), 300, pending=True, timeout=30)
        journeys.begin(book, "tap-in-9", 400, journeys.JourneyTimeout.SETTLE_MAX_FARE)
        book.put_journey_untold(holder_account_key(9, AccountKind.TRANSIT), "tap-in-9")
    store.write(fill)
    return store


class Two:
    """Two stores built alike: one whose fares are compiled, one all by the Python path."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="fares-")
        self.clock = Clock()
        self.dirs = [os.path.join(self.tmp, k) for k in ("c", "py")]
        self.stores = [make(d, self.clock) for d in self.dirs]
        self.auth = [Authorization(Core(s, self.clock)) for s in self.stores]
        self.auth[0].fares = Counted
        self.auth[1].fares = None
        self.journals: list[list] = [[], []]

    def run(self, commands):
        """Both stores' outcome of one money command: ("ok", answers) or ("refused", ...)."""
        got = []
        for k, (store, auth) in enumerate(zip(self.stores, self.auth, strict=True)):
            command = auth.debits(commands, GATE, METHOD, True)

            def journaled(book, command=command, k=k):
                book.journal = journal = []
                out = command(book)
                self.journals[k].append(journal)
                return out
            try:
                got.append(("ok", store.write(journaled)))
            except Exception as error:  # noqa: BLE001 - the same refusal, or the same failure
                got.append(("refused", type(error).__name__,
                            str(error).replace(self.dirs[k], "<data dir>")))
        assert got[0] == got[1]
        assert self.journals[0] == self.journals[1]
        return got[0]

    def same_store(self):
        dumps = []
        for store in self.stores:
            with store.read() as txn:
                dumps.append({name: list(txn.cursor(db=db).iternext())
                              for name, db in sorted(store.dbs.by_name.items())})
        assert dumps[0] == dumps[1]

    def close(self):
        for s in self.stores:
            s.close()
        shutil.rmtree(self.tmp)


@pytest.fixture
def two():
    t = Two()
    yield t
    t.close()


def fare(rid: str, number: str, amount: int, channel: int = Channel.TRANSIT,
         phase: int = Phase.SINGLE, payee: str = "", timeout: int = 0, salt: str = ""):
    """A compact command; its fingerprint is its fields' (the same request: a replay)."""
    fp = hashlib.sha256(f"{rid}|{number}|{amount}|{channel}|{phase}|{payee}{salt}".encode())
    return (0, rid, number, channel, amount, phase, "", payee, timeout, fp.digest())


def test_plain_fares_are_compiled_and_everything_else_is_left_to_the_python_path(two):
    taken = Counted.taken
    two.run([fare("a1", NUMBERS[0], 200), fare("a2", NUMBERS[0], 300, payee="op:metro-2"),
             fare("a3", NUMBERS[1], 4_294_967_295), fare("a4", NUMBERS[2], 150),
             fare("a5", NUMBERS[3], 10), fare("a6", NUMBERS[10], 10),
             fare("d1", NUMBERS[0], 10_000), fare("d2", NUMBERS[4], 1),
             fare("d3", NUMBERS[5], 1), fare("d4", NUMBERS[6], 1), fare("d5", NUMBERS[9], 1)])
    assert Counted.taken - taken == 11  # approvals (each layout) and declines alike
    taken = Counted.taken
    for i, c in enumerate([
            fare("a1", NUMBERS[0], 200),  # a replay: the first answer
            fare("p1", NUMBERS[7], 100),  # holds on the purse (a due one, released first)
            fare("j1", NUMBERS[8], 100),  # a journey to tell... once
            fare("w1", NUMBERS[1], BIG),  # a wide transfer
            fare("h1", NUMBERS[0], 100, phase=Phase.HOLD, timeout=60),  # a hold
            fare("m1", NUMBERS[0], 100, channel=Channel.MEDICAL),  # another channel
            fare("x1", OTHER_NUMBERS[0], 1), fare("e1", OTHER_NUMBERS[1], 1)]):
        two.run([c])
        assert Counted.taken == taken, i
    two.run([fare("j2", NUMBERS[8], 100)])  # ...and then a plain fare again
    assert Counted.taken == taken + 1
    for c in (fare("v1", NUMBERS[11], 7), fare("v2", NUMBERS[12], 7),  # the varints
              fare("tl", NUMBERS[13], 7), fare("h0", NUMBERS[14], 7),
              fare("付款-1", NUMBERS[10], 1), fare("r" * 64, NUMBERS[10], 1)):
        taken = Counted.taken
        assert two.run([c])[0] == "ok"
        assert Counted.taken == taken + 1, c[1]
    taken, raised = Counted.taken, Counted.raised
    for c in (fare("fund-2", NUMBERS[10], 1),  # an id that names a transfer already: EXISTS
              fare("corrupt", NUMBERS[15], 1),  # a corrupt purse: the Python path refuses
              fare("corrupt-credit", NUMBERS[10], 1, payee="op:topup"),  # a corrupt credit
              fare("archived-1", NUMBERS[10], 1)):  # an archived id
        assert two.run([c])[0] == "refused"
    # the first raised by the compiled path, as by the other; the rest left to the other
    assert Counted.taken == taken and Counted.raised == raised + 1
    outcome = two.run([fare("ok", NUMBERS[0], 1), fare("a1", NUMBERS[0], 201)])
    assert outcome[:2] == ("refused", "IdReused")  # the whole command, nothing of it written
    two.same_store()


def test_a_fare_at_the_last_second_a_u32_holds_is_compiled_and_after_it_left_alike(two):
    """A transfer's time is a u32 until 2106-02-07T06:28:15Z; a fare after it is a wide
    transfer, which the compiled fares leave to the Python path."""
    taken = Counted.taken
    two.clock.at = 2**32 - 1
    assert two.run([fare("t1", NUMBERS[0], 5)])[0] == "ok"
    assert Counted.taken == taken + 1
    two.clock.at = 2**32
    assert two.run([fare("t2", NUMBERS[0], 5), fare("t1", NUMBERS[0], 5)])[0] == "ok"
    assert Counted.taken == taken + 1  # both left: a wide time, and a replay
    two.same_store()


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(
    st.sampled_from([f"r{i}" for i in range(25)]), st.sampled_from(NUMBERS),
    st.one_of(st.integers(1, 1_200), st.sampled_from([BIG - 1, 4_294_967_295, 4_294_967_296])),
    st.sampled_from([Channel.TRANSIT] * 6 + [Channel.MEDICAL]),
    st.sampled_from([Phase.SINGLE] * 6 + [Phase.HOLD]), st.sampled_from(["", "op:metro-2"]),
    st.sampled_from(["", "", "", "again"])), min_size=1, max_size=6), min_size=1, max_size=8),
    st.lists(st.integers(0, 120), min_size=8, max_size=8))
def test_any_commands_write_what_the_python_path_writes(messages, steps):
    two = Two()
    try:
        for message, step in zip(messages, steps, strict=False):
            two.clock.at += step  # holds fall due as time goes
            two.run([fare(rid, number, amount, channel, phase, payee,
                          60 if phase == Phase.HOLD else 0, salt)
                     for rid, number, amount, channel, phase, payee, salt in message])
        two.same_store()
    finally:
        two.close()


def test_the_constants_compiled_in_are_their_sources():
    """A limit or a layout's number changed on the Python side alone would make the two paths
    differ where no example reaches (an archived id's digest length: charged again)."""
    sources = {
        "config.request_id_bytes_max": config.request_id_bytes_max,
        "records.CARD_NUMBER_BYTES": records.CARD_NUMBER_BYTES,
        "config.ecard_number_digits": config.ecard_number_digits,
        "config.amount_fen_max": config.amount_fen_max,
        "config.hold_timeout_seconds_max": config.hold_timeout_seconds_max,
        "records.TRANSFER_VERSION": records.TRANSFER_VERSION,
        "records.CHANGE_VERSION": records.CHANGE_VERSION,
        "records.ANSWER_VERSION": records.ANSWER_VERSION,
        "records.AUDIT_VERSION": records.AUDIT_VERSION, "records.VERSION": records.VERSION,
        "records.SIZE": records.SIZE, "records.OFF_HOLDER_ID": records.OFF_HOLDER_ID,
        "model.ACCOUNT_KEY_BYTES_MAX": ACCOUNT_KEY_BYTES_MAX,
        "archive.DIGEST_BYTES": archive.DIGEST_BYTES,
        "AccountKind.TRANSIT": AccountKind.TRANSIT, "Channel.TRANSIT": Channel.TRANSIT,
        "ChangeKind.TRANSFER": ChangeKind.TRANSFER, "Changed.BALANCE": Changed.BALANCE,
        "TransferKind.SINGLE | TransferStatus.POSTED << 4":
            TransferKind.SINGLE | TransferStatus.POSTED << 4,
        "State.TEMP_LOSS": State.TEMP_LOSS, "Pack.RC": Pack.RC,
        "records._HAS_DECISION": records._HAS_DECISION,
        "records._JOURNAL_HEAD.size": records._JOURNAL_HEAD.size,
        "records._DELETED": records._DELETED, "records.JOURNAL_PLAIN": records.JOURNAL_PLAIN,
        "records.JOURNAL_VERSION": records.JOURNAL_VERSION,
    }
    assert fastpath.impl.layout() == sources

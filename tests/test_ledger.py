"""The double-entry ledger (SPEC.md section 5), in-process through the writer thread; the
store checks the zero-sum invariant after every write group (conftest)."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from yikatong import config, ledger
from yikatong.errors import TransferNotFound, TransferRefused
from yikatong.model import (
    AccountKind,
    ChangeKind,
    TransferStatus,
    holder_account_key,
    is_holder_account,
    operator_account_key,
)

T0 = 1_790_000_000
PURSE = holder_account_key(1, AccountKind.TRANSIT)
MEDICAL = holder_account_key(1, AccountKind.MEDICAL)
TOPUP = operator_account_key("op:topup")
METRO = operator_account_key("op:metro")


class Ledger:
    def __init__(self, store):
        self.store = store
        self.now = T0

    def do(self, fn, *args, **kw):
        return self.store.write(lambda book: fn(book, self.now, *args, **kw))

    def available(self, key):
        with self.store.read() as txn:
            return ledger.available(self.store.book(txn), key, self.now)

    def posted(self, key):
        with self.store.read() as txn:
            return self.store.book(txn).account(key).posted


@pytest.fixture
def lg(store):
    lg = Ledger(store)
    lg.do(ledger.create, "topup-1", TOPUP, PURSE, 1000)
    return lg


def test_single_phase_moves_money_both_sides(lg):
    lg.do(ledger.create, "fare-1", PURSE, METRO, 300)
    assert lg.posted(PURSE) == 700 and lg.posted(METRO) == 300 and lg.posted(TOPUP) == -1000


def test_holder_accounts_never_go_negative_operators_may(lg):
    with pytest.raises(TransferRefused, match="EXCEEDS_CREDITS"):
        lg.do(ledger.create, "fare-1", PURSE, METRO, 1001)
    assert lg.posted(PURSE) == 1000
    lg.do(ledger.create, "fare-2", PURSE, METRO, 1000)
    assert lg.available(PURSE) == 0


def test_the_same_account_on_both_sides_is_refused(lg):
    with pytest.raises(TransferRefused, match="ACCOUNTS_MUST_BE_DIFFERENT"):
        lg.do(ledger.create, "x", PURSE, PURSE, 1)


def test_a_hold_reduces_available_and_a_partial_post_releases_the_rest(lg):
    lg.do(ledger.create, "tap-in", PURSE, METRO, 600, pending=True, timeout=3600)
    assert lg.available(PURSE) == 400 and lg.posted(PURSE) == 1000
    with pytest.raises(TransferRefused, match="EXCEEDS_CREDITS"):
        lg.do(ledger.create, "other", PURSE, METRO, 401)
    with pytest.raises(TransferRefused, match="EXCEEDS_PENDING_TRANSFER_AMOUNT"):
        lg.do(ledger.resolve, "tap-out", "tap-in", post=True, amount=601)
    post = lg.do(ledger.resolve, "tap-out", "tap-in", post=True, amount=250)
    assert post.amount == 250
    assert lg.available(PURSE) == 750 and lg.posted(METRO) == 250
    with pytest.raises(TransferRefused, match="PENDING_TRANSFER_ALREADY_POSTED"):
        lg.do(ledger.resolve, "tap-out-2", "tap-in", post=True, amount=1)


def test_post_of_zero_posts_the_whole_hold(lg):
    lg.do(ledger.create, "hold", PURSE, METRO, 600, pending=True, timeout=3600)
    assert lg.do(ledger.resolve, "post", "hold", post=True).amount == 600
    assert lg.posted(PURSE) == 400


def test_void_releases_everything(lg):
    lg.do(ledger.create, "hold", PURSE, METRO, 600, pending=True, timeout=3600)
    lg.do(ledger.resolve, "void", "hold", post=False)
    assert lg.available(PURSE) == 1000 and lg.posted(METRO) == 0
    with pytest.raises(TransferRefused, match="PENDING_TRANSFER_ALREADY_VOIDED"):
        lg.do(ledger.resolve, "post", "hold", post=True)


def test_resolving_an_unknown_or_non_pending_transfer(lg):
    with pytest.raises(TransferNotFound):
        lg.do(ledger.resolve, "post", "nope", post=True)
    with pytest.raises(TransferRefused, match="PENDING_TRANSFER_NOT_PENDING"):
        lg.do(ledger.resolve, "post", "topup-1", post=True)


def test_a_hold_expires_at_the_exact_second_of_its_timeout(lg):
    lg.do(ledger.create, "hold", PURSE, METRO, 600, pending=True, timeout=3600)
    lg.now = T0 + 3599
    assert lg.available(PURSE) == 400
    lg.now = T0 + 3600
    assert lg.available(PURSE) == 1000  # lazily, before any sweep ran
    with pytest.raises(TransferRefused, match="PENDING_TRANSFER_EXPIRED"):
        lg.do(ledger.resolve, "post", "hold", post=True)


def test_a_hold_can_be_posted_one_second_before_it_expires(lg):
    lg.do(ledger.create, "hold", PURSE, METRO, 600, pending=True, timeout=3600)
    lg.now = T0 + 3599
    assert lg.do(ledger.resolve, "post", "hold", post=True, amount=100).amount == 100


def test_the_sweep_releases_expired_holds_for_ever(lg):
    lg.do(ledger.create, "hold-a", PURSE, METRO, 100, pending=True, timeout=10)
    lg.do(ledger.create, "hold-b", PURSE, METRO, 100, pending=True, timeout=20)
    lg.now = T0 + 10
    assert lg.store.write(lambda book: ledger.expire_holds(book, lg.now)) == 1
    with lg.store.read() as txn:
        book = lg.store.book(txn)
        assert ledger.get(book, "hold-a").status == TransferStatus.EXPIRED
        assert ledger.get(book, "hold-b").status == TransferStatus.PENDING
        assert book.account(PURSE).debits_pending == 100


def test_holds_per_account_are_limited(lg):
    for i in range(config.holds_per_account_max):
        lg.do(ledger.create, f"h{i}", PURSE, METRO, 1, pending=True, timeout=60)
    with pytest.raises(TransferRefused, match="HOLDS_PER_ACCOUNT_MAX"):
        lg.do(ledger.create, "one-too-many", PURSE, METRO, 1, pending=True, timeout=60)


def test_reversal_in_parts_never_beyond_what_it_moved(lg):
    lg.do(ledger.create, "fare", PURSE, METRO, 300)
    lg.do(ledger.reverse, "rev-1", "fare", 100)
    assert lg.posted(PURSE) == 800 and lg.posted(METRO) == 200
    with pytest.raises(TransferRefused, match="EXCEEDS_REVERSIBLE_AMOUNT"):
        lg.do(ledger.reverse, "rev-2", "fare", 201)
    assert lg.do(ledger.reverse, "rev-2", "fare").amount == 200  # 0 = all that is left
    with pytest.raises(TransferRefused, match="EXCEEDS_REVERSIBLE_AMOUNT"):
        lg.do(ledger.reverse, "rev-3", "fare", 1)
    with pytest.raises(TransferRefused, match="NOT_REVERSIBLE"):
        lg.do(ledger.reverse, "rev-4", "rev-1", 1)


def test_a_posted_hold_reverses_up_to_what_was_posted(lg):
    lg.do(ledger.create, "hold", PURSE, METRO, 600, pending=True, timeout=60)
    with pytest.raises(TransferRefused, match="NOT_REVERSIBLE"):
        lg.do(ledger.reverse, "rev", "hold", 1)
    lg.do(ledger.resolve, "post", "hold", post=True, amount=250)
    with pytest.raises(TransferRefused, match="EXCEEDS_REVERSIBLE_AMOUNT"):
        lg.do(ledger.reverse, "rev", "post", 251)
    lg.do(ledger.reverse, "rev", "post", 250)
    assert lg.posted(PURSE) == 1000


def test_a_reversal_cannot_overdraw_a_holder_credited_by_the_original(lg):
    lg.do(ledger.create, "spend", PURSE, METRO, 900)
    with pytest.raises(TransferRefused, match="EXCEEDS_CREDITS"):
        lg.do(ledger.reverse, "undo-topup", "topup-1")  # only 100 of the 1000 is left


def test_every_transfer_is_a_change_event(lg):
    lg.do(ledger.create, "fare", PURSE, METRO, 300)
    with lg.store.read() as txn:
        events = [e for _, e in lg.store.book(txn).changes()]
    assert [(e.kind, e.transfer_id, e.amount, e.holder_id, e.time) for e in events] == [
        (ChangeKind.TRANSFER, "topup-1", 1000, 1, T0), (ChangeKind.TRANSFER, "fare", 300, 1, T0)]


# ---- model-based: random transfer sequences against a plain in-memory model

ACCOUNTS = [PURSE, MEDICAL, TOPUP, METRO]


class LedgerModel(RuleBasedStateMachine):
    """The model: posted and held fen per account, holds by id, reversible fen per id."""

    def __init__(self):
        super().__init__()
        import tempfile

        from yikatong.storage.lmdb_store import Store
        self.tmp = tempfile.TemporaryDirectory()
        self.store = Store(self.tmp.name, map_size=16 * 1024**2,
                           check_command=ledger.check_invariants)
        self.now = T0
        self.posted = {k: 0 for k in ACCOUNTS}
        self.held = {k: 0 for k in ACCOUNTS}
        self.holds = {}  # id -> (debit, credit, amount, timeout_at)
        self.movable = {}  # id -> (debit, credit, fen left to reverse)
        self.n = 0

    def teardown(self):
        self.store.close()
        self.tmp.cleanup()

    def _id(self):
        self.n += 1
        return f"t{self.n}"

    def _expire(self):
        for tid, (d, _, amount, timeout_at) in list(self.holds.items()):
            if timeout_at <= self.now:
                self.held[d] -= amount
                del self.holds[tid]

    def _available(self, k):
        return self.posted[k] - self.held[k]

    def _try(self, fn, *args, **kw):
        try:
            return self.store.write(lambda book: fn(book, self.now, *args, **kw)), None
        except (TransferRefused, TransferNotFound) as e:
            return None, e

    @initialize()
    def fund(self):
        self._try(ledger.create, self._id(), TOPUP, PURSE, 500)
        self.posted[TOPUP] -= 500
        self.posted[PURSE] += 500

    @rule(d=st.sampled_from(ACCOUNTS), c=st.sampled_from(ACCOUNTS), amount=st.integers(1, 400),
          pending=st.booleans(), timeout=st.integers(1, 100))
    def create(self, d, c, amount, pending, timeout):
        self._expire()
        tid = self._id()
        _, err = self._try(ledger.create, tid, d, c, amount, pending=pending, timeout=timeout)
        should_refuse = d == c or (is_holder_account(d) and amount > self._available(d))
        assert (err is not None) == should_refuse, err
        if err is None:
            if pending:
                self.held[d] += amount
                self.holds[tid] = (d, c, amount, self.now + timeout)
            else:
                self.posted[d] -= amount
                self.posted[c] += amount
                self.movable[tid] = (d, c, amount)

    @rule(data=st.data(), post=st.booleans(), amount=st.integers(0, 400))
    def resolve(self, data, post, amount):
        self._expire()
        if not self.holds:
            return
        hid = data.draw(st.sampled_from(sorted(self.holds)))
        d, c, held, _ = self.holds[hid]
        tid = self._id()
        _, err = self._try(ledger.resolve, tid, hid, post=post, amount=amount)
        assert (err is not None) == (post and amount > held), err
        if err is None:
            moved = (amount or held) if post else 0
            self.held[d] -= held
            self.posted[d] -= moved
            self.posted[c] += moved
            del self.holds[hid]
            if moved:
                self.movable[tid] = (d, c, moved)

    @rule(data=st.data(), amount=st.integers(0, 400))
    def reverse(self, data, amount):
        self._expire()
        if not self.movable:
            return
        tid = data.draw(st.sampled_from(sorted(self.movable)))
        d, c, left = self.movable[tid]
        want = amount or left
        _, err = self._try(ledger.reverse, self._id(), tid, amount)
        refuse = left == 0 or want > left or (is_holder_account(c) and want > self._available(c))
        assert (err is not None) == refuse, err
        if err is None:
            self.posted[c] -= want
            self.posted[d] += want
            self.movable[tid] = (d, c, left - want)

    @rule(seconds=st.integers(0, 60))
    def tick(self, seconds):
        self.now += seconds

    @invariant()
    def balances_match_the_model(self):
        self._expire()
        with self.store.read() as txn:
            book = self.store.book(txn)
            for k in ACCOUNTS:
                assert book.account(k).posted == self.posted[k]
                if is_holder_account(k):
                    assert ledger.available(book, k, self.now) == self._available(k)
        assert sum(self.posted.values()) == 0


TestLedgerModel = LedgerModel.TestCase
TestLedgerModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def _moves(book, now: int) -> None:
    """Debits, holds resolved, a reversal and a refused one: every kind of balance change."""
    for i in range(1, 6):
        ledger.create(book, now, f"fare-{i}", PURSE, METRO, 10 * i)
    ledger.create(book, now, "hold-1", PURSE, METRO, 200, pending=True, timeout=60)
    ledger.create(book, now, "hold-2", PURSE, METRO, 100, pending=True, timeout=60)
    ledger.resolve(book, now, "post-1", "hold-1", post=True, amount=150)
    ledger.resolve(book, now, "void-2", "hold-2", post=False)
    ledger.reverse(book, now, "back-1", "fare-3", 30)
    ledger.create(book, now, "topup-2", TOPUP, MEDICAL, 500)


@pytest.mark.parametrize("fails", [False, True])
def test_accounts_held_by_a_command_write_what_debit_by_debit_writes(tmp_path, fails):
    """A money command keeps the accounts it touches in its book and writes each once at
    its end (Book.hold_accounts, 100 debits crediting one operator account): the store and
    the replication journal end as written debit by debit, and a command that raises
    midway writes nothing."""
    from yikatong.storage.lmdb_store import Store

    stores, journals = [], []
    for held in (False, True):
        s = Store(str(tmp_path / f"data-{held}"), map_size=64 * 1024**2,
                  check_command=ledger.check_invariants)
        s.write(lambda book: ledger.create(book, T0, "topup-1", TOPUP, PURSE, 1000))

        def command(book, held=held):
            journal = book.journal = []
            if held:
                book.hold_accounts()
            _moves(book, T0)
            if fails:
                assert book.account(PURSE).posted == 1000 - 150 - 150 + 30
                ledger.create(book, T0, "too-much", PURSE, METRO, 10**6)  # refused: raises
            if held:
                book.write_held()
            journals.append(journal)
        if fails:
            with pytest.raises(TransferRefused, match="EXCEEDS_CREDITS"):
                s.write(command)
        else:
            s.write(command)
        stores.append(s)
    try:
        states = []
        for s in stores:
            with s.read() as txn:
                book = s.book(txn)
                states.append((list(book.accounts()), book.ledger_totals(),
                               [k for k, _ in book.changes()]))
        assert states[0] == states[1]
        if fails:
            assert dict(states[1][0])[PURSE].posted == 1000 and len(states[1][2]) == 1
        else:  # the same final value of every key; each account once, at the end, when held
            plain, held_journal = journals
            assert {(d, k): v for d, k, v in plain} == {(d, k): v for d, k, v in held_journal}
            accounts = [k for d, k, _ in held_journal if d == b"accounts"]
            assert len(accounts) == len(set(accounts)) == 4
            assert len([1 for d, _, _ in plain if d == b"accounts"]) > 4
    finally:
        for s in stores:
            s.close()

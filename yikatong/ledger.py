"""The double-entry ledger (SPEC.md section 5), TigerBeetle's model in LMDB.

Every movement goes through `_move`, which changes the debit and the credit account by the
same amount, so the sum over all accounts stays zero by construction; a running total of the
four balance columns is kept in `meta` and asserted equal after every movement, and holder
accounts are asserted never to go below zero. Holds expire at their timeout's exact second:
`available()` counts an expired hold as released the moment it expires (lazily); money never
moves on an account before its due holds are released on disk (`_sweep_account`), and
`expire_holds()` (run by the writer at least every `writer_idle_seconds`) sweeps the rest.
"""
import struct

from storage import records as r
from storage.records import Account, Transfer
from yikatong import config
from yikatong.errors import YikatongError

_U64 = struct.Struct(">Q")
_I64 = struct.Struct("<q")
_TOTALS = struct.Struct("<qqqq")
_TOTALS_KEY = b"ledger:totals"
KEY_WIDTH = r.ACCOUNT_KEY_BYTES_MAX


class TransferRefused(YikatongError):
    """A transfer the ledger's rules refuse; `code` is TigerBeetle-style (EXCEEDS_CREDITS)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class TransferNotFound(YikatongError):
    def __init__(self, transfer_id: str):
        super().__init__(f"transfer {transfer_id!r} not found")


# ------------------------------------------------------------------ accounts

def account(book, key: bytes) -> Account:
    value = book.txn.get(key, db=book.dbs.accounts)
    return Account() if value is None else Account.decode(value)


def _held_index_key(key: bytes, timeout_at: int, transfer_id: str) -> bytes:
    return key.ljust(KEY_WIDTH, b"\0") + _U64.pack(timeout_at) + transfer_id.encode("utf-8")


def _holds(book, key: bytes) -> list[tuple[int, str, int]]:
    """The open holds on an account as (timeout_at, transfer id, fen), soonest first."""
    prefix = key.ljust(KEY_WIDTH, b"\0")
    out = []
    with book.txn.cursor(db=book.dbs.holds_by_account) as cur:
        if cur.set_range(prefix):
            for k, v in cur:
                if k[:KEY_WIDTH] != prefix:
                    break
                out.append((_U64.unpack_from(k, KEY_WIDTH)[0],
                            bytes(k[KEY_WIDTH + 8:]).decode("utf-8"), _I64.unpack(v)[0]))
    return out


def expired_held(book, key: bytes, now: int) -> int:
    """Fen held on `key` by holds already past their timeout but not yet swept."""
    return sum(fen for timeout_at, _, fen in _holds(book, key) if timeout_at <= now)


def available(book, key: bytes, now: int) -> int:
    """Credits less debits less holds still in force at `now`."""
    a = account(book, key)
    return a.credits_posted - a.debits_posted - a.debits_pending + expired_held(book, key, now)


def _sweep_account(book, key: bytes, now: int) -> None:
    """Release this account's holds whose timeout has come, before money moves on it, so
    that what `available()` counted as released lazily is released on disk too."""
    for timeout_at, pending_id, _ in _holds(book, key):
        if timeout_at <= now:
            _release(book, pending_id, get(book, pending_id), r.S_EXPIRED, 0)


def open_holds(book, key: bytes) -> int:
    return len(_holds(book, key))


def _add_totals(book, pending: int, posted: int) -> None:
    """The running totals of the four balance columns, asserted equal after every change."""
    value = book.txn.get(_TOTALS_KEY, db=book.dbs.meta)
    dp, dpost, cp, cpost = _TOTALS.unpack(value) if value is not None else (0, 0, 0, 0)
    dp, dpost, cp, cpost = dp + pending, dpost + posted, cp + pending, cpost + posted
    assert dp == cp and dpost == cpost, "ledger totals out of balance"
    book.txn.put(_TOTALS_KEY, _TOTALS.pack(dp, dpost, cp, cpost), db=book.dbs.meta)


def _move(book, debit: bytes, credit: bytes, pending: int, posted: int) -> None:
    """The one place balances change: `pending` and `posted` fen, debit side and credit side
    alike (either may be negative to release a hold)."""
    d, c = account(book, debit), account(book, credit)
    if c.credits_posted + posted > 2**63 - 1 or c.credits_pending + pending > 2**63 - 1:
        raise TransferRefused("OVERFLOWS_CREDITS", "the credit account's total would overflow")
    d.debits_pending += pending
    d.debits_posted += posted
    c.credits_pending += pending
    c.credits_posted += posted
    for key, a in ((debit, d), (credit, c)):
        assert a.debits_pending >= 0 and a.credits_pending >= 0, key
        if r.is_holder_account(key):  # holder accounts never go below zero
            assert a.credits_posted - a.debits_posted - a.debits_pending >= 0, key
        book.txn.put(key, a.encode(), db=book.dbs.accounts)
    _add_totals(book, pending, posted)


def open_balances(book, source: bytes, entries) -> int:
    """Bulk opening balances for the data generator: credit each (key, fen) from `source`
    in one pass, without a transfer record per entry; the columns still sum to zero."""
    total = 0
    for key, fen in entries:
        a = account(book, key)
        a.credits_posted += fen
        book.txn.put(key, a.encode(), db=book.dbs.accounts)
        total += fen
    s = account(book, source)
    s.debits_posted += total
    book.txn.put(source, s.encode(), db=book.dbs.accounts)
    _add_totals(book, 0, total)
    return total


def check_invariants(book) -> None:
    """Full scan (tests and debug runs): columns sum to zero; no holder account negative."""
    sums = [0, 0, 0, 0]
    for key, value in book.txn.cursor(db=book.dbs.accounts):
        a = Account.decode(value)
        for i, v in enumerate((a.debits_pending, a.debits_posted, a.credits_pending,
                               a.credits_posted)):
            sums[i] += v
        if r.is_holder_account(key):
            assert a.credits_posted - a.debits_posted - a.debits_pending >= 0, key
    assert sums[0] == sums[2] and sums[1] == sums[3], f"ledger out of balance: {sums}"


# ------------------------------------------------------------------ transfers

def get(book, transfer_id: str) -> Transfer | None:
    value = book.txn.get(transfer_id.encode("utf-8"), db=book.dbs.transfers)
    return None if value is None else Transfer.decode(value)


def _put(book, transfer_id: str, t: Transfer, *, new: bool = False) -> None:
    """Store a transfer; a `new` one must not exist yet (the command then rolls back whole)."""
    if not book.txn.put(transfer_id.encode("utf-8"), t.encode(), db=book.dbs.transfers,
                        overwrite=not new):
        raise TransferRefused("EXISTS", f"transfer {transfer_id!r} already exists")
    book.append_change("", 0, transfer_id, t.amount)


def settle(book, key: bytes, now: int) -> int:
    """Writer side of `available()`: release the account's due holds on disk, then return
    credits less debits less holds."""
    _sweep_account(book, key, now)
    a = account(book, key)
    return a.credits_posted - a.debits_posted - a.debits_pending


def _check_funds(book, debit: bytes, amount: int, now: int, settled: int | None = None) -> None:
    """Refuse a holder debit beyond what is available; `settled` is what `settle()` just
    returned for this account at `now` (else it is settled here)."""
    left = settled if settled is not None else settle(book, debit, now)
    if r.is_holder_account(debit):
        if amount > left:
            raise TransferRefused("EXCEEDS_CREDITS",
                                  f"{amount} fen is more than the {left} fen available")


def create(book, now: int, transfer_id: str, debit: bytes, credit: bytes, amount: int, *,
           pending: bool = False, timeout: int = 0, channel: int = 0,
           fingerprint: bytes = b"\0" * 32, settled: int | None = None) -> Transfer:
    """A single-phase transfer, or a pending one (a hold) when `pending`."""
    if debit == credit:
        raise TransferRefused("ACCOUNTS_MUST_BE_DIFFERENT", "debit and credit are the same account")
    assert 0 < amount <= config.amount_fen_max
    _check_funds(book, debit, amount, now, settled)
    if pending:
        if open_holds(book, debit) >= config.holds_per_account_max:
            raise TransferRefused("HOLDS_PER_ACCOUNT_MAX", f"the account already has "
                                  f"{config.holds_per_account_max} open holds")
        t = Transfer(r.T_PENDING, r.S_PENDING, amount, debit, credit, "", fingerprint, now,
                     now + timeout, 0, channel)
        _move(book, debit, credit, amount, 0)
        book.txn.put(_U64.pack(t.timeout_at) + transfer_id.encode("utf-8"), b"",
                     db=book.dbs.holds_by_timeout)
        book.txn.put(_held_index_key(debit, t.timeout_at, transfer_id), _I64.pack(amount),
                     db=book.dbs.holds_by_account)
    else:
        t = Transfer(r.T_SINGLE, r.S_POSTED, amount, debit, credit, "", fingerprint, now,
                     channel=channel)
        _move(book, debit, credit, 0, amount)
    _put(book, transfer_id, t, new=True)
    return t


def _release(book, pending_id: str, hold: Transfer, status: int, posted: int) -> None:
    """Resolve a hold: release all it held, post `posted` of it, drop it from the indexes."""
    _move(book, hold.debit, hold.credit, -hold.amount, posted)
    hold.status, hold.resolved = status, posted
    _put(book, pending_id, hold)
    book.txn.delete(_U64.pack(hold.timeout_at) + pending_id.encode("utf-8"),
                    db=book.dbs.holds_by_timeout)
    book.txn.delete(_held_index_key(hold.debit, hold.timeout_at, pending_id),
                    db=book.dbs.holds_by_account)


_STATUS_CODE = {r.S_POSTED: "PENDING_TRANSFER_ALREADY_POSTED",
                r.S_VOIDED: "PENDING_TRANSFER_ALREADY_VOIDED",
                r.S_EXPIRED: "PENDING_TRANSFER_EXPIRED"}


def resolve(book, now: int, transfer_id: str, pending_id: str, *, post: bool, amount: int = 0,
            fingerprint: bytes = b"\0" * 32) -> Transfer:
    """Post (any amount up to the hold; 0 = all of it; the rest is released) or void a hold."""
    hold = get(book, pending_id)
    if hold is None:
        raise TransferNotFound(pending_id)
    if hold.kind != r.T_PENDING:
        raise TransferRefused("PENDING_TRANSFER_NOT_PENDING", f"{pending_id!r} is not a hold")
    if hold.status == r.S_PENDING and hold.timeout_at <= now:  # due, perhaps not yet swept
        hold.status = r.S_EXPIRED
    if hold.status != r.S_PENDING:
        raise TransferRefused(_STATUS_CODE[hold.status], f"hold {pending_id!r} is resolved")
    if not post:
        amount = 0
    elif amount == 0:
        amount = hold.amount
    elif amount > hold.amount:
        raise TransferRefused("EXCEEDS_PENDING_TRANSFER_AMOUNT",
                              f"{amount} fen is more than the {hold.amount} fen held")
    _release(book, pending_id, hold, r.S_POSTED if post else r.S_VOIDED, amount)
    t = Transfer(r.T_POST if post else r.T_VOID, r.S_POSTED, amount, hold.debit, hold.credit,
                 pending_id, fingerprint, now, channel=hold.channel)
    _put(book, transfer_id, t, new=True)
    return t


def reverse(book, now: int, reversal_id: str, original_id: str, amount: int = 0,
            fingerprint: bytes = b"\0" * 32) -> Transfer:
    """Move back up to what a posted transfer moved, summed over all its reversals."""
    original = get(book, original_id)
    if original is None:
        raise TransferNotFound(original_id)
    if original.kind not in (r.T_SINGLE, r.T_POST) or original.amount == 0:
        raise TransferRefused("NOT_REVERSIBLE", f"{original_id!r} moved no posted money "
                              "(holds are voided, reversals are not reversed)")
    left = original.amount - original.resolved
    if amount == 0:
        amount = left
    if amount == 0 or amount > left:
        raise TransferRefused("EXCEEDS_REVERSIBLE_AMOUNT",
                              f"{amount} fen asked; {left} fen of {original_id!r} is left to reverse")
    _check_funds(book, original.credit, amount, now)
    _move(book, original.credit, original.debit, 0, amount)
    original.resolved += amount
    _put(book, original_id, original)
    t = Transfer(r.T_REVERSAL, r.S_POSTED, amount, original.credit, original.debit, original_id,
                 fingerprint, now, channel=original.channel)
    _put(book, reversal_id, t, new=True)
    return t


def expire_holds(book, now: int, limit: int = 10_000) -> int:
    """Release every hold whose timeout has come (timeout_at <= now). Returns how many."""
    expired = []
    with book.txn.cursor(db=book.dbs.holds_by_timeout) as cur:
        if cur.first():
            for k in cur.iternext(values=False):
                if _U64.unpack_from(k)[0] > now or len(expired) >= limit:
                    break
                expired.append(bytes(k[8:]).decode("utf-8"))
    for pending_id in expired:
        _release(book, pending_id, get(book, pending_id), r.S_EXPIRED, 0)
    return len(expired)

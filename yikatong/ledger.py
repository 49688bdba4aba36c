"""The double-entry ledger (SPEC.md section 5), TigerBeetle's model, spoken through the
store's typed API (`Book`).

Every movement goes through `_move`, which changes the debit and the credit account by the
same amount, so the sum over all accounts stays zero by construction; a running total of the
four balance columns is kept and asserted equal after every movement, and holder accounts are
asserted never to go below zero. Holds expire at their timeout's exact second: `available()`
counts an expired hold as released the moment it expires (lazily); money never moves on an
account before its due holds are released on disk (`_sweep_account`), and `expire_holds()`
(run by the writer at least every `writer_idle_seconds`) sweeps the rest. A transit journey's
hold (yikatong/journeys.py) is resolved the same way, by its operator's policy: counted as
settled at its max fare from its timeout's second (`due`), settled on disk by either.

A hold is resolved (posted or voided) only by whoever placed it: the same Authorize channel
and the same role (`Transfer.channel`, `Transfer.role`), so a gate cannot void a bank's hold
on the same purse.
"""
import typing

from yikatong import config, journeys
from yikatong.errors import TransferNotFound, TransferRefused
from yikatong.model import (
    AccountKind,
    ChangeKind,
    Transfer,
    TransferKind,
    TransferStatus,
    holder_of_account,
    is_holder_account,
)
from yikatong.storage import records

_ZERO_FP = b"\0" * 32
# Plain names for the members the money path uses on every movement.
_SINGLE, _POSTED = TransferKind.SINGLE, TransferStatus.POSTED
_TRANSFER = ChangeKind.TRANSFER


# ------------------------------------------------------------------ accounts

def expired_held(book, key: bytes, now: int) -> int:
    """Fen held on `key` by holds already past their timeout but not yet swept."""
    return sum(fen for timeout_at, _, fen in book.holds(key) if timeout_at <= now)


def due(book, key: bytes, now: int) -> tuple[int, int]:
    """(fen held on `key` by holds past their timeout not yet swept, fen of it their
    journeys' settlement at the max fare posts): what a read counts as released and posted."""
    held = fares = 0
    for timeout_at, pending_id, fen in book.holds(key):
        if timeout_at <= now:
            held += fen
            fares += journeys.due_fare(book, pending_id)
    return held, fares


def available(book, key: bytes, now: int) -> int:
    """Credits less debits less holds still in force at `now`."""
    a = book.account(key)
    left = a.credits_posted - a.debits_posted - a.debits_pending
    # an account holds something only while debits are pending: else no index to walk
    if a.debits_pending:
        held, fares = due(book, key, now)
        return left + held - fares
    return left


def _expire(book, now: int, pending_id: str, hold: Transfer) -> None:
    """A due hold released, or resolved by its journey's policy (journeys.at_timeout)."""
    if not journeys.at_timeout(book, now, pending_id, hold):
        _release(book, now, pending_id, hold, TransferStatus.EXPIRED, 0)


def _sweep_account(book, key: bytes, now: int) -> None:
    """Release this account's holds whose timeout has come, before money moves on it, so
    that what `available()` counted as released lazily is released on disk too."""
    for timeout_at, pending_id, _ in book.holds(key):
        if timeout_at <= now:
            _expire(book, now, pending_id, book.transfer(pending_id))


def _add_totals(book, pending: int, posted: int) -> None:
    """The running totals of the four balance columns, asserted equal after every change."""
    dp, dpost, cp, cpost = book.add_to_ledger_totals(pending, posted)
    assert dp == cp and dpost == cpost, "ledger totals out of balance"


def _move(book, debit: bytes, credit: bytes, pending: int, posted: int) -> None:
    """The one place balances change: `pending` and `posted` fen, debit side and credit side
    alike (either may be negative to release a hold)."""
    d, c = book.account(debit), book.account(credit)
    if c.credits_posted + posted > 2**63 - 1 or c.credits_pending + pending > 2**63 - 1:
        raise TransferRefused("OVERFLOWS_CREDITS", "the credit account's total would overflow")
    d.debits_pending += pending
    d.debits_posted += posted
    c.credits_pending += pending
    c.credits_posted += posted
    for key, a in ((debit, d), (credit, c)):
        assert a.debits_pending >= 0 and a.credits_pending >= 0, key
        if key[:1] == b"h":  # is_holder_account: holder accounts never go below zero
            assert a.credits_posted - a.debits_posted - a.debits_pending >= 0, key
        book.put_account(key, a)
    _add_totals(book, pending, posted)


def open_balances(book, source: bytes, entries) -> int:
    """Bulk opening balances for the data generator: credit each (key, fen) from `source`
    in one pass, without a transfer record per entry; the columns still sum to zero."""
    total = 0
    for key, fen in entries:
        a = book.account(key)
        a.credits_posted += fen
        book.put_account(key, a)
        total += fen
    s = book.account(source)
    s.debits_posted += total
    book.put_account(source, s)
    _add_totals(book, 0, total)
    return total


def check_invariants(book) -> None:
    """Full scan (tests and debug runs): columns sum to zero; no holder account negative."""
    sums = [0, 0, 0, 0]
    for key, a in book.accounts():
        for i, v in enumerate((a.debits_pending, a.debits_posted, a.credits_pending,
                               a.credits_posted)):
            sums[i] += v
        if is_holder_account(key):
            assert a.credits_posted - a.debits_posted - a.debits_pending >= 0, key
    assert sums[0] == sums[2] and sums[1] == sums[3], f"ledger out of balance: {sums}"


# ------------------------------------------------------------------ transfers

def get(book, transfer_id: str) -> Transfer | None:
    return book.transfer(transfer_id)


def _put(book, now: int, transfer_id: str, t: Transfer, card_number: str, *,
         new: bool = False) -> None:
    """Store a transfer and its change event; a `new` one must not exist yet (the command
    then rolls back whole)."""
    if not book.put_transfer(transfer_id, t, new=new):
        raise TransferRefused("EXISTS", f"transfer {transfer_id!r} already exists")
    holder = holder_of_account(t.debit if t.debit[:1] == b"h" else t.credit)
    book.append_change(_TRANSFER, now, card_number, holder, 0, 0, 0, transfer_id, t.amount)


def settle(book, key: bytes, now: int) -> int:
    """Writer side of `available()`: release the account's due holds on disk, then return
    credits less debits less holds."""
    a = book.account(key)
    if a.debits_pending:  # holds exist only while debits are pending
        _sweep_account(book, key, now)
        a = book.account(key)
    return a.credits_posted - a.debits_posted - a.debits_pending


def _check_funds(book, debit: bytes, amount: int, now: int, settled: int | None = None) -> None:
    """Refuse a holder debit beyond what is available; `settled` is what `settle()` just
    returned for this account at `now` (else it is settled here)."""
    left = settled if settled is not None else settle(book, debit, now)
    if is_holder_account(debit):
        if amount > left:
            raise TransferRefused("EXCEEDS_CREDITS",
                                  f"{amount} fen is more than the {left} fen available")


def create(book, now: int, transfer_id: str, debit: bytes, credit: bytes, amount: int,
           pending: bool = False, timeout: int = 0, channel: int = 0, role: int = 0,
           card_number: str = "", fingerprint: bytes = _ZERO_FP,
           settled: int | None = None, decided: bytes = b"") -> Transfer:
    """A single-phase transfer, or a pending one (a hold) when `pending`. `channel` and
    `role` say who made it; `card_number` names the card the request named, if any;
    `decided` the card decision it was made on (records.encode_decision), if any."""
    if debit == credit:
        raise TransferRefused("ACCOUNTS_MUST_BE_DIFFERENT", "debit and credit are the same account")
    assert 0 < amount <= config.amount_fen_max
    _check_funds(book, debit, amount, now, settled)
    if pending:
        if len(book.holds(debit)) >= config.holds_per_account_max:
            raise TransferRefused("HOLDS_PER_ACCOUNT_MAX", f"the account already has "
                                  f"{config.holds_per_account_max} open holds")
        t = Transfer(TransferKind.PENDING, TransferStatus.PENDING, amount, debit, credit, "",
                     fingerprint, now, now + timeout, 0, channel, role, decided)
        _move(book, debit, credit, amount, 0)
        book.add_hold(transfer_id, t)
    else:
        t = Transfer(_SINGLE, _POSTED, amount, debit, credit, "", fingerprint, now,
                     channel=channel, role=role, decided=decided)
        _move(book, debit, credit, 0, amount)
    _put(book, now, transfer_id, t, card_number, new=True)
    return t


def _release(book, now: int, pending_id: str, hold: Transfer, status: int, posted: int,
             card_number: str = "") -> None:
    """Resolve a hold: release all it held, post `posted` of it, drop it from the indexes."""
    _move(book, hold.debit, hold.credit, -hold.amount, posted)
    hold.status, hold.resolved = status, posted
    _put(book, now, pending_id, hold, card_number)
    book.drop_hold(pending_id, hold)


_STATUS_CODE = {TransferStatus.POSTED: "PENDING_TRANSFER_ALREADY_POSTED",
                TransferStatus.VOIDED: "PENDING_TRANSFER_ALREADY_VOIDED",
                TransferStatus.EXPIRED: "PENDING_TRANSFER_EXPIRED"}


def resolvable(book, now: int, pending_id: str, channel: int = 0, role: int = 0) -> Transfer:
    """The hold `pending_id`, still pending and placed by this channel and role; else the
    refusal `resolve` gives. Asked first by a caller that has a rule of its own for a post
    (the holder's stopped accounts: cards.debit_stopped)."""
    hold = get(book, pending_id)
    if hold is None:
        _not_found(book, pending_id)
    if hold.kind != TransferKind.PENDING:
        raise TransferRefused("PENDING_TRANSFER_NOT_PENDING", f"{pending_id!r} is not a hold")
    if hold.channel != channel or hold.role != role:
        raise TransferRefused("PENDING_TRANSFER_NOT_YOURS",
                              f"hold {pending_id!r} was placed by another channel or role; only "
                              "who placed a hold posts or voids it")
    if hold.status == TransferStatus.PENDING and hold.timeout_at <= now:  # due, not yet swept
        hold.status = TransferStatus.EXPIRED
    if hold.status != TransferStatus.PENDING:
        raise TransferRefused(_STATUS_CODE[TransferStatus(hold.status)],
                              f"hold {pending_id!r} is resolved")
    return hold


def resolve(book, now: int, transfer_id: str, pending_id: str, *, post: bool, amount: int = 0,
            channel: int = 0, role: int = 0, card_number: str = "",
            fingerprint: bytes = _ZERO_FP) -> Transfer:
    """Post (any amount up to the hold; 0 = all of it; the rest is released) or void a hold,
    for the channel and role that placed it."""
    hold = resolvable(book, now, pending_id, channel, role)
    if not post:
        amount = 0
    elif amount == 0:
        amount = hold.amount
    elif amount > hold.amount:
        raise TransferRefused("EXCEEDS_PENDING_TRANSFER_AMOUNT",
                              f"{amount} fen is more than the {hold.amount} fen held")
    _release(book, now, pending_id, hold,
             TransferStatus.POSTED if post else TransferStatus.VOIDED, amount, card_number)
    t = Transfer(TransferKind.POST if post else TransferKind.VOID, TransferStatus.POSTED, amount,
                 hold.debit, hold.credit, pending_id, fingerprint, now, channel=hold.channel,
                 role=role)
    _put(book, now, transfer_id, t, card_number, new=True)
    return t


def reverse(book, now: int, reversal_id: str, original_id: str, amount: int = 0, *,
            role: int = 0, fingerprint: bytes = _ZERO_FP, card_number: str = "") -> Transfer:
    """Move back up to what a posted transfer moved, summed over all its reversals.
    `card_number` names the card the reversal is for, if any (a fee's: GZ-27, RC-33)."""
    original = get(book, original_id)
    if original is None:
        _not_found(book, original_id)
    if original.kind not in (TransferKind.SINGLE, TransferKind.POST) or original.amount == 0:
        raise TransferRefused("NOT_REVERSIBLE", f"{original_id!r} moved no posted money "
                              "(holds are voided, reversals are not reversed)")
    left = original.amount - original.resolved
    if amount == 0:
        amount = left
    if amount == 0 or amount > left:
        raise TransferRefused("EXCEEDS_REVERSIBLE_AMOUNT",
                              f"{amount} fen asked; {left} fen of {original_id!r} is left to "
                              "reverse")
    _check_funds(book, original.credit, amount, now)
    _move(book, original.credit, original.debit, 0, amount)
    original.resolved += amount
    _put(book, now, original_id, original, "")
    t = Transfer(TransferKind.REVERSAL, TransferStatus.POSTED, amount, original.credit,
                 original.debit, original_id, fingerprint, now, channel=original.channel,
                 role=role)
    _put(book, now, reversal_id, t, card_number, new=True)
    return t


def legs(book, transfer_id: str) -> list[tuple[str, Transfer]]:
    """A split tap's legs (issue 28 item 2: `<request_id>#1`, `#2`, ..., the order they were
    charged), or [] when `transfer_id` names a transfer itself or has no legs. A leg is a
    single-phase debit made by Authorize (its channel is set), one per holder account."""
    if get(book, transfer_id) is not None:
        return []
    out = []
    for n in range(1, len(AccountKind) + 1):  # at most one leg per holder account
        t = get(book, f"{transfer_id}#{n}")
        if t is None or t.kind != _SINGLE or not t.channel or not is_holder_account(t.debit):
            break
        out.append((f"{transfer_id}#{n}", t))
    return out


def reverse_legs(book, now: int, reversal_id: str, original_id: str, amount: int = 0, *,
                 role: int = 0, fingerprint: bytes = _ZERO_FP) -> list[tuple[str, Transfer]]:
    """Reverse a split tap: its legs undone last first (the purse's part before the medical
    account's), `amount` (0: all that is left) taken from the last leg first, so that what
    stays charged is what a tap of the smaller amount would have charged. Each leg's
    reversal is `<reversal_id>#N` for leg N; all in this transaction or none. Returns the
    reversals made, in that order."""
    parts = legs(book, original_id)
    if not parts:
        _not_found(book, original_id)
    left = sum(t.amount - t.resolved for _, t in parts)
    if amount == 0:
        amount = left
    if amount == 0 or amount > left:
        raise TransferRefused("EXCEEDS_REVERSIBLE_AMOUNT",
                              f"{amount} fen asked; {left} fen of {original_id!r} is left to "
                              "reverse")
    out = []
    for leg_id, t in reversed(parts):
        part = min(amount, t.amount - t.resolved)
        if part:
            out.append((leg_id, reverse(book, now, f"{reversal_id}#{leg_id.rsplit('#', 1)[1]}",
                                        leg_id, part, role=role, fingerprint=fingerprint)))
            amount -= part
    assert amount == 0
    return out


def _not_found(book, transfer_id: str) -> typing.NoReturn:
    """TransferNotFound, or for a transfer moved to the archive (older than --retain-days:
    storage/archive.py) a refusal that says so: it is no longer posted, voided or reversed."""
    if book.archived(transfer_id):
        raise TransferRefused("ARCHIVED", f"transfer {transfer_id!r} is older than the "
                              "retention window (--retain-days) and was moved to the archive: "
                              "it can no longer be posted, voided or reversed here")
    raise TransferNotFound(transfer_id)


def expire_holds(book, now: int, limit: int = config.hold_sweep_max,
                 bytes_max: int | None = None) -> int:
    """Release every hold whose timeout has come (timeout_at <= now). Returns how many.
    `bytes_max`: on a replicated writer, stop once what this sweep put in the book's journal
    passes it (counted as the record's plain bytes); the rest go in the next sweep, a
    second later. Ten thousand holds are about 5 MB: past any record the log takes."""
    due = book.holds_due(now, limit)
    size = 0
    for n, pending_id in enumerate(due):
        if bytes_max is not None and size > bytes_max:
            return n
        start = len(book.journal or ())
        _expire(book, now, pending_id, book.transfer(pending_id))
        if bytes_max is not None and book.journal:
            size += records.journal_size(book.journal[start:]) - records.JOURNAL_HEAD_BYTES
    return len(due)

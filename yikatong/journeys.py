"""Issue 28: no journey left open (docs/DECISIONS.md, "No journey left open").

A TRANSIT tap-in hold may carry the operator's policy for a journey no tap-out ends before the
hold's timeout: settle it at the operator's maximum fare, or void it. Like every hold it is
resolved at its timeout's exact second: whoever comes first, the account's next movement
(`ledger.settle`), the periodic sweep (`ledger.expire_holds`) or a read (`ledger.due`, which
counts what the settlement posts as posted the moment it is due), resolves it as of that
second. The card's next TRANSIT debit is told of it (`untold`), once; a tap-out within
`config.journey_grace_seconds` of the settlement corrects the charge to the real fare, the
rest moved back to the card (`tap_out`: a reversal under the tap-out's request id, audited
as the tap-out's Authorize).

A journey's facts live in a database of their own (`journeys`: hold id -> record), beside the
hold's transfer record, whose layout is unchanged: a hold with no journey record is released
at its timeout, as before.
"""
import dataclasses
import enum
import struct

from yikatong import config, ledger
from yikatong.errors import CorruptRecord, TransferRefused
from yikatong.model import Transfer, TransferKind, TransferStatus


class JourneyTimeout(enum.IntEnum):
    """The operator's policy (API: JourneyTimeout)."""

    RELEASE = 0  # JOURNEY_TIMEOUT_UNSPECIFIED: released, as any hold
    SETTLE_MAX_FARE = 1
    VOID = 2


class JourneyState(enum.IntEnum):
    OPEN = 1  # the tap-in's hold is in force
    COMPLETED = 2  # tapped out before the timeout: the hold posted at the real fare
    CANCELLED = 3  # voided before the timeout by whoever placed it
    SETTLED = 4  # timed out, posted at the max fare: a tap-out within the grace corrects it
    VOIDED = 5  # timed out, voided (the operator's policy)
    CORRECTED = 6  # settled, then tapped out within the grace: the real fare, the rest back


# version, max fare, policy, state, settled at (the hold's timeout), fare charged
_RECORD = struct.Struct("<BqBBqq")
_VERSION = 1


@dataclasses.dataclass
class Journey:
    max_fare: int
    on_timeout: int
    state: int = JourneyState.OPEN
    settled_at: int = 0
    fare: int = 0


@dataclasses.dataclass
class Told:
    """What an answer tells of a journey: the one left open (`hold_id`...), or what a
    correcting tap-out gave back (`refund`, None otherwise)."""

    hold_id: str = ""
    outcome: int = 0
    fare: int = 0
    settled_at: int = 0
    correctable_until: int = 0
    refund: int | None = None


def get(book, hold_id: str) -> Journey | None:
    value = book.journey(hold_id)
    if value is None:
        return None
    if len(value) != _RECORD.size or value[0] != _VERSION:
        raise CorruptRecord(f"journey record of {len(value)} bytes")
    _, max_fare, on_timeout, state, settled_at, fare = _RECORD.unpack(value)
    if on_timeout not in (1, 2) or not JourneyState.OPEN <= state <= JourneyState.CORRECTED:
        raise CorruptRecord(f"journey record with policy {on_timeout} / state {state}")
    return Journey(max_fare, on_timeout, state, settled_at, fare)


def _put(book, hold_id: str, j: Journey) -> None:
    assert 0 <= j.max_fare <= config.amount_fen_max and 0 <= j.fare <= config.amount_fen_max \
        and (j.fare <= j.max_fare or j.on_timeout == JourneyTimeout.VOID), j
    book.put_journey(hold_id, _RECORD.pack(_VERSION, j.max_fare, j.on_timeout, j.state,
                                           j.settled_at, j.fare))


def begin(book, hold_id: str, max_fare: int, on_timeout: int) -> None:
    """The tap-in's hold `hold_id` was just placed with this policy."""
    assert on_timeout in (JourneyTimeout.SETTLE_MAX_FARE, JourneyTimeout.VOID)
    _put(book, hold_id, Journey(max_fare, on_timeout))


def due_fare(book, hold_id: str) -> int:
    """Fen a due hold's settlement posts (0: it is released whole)."""
    j = get(book, hold_id)
    return j.max_fare if j is not None and j.on_timeout == JourneyTimeout.SETTLE_MAX_FARE \
        and j.state == JourneyState.OPEN else 0


def state(book, hold_id: str, now: int) -> tuple[int, int] | None:
    """(state, fen charged) of a journey as of `now`, whether or not its due hold was swept
    (None: no journey): a read sees it settled (or voided) from its timeout's second."""
    j = get(book, hold_id)
    if j is None:
        return None
    if j.state == JourneyState.OPEN:
        hold = book.transfer(hold_id)
        if hold is not None and hold.status == TransferStatus.PENDING and hold.timeout_at <= now:
            settle = j.on_timeout == JourneyTimeout.SETTLE_MAX_FARE
            return (JourneyState.SETTLED, j.max_fare) if settle else (JourneyState.VOIDED, 0)
    return j.state, j.fare


def at_timeout(book, now: int, hold_id: str, hold: Transfer) -> bool:
    """Resolve a due hold by its journey's policy, as of its timeout's second; False: it has
    none (release it as any hold)."""
    j = get(book, hold_id)
    if j is None or j.state != JourneyState.OPEN:
        return False
    settle = j.on_timeout == JourneyTimeout.SETTLE_MAX_FARE
    j.fare = j.max_fare if settle else 0
    ledger._release(book, now, hold_id, hold,
                    TransferStatus.POSTED if settle else TransferStatus.VOIDED, j.fare)
    j.state = JourneyState.SETTLED if settle else JourneyState.VOIDED
    j.settled_at = hold.timeout_at
    _put(book, hold_id, j)
    # the account's last journey left open (by its timeout, then its id) is the one told;
    # holds due together are swept in no order a rider would see
    untold = book.journey_untold(hold.debit)
    other = get(book, untold) if untold is not None else None
    if other is None or (other.settled_at, untold) < (j.settled_at, hold_id):
        book.put_journey_untold(hold.debit, hold_id)
    return True


def untold(book, key: bytes) -> Told | None:
    """The account's last journey left open that no tap was told of, now told (forgotten)."""
    hold_id = book.journey_untold(key, take=True)
    if hold_id is None:
        return None
    j = get(book, hold_id)
    if j is None:
        raise CorruptRecord(f"journey {hold_id!r} named untold has no record")
    if book.transfer(hold_id) is None:  # its hold archived (storage/archive.py, which keeps
        book.forget_journey(hold_id)    # a journey still to be told): it goes now
    return Told(hold_id, j.on_timeout, j.fare, j.settled_at,
                j.settled_at + config.journey_grace_seconds
                if j.state in (JourneyState.SETTLED, JourneyState.CORRECTED) else 0)


def tap_out(book, now: int, transfer_id: str, hold_id: str, hold: Transfer, j: Journey, *,
            post: bool, amount: int, channel: int, role: int, card_number: str,
            fingerprint: bytes) -> Told | None:
    """A tap-out (`post`) or void of a journey's hold. Before the timeout, the hold's own post
    or void; after it, on a journey settled at its max fare and within the grace, the
    correction to the real fare `amount` (0: the max fare): a reversal of the difference back
    to the card. Anything else is refused, nothing moved."""
    if j.state == JourneyState.OPEN and hold.status == TransferStatus.PENDING:
        if hold.timeout_at > now:
            if post and j.on_timeout == JourneyTimeout.SETTLE_MAX_FARE:  # its fare at most
                amount = amount or j.max_fare
                if amount > j.max_fare:
                    raise TransferRefused("EXCEEDS_MAX_FARE", f"{amount} fen is more than the "
                                          f"max fare of {j.max_fare} fen of journey {hold_id!r}")
            t = ledger.resolve(book, now, transfer_id, hold_id, post=post, amount=amount,
                               channel=channel, role=role, card_number=card_number,
                               fingerprint=fingerprint)
            j.state, j.fare = (JourneyState.COMPLETED, t.amount) if post \
                else (JourneyState.CANCELLED, 0)
            _put(book, hold_id, j)
            return None
        if hold.channel == channel and hold.role == role:  # due, not yet swept: settle it
            at_timeout(book, now, hold_id, hold)
            j = get(book, hold_id)
            assert j is not None
    if j.state not in (JourneyState.SETTLED, JourneyState.VOIDED, JourneyState.CORRECTED):
        ledger.resolve(book, now, transfer_id, hold_id, post=post, amount=amount,
                       channel=channel, role=role)  # refuses as for any resolved hold
        raise AssertionError(f"journey {hold_id!r} in state {j.state} resolved twice")
    if hold.channel != channel or hold.role != role:
        raise TransferRefused("PENDING_TRANSFER_NOT_YOURS",
                              f"hold {hold_id!r} was placed by another channel or role; only "
                              "who placed a hold posts or voids it")
    if j.state == JourneyState.VOIDED:
        raise TransferRefused("JOURNEY_VOIDED", f"journey {hold_id!r} was voided at its "
                              f"timeout ({j.settled_at}), the operator's policy: nothing was "
                              "charged and nothing is corrected")
    if j.state == JourneyState.CORRECTED:
        raise TransferRefused("JOURNEY_CORRECTED", f"journey {hold_id!r} was already corrected "
                              f"to {j.fare} fen by a tap-out")
    until = j.settled_at + config.journey_grace_seconds
    if not post:
        raise TransferRefused("JOURNEY_SETTLED", f"journey {hold_id!r} was settled at its max "
                              f"fare of {j.max_fare} fen at {j.settled_at}; a tap-out "
                              f"(PHASE_POST) before {until} corrects it, a void does not")
    if now >= until:
        raise TransferRefused("JOURNEY_GRACE_ENDED", f"journey {hold_id!r} was settled at its "
                              f"max fare of {j.max_fare} fen at {j.settled_at}; its tap-out "
                              f"window closed at {until} (--journey-grace-seconds "
                              f"{config.journey_grace_seconds}): nothing moved")
    fare = amount or j.max_fare
    if fare > j.max_fare:
        raise TransferRefused("EXCEEDS_MAX_FARE", f"{fare} fen is more than the max fare of "
                              f"{j.max_fare} fen journey {hold_id!r} was settled at")
    refund = j.max_fare - fare
    if refund:
        ledger._move(book, hold.credit, hold.debit, 0, refund)
    ledger._put(book, now, transfer_id, Transfer(
        TransferKind.REVERSAL, TransferStatus.POSTED, refund, hold.credit, hold.debit, hold_id,
        fingerprint, now, channel=channel, role=role), card_number, new=True)
    j.state, j.fare = JourneyState.CORRECTED, fare
    _put(book, hold_id, j)
    return Told(refund=refund)

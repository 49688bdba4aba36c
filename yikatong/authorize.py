"""Authorization (SPEC.md section 4): may this card be used for this, right now?

Without money it is one read and the decision table (`fastpath.decide` over the stored
record's bytes): no write, no wait for the writer. With money it runs in the writer: decided,
debited (or held, posted, voided) and remembered under the request id in one transaction, so a
replay returns the first answer and moves nothing twice.
"""
from yikatong import cards, config, fastpath, journeys, ledger, points
from yikatong.errors import CorruptRecord, InvalidArgument
from yikatong.model import (
    Channel,
    Phase,
    Reason,
    TransferKind,
    holder_account_key,
    operator_account_key,
)
from yikatong.storage import records
from yikatong.storage.records import ASKED_OTHER_CARDS, ASKED_SPLIT, encode_decision, hot

# The accounts a loss report or a death stops (cards.account_stopped), and the answers of the
# table that leave the card itself usable for them: its rows 3, 7 and 8 speak for the account
# ahead of a lock (row 10) and the funds (row 14).
_STOPPABLE = frozenset({Channel.MEDICAL, Channel.BENEFIT})
_CARD_USABLE = frozenset({Reason.APPROVED, Reason.APPLICATION_LOCKED, Reason.INSUFFICIENT_FUNDS})
# issue 28 item 4: what an approved debit's recorded decision says was asked beyond the card
_ASKED: dict[int, int] = {c: ASKED_OTHER_CARDS if c in _STOPPABLE else 0 for c in Channel}
_RULE_PACK = fastpath.RULE_PACK


def points_required(channel: int, service_code: str) -> int:
    """RC-17, RC-18, RC-20: the points a SERVICE code needs of a Residence Card, on the
    indicator table in force (0 for every other use)."""
    return points.in_force().points_required(service_code) if channel == Channel.SERVICE else 0


def without_money(policy, book, card_number: str, channel: int, service_code: str,
                  now: int) -> int:
    """The decision for a use that moves no money: APPROVED (0) or the decline reason. At
    MEDICAL and BENEFIT it is what a debit of the card would get but for the funds: the
    holder's other cards asked too (`other_cards`)."""
    record = book.use_bytes(card_number)
    reason = on_record(policy, record, card_number, channel, service_code, now, book)
    return other_cards(book, record, channel, now, reason)


def other_cards(book, record, channel: int, now: int, reason: int) -> int:
    """GZ-21, SH-18, GZ-26 on a status-only use (docs/DECISIONS.md, "Stopped accounts on
    every path"): `reason`, the card's own answer, or where it leaves the card usable at
    MEDICAL or BENEFIT, the answer the holder's other cards give the account
    (cards.account_stopped), as `with_money` asks them. The wire path (fastpath
    authorize_wire, status_wire) asks the same, held equal by tests."""
    if channel in _STOPPABLE and reason in _CARD_USABLE:
        holder = records.holder_id_of(record)  # a usable card's record is a valid one
        if holder is not None:
            return cards.account_stopped(book, holder, now, hot(record).pack)[0] or reason
    return reason


def on_record(policy, record, card_number: str, channel: int, service_code: str,
              now: int, book=None) -> int:
    """The same decision on a card record already read (None: no such card). With the `book`
    it was read from, a bank loss report whose bank's days are over no longer freezes
    (SH-20; without it, as every caller but FINANCIAL's, the flag alone is asked)."""
    need = points_required(channel, service_code)
    reason = fastpath.decide(policy, record, channel, now, need)
    if reason == Reason.FINANCIAL_FROZEN and book is not None:  # rare: read its end
        end = book.bank_loss_end(card_number)
        if end:
            reason = fastpath.decide(policy, record, channel, now, need, 0, 0, end)
    if reason == fastpath.CORRUPT:
        raise CorruptRecord(f"card record {card_number} is corrupt; not deciding on it")
    return reason


def with_money(policy, book, now: int, request_id: str, card_number: str, channel: int,
               amount: int, phase: int, hold_request_id: str, payee: str, hold_timeout: int,
               role: int, fingerprint: bytes, max_fare: int = 0, on_timeout: int = 0
               ) -> tuple[int, int, journeys.Told | None]:
    """One decision that moves money, inside the writer's transaction. Returns (reason,
    fen available afterwards in the debited account, 0 where the card has none, what the
    answer tells of a journey: issue 28). A TRANSIT hold with `on_timeout` is a journey's
    tap-in (yikatong/journeys.py)."""
    kind, default_payee, default_timeout = config.channel_money[channel]
    record, holder_id = book.card_with_holder(card_number)
    debit = holder_account_key(holder_id, kind) if holder_id is not None else None
    if phase in (Phase.POST, Phase.VOID):
        # A tap-out or void resolves a hold already granted: the hold must be on this card's
        # account for this channel; the card's state is not asked again (a card reported lost
        # mid-journey still pays the fare it held), but a MEDICAL or BENEFIT account stopped
        # since is (below).
        hold = ledger.get(book, hold_request_id)
        if hold is None or hold.debit != debit:
            raise InvalidArgument("hold_request_id", f"{hold_request_id!r} is not a hold on card "
                                  f"{card_number}'s {Channel(channel).name} account")
        if phase == Phase.POST and channel in _STOPPABLE:
            # GZ-21, SH-18, GZ-26: a capture is money leaving the account, and a hold placed
            # before the stop is not captured after it (the void releases it); the hold's own
            # refusals first (cards.debit_stopped)
            ledger.resolvable(book, now, hold_request_id, channel, role)
            stop = cards.debit_stopped(book, debit, now)[0]
            if stop:
                return stop, ledger.available(book, debit, now), None
        journey = journeys.get(book, hold_request_id) if hold.kind == TransferKind.PENDING \
            else None
        told = None
        if journey is not None:
            told = journeys.tap_out(book, now, request_id, hold_request_id, hold, journey,
                                    post=phase == Phase.POST, amount=amount, channel=channel,
                                    role=role, card_number=card_number, fingerprint=fingerprint)
        else:
            ledger.resolve(book, now, request_id, hold_request_id, post=phase == Phase.POST,
                           amount=amount, channel=channel, role=role, card_number=card_number,
                           fingerprint=fingerprint)
        return Reason.APPROVED, ledger.available(book, debit, now), told
    left = ledger.settle(book, debit, now) if debit is not None else 0
    reason = fastpath.decide(policy, record, channel, now, 0, amount, left)
    if reason == fastpath.CORRUPT:
        raise CorruptRecord(f"card record {card_number} is corrupt")
    if channel in _STOPPABLE and reason in _CARD_USABLE:  # the holder's other cards
        reason = cards.account_stopped(book, holder_id, now, hot(record).pack)[0] or reason
    # issue 28: a transit tap is told of the purse's last journey left open, whatever it gets
    told = journeys.untold(book, debit) if channel == Channel.TRANSIT and debit is not None \
        else None
    if reason == Reason.APPROVED:
        assert debit is not None
        ledger.create(book, now, request_id, debit, operator_account_key(payee or default_payee),
                      amount, phase == Phase.HOLD, hold_timeout or default_timeout, channel,
                      role, card_number, fingerprint, left,
                      encode_decision(_RULE_PACK, record, left, _ASKED[channel]))
        if on_timeout:
            journeys.begin(book, request_id, max_fare, on_timeout)
        left -= amount
    return reason, left if debit is not None else 0, told


def with_split(policy, book, now: int, request_id: str, card_number: str, channel: int,
               amount: int, payee: str, role: int, fingerprint: bytes, kinds: tuple
               ) -> tuple[int, int, list]:
    """One tap paid from several of the holder's accounts (issue 28 item 2), in the order of
    the operator's rule `kinds` (yikatong.pots; the channel's own account first), inside the
    writer's transaction: every leg or none. Returns (reason, fen available afterwards in the
    channel's own account, [(kind, fen, leg transfer id, fen available after)]).

    The split changes only what funds mean: the card and the channel's own account are
    decided exactly as an unsplit tap (`with_money`), so a card, or a medical account stopped
    by a lost card or a death (cards.account_stopped), declines with the same reason and no
    other account pays instead. INSUFFICIENT_FUNDS is answered only when all the rule's
    accounts together do not cover `amount`; then nothing moves. Legs are single-phase
    transfers `<request_id>#1`, `#2`, ... (only accounts that pay a part)."""
    record, holder_id = book.card_with_holder(card_number)
    first = holder_account_key(holder_id, kinds[0]) if holder_id is not None else None
    left = ledger.settle(book, first, now) if first is not None else 0
    reason = fastpath.decide(policy, record, channel, now, 0, amount, left)
    if reason == fastpath.CORRUPT:
        raise CorruptRecord(f"card record {card_number} is corrupt")
    if channel in _STOPPABLE and reason in _CARD_USABLE:  # the holder's other cards
        reason = cards.account_stopped(book, holder_id, now, hot(record).pack)[0] or reason
    if reason not in (Reason.APPROVED, Reason.INSUFFICIENT_FUNDS):
        return reason, left if first is not None else 0, []
    plan, due = [], amount
    for kind in kinds:
        key = holder_account_key(holder_id, kind)
        there = left if key == first else ledger.settle(book, key, now)
        part = min(there, due)
        if part > 0:
            plan.append((kind, key, part, there))
            due -= part
        if not due:
            break
    if due:
        return Reason.INSUFFICIENT_FUNDS, left, []
    credit = operator_account_key(payee or config.channel_money[channel][1])
    legs, asked = [], _ASKED[channel] | ASKED_SPLIT
    for n, (kind, key, part, there) in enumerate(plan, 1):
        leg_id = f"{request_id}#{n}"
        ledger.create(book, now, leg_id, key, credit, part, False, 0, channel, role,
                      card_number, fingerprint, there,
                      encode_decision(_RULE_PACK, record, there, asked))
        legs.append((kind, part, leg_id, there - part))
    return Reason.APPROVED, left - (plan[0][2] if plan[0][1] == first else 0), legs

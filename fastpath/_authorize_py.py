"""The authorization decision, SPEC.md section 4, in plain Python: the readable reference.

`decide(policy, record, channel, now, points_required, amount, available, bank_loss_until)`
takes the raw card record bytes as stored in LMDB (None if there is no such card), the fen
asked for (`amount`, 0 = no money), the fen available in the account it would debit and the
stored end of the card's bank loss report (0: none stored, it stands until cancelled; the
caller reads it only when a first decision said FINANCIAL_FROZEN), and returns the decline
reason (model.Reason, the values of yikatong.v1.DeclineReason), APPROVED (0), or CORRUPT (-1)
for a record that must not be decided on. The first rule that fails wins, in the table's
order. The Cython twin (_authorize_c.pyx) must give the same answer for every input; tests
check that.
"""
from yikatong.errors import CorruptRecord
from yikatong.model import Channel, Flag, Pack, Reason, State
from yikatong.storage.records import HotCard, hot

APPROVED = int(Reason.APPROVED)
CORRUPT = -1
# Plain ints on the hot loop (an enum member is a slower name to look up).
(CARD_NOT_FOUND, CARD_SUPERSEDED, CARD_CANCELLED, GENERATION_RETIRED, CARD_NOT_ISSUED,
 CARD_NOT_ACTIVATED, CARD_LOST, CARD_FROZEN, RC_NOT_RENEWED, APPLICATION_LOCKED,
 FUNCTION_NOT_OPEN, FINANCIAL_FROZEN, NOT_ENTITLED, INSUFFICIENT_FUNDS) = map(int, list(Reason)[1:])
_SUPERSEDED, _CANCELLED, _ISSUED, _LOST, _TEMP_LOSS = map(int, (
    State.SUPERSEDED, State.CANCELLED, State.ISSUED, State.LOST, State.TEMP_LOSS))
_NOT_ISSUED = frozenset(map(int, (State.APPLIED, State.VERIFIED, State.REJECTED)))
_TRANSIT, _FINANCIAL, _SERVICE = int(Channel.TRANSIT), int(Channel.FINANCIAL), int(Channel.SERVICE)
_MEDICAL, _BENEFIT = int(Channel.MEDICAL), int(Channel.BENEFIT)
_FLAG_TRANSIT, _FLAG_FIN_OPEN, _FLAG_FIN_FROZEN, _FLAG_UNACTIVATED = map(int, (
    Flag.TRANSIT, Flag.FINANCIAL_OPEN, Flag.FINANCIAL_FROZEN, Flag.UNACTIVATED))
_RC = int(Pack.RC)
_LOSS_STOPS_FINANCIAL = frozenset(map(int, (Pack.GZ, Pack.BJ)))


class Policy:
    """The configured facts the table consults: SH-30 retirement moments per generation
    (0 = never retired)."""

    def __init__(self, generation_retired_at: dict):
        self.retired_at = [0] * 256
        for generation, moment in generation_retired_at.items():
            self.retired_at[generation] = moment


def decide(policy: Policy, record, channel: int, now: int, points_required: int,
           amount: int = 0, available: int = 0, bank_loss_until: int = 0) -> int:
    if record is None:
        return CARD_NOT_FOUND
    try:
        card = hot(record)  # size, version and enum ranges checked; nothing else is read
    except CorruptRecord:
        return CORRUPT
    financial = channel == _FINANCIAL
    if card.state == _SUPERSEDED:  # SH-23c
        return CARD_SUPERSEDED
    if card.state == _CANCELLED:  # GZ-26, RC-16
        return CARD_CANCELLED
    if retired(policy, card, now):  # SH-30
        return GENERATION_RETIRED
    if card.state in _NOT_ISSUED:
        return CARD_NOT_ISSUED
    if not financial and (card.state == _ISSUED or lapsed_unactivated(card, now)):  # SH-12
        return CARD_NOT_ACTIVATED
    if card.state == _LOST and (not financial or loss_stops_financial(card)):
        return CARD_LOST
    if card.state == _TEMP_LOSS and not financial and frozen(card, now):
        return CARD_FROZEN
    if card.pack == _RC and card.valid_until and now >= card.valid_until:  # RC-14
        return RC_NOT_RENEWED
    if card.lock_mask & (1 << channel):  # GZ-6
        return APPLICATION_LOCKED
    if channel == _TRANSIT and not card.flags & _FLAG_TRANSIT:  # SH-13
        return FUNCTION_NOT_OPEN
    if financial and not card.flags & _FLAG_FIN_OPEN:  # SH-14
        return FUNCTION_NOT_OPEN
    if card.pack == _RC and (channel == _MEDICAL or channel == _BENEFIT):
        return FUNCTION_NOT_OPEN  # RC-6: a Residence Card carries no medical or benefit account
    if financial and card.flags & _FLAG_FIN_FROZEN and bank_loss_stands(bank_loss_until, now):
        return FINANCIAL_FROZEN  # SH-20
    if channel == _SERVICE and points_required and (card.pack != _RC
                                                    or card.points < points_required):
        return NOT_ENTITLED  # RC-20: the points are a Residence Card's; no other card has any
    if amount > available:  # a debit larger than the balance less holds
        return INSUFFICIENT_FUNDS
    return APPROVED


def retired(policy: Policy, card: HotCard, now: int) -> bool:
    moment = policy.retired_at[card.generation]
    return moment != 0 and now >= moment


def frozen(card: HotCard, now: int) -> bool:
    """SH-18b: frozen until the instant its 5 days end (24:00 Shanghai of the fifth day after
    the report, stored when it was made), then restored by itself."""
    return now < card.temp_loss_until


def bank_loss_stands(until: int, now: int) -> bool:
    """SH-20: a bank loss report stands until cancelled (no end stored), or by its bank's rules
    until the instant its days end (24:00 of the last, stored when it was made)."""
    return until == 0 or now < until


def lapsed_unactivated(card: HotCard, now: int) -> bool:
    """SH-18b on a card reported lost before it was ever activated (SH-17): its lapsed
    temporary loss restores it to what it was, issued and not activated (SH-12)."""
    return (card.state == _TEMP_LOSS and bool(card.flags & _FLAG_UNACTIVATED)
            and not frozen(card, now))


def loss_stops_financial(card: HotCard) -> bool:
    """GZ-21 suspends the card's *settlement accounts*, and GZ-13 says those include the
    financial account, so a GZ (and BJ, which follows GZ) loss also stops FINANCIAL. SH-18
    freezes only the social security functions; its bank side is SH-20's own report."""
    return card.pack in _LOSS_STOPS_FINANCIAL

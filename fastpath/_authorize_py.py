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
import typing

from yikatong.errors import CorruptRecord
from yikatong.model import Channel, Flag, Pack, Reason, State
from yikatong.storage.records import HotCard, hot

APPROVED = int(Reason.APPROVED)
CORRUPT = -1
# The rule pack (issue 28 item 4): the version of what decides a debit, recorded with every
# transfer Authorize makes (storage/records.py encode_decision) so that `yikatong explain`
# can say whether today's rules would answer it differently. It covers this table (decide,
# walk and their helpers, and the Cython twin: held identical by tests),
# config.generation_retired_at (the Policy every server runs), with_money's account rule
# (cards.account_stopped) and the funds row; not the points table or the calendar, which no
# money-moving decision reads (temp_loss_until is stored on the card when the loss is
# reported). Bump it, and keep the old table in yikatong/explain.py's PACKS, whenever any of
# them changes an answer: tests/test_explain.py holds a digest of their code.
RULE_PACK = 1
# Plain ints on the hot loop (an enum member is a slower name to look up).
(CARD_NOT_FOUND, CARD_SUPERSEDED, CARD_CANCELLED, GENERATION_RETIRED, CARD_NOT_ISSUED,
 CARD_NOT_ACTIVATED, CARD_LOST, CARD_FROZEN, RC_NOT_RENEWED, APPLICATION_LOCKED,
 FUNCTION_NOT_OPEN, FINANCIAL_FROZEN, NOT_ENTITLED, INSUFFICIENT_FUNDS) = map(int, list(Reason)[1:])
_SUPERSEDED, _CANCELLED, _ISSUED, _LOST, _TEMP_LOSS = map(int, (
    State.SUPERSEDED, State.CANCELLED, State.ISSUED, State.LOST, State.TEMP_LOSS))
_NOT_ISSUED = frozenset(map(int, (State.APPLIED, State.VERIFIED, State.REJECTED)))
_TRANSIT, _FINANCIAL, _SERVICE = int(Channel.TRANSIT), int(Channel.FINANCIAL), int(Channel.SERVICE)
_MEDICAL, _BENEFIT = int(Channel.MEDICAL), int(Channel.BENEFIT)
_CHANNELS = frozenset(map(int, Channel))
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


class Row(typing.NamedTuple):
    """One row of the table as `walk` passed it: its number, the rule it applies, what it
    tests, and the answer it gave (None: the row does not apply, the next is asked)."""

    number: int
    rule: str
    test: str
    answer: int | None


def walk(policy: Policy, record, channel: int, now: int, points_required: int,
         amount: int = 0, available: int = 0, bank_loss_until: int = 0):
    """`decide`, row by row: yields each Row it asks, the last one with its answer (the same
    as decide's for every input: tests/test_explain.py holds the two identical)."""
    if record is None:
        yield Row(1, "", "there is no such card", CARD_NOT_FOUND)
        return
    try:
        card = hot(record)
    except CorruptRecord:
        yield Row(0, "", "the card record is not one this table reads", CORRUPT)
        return
    yield Row(1, "", "there is no such card", None)
    financial = channel == _FINANCIAL
    moment = policy.retired_at[card.generation]
    use = Channel(channel).name if channel in _CHANNELS else f"channel {channel}"
    rows = (
        (2, "SH-23c", "the card is superseded by its replacement",
         lambda: card.state == _SUPERSEDED, CARD_SUPERSEDED),
        (3, "GZ-26, RC-16", "the card is cancelled",
         lambda: card.state == _CANCELLED, CARD_CANCELLED),
        (4, "SH-30", f"generation {card.generation} is retired by {now} (retired from "
         f"{moment or 'never'})",
         lambda: retired(policy, card, now), GENERATION_RETIRED),
        (5, "SH-10", "the card is not yet issued",
         lambda: card.state in _NOT_ISSUED, CARD_NOT_ISSUED),
        (6, "SH-12", "the card is not activated (for a use other than FINANCIAL)",
         lambda: not financial and (card.state == _ISSUED or lapsed_unactivated(card, now)),
         CARD_NOT_ACTIVATED),
        (7, "SH-18, GZ-21", "the card is reported lost (and the loss stops this use)",
         lambda: card.state == _LOST and (not financial or loss_stops_financial(card)),
         CARD_LOST),
        (8, "SH-18b", f"the card is temporarily lost and frozen until "
         f"{card.temp_loss_until} (now {now})",
         lambda: card.state == _TEMP_LOSS and not financial and frozen(card, now), CARD_FROZEN),
        (9, "RC-14", f"a Residence Card valid until {card.valid_until} (now {now})",
         lambda: card.pack == _RC and card.valid_until and now >= card.valid_until,
         RC_NOT_RENEWED),
        (10, "GZ-6", f"the {use} application is locked",
         lambda: card.lock_mask & (1 << channel), APPLICATION_LOCKED),
        (11, "SH-13", "a transit use without the transit function",
         lambda: channel == _TRANSIT and not card.flags & _FLAG_TRANSIT, FUNCTION_NOT_OPEN),
        (12, "SH-14", "a financial use without the financial function open",
         lambda: financial and not card.flags & _FLAG_FIN_OPEN, FUNCTION_NOT_OPEN),
        (13, "RC-6", "a Residence Card asked for a medical or benefit use",
         lambda: card.pack == _RC and (channel == _MEDICAL or channel == _BENEFIT),
         FUNCTION_NOT_OPEN),
        (14, "SH-20", "a financial use while a bank loss report stands",
         lambda: financial and card.flags & _FLAG_FIN_FROZEN
         and bank_loss_stands(bank_loss_until, now), FINANCIAL_FROZEN),
        (15, "RC-20", f"a service needing {points_required} points (the card has "
         f"{card.points if card.pack == _RC else 'none'})",
         lambda: channel == _SERVICE and points_required and (card.pack != _RC
                                                               or card.points < points_required),
         NOT_ENTITLED),
        (16, "", f"{amount} fen asked of {available} fen available",
         lambda: amount > available, INSUFFICIENT_FUNDS),
    )
    for number, rule, test, fails, reason in rows:
        if fails():
            yield Row(number, rule, test, reason)
            return
        yield Row(number, rule, test, None)
    yield Row(17, "", "every rule passed", APPROVED)


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


# ------------------------------------------------------------------- the wire path with money
#
# The readable twin of _authorize_c.money_wire / money_answer / money_answers: authorizations
# that move money from the request's wire bytes to the writer's compact commands, each with
# its fingerprint as server/core.py's `fingerprint` computes it; None whenever the Python path
# (decode, server/validate.py, the role's channels) must take the message. The server runs the
# compiled one; tests hold the two to the same result for any bytes.

_ID_MAX, _CARD_MAX, _CHANNEL_MAX, _REASONS = 64, 20, 6, 15
_PHASE_HOLD, _PHASE_POST, _PHASE_VOID = 1, 2, 3
_AMOUNT_MAX, _TIMEOUT_MAX, _OPERATOR_MAX = 10**11, 30 * 86400, 39
_NUMBER_MAX = 9  # bytes of a varint taken here
_SPLIT = 21  # AuthorizeRequest.split (issue 28 item 2): a split tap is the Python path's
_STRINGS, _NUMBERS = frozenset((1, 2, 5, 6, 8, 9)), frozenset((3, 4, 7, 10))
_OPERATOR_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            b"-_.:")


def _varint(p: bytes, i: int, end: int, width: int = 10) -> tuple[int, int]:
    """(value, index after) of the varint at p[i], at most `width` bytes; (0, -1) if none."""
    v = shift = 0
    start = i
    while i < end and i - start < width:
        b = p[i]
        i += 1
        v |= (b & 0x7f) << shift
        if not b & 0x80:
            return v & 0xffffffffffffffff, i
        shift += 7
    return 0, -1


def _skip(p: bytes, i: int, end: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(p, i, end)[1]
    if wire_type in (1, 5):
        size = 8 if wire_type == 1 else 4
        return i + size if i + size <= end else -1
    if wire_type == 2:
        n, i = _varint(p, i, end, 5)
        return -1 if i < 0 or n > end - i else i + n
    return -1


def _printable(s: bytes) -> bool:
    return all(0x20 <= c <= 0x7e for c in s)


def _money_request(p: bytes, i: int, end: int, channels: int, money_channels: int):
    """One AuthorizeRequest in p[i:end] as {field: value}, or None: not plainly valid, or it
    moves no money."""
    f: dict[int, object] = {1: b"", 2: b"", 3: 0, 4: 0, 5: b"", 6: b"", 7: 0, 8: b"", 9: b"",
                            10: 0}
    while i < end:
        key, i = _varint(p, i, end, 5)
        if i < 0 or key > 0xffffffff or key >> 3 == 0:
            return None
        field, wire_type = key >> 3, key & 7
        if field in _STRINGS:
            if wire_type != 2:
                return None
            n, i = _varint(p, i, end, 5)
            if i < 0 or n > end - i or any(c & 0x80 for c in p[i:i + n]):
                return None
            f[field], i = p[i:i + n], i + n
        elif field in (16, 17):  # a journey's tap-in (issue 28): the Python path's
            return None
        elif field in _NUMBERS:
            if wire_type != 0:
                return None
            v, i = _varint(p, i, end, _NUMBER_MAX)
            if i < 0 or v > {3: _CHANNEL_MAX, 4: _AMOUNT_MAX, 7: _PHASE_VOID,
                             10: _TIMEOUT_MAX}[field] or (field == 3 and v < 1):
                return None
            f[field] = v
        elif field == _SPLIT:
            return None
        else:
            i = _skip(p, i, end, wire_type)
            if i < 0:
                return None
    rid, card, channel, amount, term, payee, phase, hold, code, timeout = (
        f[k] for k in range(1, 11))
    if not (0 < len(rid) <= _ID_MAX and _printable(rid)
            and 0 < len(card) <= _CARD_MAX and card.isdigit()
            and channel and channels >> channel & 1 and money_channels >> channel & 1
            and len(term) <= _ID_MAX and _printable(term)
            and len(code) <= _ID_MAX and _printable(code)):
        return None
    if not amount and not phase:
        return None  # moves no money
    if timeout and phase != _PHASE_HOLD:
        return None
    if payee and not (len(payee) <= _OPERATOR_MAX and payee.startswith(b"op:")
                      and len(payee) > 3 and all(c in _OPERATOR_CHARS for c in payee[3:])):
        return None
    if phase in (_PHASE_POST, _PHASE_VOID):
        if not (0 < len(hold) <= _ID_MAX and _printable(hold)):
            return None
        if phase == _PHASE_VOID and amount:
            return None
    elif hold or not amount:
        return None
    return f


def _put_varint(v: int) -> bytes:
    v &= 0xffffffffffffffff
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7f) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _put(field: int, value) -> bytes:
    """One field as protobuf writes it: nothing for a default value."""
    if not value:
        return b""
    if isinstance(value, bytes):
        return bytes((field << 3 | 2,)) + _put_varint(len(value)) + value
    return bytes((field << 3,)) + _put_varint(value)


def _command(index: int, f: dict, prefix: bytes, sha256):
    canonical = b"".join(_put(k, f[k]) for k in range(1, 11))
    return (index, f[1].decode("ascii"), f[2].decode("ascii"), f[3], f[4], f[7],
            f[8].decode("ascii"), f[6].decode("ascii"), f[10],
            sha256(prefix + canonical).digest())


def _entries(p: bytes, end: int) -> int:
    i = count = 0
    while i < end:
        key, i = _varint(p, i, end, 5)
        if i < 0 or key > 0xffffffff or key >> 3 == 0:
            return -1
        if key == 0x0a:
            n, i = _varint(p, i, end, 5)
            if i < 0 or n > end - i:
                return -1
            i += n
            count += 1
        elif key >> 3 == 1:
            return -1
        else:
            i = _skip(p, i, end, key & 7)
            if i < 0:
                return -1
    return count


def money_wire(raw: bytes, batch: bool, channels: int, money_channels: int, batch_max: int,
               prefix: bytes, sha256):
    """See _authorize_c.money_wire."""
    end = len(raw)
    if not batch:
        f = _money_request(raw, 0, end, channels, money_channels)
        return None if f is None else [_command(0, f, prefix, sha256)]
    count = _entries(raw, end)
    if count < 1 or count > batch_max:
        return None
    out = []
    i = 0
    while i < end:
        key, i = _varint(raw, i, end, 5)
        if key == 0x0a:
            n, i = _varint(raw, i, end, 5)
            f = _money_request(raw, i, i + n, channels, money_channels)
            if f is None:
                return None
            out.append(_command(len(out), f, prefix, sha256))
            i += n
        else:
            i = _skip(raw, i, end, key & 7)
    return out


def money_answer(request_id: str, reason: int, available: int) -> bytes:
    """See _authorize_c.money_answer."""
    return (_put(1, request_id.encode("utf-8")) + bytes((0x10, 1 if reason == 0 else 2))
            + _put(3, reason) + _put(4, available))


def _reason(answer: bytes) -> int:
    i, end, reason = 0, len(answer), 0
    while i < end:
        key, i = _varint(answer, i, end, 5)
        if i < 0 or key >> 3 == 0:
            return -1
        if key == 0x18:
            v, i = _varint(answer, i, end)
            if i < 0:
                return -1
            reason = v if v < _REASONS else -1
        else:
            i = _skip(answer, i, end, key & 7)
            if i < 0:
                return -1
    return reason


def money_answers(answers: list, commands: list, tally, batch: bool) -> bytes:
    """See _authorize_c.money_answers."""
    if len(answers) != len(commands):
        raise ValueError("one answer per command")
    for k, (answer, command) in enumerate(zip(answers, commands, strict=True)):
        reason, channel = _reason(answer), command[3]
        if reason < 0 or not 1 <= channel <= _CHANNEL_MAX:
            raise ValueError(f"answer {k} is not an AuthorizeResponse of a known channel")
        tally[channel * _REASONS + reason] += 1
    if not batch:
        return answers[0]
    return b"".join(b"\x0a" + _put_varint(len(a)) + a for a in answers)


def apply_ops(txn, ops: list, by_name: dict, start: int = 0) -> int:
    """Book.apply_journal's loop: put or delete each of ops[start:] (database name, key,
    value or None) in `txn`, in order, up to the first whose database `by_name` does not
    name; its index (the caller takes that op: an archive segment, or a corrupt record), or
    len(ops) when every one is done. Compiled in _authorize_c (a follower's every op)."""
    for i in range(start, len(ops)):
        name, key, value = ops[i]
        db = by_name.get(name)
        if db is None:
            return i
        if value is None:
            txn.delete(key, b"", db)
        else:
            txn.put(key, value, False, True, False, db)
    return len(ops)

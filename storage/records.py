"""Fixed-width, little-endian records with a version byte, for the domain's value types
(yikatong.model). Never pickle or JSON. TIGER_STYLE: every record is checked right before it
is written (`encode` refuses what it cannot write exactly: InvalidRecord) and right after it is
read (`decode` refuses what it does not understand: CorruptRecord).

The card record. The fast path (fastpath/_authorize_c.pyx) reads the first 24 bytes at these
offsets straight from the LMDB value; change the layout here and there together, and bump
VERSION.

    off size field
      0    1 version            (= VERSION)
      1    1 pack               (model.Pack)
      2    1 state              (model.State, as stored; see cards.effective_state)
      3    1 flags              (model.Flag)
      4    1 generation         (SH-30)
      5    1 lock_mask          (bit 1 << Channel: application locked, GZ-6)
      6    2 points             (RC-20 points score)
      8    8 temp_loss_until    (unix s, while TEMP_LOSS: frozen before it, SH-18b)
     16    8 valid_until        (unix s, RC-14: valid before it; 0 = no end)
     ---- the fast path reads nothing below this line
     24    8 holder_id
     32    8 applied_at
     40    8 issued_at
     48    8 loss_reported_at
     56    8 received_at        (GZ-12)
     64   20 replaced_by        (ASCII card number, NUL-padded)
     84   20 replaces
    104   32 service_bank       (UTF-8, NUL-padded)
    136      total
"""
import struct
import threading
import typing

import zstandard

from yikatong import config
from yikatong.errors import CorruptRecord, InvalidRecord
from yikatong.model import (
    ACCOUNT_KEY_BYTES_MAX,
    Account,
    AuditEvent,
    Card,
    Change,
    Changed,
    CreditRecord,
    HolderChange,
    HolderInfo,
    Pack,
    State,
    Step,
    Transfer,
    TransferKind,
    TransferStatus,
)

VERSION = 2  # 2: temp_loss_until (an end instant) for temp_loss_at; received_at
LAYOUT = struct.Struct("<BBBBBBHqqQqqqq20s20s32s")
SIZE = LAYOUT.size
_UNPACK = LAYOUT.unpack
assert SIZE == 136
CARD_NUMBER_BYTES = 20
SERVICE_BANK_BYTES = 32
assert config.card_number_length_max <= CARD_NUMBER_BYTES

# Offsets read in place (the fast path reads its own, kept in step by the differential tests).
OFF_VERSION, OFF_PACK, OFF_STATE, OFF_HOLDER_ID = 0, 1, 2, 24
_PACKS, _STATES = (min(Pack), max(Pack)), (min(State), max(State))


def _pack(layout: struct.Struct, what: str, *values) -> bytes:
    """struct refuses an integer out of its field's range (B, H, q, Q); say which record."""
    try:
        return layout.pack(*values)
    except struct.error as e:
        raise InvalidRecord(f"{what} record: {e}") from None


def _fixed(field: str, text: str, width: int, encoding: str) -> bytes:
    """`text` as exactly what is stored: refused if it does not fit (struct would cut it)."""
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        raise InvalidRecord(f"{field} {text!r} is not {encoding}") from None
    if len(data) > width or b"\0" in data:
        raise InvalidRecord(f"{field} is {len(data)} bytes (or holds NUL); the field holds "
                            f"{width}")
    return data


def _ranged(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRecord(f"{field} {value} is outside {low}..{high}")
    return value


def _text(field: str, raw: bytes, encoding: str) -> str:
    try:
        return raw.rstrip(b"\0").decode(encoding)
    except UnicodeDecodeError as e:
        raise CorruptRecord(f"{field} is undecodable: {e}") from None


# ---------------------------------------------------------------------------- cards

def encode_card(card: Card) -> bytes:
    return _pack(
        LAYOUT, "card", VERSION, _ranged("pack", card.pack, *_PACKS),
        _ranged("state", card.state, *_STATES), card.flags, card.generation, card.lock_mask,
        card.points, card.temp_loss_until, card.valid_until, card.holder_id,
        card.applied_at, card.issued_at, card.loss_reported_at, card.received_at,
        _fixed("replaced_by", card.replaced_by, CARD_NUMBER_BYTES, "ascii"),
        _fixed("replaces", card.replaces, CARD_NUMBER_BYTES, "ascii"),
        _fixed("service_bank", card.service_bank, SERVICE_BANK_BYTES, "utf-8"),
    )


def decode_card(card_number: str, value) -> Card:
    try:
        check(value)
    except CorruptRecord as e:
        raise CorruptRecord(f"card record {card_number}: {e}; not served") from None
    (_, pack, state, flags, generation, lock_mask, points, temp_loss_until, valid_until,
     holder_id, applied_at, issued_at, loss_reported_at, received_at, replaced_by, replaces,
     bank) = _UNPACK(value)
    try:
        texts = (replaced_by.rstrip(b"\0").decode("ascii"),
                 replaces.rstrip(b"\0").decode("ascii"), bank.rstrip(b"\0").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptRecord(f"card record {card_number} has an undecodable field: {e}; not "
                            "served") from None
    return Card(card_number, pack, state, flags, generation, lock_mask, points, temp_loss_until,
                valid_until, holder_id, applied_at, issued_at, loss_reported_at, received_at,
                *texts)


class HotCard(typing.NamedTuple):
    """The first 24 bytes of a card record: all the decision table reads."""

    version: int
    pack: int
    state: int
    flags: int
    generation: int
    lock_mask: int
    points: int
    temp_loss_until: int
    valid_until: int


HOT = struct.Struct("<BBBBBBHqq")
assert HOT.size == 24


def hot(value) -> HotCard:
    """The hot header of a stored card record; CorruptRecord unless `check` passes."""
    check(value)
    return HotCard._make(HOT.unpack_from(value))


def check(value) -> None:
    """Raise CorruptRecord unless `value` has this layout's size, version and enum ranges."""
    if len(value) != SIZE:
        raise CorruptRecord(f"card record is {len(value)} bytes, expected {SIZE}")
    if value[OFF_VERSION] != VERSION:
        raise CorruptRecord(f"card record version {value[OFF_VERSION]}, expected {VERSION}")
    if (not _PACKS[0] <= value[OFF_PACK] <= _PACKS[1]
            or not _STATES[0] <= value[OFF_STATE] <= _STATES[1]):
        raise CorruptRecord("card record has an unknown pack or state")


def holder_id_of(value) -> int | None:
    """The holder of a stored card record, None if there is none or it is not a valid one."""
    if value is None:
        return None
    try:
        check(value)
    except CorruptRecord:
        return None
    return struct.unpack_from("<Q", value, OFF_HOLDER_ID)[0]


# ---------------------------------------------------------------------------- holders

def encode_holder(holder_id: int, info: HolderInfo,
                  seal: typing.Callable[[bytes], bytes]) -> bytes:
    """u64 holder id (big-endian) + the PII as a yikatong.v1.Holder message, sealed (store
    format 4: storage/pii.py; the record's key is the HMAC of the identity number)."""
    from yikatong.v1 import yikatong_pb2 as pb

    return _U64.pack(holder_id) + seal(
        pb.Holder(**vars(info)).SerializeToString(deterministic=True))


def decode_holder(ssn: str | None, value, unseal: typing.Callable[[bytes], bytes]
                  ) -> tuple[int, HolderInfo]:
    """`ssn`: the identity number looked up (None: reached by holder id), which the record
    must hold."""
    from google.protobuf.message import DecodeError

    from yikatong.v1 import yikatong_pb2 as pb

    value = bytes(value)
    if len(value) < 8:
        raise CorruptRecord(f"holder record of {len(value)} bytes")
    try:
        message = pb.Holder.FromString(unseal(value[8:]))
    except DecodeError as e:
        raise CorruptRecord(f"holder record {_U64.unpack_from(value)[0]}: {e}") from None
    if ssn is not None and message.ssn != ssn:
        raise CorruptRecord(f"holder record {_U64.unpack_from(value)[0]} does not belong to "
                            "its key")
    fields = {f: getattr(message, f) for f in HolderInfo.__dataclass_fields__}
    return _U64.unpack_from(value)[0], HolderInfo(**fields)


# ---------------------------------------------------------------------------- money

# Accounts: key = model.holder_account_key / operator_account_key.
# Value: version, then pending and posted sums in integer fen (TigerBeetle's four balances).
# version, debits_pending, debits_posted, credits_pending, credits_posted
ACCOUNT = struct.Struct("<Bqqqq")
_ACCOUNT_PACK = ACCOUNT.pack
_U64 = struct.Struct(">Q")


def encode_account(a: Account) -> bytes:
    try:
        return _ACCOUNT_PACK(VERSION, a.debits_pending, a.debits_posted, a.credits_pending,
                             a.credits_posted)
    except struct.error as e:  # beyond int64: struct refuses it
        raise InvalidRecord(f"account record: {e}") from None


def decode_account(value) -> Account:
    if len(value) != ACCOUNT.size or value[0] != VERSION:
        raise CorruptRecord(f"account record of {len(value)} bytes / version {value[0:1]!r}")
    return Account(*ACCOUNT.unpack(value)[1:])


# Transfers (written by fastpath Fares too, the narrow layout with a decision: a change here
# is a change there, tests/test_fares.py): key = transfer id (UTF-8). Store format 6
# (TRANSFER_VERSION 3): a fixed head,
# then what is set, as long as it is (no padding; no fingerprint: the request's fingerprint is
# kept once, with its remembered answer):
#   version, kind | status << 4, channel | role << 3, `has` (bit 0: timeout_at follows, bit
#   1: resolved follows, bit 2: the decision follows, bit 3: wide), amount created_at (u32
#   each; i64 when wide: either does not fit a u32), u8 len(debit), u8 len(credit) (14 bytes;
#   wide: 22);
#   then timeout_at (i64) if set, resolved (i64) if set, the card decision that made it
#   (`encode_decision`: Authorize's debits and holds, issue 28 item 4) if recorded, debit,
#   credit, ref_id (UTF-8: the rest). A plain debit (no timeout, nothing resolved, no
#   reference): 14 + its decision + its two keys.
# Format 5 and before (version 2, 213 bytes; still read: archive segments keep them):
#   version kind status channel role amount created_at timeout_at resolved debit(40)
#   credit(40) ref_id(64) fingerprint(32), NUL-padded
TRANSFER_VERSION = 3  # fastpath Fares writes it too (tests/test_fares.py)
TRANSFER = struct.Struct("<BBBBqqBB")  # wide
_TRANSFER_PACK = TRANSFER.pack
TRANSFER_NARROW = struct.Struct("<BBBBIIBB")
_NARROW_PACK = TRANSFER_NARROW.pack
_I64 = struct.Struct("<q")
_HAS_TIMEOUT, _HAS_RESOLVED, _HAS_DECISION, _WIDE = 1, 2, 4, 8
_HAS = _HAS_TIMEOUT | _HAS_RESOLVED | _HAS_DECISION | _WIDE
TRANSFER_2 = struct.Struct("<BBBBBqqqq40s40s64s32s")
_KINDS = (min(TransferKind), max(TransferKind))
_STATUSES = (min(TransferStatus), max(TransferStatus))
_NO_FP = bytes(32)


def encode_transfer(t: Transfer) -> bytes:
    # one combined test on the way to disk; the detail only when it fails
    if not (_KINDS[0] <= t.kind <= _KINDS[1] and _STATUSES[0] <= t.status <= _STATUSES[1]
            and 0 <= t.amount <= config.amount_fen_max
            and 0 <= t.resolved <= config.amount_fen_max
            and 0 < len(t.debit) <= ACCOUNT_KEY_BYTES_MAX and not t.debit.endswith(b"\0")
            and 0 < len(t.credit) <= ACCOUNT_KEY_BYTES_MAX and not t.credit.endswith(b"\0")
            and len(t.decided) <= DECISION_BYTES_MAX and 0 <= t.channel <= 7
            and 0 <= t.role <= 31):
        raise InvalidRecord(f"transfer record out of its layout: kind {t.kind}, status "
                            f"{t.status}, channel {t.channel}, role {t.role}, amount "
                            f"{t.amount}, resolved {t.resolved}, account "
                            f"keys {len(t.debit)} and {len(t.credit)} bytes (at most "
                            f"{ACCOUNT_KEY_BYTES_MAX})")
    ref = _fixed("ref_id", t.ref_id, config.request_id_bytes_max, "utf-8") if t.ref_id else b""
    try:
        has = ((_HAS_TIMEOUT if t.timeout_at else 0) | (_HAS_RESOLVED if t.resolved else 0)
               | (_HAS_DECISION if t.decided else 0))
        if t.amount <= 0xffffffff and 0 <= t.created_at <= 0xffffffff:
            head = _NARROW_PACK(TRANSFER_VERSION, t.kind | t.status << 4,
                                t.channel | t.role << 3, has, t.amount, t.created_at,
                                len(t.debit), len(t.credit))
        else:
            head = _TRANSFER_PACK(TRANSFER_VERSION, t.kind | t.status << 4,
                                  t.channel | t.role << 3, has | _WIDE, t.amount,
                                  t.created_at, len(t.debit), len(t.credit))
        if has:
            head += ((_I64.pack(t.timeout_at) if t.timeout_at else b"")
                     + (_I64.pack(t.resolved) if t.resolved else b"") + t.decided)
    except struct.error as e:
        raise InvalidRecord(f"transfer record: {e}") from None
    return head + t.debit + t.credit + ref


def decode_transfer(value) -> Transfer:
    """A transfer record of format 6 (version 3) or before (version 2: its fingerprint too)."""
    n = len(value)
    if n >= TRANSFER_NARROW.size and value[0] == TRANSFER_VERSION:
        layout = TRANSFER if value[3] & _WIDE else TRANSFER_NARROW
        if n < layout.size:
            raise CorruptRecord(f"transfer record of {n} bytes")
        (_, ks, cr, has, amount, created_at, nd, nc) = layout.unpack_from(value)
        kind, status, channel, role = ks & 15, ks >> 4, cr & 7, cr >> 3
        at, timeout_at, resolved, decided = layout.size, 0, 0, b""
        if has & ~_HAS:
            raise CorruptRecord(f"transfer record says it has {has}")
        at += 8 * ((has & _HAS_TIMEOUT) + (has >> 1 & 1))
        if has & _HAS_DECISION:
            end = at + decision_size(value, at)
            decided, at = bytes(value[at:end]), end
        if not (0 < nd <= ACCOUNT_KEY_BYTES_MAX and 0 < nc <= ACCOUNT_KEY_BYTES_MAX
                and at + nd + nc <= n <= at + nd + nc + config.request_id_bytes_max):
            raise CorruptRecord(f"transfer record of {n} bytes with account keys of {nd} and "
                                f"{nc}")
        value = bytes(value)
        if has & _HAS_TIMEOUT:
            (timeout_at,) = _I64.unpack_from(value, layout.size)
        if has & _HAS_RESOLVED:
            (resolved,) = _I64.unpack_from(value, layout.size + 8 * (has & _HAS_TIMEOUT))
        debit, credit = value[at:at + nd], value[at + nd:at + nd + nc]
        ref_id, fingerprint = _text("ref_id", value[at + nd + nc:], "utf-8"), _NO_FP
    elif n == TRANSFER_2.size and value[0] == 2:
        (_, kind, status, channel, role, amount, created_at, timeout_at, resolved, debit,
         credit, ref, fingerprint) = TRANSFER_2.unpack(value)
        debit, credit = debit.rstrip(b"\0"), credit.rstrip(b"\0")
        ref_id, decided = _text("ref_id", ref, "utf-8"), b""
    else:
        raise CorruptRecord(f"transfer record of {n} bytes / version {bytes(value[0:1])!r}")
    if not (_KINDS[0] <= kind <= _KINDS[1] and _STATUSES[0] <= status <= _STATUSES[1]):
        raise CorruptRecord(f"transfer record has kind {kind} / status {status}")
    return Transfer(kind, status, amount, debit, credit, ref_id, fingerprint, created_at,
                    timeout_at, resolved, channel, role, decided)


# The card decision a transfer was made on (issue 28 item 4: `yikatong explain`), recorded by
# Authorize's debits and holds (yikatong.authorize) inside the transfer record, compactly:
# only what the decision table (fastpath decide) and with_money read for a channel that
# moves money (TRANSIT, MEDICAL, BENEFIT: never the points, never a bank loss's end):
#   split << 7 | rule pack (fastpath RULE_PACK when decided, 1 to 127; split: a split tap's
#   leg), other << 7 | pack << 4 | state (other: the holder's other cards were asked,
#   cards.account_stopped, and none stopped the account), flags, generation, lock_mask,
#   then the fen available in the debited account before it (a varint), then
#   temp_loss_until (i64) only when the state is TEMP_LOSS, valid_until (i64) only for a
#   Residence Card. The time is the transfer's created_at. A plain debit's: 6 to 8 bytes.
DECISION = struct.Struct("<BBBBB")
DECISION_BYTES_MAX = DECISION.size + 10 + 16
ASKED_OTHER_CARDS, ASKED_SPLIT = 1, 2  # Decision.asked
RULE_PACK_MAX = 127
_TEMP_LOSS, _RC = int(State.TEMP_LOSS), int(Pack.RC)


class Decision(typing.NamedTuple):
    rule_pack: int
    card: HotCard  # the hot header as decided on (points: 0, not read when money moves)
    available: int  # fen available in the debited account before the debit
    asked: int  # ASKED_* bits


def encode_decision(rule_pack: int, record, available: int, asked: int) -> bytes:
    """The decision's record from the card record's bytes it was decided on (checked by the
    decision: `hot`), the fen available before and the ASKED_* bits. Once per debit: up to
    20,971 yuan available (three varint bytes) without a loop. fastpath Fares writes it too
    for a plain fare (tests/test_fares.py): a change here is a change there."""
    if not 0 < rule_pack <= RULE_PACK_MAX:
        raise InvalidRecord(f"rule pack {rule_pack}")
    state, pack, v = record[2], record[1], available
    out = [rule_pack | (asked & ASKED_SPLIT) << 6,
           state | pack << 4 | (asked & ASKED_OTHER_CARDS) << 7, record[3], record[4], record[5]]
    if 0 <= v < 0x80:
        out.append(v)
    elif 0 <= v < 0x4000:
        out += (v & 0x7f | 0x80, v >> 7)
    elif 0 <= v < 0x200000:
        out += (v & 0x7f | 0x80, v >> 7 & 0x7f | 0x80, v >> 14)
    else:
        if v < 0:
            raise InvalidRecord(f"decision on {available} fen available")
        while v >= 0x80:
            out.append(v & 0x7f | 0x80)
            v >>= 7
        out.append(v)
    b = bytes(out)
    if state == _TEMP_LOSS:
        b += record[8:16]
    if pack == _RC:
        b += record[16:24]
    return b


def decision_size(value, at: int) -> int:
    """The bytes of the decision recorded at value[at:] (CorruptRecord if it is cut)."""
    i, end = at + DECISION.size, len(value)
    if i > end:
        raise CorruptRecord("transfer record's decision is cut")
    while i < end and i - at - DECISION.size < 10 and value[i] & 0x80:
        i += 1
    i += 1
    if i - at - DECISION.size > 10:
        raise CorruptRecord("transfer record's decision has an overlong number")
    state, pack = value[at + 1] & 0x0f, value[at + 1] >> 4 & 7
    i += 8 * ((state == _TEMP_LOSS) + (pack == _RC))
    if i > end:
        raise CorruptRecord("transfer record's decision is cut")
    return i - at


def decode_decision(raw: bytes) -> Decision:
    """A recorded decision (`encode_decision`); CorruptRecord if it is not one."""
    if len(raw) < DECISION.size + 1 or decision_size(raw, 0) != len(raw):
        raise CorruptRecord(f"a recorded decision of {len(raw)} bytes")
    rp, ps, flags, generation, lock_mask = DECISION.unpack_from(raw)
    rule_pack, state, pack = rp & RULE_PACK_MAX, ps & 0x0f, ps >> 4 & 7
    asked = (ASKED_SPLIT if rp & 0x80 else 0) | (ASKED_OTHER_CARDS if ps & 0x80 else 0)
    if not (_PACKS[0] <= pack <= _PACKS[1] and _STATES[0] <= state <= _STATES[1]) \
            or not rule_pack:
        raise CorruptRecord(f"a recorded decision of pack {pack}, state {state}, rule pack "
                            f"{rule_pack}")
    i = DECISION.size
    available = shift = 0
    while True:
        b = raw[i]
        i += 1
        available |= (b & 0x7f) << shift
        shift += 7
        if not b & 0x80:
            break
    temp_loss_until = valid_until = 0
    if state == _TEMP_LOSS:
        (temp_loss_until,) = _I64.unpack_from(raw, i)
        i += 8
    if pack == _RC:
        (valid_until,) = _I64.unpack_from(raw, i)
    return Decision(rule_pack, HotCard(VERSION, pack, state, flags, generation, lock_mask, 0,
                                       temp_loss_until, valid_until), available, asked)


def hot_record(card: HotCard) -> bytes:
    """A card record whose hot header is `card` (the rest zero): what the decision table
    reads, to decide again on a recorded decision."""
    return HOT.pack(*card) + bytes(SIZE - HOT.size)


# ---------------------------------------------------------------------------- remembered answers

# Store format 6: a request id's first answer in `answers`, keyed by a u64 BE sequence handed
# out in order (appended: full pages; the archive takes the oldest first, so no time index),
# found through `requests` (request id -> that u64 BE sequence):
#   version (= ANSWER_VERSION), time (i64, the server's clock), u8 len(request id),
#   fingerprint (its first 16 bytes), then the request id (UTF-8) and the answer (the rest)
# Format 5 (still in archive segments written by it): `requests` held, per request id, the
# whole fingerprint (32 bytes), the i64 time and the answer.
ANSWER_VERSION = 1  # fastpath Fares writes it too (tests/test_fares.py)
ANSWER = struct.Struct("<BqB16s")
ANSWER_FINGERPRINT_BYTES = 16


def encode_answer(request_id: bytes, fingerprint: bytes, time: int, answer: bytes) -> bytes:
    if not 0 < len(request_id) <= config.request_id_bytes_max or len(fingerprint) < 16:
        raise InvalidRecord(f"remembered answer of a request id of {len(request_id)} bytes")
    return _pack(ANSWER, "remembered answer", ANSWER_VERSION, time, len(request_id),
                 fingerprint[:ANSWER_FINGERPRINT_BYTES]) + request_id + answer


def decode_answer(value) -> tuple[bytes, bytes, int, bytes]:
    """(request id, fingerprint's first 16 bytes, time, answer) of a remembered answer."""
    value = bytes(value)
    if len(value) < ANSWER.size or value[0] != ANSWER_VERSION:
        raise CorruptRecord(f"remembered answer of {len(value)} bytes / version "
                            f"{value[0:1]!r}")
    _, time, n, fingerprint = ANSWER.unpack_from(value)
    if n == 0 or ANSWER.size + n > len(value):
        raise CorruptRecord(f"remembered answer of {len(value)} bytes with an id of {n}")
    return value[ANSWER.size:ANSWER.size + n], fingerprint, time, value[ANSWER.size + n:]


# ---------------------------------------------------------------------------- change log

# (Written by fastpath Fares too: tests/test_fares.py.)
# Store format 6 (CHANGE_VERSION 3): version kind state flags lock_mask what time holder_id
# amount, u8 len(card_number) (31 bytes); then the card number (ASCII) and the transfer id
# (UTF-8: the rest), each as long as it is. Version 2 (format 5 and before; archive segments
# keep them): the same fields with the card number NUL-padded to 20 and the transfer id to 64.
CHANGE_VERSION = 3  # fastpath Fares writes it too (tests/test_fares.py)
CHANGE = struct.Struct("<BBBBBBqQqB")
_CHANGE_PACK = CHANGE.pack
_CHANGE_V2 = struct.Struct("<BBBBBBqQq20s64s")
_CHANGE_V1 = struct.Struct("<BBBBBqQq20s64s")  # before `what`: read as "everything changed"


def encode_change(kind: int, time: int, card_number: str, holder_id: int, state: int = 0,
                  flags: int = 0, lock_mask: int = 0, transfer_id: str = "",
                  amount: int = 0, what: int = 0) -> bytes:
    """A model.Change's fields, encoded (no object is made: one is written per movement)."""
    try:
        card, tid = card_number.encode("ascii"), transfer_id.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRecord(f"change record: {e}") from None
    # (ids with NUL never pass the edge; a width that would be cut is what struct hides)
    if not (1 <= kind <= 2 and 0 <= state <= _STATES[1] and len(card) <= CARD_NUMBER_BYTES
            and len(tid) <= config.request_id_bytes_max):
        raise InvalidRecord(f"change record of kind {kind}, state {state}, card number "
                            f"{len(card)} bytes, transfer id {len(tid)} bytes")
    try:
        return _CHANGE_PACK(CHANGE_VERSION, kind, state, flags, lock_mask, what, time,
                            holder_id, amount, len(card)) + card + tid
    except struct.error as e:
        raise InvalidRecord(f"change record: {e}") from None


def decode_change(value) -> Change:
    n = len(value)
    if n >= CHANGE.size and value[0] == CHANGE_VERSION:
        (_, kind, state, flags, lock_mask, what, time, holder_id, amount, nc) = \
            CHANGE.unpack_from(value)
        at = CHANGE.size
        if not (nc <= CARD_NUMBER_BYTES
                and at + nc <= n <= at + nc + config.request_id_bytes_max):
            raise CorruptRecord(f"change record of {n} bytes with a card number of {nc}")
        value = bytes(value)
        card, transfer_id = value[at:at + nc], value[at + nc:]
    elif n == _CHANGE_V2.size and value[0] == 2:
        (_, kind, state, flags, lock_mask, what, time, holder_id, amount, card, transfer_id) = \
            _CHANGE_V2.unpack(value)
    elif n == _CHANGE_V1.size and value[0] == 1:
        (_, kind, state, flags, lock_mask, time, holder_id, amount, card, transfer_id) = \
            _CHANGE_V1.unpack(value)
        what = int(Changed.BALANCE) if kind == 2 else int(~Changed.BALANCE & _CHANGED_ALL)
    else:
        raise CorruptRecord(f"change record of {n} bytes / version {bytes(value[0:1])!r}")
    return Change(kind, time, _text("card_number", card, "ascii"), holder_id, state, flags,
                  lock_mask, _text("transfer_id", transfer_id, "utf-8"), amount, what)


_CHANGED_ALL = sum(Changed)


# ---------------------------------------------------------------------------- audit trail

# Version 1 (store formats 2 to 5): version algorithm prev_hash hash, then the body the hash
# covers (with prev_hash): sequence time count, then each text as u16 length + UTF-8.
_AUDIT_HEAD = struct.Struct("<BB32s32s")
_AUDIT_BODY = struct.Struct("<QqI")
_U16 = struct.Struct("<H")
AUDIT_VERSION = 2  # store format 6; version 1 (format 2 to 5) is still read
# (version 2 is written by fastpath Fares too: tests/test_fares.py)
AUDIT_TEXTS = ("client_id", "role", "method", "card_number", "purpose", "outcome", "holder")
# each event's hash; SM3 (GB/T 32905) where this OpenSSL has it
AUDIT_ALGORITHMS = {1: "sm3", 2: "sha256"}


def _pack_texts(head: bytes, texts) -> bytes:
    out = [head]
    for text in texts:
        raw = text.encode("utf-8")
        if len(raw) > 4096:
            raise InvalidRecord(f"a text of {len(raw)} bytes in a record of texts")
        out.append(_U16.pack(len(raw)))
        out.append(raw)
    return b"".join(out)


def _unpack_texts(body: bytes, at: int, fields: tuple[str, ...], what: str) -> list[str]:
    texts = []
    for field in fields:
        if at + 2 > len(body):
            raise CorruptRecord(f"{what}: {field} is cut")
        (n,) = _U16.unpack_from(body, at)
        if at + 2 + n > len(body):
            raise CorruptRecord(f"{what}: {field} is cut")
        texts.append(_text(field, body[at + 2:at + 2 + n], "utf-8"))
        at += 2 + n
    if at != len(body):
        raise CorruptRecord(f"{what}: {len(body) - at} bytes too many")
    return texts


def audit_body(sequence: int, time: int, count: int, *texts: str) -> bytes:
    """What an audit event's hash covers, beside prev_hash: its fields, canonically."""
    return _pack_texts(_AUDIT_BODY.pack(sequence, time, count), texts)


# Store format 6 (AUDIT_VERSION 2): what an event must say and no more. Its hash is the same
# as version 1's, over the previous event's hash and the canonical body above (`audit_body`),
# so old and new events are one chain; stored are:
#   version algorithm hash (34 bytes), sequence time count (20), then the texts in
#   AUDIT_TEXTS' order, each as a short length (u8; 255: a u16 LE follows) + UTF-8, but
#   role and method: a code byte (1 + the index in AUDIT_ROLES / AUDIT_METHODS, tables that
#   only ever grow at their end), 0 for a name not in the table, followed by it as text.
# The previous event's hash is not stored: it is the event before's `hash` (the reader of a
# chain carries it: `decode_audit(value, prev_hash)`).
AUDIT_ROLES = ("TRANSIT_GATE", "MEDICAL_TERMINAL", "BENEFIT_COUNTER", "BANK_SWITCH",
               "COMMUNITY_OUTLET", "BANK_OUTLET", "ONLINE_PLATFORM", "SERVICE_HOTLINE",
               "CARD_AGENCY", "PUBLIC_SECURITY", "HRSS", "AUDITOR", "ADMIN")
AUDIT_METHODS = (
    "Authorization.Authorize", "Authorization.AuthorizeBatch", "Authorization.AuthorizeStream",
    "CardStatus.GetStatus", "CardStatus.GetStatusBatch", "CardStatus.WatchChanges",
    "Lifecycle.Apply", "Lifecycle.Verify", "Lifecycle.Issue", "Lifecycle.Activate",
    "Lifecycle.OpenFinancial", "Lifecycle.ReportTemporaryLoss", "Lifecycle.ReportLoss",
    "Lifecycle.CancelLoss", "Lifecycle.ReportBankLoss", "Lifecycle.CancelBankLoss",
    "Lifecycle.Replace", "Lifecycle.Cancel", "Lifecycle.LockApplication",
    "Lifecycle.UnlockApplication", "Lifecycle.GetCard", "Lifecycle.IssueElectronic",
    "Ledger.Transfer", "Ledger.Reverse", "Ledger.GetBalances", "ResidenceCard.Renew",
    "ResidenceCard.StateSpecialCircumstances", "ResidenceCard.ChangeInformation",
    "ResidenceCard.ApplyPoints", "ResidenceCard.DecidePoints", "ResidenceCard.GetPoints",
    "Deadlines.ListDue", "Holders.GetHolder", "Holders.CorrectHolder", "Holders.RecordCredit",
    "Audit.Export", "Audit.Verify", "Admin.AdvanceClock", "Admin.SetClock")
_AUDIT_CODES = ({name: i + 1 for i, name in enumerate(AUDIT_ROLES)},
                {name: i + 1 for i, name in enumerate(AUDIT_METHODS)})
assert len(AUDIT_ROLES) < 255 and len(AUDIT_METHODS) < 255
_AUDIT_HEAD_2 = struct.Struct("<BB32s")
_AUDIT_CODED = {1: 0, 2: 1}  # text index in AUDIT_TEXTS -> its table (role, method)


_SHORT = tuple(bytes((n,)) for n in range(255))  # a text's one-byte length


def audit_forms(sequence: int, time: int, count: int, texts) -> tuple[bytes, bytes]:
    """(the canonical body the hash covers: `audit_body`, the stored event's tail after its
    head) of one event, each text encoded once (the writer's path: one per debit)."""
    head = _pack(_AUDIT_BODY, "audit", sequence, time, count)
    canonical, stored = [head], [head]
    for i, text in enumerate(texts):
        c, s = audit_text(i, text)
        canonical.append(c)
        stored.append(s)
    return b"".join(canonical), b"".join(stored)


def audit_text(i: int, text: str) -> tuple[bytes, bytes]:
    """Text `i` of an event (AUDIT_TEXTS' order) as the canonical body and the stored event
    hold it: its length (u16) and UTF-8 bytes; stored, its length in one byte (255 and a u16
    beyond), and the role and method as a code where the table has one (0 and the text
    where it has not)."""
    raw = text.encode("utf-8")
    n = len(raw)
    if n > 4096:
        raise InvalidRecord(f"a text of {n} bytes in an audit event")
    stored = _SHORT[n] + raw if n < 255 else b"\xff" + _U16.pack(n) + raw
    if i == 1 or i == 2:  # role, method: a code where the table has it
        code = _AUDIT_CODES[i - 1].get(text, 0)
        stored = _SHORT[code] if code else _SHORT[0] + stored
    return _U16.pack(n) + raw, stored


def encode_audit_event(algorithm: int, hash_: bytes, sequence: int, time: int, count: int,
                       texts) -> bytes:
    """The stored form of an event (AUDIT_VERSION 2) whose hash is `hash_`."""
    return (_AUDIT_HEAD_2.pack(AUDIT_VERSION, algorithm, hash_)
            + audit_forms(sequence, time, count, texts)[1])


def stored_audit(algorithm: int, hash_: bytes, tail: bytes) -> bytes:
    """A stored event from its head's fields and `audit_forms`' tail."""
    return _AUDIT_HEAD_2.pack(AUDIT_VERSION, algorithm, hash_) + tail


def encode_audit(algorithm: int, prev_hash: bytes, hash_: bytes, body: bytes) -> bytes:
    """An event from its canonical body (`audit_body`): stored as version 2 (the previous
    hash is implied by the chain)."""
    sequence, time, count = _AUDIT_BODY.unpack_from(body)
    texts = _unpack_texts(body, _AUDIT_BODY.size, AUDIT_TEXTS, f"audit event {sequence}")
    return encode_audit_event(algorithm, hash_, sequence, time, count, texts)


def _audit_2(value: bytes) -> tuple[int, bytes, int, int, int, list[str]]:
    """(algorithm, hash, sequence, time, count, texts) of a version-2 event."""
    _, algorithm, hash_ = _AUDIT_HEAD_2.unpack_from(value)
    at = _AUDIT_HEAD_2.size
    sequence, time, count = _AUDIT_BODY.unpack_from(value, at)
    at += _AUDIT_BODY.size
    what, texts = f"audit event {sequence}", []
    for i, field in enumerate(AUDIT_TEXTS):
        table = _AUDIT_CODED.get(i)
        if table is not None:
            if at >= len(value):
                raise CorruptRecord(f"{what}: {field} is cut")
            code = value[at]
            at += 1
            if code:
                names = AUDIT_METHODS if table else AUDIT_ROLES
                if code > len(names):
                    raise CorruptRecord(f"{what}: {field} code {code} is unknown")
                texts.append(names[code - 1])
                continue
        if at >= len(value):
            raise CorruptRecord(f"{what}: {field} is cut")
        n, at = value[at], at + 1
        if n == 255:
            if at + 2 > len(value):
                raise CorruptRecord(f"{what}: {field} is cut")
            (n,), at = _U16.unpack_from(value, at), at + 2
        if at + n > len(value):
            raise CorruptRecord(f"{what}: {field} is cut")
        texts.append(_text(field, value[at:at + n], "utf-8"))
        at += n
    if at != len(value):
        raise CorruptRecord(f"{what}: {len(value) - at} bytes too many")
    return algorithm, hash_, sequence, time, count, texts


def split_audit(value, prev_hash: bytes | None = None) -> tuple[int, bytes, bytes, bytes]:
    """(algorithm, prev_hash, hash, canonical body) of a stored audit event: what its hash
    covers. Version 1 keeps its prev_hash; version 2 is given it (`prev_hash`: the event
    before's hash, as the reader of the chain has it; None: 32 zero bytes)."""
    value = bytes(value)
    if len(value) >= _AUDIT_HEAD_2.size + _AUDIT_BODY.size and value[0] == AUDIT_VERSION \
            and value[1] in AUDIT_ALGORITHMS:
        algorithm, hash_, sequence, time, count, texts = _audit_2(value)
        return (algorithm, bytes(32) if prev_hash is None else prev_hash, hash_,
                audit_body(sequence, time, count, *texts))
    if len(value) < _AUDIT_HEAD.size + _AUDIT_BODY.size or value[0] != 1 \
            or value[1] not in AUDIT_ALGORITHMS:
        raise CorruptRecord(f"audit event of {len(value)} bytes")
    _, algorithm, stored_prev, hash_ = _AUDIT_HEAD.unpack_from(value)
    return algorithm, stored_prev, hash_, value[_AUDIT_HEAD.size:]


def audit_hash_of(value) -> bytes:
    """The hash of a stored audit event (either version), without decoding it."""
    if len(value) < 34 or value[0] not in (1, AUDIT_VERSION):
        raise CorruptRecord(f"audit event of {len(value)} bytes")
    return bytes(value[34:66]) if value[0] == 1 else bytes(value[2:34])


def decode_audit(value, prev_hash: bytes | None = None) -> AuditEvent:
    """An audit event; `prev_hash` as split_audit (a version-1 event says its own)."""
    value = bytes(value)
    if value[:1] == bytes((AUDIT_VERSION,)) and len(value) >= _AUDIT_HEAD_2.size \
            + _AUDIT_BODY.size and value[1] in AUDIT_ALGORITHMS:
        algorithm, hash_, sequence, time, count, texts = _audit_2(value)
        prev = bytes(32) if prev_hash is None else prev_hash
    else:
        algorithm, prev, hash_, body = split_audit(value)
        sequence, time, count = _AUDIT_BODY.unpack_from(body)
        texts = _unpack_texts(body, _AUDIT_BODY.size, AUDIT_TEXTS, f"audit event {sequence}")
    client_id, role, method, card_number, purpose, outcome, holder = texts
    return AuditEvent(sequence, time, client_id, role, method, card_number=card_number,
                      purpose=purpose, outcome=outcome, count=count, holder=holder,
                      algorithm=AUDIT_ALGORITHMS[algorithm], prev_hash=prev, hash=hash_)


def audit_chain(values, prev_hash: bytes = bytes(32)):
    """The events of stored values in sequence order, each with its prev_hash (the one before's
    hash; `prev_hash`: the hash of the event before the first)."""
    for value in values:
        event = decode_audit(value, prev_hash)
        prev_hash = event.hash
        yield event


# ---------------------------------------------------------------------------- holder history

# GZ-20: an earlier value of a holder's field. version time, then the texts.
_HISTORY_HEAD = struct.Struct("<Bq")
_HISTORY_TEXTS = ("field", "old_value", "new_value", "client_id", "method", "reason")


def encode_holder_change(change: HolderChange) -> bytes:
    return _pack_texts(_HISTORY_HEAD.pack(1, change.time),
                       (getattr(change, f) for f in _HISTORY_TEXTS))


def decode_holder_change(value) -> HolderChange:
    value = bytes(value)
    if len(value) < _HISTORY_HEAD.size or value[0] != 1:
        raise CorruptRecord(f"holder history record of {len(value)} bytes")
    _, time = _HISTORY_HEAD.unpack_from(value)
    texts = _unpack_texts(value, _HISTORY_HEAD.size, _HISTORY_TEXTS, "holder history record")
    return HolderChange(time, *texts)


def encode_points(record) -> bytes:
    """A holder's points (yikatong.v1.PointsRecord), version byte + the message."""
    return b"\x01" + record.SerializeToString(deterministic=True)


def decode_points(value):
    from google.protobuf.message import DecodeError

    from yikatong.v1 import yikatong_pb2 as pb

    value = bytes(value)
    if not value or value[0] != 1:
        raise CorruptRecord(f"points record of {len(value)} bytes")
    try:
        return pb.PointsRecord.FromString(value[1:])
    except DecodeError as e:
        raise CorruptRecord(f"points record: {e}") from None


# ---------------------------------------------------------------------------- open steps

# A card's open steps: version, then per step: step, rule, due_at, kind, start, n, provisional.
# Version 2 (store format 3) keeps how each end was counted, so that a provisional one is
# counted again when its year's notice is installed; the steps of format 2 had no version
# byte, 34 bytes a step (step, rule, due_at, and the missing calendar year if due_at was 0).
STEPS_VERSION = 2
_STEP = struct.Struct("<16s8sqBqHB")


def encode_steps(steps: list[Step]) -> bytes:
    try:
        return bytes((STEPS_VERSION,)) + b"".join(
            _STEP.pack(_fixed("step", s.step, 16, "ascii"), _fixed("rule", s.rule, 8, "ascii"),
                       s.due_at, s.kind, s.start, s.n, s.provisional) for s in steps)
    except struct.error as e:
        raise InvalidRecord(f"steps record: {e}") from None


def decode_steps(value) -> list[Step]:
    value = bytes(value)
    if not value or value[0] != STEPS_VERSION or (len(value) - 1) % _STEP.size:
        raise CorruptRecord(f"steps record of {len(value)} bytes / version {value[0:1]!r}")
    return [Step(_text("step", step, "ascii"), _text("rule", rule, "ascii"), due, kind, start,
                 n, bool(provisional))
            for step, rule, due, kind, start, n, provisional in _STEP.iter_unpack(value[1:])]


# ---------------------------------------------------------------------------- credit records

# version, ground, serious, time, points_barred_until; version 2 adds fine_fen
_CREDIT_HEAD = struct.Struct("<BBBqq")
_CREDIT_FINE = struct.Struct("<q")
_CREDIT_TEXTS = ("rule", "evidence_ref", "client_id")


def encode_credit(r: CreditRecord) -> bytes:
    head = _pack(_CREDIT_HEAD, "credit", 2, r.ground, r.serious, r.time, r.points_barred_until)
    return _pack_texts(head + _pack(_CREDIT_FINE, "credit", r.fine_fen),
                       (r.rule, r.evidence_ref, r.client_id))


def decode_credit(value) -> CreditRecord:
    value = bytes(value)
    if len(value) < _CREDIT_HEAD.size or value[0] not in (1, 2):
        raise CorruptRecord(f"credit record of {len(value)} bytes")
    version, ground, serious, time, barred = _CREDIT_HEAD.unpack_from(value)
    at, fine = _CREDIT_HEAD.size, 0
    if version == 2:
        if len(value) < at + _CREDIT_FINE.size:
            raise CorruptRecord(f"credit record of {len(value)} bytes")
        (fine,) = _CREDIT_FINE.unpack_from(value, at)
        at += _CREDIT_FINE.size
    rule, evidence, client_id = _unpack_texts(value, at, _CREDIT_TEXTS, "credit record")
    return CreditRecord(rule, ground, evidence, bool(serious), time, client_id, barred, fine)


# ---------------------------------------------------------------------------- replication

# A commit group's replication record (storage.lmdb_store Book.journal): version, the log
# sequence, the number of operations; then each: database name, key, value (a delete has
# the value length 0xFFFFFFFF and no value). Compiled twins: fastpath encode_journal,
# decode_journal and journal_size (tests/test_fastpath.py): a change here is a change there.
#
# JOURNAL_VERSION 2 (issue 27): the operations after the head are one zstd frame (level
# config.log_record_zstd_level, its content size and checksum in the frame); a debit's
# operations are about 420 bytes plain and 90 compressed, and every byte of a record is
# written, flushed and sent on by each log server to every follower. Version 1 (the
# operations as they are) is still read: a log written before this release holds it.
JOURNAL_VERSION = 2
JOURNAL_PLAIN = 1  # the layout below as it is: what version 2 compresses after its head
_JOURNAL_HEAD = struct.Struct("<BQI")
JOURNAL_HEAD_BYTES = _JOURNAL_HEAD.size
_JOURNAL_NAME = struct.Struct("<B")
_JOURNAL_LEN = struct.Struct("<I")
_DELETED = 0xFFFFFFFF
_zstd = threading.local()  # a compressor and a decompressor per thread (not thread-safe)


def journal_size(ops) -> int:
    """A record's bytes before compression (the writer's bound on a record is on these: a
    compressed record is never more than a little larger)."""
    return _JOURNAL_HEAD.size + sum(9 + len(name) + len(key) + (0 if value is None
                                                                  else len(value))
                                    for name, key, value in ops)


def encode_journal(seq: int, ops) -> bytes:
    out = [_JOURNAL_HEAD.pack(JOURNAL_PLAIN, seq, len(ops))]
    for name, key, value in ops:
        out += [_JOURNAL_NAME.pack(len(name)), name, _JOURNAL_LEN.pack(len(key)), key,
                _JOURNAL_LEN.pack(_DELETED if value is None else len(value))]
        if value is not None:
            out.append(value)
    return seal_journal(b"".join(out))


def seal_journal(plain: bytes) -> bytes:
    """A version-1 record's bytes as the version written today: the head with its version,
    then the operations compressed. InvalidRecord past config.log_record_bytes_max (no
    follower would take it)."""
    if len(plain) > config.log_record_bytes_max:
        raise InvalidRecord(f"replication record of {len(plain):,} bytes: at most "
                            f"{config.log_record_bytes_max:,}")
    version, seq, count = _JOURNAL_HEAD.unpack_from(plain)
    assert version == JOURNAL_PLAIN, version
    return _JOURNAL_HEAD.pack(JOURNAL_VERSION, seq, count) + \
        _codec()[0].compress(memoryview(plain)[_JOURNAL_HEAD.size:])


def _codec():
    """This thread's zstd compressor and decompressor (neither may be shared by threads)."""
    codec = getattr(_zstd, "codec", None)
    if codec is None:
        codec = _zstd.codec = (
            zstandard.ZstdCompressor(level=config.log_record_zstd_level, write_checksum=True),
            zstandard.ZstdDecompressor())
    return codec


def unseal_journal(record: bytes) -> bytes:
    """A version-2 record as version 1 (its operations decompressed), or CorruptRecord: a
    frame that does not say its size, says more than config.log_record_bytes_max, or does not
    decompress to exactly that (checksum included)."""
    size = len(record)
    if size < _JOURNAL_HEAD.size:
        raise CorruptRecord(f"replication record of {size} bytes is cut")
    frame = memoryview(record)[_JOURNAL_HEAD.size:]
    try:
        plain = zstandard.frame_content_size(frame)
        if not 0 <= plain <= config.log_record_bytes_max - _JOURNAL_HEAD.size:
            raise CorruptRecord(f"replication record's operations say {plain} bytes: at most "
                                f"{config.log_record_bytes_max - _JOURNAL_HEAD.size:,}")
        # an empty frame's content python-zstandard takes on its word, unread: read it whole
        # (its checksum, nothing after it) as any other
        body = _codec()[1].decompress(frame, allow_extra_data=False) if plain else \
            _empty(frame)
    except zstandard.ZstdError as e:
        raise CorruptRecord(f"replication record's operations do not decompress: {e}") \
            from None
    if len(body) != plain:
        raise CorruptRecord(f"replication record's operations are {len(body)} bytes, not "
                            f"{plain}")
    _, seq, count = _JOURNAL_HEAD.unpack_from(record)
    return _JOURNAL_HEAD.pack(JOURNAL_PLAIN, seq, count) + body


def journal_sequence(record: bytes) -> int:
    """The log sequence of a replication record, from its head alone."""
    return _JOURNAL_HEAD.unpack_from(record)[1]


def _empty(frame) -> bytes:
    """An empty frame's content (b""), read through: CorruptRecord unless it is one whole
    frame, its checksum right and nothing after it."""
    reader = zstandard.ZstdDecompressor().decompressobj()
    body = reader.decompress(frame)
    if not reader.eof or reader.unused_data:
        raise CorruptRecord("replication record's operations are not one whole frame")
    return body


def decode_journal(record) -> tuple[int, list[tuple[bytes, bytes, bytes | None]]]:
    """(log sequence, [(database name, key, value or None for a delete)]), or CorruptRecord.
    Every follower decodes every record: slices taken as they come (a slice past the end is
    short, never an error), the record's length checked once at the end."""
    record = bytes(record)
    if record[:1] == bytes((JOURNAL_VERSION,)):
        record = unseal_journal(record)
    size = len(record)
    length = _JOURNAL_LEN.unpack_from
    try:
        version, seq, count = _JOURNAL_HEAD.unpack_from(record)
        if version != JOURNAL_PLAIN:
            raise CorruptRecord(f"replication record version {version}")
        at = _JOURNAL_HEAD.size
        ops: list[tuple[bytes, bytes, bytes | None]] = []
        append = ops.append
        for _ in range(count):
            end = at + 1 + record[at]
            name = record[at + 1:end]
            (n,) = length(record, end)
            at = end + 4 + n
            key = record[end + 4:at]
            (n,) = length(record, at)
            if n == _DELETED:
                at += 4
                append((name, key, None))
            else:
                append((name, key, record[at + 4:at + 4 + n]))
                at += 4 + n
    except (struct.error, IndexError):
        raise CorruptRecord(f"replication record of {size} bytes is cut") from None
    if at > size:
        raise CorruptRecord(f"replication record of {size} bytes is cut")
    if at != size:
        raise CorruptRecord(f"replication record has {size - at} bytes too many")
    return seq, ops

"""The card record: fixed-width, little-endian, with a version byte. Never pickle or JSON.

The fast path (fastpath/_authorize_c.pyx) reads the first 24 bytes at these offsets straight
from the LMDB value; change the layout here and there together, and bump VERSION.

    off size field
      0    1 version            (= VERSION)
      1    1 pack               (yikatong.v1.Pack)
      2    1 state              (yikatong.v1.CardState, as stored; see effective_state)
      3    1 flags              (FLAG_*)
      4    1 generation         (SH-30)
      5    1 lock_mask          (bit 1 << Channel: application locked, GZ-6)
      6    2 points             (RC-20 points score)
      8    8 temp_loss_at       (unix s, while TEMP_LOSS: SH-18a/b)
     16    8 valid_until        (unix s, RC-14; 0 = no end)
     ---- the fast path reads nothing below this line
     24    8 holder_id
     32    8 applied_at
     40    8 issued_at
     48    8 loss_reported_at
     56   20 replaced_by        (ASCII card number, NUL-padded)
     76   20 replaces
     96   32 service_bank       (UTF-8, NUL-padded)
    128      total
"""
import dataclasses
import struct
import typing

from yikatong import config

VERSION = 1
LAYOUT = struct.Struct("<BBBBBBHqqQqqq20s20s32s")
SIZE = LAYOUT.size
assert SIZE == 128
service_bank_bytes_max = 32
assert config.card_number_length_max <= 20

# Offsets read in place (the fast path reads its own, kept in step by the differential tests).
OFF_VERSION, OFF_PACK, OFF_STATE, OFF_HOLDER_ID = 0, 1, 2, 24

# Values of yikatong.v1 enums, spelled here so the domain and the fast path need no protobuf.
PACK_SH, PACK_GZ, PACK_BJ, PACK_RC = 1, 2, 3, 4
PACK_NAMES = {1: "SH", 2: "GZ", 3: "BJ", 4: "RC"}
(APPLIED, VERIFIED, REJECTED, ISSUED, ACTIVE, TEMP_LOSS, LOST, SUPERSEDED, CANCELLED) = range(1, 10)
STATE_NAMES = {
    1: "APPLIED", 2: "VERIFIED", 3: "REJECTED", 4: "ISSUED", 5: "ACTIVE",
    6: "TEMP_LOSS", 7: "LOST", 8: "SUPERSEDED", 9: "CANCELLED",
}
FINAL_STATES = frozenset((REJECTED, SUPERSEDED, CANCELLED))
(CH_TRANSIT, CH_MEDICAL, CH_BENEFIT, CH_FINANCIAL, CH_SERVICE, CH_STATUS) = range(1, 7)

FLAG_TRANSIT = 1  # made with the transit function (SH-13)
FLAG_FINANCIAL_OPEN = 2  # SH-14
FLAG_FINANCIAL_FROZEN = 4  # bank loss report stands (SH-20)
FLAG_REPLACEMENT_APPLIED = 8  # a replacement was applied for (GZ-22)


def holder_id_of(value) -> int | None:
    """The holder of a stored card record, None if there is none or it is not a valid one."""
    if value is None:
        return None
    try:
        check(value)
    except CorruptRecord:
        return None
    return struct.unpack_from("<Q", value, OFF_HOLDER_ID)[0]


class CorruptRecord(Exception):
    """A stored value that is not a card record this code understands: never decide on it."""


@dataclasses.dataclass
class CardRecord:
    card_number: str
    pack: int
    state: int
    flags: int = 0
    generation: int = config.generation_current
    lock_mask: int = 0
    points: int = 0
    temp_loss_at: int = 0
    valid_until: int = 0
    holder_id: int = 0
    applied_at: int = 0
    issued_at: int = 0
    loss_reported_at: int = 0
    replaced_by: str = ""
    replaces: str = ""
    service_bank: str = ""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def set(self, flag: int, on: bool = True) -> None:
        self.flags = (self.flags | flag) if on else (self.flags & ~flag)

    def encode(self) -> bytes:
        return LAYOUT.pack(
            VERSION, self.pack, self.state, self.flags, self.generation, self.lock_mask,
            self.points, self.temp_loss_at, self.valid_until, self.holder_id, self.applied_at,
            self.issued_at, self.loss_reported_at, self.replaced_by.encode("ascii"),
            self.replaces.encode("ascii"), self.service_bank.encode("utf-8"),
        )

    @classmethod
    def decode(cls, card_number: str, value: bytes) -> "CardRecord":
        try:
            check(value)
        except CorruptRecord as e:
            raise CorruptRecord(f"card {card_number}: {e}; not served") from None
        (_, pack, state, flags, generation, lock_mask, points, temp_loss_at, valid_until,
         holder_id, applied_at, issued_at, loss_reported_at, replaced_by, replaces,
         bank) = LAYOUT.unpack(value)
        try:
            texts = (replaced_by.rstrip(b"\0").decode("ascii"),
                     replaces.rstrip(b"\0").decode("ascii"), bank.rstrip(b"\0").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CorruptRecord(f"card record {card_number} has an undecodable field: {e}") from None
        return cls(card_number, pack, state, flags, generation, lock_mask, points, temp_loss_at,
                   valid_until, holder_id, applied_at, issued_at, loss_reported_at, *texts)


class HotCard(typing.NamedTuple):
    """The first 24 bytes of a card record: all the decision table reads."""

    version: int
    pack: int
    state: int
    flags: int
    generation: int
    lock_mask: int
    points: int
    temp_loss_at: int
    valid_until: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


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
    if not 1 <= value[OFF_PACK] <= 4 or not 1 <= value[OFF_STATE] <= 9:
        raise CorruptRecord("card record has an unknown pack or state")


# ---------------------------------------------------------------------------- money
# Accounts: key b"h" + u64 holder_id (big-endian) + u8 kind, or b"o" + operator name (UTF-8).
# Value: version, then posted and pending sums in integer fen (TigerBeetle's four balances).
ACCOUNT = struct.Struct("<Bqqqq")  # version, debits_pending, debits_posted, credits_pending, credits_posted
KIND_MEDICAL, KIND_TRANSIT, KIND_BENEFIT = 1, 2, 3
ACCOUNT_KEY_BYTES_MAX = 40
_HOLDER_KEY = struct.Struct(">cQB")


def holder_account_key(holder_id: int, kind: int) -> bytes:
    return _HOLDER_KEY.pack(b"h", holder_id, kind)


def operator_account_key(name: str) -> bytes:
    return b"o" + name.encode("utf-8")


def is_holder_account(key: bytes) -> bool:
    return key[:1] == b"h"


@dataclasses.dataclass
class Account:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    def encode(self) -> bytes:
        return ACCOUNT.pack(VERSION, self.debits_pending, self.debits_posted,
                            self.credits_pending, self.credits_posted)

    @classmethod
    def decode(cls, value) -> "Account":
        if len(value) != ACCOUNT.size or value[0] != VERSION:
            raise CorruptRecord(f"account record of {len(value)} bytes / version {value[0:1]!r}")
        return cls(*ACCOUNT.unpack(value)[1:])

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted


# Transfers: key = transfer id (UTF-8). Fixed width; ids and account keys NUL-padded.
# version kind status channel amount created_at timeout_at resolved debit credit ref_id fingerprint
TRANSFER = struct.Struct("<BBBBqqqq40s40s64s32s")
T_SINGLE, T_PENDING, T_POST, T_VOID, T_REVERSAL = 1, 2, 3, 4, 5
# Status of a pending transfer (T_PENDING); every other kind is POSTED when it exists.
S_POSTED, S_PENDING, S_VOIDED, S_EXPIRED = 1, 2, 3, 4


@dataclasses.dataclass
class Transfer:
    kind: int
    status: int
    amount: int  # what it moved, or holds
    debit: bytes  # account keys
    credit: bytes
    ref_id: str = ""  # post/void: the pending transfer; reversal: the reversed transfer
    fingerprint: bytes = b"\0" * 32
    created_at: int = 0
    timeout_at: int = 0  # pending only
    resolved: int = 0  # pending: amount posted; posted kinds: amount reversed so far
    channel: int = 0  # set when an Authorize made it

    def encode(self) -> bytes:
        return TRANSFER.pack(VERSION, self.kind, self.status, self.channel, self.amount,
                             self.created_at, self.timeout_at, self.resolved, self.debit,
                             self.credit, self.ref_id.encode("utf-8"), self.fingerprint)

    @classmethod
    def decode(cls, value) -> "Transfer":
        if len(value) != TRANSFER.size or value[0] != VERSION:
            raise CorruptRecord(f"transfer record of {len(value)} bytes")
        (_, kind, status, channel, amount, created_at, timeout_at, resolved, debit, credit,
         ref_id, fingerprint) = TRANSFER.unpack(value)
        return cls(kind, status, amount, debit.rstrip(b"\0"), credit.rstrip(b"\0"),
                   ref_id.rstrip(b"\0").decode("utf-8"), fingerprint, created_at, timeout_at,
                   resolved, channel)


# Change log entry: card number, card state after the change, and for money the transfer id and
# the fen it moved (negative: released or reversed toward the holder).
CHANGE = struct.Struct("<20sB64sq")

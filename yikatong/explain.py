"""Disputes re-decided exactly (issue 28 item 4): a transfer's recorded card decision walked
again through the decision table, row by row (`yikatong explain --transfer ID`).

Every debit and hold Authorize makes records, in its transfer, the rule pack it was decided
under and the card state and funds it was decided on (storage/records.py encode_decision).
`explain` decides again on exactly those inputs with the table of the recorded rule pack
(PACKS), says whether that gives the recorded answer (APPROVED: a transfer exists only for an
approved decision), and, when today's rule pack is another, what today's rules answer on the
same inputs. It reads only the store (and the archive): nothing here writes.
"""
import dataclasses
import typing

from yikatong import config
from yikatong.errors import CorruptRecord
from yikatong.fastpath import _authorize_py
from yikatong.model import AccountKind, Channel, Pack, Reason, State, Transfer, TransferKind
from yikatong.storage.records import (
    ASKED_OTHER_CARDS,
    ASKED_SPLIT,
    decode_decision,
    hot_record,
)


class RulePack(typing.NamedTuple):
    """What decided under one rule pack: its table (row by row) and its Policy's facts."""

    walk: typing.Callable
    generation_retired_at: dict


# Every rule pack this release can decide under again: the one in force, and each earlier
# one kept as it was (its walk frozen here) when RULE_PACK is bumped.
PACKS: dict[int, RulePack] = {
    _authorize_py.RULE_PACK: RulePack(_authorize_py.walk, dict(config.generation_retired_at)),
}

# The answers of the table that leave the account to with_money's rule of the holder's
# other cards (authorize._CARD_USABLE)
_CARD_USABLE = frozenset({Reason.APPROVED, Reason.APPLICATION_LOCKED, Reason.INSUFFICIENT_FUNDS})


class NotFound(Exception):
    """No transfer by this id, in the store or its archive."""


class UnknownPack(Exception):
    """Recorded under a rule pack this release does not keep."""


@dataclasses.dataclass
class Explanation:
    transfer_id: str
    kind: str
    recorded: bool  # a decision was recorded for it (False: said why in `note`)
    note: str = ""
    decided_by: str = ""  # the transfer whose decision is walked (a post's: its hold's)
    rule_pack: int = 0
    today_pack: int = 0
    channel: str = ""
    time: int = 0
    inputs: dict = dataclasses.field(default_factory=dict)
    rows: list = dataclasses.field(default_factory=list)  # [{number, rule, test, answer}]
    recorded_answer: str = ""
    redecided_answer: str = ""
    today_answer: str = ""  # "" when today's rule pack is the recorded one
    same: bool = True  # the re-decided answer is the recorded one
    archived: bool = False  # read from the archive (older than --retain-days)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _name(answer: int | None) -> str:
    return "" if answer is None else "CORRUPT" if answer < 0 else Reason(answer).name


def _account(key: bytes) -> str:
    """An account named without personal information: a holder's by internal id and kind."""
    if key[:1] == b"h" and len(key) == 10:
        return f"holder {int.from_bytes(key[1:9], 'big')}'s {AccountKind(key[9]).name} account"
    return key.decode("ascii", "replace")


def _walk(pack: RulePack, decision, channel: int, now: int, amount: int, available: int,
          legs: list[tuple[str, Transfer]] | None) -> tuple[list[dict], int]:
    """The rows asked and the answer, under `pack`, on the recorded inputs."""
    rows = []
    policy = _authorize_py.Policy(pack.generation_retired_at)
    answer = Reason.APPROVED
    for row in pack.walk(policy, hot_record(decision.card), channel, now, 0, amount, available):
        rows.append({"number": row.number, "rule": row.rule, "test": row.test,
                     "answer": _name(row.answer)})
        if row.answer is not None:
            answer = row.answer
    if decision.asked & ASKED_OTHER_CARDS and answer in _CARD_USABLE:
        rows.append({"number": 18, "rule": "GZ-21, SH-18, GZ-26",
                     "test": "the holder's other cards stop the account (recorded: none did)",
                     "answer": ""})
    if legs is not None and answer in (Reason.APPROVED, Reason.INSUFFICIENT_FUNDS):
        due = amount
        for leg_id, t, there in legs:
            part = min(there, due)
            rows.append({"number": 19, "rule": "issue 28 item 2",
                         "test": f"split: {_account(t.debit)} pays {part} fen of {due} due "
                                 f"({there} fen available; leg {leg_id} moved {t.amount})",
                         "answer": ""})
            if part != t.amount:
                answer = -2  # the legs recorded are not what the split would charge
                break
            due -= part
        else:
            answer = Reason.INSUFFICIENT_FUNDS if due else Reason.APPROVED
        rows.append({"number": 20, "rule": "issue 28 item 2",
                     "test": "the split's accounts together cover the tap",
                     "answer": "NOT THE LEGS RECORDED" if answer == -2 else _name(answer)})
    return rows, answer


def explain(get: typing.Callable[[str], Transfer | None], transfer_id: str) -> Explanation:
    """The explanation of `transfer_id`; `get(id)` reads a transfer (the store, then the
    archive). NotFound, UnknownPack, or CorruptRecord for a recorded decision that is not one."""
    t = get(transfer_id)
    legs_of = None
    if t is None:
        legs_of = _legs(get, transfer_id)  # a split tap's own id names its legs
        if not legs_of:
            raise NotFound(transfer_id)
        t = legs_of[0][1]
    out = Explanation(transfer_id, TransferKind(t.kind).name, False,
                      today_pack=_authorize_py.RULE_PACK)
    decided_id = legs_of[0][0] if legs_of else transfer_id
    if t.kind in (TransferKind.POST, TransferKind.VOID):
        hold = get(t.ref_id)
        out.note = f"resolves hold {t.ref_id!r}: its decision is the hold's"
        if hold is None:
            out.note += ", which is no longer in the store or the archive"
            return out
        decided_id, t = t.ref_id, hold
    elif t.kind == TransferKind.REVERSAL:
        out.note = f"a reversal of {t.ref_id!r}: no card decision (the payee's or an operator's)"
        return out
    if not t.channel:
        out.note = "made by Ledger.Transfer (or a fee): no card decision"
        return out
    if not t.decided:
        out.note = ("decision not recorded: the transfer was made before this store recorded "
                    "decisions (store format 5 or before)")
        return out
    decision = decode_decision(t.decided)
    out.recorded, out.decided_by, out.rule_pack = True, decided_id, decision.rule_pack
    out.channel, out.time = Channel(t.channel).name, t.created_at
    amount, available, legs = t.amount, decision.available, None
    if decision.asked & ASKED_SPLIT:
        base = decided_id.rsplit("#", 1)[0]
        parts = legs_of or _legs(get, base)
        if not parts:
            raise CorruptRecord(f"{decided_id!r} says it is a split tap's leg; {base!r} has none")
        legs = []
        for leg_id, leg in parts:
            if not leg.decided:
                raise CorruptRecord(f"split leg {leg_id!r} has no recorded decision")
            legs.append((leg_id, leg, decode_decision(leg.decided).available))
        amount = sum(leg.amount for _, leg in parts)
        own = config.channel_money[t.channel][0]
        first = parts[0][1]
        # the table asked the channel's own account (the split's first); it paid a leg only
        # if it had something
        available = legs[0][2] if first.debit[-1] == own else 0
    card = decision.card
    out.inputs = {
        "card": {"pack": Pack(card.pack).name, "state": State(card.state).name,
                 "flags": card.flags,
                 "generation": card.generation, "lock_mask": card.lock_mask,
                 "temp_loss_until": card.temp_loss_until, "valid_until": card.valid_until},
        "account": _account(t.debit), "amount_fen": amount, "available_fen": available,
        "time": t.created_at, "holders_other_cards_asked": bool(decision.asked
                                                                & ASKED_OTHER_CARDS),
        "split_legs": [leg_id for leg_id, _, _ in legs] if legs is not None else []}
    pack = PACKS.get(decision.rule_pack)
    if pack is None:
        raise UnknownPack(f"{decided_id!r} was decided under rule pack {decision.rule_pack}, "
                          f"which this release does not keep (it keeps {sorted(PACKS)})")
    out.rows, answer = _walk(pack, decision, t.channel, t.created_at, amount, available, legs)
    out.recorded_answer = "APPROVED"  # a transfer is made only by an approved decision
    out.redecided_answer = "NOT THE LEGS RECORDED" if answer == -2 else _name(answer)
    out.same = answer == Reason.APPROVED
    if decision.rule_pack != _authorize_py.RULE_PACK:
        _, today = _walk(PACKS[_authorize_py.RULE_PACK], decision, t.channel, t.created_at,
                         amount, available, legs)
        out.today_answer = "NOT THE LEGS RECORDED" if today == -2 else _name(today)
    return out


def _legs(get, base: str) -> list[tuple[str, Transfer]]:
    """A split tap's legs `<base>#1`, `#2`, ... as ledger.legs finds them."""
    out: list[tuple[str, Transfer]] = []
    for n in range(1, len(AccountKind) + 1):
        t = get(f"{base}#{n}")
        if t is None or t.kind != TransferKind.SINGLE or not t.channel or t.debit[:1] != b"h":
            break
        out.append((f"{base}#{n}", t))
    return out

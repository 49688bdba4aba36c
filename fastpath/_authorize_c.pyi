# The compiled module's signatures (yarl's _quoting_c.pyi): Policy and decide are
# _authorize_py's; the rest is compiled only (its twins named where each is defined).
from collections.abc import Mapping

APPROVED: int
CORRUPT: int

class Policy:
    def __init__(self, generation_retired_at: Mapping[int, int]) -> None: ...

def decide(policy: Policy, record: bytes | memoryview | None, channel: int, now: int,
           points_required: int, amount: int = ..., available: int = ...,
           bank_loss_until: int = ...) -> int: ...

# The wire path (compiled only: the Python path decodes the message and decides with decide;
# tests/test_wire.py and tests/test_wire_money.py hold them alike)
def authorize_wire(policy: Policy, raw: bytes, batch: bool, get: object, cards: object,
                   ecards: object, holder_cards: object, now: int, channels: int,
                   points_required: int, tally: object, batch_max: int,
                   bank_losses: object = ...) -> bytes | None: ...
def status_wire(policy: Policy, raw: bytes, get: object, cards: object, ecards: object,
                holder_cards: object, now: int, batch_max: int,
                bank_losses: object = ...) -> bytes | None: ...
def money_wire(raw: bytes, batch: bool, channels: int, money_channels: int, batch_max: int,
               prefix: bytes, sha256: object) -> list[tuple] | None: ...
def money_answer(request_id: str, reason: int, available: int) -> bytes: ...
def money_answers(answers: list[bytes], commands: list[tuple], tally: object,
                  batch: bool) -> bytes: ...

# The writer's compiled fares (compiled only: the Python path, authorize.with_money, is the
# reference; tests/test_fares.py holds them alike)
class Fares:
    def __init__(self, policy: Policy, role: int, rule_pack: int,
                 audit_texts: tuple[tuple[tuple[bytes, bytes], ...],
                                    tuple[tuple[bytes, bytes], ...]],
                 algorithm: int, audit_hash: object, id_hash: object, dbs: object,
                 default_credit: bytes) -> None: ...
    def fare(self, book: object, c: tuple, now: int) -> bytes | None: ...

def layout() -> dict[str, int]: ...

# records.encode_journal, decode_journal and journal_size compiled (tests/test_fastpath.py)
def encode_journal(seq: int, ops: list) -> bytes: ...
def decode_journal(record: bytes | memoryview) -> tuple[int, list]: ...
def journal_size(ops: list) -> int: ...
# _authorize_py.apply_ops compiled: Book.apply_journal's loop
def apply_ops(txn: object, ops: list, by_name: dict, start: int = ...) -> int: ...

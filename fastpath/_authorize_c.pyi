# The compiled twin's signature (yarl's _quoting_c.pyi): the same as _authorize_py's.
from collections.abc import Mapping

APPROVED: int
CORRUPT: int

class Policy:
    def __init__(self, generation_retired_at: Mapping[int, int]) -> None: ...

def decide(policy: Policy, record: bytes | memoryview | None, channel: int, now: int,
           points_required: int, amount: int = ..., available: int = ...,
           bank_loss_until: int = ...) -> int: ...

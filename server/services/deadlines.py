"""The Deadlines service (API.md)."""
from yikatong import cards
from yikatong.errors import (
    InvalidArgument,
)
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.storage.lmdb_store import Store
from yikatong.v1 import yikatong_pb2 as pb


class Deadlines:
    def __init__(self, core: Core):
        self.core = core

    async def ListDue(self, request, client: Client):
        if request.within_days > 3660:
            raise InvalidArgument("within_days", "at most 3660 (ten years)")
        return list_due(self.core.store, self.core.clock.now(), request.within_days)


def list_due(store: Store, now: int, within_days: int) -> pb.ListDueResponse:
    with store.read() as txn:
        found = cards.due(store.book(txn), now, within_days)
    return pb.ListDueResponse(items=[
        pb.DueItem(card_number=card, problem=f"steps not readable: {s}") if isinstance(s, Exception)
        else pb.DueItem(card_number=card, step=s.step, rule=s.rule, due_at=s.due_at,
                        overdue=s.due_at <= now, provisional=s.provisional)
        for card, s in found])

"""The Admin service (API.md)."""
from yikatong import clock as clocks
from yikatong.errors import (
    InvalidArgument,
    InvalidTransition,
)
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.v1 import yikatong_pb2 as pb


class Admin:
    def __init__(self, core: Core):
        self.core = core

    def _manual_clock(self, method: str):
        if not self.core.clock.manual:
            raise InvalidTransition("clock=system", method, "--clock manual",
                                    "the clock can be moved only under --clock manual")
        return self.core.clock

    @staticmethod
    def _answer(now: int) -> pb.ClockResponse:
        return pb.ClockResponse(now=now, time=clocks.format_time(now))

    async def AdvanceClock(self, request, client: Client):
        clock = self._manual_clock("AdvanceClock")
        if request.seconds < 0:
            raise InvalidArgument("seconds", "must not be negative: the clock never goes back")
        try:
            return self._answer(clock.advance(request.seconds))
        except ValueError as error:
            raise InvalidArgument("seconds", str(error)) from None

    async def SetClock(self, request, client: Client):
        clock = self._manual_clock("SetClock")
        try:
            t = clocks.parse_time(request.time)
        except ValueError:
            raise InvalidArgument("time", f"{request.time!r} is not ISO-8601") from None
        try:
            return self._answer(clock.set(t))
        except ValueError as error:
            raise InvalidArgument("time", str(error)) from None

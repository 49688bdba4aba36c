"""The ResidenceCard service (API.md)."""
from yikatong import cards, points
from yikatong.errors import (
    InvalidArgument,
    YikatongError,
)
from yikatong.model import (
    PII_FIELDS,
    HolderInfo,
    mask,
)
from yikatong.server import errors, validate
from yikatong.server.clients import Client
from yikatong.server.services.holders import stated
from yikatong.server.services.lifecycle import CardWrites, card_message
from yikatong.v1 import yikatong_pb2 as pb


class ResidenceCard(CardWrites):
    service = "ResidenceCard"

    async def Renew(self, request, client: Client):
        return await self._card_op("Renew", request, client, cards.renew)

    async def StateSpecialCircumstances(self, request, client: Client):
        validate.text(request.special_circumstances, "special_circumstances")
        return await self._card_op("StateSpecialCircumstances", request, client,
                                   cards.state_special_circumstances,
                                   request.special_circumstances, client.role)

    async def ChangeInformation(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        if request.holder.ssn:
            raise InvalidArgument("holder.ssn", "is not changed here; leave it empty")
        for f in PII_FIELDS:
            validate.text(getattr(request.holder, f), f"holder.{f}")
        if request.holder.birth_date:
            cards.parse_date("holder.birth_date", request.holder.birth_date)
        cards.parse_date("changed_on", request.changed_on)
        given = HolderInfo("", **{f: getattr(request.holder, f) for f in PII_FIELDS})

        def op(book, now, _) -> bytes:
            rec, due, late = cards.change_information(book, now, request.card_number, given,
                                                      request.changed_on, client.id)
            book.append_audit(now, client.id, client.role.name,
                              "ResidenceCard.ChangeInformation", rec.card_number)
            return pb.ChangeInformationResponse(card=card_message(book, rec, now), due_at=due.at,
                                                late=late, provisional=due.provisional
                                                ).SerializeToString()
        return pb.ChangeInformationResponse.FromString(await self.core.write_once(
            "ChangeInformation", client, request.request_id, request, op))

    # RC-20 to RC-23, RC-29, RC-30: points (yikatong.points), on the table in force
    async def ApplyPoints(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        validate.enum(request.filer, pb.PointsFiler, "filer")
        validate.enum(request.employer_default, pb.EmployerDefault, "employer_default",
                      allow_unspecified=True)
        if request.employer or request.filer == pb.POINTS_FILER_EMPLOYER:
            points.validate_employer(request.employer)
        evidence = stated(request.evidence_ref, "evidence_ref", "the document proofs (RC-23)")
        if not request.claims:
            raise InvalidArgument("claims", "an application claims at least one indicator")
        if len(request.claims) > 64:
            raise InvalidArgument("claims", "at most 64 claims")
        for i, c in enumerate(request.claims):
            validate.text(c.indicator, f"claims[{i}].indicator", required=True)
            validate.text(c.value, f"claims[{i}].value", required=True)
        table = points.in_force()

        def op(book, now, _) -> bytes:
            holder_id, _record = points.apply(book, now, table, request.card_number,
                                              request.filer, request.employer, request.claims,
                                              evidence, client.id, request.employer_default)
            return self._points_answer(book, now, table, holder_id, "ResidenceCard.ApplyPoints",
                                       request.card_number, evidence, client)
        return pb.PointsRecord.FromString(await self.core.write_once(
            "ApplyPoints", client, request.request_id, request, op))

    async def DecidePoints(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)
        validate.text(request.reason, "reason")
        table = points.in_force()

        def op(book, now, _) -> bytes:
            holder_id, _record = points.decide(book, now, table, request.card_number,
                                               request.approved, request.reason, client.id)
            return self._points_answer(book, now, table, holder_id,
                                       "ResidenceCard.DecidePoints", request.card_number,
                                       request.reason, client)
        return pb.PointsRecord.FromString(await self.core.write_once(
            "DecidePoints", client, request.request_id, request, op))

    async def GetPoints(self, request, client: Client):
        """A read of the holder's points and credit bars, for a stated purpose: in the
        writer, audited (granted or refused) before anything leaves."""
        validate.card_number(request.card_number)
        purpose = stated(request.purpose, "purpose", "why the holder's points are read")
        table, clock = points.in_force(), self.core.clock

        def read(book):
            now = clock.now()
            try:
                rec = points.residence_card(book, request.card_number, "GetPoints")
            except YikatongError as refused:
                book.append_audit(now, client.id, client.role.name, "ResidenceCard.GetPoints",
                                  request.card_number, purpose,
                                  errors.status_of(refused).name)
                return refused
            return self._points_answer(book, now, table, rec.holder_id,
                                       "ResidenceCard.GetPoints", request.card_number, purpose,
                                       client)
        answer = await self.core.write(read)
        if isinstance(answer, YikatongError):
            answer.audited = True  # type: ignore[attr-defined]  # for calls.py: see read()
            raise answer
        return pb.PointsRecord.FromString(answer)

    @staticmethod
    def _points_answer(book, now: int, table, holder_id: int, method: str, card_number: str,
                       purpose: str, client: Client) -> bytes:
        ssn = book.holder_ssn(holder_id) or ""
        book.append_audit(now, client.id, client.role.name, method, card_number, purpose,
                          holder=mask(ssn))
        return points.view(book, now, table, holder_id).SerializeToString()

"""The Holders service (API.md)."""
from yikatong import cards, points
from yikatong.errors import (
    CardNotFound,
    HolderNotFound,
    InvalidArgument,
    InvalidTransition,
    PermissionDenied,
    YikatongError,
)
from yikatong.model import (
    PII_FIELDS,
    CreditRecord,
    HolderInfo,
    Role,
    mask,
)
from yikatong.server import errors, validate
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.roles import PII_READERS
from yikatong.server.services.lifecycle import validate_holder
from yikatong.v1 import yikatong_pb2 as pb


def holder_message(info: HolderInfo, fields=PII_FIELDS) -> pb.Holder:
    return pb.Holder(ssn=info.ssn, **{f: getattr(info, f) for f in fields})


class Holders:
    """Personal information for a stated purpose (SPEC.md section 7). A read is done in the
    writer, so its audit event is committed before the holder's information leaves. Every
    call here is audited whatever its outcome (issue 25): granted, or refused by the domain
    (not found, a rule), here with the holder masked, before the answer leaves; refused as
    malformed or by the call path, by calls.Refusals (roles.AUDITED_WHATEVER_OUTCOME)."""

    def __init__(self, core: Core):
        self.core = core

    async def _audited(self, client: Client, method: str, card_number: str, text: str,
                       ssn: str, work):
        """`await work()`; a refusal it raises is audited first, in its own transaction
        (the refused one rolled back), and marked so (`audited`) for calls.py."""
        try:
            return await work()
        except YikatongError as refused:
            if getattr(refused, "audited", False):
                raise
            clock, code = self.core.clock, errors.status_of(refused).name

            def audit(book):
                book.append_audit(clock.now(), client.id, client.role.name, method,
                                  card_number, text, code, holder=mask(ssn))
            try:
                await self.core.write(audit)
            except YikatongError:
                pass  # the writer is busy or down: calls.Refusals counts it, and retries
            else:
                refused.audited = True  # type: ignore[attr-defined]
            raise

    async def GetHolder(self, request, client: Client):
        key = _holder_key(request)
        purpose = stated(request.purpose, "purpose", "why the personal information is read")
        clock = self.core.clock

        def read(book):
            now = clock.now()
            ssn = _ssn_of(book, request, key)
            found = book.holder(ssn) if ssn else None
            book.append_audit(now, client.id, client.role.name, "Holders.GetHolder",
                              request.card_number, purpose, "OK" if found else "NOT_FOUND",
                              holder=mask(ssn or ""))
            if found is None:
                return None
            holder_id, info = found
            history = book.holder_history(holder_id) if request.with_history else []
            return pb.HolderRecord(holder=holder_message(info), history=[
                pb.HolderChange(field=c.field, old_value=c.old_value, new_value=c.new_value,
                                time=c.time, client_id=c.client_id, method=c.method,
                                reason=c.reason) for c in history],
                credit_records=[credit_message(r) for r in book.credit_records(holder_id)])
        answer = await self.core.write(read)
        if answer is None:  # audited as refused; nothing said of what is held
            missing: YikatongError = (CardNotFound(request.card_number) if key == "card_number"
                                      else HolderNotFound("no holder with that ssn"))
            missing.audited = True  # type: ignore[attr-defined]
            raise missing
        return answer

    async def CorrectHolder(self, request, client: Client):
        """GZ-20. A role that may not read PII (ONLINE_PLATFORM) names the holder's card too,
        and is answered alike whether or not the ssn and the card name one holder: what it
        sent, nothing held; only when they do is anything corrected (issue 25: 1,000 guessed
        ssns told which one was held, and overwrote its postcode). The audit trail says which
        (OK or NOT_FOUND)."""
        validate.request_id(request.request_id)
        reason = stated(request.reason, "reason", "why the information is corrected")
        given = validate_holder(request.holder)
        if not any(getattr(given, f) for f in PII_FIELDS):
            raise InvalidArgument("holder", "names no field to correct")
        if given.residence_address:  # refused before any look-up: it says nothing of a holder
            _residence_is_registered(client.role)
        reveal = client.role in PII_READERS
        if request.card_number or not reveal:
            validate.card_number(request.card_number)
        # a role that may not read PII learns nothing beyond what it sent
        sent = pb.HolderRecord(holder=holder_message(
            given, [f for f in PII_FIELDS if getattr(given, f)])).SerializeToString()

        def op(book, now, _) -> bytes:
            found = book.holder(given.ssn)
            if found is not None and request.card_number:
                card = book.card(request.card_number)
                if card is None or card.holder_id != found[0]:
                    found = None
            if found is None:
                if reveal:
                    raise HolderNotFound("no holder with that ssn" + (
                        " and card_number" if request.card_number else ""))
                book.append_audit(now, client.id, client.role.name, "Holders.CorrectHolder",
                                  request.card_number, reason, "NOT_FOUND",
                                  holder=mask(given.ssn))
                return sent  # as if corrected: the answer tells no guess from a holder
            _, info, changed = cards.correct_holder(book, now, given, reason, client.id)
            book.append_audit(now, client.id, client.role.name, "Holders.CorrectHolder",
                              request.card_number, reason, holder=mask(info.ssn))
            return pb.HolderRecord(holder=holder_message(info)).SerializeToString() \
                if reveal else sent
        return pb.HolderRecord.FromString(await self._audited(
            client, "Holders.CorrectHolder", request.card_number, reason, given.ssn,
            lambda: self.core.write_once("CorrectHolder", client, request.request_id, request,
                                         op)))

    async def RecordCredit(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.enum(request.ground, pb.CreditGround, "ground")
        evidence = stated(request.evidence_ref, "evidence_ref",
                           "the case file or decision the record rests on")
        if request.WhichOneof("key") == "employer":
            if client.role != Role.HRSS:  # art. 29 para. 2
                raise PermissionDenied("RC-29: a work unit's fine is imposed by the human "
                                       "resources and social security department (HRSS)",
                                       reason="RC-29")
            points.validate_employer(request.employer)

            def employer_op(book, now, _) -> bytes:
                record = cards.record_employer_credit(
                    book, now, request.employer, request.ground, evidence, request.serious,
                    request.fine_fen, client.id)
                book.append_audit(now, client.id, client.role.name, "Holders.RecordCredit",
                                  purpose=f"employer {request.employer}: {evidence}")
                message = credit_message(record)
                message.employer = request.employer
                return message.SerializeToString()
            return pb.CreditRecord.FromString(await self._audited(
                client, "Holders.RecordCredit", "", f"employer {request.employer}: {evidence}",
                "", lambda: self.core.write_once("RecordCredit", client, request.request_id,
                                                 request, employer_op)))
        key = _holder_key(request)
        if request.victim_card_number:  # SH-26: the other person's card, in fraud
            validate.card_number(request.victim_card_number, "victim_card_number")
        if (request.ground == pb.CREDIT_GROUND_FORGED_DOCUMENTS
                and client.role not in (Role.PUBLIC_SECURITY, Role.HRSS)):  # art. 29 para. 1
            raise PermissionDenied("RC-29: forged documents in a Residence Card or points "
                                   "application are recorded by public security or HRSS",
                                   reason="RC-29")

        def op(book, now, _) -> bytes:
            ssn = _ssn_of(book, request, key)
            if ssn is None:
                raise CardNotFound(request.card_number)
            _, record = cards.record_credit(
                book, now, ssn, request.ground, evidence, request.serious, client.id,
                request.fine_fen, card_number=request.card_number if key == "card_number" else "",
                victim_card_number=request.victim_card_number, illegal_gain=request.illegal_gain)
            book.append_audit(now, client.id, client.role.name, "Holders.RecordCredit",
                              request.card_number, purpose=evidence, holder=mask(ssn))
            return credit_message(record).SerializeToString()
        return pb.CreditRecord.FromString(await self._audited(
            client, "Holders.RecordCredit", request.card_number, evidence,
            request.ssn if key == "ssn" else "",
            lambda: self.core.write_once("RecordCredit", client, request.request_id, request,
                                         op)))


def _residence_is_registered(role: Role) -> None:
    """RC-13: "In the event that the residence address ... ha[s] changed, the Card holder shall
    go through the formalities of information changes at the community service center within
    30 days": the Shanghai residence address is registered there (ResidenceCard.
    ChangeInformation, which records the day it changed and whether the filing was in time),
    never corrected in passing with no such record."""
    if role in (Role.COMMUNITY_OUTLET, Role.PUBLIC_SECURITY):
        raise InvalidTransition("held", "CorrectHolder", "RC-13", (
            "a change of residence address is registered with ResidenceCard.ChangeInformation "
            "(changed_on: the day it changed), which records whether it was filed in time"))
    raise PermissionDenied(f"RC-13: a change of residence address is registered at the "
                           f"community service centre (ResidenceCard.ChangeInformation), "
                           f"not by {role.name}", reason="RC-13")


def _holder_key(request) -> str:
    """Which of `card_number` and `ssn` a Holders request names, validated."""
    key = request.WhichOneof("key")
    if key == "card_number":
        validate.card_number(request.card_number)
    elif key == "ssn":
        cards.validate_ssn(request.ssn, "ssn")
    else:
        raise InvalidArgument("key", "name the holder: card_number or ssn")
    return key


def _ssn_of(book, request, key: str) -> str | None:
    """The holder's ssn, from the request or through its card (None: no such card; "": a
    card whose holder has no record)."""
    if key == "ssn":
        return request.ssn
    rec = book.card(request.card_number)
    return None if rec is None else book.holder_ssn(rec.holder_id) or ""


def stated(value: str, field: str, why: str) -> str:
    """A free text the call must state (a purpose, a reason, evidence): not blank."""
    text = validate.text(value, field)
    if not text.strip():
        raise InvalidArgument(field, f"is required: {why}")
    return text


def credit_message(r: CreditRecord) -> pb.CreditRecord:
    return pb.CreditRecord(rule=r.rule, ground=r.ground, evidence_ref=r.evidence_ref,
                           serious=r.serious, time=r.time, client_id=r.client_id,
                           points_barred_until=r.points_barred_until, fine_fen=r.fine_fen,
                           # SH-26's first paragraph is recorded for illegal gain alone
                           illegal_gain=r.rule == "SH-26" and r.ground in cards.SH_26_FOR_GAIN)

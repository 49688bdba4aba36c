"""The Lifecycle service (API.md)."""
from yikatong import cards
from yikatong.errors import (
    CardNotFound,
)
from yikatong.model import (
    FINAL_STATES,
    PII_FIELDS,
    CancelGround,
    Card,
    Eligibility,
    Flag,
    HolderInfo,
    Pack,
    Proxy,
    ProxyRelation,
    State,
)
from yikatong.server import validate
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.server.roles import PII_READERS
from yikatong.v1 import yikatong_pb2 as pb


def card_message(book, rec: Card, now: int) -> pb.Card:
    return pb.Card(
        card_number=rec.card_number, pack=rec.pack, state=cards.effective_state(rec, now),
        transit_function=rec.has(Flag.TRANSIT), financial_open=rec.has(Flag.FINANCIAL_OPEN),
        financial_frozen=cards.financial_frozen(book, rec, now), service_bank=rec.service_bank,
        generation=rec.generation, replaced_by=rec.replaced_by, replaces=rec.replaces,
        applied_at=rec.applied_at, issued_at=rec.issued_at,
        loss_reported_at=rec.loss_reported_at, valid_until=rec.valid_until,
        locked_channels=[c for c in cards.LOCKABLE_CHANNELS if rec.lock_mask & (1 << c)],
        reject_reason=book.card_text(rec.card_number, "note") if rec.state in FINAL_STATES
        else "",
        replacement_applied=rec.has(Flag.REPLACEMENT_APPLIED),
        received_at=rec.received_at,
        issuing_organ=book.card_text(rec.card_number, "organ") if rec.pack == Pack.RC else "",
        cancel_ground=_cancel_ground(book, rec),
        fee_fen=_fee(book, rec),
        photo=rec.has(Flag.PHOTO),
        applied_by_proxy=_proxy_relation(book, rec),
    )


def _proxy_relation(book, rec: Card) -> int:
    text = book.card_text(rec.card_number, "proxy") if rec.pack == Pack.RC else ""
    return ProxyRelation[text.split(" ", 1)[0]] if text else 0


def _fee(book, rec: Card) -> int:
    """What making this card again cost the holder (SH-24, GZ-27, RC-33), 0 for a first."""
    if not rec.replaces:
        return 0
    fee = book.transfer(f"fee:{rec.card_number}")  # less what was reversed (GZ-27, RC-33)
    return fee.amount - fee.resolved if fee is not None else 0


_FEE_RULE = {Pack.SH: "SH-24", Pack.GZ: "GZ-27", Pack.BJ: "BJ via GZ-27", Pack.RC: "RC-33"}


def _cancel_ground(book, rec: Card) -> int:
    if rec.state != State.CANCELLED:
        return 0
    name = book.card_text(rec.card_number, "ground")
    return CancelGround[name] if name else 0


def validate_proxy(p: pb.Proxy) -> Proxy:
    """RC-8: the proxy's own identity document, name, relation and ground."""
    cards.validate_ssn(p.ssn, "proxy.ssn")
    validate.text(p.name, "proxy.name", required=True)
    validate.enum(p.relation, pb.ProxyRelation, "proxy.relation")
    validate.enum(p.ground, pb.ProxyGround, "proxy.ground")
    return Proxy(p.ssn, p.name, p.relation, p.ground)


def validate_holder(h: pb.Holder) -> HolderInfo:
    """The edge's checks of an application's personal information; the domain's value."""
    cards.validate_ssn(h.ssn)
    for f in PII_FIELDS:
        validate.text(getattr(h, f), f"holder.{f}")
    if h.birth_date:
        cards.parse_date("holder.birth_date", h.birth_date)
    # What each pack's application needs is checked after the held information is merged
    # (GZ-9b: what is held is not asked for again): yikatong.cards.merge_holder.
    return HolderInfo(h.ssn, **{f: getattr(h, f) for f in PII_FIELDS})


class CardWrites:
    """The one write path of the operations on a card (Lifecycle, ResidenceCard)."""

    service = ""

    def __init__(self, core: Core):
        self.core = core

    async def _write(self, method: str, request, client: Client, op) -> pb.Card:
        """Run `op(book, now) -> Card` in the writer, once per request id, with its audit
        event in the same transaction."""
        validate.request_id(request.request_id)

        def produce(book, now, _) -> bytes:
            rec = op(book, now)
            book.append_audit(now, client.id, client.role.name, f"{self.service}.{method}",
                              rec.card_number)
            if method in ("Verify", "Cancel"):  # GZ-27, RC-33: a card never made owes nothing
                for number in cards.fees_reversed(book, now, rec):
                    book.append_audit(now, client.id, client.role.name, "Ledger.Reverse", number,
                                      f"fee:{number} reversed: the card was never made "
                                      f"({_FEE_RULE[book.card(number).pack]})")
            return card_message(book, rec, now).SerializeToString()
        answer = await self.core.write_once(method, client, request.request_id, request, produce)
        return pb.Card.FromString(answer)

    def _card_op(self, method, request, client, fn, *args):
        validate.card_number(request.card_number)
        return self._write(method, request, client,
                           lambda book, now: fn(book, now, request.card_number, *args))


class Lifecycle(CardWrites):
    service = "Lifecycle"

    async def Apply(self, request, client: Client):
        validate.enum(request.pack, pb.Pack, "pack")
        holder = validate_holder(request.holder)
        # GZ-9's issuing bank is named missing with the rest (cards.application_missing)
        validate.bank(request.service_bank, "service_bank", required=False)
        validate.enum(request.residence_basis, pb.ResidenceBasis, "residence_basis",
                      allow_unspecified=True)
        proxy = validate_proxy(request.proxy) if request.HasField("proxy") else None
        h = request.holder
        eligibility = Eligibility(h.household_registered, h.insured, h.entitled_public_services,
                                  request.residence_registered_since, request.residence_basis)
        return await self._write("Apply", request, client, lambda book, now: cards.apply(
            book, now, pack=request.pack, holder=holder, eligibility=eligibility,
            with_transit=request.with_transit, service_bank=request.service_bank,
            instant=request.instant, role=client.role, banks=self.core.banks,
            client_id=client.id, reveal=client.role in PII_READERS, proxy=proxy))

    async def Verify(self, request, client: Client):
        validate.text(request.reason, "reason")
        validate.text(request.special_circumstances, "special_circumstances")
        return await self._card_op("Verify", request, client, cards.verify, request.approved,
                                   request.reason, client.role, request.special_circumstances)

    async def Issue(self, request, client: Client):
        validate.text(request.issuing_organ, "issuing_organ")
        return await self._card_op("Issue", request, client, cards.issue, client.role,
                                   request.issuing_organ)

    async def Activate(self, request, client: Client):
        return await self._card_op("Activate", request, client, cards.activate, client.role)

    async def OpenFinancial(self, request, client: Client):
        validate.bank(request.bank, "bank", required=True)
        return await self._card_op("OpenFinancial", request, client, cards.open_financial,
                                   request.bank)

    async def ReportTemporaryLoss(self, request, client: Client):
        return await self._card_op("ReportTemporaryLoss", request, client,
                                   cards.report_temporary_loss, client.role)

    async def ReportLoss(self, request, client: Client):
        return await self._card_op("ReportLoss", request, client, cards.report_loss, client.role)

    async def CancelLoss(self, request, client: Client):
        return await self._card_op("CancelLoss", request, client, cards.cancel_loss, client.role)

    async def ReportBankLoss(self, request, client: Client):
        return await self._card_op("ReportBankLoss", request, client, cards.report_bank_loss,
                                   client.role, self.core.banks)

    async def CancelBankLoss(self, request, client: Client):
        return await self._card_op("CancelBankLoss", request, client, cards.cancel_bank_loss,
                                   client.role, self.core.banks)

    async def Replace(self, request, client: Client):
        validate.enum(request.reason, pb.ReplaceReason, "reason")
        validate.bank(request.service_bank, "service_bank", required=False)
        return await self._card_op("Replace", request, client, cards.replace, request.reason,
                                   request.instant, client.role, request.service_bank,
                                   self.core.banks, request.quality_fault)

    async def Cancel(self, request, client: Client):
        validate.text(request.reason, "reason", required=True)
        validate.enum(request.ground, pb.CancelGround, "ground")
        return await self._card_op("Cancel", request, client, cards.cancel, request.reason,
                                   request.ground, client.role)

    async def LockApplication(self, request, client: Client):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op("LockApplication", request, client, cards.lock_application,
                                   request.channel, True)

    async def UnlockApplication(self, request, client: Client):
        validate.enum(request.channel, pb.Channel, "channel")
        return await self._card_op("UnlockApplication", request, client, cards.lock_application,
                                   request.channel, False)

    async def GetCard(self, request, client: Client):
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            rec = book.card(request.card_number)
            if rec is None:
                raise CardNotFound(request.card_number)
            return card_message(book, rec, now)

    async def IssueElectronic(self, request, client: Client):
        validate.request_id(request.request_id)
        validate.card_number(request.card_number)

        def op(book, now, _) -> bytes:
            number, rec = cards.issue_electronic(book, now, request.card_number, client.role)
            book.append_audit(now, client.id, client.role.name, "Lifecycle.IssueElectronic",
                              rec.card_number)
            return pb.ElectronicCard(number=number, card_number=rec.card_number,
                                     pack=rec.pack).SerializeToString()
        return pb.ElectronicCard.FromString(await self.core.write_once(
            "IssueElectronic", client, request.request_id, request, op))

"""The Ledger service (API.md)."""
from yikatong import cards, config, ledger
from yikatong.errors import (
    CardNotFound,
    InvalidArgument,
    TransferRefused,
)
from yikatong.model import (
    AccountKind,
    Phase,
    Reason,
    TransferKind,
    TransferStatus,
    holder_account_key,
    kind_of_account,
    operator_account_key,
)
from yikatong.server import validate
from yikatong.server.clients import Client
from yikatong.server.core import Core
from yikatong.v1 import yikatong_pb2 as pb


def transfer_answer(transfer_id: str, t) -> bytes:
    return pb.TransferResponse(transfer_id=transfer_id, status=t.status, amount_fen=t.amount,
                               timeout_at=t.timeout_at).SerializeToString()


# what ledger.reverse moves back (a hold is voided, a reversal not reversed)
_REVERSIBLE = (TransferKind.SINGLE, TransferKind.POST)
assert all(pb.TransferStatus.Value(f"TRANSFER_STATUS_{s.name}") == s for s in TransferStatus)


def _holder_of(book, card_number: str) -> int:
    rec = book.card(card_number)
    if rec is None:
        raise CardNotFound(card_number)
    return rec.holder_id


def _check_debit(book, key: bytes, now: int) -> None:
    """GZ-21, SH-18, GZ-26: money leaves a holder's medical or benefit account only while no
    current social security card of theirs stops it, the rule Authorize keeps
    (cards.debit_stopped): a debit, the post of a hold, a reversal taking a credit back;
    refused with the reason Authorize gives that card."""
    stop, why = cards.debit_stopped(book, key, now)
    if stop:
        raise TransferRefused(Reason(stop).name, f"nothing is debited from the holder's "
                              f"{AccountKind(kind_of_account(key)).name} account: {why}")


def _reverse_legs(book, now: int, client: Client, rid: str, original: str, amount: int,
                  fingerprint: bytes) -> bytes:
    """Reverse of a split tap's request id (issue 28 item 2): its legs undone last first,
    in one transaction (ledger.reverse_legs); one answer listing each leg's reversal, one
    audit event naming them."""
    if len(rid.encode("utf-8")) > config.request_id_bytes_max - 2:
        raise InvalidArgument("reversal_id", f"{original!r} is a split tap: the reversal_id of "
                              f"its legs has at most {config.request_id_bytes_max - 2} bytes "
                              "(each leg's reversal is <reversal_id>#N)")
    done = ledger.reverse_legs(book, now, rid, original, amount, role=client.role,
                               fingerprint=fingerprint)
    legs = [pb.Leg(account=kind_of_account(t.credit), amount_fen=t.amount,
                   transfer_id=f"{rid}#{leg_id.rsplit('#', 1)[1]}",
                   available_fen=ledger.available(book, t.credit, now)) for leg_id, t in done]
    book.append_audit(now, client.id, client.role.name, "Ledger.Reverse", purpose=(
        f"split {original}: " + ", ".join(f"{AccountKind(g.account).name} {g.amount_fen} fen "
                                          f"({g.transfer_id})" for g in legs)))
    return pb.TransferResponse(transfer_id=rid, status=TransferStatus.POSTED,
                               amount_fen=sum(g.amount_fen for g in legs),
                               legs=legs).SerializeToString()


class Ledger:
    def __init__(self, core: Core):
        self.core = core

    @staticmethod
    def _account_ref(ref, field: str):
        """Validate an AccountRef at the edge; returns (book -> account key, card number)."""
        which = ref.WhichOneof("account")
        if which == "operator":
            key = operator_account_key(validate.operator(ref.operator, f"{field}.operator"))
            return (lambda book: key), ""
        if which != "holder":
            raise InvalidArgument(field, "is required: a holder account or an operator account")
        number = validate.card_number(ref.holder.card_number, f"{field}.holder.card_number")
        kind = validate.enum(ref.holder.kind, pb.AccountKind, f"{field}.holder.kind")
        return (lambda book: holder_account_key(_holder_of(book, number), kind)), number

    async def Transfer(self, request, client: Client):
        tid = validate.request_id(request.transfer_id, "transfer_id")
        validate.enum(request.phase, pb.Phase, "phase", allow_unspecified=True)
        validate.timeout(request.timeout_seconds, "timeout_seconds")
        role = client.role
        if request.phase in (Phase.POST, Phase.VOID):
            pending_id = validate.request_id(request.pending_id, "pending_id")
            if request.HasField("debit") or request.HasField("credit"):
                raise InvalidArgument("debit", "a post or void names only pending_id")
            if request.phase == Phase.VOID and request.amount_fen:
                raise InvalidArgument("amount_fen", "a void moves no money; send 0")
            validate.amount(request.amount_fen, "amount_fen", zero_ok=True)

            def op(book, now, fingerprint):
                if request.phase == Phase.POST:  # the hold's own refusals first
                    _check_debit(book, ledger.resolvable(book, now, pending_id, 0, role).debit,
                                 now)
                answer = transfer_answer(tid, ledger.resolve(
                    book, now, tid, pending_id, post=request.phase == Phase.POST,
                    amount=request.amount_fen, role=role, fingerprint=fingerprint))
                book.append_audit(now, client.id, role.name, "Ledger.Transfer")
                return answer
        else:
            if request.pending_id:
                raise InvalidArgument("pending_id", "is only for PHASE_POST/PHASE_VOID")
            if request.timeout_seconds and request.phase != Phase.HOLD:
                raise InvalidArgument("timeout_seconds", "is only for PHASE_HOLD")
            if request.phase == Phase.HOLD and not request.timeout_seconds:
                raise InvalidArgument("timeout_seconds", "a hold needs a timeout")
            debit, debit_card = self._account_ref(request.debit, "debit")
            credit, credit_card = self._account_ref(request.credit, "credit")
            amount = validate.amount(request.amount_fen, "amount_fen", zero_ok=False)

            def op(book, now, fingerprint):
                debit_key = debit(book)
                if debit_card:
                    _check_debit(book, debit_key, now)
                answer = transfer_answer(tid, ledger.create(
                    book, now, tid, debit_key, credit(book), amount,
                    pending=request.phase == Phase.HOLD, timeout=request.timeout_seconds,
                    role=role, card_number=debit_card or credit_card, fingerprint=fingerprint))
                book.append_audit(now, client.id, role.name, "Ledger.Transfer",
                                  debit_card or credit_card)
                return answer
        return pb.TransferResponse.FromString(
            await self.core.write_once("Transfer", client, tid, request, op))

    async def Reverse(self, request, client: Client):
        original = validate.request_id(request.transfer_id, "transfer_id")
        rid = validate.request_id(request.reversal_id, "reversal_id")
        validate.amount(request.amount_fen, "amount_fen", zero_ok=True)
        role = client.role

        def op(book, now, fingerprint):
            done = ledger.get(book, original)
            if done is None and ledger.legs(book, original):
                return _reverse_legs(book, now, client, rid, original, request.amount_fen,
                                     fingerprint)
            if done is not None and done.kind in _REVERSIBLE and done.resolved < done.amount:
                _check_debit(book, done.credit, now)  # a credit taken back is a debit
            answer = transfer_answer(rid, ledger.reverse(book, now, rid, original,
                                                         request.amount_fen, role=role,
                                                         fingerprint=fingerprint))
            book.append_audit(now, client.id, role.name, "Ledger.Reverse")
            return answer
        return pb.TransferResponse.FromString(
            await self.core.write_once("Reverse", client, rid, request, op))

    async def GetBalances(self, request, client: Client):
        validate.card_number(request.card_number)
        now = self.core.clock.now()
        with self.core.store.read() as txn:
            book = self.core.store.book(txn)
            holder_id = _holder_of(book, request.card_number)
            out = []
            for kind in (pb.ACCOUNT_KIND_MEDICAL, pb.ACCOUNT_KIND_TRANSIT, pb.ACCOUNT_KIND_BENEFIT):
                key = holder_account_key(holder_id, kind)
                a = book.account(key)
                # holds past their timeout: released, a journey's settled at its max fare
                # (issue 28), from that second, swept or not
                held, fares = ledger.due(book, key, now)
                pending, posted = a.debits_pending - held, a.posted - fares
                out.append(pb.Balance(kind=kind, posted_fen=posted, pending_fen=pending,
                                      available_fen=posted - pending))
        return pb.GetBalancesResponse(balances=out)

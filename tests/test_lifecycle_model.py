"""Model-based: random lifecycle operations on cards of every pack, and clock moves, against a
plain in-memory model of the rules. After every step, the decision for every card on every
channel equals the model's; and (liveness) every holder still entitled can still reach an
ACTIVE card by some sequence of allowed commands, which a rule then walks on the real system.
Residence Cards also expire and are renewed (RC-14: the clock sometimes moves a year, or to a
second around a card's renewal window or expiry), and file changes of information (RC-13).
Runs in-process against the domain layer on each fast-path twin and, shorter, against the real
gRPC server."""
import copy
import datetime as dt
import uuid

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from yikatong import cards, config
from yikatong import clock as clocks
from yikatong.calendar import End, end_of_days_for_an_act, end_of_years_for_an_act, is_working_day
from yikatong.errors import InvalidTransition, YikatongError
from yikatong.fastpath import _authorize_py
from yikatong.model import (
    FINAL_STATES,
    CancelGround,
    Channel,
    Eligibility,
    HolderInfo,
    Pack,
    ReplaceReason,
    Role,
    State,
)
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

try:
    from yikatong.fastpath import _authorize_c
except ImportError:  # test_fastpath says whether that is allowed
    _authorize_c = None

T0 = 1_790_000_000
DAY = 86400
ORGAN = "上海市公安局黄浦分局"
# SH-9, GZ-9, RC-7: what every application records besides the fields each model varies
COMPLETE = dict(gender="F", nationality="CN", ethnicity="汉族", address="上海市黄浦区1号",
                postcode="200001")
OPS = ("verify_ok", "verify_no", "issue", "activate", "temp_loss", "loss", "cancel_loss",
       "open_financial", "bank_loss", "cancel_bank_loss", "replace_lost", "replace_damaged",
       "replace_info", "cancel_death", "withdraw", "lock", "unlock", "renew")


class ModelCard:
    def __init__(self, pack, holder, state, replaces=""):
        self.pack, self.holder, self.state, self.replaces = pack, holder, state, replaces
        self.transit = pack != Pack.RC
        self.financial = self.frozen = False
        self.temp_until = 0
        self.replaced_by = ""
        self.locks = set()
        self.valid_until = 0  # RC-14: set when an RC card is first issued, 0 = no end
        self.unactivated = False  # reported lost while ISSUED (SH-17, GZ-21)
        self.applied_at = 0  # of a replacement (RC-14 on a reissue)
        self.died = False  # cancelled on the holder's death (GZ-26)

    def effective(self, now):
        if self.state == State.TEMP_LOSS and now >= self.temp_until:
            return self.restored()
        return self.state

    def restored(self):
        """SH-18b, SH-19a, GZ-22: a loss ends in the state before it, ISSUED for a card
        never activated."""
        return State.ISSUED if self.unactivated else State.ACTIVE

    def lapsed(self, now):
        """RC-14: a Residence Card not renewed in time is suspended from 24:00 of its last
        day."""
        return self.pack == Pack.RC and self.valid_until != 0 and now >= self.valid_until

    def usable(self, now):
        return self.effective(now) == State.ACTIVE and not self.lapsed(now)

    def clone(self):
        other = copy.copy(self)
        other.locks = set(self.locks)
        return other


def renewal_opens(valid_until: int) -> int:
    """RC-14, DECISIONS.md: 00:00 of the day 30 days before the expiry date (the last day of
    validity, the day before the instant `valid_until`), or before the first of the rest days
    just before it (art. 203 may have moved the last day over them, not the window's start)."""
    day = clocks.law_date(valid_until - 1)
    while not is_working_day(day - dt.timedelta(days=1)):
        day -= dt.timedelta(days=1)
    return clocks.start_of_day(day - dt.timedelta(days=30))


def year_end(t: int) -> int:
    """RC-14: a year from `t`, to 24:00 of the corresponding day or, if that is a rest day,
    of the next working day (Civil Code art. 203, SPEC.md section 6); provisional ends kept."""
    return end_of_years_for_an_act(t, 1).at


def model_decision(c: ModelCard | None, channel: int, now: int) -> int:
    """SPEC.md section 4, written out again independently of fastpath/."""
    fin = channel == Channel.FINANCIAL
    if c is None:
        return 1
    state = c.effective(now)
    if state == State.SUPERSEDED:
        return 2
    if state == State.CANCELLED:
        return 3
    if state in (State.APPLIED, State.VERIFIED, State.REJECTED):
        return 5
    if state == State.ISSUED and not fin:
        return 6
    if state == State.LOST and (not fin or c.pack in (Pack.GZ, Pack.BJ)):
        return 7
    if state == State.TEMP_LOSS and not fin:
        return 8
    if c.lapsed(now):
        return 9
    if channel in c.locks:
        return 10
    if (channel == Channel.TRANSIT and not c.transit) or (fin and not c.financial):
        return 11
    if c.pack == Pack.RC and channel in (Channel.MEDICAL, Channel.BENEFIT):
        return 11  # RC-6: a Residence Card carries no medical or benefit account
    if fin and c.frozen:
        return 12
    return 0


def model_other_cards(cards_: dict, c: ModelCard, channel: int, now: int, reason: int) -> int:
    """GZ-21, SH-18, GZ-26 (docs/DECISIONS.md, "Stopped accounts on every path"): a card usable
    at MEDICAL or BENEFIT (approved, or locked only there) answers what the holder's account
    answers: the first of the holder's current SH, GZ, BJ cards (the newest of each pack, a
    replacement only once issued: SH-23c, its original is in force until then), its own
    pack's aside, that is lost (7), temporarily lost (8) or cancelled by death (3)."""
    if channel not in (Channel.MEDICAL, Channel.BENEFIT) or reason not in (0, 10):
        return reason
    for pack in (Pack.SH, Pack.GZ, Pack.BJ):
        if pack == c.pack:
            continue
        current = [o for o in cards_.values() if o.holder == c.holder and o.pack == pack
                   and not (o.replaces and cards_[o.replaces].state != State.SUPERSEDED)]
        if not current:
            continue
        state = current[-1].effective(now)
        if state == State.LOST:
            return 7
        if state == State.TEMP_LOSS:
            return 8
        if state == State.CANCELLED and current[-1].died:
            return 3
    return reason


def ssn_of(holder: int) -> str:
    first17 = f"310101198001{holder:05d}"
    return first17 + cards.ssn_check_digit(first17)


class InProcess:
    # decides on the card alone (the decision table, both twins); the holder's other cards
    # are the server's (authorize.other_cards), asked over gRPC
    holder_accounts = False

    def __init__(self, store, impl):
        self.store, self.impl = store, impl
        self.policy = impl.Policy(config.generation_retired_at)
        self.valid_until = 0  # of the card the last allowed operation returned
        self.refusal = ""  # the last refusal: its kind(message)

    def apply(self, now, pack, holder, instant, address):
        info = HolderInfo(ssn_of(holder), name="n", birth_date="1980-01-01", phone="1",
                          occupation="o", household_address="h", residence_address=address,
                          photo_sha256="ab" * 32, **COMPLETE)
        eligible = Eligibility(False, True, True, "2020-01-01", 1)  # RC-9: a migrant
        return self.store.write(lambda book: cards.apply(
            book, now, pack=pack, holder=info, eligibility=eligible,
            with_transit=pack != Pack.RC, service_bank="B", instant=instant)).card_number

    def op(self, now, name, number, pack, channel):
        role = {Pack.SH: Role.ONLINE_PLATFORM, Pack.RC: Role.COMMUNITY_OUTLET}.get(
            pack, Role.BANK_OUTLET)
        fn, args = {
            "verify_ok": (cards.verify, (True, "")), "verify_no": (cards.verify, (False, "no")),
            "issue": (cards.issue, (None, ORGAN if pack == Pack.RC else "")),
            "activate": (cards.activate, ()),
            "temp_loss": (cards.report_temporary_loss, ()),
            "loss": (cards.report_loss, (role,)), "cancel_loss": (cards.cancel_loss, (role,)),
            "open_financial": (cards.open_financial, ("B",)),
            "bank_loss": (cards.report_bank_loss, ()),
            "cancel_bank_loss": (cards.cancel_bank_loss, ()),
            "replace_lost": (cards.replace, (ReplaceReason.LOST, False)),
            "replace_damaged": (cards.replace, (ReplaceReason.DAMAGED, pack != Pack.RC)),
            "replace_info": (cards.replace, (ReplaceReason.INFO_CHANGED, False)),
            "cancel_death": (cards.cancel, ("death", CancelGround.DEATH)),
            "withdraw": (cards.cancel, ("withdrawn", CancelGround.APPLICATION_WITHDRAWN)),
            "lock": (cards.lock_application, (channel, True)),
            "unlock": (cards.lock_application, (channel, False)),
            "renew": (cards.renew, ()),
        }[name]
        try:
            rec = self.store.write(lambda book: fn(book, now, number, *args))
        except YikatongError as e:
            self.refusal = f"{type(e).__name__}({e})"
            return None
        self.valid_until = rec.valid_until
        return rec.card_number

    def change_information(self, now, number, address, changed_on):
        """RC-13: (due, late), or None if refused for the card's pack or state."""
        given = HolderInfo("", residence_address=address)
        try:
            _, due, late = self.store.write(lambda book: cards.change_information(
                book, now, number, given, changed_on, "model"))
        except InvalidTransition:  # the pack, the state
            return None
        return due, late

    def decide(self, number, channel, now):
        with self.store.read() as txn:
            record = self.store.book(txn).card_bytes(number)
        return self.impl.decide(self.policy, record, channel, now, 0)

    def tick(self, seconds):
        pass


class OverGrpc:
    """The same operations as gRPC calls to a real server on a manual clock, each by a role
    the law names for the card's pack."""

    METHODS = {
        "verify_ok": ("Verify", "CARD_AGENCY", {"approved": True}),
        "verify_no": ("Verify", "CARD_AGENCY", {"approved": False, "reason": "no"}),
        "issue": ("Issue", "CARD_AGENCY", {}), "activate": ("Activate", "ONLINE_PLATFORM", {}),
        "temp_loss": ("ReportTemporaryLoss", "SERVICE_HOTLINE", {}),
        "loss": ("ReportLoss", None, {}), "cancel_loss": ("CancelLoss", None, {}),
        "open_financial": ("OpenFinancial", "BANK_OUTLET", {"bank": "B"}),
        "bank_loss": ("ReportBankLoss", "BANK_OUTLET", {}),
        "cancel_bank_loss": ("CancelBankLoss", "BANK_OUTLET", {}),
        "replace_lost": ("Replace", None, {"reason": pb.REPLACE_REASON_LOST}),
        "replace_damaged": ("Replace", None, {"reason": pb.REPLACE_REASON_DAMAGED}),
        "replace_info": ("Replace", None, {"reason": pb.REPLACE_REASON_INFO_CHANGED}),
        "cancel_death": ("Cancel", "CARD_AGENCY", {"reason": "death",
                                                   "ground": pb.CANCEL_GROUND_DEATH}),
        "withdraw": ("Cancel", "CARD_AGENCY", {
            "reason": "withdrawn", "ground": pb.CANCEL_GROUND_APPLICATION_WITHDRAWN}),
        "lock": ("LockApplication", "BANK_OUTLET", {}),
        "unlock": ("UnlockApplication", "BANK_OUTLET", {}),
        "renew": ("Renew", "COMMUNITY_OUTLET", {}),  # RC-14: at the community service centre
    }
    holder_accounts = True  # Authorize asks the holder's other cards at MEDICAL, BENEFIT
    CHANNEL_ROLE = {1: "TRANSIT_GATE", 2: "MEDICAL_TERMINAL", 3: "BENEFIT_COUNTER",
                    4: "BANK_SWITCH", 5: "COMMUNITY_OUTLET", 6: "BANK_SWITCH"}
    # who files for each pack where the law names them (SH-18c, GZ-7, GZ-21, GZ-23, RC-15b)
    OUTLET = {Pack.SH: "COMMUNITY_OUTLET", Pack.GZ: "BANK_OUTLET", Pack.BJ: "BANK_OUTLET",
              Pack.RC: "COMMUNITY_OUTLET"}

    def __init__(self, server):
        self.s = server
        self.residence = rpc.ResidenceCardStub(server.channel)
        self.valid_until = 0
        self.refusal = ""

    def apply(self, now, pack, holder, instant, address):
        h = pb.Holder(ssn=ssn_of(holder), name="n", phone="1", occupation="o",
                      birth_date="1980-01-01", household_registered=False, insured=True,
                      entitled_public_services=True, household_address="h",
                      residence_address=address, photo_sha256="ab" * 32, **COMPLETE)
        try:
            return self.s.lifecycle.Apply(pb.ApplyRequest(
                request_id=uuid.uuid4().hex, pack=pack, holder=h, with_transit=pack != Pack.RC,
                service_bank="B" if pack != Pack.RC else "", instant=instant,
                residence_registered_since="2020-01-01",
                residence_basis=pb.RESIDENCE_BASIS_EMPLOYMENT),
                metadata=self.s.md(self.OUTLET[pack])).card_number
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            raise YikatongError(e.details()) from None

    def op(self, now, name, number, pack, channel):
        method, role, fields = self.METHODS[name]
        if pack == Pack.RC and method in ("Verify", "Issue", "Cancel"):
            role = "PUBLIC_SECURITY"  # RC-11, RC-12, RC-16: theirs alone
        if role is None:
            role = "ONLINE_PLATFORM" if pack == Pack.SH and name != "replace_damaged" \
                else self.OUTLET[pack]
        if name in ("lock", "unlock"):
            fields = {"channel": channel}
        if name == "replace_damaged" and pack != Pack.RC:
            fields = {**fields, "instant": True}
        if name == "issue" and pack == Pack.RC:
            fields = {"issuing_organ": ORGAN}
        request = getattr(pb, method + "Request")(request_id=uuid.uuid4().hex,
                                                  card_number=number, **fields)
        service = self.residence if name == "renew" else self.s.lifecycle
        try:
            card = getattr(service, method)(request, metadata=self.s.md(role))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            self.refusal = f"{e.code().name}({e.details()})"
            return None
        self.valid_until = card.valid_until
        return card.card_number

    def change_information(self, now, number, address, changed_on):
        try:
            answer = self.residence.ChangeInformation(pb.ChangeInformationRequest(
                request_id=uuid.uuid4().hex, card_number=number,
                holder=pb.Holder(residence_address=address), changed_on=changed_on),
                metadata=self.s.md("COMMUNITY_OUTLET"))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            return None
        assert answer.card.card_number == number
        return End(answer.due_at, answer.provisional), answer.late

    def decide(self, number, channel, now):
        return self.s.authorization.Authorize(pb.AuthorizeRequest(
            request_id="d", card_number=number, channel=channel),
            metadata=self.s.md(self.CHANNEL_ROLE[channel])).reason

    def tick(self, seconds):
        self.s.admin.AdvanceClock(pb.AdvanceClockRequest(seconds=seconds),
                                  metadata=self.s.md("ADMIN"))


# ---- the model's rules, over a dict of ModelCards (so a search can run them on copies)

def holder_cards(cards_: dict, holder: int, pack: int, now: int) -> list:
    return [c for c in cards_.values() if c.holder == holder and c.pack == pack
            and c.effective(now) not in FINAL_STATES]


def expect(cards_: dict, name: str, c: ModelCard, channel: int, now: int):
    """The model's answer: None if refused, else a function that applies it."""
    s = c.effective(now)
    final = s in FINAL_STATES
    sh, rc = c.pack == Pack.SH, c.pack == Pack.RC
    pending = bool(c.replaced_by)

    def to(state):
        def go():
            c.state = state
        return go
    if name == "verify_ok" and s == State.APPLIED:
        return to(State.VERIFIED)
    if name == "verify_no" and s == State.APPLIED:
        def go():  # a rejected replacement frees its original (SH-10)
            c.state = State.REJECTED
            if c.replaces:
                cards_[c.replaces].replaced_by = ""
        return go
    if name == "issue" and s == State.VERIFIED:
        return lambda: issue(cards_, c, now)
    if name == "activate" and s == State.ISSUED and not rc:
        return to(State.ACTIVE)
    # SH-17, SH-18, GZ-21: a card issued and not yet activated is reported lost too
    if name == "temp_loss" and sh and s in (State.ISSUED, State.ACTIVE):
        def go():
            c.state, c.temp_until = State.TEMP_LOSS, clocks.end_of_days(now, 5)
            c.unactivated = s == State.ISSUED
        return go
    if name == "loss" and (s in (State.ISSUED, State.ACTIVE) or (sh and s == State.TEMP_LOSS)):
        def go():
            if s != State.TEMP_LOSS:
                c.unactivated = s == State.ISSUED
            c.state = State.LOST
        return go
    if name == "cancel_loss" and ((sh and s in (State.TEMP_LOSS, State.LOST))
                                  or (c.pack in (Pack.GZ, Pack.BJ) and s == State.LOST
                                      and not pending)):
        def go():
            c.state, c.unactivated = c.restored(), False
        return go
    if (name == "open_financial" and not rc and s in (State.ISSUED, State.ACTIVE)
            and not c.financial):
        def go():
            c.financial = True
        return go
    # GZ-21: a loss registered at a Guangzhou or Beijing bank is the card's (LOST); GZ-22:
    # deregistered at the bank's outlet. A financial-only bank loss is Shanghai's (SH-20).
    gzbj = c.pack in (Pack.GZ, Pack.BJ)
    if name == "bank_loss" and gzbj and s in (State.ISSUED, State.ACTIVE):
        def go():
            c.unactivated, c.state = s == State.ISSUED, State.LOST
        return go
    if name == "cancel_bank_loss" and gzbj and s == State.LOST and not pending:
        def go():
            c.state, c.unactivated = c.restored(), False
        return go
    if name == "bank_loss" and c.financial and not c.frozen and not final and not gzbj:
        def go():
            c.frozen = True
        return go
    if name == "cancel_bank_loss" and c.frozen and not final and not gzbj:
        def go():
            c.frozen = False
        return go
    if name in ("replace_lost", "replace_damaged", "replace_info") and not pending and (
            (name == "replace_lost" and s == State.LOST)
            or (name != "replace_lost" and s in (State.ISSUED, State.ACTIVE)
                and not (name == "replace_info" and rc))):  # RC-13: information is filed
        return "replace"
    if name == "cancel_death" and not final:
        def go():  # GZ-26: every card of the holder in the pack stops
            for other in holder_cards(cards_, c.holder, c.pack, now) + [c]:
                other.state, other.died = State.CANCELLED, True
        return go
    if name == "withdraw" and s in (State.APPLIED, State.VERIFIED):
        def go():  # only this application; an original may be replaced again
            c.state = State.CANCELLED
            if c.replaces:
                cards_[c.replaces].replaced_by = ""
        return go
    # GZ-6, BJ-7: application locks are a bank service of Guangzhou and Beijing cards only
    if name in ("lock", "unlock") and c.pack in (Pack.GZ, Pack.BJ) and not final \
            and (channel in c.locks) == (name == "unlock"):
        def go():
            (c.locks.discard if name == "unlock" else c.locks.add)(channel)
        return go
    # RC-14: a card in force, suspended for want of renewal, or lost (its renewal carries to
    # the reissue), from 30 days before expiry. In time, the next year follows on from the
    # old end; lapsed, it is in force again at once, for a year from today.
    if name == "renew" and rc and s in (State.ACTIVE, State.LOST) \
            and now >= renewal_opens(c.valid_until):
        def go():
            c.valid_until = year_end(c.valid_until - 1 if now < c.valid_until else now)
        return go
    return None


def issue(cards_: dict, c: ModelCard, now: int) -> None:
    c.state = State.ACTIVE if c.pack == Pack.RC else State.ISSUED
    if c.pack == Pack.RC and not c.valid_until:  # RC-14: one year from its issue
        c.valid_until = year_end(now)
    if c.replaces:
        if c.pack == Pack.RC:  # RC-14: the original's validity as it is now (renewed or not)
            old = cards_[c.replaces].valid_until
            c.valid_until = old
            if old <= now:  # never issued lapsed: on from the old end if applied before it
                c.valid_until = year_end(old - 1 if c.applied_at < old else now)
        cards_[c.replaces].state = State.SUPERSEDED


def replaced(cards_: dict, name: str, c: ModelCard, number: str, new_number: str,
             now: int) -> None:
    instant = name == "replace_damaged" and c.pack != Pack.RC
    # SH-22: a Shanghai re-application goes through verification again
    first = State.APPLIED if name == "replace_info" and c.pack == Pack.SH else State.VERIFIED
    new = ModelCard(c.pack, c.holder, first, replaces=number)
    new.applied_at = now
    new.transit, new.financial = c.transit, c.financial
    # a replacement carries the original's validity; a renewal of the original while the
    # new card is made is carried over when it is issued (issue)
    new.valid_until = c.valid_until
    c.replaced_by = new_number
    cards_[new_number] = new
    if instant:
        issue(cards_, new, now)


def can_apply(cards_: dict, holder: int, pack: int, now: int) -> bool:
    return not holder_cards(cards_, holder, pack, now)


def cloned(cards_: dict) -> dict:
    return {number: c.clone() for number, c in cards_.items()}


def path_to_active(cards_: dict, holder: int, pack: int, now: int, depth: int = 6):
    """A shortest sequence of commands the model allows that gives the holder an ACTIVE card
    of the pack, in force (RC-14: renewed if it lapsed): [(name, card number or None for an
    application)], or None. Every command touches only the holder's cards of the pack, so
    only those are searched (and copied)."""
    mine = {n: c for n, c in cards_.items() if c.holder == holder and c.pack == pack}
    frontier = [(mine, [])]
    for _ in range(depth + 1):
        following = []
        for state, path in frontier:
            if any(c.usable(now) for c in holder_cards(state, holder, pack, now)):
                return path
            if can_apply(state, holder, pack, now):
                nxt = cloned(state)
                nxt[f"new{len(path)}"] = ModelCard(pack, holder, State.APPLIED)
                following.append((nxt, path + [("apply", None)]))
            for number, c in state.items():
                for name in OPS:
                    if name in ("cancel_death", "withdraw", "lock", "unlock", "verify_no"):
                        continue  # never on the way to an active card
                    if expect(state, name, c, Channel.MEDICAL, now) is None:
                        continue
                    nxt = cloned(state)
                    go = expect(nxt, name, nxt[number], Channel.MEDICAL, now)
                    if go == "replace":
                        replaced(nxt, name, nxt[number], number, f"new{len(path)}", now)
                    else:
                        go()
                    following.append((nxt, path + [(name, number)]))
        frontier = following
    return None


class LifecycleModel(RuleBasedStateMachine):
    backend_factory = None  # set by the test classes below

    def __init__(self):
        super().__init__()
        self.backend, self.cleanup = type(self).backend_factory()
        self.now = T0
        self.cards: dict[str, ModelCard] = {}
        self.holders = 0
        self.last = ""
        self.unentitled: set[tuple[int, int]] = set()  # (holder, pack) cancelled for death
        self.moves = 0  # RC-13: each filing moves the holder to a new address
        self.address: dict[int, str] = {}  # holder -> the residence address held

    def teardown(self):
        self.cleanup()

    def _apply(self, pack, holder, instant):
        blocked = not can_apply(self.cards, holder, pack, self.now) or (
            instant and pack == Pack.SH)  # SH-23b: a first SH application is never instant
        try:
            # GZ-20: the information held (after RC-13 filings) is given again unchanged
            number = self.backend.apply(self.now, pack, holder, instant,
                                        self.address.get(holder, "r"))
        except YikatongError:
            number = None
        assert (number is None) == blocked, (Pack(pack).name, instant)
        if number:
            self.cards[number] = ModelCard(pack, holder, State.ISSUED if instant else State.APPLIED)
            self.last = number
        return number

    @precondition(lambda self: len(self.cards) < 6)  # then the steps go to what cards do
    @rule(pack=st.sampled_from((Pack.SH, Pack.GZ, Pack.BJ, Pack.RC)),
          new_holder=st.booleans(), instant=st.booleans())
    def apply(self, pack, new_holder, instant):
        if new_holder or not self.holders:
            self.holders += 1
        self._apply(pack, self.holders, instant and pack != Pack.RC)

    def _operate(self, name, number, channel):
        c = self.cards[number]
        go = expect(self.cards, name, c, channel, self.now)
        got = self.backend.op(self.now, name, number, c.pack, channel)
        assert (got is None) == (go is None), (name, Pack(c.pack).name,
                                               State(c.effective(self.now)).name)
        if go is None and name == "renew" and c.pack == Pack.RC \
                and c.effective(self.now) == State.ACTIVE:  # RC-14: says when it opens
            opens = clocks.law_date(renewal_opens(c.valid_until)).isoformat()
            assert self.backend.refusal.startswith(("Refused(RC-14: ", "FAILED_PRECONDITION(")) \
                and f"renewal opens on {opens}" in self.backend.refusal, self.backend.refusal
        if go == "replace":
            replaced(self.cards, name, c, number, got, self.now)
        elif go is not None:
            if name == "cancel_death":
                self.unentitled.add((c.holder, c.pack))
            go()
        if c.state == State.TEMP_LOSS and c.effective(self.now) != State.TEMP_LOSS:
            c.state, c.unactivated = c.effective(self.now), False
        if got is not None:  # the card the call answered with: its validity, to the second
            assert self.backend.valid_until == self.cards[got].valid_until, (
                name, got, self.backend.valid_until, self.cards[got].valid_until)
        return got

    @precondition(lambda self: self.cards)
    @rule(data=st.data(), steer=st.integers(0, 9), focus=st.integers(0, 3),
          channel=st.sampled_from((Channel.TRANSIT, Channel.MEDICAL, Channel.FINANCIAL)))
    def operate(self, data, steer, focus, channel):
        """Mostly an operation the model allows, often on the card touched last (so cards
        travel far along their lifecycle), sometimes anything (so refusals are checked)."""
        number = (self.last if focus and self.last in self.cards
                  else data.draw(st.sampled_from(sorted(self.cards))))
        self.last = number
        c = self.cards[number]
        allowed = [n for n in OPS if expect(self.cards, n, c, channel, self.now) is not None]
        if steer < 9:  # death is rare, or few cards would live long
            allowed = [n for n in allowed if n != "cancel_death"] or allowed
        name = data.draw(st.sampled_from(allowed if allowed and steer else OPS))
        self._operate(name, number, channel)

    @rule(seconds=st.sampled_from((1, 3600, DAY, 5 * DAY - 1, 5 * DAY, 6 * DAY, 300 * DAY)))
    def tick(self, seconds):
        self.now += seconds
        self.backend.tick(seconds)

    @precondition(lambda self: any(c.valid_until > self.now for c in self.cards.values()))
    @rule(data=st.data(), expiry=st.booleans(), before=st.booleans(), renew=st.booleans())
    def to_the_edge_of_validity(self, data, expiry, before, renew):
        """RC-14: to the last second before, or the first of, a Residence Card's renewal
        window or its suspension; there, maybe, renew it."""
        number = data.draw(st.sampled_from(sorted(
            n for n, c in self.cards.items() if c.valid_until > self.now)))
        c = self.cards[number]
        edge = (c.valid_until if expiry else renewal_opens(c.valid_until)) - before
        if edge > self.now:
            self.tick(edge - self.now)
        if renew:
            self._operate("renew", number, Channel.MEDICAL)

    @precondition(lambda self: self.cards)
    @rule(data=st.data(), residence=st.booleans(),
          days_ago=st.sampled_from((0, 1, 29, 30, 31, 45)))
    def change_information(self, data, residence, days_ago):
        """RC-13: a Residence Card holder files a change within 30 days of it (to 24:00 of
        the 30th day after it); a late filing is taken and marked late. Only on a Residence
        Card in force or lost (a lapsed one is still ACTIVE)."""
        rc = sorted(n for n, c in self.cards.items() if c.pack == Pack.RC)
        number = data.draw(st.sampled_from(rc if residence and rc else sorted(self.cards)))
        c = self.cards[number]
        changed = clocks.law_date(self.now) - dt.timedelta(days=days_ago)
        # to 24:00 of the 30th day, or of the next working day (Civil Code art. 203); a year
        # without its notice counted provisionally, and late only past any official end
        due_at = end_of_days_for_an_act(clocks.start_of_day(changed), 30)
        allowed = c.pack == Pack.RC and c.effective(self.now) in (State.ACTIVE, State.LOST)
        self.moves += 1
        address = f"上海市黄浦区{self.moves}号"
        got = self.backend.change_information(self.now, number, address, changed.isoformat())
        assert (got is not None) == allowed, (Pack(c.pack).name, State(c.state).name)
        if got is not None:
            self.address[c.holder] = address
            due, late = got
            assert due == due_at, (changed, due)
            margin = cards.PROVISIONAL_MARGIN_DAYS * 86400 if due_at.provisional else 0
            assert late == (self.now >= due_at.at + margin), (
                days_ago, clocks.format_time(self.now), due)

    def _entitled(self):
        return sorted({(c.holder, c.pack) for c in self.cards.values()} - self.unentitled)

    @invariant()
    def every_entitled_holder_can_still_reach_an_active_card(self):
        """GZ-26, RC-16: only death or loss of entitlement ends a holder's cards for good;
        from every other reachable state some sequence of allowed commands leads to ACTIVE."""
        for holder, pack in self._entitled():
            assert path_to_active(self.cards, holder, pack, self.now) is not None, (
                holder, Pack(pack).name,
                [(n, State(c.state).name, c.replaced_by) for n, c in self.cards.items()
                 if c.holder == holder and c.pack == pack])

    @precondition(lambda self: self.cards)
    @rule(data=st.data())
    def recover(self, data):
        """Walk one entitled holder's path to an ACTIVE card on the real system."""
        entitled = self._entitled()
        if not entitled:
            return
        holder, pack = data.draw(st.sampled_from(entitled))
        path = path_to_active(self.cards, holder, pack, self.now)
        names = {}  # the path's placeholders ("new<step>") -> the real card numbers
        for i, (name, number) in enumerate(path):
            if name == "apply":
                names[f"new{i}"] = self._apply(pack, holder, False)
                continue
            got = self._operate(name, names.get(number, number), Channel.MEDICAL)
            assert got is not None, (name, i, path)
            if name.startswith("replace"):
                names[f"new{i}"] = got
        # STATUS is never locked (GZ-6 locks the using channels): approved = ACTIVE and usable
        assert any(self.backend.decide(n, Channel.STATUS, self.now) == 0
                   for n, c in self.cards.items() if c.holder == holder and c.pack == pack)

    @invariant()
    def every_decision_matches_the_model(self):
        for number, c in self.cards.items():
            for channel in Channel:
                want = model_decision(c, channel, self.now)
                if self.backend.holder_accounts:
                    want = model_other_cards(self.cards, c, channel, self.now, want)
                got = self.backend.decide(number, channel, self.now)
                assert got == want, (number, Pack(c.pack).name, State(c.state).name,
                                     channel, got, want)


def _in_process(impl):
    def factory():
        import tempfile

        from yikatong.storage.lmdb_store import Store
        tmp = tempfile.TemporaryDirectory()
        store = Store(tmp.name, map_size=32 * 1024**2)

        def cleanup():
            store.close()
            tmp.cleanup()
        return InProcess(store, impl), cleanup
    return staticmethod(factory)


def _over_grpc():
    import pathlib
    import tempfile

    from yikatong.server.harness import ServerProcess
    tmp = tempfile.TemporaryDirectory()
    server = ServerProcess(pathlib.Path(tmp.name), "--clock", "manual", "--clock-start",
                           clocks.format_time(T0))

    def cleanup():
        server.stop()
        tmp.cleanup()
    return OverGrpc(server), cleanup


class InProcessPython(LifecycleModel):
    backend_factory = _in_process(_authorize_py)


class GrpcModel(LifecycleModel):
    backend_factory = staticmethod(_over_grpc)


TestLifecycleModelInProcess = InProcessPython.TestCase
TestLifecycleModelInProcess.settings = settings(max_examples=100, stateful_step_count=80,
                                                deadline=None)
if _authorize_c is not None:
    class InProcessCompiled(LifecycleModel):
        backend_factory = _in_process(_authorize_c)

    TestLifecycleModelInProcessCompiled = InProcessCompiled.TestCase
    TestLifecycleModelInProcessCompiled.settings = settings(
        max_examples=100, stateful_step_count=80, deadline=None)
TestLifecycleModelOverGrpc = pytest.mark.slow(GrpcModel.TestCase)
TestLifecycleModelOverGrpc.settings = settings(max_examples=6, stateful_step_count=50,
                                               deadline=None)

"""Model-based: random lifecycle operations on cards of every pack, and clock moves, against a
plain in-memory model of the rules. After every step, the decision for every card on every
channel equals the model's; and (liveness) every holder still entitled can still reach an
ACTIVE card by some sequence of allowed commands, which a rule then walks on the real system.
Runs in-process against the domain layer on each fast-path twin and, shorter, against the real
gRPC server."""
import copy
import uuid

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from yikatong import cards, config
from yikatong import clock as clocks
from yikatong.errors import YikatongError
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

try:
    from yikatong.fastpath import _authorize_c
except ImportError:  # test_fastpath says whether that is allowed
    _authorize_c = None

T0 = 1_790_000_000
DAY = 86400
ORGAN = "上海市公安局黄浦分局"
OPS = ("verify_ok", "verify_no", "issue", "activate", "temp_loss", "loss", "cancel_loss",
       "open_financial", "bank_loss", "cancel_bank_loss", "replace_lost", "replace_damaged",
       "replace_info", "cancel_death", "withdraw", "lock", "unlock")


class ModelCard:
    def __init__(self, pack, holder, state, replaces=""):
        self.pack, self.holder, self.state, self.replaces = pack, holder, state, replaces
        self.transit = pack != Pack.RC
        self.financial = self.frozen = False
        self.temp_until = 0
        self.replaced_by = ""
        self.locks = set()

    def effective(self, now):
        if self.state == State.TEMP_LOSS and now >= self.temp_until:
            return State.ACTIVE
        return self.state


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
    if channel in c.locks:
        return 10
    if (channel == Channel.TRANSIT and not c.transit) or (fin and not c.financial):
        return 11
    if fin and c.frozen:
        return 12
    return 0


def ssn_of(holder: int) -> str:
    first17 = f"310101198001{holder:05d}"
    return first17 + cards.ssn_check_digit(first17)


class InProcess:
    def __init__(self, store, impl):
        self.store, self.impl = store, impl
        self.policy = impl.Policy(config.generation_retired_at)

    def apply(self, now, pack, holder, instant):
        info = HolderInfo(ssn_of(holder), name="n", birth_date="1980-01-01", phone="1",
                          occupation="o", household_address="h", residence_address="r")
        eligible = Eligibility(True, True, True, "2020-01-01", 1)
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
        }[name]
        try:
            rec = self.store.write(lambda book: fn(book, now, number, *args))
        except YikatongError:
            return None
        return rec.card_number

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
    }
    CHANNEL_ROLE = {1: "TRANSIT_GATE", 2: "MEDICAL_TERMINAL", 3: "BENEFIT_COUNTER",
                    4: "BANK_SWITCH", 5: "COMMUNITY_OUTLET", 6: "BANK_SWITCH"}
    # who files for each pack where the law names them (SH-18c, GZ-7, GZ-21, GZ-23, RC-15b)
    OUTLET = {Pack.SH: "COMMUNITY_OUTLET", Pack.GZ: "BANK_OUTLET", Pack.BJ: "BANK_OUTLET",
              Pack.RC: "COMMUNITY_OUTLET"}

    def __init__(self, server):
        self.s = server

    def apply(self, now, pack, holder, instant):
        h = pb.Holder(ssn=ssn_of(holder), name="n", phone="1", occupation="o",
                      birth_date="1980-01-01", household_registered=True, insured=True,
                      entitled_public_services=True, household_address="h",
                      residence_address="r")
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
        try:
            return getattr(self.s.lifecycle, method)(request, metadata=self.s.md(role)).card_number
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            return None

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
        return lambda: issue(cards_, c)
    if name == "activate" and s == State.ISSUED and not rc:
        return to(State.ACTIVE)
    if name == "temp_loss" and sh and s == State.ACTIVE:
        def go():
            c.state, c.temp_until = State.TEMP_LOSS, clocks.end_of_days(now, 5)
        return go
    if name == "loss" and (s == State.ACTIVE or (sh and s == State.TEMP_LOSS)):
        return to(State.LOST)
    if name == "cancel_loss" and ((sh and s in (State.TEMP_LOSS, State.LOST))
                                  or (c.pack in (Pack.GZ, Pack.BJ) and s == State.LOST
                                      and not pending)):
        return to(State.ACTIVE)
    if (name == "open_financial" and not rc and s in (State.ISSUED, State.ACTIVE)
            and not c.financial):
        def go():
            c.financial = True
        return go
    if name == "bank_loss" and c.financial and not c.frozen and not final:
        def go():
            c.frozen = True
        return go
    if name == "cancel_bank_loss" and c.frozen and not final:
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
                other.state = State.CANCELLED
        return go
    if name == "withdraw" and s in (State.APPLIED, State.VERIFIED):
        def go():  # only this application; an original may be replaced again
            c.state = State.CANCELLED
            if c.replaces:
                cards_[c.replaces].replaced_by = ""
        return go
    if name in ("lock", "unlock") and not final and (channel in c.locks) == (name == "unlock"):
        def go():
            (c.locks.discard if name == "unlock" else c.locks.add)(channel)
        return go
    return None


def issue(cards_: dict, c: ModelCard) -> None:
    c.state = State.ACTIVE if c.pack == Pack.RC else State.ISSUED
    if c.replaces:
        cards_[c.replaces].state = State.SUPERSEDED


def replaced(cards_: dict, name: str, c: ModelCard, number: str, new_number: str) -> None:
    instant = name == "replace_damaged" and c.pack != Pack.RC
    # SH-22: a Shanghai re-application goes through verification again
    first = State.APPLIED if name == "replace_info" and c.pack == Pack.SH else State.VERIFIED
    new = ModelCard(c.pack, c.holder, first, replaces=number)
    new.transit, new.financial = c.transit, c.financial
    c.replaced_by = new_number
    cards_[new_number] = new
    if instant:
        issue(cards_, new)


def can_apply(cards_: dict, holder: int, pack: int, now: int) -> bool:
    return not holder_cards(cards_, holder, pack, now)


def path_to_active(cards_: dict, holder: int, pack: int, now: int, depth: int = 6):
    """A shortest sequence of commands the model allows that gives the holder an ACTIVE card
    of the pack: [(name, card number or None for an application)], or None."""
    frontier = [(cards_, [])]
    for _ in range(depth + 1):
        following = []
        for state, path in frontier:
            if any(c.effective(now) == State.ACTIVE for c in holder_cards(state, holder, pack,
                                                                             now)):
                return path
            if can_apply(state, holder, pack, now):
                nxt = copy.deepcopy(state)
                nxt[f"new{len(path)}"] = ModelCard(pack, holder, State.APPLIED)
                following.append((nxt, path + [("apply", None)]))
            for number, c in state.items():
                if c.holder != holder or c.pack != pack:
                    continue
                for name in OPS:
                    if name in ("cancel_death", "withdraw", "lock", "unlock", "verify_no"):
                        continue  # never on the way to an active card
                    if expect(state, name, c, Channel.MEDICAL, now) is None:
                        continue
                    nxt = copy.deepcopy(state)
                    go = expect(nxt, name, nxt[number], Channel.MEDICAL, now)
                    if go == "replace":
                        replaced(nxt, name, nxt[number], number, f"new{len(path)}")
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

    def teardown(self):
        self.cleanup()

    def _apply(self, pack, holder, instant):
        blocked = not can_apply(self.cards, holder, pack, self.now) or (
            instant and pack == Pack.SH)  # SH-23b: a first SH application is never instant
        try:
            number = self.backend.apply(self.now, pack, holder, instant)
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
        if go == "replace":
            replaced(self.cards, name, c, number, got)
        elif go is not None:
            if name == "cancel_death":
                self.unentitled.add((c.holder, c.pack))
            go()
        if c.state == State.TEMP_LOSS and c.effective(self.now) == State.ACTIVE:
            c.state = State.ACTIVE
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

    @rule(seconds=st.sampled_from((1, 3600, DAY, 5 * DAY - 1, 5 * DAY, 6 * DAY)))
    def tick(self, seconds):
        self.now += seconds
        self.backend.tick(seconds)

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

"""Model-based: random lifecycle operations on cards of every pack, and clock moves, against a
plain in-memory model of the rules. After every step, the decision for every card on every
channel equals the model's. Runs in-process against the domain layer (fast) and, shorter,
against the real gRPC server."""
import uuid

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from yikatong import cards, config, fastpath
from yikatong import clock as clocks
from yikatong.errors import YikatongError
from yikatong.model import (
    FINAL_STATES,
    Channel,
    Eligibility,
    HolderInfo,
    Pack,
    ReplaceReason,
    Role,
    State,
)
from yikatong.v1 import yikatong_pb2 as pb

T0 = 1_790_000_000
FIVE_DAYS = config.temp_loss_valid_seconds
SOCIAL = (Pack.SH, Pack.GZ, Pack.BJ)
OPS = ("verify_ok", "verify_no", "issue", "activate", "temp_loss", "loss", "cancel_loss",
       "open_financial", "bank_loss", "cancel_bank_loss", "replace_lost", "replace_damaged",
       "cancel", "lock", "unlock")


class ModelCard:
    def __init__(self, pack, holder, state, replaces=""):
        self.pack, self.holder, self.state, self.replaces = pack, holder, state, replaces
        self.transit = pack != Pack.RC
        self.financial = self.frozen = False
        self.temp_at = 0
        self.replaced_by = ""
        self.locks = set()

    def effective(self, now):
        if self.state == State.TEMP_LOSS and now >= self.temp_at + FIVE_DAYS:
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


class InProcess:
    def __init__(self, store):
        self.store, self.policy = store, fastpath.Policy(config.generation_retired_at, FIVE_DAYS)

    def apply(self, now, pack, holder, instant):
        first17 = f"310101198001{holder:05d}"
        ssn = first17 + cards.ssn_check_digit(first17)
        holder = HolderInfo(ssn, name="n", birth_date="1980-01-01")
        eligible = Eligibility(True, True, True, "2020-01-01", 1)
        return self.store.write(lambda book: cards.apply(
            book, now, pack=pack, holder=holder, eligibility=eligible,
            with_transit=pack != Pack.RC, service_bank="B", instant=instant)).card_number

    def op(self, now, name, number, pack, channel):
        role = {Pack.SH: Role.ONLINE_PLATFORM}.get(pack, Role.BANK_OUTLET)
        fn, args = {
            "verify_ok": (cards.verify, (True, "")), "verify_no": (cards.verify, (False, "no")),
            "issue": (cards.issue, ()), "activate": (cards.activate, ()),
            "temp_loss": (cards.report_temporary_loss, ()),
            "loss": (cards.report_loss, (role,)), "cancel_loss": (cards.cancel_loss, (role,)),
            "open_financial": (cards.open_financial, ("B",)),
            "bank_loss": (cards.report_bank_loss, ()),
            "cancel_bank_loss": (cards.cancel_bank_loss, ()),
            "replace_lost": (cards.replace, (ReplaceReason.LOST, False)),
            "replace_damaged": (cards.replace, (ReplaceReason.DAMAGED, pack != Pack.RC)),
            "cancel": (cards.cancel, ("death",)),
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
        return fastpath.decide(self.policy, record, channel, now, 0)

    def tick(self, seconds):
        pass


class OverGrpc:
    """The same operations as gRPC calls to a real server on a manual clock."""

    METHODS = {
        "verify_ok": ("Verify", "CARD_AGENCY", {"approved": True}),
        "verify_no": ("Verify", "CARD_AGENCY", {"approved": False, "reason": "no"}),
        "issue": ("Issue", "CARD_AGENCY", {}), "activate": ("Activate", "ONLINE_PLATFORM", {}),
        "temp_loss": ("ReportTemporaryLoss", "SERVICE_HOTLINE", {}),
        "loss": ("ReportLoss", None, {}), "cancel_loss": ("CancelLoss", None, {}),
        "open_financial": ("OpenFinancial", "BANK_OUTLET", {"bank": "B"}),
        "bank_loss": ("ReportBankLoss", "BANK_OUTLET", {}),
        "cancel_bank_loss": ("CancelBankLoss", "BANK_OUTLET", {}),
        "replace_lost": ("Replace", "BANK_OUTLET", {"reason": pb.REPLACE_REASON_LOST}),
        "replace_damaged": ("Replace", "BANK_OUTLET", {"reason": pb.REPLACE_REASON_DAMAGED}),
        "cancel": ("Cancel", "CARD_AGENCY", {"reason": "death"}),
        "lock": ("LockApplication", "BANK_OUTLET", {}),
        "unlock": ("UnlockApplication", "BANK_OUTLET", {}),
    }
    CHANNEL_ROLE = {1: "TRANSIT_GATE", 2: "MEDICAL_TERMINAL", 3: "BENEFIT_COUNTER",
                    4: "BANK_SWITCH", 5: "COMMUNITY_OUTLET", 6: "BANK_SWITCH"}

    def __init__(self, server):
        self.s = server

    def apply(self, now, pack, holder, instant):
        first17 = f"310101198001{holder:05d}"
        h = pb.Holder(ssn=first17 + cards.ssn_check_digit(first17), name="n", phone="1",
                      occupation="o", birth_date="1980-01-01", household_registered=True,
                      insured=True, entitled_public_services=True)
        try:
            return self.s.lifecycle.Apply(pb.ApplyRequest(
                request_id=uuid.uuid4().hex, pack=pack, holder=h, with_transit=pack != Pack.RC,
                service_bank="B" if pack != Pack.RC else "", instant=instant,
                residence_registered_since="2020-01-01",
                residence_basis=pb.RESIDENCE_BASIS_EMPLOYMENT),
                metadata=self.s.md("COMMUNITY_OUTLET")).card_number
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            raise YikatongError(e.details()) from None

    def op(self, now, name, number, pack, channel):
        method, role, fields = self.METHODS[name]
        role = role or ("ONLINE_PLATFORM" if pack == Pack.SH else "BANK_OUTLET")
        if name in ("lock", "unlock"):
            fields = {"channel": channel}
        if name == "replace_damaged" and pack != Pack.RC:
            fields = {**fields, "instant": True}
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


class LifecycleModel(RuleBasedStateMachine):
    backend_factory = None  # set by the test classes below

    def __init__(self):
        super().__init__()
        self.backend, self.cleanup = type(self).backend_factory()
        self.now = T0
        self.cards: dict[str, ModelCard] = {}
        self.holders = 0
        self.last = ""

    def teardown(self):
        self.cleanup()

    def _current(self, holder, pack):
        for c in self.cards.values():
            if c.holder == holder and c.pack == pack and c.effective(self.now) not in (
                    State.REJECTED, State.SUPERSEDED, State.CANCELLED):
                return c
        return None

    @precondition(lambda self: len(self.cards) < 6)  # then the steps go to what cards do
    @rule(pack=st.sampled_from((Pack.SH, Pack.GZ, Pack.BJ, Pack.RC)),
          new_holder=st.booleans(), instant=st.booleans())
    def apply(self, pack, new_holder, instant):
        if new_holder or not self.holders:
            self.holders += 1
        holder = self.holders
        instant = instant and pack != Pack.RC
        blocked = self._current(holder, pack) is not None
        try:
            number = self.backend.apply(self.now, pack, holder, instant)
        except YikatongError:
            number = None
        assert (number is None) == blocked
        if number:
            self.cards[number] = ModelCard(pack, holder, State.ISSUED if instant else State.APPLIED)
            self.last = number

    def _expect(self, name, c: ModelCard, channel):
        """The model's answer: None if refused, else a function that applies it."""
        s = c.effective(self.now)
        final = s in (State.REJECTED, State.SUPERSEDED, State.CANCELLED)
        sh, rc = c.pack == Pack.SH, c.pack == Pack.RC
        pending = bool(c.replaced_by)

        def to(state):
            def go():
                c.state = state
            return go
        if name == "verify_ok" and s == State.APPLIED:
            return to(State.VERIFIED)
        if name == "verify_no" and s == State.APPLIED:
            return to(State.REJECTED)
        if name == "issue" and s == State.VERIFIED:
            return lambda: self._issue(c)
        if name == "activate" and s == State.ISSUED:
            return to(State.ACTIVE)
        if name == "temp_loss" and sh and s == State.ACTIVE:
            def go():
                c.state, c.temp_at = State.TEMP_LOSS, self.now
            return go
        if name == "loss" and (s == State.ACTIVE or (sh and s == State.TEMP_LOSS)):
            return to(State.LOST)
        if name == "cancel_loss" and ((sh and s in (State.TEMP_LOSS, State.LOST))
                                      or (not sh and s == State.LOST and not pending)):
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
        if name in ("replace_lost", "replace_damaged") and not pending and (
                (name == "replace_lost" and s == State.LOST)
                or (name == "replace_damaged" and s in (State.ISSUED, State.ACTIVE))):
            return "replace"
        if name == "cancel" and not final:
            def go():
                c.state = State.CANCELLED
                new = self.cards.get(c.replaced_by)
                if new is not None and new.state not in FINAL_STATES:
                    new.state = State.CANCELLED
            return go
        if name in ("lock", "unlock") and not final and (channel in c.locks) == (name == "unlock"):
            def go():
                (c.locks.discard if name == "unlock" else c.locks.add)(channel)
            return go
        return None

    def _issue(self, c):
        c.state = State.ACTIVE if c.pack == Pack.RC else State.ISSUED
        if c.replaces:
            old = self.cards[c.replaces]
            old.state = State.SUPERSEDED

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
        allowed = [n for n in OPS if self._expect(n, c, channel) is not None]
        name = data.draw(st.sampled_from(allowed if allowed and steer else OPS))
        expect = self._expect(name, c, channel)
        got = self.backend.op(self.now, name, number, c.pack, channel)
        assert (got is None) == (expect is None), (name, State(c.effective(self.now)).name)
        if expect == "replace":
            instant = name == "replace_damaged" and c.pack != Pack.RC
            new = ModelCard(c.pack, c.holder, State.VERIFIED, replaces=number)
            new.transit, new.financial = c.transit, c.financial
            c.replaced_by = got
            self.cards[got] = new
            if instant:
                self._issue(new)
        elif expect is not None:
            expect()
        if c.state == State.TEMP_LOSS and c.effective(self.now) == State.ACTIVE:
            c.state = State.ACTIVE

    @rule(seconds=st.sampled_from((1, 3600, 86400, FIVE_DAYS - 1, FIVE_DAYS)))
    def tick(self, seconds):
        self.now += seconds
        self.backend.tick(seconds)

    @invariant()
    def every_decision_matches_the_model(self):
        for number, c in self.cards.items():
            for channel in (Channel.TRANSIT, Channel.MEDICAL, Channel.BENEFIT, Channel.FINANCIAL,
                            Channel.SERVICE, Channel.STATUS):
                want = model_decision(c, channel, self.now)
                got = self.backend.decide(number, channel, self.now)
                assert got == want, (number, Pack(c.pack).name, State(c.state).name,
                                     channel, got, want)


def _in_process():
    import tempfile

    from yikatong.storage.lmdb_store import Store
    tmp = tempfile.TemporaryDirectory()
    store = Store(tmp.name, map_size=32 * 1024**2)

    def cleanup():
        store.close()
        tmp.cleanup()
    return InProcess(store), cleanup


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


class InProcessModel(LifecycleModel):
    backend_factory = staticmethod(_in_process)


class GrpcModel(LifecycleModel):
    backend_factory = staticmethod(_over_grpc)


TestLifecycleModelInProcess = InProcessModel.TestCase
TestLifecycleModelInProcess.settings = settings(max_examples=150, stateful_step_count=80,
                                                deadline=None)
TestLifecycleModelOverGrpc = pytest.mark.slow(GrpcModel.TestCase)
TestLifecycleModelOverGrpc.settings = settings(max_examples=6, stateful_step_count=50,
                                               deadline=None)

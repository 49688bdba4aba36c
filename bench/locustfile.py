"""Locust load test: transit gates, medical terminals, bank switches, benefit counters and
gate concentrators against a running Yikatong server, weighted to a morning peak.

    .venv/bin/locust -f bench/locustfile.py --headless --host 127.0.0.1:50051 \\
        --users 50 --spawn-rate 10 --run-time 60s --csv out/locust --html out/locust.html \\
        --cards-dir DATA_DIR [--max-failure-ratio 0.01] [--max-p99-ms 250] [--step-load]

DATA_DIR is one made by bench/gen_data.py (cards-ok.txt, cards-hot.txt, clients.toml with the
"bench-<role>" tokens). A decline is a success (its reason is in the request's context); only
an RPC error is a failure. The run ends by itself at --run-time; the exit code is non-zero when
the failure ratio or the p99 latency passes the given thresholds.
"""
import os
import random
import time
import uuid

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import LoadTestShape, User, between, events, task

from yikatong.server.harness import metadata
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

TOKENS = "bench"  # gen_data.py's clients.toml: bench-<role>

grpc_gevent.init_gevent()  # after locust's gevent monkey-patching, before any gRPC object

CARDS = {"ok": [], "hot": []}
HOT_SHARE = 0.03  # a few percent of taps are on hot-listed cards


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--cards-dir", default=os.environ.get("YIKATONG_CARDS_DIR", ""),
                        help="data dir made by bench/gen_data.py")
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--max-p99-ms", type=float, default=0.0, help="0 = no p99 threshold")
    parser.add_argument("--step-load", action="store_true",
                        help="step users up to --users over --run-time (StepLoad shape)")


@events.init.add_listener
def _load_cards(environment, **_):
    folder = environment.parsed_options.cards_dir if environment.parsed_options else ""
    if not folder:
        raise SystemExit("--cards-dir is required (a data dir made by bench/gen_data.py)")
    for kind in CARDS:
        with open(os.path.join(folder, f"cards-{kind}.txt")) as f:
            CARDS[kind] = f.read().split()


@events.quitting.add_listener
def _thresholds(environment, **_):
    total = environment.stats.total
    opts = environment.parsed_options
    if total.num_requests == 0:
        environment.process_exit_code = 1
        print("locust: no requests were made")
    elif total.fail_ratio > opts.max_failure_ratio:
        environment.process_exit_code = 1
        print(f"locust: failure ratio {total.fail_ratio:.4f} > {opts.max_failure_ratio}")
    elif opts.max_p99_ms and total.get_response_time_percentile(0.99) > opts.max_p99_ms:
        environment.process_exit_code = 1
        print(f"locust: p99 {total.get_response_time_percentile(0.99)} ms > {opts.max_p99_ms}")


def card(hot_share: float = HOT_SHARE) -> str:
    pool = CARDS["hot"] if random.random() < hot_share and CARDS["hot"] else CARDS["ok"]
    return random.choice(pool)


def rid() -> str:
    return uuid.uuid4().hex


class GrpcUser(User):
    """A gRPC user: a sync channel (gevent-patched) and `call()` that reports to Locust."""

    abstract = True
    role = ""

    def on_start(self):
        self.channel = grpc.insecure_channel(self.host)
        self.md = metadata(self.role, TOKENS)
        self.authorization = rpc.AuthorizationStub(self.channel)
        self.status = rpc.CardStatusStub(self.channel)
        self.ledger = rpc.LedgerStub(self.channel)

    def on_stop(self):
        self.channel.close()

    def call(self, name: str, method, request, metadata=None, count: int = 1):
        start = time.perf_counter()
        response, exception, context = None, None, {}
        try:
            response = method(request, metadata=metadata or self.md, timeout=10)
            reason = getattr(response, "reason", 0)
            if reason:
                context["reason"] = pb.DeclineReason.Name(reason)
        except grpc.RpcError as e:
            exception = e
        events.request.fire(request_type="grpc", name=name,
                            response_time=(time.perf_counter() - start) * 1000,
                            response_length=count, exception=exception, context=context,
                            response=response)
        return response

    def authorize(self, name: str, **fields):
        return self.call(name, self.authorization.Authorize,
                         pb.AuthorizeRequest(request_id=rid(), terminal_id=self.role, **fields))


class TransitGate(GrpcUser):
    """Tap-in holds the maximum fare; tap-out a few seconds later posts the real one."""

    weight = 60
    role = "TRANSIT_GATE"
    wait_time = between(0.1, 0.5)

    @task
    def journey(self):
        number = card()
        hold = self.authorize("Authorize TRANSIT tap-in (hold)", card_number=number,
                              channel=pb.CHANNEL_TRANSIT, amount_fen=900, phase=pb.PHASE_HOLD)
        if hold is None or hold.decision != pb.DECISION_APPROVED:
            return
        time.sleep(random.uniform(1, 3))  # the ride (gevent-patched: other users run)
        self.authorize("Authorize TRANSIT tap-out (post)", card_number=number,
                       channel=pb.CHANNEL_TRANSIT, amount_fen=random.randint(200, 900),
                       phase=pb.PHASE_POST, hold_request_id=hold.request_id)


class MedicalTerminal(GrpcUser):
    """Settlement with pre-authorisation and post; sometimes reversed by the agency."""

    weight = 15
    role = "MEDICAL_TERMINAL"
    wait_time = between(0.5, 2)

    @task
    def settle(self):
        number = card(0.01)
        hold = self.authorize("Authorize MEDICAL pre-authorisation (hold)", card_number=number,
                              channel=pb.CHANNEL_MEDICAL, amount_fen=5000, phase=pb.PHASE_HOLD,
                              payee_account="op:hospital-1")
        if hold is None or hold.decision != pb.DECISION_APPROVED:
            return
        post = self.authorize("Authorize MEDICAL settlement (post)", card_number=number,
                              channel=pb.CHANNEL_MEDICAL, amount_fen=random.randint(500, 5000),
                              phase=pb.PHASE_POST, hold_request_id=hold.request_id)
        if post is not None and random.random() < 0.05:
            self.call("Ledger.Reverse settlement", self.ledger.Reverse,
                      pb.ReverseRequest(transfer_id=post.request_id, reversal_id=rid()),
                      metadata=metadata("CARD_AGENCY", TOKENS))


class BankSwitch(GrpcUser):
    """Status of 50 cards at a time, and FINANCIAL checks."""

    weight = 10
    role = "BANK_SWITCH"
    wait_time = between(0.2, 1)

    @task(3)
    def status_batch(self):
        self.call("CardStatus.GetStatusBatch x50", self.status.GetStatusBatch,
                  pb.GetStatusBatchRequest(card_numbers=[card(0.05) for _ in range(50)]), count=50)

    @task(7)
    def financial(self):
        self.authorize("Authorize FINANCIAL", card_number=card(0.05), channel=pb.CHANNEL_FINANCIAL)


class BenefitCounter(GrpcUser):
    """Benefit drawls: single-phase debits of the BENEFIT account."""

    weight = 10
    role = "BENEFIT_COUNTER"
    wait_time = between(0.5, 2)

    @task
    def drawl(self):
        self.authorize("Authorize BENEFIT drawl", card_number=card(0.01),
                       channel=pb.CHANNEL_BENEFIT, amount_fen=random.randint(100, 2000))


class Concentrator(GrpcUser):
    """A station's gate concentrator: taps forwarded as AuthorizeStream batches of 100."""

    weight = 5
    role = "TRANSIT_GATE"
    wait_time = between(0.05, 0.2)
    messages_per_stream = 10

    @task
    def forward(self):
        def batches():
            for _ in range(self.messages_per_stream):
                yield pb.AuthorizeBatchRequest(requests=[pb.AuthorizeRequest(
                    request_id=rid(), card_number=card(), channel=pb.CHANNEL_TRANSIT,
                    amount_fen=random.randint(200, 900), terminal_id="concentrator")
                    for _ in range(100)])
        start = time.perf_counter()
        try:
            for reply in self.authorization.AuthorizeStream(batches(), metadata=self.md,
                                                            timeout=30):
                now = time.perf_counter()
                events.request.fire(request_type="grpc", name="AuthorizeStream x100 TRANSIT",
                                    response_time=(now - start) * 1000,
                                    response_length=len(reply.responses), exception=None,
                                    context={}, response=reply)
                start = now
        except grpc.RpcError as e:
            events.request.fire(request_type="grpc", name="AuthorizeStream x100 TRANSIT",
                                response_time=(time.perf_counter() - start) * 1000,
                                response_length=0, exception=e, context={}, response=None)


class StepLoad(LoadTestShape):
    """Morning peak: users step up in 5 even steps over the run, then the run ends."""

    use_common_options = True

    def tick(self):
        opts = self.runner.environment.parsed_options
        run_time, t = opts.run_time or 60, self.get_run_time()
        if t > run_time:
            return None
        if not opts.step_load:
            return opts.num_users, opts.spawn_rate
        step = min(5, int(t / (run_time / 5)) + 1)
        return max(1, opts.num_users * step // 5), opts.spawn_rate


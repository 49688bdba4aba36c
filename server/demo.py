"""The demo data set: 10,000 holders across SH, GZ, BJ and RC, walked through the real
lifecycle rules into every state, so that every decline reason can be shown; and one demo
client per role. Deterministic (seeded), loaded only into an empty data dir."""
import hashlib
import random

from yikatong import cards
from yikatong.model import (
    CancelGround,
    Channel,
    Eligibility,
    Flag,
    HolderInfo,
    Pack,
    ReplaceReason,
    Role,
)
from yikatong.server.harness import token

HOLDERS = 10_000
CHUNK = 1_000  # holders per write transaction
DAY = 86400
_SHOWCASE_KEY = b"demo:showcase"
_REGION = {Pack.SH: "310101", Pack.GZ: "440103", Pack.BJ: "110101", Pack.RC: "420102"}
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚桂"
_BANKS = ("ICBC", "ABC", "BOC", "CCB", "BOCOM", "SPDB", "BOSC")
_ORGAN = "上海市公安局黄浦分局"  # RC-7: a Residence Card's issuing organ
# Target states and their weights in the demo.
_TARGETS = (("APPLIED", 3), ("VERIFIED", 2), ("REJECTED", 1), ("ISSUED", 4), ("ACTIVE", 67),
            ("TEMP_LOSS", 2), ("TEMP_LOSS_LAPSED", 1), ("LOST", 3), ("REPLACED", 6),
            ("REPLACEMENT_PENDING", 1), ("CANCELLED", 2), ("RETIRED_GENERATION", 2),
            ("BANK_FROZEN", 2), ("LOCKED", 2), ("RC_EXPIRED", 2))


def token_for(role: str) -> str:
    """Demo tokens are guessable on purpose: for trying the server, never for production."""
    return token(role, "demo")


def add_demo_clients(clients) -> None:
    for role in Role:
        clients.add(f"demo-{role.name.lower()}", role.name,
                    hashlib.sha256(token_for(role.name).encode()).hexdigest())


def _ssn(rng: random.Random, pack: int, i: int) -> tuple[str, str]:
    birth = f"{rng.randint(1950, 2012)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    first17 = _REGION[pack] + birth.replace("-", "") + f"{i % 1000:03d}"
    return first17 + cards.ssn_check_digit(first17), birth


def _holder(rng, pack, i) -> HolderInfo:
    ssn, birth = _ssn(rng, pack, i)
    rc = pack == Pack.RC
    return HolderInfo(ssn=ssn, name=rng.choice(_SURNAMES) + rng.choice(_GIVEN) + rng.choice(_GIVEN),
                      gender=rng.choice(("M", "F")), birth_date=birth, nationality="CN",
                      phone=f"13{rng.randint(0, 999_999_999):09d}", address=f"demo address {i}",
                      ethnicity="汉族", postcode="200001",  # SH-9 (no draw: the demo set stays)
                      occupation="demo", photo_sha256=hashlib.sha256(ssn.encode()).hexdigest(),
                      household_address=f"demo home {i}" if rc else "",
                      residence_address=f"demo Shanghai address {i}" if rc else "")


def _eligible(pack: int, t: int) -> Eligibility:
    """Every demo holder may apply: registered and insured where they apply; RC holders have
    lived in Shanghai for years, for work, registered elsewhere (RC-9)."""
    return Eligibility(household_registered=pack != Pack.RC, insured=True,
                       entitled_public_services=True,
                       residence_registered_since="2015-01-01",
                       residence_basis=1 if pack == Pack.RC else 0)


def _make(book, rng, i: int, now: int):
    """One holder and their card(s), walked through the real rules to a target state.
    Returns (target, card number, pack, record) for the showcase."""
    pack = rng.choices((Pack.SH, Pack.GZ, Pack.BJ, Pack.RC), (40, 25, 20, 15))[0]
    target = rng.choices([t for t, _ in _TARGETS], [w for _, w in _TARGETS])[0]
    if pack == Pack.RC and target in ("TEMP_LOSS", "TEMP_LOSS_LAPSED", "BANK_FROZEN",
                                        "RETIRED_GENERATION", "ISSUED"):
        target = "ACTIVE"
    if pack != Pack.SH and target in ("TEMP_LOSS", "TEMP_LOSS_LAPSED", "RETIRED_GENERATION"):
        target = "LOST" if target != "RETIRED_GENERATION" else "ACTIVE"
    if pack in (Pack.GZ, Pack.BJ) and target == "BANK_FROZEN":  # GZ-21: the card's loss
        target = "LOST"
    if pack != Pack.RC and target == "RC_EXPIRED":
        target = "ACTIVE"
    if pack in (Pack.SH, Pack.RC) and target == "LOCKED":  # GZ-6, BJ-7: a bank service there
        target = "ACTIVE"
    t = now - 300 * DAY if target != "RC_EXPIRED" else now - 400 * DAY
    holder = _holder(rng, pack, i)
    while book.holder(holder.ssn) is not None:  # an ID number drawn twice: draw another
        holder = _holder(rng, pack, i)
    rec = cards.apply(book, t, pack=pack, holder=holder, eligibility=_eligible(pack, t),
                      with_transit=pack != Pack.RC and rng.random() < 0.8,
                      service_bank="" if pack == Pack.RC else rng.choice(_BANKS), instant=False)
    n = rec.card_number
    if target == "APPLIED":
        return target, rec
    if target == "REJECTED":
        return target, cards.verify(book, t + DAY, n, False, "identity could not be verified")
    rec = cards.verify(book, t + DAY, n, True, "")
    if target == "VERIFIED":
        return target, rec
    organ = _ORGAN if pack == Pack.RC else ""
    rec = cards.issue(book, t + 10 * DAY, n, issuing_organ=organ)
    if target == "ISSUED" or pack == Pack.RC and target == "RC_EXPIRED":
        return target, rec
    if pack != Pack.RC:
        rec = cards.activate(book, t + 12 * DAY, n)
        if rng.random() < 0.6 or target == "BANK_FROZEN":
            rec = cards.open_financial(book, t + 12 * DAY, n, rec.service_bank)
    if target == "TEMP_LOSS":
        rec = cards.report_temporary_loss(book, now - DAY, n)
    elif target == "TEMP_LOSS_LAPSED":
        rec = cards.report_temporary_loss(book, now - 6 * DAY, n)
    elif target == "LOST":
        rec = cards.report_loss(book, now - 3 * DAY, n)
    elif target in ("REPLACED", "REPLACEMENT_PENDING"):
        cards.report_loss(book, now - 20 * DAY, n)
        new = cards.replace(book, now - 19 * DAY, n, ReplaceReason.LOST, False)
        if target == "REPLACED":
            cards.issue(book, now - 10 * DAY, new.card_number, issuing_organ=organ)
            if pack != Pack.RC:
                cards.activate(book, now - 9 * DAY, new.card_number)
        rec = book.card(n)
    elif target == "CANCELLED":
        rec = cards.cancel(book, now - 30 * DAY, n, "no longer entitled (demo)",
                           CancelGround.ENTITLEMENT_ENDED)
    elif target == "BANK_FROZEN":
        rec = cards.report_bank_loss(book, now - 2 * DAY, n)
    elif target == "LOCKED":
        rec = cards.lock_application(book, now - 2 * DAY, n, Channel.MEDICAL, True)
    elif target == "RETIRED_GENERATION":
        rec.generation = 1  # a migrated card of the generation SH-30 retired
        book.put_card(rec, t)
    return target, rec


# What to ask of each showcase card, and the answer the decision table gives.
_SHOW = (
    ("ACTIVE", "transit", "APPROVED", lambda c: c.has(Flag.TRANSIT) and c.pack == Pack.SH),
    ("ACTIVE", "medical", "APPROVED", lambda c: c.pack == Pack.GZ),
    ("REPLACED", "medical", "CARD_SUPERSEDED", None),
    ("CANCELLED", "medical", "CARD_CANCELLED", None),
    ("RETIRED_GENERATION", "medical", "GENERATION_RETIRED", None),
    ("APPLIED", "medical", "CARD_NOT_ISSUED", None),
    ("ISSUED", "medical", "CARD_NOT_ACTIVATED", None),
    ("LOST", "medical", "CARD_LOST", lambda c: c.pack == Pack.SH),
    ("TEMP_LOSS", "transit", "CARD_FROZEN", lambda c: c.has(Flag.TRANSIT)),
    ("TEMP_LOSS_LAPSED", "medical", "APPROVED", None),
    ("RC_EXPIRED", "service", "RC_NOT_RENEWED", None),
    ("LOCKED", "medical", "APPLICATION_LOCKED", None),
    ("ACTIVE", "transit", "FUNCTION_NOT_OPEN", lambda c: not c.has(Flag.TRANSIT)
     and c.pack != Pack.RC),
    ("BANK_FROZEN", "financial", "FINANCIAL_FROZEN", None),
    ("ACTIVE", "service:RC_POINTS_SCHOOL_ENTRY", "NOT_ENTITLED", lambda c: c.pack == Pack.RC),
)


def load(store, now: int) -> None:
    """Fill an empty store with the demo set (idempotent: a store loaded before is kept)."""
    with store.read() as txn:
        book = store.book(txn)
        if book.meta(_SHOWCASE_KEY) is not None:
            return
        if book.card_count():
            raise ValueError(f"--demo needs an empty data dir; {store.data_dir} holds other cards")
    rng = random.Random(20261124)
    found: dict[int, str] = {}

    def chunk(start: int):
        def command(book):
            for i in range(start, min(start + CHUNK, HOLDERS)):
                target, rec = _make(book, rng, i, now)
                for k, (want, _, _, pred) in enumerate(_SHOW):
                    if k not in found and want == target and (pred is None or pred(rec)):
                        found[k] = rec.card_number
        return command

    for start in range(0, HOLDERS, CHUNK):
        store.write(chunk(start))
    lines = [f"{found[k]} {channel} {answer}" for k, (_, channel, answer, _) in enumerate(_SHOW)
             if k in found]

    def finish(book):
        book.put_meta(_SHOWCASE_KEY, "\n".join(lines).encode())
    store.write(finish)


_CHANNEL_ROLE = {"transit": "TRANSIT_GATE", "medical": "MEDICAL_TERMINAL",
                 "financial": "BANK_SWITCH", "service": "COMMUNITY_OUTLET"}


def showcase(store, listen: str) -> list[tuple[str, str]]:
    """(command to paste, the answer it prints) for each showcase card."""
    with store.read() as txn:
        value = store.book(txn).meta(_SHOWCASE_KEY)
    out = []
    for line in value.decode().splitlines() if value is not None else []:
        card, channel, answer = line.split()
        channel, _, code = channel.partition(":")
        command = (f".venv/bin/yikatong authorize --target {listen} --token "
                   f"{token_for(_CHANNEL_ROLE[channel])} --card {card} --channel {channel}"
                   + (f" --service-code {code}" if code else ""))
        out.append((command, answer if answer == "APPROVED" else "DECLINED " + answer))
    return out

"""Personal information at rest (issue 25), side by side in one run: the same store code with
the real key ring (SM4-GCM seal and open, HMAC-SM3 index) and with a clear one (the same
record layout, key ids and lengths, no cipher: seal copies, the index is the number padded),
so the difference is what the encryption costs.

  Apply        cards.apply of a new holder, 200 per write transaction (no fsync counted:
               one fsync per group is the same in both and dwarfs the rest, storage_bench)
  GetHolder    what Holders.GetHolder reads: the holder by identity number, its history,
               its credit records (one read transaction each)
  Authorize    the real read path of Authorize: the card's record from LMDB and the
               compiled decision (no PII on it: the two columns must be the same)

    .venv/bin/python bench/pii_bench.py [--holders 2000] [--repeat 5]
"""
import argparse
import platform
import statistics
import tempfile
import time

from yikatong import cards, config
from yikatong.fastpath import impl
from yikatong.model import Eligibility, HolderInfo, Pack
from yikatong.server.harness import PII_TEST_KEYS
from yikatong.storage import pii
from yikatong.storage.lmdb_store import Store

NOW = 1_790_000_000
PER_GROUP = 200


class ClearRing(pii.KeyRing):
    """The layout of a sealed value without the cipher: what the store would cost in clear."""

    def seal(self, aad, plaintext, deterministic=False):
        kid = self.current.encode()
        return (bytes((pii.SEALED_VERSION, len(kid))) + kid + bytes(pii.NONCE_BYTES)
                + plaintext + bytes(pii.TAG_BYTES))

    def open(self, aad, sealed, what=""):
        return pii.split(sealed)[2]

    def index(self, ssn):
        return ssn.encode("ascii").ljust(pii.INDEX_BYTES, b"\0")


def ssn(n: int) -> str:
    first17 = f"31010119850315{n:03d}"[:17] if n < 1000 else f"3101011985{n:07d}"
    return first17 + cards.ssn_check_digit(first17)


def holder(n: int) -> HolderInfo:
    return HolderInfo(ssn(n), name="王芳", gender="F", birth_date="1985-03-15",
                      nationality="CN", phone="13800000000", address="上海市黄浦区福州路318号",
                      ethnicity="汉族", postcode="200001", occupation="teacher",
                      photo_sha256="ab" * 32)


ELIGIBLE = Eligibility(household_registered=True, insured=True, entitled_public_services=True,
                       residence_registered_since="", residence_basis=0)


def run(ring: pii.KeyRing, holders: int, repeat: int) -> dict[str, float]:
    """Microseconds per operation, the median of `repeat` rounds."""
    out: dict[str, list[float]] = {"Apply": [], "GetHolder": [], "Authorize": []}
    for r in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(tmp, map_size=1024**3, pii_keys=ring)
            numbers: list[str] = []
            spent = 0.0
            for start in range(0, holders, PER_GROUP):
                def group(book, start=start, numbers=numbers):
                    t = time.perf_counter()
                    for n in range(start, min(start + PER_GROUP, holders)):
                        numbers.append(cards.apply(
                            book, NOW, pack=Pack.SH, holder=holder(n), eligibility=ELIGIBLE,
                            with_transit=True, service_bank="ICBC", instant=False).card_number)
                    return time.perf_counter() - t
                spent += store.write(group)
            out["Apply"].append(spent / holders * 1e6)
            t = time.perf_counter()
            for n in range(holders):
                with store.read() as txn:
                    book = store.book(txn)
                    holder_id, _ = book.holder(ssn(n))
                    book.holder_history(holder_id)
                    book.credit_records(holder_id)
            out["GetHolder"].append((time.perf_counter() - t) / holders * 1e6)
            policy = impl.Policy(config.generation_retired_at)
            t = time.perf_counter()
            for number in numbers:
                with store.read() as txn:
                    impl.decide(policy, store.book(txn).use_bytes(number), 1, NOW, 0)
            out["Authorize"].append((time.perf_counter() - t) / holders * 1e6)
            store.close()
        del r
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--holders", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    real = pii.KeyRing.parse(PII_TEST_KEYS)
    clear = ClearRing(real.keys, real.current, real.index_id, b"\0" * 16)
    results = {}
    for label, ring in (("clear", clear), ("SM4-GCM", real)):
        results[label] = run(ring, args.holders, args.repeat)
    print(f"# PII at rest, {args.holders:,} holders, median of {args.repeat} rounds; "
          f"Python {platform.python_version()}, {platform.machine()}, one core")
    print(f"{'us per call':<12}{'clear':>10}{'SM4-GCM':>10}{'cost':>10}")
    for what in ("Apply", "GetHolder", "Authorize"):
        a, b = results["clear"][what], results["SM4-GCM"][what]
        print(f"{what:<12}{a:>10.1f}{b:>10.1f}{b - a:>+10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

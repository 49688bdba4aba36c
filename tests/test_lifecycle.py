"""Card lifecycle rules (SPEC.md section 2), in-process through the store's writer thread."""
import pytest

from yikatong import cards, config
from yikatong import clock as clocks
from yikatong.errors import (
    CardNotFound,
    IdReused,
    InvalidArgument,
    InvalidTransition,
    NotEligible,
    PermissionDenied,
    Refused,
)
from yikatong.model import (
    GENERATION_CURRENT,
    CancelGround,
    Channel,
    Eligibility,
    Flag,
    HolderInfo,
    Pack,
    ReplaceReason,
    Role,
    State,
)

T0 = 1_790_000_000  # 2026-09-21 22:13:20 in Shanghai
DAY = 86400
ORGAN = "上海市公安局黄浦分局"
# Eligible for every pack: insured, entitled; registered outside Shanghai (RC-9: a migrant);
# RC residence since long ago, working.
ELIGIBLE = Eligibility(False, True, True, "2020-01-01", 1)


def eligibility(household=False, insured=False, entitled=False, since="", basis=0):
    return Eligibility(household, insured, entitled, since, basis)


def ssn(n: int) -> str:
    first17 = f"31010119900101{n:03d}"
    return first17 + cards.ssn_check_digit(first17)


class World:
    def __init__(self, store):
        self.store = store
        self.now = T0

    def do(self, fn, *args, **kw):
        return self.store.write(lambda book: fn(book, self.now, *args, **kw))

    def card(self, number):
        with self.store.read() as txn:
            return self.store.book(txn).card(number)

    def apply(self, pack=Pack.SH, n=1, instant=False, transit=True):
        holder = HolderInfo(ssn(n), name="张三", birth_date="1990-01-01", phone="13800000000",
                            occupation="teacher", household_address="湖北省武汉市",
                            residence_address="上海市黄浦区", photo_sha256="ab" * 32,
                            gender="M", nationality="CN", ethnicity="汉族",  # SH-9, RC-7
                            address="上海市黄浦区1号", postcode="200001")
        return self.do(cards.apply, pack=pack, holder=holder, eligibility=ELIGIBLE,
                       with_transit=transit, service_bank="ICBC", instant=instant)

    def active(self, pack=Pack.SH, n=1):
        num = self.apply(pack, n).card_number
        self.do(cards.verify, num, True, "")
        self.do(cards.issue, num)
        return self.do(cards.activate, num).card_number

    def issue(self, num):
        return self.do(cards.issue, num, issuing_organ=ORGAN if num.startswith("90") else "")


@pytest.fixture
def w(store):
    return World(store)


def test_sh_8_eligibility_household_or_insured():
    cards.check_eligibility(Pack.SH, eligibility(True, False, False, "", 0), T0)
    cards.check_eligibility(Pack.SH, eligibility(False, True, False, "", 0), T0)
    with pytest.raises(NotEligible, match="SH-8"):
        cards.check_eligibility(Pack.SH, eligibility(False, False, True, "", 0), T0)


def test_gz_4_eligibility_household_or_public_services():
    cards.check_eligibility(Pack.GZ, eligibility(False, False, True, "", 0), T0)
    with pytest.raises(NotEligible, match="GZ-4"):
        cards.check_eligibility(Pack.GZ, eligibility(False, True, False, "", 0), T0)


def test_bj_8_eligibility_insured_or_public_services():
    cards.check_eligibility(Pack.BJ, eligibility(False, True, False, "", 0), T0)
    with pytest.raises(NotEligible, match="BJ-8"):
        cards.check_eligibility(Pack.BJ, eligibility(True, False, False, "", 0), T0)


def test_rc_9_eligibility_six_months_of_residence_and_a_basis():
    # T0 is 2026-09-21 22:13 in Shanghai
    cards.check_eligibility(Pack.RC, eligibility(False, False, False, "2026-03-01", 1), T0)
    with pytest.raises(NotEligible, match="RC-9"):
        cards.check_eligibility(Pack.RC, eligibility(False, False, False, "2026-04-01", 1), T0)
    with pytest.raises(NotEligible, match="RC-9"):
        cards.check_eligibility(Pack.RC, eligibility(False, False, False, "2020-01-01", 0), T0)


def test_ssn_check_digit_is_validated():
    cards.validate_ssn(ssn(7))
    bad = ssn(7)[:17] + ("0" if ssn(7)[17] != "0" else "1")
    with pytest.raises(InvalidArgument, match="holder.ssn"):
        cards.validate_ssn(bad)


def test_sh_walk_apply_verify_issue_activate(w):
    rec = w.apply()
    assert rec.state == State.APPLIED and rec.card_number.startswith("31")
    assert w.do(cards.verify, rec.card_number, True, "").state == State.VERIFIED
    assert w.do(cards.issue, rec.card_number).state == State.ISSUED
    assert w.do(cards.activate, rec.card_number).state == State.ACTIVE


def test_sh_10_rejection_must_say_why_and_is_final(w):
    num = w.apply().card_number
    with pytest.raises(InvalidArgument, match="reason"):
        w.do(cards.verify, num, False, "")
    assert w.card(num).state == State.APPLIED  # nothing half-written
    w.do(cards.verify, num, False, "ID photo does not match")
    with pytest.raises(InvalidTransition, match="REJECTED.*SH-10"):
        w.do(cards.verify, num, True, "")
    # a rejected application does not block a new one
    assert w.apply().state == State.APPLIED


def test_sh_9_one_open_application_per_holder_and_pack(w):
    w.apply()
    with pytest.raises(InvalidTransition, match="APPLIED.*SH-9"):
        w.apply()
    w.apply(pack=Pack.GZ)  # another pack is another card


def test_sh_23c_a_holder_with_a_current_card_must_replace_not_apply(w):
    w.active()
    with pytest.raises(InvalidTransition, match="ACTIVE.*use Replace"):
        w.apply()


def test_sh_23b_instant_issue_goes_straight_to_issued(w):
    """SPEC.md as corrected: a first SH application is never instant; GZ and BJ first cards
    may be made on the spot (GZ-10b)."""
    with pytest.raises(Refused, match="SH-23b"):
        w.apply(instant=True)
    assert w.apply(pack=Pack.GZ, instant=True).state == State.ISSUED


def test_sh_12_only_issued_cards_activate(w):
    num = w.apply().card_number
    with pytest.raises(InvalidTransition, match="APPLIED.*SH-12"):
        w.do(cards.activate, num)


def test_sh_14_financial_function_opens_separately(w):
    num = w.active()
    with pytest.raises(InvalidTransition, match="SH-22.*re-application"):
        w.do(cards.open_financial, num, "BOC")  # SH-22(4): another bank is a new card
    rec = w.do(cards.open_financial, num, "ICBC")
    assert rec.has(Flag.FINANCIAL_OPEN) and rec.service_bank == "ICBC"
    with pytest.raises(InvalidTransition, match="already open"):
        w.do(cards.open_financial, num, "ICBC")


def test_sh_18a_temporary_loss_and_sh_18b_lapse_at_the_exact_second(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)  # at 22:13 on 21 September (Shanghai)
    rec = w.card(num)
    end = clocks.parse_time("2026-09-27T00:00:00")  # 24:00 on 26 September
    assert rec.temp_loss_until == end
    assert cards.effective_state(rec, end - 1) == State.TEMP_LOSS
    assert cards.effective_state(rec, end) == State.ACTIVE
    # after the lapse there is no report left to cancel, and a new one can be filed
    w.now = end
    with pytest.raises(InvalidTransition, match="ACTIVE.*SH-19a"):
        w.do(cards.cancel_loss, num)
    assert w.do(cards.report_temporary_loss, num).temp_loss_until == clocks.parse_time(
        "2026-10-03T00:00:00")


def test_sh_18c_formal_loss_within_the_5_days(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)
    w.now += 4 * DAY
    rec = w.do(cards.report_loss, num, Role.ONLINE_PLATFORM)
    assert rec.state == State.LOST and rec.loss_reported_at == T0
    w.now += 10 * DAY  # a formal loss never lapses
    assert cards.effective_state(w.card(num), w.now) == State.LOST


def test_sh_18c_formal_loss_is_not_filed_by_the_hotline(w):
    num = w.active()
    with pytest.raises(PermissionDenied, match="SH-18c"):
        w.do(cards.report_loss, num, Role.SERVICE_HOTLINE)


def test_gz_21_has_no_temporary_loss_report(w):
    num = w.active(pack=Pack.GZ)
    with pytest.raises(InvalidTransition, match="GZ-21"):
        w.do(cards.report_temporary_loss, num)
    assert w.do(cards.report_loss, num, Role.SERVICE_HOTLINE).state == State.LOST


def test_sh_19a_cancel_loss_restores_at_once(w):
    num = w.active()
    w.do(cards.report_loss, num, Role.COMMUNITY_OUTLET)
    with pytest.raises(PermissionDenied, match="SH-19a"):
        w.do(cards.cancel_loss, num, Role.BANK_OUTLET)
    assert w.do(cards.cancel_loss, num, Role.ONLINE_PLATFORM).state == State.ACTIVE


def test_gz_22_deregistration_only_before_a_replacement_was_applied_for(w):
    num = w.active(pack=Pack.GZ)
    w.do(cards.report_loss, num, Role.BANK_OUTLET)
    w.do(cards.replace, num, ReplaceReason.LOST, False)
    with pytest.raises(InvalidTransition, match="LOST.*GZ-22.*already applied"):
        w.do(cards.cancel_loss, num, Role.BANK_OUTLET)


def test_gz_22_deregistration_at_a_bank_outlet(w):
    num = w.active(pack=Pack.GZ)
    w.do(cards.report_loss, num, Role.ONLINE_PLATFORM)
    with pytest.raises(PermissionDenied, match="GZ-22"):
        w.do(cards.cancel_loss, num, Role.ONLINE_PLATFORM)
    assert w.do(cards.cancel_loss, num, Role.BANK_OUTLET).state == State.ACTIVE


def test_sh_19b_replacement_needs_a_formal_loss(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)
    with pytest.raises(InvalidTransition, match="TEMP_LOSS.*SH-19b"):
        w.do(cards.replace, num, ReplaceReason.LOST, False)


def test_sh_23c_original_superseded_when_the_new_card_is_issued(w):
    num = w.active()
    w.do(cards.open_financial, num, "ICBC")
    w.do(cards.report_loss, num, Role.ONLINE_PLATFORM)
    new = w.do(cards.replace, num, ReplaceReason.LOST, False)
    assert new.state == State.VERIFIED and new.replaces == num
    assert new.has(Flag.TRANSIT) and new.has(Flag.FINANCIAL_OPEN)
    old = w.card(num)
    assert old.state == State.LOST and old.replaced_by == new.card_number
    with pytest.raises(InvalidTransition, match="already being made"):
        w.do(cards.replace, num, ReplaceReason.LOST, False)
    w.do(cards.issue, new.card_number)
    assert w.card(num).state == State.SUPERSEDED
    for op in (cards.cancel_loss, cards.activate, cards.report_loss):
        with pytest.raises(InvalidTransition, match="SUPERSEDED"):
            w.do(op, num)
    with pytest.raises(InvalidTransition, match="SUPERSEDED"):
        w.do(cards.cancel, num, "death", CancelGround.DEATH)
    # the new card is now the holder's current card: a fresh Apply is refused
    with pytest.raises(InvalidTransition, match="ISSUED.*use Replace"):
        w.apply()


def test_sh_21_renewal_of_a_damaged_card_with_instant_issue(w):
    num = w.active()
    new = w.do(cards.replace, num, ReplaceReason.DAMAGED, True)
    assert new.state == State.ISSUED
    assert w.card(num).state == State.SUPERSEDED


def test_sh_22_reapplication_on_changed_information(w):
    num = w.active()
    new = w.do(cards.replace, num, ReplaceReason.INFO_CHANGED, False)
    assert new.state == State.APPLIED  # SH-11/SH-23a: through SH-10 and SH-11 again
    assert w.card(num).state == State.ACTIVE  # usable until the new card is issued
    w.do(cards.verify, new.card_number, True, "")
    w.do(cards.issue, new.card_number)
    assert w.card(num).state == State.SUPERSEDED


def test_gz_26_cancel_is_final_and_takes_a_pending_replacement_with_it(w):
    num = w.active(pack=Pack.GZ)
    w.do(cards.report_loss, num, Role.BANK_OUTLET)
    new = w.do(cards.replace, num, ReplaceReason.LOST, False)
    with pytest.raises(InvalidArgument, match="reason"):
        w.do(cards.cancel, num, "", CancelGround.DEATH)
    w.do(cards.cancel, num, "household registration cancelled (death)", CancelGround.DEATH)
    assert w.card(num).state == State.CANCELLED
    assert w.card(new.card_number).state == State.CANCELLED
    with pytest.raises(InvalidTransition, match="CANCELLED.*GZ-26"):
        w.do(cards.cancel, num, "again", CancelGround.DEATH)


def test_gz_6_application_lock_and_unlock(w):
    num = w.active(pack=Pack.GZ)
    rec = w.do(cards.lock_application, num, Channel.MEDICAL, True)
    assert rec.lock_mask == 1 << Channel.MEDICAL
    with pytest.raises(InvalidTransition, match="already locked"):
        w.do(cards.lock_application, num, Channel.MEDICAL, True)
    assert w.do(cards.lock_application, num, Channel.MEDICAL, False).lock_mask == 0
    with pytest.raises(InvalidArgument, match="channel"):
        w.do(cards.lock_application, num, Channel.STATUS, True)


def test_sh_20_bank_loss_is_separate_from_card_loss(w):
    num = w.active()
    with pytest.raises(InvalidTransition, match="SH-20.*not open"):
        w.do(cards.report_bank_loss, num)
    w.do(cards.open_financial, num, "ICBC")
    assert w.do(cards.report_bank_loss, num).has(Flag.FINANCIAL_FROZEN)
    assert w.card(num).state == State.ACTIVE
    assert not w.do(cards.cancel_bank_loss, num).has(Flag.FINANCIAL_FROZEN)


def test_sh_30_new_cards_carry_the_current_generation(w):
    assert w.apply().generation == GENERATION_CURRENT
    assert GENERATION_CURRENT not in config.generation_retired_at


def test_rc_14_residence_card_valid_one_year_from_issue(w):
    num = w.apply(pack=Pack.RC, transit=False).card_number
    w.do(cards.verify, num, True, "")
    rec = w.issue(num)
    assert rec.state == State.ACTIVE  # no activation step for RC
    # issued at 22:13 on 21 September 2026 in Shanghai: valid to 24:00 on 21 September 2027
    assert rec.valid_until == clocks.parse_time("2027-09-22T00:00:00")


def test_gz_9b_stored_pii_is_reused_and_never_silently_overwritten(w):
    w.apply(pack=Pack.SH)
    given = HolderInfo(ssn(1))  # nothing asked again
    w.do(cards.apply, pack=Pack.GZ, holder=given, eligibility=ELIGIBLE,
         with_transit=False, service_bank="ICBC", instant=False)
    with w.store.read() as txn:
        assert w.store.book(txn).holder(ssn(1))[1].name == "张三"
    changed = HolderInfo(ssn(1), name="李四")
    with pytest.raises(InvalidTransition, match="BJ-7"):  # BJ-7: information change
        w.do(cards.apply, pack=Pack.BJ, holder=changed, eligibility=ELIGIBLE,
             with_transit=False, service_bank="", instant=False)


def test_unknown_card(w):
    with pytest.raises(CardNotFound):
        w.do(cards.activate, "3100000099")


def test_request_ids_replay_and_id_reused(store):
    fp_a, fp_b = b"a" * 32, b"b" * 32
    store.write(lambda book: book.remember("req-1", fp_a, b"answer"))
    assert store.write(lambda book: book.replay("req-1", fp_a)) == b"answer"
    assert store.write(lambda book: book.replay("req-2", fp_a)) is None
    with pytest.raises(IdReused, match="ID_REUSED"):
        store.write(lambda book: book.replay("req-1", fp_b))


def test_rc_7_and_rc_13_addresses_kept_with_the_residence_history(w):
    """RC-7: the card records "permanent registered residential address, residential
    address, issuing organ"; RC-13: changes of residence are filed, so their history is kept."""
    num = w.apply(pack=Pack.RC, transit=False).card_number
    w.do(cards.verify, num, True, "")
    assert w.issue(num).valid_until
    with w.store.read() as txn:
        book = w.store.book(txn)
        holder_id, info = book.holder(ssn(1))
        assert (info.household_address, info.residence_address) == ("湖北省武汉市", "上海市黄浦区")
        assert book.residences(holder_id) == [(T0, "上海市黄浦区")]
        assert book.card_text(num, "organ") == ORGAN
    # another pack's application with no residence given changes nothing of it
    w.apply(pack=Pack.SH)
    with w.store.read() as txn:
        assert w.store.book(txn).residences(holder_id) == [(T0, "上海市黄浦区")]

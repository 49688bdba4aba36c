"""Card lifecycle rules (SPEC.md section 2), in-process through the store's writer thread."""
import pytest

from yikatong.storage import records as r
from yikatong import cards, config
from yikatong.errors import (CardNotFound, IdReused, InvalidArgument, InvalidTransition,
                             NotEligible, PermissionDenied)
from yikatong.v1 import yikatong_pb2 as pb

T0 = 1_790_000_000
DAY = 86400


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

    def apply(self, pack=r.PACK_SH, n=1, instant=False, transit=True):
        pii = pb.Holder(ssn=ssn(n), name="张三", birth_date="1990-01-01").SerializeToString()
        return self.do(cards.apply, pack=pack, ssn=ssn(n), merge_pii=lambda stored: pii,
                       with_transit=transit, service_bank="ICBC", instant=instant)

    def active(self, pack=r.PACK_SH, n=1):
        num = self.apply(pack, n).card_number
        self.do(cards.verify, num, True, "")
        self.do(cards.issue, num)
        return self.do(cards.activate, num).card_number


@pytest.fixture
def w(store):
    return World(store)


def test_sh_8_eligibility_household_or_insured():
    cards.check_eligibility(r.PACK_SH, True, False, False, "", 0, T0)
    cards.check_eligibility(r.PACK_SH, False, True, False, "", 0, T0)
    with pytest.raises(NotEligible, match="SH-8"):
        cards.check_eligibility(r.PACK_SH, False, False, True, "", 0, T0)


def test_gz_4_eligibility_household_or_public_services():
    cards.check_eligibility(r.PACK_GZ, False, False, True, "", 0, T0)
    with pytest.raises(NotEligible, match="GZ-4"):
        cards.check_eligibility(r.PACK_GZ, False, True, False, "", 0, T0)


def test_bj_8_eligibility_insured_or_public_services():
    cards.check_eligibility(r.PACK_BJ, False, True, False, "", 0, T0)
    with pytest.raises(NotEligible, match="BJ-8"):
        cards.check_eligibility(r.PACK_BJ, True, False, False, "", 0, T0)


def test_rc_9_eligibility_six_months_of_residence_and_a_basis():
    cards.check_eligibility(r.PACK_RC, False, False, False, "2026-03-01", 1, T0)  # T0: 2026-09-22
    with pytest.raises(NotEligible, match="RC-9"):
        cards.check_eligibility(r.PACK_RC, False, False, False, "2026-04-01", 1, T0)
    with pytest.raises(NotEligible, match="RC-9"):
        cards.check_eligibility(r.PACK_RC, False, False, False, "2020-01-01", 0, T0)


def test_ssn_check_digit_is_validated():
    cards.validate_ssn(ssn(7))
    bad = ssn(7)[:17] + ("0" if ssn(7)[17] != "0" else "1")
    with pytest.raises(InvalidArgument, match="holder.ssn"):
        cards.validate_ssn(bad)


def test_sh_walk_apply_verify_issue_activate(w):
    rec = w.apply()
    assert rec.state == r.APPLIED and rec.card_number.startswith("31")
    assert w.do(cards.verify, rec.card_number, True, "").state == r.VERIFIED
    assert w.do(cards.issue, rec.card_number).state == r.ISSUED
    assert w.do(cards.activate, rec.card_number).state == r.ACTIVE


def test_sh_10_rejection_must_say_why_and_is_final(w):
    num = w.apply().card_number
    with pytest.raises(InvalidArgument, match="reason"):
        w.do(cards.verify, num, False, "")
    assert w.card(num).state == r.APPLIED  # nothing half-written
    w.do(cards.verify, num, False, "ID photo does not match")
    with pytest.raises(InvalidTransition, match="REJECTED.*SH-10"):
        w.do(cards.verify, num, True, "")
    # a rejected application does not block a new one
    assert w.apply().state == r.APPLIED


def test_sh_9_one_open_application_per_holder_and_pack(w):
    w.apply()
    with pytest.raises(InvalidTransition, match="APPLIED.*SH-9"):
        w.apply()
    w.apply(pack=r.PACK_GZ)  # another pack is another card


def test_sh_23c_a_holder_with_a_current_card_must_replace_not_apply(w):
    w.active()
    with pytest.raises(InvalidTransition, match="ACTIVE.*use Replace"):
        w.apply()


def test_sh_23b_instant_issue_goes_straight_to_issued(w):
    assert w.apply(instant=True).state == r.ISSUED


def test_sh_12_only_issued_cards_activate(w):
    num = w.apply().card_number
    with pytest.raises(InvalidTransition, match="APPLIED.*SH-12"):
        w.do(cards.activate, num)


def test_sh_14_financial_function_opens_separately(w):
    num = w.active()
    rec = w.do(cards.open_financial, num, "BOC")
    assert rec.has(r.FLAG_FINANCIAL_OPEN) and rec.service_bank == "BOC"
    with pytest.raises(InvalidTransition, match="already open"):
        w.do(cards.open_financial, num, "BOC")


def test_sh_18a_temporary_loss_and_sh_18b_lapse_at_the_exact_second(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)
    rec = w.card(num)
    assert cards.effective_state(rec, T0 + config.temp_loss_valid_seconds - 1) == r.TEMP_LOSS
    assert cards.effective_state(rec, T0 + config.temp_loss_valid_seconds) == r.ACTIVE
    # after the lapse there is no report left to cancel, and a new one can be filed
    w.now = T0 + config.temp_loss_valid_seconds
    with pytest.raises(InvalidTransition, match="ACTIVE.*SH-19a"):
        w.do(cards.cancel_loss, num)
    assert w.do(cards.report_temporary_loss, num).temp_loss_at == w.now


def test_sh_18c_formal_loss_within_the_5_days(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)
    w.now += 4 * DAY
    rec = w.do(cards.report_loss, num, "ONLINE_PLATFORM")
    assert rec.state == r.LOST and rec.loss_reported_at == T0
    w.now += 10 * DAY  # a formal loss never lapses
    assert cards.effective_state(w.card(num), w.now) == r.LOST


def test_sh_18c_formal_loss_is_not_filed_by_the_hotline(w):
    num = w.active()
    with pytest.raises(PermissionDenied, match="SH-18c"):
        w.do(cards.report_loss, num, "SERVICE_HOTLINE")


def test_gz_21_has_no_temporary_loss_report(w):
    num = w.active(pack=r.PACK_GZ)
    with pytest.raises(InvalidTransition, match="GZ-21"):
        w.do(cards.report_temporary_loss, num)
    assert w.do(cards.report_loss, num, "SERVICE_HOTLINE").state == r.LOST


def test_sh_19a_cancel_loss_restores_at_once(w):
    num = w.active()
    w.do(cards.report_loss, num, "COMMUNITY_OUTLET")
    with pytest.raises(PermissionDenied, match="SH-19a"):
        w.do(cards.cancel_loss, num, "BANK_OUTLET")
    assert w.do(cards.cancel_loss, num, "ONLINE_PLATFORM").state == r.ACTIVE


def test_gz_22_deregistration_only_before_a_replacement_was_applied_for(w):
    num = w.active(pack=r.PACK_GZ)
    w.do(cards.report_loss, num, "BANK_OUTLET")
    w.do(cards.replace, num, cards.REPLACE_LOST, False)
    with pytest.raises(InvalidTransition, match="LOST.*GZ-22.*already applied"):
        w.do(cards.cancel_loss, num, "BANK_OUTLET")


def test_gz_22_deregistration_at_a_bank_outlet(w):
    num = w.active(pack=r.PACK_GZ)
    w.do(cards.report_loss, num, "ONLINE_PLATFORM")
    with pytest.raises(PermissionDenied, match="GZ-22"):
        w.do(cards.cancel_loss, num, "ONLINE_PLATFORM")
    assert w.do(cards.cancel_loss, num, "BANK_OUTLET").state == r.ACTIVE


def test_sh_19b_replacement_needs_a_formal_loss(w):
    num = w.active()
    w.do(cards.report_temporary_loss, num)
    with pytest.raises(InvalidTransition, match="TEMP_LOSS.*SH-19b"):
        w.do(cards.replace, num, cards.REPLACE_LOST, False)


def test_sh_23c_original_superseded_when_the_new_card_is_issued(w):
    num = w.active()
    w.do(cards.open_financial, num, "BOC")
    w.do(cards.report_loss, num, "ONLINE_PLATFORM")
    new = w.do(cards.replace, num, cards.REPLACE_LOST, False)
    assert new.state == r.VERIFIED and new.replaces == num
    assert new.has(r.FLAG_TRANSIT) and new.has(r.FLAG_FINANCIAL_OPEN)
    old = w.card(num)
    assert old.state == r.LOST and old.replaced_by == new.card_number
    with pytest.raises(InvalidTransition, match="already being made"):
        w.do(cards.replace, num, cards.REPLACE_LOST, False)
    w.do(cards.issue, new.card_number)
    assert w.card(num).state == r.SUPERSEDED
    for op in (cards.cancel_loss, cards.activate, cards.report_loss):
        with pytest.raises(InvalidTransition, match="SUPERSEDED"):
            w.do(op, num)
    with pytest.raises(InvalidTransition, match="SUPERSEDED"):
        w.do(cards.cancel, num, "death")
    # the new card is now the holder's current card: a fresh Apply is refused
    with pytest.raises(InvalidTransition, match="ISSUED.*use Replace"):
        w.apply()


def test_sh_21_renewal_of_a_damaged_card_with_instant_issue(w):
    num = w.active()
    new = w.do(cards.replace, num, cards.REPLACE_DAMAGED, True)
    assert new.state == r.ISSUED
    assert w.card(num).state == r.SUPERSEDED


def test_sh_22_reapplication_on_changed_information(w):
    num = w.active()
    new = w.do(cards.replace, num, cards.REPLACE_INFO_CHANGED, False)
    assert w.card(num).state == r.ACTIVE  # usable until the new card is issued
    w.do(cards.issue, new.card_number)
    assert w.card(num).state == r.SUPERSEDED


def test_gz_26_cancel_is_final_and_takes_a_pending_replacement_with_it(w):
    num = w.active(pack=r.PACK_GZ)
    w.do(cards.report_loss, num, "BANK_OUTLET")
    new = w.do(cards.replace, num, cards.REPLACE_LOST, False)
    with pytest.raises(InvalidArgument, match="reason"):
        w.do(cards.cancel, num, "")
    w.do(cards.cancel, num, "household registration cancelled (death)")
    assert w.card(num).state == r.CANCELLED
    assert w.card(new.card_number).state == r.CANCELLED
    with pytest.raises(InvalidTransition, match="CANCELLED.*GZ-26"):
        w.do(cards.cancel, num, "again")


def test_gz_6_application_lock_and_unlock(w):
    num = w.active(pack=r.PACK_GZ)
    rec = w.do(cards.lock_application, num, r.CH_MEDICAL, True)
    assert rec.lock_mask == 1 << r.CH_MEDICAL
    with pytest.raises(InvalidTransition, match="already locked"):
        w.do(cards.lock_application, num, r.CH_MEDICAL, True)
    assert w.do(cards.lock_application, num, r.CH_MEDICAL, False).lock_mask == 0
    with pytest.raises(InvalidArgument, match="channel"):
        w.do(cards.lock_application, num, r.CH_STATUS, True)


def test_sh_20_bank_loss_is_separate_from_card_loss(w):
    num = w.active()
    with pytest.raises(InvalidTransition, match="SH-20.*not open"):
        w.do(cards.report_bank_loss, num)
    w.do(cards.open_financial, num, "BOC")
    assert w.do(cards.report_bank_loss, num).has(r.FLAG_FINANCIAL_FROZEN)
    assert w.card(num).state == r.ACTIVE
    assert not w.do(cards.cancel_bank_loss, num).has(r.FLAG_FINANCIAL_FROZEN)


def test_sh_30_new_cards_carry_the_current_generation(w):
    assert w.apply().generation == config.generation_current
    assert config.generation_current not in config.generation_retired_at


def test_rc_14_residence_card_valid_one_year_from_issue(w):
    num = w.apply(pack=r.PACK_RC, transit=False).card_number
    w.do(cards.verify, num, True, "")
    rec = w.do(cards.issue, num)
    assert rec.state == r.ACTIVE  # no activation step for RC
    assert rec.valid_until == T0 + 365 * DAY  # 2026-09-22 -> 2027-09-22


def test_gz_9b_stored_pii_is_reused_and_never_silently_overwritten(w):
    from yikatong.server.app import pii_merger

    w.apply(pack=r.PACK_SH)
    given = pb.Holder(ssn=ssn(1))  # nothing asked again
    w.do(cards.apply, pack=r.PACK_GZ, ssn=ssn(1), merge_pii=pii_merger(given),
         with_transit=False, service_bank="ICBC", instant=False)
    with w.store.read() as txn:
        assert pb.Holder.FromString(w.store.book(txn).holder(ssn(1))[1]).name == "张三"
    changed = pb.Holder(ssn=ssn(1), name="李四")
    with pytest.raises(InvalidTransition, match="GZ-20"):
        w.do(cards.apply, pack=r.PACK_BJ, ssn=ssn(1), merge_pii=pii_merger(changed),
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

"""SH-20: a bank's loss report follows that bank's rules, configured per bank in the
issuing-banks file (`--issuing-banks`, `[bank_loss."BANK"]`) and said at start-up.

第二十条（银行挂失）: "社会保障卡已开通金融服务功能的，持卡人可以通过拨打银行服务电话等方式办理临时
挂失，或者持有效身份证件到银行受理网点办理正式挂失。关于挂失有效期、解除挂失和补领的具体规则，由相关服务
银行确定并告知持卡人。" (the validity of the loss report, its cancellation and the replacement
follow the rules the service bank sets and tells the holder.)
"""
import subprocess
import sys

import grpc
import pytest
from test_calls import error_info
from test_law import AGENCY, OUTLET, START, apply, call, reason, refused, rid, set_clock

from yikatong import fastpath
from yikatong.fastpath import _authorize_py
from yikatong.model import Card, Flag, Pack, State
from yikatong.server.harness import ROOT, running
from yikatong.storage import records
from yikatong.v1 import yikatong_pb2 as pb

BANKS = """version = "2026-11"
banks = ["ICBC", "BOC", "GZRCB"]

[bank_loss.ICBC]
loss_valid_days = 3
cancelled_by = ["BANK_OUTLET"]
"""


@pytest.fixture
def srv(tmp_path):
    banks = tmp_path / "banks.toml"
    banks.write_text(BANKS)
    with running(tmp_path, "--clock", "manual", "--clock-start", START,
                 "--issuing-banks", str(banks)) as s:
        yield s


def with_financial(srv, n: int, bank: str, pack=pb.PACK_SH) -> str:
    """An active card whose financial function is open at `bank`, its service bank."""
    card = apply(srv, n, pack, service_bank=bank).card_number
    call(srv, "Verify", AGENCY[pack], card_number=card, approved=True)
    call(srv, "Issue", AGENCY[pack], card_number=card)
    call(srv, "Activate", OUTLET[pack], card_number=card)
    call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank=bank)
    return card


def by_python(srv, card) -> str:
    """FINANCIAL at the bank switch, the request sent so that the Python path decides it (a
    terminal id the compiled wire path leaves to it), as the reference."""
    answer = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid(), card_number=card, channel=pb.CHANNEL_FINANCIAL, terminal_id="柜台"),
        metadata=srv.md("BANK_SWITCH"))
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


def frozen_as_told(srv, numbers) -> list[bool]:
    """CardStatus's financial_frozen: the batch (the compiled wire path's) and one by one."""
    md = srv.md("BANK_SWITCH")
    batch = srv.status.GetStatusBatch(pb.GetStatusBatchRequest(card_numbers=numbers),
                                      metadata=md).statuses
    one = [srv.status.GetStatus(pb.GetStatusRequest(card_number=n), metadata=md)
           for n in numbers]
    assert [s.financial_frozen for s in batch] == [s.financial_frozen for s in one]
    return [s.financial_frozen for s in batch]


@pytest.mark.parametrize("reported", ["2026-10-12T00:00:00", "2026-10-12T23:59:59"])
def test_sh_20_a_bank_loss_lapses_at_24_00_of_the_banks_last_day(srv, reported):
    """ICBC's rules: a loss report valid 3 days. Reported at any hour of 12 October, counted
    as SPEC.md section 6 counts days (the day of the report not counted): FINANCIAL is
    declined FINANCIAL_FROZEN to 23:59:59 on 15 October and approved from 24:00, at that
    second, on both paths and on the electronic card (SH-31: same effect), no job having
    run; the card's status says the report stands, then that it does not."""
    card = with_financial(srv, 1, "ICBC")
    ecard = srv.lifecycle.IssueElectronic(pb.IssueElectronicRequest(
        request_id=rid(), card_number=card), metadata=srv.md("ONLINE_PLATFORM")).number
    set_clock(srv, reported + "+08:00")
    assert call(srv, "ReportBankLoss", "BANK_SWITCH", card_number=card).financial_frozen
    set_clock(srv, "2026-10-15T23:59:59+08:00")
    for number in (card, ecard):
        assert reason(srv, number, pb.CHANNEL_FINANCIAL) == "FINANCIAL_FROZEN"
        assert by_python(srv, number) == "FINANCIAL_FROZEN"
        assert reason(srv, number) == "UNSPECIFIED"  # the social security functions run on
    assert frozen_as_told(srv, [card, ecard]) == [True, True]
    set_clock(srv, "2026-10-16T00:00:00+08:00")
    for number in (card, ecard):
        assert reason(srv, number, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"
        assert by_python(srv, number) == "UNSPECIFIED"
    assert frozen_as_told(srv, [card, ecard]) == [False, False]
    assert not call(srv, "GetCard", "CARD_AGENCY", card_number=card).financial_frozen


def test_sh_20_a_bank_without_rules_keeps_the_report_until_it_is_cancelled(srv):
    """A bank the file gives no rules: the report stands until cancelled, by the roles API.md
    names (BANK_OUTLET, BANK_SWITCH)."""
    card = with_financial(srv, 2, "BOC")
    call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=card)
    set_clock(srv, "2028-01-01T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "FINANCIAL_FROZEN"
    assert not call(srv, "CancelBankLoss", "BANK_SWITCH", card_number=card).financial_frozen
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"


def test_sh_20_cancellation_is_refused_to_a_role_the_banks_rules_exclude(srv):
    """ICBC's rules: its loss report is cancelled at its outlet only, not by its switch."""
    card = with_financial(srv, 3, "ICBC")
    call(srv, "ReportBankLoss", "BANK_SWITCH", card_number=card)
    e = refused(srv, "CancelBankLoss", "BANK_SWITCH", card_number=card)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(e).reason == "SH-20"
    assert "ICBC" in e.details() and "BANK_OUTLET" in e.details()
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "FINANCIAL_FROZEN"
    assert not call(srv, "CancelBankLoss", "BANK_OUTLET", card_number=card).financial_frozen
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"


def test_sh_20_a_lapsed_report_stands_no_more_and_a_new_one_runs_its_own_days(srv):
    """After the lapse no report stands: there is nothing to cancel, and the holder may
    report the card lost at the bank again, for the bank's days from the new report."""
    card = with_financial(srv, 4, "ICBC")
    set_clock(srv, "2026-10-12T10:00:00+08:00")
    call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=card)
    set_clock(srv, "2026-10-16T00:00:00+08:00")
    e = refused(srv, "CancelBankLoss", "BANK_OUTLET", card_number=card)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e).reason == "SH-20"
    assert not call(srv, "GetCard", "CARD_AGENCY", card_number=card).financial_frozen
    set_clock(srv, "2026-10-20T09:00:00+08:00")
    call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=card)
    set_clock(srv, "2026-10-23T23:59:59+08:00")
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "FINANCIAL_FROZEN"
    set_clock(srv, "2026-10-24T00:00:00+08:00")
    assert reason(srv, card, pb.CHANNEL_FINANCIAL) == "UNSPECIFIED"


def test_sh_20_start_up_names_each_banks_loss_rules(srv):
    assert ("issuing-bank check (GZ-9c) on: list version 2026-11, 3 banks; bank loss reports "
            "(SH-20): ICBC's lapse at 24:00 of the 3rd day after the report, cancelled by "
            "BANK_OUTLET; any other bank's stand until cancelled by BANK_OUTLET or "
            "BANK_SWITCH") in srv.output()


def test_sh_20_without_a_file_start_up_says_reports_stand_until_cancelled(tmp_path):
    with running(tmp_path) as s:
        assert ("issuing-bank check (GZ-9c) off: no --issuing-banks list configured; bank "
                "loss reports (SH-20) stand until cancelled by BANK_OUTLET or BANK_SWITCH"
                ) in s.output()


@pytest.mark.parametrize(("entry", "said"), [
    ("loss_valid_days = -1", "bank_loss.ICBC: loss_valid_days must be a whole number of days "
                             "from 0 (the report stands until cancelled) to 3660"),
    ('loss_valid_days = "3"', "bank_loss.ICBC: loss_valid_days must be a whole number"),
    ('cancelled_by = ["COMMUNITY_OUTLET"]', "bank_loss.ICBC: cancelled_by must list "
                                             "BANK_OUTLET, BANK_SWITCH or both"),
    ("cancelled_by = []", "bank_loss.ICBC: cancelled_by is empty and loss_valid_days 0: the "
                          "report would stand for ever"),
    ("valid_days = 3", "bank_loss.ICBC: unknown key valid_days"),
])
def test_sh_20_a_bad_bank_entry_is_refused_at_start_in_one_line(tmp_path, entry, said):
    banks = tmp_path / "banks.toml"
    banks.write_text(f'version = "1"\nbanks = ["ICBC"]\n\n[bank_loss.ICBC]\n{entry}\n')
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--issuing-banks",
                          str(banks)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith(f"yikatong: issuing-banks file {banks}: {said}")
    assert out.stderr.count("\n") == 1 and out.stdout == ""


def test_sh_20_both_fast_paths_compare_the_stored_end_alike():
    """The stored end of a bank loss (0: until cancelled) decides FINANCIAL_FROZEN in both
    twins the same way, to the second."""
    now = 1_800_000_000
    for flags in (Flag.FINANCIAL_OPEN, Flag.FINANCIAL_OPEN | Flag.FINANCIAL_FROZEN):
        record = records.encode_card(Card("310000000001", Pack.SH, State.ACTIVE, flags=flags))
        for end in (0, now - 1, now, now + 1):
            for channel in (pb.CHANNEL_FINANCIAL, pb.CHANNEL_MEDICAL):
                args = (record, channel, now, 0, 0, 0, end)
                want = _authorize_py.decide(_authorize_py.Policy({}), *args)
                assert fastpath.decide(fastpath.Policy({}), *args) == want
                frozen = channel == pb.CHANNEL_FINANCIAL and flags & Flag.FINANCIAL_FROZEN \
                    and (end == 0 or now < end)
                assert want == (pb.DECLINE_REASON_FINANCIAL_FROZEN if frozen else 0)


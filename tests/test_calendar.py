"""SPEC.md section 6: a year without its State Council notice is counted provisionally from the
statutory holidays, marked so, and counted again once its notice is installed; nothing is
refused and no listing fails because a year has no file (issue 23)."""
import datetime as dt
import os
import subprocess
import sys

import lmdb
import pytest
from test_law import active, apply, call, change, due, set_clock

from yikatong import calendar
from yikatong import clock as clocks
from yikatong.server.harness import ROOT, ServerProcess, running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

TODAY = "2026-12-06T10:00:00+08:00"
T = clocks.parse_time

# A notice for 2027 as an operator would install it (dates invented for the test: 4 January a
# holiday and Saturday 9 January a make-up working day, unlike the statutory count).
NOTICE_2027 = """notice = "国务院办公厅关于2027年部分节假日安排的通知 (test)"
holidays = ["2027-01-01", "2027-01-02", "2027-01-03", "2027-01-04",
            "2027-02-05", "2027-02-06", "2027-02-07", "2027-02-08", "2027-02-09", "2027-02-10",
            "2027-10-01", "2027-10-02", "2027-10-03", "2027-10-04", "2027-10-05"]
workdays = ["2027-01-09"]
"""


def test_a_year_without_its_notice_is_counted_from_the_statutory_holidays():
    """全国年节及纪念日放假办法 (2024): 2027's Spring Festival is lunar New Year's Eve and the
    1st to 3rd days (5 to 8 February) with two weekdays off for the weekend days among them (9
    and 10 February, art. 6); National Day 1 to 3 October with 4 and 5 off for the weekend."""
    assert not calendar.is_official(2027) and calendar.is_official(2026)
    rest = [d for d in (dt.date(2027, 2, 1) + dt.timedelta(days=i) for i in range(14))
            if not calendar.is_working_day(d)]
    assert rest == [dt.date(2027, 2, d) for d in (5, 6, 7, 8, 9, 10, 13, 14)]
    assert [d for d in range(1, 9) if not calendar.is_working_day(dt.date(2027, 10, d))] == [
        1, 2, 3, 4, 5]
    # an end counted through 2027 is provisional; one within 2026 is not
    assert calendar.end_of_working_days(T("2027-02-04T10:00:00+08:00"), 1) == (
        T("2027-02-12T00:00:00+08:00"), True)
    assert calendar.end_of_working_days(T("2026-12-16T10:00:00+08:00"), 20) == (  # RC-23
        T("2027-01-15T00:00:00+08:00"), True)
    assert calendar.end_of_working_days(T("2026-09-21T15:00:00+08:00"), 3) == (
        T("2026-09-25T00:00:00+08:00"), False)


def test_a_calendar_file_is_checked_whole(tmp_path):
    for text, says in [("holidays = [", "TOMLDecodeError"),
                       ('notice = "x"\nholidays = ["2028-01-01"]\nworkdays = []', "not in 2027"),
                       ('holidays = ["2027-01-01"]\nworkdays = []', "names no notice"),
                       ('notice = "x"\nholidays = ["2027-01-01"]\nworkdays = ["2027-01-01"]',
                        "both a holiday and a working day")]:
        (tmp_path / "2027.toml").write_text(text)
        with pytest.raises(calendar.CalendarFileError) as e:
            calendar.load(str(tmp_path))
        assert str(e.value).startswith("2027.toml: ") and says in str(e.value), e.value
    assert not calendar.is_official(2027)  # nothing of a bad file is used


def test_calendar_warns_from_1_november_when_next_year_has_no_notice():
    assert calendar.missing_year(T("2026-10-31T23:59:59+08:00")) == 0
    assert calendar.missing_year(T("2026-11-01T00:00:00+08:00")) == 2027
    assert calendar.missing_year(T("2025-12-01T00:00:00+08:00")) == 0  # 2026 is shipped


def test_rc_13_a_filing_at_todays_date_is_taken_with_a_provisional_end(tmp_path):
    """Today's date (6 December 2026): a move on 5 December is due 30 days later, 4 January
    2027, a working day on the statutory count: taken, in time, marked provisional."""
    with running(tmp_path, "--clock", "manual", "--clock-start", "2026-09-21T15:00:00+08:00"
                 ) as srv:
        srv.residence = rpc.ResidenceCardStub(srv.channel)
        card = active(srv, 50, pb.PACK_RC)
        set_clock(srv, TODAY)
        answer = change(srv, card, "2026-12-05", residence_address="上海市徐汇区漕溪北路1号")
        assert (answer.due_at, answer.late, answer.provisional) == (
            T("2027-01-05T00:00:00+08:00"), False, True)


def test_a_filing_is_judged_late_only_on_the_official_count(tmp_path):
    """Past a provisional end by less than the longest official run of rest days, a filing
    is not judged late: the notice may yet move the end there. Past it by more, it is."""
    with running(tmp_path, "--clock", "manual", "--clock-start", "2026-09-21T15:00:00+08:00"
                 ) as srv:
        srv.residence = rpc.ResidenceCardStub(srv.channel)
        card = active(srv, 51, pb.PACK_RC)
        set_clock(srv, "2027-01-05T00:00:00+08:00")  # due 24:00 on 4 January, provisionally
        answer = change(srv, card, "2026-12-05", residence_address="上海市徐汇区漕溪北路2号")
        assert (answer.late, answer.provisional) == (False, True)
        set_clock(srv, "2027-01-15T00:00:00+08:00")  # 10 days past it
        answer = change(srv, card, "2026-12-05", residence_address="上海市徐汇区漕溪北路3号")
        assert (answer.late, answer.provisional) == (True, True)


def _items(srv, within=0):
    answer = rpc.DeadlinesStub(srv.channel).ListDue(pb.ListDueRequest(within_days=within),
                                                    metadata=srv.md("CARD_AGENCY"))
    return [(i.card_number, i.rule, clocks.format_time(i.due_at), i.provisional, i.problem)
            for i in answer.items]


def test_list_due_lists_provisional_ends_and_a_notice_installed_recounts_them(tmp_path):
    """An application on Tuesday 29 December 2026: SH-10's 3 working days are 30 and 31
    December and, provisionally, Monday 4 January 2027: listed, marked provisional, with an
    older step overdue beside it. The operator installs 2027's notice (4 January a holiday)
    and restarts: the end moves to 24:00 on 5 January, official, and the log says so."""
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start",
                        "2026-12-01T10:00:00+08:00")
    try:
        late = apply(srv, 52).card_number  # Tuesday: due 24:00 on Friday 4 December
        set_clock(srv, "2026-12-29T10:00:00+08:00")
        card = apply(srv, 53).card_number
        assert _items(srv, 14) == [
            (late, "SH-10", "2026-12-05T00:00:00+08:00", False, ""),
            (card, "SH-10", "2027-01-05T00:00:00+08:00", True, "")]
    finally:
        assert srv.stop() == 0
    calendar_dir = tmp_path / "calendar"
    calendar_dir.mkdir()
    (calendar_dir / "2027.toml").write_text(NOTICE_2027)
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start",
                        "2026-12-29T10:00:00+08:00", "--calendar-dir", str(calendar_dir),
                        data_dir=srv.data_dir)
    try:
        assert _items(srv, 14) == [
            (late, "SH-10", "2026-12-05T00:00:00+08:00", False, ""),
            (card, "SH-10", "2027-01-06T00:00:00+08:00", False, "")]
        recounted = [line for line in srv.output().splitlines() if "step recounted" in line]
        assert len(recounted) == 1 and card in recounted[0]
        assert '"from": "2027-01-05T00:00:00+08:00", "to": "2027-01-06T00:00:00+08:00"' in \
            recounted[0]
        assert "no official calendar" not in srv.output()
    finally:
        assert srv.stop() == 0


def test_one_unreadable_step_never_hides_the_others(tmp_path):
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", TODAY)
    try:
        good = apply(srv, 54).card_number
    finally:
        srv.stop()
    env = lmdb.open(os.path.join(srv.data_dir, "lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(b"310000999999", b"\x07garbage", db=env.open_db(b"steps", txn=txn))
    env.close()
    srv = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", TODAY,
                        data_dir=srv.data_dir)
    try:
        items = _items(srv, 30)
        assert items[0][0] == "310000999999" and items[0][4].startswith("steps not readable")
        assert items[1][:2] == (good, "SH-10")
    finally:
        srv.stop()
    out = subprocess.run([sys.executable, "-m", "yikatong", "due", "--data-dir", srv.data_dir,
                          "--within", "3660"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1, out.stderr  # a problem is an exit code, and the rest listed
    assert out.stdout.startswith("310000999999 could not be counted: ")
    assert f"{good} verification SH-10" in out.stdout


def test_a_bad_calendar_file_stops_the_start_in_one_line(tmp_path):
    (tmp_path / "2027.toml").write_text('notice = "x"\nholidays = ["2027-13-01"]\nworkdays = []')
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "data"), "--calendar-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "yikatong: 2027.toml: ValueError: month must be in 1..12"], out.stderr


def test_the_start_up_line_warns_when_next_year_has_no_notice(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", TODAY) as srv:
        assert any("WARNING: no official calendar for 2027" in line for line in srv.banner)
    with running(tmp_path, "--clock", "manual", "--clock-start",
                 "2026-10-31T10:00:00+08:00") as srv:
        assert not any("WARNING" in line for line in srv.banner)


def test_list_due_refuses_no_one_for_a_missing_year(tmp_path):
    """The old refusal, FAILED_PRECONDITION no working-day calendar for 2027, is gone from
    every path: an application, its verification (SH-11 reaches 2027) and the listing."""
    with running(tmp_path, "--clock", "manual", "--clock-start", TODAY) as srv:
        card = apply(srv, 55).card_number
        call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True)
        assert due(srv, 60) == [(card, "issue", "SH-11", "2027-01-06T00:00:00+08:00", False)]


def test_1_january_without_this_years_notice_still_warns():
    """The year came and its notice did not: its ends are provisional now, so the warning
    (the start-up line, `yikatong due`, the metric behind YikatongCalendarNextYearMissing)
    names this year rather than going quiet once next year's date is before 1 November."""
    assert calendar.missing_year(T("2027-01-01T00:00:00+08:00")) == 2027
    assert calendar.missing_year(T("2027-06-30T12:00:00+08:00")) == 2027
    assert calendar.missing_year(T("2024-03-01T00:00:00+08:00")) == 2024  # none shipped

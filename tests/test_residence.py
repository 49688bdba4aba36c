"""The rest of the Residence Card (RC-8, RC-12, RC-14, RC-17 to RC-23, RC-29, RC-30) and the
electronic card and photo rules of the social security cards (SH-31, GZ-35, SH-22b, SH-4,
GZ-17, BJ-4), each through the gRPC method its caller uses and at the rule's edges: the last
second of a period and the first after it (STYLE.md section 9). The articles' own words are
quoted."""
import os
import shutil
import subprocess
import sys

import grpc
import pytest
from test_calls import error_info
from test_law import (
    OUTLET,
    REGION,
    START,
    active,
    apply,
    call,
    due,
    holder,
    reason,
    rid,
    set_clock,
)
from test_money_e2e import error_of

from yikatong import clock as clocks
from yikatong import points
from yikatong.model import RC_ENTITLEMENTS
from yikatong.server.harness import ROOT, ServerProcess, metadata, running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


@pytest.fixture
def srv(tmp_path):
    with running(tmp_path, "--clock", "manual", "--clock-start", START) as s:
        s.residence = rpc.ResidenceCardStub(s.channel)
        yield s


EMPLOYER = "91350100M000100Y43"  # a unified social credit code with a valid check character
T = clocks.parse_time


def service(srv, card, code) -> str:
    answer = srv.authorization.Authorize(pb.AuthorizeRequest(
        request_id=rid(), card_number=card, channel=pb.CHANNEL_SERVICE, service_code=code),
        metadata=srv.md("COMMUNITY_OUTLET"))
    return pb.DeclineReason.Name(answer.reason).removeprefix("DECLINE_REASON_")


def renew(srv, card):
    return srv.residence.Renew(pb.RenewRequest(request_id=rid(), card_number=card),
                               metadata=srv.md("COMMUNITY_OUTLET"))


def claims(**values) -> list[pb.PointsClaim]:
    return [pb.PointsClaim(indicator=k, value=str(v)) for k, v in values.items()]


def apply_points(srv, card, filer=pb.POINTS_FILER_EMPLOYER, employer=EMPLOYER, **values):
    # RC-30: a holder filing says what the employer did (here: failed to file)
    default = pb.EMPLOYER_DEFAULT_FAILED_TO_FILE if filer == pb.POINTS_FILER_HOLDER else 0
    return srv.residence.ApplyPoints(pb.ApplyPointsRequest(
        request_id=rid(), card_number=card, filer=filer, employer=employer,
        employer_default=default, claims=claims(**values), evidence_ref="HR-2026-0001"),
        metadata=srv.md("HRSS"))


def decide_points(srv, card, approved=True, why=""):
    return srv.residence.DecidePoints(pb.DecidePointsRequest(
        request_id=rid(), card_number=card, approved=approved, reason=why),
        metadata=srv.md("HRSS"))


def get_points(srv, card, purpose="points review"):
    return srv.residence.GetPoints(pb.GetPointsRequest(card_number=card, purpose=purpose),
                                   metadata=srv.md("HRSS"))


def record_credit(srv, serious=True, **key):
    return rpc.HoldersStub(srv.channel).RecordCredit(pb.RecordCreditRequest(
        request_id=rid(), ground=pb.CREDIT_GROUND_FORGED_DOCUMENTS, evidence_ref="PSB-2026-77",
        serious=serious, **key), metadata=srv.md("HRSS"))


# ---------------------------------------------------------------- RC-14, RC-17, RC-18

def test_rc_17_rc_18_entitlements_end_to_end_through_renewal(srv):
    """Art. 17: the holder "shall enjoy ... the following basic public services"; art. 18:
    "the following conveniences". Every one is a SERVICE code a card in force is allowed; a
    code the card does not entitle is NOT_ENTITLED. Art. 14: not renewed in time, suspended
    from its expiry second (issued 21 September 2026: valid to 24:00 on 21 September 2027);
    renewal opens 30 days before the expiry date, not a second earlier; renewed, approved."""
    card = active(srv, 1, pb.PACK_RC)
    assert len(RC_ENTITLEMENTS) == 14  # RC-17's three rights, (1) to (5); RC-18 (1) to (6)
    for code in RC_ENTITLEMENTS:
        assert service(srv, card, code) == "UNSPECIFIED", code
    assert service(srv, card, "") == "UNSPECIFIED"  # identification only
    assert service(srv, card, "RC_HOUSING_LOTTERY") == "NOT_ENTITLED"  # not an entitlement
    assert service(srv, card, "RC_POINTS_SCHOOL_ENTRY") == "NOT_ENTITLED"  # no points yet
    sh = active(srv, 2)  # RC-20: a Shanghai social security card shows no RC points
    assert service(srv, sh, "RC_POINTS_SCHOOL_ENTRY") == "NOT_ENTITLED"

    set_clock(srv, "2027-08-21T23:59:59+08:00")
    early = error_of(renew, srv, card)
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "renewal opens on 2027-08-22" in early.details() and "RC-14" in early.details()
    set_clock(srv, "2027-09-21T23:59:59+08:00")
    assert service(srv, card, "RC_LEGAL_AID") == "UNSPECIFIED"
    set_clock(srv, "2027-09-22T00:00:00+08:00")
    for code in ("RC_LEGAL_AID", "RC_DRIVING_LICENCE", ""):
        assert service(srv, card, code) == "RC_NOT_RENEWED"
    assert renew(srv, card).valid_until == T("2028-09-23T00:00:00+08:00")  # a year from today
    assert service(srv, card, "RC_LEGAL_AID") == "UNSPECIFIED"


def test_rc_14_a_renewal_while_a_replacement_is_made_carries_to_the_new_card(srv):
    """Art. 14: renewed "once a year". Renewed on 22 August 2027 while its replacement
    (art. 15) is being made, the card's new year (to 24:00 on 21 September 2028) is the new
    card's when it is issued: the holder does not renew twice."""
    card = active(srv, 14, pb.PACK_RC)
    set_clock(srv, "2027-08-22T01:00:00+08:00")
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_DAMAGED).card_number
    assert renew(srv, card).valid_until == T("2028-09-22T00:00:00+08:00")
    issued = call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ="上海市公安局")
    assert issued.valid_until == T("2028-09-22T00:00:00+08:00")
    set_clock(srv, "2027-09-22T00:00:00+08:00")
    assert service(srv, new, "RC_LEGAL_AID") == "UNSPECIFIED"


# ---------------------------------------------------------------- RC-20 to RC-23, RC-30

def test_rc_20_the_standard_value_unlocks_the_points_services_to_the_point(srv):
    """Art. 20: "The Card holders may, when their points reach the standard value, enjoy the
    corresponding public service." The example table's standard value is 120: 119 points are
    not enough, 120 are."""
    short, enough = active(srv, 3, pb.PACK_RC), active(srv, 4, pb.PACK_RC)
    apply_points(srv, short, education="college", age="18-45", social_insurance_years=13)
    apply_points(srv, enough, education="bachelor", age="18-45", social_insurance_years=10)
    assert decide_points(srv, short).points == 119
    decided = decide_points(srv, enough)
    assert (decided.points, decided.standard_value, decided.meets_standard) == (120, 120, True)
    assert decided.table_version == decided.table_in_force == "example-2026.1"
    (decision,) = decided.decisions
    assert [(line.indicator, line.points) for line in decision.lines] == [
        ("education", 60), ("age", 30), ("social_insurance_years", 30)]
    assert service(srv, short, "RC_POINTS_SCHOOL_ENTRY") == "NOT_ENTITLED"
    assert service(srv, enough, "RC_POINTS_SCHOOL_ENTRY") == "UNSPECIFIED"
    assert not get_points(srv, short).meets_standard
    # the score belongs to the holder: a replacement card carries it (RC-15)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=enough,
               reason=pb.REPLACE_REASON_DAMAGED).card_number
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ="上海市公安局")
    assert service(srv, new, "RC_POINTS_CHILD_MEDICAL") == "UNSPECIFIED"


def test_rc_23_a_points_decision_is_due_within_20_working_days(srv):
    """Art. 23: the holders "entrust their work units to go through the formalities"; HRSS
    "shall, within 20 working days, accumulate the points". Filed Monday 21 September 2026:
    the Mid-Autumn days (25 to 27 September) and the National Day week (1 to 7 October) are
    not counted, the make-up Saturday 10 October is: due by 24:00 on Monday 26 October."""
    card = active(srv, 5, pb.PACK_RC)
    filed = apply_points(srv, card, education="master")
    application = filed.open_application
    assert (application.filer, application.employer, application.client_id) == (
        pb.POINTS_FILER_EMPLOYER, EMPLOYER, "hrss")
    assert application.due_at == T("2026-10-27T00:00:00+08:00")
    step = (card, "points decision", "RC-23", "2026-10-27T00:00:00+08:00")
    set_clock(srv, "2026-10-26T23:59:59+08:00")
    assert step + (False,) in due(srv, 1)
    set_clock(srv, "2026-10-27T00:00:00+08:00")
    assert step + (True,) in due(srv, 0)
    again = error_of(apply_points, srv, card, education="doctorate")
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-23" in again.details()
    decided = decide_points(srv, card)
    assert decided.points == 100 and not decided.HasField("open_application")
    assert [i for i in due(srv, 60) if i[0] == card] == []  # decided: nothing owed


def test_rc_30_the_holder_files_at_hrss_when_the_employer_will_not(srv):
    """Art. 30: "when their units refuse without justified reasons or fail to apply for the
    points for them, [the holders] may apply themselves at the human resources and social
    security departments": the same application, the same 20 working days."""
    card = active(srv, 6, pb.PACK_RC)
    filed = apply_points(srv, card, filer=pb.POINTS_FILER_HOLDER, education="bachelor")
    assert filed.open_application.filer == pb.POINTS_FILER_HOLDER
    assert filed.open_application.due_at == T("2026-10-27T00:00:00+08:00")
    no_employer = error_of(apply_points, srv, active(srv, 7, pb.PACK_RC), employer="",
                           education="bachelor")
    assert no_employer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_employer.details().startswith("employer: must be a unified social credit code")
    bad_check = error_of(apply_points, srv, card, employer=EMPLOYER[:17] + "4", education="x")
    assert bad_check.details() == "employer: check character does not match (GB 32100)"


def test_rc_21_claims_are_checked_against_the_table_and_a_veto_zeroes_the_score(srv):
    """Art. 21: basic indicators, "point increasing and decreasing indicators and the
    one-vote veto indicators". A claim names an indicator of the table and a value it
    allows; a veto that applies makes the score 0, and the services go with it."""
    card = active(srv, 8, pb.PACK_RC)
    for values, field, says in (
            ({"education": "master", "height": "180"}, "claims[1].indicator",
             "'height' is not an indicator of table example-2026.1"),
            ({"education": "genius"}, "claims[0].value", "'genius' is not a level"),
            ({"social_insurance_years": "41"}, "claims[0].value", "a whole number from 0 to 40"),
            ({"shortage_occupation": "true"}, "claims[0].value", 'claimed with "yes"')):
        e = error_of(apply_points, srv, card, **values)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details().startswith(f"{field}: ") and says in e.details(), e.details()
    nothing = error_of(decide_points, srv, card)
    assert nothing.code() == grpc.StatusCode.FAILED_PRECONDITION
    apply_points(srv, card, education="doctorate", shortage_occupation="yes")
    unexplained = error_of(decide_points, srv, card, approved=False)
    assert unexplained.details().startswith("reason: a refusal must say why")
    assert decide_points(srv, card).points == 140
    assert service(srv, card, "RC_POINTS_SCHOOL_ENTRY") == "UNSPECIFIED"
    apply_points(srv, card, education="doctorate", false_statement_record="yes")
    refused = decide_points(srv, card, approved=False, why="the diploma is not verified")
    assert refused.points == 140  # a refusal leaves the score in force
    assert refused.decisions[-1].reason == "the diploma is not verified"
    apply_points(srv, card, education="doctorate", serious_criminal_record="yes")
    vetoed = decide_points(srv, card)
    assert vetoed.points == 0
    assert vetoed.decisions[-1].reason == "one-vote veto: serious_criminal_record (RC-21)"
    assert service(srv, card, "RC_POINTS_SCHOOL_ENTRY") == "NOT_ENTITLED"
    assert [d.points for d in vetoed.decisions] == [140, 0, 0]


def test_rc_22_a_decision_on_a_new_table_keeps_the_old_scores_version(tmp_path):
    """Art. 22: the indicators, point standards and standard value "shall be adjusted
    dynamically"; every score records the table version it was made on. A server restarted
    on a new table decides on it; the earlier score keeps its version."""
    data = str(tmp_path / "data")
    first = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START,
                          data_dir=data)
    try:
        first.md, first.residence = metadata, rpc.ResidenceCardStub(first.channel)
        card = active(first, 9, pb.PACK_RC)
        apply_points(first, card, education="bachelor_with_degree", age="18-45")
        assert decide_points(first, card).table_version == "example-2026.1"
    finally:
        first.stop()
    example = os.path.join(os.path.dirname(points.__file__), "example.toml")
    table = str(tmp_path / "table-2027.toml")
    shutil.copy(example, table)
    with open(table) as f:
        text = f.read().replace('version = "example-2026.1"', 'version = "example-2027.1"')
    with open(table, "w") as f:
        f.write(text.replace("standard_value = 120", "standard_value = 130"))
    second = ServerProcess(tmp_path, "--clock", "manual", "--clock-start", START,
                           "--points-table", table, data_dir=data)
    try:
        second.md, second.residence = metadata, rpc.ResidenceCardStub(second.channel)
        assert "points table (RC-22) version example-2027.1, an EXAMPLE" in second.output()
        before = get_points(second, card)
        assert (before.points, before.table_version, before.table_in_force) == (
            120, "example-2026.1", "example-2027.1")
        assert (before.standard_value, before.meets_standard) == (130, False)
        apply_points(second, card, education="master", age="18-45")
        after = decide_points(second, card)
        assert [d.table_version for d in after.decisions] == ["example-2026.1",
                                                              "example-2027.1"]
        assert (after.points, after.table_version, after.meets_standard) == (
            130, "example-2027.1", True)
    finally:
        second.stop()


def test_a_points_table_that_is_not_one_stops_the_server_with_one_line(tmp_path):
    bad = tmp_path / "table.toml"
    bad.write_text('version = "x"\nstandard_value = 120\n[indicators.age]\nkind = "bonus"\n')
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--points-table",
                          str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == (f"yikatong: points table {bad}: indicators.age: kind must be one of "
                          "basic, increase, decrease, veto\n")


# ---------------------------------------------------------------- RC-29

def test_rc_29_a_serious_forgery_bars_the_holders_applications_to_the_second(srv):
    """Art. 29: individuals who forge documents "in serious cases ... shall not apply for
    points within three years": recorded at 15:00 on 21 September 2026, barred to 24:00 on
    21 September 2029. A case not marked serious bars nothing."""
    card, other = active(srv, 10, pb.PACK_RC), active(srv, 11, pb.PACK_RC)
    record_credit(srv, serious=False, card_number=other)
    apply_points(srv, other, education="master")
    assert record_credit(srv, card_number=card).points_barred_until == T(
        "2029-09-22T00:00:00+08:00")
    assert get_points(srv, card).barred_until == T("2029-09-22T00:00:00+08:00")
    barred = error_of(apply_points, srv, card, education="master")
    assert barred.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(barred).reason == "RC-29"
    assert "to 24:00 of 2029-09-21" in barred.details()
    set_clock(srv, "2029-09-21T23:59:59+08:00")
    renew(srv, card)  # lapsed since 2027: in force again
    assert error_of(apply_points, srv, card, education="master").code() == \
        grpc.StatusCode.FAILED_PRECONDITION
    set_clock(srv, "2029-09-22T00:00:00+08:00")
    assert apply_points(srv, card, education="master").barred_until == 0


def test_rc_29_a_forging_employer_is_fined_and_in_serious_cases_barred(srv):
    """Art. 29: units that forge documents in their staff's applications "shall be imposed
    ... a fine of not less than 30,000 yuan but not more than 50,000 yuan ... in serious
    cases, they shall not apply for points for their staff within three years"; the holder
    may still file at HRSS (art. 30)."""
    card = active(srv, 12, pb.PACK_RC)
    for fine in (2_999_999, 5_000_001):
        e = error_of(record_credit, srv, employer=EMPLOYER, fine_fen=fine)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details().startswith("fine_fen: RC-29 fines a work unit 30,000 to 50,000 yuan")
    mild = record_credit(srv, serious=False, employer=EMPLOYER, fine_fen=3_000_000)
    assert (mild.rule, mild.employer, mild.fine_fen, mild.points_barred_until) == (
        "RC-29", EMPLOYER, 3_000_000, 0)
    apply_points(srv, card, education="college")  # not serious: the employer still files
    decide_points(srv, card)
    serious = record_credit(srv, employer=EMPLOYER, fine_fen=5_000_000)
    assert serious.points_barred_until == T("2029-09-22T00:00:00+08:00")
    barred = error_of(apply_points, srv, card, education="master")
    assert barred.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"employer {EMPLOYER} may not apply for its staff until 24:00 of 2029-09-21" in \
        barred.details()
    itself = apply_points(srv, card, filer=pb.POINTS_FILER_HOLDER, education="master")
    assert itself.open_application.filer == pb.POINTS_FILER_HOLDER
    not_forgery = error_of(rpc.HoldersStub(srv.channel).RecordCredit, pb.RecordCreditRequest(
        request_id=rid(), employer=EMPLOYER, ground=pb.CREDIT_GROUND_FRAUD, evidence_ref="x",
        fine_fen=3_000_000), metadata=srv.md("HRSS"))
    assert not_forgery.details().startswith("ground: an employer's record is for forged")


def test_points_are_hrss_and_read_as_personal_information(srv):
    """Points and credit bars are read by HRSS for a stated purpose, every read audited; of
    a Residence Card holder only (a social security card names no points)."""
    card = active(srv, 13, pb.PACK_RC)
    for role in ("COMMUNITY_OUTLET", "CARD_AGENCY", "TRANSIT_GATE"):
        e = error_of(srv.residence.GetPoints, pb.GetPointsRequest(card_number=card,
                                                                  purpose="x"),
                     metadata=srv.md(role))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_of(get_points, srv, card, " ").details().startswith("purpose: is required")
    get_points(srv, card, "review of case 13")
    sh = active(srv, 14)
    not_rc = error_of(get_points, srv, sh, "fishing")
    assert not_rc.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-20" in not_rc.details()
    events = [(e.card_number, e.purpose, e.outcome) for e in rpc.AuditStub(srv.channel).Export(
        pb.ExportRequest(), metadata=srv.md("AUDITOR")) if e.method == "ResidenceCard.GetPoints"]
    assert events == [(card, "review of case 13", "OK"),
                      (sh, "fishing", "FAILED_PRECONDITION")]


def test_rc_20_a_score_decided_while_a_card_is_made_or_before_a_new_one_is_carried(srv):
    """The score is the holder's: decided while a replacement is being made (RC-15), the new
    card has it when issued; after a cancellation (RC-16) a new card has it from its
    application (art. 31: points need not be applied for again). Decided through a social
    security card of the same holder: refused (RC-20)."""
    card = active(srv, 15, pb.PACK_RC)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_DAMAGED).card_number
    apply_points(srv, card, education="doctorate", age="18-45")
    sh = active(srv, 15)  # the same person's Shanghai social security card
    e = error_of(decide_points, srv, sh)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RC-20" in e.details()
    assert decide_points(srv, card).points == 140
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=new, issuing_organ="上海市公安局")
    assert service(srv, new, "RC_POINTS_SCHOOL_ENTRY") == "UNSPECIFIED"
    call(srv, "Cancel", "PUBLIC_SECURITY", card_number=new, reason="moved away",
         ground=pb.CANCEL_GROUND_ENTITLEMENT_ENDED)
    again = apply(srv, 15, pb.PACK_RC).card_number
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=again, approved=True)
    call(srv, "Issue", "PUBLIC_SECURITY", card_number=again, issuing_organ="上海市公安局")
    assert service(srv, again, "RC_POINTS_SCHOOL_ENTRY") == "UNSPECIFIED"


def test_rc_29_who_records_a_forgery_and_a_fine(srv):
    """Art. 29: a forging individual is punished by public security, a forging unit fined by
    HRSS: the card agency records neither; only HRSS imposes the unit's fine."""
    card = active(srv, 16, pb.PACK_RC)
    holders = rpc.HoldersStub(srv.channel)
    for role, key in (("CARD_AGENCY", {"card_number": card}),
                      ("CARD_AGENCY", {"employer": EMPLOYER}),
                      ("PUBLIC_SECURITY", {"employer": EMPLOYER})):
        e = error_of(holders.RecordCredit, pb.RecordCreditRequest(
            request_id=rid(), ground=pb.CREDIT_GROUND_FORGED_DOCUMENTS, evidence_ref="x",
            fine_fen=3_000_000 if "employer" in key else 0, **key), metadata=srv.md(role))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "RC-29" in e.details(), role
    recorded = holders.RecordCredit(pb.RecordCreditRequest(
        request_id=rid(), card_number=card, ground=pb.CREDIT_GROUND_FORGED_DOCUMENTS,
        evidence_ref="PSB-1"), metadata=srv.md("PUBLIC_SECURITY"))
    assert recorded.rule == "RC-29"


# ---------------------------------------------------------------- RC-8, RC-12

def proxy(ground, n=90, relation=pb.PROXY_RELATION_GUARDIAN) -> pb.Proxy:
    return pb.Proxy(ssn=holder(n, pb.PACK_SH).ssn, name="李强", relation=relation,
                    ground=ground)


def test_rc_8_a_guardian_or_close_relative_applies_on_the_rule_s_grounds_to_the_day(srv):
    """Art. 8: "minors under the age of 16, elderly people who have mobility problems and
    disabled persons, their guardians or close relatives may apply". On 21 September 2026 a
    child born 21 September 2010 is still under 16 (16 full years at 24:00 that day); one
    born a day earlier is not. The elderly are 60 or over (Elderly Rights Law art. 2)."""
    minor = lambda n, born: apply(  # noqa: E731
        srv, n, pb.PACK_RC, holder=holder(n, pb.PACK_RC, birth_date=born),
        proxy=proxy(pb.PROXY_GROUND_MINOR_UNDER_16))
    card = minor(20, "2010-09-21")
    assert card.applied_by_proxy == pb.PROXY_RELATION_GUARDIAN
    sixteen = error_of(minor, 21, "2010-09-20")
    assert sixteen.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(sixteen).reason == "RC-8" and "16 or over" in sixteen.details()
    elderly = lambda n, born: apply(  # noqa: E731
        srv, n, pb.PACK_RC, holder=holder(n, pb.PACK_RC, birth_date=born),
        proxy=proxy(pb.PROXY_GROUND_ELDERLY_MOBILITY,
                    relation=pb.PROXY_RELATION_CLOSE_RELATIVE))
    assert elderly(22, "1966-09-20").applied_by_proxy == pb.PROXY_RELATION_CLOSE_RELATIVE
    young = error_of(elderly, 23, "1966-09-21")
    assert error_info(young).reason == "RC-8" and "under 60" in young.details()
    disabled = apply(srv, 24, pb.PACK_RC, proxy=proxy(pb.PROXY_GROUND_DISABLED))
    assert disabled.applied_by_proxy == pb.PROXY_RELATION_GUARDIAN
    in_person = apply(srv, 25, pb.PACK_RC)
    assert in_person.applied_by_proxy == pb.PROXY_RELATION_UNSPECIFIED
    for pack, p, field in ((pb.PACK_SH, proxy(pb.PROXY_GROUND_DISABLED), "proxy"),
                           (pb.PACK_RC, pb.Proxy(ssn=holder(26, pb.PACK_RC).ssn, name="李强",
                                                 relation=pb.PROXY_RELATION_GUARDIAN,
                                                 ground=pb.PROXY_GROUND_DISABLED), "proxy.ssn"),
                           (pb.PACK_RC, pb.Proxy(ssn=holder(91, pb.PACK_SH).ssn, name="李强",
                                                 relation=pb.PROXY_RELATION_GUARDIAN),
                            "proxy.ground")):
        e = error_of(apply, srv, 26, pack, proxy=p)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details().startswith(f"{field}: "), e.details()


def test_rc_12_special_circumstances_allow_up_to_30_working_days(srv):
    """Art. 12: within 15 working days from acceptance; "If the Residence Card cannot be made
    on schedule due to the special circumstances, the time limit ... shall not exceed 30
    working days." Accepted Monday 21 September 2026: 15 working days end at 24:00 on 19
    October, 30 at 24:00 on 9 November."""
    usual, special = apply(srv, 30, pb.PACK_RC).card_number, apply(srv, 31, pb.PACK_RC).card_number
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=usual, approved=True)
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=special, approved=True,
         special_circumstances="the applicant's household registration is being checked in "
                               "Hubei")
    steps = {i[0]: i[1:4] for i in due(srv, 60)}
    assert steps[usual] == ("issue", "RC-12", "2026-10-20T00:00:00+08:00")
    assert steps[special] == ("issue", "RC-12", "2026-11-10T00:00:00+08:00")
    sh = apply(srv, 32).card_number
    e = refused(srv, sh, special_circumstances="busy")
    assert e.details().startswith("special_circumstances: is RC-12's")
    late = apply(srv, 33, pb.PACK_RC).card_number
    set_clock(srv, "2026-10-20T00:00:00+08:00")  # the 15 working days are over
    e = error_of(call, srv, "Verify", "PUBLIC_SECURITY", card_number=late, approved=True,
                 special_circumstances="stated after the fact")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ended at 24:00 of 2026-10-19" in e.details()


def refused(srv, card, **fields):
    return error_of(call, srv, "Verify", "CARD_AGENCY", card_number=card, approved=True,
                    **fields)


# ---------------------------------------------------------------- SH-31, GZ-35

def ecard(srv, card, role="ONLINE_PLATFORM"):
    return srv.lifecycle.IssueElectronic(pb.IssueElectronicRequest(
        request_id=rid(), card_number=card), metadata=srv.md(role))


@pytest.mark.parametrize("pack", [pb.PACK_SH, pb.PACK_GZ])
def test_sh_31_gz_35_the_electronic_card_has_the_physical_cards_effect_and_state(srv, pack):
    """GZ-35: "Electronic social security cards have the same effect as physical social
    security cards"; bound to the holder's current card, a decision on its number is that
    card's: lost, it declines; replaced, it follows the new card."""
    card = active(srv, 40, pack)
    e = ecard(srv, card)
    assert len(e.number) == 18 and e.number[:2] == card[:2] and e.card_number == card
    assert ecard(srv, card).number == e.number  # one per holder and pack
    assert reason(srv, e.number) == "UNSPECIFIED"
    status = srv.status.GetStatus(pb.GetStatusRequest(card_number=e.number),
                                  metadata=srv.md("BANK_SWITCH"))
    assert (status.card_number, status.found, status.state) == (e.number, True,
                                                                pb.CARD_STATE_ACTIVE)
    call(srv, "ReportLoss", "ONLINE_PLATFORM", card_number=card)
    assert reason(srv, e.number) == "CARD_LOST"
    new = call(srv, "Replace", "ONLINE_PLATFORM", card_number=card,
               reason=pb.REPLACE_REASON_LOST).card_number
    assert reason(srv, e.number) == "CARD_LOST"  # until the new card is issued (SH-23c)
    call(srv, "Issue", "CARD_AGENCY", card_number=new)
    call(srv, "Activate", OUTLET[pack], card_number=new)
    assert reason(srv, card) == "CARD_SUPERSEDED"
    assert reason(srv, e.number) == "UNSPECIFIED"
    assert ecard(srv, new).number == e.number
    call(srv, "Cancel", "CARD_AGENCY", card_number=new, reason="died",
         ground=pb.CANCEL_GROUND_DEATH)
    assert reason(srv, e.number) == "CARD_CANCELLED"


def test_sh_31_an_electronic_card_needs_an_issued_current_social_security_card(srv):
    rc = active(srv, 41, pb.PACK_RC)
    assert "no electronic social security card" in error_of(ecard, srv, rc).details()
    applied = apply(srv, 42).card_number
    assert error_of(ecard, srv, applied).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_of(ecard, srv, active(srv, 43), "TRANSIT_GATE").code() == \
        grpc.StatusCode.PERMISSION_DENIED
    unknown = "31" + "9" + "0" * 14 + "7"
    assert reason(srv, unknown) == "CARD_NOT_FOUND"


# ---------------------------------------------------------------- SH-22b, SH-4, GZ-17, BJ-4

def test_sh_22b_a_childs_card_without_a_photo_is_flagged_on_the_7th_birthday(srv):
    """SH-22: "年满七周岁的儿童应当换领印有相片的社会保障卡" (a child of 7 full years shall
    exchange for a card printed with a photo). A card made without one for a child born on
    1 March 2020 is due for exchange from 24:00 on 1 March 2027; made again with the photo,
    the item closes."""
    child = holder(50, pb.PACK_SH, birth_date="2020-03-01", photo_sha256="")
    card = apply(srv, 50, holder=child).card_number
    call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True)
    made = call(srv, "Issue", "CARD_AGENCY", card_number=card)
    assert not made.photo
    step = (card, "photo card", "SH-22b", "2027-03-02T00:00:00+08:00")
    assert step + (False,) in due(srv, 365)
    set_clock(srv, "2027-03-01T23:59:59+08:00")
    assert step + (False,) in due(srv, 1)
    set_clock(srv, "2027-03-02T00:00:00+08:00")
    assert step + (True,) in due(srv, 0)
    with_photo = apply(srv, 51, holder=holder(51, pb.PACK_SH, birth_date="2020-03-01",
                                              photo_sha256="ab" * 32)).card_number
    call(srv, "Verify", "CARD_AGENCY", card_number=with_photo, approved=True)
    assert call(srv, "Issue", "CARD_AGENCY", card_number=with_photo).photo
    rpc.HoldersStub(srv.channel).CorrectHolder(pb.CorrectHolderRequest(
        request_id=rid(), holder=pb.Holder(ssn=child.ssn, photo_sha256="cd" * 32),
        reason="photo taken at the outlet"), metadata=srv.md("COMMUNITY_OUTLET"))
    call(srv, "Activate", "COMMUNITY_OUTLET", card_number=card)
    new = call(srv, "Replace", "COMMUNITY_OUTLET", card_number=card,
               reason=pb.REPLACE_REASON_INFO_CHANGED).card_number  # SH-22(3): a new photo
    call(srv, "Verify", "CARD_AGENCY", card_number=new, approved=True)
    assert call(srv, "Issue", "CARD_AGENCY", card_number=new).photo
    assert [i for i in due(srv, 3660) if i[2] == "SH-22b"] == []  # superseded: closed


def test_sh_10_sh_22b_the_photo_is_checked_at_application_from_7_full_years(srv):
    """SH-10 (art. 10): the outlet checks the applicant's name, nationality, ethnicity,
    gender and photo (现场核对…相片); SH-22b: from 7 full years a Shanghai card bears a
    photo. At 15:00 on 21 September 2026 a child born on 21 September 2019 is not yet 7 (that
    is 24:00 tonight): applied without a photo, the card is flagged from then; one born a
    day earlier is 7, and an application without a photo names what is missing."""
    six = apply(srv, 70, holder=holder(70, pb.PACK_SH, birth_date="2019-09-21",
                                       photo_sha256=""))
    call(srv, "Verify", "CARD_AGENCY", card_number=six.card_number, approved=True)
    assert not call(srv, "Issue", "CARD_AGENCY", card_number=six.card_number).photo
    assert (six.card_number, "photo card", "SH-22b", "2026-09-22T00:00:00+08:00", False) \
        in due(srv, 1)
    with pytest.raises(grpc.RpcError) as refused:
        apply(srv, 71, holder=holder(71, pb.PACK_SH, birth_date="2019-09-20",
                                     photo_sha256=""))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("holder.photo_sha256: is required")
    seven = apply(srv, 72, holder=holder(72, pb.PACK_SH, birth_date="2019-09-20"))
    call(srv, "Verify", "CARD_AGENCY", card_number=seven.card_number, approved=True)
    assert call(srv, "Issue", "CARD_AGENCY", card_number=seven.card_number).photo


@pytest.mark.parametrize("pack", [pb.PACK_SH, pb.PACK_GZ, pb.PACK_BJ])
def test_sh_4_gz_17_bj_4_the_card_records_the_holders_information(srv, pack):
    """SH-4: "the cardholder's name, photo, social security number, card number and other
    card face information, as well as other basic information"; GZ-17: "card number,
    cardholder's name, social security number and personal photo"; BJ-4: "name, photo,
    social security number and other basic information". What the application gave is kept,
    read back whole by a role that may read it, and the card says it bears the photo."""
    given = holder(60, pack, photo_sha256="ef" * 32, ethnicity="汉", postcode="200001",
                   nationality="CHN", address="上海市黄浦区人民大道200号", gender="F")
    card = apply(srv, 60, pack, holder=given).card_number
    call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True)
    assert call(srv, "Issue", "CARD_AGENCY", card_number=card).photo
    kept = rpc.HoldersStub(srv.channel).GetHolder(pb.GetHolderRequest(
        card_number=card, purpose="SH-4 check"), metadata=srv.md("CARD_AGENCY")).holder
    for field in ("ssn", "name", "gender", "birth_date", "nationality", "phone", "address",
                  "ethnicity", "postcode", "occupation", "photo_sha256"):
        assert getattr(kept, field) == getattr(given, field), field
    assert REGION[pack] == kept.ssn[:6]

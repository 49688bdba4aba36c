"""The law read a second time: who, where and which rule. Each answer the law does not allow,
put right and tested through the gRPC method its caller uses (STYLE.md section 9), with the
articles' own words quoted: every refusal cites the card's own pack's rule; the banks Beijing
checks; a loss reported at a Guangzhou or Beijing bank; who verifies a Shanghai application;
a bank's hotline; a Residence Card's residence address; a mailed card's free year."""
import subprocess
import sys

import grpc
import test_law
from test_calls import error_info
from test_law import (
    active,
    apply,
    call,
    holder,
    refused,
)
from test_money_e2e import error_of
from test_second_reading_roles import FULL, refused_apply

from yikatong.server.harness import ROOT, running
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc

FP, PD, IA = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.INVALID_ARGUMENT)

srv = test_law.srv  # the server on the manual clock at START, with its ResidenceCard stub


def rule_of(e: grpc.RpcError) -> str:
    return error_info(e).reason


# ---------------------------------------------------------------- item 9: each pack's own rule

def test_sh_9_a_shanghai_applicant_whose_information_differs_is_told_shanghais_rule(srv):
    """SH-9: "应当交验本人有效身份证件，现场核对本人姓名、国籍、民族、性别、相片等信息……确认后
    由社区受理网点工作人员将申领信息上传": a Shanghai applicant whose information differs from
    what is held is refused on Shanghai's article, not Guangzhou's GZ-20; a Beijing one on
    BJ-7 ("information change" is its cooperative bank's service), a Guangzhou one on GZ-20."""
    active(srv, 201, pb.PACK_GZ)  # the holder's information is held from a Guangzhou card
    gz_ssn = holder(201, pb.PACK_GZ).ssn
    e = refused_apply(srv, 201, pb.PACK_SH, holder(201, pb.PACK_SH, **{
        **FULL, "name": "李娜娜", "ssn": gz_ssn}))
    assert (e.code(), rule_of(e)) == (FP, "SH-9"), e.details()
    assert "GZ-" not in e.details()
    e = refused_apply(srv, 201, pb.PACK_BJ, holder(201, pb.PACK_BJ, **{
        **FULL, "name": "李娜娜", "ssn": gz_ssn}))
    assert (e.code(), rule_of(e)) == (FP, "BJ-7"), e.details()
    active(srv, 202, pb.PACK_SH)
    e = refused_apply(srv, 202, pb.PACK_GZ, holder(202, pb.PACK_GZ, **{
        **FULL, "name": "王五", "ssn": holder(202, pb.PACK_SH).ssn}))
    assert (e.code(), rule_of(e)) == (FP, "GZ-20"), e.details()


def test_gz_6_bj_7_activation_and_the_financial_account_cite_their_own_city(srv):
    """GZ-6: "issuing banks shall provide such services as application, activation, ...";
    BJ-7: "The Social Security Card Cooperative Bank is responsible for the application,
    activation, ..."; GZ-13: "The settlement accounts of social security cards include ...
    financial accounts"; BJ-2: the card "has the functions of ... financial services". A
    Guangzhou or Beijing card refused activation or its financial function is not told
    Shanghai's SH-12 or SH-14; a Shanghai card still is."""
    for n, pack, activation, financial in ((203, pb.PACK_SH, "SH-12", "SH-14"),
                                           (204, pb.PACK_GZ, "GZ-6", "GZ-13"),
                                           (205, pb.PACK_BJ, "BJ-7", "BJ-2")):
        card = active(srv, n, pack)
        e = refused(srv, "Activate", test_law.OUTLET[pack], card_number=card)
        assert (e.code(), rule_of(e)) == (FP, activation), (pack, e.details())
        call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
        e = refused(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
        assert (e.code(), rule_of(e)) == (FP, financial), (pack, e.details())
        assert "SH-" not in e.details() or pack == pb.PACK_SH, e.details()


def test_sh_7_a_shanghai_card_is_refused_an_application_lock_on_shanghais_rule(srv):
    """SH-7: "社区受理网点和银行受理网点具体承担社会保障卡的申领受理、发放、功能开通、挂失等工作":
    a Shanghai bank outlet's work has no application locking (GZ-6 and BJ-7 give it to
    Guangzhou's and Beijing's banks): refused citing SH-7, not GZ-6."""
    card = active(srv, 206)
    e = refused(srv, "LockApplication", "BANK_OUTLET", card_number=card,
                channel=pb.CHANNEL_MEDICAL)
    assert (e.code(), rule_of(e)) == (FP, "SH-7"), e.details()


def test_sh_8_a_shanghai_card_is_cancelled_on_shanghais_grounds(srv):
    """SH-8: "本市户籍人员以及依法参加本市社会保险的境内来沪人员，可以申领社会保障卡": a
    Shanghai card cancelled on a ground it does not admit is told Shanghai's article, not
    Guangzhou's GZ-26; a Beijing card is told it follows Guangzhou's procedure."""
    for n, pack, rule in ((207, pb.PACK_SH, "(SH-8)"), (208, pb.PACK_BJ, "(BJ via GZ-26)")):
        card = active(srv, n, pack)
        e = refused(srv, "Cancel", "CARD_AGENCY", card_number=card, reason="落户外省",
                    ground=pb.CANCEL_GROUND_PERMANENT_RESIDENCY)
        assert e.code() == IA and rule in e.details(), e.details()


def test_bj_via_gz_7_a_beijing_channel_refusal_says_beijing_follows_guangzhou(srv):
    """BJ-17 leaves application and loss procedure to implementation rules: Beijing follows
    Guangzhou's GZ-7 and GZ-21 (SPEC.md), and a refusal says so ("BJ via GZ-7"), never
    citing Guangzhou's article as the Beijing card's own."""
    e = error_of_apply(srv, 209, pb.PACK_BJ, "COMMUNITY_OUTLET")
    assert (e.code(), rule_of(e)) == (PD, "BJ via GZ-7"), e.details()
    card = active(srv, 210, pb.PACK_BJ)
    e = refused(srv, "ReportLoss", "COMMUNITY_OUTLET", card_number=card)
    assert (e.code(), rule_of(e)) == (PD, "BJ via GZ-21"), e.details()


def test_rc_6_a_residence_card_has_no_electronic_card_on_its_own_rule(srv):
    """RC-6 names the Residence Card's functions, and an electronic social security card is
    not among them: refused citing the Residence Card's Procedures, not Shanghai's SH-31."""
    card = active(srv, 211, pb.PACK_RC)
    e = refused(srv, "IssueElectronic", "COMMUNITY_OUTLET", card_number=card)
    assert (e.code(), rule_of(e)) == (FP, "RC-6"), e.details()


def error_of_apply(srv, n, pack, role) -> grpc.RpcError:
    try:
        apply(srv, n, pack, role, holder=holder(n, pack, **FULL))
    except grpc.RpcError as e:
        return e
    raise AssertionError("applied")


# ---------------------------------------------------------------- item 6: Beijing's own banks

def test_bj_7_a_beijing_card_is_checked_against_beijings_catalogue_not_guangzhous(tmp_path):
    """BJ-7: "The catalogue of social security card cooperative banks is announced to the
    public by the municipal human resources and social security department" (Beijing's); GZ-9:
    "from the list of social security card issuing banks published by Guangzhou Municipal
    Human Resources and Social Security Bureau". A Beijing application naming a Beijing
    cooperative bank that is not on Guangzhou's list was refused GZ-9c; with no Beijing
    catalogue configured Beijing's check is off (and start-up says so); with one, a bank off
    it is refused BJ-7, and a Guangzhou card is still held to Guangzhou's list alone."""
    banks = tmp_path / "banks.toml"
    banks.write_text('version = "2026-01"\nbanks = ["ICBC", "GZRCB"]\n')
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with running(tmp_path / "a", "--issuing-banks", str(banks)) as s:
        assert "Beijing's cooperative-bank check (BJ-7) off: no [beijing] list" in s.output()
        assert apply(s, 221, pb.PACK_BJ, service_bank="BJRCB").service_bank == "BJRCB"
        e = error_of(apply, s, 222, pb.PACK_GZ, service_bank="BJRCB")
        assert (e.code(), rule_of(e)) == (FP, "GZ-9c"), e.details()
    banks.write_text('version = "2026-01"\nbanks = ["ICBC", "GZRCB"]\n\n'
                     '[beijing]\nversion = "2026-03"\nbanks = ["ICBC", "BJRCB"]\n')
    with running(tmp_path / "b", "--issuing-banks", str(banks)) as s:
        assert ("Beijing's cooperative-bank check (BJ-7) on: list version 2026-03, 2 banks"
                in s.output())
        assert apply(s, 223, pb.PACK_BJ, service_bank="BJRCB").service_bank == "BJRCB"
        e = error_of(apply, s, 224, pb.PACK_BJ, service_bank="GZRCB")
        assert (e.code(), rule_of(e)) == (FP, "BJ-7"), e.details()
        assert "Beijing's catalogue" in e.details() and "GZ-" not in e.details()
        e = error_of(apply, s, 225, pb.PACK_GZ, service_bank="BJRCB")
        assert (e.code(), rule_of(e)) == (FP, "GZ-9c"), e.details()
        # a re-application to another bank (GZ-24(3)) is held to Beijing's catalogue too
        card = active(s, 226, pb.PACK_BJ)
        e = refused(s, "Replace", "BANK_OUTLET", card_number=card,
                    reason=pb.REPLACE_REASON_INFO_CHANGED, service_bank="GZRCB")
        assert (e.code(), rule_of(e)) == (FP, "BJ-7"), e.details()


def test_bj_7_a_malformed_beijing_catalogue_stops_the_start(tmp_path):
    """The catalogue is configuration an operator writes: a [beijing] table without its
    version or banks is refused at start in one line, not read as "no check"."""
    banks = tmp_path / "banks.toml"
    banks.write_text('version = "1"\nbanks = ["ICBC"]\n\n[beijing]\nbanks = []\n')
    proc = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                           str(tmp_path / "d"), "--issuing-banks", str(banks), "--listen",
                           "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"yikatong: issuing-banks file {banks}: [beijing] needs "
                                  "version"), proc.stderr


# ---------------------------------------------------------------- items 7, 10: GZ-21 at the bank

def bank_loss_answers(srv, card) -> tuple[str, str]:
    return test_law.reason(srv, card), test_law.reason(srv, card, pb.CHANNEL_FINANCIAL)


def test_gz_21_a_loss_reported_at_the_bank_suspends_the_settlement_accounts(srv):
    """GZ-21: "he/she may go through the loss registration formalities through ... the bank's
    customer service hotline or an outlet of the social security card issuing bank ... After
    loss registration, the settlement account of the social security card will be suspended"
    (GZ-13: "The settlement accounts ... include personal accounts of medical insurance and
    financial accounts"). ReportBankLoss on a Guangzhou or Beijing card froze only FINANCIAL,
    as Shanghai's SH-20 does; it is the card's loss registration: LOST, medical and financial
    alike, with or without the financial function opened. GZ-22: "at an outlet of the social
    security card issuing bank with his/her valid identity document. After loss
    deregistration, the social security card will resume normal use"."""
    for n, pack, cite in ((231, pb.PACK_GZ, "GZ-22"), (232, pb.PACK_BJ, "BJ via GZ-22")):
        card = active(srv, n, pack)
        call(srv, "OpenFinancial", "BANK_OUTLET", card_number=card, bank="ICBC")
        lost = call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=card)
        assert lost.state == pb.CARD_STATE_LOST and lost.loss_reported_at
        assert bank_loss_answers(srv, card) == ("CARD_LOST", "CARD_LOST")
        e = refused(srv, "CancelBankLoss", "BANK_SWITCH", card_number=card)
        assert (e.code(), rule_of(e)) == (PD, cite), e.details()
        assert call(srv, "CancelBankLoss", "BANK_OUTLET", card_number=card).state == \
            pb.CARD_STATE_ACTIVE
        assert bank_loss_answers(srv, card) == ("UNSPECIFIED", "UNSPECIFIED")
    # without the financial function: still the card's loss
    card = active(srv, 233, pb.PACK_GZ)
    assert call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=card).state == \
        pb.CARD_STATE_LOST
    assert test_law.reason(srv, card) == "CARD_LOST"
    # Shanghai's bank loss is the financial function's alone (SH-20)
    sh = active(srv, 234)
    call(srv, "OpenFinancial", "BANK_OUTLET", card_number=sh, bank="ICBC")
    frozen = call(srv, "ReportBankLoss", "BANK_OUTLET", card_number=sh)
    assert frozen.state == pb.CARD_STATE_ACTIVE and frozen.financial_frozen
    assert bank_loss_answers(srv, sh) == ("UNSPECIFIED", "FINANCIAL_FROZEN")
    # the Residence Card has no financial function, nor a bank loss (RC-17)
    e = refused(srv, "ReportBankLoss", "BANK_OUTLET", card_number=active(srv, 235, pb.PACK_RC))
    assert (e.code(), rule_of(e)) == (FP, "RC-17"), e.details()


def test_gz_21_the_banks_customer_service_hotline_registers_a_loss_through_its_switch(srv):
    """GZ-21 names "the bank's customer service hotline" among the channels of loss
    registration; API.md has no role for it, and the bank's hotline reaches us through the
    bank's own system, its switch (BANK_SWITCH), by ReportBankLoss: the card is LOST, and is
    replaced (GZ-23) or deregistered at the bank's outlet (GZ-22) as any lost card. The
    bank's switch takes no Guangzhou loss by ReportLoss (not among API.md's roles for it)."""
    card = active(srv, 236, pb.PACK_GZ)
    e = refused(srv, "ReportLoss", "BANK_SWITCH", card_number=card)
    assert e.code() == PD, e.details()
    lost = call(srv, "ReportBankLoss", "BANK_SWITCH", card_number=card)
    assert lost.state == pb.CARD_STATE_LOST
    assert bank_loss_answers(srv, card) == ("CARD_LOST", "CARD_LOST")
    new = call(srv, "Replace", "BANK_OUTLET", card_number=card, reason=pb.REPLACE_REASON_LOST)
    assert new.state == pb.CARD_STATE_VERIFIED
    # a Beijing card alike; and a card already lost is not registered lost again
    bj = active(srv, 237, pb.PACK_BJ)
    assert call(srv, "ReportBankLoss", "BANK_SWITCH", card_number=bj).state == pb.CARD_STATE_LOST
    e = refused(srv, "ReportBankLoss", "BANK_SWITCH", card_number=bj)
    assert (e.code(), rule_of(e)) == (FP, "BJ via GZ-21"), e.details()


# ---------------------------------------------------------------- item 5: SH-10's verifiers

def owed(srv, card) -> list[tuple[str, str]]:
    answer = rpc.DeadlinesStub(srv.channel).ListDue(pb.ListDueRequest(within_days=400),
                                                   metadata=srv.md("CARD_AGENCY"))
    return [(i.step, i.rule) for i in answer.items if i.card_number == card]


def test_sh_10_public_security_verifies_identity_and_hrss_insurance(srv):
    """SH-6: "市公安部门……核验社会保障卡申请人的身份信息"; "市人力资源社会保障、医疗保障部门负责
    核验社会保障卡申请人参加本市社会保险的情况". SH-10: "公安、人力资源社会保障、医疗保障部门在收到
    申领信息后3个工作日内，分别对申请人的基本信息、参加本市社会保险的情况进行核验。核验通过的，由市
    社会保障卡服务机构制卡". Public security and HRSS were refused; each now verifies its own
    part, and the card is verified (and its SH-11 making owed) once both have; either one's
    failure rejects it. HRSS carries medical security's part (API.md has no role for it)."""
    card = test_law.apply(srv, 241, holder=holder(241, pb.PACK_SH, **FULL)).card_number
    first = call(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    assert first.state == pb.CARD_STATE_APPLIED  # the insurance is still to be verified
    assert owed(srv, card) == [("verify insurance", "SH-10")]
    e = refused(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    assert (e.code(), rule_of(e)) == (FP, "SH-10") and "HRSS is awaited" in e.details()
    e = refused(srv, "Issue", "CARD_AGENCY", card_number=card)
    assert e.code() == FP, e.details()  # not made before both parts pass
    both = call(srv, "Verify", "HRSS", card_number=card, approved=True)
    assert both.state == pb.CARD_STATE_VERIFIED
    assert owed(srv, card) == [("issue", "SH-11")]
    # the other order; and a failure of either part rejects, with the reason told
    card = test_law.apply(srv, 242, holder=holder(242, pb.PACK_SH, **FULL)).card_number
    assert call(srv, "Verify", "HRSS", card_number=card, approved=True).state == \
        pb.CARD_STATE_APPLIED
    assert owed(srv, card) == [("verify identity", "SH-10")]
    assert call(srv, "Verify", "PUBLIC_SECURITY", card_number=card,
                approved=True).state == pb.CARD_STATE_VERIFIED
    card = test_law.apply(srv, 243, holder=holder(243, pb.PACK_SH, **FULL)).card_number
    call(srv, "Verify", "PUBLIC_SECURITY", card_number=card, approved=True)
    no = call(srv, "Verify", "HRSS", card_number=card, approved=False, reason="未参加本市社会保险")
    assert no.state == pb.CARD_STATE_REJECTED and no.reject_reason == "未参加本市社会保险"
    assert owed(srv, card) == []
    # API.md's card agency still records both departments' results at once
    card = test_law.apply(srv, 244, holder=holder(244, pb.PACK_SH, **FULL)).card_number
    assert call(srv, "Verify", "CARD_AGENCY", card_number=card, approved=True).state == \
        pb.CARD_STATE_VERIFIED


def test_sh_10_hrss_and_public_security_verify_no_other_packs_application(srv):
    """SH-10 is Shanghai's: a Guangzhou or Beijing application is verified by the card
    agency (GZ-10, API.md), a Residence Card's by public security alone (RC-11)."""
    for n, pack in ((245, pb.PACK_GZ), (246, pb.PACK_BJ)):
        card = test_law.apply(srv, n, pack, holder=holder(n, pack, **FULL)).card_number
        for role in ("HRSS", "PUBLIC_SECURITY"):
            e = refused(srv, "Verify", role, card_number=card, approved=True)
            assert e.code() == PD, (pack, role, e.details())
    rc = test_law.apply(srv, 247, pb.PACK_RC, holder=holder(247, pb.PACK_RC, **FULL)).card_number
    e = refused(srv, "Verify", "HRSS", card_number=rc, approved=True)
    assert (e.code(), rule_of(e)) == (PD, "RC-11"), e.details()


# ---------------------------------------------------------------- item 8: RC-13's registration

def test_rc_13_correct_holder_does_not_register_a_residence_change(srv):
    """RC-13: "In the event that the residence address and other registered information have
    changed, the Card holder shall go through the formalities of information changes at the
    community service center within 30 days". CorrectHolder let the card agency and the
    online platform change a Residence Card holder's registered residence address, with no
    record of whether it was registered in time. It is refused (by those roles, as a role
    that may not register it; at the community centre, pointing to the registration, which
    records the day of the change and whether it was filed in time)."""
    card = active(srv, 251, pb.PACK_RC)
    ssn = holder(251, pb.PACK_RC).ssn
    holders = rpc.HoldersStub(srv.channel)
    for role, code in (("CARD_AGENCY", PD), ("ONLINE_PLATFORM", PD), ("COMMUNITY_OUTLET", FP)):
        try:
            holders.CorrectHolder(pb.CorrectHolderRequest(
                request_id=test_law.rid(), card_number=card, reason="搬家",
                holder=pb.Holder(ssn=ssn, residence_address="上海市徐汇区")),
                metadata=srv.md(role))
            raise AssertionError(f"{role} corrected the residence address")
        except grpc.RpcError as e:
            assert (e.code(), rule_of(e)) == (code, "RC-13"), (role, e.details())
            assert "ChangeInformation" in e.details()
    # the registration at the centre records whether it was in time
    filed = srv.residence.ChangeInformation(pb.ChangeInformationRequest(
        request_id=test_law.rid(), card_number=card, changed_on="2026-08-01",
        holder=pb.Holder(residence_address="上海市徐汇区")), metadata=srv.md("COMMUNITY_OUTLET"))
    assert filed.late  # changed on 1 August, filed on 21 September: past the 30 days
    record = holders.GetHolder(pb.GetHolderRequest(card_number=card, purpose="RC-13 check",
                                                   with_history=True),
                               metadata=srv.md("COMMUNITY_OUTLET"))
    assert record.holder.residence_address == "上海市徐汇区"
    (change,) = [c for c in record.history if c.field == "residence_address"]
    assert change.method == "ResidenceCard.ChangeInformation" and "filed late" in change.reason
    # other corrections go on as before
    holders.CorrectHolder(pb.CorrectHolderRequest(
        request_id=test_law.rid(), card_number=card, reason="号码变更",
        holder=pb.Holder(ssn=ssn, phone="13911111111")), metadata=srv.md("CARD_AGENCY"))

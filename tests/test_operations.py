"""What ships for operators (issue 23, item 5): the Prometheus alert rules pass promtool's
checks and unit tests, a real Prometheus scrapes a running server and evaluates the rules on
it, and the systemd unit says what docs/OPERATIONS.md says it does.

promtool and Prometheus come from Debian's `prometheus` package (`make test` installs it):
missing, these tests fail; they are never skipped."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from yikatong.server.harness import ROOT, ServerProcess, free_address

RULES = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
RULE_TESTS = os.path.join(ROOT, "deploy", "prometheus", "alerts_test.yml")
UNIT = os.path.join(ROOT, "deploy", "systemd", "yikatong.service")
INSTALL = "install Debian's prometheus package (make test does: make test-tools)"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} not found: {INSTALL}"
    return path


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    promtool = tool("promtool")
    for args in (["check", "rules", RULES], ["test", "rules", RULE_TESTS]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout, done.stdout + done.stderr


def api(address: str, path: str):
    with urllib.request.urlopen(f"http://{address}/api/v1/{path}", timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def query(address: str, promql: str) -> list:
    return api(address, "query?" + urllib.parse.urlencode({"query": promql}))["result"]


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on a loopback port scraping a demo server every second, with the
    shipped rules evaluated every second."""
    binary = tool("prometheus")
    metrics = free_address()
    server = ServerProcess(tmp_path, "--demo", "--metrics-listen", metrics, clients=False)
    address = free_address()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES],
        "scrape_configs": [{"job_name": "yikatong",
                            "static_configs": [{"targets": [metrics]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={address}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        assert server.stop() == 0


def test_a_real_prometheus_scrapes_the_server_and_evaluates_every_rule(prometheus, tmp_path):
    shipped = set(re.findall(r"^\s*- alert: (\w+)$", read(RULES), re.M))
    seen: dict = {}

    def rules() -> dict:
        return {r["name"]: r for g in api(prometheus, "rules")["groups"] for r in g["rules"]}

    def scraped() -> bool:
        try:
            seen.update(up=query(prometheus, 'up{job="yikatong"}'),
                        used=query(prometheus, "yikatong_lmdb_map_used_bytes"), rules=rules())
        except OSError:  # not listening yet
            return False
        return ([s["value"][1] for s in seen["up"]] == ["1"] and len(seen["used"]) == 1
                and set(seen["rules"]) == shipped)

    def wait(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, (
                f"{what} not in 30 s: {seen}\n" + (tmp_path / "prometheus.log").read_text())
            time.sleep(0.25)

    wait(scraped, "the target up, its store gauge and every shipped rule")
    assert float(seen["used"][0]["value"][1]) > 0
    # then every rule evaluated again, on the scraped series
    before = {name: rule["lastEvaluation"] for name, rule in seen["rules"].items()}

    def evaluated_again() -> bool:
        seen["after"] = rules()
        return all(rule["lastEvaluation"] != before[name] for name, rule in seen["after"].items())

    wait(evaluated_again, "a second evaluation of every rule")
    for rule in seen["after"].values():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    # the store's two gauges meet in the ratio the store alerts use: labels match, 0 < x < 1
    ratio = query(prometheus, "yikatong_lmdb_map_used_bytes / yikatong_lmdb_map_size_max_bytes")
    assert len(ratio) == 1 and 0 < float(ratio[0]["value"][1]) < 1, ratio
    # and the disk's two, in YikatongDiskNearlyFull's: this machine's own share free
    fs = os.statvfs(str(tmp_path))
    wait(lambda: len(query(prometheus, "yikatong_data_dir_free_bytes "
                                       "/ yikatong_data_dir_size_bytes")) == 1, "the disk's gauges")
    free = float(query(prometheus, "yikatong_data_dir_free_bytes / yikatong_data_dir_size_bytes")
                 [0]["value"][1])
    assert abs(free - fs.f_bavail / fs.f_blocks) < 0.05, free
    assert query(prometheus, 'ALERTS{alertstate="firing"}') == []  # a fresh server: none


def test_the_systemd_unit_reloads_with_sighup_and_keeps_files_owner_only(tmp_path):
    unit = read(UNIT)
    service = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["UMask"] == "0077" and service["StateDirectoryMode"] == "0700"
    assert "--metrics-listen 127.0.0.1:9464" in unit
    # the PII keys the unit names are the file OPERATIONS' Install makes (without it every
    # PII call, Apply among them, is FAILED_PRECONDITION PII_KEY_MISSING)
    assert "--pii-key-file /etc/yikatong/pii-keys.toml" in unit
    install = read(os.path.join(ROOT, "docs", "OPERATIONS.md")).split("## Install", 1)[1]
    assert "sudo install -m 0600 -o yikatong -g yikatong /dev/null /etc/yikatong/pii-keys.toml" \
        in install.split("```", 2)[1]
    verify = shutil.which("systemd-analyze")
    if verify is not None:  # offline: needs no running systemd; the binary's path made real
        copy = tmp_path / "yikatong.service"
        copy.write_text(unit.replace("/opt/yikatong/.venv/bin/yikatong",
                                     os.path.join(ROOT, ".venv", "bin", "yikatong")))
        done = subprocess.run([verify, "verify", str(copy)], capture_output=True, text=True,
                              timeout=60)
        said = [line for line in (done.stdout + done.stderr).splitlines()
                if "yikatong.service" in line]
        assert done.returncode == 0 and not said, done.stdout + done.stderr


def test_the_sizing_script_measures_a_debit_near_what_docs_operations_says():
    """docs/OPERATIONS.md's figures come from bench/sizing.py: a small run must land within
    a quarter of them (a small run's pages are less full), or the document needs the new
    figures."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sizing.py"),
                           "--unary", "300", "--streamed", "1000", "--cards", "200"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    each = [int(row.split("|")[4].replace(",", "")) for row in done.stdout.splitlines()
            if row.startswith("| debit")]
    with open(os.path.join(ROOT, "docs", "OPERATIONS.md")) as f:
        said = [int(line.rsplit("|", 2)[1].replace(",", "")) for line in f
                if line.startswith("| a debit")]
    assert len(said) == 2 and len(each) == 2, (said, done.stdout)
    assert all(0.75 * s <= n <= 1.25 * s for n, s in zip(each, said, strict=True)), \
        (said, done.stdout)

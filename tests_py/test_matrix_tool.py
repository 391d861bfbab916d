"""The matrix as a tool: it catches broken servers, runs against external ones, compares with a
baseline, and writes JSON and JUnit."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from connlab.matrix import report
from connlab.matrix.core import Options, Result, Target, command_handle, repeated
from run_cli import CONNLAB

BROKEN = Path(__file__).with_name("broken_servers.py")


def matrix(*args: str, timeout: float = 240) -> tuple[int, str]:
    run = subprocess.run(
        [*CONNLAB, "matrix", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return run.returncode, run.stdout + run.stderr


def statuses(path: Path) -> dict[str, str]:
    return {r["scenario"]: r["status"] for r in json.loads(path.read_text())["results"]}


#: What broken_servers.py implements: a 0.5 s idle and read timeout, no write timeout.
CLAIMS = ("--idle-timeout", "0.5", "--read-timeout", "0.5", "--write-timeout", "none")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("echo", {"H1": "pass", "C1": "pass", "T1": "pass"}),
        ("leak-fd", {"H1": "fail", "H3": "fail"}),
        ("no-half-close", {"C1": "fail", "H1": "pass"}),
        # A claimed timeout that never fires is a SHOULD missed, not a broken MUST.
        ("no-idle-timeout", {"T1": "warn", "H1": "pass", "C1": "pass"}),
    ],
)
def test_broken_servers_fail_the_matching_scenarios(tmp_path: Path, mode: str, expected: dict) -> None:
    out = tmp_path / "m.json"
    cmd = shlex.join([sys.executable, str(BROKEN), mode])
    code, text = matrix(
        "--serve-cmd", cmd, "--name", mode, "--only", ",".join(expected), "--json", str(out), *CLAIMS
    )
    assert statuses(out) == expected, text
    assert code == (1 if "fail" in expected.values() else 0), text


def test_leak_is_named_in_the_detail(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    matrix(
        "--serve-cmd",
        shlex.join([sys.executable, str(BROKEN), "leak-fd"]),
        "--only",
        "H1",
        "--json",
        str(out),
    )
    (result,) = json.loads(out.read_text())["results"]
    assert "leak" in result["detail"] and "fds" in result["detail"], result


def test_baseline_reports_unexpected_failures_and_passes(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    rows = [
        {"scenario": "H1", "target": "command", "status": "fail", "seconds": 0, "detail": ""},
        {"scenario": "C1", "target": "command", "status": "pass", "seconds": 0, "detail": ""},
    ]
    baseline.write_text(json.dumps({"results": rows}))
    cmd = shlex.join([sys.executable, str(BROKEN), "no-half-close"])
    code, text = matrix("--serve-cmd", cmd, "--only", "H1,C1", "--baseline", str(baseline))
    assert "unexpected pass: H1 on command: FAIL -> pass" in text, text
    assert "unexpected failure: C1 on command: pass -> FAIL" in text, text
    assert code == 1
    rows[1]["status"] = "fail"
    baseline.write_text(json.dumps({"results": rows}))
    code, text = matrix("--serve-cmd", cmd, "--only", "C1", "--baseline", str(baseline))
    assert code == 0 and "matches the baseline" in text, text


def test_junit_and_bad_usage(tmp_path: Path) -> None:
    junit = tmp_path / "m.xml"
    code, text = matrix("--backends", "epoll", "--only", "H1,H3", "--junit", str(junit))
    assert code == 0, text
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("name") == "epoll" and suite.get("tests") == "2"
    for args, message in [
        (["--backends", "nosuch"], "--backends: unknown"),
        (["--only", "Z9"], "unknown scenario ids"),
        (["--pid", "1"], "--pid: only with --target"),
        (["--target", "nohost"], "expected HOST:PORT"),
        (["--baseline", str(junit)], "not a matrix JSON file"),
    ]:
        code, text = matrix(*args)
        assert code == 2 and message in text, (args, text)


def test_help_explains_every_option() -> None:
    code, text = matrix("--help")
    assert code == 0
    for option in (
        "--backends",
        "--target",
        "--pid",
        "--serve-cmd",
        "--handoff-cmd",
        "--only",
        "--json",
        "--junit",
        "--baseline",
        "--idle-timeout",
        "--read-timeout",
        "--write-timeout",
        "--max-frame",
        "--byte-echo",
        "--repeat",
        "--strict",
        "--start-timeout",
        "--scenario-timeout",
    ):
        assert option in text


def test_repeat_runs_every_round_and_counts_the_failed_ones(tmp_path: Path) -> None:
    out, junit = tmp_path / "m.json", tmp_path / "m.xml"
    code, text = matrix(
        "--backends", "epoll", "--only", "H1,H3", "--repeat", "2", "--json", str(out), "--junit", str(junit)
    )
    assert code == 0, text
    assert "round 1/2: 2 passed, 0 failed" in text and "round 2/2: 2 passed, 0 failed" in text, text
    assert text.count("pass 0/2 failed") == 2 and "(0 of 4 runs failed)" in text, text
    data = json.loads(out.read_text())
    assert data["repeat"] == 2 and [r["round"] for r in data["rounds"]] == [1, 2], data
    for one in data["rounds"]:
        assert {r["scenario"]: r["status"] for r in one["results"]} == {"H1": "pass", "H3": "pass"}, one
    assert [(r["scenario"], r["status"], r["failed_rounds"]) for r in data["results"]] == [
        ("H1", "pass", 0),
        ("H3", "pass", 0),
    ], data["results"]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "0"
    for case in suite.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["rounds"] == "2" and props["failed_rounds"] == "0", props
    # One round writes the JSON of a plain run: no "rounds", no "failed_rounds".
    code, text = matrix("--backends", "epoll", "--only", "H1", "--repeat", "1", "--json", str(out))
    data = json.loads(out.read_text())
    assert code == 0 and "round 1/1" not in text, text
    assert set(data) == {"results", "summary", "wall_s", "machine", "finished"}, data
    assert "failed_rounds" not in data["results"][0], data


def test_repeat_against_a_broken_server_fails_in_every_round(tmp_path: Path) -> None:
    out, junit = tmp_path / "m.json", tmp_path / "m.xml"
    cmd = shlex.join([sys.executable, str(BROKEN), "no-half-close"])
    code, text = matrix(
        "--serve-cmd", cmd, "--name", "nhc", "--only", "H1,C1", "--repeat", "2", "--json", str(out),
        "--junit", str(junit),
    )  # fmt: skip
    assert code == 1, text
    for k in (1, 2):
        assert f"C1  on nhc round {k}/2  FAIL" in text and "expected the 10 echoes then EOF" in text, text
        assert f"    round {k}: Failed: expected the 10 echoes then EOF" in text, text
    assert "FAIL 2/2 failed" in text and "pass 0/2 failed" in text, text
    assert "FAIL C1 on nhc: failed in 2/2 rounds" in text and "(2 of 4 runs failed)" in text, text
    data = json.loads(out.read_text())
    outcome = {r["scenario"]: (r["status"], r["failed_rounds"]) for r in data["results"]}
    assert outcome == {"H1": ("pass", 0), "C1": ("fail", 2)}, data["results"]
    assert data["summary"] == {"pass": 1, "fail": 1, "warn": 0, "n/a": 0, "skip": 0}, data["summary"]
    assert [statuses_of(one) for one in data["rounds"]] == [{"H1": "pass", "C1": "fail"}] * 2, data
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    failure = cases["C1"].find("failure")
    assert failure is not None and failure.get("message", "").startswith("failed in 2/2 rounds"), failure
    assert cases["H1"].find("failure") is None
    # A --repeat JSON is a baseline too: C1 is a known failure, H1 a known pass.
    code, text = matrix("--serve-cmd", cmd, "--name", "nhc", "--only", "H1", "--baseline", str(out))
    assert code == 0 and "matches the baseline" in text, text


def statuses_of(one_round: dict) -> dict[str, str]:
    return {r["scenario"]: r["status"] for r in one_round["results"]}


def test_a_failure_in_any_round_fails_the_scenario_and_the_baseline() -> None:
    skip = Result("P2", "x", "skip", 0, "why")
    rounds = [
        [Result("H1", "x", "pass", 0.1), Result("T1", "x", "pass", 1.0), skip],
        [Result("H1", "x", "pass", 0.1), Result("T1", "x", "fail", 1.3, "late"), skip],
    ]
    h1, t1, p2 = repeated(rounds)
    assert (h1.status, t1.status, p2.status) == ("pass", "fail", "skip")
    assert t1.rounds_with("fail") == [2] and t1.detail == "round 2: late" and p2.detail == "why"
    worse, better = report.compare([h1, t1, p2], {("H1", "x"): "pass", ("T1", "x"): "pass"})
    assert worse == ["T1 on x: pass -> FAIL (round 2: late)"] and better == [], worse


def test_quiet_prints_only_the_failing_rows_and_the_counts() -> None:
    cmd = shlex.join([sys.executable, str(BROKEN), "no-half-close"])
    code, text = matrix("--serve-cmd", cmd, "--name", "nhc", "--only", "H1,C1", "--repeat", "2", "--quiet")
    assert code == 1, text
    assert "C1  on nhc round 1/2  FAIL" in text and "C1  on nhc round 2/2  FAIL" in text, text
    assert "H1  on nhc" not in text, "a passing row is not printed"
    assert "round 1/2: 1 passed, 1 failed" in text and "(2 of 4 runs failed)" in text, text


def test_repeat_must_be_a_positive_integer() -> None:
    for value, message in [
        ("0", "argument --repeat: must be > 0, got 0"),
        ("-1", "argument --repeat: must be > 0, got -1"),
        ("1.5", "argument --repeat: expected an integer, got '1.5'"),
        ("two", "argument --repeat: expected an integer, got 'two'"),
    ]:
        code, text = matrix("--backends", "epoll", "--only", "H1", "--repeat", value)
        assert code == 2 and message in text, (value, text)


SERVE_FLAGS = "--idle-timeout 0.5 --read-timeout 0.5 --write-timeout 0.5 --workers 2"
#: The same, told to the matrix: it cannot read another process's settings.
SERVE_CLAIMS = [
    "--idle-timeout",
    "0.5",
    "--read-timeout",
    "0.5",
    "--write-timeout",
    "0.5",
    "--max-frame",
    "1048576",
]


def serve_cmd(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "connlab", "serve", *args])


def test_whole_matrix_against_a_server_command(tmp_path: Path) -> None:
    """Every scenario that applies to a launched server passes; the rest skip with a reason. Each
    server opens a handoff control socket at its {control}, and S5 hands it over to a successor."""
    out = tmp_path / "m.json"
    cmd = serve_cmd("--backend", "epoll", "--port", "0", "--control", "{control}", *SERVE_FLAGS.split())
    successor = serve_cmd("--backend", "epoll", "--take-over", "{control}", "--control", "{control}")
    code, text = matrix(
        "--serve-cmd", cmd, "--handoff-cmd", successor, "--json", str(out), *SERVE_CLAIMS, timeout=600
    )
    results = json.loads(out.read_text())["results"]
    assert code == 0, text
    skipped = {r["scenario"]: r["detail"] for r in results if r["status"] == "skip"}
    # P2 needs max_connections=50, S4 a {port} placeholder: the command cannot be given either.
    assert set(skipped) == {"P2", "S4"}, skipped
    assert all(r["status"] == "pass" for r in results if r["scenario"] not in skipped)


def test_whole_matrix_against_a_running_server_with_pid(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    serve = [*CONNLAB, "serve", "--backend", "poll", "--port", "0", *SERVE_FLAGS.split()]
    child = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        address = json.loads(child.stdout.readline())["address"]
        code, text = matrix(
            "--target", address, "--pid", str(child.pid), "--json", str(out), *SERVE_CLAIMS, timeout=600
        )
    finally:
        child.terminate()
        child.wait(timeout=10)
        child.stdout.close()  # type: ignore[union-attr]
    results = json.loads(out.read_text())["results"]
    assert code == 0, text
    skipped = {r["scenario"] for r in results if r["status"] == "skip"}
    # What needs the matrix to stop, restart or relaunch the server, or to configure it.
    assert skipped == {"C2", "L2", "P2", "P3", "S1", "S2", "S3", "S4"}, skipped
    assert len(results) == 38
    s5 = next(r for r in results if r["scenario"] == "S5")
    assert s5["status"] == "n/a" and "cannot start a successor beside a running server" in s5["detail"], s5


def test_s5_hands_a_listener_over_between_two_backends_in_two_processes(tmp_path: Path) -> None:
    """blocking (a thread per connection) hands its listener to tokio: the successor is held to a
    fresh tokio that took an idle server over, not to the incumbent's own thread count."""
    out = tmp_path / "m.json"
    cmd = serve_cmd("--backend", "blocking", "--port", "{port}", "--control", "{control}")
    successor = serve_cmd("--backend", "tokio", "--take-over", "{control}")
    code, text = matrix("--serve-cmd", cmd, "--handoff-cmd", successor, "--only", "S5", "--json", str(out))
    (result,) = json.loads(out.read_text())["results"]
    assert code == 0 and result["status"] == "pass", text
    assert "400 persistent" in result["detail"], result


def test_a_command_gets_a_fresh_control_path_removed_with_it() -> None:
    cmd = serve_cmd("--backend", "poll", "--port", "0", "--control", "{control}")
    handle = command_handle(cmd, {}, Options())
    try:
        assert handle.control is not None and Path(handle.control).is_socket(), handle.control
        assert handle.process.events[0]["control"] == handle.control, handle.process.events
    finally:
        handle.close()
    assert not Path(handle.control).parent.exists()
    with pytest.raises(ValueError, match=r"must take the control socket's path as \{control\}"):
        Target.from_command(cmd, handoff="connlab serve --backend poll --take-over /tmp/c")

"""The matrix against servers connlab did not write (tests_py/foreign_servers.py): it waits for a
server that prints nothing, follows one that forks per connection, takes a stop by SIGTERM's
default action as a stop, grades what the server does not claim as n/a, keeps each row within its
budget, and stops cleanly on Ctrl-C or SIGTERM with nothing left running."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from connlab.client import wait_until
from connlab.matrix.core import free_port
from connlab.process import ServeProcess, parse_address
from run_cli import CONNLAB

FOREIGN = Path(__file__).with_name("foreign_servers.py")
#: What the framed foreign server implements: nothing but framing (no timeouts, no max frame).
NO_CLAIMS: list[str] = []


def foreign(*flags: str) -> str:
    """The command line of a foreign server with `flags` (`{port}` for --port unless given)."""
    args = list(flags) if "--port" in flags else ["--port", "{port}", *flags]
    return shlex.join([sys.executable, str(FOREIGN), *args])


def matrix(*args: str, timeout: float = 300) -> tuple[int, str]:
    run = subprocess.run(
        [*CONNLAB, "matrix", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return run.returncode, run.stdout + run.stderr


def results(path: Path) -> dict[str, tuple[str, str]]:
    return {r["scenario"]: (r["status"], r["detail"]) for r in json.loads(path.read_text())["results"]}


def foreign_processes() -> list[psutil.Process]:
    """Every foreign server process still running (a leftover of a test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if str(FOREIGN) in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture(autouse=True)
def nothing_left_running() -> Iterator[None]:
    yield
    wait_until(lambda: not foreign_processes(), timeout=5.0, what="no foreign server left running")


def test_a_server_that_prints_nothing_is_ready_when_its_port_accepts(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    code, text = matrix(
        "--serve-cmd", foreign("--quiet", "--sigterm", "exit"), "--only", "H1,H4", "--json", str(out)
    )
    assert code == 0, text
    assert {k: s for k, (s, _) in results(out).items()} == {"H1": "pass", "H4": "pass"}, text


def test_a_server_that_is_never_ready_is_one_clear_error() -> None:
    # No address line and no {port} to watch: nothing says it is ready.
    started = time.monotonic()
    cmd = foreign("--port", "0", "--quiet")
    code, text = matrix("--serve-cmd", cmd, "--only", "H1,H3", "--start-timeout", "1", timeout=60)
    assert code == 2, text
    assert "no line with its host:port within 1 s (--start-timeout)" in text, text
    assert "it printed nothing" in text and text.count("could not be started") == 1, text
    assert time.monotonic() - started < 20


def test_the_address_may_come_on_any_line() -> None:
    script = f"echo starting up; echo loading config >&2; exec {foreign('--port', '0', '--sigterm', 'exit')}"
    with ServeProcess(["sh", "-c", script]) as server:
        assert server.address[0] == "127.0.0.1" and server.address[1] > 0
        assert server.tail()[:2] == ["starting up", "loading config"] or "starting up" in server.tail()
        stopped = server.stop()
        assert stopped.normal and stopped.returncode == 0, stopped


def test_unclaimed_features_are_na_not_fail(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    rows = "H1,E2,E5,C1,C3,T1,T2,T3,T4,T5"
    code, text = matrix("--serve-cmd", foreign(), "--only", rows, "--json", str(out), *NO_CLAIMS)
    got = results(out)
    assert code == 0, text
    for row in ("E2", "E5", "T1", "T2", "T3", "T4"):
        assert got[row][0] == "n/a", (row, got[row])
    assert "(--idle-timeout none)" in got["T1"][1] and "(--max-frame none)" in got["E2"][1], got
    # Framing it has: a half frame is not answered, and its slow reader meets backpressure.
    assert {got[r][0] for r in ("H1", "C1", "C3", "T5")} == {"pass"}, got
    assert "write_timeout close: n/a" in got["T5"][1], got["T5"]


def test_a_byte_echo_is_judged_as_one(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    # Without the claim, C3 finds the half frame answered: a real finding about a framed server.
    code, text = matrix("--serve-cmd", foreign("--byte-echo"), "--only", "C3", "--json", str(out))
    assert code == 1 and results(out)["C3"][0] == "fail", text
    assert "the partial frame was answered" in results(out)["C3"][1], text
    code, text = matrix(
        "--serve-cmd", foreign("--byte-echo"), "--byte-echo", "--only", "H1,H2,C3,E2", "--json", str(out)
    )
    got = results(out)
    assert code == 0, text
    assert got["C3"][0] == got["E2"][0] == "n/a" and "(--byte-echo)" in got["C3"][1], got
    assert got["H1"][0] == got["H2"][0] == "pass", got


def test_a_claimed_timeout_that_never_fires_is_a_warning_naming_the_option(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    args = ("--serve-cmd", foreign(), "--idle-timeout", "0.5", "--only", "T1", "--json", str(out))
    code, text = matrix(*args)
    status, detail = results(out)["T1"]
    assert code == 0 and status == "warn", text
    assert "not closed within 1.25 s (the matrix assumed --idle-timeout 0.5" in detail, detail
    code, text = matrix(*args, "--strict")
    assert code == 1, text


def test_a_stop_by_sigterm_is_normal_and_a_crash_is_not(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    code, text = matrix("--serve-cmd", foreign("--sigterm", "default"), "--only", "S3,S4", "--json", str(out))
    assert code == 0, text
    code, text = matrix("--serve-cmd", foreign("--sigterm", "crash"), "--only", "S4", "--json", str(out))
    status, detail = results(out)["S4"]
    assert code == 1 and status == "fail", text
    assert "start 1: the server killed by SIGABRT when stopped" in detail, detail


@contextmanager
def running(*flags: str) -> Iterator[ServeProcess]:
    with ServeProcess(shlex.split(foreign("--port", "0", *flags))) as server:
        yield server


def test_a_fork_per_connection_server_is_seen_whole(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    with running("--fork", "--sigterm", "exit") as server:
        host, port = server.address
        code, text = matrix(
            "--target",
            f"{host}:{port}",
            "--pid",
            str(server.pid),
            "--only",
            "E3,E4,U4,L1",
            "--json",
            str(out),
        )
    assert code == 0, text
    assert {k: s for k, (s, _) in results(out).items()} == dict.fromkeys(("E3", "E4", "U4", "L1"), "pass"), (
        text
    )
    code, text = matrix("--serve-cmd", foreign("--fork"), "--only", "P3", "--json", str(out))
    status, detail = results(out)["P3"]
    assert code == 0 and status == "n/a" and "forks per connection?" in detail, text


def test_a_server_that_logs_every_reset_is_not_blocked_by_its_own_stderr(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    # Undrained, its stderr pipe filled within about 80 cycles and every churn row failed.
    code, text = matrix("--serve-cmd", foreign("--log-resets"), "--only", "U3,L1", "--json", str(out))
    assert code == 0 and {s for s, _ in results(out).values()} == {"pass"}, text


def test_a_row_past_its_budget_fails_and_the_run_goes_on(tmp_path: Path) -> None:
    # U1 takes this server about 8 s; its budget of 90 s scaled by 0.01 is the floor, 1 s.
    out = tmp_path / "m.json"
    code, text = matrix(
        "--serve-cmd", foreign("--fork"), "--only", "U1,H1", "--scenario-timeout", "0.01", "--json", str(out)
    )
    got = results(out)
    assert code == 1, text
    status, detail = got["U1"]
    assert status == "fail" and detail.startswith("timed out after 1 s in "), detail
    assert "churn (client.py:" in detail and "u1 (churn.py:" in detail, detail
    assert "its servers were killed" in detail and got["H1"][0] == "pass", got


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_kills_its_servers_and_keeps_its_results(tmp_path: Path, sig: int, code: int) -> None:
    out, junit = tmp_path / "m.json", tmp_path / "m.xml"
    argv = [*CONNLAB, "matrix", "--serve-cmd", foreign(), "--only", "H1,U1,U2", "--json", str(out)]
    run = subprocess.Popen(
        [*argv, "--junit", str(junit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert run.stdout is not None
        # The first row has finished (and its line is printed): U1 is running now.
        for line in run.stdout:
            if "H1  on command" in line:
                break
        wait_until(foreign_processes, timeout=10, what="U1's server running")
        run.send_signal(sig)
        stdout, stderr = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == code, stderr
    assert "Traceback" not in stderr and ("interrupted" in stderr or "terminated" in stderr), stderr
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["scenario"] for r in data["results"]] == ["H1"], data
    assert junit.read_text().startswith("<?xml"), junit.read_text()
    assert "partial results written after 1 of 3 rows" in stdout, stdout


def test_a_target_that_refuses_connections_is_one_error() -> None:
    code, text = matrix("--target", "127.0.0.1:9")
    assert code == 2 and text.count("refuses connections") == 1, text


def test_output_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    started = time.monotonic()
    code, text = matrix("--backends", "epoll", "--json", str(tmp_path / "no" / "such" / "m.json"))
    assert code == 2 and "--json" in text and "does not exist" in text, text
    assert time.monotonic() - started < 10


def test_no_foreign_process_survives_a_fork_server_run(tmp_path: Path) -> None:
    """Children of a fork-per-connection server outlive its SIGTERM: the matrix kills them."""
    code, text = matrix(
        "--serve-cmd", foreign("--fork"), "--only", "C1,S1", "--json", str(tmp_path / "m.json")
    )
    del code, text  # S1 fails for such a server (its orphans keep the clients): not what this checks
    assert not [p.pid for p in foreign_processes() if p.ppid() != os.getpid()]


def test_an_address_after_a_timestamped_log_line(tmp_path: Path) -> None:
    """A "04:21:53" in a log line is no host:port; the address on the next line is."""
    assert parse_address("04:21:53 starting") is None
    assert parse_address("listening on [::1]:9000.") == ("::1", 9000)
    out = tmp_path / "m.json"
    code, text = matrix(
        "--serve-cmd", foreign("--port", "0", "--log-time"), "--only", "H1", "--json", str(out)
    )
    assert code == 0 and results(out)["H1"][0] == "pass", text


def test_a_server_still_starting_after_its_address_line_is_no_leak(tmp_path: Path) -> None:
    """It opens a pipe 0.3 s after printing its address, within rows that take longer (U1, L1):
    the baseline is taken once it settled (taken at the line, both read "leak: fds 7 -> 9")."""
    out = tmp_path / "m.json"
    code, text = matrix("--serve-cmd", foreign("--late-fds"), "--only", "U1,L1", "--json", str(out))
    assert code == 0, text
    assert {k: s for k, (s, _) in results(out).items()} == {"U1": "pass", "L1": "pass"}, text


def test_connections_that_outlive_the_stop_fail_s2_and_the_restarts_still_pass(tmp_path: Path) -> None:
    """Its children keep every connection, and its stdout, after SIGTERM: S2 sees each whole echo
    but no EOF (a failure, not a deadlock); S4's hundred restarts are not held up by them."""
    out = tmp_path / "m.json"
    code, text = matrix("--serve-cmd", foreign("--fork"), "--only", "S2,S4", "--json", str(out))
    got = results(out)
    assert code == 1 and got["S4"][0] == "pass", text
    status, detail = got["S2"]
    assert status == "fail" and "no EOF within 10 s of stop(): the connection outlived it" in detail, detail
    assert "deadlock" not in detail


def test_churn_is_paced_to_a_small_backlog(tmp_path: Path) -> None:
    """An external server with a backlog of 4: churn waits for room in its accept queue rather
    than overflowing it (each overflow costs a 1 s retransmission)."""
    out = tmp_path / "m.json"
    with running("--backlog", "4", "--sigterm", "exit") as server:
        started = time.monotonic()
        code, text = matrix(
            "--target", "{}:{}".format(*server.address), "--only", "U1,U2,U3", "--json", str(out)
        )
        elapsed = time.monotonic() - started
    assert code == 0, text
    assert {s for s, _ in results(out).values()} == {"pass"}, text
    assert elapsed < 60, f"{elapsed:.0f} s: {text}"


def test_a_bad_pid_or_a_remote_target_is_one_error() -> None:
    with running("--sigterm", "exit") as server:
        address = "{}:{}".format(*server.address)
        code, text = matrix("--target", address, "--pid", "999999999")
        assert code == 2 and "--pid 999999999: no such process" in text, text
    code, text = matrix("--target", "192.0.2.1:9000")
    assert code == 2 and "not an address of this machine" in text, text


def test_told_its_port_a_server_is_not_taken_at_another_address_it_prints() -> None:
    port = free_port()
    script = f"echo 'connected to the cache at 127.0.0.1:6379'; exec {foreign('--port', str(port))}"
    with ServeProcess(["sh", "-c", script], port=port) as server:
        assert server.address == ("127.0.0.1", port)


def test_start_up_is_not_charged_to_the_row_budget(tmp_path: Path) -> None:
    """Two seconds to start, a budget of one: the start is bounded by --start-timeout instead."""
    out = tmp_path / "m.json"
    slow = f"sh -c {shlex.quote('sleep 2; exec ' + foreign())}"
    code, text = matrix("--serve-cmd", slow, "--only", "H1", "--scenario-timeout", "0.01", "--json", str(out))
    assert code == 0 and results(out)["H1"][0] == "pass", text


def test_fault_rows_find_the_phantoms_of_a_server_without_timeouts(tmp_path: Path) -> None:
    """A client that vanishes (no FIN, no RST) stays with a server that has no timeouts: F1-F3
    fail saying so; a partition that heals (F4) and a reset mid-answer (F6) it survives."""
    out = tmp_path / "m.json"
    code, text = matrix("--serve-cmd", foreign(), "--only", "F1,F2,F3,F4,F6", "--json", str(out))
    got = results(out)
    assert code == 1, text
    for row, feature in (("F1", "idle timeout"), ("F2", "read timeout"), ("F3", "write timeout")):
        status, detail = got[row]
        assert status == "fail" and f"it claims no {feature}: a client that vanishes" in detail, (row, detail)
        assert "stays a phantom forever" in detail
    assert got["F4"][0] == got["F6"][0] == "pass", got


def test_a_partition_longer_than_the_real_timeout_fails_f4(tmp_path: Path) -> None:
    """broken_servers' echo idles out at 0.5 s; claimed 2 s, F4's partition (1 s) outlasts it."""
    out = tmp_path / "m.json"
    broken = shlex.join([sys.executable, str(Path(__file__).with_name("broken_servers.py")), "echo"])
    claims = ("--idle-timeout", "2", "--read-timeout", "2", "--write-timeout", "2")
    code, text = matrix("--serve-cmd", broken, "--only", "F4", "--json", str(out), *claims)
    status, detail = results(out)["F4"]
    assert code == 1 and status == "fail", text
    assert "did not survive a 1.00 s partition, shorter than every claimed timeout" in detail, detail


def test_a_server_that_takes_a_read_for_a_frame_fails_f5_and_passes_h1(tmp_path: Path) -> None:
    """On a loopback every small frame comes in one read; in 1-byte slices it never does."""
    out = tmp_path / "m.json"
    code, text = matrix("--serve-cmd", foreign("--one-read-frames"), "--only", "H1,F5", "--json", str(out))
    got = results(out)
    assert code == 1 and got["H1"][0] == "pass", text
    status, detail = got["F5"]
    # Which rows break depends on how the slices coalesce in the server's reads; some always do.
    assert status == "fail" and detail.startswith("Failed: through the slow network: H"), detail
    assert "TimeoutError: timed out (in recv_exact" in detail, detail


def handoff_pair(*defect: str) -> tuple[str, ...]:
    """`connlab matrix` options for a foreign incumbent (with `defect`) and a foreign successor."""
    incumbent = foreign("--control", "{control}", *defect)
    return ("--serve-cmd", incumbent, "--handoff-cmd", foreign("--port", "0", "--take-over", "{control}"))


@pytest.mark.parametrize(
    ("defect", "named"),
    [
        ((), None),
        (
            ("--handoff-defect", "close-listener"),
            ["100 persistent connections reset (client 0, 1, 2, 3, 4 ...), 400 frames in flight"],
        ),
        (
            ("--handoff-defect", "shutdown-listener"),
            ["connects refused (persistent clients reconnecting)", "bindable by a third party"],
        ),
    ],
    ids=["drains", "close-listener", "shutdown-listener"],
)
def test_s5_passes_a_handoff_that_drains_and_fails_one_that_resets_or_unlistens(
    tmp_path: Path, defect: tuple[str, ...], named: list[str] | None
) -> None:
    """The same foreign server, its handoff written from the protocol's description: draining, it
    passes S5; resetting its connections at the seal (and reporting them drained) or shutting the
    shared listening socket down (which stops it listening for the successor too), it fails,
    named by what the clients saw, not by what the server reported."""
    out = tmp_path / "m.json"
    code, text = matrix(*handoff_pair(*defect), "--only", "S5", "--json", str(out))
    status, detail = results(out)["S5"]
    if named is None:
        assert code == 0 and status == "pass", text
        assert re.search(r"the incumbent drained 1\d\d connections; 400 persistent", detail), detail
        return
    assert code == 1 and status == "fail", text
    assert detail.startswith("Failed: during the handoff: "), detail
    for words in named:
        assert words in detail, detail


def test_s5_is_na_without_a_handoff_and_the_successor_needs_control(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    no_control = (
        "--serve-cmd",
        foreign(),
        "--handoff-cmd",
        foreign("--port", "0", "--take-over", "{control}"),
    )
    for args, why in [
        (("--serve-cmd", foreign("--control", "{control}")), "no --handoff-cmd starts a successor"),
        (no_control, "its command takes no {control} (the path of its handoff control socket)"),
    ]:
        code, text = matrix(*args, "--only", "S5", "--json", str(out))
        status, detail = results(out)["S5"]
        assert code == 0 and status == "n/a", text
        assert detail == f"the server claims no handoff: {why}", detail
    with running("--sigterm", "exit") as server:
        code, text = matrix("--target", "{}:{}".format(*server.address), "--only", "S5", "--json", str(out))
    status, detail = results(out)["S5"]
    assert code == 0 and status == "n/a" and "cannot start a successor beside a running server" in detail
    code, text = matrix("--serve-cmd", foreign(), "--handoff-cmd", foreign("--take-over", "/tmp/x"))
    assert code == 2 and "--handoff-cmd: the successor's command must take" in text, text
    code, text = matrix("--backends", "epoll", "--handoff-cmd", "x {control}")
    assert code == 2 and "--handoff-cmd: only with --serve-cmd" in text, text

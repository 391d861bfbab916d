"""The pytest plugin, tested with pytester: options, ini keys, fixtures, marker, grid."""

from __future__ import annotations

import shlex
import sys

import pytest

from connlab.matrix import core
from connlab.process import ServeProcess, connlab_serve_argv

USES_SERVER = """
from connlab.client import connect, encode, read_frame

def test_echo(connlab_server):
    with connect(connlab_server.address) as c:
        c.sendall(encode(b"x"))
        assert read_frame(c) == b"x"
"""


def test_connlab_server_runs_once_per_selected_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_SERVER)
    result = pytester.runpytest("--connlab-backends=epoll,poll", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_echo?epoll? PASSED*", "*test_echo?poll? PASSED*"])


def test_a_backend_this_machine_cannot_run_is_skipped_with_the_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "backend_unavailable", lambda b: "no ring here" if b == "poll" else None)
    pytester.makepyfile(USES_SERVER)
    result = pytester.runpytest("--connlab-backends=epoll,poll", "-v", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_echo?epoll? PASSED*", "SKIPPED*no ring here*"])
    # The matrix's rows on it are skipped too, with the same reason.
    sc = core.SCENARIOS["H1"]
    options = core.options_for(True, {})
    skipped = core.run_one(sc, core.Target.in_process("poll"), options)
    assert (skipped.status, skipped.detail) == (core.SKIP, "no ring here")
    assert core.run_one(sc, core.Target.in_process("epoll"), options).status == core.PASS


def test_ini_key_mirrors_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_SERVER)
    pytester.makeini("[pytest]\nconnlab_backends = tokio\n")
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_echo?tokio? PASSED*"])


def test_unknown_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_SERVER)
    result = pytester.runpytest("--connlab-backends=nosuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--connlab-backends: unknown*nosuch*"])


def test_leak_guard_fails_a_test_that_leaks_an_fd(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket

        def test_leaks(leak_guard, request):
            sock = socket.socket()
            request.config.add_cleanup(sock.close)  # after the guard has looked
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*leak: fds*"])


def test_marker_is_registered_and_the_grid_printed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.connlab_scenario("H9")
        def test_cell(connlab_backend):
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "--connlab-backends=epoll", "--connlab-grid")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*scenario x target*", "H9*pass*"])


def test_matrix_against_an_external_target_with_pid(pytester: pytest.Pytester) -> None:
    argv = connlab_serve_argv("poll", idle_timeout=0.5, read_timeout=0.5, write_timeout=0.5)
    with ServeProcess(argv) as server:
        address = "{}:{}".format(*server.address)
        result = pytester.runpytest_subprocess(
            "--pyargs",
            "connlab.testing",
            "-k",
            "H1 or H3 or H4",
            f"--connlab-target={address}",
            f"--connlab-pid={server.pid}",
            "-v",
            "--connlab-grid",
        )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"*test_scenario?{address}-H1? PASSED*", "*scenario x target*"])


def test_target_options_are_checked(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--pyargs", "connlab.testing", "--connlab-pid=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--connlab-pid: only with --connlab-target*"])


def test_unclaimed_features_are_na_and_a_late_claimed_timeout_warns(pytester: pytest.Pytester) -> None:
    """A healthy `connlab serve` with its own defaults (60 s idle): nothing fails. Unclaimed, the
    timed rows are n/a; claimed wrongly (0.5 s), T1 warns naming the plugin's option, and fails
    only with --connlab-strict."""
    with ServeProcess(connlab_serve_argv("epoll")) as server:
        address = "{}:{}".format(*server.address)
        common = ("--pyargs", "connlab.testing", "-k", "T1 or E2 or H1", f"--connlab-target={address}", "-rs")
        result = pytester.runpytest_subprocess(*common)
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines(
            ["*n/a: the server claims no idle timeout (--connlab-idle-timeout none)*"]
        )
        claimed = ("--connlab-idle-timeout=0.5", "--connlab-max-frame=1048576")
        result = pytester.runpytest_subprocess(*common, *claimed)
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines(
            ["connlab warning: T1 on *: idle_timeout: not closed within 1.25 s (the matrix assumed "
             "--connlab-idle-timeout 0.5*"]
        )  # fmt: skip
        result = pytester.runpytest_subprocess(*common, *claimed, "--connlab-strict")
        result.assert_outcomes(passed=2, failed=1)


def test_a_claim_must_be_a_number_or_none(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--pyargs", "connlab.testing", "--connlab-read-timeout=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--connlab-read-timeout: expected a number of seconds or none, got 'soon'*"]
    )


def test_handoff_cmd_runs_s5_against_a_server_command(pytester: pytest.Pytester) -> None:
    serve = shlex.join([sys.executable, "-m", "connlab", "serve", "--backend", "poll"])
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "connlab.testing",
        "-k",
        "S5",
        f"--connlab-serve-cmd={serve} --port 0 --control {{control}}",
        f"--connlab-handoff-cmd={serve} --take-over {{control}} --control {{control}}",
        "-v",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_scenario?command-S5? PASSED*"])
    result = pytester.runpytest_subprocess(
        "--pyargs", "connlab.testing", "-k", "S5", "-rs", f"--connlab-serve-cmd={serve}"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*n/a: the server claims no handoff: its command takes no {control}*"])
    result = pytester.runpytest("--pyargs", "connlab.testing", "--connlab-handoff-cmd=x {control}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--connlab-handoff-cmd: only with --connlab-serve-cmd*"])

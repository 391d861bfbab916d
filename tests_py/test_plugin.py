"""The pytest plugin, tested with pytester: options, ini keys, fixtures, marker, grid."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    serve = [
        sys.executable,
        "-m",
        "connlab",
        "serve",
        "--backend",
        "poll",
        "--port",
        "0",
        "--idle-timeout",
        "0.5",
        "--read-timeout",
        "0.5",
        "--write-timeout",
        "0.5",
    ]
    child = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        address = json.loads(child.stdout.readline())["address"]
        result = pytester.runpytest_subprocess(
            "--pyargs",
            "connlab.testing",
            "-k",
            "H1 or H3 or H4",
            f"--connlab-target={address}",
            f"--connlab-pid={child.pid}",
            "-v",
            "--connlab-grid",
        )
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines([f"*test_scenario?{address}-H1? PASSED*", "*scenario x target*"])
    finally:
        child.terminate()
        child.wait(timeout=10)
        child.stdout.close()  # type: ignore[union-attr]


def test_target_options_are_checked(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--pyargs", "connlab.testing", "--connlab-pid=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--connlab-pid: only with --connlab-target*"])

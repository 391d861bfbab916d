"""`connlab stress`: the reading of strace's trace, proven on traces with each defect, and short runs
of both steps on real backends."""

from __future__ import annotations

import shutil

import pytest

from connlab._measure.stress import parse_closes
from run_cli import connlab

# `strace -f -o FILE` of a server: one line per call, each after its thread's id.
CLEAN = """\
101 accept4(3, {sa_family=AF_INET, sin_port=htons(40000)}, [16], SOCK_CLOEXEC) = 7
101 accept4(3, 0x7ffd, [128], SOCK_CLOEXEC) = -1 EAGAIN (Resource temporarily unavailable)
102 shutdown(7, SHUT_WR)              = 0
102 close(7)                          = 0
101 accept4(3, {sa_family=AF_INET, sin_port=htons(40001)}, [16], SOCK_CLOEXEC) = 7
101 close(9)                          = 0
102 close(7 <unfinished ...>
101 accept4(3, {sa_family=AF_INET, sin_port=htons(40002)}, [16], SOCK_CLOEXEC) = 8
102 <... close resumed>)              = 0
102 close(8)                          = 0
101 +++ exited with 0 +++
"""


def test_a_clean_trace_closes_every_accepted_fd_once() -> None:
    seen = parse_closes(CLEAN)
    assert (seen.accepted, seen.closed, seen.ebadf, seen.never_closed, seen.closed_twice) == (3, 3, 0, 0, 0)
    assert seen.all_closes == 4, "fd 9 was never accepted: a close, not an accepted fd's"


def test_two_threads_written_out_of_order_are_still_clean() -> None:
    # Thread 102 closed fd 7 before thread 101's accept got it again; strace wrote them the other way.
    trace = """\
101 accept4(3, {sa_family=AF_INET, sin_port=htons(40000)}, [16], SOCK_CLOEXEC) = 7
101 accept4(3, {sa_family=AF_INET, sin_port=htons(40001)}, [16], SOCK_CLOEXEC) = 7
102 close(7)                          = 0
102 close(7)                          = 0
"""
    seen = parse_closes(trace)
    assert (seen.accepted, seen.closed, seen.never_closed, seen.closed_twice, seen.ebadf) == (2, 2, 0, 0, 0)


def test_a_double_close_shows_as_ebadf_or_as_one_close_too_many() -> None:
    seen = parse_closes(CLEAN + "102 close(8)                          = -1 EBADF (Bad file descriptor)\n")
    assert seen.ebadf == 1
    assert any("EBADF" in e for e in seen.examples)
    # Closed twice while the number was reused by another accept: that one's own close is missing.
    seen = parse_closes(CLEAN + "102 close(8)                          = 0\n")
    assert seen.closed_twice == 1
    assert "fd 8: accepted 1 times, closed 2" in seen.examples


def test_a_file_a_thread_opens_and_closes_is_not_a_second_close() -> None:
    trace = CLEAN + (
        '103 openat(AT_FDCWD, "/sys/devices/system/cpu/online", O_RDONLY|O_CLOEXEC) = 8\n'
        "103 close(8)                          = 0\n"
    )
    seen = parse_closes(trace)
    assert (seen.accepted, seen.closed, seen.never_closed, seen.closed_twice) == (3, 3, 0, 0)


def test_a_leaked_fd_shows_as_never_closed() -> None:
    trace = CLEAN.replace("102 close(8)                          = 0\n", "")
    seen = parse_closes(trace)
    assert (seen.accepted, seen.closed, seen.never_closed) == (3, 2, 1)
    assert "fd 8: accepted 1 times, closed 0" in seen.examples


def test_the_connections_step_passes_on_two_backends() -> None:
    run = connlab("stress", "connections", "--backends", "epoll,blocking", "--connections", "300")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("epoll     pass  300 connections each served a frame"), lines
    assert lines[1].startswith("blocking  pass  300 connections"), lines
    assert lines[-1].startswith("stress connections: PASS, 2 backends"), lines


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_the_closes_step_passes_on_a_readiness_loop_and_on_uring() -> None:
    run = connlab("stress", "closes", "--backends", "epoll,uring", "--churn", "100x5")
    assert run.returncode == 0, run.stdout + run.stderr
    epoll, uring, verdict = run.stdout.splitlines()
    assert epoll.startswith(
        "epoll     pass  500 churned connections: 0 EBADF, 500 accepted fds, each closed once"
    )
    assert uring.startswith(
        "uring     pass  500 churned connections: 0 EBADF, 500 closes for 500 accepted"
    ) or ("skipped" in uring)
    assert verdict.startswith("stress closes: PASS, 2 backends")


def test_bad_usage_exits_2() -> None:
    run = connlab("stress", "sideways")
    assert run.returncode == 2 and "invalid choice" in run.stderr
    run = connlab("stress", "closes", "--churn", "10")
    assert run.returncode == 2 and "CYCLESxPARALLEL" in run.stderr

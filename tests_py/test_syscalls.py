"""Syscalls per echoed frame: strace's summary table parsed, and real servers counted under
`strace -f -c` (or, where strace is missing or a server has no pid, a row saying so)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from connlab._measure import report, story, syscalls
from connlab._measure.bench import Bench, BenchConfig, External, Workload, count_syscalls
from connlab._measure.footprint import serve_child

#: `strace -f -c -p PID` (strace 6.1) on a `connlab serve --backend pool` child while one connection
#: ran a closed loop of 64 B frames for 0.3 s (469 frames answered). Errors are blank where none.
POOL_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 39.85    0.064528          39      1648       341 futex
 24.09    0.039004          82       471           epoll_wait
 17.85    0.028906          14      1990           sched_yield
  7.29    0.011803          25       470           sendto
  5.61    0.009084          19       471           epoll_ctl
  5.30    0.008588          18       470           recvfrom
  0.00    0.000004           2         2         1 accept4
  0.00    0.000001           1         1           setsockopt
------ ----------- ----------- --------- --------- ----------------
100.00    0.161918          29      5523       342 total
"""

#: Frames per server in these tests: enough that one connection's set-up is noise.
FRAMES = 1000


def test_the_summary_table_is_read_row_by_row() -> None:
    table = syscalls.parse_summary(POOL_SUMMARY)
    assert table == {
        "futex": (1648, 341),
        "epoll_wait": (471, 0),
        "sched_yield": (1990, 0),
        "sendto": (470, 0),
        "epoll_ctl": (471, 0),
        "recvfrom": (470, 0),
        "accept4": (2, 1),
        "setsockopt": (1, 0),
    }
    # The rows add up to strace's own total, which is not a syscall.
    assert sum(calls for calls, _ in table.values()) == 5523 and "total" not in table
    # Two personalities' tables (a 64-bit kernel running 32-bit code too) add up.
    twice = syscalls.parse_summary(
        POOL_SUMMARY + "System call usage summary for 32 bit mode:\n" + POOL_SUMMARY
    )
    assert twice["futex"] == (2 * 1648, 2 * 341)
    with pytest.raises(ValueError, match="not a strace -c summary"):
        syscalls.parse_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted\n")


def _counted(backend: str) -> dict[str, Any]:
    with serve_child(backend, 2) as child:
        return syscalls.count(child.address, child.pid, frames=FRAMES)


def test_an_epoll_child_makes_about_three_syscalls_per_frame_and_pool_more() -> None:
    epoll = _counted("epoll")
    if shutil.which("strace") is None:
        assert epoll == {"status": "strace not installed"}
        return
    assert epoll["status"] == "counted", epoll
    # A wait, a receive and a send per frame; one connection's set-up spread over the frames.
    assert 2 <= epoll["per_frame"] <= 5, epoll
    assert epoll["frames"] >= FRAMES / 4 and not epoll["load_errors"]
    assert {"sendto", "recvfrom"} <= {name for name, _ in syscalls.main_syscalls(epoll)}
    # pool re-arms the connection (epoll_ctl) and hands it between threads (futex) every frame.
    pool = _counted("pool")
    assert pool["status"] == "counted" and pool["per_frame"] > epoll["per_frame"], (pool, epoll)
    assert pool["syscalls"]["epoll_ctl"]["per_frame"] >= 0.9


def test_a_server_is_not_counted_without_strace_or_without_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert syscalls.count(("127.0.0.1", 1), None) == {"status": "no --pid"}
    cfg = BenchConfig(
        backends=["epoll"],
        workloads=[Workload("rtt")],
        externals=[External("mine", address=("127.0.0.1", 1))],
        syscall_frames=FRAMES,
    )
    said: list[str] = []
    assert count_syscalls("mine", cfg, said.append) == {"server": "mine", "status": "no --pid"}
    assert said == ["syscalls: mine, one connection, 1 000 frames of 64 B under strace -f -c"]
    monkeypatch.setattr(syscalls, "strace_path", lambda: None)
    row = count_syscalls("epoll", cfg, said.append)
    assert row == {"server": "epoll", "status": "strace not installed"}
    bench = Bench(cfg, {}, "none", [], [], syscalls=[row, {"server": "mine", "status": "no --pid"}])
    _, rows = report.syscall_rows(bench)
    assert rows == [["epoll", "-", "-", "strace not installed"], ["mine", "-", "-", "no --pid"]]
    assert story.syscall_counts(bench) == [
        "Syscalls per echoed frame: none counted. Not counted: epoll (strace not installed); mine (no --pid)."
    ]


def test_the_report_shows_the_counts_as_a_table_in_the_csvs_and_the_summary(tmp_path: Path) -> None:
    frames = 469
    table = syscalls.parse_summary(POOL_SUMMARY)
    calls = sum(c for c, _ in table.values())
    row = {
        "server": "pool",
        "status": "counted",
        "frames": frames,
        "calls": calls,
        "per_frame": calls / frames,
        "syscalls": {n: {"calls": c, "errors": e, "per_frame": c / frames} for n, (c, e) in table.items()},
    }
    cfg = BenchConfig(backends=["pool"], workloads=[Workload("rtt")], syscall_frames=frames)
    bench = Bench(cfg, {}, "none", [], [], syscalls=[row])
    written = report.write(tmp_path, {"machine": {}, "bench": bench.to_json(), "targets": []}, bench)
    md = written.md.read_text()
    assert "## Syscalls per echoed frame" in md
    assert (
        "| pool | 11.8 | 469 | sched_yield 4.24, futex 3.51, epoll_wait 1.00, epoll_ctl 1.00,"
        " sendto 1.00, recvfrom 1.00 |" in md
    )
    assert "Syscalls per echoed frame (`strace -f -c`, one connection, 64 B frames, untimed): pool 11.8" in md
    summary = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    [futex] = [r for r in summary if r["figure"] == "syscalls_per_frame:futex"]
    assert futex["workload"] == "syscalls" and futex["server"] == "pool" and futex["n"] == "1"
    assert (
        float(futex["median"]) == float(futex["min"]) == float(futex["max"]) == pytest.approx(1648 / frames)
    )
    figures = list(csv.DictReader((tmp_path / "figures.csv").read_text().splitlines()))
    [total] = [r for r in figures if r["figure"] == "syscalls_per_frame"]
    assert total["server"] == "pool" and float(total["value"]) == pytest.approx(calls / frames)
    assert json.loads(written.json.read_text())["bench"]["syscalls"] == [row]

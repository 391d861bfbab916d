"""Syscalls per echoed frame: `strace -f -c` attached to a running server while one connection's
closed loop runs through it, and the parsing of strace's summary table.

A phase apart from the timed runs: a traced process stops at every syscall, so its timing says
nothing about the server and feeds no other figure; only the counts are kept. A server is traced
twice: a short first run finds how many frames a second takes under strace, the second (one
connection, about `frames` frames) is the one counted, so the count is not one of a new
connection's set-up spread over a few frames."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connlab import load

#: Frames counted per server unless told otherwise, and their payload.
FRAMES = 5000
SIZE = 64

#: A row's status: counted, or why it was not.
COUNTED = "counted"
NOT_INSTALLED = "strace not installed"
NO_PID = "no --pid"

#: Seconds of the first, uncounted run that finds the rate under strace.
CALIBRATION_S = 0.3
#: Bounds of the counted run's length (a server slow under strace counts fewer frames).
MIN_S, MAX_S = 0.1, 20.0
#: Seconds to wait for strace to attach, and for it to write its summary once told to stop.
ATTACH_TIMEOUT, STOP_TIMEOUT = 10.0, 10.0
#: The generator's wait for an owed answer: a traced server is slow, not dead.
ANSWER_TIMEOUT = 5.0


def strace_path() -> str | None:
    """Where strace is, or None where it is not installed."""
    return shutil.which("strace")


def unavailable(pid: int | None, strace: str | None) -> str | None:
    """Why a server cannot be counted (`NO_PID`, `NOT_INSTALLED`), or None if it can."""
    if pid is None:
        return NO_PID
    if strace is None:
        return NOT_INSTALLED
    return None


def parse_summary(text: str) -> dict[str, tuple[int, int]]:
    """The syscalls of a `strace -c` summary table as {name: (calls, errors)}, its `total` row
    left out. Columns: % time, seconds, usecs/call, calls, errors (blank when none), syscall;
    several tables (one per personality, on a 64-bit kernel running 32-bit code) are added up.
    ValueError when `text` holds no such table."""
    out: dict[str, tuple[int, int]] = {}
    tables = 0
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["%", "time"]:
            if words[2:6] != ["seconds", "usecs/call", "calls", "errors"]:
                raise ValueError(f"a strace -c table with unknown columns: {line.strip()!r}")
            tables += 1
            continue
        # A data row: four or five numbers (errors may be blank), then the name.
        numbers, name = words[:-1], words[-1] if words else ""
        if tables == 0 or len(numbers) not in (4, 5) or name == "total":
            continue
        try:
            float(numbers[0])
            calls, errors = int(numbers[3]), int(numbers[4]) if len(numbers) == 5 else 0
        except ValueError:
            continue  # the dashed rules
        was = out.get(name, (0, 0))
        out[name] = (was[0] + calls, was[1] + errors)
    if tables == 0:
        raise ValueError("not a strace -c summary: no '% time ... syscall' header")
    return out


@dataclass
class Trace:
    """What strace wrote (its `-c` summary, or the calls traced), filled in once it has stopped."""

    output: str = ""


@contextmanager
def attached(strace: str, pid: int, options: Sequence[str] = ("-c",)) -> Iterator[Trace]:
    """`strace -f` with `options` (default `-c`: a summary) attached to every thread of process
    `pid` (and the threads it starts) for the body; the `Trace` it yields holds what strace wrote
    once the block is left. Attachment is waited for (strace says so on stderr); RuntimeError with
    strace's words if it does not attach. On the way out strace is stopped by SIGINT, which
    detaches it and makes it write a summary."""
    with tempfile.TemporaryDirectory(prefix="connlab-strace-") as tmp:
        summary, log = Path(tmp) / "summary", Path(tmp) / "stderr"
        with log.open("w") as err:
            # Its own process group: a terminal's Ctrl-C reaches bench, which stops strace here.
            proc = subprocess.Popen(
                [strace, "-f", *options, "-o", str(summary), "-p", str(pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                process_group=0,
            )
        trace = Trace()
        try:
            _wait_attached(proc, log)
            yield trace
        finally:
            _stop(proc)
        trace.output = summary.read_text() if summary.exists() else ""
        if not trace.output:
            raise RuntimeError(f"strace wrote no summary: {_said(log)}")


def _wait_attached(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until strace says "Process N attached" (with -f on a threaded process: "attached with K
    threads", said once every thread is), polled; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while "attached" not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"strace did not attach: {_said(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"strace did not attach within {ATTACH_TIMEOUT:.0f} s: {_said(log)}")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _said(log: Path) -> str:
    """strace's last words, for an error message."""
    lines = [line.removeprefix("strace: ") for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "nothing said"


def count(
    address: tuple[str, int],
    pid: int | None,
    *,
    frames: int = FRAMES,
    size: int = SIZE,
    strace: str | None = None,
) -> dict[str, Any]:
    """The syscalls server `pid` makes per frame it echoes: one connection of `size`-byte frames
    in a closed loop for about `frames` frames (the Rust generator, no warm-up), under `strace -f
    -c -p pid` (`strace`: its path, default the one on PATH). Returns {status, and when
    `counted`: frames answered, calls, per_frame (calls / frames), syscalls {name: {calls,
    errors, per_frame}}, load_errors}. Status `NO_PID`, `NOT_INSTALLED`, or `strace failed:
    ...` when strace could not attach (e.g. ptrace not permitted) or wrote no summary."""
    strace = strace or strace_path()
    if why := unavailable(pid, strace):
        return {"status": why}
    assert pid is not None and strace is not None
    try:
        with attached(strace, pid):
            trial = load.closed_loop(
                address, 1, size, duration=CALIBRATION_S, warmup=0.0, timeout=ANSWER_TIMEOUT
            )
        rate = trial["frames"] / max(trial["elapsed_s"], 1e-9)
        seconds = min(max(frames / rate, MIN_S), MAX_S) if rate > 0 else MAX_S
        with attached(strace, pid) as trace:
            run = load.closed_loop(address, 1, size, duration=seconds, warmup=0.0, timeout=ANSWER_TIMEOUT)
        table = parse_summary(trace.output)
    except (RuntimeError, ValueError) as err:
        return {"status": f"strace failed: {err}"}
    answered = run["frames"]
    if not answered:
        return {"status": "no frame answered under strace", "load_errors": run["errors"]}
    calls = sum(c for c, _ in table.values())
    return {
        "status": COUNTED,
        "frames": answered,
        "size": size,
        "connections": 1,
        "calls": calls,
        "per_frame": calls / answered,
        "syscalls": {
            name: {"calls": c, "errors": e, "per_frame": c / answered}
            for name, (c, e) in sorted(table.items(), key=lambda kv: -kv[1][0])
        },
        "load_errors": {k: n for k, n in run["errors"].items() if n},
    }


#: A syscall is named in the report's table from this many calls per frame on.
MAIN_PER_FRAME = 0.05


def main_syscalls(row: dict[str, Any]) -> list[tuple[str, float]]:
    """The syscalls of a counted row that matter per frame, most first: (name, calls per frame)."""
    main = [(name, s["per_frame"]) for name, s in row.get("syscalls", {}).items()]
    return sorted(((n, x) for n, x in main if x >= MAIN_PER_FRAME), key=lambda nx: -nx[1])


def per_frame(x: float) -> str:
    """Calls per frame as the report prints them: 3.00, 0.60, 11.4."""
    return f"{x:.3g}" if x >= 10 else f"{x:.2f}"


def describe(row: dict[str, Any]) -> str:
    """A counted row in a few words: "3.00 (epoll_wait 1.00, recvfrom 1.00, sendto 1.00)"; else
    its status."""
    if row.get("status") != COUNTED:
        return str(row.get("status"))
    main = ", ".join(f"{name} {per_frame(x)}" for name, x in main_syscalls(row))
    return f"{per_frame(row['per_frame'])} ({main})" if main else per_frame(row["per_frame"])

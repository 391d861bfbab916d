"""The two stress steps of `make stress` no other command runs: many connections at once, and every
accepted fd closed exactly once under strace. Each backend runs in its own `connlab serve` process
(timeouts off), so its fds, threads and sockets are its own.

- `many_connections`: N connections opened at once, each served one frame, then all closed; the
  server's fds and threads must come back to what they were before the first, with no socket left
  ESTABLISHED or in CLOSE_WAIT.
- `closes_once`: churn (connect, one frame, close) under `strace -f -e trace=accept,accept4,close,
  shutdown` (and the calls that open other fds) attached to the server: no call may fail with
  EBADF, and every fd an accept returned is closed exactly once (matched by fd number and count:
  strace may write two threads' calls out of order). `uring` accepts inside io_uring, without a
  syscall to trace: its successful `close` calls are counted against the connections the server
  says it accepted."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from connlab import load, probe
from connlab._measure.footprint import measure_idle, serve_child
from connlab._measure.syscalls import attached, strace_path
from connlab.client import wait_until

#: Connections held at once: 10 000 on the event loops, 5 000 on `blocking` (a thread each).
CONNECTIONS = 10_000
BLOCKING_CONNECTIONS = 5_000
#: Churn of the strace step: cycles x parallel connections.
CHURN = (1000, 10)
#: How long the server gets to be back at its baseline once every client closed.
SETTLE_S = 30.0
#: Calls that return a new fd other than accept's: a thread may open and close a file meanwhile
#: (glibc reads /sys/devices/system/cpu/online when a new thread's first malloc makes an arena).
OPENS = (
    "open",
    "openat",
    "socket",
    "eventfd2",
    "dup",
    "dup2",
    "dup3",
    "epoll_create1",
    "timerfd_create",
    "memfd_create",
    "signalfd4",
    "pidfd_open",
)
#: The calls traced by `closes_once`.
TRACED = "trace=accept,accept4,close,shutdown," + ",".join(OPENS)


@dataclass(frozen=True)
class Outcome:
    """One backend's result in one step: passed (True), failed (False) or skipped (None)."""

    backend: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        word = {True: "pass", False: "FAIL", None: "skip"}[self.passed]
        return f"{self.backend:9} {word}  {self.detail}"


def default_connections(backend: str) -> int:
    """10 000, or 5 000 on `blocking`."""
    return BLOCKING_CONNECTIONS if backend == "blocking" else CONNECTIONS


def many_connections(backend: str, connections: int) -> Outcome:
    """`connections` at once on `backend`, each served a frame, then all closed: fds, threads and
    CLOSE_WAIT back at baseline. Skipped, with the reason, when RLIMIT_NOFILE cannot be raised for
    them (the clients here and the server's accepted sockets each need one)."""
    try:
        # The clients here, the server's sockets in the child (which inherits the limit): N each.
        probe.raise_nofile(connections + 256)
    except OSError as err:
        return Outcome(backend, None, f"skipped: {err}")
    start = time.monotonic()
    with serve_child(backend, workers=None) as child:
        pid, port = child.pid, child.address[1]
        before = probe.snapshot(pid)
        try:
            peak = measure_idle(child.address, child.pid, [connections])[-1]  # closes them all
        except (OSError, RuntimeError, TimeoutError) as err:
            return Outcome(backend, False, f"while opening {connections} connections: {err}")
        opened = time.monotonic() - start

        def at_baseline() -> bool:
            view = probe.port_view(port, pid=pid)
            now = probe.snapshot(pid)
            return (now.fds, now.threads, view.established, view.close_wait) == (
                before.fds,
                before.threads,
                0,
                0,
            )

        try:
            wait_until(at_baseline, timeout=SETTLE_S, what="the server back at its baseline")
        except TimeoutError:
            now, view = probe.snapshot(pid), probe.port_view(port, pid=pid)
            return Outcome(
                backend,
                False,
                f"{SETTLE_S:.0f} s after {connections} clients closed: fds {now.fds} (baseline "
                f"{before.fds}), threads {now.threads} (baseline {before.threads}), ESTABLISHED "
                f"{view.established}, CLOSE_WAIT {view.close_wait}",
            )
    return Outcome(
        backend,
        True,
        f"{connections} connections each served a frame (opened in {opened:.1f} s); fds "
        f"{before.fds} -> {peak.fds} -> {before.fds}, threads {before.threads} -> {peak.threads} -> "
        f"{before.threads}, CLOSE_WAIT 0, back in {time.monotonic() - start - opened:.1f} s",
    )


@dataclass
class Closes:
    """What the trace of `closes_once` shows."""

    #: Successful accepts, and successful closes of an fd number some accept returned.
    accepted: int = 0
    closed: int = 0
    ebadf: int = 0
    #: Fd numbers accepted more often than closed (a close missing), and the reverse (one too many).
    never_closed: int = 0
    closed_twice: int = 0
    #: Successful `close` calls on any fd, and those that match an fd opened otherwise than by accept.
    all_closes: int = 0
    other_closes: int = 0
    #: The first few offending lines or fds, for the message.
    examples: tuple[str, ...] = ()


_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<call>\w+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+<\.\.\. (?P<call>\w+) resumed>(?P<rest>.*)$")
_RESULT = re.compile(r"=\s+(?P<ret>-?\d+)(?:\s+(?P<errno>E[A-Z]+))?(?:\s+\(.*\))?\s*$")


def parse_closes(text: str) -> Closes:
    """Reads `strace -f -o` output of accepts, closes and the calls that open other fds (`OPENS`; a
    call split by another thread's, "<unfinished ...>" then "<... resumed>", is joined). Across
    threads strace may write one thread's close after another's accept of the same fd number, so fds
    are matched by count, not by order: over the whole run, every fd number an accept returned is
    closed as often as it was accepted or otherwise opened."""
    pending: dict[str, tuple[str, str]] = {}
    accepts, opens, closes, examples = Counter[int](), Counter[int](), Counter[int](), list[str]()
    out = Closes()
    for line in text.splitlines():
        if m := _RESUMED.match(line):
            call, args = pending.pop(m["pid"], (m["call"], ""))
            whole = args + m["rest"]
        elif m := _CALL.match(line):
            call, whole = m["call"], m["args"]
            if whole.endswith("<unfinished ...>"):
                pending[m["pid"]] = (call, whole.removesuffix("<unfinished ...>"))
                continue
        else:
            continue  # "+++ exited", "--- SIG", strace's own notes
        result = _RESULT.search(whole)
        if result is None:
            continue  # cut off by the detach
        ret, errno = int(result["ret"]), result["errno"]
        if errno == "EBADF":
            out.ebadf += 1
            examples.append(line)
        if call in ("accept", "accept4") and ret >= 0:
            accepts[ret] += 1
        elif call in OPENS and ret >= 0:
            opens[ret] += 1
        elif call == "close" and ret == 0:
            out.all_closes += 1
            first = whole.split(",", 1)[0].split(")", 1)[0].strip()
            if first.isdigit():
                closes[int(first)] += 1
    out.accepted = sum(accepts.values())
    out.closed = sum(min(n, closes[fd]) for fd, n in accepts.items())
    out.other_closes = sum(min(k, closes[fd]) for fd, k in opens.items())
    # An fd number accepted n times and opened otherwise k times must be closed n + k times, or n at
    # least when the other opens are files that outlive the trace.
    short = {fd: (n, opens[fd], closes[fd]) for fd, n in accepts.items() if closes[fd] < n}
    extra = {fd: (n, opens[fd], closes[fd]) for fd, n in accepts.items() if closes[fd] > n + opens[fd]}
    out.never_closed = sum(n - c for n, _, c in short.values())
    out.closed_twice = sum(c - n - k for n, k, c in extra.values())
    for fd, (n, k, c) in sorted((short | extra).items())[:5]:
        also = f" (and opened {k} times otherwise)" if k else ""
        examples.append(f"fd {fd}: accepted {n} times{also}, closed {c}")
    out.examples = tuple(examples[:5])
    return out


def _no_thread_stopped(pid: int) -> bool:
    """Whether no thread of `pid` sits in a ptrace stop ('t'), i.e. strace has handled (and
    written) every call that returned."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "t":
            return False
    return True


def closes_once(backend: str, cycles: int = CHURN[0], parallel: int = CHURN[1]) -> Outcome:
    """`cycles` x `parallel` churned connections on `backend` under strace: 0 EBADF, and every
    accepted fd closed exactly once. Fails, saying so, where strace is missing or cannot attach."""
    strace = strace_path()
    if strace is None:
        return Outcome(backend, False, "strace not installed: `make setup` installs it where apt-get can")
    with serve_child(backend, workers=None) as child:
        pid, port = child.pid, child.address[1]
        fds = probe.fd_count(pid)

        def all_closed() -> bool:
            # A socket leaves the kernel's table at its last ACK, before its fd is closed: the fds
            # count too, and strace must have written every call that returned.
            view = probe.port_view(port, pid=pid)
            return (view.established, view.close_wait, probe.fd_count(pid)) == (0, 0, fds) and (
                _no_thread_stopped(pid)
            )

        try:
            with attached(strace, pid, ("-e", TRACED, "-e", "signal=none")) as trace:
                churned = load.churn(child.address, cycles, parallel, timeout=10.0, deadline=600.0)
                wait_until(all_closed, timeout=SETTLE_S, what="every churned connection closed")
        except RuntimeError as err:
            return Outcome(backend, False, f"strace failed: {err}")
        except TimeoutError as err:
            view = probe.port_view(port, pid=pid)
            return Outcome(
                backend,
                False,
                f"{err}: fds {probe.fd_count(pid)} (before the churn {fds}), ESTABLISHED "
                f"{view.established}, CLOSE_WAIT {view.close_wait}",
            )
        report = child.stop().report
    accepted = report.get("accepted")
    errors = {k: n for k, n in churned["errors"].items() if n}
    seen = parse_closes(trace.output)
    problems = []
    if errors:
        problems.append(f"churn errors {errors}")
    if seen.ebadf:
        problems.append(f"{seen.ebadf} calls failed with EBADF")
    if seen.accepted:  # accepts are syscalls: follow each fd
        if seen.accepted != accepted:
            problems.append(f"{seen.accepted} accepts traced, the server says it accepted {accepted}")
        if seen.never_closed or seen.closed_twice:
            problems.append(
                f"{seen.never_closed} accepted fds never closed, {seen.closed_twice} closed twice"
            )
        what = f"{seen.accepted} accepted fds, each closed once"
    else:  # io_uring accepts without a syscall: count the closes
        closes = seen.all_closes - seen.other_closes
        if closes != accepted:
            problems.append(f"{closes} closes traced for {accepted} connections accepted")
        what = f"{closes} closes for {accepted} accepted (accepts inside io_uring are not traced)"
    names = (_CALL.match(line) for line in trace.output.splitlines())
    calls = Counter(m["call"] for m in names if m)
    traced = ", ".join(f"{name} {n}" for name, n in calls.most_common())
    if problems:
        detail = "; ".join(problems) + "".join(f"\n          {e}" for e in seen.examples)
        return Outcome(backend, False, detail)
    return Outcome(backend, True, f"{churned['frames']} churned connections: 0 EBADF, {what} ({traced})")

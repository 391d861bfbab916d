"""A server in a child process, and the leak guard around a server: the one home of both.

`ServeProcess` runs any server command (`connlab serve`, or someone else's): it is ready when it
prints a host:port on any line or, given the port, when that port accepts a connection; its
stdout and stderr are always drained (a server that logs must never block on a full pipe); it is
stopped by SIGTERM and waited for by its exit, not by the end of its output, which children of a
process-per-connection server keep open; and whatever it leaves behind in its process group is
killed when it is closed.

`LeakGuard` takes a server's fds and threads (over its process tree) and checks them again, with
the CLOSE_WAIT sockets on its port, once the clients are gone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from connlab import probe

__all__ = [
    "LeakGuard",
    "ServeProcess",
    "StartError",
    "Stopped",
    "accepts",
    "connlab_serve_argv",
    "parse_address",
]

#: Output lines kept per server, for error messages.
TAIL_LINES = 50

#: The signal that stops a server; dying by its default action is a normal stop.
STOP_SIGNALS = frozenset({signal.SIGTERM})


class StartError(RuntimeError):
    """The server did not come up: the message says what was waited for and what it printed."""


@dataclass(frozen=True)
class Stopped:
    """How a server process ended after `ServeProcess.stop`."""

    #: Popen's return code: the exit status, or minus the signal that ended it.
    returncode: int | None
    #: Seconds from the SIGTERM to the exit.
    elapsed_s: float
    #: The `{"event": "stopped", ...}` line `connlab serve` prints (drained, forced...), if any.
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def normal(self) -> bool:
        """Exit status 0, death by a stop signal's default action (-15), or the shell's form of
        it (128 + 15): a server that stops when told to."""
        code = self.returncode
        if code is None:
            return False
        if code < 0:
            return -code in STOP_SIGNALS
        return code == 0 or (code > 128 and code - 128 in STOP_SIGNALS)

    def describe(self) -> str:
        code = self.returncode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


def connlab_serve_argv(backend: str, **server_kwargs: Any) -> list[str]:
    """The command line of `connlab serve` for `connlab.Server` keyword arguments (None → 0)."""
    argv = [sys.executable, "-m", "connlab", "serve", "--backend", backend]
    for key, value in server_kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(0 if value is None else value)]
    if "port" not in server_kwargs:
        argv += ["--port", "0"]
    return argv


def connlab_proxy_argv(upstream: tuple[str, int], *toxics: str) -> list[str]:
    """The command line of `connlab proxy` in front of `upstream`, listening on a free loopback
    port, with toxics in the command-line form (`latency:downstream:latency=50`)."""
    argv = [sys.executable, "-m", "connlab", "proxy", "--upstream", f"{upstream[0]}:{upstream[1]}"]
    for toxic in toxics:
        argv += ["--toxic", toxic]
    return argv


def parse_address(line: str) -> tuple[str, int] | None:
    """host:port from one line a server printed: `connlab serve`'s JSON, or any text with a
    HOST:PORT word in it (`listening on 127.0.0.1:8080`, `[::1]:9000`); None if it has none."""
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict) and "address" in event:
            line = str(event["address"])
    for word in line.replace(",", " ").split():
        host, sep, port = word.strip("\"'()").rstrip(".;").rpartition(":")
        host = host.strip("[]")
        if sep and port.isdigit() and 0 < int(port) < 65536 and _is_host(host):
            return host, int(port)
    return None


def _is_host(text: str) -> bool:
    if text in ("localhost", "0.0.0.0", "::"):
        return True
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            socket.inet_pton(family, text)
            return True
    return False


def accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether `host`:`port` accepts a TCP connection within `timeout` s (closed again at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


# Servers not yet closed, killed at exit if a caller forgot (or was interrupted before) `close`.
_LIVE: weakref.WeakSet[ServeProcess] = weakref.WeakSet()


class ServeProcess:
    """A server command in a child process, in a process group of its own.

    Ready when it prints an address on any line of stdout or stderr or, with `port` (the port it
    was told to use), when `host`:`port` or a printed address with that port accepts a
    connection, within `start_timeout` seconds; else `StartError` naming what was waited for and
    its last output lines, and nothing is left running.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 10.0,
        nofile: int | None = None,
    ) -> None:
        self.argv = argv
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        #: JSON objects it printed on stdout (`connlab serve`'s listening and stopped events).
        self.events: list[dict[str, Any]] = []
        self._printed: tuple[str, int] | None = None
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self.stopped: Stopped | None = None
        try:
            self.child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as err:
            raise StartError(f"cannot run {shlex.join(argv)}: {err}") from None
        self.pid = self.child.pid
        _LIVE.add(self)
        if nofile is not None:
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        self._reader = threading.Thread(target=self._drain, name=f"serve-{self.pid}-output", daemon=True)
        self._reader.start()
        try:
            self.address = self._wait_ready(host, port, start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, host: str, port: int | None, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                printed = self._printed
            if port is None and printed is not None:
                return printed
            # Told its port: a printed address counts only with that port (a log line may name
            # another service), and only once it accepts (it may be printed before the listen).
            if port is not None and printed is not None and printed[1] == port and accepts(*printed):
                return printed
            if port is not None and accepts(host, port):
                return host, port
            if self.child.poll() is not None:
                raise StartError(
                    f"server exited ({Stopped(self.child.returncode, 0).describe()}) before it was "
                    f"ready: {shlex.join(self.argv)}{self._tail_text()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                waited = "no line with its host:port"
                if port is not None:
                    waited = f"neither a line with its host:port nor a connection accepted on {host}:{port}"
                raise StartError(
                    f"{waited} within {timeout:g} s (--start-timeout): {shlex.join(self.argv)}"
                    + self._tail_text()
                )
            with self._cond:
                self._cond.wait(min(left, 0.02))

    def _tail_text(self, n: int = 10) -> str:
        tail = self.tail(n)
        return "; its last output: " + " | ".join(tail) if tail else "; it printed nothing"

    def tail(self, n: int = 10) -> list[str]:
        """The last `n` lines it printed (stdout and stderr interleaved as read)."""
        with self._cond:
            return list(self.lines)[-n:]

    def _drain(self) -> None:
        """Reads both pipes until they close or the process is closed: a full pipe would block
        a server that logs; lines are kept (the last ones), addresses and JSON events parsed."""
        assert self.child.stdout is not None and self.child.stderr is not None
        partial = {self.child.stdout.fileno(): b"", self.child.stderr.fileno(): b""}
        stdout = self.child.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            for fd in partial:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() and not self._closing.is_set():
                for key, _ in sel.select(0.1):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        chunk = b"\n" if partial[fd] else b""
                    *whole, partial[fd] = (partial[fd] + chunk).split(b"\n")
                    if len(partial[fd]) > 4096:  # a line without end: keep it bounded
                        whole.append(partial[fd])
                        partial[fd] = b""
                    for raw in whole:
                        self._line(raw.decode(errors="replace").rstrip("\r"), fd == stdout)

    def _line(self, line: str, stdout: bool) -> None:
        with self._cond:
            self.lines.append(line)
            if stdout and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        self.events.append(event)
            if self._printed is None:
                self._printed = parse_address(line)
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self.child.poll() is None

    def stop(self, timeout: float = 10.0) -> Stopped:
        """SIGTERM, then waits up to `timeout` s for the process to exit (not for its output to
        end: children it forked may hold that open). SIGKILL if it has not exited by then."""
        if self.stopped is not None:
            return self.stopped
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            if self.alive:
                self.child.send_signal(signal.SIGTERM)
        try:
            self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        elapsed = time.monotonic() - started
        report: dict[str, Any] = {}
        # Its last lines may still be in the pipe: the reader ends at the pipe's end, unless
        # children it forked hold the pipe open; give it a moment, not more.
        self._reader.join(0.2)
        for event in self.events:
            if event.get("event") == "stopped":
                report = event
        self.stopped = Stopped(self.child.returncode, elapsed, report)
        return self.stopped

    def wait_exit(self, timeout: float) -> Stopped:
        """Waits up to `timeout` s for the process to exit by itself (a server that handed its
        listener off exits once drained), then stops it as `stop` does if it has not."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=timeout)
        return self.stop()

    def kill(self) -> None:
        """SIGKILL to the whole process group: the server and anything it forked."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.child.kill()
        self.child.wait()

    def close(self) -> None:
        """Stops it if still running (SIGTERM, 5 s, SIGKILL), kills what is left of its process
        group (children of a process-per-connection server), and closes the pipes."""
        if self.alive:
            self.stop(timeout=5.0)
        self.kill()
        self._closing.set()
        self._reader.join(1.0)
        for stream in (self.child.stdout, self.child.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        _LIVE.discard(self)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(OSError):
            os.killpg(server.pid, signal.SIGKILL)


@dataclass
class LeakGuard:
    """Fds and native threads of a server's process tree (`pid` and its descendants: a server
    that forks per connection is counted whole), and CLOSE_WAIT sockets on its port."""

    pid: int | None
    fds: int | None = None
    threads: int | None = None

    def counts(self) -> tuple[int, int]:
        """(fds, threads) summed over the process tree now."""
        assert self.pid is not None
        fds = threads = 0
        for pid in probe.process_tree(self.pid):
            with contextlib.suppress(ProcessLookupError):
                fds += probe.fd_count(pid)
                threads += probe.thread_count(pid)
        return fds, threads

    def baseline(self, settle: float = 0.0, limit: float = 3.0) -> None:
        """Takes the counts; with `settle`, once they have not changed for `settle` s (at most
        `limit` s): a server may still be opening fds or threads after it printed its address."""
        if self.pid is None:
            return
        deadline = time.monotonic() + limit
        self.fds, self.threads = self.counts()
        since = time.monotonic()
        while time.monotonic() - since < settle and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.counts()
            if now != (self.fds, self.threads):
                self.fds, self.threads = now
                since = time.monotonic()

    def check(self, port: int | None, timeout: float = 2.0) -> list[str]:
        """Polls until fds and threads are back and no CLOSE_WAIT is left; returns what is not.
        Fewer fds or threads than at the baseline is no leak (a server that finished starting
        after its address line, or released a cache)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = []
            if self.pid is not None and self.fds is not None and self.threads is not None:
                try:
                    fds, threads = self.counts()
                except ProcessLookupError:
                    fds, threads = self.fds, self.threads  # it exited: nothing of it is left to leak
                if fds > self.fds:
                    problems.append(f"fds {self.fds} -> {fds}")
                if threads > self.threads:
                    problems.append(f"threads {self.threads} -> {threads}")
            if port is not None and (cw := probe.port_view(port).close_wait):
                problems.append(f"{cw} CLOSE_WAIT on port {port}")
            if not problems or time.monotonic() >= deadline:
                return problems
            time.sleep(0.01)

"""The matrix's machinery: scenarios, targets, the per-scenario context, budgets and grades."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from connlab import probe
from connlab._native import BACKENDS, Server, unavailable
from connlab.client import connect
from connlab.process import LeakGuard, ServeProcess, Stopped, accepts, connlab_serve_argv
from connlab.proxy import Proxy

IN_PROCESS = "in-process"
COMMAND = "command"
EXTERNAL = "external"
EXTERNAL_PID = "external+pid"
ALL_KINDS = frozenset({IN_PROCESS, COMMAND, EXTERNAL, EXTERNAL_PID})

#: The grades of a verdict, as Autobahn grades: a MUST of the lifecycle broken, a SHOULD missed
#: (a claimed timeout that fires late), a feature the server never claimed, a pass; and a row
#: this target cannot run (no pid, cannot be stopped).
PASS, FAIL, WARN, NA, SKIP = "pass", "fail", "warn", "n/a", "skip"
STATUSES = (PASS, FAIL, WARN, NA, SKIP)

#: Features a server may claim; a row that tests one the server does not claim is n/a.
#: `framing`: it parses frames (a byte echo answers half a frame byte for byte).
FEATURES = ("idle_timeout", "read_timeout", "write_timeout", "max_frame", "framing")


H = TypeVar("H", bound="Handle")

#: A server in another process has finished starting when its fds and threads have not changed
#: for this long (it may open some just after printing its address).
SETTLE = 0.5


class Skip(Exception):
    """The scenario cannot run on this target (it needs a pid, or a server the matrix starts)."""


class NotApplicable(Exception):
    """The scenario tests a feature the server does not claim; the message says which."""


class Failed(AssertionError):
    """A check of the scenario did not hold; the message says which and what was seen."""


class TimedOut(Exception):
    """The scenario ran past its time budget."""


def check(condition: object, message: str) -> None:
    """Fails the scenario with `message` unless `condition` holds."""
    if not condition:
        raise Failed(message)


@dataclass(frozen=True)
class Options:
    """What the scenarios know of the server. For in-process backends and `connlab serve` these
    are applied; for someone else's server they are its claims: a timeout of None (`none` on the
    command line) or `max_frame` None says it has none, `byte_echo` that it echoes bytes without
    framing. `option_prefix` is how the front end spells its options ("--" for `connlab matrix`,
    "--connlab-" for the pytest plugin), so a message can name the one to change."""

    idle_timeout: float | None = 0.5
    read_timeout: float | None = 0.5
    write_timeout: float | None = 0.5
    max_frame: int | None = 1 << 20
    max_pending_output: int = 4 << 20
    max_connections: int | None = None
    workers: int = 2
    byte_echo: bool = False
    start_timeout: float = 10.0
    budget_scale: float = 1.0
    option_prefix: str = "--"

    def server_kwargs(self) -> dict[str, Any]:
        """`connlab.Server` keyword arguments (a timeout of None is 0, disabled; no max_frame
        leaves the server's own)."""
        kwargs: dict[str, Any] = {
            "idle_timeout": self.idle_timeout or 0,
            "read_timeout": self.read_timeout or 0,
            "write_timeout": self.write_timeout or 0,
            "max_pending_output": self.max_pending_output,
            "workers": self.workers,
        }
        if self.max_frame is not None:
            kwargs["max_frame"] = self.max_frame
        if self.max_connections is not None:
            kwargs["max_connections"] = self.max_connections
        return kwargs

    def claims(self, feature: str) -> bool:
        """Whether the server implements `feature` (one of `FEATURES`)."""
        if feature == "framing":
            return not self.byte_echo
        if feature == "max_frame":
            return self.max_frame is not None and not self.byte_echo
        return bool(getattr(self, feature))

    def unclaimed(self, feature: str) -> str:
        """Why a row needing `feature` is n/a, naming the option that would claim it."""
        if feature == "framing" or (feature == "max_frame" and self.byte_echo):
            return f"the server echoes bytes without framing ({self.option_prefix}byte-echo)"
        option = f"{self.option_prefix}{feature.replace('_', '-')}"
        return f"the server claims no {feature.replace('_', ' ')} ({option} none)"

    def option(self, feature: str) -> str:
        """The command-line option that states `feature`'s value."""
        return f"{self.option_prefix}{feature.replace('_', '-')}"


#: The timeouts and max_frame the matrix applies to the servers it configures (in-process
#: backends): short, so the matrix stays fast.
CONFIGURED = {"idle_timeout": 0.5, "read_timeout": 0.5, "write_timeout": 0.5, "max_frame": 1 << 20}


def parse_backends(text: str) -> list[str]:
    """`all`, or backend names separated by commas (repeats dropped), each one of `BACKENDS`.
    Raises ValueError naming the unknown ones and the available ones."""
    if text.strip() == "all":
        return list(BACKENDS)
    names = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    if not names:
        raise ValueError(f"expected all or a,b; available: {', '.join(BACKENDS)}")
    if unknown := [n for n in names if n not in BACKENDS]:
        raise ValueError(f"unknown backends {', '.join(unknown)}; available: {', '.join(BACKENDS)}")
    return names


def parse_claim(feature: str, text: str) -> float | int | None:
    """A claim from the command line: `none` (the server has no such feature), or a number of
    seconds (a timeout) or bytes (max_frame) > 0. Raises ValueError with a message."""
    if text.strip().lower() == "none":
        return None
    kind = int if feature == "max_frame" else float
    try:
        value = kind(text)
    except ValueError:
        unit = "bytes" if kind is int else "seconds"
        raise ValueError(f"expected a number of {unit} or none, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"must be > 0 (or none), got {text}")
    return value


def options_for(in_process: bool, claims: dict[str, Any], **rest: Any) -> Options:
    """Options from what the user stated: `claims` maps a feature of `CONFIGURED` to its value
    (None: the server has none); one not stated is `CONFIGURED`'s for a server the matrix
    configures, and unclaimed (n/a) for any other, whose settings the matrix cannot know."""
    resolved = {k: claims.get(k, v if in_process else None) for k, v in CONFIGURED.items()}
    return Options(**resolved, **rest)


class Handle:
    """One running server, as a scenario sees it. Server-side views (stats, journal,
    connections) are None when the target cannot give them."""

    address: tuple[str, int]
    pid: int | None
    kwargs: dict[str, Any]

    @property
    def port(self) -> int:
        """The server's own port (where the kernel shows its sockets)."""
        return self.address[1]

    def stats(self) -> dict[str, Any] | None:
        return None

    def transitions(self, peer: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]] | None:
        return None

    def connections(self) -> list[dict[str, Any]] | None:
        return None

    def stop(self, grace: float = 1.0) -> dict[str, Any]:
        raise Skip("this target cannot be stopped by the matrix")

    @property
    def stoppable(self) -> bool:
        return False

    def close(self) -> None:
        """Stops it if the matrix started it (end of scenario)."""

    def kill(self) -> None:
        """Ends it at once if the matrix started it (a scenario past its budget)."""
        self.close()


class InProcessHandle(Handle):
    """A `connlab.Server` in this process."""

    def __init__(self, backend: str, kwargs: dict[str, Any]) -> None:
        self.server = Server(backend, **kwargs)
        self.address = self.server.address
        self.pid = os.getpid()
        self.kwargs = kwargs

    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    def transitions(self, peer: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        return self.server.transitions(peer)

    def connections(self) -> list[dict[str, Any]]:
        return self.server.connections()

    def stop(self, grace: float = 1.0) -> dict[str, Any]:
        return self.server.stop(grace)

    @property
    def stoppable(self) -> bool:
        return True

    def close(self) -> None:
        self.server.stop(0)


class ChildHandle(Handle):
    """A server process the matrix launched (`connlab serve` or a `--serve-cmd`): ready when it
    prints its host:port or its `{port}` accepts; SIGTERM asks it to stop. `control` is the path
    of its handoff control socket (the command's `{control}`), in a directory of its own that goes
    with the handle."""

    def __init__(
        self,
        argv: list[str],
        kwargs: dict[str, Any],
        *,
        port: int | None = None,
        nofile: int | None = None,
        start_timeout: float = 10.0,
        control: str | None = None,
    ) -> None:
        self.kwargs = kwargs
        self.control = control
        try:
            self.process = ServeProcess(argv, port=port, nofile=nofile, start_timeout=start_timeout)
        except BaseException:
            self._remove_control()
            raise
        self.pid = self.process.pid
        self.address = self.process.address

    def _remove_control(self) -> None:
        if self.control is not None:
            shutil.rmtree(os.path.dirname(self.control), ignore_errors=True)

    def stop(self, grace: float = 1.0) -> dict[str, Any]:
        """SIGTERM, then waits for the exit (`connlab serve` reports drained/forced): the report
        has "exit" (how it ended), "normal" (an exit 0 or by SIGTERM) and "elapsed_s"."""
        stopped = self.process.stop(timeout=grace + 10)
        return {
            **stopped.report,
            "exit": stopped.describe(),
            "normal": stopped.normal,
            "elapsed_s": stopped.report.get("elapsed_s", stopped.elapsed_s),
        }

    @property
    def stopped(self) -> Stopped | None:
        return self.process.stopped

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def stoppable(self) -> bool:
        return True

    def close(self) -> None:
        self.process.close()
        self._remove_control()

    def kill(self) -> None:
        self.process.kill()
        self.close()


class ProxiedHandle(Handle):
    """A server seen through a fault-injecting proxy: clients connect to the proxy. Its counters
    are the server's; its journal and `connections()` are not offered, since the server sees the
    proxy's sockets, not the clients'."""

    def __init__(self, inner: Handle, proxy: Proxy) -> None:
        self.inner = inner
        self.address = proxy.address
        self.pid = inner.pid
        self.kwargs = inner.kwargs

    @property
    def port(self) -> int:
        return self.inner.port

    def stats(self) -> dict[str, Any] | None:
        return self.inner.stats()

    def stop(self, grace: float = 1.0) -> dict[str, Any]:
        return self.inner.stop(grace)

    @property
    def stoppable(self) -> bool:
        return self.inner.stoppable


class ExternalHandle(Handle):
    """Someone else's running server: reachable, maybe with a pid, never stopped by the matrix."""

    def __init__(self, address: tuple[str, int], pid: int | None, kwargs: dict[str, Any]) -> None:
        self.address = address
        self.pid = pid
        self.kwargs = kwargs


@dataclass(frozen=True)
class Target:
    """What the matrix runs against: an in-process backend, a command it launches, or an
    external address (with an optional pid). A command may take `{port}` (a free port) and
    `{control}` (the path of its handoff control socket); `handoff` is then the command of a
    successor that takes the listener over from the control socket at its `{control}`."""

    name: str
    kind: str
    backend: str | None = None
    command: str | None = None
    address: tuple[str, int] | None = None
    pid: int | None = None
    handoff: str | None = None

    @classmethod
    def in_process(cls, backend: str) -> Target:
        return cls(name=backend, kind=IN_PROCESS, backend=backend)

    @classmethod
    def from_command(cls, command: str, name: str | None = None, handoff: str | None = None) -> Target:
        """Raises ValueError when `handoff` has no `{control}`: the successor could not find the
        server it takes over from."""
        if handoff is not None and "{control}" not in handoff:
            raise ValueError(
                f"the successor's command must take the control socket's path as {{control}}: {handoff!r}"
            )
        return cls(name=name or "command", kind=COMMAND, command=command, handoff=handoff)

    @classmethod
    def external(cls, address: str, pid: int | None = None, name: str | None = None) -> Target:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target: expected HOST:PORT, got {address!r}")
        return cls(
            name=name or address,
            kind=EXTERNAL_PID if pid else EXTERNAL,
            address=(host.strip("[]"), int(port)),
            pid=pid,
        )

    def unavailable(self) -> str | None:
        """Why this in-process backend cannot run on this machine (e.g. `uring` where io_uring is
        disabled), or None: its rows are then skipped with that reason rather than failed."""
        return backend_unavailable(self.backend) if self.backend is not None else None

    def reachable(self) -> str | None:
        """None if an external target can be tested (or this is no external target); else why
        not, for one up-front error instead of a failure per row: it must accept connections, be
        on this machine (the checks read this kernel's sockets) and, with a pid, be a process
        whose fds this user can read."""
        if self.address is None:
            return None
        host, port = self.address
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.bind((host, 0))
        except OSError:
            return f"{host} is not an address of this machine: the matrix reads this kernel's sockets"
        try:
            if not accepts(host, port, timeout=2.0):
                return f"{host}:{port} refuses connections"
        except OSError as err:
            return f"{host}:{port}: {err}"
        return None if self.pid is None else _unreadable(self.pid)

    def start(self, options: Options, overrides: dict[str, Any]) -> Handle:
        """A server for one scenario. In-process and command targets start a fresh one; an
        external one is used as it is, if the overrides the scenario needs match what it is."""
        kwargs = {**self.claimed(options), **overrides}
        if self.kind == IN_PROCESS:
            assert self.backend is not None
            return InProcessHandle(self.backend, kwargs)
        if self.kind == COMMAND:
            _require_defaults(overrides, options, "the server command is run as given")
            return self.child(options, overrides)
        _require_defaults(overrides, options, "an external server is used as it is")
        assert self.address is not None
        return ExternalHandle(self.address, self.pid, kwargs)

    def claimed(self, options: Options) -> dict[str, Any]:
        """What the scenarios read of the server's settings: applied to in-process servers, the
        claims (None where it has none) for any other."""
        if self.kind == IN_PROCESS:
            return options.server_kwargs()
        claims = {f: getattr(options, f) for f in ("idle_timeout", "read_timeout", "write_timeout")}
        return {**options.server_kwargs(), **claims, "max_frame": options.max_frame}

    def child(self, options: Options, overrides: dict[str, Any], nofile: int | None = None) -> ChildHandle:
        """A server of this target in a child process (P3, L2; every row of a command target)."""
        kwargs = {**self.claimed(options), **overrides}
        if self.kind == IN_PROCESS:
            argv = connlab_serve_argv(str(self.backend), **options.server_kwargs(), **overrides)
            return ChildHandle(argv, kwargs, nofile=nofile, start_timeout=options.start_timeout)
        if self.kind == COMMAND:
            _require_defaults(overrides, options, "the server command is run as given")
            assert self.command is not None
            return command_handle(self.command, kwargs, options, nofile=nofile)
        raise Skip("needs the server in a child process: give --serve-cmd instead of --target")


def _unreadable(pid: int) -> str | None:
    """Why the fds of process `pid` cannot be counted, or None if they can."""
    try:
        probe.socket_inodes(pid)
    except ProcessLookupError:
        return f"--pid {pid}: no such process"
    except PermissionError:
        return f"--pid {pid}: its fds cannot be read by this user"
    return None


def command_handle(
    command: str, kwargs: dict[str, Any], options: Options, port: int | None = None, nofile: int | None = None
) -> ChildHandle:
    """A server command launched once: `{port}` in it is `port` (a free one by default), and the
    server is ready when it prints its address or that port accepts; `{control}` is a path in a
    fresh directory (removed with the handle), for its handoff control socket."""
    control = None
    if "{control}" in command:
        control = os.path.join(tempfile.mkdtemp(prefix="connlab-control-"), "control.sock")
        command = command.replace("{control}", shlex.quote(control))
    if "{port}" in command:
        port = free_port() if port is None else port
        command = command.replace("{port}", str(port))
    else:
        port = None
    argv = shlex.split(command)
    return ChildHandle(
        argv, kwargs, port=port, nofile=nofile, start_timeout=options.start_timeout, control=control
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice for an ephemeral bind)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _require_defaults(overrides: dict[str, Any], options: Options, why: str) -> None:
    """Skips when a scenario needs a setting the server cannot be given."""
    defaults = options.server_kwargs()
    differing = {k: v for k, v in overrides.items() if defaults.get(k) != v}
    if differing:
        wanted = ", ".join(f"{k}={v}" for k, v in differing.items())
        raise Skip(f"needs {wanted}; {why} (pass matching options to run it)")


@dataclass
class Context:
    """What a scenario works with: the target, the options, servers and clients it opens
    (closed at its end), notes on checks it skipped, and the SHOULDs it saw missed."""

    target: Target
    options: Options
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    guards: list[tuple[LeakGuard, Handle]] = field(default_factory=list)
    #: Fault-injecting proxies the scenario put in front of its servers (closed at its end).
    proxies: list[Proxy] = field(default_factory=list)
    #: Toxics every server of this scenario is seen through (`server()` puts a proxy in front),
    #: as `Proxy.add_toxic` keyword arguments, and the delay they add to a timed close, in s.
    via: tuple[dict[str, Any], ...] = ()
    delay: float = 0.0
    #: Set when the row is aborted: long loops (churn) end at their next step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    _started_s: float = 0.0
    _starting_since: float | None = None

    def server(self, **overrides: Any) -> Handle:
        """A server for this scenario, inside the leak guard."""
        in_process = self.target.kind == IN_PROCESS
        guard = LeakGuard(pid=os.getpid() if in_process else self.target.pid)
        if in_process:
            guard.baseline()  # before the server starts
        handle = self.starting(lambda: self.target.start(self.options, overrides))
        if not in_process:
            guard.pid = handle.pid
            guard.baseline(settle=SETTLE)  # once the server has finished starting
        self.guards.append((guard, handle))
        if not self.via:
            return handle
        proxy = self.proxy(handle)
        for toxic in self.via:
            proxy.add_toxic(**toxic)
        return ProxiedHandle(handle, proxy)

    def child_server(self, overrides: dict[str, Any], nofile: int | None = None) -> ChildHandle:
        """The target's server in a child process (`Target.child`), inside the leak guard: its
        fds and threads right after start are the baseline, checked again before it is stopped."""
        handle = self.starting(lambda: self.target.child(self.options, overrides, nofile=nofile))
        guard = LeakGuard(pid=handle.pid)
        self.guards.append((guard, handle))
        guard.baseline(settle=SETTLE)
        return handle

    def starting(self, start: Callable[[], H]) -> H:
        """Starts a server (`start()`), outside the row's budget; it is the row's from then on,
        ended with it (or at once, if the row was aborted meanwhile)."""
        self.check_cancelled()
        self._starting_since = time.monotonic()
        try:
            handle = start()
        finally:
            self._started_s += time.monotonic() - self._starting_since
            self._starting_since = None
        self.handles.append(handle)
        if self.cancelled.is_set():
            handle.kill()  # started after `abort` ended the others: nothing else would end it
        self.check_cancelled()
        return handle

    def starting_s(self) -> float:
        """Seconds the row has spent starting servers so far (the one starting now included)."""
        since = self._starting_since
        return self._started_s + (time.monotonic() - since if since is not None else 0.0)

    def check_cancelled(self) -> None:
        """Ends a row that was aborted (past its budget) at its next step."""
        if self.cancelled.is_set():
            raise Failed("the row was aborted")

    def proxy(self, handle: Handle, seed: int | None = None) -> Proxy:
        """A `connlab.proxy.Proxy` in front of `handle`, closed at the end of the scenario
        (before the leak guards look: it runs in this process)."""
        proxy = Proxy(handle.address, seed=seed)
        self.proxies.append(proxy)
        return proxy

    def guard_of(self, handle: Handle) -> LeakGuard:
        """The leak guard put around `handle`."""
        return next(guard for guard, h in self.guards if h is handle)

    def connect(self, handle: Handle, timeout: float = 5.0) -> socket.socket:
        sock = connect(handle.address, timeout=timeout)
        self.sockets.append(sock)
        return sock

    def stats(self, handle: Handle, what: str) -> dict[str, Any] | None:
        """The server's stats, or None with a note that `what` was not checked."""
        stats = handle.stats()
        if stats is None:
            self.note(f"{what}: not checked (no server stats on a {self.target.kind} target)")
        return stats

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def should(self, condition: object, message: str) -> None:
        """A SHOULD of the lifecycle: when it does not hold the row is a warning, not a failure,
        and the scenario goes on."""
        if not condition and message not in self.warnings:
            self.warnings.append(message)

    def requires(self, *features: str) -> None:
        """n/a unless the server claims every one of `features` (see `Options.claims`)."""
        for feature in features:
            if not self.options.claims(feature):
                raise NotApplicable(self.options.unclaimed(feature))

    def finish(self) -> list[str]:
        """Closes the scenario's clients, stops what it started, and runs the leak guards."""
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()
        for proxy in self.proxies:
            proxy.close()
        problems = []
        # The latest server first: a successor that took over a listener is gone before its
        # incumbent's guard (taken before either started) counts the process.
        for guard, handle in reversed(self.guards):
            if isinstance(handle, ChildHandle):
                # A child is checked while it runs (it is gone after), once clients are closed; one
                # the scenario stopped itself has no fds or threads left to count.
                if not handle.alive:
                    guard.pid = None
                problems += guard.check(handle.address[1])
                handle.close()
            elif isinstance(handle, InProcessHandle):
                handle.close()
                problems += guard.check(handle.address[1])
            else:
                if guard.pid is None:
                    self.note("fd/thread leak check: not done (no --pid for the external server)")
                problems += guard.check(handle.address[1])
        return problems

    def abort(self) -> None:
        """After the budget ran out: ends every server the scenario started at once and closes
        its clients, so its thread fails out of whatever it waits for."""
        self.cancelled.set()
        for proxy in self.proxies:
            with suppress(Exception):
                proxy.close()
        for handle in self.handles:
            with suppress(Exception):
                handle.kill()
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()


ScenarioFn = Callable[[Context], None]


@dataclass(frozen=True)
class Scenario:
    """One row of the lifecycle matrix. `budget` is its time budget in seconds on a healthy
    server (scaled by `Options.budget_scale`); `needs` the features it tests, n/a unless claimed."""

    id: str
    category: str
    description: str
    kinds: frozenset[str]
    run: ScenarioFn
    budget: float
    needs: frozenset[str] = frozenset()
    waits: frozenset[str] = frozenset()

    def budget_for(self, options: Options) -> float:
        """Seconds the row may run, server start-up aside: its budget scaled, never under 1 s,
        plus three times the longest claimed timeout it waits for (a close at up to 2T + 0.25 s)."""
        longest = max((float(getattr(options, w) or 0) for w in self.waits), default=0.0)
        return max(1.0, self.budget * options.budget_scale) + 3 * longest

    def applies_to(self, target: Target) -> str | None:
        """None if it applies; else why not."""
        if target.kind in self.kinds:
            return None
        needs = " or ".join(sorted(self.kinds))
        return f"{self.id} needs a {needs} target"


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    id: str,
    category: str,
    description: str,
    *,
    budget: float,
    kinds: frozenset[str] = ALL_KINDS,
    needs: tuple[str, ...] = (),
    waits: tuple[str, ...] = (),
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Registers a scenario function under its MATRIX.md id."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if id in SCENARIOS:
            raise ValueError(f"scenario {id} defined twice")
        unknown = set(needs) - set(FEATURES)
        if unknown:
            raise ValueError(f"scenario {id}: unknown features {unknown}")
        SCENARIOS[id] = Scenario(
            id, category, description, frozenset(kinds), fn, budget, frozenset(needs), frozenset(waits)
        )
        return fn

    return register


@dataclass(frozen=True)
class Result:
    """The outcome of one scenario on one target: one of `STATUSES`."""

    scenario: str
    target: str
    status: str
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "target": self.target,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Repeated(Result):
    """One scenario on one target over several rounds (`runs`, in round order): it failed if it
    failed in any round, else warned if it warned in any; it is n/a or a skip only if every round
    was. `seconds` is the total."""

    runs: tuple[Result, ...] = ()

    @classmethod
    def of(cls, runs: list[Result]) -> Repeated:
        worst = next((s for s in (FAIL, WARN) if any(r.status == s for r in runs)), None)
        first = runs[0]
        if worst is not None:
            status = worst
            details = [f"round {i}: {r.detail}" for i, r in enumerate(runs, 1) if r.status == worst]
        elif all(r.status == first.status for r in runs) and first.status in (NA, SKIP):
            status, details = first.status, list(dict.fromkeys(r.detail for r in runs))
        else:
            notes = dict.fromkeys(r.detail for r in runs if r.status == PASS and r.detail)
            others = [f"round {i} {r.status}: {r.detail}" for i, r in enumerate(runs, 1) if r.status != PASS]
            status, details = PASS, [*notes, *others]
        total = sum(r.seconds for r in runs)
        return cls(first.scenario, first.target, status, total, "; ".join(details), tuple(runs))

    def rounds_with(self, status: str) -> list[int]:
        """The round numbers (from 1) in which it had `status`."""
        return [i for i, r in enumerate(self.runs, 1) if r.status == status]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "failed_rounds": len(self.rounds_with(FAIL))}


@functools.cache
def backend_unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine, or None; asked once per process."""
    why = unavailable(backend)
    return None if why is None else f"{backend} is unavailable here: {why}"


def repeated(rounds: list[list[Result]]) -> list[Repeated]:
    """Each scenario on each target over `rounds` (each round's results in the same order)."""
    runs: dict[tuple[str, str], list[Result]] = {}
    for results in rounds:
        for r in results:
            runs.setdefault((r.scenario, r.target), []).append(r)
    return [Repeated.of(mine) for mine in runs.values()]


def run_one(sc: Scenario, target: Target, options: Options) -> Result:
    """Runs one scenario on one target, inside its leak guard and its time budget; never raises
    but for KeyboardInterrupt (after ending what the scenario started)."""
    started = time.monotonic()
    why_not = target.unavailable() or sc.applies_to(target)
    if why_not:
        return Result(sc.id, target.name, SKIP, 0.0, why_not)
    for feature in sorted(sc.needs):
        if not options.claims(feature):
            return Result(sc.id, target.name, NA, 0.0, options.unclaimed(feature))
    ctx = Context(target=target, options=options)
    outcome: list[tuple[str, str, list[str]]] = []
    worker = threading.Thread(
        target=lambda: outcome.append(run_in_guard(sc, ctx)), name=f"matrix-{sc.id}", daemon=True
    )
    budget = sc.budget_for(options)
    worker.start()
    try:
        # The budget's clock stands still while a server starts: --start-timeout bounds that.
        while worker.is_alive() and time.monotonic() - started - ctx.starting_s() < budget:
            worker.join(0.05)
    except BaseException:  # Ctrl-C or SIGTERM: leave nothing running behind
        ctx.abort()
        worker.join(5.0)
        raise
    if worker.is_alive():
        where = _where(worker)
        ctx.abort()
        worker.join(10.0)
        killed = "; its servers were killed" if any(h.stoppable for h in ctx.handles) else ""
        detail = f"timed out after {budget:.3g} s in {where}{killed}"
        detail += f" ({ctx.options.option('scenario_timeout')} scales the budget)"
        if worker.is_alive():
            detail += "; the scenario's thread did not end within 10 s of it"
        return Result(sc.id, target.name, FAIL, time.monotonic() - started, detail)
    status, detail, leaks = outcome[0]
    if leaks and status not in (SKIP, NA):
        status = FAIL
        detail = "; ".join([detail, "leak: " + ", ".join(leaks)] if detail else ["leak: " + ", ".join(leaks)])
    if status == PASS and ctx.warnings:
        status, detail = WARN, "; ".join(ctx.warnings)
    elif status == PASS and ctx.notes:
        detail = "; ".join(ctx.notes)
    return Result(sc.id, target.name, status, time.monotonic() - started, detail)


def run_in_guard(sc: Scenario, ctx: Context) -> tuple[str, str, list[str]]:
    """The scenario, then its clean-up and leak guards, on the scenario's own thread (so a thread
    of the matrix never counts as one of an in-process server's)."""
    status, detail = PASS, ""
    try:
        sc.run(ctx)
    except Skip as skip:
        status, detail = SKIP, str(skip)
    except NotApplicable as na:
        status, detail = NA, str(na)
    except Failed as failure:
        status, detail = FAIL, f"Failed: {failure}"
    except Exception as error:  # an assertion, a socket timeout, an error: say where it came from
        status, detail = FAIL, f"{type(error).__name__}: {error} (in {_steps(error.__traceback__)})"
    try:
        leaks = ctx.finish()
    except Exception as error:
        leaks = [f"cleanup failed: {type(error).__name__}: {error}"]
    return status, detail, leaks


#: The connlab package's directory: frames in it are steps of a scenario.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _where(thread: threading.Thread) -> str:
    """The step a scenario's thread is in: its innermost frames in connlab code."""
    frame = sys._current_frames().get(thread.ident or -1)
    return _steps(traceback.walk_stack(frame)) if frame is not None else "an unknown step"


def _steps(frames: Any) -> str:
    """ "read_frame (client.py:50) < c2 (halfclose.py:80)": the innermost three frames in connlab
    code of a traceback or of `traceback.walk_stack` (innermost first)."""
    if isinstance(frames, types.TracebackType) or frames is None:
        frames = reversed(list(traceback.walk_tb(frames)))
    steps, scenario = [], None
    for frame, line in frames:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and not name.endswith("process.py"):
            step = f"{frame.f_code.co_name} ({os.path.basename(name)}:{line})"
            steps.append(step)
            scenario = step if f"{os.sep}scenarios{os.sep}" in name else scenario
    shown = steps[:3] + ([scenario] if scenario and scenario not in steps[:3] else [])
    return " < ".join(shown) if shown else "an unknown step"


def select(ids: list[str] | None = None) -> list[Scenario]:
    """The scenarios with these ids (all, in matrix order, when None)."""
    ordered = sorted(SCENARIOS.values(), key=lambda s: order_key(s.id))
    if not ids:
        return ordered
    unknown = [i for i in ids if i not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario ids {unknown}; known: {', '.join(s.id for s in ordered)}")
    return [s for s in ordered if s.id in ids]


def order_key(scenario_id: str) -> tuple[int, int]:
    """MATRIX.md order: happy, error, half-close, churn, leak, timeout, phantom/capacity, faults,
    shutdown."""
    prefixes = "HECULTPFS"
    head, number = scenario_id[0], scenario_id[1:]
    return (
        prefixes.index(head) if head in prefixes else len(prefixes),
        int(number) if number.isdigit() else 0,
    )


def iter_results(scenarios: list[Scenario], targets: list[Target], options: Options) -> Iterator[Result]:
    """Every scenario on every target, scenario-major (so a row fills before the next)."""
    for sc in scenarios:
        for target in targets:
            yield run_one(sc, target, options)

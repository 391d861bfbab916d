"""The matrix's machinery: scenarios, targets, the per-scenario context and the leak guard."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

from connlab import probe
from connlab._native import Server
from connlab.client import connect, wait_until

IN_PROCESS = "in-process"
COMMAND = "command"
EXTERNAL = "external"
EXTERNAL_PID = "external+pid"
ALL_KINDS = frozenset({IN_PROCESS, COMMAND, EXTERNAL, EXTERNAL_PID})


class Skip(Exception):
    """The scenario does not apply to this target; the message says why."""


class Failed(AssertionError):
    """A check of the scenario did not hold; the message says which and what was seen."""


def check(condition: object, message: str) -> None:
    """Fails the scenario with `message` unless `condition` holds."""
    if not condition:
        raise Failed(message)


@dataclass(frozen=True)
class Options:
    """What a scenario needs to know of the server's configuration. For in-process backends and
    `connlab serve` these are applied; for an external server they describe it."""

    idle_timeout: float = 0.5
    read_timeout: float = 0.5
    write_timeout: float = 0.5
    max_frame: int = 1 << 20
    max_pending_output: int = 4 << 20
    max_connections: int | None = None
    workers: int = 2

    def server_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "idle_timeout": self.idle_timeout,
            "read_timeout": self.read_timeout,
            "write_timeout": self.write_timeout,
            "max_frame": self.max_frame,
            "max_pending_output": self.max_pending_output,
            "workers": self.workers,
        }
        if self.max_connections is not None:
            kwargs["max_connections"] = self.max_connections
        return kwargs


def serve_args(kwargs: dict[str, Any]) -> list[str]:
    """`connlab serve` options for `connlab.Server` keyword arguments."""
    args = []
    for key, value in kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(0 if value is None else value)]
    return args


class Handle:
    """One running server, as a scenario sees it. Server-side views (stats, journal,
    connections) are None when the target cannot give them."""

    address: tuple[str, int]
    pid: int | None
    kwargs: dict[str, Any]

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
    """A server process the matrix launched (`connlab serve` or a `--serve-cmd`): it prints a line
    with its host:port, and SIGTERM asks it to stop."""

    def __init__(self, argv: list[str], kwargs: dict[str, Any], nofile: int | None = None) -> None:
        self.kwargs = kwargs
        self.child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.child.pid
        if nofile is not None:
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            err = self.child.stderr.read() if self.child.stderr else ""
            self.child.wait()
            raise RuntimeError(f"server command printed no address: {shlex.join(argv)}: {err.strip()}")
        self.address = _parse_address(line)
        self.stop_report: dict[str, Any] | None = None

    def stop(self, grace: float = 1.0) -> dict[str, Any]:
        """SIGTERM, then wait for the exit; `connlab serve` reports drained/forced on stdout."""
        started = time.monotonic()
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        self.child.wait(timeout=grace + 10)
        report: dict[str, Any] = {"exit_code": self.child.returncode}
        if self.child.stdout:
            for line in self.child.stdout:
                with suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "stopped":
                        report.update(event)
        report["elapsed_s"] = report.get("elapsed_s", time.monotonic() - started)
        self.stop_report = report
        return report

    @property
    def stoppable(self) -> bool:
        return True

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        for stream in (self.child.stdout, self.child.stderr):
            if stream:
                stream.close()


class ExternalHandle(Handle):
    """Someone else's running server: reachable, maybe with a pid, never stopped by the matrix."""

    def __init__(self, address: tuple[str, int], pid: int | None, kwargs: dict[str, Any]) -> None:
        self.address = address
        self.pid = pid
        self.kwargs = kwargs


def _parse_address(line: str) -> tuple[str, int]:
    """host:port from a server's first line: `connlab serve`'s JSON, or any text with host:port."""
    with suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict) and "address" in event:
            line = str(event["address"])
    for word in line.replace(",", " ").split():
        host, sep, port = word.strip("\"'[]()").rpartition(":")
        if sep and port.isdigit() and host:
            return host.strip("[]"), int(port)
    raise RuntimeError(f"no host:port in the server's first line: {line!r}")


@dataclass(frozen=True)
class Target:
    """What the matrix runs against: an in-process backend, a command it launches, or an
    external address (with an optional pid)."""

    name: str
    kind: str
    backend: str | None = None
    command: str | None = None
    address: tuple[str, int] | None = None
    pid: int | None = None

    @classmethod
    def in_process(cls, backend: str) -> Target:
        return cls(name=backend, kind=IN_PROCESS, backend=backend)

    @classmethod
    def from_command(cls, command: str, name: str | None = None) -> Target:
        return cls(name=name or "command", kind=COMMAND, command=command)

    @classmethod
    def external(cls, address: str, pid: int | None = None) -> Target:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target: expected HOST:PORT, got {address!r}")
        return cls(
            name=address,
            kind=EXTERNAL_PID if pid else EXTERNAL,
            address=(host.strip("[]"), int(port)),
            pid=pid,
        )

    @property
    def has_stats(self) -> bool:
        return self.kind == IN_PROCESS

    def start(self, options: Options, overrides: dict[str, Any]) -> Handle:
        """A server for one scenario. In-process and command targets start a fresh one; an
        external one is used as it is, if the overrides the scenario needs match what it is."""
        kwargs = {**options.server_kwargs(), **overrides}
        if self.kind == IN_PROCESS:
            assert self.backend is not None
            return InProcessHandle(self.backend, kwargs)
        if self.kind == COMMAND:
            _require_defaults(overrides, options, "the server command is run as given")
            assert self.command is not None
            return ChildHandle(self.argv(kwargs), kwargs)
        _require_defaults(overrides, options, "an external server is used as it is")
        assert self.address is not None
        return ExternalHandle(self.address, self.pid, kwargs)

    def argv(self, kwargs: dict[str, Any]) -> list[str]:
        """The command that serves this target in a child process, if it has one."""
        if self.kind == IN_PROCESS:
            return [
                sys.executable,
                "-m",
                "connlab",
                "serve",
                "--backend",
                str(self.backend),
                "--port",
                "0",
                *serve_args(kwargs),
            ]
        if self.kind == COMMAND:
            assert self.command is not None
            # A command that takes its port as {port} gets a free one per launch.
            return shlex.split(self.command.replace("{port}", str(free_port())))
        raise Skip("needs the server in a child process: give --serve-cmd instead of --target")

    def child(self, options: Options, overrides: dict[str, Any], nofile: int | None = None) -> ChildHandle:
        """A server of this target in a child process (P3, L2)."""
        kwargs = {**options.server_kwargs(), **overrides}
        if self.kind == COMMAND:
            _require_defaults(overrides, options, "the server command is run as given")
        return ChildHandle(self.argv(kwargs), kwargs, nofile=nofile)


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
class LeakGuard:
    """Fds and native threads of the server's process, and CLOSE_WAIT on its port."""

    pid: int | None
    fds: int | None = None
    threads: int | None = None

    def baseline(self) -> None:
        if self.pid is not None:
            self.fds = probe.fd_count(self.pid)
            self.threads = probe.thread_count(self.pid)

    def check(self, port: int | None, timeout: float = 2.0) -> list[str]:
        """Polls until fds and threads are back and no CLOSE_WAIT is left; returns what is not."""
        deadline = time.monotonic() + timeout
        while True:
            problems = []
            if self.pid is not None and self.fds is not None:
                fds, threads = probe.fd_count(self.pid), probe.thread_count(self.pid)
                if fds != self.fds:
                    problems.append(f"fds {self.fds} -> {fds}")
                if threads != self.threads:
                    problems.append(f"threads {self.threads} -> {threads}")
            if port is not None and (cw := probe.port_view(port).close_wait):
                problems.append(f"{cw} CLOSE_WAIT on port {port}")
            if not problems or time.monotonic() >= deadline:
                return problems
            time.sleep(0.01)


@dataclass
class Context:
    """What a scenario works with: the target, the options, servers and clients it opens
    (closed at its end), notes on checks it skipped."""

    target: Target
    options: Options
    notes: list[str] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    guards: list[tuple[LeakGuard, Handle]] = field(default_factory=list)

    def server(self, **overrides: Any) -> Handle:
        """A server for this scenario, inside the leak guard."""
        in_process = self.target.kind == IN_PROCESS
        guard = LeakGuard(pid=os.getpid() if in_process else self.target.pid)
        if in_process:
            guard.baseline()  # before the server starts
        handle = self.target.start(self.options, overrides)
        if not in_process:
            guard.pid = handle.pid
            guard.baseline()  # after the listener is up
        self.handles.append(handle)
        self.guards.append((guard, handle))
        return handle

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

    def wait_active(self, handle: Handle, n: int, timeout: float = 2.0) -> dict[str, Any] | None:
        """Waits until the server holds `n` connections: by its stats, or, without them, by the
        kernel's count of established server-side sockets on its port."""
        if handle.stats() is not None:
            return wait_until(
                lambda: (s := handle.stats()) and s["active"] == n and s, timeout, what=f"active == {n}"
            )
        port = handle.address[1]
        wait_until(
            lambda: probe.port_view(port, pid=handle.pid).established == n,
            timeout,
            what=f"{n} established server-side sockets",
        )
        return None

    def finish(self) -> list[str]:
        """Closes the scenario's clients, stops what it started, and runs the leak guards."""
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()
        problems = []
        for guard, handle in self.guards:
            if isinstance(handle, ChildHandle):
                # A child is checked while it runs (it is gone after), once clients are closed; one
                # the scenario stopped itself has no fds or threads left to count.
                if handle.child.poll() is not None:
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


ScenarioFn = Callable[[Context], None]


@dataclass(frozen=True)
class Scenario:
    """One row of the lifecycle matrix."""

    id: str
    category: str
    description: str
    kinds: frozenset[str]
    run: ScenarioFn
    timeout: float = 60.0

    def applies_to(self, target: Target) -> str | None:
        """None if it applies; else why not."""
        if target.kind in self.kinds:
            return None
        needs = " or ".join(sorted(self.kinds))
        return f"{self.id} needs a {needs} target"


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    id: str, category: str, description: str, kinds: frozenset[str] = ALL_KINDS, timeout: float = 60.0
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Registers a scenario function under its MATRIX.md id."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if id in SCENARIOS:
            raise ValueError(f"scenario {id} defined twice")
        SCENARIOS[id] = Scenario(id, category, description, frozenset(kinds), fn, timeout)
        return fn

    return register


@dataclass(frozen=True)
class Result:
    """The outcome of one scenario on one target."""

    scenario: str
    target: str
    status: str  # "pass" | "fail" | "skip"
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
    failed in any round; it is a skip only if every round skipped. `seconds` is the total."""

    runs: tuple[Result, ...] = ()

    @classmethod
    def of(cls, runs: list[Result]) -> Repeated:
        failed = [(i, r) for i, r in enumerate(runs, 1) if r.status == "fail"]
        skipped = [(i, r) for i, r in enumerate(runs, 1) if r.status == "skip"]
        if failed:
            status, details = "fail", [f"round {i}: {r.detail}" for i, r in failed]
        elif len(skipped) == len(runs):
            status, details = "skip", list(dict.fromkeys(r.detail for r in runs))
        else:
            notes = dict.fromkeys(r.detail for r in runs if r.status == "pass" and r.detail)
            status, details = "pass", [*notes, *(f"round {i} skipped: {r.detail}" for i, r in skipped)]
        first = runs[0]
        total = sum(r.seconds for r in runs)
        return cls(first.scenario, first.target, status, total, "; ".join(details), tuple(runs))

    def rounds_with(self, status: str) -> list[int]:
        """The round numbers (from 1) in which it had `status`."""
        return [i for i, r in enumerate(self.runs, 1) if r.status == status]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "failed_rounds": len(self.rounds_with("fail"))}


def repeated(rounds: list[list[Result]]) -> list[Repeated]:
    """Each scenario on each target over `rounds` (each round's results in the same order)."""
    runs: dict[tuple[str, str], list[Result]] = {}
    for results in rounds:
        for r in results:
            runs.setdefault((r.scenario, r.target), []).append(r)
    return [Repeated.of(mine) for mine in runs.values()]


def run_one(sc: Scenario, target: Target, options: Options) -> Result:
    """Runs one scenario on one target, inside its leak guard; never raises."""
    started = time.monotonic()
    why_not = sc.applies_to(target)
    if why_not:
        return Result(sc.id, target.name, "skip", 0.0, why_not)
    ctx = Context(target=target, options=options)
    status, detail = "pass", ""
    try:
        sc.run(ctx)
    except Skip as skip:
        status, detail = "skip", str(skip)
    except (Failed, AssertionError, TimeoutError) as failure:
        status, detail = "fail", f"{type(failure).__name__}: {failure}"
    except Exception as error:
        status, detail = "fail", f"{type(error).__name__}: {error}"
    finally:
        try:
            leaks = ctx.finish()
        except Exception as error:
            leaks = [f"cleanup failed: {type(error).__name__}: {error}"]
    if leaks and status != "skip":
        status = "fail"
        detail = "; ".join([detail, "leak: " + ", ".join(leaks)] if detail else ["leak: " + ", ".join(leaks)])
    if ctx.notes and status == "pass":
        detail = "; ".join(ctx.notes)
    return Result(sc.id, target.name, status, time.monotonic() - started, detail)


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
    """MATRIX.md order: happy, error, half-close, churn, leak, timeout, phantom/capacity, shutdown."""
    prefixes = "HECULTPS"
    head, number = scenario_id[0], scenario_id[1:]
    return (
        prefixes.index(head) if head in prefixes else len(prefixes),
        int(number) if number.isdigit() else 0,
    )


def with_options(options: Options, **changes: Any) -> Options:
    return replace(options, **changes)


def iter_results(scenarios: list[Scenario], targets: list[Target], options: Options) -> Iterator[Result]:
    """Every scenario on every target, scenario-major (so a row fills before the next)."""
    for sc in scenarios:
        for target in targets:
            yield run_one(sc, target, options)

"""pytest plugin (entry point `pytest11`): backends and targets as parameters, the leak guard,
matrix options, and a scenario x target grid.

Options (each mirrored by an ini key of the same name without the dashes' prefix):
`--connlab-backends`, `--connlab-target HOST:PORT`, `--connlab-pid PID`, `--connlab-serve-cmd CMD`,
`--connlab-idle-timeout`, `--connlab-read-timeout`, `--connlab-write-timeout`, `--connlab-max-frame`,
`--connlab-max-connections`, `--connlab-grid`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from connlab import probe
from connlab._native import BACKENDS, Server
from connlab.matrix.core import Options, Target, order_key

# (option name, ini/dest name, type, default, help)
_OPTIONS = [
    ("--connlab-backends", "connlab_backends", str, "all", "in-process backends, comma-separated, or 'all'"),
    ("--connlab-target", "connlab_target", str, None, "HOST:PORT of a running server to test instead"),
    ("--connlab-pid", "connlab_pid", int, None, "with --connlab-target: the server's pid (fd/thread checks)"),
    (
        "--connlab-serve-cmd",
        "connlab_serve_cmd",
        str,
        None,
        "a command that starts a server printing its host:port (launched per scenario)",
    ),
    ("--connlab-idle-timeout", "connlab_idle_timeout", float, 0.5, "the server's idle timeout (s)"),
    ("--connlab-read-timeout", "connlab_read_timeout", float, 0.5, "the server's read timeout (s)"),
    ("--connlab-write-timeout", "connlab_write_timeout", float, 0.5, "the server's write timeout (s)"),
    ("--connlab-max-frame", "connlab_max_frame", int, 1 << 20, "the server's max_frame (bytes)"),
    ("--connlab-max-connections", "connlab_max_connections", int, None, "the server's connection limit"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("connlab", "connlab lifecycle matrix")
    for flag, name, kind, default, text in _OPTIONS:
        group.addoption(
            flag, dest=name, default=None, type=kind, help=f"{text} (ini: {name}; default: {default})"
        )
        parser.addini(name, text, default=None if default is None else str(default))
    group.addoption(
        "--connlab-grid",
        action="store_true",
        default=False,
        help="print a scenario x target grid of the connlab_scenario tests at the end",
    )


def _value(config: pytest.Config, name: str) -> object:
    """The option if given, else the ini key, converted; None if neither."""
    _, _, kind, default, _ = next(o for o in _OPTIONS if o[1] == name)
    value = config.getoption(name)
    if value is not None:
        return value
    raw = config.getini(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        raise pytest.UsageError(f"ini {name} = {raw!r}: expected {kind.__name__}") from None


def _selected_backends(config: pytest.Config) -> list[str]:
    raw = str(_value(config, "connlab_backends"))
    if raw == "all":
        return list(BACKENDS)
    chosen = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown or not chosen:
        raise pytest.UsageError(f"--connlab-backends: unknown {unknown}; available: {', '.join(BACKENDS)}")
    return chosen


def _targets(config: pytest.Config) -> list[Target]:
    target, pid, cmd = (_value(config, n) for n in ("connlab_target", "connlab_pid", "connlab_serve_cmd"))
    if pid is not None and target is None:
        raise pytest.UsageError("--connlab-pid: only with --connlab-target")
    if target is not None and cmd is not None:
        raise pytest.UsageError("--connlab-target and --connlab-serve-cmd: give one")
    if target is not None:
        try:
            return [Target.external(str(target), int(pid) if pid is not None else None)]
        except ValueError as err:
            raise pytest.UsageError(f"--connlab-target: {err}") from None
    if cmd is not None:
        return [Target.from_command(str(cmd))]
    return [Target.in_process(b) for b in _selected_backends(config)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "connlab_scenario(id): the MATRIX.md scenario a test checks (shown in the grid)"
    )
    config.stash[_RESULTS] = {}
    # Bad options are usage errors, reported before collection.
    config.stash[_BACKENDS] = _selected_backends(config)
    config.stash[_TARGETS] = _targets(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_START] = (probe.fd_count(), probe.thread_count())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "connlab_backend" in metafunc.fixturenames:
        metafunc.parametrize("connlab_backend", metafunc.config.stash[_BACKENDS])
    if "connlab_target" in metafunc.fixturenames:
        targets = metafunc.config.stash[_TARGETS]
        metafunc.parametrize("connlab_target", targets, ids=[t.name for t in targets])


@pytest.fixture
def connlab_options(request: pytest.FixtureRequest) -> Options:
    """What the scenarios assume of the server, from the options and ini keys."""
    c = request.config
    max_connections = _value(c, "connlab_max_connections")
    return Options(
        idle_timeout=float(_value(c, "connlab_idle_timeout")),  # type: ignore[arg-type]
        read_timeout=float(_value(c, "connlab_read_timeout")),  # type: ignore[arg-type]
        write_timeout=float(_value(c, "connlab_write_timeout")),  # type: ignore[arg-type]
        max_frame=int(_value(c, "connlab_max_frame")),  # type: ignore[call-overload]
        max_connections=int(max_connections) if max_connections is not None else None,  # type: ignore[call-overload]
    )


@pytest.fixture
def connlab_server(leak_guard: LeakGuard, connlab_backend: str, connlab_options: Options) -> Iterator[Server]:
    """A server of each selected backend with the matrix's options, stopped before the leak guard
    checks fds and threads."""
    server = Server(connlab_backend, **connlab_options.server_kwargs())
    yield server
    server.stop(0)


@dataclass
class _Outcome:
    status: str
    seconds: float


_RESULTS = pytest.StashKey[dict[tuple[str, str], _Outcome]]()
_SESSION_START = pytest.StashKey[tuple[int, int]]()
_BACKENDS = pytest.StashKey[list[str]]()
_TARGETS = pytest.StashKey[list[Target]]()


def _cell(item: pytest.Item) -> tuple[str, str] | None:
    """(scenario id, target name) of a test marked connlab_scenario and parametrized by target."""
    marker = item.get_closest_marker("connlab_scenario")
    params = getattr(getattr(item, "callspec", None), "params", {})
    if marker is None:
        return None
    if "connlab_target" in params:
        return str(marker.args[0]), params["connlab_target"].name
    if "connlab_backend" in params:
        return str(marker.args[0]), str(params["connlab_backend"])
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    cell = _cell(item)
    if cell is not None:
        status = "skip" if report.skipped else ("FAIL" if report.failed else "pass")
        results = item.config.stash[_RESULTS]
        previous = results.get(cell)
        if previous is None:
            results[cell] = _Outcome(status, report.duration)
        else:
            # One cell per scenario: a failing or skipped phase decides it.
            previous.seconds += report.duration
            if status != "pass" and previous.status == "pass":
                previous.status = status
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    fds, threads = config.stash[_SESSION_START]
    terminalreporter.write_line(
        f"connlab: this process had {fds} fds and {threads} threads before the session, "
        f"{probe.fd_count()} and {probe.thread_count()} after it"
    )
    results = config.stash[_RESULTS]
    if not config.getoption("connlab_grid") or not results:
        return
    scenarios = sorted({s for s, _ in results}, key=order_key)
    targets = list(dict.fromkeys(t for _, t in results))
    tr = terminalreporter
    tr.section("connlab: scenario x target")
    width = max(16, *(len(t) + 2 for t in targets))
    tr.write_line("scenario".ljust(10) + "".join(t.ljust(width) for t in targets))
    for scenario in scenarios:
        cells = []
        for target in targets:
            outcome = results.get((scenario, target))
            cells.append((f"{outcome.status} {outcome.seconds:5.2f}s" if outcome else "-").ljust(width))
        tr.write_line(scenario.ljust(10) + "".join(cells))


@dataclass
class LeakGuard:
    """Fd and native-thread counts of this process, taken before a server starts."""

    fds: int
    threads: int

    def assert_back_to_baseline(self, timeout: float = 2.0) -> None:
        """Polls until both counts are back to the baseline, or fails naming what is left."""
        deadline = time.monotonic() + timeout
        while True:
            fds, threads = probe.fd_count(), probe.thread_count()
            if fds == self.fds and threads == self.threads:
                return
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"leak: fds {self.fds} -> {fds}, threads {self.threads} -> {threads}; "
                    f"open fds now: {_fd_targets()}; threads now: {probe.thread_names()}",
                    pytrace=False,
                )
            time.sleep(0.005)


def _fd_targets() -> list[str]:
    targets = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return targets


@pytest.fixture
def leak_guard() -> Iterator[LeakGuard]:
    """Takes the baseline before the test's servers start; after they stop and the test's
    sockets close, fds and native threads must come back to it (polled for 2 s)."""
    guard = LeakGuard(fds=probe.fd_count(), threads=probe.thread_count())
    yield guard
    guard.assert_back_to_baseline()

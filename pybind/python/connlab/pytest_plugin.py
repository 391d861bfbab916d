"""pytest plugin (entry point `pytest11`): backends and targets as parameters, the leak guard,
matrix options, and a scenario x target grid.

Options (each mirrored by an ini key of the same name without the dashes' prefix):
`--connlab-backends`, `--connlab-target HOST:PORT`, `--connlab-pid PID`, `--connlab-serve-cmd CMD`
(with `--connlab-handoff-cmd CMD`, the successor that takes its listener over, for S5),
the server's claims `--connlab-idle-timeout`, `--connlab-read-timeout`, `--connlab-write-timeout`,
`--connlab-max-frame` (a number, or none; not given: absent for a target or command, the
matrix's short ones for backends), `--connlab-byte-echo`, `--connlab-max-connections`, and
`--connlab-start-timeout`, `--connlab-scenario-timeout`, `--connlab-strict`, `--connlab-grid`.

A row the server's claims make n/a is skipped with "n/a: ..."; a warning (a SHOULD missed) passes
and is listed at the end, or fails with `--connlab-strict`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from connlab import probe
from connlab._native import Server
from connlab.matrix.core import (
    CONFIGURED,
    Options,
    Target,
    options_for,
    order_key,
    parse_backends,
    parse_claim,
)
from connlab.process import LeakGuard

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
    (
        "--connlab-handoff-cmd",
        "connlab_handoff_cmd",
        str,
        None,
        "with --connlab-serve-cmd: a successor's command taking the listener over from {control} (S5)",
    ),
    ("--connlab-idle-timeout", "connlab_idle_timeout", str, None, "the server's idle timeout: S or none"),
    ("--connlab-read-timeout", "connlab_read_timeout", str, None, "the server's read timeout: S or none"),
    ("--connlab-write-timeout", "connlab_write_timeout", str, None, "the server's write timeout: S or none"),
    ("--connlab-max-frame", "connlab_max_frame", str, None, "the server's max_frame: BYTES or none"),
    ("--connlab-max-connections", "connlab_max_connections", int, None, "the server's connection limit"),
    (
        "--connlab-start-timeout",
        "connlab_start_timeout",
        float,
        10.0,
        "seconds a launched server has to start",
    ),
    ("--connlab-scenario-timeout", "connlab_scenario_timeout", float, 1.0, "scales every scenario's budget"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("connlab", "connlab lifecycle matrix")
    for flag, name, kind, default, text in _OPTIONS:
        group.addoption(
            flag, dest=name, default=None, type=kind, help=f"{text} (ini: {name}; default: {default})"
        )
        parser.addini(name, text, default=None if default is None else str(default))
    for flag, text in (
        ("--connlab-byte-echo", "the server echoes bytes without framing: framing rows are n/a"),
        ("--connlab-strict", "a warning (a SHOULD missed) fails the test"),
    ):
        name = flag[2:].replace("-", "_")
        group.addoption(flag, dest=name, action="store_true", default=None, help=f"{text} (ini: {name})")
        parser.addini(name, text, type="bool", default=False)
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
    try:
        return parse_backends(str(_value(config, "connlab_backends")))
    except ValueError as err:
        raise pytest.UsageError(f"--connlab-backends: {err}") from None


def _targets(config: pytest.Config) -> list[Target]:
    target, pid, cmd = (_value(config, n) for n in ("connlab_target", "connlab_pid", "connlab_serve_cmd"))
    handoff = _value(config, "connlab_handoff_cmd")
    if pid is not None and target is None:
        raise pytest.UsageError("--connlab-pid: only with --connlab-target")
    if handoff is not None and cmd is None:
        raise pytest.UsageError("--connlab-handoff-cmd: only with --connlab-serve-cmd")
    if target is not None and cmd is not None:
        raise pytest.UsageError("--connlab-target and --connlab-serve-cmd: give one")
    if target is not None:
        try:
            return [Target.external(str(target), int(pid) if pid is not None else None)]
        except ValueError as err:
            raise pytest.UsageError(f"--connlab-target: {err}") from None
    if cmd is not None:
        try:
            return [Target.from_command(str(cmd), handoff=None if handoff is None else str(handoff))]
        except ValueError as err:
            raise pytest.UsageError(f"--connlab-handoff-cmd: {err}") from None
    return [Target.in_process(b) for b in _selected_backends(config)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "connlab_scenario(id): the MATRIX.md scenario a test checks (shown in the grid)"
    )
    config.stash[_RESULTS] = {}
    # Bad options are usage errors, reported before collection.
    config.stash[_BACKENDS] = _selected_backends(config)
    config.stash[_TARGETS] = _targets(config)
    config.stash[_OPTIONS_KEY] = _options(config)
    config.stash[_WARNINGS] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_START] = (probe.fd_count(), probe.thread_count())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A backend this machine cannot run (uring without io_uring) is skipped with the reason.
    if "connlab_backend" in metafunc.fixturenames:
        backends = [Target.in_process(b) for b in metafunc.config.stash[_BACKENDS]]
        metafunc.parametrize("connlab_backend", [_param(t.backend, t) for t in backends])
    if "connlab_target" in metafunc.fixturenames:
        targets = metafunc.config.stash[_TARGETS]
        metafunc.parametrize("connlab_target", [_param(t, t) for t in targets], ids=[t.name for t in targets])


def _param(value: Any, target: Target) -> Any:
    """`value` as a parameter, skipped with the reason when `target` cannot run here."""
    why = target.unavailable()
    return value if why is None else pytest.param(value, marks=pytest.mark.skip(reason=why))


def warnings_seen(config: pytest.Config) -> list[str]:
    """The warnings of the session's matrix rows, listed at its end."""
    return config.stash[_WARNINGS]


def _flag(config: pytest.Config, name: str) -> bool:
    value = config.getoption(name)
    return bool(config.getini(name) if value is None else value)


def _options(config: pytest.Config) -> Options:
    """What the scenarios know of the server, from the options and ini keys (usage errors now)."""
    claims: dict[str, float | int | None] = {}
    for feature in CONFIGURED:
        raw = _value(config, f"connlab_{feature}")
        if raw is not None:
            try:
                claims[feature] = parse_claim(feature, str(raw))
            except ValueError as err:
                raise pytest.UsageError(f"--connlab-{feature.replace('_', '-')}: {err}") from None
    max_connections = _value(config, "connlab_max_connections")
    in_process = all(t.backend is not None for t in config.stash[_TARGETS])
    return options_for(
        in_process,
        claims,
        max_connections=int(max_connections) if max_connections is not None else None,  # type: ignore[call-overload]
        byte_echo=_flag(config, "connlab_byte_echo"),
        start_timeout=float(_value(config, "connlab_start_timeout")),  # type: ignore[arg-type]
        budget_scale=float(_value(config, "connlab_scenario_timeout")),  # type: ignore[arg-type]
        option_prefix="--connlab-",
    )


@pytest.fixture
def connlab_options(request: pytest.FixtureRequest) -> Options:
    """What the scenarios know of the server: its claims, from the options and ini keys."""
    return request.config.stash[_OPTIONS_KEY]


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
_OPTIONS_KEY = pytest.StashKey[Options]()
_WARNINGS = pytest.StashKey[list[str]]()


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
        graded = dict(item.user_properties).get("connlab_status")
        if graded in ("warn", "n/a") and report.when == "call":
            status = graded
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
    for line in config.stash[_WARNINGS]:
        terminalreporter.write_line(f"connlab warning: {line}")
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
    """Takes the baseline (fds and native threads of this process and its children) before the
    test's servers start; after they stop and the test's sockets close, both must be back to it
    (polled for 2 s), or the test errors naming what is left."""
    guard = LeakGuard(pid=os.getpid())
    guard.baseline()
    yield guard
    if problems := guard.check(port=None):
        now = f"open fds now: {_fd_targets()}; threads now: {probe.thread_names()}"
        pytest.fail(f"leak: {', '.join(problems)}; {now}", pytrace=False)

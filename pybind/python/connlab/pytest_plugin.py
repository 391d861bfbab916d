"""pytest plugin (entry point `pytest11`): backends as a parameter, the leak guard, a scenario grid."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from connlab import probe
from connlab._native import BACKENDS


def _selected_backends(config: pytest.Config) -> list[str]:
    raw = config.getoption("connlab_backends") or config.getini("connlab_backends") or "all"
    if raw == "all":
        return list(BACKENDS)
    chosen = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown:
        raise pytest.UsageError(f"--connlab-backends: unknown {unknown}; available: {', '.join(BACKENDS)}")
    return chosen


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("connlab", "connlab lifecycle matrix")
    group.addoption(
        "--connlab-backends",
        default=None,
        help="comma-separated backends to run, or 'all' (default: all; ini: connlab_backends)",
    )
    group.addoption(
        "--connlab-grid",
        action="store_true",
        default=False,
        help="print a scenario x backend grid of the connlab_scenario tests at the end",
    )
    parser.addini("connlab_backends", "backends to run, comma-separated, or 'all'", default="all")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "connlab_scenario(id): the MATRIX.md scenario a test checks (shown in the grid)"
    )
    config.stash[_RESULTS] = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_START] = (probe.fd_count(), probe.thread_count())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "connlab_backend" in metafunc.fixturenames:
        metafunc.parametrize("connlab_backend", _selected_backends(metafunc.config))


@dataclass
class _Outcome:
    status: str
    seconds: float


_RESULTS = pytest.StashKey[dict[tuple[str, str], _Outcome]]()
_SESSION_START = pytest.StashKey[tuple[int, int]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    marker = item.get_closest_marker("connlab_scenario")
    callspec = getattr(item, "callspec", None)
    if marker and callspec and "connlab_backend" in callspec.params:
        key = (str(marker.args[0]), str(callspec.params["connlab_backend"]))
        results = item.config.stash[_RESULTS]
        previous = results.get(key)
        status = "skip" if report.skipped else ("FAIL" if report.failed else "pass")
        # A scenario is one cell: any failing phase (or test) of it fails the cell.
        if previous is None or previous.status == "pass" or status == "FAIL":
            seconds = (previous.seconds if previous else 0.0) + report.duration
            results[key] = _Outcome(
                status if previous is None or status != "pass" else previous.status, seconds
            )
        else:
            previous.seconds += report.duration
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    fds, threads = config.stash[_SESSION_START]
    terminalreporter.write_line(
        f"connlab: this process had {fds} fds and {threads} threads before the session, "
        f"{probe.fd_count()} and {probe.thread_count()} after it"
    )
    if not config.getoption("connlab_grid"):
        return
    results = config.stash[_RESULTS]
    if not results:
        return
    scenarios = sorted({s for s, _ in results}, key=_scenario_order)
    backends = [b for b in _selected_backends(config) if any(k[1] == b for k in results)]
    tr = terminalreporter
    tr.section("connlab: scenario x backend")
    width = 16
    tr.write_line("scenario".ljust(10) + "".join(b.ljust(width) for b in backends))
    for scenario in scenarios:
        cells = []
        for backend in backends:
            outcome = results.get((scenario, backend))
            cells.append((f"{outcome.status} {outcome.seconds:5.2f}s" if outcome else "-").ljust(width))
        tr.write_line(scenario.ljust(10) + "".join(cells))


def _scenario_order(scenario: str) -> tuple[int, int]:
    order = "HECULTPS"
    prefix, number = scenario[0], scenario[1:]
    return (order.index(prefix) if prefix in order else len(order), int(number) if number.isdigit() else 0)


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
                extra = _fd_targets()
                pytest.fail(
                    f"leak: fds {self.fds} -> {fds}, threads {self.threads} -> {threads}; "
                    f"open fds now: {extra}; threads now: {probe.thread_names()}",
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

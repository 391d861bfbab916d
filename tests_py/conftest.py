"""Shared fixtures: a server factory inside the leak guard, with the matrix's short timeouts."""

from __future__ import annotations

import resource
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import connlab

# MATRIX.md: short timeouts keep the matrix fast; T is each of them.
pytest_plugins = ["pytester"]

T = 0.5
SHORT = {"idle_timeout": T, "read_timeout": T, "write_timeout": T}


def pytest_sessionstart(session: pytest.Session) -> None:
    # Scenarios with thousands of sockets need more fds than the usual 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 20_000 if hard == resource.RLIM_INFINITY else min(hard, 20_000)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # A run started in the background (`make test &`, nohup) inherits SIGINT ignored, and every
    # command a test starts would too: the tests that stop a command with SIGINT need it
    # delivered. A handled signal is reset to its default in a child at exec; an ignored one is not.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


ServerFactory = Callable[..., connlab.Server]


@pytest.fixture
def make_server(leak_guard: Any, connlab_backend: str) -> Iterator[ServerFactory]:
    """Starts servers of the test's backend (short timeouts unless overridden); stops them all
    before the leak guard checks fds and threads."""
    servers: list[connlab.Server] = []

    def make(**overrides: Any) -> connlab.Server:
        server = connlab.Server(connlab_backend, **{**SHORT, **overrides})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(0)

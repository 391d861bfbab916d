"""Tests of connlab.probe against real sockets, threads and processes of this machine (no server needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from connlab import probe

DEADLINE_S = 2.0


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    """Poll `condition` until it holds or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(0.005)


def open_fds_by_fstat() -> int:
    """Count this process's descriptors without /proc: an independent reference for fd_count."""
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    count = 0
    for fd in range(highest + 1):
        try:
            os.fstat(fd)
        except OSError:
            continue
        count += 1
    return count


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
def connection(listener: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server-side) sockets of one accepted loopback connection."""
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    with client, server_side:
        yield client, server_side


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that owns none of our sockets."""
    child = subprocess.Popen(
        ["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# ---- port_view ----------------------------------------------------------------------------------


def test_port_view_counts_the_server_side_socket_not_the_client_side(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, _ = connection
    view = probe.port_view(port_of(listener))
    assert view.port == port_of(listener)
    assert view.established == 1
    # The listener is LISTEN and the client socket has the port only as its remote port.
    assert view.total == 1
    assert dict(view.counts) == {"ESTABLISHED": 1}
    # The client socket is in the tables, under its own ephemeral local port.
    assert probe.port_view(port_of(client)).established == 1


def test_port_view_is_empty_for_a_port_with_only_a_listener(listener: socket.socket) -> None:
    assert probe.port_view(port_of(listener)).total == 0


def test_port_view_shows_close_wait_after_the_client_closes(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, _ = connection
    client.close()
    port = port_of(listener)
    assert wait_for(lambda: probe.port_view(port).close_wait == 1), probe.port_view(port)
    view = probe.port_view(port)
    assert view.established == 0
    assert view.total == 1
    assert probe.owned_server_sockets(port) == 1


def test_time_wait_is_server_side_but_owned_by_no_process(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server_side = connection
    port = port_of(listener)
    # The server closes first, so its socket (local port == port) ends in TIME_WAIT.
    server_side.close()
    assert client.recv(1) == b""
    client.close()
    assert wait_for(lambda: probe.port_view(port).time_wait == 1), probe.port_view(port)
    assert probe.port_view(port, pid=os.getpid()).total == 0
    assert probe.owned_server_sockets(port) == 0


def test_port_view_filters_by_owning_pid(
    listener: socket.socket,
    connection: tuple[socket.socket, socket.socket],
    other_process: subprocess.Popen[bytes],
) -> None:
    port = port_of(listener)
    mine = probe.port_view(port, pid=os.getpid())
    assert mine.pid == os.getpid()
    assert mine.established == 1
    assert probe.owned_server_sockets(port, os.getpid()) == 1
    theirs = probe.port_view(port, pid=other_process.pid)
    assert theirs.total == 0
    assert probe.owned_server_sockets(port, other_process.pid) == 0


def test_port_view_sees_ipv6_sockets() -> None:
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with listener:
        port = port_of(listener)
        with socket.create_connection(("::1", port)) as client:
            server_side, _ = listener.accept()
            with server_side:
                assert probe.port_view(port).established == 1
                assert probe.port_view(port_of(client)).established == 1
                assert probe.owned_server_sockets(port) == 1


def test_port_view_counts_every_connection(listener: socket.socket) -> None:
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        assert probe.port_view(port_of(listener), pid=os.getpid()).established == 3
    finally:
        for sock in clients + accepted:
            sock.close()


def test_port_view_of_a_vanished_process_raises(other_process: subprocess.Popen[bytes]) -> None:
    other_process.kill()
    other_process.wait()
    with pytest.raises(ProcessLookupError):
        probe.port_view(1, pid=other_process.pid)


def test_port_view_rejects_an_unknown_state_name(listener: socket.socket) -> None:
    view = probe.port_view(port_of(listener))
    assert view.count("FIN_WAIT2") == 0
    with pytest.raises(ValueError, match="state"):
        view.count("ESTABLISHD")


def test_port_view_is_immutable(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    view = probe.port_view(port_of(listener))
    with pytest.raises(TypeError):
        view.counts["ESTABLISHED"] = 5  # type: ignore[index]
    assert view == probe.port_view(port_of(listener))
    assert hash(view) == hash(probe.port_view(port_of(listener)))


# ---- fds, threads, memory, CPU ------------------------------------------------------------------


def test_fd_count_matches_an_independent_count() -> None:
    assert probe.fd_count() == open_fds_by_fstat()
    assert probe.fd_count(os.getpid()) == probe.fd_count()


def test_fd_count_follows_sockets_opened_and_closed() -> None:
    before = probe.fd_count()
    socks = [socket.socket() for _ in range(3)]
    try:
        assert probe.fd_count() == before + 3
    finally:
        for sock in socks:
            sock.close()
    assert probe.fd_count() == before


def test_fd_count_of_another_process(other_process: subprocess.Popen[bytes]) -> None:
    # Popen closes every other descriptor in the child: stdin, stdout and stderr are left.
    assert probe.fd_count(other_process.pid) >= 3
    assert probe.fd_count(other_process.pid) < probe.fd_count() + 3


def test_queries_of_a_vanished_process_raise(other_process: subprocess.Popen[bytes]) -> None:
    other_process.kill()
    other_process.wait()
    for query in (probe.fd_count, probe.thread_count, probe.thread_names, probe.rss_bytes, probe.cpu_seconds):
        with pytest.raises(ProcessLookupError):
            query(other_process.pid)
    with pytest.raises(ProcessLookupError):
        probe.threads_cpu_seconds("", other_process.pid)


def test_thread_count_follows_a_native_thread() -> None:
    before = probe.thread_count()
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert wait_for(lambda: probe.thread_count() == before + 1), probe.thread_names()
    finally:
        release.set()
        thread.join()
    # join() returns before the OS thread has left /proc/self/task.
    assert wait_for(lambda: probe.thread_count() == before), probe.thread_names()


def set_os_thread_name(name: str) -> None:
    """Name the calling thread for the kernel (comm); Python's thread names are not OS names."""
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w", encoding="utf-8") as f:
        f.write(name)


class NamedBusyThread:
    """A thread with OS name `name` that burns `cpu_s` of CPU, then stays alive until stopped."""

    def __init__(self, name: str, cpu_s: float) -> None:
        self.name = name
        self.cpu_s = cpu_s
        self.done = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            set_os_thread_name(self.name)
            while time.thread_time() < self.cpu_s:
                pass
        except BaseException as exc:  # reported to the test thread by wait_done()
            self.error = exc
        finally:
            self.done.set()
        self.stop.wait()

    def __enter__(self) -> NamedBusyThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def wait_done(self) -> None:
        assert self.done.wait(10.0), f"{self.name} did not finish burning CPU"
        assert self.error is None, self.error


def test_thread_names_show_os_names_truncated_to_15_chars() -> None:
    with NamedBusyThread("connlab-blocking-12", cpu_s=0.0) as busy:
        busy.wait_done()
        names = probe.thread_names()
        assert "connlab-blockin" in names
        assert len(names) == probe.thread_count()


def test_threads_cpu_seconds_sums_only_matching_threads() -> None:
    burn = 0.2
    with (
        NamedBusyThread("connlab-t1", burn) as a,
        NamedBusyThread("connlab-t2", burn) as b,
        NamedBusyThread("other-t3", burn) as c,
    ):
        for busy in (a, b, c):
            busy.wait_done()
        matching = probe.threads_cpu_seconds("connlab-")
        other = probe.threads_cpu_seconds("other-")
        one = probe.threads_cpu_seconds("connlab-t1")
        everyone = probe.threads_cpu_seconds("")
    # Each thread burnt `burn` s; the kernel reports it in clock ticks (10 ms at CLK_TCK 100).
    assert 2 * burn - 0.05 <= matching <= 2 * burn + 0.15
    assert burn - 0.05 <= other <= burn + 0.1
    assert burn - 0.05 <= one <= burn + 0.1
    assert everyone >= matching + other
    assert probe.threads_cpu_seconds("no-such-thread") == 0.0


def test_threads_cpu_seconds_truncates_a_long_prefix_like_the_kernel() -> None:
    with NamedBusyThread("connlab-blocking-3", 0.05) as busy:
        busy.wait_done()
        assert probe.threads_cpu_seconds("connlab-blocking-") >= 0.02


def test_rss_bytes_grows_with_touched_memory() -> None:
    before = probe.rss_bytes()
    block = b"\x01" * (64 << 20)
    try:
        assert probe.rss_bytes() - before >= 48 << 20
    finally:
        del block


def test_cpu_seconds_grows_with_work() -> None:
    before = probe.cpu_seconds()
    start = time.thread_time()
    while time.thread_time() - start < 0.2:
        pass
    assert probe.cpu_seconds() - before >= 0.15


def test_snapshot_agrees_with_the_single_probes() -> None:
    snap = probe.snapshot()
    assert snap.pid == os.getpid()
    assert snap.fds == probe.fd_count()
    assert snap.threads == probe.thread_count()
    assert snap.rss_bytes > 0
    assert 0.0 < snap.cpu_seconds <= probe.cpu_seconds()


def test_snapshot_of_another_process(other_process: subprocess.Popen[bytes]) -> None:
    snap = probe.snapshot(other_process.pid)
    assert snap.pid == other_process.pid
    assert snap.threads == 1
    assert snap.rss_bytes > 0


# ---- phantoms -----------------------------------------------------------------------------------


class FakeServer:
    """Stands in for connlab.Server: an address and an `active` count that may lie."""

    def __init__(self, port: int, active: int) -> None:
        self.address = ("127.0.0.1", port)
        self.active = active

    def stats(self) -> dict[str, Any]:
        return {"active": self.active, "accepted": self.active, "closed": 0}


def test_phantoms_is_active_minus_owned_sockets(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    port = port_of(listener)
    assert probe.phantoms(FakeServer(port, active=1)) == 0
    assert probe.phantoms(FakeServer(port, active=3)) == 2
    assert probe.phantoms(FakeServer(port, active=0)) == -1


def test_phantoms_counts_a_close_wait_socket_still_held(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, _ = connection
    client.close()
    port = port_of(listener)
    assert wait_for(lambda: probe.port_view(port).close_wait == 1)
    assert probe.phantoms(FakeServer(port, active=1)) == 0


def test_phantoms_ignores_time_wait(
    listener: socket.socket, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server_side = connection
    port = port_of(listener)
    server_side.close()
    assert client.recv(1) == b""
    client.close()
    # At least ours: on a busy machine another process's TIME_WAIT may share the port number
    # (its client used it as an ephemeral port before our listener took it with SO_REUSEADDR).
    assert wait_for(lambda: probe.port_view(port).time_wait >= 1)
    assert probe.phantoms(FakeServer(port, active=0)) == 0
    assert probe.phantoms(FakeServer(port, active=1)) == 1

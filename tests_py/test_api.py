"""The Python face of the servers: arguments, errors, properties, lifecycle of the object."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import threading
import time

import pytest

import connlab
from conftest import ServerFactory
from connlab import probe
from connlab.client import connect, encode, read_frame, wait_until

STATS_KEYS = {
    "backend", "address", "active", "accepted", "closed", "rejected", "peak_active", "by_state",
    "closed_by", "frames_in", "frames_out", "bytes_in", "bytes_out", "truncated_frames",
    "accept_errors", "threads", "journal_dropped",
}  # fmt: skip


def test_backends_lists_exactly_what_exists() -> None:
    assert connlab.BACKENDS and len(set(connlab.BACKENDS)) == len(connlab.BACKENDS)
    for name in connlab.BACKENDS:
        if connlab.unavailable(name):
            continue  # test_an_unavailable_backend_says_why covers it
        with connlab.Server(name) as server:
            assert server.backend == name
    assert connlab.STATES == ("Connecting", "ReadingHeader", "ReadingBody", "Writing", "Closing")
    assert len(connlab.CLOSE_REASONS) == 9


def test_an_unavailable_backend_says_why(leak_guard) -> None:
    """Every backend but uring runs anywhere; uring either starts and echoes, or refuses to start
    with BackendUnavailable carrying the same reason `unavailable` gives."""
    assert all(connlab.unavailable(b) is None for b in connlab.BACKENDS if b != "uring")
    with pytest.raises(ValueError, match=r"^backend: unknown backend"):
        connlab.unavailable("nosuch")
    why = connlab.unavailable("uring")
    if why is None:
        with connlab.Server("uring") as server, connect(server.address) as c:
            c.sendall(encode(b"ring"))
            assert read_frame(c) == b"ring"
    else:
        said = "^" + re.escape(f"backend: uring is unavailable: {why}")
        with pytest.raises(connlab.BackendUnavailable, match=said):
            connlab.Server("uring")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "nosuch"}, "backend"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"read_timeout": float("nan")}, "read_timeout"),
        ({"idle_timeout": 1e20}, "idle_timeout"),
        ({"write_timeout": float("inf")}, "write_timeout"),
        ({"write_timeout": -0.5}, "write_timeout"),
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"workers": 0}, "workers"),
        ({"max_connections": 0}, "max_connections"),
        ({"backlog": 0}, "backlog"),
        ({"max_frame": -1}, "max_frame"),
        ({"host": "not-an-ip"}, "host"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, message: str, leak_guard) -> None:
    kwargs = {"backend": connlab.BACKENDS[0], **kwargs}
    with pytest.raises(ValueError, match=rf"^{message}: "):
        connlab.Server(**kwargs)


def test_bad_grace_raises_and_leaves_the_server_stoppable(make_server: ServerFactory) -> None:
    server = make_server()
    for grace in (-1.0, 1e19, float("nan")):
        with pytest.raises(ValueError, match=r"^grace: "):
            server.stop(grace)
    assert server.stop(0)["elapsed_s"] > 0, "the real stop still happens"


def test_port_in_use_raises_os_error_naming_port(leak_guard) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError, match=r"^\[Errno 98\] port: cannot bind") as info:
            connlab.Server(connlab.BACKENDS[0], port=holder.getsockname()[1])
        assert info.value.errno == 98
    finally:
        holder.close()


def test_stats_connections_and_address(make_server: ServerFactory, connlab_backend: str) -> None:
    server = make_server(idle_timeout=60.0)
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    with connect(server.address) as client:
        client.sendall(encode(b"abc"))
        assert read_frame(client) == b"abc"
        # The client may see the echo before the server has counted the write.
        (conn,) = wait_until(lambda: [c for c in server.connections() if c["bytes_out"] == 7])
        assert conn["peer"] == client.getsockname()
        assert conn["state"] == "ReadingHeader"
        assert conn["bytes_in"] == 7
        assert conn["age_s"] >= conn["idle_s"] >= 0
        stats = server.stats()
        assert set(stats) == STATS_KEYS
        assert stats["backend"] == connlab_backend and stats["address"] == (host, port)
        assert stats["by_state"]["ReadingHeader"] == 1 and stats["threads"] >= 1
    wait_until(lambda: server.stats()["active"] == 0)


def test_stop_is_idempotent_and_stats_answer_after(make_server: ServerFactory) -> None:
    server = make_server()
    with connect(server.address) as client:
        client.sendall(encode(b"x"))
        read_frame(client)
    wait_until(lambda: server.stats()["active"] == 0)
    first = server.stop()
    assert first["drained"] == 0 and first["forced"] == 0
    assert server.stop() == {"drained": 0, "forced": 0, "elapsed_s": 0.0}
    assert server.stats()["accepted"] == 1
    assert server.stats()["threads"] == 0
    assert len(server.transitions()) == 6
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=2).close()


def test_context_manager_stops(leak_guard, connlab_backend: str) -> None:
    with connlab.Server(connlab_backend) as server:
        address = server.address
        assert probe.thread_count() > leak_guard.threads
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()


def _wait_bytes_in(server: connlab.Server, n: int) -> None:
    wait_until(lambda: server.stats()["bytes_in"] == n, what=f"bytes_in == {n}")


def test_destruction_stops_without_grace(leak_guard, connlab_backend: str) -> None:
    server = connlab.Server(connlab_backend, idle_timeout=None)
    client = connect(server.address)
    client.sendall(b"\x00\x00")  # a frame in progress: only a forced close ends it
    _wait_bytes_in(server, 2)
    del server
    gc.collect()
    # The server is gone (threads joined, fds closed): the client sees its reset.
    client.settimeout(2)
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()


def _caught_signals() -> int:
    """The process's caught-signal mask as the kernel reports it (SigCgt)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))


def test_python_signal_handling_is_untouched(make_server: ServerFactory) -> None:
    """`blocking` wakes its parked threads with a real-time signal of its own: every handler the
    process had stays installed, at most that one signal is added, and a signal Python handles
    still reaches Python while connection threads are parked and while they are woken."""
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        before = _caught_signals()
        server = make_server(idle_timeout=None)
        clients = [connect(server.address) for _ in range(3)]
        wait_until(lambda: server.stats()["active"] == 3, what="3 connections registered")
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: got == [signal.SIGUSR1], what="SIGUSR1 delivered to Python")
        report = server.stop(5.0)
        # Idle connections close at once: their parked threads were woken, not left to the grace.
        assert report["drained"] == 3 and report["elapsed_s"] < 2.0, report
        for client in clients:
            client.close()
        after = _caught_signals()
        assert before & ~after == 0, f"handlers lost: {before & ~after:#x}"
        added = [n + 1 for n in range(64) if (after & ~before) >> n & 1]
        # 32 and 33, below SIGRTMIN, are the C library's own (cancellation, setxid), set on first use.
        ours = [n for n in added if n >= signal.SIGRTMIN]
        assert len(ours) <= 1 and all(n > signal.SIGSYS for n in added), added
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: len(got) == 2, what="SIGUSR1 delivered to Python after stop")
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_releases_the_gil(make_server: ServerFactory) -> None:
    server = make_server(read_timeout=10.0)
    client = connect(server.address)
    client.sendall(b"\x00\x00\x00\x10ab")  # incomplete frame: stop waits for the grace
    wait_until(lambda: server.stats()["bytes_in"] == 6)
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    report = server.stop(0.5)
    done.set()
    counter.join()
    client.close()
    assert report["forced"] == 1 and report["elapsed_s"] >= 0.45
    assert ticks >= 20, f"Python ran only {ticks} times during a 0.5 s stop: the GIL was held"
    assert server.stats()["truncated_frames"] == 1


def test_journal_off_costs_nothing_and_returns_nothing(make_server: ServerFactory) -> None:
    server = make_server(journal_capacity=0)
    with connect(server.address) as client:
        client.sendall(encode(b"x"))
        read_frame(client)
    wait_until(lambda: server.stats()["active"] == 0)
    assert server.transitions() == []


def test_journal_ring_drops_oldest(make_server: ServerFactory) -> None:
    server = make_server(journal_capacity=10)
    for _ in range(3):
        with connect(server.address) as client:
            client.sendall(encode(b"x"))
            read_frame(client)
    stats = wait_until(lambda: (s := server.stats())["closed"] == 3 and s)
    assert len(server.transitions()) == 10
    assert stats["journal_dropped"] == 3 * 6 - 10

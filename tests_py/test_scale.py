"""Many connections at once: every backend serves them, and idle ones starve nobody."""

from __future__ import annotations

import resource
import selectors
import time

import pytest

from conftest import ServerFactory
from connlab._measure.footprint import idle_footprint
from connlab.client import connect, encode, read_frame, recv_exact, wait_until


def expected_threads(backend: str, workers: int, connections: int) -> int:
    """Server threads the architecture needs for `connections` open connections."""
    return {
        "blocking": 1 + connections,  # the acceptor and one per connection
        "pool": 1 + workers,  # the dispatcher and the workers, whatever the load
        "poll": 1,
        "epoll": 1,
        "tokio": workers,
        "sharded": workers,  # one loop per shard
        "uring": 1,
    }[backend]


def test_3000_concurrent_connections_each_echo_a_frame(
    make_server: ServerFactory, connlab_backend: str
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 7000:  # 3000 clients, 3000 server sockets, and the rest
        pytest.skip(f"needs RLIMIT_NOFILE >= 7000; the session could raise it only to {soft}")
    server = make_server(idle_timeout=30.0, backlog=4096, workers=2)
    clients = []
    try:
        for _ in range(3000):
            clients.append(connect(server.address, timeout=10))
        # Every connection is open at once before any frame is sent.
        wait_until(lambda: server.stats()["active"] == 3000, timeout=10, what="3000 registered")
        sel = selectors.DefaultSelector()
        for i, client in enumerate(clients):
            client.sendall(encode(i.to_bytes(4, "big")))
            sel.register(client, selectors.EVENT_READ, i)
        answered = 0
        deadline = time.monotonic() + 20
        while answered < len(clients):
            assert time.monotonic() < deadline, f"only {answered} of 3000 answered"
            for key, _ in sel.select(timeout=1):
                assert recv_exact(key.fileobj, 8) == encode(key.data.to_bytes(4, "big"))  # type: ignore[arg-type]
                sel.unregister(key.fileobj)
                answered += 1
        sel.close()
        stats = server.stats()
        assert stats["peak_active"] == 3000 and stats["frames_out"] == 3000
        assert stats["threads"] == expected_threads(connlab_backend, 2, 3000)
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: server.stats()["active"] == 0, timeout=10, what="all closed")


def test_idle_connections_do_not_starve_a_new_client(make_server: ServerFactory) -> None:
    workers = 2
    server = make_server(workers=workers, idle_timeout=30.0)
    idle = [connect(server.address) for _ in range(2 * workers)]
    try:
        for client in idle:  # each served once, then left open and silent
            client.sendall(encode(b"hi"))
            assert read_frame(client) == b"hi"
        started = time.monotonic()
        with connect(server.address, timeout=1.0) as newcomer:
            newcomer.sendall(encode(b"me too"))
            assert read_frame(newcomer) == b"me too"
        assert time.monotonic() - started < 1.0
    finally:
        for client in idle:
            client.close()
    wait_until(lambda: server.stats()["active"] == 0)


def test_idle_footprint_counts_what_the_server_holds(connlab_backend: str) -> None:
    fp = idle_footprint(connlab_backend, steps=(0, 100, 300), workers=2)
    assert [s.connections for s in fp.samples] == [0, 100, 300]
    # Each idle connection holds its socket's fd in the server, nothing more.
    assert fp.samples[2].fds - fp.samples[0].fds == 300
    extra_threads = fp.samples[2].threads - fp.samples[0].threads
    assert extra_threads == (300 if connlab_backend == "blocking" else 0)
    assert fp.rss_per_connection > 0

"""Lifecycle scenarios of MATRIX.md over every backend (the full matrix grows in connlab.matrix)."""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import ServerFactory
from connlab import probe
from connlab.client import connect, encode, read_to_eof, recv_exact, wait_until

scenario = pytest.mark.connlab_scenario


def wait_closed(server, n: int = 0) -> dict:
    """Waits until the registry holds `n` connections; returns the stats then."""
    return wait_until(lambda: (s := server.stats())["active"] == n and s, what=f"active == {n}")


def assert_conservation(stats: dict) -> None:
    """DESIGN.md §4 conservation, at quiescence."""
    assert stats["accepted"] == stats["active"] + stats["closed"]
    assert sum(stats["closed_by"].values()) == stats["closed"]
    assert sum(stats["by_state"].values()) == stats["active"]


@scenario("S1")
def test_s1_stop_with_idle_connections(make_server: ServerFactory, connlab_backend: str) -> None:
    server = make_server(idle_timeout=60.0)
    clients = [connect(server.address) for _ in range(100)]
    try:
        wait_until(lambda: server.stats()["active"] == 100, what="100 registered")
        report = server.stop(1.0)
        assert report["forced"] == 0 and report["drained"] == 100, report
        assert report["elapsed_s"] < 0.5, report
        for client in clients:
            assert read_to_eof(client) == b""
        stats = server.stats()
        assert stats["closed_by"]["shutdown"] == 100
        assert_conservation(stats)
    finally:
        for client in clients:
            client.close()
    # The port can be bound again at once (SO_REUSEADDR; no listener left).
    port = server.address[1]
    again = make_server(port=port)
    assert again.address[1] == port


@scenario("S2")
def test_s2_stop_delivers_answers_in_flight(make_server: ServerFactory) -> None:
    server = make_server(read_timeout=10.0, write_timeout=10.0)
    payload = bytes(range(256)) * 4096  # 1 MiB
    clients = [connect(server.address, timeout=10.0) for _ in range(10)]
    try:
        for client in clients:
            client.sendall(encode(payload))
        report: dict = {}
        stopper = threading.Thread(target=lambda: report.update(server.stop(2.0)))
        stopper.start()
        for client in clients:
            assert read_to_eof(client) == encode(payload)
        stopper.join(timeout=10)
        assert report == {**report, "drained": 10, "forced": 0}
    finally:
        for client in clients:
            client.close()
    stats = server.stats()
    assert stats["closed_by"]["shutdown"] == 10 and stats["frames_out"] == 10
    assert_conservation(stats)


def test_probe_sees_no_phantoms_while_connected(make_server: ServerFactory) -> None:
    server = make_server(idle_timeout=60.0)
    clients = [connect(server.address) for _ in range(20)]
    try:
        wait_until(lambda: server.stats()["active"] == 20)
        assert probe.phantoms(server) == 0
        assert probe.port_view(server.address[1]).established == 20
    finally:
        for client in clients:
            client.close()
    wait_closed(server)


def test_recv_exact_helper_reports_early_close(make_server: ServerFactory) -> None:
    server = make_server()
    with connect(server.address) as client:
        client.sendall(encode(b"ab"))
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            recv_exact(client, 100)
    wait_closed(server)

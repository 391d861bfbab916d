"""Lifecycle scenarios of MATRIX.md over every backend (the full matrix grows in connlab.matrix)."""

from __future__ import annotations

import socket

import pytest

from conftest import ServerFactory
from connlab import probe
from connlab.client import connect, encode, recv_exact, wait_until

scenario = pytest.mark.connlab_scenario


def wait_closed(server, n: int = 0) -> dict:
    """Waits until the registry holds `n` connections; returns the stats then."""
    return wait_until(lambda: (s := server.stats())["active"] == n and s, what=f"active == {n}")


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

"""Lifecycle scenarios of MATRIX.md over every backend (the full matrix grows in connlab.matrix)."""

from __future__ import annotations

import socket
import threading
import time

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


def test_stop_drains_an_answer_being_written_then_half_closes(make_server: ServerFactory) -> None:
    """stop(grace) while a large answer is being written: the answer is delivered whole, EOF
    follows at once (not at the grace's end), and the report says drained, not forced. A backend
    that waited for input before its half-close (a thread parked in recv) fails all three."""
    # Clocks far longer than the EOF may take, so a wait for input before the half-close shows.
    clocks = {"idle_timeout": 5.0, "read_timeout": 5.0, "write_timeout": 5.0}
    server = make_server(max_frame=32 << 20, max_pending_output=64 << 20, **clocks)
    payload = bytes(range(256)) * (64 << 10)  # 16 MiB: more than the socket buffers hold
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect: the window
    client.settimeout(15.0)
    with client:
        client.connect(server.address)
        sender = threading.Thread(target=lambda: client.sendall(encode(payload)), name="sender")
        sender.start()
        assert recv_exact(client, 4) == encode(payload)[:4], "the answer has begun"
        report: dict = {}
        stopper = threading.Thread(target=lambda: report.update(server.stop(10.0)), name="stopper")
        stopper.start()  # the server is still writing: its send is blocked on our window
        try:
            body = recv_exact(client, len(payload))
            started = time.monotonic()
            tail = client.recv(1)
            eof_after = time.monotonic() - started
        finally:
            stopper.join(timeout=15)
            sender.join(timeout=5)
    assert body == payload
    assert tail == b"" and eof_after < 1.0, f"EOF {eof_after:.2f} s after the answer (grace 10 s)"
    assert not stopper.is_alive() and report["drained"] == 1 and report["forced"] == 0, report

"""Lifecycle scenarios of MATRIX.md over every backend (the full matrix grows in connlab.matrix)."""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest

from conftest import ServerFactory, T
from connlab import probe
from connlab.client import connect, encode, read_frame, read_to_eof, recv_exact, wait_until

scenario = pytest.mark.connlab_scenario


def journal(server, client: socket.socket) -> list[tuple[str | None, str, str | None]]:
    """The (from, to, reason) transitions of the client's own connection."""
    return [(f, t, r) for _, _, f, t, r, _ in server.transitions(peer=client.getsockname())]


def wait_closed(server, n: int = 0) -> dict:
    """Waits until the registry holds `n` connections; returns the stats then."""
    return wait_until(lambda: (s := server.stats())["active"] == n and s, what=f"active == {n}")


def assert_conservation(stats: dict) -> None:
    """DESIGN.md §4 conservation, at quiescence."""
    assert stats["accepted"] == stats["active"] + stats["closed"]
    assert sum(stats["closed_by"].values()) == stats["closed"]
    assert sum(stats["by_state"].values()) == stats["active"]


@scenario("H1")
def test_h1_echo_and_close(make_server: ServerFactory) -> None:
    server = make_server()
    with connect(server.address) as client:
        client.sendall(encode(b"hello"))
        assert read_frame(client) == b"hello"
        peer = client.getsockname()
    stats = wait_closed(server)
    assert [(f, t, r) for _, _, f, t, r, _ in server.transitions(peer=peer)] == [
        (None, "Connecting", None),
        ("Connecting", "ReadingHeader", None),
        ("ReadingHeader", "ReadingBody", None),
        ("ReadingBody", "Writing", None),
        ("Writing", "ReadingHeader", None),
        ("ReadingHeader", "Closing", "eof"),
    ]
    assert stats["closed_by"]["eof"] == 1
    assert server.connections() == []
    assert_conservation(stats)


@scenario("H2")
def test_h2_max_frame_in_uneven_chunks(make_server: ServerFactory) -> None:
    max_frame = 256 << 10
    server = make_server(max_frame=max_frame, read_timeout=10.0)
    payload = bytes(range(256)) * (max_frame // 256)
    frame = encode(payload)
    # The header is split across writes; the body comes in uneven pieces.
    cuts = [0, 1, 3, 7, 5000, 70_001, 150_000, len(frame)]
    seen_body_progress = set()
    with connect(server.address) as client:
        for start, end in itertools.pairwise(cuts):
            client.sendall(frame[start:end])
            if end == len(frame):
                break
            # The pause: wait until the server has read everything sent so far.
            conn = wait_until(
                lambda end=end: [c for c in server.connections() if c["bytes_in"] == end],
                what=f"server read {end} bytes",
            )[0]
            if conn["state"] == "ReadingBody":
                seen_body_progress.add(conn["bytes_in"])
        assert read_frame(client) == payload
    assert len(seen_body_progress) >= 2, seen_body_progress
    wait_closed(server)


@scenario("H4")
def test_h4_pipelined_frames_all_echoed_in_order(make_server: ServerFactory) -> None:
    server = make_server()
    payloads = [i.to_bytes(4, "big") * 16 for i in range(1000)]
    with connect(server.address) as client:
        client.sendall(b"".join(encode(p) for p in payloads))
        assert [read_frame(client) for _ in payloads] == payloads
    stats = wait_closed(server)
    assert stats["frames_in"] == stats["frames_out"] == 1000


@scenario("E2")
def test_e2_oversized_header_answers_earlier_frames_then_eof(make_server: ServerFactory) -> None:
    max_frame = 1024
    server = make_server(max_frame=max_frame)
    with connect(server.address) as client:
        client.sendall(encode(b"one") + encode(b"two") + (max_frame + 1).to_bytes(4, "big") + b"x" * 4000)
        # Both answers, then EOF, not RST (read_to_eof raises on a reset).
        assert read_to_eof(client) == encode(b"one") + encode(b"two")
        peer = client.getsockname()
    stats = wait_closed(server)
    assert journal_reasons(server, peer) == ["protocol_error"]
    assert stats["closed_by"]["protocol_error"] == 1
    assert stats["truncated_frames"] == 0
    assert stats["bytes_out"] == 2 * (4 + 3)
    with connect(server.address) as again:
        again.sendall(encode(b"still serving"))
        assert read_frame(again) == b"still serving"
    wait_closed(server)


def journal_reasons(server, peer) -> list[str]:
    return [r for _, _, _, _, r, _ in server.transitions(peer=peer) if r]


@scenario("C1")
def test_c1_half_close_answers_are_still_delivered(make_server: ServerFactory) -> None:
    server = make_server()
    payloads = [f"frame {i}".encode() for i in range(10)]
    with connect(server.address) as client:
        client.sendall(b"".join(encode(p) for p in payloads))
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"".join(encode(p) for p in payloads)
        peer = client.getsockname()
    wait_closed(server)
    assert journal_reasons(server, peer) == ["eof"]


@scenario("T1")
def test_t1_idle_connection_times_out(make_server: ServerFactory) -> None:
    server = make_server()
    started = time.monotonic()  # before connect: the server's clock cannot start earlier
    with connect(server.address) as client:
        assert read_to_eof(client) == b""
        elapsed = time.monotonic() - started
        peer = client.getsockname()
    assert T <= elapsed <= 2 * T + 0.25, elapsed
    wait_closed(server)
    assert journal_reasons(server, peer) == ["idle_timeout"]


@scenario("T2")
def test_t2_partial_header_times_out(make_server: ServerFactory) -> None:
    server = make_server()
    with connect(server.address) as client:
        started = time.monotonic()  # before the send: the server's clock cannot start earlier
        client.sendall(b"\x00\x00\x00")
        assert read_to_eof(client) == b""
        elapsed = time.monotonic() - started
        peer = client.getsockname()
    assert T <= elapsed <= 2 * T + 0.25, elapsed
    stats = wait_closed(server)
    assert journal_reasons(server, peer) == ["read_timeout"]
    assert stats["truncated_frames"] == 1


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


def test_c1_probe_sees_no_phantoms_while_connected(make_server: ServerFactory) -> None:
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

"""The load generator from Python: answers checked byte for byte, coordinated omission avoided, churn
against every backend, arguments validated, the loopback baseline, the GIL released."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import connlab
from conftest import ServerFactory
from connlab import load
from connlab.client import encode, recv_exact, wait_until

Mischief = Callable[[int, bytearray], None]


class PyEchoServer:
    """A thread-per-connection framed echo server in Python. Before answer `n` (counted over all
    connections, from 0) goes out, `mischief(n, frame)` may change its bytes or stall."""

    def __init__(self, mischief: Mischief) -> None:
        self._mischief = mischief
        self._listener = socket.create_server(("127.0.0.1", 0))
        # The accept loop wakes this often to see `close()`.
        self._listener.settimeout(0.05)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._answers = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="py-echo-accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="py-echo")
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    header = recv_exact(conn, 4)
                    frame = bytearray(header + recv_exact(conn, int.from_bytes(header, "big")))
                except (EOFError, OSError):
                    return
                with self._lock:
                    n = self._answers
                    self._answers += 1
                self._mischief(n, frame)
                try:
                    conn.sendall(frame)
                except OSError:
                    return

    def close(self) -> None:
        """Stops accepting and waits for every connection to end (the generator closes them)."""
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5.0)
            assert not thread.is_alive(), "a connection of the test server did not end"


@contextmanager
def py_echo_server(mischief: Mischief) -> Iterator[PyEchoServer]:
    server = PyEchoServer(mischief)
    try:
        yield server
    finally:
        server.close()


def no_errors(result: load.Result) -> bool:
    return not any(result["errors"].values())


def test_one_corrupted_byte_is_reported_as_one_corrupt_error(leak_guard: Any) -> None:
    def flip_one_byte(n: int, frame: bytearray) -> None:
        if n == 300:
            frame[-1] ^= 0x20

    with py_echo_server(flip_one_byte) as server:
        result = load.closed_loop(server, connections=2, duration=0.5, warmup=0.0)
    assert result["errors"]["corrupt"] == 1, result["errors"]
    assert sum(result["errors"].values()) == 1, result["errors"]
    assert result["frames"] > 300, "the connection was reopened and the run went on"


def test_a_stall_shows_in_the_open_loop_tail_and_hides_from_closed_loop_percentiles(
    leak_guard: Any,
) -> None:
    def stall_once(n: int, frame: bytearray) -> None:
        if n == 400:
            time.sleep(0.2)  # the server's misbehaviour under test, not a wait for a condition

    with py_echo_server(stall_once) as server:
        opened = load.open_loop(server, rate=1000, connections=1, duration=0.8, warmup=0.1)
    assert no_errors(opened), opened["errors"]
    assert opened["frames"] == 800, "every frame due in the window was answered and counted"
    assert opened["latency_us"]["max"] >= 200_000, opened["latency_us"]
    # Frames due during the stall waited for it too: the tail is fat, not one sample.
    assert opened["latency_us"]["p90"] >= 20_000, opened["latency_us"]

    with py_echo_server(stall_once) as server:
        closed = load.closed_loop(server, connections=1, duration=0.8, warmup=0.0)
    assert no_errors(closed), closed["errors"]
    assert closed["latency_us"]["max"] >= 200_000, closed["latency_us"]
    assert closed["latency_us"]["p50"] < 20_000, closed["latency_us"]
    assert closed["latency_us"]["p90"] < 20_000, "one slow sample among thousands"


@pytest.mark.parametrize(("rst", "reason"), [(False, "eof"), (True, "reset")])
def test_churn_against_every_backend(make_server: ServerFactory, rst: bool, reason: str) -> None:
    server = make_server()
    result = load.churn(server, cycles=50, parallel=5, rst=rst)
    assert no_errors(result), result["errors"]
    assert result["frames"] == result["connects"] == 250
    assert result["conns_per_s"] > 0 and result["latency_us"]["p50"] > 0
    stats = wait_until(
        lambda: (s := server.stats())["closed"] == 250 and s["active"] == 0 and s,
        what="the server closed all 250",
    )
    assert stats["closed_by"][reason] == 250, stats["closed_by"]
    assert stats["frames_in"] == stats["frames_out"] == 250


def test_closed_loop_against_epoll(leak_guard: Any) -> None:
    with connlab.Server("epoll", idle_timeout=30.0, journal_capacity=0) as server:
        result = load.closed_loop(server, connections=10, pipeline=2, duration=0.4, warmup=0.1)
        stats = wait_until(lambda: (s := server.stats())["closed"] == 10 and s, what="all 10 closed")
    assert no_errors(result) and result["lost"] == 0, result
    assert result["mode"] == "closed_loop" and result["threads"] == 1 and result["rate"] is None
    assert result["frames"] > 100 and result["bytes"] == result["frames"] * 68
    assert result["frames_per_s"] == pytest.approx(result["frames"] / result["elapsed_s"])
    lat = result["latency_us"]
    assert lat["count"] == result["frames"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert set(result["errors"]) == set(load.ERROR_KINDS)
    assert load.histogram_base64(result).startswith("HISTF")
    # The drain awaited every answer: each connection ended with an orderly EOF.
    assert stats["closed_by"]["eof"] == 10
    assert stats["frames_in"] == stats["frames_out"] >= result["frames"]


ADDRESS = ("127.0.0.1", 9)


@pytest.mark.parametrize(
    ("run", "kwargs", "name"),
    [
        (load.closed_loop, {"connections": 0}, "connections"),
        (load.closed_loop, {"connections": -1}, "connections"),
        (load.closed_loop, {"size": -1}, "size"),
        (load.closed_loop, {"size": 1 << 30}, "size"),
        (load.closed_loop, {"pipeline": 0}, "pipeline"),
        (load.closed_loop, {"duration": 0.0}, "duration"),
        (load.closed_loop, {"duration": float("nan")}, "duration"),
        (load.closed_loop, {"warmup": -1.0}, "warmup"),
        (load.closed_loop, {"threads": 0}, "threads"),
        (load.closed_loop, {"timeout": 0.0}, "timeout"),
        (load.closed_loop, {"target": ("not-an-ip", 1)}, "address"),
        (load.closed_loop, {"target": ("127.0.0.1", 0)}, "address"),
        (load.closed_loop, {"target": ("127.0.0.1", 70_000)}, "address"),
        (load.closed_loop, {"target": "127.0.0.1:80"}, "address"),
        (load.open_loop, {"rate": 0.0}, "rate"),
        (load.open_loop, {"rate": -5.0}, "rate"),
        (load.open_loop, {"rate": float("inf")}, "rate"),
        (load.open_loop, {"rate": 100.0, "connections": 0}, "connections"),
        (load.churn, {"cycles": 0, "parallel": 1}, "cycles"),
        (load.churn, {"cycles": 1, "parallel": 0}, "parallel"),
        (load.churn, {"cycles": 1, "parallel": 1, "deadline": 0.0}, "deadline"),
        (load.pingpong, {"size": -1}, "size"),
        (load.pingpong, {"duration": 0.0}, "duration"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    run: Callable[..., load.Result], kwargs: dict[str, Any], name: str, leak_guard: Any
) -> None:
    if run is not load.pingpong:
        kwargs = {"target": ADDRESS, **kwargs}
    if run is load.open_loop:
        kwargs.setdefault("rate", 100.0)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        run(**kwargs)


def test_pingpong_measures_the_loopback_round_trip(leak_guard: Any) -> None:
    result = load.pingpong(duration=0.3)
    assert no_errors(result), result["errors"]
    assert result["mode"] == "pingpong" and result["connections"] == 1
    assert result["frames"] > 100
    assert 0 < result["latency_us"]["p50"] < 1_000, result["latency_us"]


def test_runs_release_the_gil(leak_guard: Any) -> None:
    done = threading.Event()

    def run() -> None:
        load.pingpong(duration=0.5, warmup=0.0)
        done.set()

    runner = threading.Thread(target=run)
    runner.start()
    ticks = 0
    while not done.wait(0.001):
        ticks += 1
    runner.join()
    # Holding the GIL for 0.5 s would leave this thread a tick or two.
    assert ticks > 50, ticks


def test_nobody_listening_is_counted_not_raised(leak_guard: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[:2]
    result = load.churn(free, cycles=2, parallel=2)
    assert result["frames"] == 0 and result["errors"]["connect"] == 4


def test_load_is_public() -> None:
    assert "load" in connlab.__all__ and connlab.load is load
    assert load.ERROR_KINDS == ("connect", "reset", "eof", "corrupt", "timeout", "io")
    assert encode(b"") == b"\0\0\0\0"  # the framing both ends share


def test_start_runs_in_the_background_and_its_takes_add_up_to_its_result(leak_guard: Any) -> None:
    with connlab.Server("epoll", journal_capacity=0) as server:
        running = load.start(server, connections=4, threads=2)
        takes = [running.take()]
        # start() returned at once and the load goes on: later takes hold frames.
        wait_until(lambda: takes.append(running.take()) or takes[-1]["frames"] > 0, what="frames taken")
        assert not running.done
        running.stop()
        wait_until(lambda: running.done, timeout=5.0, what="the run to end after stop()")
        takes.append(running.take())
        result = running.result()
        wait_until(lambda: server.stats()["closed"] == 4, what="all 4 closed")
        stats = server.stats()
    assert result["mode"] == "closed_loop" and no_errors(result) and result["lost"] == 0, result
    assert sum(t["frames"] for t in takes) == result["frames"] > 0
    merged = load.merge_histograms(t["histogram"] for t in takes)
    assert load.histogram_counts(merged) == load.histogram_counts(result["histogram"])
    assert sum(n for _, n in load.histogram_counts(merged)) == result["frames"]
    assert stats["closed_by"]["eof"] == 4, "the drain awaited every answer"
    assert running.result() == result, "the report is kept"


def test_start_with_a_rate_is_an_open_loop(leak_guard: Any) -> None:
    with connlab.Server("epoll", journal_capacity=0) as server:
        running = load.start(server, connections=2, rate=2000.0, duration=0.3)
        wait_until(lambda: running.done, timeout=5.0, what="a 0.3 s run to end by itself")
        result = running.result()
    assert result["mode"] == "open_loop" and result["rate"] == 2000.0 and no_errors(result), result
    # Frames due in [0, 0.3 s) at 2000/s.
    assert result["frames"] == 600 == running.take()["frames"]


def test_a_dropped_run_stops_and_closes_its_connections(leak_guard: Any) -> None:
    with connlab.Server("epoll", journal_capacity=0) as server:
        running = load.start(server, connections=3)
        wait_until(lambda: server.stats()["active"] == 3, what="3 connections open")
        del running
        stats = wait_until(lambda: (s := server.stats())["closed"] == 3 and s, timeout=5.0, what="all closed")
    assert stats["closed_by"]["eof"] == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"connections": 0}, "connections"),
        ({"size": -1}, "size"),
        ({"pipeline": 0}, "pipeline"),
        ({"rate": 0.0}, "rate"),
        ({"duration": 0.0}, "duration"),
        ({"warmup": float("nan")}, "warmup"),
        ({"threads": 0}, "threads"),
        ({"timeout": 0.0}, "timeout"),
        ({"target": ("127.0.0.1", 0)}, "address"),
    ],
)
def test_start_refuses_bad_arguments_at_once(kwargs: dict[str, Any], name: str) -> None:
    kwargs = {"target": ADDRESS, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        load.start(**kwargs)

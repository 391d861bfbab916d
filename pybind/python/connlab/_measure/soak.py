"""`connlab soak`: many persistent connections over a long run, sampled every few seconds, ending
in a verdict: no phantoms, few errors, no growth of memory or threads, a clean shutdown."""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from connlab import probe
from connlab._measure.footprint import slope
from connlab._native import Server
from connlab.probe import raise_nofile

HEADER = struct.Struct(">I")


@dataclass
class SoakConfig:
    """The run and its pass criteria."""

    backend: str
    connections: int = 1000
    ramp_rate: float = 500.0  # new connections per second
    interval: float = 1.0  # seconds between one connection's frames
    duration: float = 60.0  # seconds, ramp included
    sample_every: float = 2.0
    size: int = 64
    workers: int = 2
    max_phantoms: int = 0
    max_error_rate: float = 0.01
    # Growth after the ramp that still counts as flat: RSS bytes per second, threads per second.
    max_rss_slope: float = 64 << 10
    max_thread_slope: float = 0.01


@dataclass
class Sample:
    """One look at both sides."""

    t: float
    server_active: int
    kernel_established: int
    kernel_close_wait: int
    clients_connected: int
    phantoms: int
    errors: int
    frames: int
    rss_bytes: int
    threads: int
    fds: int
    server_cpu_pct: float


@dataclass
class Client:
    """One persistent connection of the soak."""

    sock: socket.socket
    next_send: float
    payload: bytes
    pending: bytes = b""
    inbuf: bytes = b""
    waiting: int = 0


#: What can go wrong with a client: its connect fails, it is reset, it meets an EOF, or an answer
#: differs from its frame.
ERROR_KINDS = ("connect", "reset", "eof", "corrupt")


class Clients:
    """The soak's client side, in a process of its own (spawned, not forked: the server's threads
    live here), so its sockets count against neither this process's fds nor its RSS, CPU and
    threads, which are then the server's (with Python's). Its counters are shared memory, written
    by the client process only."""

    def __init__(self, cfg: SoakConfig, address: tuple[str, int]) -> None:
        ctx = mp.get_context("spawn")
        self.stop, self.ready = ctx.Event(), ctx.Event()
        self._connected = ctx.Value("q", 0)
        self._frames = ctx.Value("q", 0)
        self._errors = ctx.Array("q", len(ERROR_KINDS))
        self.process = ctx.Process(
            target=_run_clients,
            args=(cfg, address),
            kwargs={
                "stop": self.stop,
                "ready": self.ready,
                "connected": self._connected,
                "frames": self._frames,
                "errors": self._errors,
            },
            name="soak-clients",
            daemon=True,
        )

    @property
    def connected(self) -> int:
        return int(self._connected.value)

    @property
    def frames(self) -> int:
        return int(self._frames.value)

    @property
    def errors(self) -> dict[str, int]:
        return {kind: int(n) for kind, n in zip(ERROR_KINDS, self._errors[:], strict=True) if n}

    def start(self, timeout: float = 60.0) -> None:
        """Starts the client process and waits until it is about to open its first connection (a
        spawned interpreter takes a moment), so the ramp runs on the caller's clock; RuntimeError
        if it dies or takes longer."""
        self.process.start()
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.finish()
                raise RuntimeError(f"the soak's client process did not start: {self.ended()}")

    def alive(self) -> bool:
        return self.process.is_alive()

    def ended(self) -> str:
        """How the client process ended, for a message."""
        code = self.process.exitcode
        if code is None:
            return "still running"
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"

    def finish(self, timeout: float = 30.0) -> None:
        """Tells the client process to close every connection, and waits for it to exit."""
        self.stop.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _run_clients(
    cfg: SoakConfig,
    address: tuple[str, int],
    *,
    stop: Any,
    ready: Any,
    connected: Any,
    frames: Any,
    errors: Any,
) -> None:
    """The client process: ramps the connections up, sends each one's frame every interval and
    checks its answer, until `stop`; then closes them all."""

    def error(kind: str) -> None:
        with errors.get_lock():
            errors[ERROR_KINDS.index(kind)] += 1

    def drop(c: Client, kind: str | None) -> None:
        if kind:
            error(kind)
        sel.unregister(c.sock)
        del clients[c.sock]
        c.sock.close()
        with connected.get_lock():
            connected.value -= 1

    sel = selectors.DefaultSelector()
    clients: dict[socket.socket, Client] = {}
    ready.set()
    started = time.monotonic()
    opened = 0
    while not stop.is_set():
        now = time.monotonic()
        # Ramp: open connections at ramp_rate until all are open.
        due = min(cfg.connections, int((now - started) * cfg.ramp_rate) + 1)
        while opened < due:
            opened += 1
            try:
                sock = socket.create_connection(address, timeout=5)
            except OSError:
                error("connect")
                continue
            sock.setblocking(False)
            payload = opened.to_bytes(4, "big") * (cfg.size // 4) + b"x" * (cfg.size % 4)
            # Spread the sends of different connections over the interval.
            c = Client(sock, now + (opened % 97) / 97 * cfg.interval, HEADER.pack(len(payload)) + payload)
            clients[sock] = c
            sel.register(sock, selectors.EVENT_READ)
            with connected.get_lock():
                connected.value += 1
        for c in list(clients.values()):
            if now >= c.next_send and c.waiting == 0:
                c.next_send += cfg.interval
                c.pending += c.payload
                c.waiting += 1
            if c.pending:
                try:
                    sent = c.sock.send(c.pending)
                    c.pending = c.pending[sent:]
                except BlockingIOError:
                    pass
                except OSError:
                    drop(c, "reset")
        next_due = min((c.next_send for c in clients.values()), default=now + 0.05)
        timeout = max(0.0, min(next_due - time.monotonic(), 0.05))
        for key, _ in sel.select(timeout):
            c = clients.get(key.fileobj)  # type: ignore[arg-type]
            if c is None:
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                drop(c, "reset")
                continue
            if not data:
                drop(c, "eof")
                continue
            c.inbuf += data
            while len(c.inbuf) >= len(c.payload):
                answer, c.inbuf = c.inbuf[: len(c.payload)], c.inbuf[len(c.payload) :]
                if answer != c.payload:
                    error("corrupt")
                c.waiting -= 1
                with frames.get_lock():
                    frames.value += 1
    for c in list(clients.values()):
        drop(c, None)
    sel.close()


def run_soak(cfg: SoakConfig, emit: Callable[[Sample], None] = lambda _: None) -> dict[str, Any]:
    """Runs the soak; returns the samples, the criteria with their outcome, and the verdict."""
    raise_nofile(cfg.connections + 256)  # here the server's sockets; the client process inherits it
    server = Server(
        cfg.backend,
        workers=cfg.workers,
        idle_timeout=max(10.0, 5 * cfg.interval),
        read_timeout=10.0,
        write_timeout=10.0,
        journal_capacity=0,
        backlog=4096,
    )
    port = server.address[1]
    clients = Clients(cfg, server.address)
    samples: list[Sample] = []
    pid = os.getpid()
    try:
        clients.start()
    except BaseException:
        server.stop(0)
        raise
    started = time.monotonic()
    cpu_prev, t_prev = probe.threads_cpu_seconds("connlab-"), started
    try:
        while (elapsed := time.monotonic() - started) < cfg.duration:
            time.sleep(min(cfg.sample_every, max(0.0, cfg.duration - elapsed)))  # the sampling period
            now = time.monotonic()
            cpu = probe.threads_cpu_seconds("connlab-")
            stats = server.stats()
            view = probe.port_view(port)
            connected, frames, errors = clients.connected, clients.frames, sum(clients.errors.values())
            sample = Sample(
                t=round(now - started, 2),
                server_active=stats["active"],
                kernel_established=view.established,
                kernel_close_wait=view.close_wait,
                clients_connected=connected,
                phantoms=stats["active"] - probe.owned_server_sockets(port, pid),
                errors=errors,
                frames=frames,
                rss_bytes=probe.rss_bytes(),
                threads=probe.thread_count(),
                fds=probe.fd_count(),
                server_cpu_pct=round(100 * (cpu - cpu_prev) / (now - t_prev), 2),
            )
            cpu_prev, t_prev = cpu, now
            samples.append(sample)
            emit(sample)
            if not clients.alive():  # the load is gone: what follows would judge an idle server
                break
    except BaseException:  # Ctrl-C or SIGTERM included: the server goes with the run
        server.stop(0)
        raise
    finally:
        lived = clients.alive()
        clients.finish()
    # Clean shutdown: once the clients are gone the server holds nothing, then stops cleanly.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (server.stats()["active"] or probe.port_view(port).close_wait):
        time.sleep(0.01)
    left_server, left_kernel = server.stats()["active"], probe.port_view(port).total
    report = server.stop(1.0)
    return {
        "config": asdict(cfg),
        "samples": [asdict(s) for s in samples],
        **verdict(
            cfg,
            samples=samples,
            errors=clients.errors,
            clients_ended="ran to the end, exit status 0"
            if lived and clients.process.exitcode == 0
            else f"died during the run ({clients.ended()})"
            if not lived
            else f"did not stop when told ({clients.ended()})",
            left_server=left_server,
            left_kernel=left_kernel,
            stop_report=report,
        ),
    }


def verdict(
    cfg: SoakConfig,
    *,
    samples: list[Sample],
    errors: dict[str, int],
    clients_ended: str,
    left_server: int,
    left_kernel: int,
    stop_report: dict[str, Any],
) -> dict[str, Any]:
    """The criteria, each with what was measured and whether it held."""
    ramp_end = cfg.connections / cfg.ramp_rate
    steady = [s for s in samples if s.t >= ramp_end + cfg.interval] or samples
    frames = max((s.frames for s in samples), default=0)
    error_count = sum(errors.values())
    # Phantoms are judged where DESIGN.md §4 defines them, at quiescence: after the ramp no
    # connection is accepted or closed, while during it the two counts are read microseconds
    # apart as connections arrive.
    worst_phantoms = max((abs(s.phantoms) for s in steady), default=0)
    rss_slope = slope([s.t for s in steady], [s.rss_bytes for s in steady]) if len(steady) >= 2 else 0.0
    thread_slope = slope([s.t for s in steady], [s.threads for s in steady]) if len(steady) >= 2 else 0.0
    error_rate = error_count / max(frames + error_count, 1)
    criteria = [
        (
            f"phantoms <= {cfg.max_phantoms} at every sample after the ramp",
            worst_phantoms <= cfg.max_phantoms,
            f"worst {worst_phantoms}",
        ),
        (
            f"errors < {100 * cfg.max_error_rate:g}% of frames",
            error_rate < cfg.max_error_rate,
            f"{error_count} errors ({errors}) over {frames} frames = {error_rate:.3%}",
        ),
        (
            "RSS not trending up after the ramp",
            rss_slope <= cfg.max_rss_slope,
            f"slope {rss_slope / 1024:+.1f} KiB/s (limit {cfg.max_rss_slope / 1024:.0f})",
        ),
        (
            "threads not trending up after the ramp",
            thread_slope <= cfg.max_thread_slope,
            f"slope {thread_slope:+.3f} threads/s",
        ),
        (
            "the client process ran the whole soak",
            clients_ended.startswith("ran to the end"),
            clients_ended,
        ),
        (
            "every connection came up",
            max((s.clients_connected for s in samples), default=0) == cfg.connections,
            f"peak {max((s.clients_connected for s in samples), default=0)} of {cfg.connections}",
        ),
        (
            "clean shutdown: 0 connections left on either side",
            left_server == 0 and left_kernel == 0,
            f"server {left_server}, kernel {left_kernel}; stop {stop_report}",
        ),
    ]
    rows = [{"criterion": c, "held": bool(ok), "measured": m} for c, ok, m in criteria]
    return {"criteria": rows, "passed": all(r["held"] for r in rows)}

"""A backend in a `connlab serve` child to measure, and what idle connections cost it: the
child's RSS, threads and fds as they grow."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from connlab import probe
from connlab.client import connect, encode, read_frame, wait_until
from connlab.probe import raise_nofile
from connlab.process import ServeProcess, connlab_serve_argv


@dataclass(frozen=True)
class Sample:
    """The server process with `connections` idle connections open."""

    connections: int
    rss_bytes: int
    threads: int
    fds: int


@dataclass(frozen=True)
class Footprint:
    """Samples at each step, and the RSS slope over them (bytes per idle connection)."""

    backend: str
    samples: tuple[Sample, ...]

    @property
    def rss_per_connection(self) -> float:
        """Least-squares slope of RSS over connections."""
        return slope([s.connections for s in self.samples], [s.rss_bytes for s in self.samples])


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        raise ValueError("need at least two different x values")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def serve_child(backend: str, workers: int | None, cpu: int | None = None) -> ServeProcess:
    """A backend in its own `connlab serve` process, so its threads, RSS and CPU are its own:
    timeouts off (a measurement pauses connections), room for every connection, pinned to `cpu`."""
    kwargs = {"idle_timeout": 0, "read_timeout": 0, "write_timeout": 0, "backlog": 8192}
    if workers is not None:  # else its default, the number of cores
        kwargs["workers"] = workers
    server = ServeProcess(connlab_serve_argv(backend, max_connections=100_000, **kwargs), start_timeout=30.0)
    if cpu is not None:
        try:
            pin(server.pid, cpu)
        except BaseException:
            server.close()
            raise
    return server


def pin(pid: int, cpu: int) -> None:
    """Pins every thread process `pid` has by now to `cpu`; the threads they start later inherit
    the mask."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def idle_footprint(
    backend: str, steps: Sequence[int] = (0, 1000, 5000), workers: int | None = None
) -> Footprint:
    """Runs `backend` in a child process and opens idle connections to it, step by step.

    Each connection is served one small frame first (so any buffer a backend allocates for
    traffic has been allocated once), then left open and silent. At each step, once the
    kernel shows every connection established in the child, the child's RSS, native threads
    and fds are sampled. Timeouts are disabled so nothing closes meanwhile.
    """
    if list(steps) != sorted(steps) or not steps:
        raise ValueError(f"steps must be non-empty and ascending, got {list(steps)}")
    raise_nofile(2 * steps[-1] + 256)  # the child inherits the raised limit
    with serve_child(backend, workers) as child:
        return Footprint(backend=backend, samples=tuple(measure_idle(child.address, child.pid, steps)))


def measure_idle(address: tuple[str, int], pid: int, steps: Sequence[int]) -> list[Sample]:
    """Opens idle connections to a running server `pid` step by step (each served one frame
    first) and samples the process at each step; closes them all before returning."""
    clients = []
    try:
        samples = []
        for target in steps:
            while len(clients) < target:
                client = connect(address, timeout=10)
                client.sendall(encode(b"ping"))
                if read_frame(client) != b"ping":
                    raise RuntimeError("the server answered with a different frame")
                clients.append(client)
            wait_until(
                lambda target=target: probe.port_view(address[1], pid=pid).established == target,
                timeout=10,
                what=f"{target} connections established in the server",
            )
            samples.append(
                Sample(
                    connections=target,
                    rss_bytes=probe.rss_bytes(pid),
                    threads=probe.thread_count(pid),
                    fds=probe.fd_count(pid),
                )
            )
        return samples
    finally:
        for client in clients:
            client.close()

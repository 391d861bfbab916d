"""`connlab bench`: every backend in its own `connlab serve` child, loaded by the Rust generator.

Backends are interleaved within each repetition (A B C D E, A B C D E, ...) so drift on a
shared machine hits all alike; each figure is reported as the median with min-max."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from connlab import load, probe
from connlab._measure.footprint import measure_idle, slope
from connlab.probe import raise_nofile


@dataclass(frozen=True)
class Workload:
    """One measurement: `kind` is closed, open, churn, rtt or idle."""

    name: str
    kind: str
    connections: int = 1
    size: int = 64
    rate: int = 0
    cycles: int = 0
    parallel: int = 0
    steps: tuple[int, ...] = ()


def default_workloads(
    connections: Sequence[int] = (1, 10, 100, 1000, 5000),
    rate: int = 20_000,
    churn: tuple[int, int] = (1000, 10),
    idle_steps: tuple[int, ...] = (0, 1000, 5000),
) -> list[Workload]:
    """The workloads of the comparison, in the order they run on each server: idle memory, 64 B
    closed loop at each connection count, 16 KiB frames at 10 connections, an open loop at a
    fixed rate, churn, and the one-connection round trip."""
    # Idle memory first, on the freshly started server: after the loads, memory the allocator keeps
    # for reuse would absorb the idle connections and hide their cost.
    work = [Workload("idle", "idle", steps=idle_steps)]
    work += [Workload(f"closed64-c{c}", "closed", connections=c, size=64) for c in connections]
    work.append(Workload("closed16k-c10", "closed", connections=10, size=16 << 10))
    work.append(Workload(f"open64-r{rate}", "open", connections=100, size=64, rate=rate))
    work.append(Workload(f"churn-{churn[0]}x{churn[1]}", "churn", cycles=churn[0], parallel=churn[1]))
    work.append(Workload("rtt", "rtt", connections=1, size=64))
    return work


@dataclass
class BenchConfig:
    """What to run and how long."""

    backends: list[str]
    workloads: list[Workload]
    repetitions: int = 3
    duration: float = 2.0
    warmup: float = 0.5
    workers: int = 2
    pin: bool = False
    gen_threads: int | None = None


@dataclass
class Run:
    """One workload on one backend in one repetition."""

    backend: str
    workload: str
    rep: int
    metrics: dict[str, Any] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    """The machine the figures come from."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_avg": os.getloadavg(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ServerChild:
    """A backend in its own `connlab serve` process (journal off, timeouts off)."""

    def __init__(self, backend: str, workers: int, cpu: int | None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "connlab",
            "serve",
            "--backend",
            backend,
            "--port",
            "0",
            "--workers",
            str(workers),
            "--idle-timeout",
            "0",
            "--read-timeout",
            "0",
            "--write-timeout",
            "0",
            "--backlog",
            "8192",
            "--max-connections",
            "100000",
        ]
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        if cpu is not None:
            os.sched_setaffinity(self.child.pid, {cpu})
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError(f"connlab serve --backend {backend} did not start")
        listening = json.loads(line)
        self.address = (listening["host"], int(listening["port"]))
        self.pid = self.child.pid
        self.proc = psutil.Process(self.pid)

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        if self.child.stdout:
            self.child.stdout.close()


def measure(server: ServerChild, w: Workload, cfg: BenchConfig) -> dict[str, Any]:
    """Runs one workload against a running server child; returns its figures. The server's
    threads and RSS are sampled in the middle of the measured window, while the load is on."""
    m: dict[str, Any] = {}
    if w.kind == "idle":
        samples = measure_idle(server.address, server.pid, w.steps)
        m["idle_samples"] = [asdict(s) for s in samples]
        m["rss_per_conn_bytes"] = slope([s.connections for s in samples], [s.rss_bytes for s in samples])
        m["threads_by_step"] = {s.connections: s.threads for s in samples}
        m["server_threads"] = samples[-1].threads
        m["server_rss_bytes"] = samples[-1].rss_bytes
        return m
    if w.kind in {"closed", "rtt"}:
        run = lambda: load.closed_loop(  # noqa: E731
            server.address,
            connections=w.connections,
            size=w.size,
            pipeline=1,
            duration=cfg.duration,
            warmup=cfg.warmup,
            threads=cfg.gen_threads,
        )
    elif w.kind == "open":
        run = lambda: load.open_loop(  # noqa: E731
            server.address,
            rate=w.rate,
            connections=w.connections,
            size=w.size,
            duration=cfg.duration,
            warmup=cfg.warmup,
            threads=cfg.gen_threads,
        )
    elif w.kind == "churn":
        run = lambda: load.churn(server.address, cycles=w.cycles, parallel=w.parallel, size=w.size)  # noqa: E731
    else:
        raise ValueError(f"unknown workload kind {w.kind!r}")
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-load") as pool:
        running = pool.submit(run)  # the generator releases the GIL
        mid = t0 + (cfg.warmup + cfg.duration / 2 if w.kind != "churn" else 0.05)
        threads, rss = 0, 0
        while not running.done():
            if time.monotonic() >= mid:
                threads = max(threads, probe.thread_count(server.pid))
                rss = max(rss, probe.rss_bytes(server.pid))
                mid = float("inf")
            running_wait(running, 0.01)
        result = running.result()
    elapsed = time.monotonic() - t0
    m.update(_load_figures(result))
    m["server_cpu_pct"] = 100 * (server.cpu_seconds() - cpu0) / elapsed
    m["server_threads"] = threads or probe.thread_count(server.pid)
    m["server_rss_bytes"] = rss or probe.rss_bytes(server.pid)
    return m


def running_wait(future: Future[Any], seconds: float) -> None:
    """Waits up to `seconds` for `future` (a short poll between samples)."""
    with suppress(TimeoutError):
        future.result(timeout=seconds)


def _load_figures(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("frames", "bytes", "elapsed_s", "frames_per_s", "mb_per_s", "conns_per_s", "errors", "latency_us")
    return {k: r[k] for k in keys if k in r}


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every workload on every backend, `repetitions` times, interleaved; returns the raw runs,
    their summary, the loopback baseline and the machine."""
    if cfg.repetitions < 1:
        raise ValueError("repetitions: must be at least 1")
    most = max([w.connections for w in cfg.workloads] + [max(w.steps, default=0) for w in cfg.workloads])
    raise_nofile(2 * most + 1024)
    server_cpu, gen_cpu = (0, 1) if cfg.pin and (os.cpu_count() or 1) >= 2 else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    runs: list[Run] = []
    pingpong: list[dict[str, Any]] = []
    try:
        for rep in range(cfg.repetitions):
            progress(f"rep {rep + 1}/{cfg.repetitions}: raw loopback ping-pong")
            pingpong.append(load.pingpong(size=64, duration=min(cfg.duration, 1.0)))
            for backend in cfg.backends:
                server = ServerChild(backend, cfg.workers, server_cpu)
                try:
                    for w in cfg.workloads:
                        progress(f"rep {rep + 1}/{cfg.repetitions}: {backend} {w.name}")
                        runs.append(Run(backend, w.name, rep, measure(server, w, cfg)))
                finally:
                    server.close()
    finally:
        if gen_cpu is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {
        "config": {**asdict(cfg), "workloads": [asdict(w) for w in cfg.workloads]},
        "machine": machine(),
        "pinning": f"server on CPU {server_cpu}, generator on CPU {gen_cpu}"
        if gen_cpu is not None
        else "none",
        "pingpong": pingpong,
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs, cfg),
    }


# The figure each workload kind is judged by, and whether higher is better.
PRIMARY = {
    "closed": ("frames_per_s", True),
    "open": ("p99_us", False),
    "churn": ("conns_per_s", True),
    "rtt": ("p50_us", False),
    "idle": ("rss_per_conn_bytes", False),
}


def figure(metrics: dict[str, Any], name: str) -> float | None:
    """A named figure of one run: a top-level metric or a latency percentile (p50_us, ...)."""
    if name.endswith("_us") and "latency_us" in metrics:
        key = {"p999_us": "p99.9"}.get(name, name.removesuffix("_us"))
        value = metrics["latency_us"].get(key)
        return float(value) if value is not None else None
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def summarize(runs: list[Run], cfg: BenchConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """workload → backend → {figure: {median, min, max}} for the figures that matter."""
    names = [
        "frames_per_s",
        "mb_per_s",
        "conns_per_s",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "rss_per_conn_bytes",
        "server_threads",
        "server_rss_bytes",
        "server_cpu_pct",
    ]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for w in cfg.workloads:
        for b in cfg.backends:
            mine = [r.metrics for r in runs if r.workload == w.name and r.backend == b]
            cell: dict[str, Any] = {}
            for name in names:
                values = [v for m in mine if (v := figure(m, name)) is not None]
                if values:
                    cell[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            errors: dict[str, int] = {}
            for m in mine:
                for kind, n in (m.get("errors") or {}).items():
                    errors[kind] = errors.get(kind, 0) + int(n)
            cell["errors"] = errors
            if w.kind == "idle":
                cell["threads_by_step"] = mine[-1].get("threads_by_step") if mine else {}
            out.setdefault(w.name, {})[b] = cell
    return out

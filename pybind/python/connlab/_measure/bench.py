"""`connlab bench`: every backend in its own `connlab serve` child, loaded by the Rust generator.

Backends are interleaved within each repetition (A B C D E, A B C D E, ...) so drift on a
shared machine hits all alike; each figure is reported as the median with min-max."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import psutil

from connlab import load, probe
from connlab._measure.footprint import measure_idle, serve_child, slope
from connlab.probe import raise_nofile
from connlab.process import ServeProcess, connlab_proxy_argv

Kind = Literal["idle", "closed", "open", "churn", "rtt"]


@dataclass(frozen=True)
class Workload:
    """One measurement, by its parameters; `name` is only its label (and JSON key), never parsed.

    `idle`: memory per idle connection over `steps` connection counts; `closed`: closed-loop load
    of `connections` with `size`-byte frames; `open`: `rate` frames/s over `connections`; `churn`:
    `cycles` x `parallel` connect-echo-close; `rtt`: one connection's round trip."""

    kind: Kind
    connections: int = 1
    size: int = 64
    rate: int = 0
    cycles: int = 0
    parallel: int = 0
    steps: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        size = f"{self.size >> 10}k" if self.size >= 1024 and self.size % 1024 == 0 else str(self.size)
        return {
            "closed": f"closed{size}-c{self.connections}",
            "open": f"open{size}-r{self.rate}",
            "churn": f"churn-{self.cycles}x{self.parallel}",
        }.get(self.kind, self.kind)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


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
    return [
        Workload("idle", steps=idle_steps),
        *(Workload("closed", connections=c) for c in connections),
        Workload("closed", connections=10, size=16 << 10),
        Workload("open", connections=100, rate=rate),
        Workload("churn", cycles=churn[0], parallel=churn[1]),
        Workload("rtt"),
    ]


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
    #: Also load each backend through `connlab proxy` with no toxic, as `<backend>+proxy`.
    proxy: bool = False

    @property
    def labels(self) -> list[str]:
        """The columns of the figures: each backend, then (with `proxy`) the same through the proxy."""
        return [label for b in self.backends for label in (b, *([proxied(b)] if self.proxy else []))]


def proxied(backend: str) -> str:
    """The label of `backend`'s figures measured through the proxy."""
    return f"{backend}+proxy"


@dataclass
class Run:
    """One workload on one backend in one repetition."""

    backend: str
    workload: Workload
    rep: int
    metrics: dict[str, Any] = field(default_factory=dict)


#: workload -> backend -> figure -> {median, min, max} (and `errors`, `threads_by_step`).
Summary = dict[Workload, dict[str, dict[str, Any]]]


@dataclass
class Bench:
    """Every run of one `run_bench`, their summary, and the loopback baseline of the same machine."""

    config: BenchConfig
    machine: dict[str, Any]
    pinning: str
    #: `load.pingpong` results, one per repetition.
    pingpong: list[load.Result]
    runs: list[Run]
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        self.summary = summarize(self.runs, self.config)

    def to_json(self) -> dict[str, Any]:
        """The raw figures as `bench --json` and results.json hold them, workloads by name."""
        return {
            "config": {**asdict(self.config), "workloads": [w.to_json() for w in self.config.workloads]},
            "machine": self.machine,
            "pinning": self.pinning,
            "pingpong": self.pingpong,
            "runs": [{**asdict(r), "workload": r.workload.name} for r in self.runs],
            "summary": {w.name: cells for w, cells in self.summary.items()},
        }


def median(summary: Summary, workload: Workload | None, backend: str, figure: str) -> float | None:
    """The median of one figure of one workload on one backend; None if it was not measured."""
    value = summary.get(workload, {}).get(backend, {}).get(figure) if workload else None
    return float(value["median"]) if isinstance(value, dict) else None


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


def measure(
    server: ServeProcess, w: Workload, cfg: BenchConfig, via: ServeProcess | None = None
) -> dict[str, Any]:
    """Runs one workload against a running server child, or through the proxy child `via` in front
    of it; returns its figures. The server's threads and RSS are sampled in the middle of the
    measured window, while the load is on; its CPU (and the proxy's) over the whole run."""
    if w.kind == "idle":
        samples = measure_idle(server.address, server.pid, w.steps)
        return {
            "idle_samples": [asdict(s) for s in samples],
            "rss_per_conn_bytes": slope([s.connections for s in samples], [s.rss_bytes for s in samples]),
            "threads_by_step": {s.connections: s.threads for s in samples},
            "server_threads": samples[-1].threads,
            "server_rss_bytes": samples[-1].rss_bytes,
        }
    window = {"duration": cfg.duration, "warmup": cfg.warmup, "threads": cfg.gen_threads}
    address = (via or server).address
    run: Callable[[], load.Result]
    if w.kind in {"closed", "rtt"}:
        run = partial(load.closed_loop, address, w.connections, w.size, **window)
    elif w.kind == "open":
        run = partial(load.open_loop, address, w.rate, w.connections, w.size, **window)
    else:
        run = partial(load.churn, address, w.cycles, w.parallel, w.size)
    procs = [psutil.Process(server.pid), *([psutil.Process(via.pid)] if via else [])]
    cpu0, t0 = [sum(p.cpu_times()[:2]) for p in procs], time.monotonic()
    # Not `with`: on Ctrl-C or SIGTERM the server is stopped at once, not after the load has run out
    # (the generator cannot be cancelled: the interpreter's exit waits for its window to end).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-load")
    try:
        running = pool.submit(run)  # the generator releases the GIL
        mid = t0 + (cfg.warmup + cfg.duration / 2 if w.kind != "churn" else 0.05)
        threads, rss = 0, 0
        while not running.done():
            if time.monotonic() >= mid:
                threads = max(threads, probe.thread_count(server.pid))
                rss = max(rss, probe.rss_bytes(server.pid))
                mid = float("inf")
            with suppress(TimeoutError):
                running.result(timeout=0.01)
        result = running.result()
    finally:
        pool.shutdown(wait=False)
    elapsed = time.monotonic() - t0
    cpu = [100 * (sum(p.cpu_times()[:2]) - c0) / elapsed for p, c0 in zip(procs, cpu0, strict=True)]
    keys = ("frames", "bytes", "elapsed_s", "frames_per_s", "mb_per_s", "conns_per_s", "errors", "latency_us")
    return {
        **{k: result[k] for k in keys if k in result},
        "server_cpu_pct": cpu[0],
        **({"proxy_cpu_pct": cpu[1]} if via else {}),
        "server_threads": threads or probe.thread_count(server.pid),
        "server_rss_bytes": rss or probe.rss_bytes(server.pid),
    }


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> Bench:
    """Every workload on every backend, `repetitions` times, interleaved, each backend in a fresh
    server child per repetition (stopped on the way out, also on an interrupt). With `proxy`, each
    load workload runs again at once through a `connlab proxy` child with no toxic, unpinned."""
    if cfg.repetitions < 1:
        raise ValueError("repetitions: must be at least 1")
    most = max([w.connections for w in cfg.workloads] + [max(w.steps, default=0) for w in cfg.workloads])
    raise_nofile(2 * most + 1024)
    server_cpu, gen_cpu = (0, 1) if cfg.pin and (os.cpu_count() or 1) >= 2 else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    runs: list[Run] = []
    pingpong: list[load.Result] = []
    try:
        for rep in range(cfg.repetitions):
            progress(f"rep {rep + 1}/{cfg.repetitions}: raw loopback ping-pong")
            pingpong.append(load.pingpong(size=64, duration=min(cfg.duration, 1.0)))
            for backend in cfg.backends:
                with serve_child(backend, cfg.workers, server_cpu) as server, ExitStack() as stack:
                    front = (
                        stack.enter_context(ServeProcess(connlab_proxy_argv(server.address)))
                        if cfg.proxy
                        else None
                    )
                    for w in cfg.workloads:
                        progress(f"rep {rep + 1}/{cfg.repetitions}: {backend} {w.name}")
                        runs.append(Run(backend, w, rep, measure(server, w, cfg)))
                        if front and w.kind != "idle":
                            progress(f"rep {rep + 1}/{cfg.repetitions}: {proxied(backend)} {w.name}")
                            runs.append(Run(proxied(backend), w, rep, measure(server, w, cfg, front)))
    finally:
        if gen_cpu is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    pinning = f"server on CPU {server_cpu}, generator on CPU {gen_cpu}" if gen_cpu is not None else "none"
    if gen_cpu is not None and cfg.proxy:
        pinning += ", proxy unpinned"
    return Bench(cfg, machine(), pinning, pingpong, runs)


def figure(metrics: dict[str, Any], name: str) -> float | None:
    """A named figure of one run: a top-level metric or a latency percentile (p50_us, ...)."""
    if name.endswith("_us") and "latency_us" in metrics:
        key = {"p999_us": "p99.9"}.get(name, name.removesuffix("_us"))
        value = metrics["latency_us"].get(key)
        return float(value) if value is not None else None
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def summarize(runs: list[Run], cfg: BenchConfig) -> Summary:
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
        "proxy_cpu_pct",
    ]
    out: Summary = {}
    for w in cfg.workloads:
        for b in cfg.labels:
            mine = [r.metrics for r in runs if r.workload == w and r.backend == b]
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
            out.setdefault(w, {})[b] = cell
    return out

"""`connlab bench`: every backend in its own `connlab serve` child, loaded by the Rust generator.

Backends are interleaved within each repetition (A B C D E, A B C D E, ...) so drift on a
shared machine hits all alike; each figure is reported as the median with min-max. A last phase,
untimed, counts each server's syscalls per echoed frame under strace (`syscalls`)."""

from __future__ import annotations

import base64
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import psutil

from connlab import load, probe
from connlab._measure import syscalls, units
from connlab._measure.footprint import measure_idle, pin, serve_child, slope
from connlab.matrix.core import Options, command_handle
from connlab.probe import raise_nofile
from connlab.process import ServeProcess, connlab_proxy_argv

Kind = Literal["idle", "closed", "open", "churn", "rtt"]


@dataclass(frozen=True)
class Workload:
    """One measurement, by its parameters; `name` is only its label (and JSON key), never parsed.

    `idle`: memory per idle connection over `steps` connection counts; `closed`: closed-loop load
    of `connections` with `size`-byte frames; `open`: `rate` frames/s over `connections`; `churn`:
    `cycles` x `parallel` connect-echo-close; `rtt`: one connection's round trip. `pipeline`:
    frames in flight per connection in the closed loop."""

    kind: Kind
    connections: int = 1
    size: int = 64
    rate: int = 0
    cycles: int = 0
    parallel: int = 0
    steps: tuple[int, ...] = ()
    pipeline: int = 1

    @property
    def name(self) -> str:
        """The key in JSON, CSV and histogram logs: short, stable, no spaces."""
        size = f"{self.size >> 10}k" if self.size >= 1024 and self.size % 1024 == 0 else str(self.size)
        depth = f"-p{self.pipeline}" if self.pipeline > 1 else ""
        return {
            "closed": f"closed{size}-c{self.connections}{depth}",
            "open": f"open{size}-r{self.rate}",
            "churn": f"churn-{self.cycles}x{self.parallel}",
            "rtt": f"rtt{size}" if self.size != 64 else "rtt",
        }.get(self.kind, self.kind)

    @property
    def label(self) -> str:
        """What people read: "64 B frames, 1 000 connections"."""
        frames = f"{units.size(self.size)} frames"
        if self.kind == "closed":
            depth = f", {self.pipeline} in flight each" if self.pipeline > 1 else ""
            return f"{frames}, {units.plural(self.connections, 'connection')}{depth}"
        if self.kind == "open":
            over = units.plural(self.connections, "connection")
            return f"{frames} at {units.grouped(self.rate)}/s over {over} (open loop)"
        if self.kind == "churn":
            return f"churn: {units.grouped(self.cycles)} connect-echo-close, {self.parallel} at a time"
        if self.kind == "rtt":
            return f"one connection, one {units.size(self.size)} frame at a time"
        return f"idle connections ({', '.join(units.grouped(s) for s in self.steps)})"

    @property
    def short(self) -> str:
        """A name for lists of workloads: "64 B x 1 000", "open loop", "churn"."""
        if self.kind == "closed":
            depth = f", {self.pipeline} deep" if self.pipeline > 1 else ""
            return f"{units.size(self.size)} x {units.grouped(self.connections)}{depth}"
        return {"open": "open loop", "churn": "churn", "rtt": "round trip", "idle": "idle memory"}[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def default_workloads(
    connections: Sequence[int] = (1, 10, 100, 1000, 5000),
    *,
    rate: int = 20_000,
    churn: tuple[int, int] = (1000, 10),
    idle_steps: tuple[int, ...] = (0, 1000, 5000),
    size: int = 64,
    pipeline: int = 1,
) -> list[Workload]:
    """The workloads of the comparison, in the order they run on each server: idle memory, the
    closed loop of `size`-byte frames (`pipeline` in flight) at each connection count, 16 KiB
    frames at 10 connections, an open loop at a fixed rate, churn, and the one-connection round
    trip. An empty `idle_steps` leaves idle memory out."""
    # Idle memory first, on the freshly started server: after the loads, memory the allocator keeps
    # for reuse would absorb the idle connections and hide their cost.
    return [
        *([Workload("idle", steps=idle_steps)] if idle_steps else []),
        *(Workload("closed", connections=c, size=size, pipeline=pipeline) for c in connections),
        Workload("closed", connections=10, size=16 << 10),
        Workload("open", connections=100, rate=rate, size=size),
        Workload("churn", cycles=churn[0], parallel=churn[1], size=size),
        Workload("rtt", size=size),
    ]


@dataclass(frozen=True)
class External:
    """A server connlab did not start from a backend name: a running one at `address` (with its
    `pid`, if given, for its CPU, threads and memory), or a `command` launched afresh for each
    repetition (`{port}` in it is a free port; ready when it prints HOST:PORT or that port
    accepts)."""

    label: str
    address: tuple[str, int] | None = None
    pid: int | None = None
    command: str | None = None


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
    #: Also load each server through `connlab proxy` with no toxic, as `<label>+proxy`.
    proxy: bool = False
    #: The user's own servers, measured beside the backends.
    externals: list[External] = field(default_factory=list)
    #: Frames of the syscall phase per server (one connection under `strace -f -c`); 0 skips it.
    syscall_frames: int = syscalls.FRAMES
    #: Backends asked for that this machine cannot run (e.g. uring without io_uring), each with why.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def servers(self) -> list[str]:
        """Every server measured: the backends, then the externals."""
        return [*self.backends, *(e.label for e in self.externals)]

    @property
    def labels(self) -> list[str]:
        """The columns of the figures: each server, then (with `proxy`) the same through the proxy."""
        return [label for b in self.servers for label in (b, *([proxied(b)] if self.proxy else []))]


def proxied(backend: str) -> str:
    """The label of `backend`'s figures measured through the proxy."""
    return f"{backend}+proxy"


@dataclass
class Run:
    """One workload on one server in one repetition."""

    backend: str
    workload: Workload
    rep: int
    metrics: dict[str, Any] = field(default_factory=dict)


#: A figure whose min-max spread exceeds this fraction of its median is unstable.
UNSTABLE_SPREAD = 0.25

#: workload -> label -> figure -> {median, min, max, spread, unstable, n} (and `errors`,
#: `threads_by_step`).
Summary = dict[Workload, dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Snapshot:
    """The machine's load at one instant: the load averages and the cumulative CPU jiffies (all,
    and stolen by the hypervisor), to tell a quiet run from a disturbed one."""

    t: float
    load_avg: tuple[float, float, float]
    cpu_jiffies: int
    steal_jiffies: int

    @classmethod
    def now(cls) -> Snapshot:
        total, steal = _cpu_jiffies()
        return cls(time.time(), os.getloadavg(), total, steal)


def _cpu_jiffies() -> tuple[int, int]:
    """(all, steal) jiffies of the machine since boot from /proc/stat; (0, 0) where it is absent."""
    try:
        with open("/proc/stat") as f:
            fields_ = f.readline().split()
    except OSError:
        return 0, 0
    numbers = [int(x) for x in fields_[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(numbers), numbers[7] if len(numbers) > 7 else 0


def conditions(before: Snapshot, after: Snapshot, pingpong: Sequence[load.Result]) -> dict[str, Any]:
    """What the machine was doing around the run: load averages before and after, the share of
    CPU time stolen over the run, and the raw ping-pong p50 of each repetition with its spread."""
    jiffies = after.cpu_jiffies - before.cpu_jiffies
    p50s = [float(p["latency_us"]["p50"]) for p in pingpong]
    return {
        "load_avg_before": before.load_avg,
        "load_avg_after": after.load_avg,
        "cpus": os.cpu_count() or 1,
        "steal_pct": 100 * (after.steal_jiffies - before.steal_jiffies) / jiffies if jiffies > 0 else None,
        "pingpong_p50_us": p50s,
        "pingpong_p50": spread_of(p50s) if p50s else None,
    }


def spread_of(values: Sequence[float]) -> dict[str, Any]:
    """{median, min, max, spread, unstable, n} of one figure over its repetitions; `spread` is
    (max - min) / median, `unstable` whether it exceeds UNSTABLE_SPREAD (never with one value: its
    spread is unknown, not zero, which `n` says)."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    spread = (hi - lo) / abs(med) if med else (0.0 if hi == lo else float("inf"))
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "spread": spread,
        "unstable": spread > UNSTABLE_SPREAD,
        "n": len(values),
    }


@dataclass
class Bench:
    """Every run of one `run_bench`, their summary, the loopback baseline of the same machine and
    what else the machine was doing."""

    config: BenchConfig
    machine: dict[str, Any]
    pinning: str
    #: `load.pingpong` results, one per repetition.
    pingpong: list[load.Result]
    runs: list[Run]
    conditions: dict[str, Any] = field(default_factory=dict)
    #: When the run began (seconds since the epoch): the base time of its histogram log.
    started: float = field(default_factory=time.time)
    #: The syscall phase: a row per server ({server, status, ...}, see `syscalls.count`).
    syscalls: list[dict[str, Any]] = field(default_factory=list)
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        relative_cpu(self.runs, self.config)
        self.summary = summarize(self.runs, self.config)

    def to_json(self) -> dict[str, Any]:
        """The raw figures as `bench --json` and results.json hold them, workloads by name and
        histograms as base64 text."""
        return {
            "config": {**asdict(self.config), "workloads": [w.to_json() for w in self.config.workloads]},
            "machine": self.machine,
            "pinning": self.pinning,
            "conditions": self.conditions,
            "pingpong": [_with_text_histogram(dict(p)) for p in self.pingpong],
            "runs": [{**asdict(r), "workload": r.workload.name} for r in self.runs],
            "summary": {w.name: cells for w, cells in self.summary.items()},
            "syscalls": self.syscalls,
        }


def _with_text_histogram(result: dict[str, Any]) -> dict[str, Any]:
    """A load result with its histogram as base64 text (JSON has no bytes)."""
    if isinstance(result.get("histogram"), bytes):
        result["histogram"] = base64.b64encode(result["histogram"]).decode("ascii")
    return result


def median(summary: Summary, workload: Workload | None, backend: str, figure: str) -> float | None:
    """The median of one figure of one workload on one server; None if it was not measured."""
    value = cell(summary, workload, backend, figure)
    return float(value["median"]) if value else None


def cell(summary: Summary, workload: Workload | None, backend: str, figure: str) -> dict[str, Any] | None:
    """One figure of one workload on one server ({median, min, max, spread, unstable, n}); None
    if it was not measured."""
    value = summary.get(workload, {}).get(backend, {}).get(figure) if workload else None
    return value if isinstance(value, dict) else None


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


@dataclass(frozen=True)
class Served:
    """A server under measurement: where to load it and, if known, its process (for CPU,
    threads and memory)."""

    address: tuple[str, int]
    pid: int | None


def _cpu_seconds(procs: Sequence[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def measure(server: Served, w: Workload, cfg: BenchConfig, via: Served | None = None) -> dict[str, Any]:
    """Runs one workload against a running server, or through the proxy `via` in front of it;
    returns its figures. The server's threads and RSS are sampled in the middle of the measured
    window, while the load is on; its CPU (and the proxy's) over the measured window (after the
    warm-up; churn: the whole run), as a share of one CPU and per frame answered in the window.
    Without the server's pid, only what the generator sees is measured (idle memory: nothing)."""
    pid = server.pid
    if w.kind == "idle":
        if pid is None:
            return {}
        samples = measure_idle(server.address, pid, w.steps)
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
        run = partial(load.closed_loop, address, w.connections, w.size, pipeline=w.pipeline, **window)
    elif w.kind == "open":
        run = partial(load.open_loop, address, w.rate, w.connections, w.size, **window)
    else:
        run = partial(load.churn, address, w.cycles, w.parallel, w.size)
    procs = [psutil.Process(p) for p in (pid, via.pid if via else None) if p is not None]
    t0 = time.monotonic()
    cpu_start, cpu_end = _cpu_seconds(procs), None
    # The window's edges (churn has no warm-up: its whole run counts) and its middle.
    start_at, end_at = (t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration) if w.kind != "churn" else (t0, 0.0)
    mid = (start_at + end_at) / 2 if w.kind != "churn" else t0 + 0.05
    # Not `with`: on Ctrl-C or SIGTERM the server is stopped at once, not after the load has run out
    # (the generator cannot be cancelled: the interpreter's exit waits for its window to end).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-load")
    try:
        running = pool.submit(run)  # the generator releases the GIL
        threads, rss = 0, 0
        t_start, t_end = t0, 0.0
        while not running.done():
            now = time.monotonic()
            if now >= start_at:
                cpu_start, t_start, start_at = _cpu_seconds(procs), now, float("inf")
            if now >= mid and pid is not None:
                threads = max(threads, probe.thread_count(pid))
                rss = max(rss, probe.rss_bytes(pid))
                mid = float("inf")
            if end_at and now >= end_at:
                cpu_end, t_end, end_at = _cpu_seconds(procs), now, 0.0
            with suppress(TimeoutError):
                running.result(timeout=0.01)
        result = running.result()
    finally:
        pool.shutdown(wait=False)
    if cpu_end is None:
        cpu_end, t_end = _cpu_seconds(procs), time.monotonic()
    spent = [end - start for start, end in zip(cpu_start, cpu_end, strict=True)]
    elapsed = max(t_end - t_start, 1e-9)
    keys = ("frames", "bytes", "elapsed_s", "frames_per_s", "mb_per_s", "conns_per_s", "errors", "latency_us")
    figures: dict[str, Any] = {
        **{k: result[k] for k in keys if k in result},
        "histogram": load.histogram_base64(result),
    }
    if pid is not None:
        frames = result["frames_per_s"] * elapsed  # frames answered over the CPU's interval
        figures.update(
            server_cpu_pct=100 * spent[0] / elapsed,
            server_cpu_us_per_frame=1e6 * spent[0] / frames if frames else None,
            server_threads=threads or probe.thread_count(pid),
            server_rss_bytes=rss or probe.rss_bytes(pid),
        )
    if via:
        figures["proxy_cpu_pct"] = 100 * spent[-1] / elapsed
    return figures


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> Bench:
    """Every workload on every server, `repetitions` times, interleaved: each backend (and each
    external command) in a fresh server child per repetition, stopped on the way out (also on an
    interrupt); a running external target as it is. With `proxy`, each load workload runs again
    at once through a `connlab proxy` child with no toxic, unpinned."""
    if cfg.repetitions < 1:
        raise ValueError("repetitions: must be at least 1")
    if not cfg.servers:
        raise ValueError("nothing to measure: name backends or give a target or a server command")
    most = max([w.connections for w in cfg.workloads] + [max(w.steps, default=0) for w in cfg.workloads])
    raise_nofile(2 * most + 1024)
    server_cpu, gen_cpu = (0, 1) if cfg.pin and (os.cpu_count() or 1) >= 2 else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    runs: list[Run] = []
    pingpong: list[load.Result] = []
    before = Snapshot.now()
    try:
        for rep in range(cfg.repetitions):
            progress(f"rep {rep + 1}/{cfg.repetitions}: raw loopback ping-pong")
            pingpong.append(load.pingpong(size=64, duration=min(cfg.duration, 1.0), echo_cpu=server_cpu))
            for label in cfg.servers:
                with _started(label, cfg, server_cpu) as server, ExitStack() as stack:
                    front = (
                        stack.enter_context(ServeProcess(connlab_proxy_argv(server.address)))
                        if cfg.proxy
                        else None
                    )
                    via = Served(front.address, front.pid) if front else None
                    for w in cfg.workloads:
                        progress(f"rep {rep + 1}/{cfg.repetitions}: {label} {w.label}")
                        runs.append(Run(label, w, rep, measure(server, w, cfg)))
                        if via and w.kind != "idle":
                            progress(f"rep {rep + 1}/{cfg.repetitions}: {proxied(label)} {w.label}")
                            runs.append(Run(proxied(label), w, rep, measure(server, w, cfg, via)))
    finally:
        if gen_cpu is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    pinning = (
        f"server on CPU {server_cpu} (and the ping-pong floor's echo), generator on CPU {gen_cpu}"
        if gen_cpu is not None
        else "none"
    )
    if gen_cpu is not None and cfg.proxy:
        pinning += ", proxy unpinned"
    if gen_cpu is not None and any(e.address for e in cfg.externals):
        pinning += ", running targets unpinned"
    # The conditions are those of the timed runs: the syscall phase after them is not timed.
    noise = conditions(before, Snapshot.now(), pingpong)
    counted = [count_syscalls(label, cfg, progress) for label in cfg.servers] if cfg.syscall_frames else []
    return Bench(cfg, machine(), pinning, pingpong, runs, noise, before.t, counted)


def count_syscalls(label: str, cfg: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """The syscall phase for one server: a fresh server (a running target as it is, given its
    pid), one connection of `syscall_frames` 64 B frames under `strace -f -c`; its row says why
    not where strace is missing or the pid unknown. Unpinned: only counts are read here."""
    frames = units.grouped(cfg.syscall_frames)
    progress(f"syscalls: {label}, one connection, {frames} frames of {syscalls.SIZE} B under strace -f -c")
    external = next((e for e in cfg.externals if e.label == label), None)
    if external is not None and external.address is not None and external.pid is None:
        return {"server": label, "status": syscalls.NO_PID}
    if syscalls.strace_path() is None:
        return {"server": label, "status": syscalls.NOT_INSTALLED}
    try:
        with _started(label, cfg, None) as server:
            return {"server": label, **syscalls.count(server.address, server.pid, frames=cfg.syscall_frames)}
    except (OSError, RuntimeError) as err:  # a server that does not start again: the run is kept
        return {"server": label, "status": f"not counted: {err}"}


@contextmanager
def _started(label: str, cfg: BenchConfig, cpu: int | None) -> Iterator[Served]:
    """The server `label` ready for one repetition: a fresh `connlab serve` child for a backend,
    a fresh child of an external command, or the running target as it is."""
    external = next((e for e in cfg.externals if e.label == label), None)
    if external is None:
        with serve_child(label, cfg.workers, cpu) as child:
            yield Served(child.address, child.pid)
    elif external.command is not None:
        handle = command_handle(external.command, {}, Options(start_timeout=30.0))
        try:
            if cpu is not None:
                pin(handle.pid, cpu)
            yield Served(handle.address, handle.pid)
        finally:
            handle.close()
    else:
        assert external.address is not None
        yield Served(external.address, external.pid)


def figure(metrics: dict[str, Any], name: str) -> float | None:
    """A named figure of one run: a top-level metric or a latency percentile (p50_us, ...)."""
    if name.endswith("_us") and "latency_us" in metrics:
        key = {"p999_us": "p99.9"}.get(name, name.removesuffix("_us"))
        value = metrics["latency_us"].get(key)
        return float(value) if value is not None else None
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


#: The figures summarized, and whether more is better (for winners and regressions).
FIGURES: dict[str, bool] = {
    "frames_per_s": True,
    "mb_per_s": True,
    "conns_per_s": True,
    "p50_us": False,
    "p90_us": False,
    "p99_us": False,
    "p999_us": False,
    "max_us": False,
    "rss_per_conn_bytes": False,
    "server_threads": False,
    "server_rss_bytes": False,
    "server_cpu_pct": False,
    "server_cpu_us_per_frame": False,
    "server_cpu_vs_tokio": False,
    "proxy_cpu_pct": False,
}


def shown(w: Workload) -> list[str]:
    """The figures that tell a workload's story, in the order tables show them: what its load
    achieved, its latency, and what the server paid for it."""
    if w.kind == "closed":
        rate = "mb_per_s" if w.size >= 1024 else "frames_per_s"  # large frames: bytes are the point
        return [rate, "p50_us", "p99_us", "server_cpu_us_per_frame", "server_cpu_vs_tokio", "server_threads"]
    return {
        "open": ["p50_us", "p99_us", "max_us", "server_cpu_us_per_frame", "server_cpu_vs_tokio"],
        "churn": ["conns_per_s"],
        "rtt": ["p50_us", "p99_us"],
        "idle": ["rss_per_conn_bytes"],
    }[w.kind]


#: The backend every server's CPU per frame is read against (`server_cpu_vs_tokio`).
CPU_REFERENCE = "tokio"


def relative_cpu(runs: list[Run], cfg: BenchConfig) -> None:
    """Adds `server_cpu_vs_tokio` to each run with a CPU per frame: its ratio to tokio's in the
    same workload and repetition (interleaved, so drift of the machine hits both alike; through
    the proxy, to tokio's through the proxy). Nothing without tokio in the run."""
    through = {proxied(s) for s in cfg.servers} if cfg.proxy else set()
    cpu = {
        (r.workload, r.rep, r.backend): v
        for r in runs
        if (v := figure(r.metrics, "server_cpu_us_per_frame")) is not None
    }
    for r in runs:
        reference = proxied(CPU_REFERENCE) if r.backend in through else CPU_REFERENCE
        mine, theirs = cpu.get((r.workload, r.rep, r.backend)), cpu.get((r.workload, r.rep, reference))
        if mine is not None and theirs:
            r.metrics["server_cpu_vs_tokio"] = mine / theirs


def summarize(runs: list[Run], cfg: BenchConfig) -> Summary:
    """workload → label → {figure: {median, min, max, spread, unstable, n}} for the figures that
    matter, with each cell's `errors` summed over its runs."""
    out: Summary = {}
    for w in cfg.workloads:
        for b in cfg.labels:
            mine = [r.metrics for r in runs if r.workload == w and r.backend == b]
            summary: dict[str, Any] = {}
            for name in FIGURES:
                values = [v for m in mine if (v := figure(m, name)) is not None]
                if values:
                    summary[name] = spread_of(values)
            errors: dict[str, int] = {}
            for m in mine:
                for kind, n in (m.get("errors") or {}).items():
                    errors[kind] = errors.get(kind, 0) + int(n)
            summary["errors"] = errors
            if w.kind == "idle":
                summary["threads_by_step"] = mine[-1].get("threads_by_step") if mine else {}
            out.setdefault(w, {})[b] = summary
    return out

"""`connlab bench`, `connlab soak` and `connlab compare`: the command lines of the measurements."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connlab import matrix
from connlab._cli.options import (
    address,
    backend_list,
    churn_spec,
    connection_list,
    connections,
    fraction,
    frame_size,
    gen_threads,
    host_port,
    idle_steps,
    non_negative_int,
    output_dir,
    output_path,
    pipeline,
    positive_float,
    positive_int,
    rate,
    repetitions,
    scenario_ids,
    seconds,
    syscall_frames,
    threads,
)
from connlab._measure import baseline, report, story, syscalls, targets
from connlab._measure.bench import Bench, BenchConfig, External, default_workloads, machine, run_bench
from connlab._measure.soak import Sample, SoakConfig, run_soak
from connlab._native import BACKENDS
from connlab.matrix import report as matrix_report
from connlab.matrix.core import backend_unavailable

T = TypeVar("T")


def _bench_options(p: argparse.ArgumentParser, *, own_servers: bool) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--backends",
        type=backend_list,
        default=None,
        metavar="all|a,b",
        help="backends to measure"
        + (
            " (default: all, or none when --target or --serve-cmd is given)"
            if own_servers
            else " (default: all)"
        ),
    )
    if own_servers:
        g.add_argument(
            "--target",
            type=host_port,
            metavar="HOST:PORT",
            help="a running server of yours to load, as it is (never restarted nor stopped); its CPU,"
            " threads and memory are measured only with --pid",
        )
        g.add_argument(
            "--pid",
            type=positive_int,
            help="with --target: the server's pid, for its CPU, threads and memory",
        )
        g.add_argument(
            "--serve-cmd",
            metavar="CMD",
            help="a command that starts your server, launched afresh for each repetition (as `connlab"
            " matrix --serve-cmd`): ready when it prints HOST:PORT, or when {port} in it (a free port,"
            " filled in) accepts; SIGTERM must stop it",
        )
        g.add_argument(
            "--name",
            help="the column name of the one --target or --serve-cmd (default: HOST:PORT, or 'command')",
        )
    g = p.add_argument_group("workloads (as wrk2: frame size, pipeline, connections, rate, duration)")
    g.add_argument(
        "--connections",
        type=connection_list,
        default=[1, 10, 100, 1000, 5000],
        metavar="LIST",
        help="closed-loop connection counts (default: 1,10,100,1000,5000)",
    )
    g.add_argument(
        "--size",
        type=frame_size,
        default=64,
        metavar="BYTES",
        help="frame payload of the closed loop, open loop, churn and round trip; a 16 KiB closed loop at"
        " 10 connections always runs too (default: 64)",
    )
    g.add_argument(
        "--pipeline",
        type=pipeline,
        default=1,
        metavar="N",
        help="frames in flight per connection in the closed loop (default: 1)",
    )
    g.add_argument(
        "--rate",
        type=rate,
        default=20_000,
        metavar="FRAMES/S",
        help="open-loop rate across 100 connections, latency from intended send times (default: 20000)",
    )
    g.add_argument(
        "--churn",
        type=churn_spec,
        default=(1000, 10),
        metavar="CxP",
        help="churn cycles x parallel connections (default: 1000x10)",
    )
    g.add_argument(
        "--idle-steps",
        type=idle_steps,
        default=[0, 1000, 5000],
        metavar="LIST",
        help="idle connection counts for memory per connection (default: 0,1000,5000)",
    )
    g.add_argument(
        "--duration",
        type=seconds,
        default=2.0,
        metavar="S",
        help="measured seconds per load run (default: 2.0)",
    )
    g.add_argument(
        "--warmup",
        type=seconds,
        default=0.5,
        metavar="S",
        help="seconds of load before measuring, not counted (default: 0.5)",
    )
    g = p.add_argument_group("how")
    g.add_argument(
        "--repetitions",
        type=repetitions,
        default=3,
        metavar="N",
        help="interleaved repetitions; figures are medians with min-max (default: 3)",
    )
    g.add_argument(
        "--workers", type=threads, default=2, help="workers of pool and tokio, shards of sharded (default: 2)"
    )
    g.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and the generator to CPU 1 (stated in the report)",
    )
    g.add_argument(
        "--proxy",
        action="store_true",
        help="also load each server through `connlab proxy` with no toxic, right after it direct,"
        " as <server>+proxy: the proxy's overhead side by side (load workloads only, not idle memory)",
    )
    g.add_argument(
        "--gen-threads",
        type=gen_threads,
        default=None,
        metavar="N",
        help="load generator threads (default: 1, or 2 from 512 connections)",
    )
    g = p.add_argument_group(
        "syscalls per frame",
        "After the timed runs, untimed: each server under `strace -f -c -p PID` while one connection"
        f" echoes {syscalls.SIZE} B frames in a closed loop, its syscalls over the frames answered."
        " Needs strace (the report says where it is not installed)"
        + (", and --pid for a --target." if own_servers else "."),
    )
    g.add_argument(
        "--no-syscalls",
        action="store_true",
        help="skip the syscall phase",
    )
    g.add_argument(
        "--syscall-frames",
        type=syscall_frames,
        default=syscalls.FRAMES,
        metavar="N",
        help=f"about how many frames to count per server (default: {syscalls.FRAMES})",
    )
    g = p.add_argument_group("results")
    g.add_argument(
        "--reports",
        type=output_dir,
        default="reports",  # a string, so that argparse checks it as it does a given one
        metavar="DIR",
        help="keep every run: each goes to DIR/<YYYYMMDD-HHMMSS>/ (report, results.json, CSVs,"
        " latency.hlog, plots), and DIR/latest links to the newest complete one (default: reports)",
    )
    g.add_argument(
        "--out",
        type=output_dir,
        default=None,
        metavar="DIR",
        help="write this run's report into DIR instead (created if missing; no history, no link)",
    )
    g.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="an earlier run's results.json (or bench --json): figures that moved beyond both runs'"
        " min-max are flagged as regressed or improved",
    )
    g.add_argument(
        "--fail-on-missed",
        action="store_true",
        help="exit 1 when a target is missed (and settled: an unsettled one does not count) or, with"
        " --baseline, a figure regressed",
    )


def _config(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A config dataclass from the options of the same names, and `given` fields."""
    names = {f.name for f in fields(cls)} - given.keys()
    return cls(**given, **{k: v for k, v in vars(args).items() if k in names})


def _externals(args: argparse.Namespace) -> list[External]:
    """The user's servers of a bench command line; ValueError on options that do not go together."""
    target, command = getattr(args, "target", None), getattr(args, "serve_cmd", None)
    if getattr(args, "pid", None) and not target:
        raise ValueError("--pid: only with --target")
    name = getattr(args, "name", None)
    if name and target and command:
        raise ValueError("--name: names one server, but both --target and --serve-cmd are given")
    if name and not (target or command):
        raise ValueError("--name: only with --target or --serve-cmd")
    out = []
    if target:
        out.append(External(name or target, address=address(target), pid=args.pid))
    if command:
        out.append(External(name or "command", command=command))
    labels = [e.label for e in out]
    if args.backends and set(labels) & set(args.backends):
        raise ValueError(f"--name: {name} is a backend's name; choose another")
    return out


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    externals = _externals(args)
    asked = args.backends if args.backends is not None else ([] if externals else list(BACKENDS))
    # A backend this machine cannot run is left out, and the report says why.
    skipped = {b: why for b in asked if (why := backend_unavailable(b))}
    backends = [b for b in asked if b not in skipped]
    workloads = default_workloads(
        args.connections,
        rate=args.rate,
        churn=args.churn,
        idle_steps=tuple(args.idle_steps),
        size=args.size,
        pipeline=args.pipeline,
    )
    frames = 0 if args.no_syscalls else args.syscall_frames
    return _config(
        BenchConfig,
        args,
        workloads=workloads,
        backends=backends,
        externals=externals,
        syscall_frames=frames,
        skipped=skipped,
    )


def _progress(console: Console, total: int) -> tuple[Progress, Callable[[str], None]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task("starting", total=total)

    def step(text: str) -> None:
        progress.update(task, description=text)
        progress.advance(task)

    return progress, step


def summary_table(bench: Bench) -> Table:
    header, rows = report.comparison_rows(bench)
    table = Table(title="connlab bench: median (min-max); * unstable (spread over 25 %)")
    for h in header:
        table.add_column(h, justify="left" if h in ("workload", "figure") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def targets_table(evaluated: list[dict[str, Any]]) -> Table:
    table = Table(title="targets (ratios in this run)")
    for h in ("target", "status", "measured"):
        table.add_column(h)
    style = {targets.MET: "green", targets.MISSED: "bold red", targets.UNSETTLED: "yellow"}
    for row in report.target_rows(evaluated):
        table.add_row(
            row[0],
            f"[{style.get(row[1], 'dim')}]{row[1]}[/]",
            row[2],
        )
    return table


def _bench(console: Console, cfg: BenchConfig) -> tuple[Bench, list[dict[str, Any]]]:
    """Runs the benchmark under a progress bar, prints its tables; returns it and its targets."""
    for why in cfg.skipped.values():
        console.print(f"skipped: {why}", markup=False, highlight=False)
    loads = len(cfg.workloads) + (sum(w.kind != "idle" for w in cfg.workloads) if cfg.proxy else 0)
    phase = len(cfg.servers) if cfg.syscall_frames else 0
    progress, step = _progress(console, cfg.repetitions * (1 + len(cfg.servers) * loads) + phase)
    with progress:
        bench = run_bench(cfg, step)
    proxied = cfg.servers if cfg.proxy else []
    chosen = targets.applicable(targets.default_targets(cfg.workers, proxied), cfg.labels, cfg.workloads)
    evaluated = targets.evaluate(chosen, bench.summary, bench.pingpong, pinned=bench.pinning != "none")
    console.print(summary_table(bench))
    if evaluated:
        console.print(targets_table(evaluated))
    # Line by line, wrapped by the terminal: every claim stays whole, also in a log.
    for line in story.story(bench, evaluated):
        console.print(re.sub(r"\*\*(.+?)\*\*", r"[bold]\1[/bold]", escape(line)), highlight=False)
    return bench, evaluated


def _start(args: argparse.Namespace, command: str) -> tuple[BenchConfig, baseline.Figures | None] | None:
    """The run's config and baseline, or None after printing why the command line cannot run."""
    try:
        cfg = _bench_config(args)
        old = baseline.read(args.baseline) if args.baseline else None
        for e in cfg.externals:
            if e.address and (
                why := matrix.Target.external(f"{e.address[0]}:{e.address[1]}", e.pid).reachable()
            ):
                raise ValueError(f"{why}; nothing was run")
    except ValueError as err:
        print(f"connlab {command}: {err}", file=sys.stderr)
        return None
    return cfg, old


def _finish(
    console: Console,
    args: argparse.Namespace,
    results: dict[str, Any],
    bench: Bench,
    *,
    old: baseline.Figures | None,
    out: Path,
) -> bool:
    """Writes the report of a finished run and prints where; True if --fail-on-missed fails it."""
    compared = baseline.compare(old, bench) if old is not None else None
    if compared is not None:
        results["baseline"] = {"file": str(args.baseline), "figures": compared}
        console.print(baseline.summary_line(compared))
        for row in baseline.rows(compared)[1]:
            console.print("  " + " | ".join(row).replace("**", ""), highlight=False)
    written = report.write(out, results, bench, compared)
    console.print(
        f"report: {written.md} and {written.html} (results.json, CSVs, latency.hlog, plots beside them)"
    )
    if args.out is None:
        console.print(f"{report.link_latest(args.reports, out)} -> {out.name}")
    if written.no_plots:
        console.print(f"no plots: {written.no_plots}", markup=False, highlight=False)
    missed = [t for t in results.get("targets", []) if t["status"] == targets.MISSED]
    worse = baseline.regressed(compared or [])
    if args.fail_on_missed and (missed or worse):
        console.print(
            f"[bold red]failing (--fail-on-missed)[/]: {len(missed)} targets missed,"
            f" {len(worse)} figures regressed"
        )
        return True
    return False


@contextmanager
def _run_dir(console: Console, args: argparse.Namespace) -> Iterator[Path]:
    """The directory of this run: --out, or a new one in --reports, removed again if the run
    ends (interrupted, failing) before anything was written into it."""
    if args.out is not None:
        yield args.out
        return
    out = report.new_run_dir(args.reports)
    console.print(f"this run: {out}")
    try:
        yield out
    except BaseException:
        if not any(out.iterdir()):
            out.rmdir()
        raise


def cmd_bench(args: argparse.Namespace) -> int:
    """Load servers side by side with the Rust generator: each named backend in its own `connlab serve`
    process, and your own server (--target HOST:PORT, or --serve-cmd CMD started afresh for each
    repetition). Workloads: the closed loop at several connection counts (--size, --pipeline,
    --connections), 16 KiB frames at 10 connections, an open loop at a fixed --rate (latency from
    intended send times), churn, the one-connection round trip against a raw loopback ping-pong, and
    idle memory per connection. Servers are interleaved within each repetition; figures are medians
    with min-max, and one whose spread exceeds 25 % is marked unstable. After the timed runs, each
    server's syscalls per echoed frame are counted under strace (--no-syscalls skips it). Prints the
    table and the targets (ratios between backends measured in the same run; unsettled when unstable
    figures decide them), and writes a report directory as `compare` does, with every figure as CSV
    and the latency histograms as an HdrHistogram log. Exit status: 0; 1 with --fail-on-missed when a
    target is missed or a figure regressed against --baseline; 2 on bad usage or an unreachable
    target."""
    console = Console(soft_wrap=True)
    started = _start(args, "bench")
    if started is None:
        return 2
    cfg, old = started
    with _run_dir(console, args) as out:
        bench, evaluated = _bench(console, cfg)
        results = {"machine": bench.machine, "bench": bench.to_json(), "targets": evaluated}
        if args.json:
            args.json.write_text(
                json.dumps({**bench.to_json(), "targets": evaluated}, indent=2, default=str) + "\n"
            )
            console.print(f"wrote {args.json}")
        return 1 if _finish(console, args, results, bench, old=old, out=out) else 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the lifecycle matrix over the in-process backends, then the benchmark (as `connlab bench`), and
    write a report directory: report.md and report.html opening with a generated summary (who leads
    where and by how much, what each backend costs, the trade-offs, how quiet the machine was), then
    the conditions, the matrix grid, the comparison tables, the targets and PNG plots (they need
    matplotlib: pip install 'connlab[report]'), plus results.json with every raw figure (written
    after the matrix already), figures.csv, summary.csv and latency.hlog. Exit status: 1 if a matrix
    scenario failed (or, with --fail-on-missed, a target was missed or a figure regressed), 2 on bad
    usage."""
    console = Console(soft_wrap=True)
    started_ = _start(args, "compare")
    if started_ is None:
        return 2
    cfg, old = started_
    results: dict[str, Any] = {"machine": machine()}
    started = time.monotonic()
    with _run_dir(console, args) as out:
        if not args.skip_matrix:
            scenarios = matrix.select(args.only)
            progress, step = _progress(console, len(scenarios) * len(cfg.backends))
            found = []
            with progress:
                for sc in scenarios:
                    for name in cfg.backends:
                        step(f"matrix: {sc.id} on {name}")
                        found.append(matrix.run_one(sc, matrix.Target.in_process(name), matrix.Options()))
            results["matrix"] = [r.to_json() for r in found]
            results["matrix_targets"] = cfg.backends
            results["matrix_wall_s"] = time.monotonic() - started
            console.print(matrix_report.grid(found, cfg.backends))
            report.write_json(out, results)  # the matrix is kept if the benchmark does not finish
        bench, evaluated = _bench(console, cfg)
        results.update(bench=bench.to_json(), targets=evaluated, wall_s=time.monotonic() - started)
        gate = _finish(console, args, results, bench, old=old, out=out)
        failed = [r for r in results.get("matrix", []) if r["status"] == "fail"]
        return 1 if failed or gate else 0


def cmd_soak(args: argparse.Namespace) -> int:
    """Ramp N persistent connections up at a given rate against an in-process backend; each sends a frame
    every interval for the duration. Every few seconds print a sample: server-reported connections,
    kernel ESTABLISHED and CLOSE_WAIT on the port, client-side connected count, phantoms (server count
    minus sockets it owns), errors, RSS, threads, fds and server CPU. End with a verdict against the
    criteria: phantoms within the threshold at every sample after the ramp, errors under the rate, RSS
    and threads not trending up after the ramp (by slope), and a clean shutdown with 0 connections left
    on either side. Exits 0 on PASS, 1 on FAIL. RSS, threads and fds are of this process, which holds
    the server; the clients run in a process of their own."""
    console = Console(soft_wrap=True)
    cfg = _config(SoakConfig, args)
    columns = (
        "t",
        "server",
        "kernel ESTAB",
        "CLOSE_WAIT",
        "clients",
        "phantoms",
        "errors",
        "frames",
        "RSS MiB",
        "threads",
        "fds",
        "server CPU %",
    )
    console.print("  ".join(columns), style="bold")

    def line(s: Sample) -> None:
        console.print(
            f"{s.t:>5.1f}  {s.server_active:>6}  {s.kernel_established:>12}  {s.kernel_close_wait:>10}  "
            f"{s.clients_connected:>7}  {s.phantoms:>8}  {s.errors:>6}  {s.frames:>6}  "
            f"{s.rss_bytes / 2**20:>7.1f}  {s.threads:>7}  {s.fds:>3}  {s.server_cpu_pct:>12.1f}",
            highlight=False,
        )

    result = run_soak(cfg, line)
    table = Table(title=f"soak verdict: {'PASS' if result['passed'] else 'FAIL'}")
    for h in ("criterion", "held", "measured"):
        table.add_column(h)
    for row in result["criteria"]:
        table.add_row(
            row["criterion"], "[green]yes[/]" if row["held"] else "[bold red]NO[/]", row["measured"]
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


def add_parsers(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="load servers side by side, the project's backends and your own (throughput, latency, memory,"
        " threads, churn, CPU per frame), written as a report",
        description=cmd_bench.__doc__,
    )
    _bench_options(bench, own_servers=True)
    bench.add_argument("--json", type=output_path, metavar="FILE", help="also write every raw figure as JSON")
    bench.set_defaults(func=cmd_bench)
    compare = sub.add_parser(
        "compare",
        help="the lifecycle matrix and the benchmark over every backend, written as a report",
        description=cmd_compare.__doc__,
    )
    _bench_options(compare, own_servers=False)
    compare.add_argument("--skip-matrix", action="store_true", help="only the benchmark")
    compare.add_argument(
        "--only",
        type=scenario_ids,
        default=None,
        metavar="IDS",
        help="only these matrix scenarios, comma-separated, as `connlab matrix --only` (default: all)",
    )
    compare.set_defaults(func=cmd_compare)
    soak = sub.add_parser(
        "soak",
        help="many persistent connections for a long run, sampled, ending in a verdict",
        description=cmd_soak.__doc__,
    )
    soak.add_argument("--backend", required=True, choices=BACKENDS, help="the backend to soak")
    soak.add_argument(
        "--connections", type=connections, default=1000, help="persistent connections (default: 1000)"
    )
    soak.add_argument(
        "--ramp-rate",
        type=positive_float,
        default=500.0,
        metavar="CONN/S",
        help="new connections per second while ramping up (default: 500)",
    )
    soak.add_argument(
        "--interval",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="seconds between one connection's frames (default: 1.0)",
    )
    soak.add_argument(
        "--duration",
        type=seconds,
        default=60.0,
        metavar="S",
        help="length of the run, ramp included (default: 60)",
    )
    soak.add_argument(
        "--sample-every",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="seconds between samples (default: 2.0)",
    )
    soak.add_argument(
        "--workers", type=threads, default=2, help="workers of pool and tokio, shards of sharded (default: 2)"
    )
    soak.add_argument(
        "--max-phantoms",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="phantoms allowed at any sample (default: 0)",
    )
    soak.add_argument(
        "--max-error-rate",
        type=fraction,
        default=0.01,
        metavar="FRACTION",
        help="errors allowed as a fraction of frames (default: 0.01)",
    )
    soak.add_argument(
        "--json", type=output_path, metavar="FILE", help="write the samples and the verdict as JSON"
    )
    soak.set_defaults(func=cmd_soak)

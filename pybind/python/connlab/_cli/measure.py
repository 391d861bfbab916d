"""`connlab bench`, `connlab soak` and `connlab compare`: the command lines of the measurements."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connlab import matrix
from connlab._cli.options import (
    backend_list,
    churn_spec,
    connection_list,
    connections,
    fraction,
    idle_steps,
    non_negative_int,
    output_dir,
    output_path,
    positive_float,
    rate,
    repetitions,
    scenario_ids,
    seconds,
    threads,
)
from connlab._measure import report, targets
from connlab._measure.bench import Bench, BenchConfig, default_workloads, machine, run_bench
from connlab._measure.soak import Sample, SoakConfig, run_soak
from connlab._native import BACKENDS
from connlab.matrix import report as matrix_report

T = TypeVar("T")


def _bench_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--backends",
        type=backend_list,
        default=list(BACKENDS),
        metavar="all|a,b",
        help="backends to measure (default: all)",
    )
    g.add_argument(
        "--repetitions",
        type=repetitions,
        default=3,
        metavar="N",
        help="interleaved repetitions; figures are medians with min-max (default: 3)",
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
    g.add_argument(
        "--connections",
        type=connection_list,
        default=[1, 10, 100, 1000, 5000],
        metavar="LIST",
        help="closed-loop 64 B connection counts (default: 1,10,100,1000,5000)",
    )
    g.add_argument(
        "--rate",
        type=rate,
        default=20_000,
        metavar="FRAMES/S",
        help="open-loop rate across 100 connections (default: 20000)",
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
    g.add_argument("--workers", type=threads, default=2, help="workers of pool and tokio (default: 2)")
    g.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and the generator to CPU 1 (stated in the report)",
    )
    g.add_argument(
        "--proxy",
        action="store_true",
        help="also load each backend through `connlab proxy` with no toxic, right after it direct,"
        " as <backend>+proxy: the proxy's overhead side by side (load workloads only, not idle memory)",
    )
    g.add_argument(
        "--gen-threads",
        type=threads,
        default=None,
        metavar="N",
        help="load generator threads (default: 1, or 2 from 512 connections)",
    )


def _config(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A config dataclass from the options of the same names, and `given` fields."""
    names = {f.name for f in fields(cls)} - given.keys()
    return cls(**given, **{k: v for k, v in vars(args).items() if k in names})


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    workloads = default_workloads(args.connections, args.rate, args.churn, tuple(args.idle_steps))
    return _config(BenchConfig, args, workloads=workloads)


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
    table = Table(title="connlab bench: median (min-max)")
    for h in header:
        table.add_column(h, justify="left" if h in ("workload", "figure") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def targets_table(evaluated: list[dict[str, Any]]) -> Table:
    table = Table(title="targets (ratios in this run)")
    for h in ("target", "status", "measured"):
        table.add_column(h)
    style = {True: "green", False: "bold red", None: "yellow"}
    for row, t in zip(report.target_rows(evaluated), evaluated, strict=True):
        table.add_row(row[0], f"[{style[t['met']]}]{row[1]}[/]", row[2])
    return table


def _bench(console: Console, cfg: BenchConfig) -> tuple[Bench, list[dict[str, Any]]]:
    """Runs the benchmark under a progress bar, prints its tables; returns it and its targets."""
    loads = len(cfg.workloads) + (sum(w.kind != "idle" for w in cfg.workloads) if cfg.proxy else 0)
    progress, step = _progress(console, cfg.repetitions * (1 + len(cfg.backends) * loads))
    with progress:
        bench = run_bench(cfg, step)
    proxied = cfg.backends if cfg.proxy else []
    evaluated = targets.evaluate(targets.default_targets(cfg.workers, proxied), bench.summary, bench.pingpong)
    console.print(summary_table(bench))
    console.print(targets_table(evaluated))
    return bench, evaluated


def cmd_bench(args: argparse.Namespace) -> int:
    """Run each backend as its own `connlab serve` process and load it with the Rust generator: 64 B closed
    loop at several connection counts, 16 KiB frames at 10 connections, an open loop at a fixed rate
    (latency from intended send times), churn, the one-connection round trip against a raw loopback
    ping-pong, and idle memory per connection. Backends are interleaved within each repetition; figures
    are medians with min-max. Prints the table and the targets as ratios to tokio measured in the same
    run."""
    console = Console(soft_wrap=True)
    bench, evaluated = _bench(console, _bench_config(args))
    if args.json:
        args.json.write_text(
            json.dumps({**bench.to_json(), "targets": evaluated}, indent=2, default=str) + "\n"
        )
        console.print(f"wrote {args.json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the lifecycle matrix over the in-process backends, then the benchmark (as `connlab bench`), and
    write a report directory: report.md and report.html with the matrix grid, the comparison tables, the
    targets and PNG plots (throughput and p99 vs connections, RSS per connection, threads vs
    connections, churn rate; they need matplotlib: pip install 'connlab[report]'), plus results.json
    with every raw figure and the machine (written after the matrix already). Exits 1 if a matrix
    scenario failed."""
    console = Console(soft_wrap=True)
    cfg = _bench_config(args)
    results: dict[str, Any] = {"machine": machine()}
    started = time.monotonic()
    history = args.out is None
    out = args.out if args.out is not None else report.new_run_dir(args.reports)
    if history:
        console.print(f"this run: {out}")
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
    written = report.write(out, results, bench)
    beside = "results.json" if written.no_plots else "plots and results.json"
    console.print(f"report: {written.md} and {written.html} ({beside} beside them)")
    if history:
        console.print(f"{report.link_latest(args.reports, out)} -> {out.name}")
    if written.no_plots:
        console.print(f"no plots: {written.no_plots}", markup=False, highlight=False)
    failed = [r for r in results.get("matrix", []) if r["status"] == "fail"]
    return 1 if failed else 0


def cmd_soak(args: argparse.Namespace) -> int:
    """Ramp N persistent connections up at a given rate against an in-process backend; each sends a frame
    every interval for the duration. Every few seconds print a sample: server-reported connections,
    kernel ESTABLISHED and CLOSE_WAIT on the port, client-side connected count, phantoms (server count
    minus sockets it owns), errors, RSS, threads, fds and server CPU. End with a verdict against the
    criteria: phantoms within the threshold at every sample after the ramp, errors under the rate, RSS
    and threads not trending up after the ramp (by slope), and a clean shutdown with 0 connections left
    on either side. Exits 0 on PASS, 1 on FAIL. RSS, threads and fds are of this process, which holds
    both the server and the clients."""
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
        help="measure every backend side by side (throughput, latency, memory, threads, churn)",
        description=cmd_bench.__doc__,
    )
    _bench_options(bench)
    bench.add_argument("--json", type=output_path, metavar="FILE", help="write every raw figure as JSON")
    bench.set_defaults(func=cmd_bench)
    compare = sub.add_parser(
        "compare",
        help="the lifecycle matrix and the benchmark over every backend, written as a report",
        description=cmd_compare.__doc__,
    )
    _bench_options(compare)
    compare.add_argument(
        "--reports",
        type=output_dir,
        default="reports",  # a string, so that argparse checks it as it does a given one
        metavar="DIR",
        help="keep every run: each goes to DIR/<YYYYMMDD-HHMMSS>/, and DIR/latest links to the newest"
        " complete one (default: reports)",
    )
    compare.add_argument(
        "--out",
        type=output_dir,
        default=None,
        metavar="DIR",
        help="write this run's report into DIR instead (created if missing; no history, no link)",
    )
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
    soak.add_argument("--workers", type=threads, default=2, help="workers of pool and tokio (default: 2)")
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

"""`connlab bench`, `connlab soak` and `connlab compare`: the command lines of the measurements."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connlab import matrix
from connlab._cli.options import positive_float, positive_int
from connlab._measure import report, targets
from connlab._measure.bench import BenchConfig, default_workloads, machine, run_bench
from connlab._measure.soak import Sample, SoakConfig, run_soak
from connlab._native import BACKENDS
from connlab.matrix import report as matrix_report

Handler = Callable[[argparse.Namespace], int]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _churn(text: str) -> tuple[int, int]:
    cycles, sep, parallel = text.partition("x")
    if not sep or not cycles.isdigit() or not parallel.isdigit() or int(cycles) < 1 or int(parallel) < 1:
        raise argparse.ArgumentTypeError(f"expected CYCLESxPARALLEL such as 1000x10, got {text!r}")
    return int(cycles), int(parallel)


def _backends(text: str) -> list[str]:
    names = list(BACKENDS) if text == "all" else [b.strip() for b in text.split(",") if b.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backends {unknown or names}; available: {', '.join(BACKENDS)}"
        )
    return names


def _bench_options(p: argparse.ArgumentParser, quick_defaults: bool = False) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--backends",
        type=_backends,
        default=list(BACKENDS),
        metavar="all|a,b",
        help="backends to measure (default: all)",
    )
    g.add_argument(
        "--repetitions",
        type=positive_int,
        default=3,
        metavar="N",
        help="interleaved repetitions; figures are medians with min-max (default: 3)",
    )
    g.add_argument(
        "--duration",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="measured seconds per load run (default: 2.0)",
    )
    g.add_argument(
        "--warmup",
        type=positive_float,
        default=0.5,
        metavar="S",
        help="seconds of load before measuring, not counted (default: 0.5)",
    )
    g.add_argument(
        "--connections",
        type=_int_list,
        default=[1, 10, 100, 1000, 5000],
        metavar="LIST",
        help="closed-loop 64 B connection counts (default: 1,10,100,1000,5000)",
    )
    g.add_argument(
        "--rate",
        type=positive_int,
        default=20_000,
        metavar="FRAMES/S",
        help="open-loop rate across 100 connections (default: 20000)",
    )
    g.add_argument(
        "--churn",
        type=_churn,
        default=(1000, 10),
        metavar="CxP",
        help="churn cycles x parallel connections (default: 1000x10)",
    )
    g.add_argument(
        "--idle-steps",
        type=_int_list,
        default=[0, 1000, 5000],
        metavar="LIST",
        help="idle connection counts for memory per connection (default: 0,1000,5000)",
    )
    g.add_argument("--workers", type=positive_int, default=2, help="workers of pool and tokio (default: 2)")
    g.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and the generator to CPU 1 (stated in the report)",
    )
    g.add_argument(
        "--gen-threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="load generator threads (default: 1, or 2 from 512 connections)",
    )


def _config(args: argparse.Namespace) -> BenchConfig:
    workloads = default_workloads(args.connections, args.rate, args.churn, tuple(args.idle_steps))
    return BenchConfig(
        backends=args.backends,
        workloads=workloads,
        repetitions=args.repetitions,
        duration=args.duration,
        warmup=args.warmup,
        workers=args.workers,
        pin=args.pin,
        gen_threads=args.gen_threads,
    )


def _progress(console: Console, total: int) -> tuple[Progress, Callable[[str], None]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task("starting", total=total)

    def step(text: str) -> None:
        progress.update(task, description=text)
        progress.advance(task)

    return progress, step


def summary_table(bench: dict[str, Any]) -> Table:
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


def cmd_bench(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    cfg = _config(args)
    total = cfg.repetitions * (1 + len(cfg.backends) * len(cfg.workloads))
    progress, step = _progress(console, total)
    with progress:
        bench = run_bench(cfg, step)
    evaluated = targets.evaluate(targets.default_targets(cfg.workers), bench)
    console.print(summary_table(bench))
    console.print(targets_table(evaluated))
    if args.json:
        args.json.write_text(json.dumps({**bench, "targets": evaluated}, indent=2, default=str) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    cfg = _config(args)
    results: dict[str, Any] = {"machine": machine()}
    names = cfg.backends
    started = time.monotonic()
    if not args.skip_matrix:
        try:
            scenarios = matrix.select(args.scenarios)
        except ValueError as err:
            print(f"connlab compare: --scenarios: {err}", file=sys.stderr)
            return 2
        progress, step = _progress(console, len(scenarios) * len(names))
        found = []
        with progress:
            for sc in scenarios:
                for name in names:
                    step(f"matrix: {sc.id} on {name}")
                    found.append(matrix.run_one(sc, matrix.Target.in_process(name), matrix.Options()))
        results["matrix"] = [r.to_json() for r in found]
        results["matrix_targets"] = names
        results["matrix_wall_s"] = time.monotonic() - started
        console.print(matrix_report.grid(found, names))
    total = cfg.repetitions * (1 + len(cfg.backends) * len(cfg.workloads))
    progress, step = _progress(console, total)
    with progress:
        bench = run_bench(cfg, step)
    results["bench"] = bench
    results["targets"] = targets.evaluate(targets.default_targets(cfg.workers), bench)
    results["wall_s"] = time.monotonic() - started
    paths = report.write(args.out, results)
    console.print(summary_table(bench))
    console.print(targets_table(results["targets"]))
    console.print(f"report: {paths['md']} and {paths['html']} (plots and results.json beside them)")
    failed = [r for r in results.get("matrix", []) if r["status"] == "fail"]
    return 1 if failed else 0


def cmd_soak(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    cfg = SoakConfig(
        backend=args.backend,
        connections=args.connections,
        ramp_rate=args.ramp_rate,
        interval=args.interval,
        duration=args.duration,
        sample_every=args.sample_every,
        workers=args.workers,
        max_phantoms=args.max_phantoms,
        max_error_rate=args.max_error_rate,
    )
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
        description=(
            "Run each backend as its own `connlab serve` process and load it with the Rust generator: "
            "64 B closed loop at several connection counts, 16 KiB frames at 10 connections, an open "
            "loop at a fixed rate (latency from intended send times), churn, the one-connection round "
            "trip against a raw loopback ping-pong, and idle memory per connection. Backends are "
            "interleaved within each repetition; figures are medians with min-max. Prints the table "
            "and the targets as ratios to tokio measured in the same run."
        ),
    )
    _bench_options(bench)
    bench.add_argument("--json", type=Path, metavar="FILE", help="write every raw figure as JSON")
    bench.set_defaults(func=cmd_bench)
    compare = sub.add_parser(
        "compare",
        help="the lifecycle matrix and the benchmark over every backend, written as a report",
        description=(
            "Run the lifecycle matrix over the in-process backends, then the benchmark (as `connlab "
            "bench`), and write a report directory: report.md and report.html with the matrix grid, "
            "the comparison tables, the targets and PNG plots (throughput and p99 vs connections, RSS "
            "per connection, threads vs connections, churn rate), plus results.json with every raw "
            "figure and the machine. Exits 1 if a matrix scenario failed."
        ),
    )
    _bench_options(compare)
    compare.add_argument(
        "--out",
        type=Path,
        default=Path("reports/latest"),
        metavar="DIR",
        help="report directory (default: reports/latest)",
    )
    compare.add_argument("--skip-matrix", action="store_true", help="only the benchmark")
    compare.add_argument(
        "--scenarios",
        type=lambda t: [i.strip() for i in t.split(",") if i.strip()],
        default=None,
        metavar="IDS",
        help="only these matrix scenarios (default: all)",
    )
    compare.set_defaults(func=cmd_compare)
    soak = sub.add_parser(
        "soak",
        help="many persistent connections for a long run, sampled, ending in a verdict",
        description=(
            "Ramp N persistent connections up at a given rate against an in-process backend; each sends "
            "a frame every interval for the duration. Every few seconds print a sample: server-reported "
            "connections, kernel ESTABLISHED and CLOSE_WAIT on the port, client-side connected count, "
            "phantoms (server count minus sockets it owns), errors, RSS, threads, fds and server CPU. "
            "End with a verdict against the criteria: phantoms within the threshold at every sample "
            "after the ramp, errors under the rate, RSS and threads not trending up after the ramp "
            "(by slope), and a clean shutdown with 0 connections left on either side. "
            "Exits 0 on PASS, 1 on FAIL. RSS, threads and fds are of this process, which holds both "
            "the server and the clients."
        ),
    )
    soak.add_argument("--backend", required=True, choices=BACKENDS, help="the backend to soak")
    soak.add_argument(
        "--connections", type=positive_int, default=1000, help="persistent connections (default: 1000)"
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
        type=positive_float,
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
        "--workers", type=positive_int, default=2, help="workers of pool and tokio (default: 2)"
    )
    soak.add_argument(
        "--max-phantoms", type=int, default=0, metavar="N", help="phantoms allowed at any sample (default: 0)"
    )
    soak.add_argument(
        "--max-error-rate",
        type=positive_float,
        default=0.01,
        metavar="FRACTION",
        help="errors allowed as a fraction of frames (default: 0.01)",
    )
    soak.add_argument("--json", type=Path, metavar="FILE", help="write the samples and the verdict as JSON")
    soak.set_defaults(func=cmd_soak)

"""`connlab matrix`: run the lifecycle matrix over backends or someone else's server."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from connlab._cli.options import positive_float, positive_int
from connlab._native import BACKENDS
from connlab.matrix import report
from connlab.matrix.core import Options, Repeated, Result, Target, repeated, run_one, select


def add_matrix_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser(
        "matrix",
        help="run the lifecycle matrix over backends, or against your own server",
        description=(
            "Run every lifecycle scenario (docs/MATRIX.md) against the in-process backends, a server "
            "command the matrix launches for each scenario (--serve-cmd), or a running server "
            "(--target, with --pid for fd/thread checks). Prints a live progress line, then a grid of "
            "scenario x target (pass / FAIL / skip, with seconds); exits 1 if any scenario failed, "
            "2 on bad usage. With --repeat N the whole selection runs N times (rounds) against the "
            "same targets: a cell shows in how many rounds it failed, and it fails if it failed in any."
        ),
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--backends",
        default="all",
        metavar="all|a,b",
        help=f"in-process backends to run (default: all = {','.join(BACKENDS)})",
    )
    where.add_argument("--target", metavar="HOST:PORT", help="a running server to test (it is never stopped)")
    where.add_argument(
        "--serve-cmd",
        metavar="CMD",
        help="a command that starts a server and prints a line containing its host:port; "
        "SIGTERM must ask it to stop. Launched afresh for each scenario",
    )
    p.add_argument("--pid", type=positive_int, help="with --target: the server's pid, for fd/thread checks")
    p.add_argument("--name", help="the target's column name in the grid (default: the target or 'command')")
    p.add_argument("--only", metavar="IDS", help="comma-separated scenario ids to run (default: all)")
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the whole selection N times, round after round (default: 1). With N > 1: --json's "
        '"results" has one entry per scenario and target over all rounds (status "fail" if it failed '
        'in any round, "failed_rounds" how many, "detail" each failed round\'s message as "round K: '
        '..."), and "repeat": N and "rounds": [{"round": K, "results", "summary", "wall_s"}, ...] hold '
        "every round's own results; --junit has one testcase per scenario and target, failed if any "
        "round failed, with each failed round's message; --baseline compares on failed in any round",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write every result as JSON")
    p.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML (one suite per target)")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="a JSON file from an earlier --json: report unexpected failures and unexpected passes",
    )
    g = p.add_argument_group("what the scenarios assume of the server (applied to servers the matrix starts)")
    g.add_argument("--idle-timeout", type=positive_float, default=0.5, metavar="S", help="(default: 0.5)")
    g.add_argument("--read-timeout", type=positive_float, default=0.5, metavar="S", help="(default: 0.5)")
    g.add_argument("--write-timeout", type=positive_float, default=0.5, metavar="S", help="(default: 0.5)")
    g.add_argument(
        "--max-frame", type=positive_int, default=1 << 20, metavar="BYTES", help="(default: 1048576)"
    )
    g.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        metavar="N",
        help="the server's connection limit, if it has one (P2 needs it for external servers)",
    )
    p.set_defaults(func=func)


def _targets(args: argparse.Namespace) -> list[Target]:
    if args.pid and not args.target:
        raise ValueError("--pid: only with --target")
    if args.target:
        target = Target.external(args.target, args.pid)
        return [Target(**{**target.__dict__, "name": args.name or target.name})]
    if args.serve_cmd:
        return [Target.from_command(args.serve_cmd, name=args.name)]
    names = (
        list(BACKENDS)
        if args.backends == "all"
        else [b.strip() for b in args.backends.split(",") if b.strip()]
    )
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"--backends: unknown {unknown or names}; available: {', '.join(BACKENDS)}")
    return [Target.in_process(n) for n in names]


def run_matrix(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    try:
        targets = _targets(args)
        scenarios = select([i.strip() for i in args.only.split(",")] if args.only else None)
        baseline = report.load_baseline(args.baseline) if args.baseline else None
    except ValueError as err:
        print(f"connlab matrix: {err}", file=sys.stderr)
        return 2
    options = Options(
        idle_timeout=args.idle_timeout,
        read_timeout=args.read_timeout,
        write_timeout=args.write_timeout,
        max_frame=args.max_frame,
        max_connections=args.max_connections,
    )
    n = args.repeat
    rounds: list[tuple[list[Result], float]] = []  # each round's results and seconds
    failed = 0
    started = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("matrix", total=n * len(scenarios) * len(targets))
        for k in range(1, n + 1):
            mine: list[Result] = []
            round_started = time.monotonic()
            where = f" (round {k}/{n})" if n > 1 else ""
            for sc in scenarios:
                for target in targets:
                    step = f"{sc.id} on {target.name}  ({failed} failed so far)"
                    progress.update(task, description=f"round {k}/{n}: {step}" if n > 1 else step)
                    result = run_one(sc, target, options)
                    mine.append(result)
                    if result.status == "fail":
                        failed += 1
                        progress.console.print(
                            f"[bold red]FAIL[/] {result.scenario} on {result.target}{where}: {result.detail}",
                            highlight=False,
                        )
                    progress.advance(task)
            rounds.append((mine, time.monotonic() - round_started))
            if n > 1:
                c = report.summary(mine)
                progress.console.print(
                    f"round {k}/{n}: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped "
                    f"in {rounds[-1][1]:.1f} s",
                    highlight=False,
                )
    wall = time.monotonic() - started
    # Over several rounds, one outcome per scenario and target: failed if it failed in any round.
    results: list[Result] = rounds[0][0] if n == 1 else list(repeated([mine for mine, _ in rounds]))
    console.print(report.grid(results, [t.name for t in targets]))
    counts = report.summary(results)
    over = f" over {n} rounds ({failed} of {n * len(results)} runs failed)" if n > 1 else ""
    console.print(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped{over} in {wall:.1f} s"
    )
    for r in results:
        if r.status == "skip":
            console.print(f"  skip {r.scenario} on {r.target}: {r.detail}", style="yellow", highlight=False)
        elif r.status == "fail" and isinstance(r, Repeated) and n > 1:
            failed_in = r.rounds_with("fail")
            console.print(
                f"  FAIL {r.scenario} on {r.target}: failed in {len(failed_in)}/{n} rounds",
                style="bold red",
                highlight=False,
            )
            for i in failed_in:
                console.print(f"    round {i}: {r.runs[i - 1].detail}", highlight=False)
    if args.json:
        report.write_json(args.json, results, wall, rounds if n > 1 else None)
    if args.junit:
        report.write_junit(args.junit, results, wall)
    status = 1 if counts["fail"] else 0
    if baseline is not None:
        worse, better = report.compare(results, baseline)
        for line in worse:
            console.print(f"unexpected failure: {line}", style="bold red", highlight=False)
        for line in better:
            console.print(f"unexpected pass: {line}", style="green", highlight=False)
        if not worse and not better:
            console.print("matches the baseline")
        # Against a baseline, only a change is news: known failures do not fail the run.
        status = 1 if worse else 0
    return status

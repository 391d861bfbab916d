"""`connlab matrix`: run the lifecycle matrix over backends or someone else's server."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console

from connlab._cli.options import (
    backend_list,
    host_port,
    output_path,
    positive_float,
    positive_int,
    scenario_ids,
)
from connlab._native import BACKENDS
from connlab.matrix import report
from connlab.matrix.core import (
    CONFIGURED,
    FAIL,
    PASS,
    WARN,
    Options,
    Repeated,
    Result,
    Scenario,
    Target,
    options_for,
    parse_claim,
    repeated,
    run_one,
    select,
)


def _claim(feature: str) -> Callable[[str], float | int | None]:
    def parse(text: str) -> float | int | None:
        try:
            return parse_claim(feature, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_matrix_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser(
        "matrix",
        help="run the lifecycle matrix over backends, or against your own server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run every lifecycle scenario (docs/MATRIX.md) against the in-process backends, a server\n"
            "command the matrix launches for each scenario (--serve-cmd), or a running server\n"
            "(--target, with --pid for fd/thread checks over its process tree).\n\n"
            "Each row is graded: FAIL (a MUST of the lifecycle broken: a leak, CLOSE_WAIT left, a\n"
            "phantom, data lost or corrupted, half-close not honoured, no backpressure), warn (a\n"
            "SHOULD missed: a claimed timeout that fires late, a slow stop, a CPU bound), n/a (a\n"
            "feature the server does not claim), pass; skip when this target cannot run the row.\n"
            "Tell the matrix what your server implements with the claims below: a row testing an\n"
            "unclaimed feature is n/a, not a failure.\n\n"
            "A line is printed as each row finishes, with an estimate of the time left; results\n"
            "are written to --json/--junit as they come. Every row has a time budget: past it, it\n"
            "fails naming the step it was in, its server is killed and the run goes on.\n\n"
            "Exit status: 0 when no row failed (warnings too with --strict), 1 otherwise, 2 on bad\n"
            "usage or a target that cannot be reached or started, 130/143 on SIGINT/SIGTERM (every\n"
            "server the matrix started is killed and the partial results are written)."
        ),
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--backends",
        type=backend_list,
        default=list(BACKENDS),
        metavar="all|a,b",
        help=f"in-process backends to run (default: all = {','.join(BACKENDS)})",
    )
    where.add_argument(
        "--target", type=host_port, metavar="HOST:PORT", help="a running server to test (it is never stopped)"
    )
    where.add_argument(
        "--serve-cmd",
        metavar="CMD",
        help="a command that starts your server, launched afresh for each scenario in a process group "
        "of its own; SIGTERM must ask it to stop. It is ready when it prints a HOST:PORT on any line "
        "(stdout or stderr) or, if the command contains {port}, when that port (a free one, filled "
        "in) accepts a connection",
    )
    p.add_argument(
        "--handoff-cmd",
        metavar="CMD",
        help="with --serve-cmd: your server hands its listening socket over (S5). The server command "
        "takes {control}, the path of its handoff control socket (a fresh one, filled in), and CMD "
        "starts a successor that takes the listener over from the server at {control} and prints a "
        "HOST:PORT line once it has; without both, S5 is n/a. For connlab serve: --serve-cmd "
        "'connlab serve --backend B --port {port} --control {control}' --handoff-cmd "
        "'connlab serve --backend B --take-over {control} --control {control}'",
    )
    p.add_argument(
        "--pid",
        type=positive_int,
        help="with --target: the server's pid; fds and threads are counted over its process tree",
    )
    p.add_argument("--name", help="the target's column name in the grid (default: the target or 'command')")
    p.add_argument(
        "--only", type=scenario_ids, metavar="IDS", help="comma-separated scenario ids to run (default: all)"
    )
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
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the rows that fail or warn (and each round's counts, the grid and the totals), "
        "for long runs such as --repeat 20",
    )
    p.add_argument(
        "--json",
        type=output_path,
        metavar="FILE",
        help='write every result as JSON, rewritten as each row finishes ("complete": false until the end)',
    )
    p.add_argument(
        "--junit",
        type=output_path,
        metavar="FILE",
        help="write JUnit XML (one suite per target; n/a and skip as skipped), rewritten as rows finish",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="a JSON file from an earlier --json: report unexpected failures and unexpected passes",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 on a warning too")
    p.add_argument(
        "--start-timeout",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="seconds a launched server has to become ready (default: 10)",
    )
    p.add_argument(
        "--scenario-timeout",
        type=positive_float,
        default=1.0,
        metavar="FACTOR",
        help="scale every scenario's time budget (docs/MATRIX.md lists them) by FACTOR (default: 1)",
    )
    g = p.add_argument_group(
        "what your server implements (claims)",
        "Applied to the in-process backends, which have them all (defaults below). For --target and "
        "--serve-cmd the matrix cannot know them: a claim not given is taken as absent, and its rows "
        "are n/a. A timeout or max_frame is a number, or none.",
    )
    for feature in ("idle_timeout", "read_timeout", "write_timeout"):
        g.add_argument(
            f"--{feature.replace('_', '-')}",
            type=_claim(feature),
            default=argparse.SUPPRESS,
            metavar="S|none",
            help=f"the server's {feature.replace('_', ' ')} in seconds (in-process: {CONFIGURED[feature]})",
        )
    g.add_argument(
        "--max-frame",
        type=_claim("max_frame"),
        default=argparse.SUPPRESS,
        metavar="BYTES|none",
        help="the largest frame body it accepts; a larger header is a protocol error "
        f"(in-process: {CONFIGURED['max_frame']})",
    )
    g.add_argument(
        "--byte-echo",
        action="store_true",
        help="it echoes bytes as they come, without framing (no max frame, half a frame answered): "
        "the rows that test framing are n/a",
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
    if args.handoff_cmd and not args.serve_cmd:
        raise ValueError("--handoff-cmd: only with --serve-cmd")
    if args.target:
        return [Target.external(args.target, args.pid, name=args.name)]
    if args.serve_cmd:
        try:
            return [Target.from_command(args.serve_cmd, name=args.name, handoff=args.handoff_cmd)]
        except ValueError as err:
            raise ValueError(f"--handoff-cmd: {err}") from None
    return [Target.in_process(n) for n in args.backends]


def _options(args: argparse.Namespace, in_process: bool) -> Options:
    claims = {f: getattr(args, f) for f in CONFIGURED if hasattr(args, f)}
    return options_for(
        in_process,
        claims,
        max_connections=args.max_connections,
        byte_echo=args.byte_echo,
        start_timeout=args.start_timeout,
        budget_scale=args.scenario_timeout,
    )


class Run:
    """One matrix run: every row as it finishes on screen, in the files, and in the totals."""

    def __init__(self, args: argparse.Namespace, scenarios: list[Scenario], targets: list[Target]) -> None:
        self.args, self.scenarios, self.targets = args, scenarios, targets
        self.console = Console(soft_wrap=True, highlight=False)
        self.rounds: list[tuple[list[Result], float]] = []
        self.started = time.monotonic()
        total = args.repeat * len(scenarios) * len(targets)
        self.budget_left = args.repeat * len(targets) * sum(s.budget for s in scenarios)
        self.budget_done = 0.0
        self.done, self.total, self.failed, self.warned = 0, total, 0, 0
        #: Targets whose server has started at least once.
        self.came_up: set[str] = set()

    def row(self, k: int, sc: Scenario, target: Target, result: Result, mine: list[Result]) -> None:
        self.done += 1
        self.failed += result.status == FAIL
        self.warned += result.status == WARN
        self.budget_left -= sc.budget
        self.budget_done += sc.budget
        elapsed = time.monotonic() - self.started
        # Time left: the budgets of the rows left, at the pace the finished rows ran at theirs.
        left = self.budget_left * elapsed / self.budget_done if self.budget_done else 0.0
        where = f" round {k}/{self.args.repeat}" if self.args.repeat > 1 else ""
        style = report.STYLE[result.status]
        label = report.LABEL[result.status]
        detail = f": {result.detail}" if result.status in (FAIL, WARN) else ""
        width = len(str(self.total))
        if self.args.quiet and result.status not in (FAIL, WARN):
            self.write(mine, finished=False)
            return
        self.console.print(
            f"[{self.done:>{width}}/{self.total}] {sc.id:<3} on {target.name}{where}  [{style}]{label}[/] "
            f"{result.seconds:.1f} s  (elapsed {_clock(elapsed)}, ~{_clock(left)} left){detail}"
        )
        self.write(mine, finished=False)

    def running(self, k: int, sc: Scenario, target: Target) -> AbstractContextManager[Any]:
        """On a terminal, a live line for the row that runs now, with its budget."""
        if not self.console.is_terminal:
            return nullcontext()
        where = f" (round {k}/{self.args.repeat})" if self.args.repeat > 1 else ""
        budget = max(1.0, sc.budget * self.args.scenario_timeout)
        return self.console.status(f"{sc.id} on {target.name}{where}: {sc.description} (budget {budget:g} s)")

    def results(self, current: list[Result] | None = None) -> list[Result]:
        rounds = [mine for mine, _ in self.rounds] + ([current] if current else [])
        if self.args.repeat == 1 or not rounds:
            return rounds[0] if rounds else []
        return list(repeated(rounds))

    def write(self, current: list[Result] | None, finished: bool) -> None:
        """The JSON and JUnit files as they stand (atomically replaced)."""
        results = self.results(current)
        wall = time.monotonic() - self.started
        rounds = list(self.rounds) + ([(current, wall)] if current else [])
        if self.args.json:
            report.write_json(
                self.args.json, results, wall, rounds if self.args.repeat > 1 else None, finished
            )
        if self.args.junit:
            report.write_junit(self.args.junit, results, wall)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_matrix(args: argparse.Namespace) -> int:
    try:
        targets = _targets(args)
        scenarios = select(args.only)
        baseline = report.load_baseline(args.baseline) if args.baseline else None
        for target in targets:
            if why := target.reachable():
                raise ValueError(f"{why}; nothing was run")
    except ValueError as err:
        print(f"connlab matrix: {err}", file=sys.stderr)
        return 2
    options = _options(args, in_process=not (args.target or args.serve_cmd))
    run = Run(args, scenarios, targets)
    console, n = run.console, args.repeat
    mine: list[Result] = []
    try:
        for k in range(1, n + 1):
            mine = []
            round_started = time.monotonic()
            for sc in scenarios:
                for target in targets:
                    with run.running(k, sc, target):
                        result = run_one(sc, target, options)
                    mine.append(result)
                    run.row(k, sc, target, result, mine)
                    # A target whose server never came up would fail every row the same way.
                    if _start_failed(result) and target.name not in run.came_up:
                        raise _CannotStart(result.detail)
                    if result.status in (PASS, WARN, FAIL) and not _start_failed(result):
                        run.came_up.add(target.name)
            run.rounds.append((mine, time.monotonic() - round_started))
            mine = []
            if n > 1:
                console.print(f"round {k}/{n}: {report.counts_line(report.summary(run.rounds[-1][0]))}")
    except _CannotStart as err:
        run.write(mine, finished=False)
        print(f"connlab matrix: the server could not be started: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run.write(mine, finished=False)
        if args.json or args.junit:
            console.print(f"partial results written after {run.done} of {run.total} rows")
        raise
    run.write(None, finished=True)
    return _summarize(run, baseline)


class _CannotStart(Exception):
    """The target's server did not come up for its first row: every row would fail the same way."""


def _start_failed(result: Result) -> bool:
    return result.status == FAIL and result.detail.startswith("StartError")


def _summarize(run: Run, baseline: dict[tuple[str, str], str] | None) -> int:
    console, n = run.console, run.args.repeat
    results = run.results()
    wall = time.monotonic() - run.started
    console.print(report.grid(results, [t.name for t in run.targets]))
    counts = report.summary(results)
    over = f" over {n} rounds ({run.failed} of {n * len(results)} runs failed)" if n > 1 else ""
    console.print(f"{report.counts_line(counts)}{over} in {wall:.1f} s")
    for r in results:
        if r.status in ("skip", "n/a"):
            console.print(f"  {r.status} {r.scenario} on {r.target}: {r.detail}", style="yellow")
        elif r.status == WARN:
            console.print(f"  warn {r.scenario} on {r.target}: {r.detail}", style="magenta")
        elif r.status == FAIL and isinstance(r, Repeated) and n > 1:
            failed_in = r.rounds_with(FAIL)
            console.print(
                f"  FAIL {r.scenario} on {r.target}: failed in {len(failed_in)}/{n} rounds", style="bold red"
            )
            for i in failed_in:
                console.print(f"    round {i}: {r.runs[i - 1].detail}")
        elif r.status == FAIL:
            console.print(f"  FAIL {r.scenario} on {r.target}: {r.detail}", style="bold red")
    bad = counts[FAIL] + (counts[WARN] if run.args.strict else 0)
    status = 1 if bad else 0
    if baseline is not None:
        worse, better = report.compare(results, baseline)
        for line in worse:
            console.print(f"unexpected failure: {line}", style="bold red")
        for line in better:
            console.print(f"unexpected pass: {line}", style="green")
        if not worse and not better:
            console.print("matches the baseline")
        # Against a baseline, only a change is news: known failures do not fail the run.
        status = 1 if worse else 0
    return status

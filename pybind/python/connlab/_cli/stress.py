"""`connlab stress`: the steps of `make stress` that no other command runs (many connections at
once; every accepted fd closed exactly once, under strace)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from connlab._cli.options import backend_list, churn_spec, connections
from connlab._measure import stress
from connlab._native import unavailable


def cmd_stress(args: argparse.Namespace) -> int:
    """Stress every backend, each in its own `connlab serve` process, one step:

    connections: 10 000 connections at once (5 000 on blocking; --connections to change), each
    served a frame, then all closed: the server's fds, threads and CLOSE_WAIT must come back to
    their baseline. Skipped, with the reason, where RLIMIT_NOFILE cannot be raised for them.

    closes: 1 000 x 10 churned connections (--churn to change) under `strace -f -e
    trace=accept,accept4,close,shutdown`: 0 EBADF, and every fd an accept returned closed exactly
    once (uring accepts inside io_uring: its closes are counted against the connections it
    accepted).

    Prints a line per backend, then a verdict line. Exit status: 0 when no backend failed, 1
    otherwise, 2 on bad usage."""
    start = time.monotonic()
    outcomes = []
    for backend in args.backends:
        if why := unavailable(backend):
            outcome = stress.Outcome(backend, None, f"skipped: {why}")
        elif args.step == "connections":
            n = args.connections or stress.default_connections(backend)
            outcome = stress.many_connections(backend, n)
        else:
            outcome = stress.closes_once(backend, *args.churn)
        print(outcome.line(), flush=True)
        outcomes.append(outcome)
    failed = [o.backend for o in outcomes if o.passed is False]
    skipped = [o.backend for o in outcomes if o.passed is None]
    verdict = "FAIL" if failed else "PASS"
    notes = [f"failed: {', '.join(failed)}"] if failed else []
    notes += [f"skipped: {', '.join(skipped)}"] if skipped else []
    tail = f" ({'; '.join(notes)})" if notes else ""
    took = time.monotonic() - start
    print(f"stress {args.step}: {verdict}, {len(outcomes)} backends in {took:.0f} s{tail}")
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stress",
        help="many connections at once, or every close under strace, on every backend",
        description=cmd_stress.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("step", choices=("connections", "closes"), help="which stress step to run")
    p.add_argument(
        "--backends",
        type=backend_list,
        default="all",
        metavar="all|a,b",
        help="backends to stress (default: all)",
    )
    p.add_argument(
        "--connections",
        type=connections,
        default=None,
        help="connections held at once by the connections step (default: 10 000, 5 000 on blocking)",
    )
    p.add_argument(
        "--churn",
        type=churn_spec,
        default=stress.CHURN,
        metavar="CxP",
        help="cycles x parallel connections churned by the closes step (default: 1000x10)",
    )
    p.set_defaults(func=cmd_stress)

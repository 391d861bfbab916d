"""`connlab handoff`: the cost of a listener handoff to clients, for pairs of backends."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from connlab._cli.measure import _progress
from connlab._cli.options import output_path, repetitions
from connlab._measure import handoff
from connlab._native import BACKENDS

#: The pairs measured by default: like for like, and across the architectures.
DEFAULT_PAIRS = "epoll:epoll,blocking:epoll,epoll:tokio,tokio:pool,pool:poll"


def pair_list(text: str) -> list[tuple[str, str]]:
    """`FROM:TO` pairs separated by commas, or `all` (every ordered pair of backends)."""
    if text == "all":
        return [(a, b) for a in BACKENDS for b in BACKENDS]
    pairs = []
    for item in text.split(","):
        a, sep, b = item.strip().partition(":")
        if not sep or a not in BACKENDS or b not in BACKENDS:
            raise argparse.ArgumentTypeError(
                f"expected FROM:TO with backends among {', '.join(BACKENDS)}, got {item!r}"
            )
        pairs.append((a, b))
    return pairs


def _ms(cell: dict[str, float] | None) -> str:
    return "-" if cell is None else f"{cell['median']:.2f} / {cell['max']:.2f}"


def cmd_handoff(args: argparse.Namespace) -> int:
    """Hand the listening socket of a `connlab serve` process over to another (`--control`,
    `--take-over`) while the Rust generator churns connections on the port, for each pair of
    backends, interleaved over the repetitions. Reports, per pair, the median (and max) time from
    the take-over request to the successor accepting, to the incumbent's seal (it accepts no more)
    and to the successor's first accepted connection; the incumbent's drain; and the longest
    connect-to-echo time of the churn spanning the switch against the same churn without one.
    Exits 1 if a churned connection was refused, reset or lost, or the incumbent forced one."""
    console = Console(soft_wrap=True, width=max(Console().width, 120))
    progress, step = _progress(console, args.repetitions * len(args.pairs))
    with progress:
        switches = handoff.run(args.pairs, args.repetitions, step)
    rows = handoff.summary(switches)
    table = Table(
        title=f"connlab handoff: median / max over {args.repetitions} runs, ms from the take-over request"
    )
    heads = ("pair", "accepting", "sealed", "1st accept", "drain", "churn max", "no-switch max", "errors")
    for h in heads:
        table.add_column(h, justify="left" if h in ("pair", "errors") else "right")
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        if r["forced"]:
            errors += f", forced {r['forced']}"
        names = ("serving_ms", "sealed_ms", "first_accept_ms", "drain_ms", "churn_max_ms", "baseline_max_ms")
        table.add_row(r["pair"], *(_ms(r[n]) for n in names), errors)
    console.print(table)
    if args.json:
        out: dict[str, Any] = {"runs": [asdict(s) for s in switches], "summary": rows}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    failed = any(r["errors"] or r["forced"] for r in rows)
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "handoff",
        help="hand a listener from one backend's process to another's under churn, and time it",
        description=cmd_handoff.__doc__,
    )
    p.add_argument(
        "--pairs",
        type=pair_list,
        default=pair_list(DEFAULT_PAIRS),
        metavar="FROM:TO,...|all",
        help=f"backend pairs (default: {DEFAULT_PAIRS})",
    )
    p.add_argument(
        "--repetitions", type=repetitions, default=3, metavar="N", help="runs per pair (default: 3)"
    )
    p.add_argument("--json", type=output_path, metavar="FILE", help="write every run and the summary as JSON")
    p.set_defaults(func=cmd_handoff)

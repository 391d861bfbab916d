"""The `connlab` command line: the parser of every command, and how a stop signal ends one.

Commands live in their modules: `serve`, `proxy`, `matrix`, `measure` (bench, compare, soak),
`handoff` and `stress`;
`options` holds the argparse types and option groups they share."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from types import FrameType

from connlab._cli import handoff, measure, proxy, serve, stress
from connlab._cli.matrix import add_matrix_parser, run_matrix


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same `with` and
    `finally` blocks stop every server a command started; the exit status is 128 + 15."""

    exit_code = 143


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connlab",
        description="connlab: TCP server architectures side by side, over the whole life of a connection.",
    )
    try:
        installed = version("connlab")
    except PackageNotFoundError:  # run from a source tree without installing
        installed = "unknown"
    parser.add_argument("--version", action="version", version=f"connlab {installed}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    proxy.add_parser(sub)
    add_matrix_parser(sub, run_matrix)
    measure.add_parsers(sub)
    handoff.add_parser(sub)
    stress.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. SIGINT exits 130 and SIGTERM 143, with one line and no traceback, once
    the command has cleaned up; `serve` and `proxy` wait for both signals themselves and stop."""
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "proxy"):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as stop:
        how = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"connlab {args.command}: {how}", file=sys.stderr)
        return Terminated.exit_code if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

"""The `connlab` command line: `serve` runs one backend until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from connlab._cli import measure
from connlab._cli.matrix import add_matrix_parser, run_matrix
from connlab._cli.options import non_negative_float, non_negative_int
from connlab._native import BACKENDS, Server


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """The server's configuration, one option per `connlab.Server` argument."""
    g = parser.add_argument_group("server configuration (as connlab.Server)")
    g.add_argument("--host", default="127.0.0.1", help="IP address to listen on (default: %(default)s)")
    g.add_argument("--port", type=non_negative_int, default=0, help="port; 0 picks a free one (default: 0)")
    g.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="worker threads for pooled backends (default: number of cores)",
    )
    g.add_argument(
        "--max-connections",
        type=non_negative_int,
        default=10_000,
        help="connections over this are accepted and closed at once (default: %(default)s)",
    )
    g.add_argument(
        "--max-frame",
        type=non_negative_int,
        default=1 << 20,
        help="largest frame body in bytes; a larger header is a protocol error (default: %(default)s)",
    )
    g.add_argument(
        "--max-pending-output",
        type=non_negative_int,
        default=4 << 20,
        help="queued answer bytes above which reading pauses (default: %(default)s)",
    )
    for name, default, what in (
        ("idle", 60.0, "no frame in progress and nothing queued"),
        ("read", 10.0, "from a frame's first byte to its last"),
        ("write", 10.0, "no byte of a queued answer accepted by the socket"),
    ):
        g.add_argument(
            f"--{name}-timeout",
            type=non_negative_float,
            default=default,
            metavar="SECONDS",
            help=f"close after this long with {what}; 0 disables (default: {default})",
        )
    g.add_argument(
        "--backlog", type=non_negative_int, default=1024, help="listen backlog (default: %(default)s)"
    )
    g.add_argument(
        "--journal-capacity",
        type=non_negative_int,
        default=0,
        help="transition journal entries kept; 0 turns it off (default: 0 for serve)",
    )


def _server_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "max_connections": args.max_connections,
        "max_frame": args.max_frame,
        "max_pending_output": args.max_pending_output,
        "idle_timeout": args.idle_timeout,
        "read_timeout": args.read_timeout,
        "write_timeout": args.write_timeout,
        "backlog": args.backlog,
        "journal_capacity": args.journal_capacity,
    }


def _emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    # Block the stop signals before any server thread exists, so every thread
    # inherits the mask and sigwait below is the only place they arrive.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = Server(args.backend, **_server_kwargs(args))
    except (ValueError, OSError) as err:
        print(f"connlab serve: {err}", file=sys.stderr)
        return 2
    host, port = server.address
    _emit(
        {
            "event": "listening",
            "backend": args.backend,
            "address": f"{host}:{port}",
            "host": host,
            "port": port,
            "pid": os.getpid(),
        }
    )
    received = signal.sigwait(stop_signals)
    report = server.stop(args.grace)
    _emit({"event": "stopped", "signal": signal.Signals(received).name, **report})
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    return run_matrix(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connlab",
        description="connlab: TCP server architectures side by side, over the whole life of a connection.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run one backend until SIGINT/SIGTERM",
        description=(
            "Run one backend of the framed-echo protocol. Prints one JSON line "
            '{"event": "listening", "address": "HOST:PORT", ...} once the listener is up, serves until '
            "SIGINT or SIGTERM, then stops gracefully (answers in flight are delivered within --grace), "
            'prints {"event": "stopped", "drained": N, "forced": N, ...} and exits 0.'
        ),
    )
    serve.add_argument("--backend", required=True, choices=BACKENDS, help="the server architecture to run")
    serve.add_argument(
        "--grace",
        type=non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="time given to busy connections to finish when stopping (default: %(default)s)",
    )
    _add_server_options(serve)
    serve.set_defaults(func=cmd_serve)
    add_matrix_parser(sub, cmd_matrix)
    measure.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

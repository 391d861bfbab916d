"""`connlab serve`: one backend in this process until SIGINT or SIGTERM, its life as JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from connlab._cli.options import add_server_options, non_negative_float, server_kwargs
from connlab._native import BACKENDS, Server


def _emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one backend of the framed-echo protocol. Prints one JSON line {"event": "listening",
    "address": "HOST:PORT", ...} once the listener is up, serves until SIGINT or SIGTERM, then stops
    gracefully (answers in flight are delivered within --grace), prints {"event": "stopped",
    "drained": N, "forced": N, ...} and exits 0."""
    # Block the stop signals before any server thread exists, so every thread
    # inherits the mask and sigwait below is the only place they arrive.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = Server(args.backend, **server_kwargs(args))
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


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run one backend until SIGINT/SIGTERM", description=cmd_serve.__doc__
    )
    serve.add_argument("--backend", required=True, choices=BACKENDS, help="the server architecture to run")
    serve.add_argument(
        "--grace",
        type=non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="time given to busy connections to finish when stopping (default: %(default)s)",
    )
    add_server_options(serve)
    serve.set_defaults(func=cmd_serve)

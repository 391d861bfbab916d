"""`connlab serve`: one backend in this process until SIGINT or SIGTERM, its life as JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from connlab._cli.options import add_server_options, non_negative_float, server_kwargs
from connlab._native import BACKENDS, BackendUnavailable, Server


def _emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one backend of the framed-echo protocol. Prints one JSON line {"event": "listening",
    "address": "HOST:PORT", ...} once the listener is up, serves until SIGINT or SIGTERM, then stops
    gracefully (answers in flight are delivered within --grace), prints {"event": "stopped",
    "drained": N, "forced": N, "accepted": N, "rejected": N, "closed": N, ...} and exits 0.

    Handoff: with --control PATH a successor started with --take-over PATH takes the listening
    socket over (no connection refused or lost); this server then drains within --grace, prints
    {"event": "stopped", "reason": "handoff", ...} and exits 0. A refused handoff session is
    printed as {"event": "handoff-rejected", "reason": ...} and this server serves on."""
    # Block the stop signals before any server thread exists, so every thread
    # inherits the mask and sigwait below is the only place they arrive.
    # SIGUSR2 is this process's own: the handoff watcher wakes the main thread with it.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals | {signal.SIGUSR2})
    handoff = {"control": args.control, "take_over": args.take_over, "handoff_grace": args.grace}
    try:
        server = Server(args.backend, **server_kwargs(args), **handoff)
    except (ValueError, OSError, BackendUnavailable) as err:
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
            **({"control": str(args.control)} if args.control else {}),
            **({"handoff": server.handoff} if args.take_over else {}),
        }
    )
    handed_off: list[dict[str, Any]] = []
    if args.control:
        main = threading.main_thread().ident
        assert main is not None

        def watch() -> None:
            while (event := server.handoff_event()) is not None:
                if event["event"] == "rejected":
                    _emit({"event": "handoff-rejected", "reason": event["reason"]})
                else:
                    handed_off.append(event)
                    signal.pthread_kill(main, signal.SIGUSR2)
                    return

        threading.Thread(target=watch, name="connlab-serve-handoff", daemon=True).start()
    while True:
        received = signal.sigwait(stop_signals | {signal.SIGUSR2})
        if received != signal.SIGUSR2 or handed_off:
            break
    if handed_off:
        event = handed_off[0]
        server.stop(0)  # closes the control; the drain is over already
        report = {k: event[k] for k in ("drained", "forced", "elapsed_s")}
        extra = {k: event[k] for k in ("id", "successor_pid", "committed")}
        _emit({"event": "stopped", "reason": "handoff", **report, **extra})
        return 0
    report = server.stop(args.grace)
    stats = server.stats()
    counts = {k: stats[k] for k in ("accepted", "rejected", "closed")}
    _emit({"event": "stopped", "signal": signal.Signals(received).name, **report, **counts})
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
    g = serve.add_argument_group("handoff (docs/DESIGN.md §4b)")
    g.add_argument(
        "--control",
        metavar="PATH",
        help="open a handoff control socket (a Unix socket) at PATH: a successor started with"
        " --take-over PATH takes the listening socket over, then this server drains and exits",
    )
    g.add_argument(
        "--take-over",
        metavar="PATH",
        help="take the listening socket over from the server whose control socket is PATH; its"
        " address is kept (--host and --port are not used)",
    )
    add_server_options(serve)
    serve.set_defaults(func=cmd_serve)

"""`connlab proxy`: the fault-injecting proxy in front of any server, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from connlab._cli.options import address, non_negative_int
from connlab.proxy import TOXIC_TYPES, Proxy, parse_toxic


def _toxic(text: str) -> dict[str, Any]:
    try:
        return parse_toxic(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def cmd_proxy(args: argparse.Namespace) -> int:
    """Forward every connection to --upstream through the given toxics. Prints one JSON line
    {"event": "listening", "address": "HOST:PORT", ...} once it listens (like `connlab serve`),
    runs until SIGINT or SIGTERM, then ends every connection, prints {"event": "stopped", ...}
    with its counters and exits 0."""
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the proxy's threads exist: they inherit the mask, and sigwait gets them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    (host, port), upstream = args.listen, args.upstream
    try:
        proxy = Proxy(upstream, seed=args.seed, host=host, port=port)
        for toxic in args.toxic:
            proxy.add_toxic(**toxic)
    except (ValueError, OSError) as err:
        print(f"connlab proxy: {err}", file=sys.stderr)
        return 2
    with proxy:
        host, port = proxy.address
        _emit(
            {
                "event": "listening",
                "address": f"{host}:{port}",
                "host": host,
                "port": port,
                "upstream": f"{upstream[0]}:{upstream[1]}",
                "toxics": proxy.toxics(),
                "pid": os.getpid(),
            }
        )
        received = signal.sigwait(stop_signals)
        stats = proxy.stats()
    _emit({"event": "stopped", "signal": signal.Signals(received).name, **stats})
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "proxy",
        help="a fault-injecting TCP proxy (toxiproxy's toxics) in front of any server",
        description=cmd_proxy.__doc__,
    )
    p.add_argument("--upstream", type=address, required=True, metavar="HOST:PORT", help="the server")
    p.add_argument(
        "--listen",
        type=address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where to listen (default: 127.0.0.1:0, a free port)",
    )
    p.add_argument(
        "--toxic",
        type=_toxic,
        action="append",
        default=[],
        metavar="TYPE[:STREAM[:K=V,...]]",
        help=f"a toxic, repeatable: TYPE one of {', '.join(TOXIC_TYPES)}; STREAM upstream (client to "
        "server) or downstream (default); K=V its attributes in toxiproxy's units (ms; rate KiB/s; "
        "slicer delay µs) and toxicity=0..1. E.g. latency:downstream:latency=50,jitter=5",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        help="seed of the toxicity draws: the same seed affects the same connections",
    )
    p.set_defaults(func=cmd_proxy)

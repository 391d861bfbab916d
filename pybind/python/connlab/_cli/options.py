"""argparse types and option groups shared by the commands, so each is checked one way, with one
message, and before any work starts (argparse exits 2 on an `ArgumentTypeError`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connlab.matrix.core import parse_backends


def number(
    kind: type[int] | type[float], *, positive: bool, most: float | None = None, why: str = ""
) -> Callable[[str], int | float]:
    """Parses an int or float that must be > 0 (`positive`) or >= 0, and at most `most` (`why`
    says what the limit is)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if not positive and not value >= 0:
            raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}{why}, got {text}")
        return value

    return parse


positive_int = number(int, positive=True)
positive_float = number(float, positive=True)
non_negative_int = number(int, positive=False)
non_negative_float = number(float, positive=False)
#: A TCP port.
port = number(int, positive=False, most=65535)
#: Seconds a measurement runs (an hour at most: every load loop is bounded).
seconds = number(float, positive=True, most=3600, why=" (an hour)")
#: Threads of a server or the generator.
threads = number(int, positive=True, most=256, why=" threads")
#: Threads of the load generator (its own limit).
gen_threads = number(int, positive=True, most=64, why=" generator threads")
#: A frame's payload: what a `connlab serve` child accepts by default (its --max-frame).
frame_size = number(int, positive=True, most=1 << 20, why=" bytes (connlab serve's --max-frame)")
#: Frames in flight per connection (the generator's limit).
pipeline = number(int, positive=True, most=4096)
#: Repetitions of a run.
repetitions = number(int, positive=True, most=1000)
#: A share, such as an error rate: above 0, at most 1.
fraction = number(float, positive=True, most=1)
#: An open loop's rate, frames/s: above what one machine's loopback carries.
rate = number(int, positive=True, most=10_000_000, why=" frames/s (more than a loopback carries)")
#: Frames of the syscall phase per server: at most a million (minutes under strace).
syscall_frames = number(int, positive=True, most=1_000_000, why=" frames (slow under strace)")


def local_ports() -> int:
    """How many local ports connections to one address can use (`net.ipv4.ip_local_port_range`)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


def connections(text: str) -> int:
    """A number of connections to one address: at least 1, at most the local port range."""
    most = local_ports()
    return int(number(int, positive=True, most=most, why=" (net.ipv4.ip_local_port_range)")(text))


def int_list(text: str) -> list[int]:
    """`0,100,1000`: one or more non-negative integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def connection_list(text: str) -> list[int]:
    """`1,10,100`: connection counts, each at least 1 and at most the local port range."""
    values = int_list(text)
    for v in values:
        connections(str(v))
    return values


def idle_steps(text: str) -> list[int]:
    """`0,1000,5000`: ascending connection counts, at least two, for the slope of RSS over them."""
    steps = int_list(text)
    if len(steps) < 2 or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError(
            f"expected two or more ascending counts such as 0,1000, got {text!r}"
        )
    connections(str(steps[-1]))
    return steps


def churn_spec(text: str) -> tuple[int, int]:
    """`CYCLESxPARALLEL`, such as 1000x10, both at least 1; every churned connection leaves a
    TIME_WAIT for a minute, so all of them together fit in the local port range."""
    cycles, sep, parallel = text.partition("x")
    if not sep or not cycles.isdigit() or not parallel.isdigit() or int(cycles) < 1 or int(parallel) < 1:
        raise argparse.ArgumentTypeError(f"expected CYCLESxPARALLEL such as 1000x10, got {text!r}")
    if int(cycles) * int(parallel) > local_ports():
        raise argparse.ArgumentTypeError(
            f"{text}: {int(cycles) * int(parallel):,} connections, each leaving a TIME_WAIT, are more than"
            f" the {local_ports():,} local ports (net.ipv4.ip_local_port_range)"
        )
    return int(cycles), int(parallel)


def address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as (host, port), the port in 0-65535 (0: any free one,
    where the option listens)."""
    host, sep, port_ = text.rpartition(":")
    if not sep or not host or not port_.isdigit() or int(port_) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:7000, got {text!r}")
    return host.strip("[]"), int(port_)


def host_port(text: str) -> str:
    """`HOST:PORT` of a running server (port 1-65535), kept as given."""
    if address(text)[1] == 0:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:7000, got {text!r}")
    return text


def scenario_ids(text: str) -> list[str]:
    """`H1,T5`: matrix scenario ids, each one that exists."""
    # Imported here: the scenarios are the matrix's, which `connlab serve` need not load.
    from connlab import matrix  # noqa: PLC0415

    ids = [i.strip() for i in text.split(",") if i.strip()]
    try:
        matrix.select(ids)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return ids


def backend_list(text: str) -> list[str]:
    """`all`, or backend names separated by commas (`connlab.matrix.core.parse_backends`)."""
    try:
        return parse_backends(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _writable_dir(path: Path) -> str | None:
    """Why files cannot be created in directory `path`, or None if they can."""
    if not path.exists():
        return f"directory {path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"directory {path} is not writable"
    return None


def output_path(text: str) -> Path:
    """A file to write at the end of a run, checked now: a run of minutes must not be lost to a
    typo found when its results are written."""
    path = Path(text)
    why = _writable_dir(path.parent)
    if why is None and path.is_dir():
        why = "it is a directory"
    elif why is None and path.exists() and not os.access(path, os.W_OK):
        why = "the file is not writable"
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {why}")
    return path


def output_dir(text: str) -> Path:
    """A directory to write into, created when the results come: checked now, it exists and is
    writable, or its nearest existing ancestor is a writable directory."""
    path = Path(text)
    ancestor = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    why = _writable_dir(ancestor)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write into {text}: {why}")
    return path


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The server's configuration, one option per `connlab.Server` argument."""
    g = parser.add_argument_group("server configuration (as connlab.Server)")
    g.add_argument("--host", default="127.0.0.1", help="IP address to listen on (default: %(default)s)")
    g.add_argument("--port", type=port, default=0, help="port; 0 picks a free one (default: 0)")
    g.add_argument(
        "--workers",
        type=threads,
        default=None,
        help="worker threads of pool and tokio, shards of sharded (default: number of cores)",
    )
    counts = (
        ("max-connections", 10_000, "connections over this are accepted and closed at once"),
        ("max-frame", 1 << 20, "largest frame body in bytes; a larger header is a protocol error"),
        ("max-pending-output", 4 << 20, "queued answer bytes above which reading pauses"),
        ("backlog", 1024, "listen backlog"),
        ("journal-capacity", 0, "transition journal entries kept; 0 turns it off"),
    )
    for name, default, what in counts:
        g.add_argument(
            f"--{name}", type=non_negative_int, default=default, help=f"{what} (default: {default})"
        )
    for name, seconds, what in (
        ("idle", 60.0, "no frame in progress and nothing queued"),
        ("read", 10.0, "from a frame's first byte to its last"),
        ("write", 10.0, "no byte of a queued answer accepted by the socket"),
    ):
        g.add_argument(
            f"--{name}-timeout",
            type=non_negative_float,
            default=seconds,
            metavar="SECONDS",
            help=f"close after this long with {what}; 0 disables (default: {seconds})",
        )


#: `connlab.Server` keyword arguments that `add_server_options` adds, by their argparse dest.
SERVER_KWARGS = (
    "host",
    "port",
    "workers",
    "max_connections",
    "max_frame",
    "max_pending_output",
    "idle_timeout",
    "read_timeout",
    "write_timeout",
    "backlog",
    "journal_capacity",
)


def server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `connlab.Server` keyword arguments of a command line parsed with `add_server_options`."""
    return {key: getattr(args, key) for key in SERVER_KWARGS}

"""Typed stubs of the native module (PyO3): the servers themselves and the load generator."""

import os
from types import TracebackType
from typing import Any, Self, TypedDict

BACKENDS: tuple[str, ...]
STATES: tuple[str, ...]
CLOSE_REASONS: tuple[str, ...]

class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (e.g. `uring` where io_uring is disabled)."""

def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine, or None if it can."""

Address = tuple[str, int]
Transition = tuple[int, Address, str | None, str, str | None, float]

class Server:
    """A TCP echo server of one backend, listening from construction until `stop()`."""

    def __init__(
        self,
        backend: str,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int | None = None,
        max_connections: int = 10_000,
        max_frame: int = 1 << 20,
        max_pending_output: int = 4 << 20,
        idle_timeout: float | None = 60.0,
        read_timeout: float | None = 10.0,
        write_timeout: float | None = 10.0,
        backlog: int = 1024,
        journal_capacity: int = 65_536,
        thread_stack: int = 64 << 10,
        control: str | os.PathLike[str] | None = None,  # a handoff control socket at this path
        take_over: str | os.PathLike[str] | None = None,  # take the listener over from this control
        handoff_deadline: float = 5.0,  # seconds each handoff step may take
        handoff_grace: float = 1.0,  # the drain's grace after handing off
    ) -> None: ...
    @staticmethod
    def take_over(path: str | os.PathLike[str], backend: str, **kwargs: Any) -> Server: ...
    def handoff_event(self, timeout: float | None = None) -> dict[str, Any] | None: ...
    @property
    def handoff(self) -> dict[str, Any] | None: ...
    @property
    def backend(self) -> str: ...
    @property
    def address(self) -> Address: ...
    def stats(self) -> dict[str, Any]: ...
    def connections(self) -> list[dict[str, Any]]: ...
    def transitions(self, peer: tuple[Any, ...] | None = None) -> list[Transition]: ...
    def stop(self, grace: float = 1.0) -> dict[str, float]: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

# The load generator (public as connlab.load, which documents each run).

LOAD_ERROR_KINDS: tuple[str, ...]  # ("connect", "reset", "eof", "corrupt", "timeout", "io")

LoadLatency = TypedDict(
    "LoadLatency",
    {
        "count": int,  # samples counted
        "min": float,  # microseconds, as every key below
        "mean": float,
        "p50": float,
        "p90": float,
        "p99": float,
        "p99.9": float,
        "max": float,
    },
)

class LoadResult(TypedDict):
    """What every load_* function returns."""

    mode: str  # "closed_loop", "open_loop", "churn" or "pingpong"
    connections: int  # kept open (churn: open at once; pingpong: 1)
    threads: int  # generator threads (pingpong: 2)
    size: int  # payload bytes per frame
    rate: float | None  # the open loop's target frames/s
    frames: int  # answered, verified and counted (churn: connections completed)
    bytes: int  # of the counted frames, headers included, one way
    elapsed_s: float  # the measured window
    frames_per_s: float
    mb_per_s: float  # 10**6 bytes/s, one way
    connects: int  # connections established in the window (churn: completed)
    conns_per_s: float
    lost: int  # frames of the window never answered (connection failed or run ended)
    errors: dict[str, int]  # a count per LOAD_ERROR_KINDS entry
    latency_us: LoadLatency
    histogram: bytes  # HdrHistogram V2 deflate encoding, values in nanoseconds

def load_closed_loop(
    address: tuple[str, int],
    connections: int = 10,
    size: int = 64,
    pipeline: int = 1,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> LoadResult: ...
def load_open_loop(
    address: tuple[str, int],
    rate: float,
    connections: int = 10,
    size: int = 64,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> LoadResult: ...
def load_churn(
    address: tuple[str, int],
    cycles: int,
    parallel: int,
    size: int = 64,
    rst: bool = False,
    threads: int | None = None,
    timeout: float = 2.0,
    deadline: float = 60.0,
) -> LoadResult: ...
def load_pingpong(
    size: int = 64, duration: float = 1.0, warmup: float = 0.1, echo_cpu: int | None = None
) -> LoadResult: ...

class LoadInterval(TypedDict):
    """What LoadRun.take returns: the counts since the last take."""

    frames: int
    connects: int
    lost: int
    errors: dict[str, int]
    histogram: bytes  # HdrHistogram V2 deflate encoding, values in nanoseconds

def load_start(
    address: tuple[str, int],
    connections: int = 10,
    size: int = 64,
    rate: float | None = None,  # None: a closed loop of `pipeline` frames per connection
    pipeline: int = 1,
    duration: float | None = None,  # None: a day, or until stopped
    warmup: float = 0.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> LoadRun: ...

class LoadRun:
    """A run on a native thread of its own; dropped while running, it stops."""

    @property
    def done(self) -> bool: ...
    def take(self) -> LoadInterval: ...
    def stop(self) -> None: ...
    def result(self) -> LoadResult: ...  # waits for the end (GIL released)

# HdrHistogram operations on LoadResult["histogram"] bytes (public in connlab.load, which takes
# base64 text too). Values are nanoseconds; errors are ValueError naming the argument.

def hdr_merge(histograms: list[bytes]) -> bytes: ...  # the V2 deflate encoding of their sum
def hdr_counts(histogram: bytes) -> list[tuple[float, int]]: ...  # (microseconds, count), ascending
def hdr_latency(histogram: bytes) -> LoadLatency: ...  # its percentiles, as a run reports them
def hdr_spectrum(
    histogram: bytes, ticks_per_half_distance: int = 5
) -> list[tuple[float, float]]: ...  # (quantile in [0, 1], microseconds), ending at (1.0, max)
def hdr_log(
    entries: list[tuple[str, float, float, bytes]],  # (tag, start_s since base_time, length_s, histogram)
    base_time: float,  # Unix time in seconds
) -> str: ...  # an HdrHistogram interval log

TOXIC_TYPES: tuple[
    str, ...
]  # ("latency", "bandwidth", "slicer", "limit_data", "reset_peer", "timeout", "slow_close")

class Proxy:
    """A fault-injecting TCP proxy in front of one upstream address."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ) -> None: ...
    @property
    def address(self) -> Address: ...
    def add_toxic(
        self,
        name: str,
        type: str,
        stream: str = "downstream",
        toxicity: float = 1.0,
        attributes: dict[str, int] | None = None,
    ) -> None: ...
    def remove_toxic(self, name: str) -> None: ...
    def toxics(self) -> list[dict[str, Any]]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> bool: ...

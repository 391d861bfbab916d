"""The Rust load generator: closed- and open-loop echo load, churn, and the loopback ping-pong baseline.

Every run multiplexes its connections on one or two native threads (edge-triggered epoll), checks
every echo byte for byte, releases the GIL, and ends by itself: at the latest ``warmup + duration +
timeout`` after it starts (churn: ``deadline``). Network failures are counted in ``errors``, never
raised; bad arguments raise ``ValueError`` naming the argument.

``start`` runs a closed or open loop in the background instead, on a native thread of its own (no
Python thread, so an event loop such as gevent's keeps running): ``Running.take`` hands over what it
counted since the last take, as it goes, and ``Running.stop`` ends it. This is how a Locust worker
reports (``connlab.locust``).

A run has a warm-up (connections open, frames flow, nothing is counted but errors), a measured window
of ``duration`` seconds, and a drain (no new frame; owed answers are awaited, so connections close
with an orderly FIN rather than a reset). A connection that fails counts one error of its kind and is
reopened 10 ms later; a ``corrupt`` answer (wrong length or byte) fails its connection the same way.

Latencies are in microseconds; ``histogram`` is the HdrHistogram of the counted latencies in
nanoseconds, in the compressed V2 encoding every HdrHistogram port decodes (``histogram_base64``
gives the ``HISTF...`` text form of histogram logs and plotters). ``merge_histograms``,
``percentile_spectrum`` and ``histogram_log`` work on those histograms, raw or as base64 text.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Protocol, TypedDict, cast

from connlab import _native

__all__ = [
    "ERROR_KINDS",
    "EncodedHistogram",
    "Interval",
    "Latency",
    "Result",
    "Running",
    "Target",
    "churn",
    "closed_loop",
    "histogram_base64",
    "histogram_counts",
    "histogram_latency",
    "histogram_log",
    "merge_histograms",
    "open_loop",
    "percentile_spectrum",
    "pingpong",
    "start",
]

#: Why a connection failed: ``connect`` (refused, unreachable, no local port), ``reset`` (ECONNRESET,
#: EPIPE), ``eof`` (the server closed while answers were owed), ``corrupt`` (an answer differed from
#: its frame), ``timeout`` (a connect or an owed answer made no progress for ``timeout`` seconds, or
#: was still pending at the run's end), ``io`` (any other socket error).
ERROR_KINDS: tuple[str, ...] = _native.LOAD_ERROR_KINDS

#: Latency percentiles in microseconds (all 0.0 when nothing was counted).
Latency = TypedDict(
    "Latency",
    {
        "count": int,
        "min": float,
        "mean": float,
        "p50": float,
        "p90": float,
        "p99": float,
        "p99.9": float,
        "max": float,
    },
)


class Result(TypedDict):
    """What every run returns."""

    #: ``closed_loop``, ``open_loop``, ``churn`` or ``pingpong``.
    mode: str
    #: Connections kept open (churn: open at once; pingpong: 1).
    connections: int
    #: Generator threads (pingpong: 2, the client and the echo thread).
    threads: int
    #: Payload bytes per frame.
    size: int
    #: The open loop's target rate in frames/s; None otherwise.
    rate: float | None
    #: Frames answered, verified and counted (churn: connections completed).
    frames: int
    #: Bytes of the counted frames, 4-byte headers included, one way.
    bytes: int
    #: The measured window in seconds (open loop: until the last answer of a frame due in it;
    #: churn: the whole run).
    elapsed_s: float
    frames_per_s: float
    #: Millions of bytes per second, one way.
    mb_per_s: float
    #: Connections established inside the window (churn: completed).
    connects: int
    conns_per_s: float
    #: Frames of the window whose latency is unknown: their connection failed, or the run ended,
    #: before the answer came.
    lost: int
    #: A count for every kind in ``ERROR_KINDS``.
    errors: dict[str, int]
    latency_us: Latency
    #: HdrHistogram V2 (deflate) encoding of the counted latencies, in nanoseconds.
    histogram: bytes


class _HasAddress(Protocol):
    @property
    def address(self) -> tuple[str, int]: ...


#: A server to load: a ``(host, port)`` tuple, or anything with an ``address`` (a ``connlab.Server``).
Target = tuple[str, int] | _HasAddress


def _address(target: Target) -> tuple[str, int]:
    # Anything else goes through as given, for the native side to reject naming `address`.
    return cast(tuple[str, int], getattr(target, "address", target))


def closed_loop(
    target: Target,
    connections: int = 10,
    size: int = 64,
    *,
    pipeline: int = 1,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> Result:
    """Closed-loop echo load: each of ``connections`` keeps ``pipeline`` frames of ``size`` bytes in
    flight, sending the next as soon as one is answered. A frame counts if its answer comes inside the
    window; its latency runs from its send. ``threads`` defaults to 1, and 2 from 512 connections on
    (given two cores): below that a second thread only takes a core from a server on the same machine.

    A closed loop sends less when the server is slow, so a stall shows in its throughput and its max,
    not in its percentiles: use ``open_loop`` for latency under a given load.
    """
    raw = _native.load_closed_loop(
        _address(target), connections, size, pipeline, duration, warmup, threads, timeout
    )
    return cast(Result, raw)


def open_loop(
    target: Target,
    rate: float,
    connections: int = 10,
    size: int = 64,
    *,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> Result:
    """Open-loop, constant-rate echo load: frame ``k`` is due at ``start + k / rate`` whatever the
    server does, round-robin over ``connections``, and is sent when due (frames wait in a per-connection
    queue while the socket is full or the connection is reopening). A frame counts if it was due inside
    the window; its latency runs from when it was *due*, so a server that stalls for 200 ms shows 200 ms
    in the tail instead of hiding it (coordinated omission, as wrk2 avoids it). The drain waits up to
    ``timeout`` for the window's last answers.
    """
    raw = _native.load_open_loop(
        _address(target), rate, connections, size, duration, warmup, threads, timeout
    )
    return cast(Result, raw)


def churn(
    target: Target,
    cycles: int,
    parallel: int,
    size: int = 64,
    *,
    rst: bool = False,
    threads: int | None = None,
    timeout: float = 2.0,
    deadline: float = 60.0,
) -> Result:
    """Connection churn: ``cycles * parallel`` connections, at most ``parallel`` open at once (a
    finished one is replaced at once), each connect -> one frame -> verified echo -> close, by FIN or,
    with ``rst``, by RST (SO_LINGER 0; the server sees a reset and no TIME_WAIT is left here). A failed
    attempt counts one error and is not retried. Latency runs from the connect to the verified echo.

    A graceful close leaves TIME_WAIT on this side: tens of thousands of connections can run out of
    local ports, which shows as ``connect`` errors. At ``deadline`` the connections still open count
    as timeouts and the attempts not yet made are not made (``frames + sum(errors)`` then falls short
    of ``cycles * parallel``).
    """
    raw = _native.load_churn(_address(target), cycles, parallel, size, rst, threads, timeout, deadline)
    return cast(Result, raw)


def pingpong(
    size: int = 64, *, duration: float = 1.0, warmup: float = 0.1, echo_cpu: int | None = None
) -> Result:
    """The raw loopback round trip, no connlab server: the generator's own closed-loop client (the
    one that measures a backend's round trip) on one connection to a minimal echo thread of the
    generator (blocking reads, one write per frame), one frame at a time. Its p50 is what the kernel,
    the client and two wake-ups cost: the floor to read a backend's one-connection p50 against, so
    the ratio is the server's overhead alone. `echo_cpu` pins the echo thread to that CPU: in a
    pinned benchmark, the server's, so the floor pays the cross-CPU wake-ups a server pays (the
    client and the echo on one CPU measured a floor four times lower than any server's p50).
    """
    return cast(Result, _native.load_pingpong(size, duration, warmup, echo_cpu))


class Interval(TypedDict):
    """What ``Running.take`` returns: the counts since the last take (``Result``'s fields of that name)."""

    frames: int
    connects: int
    lost: int
    errors: dict[str, int]
    #: HdrHistogram V2 (deflate) encoding of the interval's latencies, in nanoseconds.
    histogram: bytes


class Running:
    """A run ``start`` began: it goes on by itself, on native threads, until its ``duration`` is over
    or ``stop`` is called. Dropped while running, it stops (its threads drain and end by themselves).
    """

    def __init__(self, native: _native.LoadRun) -> None:
        self._native = native

    def take(self) -> Interval:
        """What the run counted since the last take (since its start, the first time): at most 100 ms
        behind while it runs, and everything once ``done``. The takes add up, frame for frame and
        bucket for bucket, to ``result()``."""
        return cast(Interval, self._native.take())

    def stop(self) -> None:
        """Ends the measured window now. The run then drains as at the end of its duration (no new
        frame; owed answers are awaited, at most ``timeout``) and is ``done``; stopping twice is
        harmless."""
        self._native.stop()

    @property
    def done(self) -> bool:
        """Whether the run has ended (``result()`` returns at once)."""
        return self._native.done

    def result(self) -> Result:
        """The run's report, as ``closed_loop``/``open_loop`` return it (its window ends at ``stop``).
        Blocks until the run has ended (the GIL released): under an event loop, poll ``done`` first."""
        return cast(Result, self._native.result())

    def __repr__(self) -> str:
        return repr(self._native)


def start(
    target: Target,
    connections: int = 10,
    size: int = 64,
    *,
    rate: float | None = None,
    pipeline: int = 1,
    duration: float | None = None,
    warmup: float = 0.0,
    threads: int | None = None,
    timeout: float = 2.0,
) -> Running:
    """Starts ``closed_loop`` (no ``rate``) or ``open_loop`` (``rate`` frames/s) in the background and
    returns at once. ``duration=None`` runs until ``stop`` (at most a day); ``warmup`` is 0 by default,
    since a caller that takes as it goes sees the first seconds anyway. Bad arguments raise
    ``ValueError`` here, naming the argument; other arguments are those of ``closed_loop`` and
    ``open_loop``.
    """
    native = _native.load_start(
        _address(target), connections, size, rate, pipeline, duration, warmup, threads, timeout
    )
    return Running(native)


def histogram_base64(result: Result) -> str:
    """The run's histogram as base64 text (``HISTF...``), as HdrHistogram logs and plotters take it."""
    return base64.b64encode(result["histogram"]).decode("ascii")


#: A histogram as runs export it (HdrHistogram V2 deflate, nanoseconds): the raw ``bytes`` of
#: ``Result["histogram"]``, or their base64 text (``str``, ``"HISTF..."``, as ``histogram_base64`` and
#: interval logs give it).
EncodedHistogram = str | bytes


def _raw(histogram: EncodedHistogram, name: str, which: str = "") -> bytes:
    """The encoding's bytes; base64 text is decoded here, errors name ``name`` (``which`` says which
    element, as the native errors do)."""
    if isinstance(histogram, str):
        try:
            return base64.b64decode(histogram.strip(), validate=True)
        except binascii.Error as e:
            raise ValueError(f"{name}: {which}not base64 text: {e}") from None
    if isinstance(histogram, bytes | bytearray | memoryview):
        return bytes(histogram)
    raise TypeError(f"{name}: {which}expected base64 text or bytes, got {type(histogram).__name__}")


def merge_histograms(histograms: Iterable[EncodedHistogram]) -> bytes:
    """The sum of ``histograms`` (e.g. the repetitions of one workload) as one encoded histogram, raw
    V2 deflate bytes like ``Result["histogram"]``: its percentiles are those of all the samples
    together, which averaging the runs' percentiles does not give. None gives an empty histogram.
    Values above 100 s (a run's range) or undecodable input raise ``ValueError`` naming
    ``histograms`` and the index.
    """
    raw = [_raw(h, "histograms", f"[{i}]: ") for i, h in enumerate(histograms)]
    return _native.hdr_merge(raw)


def percentile_spectrum(
    histogram: EncodedHistogram, ticks_per_half_distance: int = 5
) -> list[tuple[float, float]]:
    """The percentile spectrum of ``histogram``: ``(quantile, microseconds)`` pairs, quantile in [0, 1],
    ending at ``(1.0, max)``; empty for an empty histogram. These are the rows of HdrHistogram's
    ``outputPercentileDistribution`` (the ``.hgrm`` text that wrk2 ``-L`` prints and that hdr-plot and
    HdrHistogram's online plotter draw): the quantile ticks halve the distance to 1.0 in
    ``ticks_per_half_distance`` steps each time, so plotted against ``1 / (1 - quantile)`` on a log
    axis every nine of the tail gets the same room.
    """
    return _native.hdr_spectrum(_raw(histogram, "histogram"), ticks_per_half_distance)


def histogram_counts(histogram: EncodedHistogram) -> list[tuple[float, int]]:
    """Every recorded value of ``histogram`` as ``(microseconds, count)``, smallest first: the value is
    the highest of its HdrHistogram bucket (as its percentiles report), the counts sum to the samples.
    For tools that keep histograms of their own, such as Locust's response-time buckets."""
    return _native.hdr_counts(_raw(histogram, "histogram"))


def histogram_latency(histogram: EncodedHistogram) -> Latency:
    """The percentiles of ``histogram`` in microseconds, as a run reports its own in ``latency_us``: of a
    merge (``merge_histograms``), those of all its runs' samples together."""
    return cast(Latency, _native.hdr_latency(_raw(histogram, "histogram")))


def histogram_log(entries: Iterable[tuple[str, float, float, EncodedHistogram]], base_time: float) -> str:
    """An HdrHistogram interval log of ``entries``, each ``(tag, start_s, length_s, histogram)`` with
    ``start_s`` counted from ``base_time`` (a Unix time in seconds, e.g. ``time.time()`` when the
    first run began). It is the text format of HdrHistogram's ``HistogramLogWriter``, which
    HistogramLogAnalyzer plots over time and ``HistogramLogProcessor`` (and every port's log reader)
    reads, e.g. to sum the intervals into the ``.hgrm`` percentile distribution that hdr-plot draws.

    The log opens with ``#[StartTime: ...]`` and ``#[BaseTime: ...]``, a comment on the units and the
    column legend, then one line per entry in the order given (readers expect it sorted by start):
    ``Tag=<tag>,<start>,<length>,<max in ms>,<base64 histogram in ns>``. A tag is one series in
    HistogramLogAnalyzer; ``""`` writes an untagged line, the series it shows by default.

    Bad input raises ``ValueError`` naming the field and the entry's index: ``tag`` (a comma, space,
    CR or LF would split the line), ``start_s`` or ``length_s`` (negative or not finite),
    ``histogram`` (not an encoded histogram); or naming ``base_time``.
    """
    native = [
        (tag, start_s, length_s, _raw(h, "histogram", f"entries[{i}]: "))
        for i, (tag, start_s, length_s, h) in enumerate(entries)
    ]
    return _native.hdr_log(native, base_time)

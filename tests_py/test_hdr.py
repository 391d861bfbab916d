"""HdrHistogram operations on real runs' histograms: merged counts add up, the percentile spectrum
agrees with the run's own percentiles, the interval log holds the runs as HdrHistogram's readers expect
them, and bad input raises ValueError naming the argument."""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

import connlab
from connlab import load

LEGEND = '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"'


@pytest.fixture(scope="module")
def runs() -> dict[str, load.Result]:
    """One closed loop against epoll and one ping-pong: two real, differently shaped histograms
    (short runs, shared by the module's tests)."""
    with connlab.Server("epoll", idle_timeout=30.0, journal_capacity=0) as server:
        closed = load.closed_loop(server, connections=4, duration=0.3, warmup=0.05)
    pingpong = load.pingpong(duration=0.2)
    for result in (closed, pingpong):
        assert result["latency_us"]["count"] > 50, result
    return {"closed_loop": closed, "pingpong": pingpong}


def _varints(data: bytes) -> Iterator[int]:
    """The zig-zag LEB128 numbers of a V2 payload (at most 9 bytes each, the 9th whole)."""
    i = 0
    while i < len(data):
        value = shift = 0
        for k in range(9):
            byte = data[i]
            i += 1
            if k == 8:
                value |= byte << 56
                break
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        yield (value >> 1) ^ -(value & 1)


def count(encoded: bytes) -> int:
    """The samples in a V2 deflate histogram, decoded here independently of connlab (as another
    HdrHistogram port would): a positive number is a bucket's count, a negative one a run of empty
    buckets."""
    _cookie, length = struct.unpack(">ii", encoded[:8])
    inner = zlib.decompress(encoded[8 : 8 + length])
    payload_length = struct.unpack(">i", inner[4:8])[0]
    return sum(n for n in _varints(inner[40 : 40 + payload_length]) if n > 0)


def test_the_independent_decoder_agrees_with_the_runs(runs: dict[str, load.Result]) -> None:
    for result in runs.values():
        assert count(result["histogram"]) == result["latency_us"]["count"]


def test_merging_two_runs_sums_their_counts(runs: dict[str, load.Result]) -> None:
    closed, pingpong = runs["closed_loop"], runs["pingpong"]
    # Base64 text and raw bytes mix.
    merged = load.merge_histograms([load.histogram_base64(closed), pingpong["histogram"]])
    assert count(merged) == closed["latency_us"]["count"] + pingpong["latency_us"]["count"]
    spectrum = load.percentile_spectrum(merged)
    top = max(closed["latency_us"]["max"], pingpong["latency_us"]["max"])
    assert spectrum[-1] == (1.0, pytest.approx(top))
    # The spectrum starts at the top of the lowest bucket, the run's min at its bottom.
    low = min(closed["latency_us"]["min"], pingpong["latency_us"]["min"])
    assert spectrum[0] == (0.0, pytest.approx(low, rel=0.01))
    assert count(load.merge_histograms([])) == 0


def test_the_spectrum_agrees_with_the_runs_percentiles(runs: dict[str, load.Result]) -> None:
    for result in runs.values():
        spectrum = load.percentile_spectrum(load.histogram_base64(result), ticks_per_half_distance=5)
        quantiles = [q for q, _ in spectrum]
        values = [us for _, us in spectrum]
        assert quantiles == sorted(quantiles) and values == sorted(values)
        assert spectrum[-1] == (1.0, pytest.approx(result["latency_us"]["max"]))
        p50 = next(us for q, us in spectrum if q == pytest.approx(0.5))
        # Three significant digits: both come from the same histogram, within its precision.
        assert p50 == pytest.approx(result["latency_us"]["p50"], rel=0.01)
        finer = load.percentile_spectrum(result["histogram"], ticks_per_half_distance=20)
        assert len(finer) > len(spectrum)
    assert load.percentile_spectrum(load.merge_histograms([])) == []


def test_the_interval_log_holds_one_line_per_run(runs: dict[str, load.Result]) -> None:
    base_time = time.time()
    entries = [
        ("closed_loop", 0.0, runs["closed_loop"]["elapsed_s"], load.histogram_base64(runs["closed_loop"])),
        ("pingpong", 1.5, runs["pingpong"]["elapsed_s"], runs["pingpong"]["histogram"]),
    ]
    log = load.histogram_log(entries, base_time)
    assert log.startswith(f"#[StartTime: {base_time:.3f} (seconds since epoch)]\n"), log
    lines = log.splitlines()
    assert f"#[BaseTime: {base_time:.3f} (seconds since epoch)]" in lines
    assert any(line.startswith("#") and "nanoseconds" in line for line in lines)
    assert LEGEND in lines
    intervals = [line for line in lines if not line.startswith(("#", '"'))]
    assert len(intervals) == len(entries), log
    for line, (tag, start_s, length_s, _) in zip(intervals, entries, strict=True):
        fields = line.split(",")
        assert fields[0] == f"Tag={tag}"
        assert float(fields[1]) == pytest.approx(start_s, abs=1e-3)
        assert float(fields[2]) == pytest.approx(length_s, abs=1e-3)
        # The max column is in milliseconds (the log's MaxValueDivisor).
        assert float(fields[3]) == pytest.approx(runs[tag]["latency_us"]["max"] / 1e3, abs=1e-3)
        assert count(base64.b64decode(fields[-1])) == runs[tag]["latency_us"]["count"]


def test_an_empty_tag_writes_an_untagged_line(runs: dict[str, load.Result]) -> None:
    log = load.histogram_log([("", 0.0, 1.0, runs["pingpong"]["histogram"])], 0.0)
    (line,) = [line for line in log.splitlines() if not line.startswith(("#", '"'))]
    assert line.startswith("0.000,1.000,"), line


def test_bad_input_raises_value_error_naming_the_argument(runs: dict[str, load.Result]) -> None:
    good = runs["pingpong"]["histogram"]
    cases: list[tuple[Any, str]] = [
        (lambda: load.merge_histograms([good, b"garbage"]), r"^histograms: \[1\]: "),
        (lambda: load.merge_histograms(["not base64!"]), r"^histograms: \[0\]: "),
        (lambda: load.percentile_spectrum(b"garbage"), r"^histogram: "),
        (lambda: load.percentile_spectrum(good + good), r"^histogram: .*follow"),
        (lambda: load.percentile_spectrum(good, 0), r"^ticks_per_half_distance: "),
        (lambda: load.percentile_spectrum(good, -1), r"^ticks_per_half_distance: "),
        (lambda: load.histogram_log([("a,b", 0.0, 1.0, good)], 0.0), r"^tag: entries\[0\]: "),
        (lambda: load.histogram_log([("a b", 0.0, 1.0, good)], 0.0), r"^tag: "),
        (
            lambda: load.histogram_log([("a", 0.0, 1.0, good), ("b", 0, 1, b"garbage")], 0),
            r"^histogram: entries\[1\]",
        ),
        (lambda: load.histogram_log([("a", -1.0, 1.0, good)], 0.0), r"^start_s: "),
        (lambda: load.histogram_log([("a", 0.0, float("nan"), good)], 0.0), r"^length_s: "),
        (lambda: load.histogram_log([("a", 0.0, 1.0, good)], -1.0), r"^base_time: "),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()

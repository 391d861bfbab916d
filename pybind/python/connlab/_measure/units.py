"""Figures as people read them: a unit chosen per value, three significant digits, thousands
grouped by a space ("1 000 connections", "85.2 µs", "1.33 s", "6 198 conns/s")."""

from __future__ import annotations

import math
from collections.abc import Callable


def grouped(n: float) -> str:
    """An integer with its thousands grouped by spaces: 1 234 567."""
    return f"{round(n):,}".replace(",", " ")


def significant(x: float, digits: int = 3) -> str:
    """`x` to `digits` significant digits, but never in exponent form and never rounding away an
    integer's units (123 456 stays 123 456, grouped)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits - 1:
        return grouped(x)
    decimals = digits - 1 - magnitude
    return f"{x:.{decimals}f}"


def duration_us(us: float) -> str:
    """A latency given in microseconds, in µs, ms or s, whichever keeps it between 1 and 1000."""
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if abs(us) >= scale:
            return f"{significant(us / scale)} {unit}"
    return f"{significant(us)} µs"


def rate(per_s: float) -> str:
    """A rate: 3 significant digits up to 999, then k and M (123 k, 1.23 M)."""
    for suffix, scale in ((" M", 1e6), (" k", 1e3)):
        if abs(per_s) >= scale:
            return f"{significant(per_s / scale)}{suffix}"
    return significant(per_s)


def size(n_bytes: float) -> str:
    """A byte count in B, KiB or MiB, 3 significant digits, whole numbers as such (64 B, 16 KiB,
    9.87 KiB)."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n_bytes) >= scale:
            value = n_bytes / scale
            return f"{grouped(value) if value == int(value) else significant(value)} {unit}"
    return f"{round(n_bytes)} B"


def plural(n: int, noun: str) -> str:
    """`1 connection`, `1 000 connections`."""
    return f"{grouped(n)} {noun}{'' if n == 1 else 's'}"


def ratio(x: float) -> str:
    """A ratio: 1.15x, 12.3x."""
    return f"{significant(x)}x"


def percent(fraction: float) -> str:
    """A fraction as a percentage, no decimals from 10 % on."""
    pct = 100 * fraction
    return f"{pct:.0f} %" if abs(pct) >= 10 else f"{pct:.1f} %"


#: How each benchmark figure is titled and printed.
FIGURES: dict[str, tuple[str, Callable[[float], str]]] = {
    "frames_per_s": ("frames/s", rate),
    "mb_per_s": ("MB/s", significant),
    "conns_per_s": ("connections/s", rate),
    "p50_us": ("p50", duration_us),
    "p99_us": ("p99", duration_us),
    "max_us": ("max", duration_us),
    "server_cpu_us_per_frame": ("server CPU per frame", duration_us),
    "server_cpu_vs_tokio": ("server CPU per frame vs tokio", ratio),
    "server_threads": ("threads", grouped),
    "rss_per_conn_bytes": ("memory per connection", size),
    "proxy_cpu_pct": ("proxy CPU %", lambda v: f"{v:.0f}"),
}


def figure(name: str, value: float) -> str:
    """A figure's value as the report prints it: "p99 1.33 s", "120 k frames/s"."""
    title, text = FIGURES[name]
    return f"{title} {text(value)}" if name.endswith("_us") else f"{text(value)} {title}"

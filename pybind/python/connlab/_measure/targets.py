"""The performance targets, as ratios measured in one bench run (medians), each met or missed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ratio:
    """`backend`'s figure over `versus`'s (another backend, or the raw loopback ping-pong) must be
    at least (`at_least`) or at most (not `at_least`) `bound`."""

    label: str
    workload: str
    figure: str
    backend: str
    versus: str
    bound: float
    at_least: bool = True


@dataclass(frozen=True)
class Limit:
    """`backend`'s absolute figure must be at most `bound`."""

    label: str
    workload: str
    figure: str
    backend: str
    bound: float
    unit: str


def default_targets(workers: int) -> list[Ratio | Limit]:
    r = Ratio
    targets: list[Ratio | Limit] = [
        r(
            "epoll >= 1.0x tokio frames/s at 10 connections",
            "closed64-c10",
            "frames_per_s",
            "epoll",
            "tokio",
            1.0,
        ),
        r(
            "epoll >= 1.0x tokio frames/s at 100 connections",
            "closed64-c100",
            "frames_per_s",
            "epoll",
            "tokio",
            1.0,
        ),
        r(
            "epoll >= 1.0x tokio frames/s at 1000 connections",
            "closed64-c1000",
            "frames_per_s",
            "epoll",
            "tokio",
            1.0,
        ),
        r("epoll >= 1.5x tokio at 16 KiB frames", "closed16k-c10", "mb_per_s", "epoll", "tokio", 1.5),
        r("epoll >= 1.1x tokio churn rate", "churn", "conns_per_s", "epoll", "tokio", 1.1),
        r(
            "epoll p99 <= 0.5x tokio's at 1000 connections",
            "closed64-c1000",
            "p99_us",
            "epoll",
            "tokio",
            0.5,
            False,
        ),
        r("poll >= 0.8x epoll at 100 connections", "closed64-c100", "frames_per_s", "poll", "epoll", 0.8),
        r("pool >= 0.7x epoll at 100 connections", "closed64-c100", "frames_per_s", "pool", "epoll", 0.7),
        r("pool >= 0.7x epoll at 1000 connections", "closed64-c1000", "frames_per_s", "pool", "epoll", 0.7),
        r(
            "blocking >= 0.5x epoll at 1000 connections",
            "closed64-c1000",
            "frames_per_s",
            "blocking",
            "epoll",
            0.5,
        ),
        Limit("epoll idle RSS per connection <= 1 KiB", "idle", "rss_per_conn_bytes", "epoll", 1024, "B"),
        Limit("poll idle RSS per connection <= 1 KiB", "idle", "rss_per_conn_bytes", "poll", 1024, "B"),
        Limit("pool idle RSS per connection <= 1 KiB", "idle", "rss_per_conn_bytes", "pool", 1024, "B"),
        Limit(
            "blocking idle RSS per connection <= 16 KiB", "idle", "rss_per_conn_bytes", "blocking", 16384, "B"
        ),
        Limit("tokio idle RSS per connection <= 4 KiB", "idle", "rss_per_conn_bytes", "tokio", 4096, "B"),
        Limit(
            f"pool threads at 1000 connections <= workers + 1 = {workers + 1} (+1 serve main thread)",
            "closed64-c1000",
            "server_threads",
            "pool",
            workers + 2,
            "threads",
        ),
    ]
    targets += [
        r(
            f"{b} one-connection p50 <= 1.2x raw loopback ping-pong",
            "rtt",
            "p50_us",
            b,
            "pingpong",
            1.2,
            False,
        )
        for b in ("blocking", "pool", "poll", "epoll", "tokio")
    ]
    return targets


def evaluate(targets: list[Ratio | Limit], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value or ratio, and whether it was met (None: not measured)."""
    summary = bench["summary"]
    pingpong = [p["latency_us"]["p50"] for p in bench.get("pingpong", []) if "latency_us" in p]
    out = []
    for t in targets:
        row: dict[str, Any] = {"label": t.label, "met": None, "value": None, "detail": "not measured"}
        mine = _median(summary, t.workload, t.backend, t.figure)
        if isinstance(t, Limit):
            if mine is not None:
                row.update(
                    value=mine, met=mine <= t.bound, detail=f"{mine:,.0f} {t.unit} (limit {t.bound:,.0f})"
                )
        else:
            if t.versus == "pingpong":
                theirs = sorted(pingpong)[len(pingpong) // 2] if pingpong else None
            else:
                theirs = _median(summary, t.workload, t.versus, t.figure)
            if mine is not None and theirs:
                ratio = mine / theirs
                met = ratio >= t.bound if t.at_least else ratio <= t.bound
                row.update(
                    value=ratio, met=met, detail=f"{ratio:.2f}x ({mine:,.1f} vs {theirs:,.1f} {t.figure})"
                )
        out.append(row)
    return out


def _median(summary: dict[str, Any], workload: str, backend: str, figure: str) -> float | None:
    if workload == "churn":  # whatever cycles x parallel the run used
        workload = next((w for w in summary if w.startswith("churn-")), workload)
    cell = summary.get(workload, {}).get(backend, {})
    value = cell.get(figure)
    return float(value["median"]) if isinstance(value, dict) else None

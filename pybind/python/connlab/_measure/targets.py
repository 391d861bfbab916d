"""The performance targets, as ratios measured in one bench run (medians), each met or missed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from connlab import load
from connlab._measure import units
from connlab._measure.bench import Summary, Workload, cell, proxied, spread_of


@dataclass(frozen=True)
class Match:
    """The workload a target reads: the first of the run of `kind` with the given fields (None:
    any value), so a target holds whatever churn cycles or idle steps the run used."""

    kind: str
    connections: int | None = None
    size: int | None = None

    def find(self, workloads: Iterable[Workload]) -> Workload | None:
        return next(
            (
                w
                for w in workloads
                if w.kind == self.kind
                and self.connections in (None, w.connections)
                and self.size in (None, w.size)
            ),
            None,
        )


@dataclass(frozen=True)
class Ratio:
    """`backend`'s figure over `versus`'s (another backend, or the raw loopback ping-pong) must be
    at least (`at_least`) or at most (not `at_least`) `bound`."""

    label: str
    workload: Match
    figure: str
    backend: str
    versus: str
    bound: float
    at_least: bool = True
    #: Judged only in an unpinned run (pinned, the generator's CPU is not the server's to use).
    unpinned: bool = False


@dataclass(frozen=True)
class Limit:
    """`backend`'s absolute figure must be at most `bound`."""

    label: str
    workload: Match
    figure: str
    backend: str
    bound: float
    unit: str


def default_targets(workers: int, proxied_backends: Sequence[str] = ()) -> list[Ratio | Limit]:
    """The targets of the comparison; with `proxied_backends`, also each one through the proxy
    (no toxic) against itself direct."""
    r = Ratio
    c10, c100, c1000 = (Match("closed", connections=c, size=64) for c in (10, 100, 1000))
    idle = Match("idle")
    targets: list[Ratio | Limit] = [
        *(
            r(f"epoll >= 1.0x tokio frames/s at {n} connections", m, "frames_per_s", "epoll", "tokio", 1.0)
            for n, m in ((10, c10), (100, c100), (1000, c1000))
        ),
        r(
            "epoll >= 1.5x tokio at 16 KiB frames",
            Match("closed", 10, 16 << 10),
            "mb_per_s",
            "epoll",
            "tokio",
            1.5,
        ),
        r("epoll >= 1.1x tokio churn rate", Match("churn"), "conns_per_s", "epoll", "tokio", 1.1),
        r("epoll p99 <= 0.5x tokio's at 1000 connections", c1000, "p99_us", "epoll", "tokio", 0.5, False),
        r("poll >= 0.8x epoll at 100 connections", c100, "frames_per_s", "poll", "epoll", 0.8),
        r("pool >= 0.7x epoll at 100 connections", c100, "frames_per_s", "pool", "epoll", 0.7),
        r("pool >= 0.7x epoll at 1000 connections", c1000, "frames_per_s", "pool", "epoll", 0.7),
        r("blocking >= 0.5x epoll at 1000 connections", c1000, "frames_per_s", "blocking", "epoll", 0.5),
        r(
            "epoll <= 0.9x tokio server CPU per frame at 1000 connections",
            c1000,
            "server_cpu_us_per_frame",
            "epoll",
            "tokio",
            0.9,
            False,
        ),
        r(
            "uring <= 0.8x epoll server CPU per frame at 1000 connections",
            c1000,
            "server_cpu_us_per_frame",
            "uring",
            "epoll",
            0.8,
            False,
        ),
        r(
            f"sharded ({workers} shards) >= 1.3x epoll frames/s at 1000 connections (unpinned)",
            c1000,
            "frames_per_s",
            "sharded",
            "epoll",
            1.3,
            unpinned=True,
        ),
        *(
            Limit(f"{b} idle RSS per connection <= {kib} KiB", idle, "rss_per_conn_bytes", b, kib << 10, "B")
            for b, kib in (
                ("epoll", 1),
                ("poll", 1),
                ("pool", 1),
                ("blocking", 16),
                ("tokio", 4),
                ("sharded", 1),
            )
        ),
        Limit(
            f"pool threads at 1000 connections <= workers + 1 = {workers + 1} (+1 serve main thread)",
            c1000,
            "server_threads",
            "pool",
            workers + 2,
            "threads",
        ),
    ]
    targets += [
        r(
            f"{b} one-connection p50 <= 1.2x raw loopback ping-pong",
            Match("rtt"),
            "p50_us",
            b,
            "pingpong",
            1.2,
            False,
        )
        for b in ("blocking", "pool", "poll", "epoll", "tokio", "uring")
    ]
    targets += [
        r(
            f"{b} through the proxy >= 0.5x {b} direct at 100 connections",
            c100,
            "frames_per_s",
            proxied(b),
            b,
            0.5,
        )
        for b in proxied_backends
    ]
    return targets


def applicable(
    targets: list[Ratio | Limit], labels: Sequence[str], workloads: Sequence[Workload]
) -> list[Ratio | Limit]:
    """The targets about servers and workloads of this run: one about a backend or a workload
    that was not measured says nothing about the run."""
    present = {*labels, "pingpong"}
    return [
        t
        for t in targets
        if t.backend in present
        and getattr(t, "versus", t.backend) in present
        and t.workload.find(workloads) is not None
    ]


#: The statuses of a target, in the order a reader cares about them.
MET, MISSED, UNSETTLED, NOT_MEASURED = "met", "MISSED", "unsettled", "not measured"


def evaluate(
    targets: list[Ratio | Limit],
    summary: Summary,
    pingpong: Sequence[load.Result | dict[str, Any]],
    pinned: bool = False,
) -> list[dict[str, Any]]:
    """Each target with its measured value or ratio of medians, whether that meets it (`met`,
    None: not measured) and its `status`. `pingpong` holds the raw loopback runs of the same
    bench; ratios to it use their median p50. A target judged only unpinned is not measured in a
    `pinned` run.

    A target read from an unstable figure (min-max spread over 25 % of its median) is
    `unsettled` when the noise decides it: when the bound lies within the range the ratio (or the
    figure) takes over the figures' min-max. Unstable figures that meet or miss the bound over
    their whole range still settle it."""
    p50s = [float(p["latency_us"]["p50"]) for p in pingpong if "latency_us" in p]
    floor = spread_of(p50s) if p50s else None
    out = []
    for t in targets:
        row: dict[str, Any] = {
            "label": t.label,
            "met": None,
            "status": NOT_MEASURED,
            "value": None,
            "detail": "not measured",
        }
        if pinned and isinstance(t, Ratio) and t.unpinned:
            row["detail"] = "judged in an unpinned run only: pinned, the generator's CPU is not the server's"
            out.append(row)
            continue
        workload = t.workload.find(summary)
        mine = cell(summary, workload, t.backend, t.figure)
        if isinstance(t, Limit):
            if mine is not None:
                value = mine["median"]
                met = value <= t.bound
                decided = (mine["max"] <= t.bound) == (mine["min"] <= t.bound)
                row.update(
                    value=value,
                    met=met,
                    status=_status(met, mine["unstable"] and not decided),
                    detail=f"{value:,.0f} {t.unit} (limit {t.bound:,.0f})"
                    + _range(mine, f"{mine['min']:,.0f}-{mine['max']:,.0f} {t.unit}"),
                )
        else:
            theirs = floor if t.versus == "pingpong" else cell(summary, workload, t.versus, t.figure)
            if mine is not None and theirs and theirs["median"] and theirs["min"] > 0:
                ratio = mine["median"] / theirs["median"]
                low, high = mine["min"] / theirs["max"], mine["max"] / theirs["min"]
                met = ratio >= t.bound if t.at_least else ratio <= t.bound
                decided = (low >= t.bound) == (high >= t.bound)
                unstable = bool(mine["unstable"] or theirs["unstable"])
                row.update(
                    value=ratio,
                    met=met,
                    status=_status(met, unstable and not decided),
                    detail=f"{ratio:.2f}x ({units.figure(t.figure, mine['median'])} vs"
                    f" {units.figure(t.figure, theirs['median'])})"
                    + _range(mine if mine["unstable"] else theirs, f"{low:.2f}-{high:.2f}x"),
                )
        out.append(row)
    return out


def _status(met: bool, undecided: bool) -> str:
    return UNSETTLED if undecided else MET if met else MISSED


def _range(figure: dict[str, Any], text: str) -> str:
    """The range a decision was read over, said when a figure is unstable."""
    if not figure["unstable"]:
        return ""
    return f"; unstable ({units.percent(figure['spread'])} spread), range {text}"

"""The summary a report opens with, generated from one run's figures: who leads each workload and
by how much, what a connection and a frame cost each server, each server's trade-off in one
sentence, and whether the machine was quiet enough to believe it. Every claim quotes the median it
rests on; a lead inside the noise (the two min-max ranges overlap) is called a tie."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connlab._measure import syscalls, units
from connlab._measure.bench import FIGURES, UNSTABLE_SPREAD, Bench, Workload, cell, proxied
from connlab._measure.footprint import slope


@dataclass(frozen=True)
class Measure:
    """The figure a workload is judged by, and how to print it."""

    figure: str
    text: Callable[[float], str]

    @property
    def more_is_better(self) -> bool:
        return FIGURES[self.figure]


def _per_s(unit: str) -> Callable[[float], str]:
    return lambda v: f"{units.rate(v)} {unit}"


def measure_of(w: Workload) -> Measure | None:
    """What decides a workload: throughput for the closed loop (MB/s at large frames), the p99 for
    the open loop (its rate is fixed, so latency is what differs), connections/s for churn, the
    median round trip for one connection, memory for idle connections."""
    if w.kind == "closed":
        if w.size >= 1024:
            return Measure("mb_per_s", lambda v: f"{units.significant(v)} MB/s")
        return Measure("frames_per_s", _per_s("frames/s"))
    return {
        "open": Measure("p99_us", lambda v: f"p99 {units.duration_us(v)}"),
        "churn": Measure("conns_per_s", _per_s("connections/s")),
        "rtt": Measure("p50_us", lambda v: f"p50 {units.duration_us(v)}"),
        "idle": Measure("rss_per_conn_bytes", lambda v: f"{units.size(v)} per idle connection"),
    }.get(w.kind)


@dataclass(frozen=True)
class Standing:
    """The servers of one workload ordered best first by its measure, with their figures."""

    workload: Workload
    measure: Measure
    order: list[tuple[str, dict[str, Any]]]

    @property
    def tied(self) -> bool:
        """Whether the leader's lead is inside the noise: its range overlaps the runner-up's."""
        (_, a), (_, b) = self.order[0], self.order[1]
        return a["min"] <= b["max"] if self.measure.more_is_better else a["max"] >= b["min"]

    def factor(self, i: int) -> float:
        """How many times better the leader is than the i-th: >= 1 either way round."""
        best, other = self.order[0][1]["median"], self.order[i][1]["median"]
        if not best or not other:
            return float("inf")
        return best / other if self.measure.more_is_better else other / best


def standing(bench: Bench, w: Workload) -> Standing | None:
    """The order of the servers (not their proxied twins) on workload `w`; None with fewer than
    two measured."""
    m = measure_of(w)
    if m is None:
        return None
    cells = [(s, c) for s in bench.config.servers if (c := cell(bench.summary, w, s, m.figure))]
    if len(cells) < 2:
        return None
    cells.sort(key=lambda sc: sc[1]["median"], reverse=m.more_is_better)
    return Standing(w, m, cells)


def _lead(st: Standing) -> str:
    """One workload in one line: the leader and by how much, or the tie."""
    (first, a), (second, b) = st.order[0], st.order[1]
    text = st.measure.text
    if st.tied:
        line = f"{first} and {second} tie within the noise ({text(a['median'])} and {text(b['median'])})"
    else:
        line = f"{first} leads with {text(a['median'])}, {units.ratio(st.factor(1))} {second}, the next"
    if len(st.order) > 2:
        last, c = st.order[-1]
        line += f"; {last} is last with {text(c['median'])}"
        if st.factor(len(st.order) - 1) >= 1.05:
            line += f" ({units.ratio(st.factor(len(st.order) - 1))} behind)"
    return f"**{st.workload.label}**: {line}."


def leads(bench: Bench) -> list[str]:
    """A line per workload: who leads and by how much."""
    return [_lead(st) for w in bench.config.workloads if (st := standing(bench, w))]


def _idle(bench: Bench) -> Workload | None:
    return next((w for w in bench.config.workloads if w.kind == "idle"), None)


def threads_per_connection(bench: Bench, server: str) -> float | None:
    """The slope of the server's threads over its idle connections (1.0: a thread each)."""
    w = _idle(bench)
    by_step = (bench.summary.get(w, {}).get(server) or {}).get("threads_by_step") if w else None
    if not by_step or len(by_step) < 2:
        return None
    steps = sorted((int(k), int(v)) for k, v in by_step.items())
    return slope([s for s, _ in steps], [t for _, t in steps])


def cpu_workload(bench: Bench) -> Workload | None:
    """The closed-loop workload CPU per frame is quoted at: the largest connection count up to
    1 000 of the main frame size with a CPU figure."""
    closed = [w for w in bench.config.workloads if w.kind == "closed" and w.size < 1024]
    closed = [
        w
        for w in closed
        if any(cell(bench.summary, w, s, "server_cpu_us_per_frame") for s in bench.config.servers)
    ]
    under = [w for w in closed if w.connections <= 1000] or closed
    return max(under, key=lambda w: w.connections, default=None)


def costs(bench: Bench, server: str) -> list[str]:
    """What the server pays: memory and threads per idle connection, CPU per frame."""
    out = []
    idle = cell(bench.summary, _idle(bench), server, "rss_per_conn_bytes")
    if idle:
        out.append(f"{units.size(max(idle['median'], 0))} per idle connection")
    per_conn = threads_per_connection(bench, server)
    if per_conn is not None:
        out.append(
            "a thread per connection"
            if per_conn >= 0.9
            else f"{units.significant(per_conn)} threads per connection"
            if per_conn >= 0.05
            else "no thread per connection"
        )
    w = cpu_workload(bench)
    cpu = cell(bench.summary, w, server, "server_cpu_us_per_frame")
    if w and cpu:
        out.append(
            f"{units.duration_us(cpu['median'])} of CPU per frame"
            f" at {units.plural(w.connections, 'connection')}"
        )
    return out


def _tail(bench: Bench, server: str) -> str | None:
    """Where the server's p99 under the closed loop is furthest behind the best p99 (3x or more)."""
    worst: tuple[float, Workload, float, float] | None = None
    for w in bench.config.workloads:
        if w.kind != "closed":
            continue
        mine = cell(bench.summary, w, server, "p99_us")
        others = [c["median"] for s in bench.config.servers if (c := cell(bench.summary, w, s, "p99_us"))]
        if mine and others and min(others) > 0:
            factor = mine["median"] / min(others)
            if factor >= 3 and (worst is None or factor > worst[0]):
                worst = (factor, w, mine["median"], min(others))
    if worst is None:
        return None
    _, w, p99, best = worst
    return f"its p99 reaches {units.duration_us(p99)} at {w.short} (best: {units.duration_us(best)})"


def tradeoffs(bench: Bench) -> list[str]:
    """One sentence per server: where it leads, where it is last, what it costs, and its worst
    tail. Workloads by their short names ("64 B x 1 000": frame size x connections)."""
    standings = [st for w in bench.config.workloads if (st := standing(bench, w))]
    out = []
    for server in bench.config.servers:
        won = [st.workload.short for st in standings if st.order[0][0] == server and not st.tied]
        tied = [
            st.workload.short for st in standings if st.tied and server in (st.order[0][0], st.order[1][0])
        ]
        last = [
            f"{st.workload.short} ({units.ratio(st.factor(len(st.order) - 1))} behind)"
            for st in standings
            if len(st.order) > 2 and st.order[-1][0] == server and st.factor(len(st.order) - 1) >= 1.05
        ]
        # With nothing to compare against (one server), no lead is claimed either way.
        parts = [f"leads at {_join(won)}" if won else "leads nowhere"] if standings else []
        if tied:
            parts.append(f"ties for first at {_join(tied)}")
        if last:
            parts.append(f"is last at {_join(last)}")
        cost = costs(bench, server)
        if cost:
            parts.append("costs " + _join(cost))
        if tail := _tail(bench, server):
            parts.append(tail)
        if parts:
            out.append(f"**{server}** {'; '.join(parts)}.")
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def proxy_cost(bench: Bench) -> list[str]:
    """With the proxy: each server's throughput through it as a share of direct, per workload of
    64 B frames at 100 connections (or the first closed loop)."""
    if not bench.config.proxy:
        return []
    closed = [w for w in bench.config.workloads if w.kind == "closed"]
    w = next((w for w in closed if w.connections == 100), closed[0] if closed else None)
    shares = []
    for s in bench.config.servers:
        direct, through = (cell(bench.summary, w, label, "frames_per_s") for label in (s, proxied(s)))
        if direct and through and direct["median"]:
            shares.append(f"{s} {units.ratio(through['median'] / direct['median'])}")
    if not w or not shares:
        return []
    return [
        f"Through `connlab proxy` (no toxic), at {w.label}, frames/s as a share of direct: {_join(shares)}."
    ]


def syscall_counts(bench: Bench) -> list[str]:
    """The syscall phase in one paragraph: each server's syscalls per echoed frame and the main
    ones, fewest first; then the servers not counted and why."""
    if not bench.syscalls:
        return []
    counted = sorted(
        (r for r in bench.syscalls if r.get("status") == syscalls.COUNTED), key=lambda r: r["per_frame"]
    )
    others = [r for r in bench.syscalls if r.get("status") != syscalls.COUNTED]
    parts = [f"{r['server']} {syscalls.describe(r)}" for r in counted]
    line = (
        f"Syscalls per echoed frame (`strace -f -c`, one connection, {syscalls.SIZE} B frames,"
        f" untimed): {'; '.join(parts)}."
        if parts
        else "Syscalls per echoed frame: none counted."
    )
    if others:
        line += " Not counted: " + "; ".join(f"{r['server']} ({r.get('status')})" for r in others) + "."
    return [line]


def noise(bench: Bench) -> str:
    """One sentence on how quiet the machine was, from the run's own records."""
    c = bench.conditions
    if not c:
        return "The machine's load was not recorded."
    before, after = c["load_avg_before"][0], c["load_avg_after"][0]
    cpus = c.get("cpus") or 1
    parts = [f"load average {before:.1f} before and {after:.1f} after on {cpus} CPUs"]
    if c.get("steal_pct") is not None:
        parts.append(f"{c['steal_pct']:.1f} % of CPU time stolen")
    floor = c.get("pingpong_p50")
    if floor:
        parts.append(
            f"the ping-pong floor between {units.duration_us(floor['min'])} and "
            f"{units.duration_us(floor['max'])} across repetitions"
        )
    unstable = [
        (w, s, f)
        for w, by_server in bench.summary.items()
        for s, figures in by_server.items()
        for f, v in figures.items()
        if isinstance(v, dict) and v.get("unstable")
    ]
    total = sum(
        isinstance(v, dict) and "spread" in v
        for by_server in bench.summary.values()
        for figures in by_server.values()
        for v in figures.values()
    )
    busy = max(before, after) > cpus or (c.get("steal_pct") or 0) > 5
    verdict = "The machine was busy" if busy else "The machine was quiet"
    if floor and floor["unstable"]:
        verdict = "The machine was noisy"
    line = f"{verdict}: {_join(parts)}."
    if bench.config.repetitions < 2:
        line += " One repetition: no spread to tell noise from difference by."
    elif total:
        line += (
            f" {len(unstable)} of {total} figures spread over {units.percent(UNSTABLE_SPREAD)}"
            " of their median across repetitions (marked unstable)."
        )
    return line


def story(bench: Bench, evaluated: list[dict[str, Any]]) -> list[str]:
    """The summary, as markdown paragraphs and bullets: the noise, the leads, the trade-offs, the
    proxy's cost, the syscalls per frame, and the targets' tally."""
    out = [noise(bench)]
    lines = leads(bench)
    if lines:
        out.append("Who leads where:")
        out += [f"- {line}" for line in lines]
    lines = tradeoffs(bench)
    if lines:
        out.append("Each server's trade-off:")
        out += [f"- {line}" for line in lines]
    out += proxy_cost(bench)
    out += syscall_counts(bench)
    if evaluated:
        tally: dict[str, int] = {}
        for t in evaluated:
            tally[t["status"]] = tally.get(t["status"], 0) + 1
        out.append(
            "Targets: " + ", ".join(f"{n} {status}" for status, n in tally.items()) + " (details below)."
        )
    return out


def markdown(lines: list[str]) -> str:
    """Story lines as markdown: a blank line between paragraphs, none inside a list."""
    out: list[str] = []
    for line in lines:
        if out and not (line.startswith("- ") and out[-1].startswith("- ")):
            out.append("")
        out.append(line)
    return "\n".join(out)

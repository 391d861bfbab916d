"""The report's PNG plots: the closed loop against the connection count (server CPU per frame also
as a ratio to tokio's), the open loop's percentile spectrum, the one-connection round trip against
the loopback floor, and bars for the rest.

Every point is a median with its min-max as error bars; a figure whose spread exceeds
`UNSTABLE_SPREAD` is drawn hollow (markers) or hatched (bars). Each label keeps its colour, marker
and line style in every plot, and equal values stay visible: a marker and a line style per label,
and a small shift along the connection axis."""

from __future__ import annotations

import math
import re
import statistics
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connlab import load
from connlab._measure import units
from connlab._measure.bench import UNSTABLE_SPREAD, Bench, Workload, cell

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Markers and line styles, one per label (by its place in `BenchConfig.labels`), cycled.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))

#: The size (inches) and resolution of every plot.
FIGSIZE = (7.0, 4.2)
DPI = 110

#: Characters per line of a legend entry.
LEGEND_WIDTH = 24

#: Between neighbouring labels' points on the (log) connection axis: this share of its width,
#: about a marker's width (8 pixels): equal values side by side, yet too little to read as another
#: connection count (over 1 to 5 000, a factor of 1.16; 1 000 and 5 000 are 5x apart).
OFFSET_SHARE = 0.016
#: The connection axis reaches this factor beyond the first and last count, for the shifted points.
CONNECTION_MARGIN = 1.6

_SPREAD = f"min-max spread over {units.percent(UNSTABLE_SPREAD)}"
#: The legend entries that explain a hollow marker and a hatched bar.
HOLLOW_NOTE = f"hollow: {_SPREAD}"
HATCHED_NOTE = f"hatched: {_SPREAD}"

#: A plot's title: its headline, and what it shows (a workload's label), drawn on two lines.
Title = tuple[str, str]


def draw(bench: Bench, out: Path) -> dict[str, str]:
    """Writes the plots of `bench` into `out` as PNG files; returns {title: file name}. A plot
    with no data (e.g. the CPU of servers without a pid) is left out, not drawn empty.
    ImportError without matplotlib."""
    made: dict[str, str] = {}
    for fname, title, fig in figures(bench):
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / fname, dpi=DPI)
        made[title] = fname
    return made


def figures(bench: Bench) -> Iterator[tuple[str, str, Figure]]:
    """The plots of `bench` that have data, as (file name, title, figure); each figure is closed
    when the next is asked for. ImportError without matplotlib."""
    # Imported here, as an optional extra: it takes a while to load and starts a thread, which
    # neither `connlab serve` (whose threads the probes count) nor the pytest plugin may pay for.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    for fname, title, make in _plots(bench):
        fig = make(plt, title)
        if fig is None:
            continue
        try:
            fig.tight_layout()
            yield fname, " — ".join(t for t in title if t), fig
        finally:
            plt.close(fig)


#: Draws one plot, given pyplot and its title; None when it has no data.
_Draw = Callable[[Any, Title], "Figure | None"]


def _plots(bench: Bench) -> list[tuple[str, Title, _Draw]]:
    """Every plot of `bench` as (file name, title, how to draw it), in the report's order."""
    workloads = bench.config.workloads
    closed = main_closed(workloads)
    loop = _loop_label(closed[0]) if closed else ""
    large = [w for w in workloads if w.kind == "closed" and w.size >= 1024]
    opens = [w for w in workloads if w.kind == "open"]

    def line(figure: str, ylabel: str, fmt: Callable[[float], str], log_y: bool | None) -> _Draw:
        return lambda plt, title: _by_connections(
            plt, bench, closed, figure, title, ylabel=ylabel, fmt=fmt, log_y=log_y
        )

    def bars(of: list[Workload], figure: str, ylabel: str, fmt: Callable[[float], str], **kw: Any) -> _Draw:
        return lambda plt, title: _bars(plt, bench, of, figure, title, ylabel=ylabel, fmt=fmt, **kw)

    def kind(k: str) -> list[Workload]:
        return [w for w in workloads if w.kind == k]

    def shows(ws: list[Workload]) -> str:
        return "; ".join(w.label for w in ws)

    return [
        (
            "throughput.png",
            ("Throughput vs connections", loop),
            line("frames_per_s", "frames/s", units.rate, None),
        ),
        (
            "p99.png",
            ("p99 latency vs connections", loop),
            line("p99_us", "p99 latency", units.duration_us, True),
        ),
        (
            "threads.png",
            ("Server threads vs connections", loop),
            line("server_threads", "threads in the server process", units.grouped, True),
        ),
        (
            "cpu_per_frame.png",
            ("Server CPU per frame vs connections", loop),
            line("server_cpu_us_per_frame", "server CPU time per frame", units.duration_us, None),
        ),
        (
            "cpu_vs_tokio.png",
            ("Server CPU per frame relative to tokio's vs connections", loop),
            line("server_cpu_vs_tokio", "server CPU per frame / tokio's", units.ratio, None),
        ),
        ("mb_per_s.png", ("Bandwidth", shows(large)), bars(large, "mb_per_s", "MB/s", units.significant)),
        *(
            (
                "open_latency.png" if len(opens) == 1 else f"open_latency-{w.name}.png",
                ("Latency by percentile, every repetition's samples together", w.label),
                partial(_spectrum_plot, bench, w),
            )
            for w in opens
        ),
        (
            "rtt.png",
            ("Round trip (p50) vs raw loopback ping-pong", shows(kind("rtt"))),
            partial(_rtt, bench, kind("rtt")),
        ),
        (
            "rss_per_conn.png",
            ("Memory per idle connection", shows(kind("idle"))),
            bars(
                kind("idle"),
                "rss_per_conn_bytes",
                "KiB of RSS per idle connection",
                units.size,
                scale=1 / 1024,
                tick=units.significant,
            ),
        ),
        (
            "churn.png",
            ("Connections opened, echoed and closed per second", shows(kind("churn"))),
            bars(kind("churn"), "conns_per_s", "connections/s", units.grouped, tick=units.rate),
        ),
    ]


def main_closed(workloads: Sequence[Workload]) -> list[Workload]:
    """The closed-loop workloads plotted against the connection count, by connection count: those
    of the frame size (and pipeline depth) most closed workloads share, the smaller size on a tie
    (the 16 KiB frames at 10 connections are a workload of their own)."""
    closed = [w for w in workloads if w.kind == "closed"]
    if not closed:
        return []
    counts = Counter((w.size, w.pipeline) for w in closed)
    main = max(counts, key=lambda k: (counts[k], -k[0], -k[1]))
    return sorted((w for w in closed if (w.size, w.pipeline) == main), key=lambda w: w.connections)


def connection_ticks(counts: Sequence[int]) -> tuple[list[int], list[str]]:
    """The connection axis's ticks: exactly the measured counts, in order, labelled "1 000"."""
    positions = sorted(set(counts))
    return positions, [units.grouped(c) for c in positions]


def offsets(n: int, step: float) -> list[float]:
    """Factors on the connection axis for `n` lines, symmetric about 1 on its log scale (the middle
    line unmoved), `1 + step` apart: equal values side by side, not on top of each other."""
    return [(1 + step) ** (i - (n - 1) / 2) for i in range(n)]


def offset_step(counts: Sequence[int]) -> float:
    """The `offsets` step that puts neighbours `OFFSET_SHARE` of the connection axis apart, the
    axis spanning `counts` and its margins."""
    decades = math.log10(max(counts) / min(counts)) + 2 * math.log10(CONNECTION_MARGIN)
    return float(10 ** (OFFSET_SHARE * decades) - 1)


def percentile_ticks(top: float) -> tuple[list[float], list[str]]:
    """The percentile spectrum's x ticks, at 1 / (1 - q), up to `top` (at least to 99%): "50%",
    "90%", "99%", "99.9%", "99.99%", ..."""
    positions, labels = [2.0], ["50%"]
    nines = 1
    while 10.0**nines <= max(top, 100.0) * (1 + 1e-9):
        positions.append(10.0**nines)
        labels.append(f"{100 * (1 - 10.0**-nines):.{max(nines - 2, 0)}f}%")
        nines += 1
    return positions, labels


def spectrum(bench: Bench, workload: Workload, label: str) -> list[tuple[float, float]]:
    """The percentile spectrum ((quantile, µs) pairs, ending at (1.0, max)) of every sample of
    `label`'s runs of `workload` together; empty without histograms."""
    histograms = [
        r.metrics["histogram"]
        for r in bench.runs
        if r.workload == workload and r.backend == label and "histogram" in r.metrics
    ]
    return load.percentile_spectrum(load.merge_histograms(histograms)) if histograms else []


def _style(bench: Bench, label: str) -> dict[str, Any]:
    """`label`'s colour, marker and line style, the same in every plot."""
    labels = bench.config.labels
    i = labels.index(label) if label in labels else len(labels)
    return {
        "color": f"C{i % 10}",
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
    }


def _loop_label(w: Workload) -> str:
    """The closed loop a connection-axis plot shows: "64 B frames, closed loop"."""
    depth = f", {w.pipeline} in flight each" if w.pipeline > 1 else ""
    return f"{units.size(w.size)} frames{depth}, closed loop"


def _axes(plt: Any, title: Title) -> tuple[Figure, Axes]:
    """A new figure with its title: the headline, and what it shows in smaller type below."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    head, shows = title
    ax.set_title(f"{head}\n{shows}" if shows else head, fontsize=10)
    return fig, ax


def tick_label(text: str) -> str:
    """A figure as a tick shows it: without the zeros that only say "3 significant digits"
    ("50 k", "20 µs", "1 ms", "2.5 ms"; not "50.0 k")."""
    return re.sub(r"\.?0+(?=\D*$)", "", text) if "." in text else text


def _formatter(fmt: Callable[[float], str]) -> Any:
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    return FuncFormatter(lambda v, _pos: tick_label(fmt(v)))


def _log_y(ax: Axes, fmt: Callable[[float], str]) -> None:
    """A log y axis labelled at 1, 2 and 5 of each decade (so a range of less than a decade still
    has labels), minor ticks unlabelled."""
    from matplotlib.ticker import LogLocator, NullFormatter  # noqa: PLC0415

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(_formatter(fmt))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(ax: Axes, note: Any | None = None) -> None:
    """The legend, outside on the right where it hides no data, with `note` (a legend handle
    explaining unstable figures) as its last entry if given; long entries wrapped, so that it takes
    little of the plot's width."""
    handles, labels = ax.get_legend_handles_labels()
    if note is not None:
        handles.append(note)
        labels.append(note.get_label())
    if handles:
        wrapped = [textwrap.fill(label, LEGEND_WIDTH) for label in labels]
        ax.legend(handles, wrapped, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _hollow(label: str = HOLLOW_NOTE) -> Any:
    """The legend entry of a hollow marker."""
    from matplotlib.lines import Line2D  # noqa: PLC0415

    return Line2D([], [], marker="o", color="gray", markerfacecolor="white", linestyle="none", label=label)


def _hatched() -> Any:
    """The legend entry of a hatched bar."""
    from matplotlib.patches import Patch  # noqa: PLC0415

    return Patch(facecolor="white", edgecolor="gray", hatch="//", label=HATCHED_NOTE)


def _by_connections(
    plt: Any,
    bench: Bench,
    closed: list[Workload],
    figure: str,
    title: Title,
    *,
    ylabel: str,
    fmt: Callable[[float], str],
    log_y: bool | None,
) -> Figure | None:
    """One figure of the closed loop against the connection count: a line per label through its
    medians with min-max error bars, each label shifted by its `offsets` factor, the connection
    axis ticked at the measured counts. `log_y` None: a log y axis when the values span more than
    a factor of 30 (threads: 2 against 5 000), else a linear one from 0."""
    series: list[tuple[str, list[tuple[int, dict[str, Any]]]]] = []
    for label in bench.config.labels:
        points = [(w.connections, c) for w in closed if (c := cell(bench.summary, w, label, figure))]
        if points:
            series.append((label, points))
    if not series:
        return None
    counts = [n for _, points in series for n, _ in points]
    factors = offsets(len(series), offset_step(counts))
    fig, ax = _axes(plt, title)
    unstable = False
    for (label, points), factor in zip(series, factors, strict=True):
        style = _style(bench, label)
        xs = [n * factor for n, _ in points]
        ys = [c["median"] for _, c in points]
        yerr = [[c["median"] - c["min"] for _, c in points], [c["max"] - c["median"] for _, c in points]]
        ax.errorbar(xs, ys, yerr=yerr, capsize=3, markersize=6, elinewidth=1, label=label, **style)
        shaky = [(x, y) for x, y, (_, c) in zip(xs, ys, points, strict=True) if c["unstable"]]
        if shaky:
            unstable = True
            # Drawn over the filled marker: the unstable points read hollow.
            ax.plot(
                [x for x, _ in shaky],
                [y for _, y in shaky],
                marker=style["marker"],
                markersize=6,
                markeredgecolor=style["color"],
                markerfacecolor="white",
                linestyle="none",
                zorder=3,
            )
    values = [v for _, points in series for _, c in points for v in (c["min"], c["max"]) if v > 0]
    if log_y is None:
        log_y = bool(values) and max(values) / min(values) > 30
    if log_y and values:
        _log_y(ax, fmt)
    else:
        ax.yaxis.set_major_formatter(_formatter(fmt))
        ax.set_ylim(bottom=0)
    _connection_axis(ax, counts, factors[-1])
    ax.set_xlabel(f"concurrent connections ({_loop_label(closed[0])})")
    ax.set_ylabel(f"{ylabel} (median, min-max)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, _hollow() if unstable else None)
    return fig


def _connection_axis(ax: Axes, counts: Sequence[int], shift: float) -> None:
    """A log x axis ticked exactly at the measured connection counts, no minor ticks, with room
    on both sides for points shifted by up to a factor `shift`."""
    from matplotlib.ticker import NullLocator  # noqa: PLC0415

    positions, labels = connection_ticks(counts)
    ax.set_xscale("log")
    ax.set_xticks(positions, labels)
    ax.xaxis.set_minor_locator(NullLocator())
    margin = max(CONNECTION_MARGIN, 1.25 * shift)
    ax.set_xlim(positions[0] / margin, positions[-1] * margin)


def _bars(
    plt: Any,
    bench: Bench,
    workloads: list[Workload],
    figure: str,
    title: Title,
    *,
    ylabel: str,
    fmt: Callable[[float], str],
    scale: float = 1.0,
    tick: Callable[[float], str] | None = None,
    extra: Callable[[Axes], None] | None = None,
) -> Figure | None:
    """Bars of one figure: a bar per label at its median (times
    `scale`) with min-max error bars, annotated with the median as `fmt` writes it (unscaled), the
    y axis as `tick` writes it (default `fmt`). One group per workload: with one, each bar is named
    under it; with more, the groups are named and a legend names the labels. `extra` draws more
    (with legend labels) before the legend. None with no data."""
    labels = [
        label
        for label in bench.config.labels
        if any(cell(bench.summary, w, label, figure) for w in workloads)
    ]
    if not labels:
        return None
    fig, ax = _axes(plt, title)
    width = 0.8 / len(labels)
    unstable = False
    positions: list[float] = []
    for j, label in enumerate(labels):
        color = _style(bench, label)["color"]
        for g, w in enumerate(workloads):
            c = cell(bench.summary, w, label, figure)
            if c is None:
                continue
            x = g + (j - (len(labels) - 1) / 2) * width
            med, lo, hi = (c[k] * scale for k in ("median", "min", "max"))
            shaky = bool(c["unstable"])
            unstable |= shaky
            ax.bar(
                x,
                med,
                width * 0.9,
                yerr=[[med - lo], [hi - med]],
                capsize=4,
                color="white" if shaky else color,
                edgecolor=color,
                hatch="//" if shaky else None,
                error_kw={"elinewidth": 1, "ecolor": "black"},
                # One group: the labels are under the bars, not in a legend.
                label=label if g == 0 and len(workloads) > 1 else None,
            )
            ax.annotate(
                fmt(c["median"]),
                (x, max(hi, 0)),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
            positions.append(x)
    if len(workloads) == 1:
        ax.set_xticks(positions, labels)
    else:
        ax.set_xticks(range(len(workloads)), [w.label for w in workloads], fontsize=8)
    ax.yaxis.set_major_formatter(_formatter(tick or fmt))
    ax.set_ylabel(f"{ylabel} (median, min-max)")
    ax.margins(y=0.12)  # room for the annotations
    ax.grid(True, axis="y", alpha=0.3)
    if extra is not None:
        extra(ax)
    _legend(ax, _hatched() if unstable else None)
    return fig


def _rtt(bench: Bench, rtt: list[Workload], plt: Any, title: Title) -> Figure | None:
    """The one-connection round trip: a bar per label at its p50, and the raw loopback ping-pong
    of the same machine (its median, its min-max shaded) as the floor no server goes under."""
    floor = bench.conditions.get("pingpong_p50_us") or [float(p["latency_us"]["p50"]) for p in bench.pingpong]

    def draw_floor(ax: Axes) -> None:
        if floor:
            ax.axhline(
                statistics.median(floor),
                color="black",
                linestyle="--",
                linewidth=1,
                zorder=2.5,
                label="raw loopback ping-pong (floor)",
            )
            # Over the bars (zorder), translucent: the floor shows across them.
            ax.axhspan(
                min(floor),
                max(floor),
                color="gray",
                alpha=0.3,
                linewidth=0,
                zorder=2.5,
                label="its min-max over the repetitions",
            )

    return _bars(
        plt, bench, rtt, "p50_us", title, ylabel="p50 round trip", fmt=units.duration_us, extra=draw_floor
    )


def _spectrum_plot(bench: Bench, w: Workload, plt: Any, title: Title) -> Figure | None:
    """The open loop's latency by percentile, as HdrHistogram's plotter draws it: a line per label
    through its `spectrum` against 1 / (1 - q) on a log axis, so every nine of the tail gets the
    same room, its maximum marked at the line's right end."""
    series = [(label, s) for label in bench.config.labels if (s := spectrum(bench, w, label))]
    # q = 1 (the maximum) is at infinity on this axis: it gets a marker, not a point of the line.
    lines = [(label, [(1 / (1 - q), us) for q, us in s if q < 1 and us > 0], s[-1][1]) for label, s in series]
    lines = [(label, finite, top) for label, finite, top in lines if finite]
    if not lines:
        return None
    fig, ax = _axes(plt, title)
    unstable = False
    for label, finite, top in lines:
        style = _style(bench, label)
        ax.plot(
            [x for x, _ in finite],
            [us for _, us in finite],
            color=style["color"],
            linestyle=style["linestyle"],
            linewidth=1.5,
            label=f"{label} (max {units.duration_us(top)})",
        )
        p99 = cell(bench.summary, w, label, "p99_us")
        shaky = bool(p99 and p99["unstable"])
        unstable |= shaky
        ax.plot(
            [finite[-1][0]],
            [top],
            marker=style["marker"],
            color=style["color"],
            markerfacecolor="white" if shaky else style["color"],
            linestyle="none",
        )
    from matplotlib.ticker import NullLocator  # noqa: PLC0415

    right = max(points[-1][0] for _, points, _ in lines)
    positions, labels = percentile_ticks(right)
    ax.set_xscale("log")
    ax.set_xticks(positions, labels)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(1, max(right, positions[-1]) * 1.5)
    _log_y(ax, units.duration_us)
    ax.set_xlabel("percentile (marker: the maximum)")
    ax.set_ylabel("latency")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, _hollow(f"hollow: p99 {_SPREAD}") if unstable else None)
    return fig

"""The comparison report: results.json, report.md, report.html and PNG plots."""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connlab._measure.bench import Bench, median
from connlab.matrix.core import SCENARIOS, order_key
from connlab.matrix.report import LABEL

#: Said (and written in report.md) when the plots cannot be drawn.
PLOTS_NEED = "the plots need matplotlib: pip install 'connlab[report]'"


def plots(bench: Bench, out: Path) -> dict[str, str]:
    """Writes the PNG plots; returns {title: file name}. ImportError without matplotlib."""
    # Imported here, as an optional extra: it takes a while to load and starts a thread, which
    # neither `connlab serve` (whose threads the probes count) nor the pytest plugin may pay for.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    backends = bench.config.labels
    workloads = bench.config.workloads
    closed = sorted(
        (w for w in workloads if w.kind == "closed" and w.size == 64), key=lambda w: w.connections
    )
    made: dict[str, str] = {}

    def save(fig: Any, fname: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made[title] = fname

    def line_plot(fname: str, title: str, figure: str, ylabel: str, log: bool) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for b in backends:
            pts = [
                (w.connections, v) for w in closed if (v := median(bench.summary, w, b, figure)) is not None
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent connections (64 B frames, closed loop)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, fname, title)

    def bar_plot(fname: str, title: str, kind: str, figure: str, *, ylabel: str, scale: float = 1) -> None:
        w = next((w for w in workloads if w.kind == kind), None)
        values = [(b, v * scale) for b in backends if (v := median(bench.summary, w, b, figure)) is not None]
        if not values:
            return
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.bar([v[0] for v in values], [v[1] for v in values], color="tab:blue")
        for i, (_, v) in enumerate(values):
            ax.annotate(f"{v:,.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(w=w))
        ax.grid(True, axis="y", alpha=0.3)
        save(fig, fname, title.format(w=w))

    line_plot("throughput.png", "Throughput vs connections", "frames_per_s", "frames/s (median)", False)
    line_plot("p99.png", "p99 latency vs connections", "p99_us", "p99 latency, us (log)", True)
    line_plot(
        "threads.png",
        "Server threads vs connections",
        "server_threads",
        "threads in the server process",
        True,
    )
    bar_plot(
        "rss_per_conn.png",
        "Idle RSS per connection",
        "idle",
        "rss_per_conn_bytes",
        ylabel="KiB per idle connection",
        scale=1 / 1024,
    )
    bar_plot("churn.png", "Churn rate ({w.name})", "churn", "conns_per_s", ylabel="connections/s (median)")
    return made


def _fmt(cell: dict[str, Any] | None, scale: float = 1, digits: int = 0) -> str:
    if not cell:
        return "-"
    med, lo, hi = (cell[k] * scale for k in ("median", "min", "max"))
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def comparison_rows(bench: Bench) -> tuple[list[str], list[list[str]]]:
    """The main comparison table: one row per workload, one column per backend (median (min-max))."""
    backends = bench.config.labels
    header = ["workload", "figure", *backends]
    rows = []
    for w in bench.config.workloads:
        specs = {
            "closed": [
                ("frames/s", "frames_per_s", 1, 0),
                ("p99 us", "p99_us", 1, 0),
                ("threads", "server_threads", 1, 0),
            ],
            "open": [("p50 us", "p50_us", 1, 0), ("p99 us", "p99_us", 1, 0), ("max us", "max_us", 1, 0)],
            "churn": [("conns/s", "conns_per_s", 1, 0)],
            "rtt": [("p50 us", "p50_us", 1, 1)],
            "idle": [("KiB/conn", "rss_per_conn_bytes", 1 / 1024, 2)],
        }[w.kind]
        if w.kind == "closed" and w.size >= 1024:  # large frames: bytes, not frames, are the point
            specs = [("MB/s", "mb_per_s", 1, 0), *specs[1:]]
        if bench.config.proxy and w.kind != "idle":
            specs = [*specs, ("proxy CPU %", "proxy_cpu_pct", 1, 0)]
        for label, figure, scale, digits in specs:
            cells = [_fmt(bench.summary[w][b].get(figure), scale, digits) for b in backends]
            rows.append([w.name, label, *cells])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def matrix_rows(matrix: list[dict[str, Any]], targets: list[str]) -> tuple[list[str], list[list[str]]]:
    cells = {(r["scenario"], r["target"]): r for r in matrix}
    rows = []
    for sid in sorted({r["scenario"] for r in matrix}, key=order_key):
        row = [sid, SCENARIOS[sid].description if sid in SCENARIOS else ""]
        for t in targets:
            r = cells.get((sid, t))
            row.append(f"{LABEL[r['status']]} {r['seconds']:.1f}s" if r else "-")
        rows.append(row)
    return ["scenario", "what", *targets], rows


def target_rows(evaluated: list[dict[str, Any]]) -> list[list[str]]:
    status = {True: "met", False: "MISSED", None: "not measured"}
    return [[t["label"], status[t["met"]], t["detail"]] for t in evaluated]


#: The link in a reports directory to its newest complete run.
LATEST = "latest"


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def new_run_dir(root: Path, now: float | None = None) -> Path:
    """A fresh `root/<YYYYMMDD-HHMMSS>` (with `-2`, `-3`... if that second is taken), created."""
    stamp = _stamp(time.time() if now is None else now)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}/{stamp}: a thousand runs in one second")


def link_latest(root: Path, run: Path) -> Path:
    """Points `root/latest` at `run` (a directory in `root`), replacing an older link at once. A
    real directory left there by an older connlab is kept, renamed after its time: nothing is lost."""
    latest = root / LATEST
    if latest.is_dir() and not latest.is_symlink():
        # Onto the empty directory just made for it (rename replaces an empty one).
        latest.rename(new_run_dir(root, latest.stat().st_mtime))
    tmp = root / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    tmp.replace(latest)
    return latest


def write_json(out: Path, results: dict[str, Any]) -> Path:
    """Writes results.json into `out` (created): called as each stage ends, so a run stopped or
    failing later keeps the figures it has."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


@dataclass(frozen=True)
class Written:
    """The files of a report, and why it has no plots (None if it has them)."""

    md: Path
    html: Path
    json: Path
    no_plots: str | None


def write(out: Path, results: dict[str, Any], bench: Bench | None) -> Written:
    """Writes results.json, the plots, report.md and report.html into `out`; without matplotlib,
    the report without its plots and a line saying what they need."""
    json_path = write_json(out, results)
    try:
        made, no_plots = (plots(bench, out) if bench else {}), None
    except ImportError:
        made, no_plots = {}, PLOTS_NEED
    sections: list[tuple[str, str, list[str] | None, list[list[str]] | None]] = []
    m = results["machine"]
    intro = (
        f"Machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs, {m.get('platform')}. "
        f"Pinning: {bench.pinning if bench else 'n/a'}. "
        f"Figures are medians of {bench.config.repetitions if bench else 0} interleaved "
        "repetitions, with min-max in parentheses; each backend ran as its own `connlab serve` process."
    )
    sections.append(("connlab: TCP server architectures side by side", intro, None, None))
    if results.get("matrix"):
        header, rows = matrix_rows(results["matrix"], results["matrix_targets"])
        sections.append(
            ("Lifecycle matrix", f"Wall time {results.get('matrix_wall_s', 0):.0f} s.", header, rows)
        )
    if bench:
        header, rows = comparison_rows(bench)
        sections.append(("Comparison", "", header, rows))
        sections.append(
            (
                "Targets (ratios measured in this run)",
                "",
                ["target", "status", "measured"],
                target_rows(results["targets"]),
            )
        )
    md = []
    for title, text, header, rows in sections:
        md.append(f"## {title}\n")
        if text:
            md.append(text + "\n")
        if header and rows is not None:
            md.append(_md_table(header, rows) + "\n")
    missed = [t for t in results.get("targets", []) if t["met"] is False]
    if missed:
        md.append("## Targets missed\n")
        md += [f"- MISSED: {t['label']}: {t['detail']}" for t in missed]
        md.append("")
    if made or no_plots:
        md.append("## Plots\n")
        md += [f"![{title}]({fname})\n" for title, fname in made.items()] or [f"No plots: {no_plots}.\n"]
    md[0] = "# " + md[0][3:]
    written = Written(out / "report.md", out / "report.html", json_path, no_plots)
    written.md.write_text("\n".join(md))
    written.html.write_text(_html(sections, made, missed, no_plots))
    return written


def _html(
    sections: list[tuple[str, str, list[str] | None, list[list[str]] | None]],
    made: dict[str, str],
    missed: list[dict[str, Any]],
    no_plots: str | None,
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>connlab report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
        ".FAIL,.MISSED{color:#b00;font-weight:bold}.pass,.met{color:#070}</style></head><body>",
    ]
    for i, (title, text, header, rows) in enumerate(sections):
        parts.append(f"<h{1 if i == 0 else 2}>{e(title)}</h{1 if i == 0 else 2}>")
        if text:
            parts.append(f"<p>{e(text)}</p>")
        if header and rows is not None:
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                cells = "".join(f"<td class='{e(c.split(' ')[0])}'>{e(c)}</td>" for c in row)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>")
    if missed:
        parts.append("<h2>Targets missed</h2><ul>")
        parts += [f"<li class='MISSED'>MISSED: {e(t['label'])}: {e(t['detail'])}</li>" for t in missed]
        parts.append("</ul>")
    if no_plots:
        parts.append(f"<h2>Plots</h2><p>No plots: {e(no_plots)}.</p>")
    for title, fname in made.items():
        parts.append(f"<h3>{e(title)}</h3><img src='{e(fname)}' alt='{e(title)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)

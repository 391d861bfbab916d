"""The comparison report: results.json, report.md, report.html and PNG plots."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from connlab import load
from connlab._measure import baseline, plots, story, syscalls, targets, units
from connlab._measure.bench import FIGURES, UNSTABLE_SPREAD, Bench, figure, shown
from connlab.matrix.core import SCENARIOS, order_key
from connlab.matrix.report import LABEL

#: Said (and written in report.md) when the plots cannot be drawn.
PLOTS_NEED = "the plots need matplotlib: pip install 'connlab[report]'"


def _fmt(value: dict[str, Any] | None, text: Callable[[float], str]) -> str:
    """median (min-max), each in its own unit; `*` marks an unstable figure."""
    if not value:
        return "-"
    mark = " *" if value.get("unstable") else ""
    low, high = text(value["min"]), text(value["max"])
    if low == high:  # equal as printed
        return f"{text(value['median'])}{mark}"
    return f"{text(value['median'])} ({low}-{high}){mark}"


def comparison_rows(bench: Bench) -> tuple[list[str], list[list[str]]]:
    """The main comparison table: rows by workload (its human name) and figure, one column per
    server: median (min-max) in units chosen per value, `*` where the figure is unstable."""
    labels = bench.config.labels
    header = ["workload", "figure", *labels]
    rows = []
    for w in bench.config.workloads:
        names = shown(w) + (["proxy_cpu_pct"] if bench.config.proxy and w.kind != "idle" else [])
        first = True
        for name in names:
            title, text = units.FIGURES[name]
            cells = [_fmt(bench.summary[w][b].get(name), text) for b in labels]
            if any(c != "-" for c in cells):
                rows.append([w.label if first else "", title, *cells])
                first = False
    return header, rows


#: The syscall phase's rows in the CSV files: its "workload" and what it was.
SYSCALLS = "syscalls"
SYSCALLS_LABEL = f"strace -f -c: one connection, {syscalls.SIZE} B frames, closed loop"


def syscall_rows(bench: Bench) -> tuple[list[str], list[list[str]]]:
    """The syscall phase as a table: per server, its syscalls per echoed frame, the frames
    counted and the syscalls that matter per frame; or why it was not counted."""
    rows = []
    for row in bench.syscalls:
        if row.get("status") == syscalls.COUNTED:
            main = ", ".join(f"{name} {syscalls.per_frame(x)}" for name, x in syscalls.main_syscalls(row))
            total = syscalls.per_frame(row["per_frame"])
            rows.append([row["server"], total, units.grouped(row["frames"]), main])
        else:
            rows.append([row["server"], "-", "-", str(row.get("status"))])
    return ["server", "syscalls/frame", "frames", "main syscalls (calls per frame)"], rows


def syscall_figures(bench: Bench) -> list[tuple[str, str, float]]:
    """(server, figure, value) of every counted row: `syscalls_per_frame`, and
    `syscalls_per_frame:<name>` for each syscall."""
    out = []
    for row in bench.syscalls:
        if row.get("status") == syscalls.COUNTED:
            out.append((row["server"], "syscalls_per_frame", row["per_frame"]))
            out += [
                (row["server"], f"syscalls_per_frame:{name}", s["per_frame"])
                for name, s in row["syscalls"].items()
            ]
    return out


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
    return [[t["label"], t["status"], t["detail"]] for t in evaluated]


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


def write_csv(out: Path, bench: Bench) -> list[Path]:
    """figures.csv: every figure of every run (one row each); summary.csv: each figure's median,
    min, max, spread and whether it is unstable, per workload and server."""
    runs_path, summary_path = out / "figures.csv", out / "summary.csv"
    with runs_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "workload_label", "server", "repetition", "figure", "value"])
        for r in bench.runs:
            for name in FIGURES:
                if (v := figure(r.metrics, name)) is not None:
                    w.writerow([r.workload.name, r.workload.label, r.backend, r.rep + 1, name, v])
        for rep, p in enumerate(bench.pingpong):
            w.writerow(["pingpong", "raw loopback ping-pong", "", rep + 1, "p50_us", p["latency_us"]["p50"]])
        for server, name, value in syscall_figures(bench):
            w.writerow([SYSCALLS, SYSCALLS_LABEL, server, 1, name, value])
    with summary_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "workload",
                "workload_label",
                "server",
                "figure",
                "median",
                "min",
                "max",
                "spread",
                "unstable",
                "n",
            ]
        )
        for wl, by_label in bench.summary.items():
            for label, cells in by_label.items():
                for name in FIGURES:
                    if c := cells.get(name):
                        w.writerow(
                            [
                                wl.name,
                                wl.label,
                                label,
                                name,
                                c["median"],
                                c["min"],
                                c["max"],
                                round(c["spread"], 4),
                                c["unstable"],
                                c["n"],
                            ]
                        )
        # Counted once: no spread to tell.
        for server, name, value in syscall_figures(bench):
            w.writerow([SYSCALLS, SYSCALLS_LABEL, server, name, value, value, value, 0.0, False, 1])
    return [runs_path, summary_path]


def write_histograms(out: Path, bench: Bench) -> Path | None:
    """latency.hlog: the latency histogram of every load run as an HdrHistogram interval log, one
    line each, tagged workload/server/repetition (HistogramLogAnalyzer and HistogramLogProcessor
    read it; values in nanoseconds). None if no run has one."""
    entries = []
    at = 0.0
    for r in bench.runs:
        if "histogram" in r.metrics:
            length = float(r.metrics.get("elapsed_s") or 0.0)
            tag = re.sub(r"[^A-Za-z0-9_.+:/-]", "_", f"{r.workload.name}/{r.backend}/rep{r.rep + 1}")
            entries.append((tag, at, length, r.metrics["histogram"]))
            at += length
    if not entries:
        return None
    path = out / "latency.hlog"
    path.write_text(load.histogram_log(entries, bench.started))
    return path


@dataclass(frozen=True)
class Written:
    """The files of a report, and why it has no plots (None if it has them)."""

    md: Path
    html: Path
    json: Path
    no_plots: str | None
    data: tuple[Path, ...] = ()


def _intro(results: dict[str, Any], bench: Bench | None) -> str:
    m = results["machine"]
    text = f"Machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs, {m.get('platform')}."
    if bench:
        text += (
            f" Pinning: {bench.pinning}. Each figure is the median of {bench.config.repetitions}"
            " interleaved repetitions, with the min-max in parentheses; `*` marks a figure whose"
            f" min-max spread exceeds {units.percent(UNSTABLE_SPREAD)} of its median (unstable)."
            " Each backend ran in its own `connlab serve` process; its thread count is that"
            " process's, the Python main thread included. Server CPU per frame is the server"
            " process's CPU time over the measured window divided by the frames answered in it;"
            " against tokio, its ratio to tokio's in the same workload and repetition."
        )
        for why in bench.config.skipped.values():
            text += f" Skipped: {why}."
    return text


def _conditions_rows(bench: Bench) -> tuple[list[str], list[list[str]]]:
    c = bench.conditions
    rows = [
        ["load average (1, 5, 15 min) before", ", ".join(f"{x:.2f}" for x in c["load_avg_before"])],
        ["load average (1, 5, 15 min) after", ", ".join(f"{x:.2f}" for x in c["load_avg_after"])],
        ["CPU time stolen over the run", "-" if c.get("steal_pct") is None else f"{c['steal_pct']:.2f} %"],
        [
            "ping-pong floor (p50) per repetition",
            ", ".join(units.duration_us(x) for x in c.get("pingpong_p50_us", [])) or "-",
        ],
    ]
    floor = c.get("pingpong_p50")
    if floor:
        rows.append(["its spread", f"{units.percent(floor['spread'])}{' (unstable)' * floor['unstable']}"])
    return ["condition", "measured"], rows


def write(
    out: Path,
    results: dict[str, Any],
    bench: Bench | None,
    regressions: list[dict[str, Any]] | None = None,
) -> Written:
    """Writes results.json, the CSVs, the histogram log, the plots, report.md and report.html
    into `out`; without matplotlib, the report without its plots and a line saying what they
    need. The report opens with the generated summary (`story`)."""
    json_path = write_json(out, results)
    data: list[Path] = []
    if bench:
        data += write_csv(out, bench)
        if hlog := write_histograms(out, bench):
            data.append(hlog)
    try:
        made, no_plots = (plots.draw(bench, out) if bench else {}), None
    except ImportError:
        made, no_plots = {}, PLOTS_NEED
    md = ["# connlab: TCP server architectures side by side", "", _intro(results, bench), ""]
    if bench:
        md += ["## Summary", "", story.markdown(story.story(bench, results.get("targets", []))), ""]
        if bench.conditions:
            md += ["## Conditions", "", _md_table(*_conditions_rows(bench)), ""]
    if results.get("matrix"):
        header, rows = matrix_rows(results["matrix"], results["matrix_targets"])
        md += ["## Lifecycle matrix", "", f"Wall time {results.get('matrix_wall_s', 0):.0f} s.", ""]
        md += [_md_table(header, rows), ""]
    if bench:
        md += ["## Comparison", "", _md_table(*comparison_rows(bench)), ""]
        if bench.syscalls:
            md += ["## Syscalls per echoed frame", "", _syscalls_intro(bench), ""]
            md += [_md_table(*syscall_rows(bench)), ""]
        evaluated = results.get("targets", [])
        if evaluated:
            md += ["## Targets (ratios measured in this run)", ""]
            md += [_md_table(["target", "status", "measured"], _bold_status(target_rows(evaluated))), ""]
            missed = [t for t in evaluated if t["status"] == targets.MISSED]
            if missed:
                md += [
                    "### Targets missed",
                    "",
                    *(f"- **MISSED**: {t['label']}: {t['detail']}" for t in missed),
                    "",
                ]
    if regressions is not None:
        md += ["## Against the baseline", ""]
        md += [baseline.summary_line(regressions), ""]
        if regressions:
            md += [_md_table(*baseline.rows(regressions)), ""]
    if made or no_plots:
        md += ["## Plots", ""]
        md += [f"![{title}]({fname})\n" for title, fname in made.items()] or [f"No plots: {no_plots}.", ""]
    if data:
        md += ["## Data", "", ", ".join(f"[{p.name}]({p.name})" for p in [json_path, *data]) + ".", ""]
    written = Written(out / "report.md", out / "report.html", json_path, no_plots, tuple(data))
    text = "\n".join(md)
    written.md.write_text(text)
    written.html.write_text(_html(text))
    return written


def _syscalls_intro(bench: Bench) -> str:
    frames = units.grouped(bench.config.syscall_frames)
    return (
        f"Counted by `strace -f -c` attached to each server (every thread) while one connection ran"
        f" a closed loop of about {frames} {syscalls.SIZE} B frames, in a phase after the timed runs:"
        " the count over the frames answered. A traced server is slowed at every syscall, so nothing"
        " here is timed, and calls that depend on timing (futex, sched_yield: waits and spins"
        " between threads) may differ from an untraced run. Syscalls from"
        f" {syscalls.MAIN_PER_FRAME} per frame on are listed."
    )


def _bold_status(rows: list[list[str]]) -> list[list[str]]:
    return [
        [r[0], f"**{r[1]}**" if r[1] in {targets.MISSED, targets.UNSETTLED} else r[1], *r[2:]] for r in rows
    ]


def _html(markdown: str) -> str:
    """The report as one HTML page: the markdown rendered (markdown-it, as rich uses)."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    for word in (targets.MISSED, targets.UNSETTLED, "REGRESSED"):
        body = body.replace(f"<strong>{word}</strong>", f"<strong class='bad'>{word}</strong>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>connlab report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#eee}.bad{color:#b00}img{max-width:100%}</style></head><body>\n"
        + body
        + "</body></html>\n"
    )

"""Matrix results out: the grid, JSON, JUnit XML, and the comparison with a stored baseline."""

from __future__ import annotations

import json
import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rich.table import Table

from connlab.matrix.core import FAIL, NA, PASS, SCENARIOS, SKIP, STATUSES, WARN, Repeated, Result, order_key

STYLE = {PASS: "green", FAIL: "bold red", WARN: "magenta", NA: "dim", SKIP: "yellow"}
LABEL = {PASS: "pass", FAIL: "FAIL", WARN: "warn", NA: "n/a", SKIP: "skip"}


def grid(results: list[Result], targets: list[str]) -> Table:
    """Scenario rows x target columns: pass / FAIL / warn / n/a / skip with seconds; over several rounds, also
    how many rounds failed, with the mean seconds of a round."""
    rounds = max((len(r.runs) for r in results if isinstance(r, Repeated)), default=1)
    title = "connlab lifecycle matrix" + (f", {rounds} rounds" if rounds > 1 else "")
    table = Table(title=title, show_lines=False)
    if rounds > 1:
        table.caption = "cells: failed rounds / rounds, mean seconds per round"
    table.add_column("scenario", style="bold")
    table.add_column("category")
    for target in targets:
        table.add_column(target, justify="center")
    cells = {(r.scenario, r.target): r for r in results}
    for sid in sorted({r.scenario for r in results}, key=order_key):
        row = [sid, SCENARIOS[sid].category if sid in SCENARIOS else ""]
        for target in targets:
            r = cells.get((sid, target))
            row.append(_cell(r) if r else "-")
        table.add_row(*row)
    return table


def _cell(r: Result) -> str:
    label = f"[{STYLE[r.status]}]{LABEL[r.status]}[/]"
    if not isinstance(r, Repeated) or len(r.runs) < 2:
        return f"{label} {r.seconds:.1f}s"
    if r.status in (SKIP, NA):
        return label
    n, skipped = len(r.runs), len(r.rounds_with(SKIP))
    also = f", {skipped} skipped" if skipped else ""
    return f"{label} {len(r.rounds_with('fail'))}/{n} failed{also} {r.seconds / n:.1f}s"


def summary(results: list[Result]) -> dict[str, int]:
    return {s: sum(1 for r in results if r.status == s) for s in STATUSES}


def counts_line(counts: dict[str, int]) -> str:
    """ "30 passed, 1 failed, 0 warned, 0 n/a, 0 skipped"."""
    words = {PASS: "passed", FAIL: "failed", WARN: "warned", NA: "n/a", SKIP: "skipped"}
    return ", ".join(f"{counts[s]} {words[s]}" for s in STATUSES)


def to_json(
    results: list[Result],
    wall_s: float,
    rounds: list[tuple[list[Result], float]] | None = None,
    finished: bool = True,
) -> dict[str, Any]:
    """`results` as they are; with `rounds` (each round's results and seconds) of a --repeat run,
    `results` holds the `Repeated` outcomes (with "failed_rounds"), "rounds" every round's. A run
    that did not finish (interrupted, or still going) says so with "complete": false."""
    out: dict[str, Any] = {"results": [r.to_json() for r in results], "summary": summary(results)}
    if rounds is not None:
        out["repeat"] = len(rounds)
        out["rounds"] = [
            {
                "round": i,
                "results": [r.to_json() for r in mine],
                "summary": summary(mine),
                "wall_s": round(seconds, 3),
            }
            for i, (mine, seconds) in enumerate(rounds, 1)
        ]
    if not finished:
        out["complete"] = False
    return {
        **out,
        "wall_s": round(wall_s, 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _replace(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: a reader (or an interrupted
    run) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(
    path: Path,
    results: list[Result],
    wall_s: float,
    rounds: list[tuple[list[Result], float]] | None = None,
    finished: bool = True,
) -> None:
    _replace(path, json.dumps(to_json(results, wall_s, rounds, finished), indent=2) + "\n")


def write_junit(path: Path, results: list[Result], wall_s: float) -> None:
    """One testsuite per target, one testcase per scenario; for a `Repeated` outcome, one testcase
    over every round: a failure if any round failed, its text each failed round's message."""
    root = ET.Element("testsuites", name="connlab matrix", time=f"{wall_s:.3f}")
    for target in dict.fromkeys(r.target for r in results):
        mine = [r for r in results if r.target == target]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=target,
            tests=str(len(mine)),
            failures=str(sum(r.status == FAIL for r in mine)),
            skipped=str(sum(r.status in (SKIP, NA) for r in mine)),
            time=f"{sum(r.seconds for r in mine):.3f}",
        )
        for r in mine:
            sc = SCENARIOS.get(r.scenario)
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"connlab.matrix.{target}",
                name=r.scenario,
                time=f"{r.seconds:.3f}",
            )
            rounds = r if isinstance(r, Repeated) and len(r.runs) > 1 else None
            failed = rounds.rounds_with(FAIL) if rounds is not None else []
            properties = [("description", sc.description)] if sc else []
            if rounds is not None:
                properties += [("rounds", str(len(rounds.runs))), ("failed_rounds", str(len(failed)))]
            if properties:
                props = ET.SubElement(case, "properties")
                for name, value in properties:
                    props.append(ET.Element("property", name=name, value=value))
            if r.status == FAIL and rounds is not None:
                message = f"failed in {len(failed)}/{len(rounds.runs)} rounds: {r.detail}"
                text = "\n".join(f"round {i}: {rounds.runs[i - 1].detail}" for i in failed)
                ET.SubElement(case, "failure", message=message[:200]).text = text
            elif r.status == FAIL:
                ET.SubElement(case, "failure", message=r.detail[:200]).text = r.detail
            elif r.status in (SKIP, NA):
                ET.SubElement(case, "skipped", message=f"{r.status}: {r.detail}")
            elif r.status == WARN:
                ET.SubElement(case, "system-out").text = f"warning: {r.detail}"
    ET.indent(root)
    _replace(path, ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")


def load_baseline(path: Path) -> dict[tuple[str, str], str]:
    """(scenario, target) → status from a JSON file written by --json."""
    try:
        data = json.loads(path.read_text())
        return {(r["scenario"], r["target"]): r["status"] for r in data["results"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--baseline {path}: not a matrix JSON file ({err})") from None


def compare(results: list[Result], baseline: dict[tuple[str, str], str]) -> tuple[list[str], list[str]]:
    """Unexpected failures (the baseline passed or skipped) and unexpected passes (it failed)."""
    worse, better = [], []
    for r in results:
        before = baseline.get((r.scenario, r.target))
        if before is None:
            continue
        if r.status == FAIL and before != FAIL:
            worse.append(f"{r.scenario} on {r.target}: {before} -> FAIL ({r.detail})")
        elif r.status == PASS and before == FAIL:
            better.append(f"{r.scenario} on {r.target}: FAIL -> pass")
    return worse, better

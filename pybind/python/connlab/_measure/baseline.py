"""This run against an earlier one (`--baseline FILE`): each figure both measured, and whether it
moved beyond the noise band, which is what the two runs' own repetitions span.

A figure regressed when it got worse by more than MIN_CHANGE of the baseline's median *and* its
whole min-max range lies on the worse side of the baseline's (the ranges do not overlap): a
change the repetitions of either run could produce by themselves is noise, not a regression.
Improvements are found the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connlab._measure import units
from connlab._measure.bench import FIGURES, Bench, shown

#: The smallest change of a median that counts, whatever the ranges.
MIN_CHANGE = 0.05

#: workload name -> server -> figure -> {median, min, max, ...}
Figures = dict[str, dict[str, dict[str, Any]]]


def read(path: Path) -> Figures:
    """The summary of an earlier run, from the results.json of `compare` or `bench`, or the file
    of `bench --json`. ValueError saying what is wrong with the file."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    summary = data.get("bench", data).get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict) or not summary:
        raise ValueError(f"{path} has no benchmark summary: give the results.json of a run, or bench --json")
    return summary


def compare(old: Figures, bench: Bench) -> list[dict[str, Any]]:
    """Every figure the report shows of this run that the baseline has too, with its verdict: `regressed`,
    `improved` or `same` (within the noise band)."""
    out = []
    for w, by_server in bench.summary.items():
        for server, cells in by_server.items():
            for name in shown(w):
                new, was = cells.get(name), old.get(w.name, {}).get(server, {}).get(name)
                if not (isinstance(new, dict) and isinstance(was, dict)) or not was["median"]:
                    continue
                change = new["median"] / was["median"] - 1
                better = FIGURES[name]
                if better:
                    worse = new["max"] < was["min"] and change < -MIN_CHANGE
                    gained = new["min"] > was["max"] and change > MIN_CHANGE
                else:
                    worse = new["min"] > was["max"] and change > MIN_CHANGE
                    gained = new["max"] < was["min"] and change < -MIN_CHANGE
                verdict = "regressed" if worse else "improved" if gained else "same"
                out.append(
                    {
                        "workload": w.name,
                        "workload_label": w.label,
                        "server": server,
                        "figure": name,
                        "baseline": was["median"],
                        "now": new["median"],
                        "change": change,
                        "verdict": verdict,
                    }
                )
    return out


def regressed(compared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in compared if c["verdict"] == "regressed"]


def summary_line(compared: list[dict[str, Any]]) -> str:
    counts = {v: sum(c["verdict"] == v for c in compared) for v in ("regressed", "improved", "same")}
    return (
        f"{len(compared)} figures compared: {counts['regressed']} regressed and {counts['improved']} "
        f"improved beyond the noise band, {counts['same']} within it."
    )


def rows(compared: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The figures that moved, regressions first."""
    moved = sorted((c for c in compared if c["verdict"] != "same"), key=lambda c: c["verdict"] != "regressed")
    return ["workload", "server", "figure", "baseline", "now", "change", "verdict"], [
        [
            c["workload_label"],
            c["server"],
            c["figure"],
            units.significant(c["baseline"]),
            units.significant(c["now"]),
            f"{100 * c['change']:+.0f} %",
            "**REGRESSED**" if c["verdict"] == "regressed" else c["verdict"],
        ]
        for c in moved
    ]

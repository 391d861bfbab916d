"""`connlab handoff`: what a listener handoff costs the clients, per pair of backends.

Each pair runs as two `connlab serve` processes: the incumbent with `--control`, the successor with
`--take-over`, while the Rust generator churns connections (connect, one frame, verified echo,
close) on the port. Figures come from the successor's own report (the time from its take-over
request to accepting, to the incumbent's seal, and to its first accepted connection) and from the
generator (the longest connect-to-echo time during the switch, against the same churn without one).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connlab import load
from connlab.process import ServeProcess, connlab_serve_argv

#: Connections in flight while churning.
PARALLEL = 10
#: Churn cycles (x PARALLEL connections) during a switch: long enough to span it.
CYCLES = 3000


@dataclass
class Switch:
    """One handoff under churn."""

    pair: str
    #: From the take-over request to the successor accepting, to the incumbent's seal, to the
    #: successor's first accepted connection (ms).
    serving_ms: float
    sealed_ms: float
    first_accept_ms: float | None
    #: The incumbent's drain (ms) and its counts.
    drain_ms: float
    drained: int
    forced: int
    #: The longest connect-to-echo of the churn spanning the switch, and of a churn without one (ms).
    churn_max_ms: float
    baseline_max_ms: float
    #: Failed churn attempts during the switch, by kind (connect = refused).
    errors: dict[str, int] = field(default_factory=dict)


def _serve(backend: str, **kwargs: Any) -> ServeProcess:
    timeouts = {"idle_timeout": 0, "read_timeout": 0, "write_timeout": 0}
    return ServeProcess(connlab_serve_argv(backend, **timeouts, **kwargs), start_timeout=30.0)


def switch(incumbent: str, successor: str, directory: Path) -> Switch:
    """One handoff from `incumbent` to `successor` under churn; both processes are gone after."""
    control = directory / f"{incumbent}-{successor}.sock"
    with _serve(incumbent, control=control) as old:
        baseline = load.churn(old.address, 200, PARALLEL, rst=True)
        spanning: list[load.Result] = []
        churner = threading.Thread(
            target=lambda: spanning.append(
                load.churn(old.address, CYCLES, PARALLEL, rst=True, deadline=30.0)
            ),
            name="handoff-churn",
        )
        churner.start()
        try:
            # The successor keeps the address: its --port is not used.
            argv = [*connlab_serve_argv(successor, take_over=control)]
            with ServeProcess(argv, start_timeout=30.0) as new:
                stopped = old.wait_exit(timeout=30.0)
                churner.join()
                report = next(e["handoff"] for e in new.events if e.get("event") == "listening")
                gone = next((e for e in old.events if e.get("event") == "stopped"), {})
        finally:
            churner.join()
    if not stopped.normal or gone.get("reason") != "handoff":
        raise RuntimeError(
            f"{incumbent} -> {successor}: the incumbent did not hand off: {stopped.describe()}"
        )
    churn = spanning[0]
    first = report.get("first_accept_after_s")
    if first is None:
        raise RuntimeError(f"{incumbent} -> {successor}: the churn ended before the switch: no figure")
    return Switch(
        pair=f"{incumbent} -> {successor}",
        serving_ms=1e3 * report["serving_after_s"],
        sealed_ms=1e3 * report["sealed_after_s"],
        first_accept_ms=1e3 * first if first is not None else None,
        drain_ms=1e3 * float(gone.get("elapsed_s", 0.0)),
        drained=int(gone.get("drained", 0)),
        forced=int(gone.get("forced", 0)),
        churn_max_ms=churn["latency_us"]["max"] / 1e3,
        baseline_max_ms=baseline["latency_us"]["max"] / 1e3,
        errors={k: v for k, v in churn["errors"].items() if v},
    )


def run(
    pairs: Sequence[tuple[str, str]], repetitions: int, progress: Callable[[str], None] = lambda _: None
) -> list[Switch]:
    """Every pair, `repetitions` times, interleaved."""
    out = []
    with tempfile.TemporaryDirectory(prefix="connlab-handoff-") as tmp:
        for rep in range(repetitions):
            for a, b in pairs:
                progress(f"rep {rep + 1}/{repetitions}: {a} -> {b}")
                out.append(switch(a, b, Path(tmp)))
    return out


def summary(switches: Sequence[Switch]) -> list[dict[str, Any]]:
    """Per pair: the median and the max of each figure over the repetitions, and the error sum."""
    rows = []
    for pair in dict.fromkeys(s.pair for s in switches):
        mine = [s for s in switches if s.pair == pair]
        row: dict[str, Any] = {"pair": pair, "runs": len(mine)}
        for name in (
            "serving_ms",
            "sealed_ms",
            "first_accept_ms",
            "drain_ms",
            "churn_max_ms",
            "baseline_max_ms",
        ):
            values = [v for s in mine if (v := getattr(s, name)) is not None]
            row[name] = {"median": statistics.median(values), "max": max(values)} if values else None
        errors: dict[str, int] = {}
        for s in mine:
            for kind, n in s.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        row["errors"] = errors
        row["forced"] = sum(s.forced for s in mine)
        rows.append(row)
    return rows

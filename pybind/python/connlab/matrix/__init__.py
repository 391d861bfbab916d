"""The lifecycle matrix: every scenario of docs/MATRIX.md, defined once, runnable against an
in-process backend, a server command the matrix launches, or an external host:port (+ pid).

    from connlab import matrix
    results = matrix.run(["epoll"], ids=["H1", "T1"])
"""

from __future__ import annotations

from connlab.matrix import scenarios  # noqa: F401 - registers every scenario
from connlab.matrix.core import (
    COMMAND,
    EXTERNAL,
    EXTERNAL_PID,
    FAIL,
    IN_PROCESS,
    NA,
    PASS,
    SCENARIOS,
    SKIP,
    WARN,
    Context,
    Failed,
    NotApplicable,
    Options,
    Repeated,
    Result,
    Scenario,
    Skip,
    Target,
    check,
    iter_results,
    options_for,
    repeated,
    run_one,
    select,
)

__all__ = [
    "COMMAND",
    "EXTERNAL",
    "EXTERNAL_PID",
    "FAIL",
    "IN_PROCESS",
    "NA",
    "PASS",
    "SCENARIOS",
    "SKIP",
    "WARN",
    "Context",
    "Failed",
    "NotApplicable",
    "Options",
    "Repeated",
    "Result",
    "Scenario",
    "Skip",
    "Target",
    "check",
    "iter_results",
    "options_for",
    "repeated",
    "run",
    "run_one",
    "select",
]


def run(backends: list[str], ids: list[str] | None = None, options: Options | None = None) -> list[Result]:
    """Runs the scenarios `ids` (all by default) on in-process `backends`."""
    targets = [Target.in_process(b) for b in backends]
    return list(iter_results(select(ids), targets, options or Options()))

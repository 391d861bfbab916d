"""Leaks: fds after ten thousand connections and a stop; RSS and threads over rounds of churn."""

from __future__ import annotations

import statistics
from contextlib import suppress

from connlab import probe
from connlab.client import CLOSE, ECHO, PARTIAL, RESET, wait_until
from connlab.matrix.checks import CYCLES, WIDTH, run_churn, settled, wait_fds
from connlab.matrix.core import COMMAND, EXTERNAL_PID, IN_PROCESS, Context, check, scenario

#: Leak rounds end connections every way a client can: echo and FIN, FIN without data, RST after
#: a frame, RST in the middle of a frame.
MIX = (ECHO, CLOSE, RESET, PARTIAL)

#: L2: rounds of churn before RSS is tracked (allocator arenas, thread stacks and caches fill up),
#: then the tracked rounds whose RSS slope is judged.
WARMUP_ROUNDS = 1
TRACKED_ROUNDS = 3
MIB = 1 << 20


@scenario(
    "L1",
    "leak",
    "fds of the server process before start vs after 10 000 churned connections and stop",
    budget=90,
    kinds=frozenset({IN_PROCESS, COMMAND, EXTERNAL_PID}),
)
def l1(ctx: Context) -> None:
    server = ctx.server()
    guard = ctx.guard_of(server)
    before = server.stats()
    run_churn(ctx, server, MIX, before)
    after = settled(ctx, server)
    if before is not None and after is not None:
        reasons = {
            r: n - before["closed_by"][r] for r, n in after["closed_by"].items() if n > before["closed_by"][r]
        }
        ctx.note(f"closes by reason {reasons}")
    assert server.pid is not None and guard.fds is not None
    if ctx.target.kind == IN_PROCESS:
        server.stop()
        wait_fds(ctx, server, guard.fds, "fds before start vs after 10 000 connections and stop")
    else:
        # Its fds exist only while it runs: compared from right after its listener came up.
        wait_fds(ctx, server, guard.fds, "fds after start vs after 10 000 connections")
        why = "it exits when stopped" if ctx.target.kind == COMMAND else "the matrix does not stop it"
        ctx.note(f"fds compared from right after start, not after stop ({why})")


@scenario(
    "L2",
    "leak",
    "server in a child process; RSS after churn round 2 (10 000 connections) vs round 1",
    budget=240,
    kinds=frozenset({IN_PROCESS, COMMAND}),
)
def l2(ctx: Context) -> None:
    server = ctx.child_server({})
    pid, guard = server.pid, ctx.guard_of(server)
    assert guard.fds is not None and guard.threads is not None
    rounds: list[tuple[int, int]] = []  # (threads, RSS) after each round
    for n in range(WARMUP_ROUNDS + TRACKED_ROUNDS):
        run_churn(ctx, server, MIX)
        wait_fds(ctx, server, guard.fds, f"round {n + 1}: every connection closed")
        # A thread leaves /proc a little after its socket is closed: give it the usual 2 s to get
        # back to the count after start, but judge the counts rounds end with, not that.
        with suppress(TimeoutError):
            wait_until(lambda: guard.counts()[1] <= (guard.threads or 0))
        rounds.append((guard.counts()[1], probe.rss_bytes(pid)))
    tracked = rounds[WARMUP_ROUNDS:]
    series = ", ".join(f"{t} threads {rss / MIB:.2f} MiB" for t, rss in rounds)
    check(
        len({t for t, _ in tracked}) == 1,
        f"threads differ between tracked rounds of {CYCLES * WIDTH} connections: {series} "
        f"(first {WARMUP_ROUNDS} warm-up)",
    )
    growth = statistics.linear_regression(range(len(tracked)), [rss for _, rss in tracked]).slope
    check(
        growth < 4 * MIB,
        f"RSS grows {growth / MIB:.2f} MiB per {CYCLES * WIDTH} connections (slope over "
        f"{len(tracked)} tracked rounds), expected < 4 MiB: {series}",
    )
    ctx.note(f"RSS slope {growth / MIB:+.3f} MiB per round; {series}")

"""Churn: ten thousand short connections closed every way, and a thousand one-shot clients at once."""

from __future__ import annotations

import time

from connlab.client import CLOSE, ECHO, RESET, wait_until
from connlab.matrix.checks import (
    CYCLES,
    WIDTH,
    need_fds,
    open_fleet,
    registry_empty,
    run_churn,
    server_cpu,
    settled,
    stats_delta,
    still_serves,
)
from connlab.matrix.core import Context, Failed, LeakGuard, check, scenario


@scenario("U1", "churn", "1000 cycles x 10 simultaneous connections, one frame each", budget=90)
def u1(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "closed_by.eof == 10000")
    run_churn(ctx, server, (ECHO,), before)
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        eof = stats_delta(before, after, "closed_by", "eof")
        check(eof == CYCLES * WIDTH, f"closed_by.eof +{eof}, expected +{CYCLES * WIDTH}")
    still_serves(ctx, server, "after the churn")
    settled(ctx, server)


@scenario("U2", "churn", "1000 cycles x 10 connect-then-close, no data", budget=90)
def u2(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "every close counted")
    run_churn(ctx, server, (CLOSE,), before)
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        n = CYCLES * WIDTH
        got = {key: stats_delta(before, after, key) for key in ("accepted", "closed")}
        got["closed_by.eof"] = stats_delta(before, after, "closed_by", "eof")
        check(all(v == n for v in got.values()), f"expected +{n} each, got {got}")


@scenario("U3", "churn", "1000 cycles x 10 connections that send a frame and RST", budget=90)
def u3(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "close reasons reset/eof")
    run_churn(ctx, server, (RESET,), before)
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        n = CYCLES * WIDTH
        reasons = {r: stats_delta(before, after, "closed_by", r) for r in after["closed_by"]}
        reasons = {r: v for r, v in reasons.items() if v}
        accepted = stats_delta(before, after, "accepted")
        check(accepted == n, f"accepted +{accepted}, expected +{n}")
        check(
            reasons.get("reset", 0) + reasons.get("eof", 0) == n,
            f"close reasons {reasons}, expected reset (or eof) for all {n}",
        )
        ctx.note(f"close reasons {reasons}")


@scenario("U4", "churn", "1000 one-shot clients at once (the handler pile-up)", budget=40)
def u4(ctx: Context) -> None:
    n = 1000
    need_fds(2 * n + 256)
    server = ctx.server()
    guard = LeakGuard(pid=server.pid)
    guard.baseline()  # right after start: the server's process tree, a forking server's children too
    fleet = open_fleet(ctx, server, n)
    try:
        for i in range(n):
            fleet.send(i)
        all_served = fleet.pump_until(lambda: not any(fleet.owed) or fleet.problems, timeout=10.0)
        check(not fleet.problems, f"clients failed: {dict(list(fleet.problems.items())[:5])}")
        check(all_served, f"{sum(1 for o in fleet.owed if o)} of {n} clients not served within 10 s")
    finally:
        fleet.close_all()
    last_close = time.monotonic()
    cpu = server_cpu(server)
    if guard.pid is None or cpu is None:
        ctx.note("threads and CPU after the clients left: not checked (no pid for the server)")
        return
    threads_at_start = guard.threads
    try:
        wait_until(
            lambda: guard.counts()[1] <= (threads_at_start or 0),
            timeout=1.0,
            what="thread count back to its count right after start",
        )
    except TimeoutError:
        raise Failed(
            f"threads {guard.counts()[1]} at {time.monotonic() - last_close:.2f} s after the last close, "
            f"{threads_at_start} right after start"
        ) from None
    # The server's one-off work on the 1000 closes is done once every socket is gone; the window
    # for a busy loop starts then.
    settled(ctx, server)
    cpu0, t0 = cpu(), time.monotonic()
    time.sleep(1.0)  # the measurement window itself
    share = (cpu() - cpu0) / (time.monotonic() - t0)
    ctx.should(
        share < 0.05, f"server CPU {share:.1%} of a core over 1 s after the clients left, expected < 5%"
    )

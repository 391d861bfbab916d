"""Phantoms and capacity: the server's count against the kernel's under steady traffic, the
connection limit, and running out of fds."""

from __future__ import annotations

import time
from typing import Any

from connlab import probe
from connlab.client import Fleet, encode, read_frame, wait_until
from connlab.matrix.checks import expect_eof, held, kernel_counts, need_fds, open_fleet, wait_held
from connlab.matrix.core import COMMAND, IN_PROCESS, Context, Failed, Handle, NotApplicable, check, scenario

#: P1: persistent clients, the sampling period and how long samples are taken.
P1_CLIENTS = 1000
P1_SAMPLE_EVERY = 0.5
P1_SAMPLING = 3.0

#: P2: the limit MATRIX.md names (unless the options give the server's own), the clients over it,
#: and how many are closed to make room.
P2_LIMIT = 50
P2_EXTRA = 10
P2_ROOM = 10

#: P3: the child's RLIMIT_NOFILE and the clients it cannot all hold.
P3_NOFILE = 64
P3_CLIENTS = 100


def frame_period(idle_timeout: float | None) -> tuple[float, str | None]:
    """MATRIX.md's one frame per second, or faster when the server's idle timeout would close a
    connection that waits a second (an external server is used as it is); with the reason."""
    if not idle_timeout or idle_timeout >= 2.0:
        return 1.0, None
    period = idle_timeout / 3
    return (
        period,
        f"a frame every {period:.2f} s, not every second: the server's idle_timeout is {idle_timeout} s",
    )


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    """A small text table for a failure message."""
    cells = [
        head,
        *[
            tuple("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)) for v in r)
            for r in rows
        ],
    ]
    widths = [max(len(c[k]) for c in cells) for k in range(len(head))]
    return "\n".join("  ".join(c[k].rjust(widths[k]) for k in range(len(head))) for c in cells)


@scenario(
    "P1", "phantom", "1000 persistent connections, a frame each per second, sampled every 0.5 s", budget=40
)
def p1(ctx: Context) -> None:
    need_fds(2 * P1_CLIENTS + 256)
    # The connections live for the whole scenario: in-process, give them a server that does not
    # idle them out between frames a second apart.
    overrides = {"idle_timeout": 10.0} if ctx.target.kind == IN_PROCESS else {}
    server = ctx.server(**overrides)
    period, why = frame_period(server.kwargs.get("idle_timeout"))
    if why:
        ctx.note(why)
    pid = server.pid
    has_stats = ctx.stats(server, "server active in every sample") is not None
    if pid is None:
        ctx.note("owned server-side sockets: not sampled (no pid for the server)")
    fleet = open_fleet(ctx, server, P1_CLIENTS)
    rows: list[tuple[Any, ...]] = []
    try:
        fleet.every(period, range(P1_CLIENTS))
        first = fleet.pump_until(lambda: all(fleet.echoes) or fleet.problems, timeout=period + 2.0)
        check(not fleet.problems, f"clients failed: {dict(list(fleet.problems.items())[:5])}")
        check(first, f"{fleet.echoes.count(0)} clients without an echo {period + 2.0:.1f} s after connecting")
        started = time.monotonic()
        for k in range(round(P1_SAMPLING / P1_SAMPLE_EVERY) + 1):
            # The clients' traffic goes on until the next sample is due.
            fleet.pump_until(
                lambda k=k: time.monotonic() >= started + k * P1_SAMPLE_EVERY, timeout=P1_SAMPLE_EVERY
            )
            t = time.monotonic() - started
            stats = server.stats()
            kernel = kernel_counts(server)
            rows.append(
                (
                    t,
                    stats["active"] if stats else None,
                    kernel["owned"],
                    kernel["established"],
                    fleet.connected,
                )
            )
        bad = [r for r in rows if len({v for v in r[1:] if v is not None}) != 1]
        problems = f"; clients: {dict(list(fleet.problems.items())[:3])}" if fleet.problems else ""
        check(
            not bad and not fleet.problems,
            f"server active, owned sockets, kernel ESTABLISHED and connected clients differ{problems}:\n"
            + _table(rows, ("t", "active", "owned", "established", "clients")),
        )
        fleet.every(period, [])
        fleet.pump_until(lambda: not any(fleet.owed) or fleet.problems, timeout=2.0)
        check(not any(fleet.owed), f"{sum(map(bool, fleet.owed))} echoes never arrived")
    finally:
        fleet.close_all()
    _all_gone_within(server, time.monotonic(), 1.0, has_stats)
    ctx.note(f"{len(rows)} samples, each equal {rows[-1][-1]}")


def _all_gone_within(server: Handle, since: float, limit: float, has_stats: bool) -> None:
    """After the clients closed, within `limit` s: active 0 (by the server's stats; else no socket
    on the port owned by its pid; else none established) and no CLOSE_WAIT on the port."""
    seen: dict[str, Any] = {}

    def gone() -> bool:
        kernel = kernel_counts(server)
        if has_stats:
            seen["active"] = (server.stats() or {}).get("active")
        else:
            seen["sockets held"] = held(server)
        seen["CLOSE_WAIT"] = kernel["close_wait"]
        return not any(seen.values())

    while not gone():
        if time.monotonic() >= since + limit:
            raise Failed(f"{limit} s after the clients closed: {seen}, expected all 0")
        time.sleep(0.005)


def _serve(clients: list[Any], what: str) -> None:
    """Each client sends a frame and gets its echo."""
    for k, client in enumerate(clients):
        payload = f"{what} {k}".encode()
        client.sendall(encode(payload))
        check(read_frame(client) == payload, f"{what} {k}: wrong echo")


@scenario("P2", "capacity", "max_connections = 50, open 60", budget=20)
def p2(ctx: Context) -> None:
    limit = ctx.options.max_connections or P2_LIMIT
    overrides: dict[str, Any] = {"max_connections": limit}
    if ctx.target.kind == IN_PROCESS:
        overrides["idle_timeout"] = 10.0  # the held connections must outlast the scenario
    server = ctx.server(**overrides)
    before = ctx.stats(server, "rejected x10")
    held = [ctx.connect(server) for _ in range(limit)]
    wait_held(server, limit)
    _serve(held, "held")
    # The extra ones: EOF within 0.1 s of their connect, without sending a byte.
    extra, eof_after = [], []
    for _ in range(P2_EXTRA):
        started = time.monotonic()
        client = ctx.connect(server)
        extra.append((client, started))
    for k, (client, started) in enumerate(extra):
        eof_after.append(expect_eof(client, f"extra client {k}, from its connect", started))
    ctx.should(
        max(eof_after) <= 0.1, f"extra clients saw EOF after {max(eof_after) * 1000:.0f} ms, expected 100"
    )
    if before is not None:
        base = before["closed_by"]["rejected"]
        after = wait_until(
            lambda: (s := server.stats()) and s["closed_by"]["rejected"] - base >= P2_EXTRA and s,
            what=f"{P2_EXTRA} rejections counted",
        )
        rejected = (
            after["rejected"] - before["rejected"],
            after["closed_by"]["rejected"] - before["closed_by"]["rejected"],
        )
        check(
            rejected == (P2_EXTRA, P2_EXTRA),
            f"rejected, closed_by.rejected +{rejected}, expected +{P2_EXTRA} each",
        )
    _serve(held, "served")
    for client in held[:P2_ROOM]:
        client.close()
    wait_held(server, limit - P2_ROOM)
    newcomers = [ctx.connect(server) for _ in range(P2_ROOM)]
    _serve(newcomers, "newcomer")
    if before is not None:
        rejected_now = (server.stats() or {})["rejected"] - before["rejected"]
        check(rejected_now == P2_EXTRA, f"newcomers rejected: rejected +{rejected_now}")
    ctx.note(f"extra clients saw EOF after {max(eof_after) * 1000:.1f} ms at most")


def _saturation(fleet: Fleet, server: Handle, nofile: int) -> tuple[bool, int, int]:
    """(saturated, served, owned): every fd of the child in use, and every connection it holds
    served. Quick (sock_diag), so the clients' keep-alive frames are not held up."""
    assert server.pid is not None
    fds = probe.fd_count(server.pid)
    served = sum(1 for e in fleet.echoes if e)
    if fds < nofile:
        return False, served, -1
    owned = held(server)
    return served == owned, served, owned


@scenario(
    "P3",
    "capacity",
    "server in a child process with RLIMIT_NOFILE = 64; open 100 clients",
    budget=30,
    kinds=frozenset({IN_PROCESS, COMMAND}),
)
def p3(ctx: Context) -> None:
    server = ctx.child_server({}, nofile=P3_NOFILE)
    pid = server.pid
    fleet = open_fleet(ctx, server, P3_CLIENTS)
    try:
        for i in range(P3_CLIENTS):
            fleet.send(i)
        # Clients the server holds keep it busy enough not to idle them out: saturated stays saturated.
        idle = server.kwargs.get("idle_timeout")
        keep = min(1.0, idle / 3) if idle else 1.0

        def refresh_keepalive() -> None:
            served = [i for i, e in enumerate(fleet.echoes) if e]
            if set(served) != fleet.periodic:
                fleet.every(keep, served)

        state: tuple[bool, int, int] = (False, 0, 0)

        def saturated() -> bool:
            nonlocal state
            refresh_keepalive()
            state = _saturation(fleet, server, P3_NOFILE)
            return state[0]

        ok = fleet.pump_until(lambda: fleet.problems or saturated(), timeout=2.0)
        check(not fleet.problems, f"clients failed: {dict(list(fleet.problems.items())[:5])}")
        if not ok and all(fleet.echoes) and probe.fd_count(pid) < P3_NOFILE:
            raise NotApplicable(
                f"all {P3_CLIENTS} clients served with {probe.fd_count(pid)} fds in the server's process: "
                "it does not hold its connections in one process (it forks per connection?), so its "
                "fd limit never binds"
            )
        check(
            ok,
            f"not saturated within 2 s: {probe.fd_count(pid)} fds of {P3_NOFILE}, "
            f"{state[1]} clients served, {state[2]} sockets held",
        )
        first = {i for i, e in enumerate(fleet.echoes) if e}
        check(0 < len(first) < P3_CLIENTS, f"{len(first)} of {P3_CLIENTS} served: the fd limit did not bite")
        cpu0, t0 = probe.cpu_seconds(pid), time.monotonic()
        fleet.pump_until(lambda: False, timeout=2.0)  # the measurement window itself, clients kept alive
        share = (probe.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        check(
            not fleet.problems,
            f"held clients failed while saturated: {dict(list(fleet.problems.items())[:5])}",
        )
        check(
            probe.fd_count(pid) == P3_NOFILE, f"no longer saturated: {probe.fd_count(pid)} fds of {P3_NOFILE}"
        )
        ctx.should(share < 0.10, f"child CPU {share:.1%} of a core over 2 s while saturated, expected < 10%")
        # Open connections are still served.
        fleet.every(keep, [])
        fleet.pump_until(lambda: not any(fleet.owed[i] for i in first), timeout=2.0)
        marks = {i: fleet.echoes[i] for i in first}
        for i in first:
            fleet.send(i)
        served = fleet.pump_until(lambda: all(fleet.echoes[i] > marks[i] for i in first), timeout=2.0)
        check(
            served,
            f"{sum(1 for i in first if fleet.echoes[i] == marks[i])} held clients not served while saturated",
        )
        queued = [i for i in range(P3_CLIENTS) if i not in first]
        room = len(first)
        check(
            len(queued) <= room, f"{len(queued)} queued clients cannot fit in the {room} fds the others free"
        )
        fleet.close(first)
        closed = time.monotonic()
        fleet.pump_until(lambda: all(fleet.echoes[i] for i in queued) or fleet.problems, timeout=1.0)
        served_after = time.monotonic() - closed
        late = [i for i in queued if not fleet.echoes[i]]
        check(not fleet.problems, f"queued clients failed: {dict(list(fleet.problems.items())[:5])}")
        check(
            not late,
            f"{len(late)} of {len(queued)} queued clients not served within 1 s after the others closed",
        )
        ctx.note(
            f"{len(first)} held at saturation, child CPU {share:.1%}, the {len(queued)} queued served "
            f"{served_after:.2f} s after the others closed"
        )
    finally:
        fleet.close_all()

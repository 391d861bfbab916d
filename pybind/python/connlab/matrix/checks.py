"""Every wait and assertion more than one scenario makes: the server's journal and close reasons,
timed closes, quiescence, what the kernel shows of the server's sockets, leak and resource
checks. Scenario modules import this and `connlab.matrix.core`, never each other."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from connlab import probe
from connlab.client import IO_TIMEOUT, Fleet, churn, encode, open_client, read_frame, wait_until
from connlab.matrix.core import IN_PROCESS, Context, Failed, Handle, NotApplicable, check

#: MATRIX.md's churn: 1000 cycles of 10 simultaneous connections.
CYCLES = 1000
WIDTH = 10

#: `accept_pacer`, with the server's stats: how far churn may run ahead of its accepts, checked
#: every PACE_EVERY cycles; together well below the listen backlog (1024 by default).
PACE_LAG = 256
PACE_EVERY = 25

MIB = 1 << 20


def journal(
    ctx: Context, handle: Handle, peer: tuple[Any, ...]
) -> list[tuple[str | None, str, str | None]] | None:
    """(from, to, reason) of the latest connection from `peer`, or None (noted) without a journal."""
    entries = handle.transitions(peer)
    if entries is None:
        ctx.note(f"transitions: not checked (no journal on a {ctx.target.kind} target)")
        return None
    return [(f, t, r) for _, _, f, t, r, _ in entries]


def close_reason(ctx: Context, handle: Handle, peer: tuple[Any, ...]) -> str | None:
    """The recorded close reason of `peer`'s connection, once it is closed (polled for 2 s)."""
    if handle.transitions(peer) is None:
        ctx.note(f"close reason: not checked (no journal on a {ctx.target.kind} target)")
        return None

    def closed() -> str | None:
        entries = handle.transitions(peer) or []
        reasons = [r for *_, r, _ in entries if r]
        gone = all(c["peer"] != tuple(peer[:2]) for c in handle.connections() or [])
        return reasons[-1] if reasons and gone else None

    return wait_until(closed, what=f"connection from {peer} closed")


def expect_reason(ctx: Context, handle: Handle, peer: tuple[Any, ...], *allowed: str) -> None:
    reason = close_reason(ctx, handle, peer)
    if reason is not None:
        check(reason in allowed, f"close reason {reason!r}, expected {' or '.join(allowed)}")


def stats_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None, key: str, sub: str | None = None
) -> int:
    """after[key] - before[key] (or of after[key][sub])."""
    assert before is not None and after is not None
    if sub is None:
        return int(after[key]) - int(before[key])
    return int(after[key][sub]) - int(before[key][sub])


def truncated_once(
    ctx: Context, handle: Handle, peer: tuple[Any, ...], before: dict[str, Any] | None, reason: str
) -> dict[str, Any] | None:
    """After a partial frame: the server settles, closes `peer` for `reason`, and counts one
    truncated frame (where it has stats). Returns its stats then."""
    after = settled(ctx, handle)
    expect_reason(ctx, handle, peer, reason)
    if before is not None and after is not None:
        delta = stats_delta(before, after, "truncated_frames")
        check(delta == 1, f"truncated_frames +{delta}, expected +1")
    return after


def expect_eof(sock: socket.socket, what: str, started: float, within: float = 2.0) -> float:
    """Reads the server's EOF on `sock` (no byte, no RST) within `within` s of `started`;
    returns when it came, in seconds since `started`."""
    sock.settimeout(max(0.0, started + within - time.monotonic()))
    try:
        got = sock.recv(1)
    except TimeoutError:
        raise Failed(f"{what}: no EOF within {within:g} s") from None
    except ConnectionResetError:
        raise Failed(f"{what}: reset (RST) instead of EOF") from None
    check(got == b"", f"{what}: got {got!r} instead of EOF")
    return time.monotonic() - started


def timeout_of(ctx: Context, handle: Handle, name: str) -> float:
    """The server's `name` timeout in seconds; n/a when it has none (claimed or configured)."""
    value = handle.kwargs.get(name)
    if not value:
        raise NotApplicable(ctx.options.unclaimed(name))
    return float(value)


def frame_limit(handle: Handle) -> int:
    """The largest frame the server takes: its max_frame, or 1 MiB when it claims none."""
    return int(handle.kwargs.get("max_frame") or MIB)


def _assumed(ctx: Context, feature: str, value: float) -> str:
    """For a server the matrix does not configure: which option states the timeout it assumed."""
    if ctx.target.kind == IN_PROCESS:
        return ""
    option = ctx.options.option(feature)
    return f" (the matrix assumed {option} {value:g}: give the server's own with {option} S, or none)"


def timed_eof(
    ctx: Context, sock: socket.socket, started: float, feature: str, timeout: float
) -> float | None:
    """Reads until EOF (an RST fails) for up to 2T + 0.25 s (plus the delay a proxy adds);
    returns seconds since `started`, or None with a warning (a SHOULD: the claimed timeout is
    late) if no close came by then."""
    limit = 2 * timeout + 0.25 + ctx.delay
    sock.settimeout(max(0.0, started + limit - time.monotonic()))
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        raise AssertionError("the server reset the connection instead of closing it") from None
    except TimeoutError:
        ctx.should(False, f"{feature}: not closed within {limit:.2f} s" + _assumed(ctx, feature, timeout))
        return None
    return time.monotonic() - started


def within_timeout_window(ctx: Context, elapsed: float, feature: str, timeout: float, what: str) -> None:
    """MATRIX.md: a timed close happens at t in [T, 2T + 0.25 s] (+ the delay a proxy adds);
    outside it is a warning."""
    late = 2 * timeout + 0.25 + ctx.delay
    ctx.should(
        timeout <= elapsed <= late,
        f"{what}: closed after {elapsed:.3f} s, expected within [{timeout}, {late:.2f}] s"
        + _assumed(ctx, feature, timeout),
    )


def conn_of(handle: Handle, peer: tuple[Any, ...]) -> dict[str, Any] | None:
    """The server's `connections()` entry for the client `peer`, if it holds one."""
    for conn in handle.connections() or []:
        if conn["peer"] == tuple(peer[:2]):
            return conn
    return None


def wait_consumed(handle: Handle, peer: tuple[Any, ...], n: int, state: str | None = None) -> bool:
    """Waits until the server has read `n` bytes of `peer` (and shows it in `state`); False when the
    target has no `connections()`, so the caller knows nothing was waited for."""
    if handle.connections() is None:
        return False

    def there() -> dict[str, Any] | None:
        conn = conn_of(handle, peer)
        if conn and conn["bytes_in"] == n and (state is None or conn["state"] == state):
            return conn
        return None

    wait_until(there, what=f"server read {n} bytes of {peer}" + (f" in {state}" if state else ""))
    return True


def still_serves(ctx: Context, handle: Handle, what: str) -> None:
    """A new connection gets its echo: the server is alive and accepting."""
    with ctx.connect(handle) as again:
        again.sendall(encode(b"still serving"))
        check(read_frame(again) == b"still serving", f"{what}: a new connection was not served")


def accepted_socket(handle: Handle, client: socket.socket) -> int:
    """The inode of the server's socket for `client`, once some process accepted it: read from
    the kernel's sockets on the server's port, so a server that forks per connection is seen."""
    port, mine = handle.port, client.getsockname()[1]
    return wait_until(lambda: probe.accepted_socket(port, mine), what="the server accepted the connection")


def wait_fd_closed(handle: Handle, inode: int) -> None:
    """Waits until no process holds the server's socket `inode` any more (every copy closed)."""
    port = handle.port
    wait_until(
        lambda: all(i != inode for _, i, _ in probe.server_sockets(port)),
        what=f"the server closed its socket {inode}",
    )


def listener_inodes(port: int) -> set[int]:
    """The inodes of the LISTEN sockets on `port` (several with SO_REUSEPORT, or IPv4 and IPv6)."""
    try:
        inodes = {inode for _, inode, _ in probe.diag_sockets(port, listen=True)}
    except OSError as err:
        raise NotApplicable(f"needs sock_diag to find the listener: {err}") from None
    check(inodes, f"no LISTEN socket on port {port}")
    return inodes


def wait_listener_closed(port: int, inodes: set[int]) -> None:
    """Waits until every listening socket of `inodes` on `port` is closed (a stop has begun)."""
    wait_until(
        lambda: not inodes & {i for _, i, _ in probe.diag_sockets(port, listen=True)},
        what="the listener closed",
    )


def small_rcvbuf_client(ctx: Context, handle: Handle, rcvbuf: int = 4096) -> socket.socket:
    """A client whose receive buffer is set before connect (the window is fixed at the handshake)."""
    host, port = handle.address
    sock = open_client((host, port), rcvbuf=rcvbuf)
    ctx.sockets.append(sock)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def kernel_counts(handle: Handle) -> dict[str, int | None]:
    """What the kernel shows of the server's port: "owned", the sockets its process tree holds
    (None without a pid); "held", those any process holds (the kernel gives a socket an inode
    when it is accepted); "established" and "close_wait" by state."""
    sockets = probe.server_sockets(handle.port)
    mine = probe.tree_socket_inodes(handle.pid) if handle.pid is not None else None
    return {
        "owned": None if mine is None else sum(1 for _, inode, _ in sockets if inode in mine),
        "held": sum(1 for _, inode, _ in sockets if inode),
        "established": sum(1 for state, _, _ in sockets if state == "ESTABLISHED"),
        "close_wait": sum(1 for state, _, _ in sockets if state == "CLOSE_WAIT"),
    }


def held(handle: Handle) -> int:
    """Connections the server holds: its `active`; without stats, the sockets on its port its
    process tree holds, or without a pid those any process holds (`kernel_counts`)."""
    stats = handle.stats()
    if stats is not None:
        return int(stats["active"])
    counts = kernel_counts(handle)
    return int(counts["owned"] if counts["owned"] is not None else counts["held"] or 0)


def wait_held(handle: Handle, n: int, timeout: float = 2.0) -> None:
    """Polls until the server holds `n` connections (`held`)."""
    seen = [-1]

    def there() -> bool:
        seen[0] = held(handle)
        return seen[0] == n

    try:
        wait_until(there, timeout)
    except TimeoutError:
        raise Failed(f"the server holds {seen[0]} connections after {timeout} s, expected {n}") from None


def quiescent_stats(handle: Handle, n: int | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """The server's stats once it is quiescent (DESIGN.md §4): `accepted` and `closed` unchanged
    for 100 ms, the listener's accept queue empty, and the counters conserved (accepted == active
    + closed, closed_by summing to closed, by_state to active); with `n`, holding `n` connections.
    Polled for `timeout` s. A slow acceptor (a thread per connection) can be between two
    accepts with nothing registered while connections still wait in its queue: `active == 0`
    alone is no quiescence."""
    port = handle.port
    seen: dict[str, Any] = {}
    since = [(-1, -1), time.monotonic()]

    def quiet() -> dict[str, Any] | None:
        nonlocal seen
        seen = handle.stats() or {}
        now, key = time.monotonic(), (seen["accepted"], seen["closed"])
        if key != since[0]:
            since[:] = [key, now]
            return None
        conserved = (
            seen["accepted"] == seen["active"] + seen["closed"]
            and sum(seen["closed_by"].values()) == seen["closed"]
            and sum(seen["by_state"].values()) == seen["active"]
        )
        ok = now - since[1] >= 0.1 and conserved and (n is None or seen["active"] == n)
        return seen if ok and not probe.accept_queue(port) else None

    try:
        return wait_until(quiet, timeout, what="quiescence")
    except TimeoutError:
        counts = {k: seen.get(k) for k in ("active", "accepted", "closed", "closed_by", "by_state")}
        want = "" if n is None else f" with {n} connections"
        raise Failed(
            f"not quiescent{want} within {timeout} s: {counts}, accept queue {probe.accept_queue(port)}"
        ) from None


def settled(ctx: Context, handle: Handle, n: int = 0, timeout: float = 2.0) -> dict[str, Any] | None:
    """The one quiescence wait: until the server is quiescent holding `n` connections
    (`quiescent_stats`), returning its stats then; without stats, until it holds `n` by the
    kernel's count (`held`), returning None."""
    if handle.stats() is None:
        wait_held(handle, n, timeout)
        return None
    return quiescent_stats(handle, n, timeout)


def registry_empty(ctx: Context, handle: Handle) -> None:
    """The registry holds nothing (where the target shows it)."""
    conns = handle.connections()
    if conns is None:
        ctx.note("registry: no connections() on this target; emptiness by the kernel's count of its sockets")
        return
    check(conns == [], f"registry not empty: {conns[:3]}{' ...' if len(conns) > 3 else ''}")


def need_fds(n: int) -> None:
    """MATRIX.md: the session raises its RLIMIT_NOFILE soft limit to what it needs, or skips."""
    try:
        probe.raise_nofile(n)
    except (OSError, ValueError) as err:
        raise NotApplicable(f"needs {n} open files in this process: {err}") from None


def accept_pacer(handle: Handle, before: dict[str, Any] | None) -> Callable[[int], None] | None:
    """Keeps a churn that never waits for the server (connect-then-close, send-then-RST) from
    running ahead of the server's accepts. Otherwise a slow acceptor (a thread or a process per
    connection, a small backlog) lets the listen queue overflow (ListenOverflows in
    /proc/net/netstat): the kernel drops handshakes, and a connection reaches the server a
    retransmission (1 s) later, or never if an RST follows, so the row would measure the kernel's
    drops. With the server's stats: at most `PACE_LAG` connections ahead of its `accepted`,
    checked every `PACE_EVERY` cycles; without: a connect only when it fits in the listener's
    accept queue (its length and backlog read through sock_diag). None when neither is known."""
    port = handle.port
    if before is None:
        if probe.listen_queue(port) is None:
            return None
        credit = [0]  # connects known to fit since the queue was last read

        def room() -> bool:
            queue = probe.listen_queue(port)
            credit[0] = 1 << 30 if queue is None else queue[1] - queue[0]  # None: the listener is gone
            return credit[0] > 0

        def fits(_opened: int) -> None:
            if credit[0] <= 0:
                wait_until(room, IO_TIMEOUT, interval=0.001, what="room in the server's accept queue")
            credit[0] -= 1

        return fits

    def pace(opened: int) -> None:
        if not opened or opened % (PACE_EVERY * WIDTH):
            return

        def caught_up() -> bool:
            return (handle.stats() or {})["accepted"] - before["accepted"] >= opened - PACE_LAG

        wait_until(caught_up, IO_TIMEOUT, what=f"the server accepting {opened - PACE_LAG} connections")

    return pace


def run_churn(
    ctx: Context, handle: Handle, modes: tuple[str, ...], before: dict[str, Any] | None = None
) -> Counter[str]:
    """MATRIX.md's churn (`CYCLES` x `WIDTH`) against `handle`, paced to its accepts
    (`accept_pacer`; `before` are its stats at the start, if it has any), and ended early when
    the row is aborted (past its budget)."""
    pacer = accept_pacer(handle, before)

    def pace(opened: int) -> None:
        if ctx.cancelled.is_set():
            raise Failed(f"churn stopped after {opened} connections: the row was aborted")
        if pacer is not None:
            pacer(opened)

    return churn(handle.address, CYCLES, WIDTH, modes=modes, pace=pace)


def open_fleet(ctx: Context, handle: Handle, n: int) -> Fleet:
    """`n` clients connected to `handle` (closed at the scenario's end)."""
    socks = []
    for _ in range(n):
        sock = open_client(handle.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx.sockets.append(sock)
        socks.append(sock)
    return Fleet(socks)


def server_cpu(handle: Handle) -> Callable[[], float] | None:
    """CPU seconds of the server so far: its `connlab-*` threads in this process; for a server in
    processes of its own, the live processes of its tree; None when its pid is unknown."""
    pid = handle.pid
    if pid is None:
        return None
    if pid == os.getpid():
        return lambda: probe.threads_cpu_seconds("connlab-", pid)

    def tree() -> float:
        total = 0.0
        for p in probe.process_tree(pid):
            try:
                total += probe.cpu_seconds(p)
            except ProcessLookupError:
                continue
        return total

    return tree


def server_rss(ctx: Context, handle: Handle) -> int | None:
    """The server process's RSS (this process for an in-process server), or None (noted)."""
    if handle.pid is None:
        ctx.note("server RSS: not checked (no pid for this target)")
        return None
    return probe.rss_bytes(handle.pid)


def wait_fds(ctx: Context, handle: Handle, want: int, what: str) -> None:
    """Polls (2 s) until the server's process tree holds at most `want` fds."""
    guard = ctx.guard_of(handle)
    try:
        wait_until(lambda: guard.counts()[0] <= want, what=what)
    except TimeoutError:
        raise Failed(f"{what}: {guard.counts()[0]} fds, expected {want}") from None

"""Faults a loopback never makes, made by a proxy between client and server (connlab.proxy): a
client that vanishes (no FIN, no RST) while idle, mid-frame or while owed data; a partition that
heals; a reset by the network in the middle of an answer.

The server sees the proxy, not the client: its journal and `connections()` cannot be matched to
the client, so these rows read the server's counters (where it has them) and the kernel."""

from __future__ import annotations

import select
import socket
import time

from connlab.client import HEADER, encode, read_frame, recv_exact, wait_until
from connlab.matrix.checks import (
    MIB,
    frame_limit,
    held,
    kernel_counts,
    server_rss,
    settled,
    stats_delta,
    wait_held,
)
from connlab.matrix.core import FAIL, SCENARIOS, Context, Failed, Handle, check, run_in_guard, scenario
from connlab.proxy import Proxy

#: How long a server without the timeout a row needs is given to close a vanished client
#: anyway, before the row says it never will.
WITHOUT_TIMEOUT = 5.0

#: After its FIN, how long a server may keep the socket of a peer that never answers (a
#: lingering close waits for the peer's EOF: 1 s in connlab's backends, as nginx's default 5 s
#: `lingering_timeout` is bounded too), with slack for a busy machine.
LINGER_BOUND = 2.0


def vanish(proxy: Proxy) -> None:
    """From now on nothing crosses the proxy either way, not even a FIN or an RST."""
    for stream in ("upstream", "downstream"):
        proxy.add_toxic(f"vanish-{stream}", "timeout", stream=stream, timeout=0)


def heal(proxy: Proxy) -> None:
    for stream in ("upstream", "downstream"):
        proxy.remove_toxic(f"vanish-{stream}")


def closed_within(ctx: Context, server: Handle, since: float, feature: str, timeout: float | None) -> float:
    """Waits until the server closes the vanished client's connection: its side sends its FIN
    or RST (the socket leaves ESTABLISHED) by 2T + 0.25 s (T the claimed `feature`; without one
    claimed, `WITHOUT_TIMEOUT` s), and then holds no socket for it within `LINGER_BOUND` s more
    (a lingering close waits for a peer that will never answer, boundedly). Returns when the
    close began, in seconds since `since`; fails naming a phantom it would keep forever."""
    limit = 2 * timeout + 0.25 if timeout else WITHOUT_TIMEOUT
    try:
        wait_until(
            lambda: kernel_counts(server)["established"] == 0,
            timeout=max(0.0, since + limit - time.monotonic()),
        )
    except TimeoutError:
        why = (
            f"{ctx.options.option(feature)} {timeout:g} claimed"
            if timeout
            else f"it claims no {feature.replace('_', ' ')}: a client that vanishes without FIN or RST "
            "stays a phantom forever"
        )
        raise Failed(
            f"the server still holds the connection open {limit:.2f} s after its client vanished ({why})"
        ) from None
    began = time.monotonic() - since
    try:
        wait_until(lambda: held(server) == 0, timeout=LINGER_BOUND)
    except TimeoutError:
        raise Failed(
            f"the server began closing {began:.2f} s after its client vanished, but still holds the "
            f"socket {LINGER_BOUND:g} s later: a phantom"
        ) from None
    return began


def _timeout(server: Handle, feature: str) -> float | None:
    value = server.kwargs.get(feature)
    return float(value) if value else None


def _quiet(sock: socket.socket, seconds: float) -> None:
    """Nothing reaches the vanished client: no byte, no FIN, no RST."""
    readable, _, _ = select.select([sock], [], [], seconds)
    check(not readable, "something reached the client through the partition")


@scenario("F1", "fault", "client vanishes while idle (no FIN, no RST)", budget=20, waits=("idle_timeout",))
def f1(ctx: Context) -> None:
    server = ctx.server()
    proxy = ctx.proxy(server)
    limit = _timeout(server, "idle_timeout")
    client = ctx.connect(proxy)
    client.sendall(encode(b"last words"))
    check(read_frame(client) == b"last words", "echo differs through the proxy")
    wait_held(server, 1)
    vanish(proxy)
    since = time.monotonic()  # the server's idle clock started at its answer, a little earlier
    elapsed = closed_within(ctx, server, since, "idle_timeout", limit)
    _quiet(client, 0.05)
    ctx.note(f"closed {elapsed:.2f} s after its client vanished")
    settled(ctx, server)


@scenario(
    "F2",
    "fault",
    "client vanishes in the middle of a frame",
    budget=20,
    needs=("framing",),
    waits=("read_timeout",),
)
def f2(ctx: Context) -> None:
    server = ctx.server()
    proxy = ctx.proxy(server)
    limit = _timeout(server, "read_timeout")
    before = ctx.stats(server, "truncated_frames +1")
    body = min(1000, frame_limit(server))
    partial = HEADER.pack(body) + b"v" * (body // 2)
    client = ctx.connect(proxy)
    client.sendall(partial)
    # The half frame has reached the server before the client vanishes.
    wait_until(lambda: proxy.stats()["upstream"]["bytes_out"] == len(partial), what="half a frame forwarded")
    since = time.monotonic()
    vanish(proxy)
    closed_within(ctx, server, since, "read_timeout", limit)
    after = settled(ctx, server)
    if before is not None and after is not None:
        delta = stats_delta(before, after, "truncated_frames")
        check(delta == 1, f"truncated_frames +{delta}, expected +1")
        check(stats_delta(before, after, "closed_by", "read_timeout") == 1, "reason: not read_timeout")


@scenario(
    "F3",
    "fault",
    "client vanishes while the server owes it 4 MiB (network error during write)",
    budget=30,
    waits=("write_timeout",),
)
def f3(ctx: Context) -> None:
    server = ctx.server()
    proxy = ctx.proxy(server)
    limit = _timeout(server, "write_timeout")
    size = min(MIB, frame_limit(server))
    frames = encode(bytes(size)) * ((4 * MIB) // size)
    rss_before = server_rss(ctx, server)
    client = ctx.connect(proxy, timeout=10)
    proxy.add_toxic("vanish-downstream", "timeout", stream="downstream", timeout=0)
    client.sendall(frames)  # all of it reaches the server; none of its answers comes back
    forwarded = lambda: proxy.stats()["upstream"]["bytes_out"] == len(frames)  # noqa: E731
    wait_until(forwarded, timeout=10, what="4 MiB forwarded")
    proxy.add_toxic("vanish-upstream", "timeout", stream="upstream", timeout=0)
    since = time.monotonic()
    closed_within(ctx, server, since, "write_timeout", limit + 1.0 if limit else None)
    if rss_before is not None:
        rss = server_rss(ctx, server)
        assert rss is not None
        held_by_proxy = proxy.stats()["downstream"]["bytes_held"] if ctx.target.pid is None else 0
        bound = frame_limit(server) + int(server.kwargs["max_pending_output"]) + MIB + held_by_proxy
        growth = rss - rss_before
        check(growth < bound, f"server RSS grew {growth / MIB:.1f} MiB while it could not write "
              f"(bound {bound / MIB:.1f} MiB)")  # fmt: skip
    settled(ctx, server)


@scenario(
    "F4",
    "fault",
    "a partition shorter than every timeout (both ways held for T/2, then healed)",
    budget=20,
    needs=("framing",),
)
def f4(ctx: Context) -> None:
    server = ctx.server()
    proxy = ctx.proxy(server)
    claimed = [float(server.kwargs.get(t) or 0) for t in ("idle_timeout", "read_timeout", "write_timeout")]
    pause = min((t for t in claimed if t), default=2.0) / 2
    client = ctx.connect(proxy)
    sent: list[bytes] = []

    def send(what: str, n: int) -> None:
        for i in range(n):
            payload = f"{what} {i}".encode()
            sent.append(payload)
            client.sendall(encode(payload))

    send("before", 10)
    got = [read_frame(client) for _ in range(10)]
    vanish(proxy)
    send("during", 10)
    _quiet(client, pause)
    heal(proxy)
    try:
        send("after", 10)
        got += [read_frame(client) for _ in range(20)]
    except (OSError, EOFError) as err:
        raise Failed(
            f"the connection did not survive a {pause:.2f} s partition, shorter than every claimed "
            f"timeout: {type(err).__name__}: {err} after {len(got)} of 30 answers"
        ) from None
    check(got == sent, f"frames lost, doubled or out of order across a {pause:.2f} s partition")
    check(held(server) == 1, "the server dropped the connection during a partition shorter than its timeouts")
    ctx.note(f"partition of {pause:.2f} s healed; 30 frames each answered once, in order")


@scenario("F6", "fault", "reset by the network in the middle of an answer (after 64 KiB)", budget=15)
def f6(ctx: Context) -> None:
    server = ctx.server()
    proxy = ctx.proxy(server)
    before = ctx.stats(server, "reason reset")
    size = min(MIB, frame_limit(server))
    client = ctx.connect(proxy, timeout=10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    client.sendall(encode(bytes(size)))
    recv_exact(client, 64 << 10)
    proxy.add_toxic("reset", "reset_peer", stream="downstream", timeout=0)
    try:
        while client.recv(1 << 16):
            pass
        raise Failed("the client saw EOF, not the reset")
    except ConnectionResetError:
        pass
    wait_held(server, 0)
    after = settled(ctx, server)
    if before is not None and after is not None:
        reasons = {r: stats_delta(before, after, "closed_by", r) for r in after["closed_by"]}
        check(reasons.get("reset", 0) == 1, f"close reasons {reasons}, expected reset")


#: F5's network: 20 ± 5 ms each way, and the client's bytes cut into 1-byte slices.
SLOW_NETWORK = (
    {"name": "f5-latency-up", "type": "latency", "stream": "upstream", "latency": 20, "jitter": 5},
    {"name": "f5-latency-down", "type": "latency", "stream": "downstream", "latency": 20, "jitter": 5},
    {"name": "f5-slicer", "type": "slicer", "stream": "upstream", "average_size": 1, "size_variation": 0},
)
#: What F5's network adds to a timed close seen by the client: the worst latency each way.
SLOW_NETWORK_DELAY = 0.05
#: The rows F5 runs through it: happy paths, half-close, timeouts. Left out: H2 (a 1 MiB frame
#: in 1-byte slices takes longer than the read_timeout a server is right to apply to it) and T5
#: (the proxy's own buffer would be part of the backpressure it measures).
F5_ROWS = ("H1", "H3", "H4", "H5", "C1", "C3", "T1", "T2", "T3", "T4")


@scenario(
    "F5",
    "fault",
    "happy, half-close and timeout rows through latency 20 ± 5 ms and a 1-byte slicer",
    budget=120,
    waits=("idle_timeout", "read_timeout"),
)
def f5(ctx: Context) -> None:
    failed, skipped = [], []
    for sid in F5_ROWS:
        sc = SCENARIOS[sid]
        if unclaimed := [f for f in sorted(sc.needs) if not ctx.options.claims(f)]:
            skipped.append(f"{sid} ({ctx.options.unclaimed(unclaimed[0])})")
            continue
        ctx.check_cancelled()
        row = Context(
            target=ctx.target,
            options=ctx.options,
            via=SLOW_NETWORK,
            delay=SLOW_NETWORK_DELAY,
            cancelled=ctx.cancelled,
        )
        status, detail, leaks = run_in_guard(sc, row)
        if leaks:
            status, detail = FAIL, f"{detail}; leak: {', '.join(leaks)}".lstrip("; ")
        if status == FAIL:
            failed.append(f"{sid}: {detail}")
        for warning in row.warnings:
            ctx.should(False, f"{sid}: {warning}")
    check(not failed, "through the slow network: " + "; ".join(failed))
    ran = len(F5_ROWS) - len(skipped)
    ctx.note(f"{ran} rows passed through it (timed windows widened by {SLOW_NETWORK_DELAY * 1000:.0f} ms)")
    if skipped:
        ctx.note("n/a: " + ", ".join(skipped))

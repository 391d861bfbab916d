"""Timeouts: idle, a partial header, a partial body, a slowloris, a reader that never reads."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from connlab.client import HEADER, encode
from connlab.matrix.checks import (
    expect_reason,
    frame_limit,
    server_rss,
    settled,
    timed_eof,
    timeout_of,
    truncated_once,
    within_timeout_window,
)
from connlab.matrix.core import IN_PROCESS, Context, Handle, Skip, check, scenario


def timed_partial_frame(ctx: Context, server: Handle, sent: bytes) -> None:
    """Sends `sent` (a partial frame), then waits: a read_timeout close in the window, truncated +1."""
    limit = timeout_of(ctx, server, "read_timeout")
    before = ctx.stats(server, "truncated_frames +1")
    client = ctx.connect(server)
    peer = client.getsockname()
    started = time.monotonic()  # before the send: the server's clock cannot start earlier
    client.sendall(sent)
    elapsed = timed_eof(ctx, client, started, "read_timeout", limit)
    client.close()
    if elapsed is None:
        return
    within_timeout_window(ctx, elapsed, "read_timeout", limit, "read_timeout")
    truncated_once(ctx, server, peer, before, "read_timeout")


@scenario(
    "T1", "timeout", "connect, send nothing", budget=10, needs=("idle_timeout",), waits=("idle_timeout",)
)
def t1(ctx: Context) -> None:
    server = ctx.server()
    limit = timeout_of(ctx, server, "idle_timeout")
    started = time.monotonic()  # before connect: the server's clock cannot start earlier
    client = ctx.connect(server)
    peer = client.getsockname()
    elapsed = timed_eof(ctx, client, started, "idle_timeout", limit)
    client.close()
    if elapsed is None:
        return
    within_timeout_window(ctx, elapsed, "idle_timeout", limit, "idle_timeout")
    settled(ctx, server)
    expect_reason(ctx, server, peer, "idle_timeout")


@scenario(
    "T2",
    "timeout",
    "3 of 4 header bytes, then silence",
    budget=10,
    needs=("read_timeout", "framing"),
    waits=("read_timeout",),
)
def t2(ctx: Context) -> None:
    timed_partial_frame(ctx, ctx.server(), b"\x00\x00\x00")


@scenario(
    "T3",
    "timeout",
    "header and half the body, then silence",
    budget=10,
    needs=("read_timeout", "framing"),
    waits=("read_timeout",),
)
def t3(ctx: Context) -> None:
    server = ctx.server()
    body = min(1000, frame_limit(server))
    if body < 2:
        raise Skip("needs max_frame >= 2 for a frame with half a body")
    timed_partial_frame(ctx, server, HEADER.pack(body) + b"t" * (body // 2))


@scenario(
    "T4",
    "timeout",
    "one byte every read_timeout/4 (slowloris)",
    budget=20,
    needs=("read_timeout", "framing"),
    waits=("read_timeout",),
)
def t4(ctx: Context) -> None:
    server = ctx.server()
    limit = timeout_of(ctx, server, "read_timeout")
    # Long enough that dribbling it takes far longer than the window: only the frame's deadline ends it.
    frame = encode(b"s" * min(64, frame_limit(server)))
    if len(frame) * limit / 4 < 2 * limit + 0.25 + limit:
        raise Skip("max_frame too small to dribble past the read_timeout window")
    before = ctx.stats(server, "truncated_frames +1")
    client = ctx.connect(server)
    peer = client.getsockname()
    started = time.monotonic()  # before the first byte: the frame's clock cannot start earlier
    closed_at = None
    for i in range(len(frame)):
        try:
            client.sendall(frame[i : i + 1])
        except (ConnectionResetError, BrokenPipeError):
            raise AssertionError(f"the server reset the connection after {i} bytes") from None
        next_send = started + (i + 1) * limit / 4
        while closed_at is None and (wait := next_send - time.monotonic()) > 0:
            readable, _, _ = select.select([client], [], [], wait)
            if readable:
                try:
                    chunk = client.recv(4096)
                except ConnectionResetError:
                    raise AssertionError("the server reset the connection instead of closing it") from None
                check(chunk == b"", f"unexpected answer to a partial frame: {chunk!r}")
                closed_at = time.monotonic()
        if closed_at is not None:
            break
        if time.monotonic() - started > 2 * limit + 0.25:
            break
    client.close()
    if closed_at is None:
        ctx.should(False, f"slowloris still connected after {time.monotonic() - started:.2f} s: the "
                   f"read deadline does not cover the whole frame (or {ctx.options.option('read_timeout')} "
                   f"{limit:g} is not the server's)")  # fmt: skip
        return
    within_timeout_window(
        ctx, closed_at - started, "read_timeout", limit, "read_timeout from the frame's first byte"
    )
    truncated_once(ctx, server, peer, before, "read_timeout")


@scenario(
    "T5", "timeout", "pipelines frames and never reads (slow reader)", budget=30, waits=("write_timeout",)
)
def t5(ctx: Context) -> None:
    server = ctx.server()
    limit = float(server.kwargs.get("write_timeout") or 0)
    max_frame = frame_limit(server)
    bound = max_frame + int(server.kwargs["max_pending_output"]) + (1 << 20)
    stream = memoryview(encode(bytes(min(64 << 10, max_frame))) * 16)  # whole frames: wrapping keeps framing
    # Well under the write timeout: a send blocked this long means the server stopped reading.
    stall = limit / 5 if limit else 0.5
    in_process = ctx.target.kind == IN_PROCESS
    # In this process, RSS is every thread's and the allocator's: memory freed by earlier rows
    # and kept for reuse (glibc raises its mmap threshold as large blocks are freed) can show as
    # growth here. An in-process server is judged by the bytes it holds by its own count.
    rss_before = None if in_process else server_rss(ctx, server)
    client = ctx.connect(server)
    peer = client.getsockname()
    client.setblocking(False)
    offset, sent, last_send = 0, 0, time.monotonic()
    cap = 16 * bound + (64 << 20)  # far past every buffer on the way: the sends never stalled
    while True:
        try:
            n = client.send(stream[offset:])
        except BlockingIOError:
            _, writable, _ = select.select([], [client], [], stall)
            if not writable:
                break  # stalled: backpressure
            continue
        except (ConnectionResetError, BrokenPipeError):
            raise AssertionError(f"reset after {sent} bytes, before the client's sends stalled") from None
        offset, sent, last_send = (offset + n) % len(stream), sent + n, time.monotonic()
        check(sent < cap, f"{sent} bytes sent and the sends never stalled: no backpressure")
    if in_process:
        [conn] = [c for c in server.connections() or [] if tuple(c["peer"])[:2] == tuple(peer)[:2]]
        held = conn["bytes_in"] - conn["bytes_out"]
        ctx.note(f"held by the server (its own count; in process): {held / 2**20:.1f} MiB")
        check(held < bound, f"the server holds {held / 2**20:.1f} MiB read and not yet written back "
              f"to the slow reader (bound max_frame + max_pending_output + 1 MiB = "
              f"{bound / 2**20:.1f} MiB)")  # fmt: skip
    elif rss_before is not None:
        rss = server_rss(ctx, server)
        assert rss is not None
        growth = rss - rss_before
        check(growth < bound, f"server RSS grew {growth / 2**20:.1f} MiB with the slow reader "
              f"(bound max_frame + max_pending_output + 1 MiB = {bound / 2**20:.1f} MiB)")  # fmt: skip
    if not limit:
        ctx.note(f"write_timeout close: n/a, {ctx.options.unclaimed('write_timeout')}")
        return
    # The write_timeout close is abortive: the client sees the RST as an error on its socket,
    # without reading. The server's clock started at its last accepted write, which came before
    # the client's last accepted send, so only the upper end of the window applies here.
    poller = select.poll()
    poller.register(client, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
    window = 2 * limit + 0.25 - (time.monotonic() - last_send)
    events = poller.poll(max(0.0, window) * 1000)
    elapsed = time.monotonic() - last_send
    if not events:
        ctx.should(False, f"slow reader still connected {elapsed:.2f} s after its last send "
                   f"({ctx.options.option('write_timeout')} {limit:g})")  # fmt: skip
        return
    err = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    check(err == errno.ECONNRESET, f"expected an abortive close (RST), socket error {os.strerror(err)!r}")
    client.close()
    settled(ctx, server)
    expect_reason(ctx, server, peer, "write_timeout")

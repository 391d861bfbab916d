"""Errors: a killed client, an oversized header, aborts (RST) in every state, random bytes."""

from __future__ import annotations

import random
import select
import socket
import subprocess
import sys
import time
from typing import Any

import psutil

from connlab.client import HEADER, abort, encode, read_to_eof
from connlab.matrix.checks import (
    MIB,
    accepted_socket,
    conn_of,
    expect_reason,
    frame_limit,
    journal,
    settled,
    small_rcvbuf_client,
    stats_delta,
    still_serves,
    truncated_once,
    wait_consumed,
    wait_fd_closed,
    within_timeout_window,
)
from connlab.matrix.core import Context, Handle, NotApplicable, Skip, check, scenario

# E1's client: connects, sends a header and half of the body it announces, says so, and waits to
# be killed. Plain sockets, so the child starts fast and owns nothing but its one connection.
_HALF_FRAME_CLIENT = """
import socket, sys, time
host, port, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.create_connection((host, port), timeout=5)
sock.sendall(body.to_bytes(4, "big") + b"k" * (body // 2))
print("sent", *sock.getsockname()[:2], flush=True)
time.sleep(60)
"""


@scenario("E1", "error", "client process killed (SIGKILL) in the middle of a frame", budget=15)
def e1(ctx: Context) -> None:
    server = ctx.server()
    body = min(1000, frame_limit(server))
    before = ctx.stats(server, "truncated_frames +1")
    host, port = server.address
    argv = [sys.executable, "-c", _HALF_FRAME_CLIENT, host, str(port), str(body)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stderr is not None
            words = child.stdout.readline().split()
            if not words or words[0] != "sent":
                child.kill()
                raise AssertionError(f"client process did not send: {child.stderr.read().strip()}")
            peer = (words[1], int(words[2]))
            # The kill must land while the server holds the partial frame, not before it read it.
            wait_consumed(server, peer, HEADER.size + body // 2, "ReadingBody")
        finally:
            child.kill()
            child.wait()
    if truncated_once(ctx, server, peer, before, "eof") is not None:
        check(server.connections() == [], f"registry not empty: {server.connections()}")


@scenario(
    "E2",
    "error",
    "two good frames, then a header announcing max_frame + 1, then more bytes",
    budget=10,
    needs=("framing", "max_frame"),
)
def e2(ctx: Context) -> None:
    server = ctx.server()
    max_frame = frame_limit(server)
    before = ctx.stats(server, "body neither buffered nor echoed (frames, bytes_out, truncated_frames)")
    client = ctx.connect(server)
    peer = client.getsockname()
    client.sendall(encode(b"one") + encode(b"two") + HEADER.pack(max_frame + 1) + b"x" * 4000)
    try:
        got = read_to_eof(client)  # raises on an RST
    except ConnectionResetError:
        raise AssertionError("the server reset the connection instead of closing it") from None
    check(got == encode(b"one") + encode(b"two"), f"expected both answers then EOF, got {got[:64]!r}")
    client.close()
    after = settled(ctx, server)
    expect_reason(ctx, server, peer, "protocol_error")
    if before is not None and after is not None:
        wanted = {"frames_in": 2, "frames_out": 2, "bytes_out": 2 * (4 + 3), "truncated_frames": 0}
        for key, want in wanted.items():
            delta = stats_delta(before, after, key)
            check(delta == want, f"{key} +{delta}, expected +{want}")
    still_serves(ctx, server, "after a protocol error")


@scenario("E3", "error", "client sends a 1 MiB frame then aborts (SO_LINGER 0) before reading", budget=15)
def e3(ctx: Context) -> None:
    server = ctx.server()
    size = min(MIB, frame_limit(server))
    if size < MIB:
        ctx.note(f"frame of {size} B (max_frame) instead of 1 MiB")
    before = ctx.stats(server, "frames_in + truncated_frames +1")
    client = ctx.connect(server, timeout=10)
    peer = client.getsockname()
    inode = accepted_socket(server, client)
    client.sendall(encode(bytes(size)))
    abort(client)
    expect_reason(ctx, server, peer, "reset")
    if server.pid is None:
        ctx.note("process alive: checked only as 'a new connection is served' (no pid)")
    else:
        check(psutil.pid_exists(server.pid), f"server process {server.pid} died")
    wait_fd_closed(server, inode)
    after = settled(ctx, server)
    if before is not None and after is not None:
        delta = stats_delta(before, after, "frames_in") + stats_delta(before, after, "truncated_frames")
        check(delta == 1, f"frames_in + truncated_frames +{delta}, expected +1")
    still_serves(ctx, server, "after an abort mid-frame")


def pump_until_writing(ctx: Context, handle: Handle, sock: socket.socket, peer: tuple[Any, ...]) -> None:
    """Pipelines frames without reading until the server holds answers it cannot write, so it stays
    Writing until the RST. With `connections()`: until it shows Writing with a deep answer queue
    (bytes read but not yet written): every frame's answer is Writing for a moment, but a queue
    this deep means the socket refuses the server's writes (the client's 4 KiB window is shut); or
    until it shows Writing while the client's sends have been refused for a while: a server that
    stops reading while it cannot write (a thread blocked in send) never holds a deep queue.
    Without it: until the client's sends stall, since the server only stops reading once its
    queued output is over max_pending_output (or while it is blocked writing)."""
    frame = encode(bytes(min(64 << 10, frame_limit(handle))))
    stream = memoryview(frame * 16)  # whole frames, so wrapping around keeps the framing
    deep = min(1 << 20, int(handle.kwargs["max_pending_output"]) // 2)
    stall = float(handle.kwargs["write_timeout"] or 0.5) / 4
    has_view = handle.connections() is not None
    if not has_view:
        ctx.note("E4 Writing: inferred from the client's stalled sends (no connections() on this target)")
    sock.setblocking(False)
    offset, deadline, stalled_since = 0, time.monotonic() + 2.0, None
    try:
        while True:
            conn = conn_of(handle, peer) if has_view else None
            if conn and conn["state"] == "Writing":
                if conn["bytes_in"] - conn["bytes_out"] >= deep:
                    return
                if stalled_since is not None and time.monotonic() - stalled_since >= stall:
                    return
            check(
                time.monotonic() < deadline,
                f"client {peer[:2]}: in 2 s the server never showed its connection Writing with a "
                f"{deep} B queue or with the client's sends refused; last seen: "
                + (str(conn) if conn else "not among its connections()"),
            )
            try:
                offset = (offset + sock.send(stream[offset:])) % len(stream)
                stalled_since = None
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], 0.005 if has_view else stall)
                if not writable and not has_view:
                    return
                if not writable and stalled_since is None:
                    stalled_since = time.monotonic()
    finally:
        sock.settimeout(5.0)


@scenario("E4", "error", "abortive close (RST) in Connecting, ReadingHeader, ReadingBody, Writing", budget=30)
def e4(ctx: Context) -> None:
    server = ctx.server()
    body = min(1000, frame_limit(server))
    if body < 2:
        raise Skip("needs max_frame >= 2 to hold a frame in ReadingBody")
    has_view = server.connections() is not None
    for state in ("Connecting", "ReadingHeader", "ReadingBody", "Writing"):
        client = small_rcvbuf_client(ctx, server)
        peer = client.getsockname()
        inode = accepted_socket(server, client)
        if state == "Connecting":
            wait_consumed(server, peer, 0, "Connecting")
        elif state == "ReadingHeader":
            client.sendall(b"\x00\x00")
            wait_consumed(server, peer, 2, "ReadingHeader")
        elif state == "ReadingBody":
            client.sendall(HEADER.pack(body) + b"b" * (body // 2))
            wait_consumed(server, peer, HEADER.size + body // 2, "ReadingBody")
        else:
            pump_until_writing(ctx, server, client, peer)
        abort(client)
        expect_reason(ctx, server, peer, "reset")
        steps = journal(ctx, server, peer)
        if steps is not None:
            last = steps[-1]
            check(last[:2] == (state, "Closing"), f"RST in {state}: closed from {last}, journal {steps}")
        wait_fd_closed(server, inode)
        settled(ctx, server)
    if not has_view:
        ctx.note("E4 states: reached by the client's actions, not observed (no connections() on this target)")


def reference_parse(stream: bytes, max_frame: int) -> tuple[list[bytes], str]:
    """What DESIGN §2-§3 says a server answers to `stream` followed by silence: the answer frames
    (the echo of every complete frame, in order), then the close reason. A header over max_frame
    is a protocol_error; a partial frame (header or body) runs into read_timeout; a stream that
    ends on a frame boundary leaves the connection idle, so idle_timeout."""
    answers: list[bytes] = []
    at = 0
    while True:
        rest = len(stream) - at
        if rest == 0:
            return answers, "idle_timeout"
        if rest < HEADER.size:
            return answers, "read_timeout"
        (length,) = HEADER.unpack_from(stream, at)
        if length > max_frame:
            return answers, "protocol_error"
        if rest - HEADER.size < length:
            return answers, "read_timeout"
        answers.append(stream[at : at + HEADER.size + length])
        at += HEADER.size + length


# With max_frame = 1 MiB: 0-2 start with an oversized header, 769 with a partial body, 57187 with
# one whole frame and then an oversized header. The reference parse decides for any max_frame.
E5_SEEDS = (0, 1, 2, 769, 57187)


def read_all_to_eof(socks: list[socket.socket], limit: float) -> list[tuple[bytes, float | str]]:
    """Reads every socket until EOF at once; per socket its bytes and the instant of its EOF (or
    "reset" / "hang" if it was reset or not closed within `limit` s)."""
    data = [bytearray() for _ in socks]
    ends: list[float | str | None] = [None] * len(socks)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        waiting = [s for s, e in zip(socks, ends, strict=True) if e is None]
        if not waiting:
            break
        readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        for sock in readable:
            i = socks.index(sock)
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                ends[i] = "reset"
                continue
            if chunk:
                data[i] += chunk
            else:
                ends[i] = time.monotonic()
    return [(bytes(d), "hang" if e is None else e) for d, e in zip(data, ends, strict=True)]


@scenario(
    "E5",
    "error",
    "64 KiB of random bytes, several seeds, then the client waits",
    budget=20,
    needs=("framing", "max_frame"),
    waits=("idle_timeout", "read_timeout"),
)
def e5(ctx: Context) -> None:
    server = ctx.server()
    max_frame = frame_limit(server)
    timeouts = {r: float(server.kwargs.get(r) or 0) for r in ("idle_timeout", "read_timeout")}
    streams = [random.Random(seed).randbytes(64 << 10) for seed in E5_SEEDS]
    expected = [reference_parse(s, max_frame) for s in streams]
    for (_, reason), seed in zip(expected, E5_SEEDS, strict=True):
        if reason in timeouts and not timeouts[reason]:
            raise NotApplicable(f"seed {seed} ends in {reason}: {ctx.options.unclaimed(reason)}")
    before = ctx.stats(server, "frames_in, truncated_frames against the reference parse")
    clients = [ctx.connect(server) for _ in streams]
    starts = []
    for client, stream in zip(clients, streams, strict=True):
        starts.append(time.monotonic())  # before the send: no server clock can start earlier
        client.sendall(stream)
    limit = 2 * max(timeouts.values()) + 0.25 + 0.5
    outcomes = read_all_to_eof(clients, limit)
    cases = zip(E5_SEEDS, clients, starts, expected, outcomes, strict=True)
    for seed, client, start, (answers, reason), (got, end) in cases:
        check(end != "reset", f"seed {seed}: reset instead of a graceful close ({reason})")
        want = b"".join(answers)
        check(got == want, f"seed {seed}: {len(got)} answer bytes, the reference parse gives {len(want)}")
        if end == "hang":
            # A protocol error must close at once; a claimed timeout that is late is a SHOULD.
            check(reason in timeouts, f"seed {seed}: not closed within {limit:.2f} s (expected {reason})")
            ctx.should(False, f"seed {seed}: not closed within {limit:.2f} s (expected {reason})")
            client.close()
            continue
        if reason in timeouts:
            assert isinstance(end, float)
            within_timeout_window(ctx, end - start, reason, timeouts[reason], f"seed {seed} {reason}")
        peer = client.getsockname()
        client.close()
        expect_reason(ctx, server, peer, reason)
    after = settled(ctx, server)
    if before is not None and after is not None:
        frames = sum(len(answers) for answers, _ in expected)
        truncated = sum(reason == "read_timeout" for _, reason in expected)  # a partial frame each
        for key, value in (("frames_in", frames), ("truncated_frames", truncated)):
            delta = stats_delta(before, after, key)
            check(delta == value, f"{key} +{delta}, the reference parse gives +{value}")

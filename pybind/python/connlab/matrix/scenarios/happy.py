"""Happy paths: echo, the biggest frame in pieces, round trips, pipelining, the empty frame."""

from __future__ import annotations

import itertools

from connlab.client import encode, read_frame, recv_exact, wait_until
from connlab.matrix.checks import expect_reason, frame_limit, journal, settled
from connlab.matrix.core import Context, check, scenario


@scenario("H1", "happy", 'connect, send "hello", read echo, close', budget=10)
def h1(ctx: Context) -> None:
    server = ctx.server()
    client = ctx.connect(server)
    peer = client.getsockname()
    client.sendall(encode(b"hello"))
    check(read_frame(client) == b"hello", "echo differs")
    client.close()
    settled(ctx, server)
    steps = journal(ctx, server, peer)
    if steps is not None:
        want = [
            (None, "Connecting", None),
            ("Connecting", "ReadingHeader", None),
            ("ReadingHeader", "ReadingBody", None),
            ("ReadingBody", "Writing", None),
            ("Writing", "ReadingHeader", None),
            ("ReadingHeader", "Closing", "eof"),
        ]
        check(steps == want, f"transitions {steps}, expected {want}")
        check(server.connections() == [], "registry not empty")


@scenario("H2", "happy", "one frame of exactly max_frame bytes in uneven chunks with pauses", budget=30)
def h2(ctx: Context) -> None:
    server = ctx.server()
    max_frame = frame_limit(server)
    payload = bytes(itertools.islice(itertools.cycle(range(251)), max_frame))
    frame = encode(payload)
    cuts = sorted({0, 1, 3, 7, max_frame // 7, max_frame // 3, (2 * max_frame) // 3, len(frame)})
    client = ctx.connect(server, timeout=30)
    seen: set[int] = set()
    for start, end in itertools.pairwise(cuts):
        client.sendall(frame[start:end])
        if end == len(frame) or server.connections() is None:
            continue
        # The pause: until the server has read everything sent so far.
        conn = wait_until(
            lambda end=end: [c for c in server.connections() or [] if c["bytes_in"] == end],
            what=f"server read {end} bytes",
        )[0]
        if conn["state"] == "ReadingBody":
            seen.add(conn["bytes_in"])
    check(read_frame(client) == payload, "echo not byte-identical")
    if server.connections() is None:
        ctx.note("ReadingBody during pauses: not checked (no connections() on this target)")
    else:
        check(len(seen) >= 2, f"ReadingBody seen at {sorted(seen)} bytes_in, expected >= 2 values")


@scenario("H3", "happy", "100 sequential round trips on one connection", budget=10)
def h3(ctx: Context) -> None:
    server = ctx.server()
    client = ctx.connect(server)
    for i in range(100):
        payload = f"round trip {i}".encode()
        client.sendall(encode(payload))
        check(read_frame(client) == payload, f"round trip {i} echoed wrong")


@scenario("H4", "happy", "1000 frames of 64 B pipelined before any read, then read all", budget=15)
def h4(ctx: Context) -> None:
    server = ctx.server()
    client = ctx.connect(server)
    payloads = [i.to_bytes(4, "big") * 16 for i in range(1000)]
    client.sendall(b"".join(encode(p) for p in payloads))
    got = [read_frame(client) for _ in payloads]
    check(got == payloads, "answers lost or out of order")


@scenario("H5", "happy", "empty frame (N = 0)", budget=10)
def h5(ctx: Context) -> None:
    server = ctx.server()
    client = ctx.connect(server)
    peer = client.getsockname()
    client.sendall(b"\x00\x00\x00\x00")
    check(recv_exact(client, 4) == b"\x00\x00\x00\x00", "four zero bytes expected")
    client.close()
    settled(ctx, server)
    steps = journal(ctx, server, peer)
    if steps is not None:
        check(("ReadingHeader", "Writing", None) in steps, f"no ReadingHeader->Writing in {steps}")
    expect_reason(ctx, server, peer, "eof")

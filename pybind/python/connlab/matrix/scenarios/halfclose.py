"""Half-close: the client's shutdown(SHUT_WR) with answers owed or a partial frame, and the
server's own half-close when it stops with a request in flight."""

from __future__ import annotations

import socket
import threading
from typing import Any

from connlab.client import HEADER, encode, read_frame, read_to_eof
from connlab.matrix.checks import (
    accepted_socket,
    expect_reason,
    frame_limit,
    listener_inodes,
    settled,
    truncated_once,
    wait_consumed,
    wait_listener_closed,
)
from connlab.matrix.core import COMMAND, IN_PROCESS, Context, Failed, Skip, check, scenario


def read_eof(sock: socket.socket, what: str) -> bytes:
    """Everything until EOF; an RST fails `what`."""
    try:
        return read_to_eof(sock)
    except ConnectionResetError:
        raise AssertionError(f"{what}: the server reset the connection instead of closing it") from None


@scenario("C1", "half-close", "send 10 frames, shutdown(SHUT_WR), then read", budget=10)
def c1(ctx: Context) -> None:
    server = ctx.server()
    client = ctx.connect(server)
    peer = client.getsockname()
    payloads = [f"frame {i}".encode() for i in range(10)]
    client.sendall(b"".join(encode(p) for p in payloads))
    client.shutdown(socket.SHUT_WR)
    got = read_eof(client, "after the half-close")
    check(got == b"".join(encode(p) for p in payloads), f"expected the 10 echoes then EOF, got {got[:80]!r}")
    client.close()
    settled(ctx, server)
    expect_reason(ctx, server, peer, "eof")


@scenario(
    "C2",
    "half-close",
    "server half-close: request in flight when stop(grace) begins",
    budget=20,
    kinds=frozenset({IN_PROCESS, COMMAND}),
)
def c2(ctx: Context) -> None:
    server = ctx.server()
    if not server.stoppable:
        raise Skip("needs a server the matrix can stop")
    grace = 1.0
    port = server.address[1]
    # Found now: the frame below has only read_timeout to complete.
    listener = listener_inodes(port)
    client = ctx.connect(server)
    peer = client.getsockname()
    # Accepted before the stop: one still in the accept queue would be reset by the kernel.
    accepted_socket(server, client)
    payload = bytes(range(256)) * 64
    frame = encode(payload)
    half = HEADER.size + len(payload) // 2
    client.sendall(frame[:half])
    # In flight: the server holds a partial frame (or it waits in the kernel's queue, FIONREAD > 0),
    # so stop's step 2 must not treat the connection as idle.
    wait_consumed(server, peer, half, "ReadingBody")
    report: dict[str, Any] = {}
    stopper = threading.Thread(target=lambda: report.update(server.stop(grace)), name="c2-stop")
    stopper.start()
    late_error: OSError | None = None
    try:
        wait_listener_closed(port, listener)  # stop has begun
        client.sendall(frame[half:])
        answer = read_frame(client)
        check(answer == payload, "the answer in flight was not delivered whole")
        try:
            after_answer = client.recv(1)
        except TimeoutError:
            raise Failed(
                "no EOF within 5 s after the answer: the connection outlived the stop "
                "(still served by a process the server left behind?)"
            ) from None
        check(after_answer == b"", f"expected EOF after the answer, got {after_answer!r}")
        # The server only half-closed: it still reads (and discards) until our EOF, then closes.
        try:
            client.sendall(b"late bytes after the server's EOF")
            client.shutdown(socket.SHUT_WR)
            client.settimeout(grace + 5)
            client.recv(1)  # returns b"" at once (EOF seen); raises if the server reset
        except OSError as error:
            late_error = error
    except (ConnectionResetError, BrokenPipeError) as error:
        raise AssertionError(f"the server reset the connection it was draining: {error}") from None
    except EOFError as eof:
        raise AssertionError(f"answer cut short by the stop: {eof}") from None
    finally:
        stopper.join(timeout=grace + 15)
    check(not stopper.is_alive(), "stop() did not return")
    if late_error is None:
        try:
            client.recv(1)  # the server has closed by now: an RST it sent would show here
        except OSError as error:
            late_error = error
    check(late_error is None, f"sending after the server's EOF failed ({late_error}): the server did not "
          f"keep reading until the client's EOF; stop report {report}")  # fmt: skip
    if "drained" in report:
        drained, forced = report.get("drained"), report.get("forced")
        check(drained == 1 and forced == 0, f"stop report {report}, expected drained 1, forced 0")
    else:
        ctx.note(f"drained/forced: not checked (stop report {report})")
    stats = ctx.stats(server, "closed_by.shutdown")
    if stats is not None:
        check(stats["closed_by"]["shutdown"] == 1, f"closed_by {stats['closed_by']}, expected shutdown 1")
    expect_reason(ctx, server, peer, "shutdown")


@scenario("C3", "half-close", "half of a frame, then shutdown(SHUT_WR)", budget=10, needs=("framing",))
def c3(ctx: Context) -> None:
    server = ctx.server()
    body = min(1000, frame_limit(server))
    before = ctx.stats(server, "truncated_frames +1")
    client = ctx.connect(server)
    peer = client.getsockname()
    client.sendall(HEADER.pack(body) + b"h" * (body // 2))
    client.shutdown(socket.SHUT_WR)
    got = read_eof(client, "after a half frame and the half-close")
    check(got == b"", f"the partial frame was answered: {got[:80]!r}")
    client.close()
    truncated_once(ctx, server, peer, before, "eof")

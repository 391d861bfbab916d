"""Checks scenarios share: the journal of one client's connection, its close reason, timed closes."""

from __future__ import annotations

import socket
import time
from typing import Any

from connlab.client import wait_until
from connlab.matrix.core import Context, Handle, check


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


def timed_eof(sock: socket.socket, started: float, limit: float) -> float:
    """Reads until EOF (an RST fails the check); returns seconds since `started`."""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            pass
        del chunk
    except ConnectionResetError:
        raise AssertionError("the server reset the connection instead of closing it") from None
    except TimeoutError:
        raise AssertionError(f"not closed within {limit:.2f} s") from None
    return time.monotonic() - started


def within_timeout_window(ctx: Context, elapsed: float, timeout: float, what: str) -> None:
    """MATRIX.md: a timed close happens at t in [T, 2T + 0.25 s]."""
    check(
        timeout <= elapsed <= 2 * timeout + 0.25,
        f"{what}: closed after {elapsed:.3f} s, expected within [{timeout}, {2 * timeout + 0.25:.2f}] s",
    )


def quiescent(ctx: Context, handle: Handle, n: int = 0) -> dict[str, Any] | None:
    """Waits until the server holds `n` connections; returns its stats then (None if none)."""
    return ctx.wait_active(handle, n)

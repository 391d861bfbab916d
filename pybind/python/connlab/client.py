"""Client-side helpers for the framed-echo protocol: frames, exact reads, polling with a deadline."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

HEADER = struct.Struct(">I")


def encode(payload: bytes) -> bytes:
    """One whole frame: a 4-byte big-endian length, then the payload."""
    return HEADER.pack(len(payload)) + payload


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A connected TCP socket with `timeout` on every call (so a test never hangs)."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes; raises EOFError if the peer closes first."""
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"peer closed after {n - left} of {n} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> bytes:
    """The payload of the next frame."""
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    return recv_exact(sock, length)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer's FIN; an RST raises ConnectionResetError."""
    chunks: list[bytes] = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def abort(sock: socket.socket) -> None:
    """Closes with an RST (SO_LINGER on, 0 s)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_until(
    probe: Callable[[], T], timeout: float = 2.0, interval: float = 0.005, what: str = "condition"
) -> T:
    """Polls `probe` until it returns a truthy value, or raises TimeoutError naming `what`
    and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)

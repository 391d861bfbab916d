"""Client-side helpers for the framed-echo protocol: frames, exact reads, polling with a deadline,
churn (thousands of short connections on plain blocking sockets, one thread: a loopback connect
completes in the kernel, without waiting for the server's accept) and `Fleet` (many simultaneous
clients on one selector)."""

from __future__ import annotations

import heapq
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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


#: How a churned connection ends. ECHO: one frame, read its echo, close (FIN). CLOSE: connect,
#: close, no data. RESET: one frame, then an abortive close (RST) without reading. PARTIAL: half
#: a frame, then an abortive close (a truncated frame).
ECHO, CLOSE, RESET, PARTIAL = "echo", "close", "reset", "partial"

#: A bound on the client's own operations (a connect, a read), so a broken server fails the
#: scenario instead of hanging it; the MATRIX's postconditions keep their own 2 s.
IO_TIMEOUT = 5.0


class ChurnError(AssertionError):
    """A churned connection failed or got a wrong echo; the message says which cycle and step."""


def open_client(
    address: tuple[str, int], timeout: float = IO_TIMEOUT, rcvbuf: int | None = None
) -> socket.socket:
    """A connected client socket, without `create_connection`'s name lookup (churn opens 10 000);
    `rcvbuf` sets SO_RCVBUF before the connect, where it bounds the window."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def churn(
    address: tuple[str, int],
    cycles: int,
    width: int,
    modes: Sequence[str] = (ECHO,),
    pace: Callable[[int], None] | None = None,
) -> Counter[str]:
    """`cycles` cycles of `width` connections open at once; connection j of cycle c ends as
    `modes[(c * width + j) % len(modes)]` says. Every echo is checked byte for byte. `pace`, if
    given, is called before each connect with the number of connections opened so far, and may wait
    (see `connlab.matrix.checks.accept_pacer`). Returns how many connections ended each way."""
    done: Counter[str] = Counter()
    for cycle in range(cycles):
        batch: list[tuple[socket.socket, str, bytes]] = []
        step = "connect"
        try:
            for j in range(width):
                if pace is not None:
                    pace(cycle * width + j)
                mode = modes[(cycle * width + j) % len(modes)]
                frame = encode(struct.pack(">II", cycle, j))
                batch.append((open_client(address), mode, frame))
            step = "send"
            for sock, mode, frame in batch:
                if mode in (ECHO, RESET):
                    sock.sendall(frame)
                elif mode == PARTIAL:
                    sock.sendall(frame[: len(frame) - 3])
            step = "echo"
            for sock, mode, frame in batch:
                if mode == ECHO:
                    echo = recv_exact(sock, len(frame))
                    if echo != frame:
                        raise ChurnError(f"cycle {cycle}: echo {echo!r}, sent {frame!r}")
                if mode in (RESET, PARTIAL):
                    abort(sock)
                else:
                    sock.close()
                done[mode] += 1
        except (OSError, EOFError) as err:
            raise ChurnError(f"churn cycle {cycle}, {step}: {type(err).__name__}: {err}") from None
        finally:
            for sock, _, _ in batch:
                sock.close()
    return done


class Fleet:
    """Many clients on one selector. Client i's frame is always the same (its index), so every
    echo can be checked; `send` sends one, `pump` reads what has arrived (and sends what is
    due: `every` makes clients send a frame periodically)."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        #: The client sockets, non-blocking from now on.
        self.socks = list(socks)
        #: Client i's frame.
        self.frames = [encode(struct.pack(">I", i)) for i in range(len(self.socks))]
        #: Echoes client i still waits for.
        self.owed = [0] * len(self.socks)
        #: Echoes client i has received.
        self.echoes = [0] * len(self.socks)
        #: Bytes of an echo received so far.
        self.partial = [b""] * len(self.socks)
        #: False once client i saw EOF or an error (or was closed).
        self.open = [True] * len(self.socks)
        #: What went wrong, per client.
        self.problems: dict[int, str] = {}
        #: Periodic senders: (next send time, client), a heap; see `every`.
        self.schedule: list[tuple[float, int]] = []
        #: Clients that send periodically, and their period.
        self.periodic: set[int] = set()
        self.period = 0.0
        self.sel = selectors.DefaultSelector()
        for i, sock in enumerate(self.socks):
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, i)

    @property
    def connected(self) -> int:
        return sum(self.open)

    def send(self, i: int) -> None:
        try:
            self.socks[i].send(self.frames[i])  # 8 bytes: fits any send buffer that is not full
            self.owed[i] += 1
        except OSError as err:
            self._lost(i, f"send: {type(err).__name__}: {err}")

    def every(self, period: float, clients: Iterable[int]) -> None:
        """Clients send a frame every `period` s, the first ones staggered over one period."""
        clients = list(clients)
        self.period = period
        self.periodic = set(clients)
        now = time.monotonic()
        self.schedule = [(now + period * k / max(1, len(clients)), i) for k, i in enumerate(clients)]
        heapq.heapify(self.schedule)

    def _lost(self, i: int, why: str) -> None:
        if self.open[i]:
            self.open[i] = False
            self.problems.setdefault(i, why)
            self.sel.unregister(self.socks[i])
        self.periodic.discard(i)

    def close(self, clients: Iterable[int]) -> None:
        for i in clients:
            if self.open[i]:
                self.open[i] = False
                self.sel.unregister(self.socks[i])
            self.periodic.discard(i)
            self.socks[i].close()

    def pump(self, timeout: float) -> None:
        """Sends what is due and reads what arrives, for up to `timeout` s (one select)."""
        now = time.monotonic()
        while self.schedule and self.schedule[0][0] <= now:
            due, i = heapq.heappop(self.schedule)
            if i in self.periodic:
                self.send(i)
                # A late send does not bunch up the next ones: the period counts from now then.
                nxt = due + self.period
                heapq.heappush(self.schedule, (nxt if nxt > now else now + self.period, i))
        if self.schedule:
            timeout = max(0.0, min(timeout, self.schedule[0][0] - now))
        for key, _ in self.sel.select(timeout):
            i = key.data
            try:
                data = self.socks[i].recv(65536)
            except BlockingIOError:
                continue
            except OSError as err:
                self._lost(i, f"{type(err).__name__}: {err}")
                continue
            if not data:
                self._lost(i, "EOF from the server")
                continue
            data = self.partial[i] + data
            frame = self.frames[i]
            while len(data) >= len(frame):
                echo, data = data[: len(frame)], data[len(frame) :]
                if echo != frame or self.owed[i] == 0:
                    self.problems.setdefault(i, f"unexpected bytes {echo!r}")
                else:
                    self.owed[i] -= 1
                    self.echoes[i] += 1
            self.partial[i] = data

    def pump_until(self, done: Callable[[], object], timeout: float) -> bool:
        """Pumps until `done()` holds (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.05))
        return True

    def close_all(self) -> None:
        """Closes every client and the selector (again: nothing)."""
        self.close(range(len(self.socks)))
        self.sel.close()

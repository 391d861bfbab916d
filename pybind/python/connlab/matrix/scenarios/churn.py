"""Churn: ten thousand short connections closed every way, and a thousand one-shot clients at once.

The client side has to keep up with the server, so churn runs on plain blocking sockets in one
thread (a loopback connect completes in the kernel, without waiting for the server's accept) and
many simultaneous clients run on one selector (`Fleet`). The helpers here are shared by the
leak, phantom and shutdown scenarios.
"""

from __future__ import annotations

import heapq
import os
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any

from connlab import probe
from connlab.client import abort, encode, read_frame, recv_exact, wait_until
from connlab.matrix.checks import stats_delta
from connlab.matrix.core import ChildHandle, Context, Failed, Handle, LeakGuard, Skip, check, scenario
from connlab.probe import accept_queue, diag_sockets, socket_inodes

#: MATRIX.md's churn: 1000 cycles of 10 simultaneous connections.
CYCLES = 1000
WIDTH = 10

#: How a churned connection ends. ECHO: one frame, read its echo, close (FIN). CLOSE: connect,
#: close, no data. RESET: one frame, then an abortive close (RST) without reading. PARTIAL: half
#: a frame, then an abortive close (a truncated frame).
ECHO, CLOSE, RESET, PARTIAL = "echo", "close", "reset", "partial"

#: `accept_pacer`: how far churn may run ahead of the server's accepts, checked every PACE_EVERY
#: cycles; together well below the listen backlog (1024 by default).
PACE_LAG = 256
PACE_EVERY = 25

#: A bound on the client's own operations (a connect, a read), so a broken server fails the
#: scenario instead of hanging it; the MATRIX's postconditions keep their own 2 s.
IO_TIMEOUT = 5.0


# The kernel's sockets on a port through sock_diag (netlink), as `ss` reads them. /proc/net/tcp is
# no snapshot: it is read a page at a time and the walk resumes by position, so while other
# sockets come and go (TIME_WAIT ones from earlier churn expire by the thousand) a reading
# counts some sockets twice or misses some; 1000 steady connections read as 1000 to 1237. A
# netlink dump filtered by port in the kernel resumes only where a message fills, within one
# hash bucket, and takes 10 ms instead of 200.
def _proc_sockets(port: int) -> list[tuple[str, int]]:
    """(state name, inode) of the non-LISTEN sockets on local `port` from /proc/net/tcp, which
    is no snapshot (see `diag_sockets`): only where sock_diag is missing."""
    found: list[tuple[str, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(FileNotFoundError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                state = int(cols[3], 16)
                if int(cols[1].rpartition(":")[2], 16) == port and state != 0x0A:
                    found.append((probe.TCP_STATES.get(state, str(state)), int(cols[9])))
    return found


def kernel_view(ctx: Context) -> Callable[[int], list[tuple[str, int]]]:
    """(state name, inode) of the non-LISTEN sockets on a local port: from `diag_sockets`, or
    from the /proc tables (noted) where sock_diag cannot be used."""
    try:
        diag_sockets(0)
    except OSError as err:
        ctx.note(f"kernel counts from /proc/net/tcp, which is no snapshot (sock_diag: {err})")
        return _proc_sockets
    return lambda port: [(state, inode) for state, inode, _ in diag_sockets(port)]


def held(handle: Handle, view: Callable[[int], list[tuple[str, int]]]) -> int:
    """Connections the server holds: its `active`; without stats, the sockets on its port that
    its process owns; without a pid either, those established or waiting for its close."""
    stats = handle.stats()
    if stats is not None:
        return int(stats["active"])
    port, pid = handle.address[1], handle.pid
    sockets = view(port)
    if pid is not None:
        mine = socket_inodes(pid)
        return sum(1 for _, inode in sockets if inode in mine)
    return sum(1 for state, _ in sockets if state in ("ESTABLISHED", "CLOSE_WAIT"))


def wait_held(ctx: Context, handle: Handle, n: int, timeout: float = 2.0) -> None:
    """Polls until the server holds `n` connections (`held`)."""
    view = kernel_view(ctx)
    seen = [-1]

    def there() -> bool:
        seen[0] = held(handle, view)
        return seen[0] == n

    try:
        wait_until(there, timeout)
    except TimeoutError:
        raise Failed(f"the server holds {seen[0]} connections after {timeout} s, expected {n}") from None


def need_fds(n: int) -> None:
    """MATRIX.md: the session raises its RLIMIT_NOFILE soft limit to what it needs, or skips."""
    try:
        probe.raise_nofile(n)
    except (OSError, ValueError) as err:
        raise Skip(f"needs {n} open files: {err}") from None


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
    cycles: int = CYCLES,
    width: int = WIDTH,
    modes: Sequence[str] = (ECHO,),
    pace: Callable[[int], None] | None = None,
) -> Counter[str]:
    """`cycles` cycles of `width` connections open at once; connection j of cycle c ends as
    `modes[(c * width + j) % len(modes)]` says. Every echo is checked byte for byte. `pace` is
    called with the number of connections opened so far every `PACE_EVERY` cycles (see
    `accept_pacer`). Returns how many connections ended each way."""
    done: Counter[str] = Counter()
    for cycle in range(cycles):
        if pace is not None and cycle and cycle % PACE_EVERY == 0:
            pace(cycle * width)
        batch: list[tuple[socket.socket, str, bytes]] = []
        step = "connect"
        try:
            for j in range(width):
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
                    check(echo == frame, f"cycle {cycle}: echo {echo!r}, sent {frame!r}")
                if mode in (RESET, PARTIAL):
                    abort(sock)
                else:
                    sock.close()
                done[mode] += 1
        except (OSError, EOFError) as err:
            raise Failed(f"churn cycle {cycle}, {step}: {type(err).__name__}: {err}") from None
        finally:
            for sock, _, _ in batch:
                sock.close()
    return done


def accept_pacer(handle: Handle, before: dict[str, Any] | None) -> Callable[[int], None] | None:
    """Keeps a churn that never waits for the server (connect-then-close, send-then-RST) from
    running more than `PACE_LAG` connections ahead of the server's accepts. Otherwise a slow
    acceptor (a thread spawned per connection) lets the listen queue overflow (seen: `blocking`,
    ListenOverflows in /proc/net/netstat): the kernel drops the handshake's last ACK, and the
    connection reaches the server a retransmission (1 s) later, or never if an RST follows, so
    "every close counted" would count the kernel's drops. Needs the server's stats (None without)."""
    if before is None:
        return None

    def pace(opened: int) -> None:
        def caught_up() -> bool:
            return (handle.stats() or {})["accepted"] - before["accepted"] >= opened - PACE_LAG

        wait_until(caught_up, IO_TIMEOUT, what=f"the server accepting {opened - PACE_LAG} connections")

    return pace


def quiescent_stats(handle: Handle, n: int | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """The server's stats once it is quiescent (DESIGN.md §4): `accepted` and `closed` unchanged
    for 100 ms, the listener's accept queue empty, and the counters conserved (accepted == active
    + closed, closed_by summing to closed, by_state to active); with `n`, holding `n` connections.
    Polled for `timeout` s. A slow acceptor (a thread per connection) can be between two
    accepts with nothing registered while connections still wait in its queue: `active == 0`
    alone is no quiescence."""
    port = handle.address[1]
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
        return seen if ok and not accept_queue(port) else None

    try:
        return wait_until(quiet, timeout, what="quiescence")
    except TimeoutError:
        counts = {k: seen.get(k) for k in ("active", "accepted", "closed", "closed_by", "by_state")}
        want = "" if n is None else f" with {n} connections"
        raise Failed(
            f"not quiescent{want} within {timeout} s: {counts}, accept queue {accept_queue(port)}"
        ) from None


def settled(ctx: Context, handle: Handle, n: int = 0, timeout: float = 2.0) -> dict[str, Any] | None:
    """Waits until the server is quiescent holding `n` connections (`quiescent_stats`); returns
    its stats then. Without stats, waits until it holds `n` by the kernel's count (`held`) and
    returns None."""
    if handle.stats() is None:
        wait_held(ctx, handle, n, timeout)
        return None
    return quiescent_stats(handle, n, timeout)


def registry_empty(ctx: Context, handle: Handle) -> None:
    """The registry holds nothing (where the target shows it)."""
    conns = handle.connections()
    if conns is None:
        ctx.note("registry: no connections() on this target; emptiness by the kernel's count of its sockets")
        return
    check(conns == [], f"registry not empty: {conns[:3]}{' ...' if len(conns) > 3 else ''}")


def still_serves(ctx: Context, handle: Handle) -> None:
    """A new connection is accepted and served."""
    client = ctx.connect(handle)
    client.sendall(encode(b"still serving"))
    check(read_frame(client) == b"still serving", "a new connection after the churn got a wrong echo")
    client.close()


def guard_of(ctx: Context, handle: Handle) -> LeakGuard:
    """The leak guard `ctx.server()` put around `handle`."""
    return next(guard for guard, h in ctx.guards if h is handle)


def child_server(ctx: Context, overrides: dict[str, Any], nofile: int | None = None) -> ChildHandle:
    """The target's server in a child process (`Target.child`), inside the scenario's leak guard:
    its fds and threads right after start are the baseline, checked again before it is stopped."""
    handle = ctx.target.child(ctx.options, overrides, nofile=nofile)
    guard = LeakGuard(pid=handle.pid)
    ctx.handles.append(handle)
    ctx.guards.append((guard, handle))
    guard.baseline()
    return handle


def server_cpu(ctx: Context, handle: Handle) -> Callable[[], float] | None:
    """CPU seconds of the server so far: its `connlab-*` threads in this process; the whole process
    for a server in its own process; None when its pid is unknown."""
    pid = handle.pid
    if pid is None:
        return None
    if pid == os.getpid():
        return lambda: probe.threads_cpu_seconds("connlab-", pid)
    return lambda: probe.cpu_seconds(pid)


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


def open_fleet(ctx: Context, handle: Handle, n: int) -> Fleet:
    """`n` clients connected to `handle` (closed at the scenario's end)."""
    socks = []
    for _ in range(n):
        sock = open_client(handle.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx.sockets.append(sock)
        socks.append(sock)
    return Fleet(socks)


@scenario("U1", "churn", "1000 cycles x 10 simultaneous connections, one frame each")
def u1(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "closed_by.eof == 10000")
    churn(server.address, modes=(ECHO,))
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        eof = stats_delta(before, after, "closed_by", "eof")
        check(eof == CYCLES * WIDTH, f"closed_by.eof +{eof}, expected +{CYCLES * WIDTH}")
    still_serves(ctx, server)
    settled(ctx, server)


@scenario("U2", "churn", "1000 cycles x 10 connect-then-close, no data")
def u2(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "every close counted")
    churn(server.address, modes=(CLOSE,), pace=accept_pacer(server, before))
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        n = CYCLES * WIDTH
        got = {key: stats_delta(before, after, key) for key in ("accepted", "closed")}
        got["closed_by.eof"] = stats_delta(before, after, "closed_by", "eof")
        check(all(v == n for v in got.values()), f"expected +{n} each, got {got}")


@scenario("U3", "churn", "1000 cycles x 10 connections that send a frame and RST")
def u3(ctx: Context) -> None:
    server = ctx.server()
    before = ctx.stats(server, "close reasons reset/eof")
    churn(server.address, modes=(RESET,), pace=accept_pacer(server, before))
    after = settled(ctx, server)
    registry_empty(ctx, server)
    if before is not None:
        n = CYCLES * WIDTH
        reasons = {r: stats_delta(before, after, "closed_by", r) for r in after["closed_by"]}
        reasons = {r: v for r, v in reasons.items() if v}
        accepted = stats_delta(before, after, "accepted")
        check(accepted == n, f"accepted +{accepted}, expected +{n}")
        check(
            reasons.get("reset", 0) + reasons.get("eof", 0) == n,
            f"close reasons {reasons}, expected reset (or eof) for all {n}",
        )
        ctx.note(f"close reasons {reasons}")


@scenario("U4", "churn", "1000 one-shot clients at once (the handler pile-up)")
def u4(ctx: Context) -> None:
    n = 1000
    need_fds(2 * n + 256)
    server = ctx.server()
    pid = server.pid
    threads_at_start = probe.thread_count(pid) if pid is not None else None
    fleet = open_fleet(ctx, server, n)
    try:
        for i in range(n):
            fleet.send(i)
        all_served = fleet.pump_until(lambda: not any(fleet.owed) or fleet.problems, timeout=10.0)
        check(not fleet.problems, f"clients failed: {dict(list(fleet.problems.items())[:5])}")
        check(all_served, f"{sum(1 for o in fleet.owed if o)} of {n} clients not served within 10 s")
    finally:
        fleet.close_all()
    last_close = time.monotonic()
    if pid is None:
        ctx.note("threads and CPU after the clients left: not checked (no pid for the server)")
        return
    try:
        wait_until(
            lambda: probe.thread_count(pid) == threads_at_start,
            timeout=1.0,
            what="thread count back to its count right after start",
        )
    except TimeoutError:
        now = probe.thread_count(pid)
        raise Failed(
            f"threads {now} at {time.monotonic() - last_close:.2f} s after the last close, "
            f"{threads_at_start} right after start"
        ) from None
    cpu = server_cpu(ctx, server)
    assert cpu is not None
    cpu0, t0 = cpu(), time.monotonic()
    time.sleep(1.0)  # the measurement window itself
    share = (cpu() - cpu0) / (time.monotonic() - t0)
    check(share < 0.05, f"server CPU {share:.1%} of a core over 1 s after the clients left, expected < 5%")

"""Shutdown: stop() with idle clients, with answers in flight, in the middle of churn, a
hundred restarts on one port, and a listener handed over to a successor under load."""

from __future__ import annotations

import os
import selectors
import shlex
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from connlab.client import abort, encode, open_client, read_frame, recv_exact, wait_until
from connlab.matrix.checks import (
    accepted_socket,
    expect_eof,
    frame_limit,
    listener_inodes,
    need_fds,
    quiescent_stats,
    still_serves,
    wait_held,
    wait_listener_closed,
)
from connlab.matrix.core import (
    COMMAND,
    IN_PROCESS,
    SETTLE,
    ChildHandle,
    Context,
    Failed,
    Handle,
    InProcessHandle,
    LeakGuard,
    NotApplicable,
    Server,
    Skip,
    check,
    command_handle,
    free_port,
    scenario,
)

STOPPABLE = frozenset({IN_PROCESS, COMMAND})

#: Connections held open across a stop must not time out first (in-process, where the matrix
#: configures the server; a command's server is run as given).
LONG = 10.0

MIB = 1 << 20


def _in_process(ctx: Context, **timeouts: float) -> dict[str, Any]:
    """Overrides for an in-process server only."""
    return dict(timeouts) if ctx.target.kind == IN_PROCESS else {}


def _process_gone(ctx: Context, handle: Handle) -> None:
    """A child server exits when stopped: its fds and threads went with it (the leak guard then
    checks only the port)."""
    if isinstance(handle, ChildHandle):
        ctx.note("fds and threads after stop: not checked (the server process exits when stopped)")


class Stopper:
    """`handle.stop(grace)` on another thread, so the scenario can act while stop() runs and a
    deadlocked stop fails the scenario instead of hanging it."""

    def __init__(self, handle: Handle, grace: float) -> None:
        self.grace = grace
        #: What stop() returned, and what it raised (re-raised by `wait`).
        self.report: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._stop, args=(handle,), name="matrix-stop", daemon=True)
        self.thread.start()

    def _stop(self, handle: Handle) -> None:
        try:
            self.report.update(handle.stop(self.grace))
        except BaseException as err:  # re-raised on the scenario's thread
            self.errors.append(err)

    def wait(self, limit: float) -> dict[str, Any]:
        """stop()'s report; fails if it has not returned within `limit` s of the call."""
        self.thread.join(max(0.0, self.started + limit - time.monotonic()))
        check(
            not self.thread.is_alive(), f"stop(grace={self.grace}) has not returned after {limit} s: deadlock"
        )
        if self.errors:
            raise self.errors[0]
        return {**self.report, "wall_s": round(time.monotonic() - self.started, 3)}


def _no_panic(ctx: Context, handle: Handle, captured: str) -> None:
    """No server thread panicked: nothing about a panic on the server's stderr (this process's
    while in-process; the child's output), and a child stopped normally (exit 0, or by SIGTERM)."""
    if isinstance(handle, ChildHandle):
        stopped = handle.stopped
        check(
            stopped is not None and stopped.normal,
            f"the server {stopped.describe() if stopped else 'ran on'}",
        )
        captured += "\n".join(handle.process.tail(50))
    check("panicked" not in captured, f"a server thread panicked: {captured.strip()[-500:]}")


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collects what this process writes to fd 2 (a Rust panic message) into the yielded list,
    then writes it on to the real stderr, so nothing is lost."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield out
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                out.append(tmp.read().decode(errors="replace"))
    finally:
        os.close(saved)
    if out and out[0]:
        sys.stderr.write(out[0])


def _rebind(ctx: Context, handle: Handle) -> None:
    """A new server binds the stopped server's port at once."""
    host, port = handle.address
    try:
        if ctx.target.kind == IN_PROCESS:
            assert ctx.target.backend is not None
            Server(ctx.target.backend, host=host, port=port, **handle.kwargs).stop(0)
        else:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen()
    except OSError as err:
        raise Failed(f"port {port} not rebindable right after stop: {err}") from None


@scenario("S1", "shutdown", "100 idle connections, then stop()", budget=20, kinds=STOPPABLE)
def s1(ctx: Context) -> None:
    server = ctx.server(**_in_process(ctx, idle_timeout=LONG))
    clients = [ctx.connect(server) for _ in range(100)]
    wait_held(server, 100)
    started = time.monotonic()
    report = server.stop()
    wall = time.monotonic() - started
    _process_gone(ctx, server)
    elapsed = report.get("elapsed_s", wall)
    ctx.should(
        elapsed < 0.5 and (wall < 0.5 or ctx.target.kind != IN_PROCESS),
        f"stop() took {elapsed:.3f} s (wall {wall:.3f} s), expected < 0.5 s",
    )
    if "forced" in report:
        check(report["forced"] == 0, f"stop() forced {report['forced']}, expected 0: {report}")
    else:
        ctx.note("forced 0: not checked (the server command reports no stop counts)")
    stopped = time.monotonic()
    for k, client in enumerate(clients):
        expect_eof(client, f"client {k}, from stop()", stopped)
        client.close()
    if ctx.target.kind == IN_PROCESS:
        leaks = ctx.guard_of(server).check(server.address[1])
        check(not leaks, f"after stop: {', '.join(leaks)}")
    _rebind(ctx, server)


@scenario(
    "S2",
    "shutdown",
    "10 clients each with a 1 MiB frame fully sent, then stop(grace=2)",
    budget=30,
    kinds=STOPPABLE,
)
def s2(ctx: Context) -> None:
    server = ctx.server(**_in_process(ctx, read_timeout=LONG, write_timeout=LONG))
    if frame_limit(server) < MIB:
        raise Skip(f"needs max_frame >= 1 MiB, the server has {frame_limit(server)}")
    if ctx.target.kind == COMMAND:
        ctx.note("grace: the server command's own (SIGTERM cannot pass one)")
    frames = [encode(bytes([k]) * MIB) for k in range(10)]
    # A small receive buffer keeps most of each echo queued in the server when stop() begins, so
    # it has answers to drain rather than only idle connections to close.
    clients = [open_client(server.address, timeout=10.0, rcvbuf=64 << 10) for _ in frames]
    ctx.sockets.extend(clients)
    for client, frame in zip(clients, frames, strict=True):
        client.sendall(frame)
    # Accepted before the stop: a frame fits in the socket buffers before the server accepts,
    # and a connection still in the accept queue is reset when stop ends admission (DESIGN §4).
    for client in clients:
        accepted_socket(server, client)
    got: list[bytearray] = [bytearray() for _ in clients]
    errors: dict[int, str] = {}
    eof = [False] * len(clients)
    sel = selectors.DefaultSelector()
    for k, client in enumerate(clients):
        client.setblocking(False)
        sel.register(client, selectors.EVENT_READ, k)

    # stop() blocks until every client is served: read beside it.
    def read_all() -> None:
        deadline = time.monotonic() + 10.0
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                k = key.data
                try:
                    data = clients[k].recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as err:
                    errors[k] = f"{type(err).__name__}: {err}"
                    data = b""
                if data:
                    got[k] += data
                else:
                    eof[k] = k not in errors
                    sel.unregister(clients[k])
                    clients[k].close()  # the EOF answered: the server's lingering close ends

    reader = threading.Thread(target=read_all, name="s2-reader", daemon=True)
    reader.start()
    try:
        report = Stopper(server, 2.0).wait(12.0)
    finally:
        reader.join(12.0)
        sel.close()
    _process_gone(ctx, server)
    check(not reader.is_alive(), "clients still reading 12 s after stop began")
    for k, frame in enumerate(frames):
        check(k not in errors, f"client {k}: {errors.get(k)} after {len(got[k])} of {len(frame)} bytes")
        check(
            bytes(got[k]) == frame,
            f"client {k}: {len(got[k])} bytes before EOF, expected its whole echo of {len(frame)} bytes",
        )
        # The stop ends every connection: one still open 10 s later outlived its server.
        check(
            eof[k],
            f"client {k}: its whole echo, but no EOF within 10 s of stop(): the connection outlived it",
        )
    if "drained" in report:
        check(
            (report["drained"], report["forced"]) == (10, 0),
            f"drained {report['drained']}, forced {report['forced']}, expected 10 and 0",
        )
    else:
        ctx.note("drained/forced: not checked (the server command reports no stop counts)")


class Churners:
    """Threads that each connect, send a frame in two halves, read its echo and close (FIN or RST,
    in turn) until the server refuses them. `hold()` parks each at its next step with whatever
    connection it has open; `release()` lets them go on."""

    def __init__(self, address: tuple[str, int], n: int = 10, size: int = 4096) -> None:
        self.address = address
        #: Set while the threads may go on; cleared by `hold`.
        self.go = threading.Event()
        self.go.set()
        #: Threads parked or finished, under `cond`.
        self.parked = 0
        self.finished = 0
        self.cond = threading.Condition()
        #: Connections opened so far (all threads).
        self.connections = 0
        #: Unexpected errors (not the refusals, resets and EOFs a stop causes).
        self.errors: list[str] = []
        self.size = size
        self.threads = [
            threading.Thread(target=self._run, args=(k,), name=f"s3-churn-{k}", daemon=True) for k in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def _gate(self) -> None:
        if self.go.is_set():
            return
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
        self.go.wait()
        with self.cond:
            self.parked -= 1

    def _run(self, k: int) -> None:
        frame = encode(bytes([k]) * self.size)
        half = len(frame) // 2
        n = 0
        try:
            while True:
                self._gate()
                try:
                    sock = open_client(self.address)
                except (ConnectionRefusedError, ConnectionResetError):
                    return  # the listener is gone: the stop has begun
                self.connections += 1
                with sock:
                    try:
                        self._gate()
                        sock.sendall(frame[:half])
                        self._gate()
                        sock.sendall(frame[half:])
                        echo = recv_exact(sock, len(frame))
                        if echo != frame:
                            self.errors.append(f"thread {k}: a wrong echo")
                        self._gate()
                        if n % 2:
                            abort(sock)
                    except (ConnectionError, EOFError):
                        pass  # closed by the stop
                n += 1
        except Exception as err:  # reported by the scenario
            self.errors.append(f"thread {k}: {type(err).__name__}: {err}")
        finally:
            with self.cond:
                self.finished += 1
                self.cond.notify_all()

    def hold(self, timeout: float = 2.0) -> None:
        """Parks every thread at its next step."""
        self.go.clear()
        with self.cond:
            parked = self.cond.wait_for(lambda: self.parked + self.finished == len(self.threads), timeout)
        check(parked, f"churn threads not parked within {timeout} s")

    def release(self) -> None:
        self.go.set()

    def join(self, timeout: float) -> None:
        self.release()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        check(not alive, f"{alive} churn threads still running {timeout} s after the stop")
        check(not self.errors, f"churn clients: {'; '.join(self.errors[:3])}")


def _conserved_after_stop(stats: dict[str, Any]) -> None:
    """DESIGN.md §4 after stop: nothing active, every accepted connection closed and counted."""
    counts = {k: stats[k] for k in ("active", "accepted", "closed")}
    ok = (
        stats["active"] == 0
        and stats["accepted"] == stats["closed"]
        and sum(stats["closed_by"].values()) == stats["closed"]
        and sum(stats["by_state"].values()) == 0
    )
    check(ok, f"counters not conserved after stop: {counts}, closed_by {stats['closed_by']}")


@scenario("S3", "shutdown", "stop() while 10 threads churn connections", budget=40, kinds=STOPPABLE)
def s3(ctx: Context) -> None:
    grace = 1.0
    # Stop in the thick of it: connects race the listener's close, closes race the stop's own.
    server = ctx.server()
    with _stderr_captured() if ctx.target.kind == IN_PROCESS else _nothing() as captured:
        churners = Churners(server.address)
        wait_until(lambda: churners.connections >= 200 or churners.errors, timeout=5.0, what="churn running")
        before = server.stats()
        report = Stopper(server, grace).wait(grace + 5.0)
        churners.join(5.0)
    _process_gone(ctx, server)
    _no_panic(ctx, server, "".join(captured))
    if before is None:
        ctx.note("drained + forced vs active at the call: not checked (no server stats)")
        return
    after = server.stats()
    _conserved_after_stop(after)
    # Its threads, ours included, are gone before the next server's leak guard takes its baseline.
    leaks = ctx.guard_of(server).check(server.address[1])
    check(not leaks, f"after the racing stop: {', '.join(leaks)}")
    # Under churn "active at the call" is not observable from outside; bound it by what is:
    # every `shutdown` close was active then, and nothing accepted after it.
    total = report["drained"] + report["forced"]
    shutdown = after["closed_by"]["shutdown"] - before["closed_by"]["shutdown"]
    most = after["accepted"] - before["closed"]
    check(
        shutdown <= total <= most,
        f"racing stop: drained + forced = {total}, expected within [{shutdown} shutdown closes, "
        f"{most} accepted and not closed before the call]",
    )

    # Then exactly: the threads park with their connections as they are (none, fresh, half a
    # frame, answered), the server goes quiet, and stop() is called with `active` known; they go
    # on as soon as the listener is closed.
    server = ctx.server(idle_timeout=LONG, read_timeout=LONG, write_timeout=LONG)
    inode = listener_inodes(server.address[1])
    with _stderr_captured() as captured:
        churners = Churners(server.address)
        wait_until(lambda: churners.connections >= 200 or churners.errors, timeout=5.0, what="churn running")
        churners.hold()
        quiet = quiescent_stats(server)
        stopper = Stopper(server, grace)
        try:
            wait_listener_closed(server.address[1], inode)
        finally:
            churners.release()
        result = stopper.wait(grace + 5.0)
        churners.join(5.0)
    _no_panic(ctx, server, "".join(captured))
    _conserved_after_stop(server.stats())
    total = result["drained"] + result["forced"]
    check(
        total == quiet["active"],
        f"drained {result['drained']} + forced {result['forced']} = {total}, "
        f"active at the call {quiet['active']}",
    )
    ctx.note(f"racing stop: {report}; stop with {quiet['active']} active: {result}")


@contextmanager
def _nothing() -> Iterator[list[str]]:
    yield []


@scenario("S4", "shutdown", "start and stop 100 times on the same port", budget=180, kinds=STOPPABLE)
def s4(ctx: Context) -> None:
    if ctx.target.kind == COMMAND:
        _s4_command(ctx)
        return
    assert ctx.target.backend is not None
    first = ctx.server()
    host, port = first.address
    guard = ctx.guard_of(first)
    for n in range(100):
        ctx.check_cancelled()
        if n == 0:
            server: Any = first
        else:
            try:
                server = Server(ctx.target.backend, host=host, port=port, **first.kwargs)
            except OSError as err:
                raise Failed(f"start {n + 1} of 100 on port {port}: {err}") from None
        try:
            # A client still connected at the stop: the server closes first and its side of the
            # connection waits in TIME_WAIT on the port, which must not block the next start.
            _one_round_trip_then_stop(server, n)
        finally:
            server.stop(0)
    leaks = guard.check(port)
    check(not leaks, f"after 100 starts and stops: {', '.join(leaks)}")


def _one_round_trip_then_stop(server: Any, n: int) -> None:
    address = server.address
    with open_client(address) as client:
        client.sendall(encode(b"start %d" % n))
        check(read_frame(client) == b"start %d" % n, f"start {n + 1}: wrong echo")
        server.stop(1.0)
        client.settimeout(2.0)
        check(client.recv(1) == b"", f"start {n + 1}: no EOF after stop")


def _s4_command(ctx: Context) -> None:
    """S4 for a server command with a `{port}` placeholder: the same port given 100 times."""
    command = ctx.target.command or ""
    if "{port}" not in command:
        raise Skip(
            "needs the server command to take its port as {port} (it is started 100 times on one port)"
        )
    port = free_port()
    for n in range(100):
        ctx.check_cancelled()
        try:
            handle = command_handle(command, ctx.target.claimed(ctx.options), ctx.options, port=port)
        except RuntimeError as err:
            raise Failed(f"start {n + 1} of 100 on port {port}: {err}") from None
        try:
            check(handle.address[1] == port, f"start {n + 1}: listening on {handle.address}, not port {port}")
            with open_client(handle.address) as client:
                client.sendall(encode(b"start %d" % n))
                check(read_frame(client) == b"start %d" % n, f"start {n + 1}: wrong echo")
                report = handle.stop()
                check(report["normal"], f"start {n + 1}: the server {report['exit']} when stopped")
        finally:
            handle.close()
        leaks = LeakGuard(pid=None).check(port)
        check(not leaks, f"after start {n + 1}: {', '.join(leaks)}")


#: S5's load: persistent clients and the frames each keeps in flight, churn threads, and the
#: answers each persistent client gets from the successor before the row winds down.
PERSISTENT = 100
IN_FLIGHT = 4
CHURNERS = 10
AFTER = 20

#: A persistent client's frame: (client, sequence number), repeated to 32 bytes.
PIPE_FRAME = struct.Struct(">II")
PIPE_FRAME_LEN = 4 + 4 * PIPE_FRAME.size

#: A churned frame never read (EOF before its answer) is sent again on at most this many new
#: connections before it counts as lost.
RESENDS = 3


def _pipe_frame(client: int, seq: int) -> bytes:
    return encode(PIPE_FRAME.pack(client, seq) * 4)


def _few(ids: list[int], n: int = 5) -> str:
    """ "3, 17, 42 ...": the first `n` of `ids`."""
    return ", ".join(map(str, ids[:n])) + (" ..." if len(ids) > n else "")


class Pipeliners:
    """`n` persistent clients on one selector thread, each keeping `depth` frames in flight; frame
    `seq` of client `i` carries (i, seq), so every answer is checked against the one due.

    A server that closes a connection in a drain answers every frame it read and then sends a FIN:
    the client sees EOF at a frame boundary, and the frames it sent after the FIN were never read
    (the lingering close discards them). The client then sends those again, in order, on a new
    connection. So across its connections every frame a client sends is answered exactly once and
    in order, or the server lost, duplicated or reordered one. Once the client thread runs, only
    it writes the attributes; the scenario reads counts meanwhile and the rest after `finish`."""

    def __init__(self, address: tuple[str, int], n: int, depth: int) -> None:
        self.address = address
        self.depth = depth
        self.socks: list[socket.socket | None] = [None] * n
        #: The next sequence number client i sends, and the one whose answer is due; while
        #: winding down, the first it will not send (None before).
        self.sent = [0] * n
        self.acked = [0] * n
        self.limit: list[int] | None = None
        #: Bytes of an answer received so far, and frames not yet written, per client.
        self.partial = [b""] * n
        self.out = [bytearray() for _ in range(n)]
        #: Connections client i has opened, and answers on its current one.
        self.conns = [0] * n
        self.answers_here = [0] * n
        #: How the server ended each of client i's connections: (connection number from 1, "eof"
        #: or what else, when, frames sent on it and not answered).
        self.ends: list[list[tuple[int, str, float, int]]] = [[] for _ in range(n)]
        #: Frames sent again after an EOF; connects refused; what else went wrong, per client.
        self.resent = 0
        self.refused = 0
        self.problems: dict[int, str] = {}
        #: Clients to connect (again) at the next turn of the loop: their connection ended, or
        #: their connect was refused.
        self.unconnected: set[int] = set()
        #: Set by `finish`: no new frame is sent (those unanswered still are, after an EOF).
        self.winding = threading.Event()
        #: Set when the thread is to end; no connection is opened after it.
        self.done = threading.Event()
        self.sel = selectors.DefaultSelector()
        #: The events client i's socket is registered for (read; write too while `out` holds bytes).
        self.interest = [0] * n
        for i in range(n):
            self._connect(i)
        if any(sock is None for sock in self.socks):
            self.close()
            raise Failed(f"persistent clients could not connect: {self.refused} refused, {self.problems}")
        self.thread = threading.Thread(target=self._run, name="s5-persistent", daemon=True)
        self.thread.start()

    def least_answered(self) -> int:
        """The fewest answers any client has had on its current connection."""
        return min(self.answers_here)

    def _run(self) -> None:
        try:
            for i in range(len(self.socks)):
                self._fill(i)
            while not self.done.is_set():
                if self.winding.is_set() and self.limit is None:
                    self.limit = list(self.sent)
                for i in sorted(self.unconnected):
                    self._connect(i)
                for key, events in self.sel.select(0.02):
                    if events & selectors.EVENT_WRITE:
                        self._flush(key.data)
                    if events & selectors.EVENT_READ:
                        self._read(key.data)
        except Exception as err:  # reported by the scenario
            self.problems.setdefault(-1, f"the persistent clients' thread: {type(err).__name__}: {err}")

    def _connect(self, i: int) -> None:
        try:
            sock = open_client(self.address)
        except ConnectionRefusedError:
            self.refused += 1
            self.unconnected.add(i)
            return
        except OSError as err:
            self.problems.setdefault(i, f"connect: {type(err).__name__}: {err}")
            self.unconnected.discard(i)
            return
        self.unconnected.discard(i)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.socks[i] = sock
        self.conns[i] += 1
        self.answers_here[i] = 0
        self.interest[i] = selectors.EVENT_READ
        self.sel.register(sock, selectors.EVENT_READ, i)
        self._fill(i)

    def _fill(self, i: int) -> None:
        if self.socks[i] is None:
            return
        limit = self.limit[i] if self.limit is not None else None
        while self.sent[i] - self.acked[i] < self.depth and (limit is None or self.sent[i] < limit):
            self.out[i] += _pipe_frame(i, self.sent[i])
            self.sent[i] += 1
        self._flush(i)

    def _flush(self, i: int) -> None:
        sock = self.socks[i]
        if sock is None:
            return
        try:
            if self.out[i]:
                del self.out[i][: sock.send(self.out[i])]
        except BlockingIOError:
            pass
        except OSError as err:
            self._ended(i, _how(err))
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out[i] else 0)
        if want != self.interest[i]:
            self.interest[i] = want
            self.sel.modify(sock, want, i)

    def _read(self, i: int) -> None:
        sock = self.socks[i]
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as err:
            self._ended(i, _how(err))
            return
        if not data:
            self._ended(i, "eof")
            return
        buf = self.partial[i] + data
        while len(buf) >= PIPE_FRAME_LEN:
            answer, buf = buf[:PIPE_FRAME_LEN], buf[PIPE_FRAME_LEN:]
            if self.acked[i] < self.sent[i] and answer == _pipe_frame(i, self.acked[i]):
                self.acked[i] += 1
                self.answers_here[i] += 1
                continue
            client, seq = PIPE_FRAME.unpack_from(answer, 4)
            if client == i and seq < self.acked[i]:
                self.problems.setdefault(i, f"frame {seq} answered twice")
            else:
                due = f"frame {self.acked[i]}" if self.acked[i] < self.sent[i] else "no answer"
                self.problems.setdefault(i, f"an answer {answer[:12].hex()}... when {due} was due")
            self._drop(i)
            return
        self.partial[i] = buf
        self._fill(i)

    def _ended(self, i: int, how: str) -> None:
        """The server ended client i's connection: the frames it had not answered go again on a
        new one (after an EOF: they were never read; after a reset: the row has failed anyway)."""
        if how == "eof" and self.partial[i]:
            how = f"EOF after {len(self.partial[i])} bytes of an answer"
        unanswered = self.sent[i] - self.acked[i]
        self.ends[i].append((self.conns[i], how, time.monotonic(), unanswered))
        self._drop(i)
        if how == "eof":
            self.resent += unanswered
        self.sent[i] = self.acked[i]
        self.unconnected.add(i)

    def _drop(self, i: int) -> None:
        sock = self.socks[i]
        if sock is not None:
            self.sel.unregister(sock)
            sock.close()
            self.socks[i] = None
        self.partial[i] = b""
        self.out[i].clear()

    def finish(self, timeout: float) -> None:
        """Stops sending new frames, waits (up to `timeout` s) for the answers still due, then
        closes every connection (a FIN: the client leaves) and ends the thread."""
        self.winding.set()
        with suppress(TimeoutError):  # what is missing then is judged by `verdict`
            wait_until(
                lambda: self.limit is not None and self.acked == self.limit,
                timeout,
                interval=0.01,
                what="the persistent clients' last answers",
            )
        self.close()

    def close(self) -> None:
        self.done.set()
        if getattr(self, "thread", None) is not None:
            self.thread.join(5.0)
        for i in range(len(self.socks)):
            self._drop(i)
        self.sel.close()

    def verdict(self, handoff_at: float) -> list[str]:
        """What went wrong, each naming the clients: every first connection (to the incumbent)
        must end by EOF after the handoff began, no other connection may be ended by the server,
        and every frame sent must have been answered once, in order."""
        found: list[str] = []
        resets = [i for i, ends in enumerate(self.ends) if any(how == "reset" for _, how, _, _ in ends)]
        if resets:
            lost = sum(u for ends in self.ends for _, how, _, u in ends if how == "reset")
            found.append(
                f"{len(resets)} persistent connections reset (client {_few(resets)}), "
                f"{lost} frames in flight on them unanswered"
            )
        never = [i for i, ends in enumerate(self.ends) if not ends]
        if never:
            found.append(
                f"{len(never)} persistent connections never closed by the drain (client {_few(never)})"
            )
        early = [i for i, ends in enumerate(self.ends) if ends and ends[0][2] < handoff_at]
        if early:
            found.append(
                f"{len(early)} persistent connections closed by the server before the handoff "
                f"(client {_few(early)}: {self.ends[early[0]][0][1]})"
            )
        odd = [(i, e) for i, ends in enumerate(self.ends) for e in ends if e[1] not in ("eof", "reset")]
        if odd:
            found.append(f"persistent client {odd[0][0]}: connection {odd[0][1][0]} ended by {odd[0][1][1]}")
        again = [i for i, ends in enumerate(self.ends) if len(ends) > 1 and i not in resets]
        if again:
            i = again[0]
            found.append(
                f"{len(again)} persistent clients' connections to the successor ended by the server "
                f"during the row (client {i}: {', '.join(how for _, how, _, _ in self.ends[i][1:])})"
            )
        if self.refused:
            found.append(f"{self.refused} connects refused (persistent clients reconnecting)")
        for i, problem in sorted(self.problems.items())[:3]:
            found.append(f"persistent client {i}: {problem}" if i >= 0 else problem)
        if self.limit is not None:
            short = [i for i, (a, want) in enumerate(zip(self.acked, self.limit, strict=True)) if a < want]
            if short:
                missing = sum(self.limit[i] - self.acked[i] for i in short)
                found.append(
                    f"{missing} frames of {len(short)} persistent clients never answered "
                    f"(client {_few(short)})"
                )
        return found


def _how(err: OSError) -> str:
    """How a connection ended, from the error a call on it raised."""
    if isinstance(err, ConnectionResetError | BrokenPipeError):
        return "reset"
    return f"{type(err).__name__}: {err}"


class HandoffChurn:
    """`n` threads that each connect, send one frame, read its answer and close (a FIN), until
    stopped. A refused connect and a reset are counted; an EOF before any byte of the answer means
    the server never read the frame (a drain's lingering close discards it): it is sent again on a
    new connection (at most `RESENDS` times), and counted."""

    def __init__(self, address: tuple[str, int], n: int) -> None:
        self.address = address
        self.lock = threading.Lock()
        #: "connects", "answered", "refused", "reset", "resent", under `lock`.
        self.counts: Counter[str] = Counter()
        #: What else went wrong (a wrong or cut answer, a frame never read, an error), in order.
        self.problems: list[str] = []
        #: Set by `stop`: each thread ends after its current frame.
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(k,), name=f"s5-churn-{k}", daemon=True) for k in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def count(self, what: str) -> int:
        with self.lock:
            return self.counts[what]

    def _add(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def _run(self, k: int) -> None:
        seq = 0
        try:
            while not self.done.is_set():
                frame = encode(PIPE_FRAME.pack(k, seq) * 8)
                for _ in range(1 + RESENDS):
                    if self._once(k, seq, frame) != "unread":
                        break
                    self._add("resent")
                else:
                    self.problems.append(
                        f"churn thread {k}: frame {seq} never read on {1 + RESENDS} connections"
                    )
                seq += 1
        except Exception as err:  # reported by the scenario
            self.problems.append(f"churn thread {k}: {type(err).__name__}: {err}")

    def _once(self, k: int, seq: int, frame: bytes) -> str:
        """One connection: "answered", "unread" (EOF before any byte of the answer), or "failed"
        (counted, or said in `problems`)."""
        try:
            got = self._exchange(frame)
        except ConnectionRefusedError:
            self._add("refused")
            self.done.wait(0.005)
            return "failed"
        except (ConnectionResetError, BrokenPipeError):
            self._add("reset")
            return "failed"
        except OSError as err:
            self.problems.append(f"churn thread {k}, frame {seq}: {type(err).__name__}: {err}")
            return "failed"
        if got == frame:
            self._add("answered")
            return "answered"
        if not got:
            return "unread"
        what = f"cut after {len(got)} of {len(frame)} bytes" if len(got) < len(frame) else "wrong"
        self.problems.append(f"churn thread {k}, frame {seq}: its answer {what}")
        return "failed"

    def _exchange(self, frame: bytes) -> bytes:
        """Connects, sends `frame`, reads its answer until whole or EOF, and closes (a FIN)."""
        with open_client(self.address) as sock:
            self._add("connects")
            sock.sendall(frame)
            got = b""
            while len(got) < len(frame) and (chunk := sock.recv(len(frame) - len(got))):
                got += chunk
        return got

    def stop(self, timeout: float = 10.0) -> None:
        self.done.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        if alive:
            self.problems.append(f"{alive} churn threads still running {timeout:g} s after they were stopped")

    def verdict(self) -> list[str]:
        found = []
        if n := self.count("refused"):
            found.append(f"{n} connects refused (churn)")
        if n := self.count("reset"):
            found.append(f"{n} churned connections reset")
        return found + self.problems[:3]


class PortWatch:
    """A third party trying to bind the server's port (SO_REUSEADDR, as a restarting server
    would) every millisecond until stopped: it fails while any listening socket holds the port,
    so a success means the listener was closed at some instant."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.tries = 0
        #: When a bind succeeded (monotonic seconds).
        self.bound: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="s5-bind", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        host, port = self.address
        while not self.done.is_set():
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                    self.bound.append(time.monotonic())
                except OSError:
                    pass
            self.tries += 1
            self.done.wait(0.001)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5.0)

    def verdict(self, since: float) -> list[str]:
        if not self.bound:
            return []
        return [
            f"port {self.address[1]} bindable by a third party {len(self.bound)} times in {self.tries} "
            f"tries, first {self.bound[0] - since:.3f} s after the handoff began"
        ]


def _handoff_claimed(ctx: Context) -> None:
    """n/a unless the matrix can start a successor: in-process always; a server command that takes
    `{control}`, with the successor's command (`--handoff-cmd`)."""
    kind = ctx.target.kind
    if kind == IN_PROCESS:
        return
    serve, handoff = ctx.options.option("serve_cmd"), ctx.options.option("handoff_cmd")
    if kind != COMMAND:
        raise NotApplicable(
            "the server claims no handoff: the matrix cannot start a successor beside a running "
            f"server (give {serve} with {{control}} and {handoff})"
        )
    missing = []
    if "{control}" not in (ctx.target.command or ""):
        missing.append("its command takes no {control} (the path of its handoff control socket)")
    if ctx.target.handoff is None:
        missing.append(f"no {handoff} starts a successor")
    if missing:
        raise NotApplicable(f"the server claims no handoff: {' and '.join(missing)}")


def _take_over_in_process(ctx: Context, incumbent: Handle, control: str) -> Handle:
    """A server of the same backend taking the incumbent's listener over from its control socket
    at `control`, ended with the row before the incumbent: the incumbent's leak guard, taken
    before both started, then counts the process for both; this one's looks only at the port."""
    assert ctx.target.backend is not None
    backend = ctx.target.backend
    kwargs = {k: v for k, v in incumbent.kwargs.items() if k != "control"}
    try:
        successor = ctx.starting(lambda: InProcessHandle(backend, {**kwargs, "take_over": control}))
    except (OSError, ValueError, RuntimeError) as err:
        raise Failed(f"the take-over failed: {err}") from None
    ctx.guards.append((LeakGuard(pid=None), successor))
    return successor


def _successor_of(ctx: Context, incumbent: ChildHandle, what: str = "") -> ChildHandle:
    """The successor's command (`Target.handoff`, its `{control}` the incumbent's, its `{port}`
    the incumbent's port), ready when it prints its address: the port accepts all along."""
    assert ctx.target.handoff is not None and incumbent.control is not None
    command = ctx.target.handoff.replace("{control}", shlex.quote(incumbent.control))
    argv = shlex.split(command.replace("{port}", str(incumbent.port)))
    try:
        return ctx.starting(
            lambda: ChildHandle(argv, incumbent.kwargs, start_timeout=ctx.options.start_timeout)
        )
    except RuntimeError as err:  # StartError: the row fails, the run goes on
        raise Failed(f"the successor did not take over{what}: {err}") from None


def _fresh_successor(ctx: Context) -> tuple[int, int]:
    """The fds and threads of a successor that took over from a fresh server of the target's
    command with no client, once settled: what the successor of the loaded server must be back
    to once its clients are gone (the incumbent's own counts would not do: the successor may be
    another backend, or another program)."""
    assert ctx.target.command is not None
    command, claimed = ctx.target.command, ctx.target.claimed(ctx.options)
    idle = ctx.starting(lambda: command_handle(command, claimed, ctx.options))
    try:
        successor = _successor_of(ctx, idle, " an idle server")
        try:
            guard = LeakGuard(pid=successor.pid)
            guard.baseline(settle=SETTLE)
        finally:
            successor.close()
    finally:
        idle.close()
    assert guard.fds is not None and guard.threads is not None
    return guard.fds, guard.threads


def _take_over_command(ctx: Context, incumbent: Handle, fresh: tuple[int, int]) -> Handle:
    """The successor of a server command, inside a leak guard holding it to `fresh`."""
    assert isinstance(incumbent, ChildHandle)
    successor = _successor_of(ctx, incumbent)
    ctx.guards.append((LeakGuard(pid=successor.pid, fds=fresh[0], threads=fresh[1]), successor))
    return successor


def _incumbent_report(ctx: Context, incumbent: Handle, successor: Handle) -> tuple[list[str], dict[str, Any]]:
    """How the incumbent says it ended (in-process: its handoff event; a process: its exit, 0, and
    the stopped line it printed, if any) and what the successor was told of its drain: what is
    wrong, and the drain's counts where known."""
    found: list[str] = []
    report: dict[str, Any] = {}
    if isinstance(incumbent, InProcessHandle):
        event = incumbent.server.handoff_event(5.0)
        if event is None or event["event"] != "handed-off":
            return [f"the incumbent did not hand off: {event}"], report
        if not event["committed"]:
            found.append(f"the handoff was not committed: {event['reason']}")
        report = event
        stats = incumbent.stats()
        if stats["frames_in"] != stats["frames_out"]:
            found.append(f"the incumbent read {stats['frames_in']} frames and answered {stats['frames_out']}")
    else:
        assert isinstance(incumbent, ChildHandle)
        try:
            wait_until(lambda: not incumbent.alive, timeout=5.0, what="the incumbent's exit")
        except TimeoutError:
            found.append("the incumbent still runs 5 s after the handoff")
        stopped = incumbent.stop()
        if stopped["exit"] != "exit code 0":
            found.append(
                f"the incumbent ended with {stopped['exit']} after the handoff, expected exit code 0"
            )
        if stopped.get("event") == "stopped":
            report = stopped
            if stopped.get("reason") != "handoff":
                found.append(
                    f"the incumbent's stopped line gives reason {stopped.get('reason')!r}, not handoff"
                )
        else:
            ctx.note("the incumbent's drain counts: not checked (it printed no stopped line)")
    told = _successor_report(successor)
    if told is not None and told.get("incumbent_error"):
        found.append(f"the successor got no drain report: {told['incumbent_error']}")
    if not report and told is not None and told.get("incumbent"):
        report = told["incumbent"]
    if "forced" in report:
        if report["forced"]:
            found.append(f"the incumbent's drain forced {report['forced']} connections")
        if report["drained"] + report["forced"] < PERSISTENT:
            found.append(
                f"the incumbent drained {report['drained']} connections, but {PERSISTENT} persistent "
                "ones were open on it"
            )
    return found, report


def _successor_report(successor: Handle) -> dict[str, Any] | None:
    """The successor's account of the take-over: `Server.handoff`, or the "handoff" of the
    listening line `connlab serve --take-over` prints."""
    if isinstance(successor, InProcessHandle):
        return successor.server.handoff
    if isinstance(successor, ChildHandle):
        for event in successor.process.events:
            if event.get("event") == "listening" and isinstance(event.get("handoff"), dict):
                return event["handoff"]
    return None


@scenario(
    "S5",
    "shutdown",
    f"a listener handoff while {CHURNERS} threads churn connections and {PERSISTENT} persistent "
    "connections pipeline frames",
    budget=20,
)
def s5(ctx: Context) -> None:
    _handoff_claimed(ctx)
    need_fds(4 * PERSISTENT + 256)
    if ctx.target.kind == IN_PROCESS:
        with tempfile.TemporaryDirectory(prefix="connlab-s5-") as tmp:
            control = os.path.join(tmp, "control.sock")
            incumbent = ctx.server(control=control, idle_timeout=LONG, read_timeout=LONG)
            _s5_handoff(ctx, incumbent, lambda: _take_over_in_process(ctx, incumbent, control))
    else:
        fresh = _fresh_successor(ctx)
        incumbent = ctx.server()
        _s5_handoff(ctx, incumbent, lambda: _take_over_command(ctx, incumbent, fresh))


def _s5_handoff(ctx: Context, incumbent: Handle, take_over: Callable[[], Handle]) -> None:
    """Load on `incumbent`, the handoff (`take_over()` returns the successor) in its midst, load
    on the successor; then the clients' account, the servers' reports, and leaks."""
    pipes = Pipeliners(incumbent.address, PERSISTENT, IN_FLIGHT)
    churn = HandoffChurn(incumbent.address, CHURNERS)
    watch: PortWatch | None = None
    try:
        wait_until(
            lambda: pipes.least_answered() >= 10 and churn.count("answered") >= 50,
            timeout=5.0,
            what="every persistent client and the churn answered by the incumbent",
        )
        watch = PortWatch(incumbent.address)
        began = time.monotonic()
        successor = take_over()
        took = time.monotonic() - began
        check(
            successor.address[1] == incumbent.port,
            f"the successor listens on {successor.address}, not the incumbent's port {incumbent.port}",
        )
        reported, report = _incumbent_report(ctx, incumbent, successor)
        # Every connection to the incumbent has ended by its drain; then the successor serves them.
        with suppress(TimeoutError):
            wait_until(
                lambda: all(pipes.ends), timeout=2.0, what="the drain's EOF on every persistent connection"
            )
        watch.stop()
        answered = churn.count("answered")
        with suppress(TimeoutError):
            wait_until(
                lambda: pipes.least_answered() >= AFTER and churn.count("answered") >= answered + 50,
                timeout=5.0,
                what="the persistent clients and the churn answered by the successor",
            )
    finally:
        churn.stop()
        pipes.finish(timeout=3.0)
        if watch is not None:
            watch.stop()
    assert watch is not None
    found = pipes.verdict(began) + churn.verdict() + watch.verdict(began) + reported
    check(not found, "during the handoff: " + "; ".join(found))
    still_serves(ctx, successor, "the successor")
    ctx.note(
        f"take-over in {took:.3f} s; the incumbent drained {report.get('drained', '?')} connections; "
        f"{pipes.resent} persistent and {churn.count('resent')} churned frames sent after the drain's "
        f"FIN went again to the successor; {churn.count('connects')} churned connections; port "
        f"bind tried {watch.tries} times"
    )
    if isinstance(successor, InProcessHandle):
        successor.stop(1.0)
        incumbent.stop(0)
        leaks = ctx.guard_of(incumbent).check(incumbent.port)
        check(not leaks, f"after the handoff and both servers' stops: {', '.join(leaks)}")
    else:
        leaks = ctx.guard_of(successor).check(successor.port)
        check(
            not leaks,
            "the successor, its clients gone, against a fresh one that took an idle server over: "
            + ", ".join(leaks),
        )

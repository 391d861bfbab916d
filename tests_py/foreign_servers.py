"""Echo servers connlab did not write, for testing that the matrix judges them truthfully.

    python foreign_servers.py --port P [options]     prints "listening HOST:PORT", serves until stopped

They answer whole frames correctly but behave like common third-party servers elsewhere: no idle,
read or write timeouts and no maximum frame size. `--byte-echo` echoes bytes as they arrive (like
socat, ncat or inetd's echo), so half frames are echoed too. `--fork` forks a child per connection
(inetd / `socat fork` style); the children keep SIGTERM's default action, share stdout/stderr with
the parent and outlive it, as orphans of such servers do. `--sigterm default` dies by the signal,
`--sigterm exit` exits 0, `--sigterm crash` aborts (a crash at stop). `--log-resets` writes one
long stderr line per connection reset by peer; `--log-time` prints a timestamped line before the
address; `--late-fds` opens a pipe 0.3 s after it (a server still starting); `--backlog` sets the
listen backlog; `--one-read-frames` takes each read for whole frames (loses a split frame).

Handoff (connlab's protocol, servers/src/handoff/proto.rs, written here from its description):
`--control PATH` serves handoff sessions on a Unix socket as an incumbent: it sends its listening
socket (SCM_RIGHTS), stops accepting at the successor's Seal, drains (answers what it read, then
a FIN and a lingering close; a connection that has sent nothing waits up to 1 s for its first
frame), reports Drained, prints {"event": "stopped", "reason": "handoff", ...} and exits 0.
`--take-over PATH` starts as the successor of the server at PATH and prints its address once the
incumbent reported its drain. `--handoff-defect` breaks the incumbent: `close-listener` at Seal
closes its listener and resets every open connection (SO_LINGER 0) instead of draining them, and
reports them drained; `shutdown-listener` shuts the listening socket down before closing it, which
stops it listening for the successor too (it is one socket).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct(">I")
CHUNK = 65536

# The handoff protocol: a 16-byte header (magic, version, kind, body length, handoff id), a body.
HANDOFF = struct.Struct(">4sBBHQ")
MAGIC, VERSION = b"CLHO", 1
HELLO, WELCOME, PREPARE, LISTENER, SEAL, SEALED, COMMIT, DRAINED, ERROR = range(1, 10)
# The drain's grace, its lingering close, and how long a connection that has sent nothing is
# waited for (its client connected to be served: its frame may be on the way).
GRACE = 1.0
LINGER = 1.0
# Stop reading a connection while this much of its echo is unsent, as socat does when the peer
# does not read: the kernel's buffers then push back on the sender instead of our memory growing.
OUT_LIMIT = 1 << 20


def take_frames(inbuf: bytearray) -> bytes:
    """Remove the whole frames at the front of `inbuf` and return them; a partial frame stays."""
    end = 0
    while len(inbuf) - end >= HEADER.size:
        (n,) = HEADER.unpack_from(inbuf, end)
        if len(inbuf) - end < HEADER.size + n:
            break
        end += HEADER.size + n
    out = bytes(inbuf[:end])
    del inbuf[:end]
    return out


def log_reset(enabled: bool, peer: object, doing: str, bytes_in: int, bytes_out: int) -> None:
    # Shaped like a server logging an exception: long enough that thousands of resets make real
    # pressure on a pipe that nobody drains.
    if enabled:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        sys.stderr.write(
            f"{stamp} ERROR [pid {os.getpid()}] echo handler for peer {peer} failed while {doing}: "
            f"ConnectionResetError(104, 'Connection reset by peer'); dropping the connection after "
            f"{bytes_in} bytes in, {bytes_out} bytes out\n"
        )
        sys.stderr.flush()


def handoff_frame(kind: int, handoff_id: int, body: bytes = b"") -> bytes:
    return HANDOFF.pack(MAGIC, VERSION, kind, len(body), handoff_id) + body


def take_handoff_frames(buf: bytearray) -> list[tuple[int, int, bytes]]:
    """The whole handoff frames at the front of `buf` as (kind, id, body); ValueError on garbage."""
    frames = []
    while len(buf) >= HANDOFF.size:
        magic, version, kind, length, handoff_id = HANDOFF.unpack_from(buf)
        if magic != MAGIC or version != VERSION or not HELLO <= kind <= ERROR:
            raise ValueError(f"not a handoff frame: {bytes(buf[: HANDOFF.size])!r}")
        if len(buf) < HANDOFF.size + length:
            break
        frames.append((kind, handoff_id, bytes(buf[HANDOFF.size : HANDOFF.size + length])))
        del buf[: HANDOFF.size + length]
    return frames


def emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


class Conn:
    def __init__(self, sock: socket.socket, peer: object) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False
        self.bytes_in = 0
        self.bytes_out = 0
        # In a drain: when to give up waiting for a first frame; after the FIN, when the
        # lingering close ends.
        self.first_by: float | None = None
        self.linger_until: float | None = None


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conns: dict[socket.socket, Conn] = {}
        self.late: list[int] = []  # --late-fds
        # Handoff: the control socket (--control, as an incumbent), the session with the other
        # server (either side), where the incumbent's session is, and its drain.
        self.control: socket.socket | None = None
        self.session: socket.socket | None = None
        self.session_in = bytearray()
        self.phase = "hello"
        self.handoff_id = 0
        self.successor_pid = 0
        self.drain_started: float | None = None
        self.committed = False
        self.drained = self.forced = 0
        self.finished = False
        if args.take_over:
            self.listener = self.take_over(args.take_over)
        else:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((args.host, args.port))
            self.listener.listen(args.backlog)
        self.listener.setblocking(False)
        # The SIGTERM handler writes a byte here so a select() that is waiting forever wakes up.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        if args.control:
            self.open_control(args.control)
        if self.session is not None:  # the successor: the listener is ours, the incumbent's drain begins
            self.session.sendall(handoff_frame(SEAL, self.handoff_id))
            self.expect(SEALED)
            self.session.sendall(handoff_frame(COMMIT, self.handoff_id))
            self.sel.register(self.session, selectors.EVENT_READ)

    def run(self) -> None:
        if self.args.sigterm == "exit":
            signal.signal(signal.SIGTERM, self.on_sigterm)
        elif self.args.sigterm == "crash":
            signal.signal(signal.SIGTERM, lambda *_: os.abort())
        if self.args.fork:
            signal.signal(signal.SIGCHLD, reap_children)
        if not self.args.take_over:  # a successor prints its address once the incumbent drained
            self.print_address()
        if self.args.late_fds:
            # Finishes starting after the address line, as servers that open waker pipes lazily do.
            threading.Timer(0.3, lambda: self.late.extend(os.pipe())).start()
        while not self.finished:
            for key, events in self.sel.select(None if self.drain_started is None else 0.02):
                if key.fileobj is self.wake_r:
                    self.shutdown()
                    return
                if key.fileobj is self.listener:
                    self.accept()
                elif key.fileobj is self.control:
                    self.accept_session()
                elif key.fileobj is self.session:
                    self.on_session()
                elif (c := self.conns.get(key.fileobj)) is not None:  # type: ignore[call-overload]
                    self.service(c, events)
            if self.drain_started is not None:
                self.drain_tick()
        self.wake_r.close()
        self.wake_w.close()
        self.sel.close()

    def print_address(self) -> None:
        if not self.args.quiet:
            host, port = self.listener.getsockname()[:2]
            if self.args.log_time:
                print(time.strftime("%H:%M:%S starting"), flush=True)
            print(f"listening {f'[{host}]' if ':' in host else host}:{port}", flush=True)

    def on_sigterm(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"\0")

    def shutdown(self) -> None:
        for sock in list(self.conns):
            sock.close()
        for sock in (self.listener, self.control, self.session):
            if sock is not None:
                sock.close()
        if self.control is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.args.control)
        self.sel.close()

    def accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:  # BlockingIOError once the backlog is empty; ECONNABORTED, EMFILE
                return
            if self.args.fork:
                self.fork_child(sock, peer)
            else:
                sock.setblocking(False)
                self.conns[sock] = Conn(sock, peer)
                self.sel.register(sock, selectors.EVENT_READ)

    def fork_child(self, sock: socket.socket, peer: object) -> None:
        try:
            pid = os.fork()
        except OSError:
            sock.close()
            return
        if pid:
            sock.close()
            return
        try:
            # Only the parent's handlers are changed here: a child that inherited them would exit 0
            # on SIGTERM, which is not what inetd's children do. Closing (never unregistering) the
            # selector leaves the epoll instance it shares with the parent alone.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for s in (self.listener, self.wake_r, self.wake_w):
                s.close()
            self.sel.close()
            serve_blocking(sock, peer, framed=not self.args.byte_echo, log=self.args.log_resets)
        finally:
            os._exit(0)  # never return into the parent's accept loop, whatever happened

    def service(self, c: Conn, events: int) -> None:
        if c.linger_until is not None:  # after the drain's FIN: discard until the client's EOF
            try:
                data = c.sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close(c)
            return
        doing = "reading"
        try:
            if events & selectors.EVENT_READ:
                self.read(c)
            doing = "writing"
            self.write(c)  # also right after a read: answering at once saves a trip through select()
        except ConnectionResetError:
            log_reset(self.args.log_resets, c.peer, doing, c.bytes_in, c.bytes_out)
            self.close(c)
            return
        except OSError:  # EPIPE and the like: the peer is gone, nothing to log
            self.close(c)
            return
        if c.eof and not c.outbuf:
            self.close(c)  # all owed answers are out; a partial frame left at EOF is dropped
            return
        if self.drain_started is not None and self.drain_close(c):
            return
        mask = 0 if c.eof or len(c.outbuf) >= OUT_LIMIT else selectors.EVENT_READ
        if c.outbuf:
            mask |= selectors.EVENT_WRITE
        if mask != self.sel.get_key(c.sock).events:
            self.sel.modify(c.sock, mask)

    def read(self, c: Conn) -> None:
        try:
            data = c.sock.recv(CHUNK)
        except BlockingIOError:
            return
        if not data:
            c.eof = True
            return
        c.bytes_in += len(data)
        if self.args.byte_echo:
            c.outbuf += data
        elif self.args.one_read_frames:
            # The classic bug: each read taken for whole frames; a frame split across reads is lost.
            whole = bytearray(data)
            answer = take_frames(whole)
            c.outbuf += answer if not whole else b""
        else:
            c.inbuf += data
            c.outbuf += take_frames(c.inbuf)

    def write(self, c: Conn) -> None:
        while c.outbuf:
            try:
                sent = c.sock.send(c.outbuf)
            except BlockingIOError:
                return
            del c.outbuf[:sent]
            c.bytes_out += sent

    def close(self, c: Conn) -> None:
        self.sel.unregister(c.sock)
        del self.conns[c.sock]
        c.sock.close()

    # The incumbent's side of a handoff.

    def open_control(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket file of an earlier run
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(path)
        self.control.listen(1)
        self.control.setblocking(False)
        self.sel.register(self.control, selectors.EVENT_READ)

    def accept_session(self) -> None:
        assert self.control is not None
        try:
            sock, _ = self.control.accept()
        except OSError:
            return
        if self.session is not None:  # one session at a time
            sock.close()
            return
        sock.settimeout(2.0)  # a stalled successor cannot hold this server for long
        self.session, self.phase = sock, "hello"
        self.session_in.clear()
        self.sel.register(sock, selectors.EVENT_READ)

    def on_session(self) -> None:
        assert self.session is not None
        try:
            data = self.session.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.end_session()
            if self.args.take_over:
                self.print_address()  # the incumbent's report never came; the listener is ours
            return
        self.session_in += data
        try:
            frames = take_handoff_frames(self.session_in)
        except ValueError as err:
            self.refuse(str(err))
            return
        for kind, handoff_id, body in frames:
            if self.args.take_over:
                if kind == DRAINED:
                    drained, forced, elapsed_us = struct.unpack(">QQQ", body[:24])
                    print(f"incumbent drained {drained}, forced {forced} in {elapsed_us} us", file=sys.stderr)
                self.end_session()
                self.print_address()
                return
            self.on_frame(kind, handoff_id, body)
            if self.session is None:
                return

    def on_frame(self, kind: int, handoff_id: int, body: bytes) -> None:
        assert self.session is not None
        due = {"hello": HELLO, "prepare": PREPARE, "seal": SEAL, "commit": COMMIT}.get(self.phase)
        if kind != due or (kind != HELLO and handoff_id != self.handoff_id):
            self.refuse(f"frame kind {kind} of handoff {handoff_id:#x} while waiting for {self.phase}")
            return
        if kind == HELLO:
            self.handoff_id = int.from_bytes(os.urandom(8), "big") | 1
            self.successor_pid = struct.unpack(">I", body[:4])[0]
            grace_ms = struct.pack(">Q", int(GRACE * 1000))
            self.session.sendall(handoff_frame(WELCOME, self.handoff_id, grace_ms))
            self.phase = "prepare"
        elif kind == PREPARE:
            port = self.listener.getsockname()[1]
            frame = handoff_frame(LISTENER, self.handoff_id, struct.pack(">H", port))
            socket.send_fds(self.session, [frame], [self.listener.fileno()])
            self.phase = "seal"
        elif kind == SEAL:
            self.seal()
            self.session.sendall(handoff_frame(SEALED, self.handoff_id))
            self.phase = "commit"
        else:
            self.committed = True
            self.phase = "done"

    def refuse(self, reason: str) -> None:
        assert self.session is not None
        with contextlib.suppress(OSError):
            self.session.sendall(handoff_frame(ERROR, self.handoff_id, reason.encode()))
        self.end_session()

    def end_session(self) -> None:
        if self.session is not None:
            self.sel.unregister(self.session)
            self.session.close()
            self.session = None

    def seal(self) -> None:
        """Stops accepting (the listening socket lives on in the successor), and drains."""
        self.sel.unregister(self.listener)
        if self.args.handoff_defect == "shutdown-listener":
            # The defect: shutdown(2) acts on the socket, not on this process's fd of it, and the
            # successor holds the same socket: it stops listening for both.
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self.control is not None:
            self.sel.unregister(self.control)
            self.control.close()
            self.control = None
            os.unlink(self.args.control)  # a successor may open its own control there
        self.drain_started = now = time.monotonic()
        self.drained = len(self.conns)
        if self.args.handoff_defect == "close-listener":
            # The defect: every open connection reset, answers in flight and all; said drained.
            for c in list(self.conns.values()):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close(c)
            return
        for c in list(self.conns.values()):
            c.first_by = now + LINGER
            self.service(c, selectors.EVENT_READ)  # what it sent already is read and answered

    def drain_close(self, c: Conn) -> bool:
        """In the drain: once nothing is owed, a FIN and the lingering close (True: it began).
        A connection that has sent nothing is waited for until its `first_by`."""
        if c.linger_until is not None or c.inbuf or c.outbuf:
            return False
        if c.bytes_in == 0 and c.first_by is not None and time.monotonic() < c.first_by:
            return False
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        c.linger_until = time.monotonic() + LINGER
        self.sel.modify(c.sock, selectors.EVENT_READ)
        return True

    def drain_tick(self) -> None:
        """Ends lingering closes that ran out, forces what is left at the grace's end, and once
        every connection is closed reports the drain and ends this server."""
        assert self.drain_started is not None
        now = time.monotonic()
        for c in list(self.conns.values()):
            if c.linger_until is not None and now >= c.linger_until:
                self.close(c)
            elif c.linger_until is None and now >= self.drain_started + GRACE:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close(c)
                self.drained -= 1
                self.forced += 1
            elif c.linger_until is None:
                self.drain_close(c)
        if self.conns or (self.session is not None and not self.committed):
            return
        elapsed = now - self.drain_started
        if self.session is not None:
            body = struct.pack(">QQQ", self.drained, self.forced, int(elapsed * 1e6))
            with contextlib.suppress(OSError):
                self.session.sendall(handoff_frame(DRAINED, self.handoff_id, body))
            self.end_session()
        report = {"drained": self.drained, "forced": self.forced, "elapsed_s": round(elapsed, 6)}
        emit({"event": "stopped", "reason": "handoff", **report, "committed": self.committed})
        self.finished = True

    # The successor's side.

    def take_over(self, path: str) -> socket.socket:
        """The incumbent's listening socket, from its control socket at `path`."""
        self.session = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.session.settimeout(5.0)
        self.session.connect(path)
        self.session.sendall(handoff_frame(HELLO, 0, struct.pack(">I", os.getpid())))
        self.handoff_id = self.expect(WELCOME)[0]
        self.session.sendall(handoff_frame(PREPARE, self.handoff_id))
        _, fds = self.expect(LISTENER)
        if not fds:
            raise SystemExit("the listener frame came without a socket")
        return socket.socket(fileno=fds[0])

    def expect(self, kind: int) -> tuple[int, list[int]]:
        """The next frame from the incumbent, which must be of `kind`: its id and any fds."""
        assert self.session is not None
        fds: list[int] = []
        while True:
            frames = take_handoff_frames(self.session_in)
            if frames:
                got, handoff_id, body = frames[0]
                if got != kind:
                    raise SystemExit(f"handoff: expected frame kind {kind}, got {got}: {body!r}")
                return handoff_id, fds
            data, more, _, _ = socket.recv_fds(self.session, 4096, 1)
            if not data:
                raise SystemExit("handoff: the incumbent closed the session")
            fds += more
            self.session_in += data


def serve_blocking(sock: socket.socket, peer: object, framed: bool, log: bool) -> None:
    """One connection in a forked child: blocking reads and writes, until the peer closes."""
    inbuf = bytearray()
    bytes_in = bytes_out = 0
    doing = "reading"
    try:
        while data := sock.recv(CHUNK):
            bytes_in += len(data)
            if framed:
                inbuf += data
                data = take_frames(inbuf)
            doing = "writing"
            sock.sendall(data)
            bytes_out += len(data)
            doing = "reading"
    except ConnectionResetError:
        log_reset(log, peer, doing, bytes_in, bytes_out)
    except OSError:
        pass
    sock.close()


def reap_children(*_: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--backlog", type=int, default=512, help="listen backlog (default %(default)s)")
    p.add_argument("--log-time", action="store_true", help="print a HH:MM:SS log line before the address")
    p.add_argument("--late-fds", action="store_true", help="open a pipe 0.3 s after printing the address")
    p.add_argument(
        "--one-read-frames",
        action="store_true",
        help="take each read for whole frames (a frame split is lost)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="do not print the listening line (--log-resets still logs)"
    )
    p.add_argument(
        "--fork",
        action="store_true",
        help="fork a child per connection (inetd style) instead of serving all in one selectors loop",
    )
    p.add_argument(
        "--byte-echo", action="store_true", help="echo bytes as they arrive, without framing (socat style)"
    )
    p.add_argument(
        "--sigterm",
        choices=("default", "exit", "crash"),
        default="default",
        help="default: die by SIGTERM; exit: close everything and exit 0; crash: abort (SIGABRT) on "
        "SIGTERM (forked children keep the default)",
    )
    p.add_argument(
        "--log-resets", action="store_true", help="write one long stderr line per connection reset by peer"
    )
    p.add_argument("--control", metavar="PATH", help="serve handoff sessions (as the incumbent) at PATH")
    p.add_argument("--take-over", metavar="PATH", help="take the listener over from the server at PATH")
    p.add_argument(
        "--handoff-defect",
        choices=("close-listener", "shutdown-listener"),
        help="close-listener: at Seal, close the listener and reset every open connection instead of "
        "draining (and report them drained); shutdown-listener: shutdown(2) the listening socket at "
        "Seal (the successor's too)",
    )
    args = p.parse_args()
    if args.fork and (args.control or args.take_over):
        p.error("--fork: not with a handoff")
    if args.control and args.take_over:
        p.error("--control and --take-over: one (a successor here opens no control of its own)")
    Server(args).run()


if __name__ == "__main__":
    main()

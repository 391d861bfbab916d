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
"""

from __future__ import annotations

import argparse
import contextlib
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


class Conn:
    def __init__(self, sock: socket.socket, peer: object) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False
        self.bytes_in = 0
        self.bytes_out = 0


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
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
        self.conns: dict[socket.socket, Conn] = {}
        self.late: list[int] = []  # --late-fds

    def run(self) -> None:
        if self.args.sigterm == "exit":
            signal.signal(signal.SIGTERM, self.on_sigterm)
        elif self.args.sigterm == "crash":
            signal.signal(signal.SIGTERM, lambda *_: os.abort())
        if self.args.fork:
            signal.signal(signal.SIGCHLD, reap_children)
        if not self.args.quiet:
            host, port = self.listener.getsockname()[:2]
            if self.args.log_time:
                print(time.strftime("%H:%M:%S starting"), flush=True)
            print(f"listening {f'[{host}]' if ':' in host else host}:{port}", flush=True)
        if self.args.late_fds:
            # Finishes starting after the address line, as servers that open waker pipes lazily do.
            threading.Timer(0.3, lambda: self.late.extend(os.pipe())).start()
        while True:
            for key, events in self.sel.select():
                if key.fileobj is self.wake_r:
                    self.shutdown()
                    return
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.service(self.conns[key.fileobj], events)  # type: ignore[index]

    def on_sigterm(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"\0")

    def shutdown(self) -> None:
        for sock in list(self.conns):
            sock.close()
        self.listener.close()
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
    Server(p.parse_args()).run()


if __name__ == "__main__":
    main()

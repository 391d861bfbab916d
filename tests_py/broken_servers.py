"""Deliberately broken echo servers, for testing that the matrix catches what it claims to.

    python broken_servers.py MODE     prints "listening 127.0.0.1:PORT", serves until SIGTERM

Modes: `echo` (correct, with the matrix's 0.5 s idle and read timeouts), `leak-fd` (keeps a
duplicate of every accepted socket: an fd leak per connection), `no-half-close` (closes on the
peer's FIN without sending the answers it still owes), `no-idle-timeout` (never closes an idle
connection).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import sys
import time

TIMEOUT = 0.5
HEADER = struct.Struct(">I")


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.last = time.monotonic()


def serve(mode: str) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    leaked: list[int] = []
    conns: dict[socket.socket, Conn] = {}
    print(f"listening 127.0.0.1:{listener.getsockname()[1]}", flush=True)

    def close(c: Conn) -> None:
        sel.unregister(c.sock)
        del conns[c.sock]
        c.sock.close()

    while not stopping:
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj is listener:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                if mode == "leak-fd":
                    leaked.append(os.dup(sock.fileno()))
                conns[sock] = Conn(sock)
                sel.register(sock, selectors.EVENT_READ)
                continue
            c = conns[key.fileobj]  # type: ignore[index]
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(c)
                continue
            if not data:
                if mode != "no-half-close":
                    flush(c, blocking=True)
                close(c)
                continue
            c.last = time.monotonic()
            c.inbuf += data
            while len(c.inbuf) >= 4:
                (n,) = HEADER.unpack_from(c.inbuf)
                if len(c.inbuf) < 4 + n:
                    break
                c.outbuf += c.inbuf[: 4 + n]
                c.inbuf = c.inbuf[4 + n :]
        now = time.monotonic()
        for c in list(conns.values()):
            # Answers go out once a connection has been quiet for 10 ms, so a FIN that comes
            # right after the frames finds them unsent: that is what `no-half-close` drops.
            if c.outbuf and now - c.last > 0.01:
                flush(c, blocking=False)
            idle = not c.inbuf and not c.outbuf
            if mode != "no-idle-timeout" and now - c.last > TIMEOUT and (idle or c.inbuf):
                close(c)
    for c in list(conns.values()):
        close(c)
    listener.close()


def flush(c: Conn, blocking: bool) -> None:
    if blocking:
        c.sock.setblocking(True)
    try:
        while c.outbuf:
            sent = c.sock.send(c.outbuf)
            c.outbuf = c.outbuf[sent:]
    except (BlockingIOError, OSError):
        pass


if __name__ == "__main__":
    serve(sys.argv[1])

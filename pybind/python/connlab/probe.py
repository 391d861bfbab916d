"""Probe a process and the kernel's view of a TCP port: fds, threads, memory, CPU, sockets, phantoms."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import psutil

__all__ = [
    "TCP_STATES",
    "PortView",
    "ServerLike",
    "Snapshot",
    "accept_queue",
    "accepted_socket",
    "cpu_seconds",
    "diag_sockets",
    "fd_count",
    "listen_queue",
    "owned_server_sockets",
    "phantoms",
    "port_view",
    "process_tree",
    "raise_nofile",
    "rss_bytes",
    "server_sockets",
    "snapshot",
    "socket_inodes",
    "thread_count",
    "thread_names",
    "threads_cpu_seconds",
    "tree_socket_inodes",
]

#: The kernel's TCP state codes (include/net/tcp_states.h), as printed in the `st` column of
#: /proc/net/tcp and /proc/net/tcp6, mapped to the names `PortView` counts by.
TCP_STATES: Mapping[int, str] = MappingProxyType(
    {
        0x01: "ESTABLISHED",
        0x02: "SYN_SENT",
        0x03: "SYN_RECV",
        0x04: "FIN_WAIT1",
        0x05: "FIN_WAIT2",
        0x06: "TIME_WAIT",
        0x07: "CLOSE",
        0x08: "CLOSE_WAIT",
        0x09: "LAST_ACK",
        0x0A: "LISTEN",
        0x0B: "CLOSING",
    }
)

_LISTEN = 0x0A

# Linux keeps a thread's comm in 16 bytes including the terminating NUL.
_COMM_MAX = 15

_TCP_TABLES = ("tcp", "tcp6")


def _resolve(pid: int | None) -> int:
    return os.getpid() if pid is None else pid


@contextlib.contextmanager
def _process_must_exist(pid: int) -> Iterator[None]:
    """Turn "the process is gone" from /proc or psutil into `ProcessLookupError`, one error for callers."""
    try:
        yield
    except (FileNotFoundError, psutil.NoSuchProcess) as exc:
        raise ProcessLookupError(f"no process with pid {pid}") from exc


def _process(pid: int | None) -> psutil.Process:
    pid = _resolve(pid)
    with _process_must_exist(pid):
        return psutil.Process(pid)


def fd_count(pid: int | None = None) -> int:
    """Number of open file descriptors of process `pid` (default: this process).

    For this process the descriptor used to list /proc/self/fd is not counted, so the result is
    the number of descriptors the program itself holds.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    pid = _resolve(pid)
    with _process_must_exist(pid):
        count = len(os.listdir(f"/proc/{pid}/fd"))
    # os.listdir holds a directory descriptor open while it reads, and it shows in our own listing.
    return count - 1 if pid == os.getpid() else count


def thread_count(pid: int | None = None) -> int:
    """Number of native threads of process `pid` (default: this process), from /proc/PID/task.

    Unlike `threading.enumerate()` this counts threads started by native code too, and a joined
    Python thread stays counted until the OS thread has really exited.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    pid = _resolve(pid)
    with _process_must_exist(pid):
        return len(os.listdir(f"/proc/{pid}/task"))


def _task_ids(pid: int) -> list[str]:
    with _process_must_exist(pid):
        return os.listdir(f"/proc/{pid}/task")


def thread_names(pid: int | None = None) -> list[str]:
    """OS names (comm, at most 15 characters) of the threads of process `pid`, in task-id order.

    Threads that exit while the list is read are left out.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    pid = _resolve(pid)
    names: list[str] = []
    for tid in sorted(_task_ids(pid), key=int):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                names.append(f.read().rstrip("\n"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return names


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of process `pid` (default: this process), in bytes.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    proc = _process(pid)
    with _process_must_exist(proc.pid):
        return int(proc.memory_info().rss)


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time of process `pid` (default: this process), children excluded.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    proc = _process(pid)
    with _process_must_exist(proc.pid):
        times = proc.cpu_times()
    return float(times.user + times.system)


def threads_cpu_seconds(prefix: str = "connlab-", pid: int | None = None) -> float:
    """Summed user plus system CPU time of the live threads of `pid` whose OS name starts with `prefix`.

    Server threads are named `connlab-<backend>[-n]`; Linux truncates thread names to 15
    characters, so a longer `prefix` is truncated the same way before comparing. Threads that have
    already exited are not counted (their time is only in the process total, `cpu_seconds`).

    Raises:
        ProcessLookupError: the process does not exist.
    """
    pid = _resolve(pid)
    prefix = prefix[:_COMM_MAX]
    ticks = 0
    for tid in _task_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The comm field is parenthesised and may itself contain spaces and ")": split at the last one.
        head, _, tail = stat.rpartition(")")
        comm = head.partition("(")[2]
        if not comm.startswith(prefix):
            continue
        # `tail` starts at field 3 (state); utime and stime are fields 14 and 15 of proc(5).
        fields = tail.split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class PortView:
    """The kernel's server-side sockets on one local port, counted by TCP state name (LISTEN excluded)."""

    #: The local port the sockets are bound to.
    port: int
    #: When not None, only sockets whose inode is among this process's fds were counted.
    pid: int | None
    #: Count per state name of `TCP_STATES`; states with no socket are absent. Read-only.
    counts: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Frozen means frozen: nobody may edit the counts a view was taken with.
        object.__setattr__(self, "counts", MappingProxyType(dict(self.counts)))

    def count(self, state: str) -> int:
        """Number of sockets in `state` (a name of `TCP_STATES`, e.g. "FIN_WAIT2").

        Raises:
            ValueError: `state` is not a TCP state name (a typo must not read as zero).
        """
        if state not in TCP_STATES.values():
            raise ValueError(
                f"state: unknown TCP state {state!r}, expected one of {sorted(TCP_STATES.values())}"
            )
        return self.counts.get(state, 0)

    @property
    def established(self) -> int:
        """Sockets in ESTABLISHED."""
        return self.count("ESTABLISHED")

    @property
    def close_wait(self) -> int:
        """Sockets in CLOSE_WAIT: the peer closed, this side has not closed yet."""
        return self.count("CLOSE_WAIT")

    @property
    def time_wait(self) -> int:
        """Sockets in TIME_WAIT: closed by this side first; they belong to no process (inode 0)."""
        return self.count("TIME_WAIT")

    @property
    def total(self) -> int:
        """All counted sockets, that is every non-LISTEN socket on the port."""
        return sum(self.counts.values())


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds, from its /proc/PID/fd links `socket:[INODE]`.

    Raises:
        ProcessLookupError: the process does not exist.
    """
    fd_dir = f"/proc/{pid}/fd"
    with _process_must_exist(pid):
        fds = os.listdir(fd_dir)
    inodes: set[int] = set()
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except (FileNotFoundError, ProcessLookupError):
            # Closed between the listing and the readlink.
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _tcp_rows(net_dir: str) -> Iterator[tuple[int, int, int, tuple[str, str, str]]]:
    """Yield (local port, state code, inode, (table, local address, remote address)) for every row
    of `net_dir`/tcp and `net_dir`/tcp6."""
    for table in _TCP_TABLES:
        try:
            with open(f"{net_dir}/{table}", encoding="ascii") as f:
                lines = f.readlines()
        except FileNotFoundError:
            # No IPv6 in this kernel (no tcp6), or the process whose namespace we read is gone.
            continue
        for line in lines[1:]:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            cols = line.split()
            if len(cols) < 10:
                continue
            local_port = int(cols[1].rpartition(":")[2], 16)
            yield local_port, int(cols[3], 16), int(cols[9]), (table, cols[1], cols[2])


# netlink sock_diag (what `ss` uses): the kernel filters by port and answers from a consistent
# walk of its tables, where /proc/net/tcp is read in pages while sockets come and go.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16sI8s")  # inet_diag_sockid: sport, dport, src, dst, if, cookie
_DIAG_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans, then the id
_DIAG_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_TCP_LISTEN = 10
_TCP_NEW_SYN_RECV = 12  # a request socket; /proc/net/tcp shows it as SYN_RECV
_ALL_BUT_LISTEN = ((1 << 13) - 1) & ~(1 << _TCP_LISTEN)


def diag_sockets(port: int, listen: bool = False) -> list[tuple[str, int, int]]:
    """(state name, inode, receive queue) of every TCP socket whose local port is `port`, IPv4
    and IPv6, in this network namespace: the LISTEN ones with `listen` (their receive queue is
    the accept queue's length), the others without. Raises OSError where sock_diag is missing."""
    return [(state, inode, rqueue) for state, inode, rqueue, _, _ in _diag(port, listen)]


def _diag(port: int, listen: bool) -> list[tuple[str, int, int, int, int]]:
    """`diag_sockets` with each socket's remote port and send queue (a listener's: its backlog)."""
    found: list[tuple[str, int, int, int, int]] = []
    states = 1 << _TCP_LISTEN if listen else _ALL_BUT_LISTEN
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, states)
            req += _SOCKID.pack(port, 0, bytes(16), bytes(16), 0, b"\xff" * 8)
            flags = _NLM_F_REQUEST | _NLM_F_DUMP
            nl.send(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req)
            while True:
                data, off, done = nl.recv(1 << 20), 0, False
                while off + _NLMSG.size <= len(data):
                    length, kind, *_ = _NLMSG.unpack_from(data, off)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    body = off + _NLMSG.size
                    if kind == _NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, body)
                        raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                    _, state, _, _ = _DIAG_MSG_HEAD.unpack_from(data, body)
                    sport, dport = _SOCKID.unpack_from(data, body + _DIAG_MSG_HEAD.size)[:2]
                    tail = _DIAG_MSG_TAIL.unpack_from(data, body + _DIAG_MSG_HEAD.size + _SOCKID.size)
                    rqueue, wqueue, inode = tail[1], tail[2], tail[4]
                    if sport == port:
                        name = "SYN_RECV" if state == _TCP_NEW_SYN_RECV else TCP_STATES.get(state, str(state))
                        found.append((name, inode, rqueue, dport, wqueue))
                    off += (length + 3) & ~3
                if done:
                    break
    return found


def server_sockets(port: int) -> list[tuple[str, int, int]]:
    """(state name, inode, remote port) of the non-LISTEN sockets on local `port`, whichever
    process holds them: the kernel's view, so a server that forks per connection is seen whole.
    An inode of 0 is a socket no process holds: still in the accept queue, or closed (TIME_WAIT,
    FIN_WAIT). From sock_diag, or the /proc tables where it is missing."""
    try:
        return [(state, inode, peer) for state, inode, _, peer, _ in _diag(port, listen=False)]
    except OSError:
        pass
    seen: dict[tuple[str, str, str], tuple[str, int, int]] = {}
    for local_port, state, inode, key in _tcp_rows("/proc/net"):
        if local_port == port and state != _LISTEN:
            name = TCP_STATES.get(state, f"UNKNOWN_{state:02X}")
            seen[key] = (name, inode, int(key[2].rpartition(":")[2], 16))
    return list(seen.values())


def accepted_socket(port: int, peer_port: int) -> int | None:
    """The inode of the server's socket on local `port` for the client whose local port is
    `peer_port`, once some process has accepted it (an inode is given at accept); else None."""
    for _, inode, peer in server_sockets(port):
        if peer == peer_port and inode:
            return inode
    return None


def tree_socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets held by `pid` or any of its descendants (`process_tree`).

    Raises:
        ProcessLookupError: the process `pid` does not exist.
    """
    inodes = socket_inodes(pid)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(ProcessLookupError):
            inodes |= socket_inodes(child)
    return inodes


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a server that forks per connection, or a shell's child).

    Raises:
        ProcessLookupError: the process does not exist.
    """
    with _process_must_exist(pid):
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    return [pid, *(c.pid for c in children)]


def accept_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the listener on `port`; None without sock_diag."""
    try:
        return sum(rqueue for _, _, rqueue in diag_sockets(port, listen=True))
    except OSError:
        return None


def listen_queue(port: int) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, the backlog that bounds it) of the listener on
    `port`; None without sock_diag or without a listener."""
    try:
        listeners = _diag(port, listen=True)
    except OSError:
        return None
    if not listeners:
        return None
    return sum(rq for _, _, rq, _, _ in listeners), min(backlog for *_, backlog in listeners)


def port_view(port: int, pid: int | None = None) -> PortView:
    """Count the server-side sockets whose LOCAL port is `port`, by TCP state, LISTEN excluded.

    Client-side sockets of this machine connected to `port` have it as their remote port and are
    not counted. With `pid`, only sockets whose inode is among the fds of that process or its
    descendants are counted
    (TIME_WAIT sockets, inode 0, belong to no process and are then never counted), and the
    tables are read in that process's network namespace.

    Raises:
        ProcessLookupError: `pid` was given and the process does not exist.
    """
    owned: set[int] | None = None
    net_dir = "/proc/net"
    if pid is not None:
        owned = tree_socket_inodes(pid)
        net_dir = f"/proc/{pid}/net"
    if pid is None or _same_netns(pid):
        try:
            counts: dict[str, int] = {}
            for name, inode, _ in diag_sockets(port):
                if owned is None or inode in owned:
                    counts[name] = counts.get(name, 0) + 1
            return PortView(port=port, pid=pid, counts=counts)
        except OSError:
            pass  # no sock_diag here: read the tables
    # The kernel does not snapshot these tables: a row can be read twice while other sockets come
    # and go in the same hash chain. A TCP socket is one (local, remote) pair, so count each once.
    seen: dict[tuple[str, str, str], int] = {}
    for local_port, state, inode, key in _tcp_rows(net_dir):
        if local_port != port or state == _LISTEN:
            continue
        if owned is not None and inode not in owned:
            continue
        seen[key] = state
    counts = {}
    for state in seen.values():
        name = TCP_STATES.get(state, f"UNKNOWN_{state:02X}")
        counts[name] = counts.get(name, 0) + 1
    return PortView(port=port, pid=pid, counts=counts)


def _same_netns(pid: int) -> bool:
    """Whether process `pid` shares this process's network namespace."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def owned_server_sockets(port: int, pid: int | None = None) -> int:
    """Non-LISTEN sockets on local `port` owned by process `pid` (default: this process).

    Raises:
        ProcessLookupError: the process does not exist.
    """
    return port_view(port, _resolve(pid)).total


class ServerLike(Protocol):
    """What `phantoms` needs of a server running in this process (`connlab.Server` fits)."""

    @property
    def address(self) -> tuple[str, int]:
        """The listener's (host, port)."""
        ...

    def stats(self) -> Mapping[str, Any]:
        """Counters, including "active": the connections the server holds."""
        ...


def phantoms(server: ServerLike) -> int:
    """The server's `active` count minus the sockets on its port that this process really holds.

    Zero is the "no phantoms" guarantee (DESIGN §4); it holds only at quiescence, which the caller
    must wait for. Positive: connections counted but without a socket; negative: sockets held
    but not counted.
    """
    active = int(server.stats()["active"])
    return active - owned_server_sockets(server.address[1], os.getpid())


@dataclass(frozen=True)
class Snapshot:
    """Resource use of one process at one moment."""

    #: The process measured.
    pid: int
    #: Open file descriptors (`fd_count`).
    fds: int
    #: Native threads (`thread_count`).
    threads: int
    #: Resident set size in bytes (`rss_bytes`).
    rss_bytes: int
    #: User plus system CPU seconds so far (`cpu_seconds`).
    cpu_seconds: float


def snapshot(pid: int | None = None) -> Snapshot:
    """Take a `Snapshot` of process `pid` (default: this process).

    Raises:
        ProcessLookupError: the process does not exist.
    """
    pid = _resolve(pid)
    return Snapshot(
        pid=pid,
        fds=fd_count(pid),
        threads=thread_count(pid),
        rss_bytes=rss_bytes(pid),
        cpu_seconds=cpu_seconds(pid),
    )


def raise_nofile(needed: int) -> None:
    """Raises this process's RLIMIT_NOFILE soft limit to `needed` (children inherit it), and the
    hard limit too where it is lower and the process may (CAP_SYS_RESOURCE, as root); OSError
    saying so where it may not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (OSError, ValueError):
            raise OSError(
                f"RLIMIT_NOFILE hard limit {hard} is below the {needed} fds needed, and may not be raised"
            ) from None
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

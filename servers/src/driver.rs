//! The connection loop every backend shares.
//!
//! A [`Link`] is one connection: its socket, its sans-IO core and its
//! registry entry. [`Link::drive`] moves bytes as the core says until the
//! socket would block, passes the stop and the clock to the core, carries out
//! its half-close and close (`SO_LINGER` 0 on abort), and takes a hang-up
//! report as the socket's error (`SO_ERROR`) or EOF. Its `Drop` is the safety
//! net: a link dropped while open still closes its socket and leaves the
//! registry, so no backend's unwinding leaves a phantom.
//!
//! The loop is generic over [`Io`], the calls in which backends' sockets
//! differ: a non-blocking [`Socket`] (`poll`, `epoll`, `pool`), a tokio
//! stream through its readiness API (`tokio`), or a blocking socket bounded
//! by the core's deadline (`blocking`). What a backend adds is only how it
//! waits for what [`Next::Wait`] asks.
//!
//! [`Timers`], a heap of the cores' deadlines, serves the backends that wait
//! for many connections in one thread.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{SockRef, Socket};

use crate::conn::{Action, Conn, Limits};
use crate::gate::Gate;
use crate::registry::ConnHandle;
use crate::sys;

/// Size of a backend's read buffer (one per thread, or per busy connection):
/// [`Link::drive`] gives an empty scratch buffer this much, and grows a
/// smaller one to it once a read fills it.
pub(crate) const READ_CHUNK: usize = 64 << 10;

/// The socket calls a backend's connections differ in. Everything else the
/// driver does through the fd ([`AsFd`]): `shutdown(SHUT_WR)`, `SO_ERROR`,
/// `FIONREAD`, `SO_LINGER`.
pub(crate) trait Io: AsFd {
    /// Whether a call may block for long (so the driver reads the clock
    /// again after it).
    const MAY_BLOCK: bool = false;

    /// Sends from `data` without raising SIGPIPE. WouldBlock means "not now";
    /// a call that blocks is bounded by the core's `deadline`.
    fn send(&mut self, data: &[u8], deadline: Option<Instant>) -> io::Result<usize>;

    /// Receives into the spare capacity of `buf`, extending its length; Ok(0)
    /// is the peer's FIN. WouldBlock means "not now"; a call that blocks is
    /// bounded by the core's `deadline`.
    fn recv(&mut self, buf: &mut Vec<u8>, deadline: Option<Instant>) -> io::Result<usize>;

    /// Bytes received from the kernel and not yet returned by `recv` (a
    /// completion-based socket takes them off the kernel's queue before the
    /// driver asks): at the stop they count as unread input, as `FIONREAD`'s do.
    fn buffered(&self) -> usize {
        0
    }

    /// The driver has just passed the stop to the core (a backend that wakes
    /// parked threads until each has seen the stop learns it here).
    fn stop_seen(&mut self) {}
}

/// A non-blocking socket: every call with `MSG_DONTWAIT`.
impl Io for Socket {
    fn send(&mut self, data: &[u8], _: Option<Instant>) -> io::Result<usize> {
        sys::send(self.as_raw_fd(), data, libc::MSG_DONTWAIT)
    }

    fn recv(&mut self, buf: &mut Vec<u8>, _: Option<Instant>) -> io::Result<usize> {
        sys::recv_into(self.as_raw_fd(), buf, libc::MSG_DONTWAIT)
    }
}

/// What a connection waits for after [`Link::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interest {
    /// Wait for readability.
    pub read: bool,
    /// Wait for writability.
    pub write: bool,
    /// Wake by then, readiness or not.
    pub deadline: Option<Instant>,
}

impl Interest {
    /// As `poll(2)` events.
    pub fn poll_events(&self) -> libc::c_short {
        (if self.read { libc::POLLIN } else { 0 }) | (if self.write { libc::POLLOUT } else { 0 })
    }

    /// As `epoll` events (without flags such as `EPOLLONESHOT`).
    pub fn epoll_events(&self) -> u32 {
        self.poll_events() as u32
    }
}

/// The outcome of [`Link::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Open: wait for this.
    Wait(Interest),
    /// Closed and unregistered: forget the connection.
    Done,
}

/// One connection: socket, core and registry entry.
#[derive(Debug)]
pub(crate) struct Link<I: Io> {
    /// The socket; closed (by drop) when the core says so.
    io: Option<I>,
    /// The sans-IO core.
    conn: Conn,
    /// The registry entry the core reports to; `None` once unregistered.
    handle: Option<ConnHandle>,
    /// Whether the stop was passed to the core yet.
    stop_seen: bool,
    /// Whether the socket may have input (set by readiness, cleared by
    /// WouldBlock or a short read): edge-triggered waits need it remembered.
    readable: bool,
    /// Whether the socket may take output (cleared by WouldBlock).
    writable: bool,
    /// Whether the poller reported the peer's FIN or an error. A short read
    /// then does not mean the queue is drained: the EOF or error is still
    /// behind the data, and an edge-triggered poller will not report it again.
    read_closed: bool,
    /// The earliest deadline this link has in [`Timers`], if any.
    pub scheduled: Option<Instant>,
}

impl<I: Io> Link<I> {
    /// A connection the gate just admitted; journals None→Connecting.
    pub fn new(io: I, mut handle: ConnHandle, limits: Limits) -> Self {
        let conn = Conn::new(limits, Instant::now(), &mut handle);
        Link {
            io: Some(io),
            conn,
            handle: Some(handle),
            stop_seen: false,
            readable: true,
            writable: true,
            read_closed: false,
            scheduled: None,
        }
    }

    /// The socket, until the link is done.
    pub fn io(&self) -> Option<&I> {
        self.io.as_ref()
    }

    /// The socket's fd (−1 once the link is done).
    pub fn fd(&self) -> RawFd {
        self.io.as_ref().map_or(-1, |io| io.as_fd().as_raw_fd())
    }

    /// The registry id (unique for the server's life).
    pub fn id(&self) -> u64 {
        self.handle.as_ref().map_or(0, ConnHandle::id)
    }

    /// Whether the connection holds nothing in progress (its buffers are freed).
    pub fn is_idle(&self) -> bool {
        self.conn.is_idle()
    }

    /// Whether the stop has been passed to the core.
    pub fn stop_seen(&self) -> bool {
        self.stop_seen
    }

    /// Records readiness reported by a poller; `read_closed` when the report
    /// includes the peer's FIN (EPOLLRDHUP) or an error.
    pub fn ready(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.readable |= readable;
        self.writable |= writable;
        self.read_closed |= read_closed;
    }

    /// Closes the connection because the backend cannot serve it (e.g. no
    /// thread could be spawned for it): `io_error`, abortive.
    pub fn fail(mut self, err: &io::Error) {
        if let Some(handle) = self.handle.as_mut() {
            self.conn.on_error(err, Instant::now(), handle);
        }
        self.close();
    }

    /// Reads, writes, half-closes and closes as the core says, until the
    /// socket would block; passes the stop to the core once `gate` has
    /// published it. `hangup` is a POLLHUP/POLLERR report: taken as the
    /// socket's error (or EOF) when the core neither reads nor writes, so it
    /// is never polled for again.
    pub fn drive(&mut self, scratch: &mut Vec<u8>, gate: &Gate, mut hangup: bool) -> Next {
        let (Some(io), Some(handle)) = (self.io.as_mut(), self.handle.as_mut()) else { return Next::Done };
        let conn = &mut self.conn;
        let next = loop {
            let now = Instant::now();
            if let (false, Some(grace_end)) = (self.stop_seen, gate.grace_end()) {
                self.stop_seen = true;
                let rx_empty =
                    io.buffered() == 0 && sys::fionread(io.as_fd().as_raw_fd()).map_or(true, |n| n == 0);
                conn.on_stop(now, grace_end, rx_empty, gate.linger_idle(), handle);
                io.stop_seen();
            }
            if conn.deadline().is_some_and(|at| at <= now) {
                conn.on_timer(now, handle);
            }
            match conn.action() {
                Action::Continue => {}
                Action::ShutdownWrite => {
                    // An error means the peer is gone; the linger ends it.
                    let _ = SockRef::from(&*io).shutdown(Shutdown::Write);
                    conn.on_shutdown_write(now);
                    continue;
                }
                Action::Close | Action::Abort => break Next::Done,
            }
            if conn.wants_write() && self.writable {
                let pending = conn.pending().len();
                let sent = io.send(conn.pending(), conn.deadline());
                // Taken after the call when it may have blocked for long.
                let now = if I::MAY_BLOCK { Instant::now() } else { now };
                match sent {
                    // A zero-byte send of a non-empty buffer is a short write.
                    Ok(n) => {
                        self.writable = n == pending;
                        conn.on_written(n, now, handle);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => conn.on_error(&e, now, handle),
                }
                // The action and the clocks first: a graceful close that has
                // flushed half-closes before any further read (which would
                // block a blocking socket).
                continue;
            }
            if conn.wants_read() && self.readable {
                if scratch.capacity() == 0 {
                    scratch.reserve_exact(READ_CHUNK);
                }
                scratch.clear();
                let received = io.recv(scratch, conn.deadline());
                let now = if I::MAY_BLOCK { Instant::now() } else { now };
                match received {
                    Ok(0) => conn.on_eof(now, handle),
                    Ok(n) => {
                        // A short read drained the kernel's queue: a later
                        // arrival is a new readiness event, even edge-triggered.
                        let full = n == scratch.capacity();
                        self.readable = full || self.read_closed;
                        conn.on_read(scratch, now, handle);
                        if full && scratch.capacity() < READ_CHUNK {
                            // A small buffer filled up: more is coming.
                            scratch.clear();
                            scratch.reserve_exact(READ_CHUNK);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => conn.on_error(&e, now, handle),
                }
                continue;
            }
            if !conn.wants_read() && !conn.wants_write() {
                if hangup {
                    hangup = false;
                    match SockRef::from(&*io).take_error() {
                        Ok(Some(e)) | Err(e) => conn.on_error(&e, now, handle),
                        Ok(None) => conn.on_eof(now, handle),
                    }
                } else {
                    // An open core always reads or writes; waiting for
                    // neither would never end (and would spin a blocking
                    // backend).
                    conn.on_error(&io::Error::other("connection has nothing to wait for"), now, handle);
                }
                continue;
            }
            break Next::Wait(Interest {
                read: conn.wants_read(),
                write: conn.wants_write(),
                deadline: conn.deadline(),
            });
        };
        if next == Next::Done {
            self.close();
        }
        next
    }

    /// Closes the socket as the core decided (abortively: `SO_LINGER` 0, so
    /// `close()` sends an RST), then unregisters the connection.
    fn close(&mut self) {
        if let Some(io) = self.io.take() {
            if self.conn.action() == Action::Abort {
                let _ = SockRef::from(&io).set_linger(Some(Duration::ZERO));
            }
            drop(io);
        }
        if let Some(handle) = self.handle.take() {
            handle.unregister(&self.conn);
        }
    }
}

/// Closes a connection whose socket is already gone (the backend's runtime
/// could not take it) as `io_error`: its registry entry goes, no phantom
/// remains.
pub(crate) fn abandon(mut handle: ConnHandle, limits: Limits, err: &io::Error) {
    let now = Instant::now();
    let mut conn = Conn::new(limits, now, &mut handle);
    conn.on_error(err, now, &mut handle);
    handle.unregister(&conn);
}

impl<I: Io> Drop for Link<I> {
    /// A link dropped while open (a backend thread unwinding, a runtime
    /// dropping an unfinished task) still closes its socket and leaves the
    /// registry, as `io_error`: no phantom remains.
    fn drop(&mut self) {
        if let Some(handle) = self.handle.as_mut() {
            let err = io::Error::other("connection dropped by its backend");
            self.conn.on_error(&err, Instant::now(), handle);
            self.close();
        }
    }
}

/// The deadlines of a backend's connections, soonest first, keyed by the
/// connection's slot and registry id (slots are reused; ids are not).
///
/// A link keeps at most one live entry: a new deadline is pushed only when it
/// is earlier than the one already scheduled ([`Link::scheduled`]); a later
/// one waits for the earlier entry to fire and is rescheduled then.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    /// `(when, slot, id)`, earliest first; stale entries are skipped on pop.
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    /// Schedules `link`, living in `slot`, for its `deadline` if earlier than
    /// what it has.
    pub fn schedule<I: Io>(&mut self, slot: usize, link: &mut Link<I>, deadline: Option<Instant>) {
        if let Some(at) = deadline.filter(|&at| link.scheduled.is_none_or(|s| at < s)) {
            link.scheduled = Some(at);
            self.heap.push(Reverse((at, slot, link.id())));
        }
    }

    /// The earliest entry's time (possibly stale: waking for it is harmless).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Pops the next entry due by `now`: `(slot, id, when)`. The caller checks
    /// that the slot still holds that id with `scheduled == Some(when)`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u64, Instant)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => {
                let Reverse((at, slot, id)) = self.heap.pop()?;
                Some((slot, id, at))
            }
            _ => None,
        }
    }

    /// Whether `link` is the live owner of a popped entry; if so the entry is
    /// consumed (the link has no scheduled deadline until rescheduled).
    pub fn claim<I: Io>(link: &mut Link<I>, id: u64, at: Instant) -> bool {
        if link.id() == id && link.scheduled == Some(at) {
            link.scheduled = None;
            true
        } else {
            false
        }
    }
}

/// Time until `at` (none: wait forever).
pub(crate) fn until(at: Option<Instant>, now: Instant) -> Option<Duration> {
    at.map(|at| at.saturating_duration_since(now))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::mem::MaybeUninit;
    use std::net::SocketAddr;
    use std::os::fd::BorrowedFd;
    use std::sync::Arc;

    use socket2::{Domain, Type};

    use super::*;
    use crate::kind::BackendKind;
    use crate::registry::Registry;

    /// A blocking socket played from a script: each `recv` returns the next
    /// chunk; one with nothing left would block, so it records whether the
    /// write side was shut down by then and returns WouldBlock (a timeout).
    struct Scripted {
        /// The connection's end of a socket pair (for the fd calls).
        sock: Socket,
        /// The other end: EOF there means `shutdown(SHUT_WR)` was done.
        peer: Socket,
        /// What each `recv` returns, in order.
        input: VecDeque<Vec<u8>>,
        /// Everything sent.
        sent: Vec<u8>,
        /// For each `recv` that would have blocked: whether the write side
        /// was shut down before it.
        blocked: Vec<bool>,
    }

    impl AsFd for Scripted {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.sock.as_fd()
        }
    }

    impl Io for Scripted {
        const MAY_BLOCK: bool = true;

        fn send(&mut self, data: &[u8], _: Option<Instant>) -> io::Result<usize> {
            self.sent.extend_from_slice(data);
            Ok(data.len())
        }

        fn recv(&mut self, buf: &mut Vec<u8>, _: Option<Instant>) -> io::Result<usize> {
            if let Some(chunk) = self.input.pop_front() {
                assert!(chunk.len() <= buf.capacity() - buf.len(), "the script fits the buffer");
                buf.extend_from_slice(&chunk);
                return Ok(chunk.len());
            }
            let mut byte = [MaybeUninit::uninit()];
            let half_closed = matches!(self.peer.recv(&mut byte), Ok(0));
            self.blocked.push(half_closed);
            Err(ErrorKind::WouldBlock.into())
        }
    }

    /// A blocking socket whose read fills the buffer exactly with a frame and
    /// a header over `max_frame`: the answer is flushed and the write side
    /// shut down before the thread blocks in `recv` again (else it would
    /// wait there, half-close never sent, with no clock running).
    #[test]
    fn a_blocking_close_half_closes_before_it_blocks_in_recv() {
        let (sock, peer) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        peer.set_nonblocking(true).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let gate = Gate::new(Arc::new(Registry::new(BackendKind::Blocking, addr, 1, 0)));
        let handle = gate.admit(&sock, addr).expect("admitted");
        let mut input = crate::codec::encode(&[7; 100]);
        input.extend_from_slice(&crate::codec::header(2000));
        input.resize(512, 9);
        let second = 1 << 10;
        let io =
            Scripted { sock, peer, input: VecDeque::from([input]), sent: Vec::new(), blocked: Vec::new() };
        let limits = Limits {
            max_frame: second as u32,
            read_while_writing: false,
            ..crate::Config::default().limits()
        };
        let mut link = Link::new(io, handle, limits);
        let mut scratch = Vec::with_capacity(512);
        assert!(matches!(link.drive(&mut scratch, &gate, false), Next::Wait(Interest { read: true, .. })));
        let io = link.io().expect("lingering, still open");
        assert_eq!(io.sent, crate::codec::encode(&[7; 100]), "the answer before the violation");
        assert_eq!(io.blocked, [true], "the one blocking recv came after the half-close");
    }
}

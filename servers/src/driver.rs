//! What the readiness-based backends share: a [`Link`] (socket + core +
//! registry handle) that moves bytes until the socket would block, and
//! [`Timers`], a heap of the cores' deadlines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::conn::{Action, Conn, Limits};
use crate::registry::{ConnHandle, Registry};
use crate::sys;

/// Size of a backend's read buffer (one per thread, or per busy connection).
pub(crate) const READ_CHUNK: usize = 64 << 10;

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

/// The outcome of [`Link::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Open: wait for this.
    Wait(Interest),
    /// Closed and unregistered: forget the connection.
    Done,
}

/// One connection of a readiness-based backend.
#[derive(Debug)]
pub(crate) struct Link {
    /// The socket; closed (by drop) in [`Link::drive`] when the core says so.
    sock: Option<Socket>,
    /// The sans-IO core.
    conn: Conn,
    /// The registry entry the core reports to.
    handle: Option<ConnHandle>,
    /// Whether stop was passed to the core yet.
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

impl Link {
    /// Registers a connection just accepted, or rejects it (closed at once,
    /// unread) when the registry is full.
    pub fn admit(registry: &Arc<Registry>, limits: Limits, sock: Socket, peer: SocketAddr) -> Option<Link> {
        let mut handle = registry.register(peer)?;
        let conn = Conn::new(limits, Instant::now(), &mut handle);
        Some(Link {
            sock: Some(sock),
            conn,
            handle: Some(handle),
            stop_seen: false,
            readable: true,
            writable: true,
            read_closed: false,
            scheduled: None,
        })
    }

    /// The socket's fd (valid until the link is done).
    pub fn fd(&self) -> RawFd {
        self.sock.as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    /// The registry id (unique for the server's life).
    pub fn id(&self) -> u64 {
        self.handle.as_ref().map_or(0, ConnHandle::id)
    }

    /// Whether the connection holds nothing in progress (its buffers are freed).
    pub fn is_idle(&self) -> bool {
        self.conn.is_idle()
    }

    /// Whether stop has been passed to the core.
    pub fn stop_seen(&self) -> bool {
        self.stop_seen
    }

    /// Records readiness reported by poll/epoll; `read_closed` when the
    /// report includes the peer's FIN (EPOLLRDHUP) or an error.
    pub fn ready(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.readable |= readable;
        self.writable |= writable;
        self.read_closed |= read_closed;
    }

    /// Closes the connection because the backend cannot serve it (e.g. no
    /// thread could be spawned for it): `io_error`, abortive.
    pub fn fail(mut self, err: &std::io::Error) {
        let handle = self.handle.as_mut().expect("link is open");
        self.conn.on_error(err, Instant::now(), handle);
        self.close();
    }

    /// Reads, writes, half-closes and closes as the core says, until the
    /// socket would block; `grace_end` is set once stop began. `hangup` is a
    /// POLLHUP/POLLERR report: taken as the socket's error (or EOF) when the
    /// core neither reads nor writes, so it is never polled for again.
    pub fn drive(&mut self, scratch: &mut Vec<u8>, grace_end: Option<Instant>, hangup: bool) -> Next {
        let fd = self.fd();
        let handle = self.handle.as_mut().expect("link is open");
        let conn = &mut self.conn;
        let mut hangup = hangup;
        let next = loop {
            let now = Instant::now();
            if let (Some(grace_end), false) = (grace_end, self.stop_seen) {
                self.stop_seen = true;
                let rx_empty = sys::fionread(fd).map_or(true, |n| n == 0);
                conn.on_stop(now, grace_end, rx_empty, handle);
            }
            if conn.deadline().is_some_and(|at| at <= now) {
                conn.on_timer(now, handle);
            }
            match conn.action() {
                Action::Continue => {}
                Action::ShutdownWrite => {
                    // An error means the peer is gone; the linger ends it.
                    let _ = self.sock.as_ref().map(|s| s.shutdown(Shutdown::Write));
                    conn.on_shutdown_write(now);
                    continue;
                }
                Action::Close | Action::Abort => break Next::Done,
            }
            let mut progressed = false;
            if conn.wants_write() && self.writable {
                progressed = true;
                let pending = conn.pending().len();
                match sys::send(fd, conn.pending()) {
                    Ok(n) => {
                        self.writable = n == pending;
                        conn.on_written(n, now, handle);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => conn.on_error(&e, now, handle),
                }
            }
            if conn.wants_read() && self.readable {
                progressed = true;
                if scratch.capacity() < READ_CHUNK {
                    scratch.reserve_exact(READ_CHUNK);
                }
                scratch.clear();
                match sys::recv_into(fd, scratch) {
                    Ok(0) => conn.on_eof(now, handle),
                    Ok(n) => {
                        // A short read drained the kernel's queue: a later
                        // arrival is a new readiness event, even edge-triggered.
                        self.readable = n == scratch.capacity() || self.read_closed;
                        conn.on_read(scratch, now, handle);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => conn.on_error(&e, now, handle),
                }
            }
            if progressed {
                continue;
            }
            if hangup && !conn.wants_read() && !conn.wants_write() {
                hangup = false;
                match sys::take_socket_error(fd) {
                    Ok(Some(e)) | Err(e) => conn.on_error(&e, now, handle),
                    Ok(None) => conn.on_eof(now, handle),
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

    /// Closes the socket as the core decided (abortively: `SO_LINGER` 0),
    /// then unregisters the connection.
    fn close(&mut self) {
        if let Some(sock) = self.sock.take() {
            if self.conn.action() == Action::Abort {
                let _ = sock.set_linger(Some(Duration::ZERO));
            }
            drop(sock);
        }
        if let Some(handle) = self.handle.take() {
            handle.unregister(&self.conn);
        }
    }
}

impl Drop for Link {
    /// A link dropped while open (a backend thread unwinding) still closes
    /// its socket and leaves the registry, as `io_error`: no phantom remains.
    fn drop(&mut self) {
        if let Some(handle) = self.handle.as_mut() {
            let err = std::io::Error::other("connection dropped by its backend");
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
    /// what it has. Returns whether an entry was pushed.
    pub fn schedule(&mut self, slot: usize, link: &mut Link, deadline: Option<Instant>) -> bool {
        match deadline {
            Some(at) if link.scheduled.is_none_or(|s| at < s) => {
                link.scheduled = Some(at);
                self.heap.push(Reverse((at, slot, link.id())));
                true
            }
            _ => false,
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
    pub fn claim(link: &mut Link, id: u64, at: Instant) -> bool {
        if link.id() == id && link.scheduled == Some(at) {
            link.scheduled = None;
            true
        } else {
            false
        }
    }
}

/// Milliseconds-rounded-up time until `at` (none: wait forever).
pub(crate) fn until(at: Option<Instant>, now: Instant) -> Option<Duration> {
    at.map(|at| at.saturating_duration_since(now))
}

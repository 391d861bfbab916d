//! The accept gate: who is admitted, and when admission ends (DESIGN.md §4).
//!
//! [`Gate`] is shared by a server's threads. It admits each connection just
//! accepted — registers it, or rejects it over `max_connections` — and `stop`
//! closes it: admission ends, the counts the stop report is computed from are
//! taken, and the end of the grace is published, at one instant under one
//! lock. So no connection is admitted after the counts were taken, and every
//! connection driven from then on sees the stop, before the listener closes:
//! a client that sees the listener gone cannot finish its request unseen and
//! lose the draining close. [`Acceptor::accept_all`] calls `accept(2)` under
//! the same lock, so once `close` has returned this server takes no more
//! connections from the queue: on a handoff the listening socket lives on in
//! the successor, and what is queued there is the successor's to serve.
//!
//! [`Acceptor`] is the sans-IO half of an accept loop, like the core is of a
//! connection: fed each `accept(2)` result and the clock, it says what to do
//! next — take the connection, try again, wait for readiness, or ignore the
//! listener for [`ACCEPT_BACKOFF`] after EMFILE/ENFILE and then accept until
//! WouldBlock without waiting (an edge-triggered poller would never report
//! connections queued meanwhile).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::registry::{ConnHandle, Registry};
use crate::shutdown::StopReport;

/// How long the listener is ignored after EMFILE/ENFILE (or another
/// resource error), and how long a failed readiness wait (ENOMEM) is waited
/// out.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Admission and its end, shared by every thread of a server.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Whether connections are still admitted. Held from this check to the
    /// registration, and by [`Gate::close`] while it ends admission and takes
    /// the counts, so the two never interleave.
    open: Mutex<bool>,
    /// The end of the grace, published when admission ends.
    grace_end: OnceLock<Instant>,
    /// `(active, forced)` when admission ended.
    at_close: OnceLock<(u64, u64)>,
    /// Whether idle connections close with the lingering close (a handoff:
    /// the port lives on, so a client's next frame may be on its way).
    linger_idle: AtomicBool,
}

impl Gate {
    /// An open gate in front of `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Gate {
            registry,
            open: Mutex::new(true),
            grace_end: OnceLock::new(),
            at_close: OnceLock::new(),
            linger_idle: AtomicBool::new(false),
        }
    }

    /// The server's registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Admits a connection just accepted from `peer`: its registry entry, or
    /// `None` — over `max_connections` it is counted as rejected; once
    /// admission has ended it is reset uncounted, as the kernel resets what
    /// is left in a closed listener's queue. On `None` the caller drops the
    /// socket at once, without reading. For a backend whose kernel accepts
    /// (`uring`); the others accept under the lock through
    /// [`Acceptor::accept_all`].
    pub fn admit(&self, sock: &impl std::os::fd::AsFd, peer: SocketAddr) -> Option<ConnHandle> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !*open {
            let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
            return None;
        }
        self.registry.register(peer)
    }

    /// Ends admission (the start of stop's step 1): takes the counts and
    /// publishes the end of the grace, and whether idle connections linger.
    /// Returns false if it was closed already.
    pub fn close(&self, grace_end: Instant, linger_idle: bool) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !*open {
            return false;
        }
        *open = false;
        let _ = self.at_close.set((self.registry.active(), self.registry.forced()));
        // Stored before the grace is published: whoever sees the grace sees it.
        self.linger_idle.store(linger_idle, Ordering::Relaxed);
        let _ = self.grace_end.set(grace_end);
        true
    }

    /// Whether idle connections close with the lingering close at this stop.
    pub fn linger_idle(&self) -> bool {
        self.linger_idle.load(Ordering::Relaxed)
    }

    /// The end of the grace, once admission has ended.
    pub fn grace_end(&self) -> Option<Instant> {
        self.grace_end.get().copied()
    }

    /// The stop report once every connection is closed: `forced` are those
    /// the grace's end aborted, `drained` the rest of those open at the stop.
    pub fn report(&self, started: Instant) -> StopReport {
        let (active, forced_before) = self.at_close.get().copied().unwrap_or_default();
        let forced = self.registry.forced() - forced_before;
        StopReport { drained: active - forced, forced, elapsed: started.elapsed() }
    }
}

/// What one `accept(2)` result means for the accept loop.
#[derive(Debug)]
pub(crate) enum Accepted<S> {
    /// A new connection: admit it through the [`Gate`].
    Conn(S, SocketAddr),
    /// ECONNABORTED or EINTR: call `accept` again at once.
    Again,
    /// Nothing queued: wait for the listener's readiness.
    Empty,
    /// EMFILE/ENFILE or another resource error (counted): ignore the
    /// listener until [`Acceptor::wake_at`].
    BackOff,
}

/// The sans-IO state of one accept loop: the EMFILE back-off.
#[derive(Debug, Default)]
pub(crate) struct Acceptor {
    /// While set, the listener is ignored; when it passes, accept until
    /// WouldBlock without waiting for readiness.
    backoff_until: Option<Instant>,
}

impl Acceptor {
    /// Feeds one `accept(2)` result taken at `now`; failures are counted in
    /// `registry`.
    pub fn on_result<S>(
        &mut self,
        result: io::Result<(S, SocketAddr)>,
        now: Instant,
        registry: &Registry,
    ) -> Accepted<S> {
        match result {
            Ok((sock, peer)) => Accepted::Conn(sock, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Accepted::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Accepted::Again,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Accepted::Again,
            Err(e) => {
                registry.accept_error(&e);
                self.backoff_until = Some(now + ACCEPT_BACKOFF);
                Accepted::BackOff
            }
        }
    }

    /// Whether the listener is watched now (not backing off).
    pub fn listening(&self) -> bool {
        self.backoff_until.is_none()
    }

    /// When the loop must wake to end a back-off.
    pub fn wake_at(&self) -> Option<Instant> {
        self.backoff_until
    }

    /// Time passed: whether a back-off just ended. The loop then accepts
    /// until WouldBlock at once, without waiting for readiness.
    pub fn on_timer(&mut self, now: Instant) -> bool {
        let ended = self.backoff_until.is_some_and(|until| until <= now);
        if ended {
            self.backoff_until = None;
        }
        ended
    }

    /// Accepts from a non-blocking `listener` until WouldBlock, a back-off
    /// or the end of admission, sets `TCP_NODELAY`, and hands every
    /// connection the gate admits to `admitted`. Each `accept(2)` and its
    /// registration happen under the gate's lock: none after
    /// [`Gate::close`]. Returns why it stopped.
    pub fn accept_all(
        &mut self,
        listener: &Socket,
        gate: &Gate,
        mut admitted: impl FnMut(Socket, ConnHandle),
    ) -> AcceptEnd {
        while self.listening() {
            let open = gate.open.lock().unwrap_or_else(|e| e.into_inner());
            if !*open {
                return AcceptEnd::Closed;
            }
            let result = listener.accept().map(|(sock, addr)| {
                // A TCP listener's peers have IP addresses.
                (sock, addr.as_socket().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))))
            });
            match self.on_result(result, Instant::now(), gate.registry()) {
                Accepted::Conn(sock, peer) => {
                    let handle = gate.registry.register(peer);
                    drop(open);
                    // A failure means the connection is dead already; its
                    // first read or write reports it as its error.
                    let _ = sock.set_tcp_nodelay(true);
                    if let Some(handle) = handle {
                        admitted(sock, handle);
                    }
                }
                Accepted::Again => {}
                Accepted::Empty => return AcceptEnd::Empty,
                Accepted::BackOff => return AcceptEnd::BackOff,
            }
        }
        AcceptEnd::BackOff
    }
}

/// Why [`Acceptor::accept_all`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptEnd {
    /// The queue is empty (WouldBlock): wait for readiness.
    Empty,
    /// Backing off: wait for [`Acceptor::wake_at`].
    BackOff,
    /// Admission has ended: accept no more.
    Closed,
}

/// Handles a failed readiness wait (`poll`, `epoll_wait`): EINTR is nothing;
/// anything else is a lack of kernel memory (ENOMEM), waited out like
/// EMFILE rather than spun on or given up.
pub(crate) fn wait_failed(err: &io::Error) {
    if err.kind() != io::ErrorKind::Interrupted {
        std::thread::sleep(ACCEPT_BACKOFF);
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Gate>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::BackendKind;

    fn registry(max: usize) -> Arc<Registry> {
        Arc::new(Registry::new(BackendKind::Epoll, SocketAddr::from(([127, 0, 0, 1], 1)), max, 0))
    }

    fn err(code: i32) -> io::Result<((), SocketAddr)> {
        Err(io::Error::from_raw_os_error(code))
    }

    #[test]
    fn emfile_backs_off_then_accepts_without_waiting() {
        let reg = registry(1);
        let mut a = Acceptor::default();
        let t0 = Instant::now();
        assert!(matches!(a.on_result(err(libc::EAGAIN), t0, &reg), Accepted::Empty));
        assert!(matches!(a.on_result(err(libc::ECONNABORTED), t0, &reg), Accepted::Again));
        assert!(matches!(a.on_result(err(libc::EINTR), t0, &reg), Accepted::Again));
        assert!(a.listening());
        assert!(matches!(a.on_result(err(libc::EMFILE), t0, &reg), Accepted::BackOff));
        assert!(!a.listening());
        assert_eq!(a.wake_at(), Some(t0 + ACCEPT_BACKOFF));
        assert!(!a.on_timer(t0 + ACCEPT_BACKOFF / 2), "the back-off lasts ACCEPT_BACKOFF");
        assert!(a.on_timer(t0 + ACCEPT_BACKOFF), "then ends once");
        assert!(a.listening() && !a.on_timer(t0 + ACCEPT_BACKOFF * 2));
        assert_eq!(reg.stats().accept_errors_emfile, 1);
    }

    #[test]
    fn admission_ends_with_the_counts_and_the_grace() {
        let reg = registry(1);
        let gate = Gate::new(Arc::clone(&reg));
        let peer = SocketAddr::from(([127, 0, 0, 1], 2));
        let sock = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let first = gate.admit(&sock, peer).expect("admitted");
        assert!(gate.admit(&sock, peer).is_none(), "over max_connections");
        assert_eq!(reg.stats().rejected, 1);
        assert_eq!(gate.grace_end(), None);
        let end = Instant::now();
        assert!(gate.close(end, false));
        assert!(!gate.close(end, true), "closes once");
        assert!(!gate.linger_idle(), "the first close decides");
        assert_eq!(gate.grace_end(), Some(end));
        assert!(gate.admit(&sock, peer).is_none(), "admission ended");
        assert_eq!((reg.stats().accepted, reg.stats().rejected), (2, 1), "the late one is uncounted");
        first.unregister(&crate::conn::Conn::new(
            crate::Config::default().limits(),
            Instant::now(),
            &mut crate::conn::NoObserver,
        ));
        let report = gate.report(Instant::now());
        assert_eq!((report.drained, report.forced), (1, 0));
    }
}

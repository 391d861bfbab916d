//! The [`Server`] trait every backend is used through, and `Served`, the
//! one implementation of it: stop runs once, a second call returns a zero
//! report, and dropping a server stops it with no grace.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gate::Gate;
use crate::kind::BackendKind;
use crate::registry::{ConnInfo, Registry, Stats, Transition};
use crate::shutdown::{self, ServerThread, StopReport};
use crate::sys::Waker;

/// A running server of any backend.
///
/// # Implementing
///
/// A backend moves bytes between sockets and one [`crate::conn::Conn`] per
/// connection through the shared driver (a `Link`: read while the core
/// `wants_read`, write its `pending` bytes, wake by its `deadline`, carry out
/// its `action`), admits connections through the accept gate, and is served
/// to callers as a `Served`, which implements this trait. It must also:
///
/// - admit every accepted connection through the gate before its first
///   read (registered in the [`Registry`] until its fd is closed; one over
///   `max_connections` is closed at once without reading);
/// - set `TCP_NODELAY` on every accepted socket, write with `MSG_NOSIGNAL`,
///   and never block a thread in a call that `stop` cannot interrupt;
/// - follow the gate's `Acceptor` on accept errors: after EMFILE/ENFILE
///   ignore the listener for 100 ms, then accept until WouldBlock without
///   waiting for readiness; retry ECONNABORTED and EINTR at once; never
///   spin, never exit;
/// - use no CPU while idle (no periodic tick);
/// - name its threads `connlab-<backend>[-n]` and count them with
///   [`Registry::thread_guard`].
///
/// # Stopping
///
/// [`Server::stop`] closes the gate (admission ends, the grace is published
/// to every connection), closes the listener, lets idle connections close at
/// once and busy ones drain until the grace ends, joins every thread it
/// started and closes every fd before it returns. A second call returns a
/// zero report. Dropping a server stops it with no grace.
///
/// # Errors
///
/// [`crate::start`] fails with [`crate::Error::Invalid`] naming the bad field
/// of the config, or [`crate::Error::Io`] (naming `port` when the address is
/// in use).
pub trait Server: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The server's registry: its connections, counters and journal.
    fn registry(&self) -> &Registry;

    /// Stops the server (see the trait documentation).
    fn stop(&self, grace: Duration) -> StopReport {
        self.stop_notify(grace, false, &mut || {})
    }

    /// Stops the server as [`Server::stop`] does, calling `admission_closed`
    /// once admission has ended — from then on the server takes no
    /// connection from its listener's queue — and before it closes the
    /// listener and drains. A handoff tells its successor then, and passes
    /// `handoff`: idle connections then close with the lingering close, as
    /// busy ones do, since the port lives on and their clients' next frames
    /// may be on the way.
    fn stop_notify(&self, grace: Duration, handoff: bool, admission_closed: &mut dyn FnMut()) -> StopReport;

    /// The address the listener is bound to.
    fn local_addr(&self) -> SocketAddr {
        self.registry().stats().address
    }

    /// A snapshot of every counter.
    fn stats(&self) -> Stats {
        self.registry().stats()
    }

    /// Every registered connection.
    fn connections(&self) -> Vec<ConnInfo> {
        self.registry().connections()
    }

    /// The transition journal (only the latest connection from `peer`, if given).
    fn transitions(&self, peer: Option<SocketAddr>) -> Vec<Transition> {
        self.registry().transitions(peer)
    }
}

/// What a backend leaves running once started.
pub(crate) trait Running: Send + fmt::Debug {
    /// Called once before admission ends: a backend whose kernel accepts on
    /// its behalf (`uring`'s multishot accept) stops it here and returns once
    /// its last accepted connection is admitted, so nothing is taken from the
    /// listener's queue after the gate closes.
    fn end_admission(&mut self) {}

    /// The rest of stop, once the gate is closed: close the listener, wake
    /// every connection so it sees the stop, wait until each one is closed
    /// (by the end of the grace at the latest), join every thread and close
    /// every fd.
    fn take_down(self);
}

/// A started backend, served through [`Server`].
#[derive(Debug)]
pub(crate) struct Served<R: Running> {
    /// Which backend.
    kind: BackendKind,
    /// Admission, the registry, and the stop's counts.
    gate: Arc<Gate>,
    /// What runs; taken by the first `stop`.
    running: Mutex<Option<R>>,
}

impl<R: Running> Served<R> {
    /// Serves `running`, admitted through `gate`.
    pub fn new(kind: BackendKind, gate: Arc<Gate>, running: R) -> Self {
        Served { kind, gate, running: Mutex::new(Some(running)) }
    }
}

impl<R: Running> Server for Served<R> {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn registry(&self) -> &Registry {
        self.gate.registry()
    }

    fn stop_notify(&self, grace: Duration, handoff: bool, admission_closed: &mut dyn FnMut()) -> StopReport {
        let started = Instant::now();
        // Held to the end: a concurrent second call returns its zeros once
        // the server is down.
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut running) = running.take() else { return StopReport::default() };
        running.end_admission();
        self.gate.close(shutdown::grace_end(started, grace), handoff);
        admission_closed();
        running.take_down();
        self.gate.report(started)
    }
}

impl<R: Running> Drop for Served<R> {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// A backend whose whole life is one loop thread, told to stop by an
/// eventfd: it closes the listener, drains, and returns once its last
/// connection is closed.
#[derive(Debug)]
pub(crate) struct LoopThread {
    /// The loop.
    thread: ServerThread,
    /// Readable once stop began; closed after the loop returned.
    waker: Waker,
}

impl LoopThread {
    /// Spawns `run`, the loop of a `kind` server, as its one thread
    /// (`connlab-<kind>`), woken by `waker` when stop begins.
    pub fn serve(
        kind: BackendKind,
        gate: Arc<Gate>,
        waker: Waker,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<Served<LoopThread>, crate::Error> {
        let thread = ServerThread::spawn(format!("connlab-{kind}"), None, run)
            .map_err(crate::Error::starting("spawning the loop thread"))?;
        Ok(Served::new(kind, gate, LoopThread { thread, waker }))
    }
}

impl Running for LoopThread {
    fn take_down(self) {
        self.waker.wake().expect("writing to an eventfd cannot fail");
        self.thread.join();
        drop(self.waker);
    }
}

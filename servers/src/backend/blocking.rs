//! `blocking`: one OS thread per connection.
//!
//! An acceptor thread accepts and hands each connection to a new thread with
//! a small stack. The socket stays in blocking mode with its socket timeouts
//! set explicitly, but each thread waits in `poll(2)` on its socket *and* the
//! server's stop eventfd rather than inside `recv`: that is the one way to
//! wake a thread parked on a socket without destroying the connection, which
//! a draining stop needs. The read and write after a wake use `MSG_DONTWAIT`.

use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::Socket;

use super::{accept_one, Accepted, BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::conn::{Action, Conn, Limits};
use crate::registry::{ConnHandle, Registry};
use crate::shutdown::{ServerThread, StopReport, StopSignal, ThreadSet};
use crate::sys::{self, Waker};

/// Read buffer size; allocated while a connection is busy, freed when idle.
const READ_CHUNK: usize = 64 << 10;

/// What the acceptor and every connection thread share.
#[derive(Debug)]
struct Shared {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Per-connection limits.
    limits: Limits,
    /// Socket timeouts set on every accepted socket.
    config: Config,
    /// Raised when stop begins (after the listener is closed).
    stop: StopSignal,
    /// Connection threads not joined yet.
    threads: ThreadSet,
}

/// The `blocking` backend.
#[derive(Debug)]
pub struct BlockingServer {
    /// State shared with the threads.
    shared: Arc<Shared>,
    /// The acceptor and the waker that tells it to close the listener and
    /// return; taken by the first `stop`.
    acceptor: Mutex<Option<(ServerThread, Arc<Waker>)>>,
}

impl BlockingServer {
    /// Starts the acceptor on `listener`.
    pub(super) fn start(config: Config, listener: Socket, registry: Arc<Registry>) -> Result<Self, Error> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| Error::Io { field: "backend", context, source }
        };
        let shared = Arc::new(Shared {
            registry,
            limits: config.limits(),
            config,
            stop: StopSignal::new().map_err(io("creating the stop eventfd"))?,
            threads: ThreadSet::default(),
        });
        let accept_stop = Arc::new(Waker::new().map_err(io("creating the accept eventfd"))?);
        let acceptor = {
            let shared = Arc::clone(&shared);
            let accept_stop = Arc::clone(&accept_stop);
            ServerThread::spawn("connlab-blocking".into(), None, move || {
                accept_loop(&shared, listener, &accept_stop)
            })
            .map_err(io("spawning the acceptor thread"))?
        };
        Ok(BlockingServer { shared, acceptor: Mutex::new(Some((acceptor, accept_stop))) })
    }
}

impl Server for BlockingServer {
    fn kind(&self) -> BackendKind {
        BackendKind::Blocking
    }

    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn stop(&self, grace: Duration) -> StopReport {
        let started = Instant::now();
        let mut acceptor = self.acceptor.lock().unwrap_or_else(|e| e.into_inner());
        let Some((thread, accept_stop)) = acceptor.take() else { return StopReport::default() };
        // 1. The listener closes when the acceptor returns; after the join no
        //    connection can be added, so `active` is the number to drain.
        accept_stop.wake().expect("writing to an eventfd cannot fail");
        thread.join();
        drop(accept_stop); // the last reference: its eventfd closes
        let registry = &self.shared.registry;
        let active = registry.active();
        let forced_before = registry.forced();
        // 2–4. Every connection thread decides for itself: idle ones close at
        //    once, busy ones drain, the rest abort when the grace ends.
        self.shared.stop.raise(started + grace);
        // 5. Join them all (they are gone by the end of the grace), then close
        //    the last fd the server holds.
        self.shared.threads.join_all();
        self.shared.stop.close();
        let forced = registry.forced() - forced_before;
        StopReport { drained: active - forced, forced, elapsed: started.elapsed() }
    }
}

impl Drop for BlockingServer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// Accepts until the acceptor's waker fires, giving each connection a thread.
fn accept_loop(shared: &Arc<Shared>, listener: Socket, stop: &Waker) {
    let _alive = shared.registry.thread_guard();
    let mut backoff_until: Option<Instant> = None;
    loop {
        let mut fds =
            [sys::pollfd(stop.raw(), libc::POLLIN), sys::pollfd(listener.as_raw_fd(), libc::POLLIN)];
        // While backing off, the listener is left out of the poll set.
        let (watched, timeout) = match backoff_until {
            Some(until) => (1, Some(until.saturating_duration_since(Instant::now()))),
            None => (2, None),
        };
        match sys::poll(&mut fds[..watched], timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll on the listener failed: {e}"),
        }
        if fds[0].revents != 0 {
            return; // dropping `listener` closes it
        }
        if backoff_until.is_some_and(|until| Instant::now() < until) {
            continue;
        }
        // After a back-off, accept until WouldBlock without waiting for
        // readiness: connections queued meanwhile must not wait for another.
        backoff_until = None;
        loop {
            match accept_one(&listener, &shared.registry) {
                Accepted::Conn(sock, peer) => admit(shared, sock, peer),
                Accepted::Empty => break,
                Accepted::BackOff => {
                    backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }
}

/// Registers a connection and starts its thread (or rejects it).
fn admit(shared: &Arc<Shared>, sock: Socket, peer: std::net::SocketAddr) {
    let Some(mut handle) = shared.registry.register(peer) else {
        drop(sock); // over max_connections: closed without reading
        return;
    };
    // Accepted sockets inherit nothing useful here: set both timeouts
    // explicitly (they bound any blocking call; ours use MSG_DONTWAIT).
    let _ = sock.set_read_timeout(shared.config.read_timeout);
    let _ = sock.set_write_timeout(shared.config.write_timeout);
    let now = Instant::now();
    let conn = Conn::new(shared.limits, now, &mut handle);
    let name = format!("connlab-blocking-{}", handle.id());
    // The closure owns the connection; if spawning fails it comes back.
    let slot = Arc::new(Mutex::new(Some((sock, conn, handle))));
    let taken = Arc::clone(&slot);
    let thread_shared = Arc::clone(shared);
    let spawned = ServerThread::spawn(name, Some(shared.config.thread_stack), move || {
        let _alive = thread_shared.registry.thread_guard();
        if let Some((sock, conn, handle)) = taken.lock().unwrap_or_else(|e| e.into_inner()).take() {
            serve(&thread_shared, sock, conn, handle);
        }
    });
    match spawned {
        Ok(thread) => shared.threads.push(thread),
        Err(err) => {
            if let Some((sock, mut conn, mut handle)) = slot.lock().unwrap_or_else(|e| e.into_inner()).take()
            {
                // No thread for it: it closes with io_error, nothing panics.
                conn.on_error(&err, now, &mut handle);
                finish(sock, &conn, handle);
            }
        }
    }
}

/// Serves one connection until it is closed.
fn serve(shared: &Shared, sock: Socket, mut conn: Conn, mut handle: ConnHandle) {
    let fd = sock.as_raw_fd();
    let mut stop_seen = false;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let now = Instant::now();
        if !stop_seen {
            if let Some(grace_end) = shared.stop.grace_end() {
                stop_seen = true;
                let rx_empty = sys::fionread(fd).map_or(true, |n| n == 0);
                conn.on_stop(now, grace_end, rx_empty, &mut handle);
            }
        }
        if conn.deadline().is_some_and(|at| at <= now) {
            conn.on_timer(now, &mut handle);
        }
        match conn.action() {
            Action::Continue => {}
            Action::ShutdownWrite => {
                // An error here means the peer is gone; lingering ends it.
                let _ = sock.shutdown(Shutdown::Write);
                conn.on_shutdown_write(now);
                continue;
            }
            Action::Close | Action::Abort => break,
        }
        if conn.wants_write() {
            match sys::send(fd, conn.pending()) {
                Ok(n) => {
                    conn.on_written(n, now, &mut handle);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    conn.on_error(&e, now, &mut handle);
                    continue;
                }
            }
        }
        if conn.is_idle() {
            buf = Vec::new(); // an idle connection holds no buffer
        }
        let mut events = 0;
        if conn.wants_read() {
            events |= libc::POLLIN;
        }
        if conn.wants_write() {
            events |= libc::POLLOUT;
        }
        let mut fds = [sys::pollfd(fd, events), sys::pollfd(shared.stop.fd(), libc::POLLIN)];
        let watched = if stop_seen { 1 } else { 2 };
        let timeout = conn.deadline().map(|at| at.saturating_duration_since(now));
        match sys::poll(&mut fds[..watched], timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                conn.on_error(&e, Instant::now(), &mut handle);
                continue;
            }
        }
        let revents = fds[0].revents;
        let now = Instant::now();
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && conn.wants_read() {
            if buf.capacity() == 0 {
                buf.reserve_exact(READ_CHUNK);
            }
            buf.clear();
            match sys::recv_into(fd, &mut buf) {
                Ok(0) => conn.on_eof(now, &mut handle),
                Ok(_) => conn.on_read(&buf, now, &mut handle),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => conn.on_error(&e, now, &mut handle),
            }
        } else if revents & (libc::POLLERR | libc::POLLHUP) != 0 && !conn.wants_write() {
            // Neither reading nor writing, yet the socket reports trouble:
            // take it now rather than poll on it again (which would spin).
            match sys::take_socket_error(fd) {
                Ok(Some(e)) | Err(e) => conn.on_error(&e, now, &mut handle),
                Ok(None) => conn.on_eof(now, &mut handle),
            }
        }
    }
    finish(sock, &conn, handle);
}

/// Closes the socket as the core decided (abortively: `SO_LINGER` 0), then
/// unregisters the connection.
fn finish(sock: Socket, conn: &Conn, handle: ConnHandle) {
    if conn.action() == Action::Abort {
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
    drop(sock);
    handle.unregister(conn);
}

//! `blocking`: one OS thread per connection.
//!
//! An acceptor thread accepts and hands each connection to a new thread with
//! a small stack. The socket stays in blocking mode with its socket timeouts
//! set explicitly, but each thread waits in `poll(2)` on its socket *and* the
//! server's stop eventfd rather than inside `recv`: that is the one way to
//! wake a thread parked on a socket without destroying the connection, which
//! a draining stop needs. The read and write after a wake use `MSG_DONTWAIT`.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::Socket;

use super::driver::{self, Link, Next};
use super::{accept_one, Accepted, BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::registry::Registry;
use crate::shutdown::{ServerThread, StopPoint, StopReport, StopSignal, ThreadSet};
use crate::sys::{self, Waker};

/// What the acceptor and every connection thread share.
#[derive(Debug)]
struct Shared {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Limits and socket timeouts for every connection.
    config: Config,
    /// Raised when stop begins (after the listener is closed).
    stop: StopSignal,
    /// Connection threads not joined yet.
    threads: ThreadSet,
    /// Whether new connections are still admitted; the acceptor holds the
    /// lock from this check to the registration, and `stop` while it ends
    /// admission, records the counts and tells every connection at once.
    admitting: Mutex<bool>,
    /// Counts when admission ended.
    stop_point: StopPoint,
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
        let shared = Arc::new(Shared {
            registry,
            config,
            stop: StopSignal::new().map_err(super::start_error("creating the stop eventfd"))?,
            threads: ThreadSet::default(),
            admitting: Mutex::new(true),
            stop_point: StopPoint::default(),
        });
        let accept_stop = Arc::new(Waker::new().map_err(super::start_error("creating the accept eventfd"))?);
        let acceptor = {
            let shared = Arc::clone(&shared);
            let accept_stop = Arc::clone(&accept_stop);
            ServerThread::spawn("connlab-blocking".into(), None, move || {
                accept_loop(&shared, listener, &accept_stop)
            })
            .map_err(super::start_error("spawning the acceptor thread"))?
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
        // 1–4 at one instant: admission ends (so `active` is the number to
        // drain), and every connection thread is told, so a connection busy
        // when stop began cannot turn idle unseen and lose its lingering
        // close. Each thread then decides for itself: idle ones close at
        // once, busy ones drain, the rest abort when the grace ends.
        {
            let mut admitting = self.shared.admitting.lock().unwrap_or_else(|e| e.into_inner());
            *admitting = false;
            self.shared.stop_point.record(&self.shared.registry);
            self.shared.stop.raise(crate::shutdown::grace_end(started, grace));
        }
        // The listener closes when the acceptor returns.
        accept_stop.wake().expect("writing to an eventfd cannot fail");
        thread.join();
        drop(accept_stop); // the last reference: its eventfd closes
                           // 5. Join them all (they are gone by the end of the grace), then close
                           //    the last fd the server holds.
        self.shared.threads.join_all();
        self.shared.stop.close();
        self.shared.stop_point.report(&self.shared.registry, started)
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
            // Only a lack of kernel memory (ENOMEM) gets here: wait as for
            // EMFILE rather than spin or give up.
            Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
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
    // Accepted sockets inherit nothing useful here: set both timeouts
    // explicitly (they bound any blocking call; ours use MSG_DONTWAIT).
    let _ = sock.set_read_timeout(shared.config.read_timeout);
    let _ = sock.set_write_timeout(shared.config.write_timeout);
    let admitting = shared.admitting.lock().unwrap_or_else(|e| e.into_inner());
    if !*admitting {
        // Stop began: this one was still in the accept queue, where the
        // kernel would have reset it; do the same, uncounted.
        let _ = sock.set_linger(Some(Duration::ZERO));
        return;
    }
    let Some(link) = Link::admit(&shared.registry, shared.config.limits(), sock, peer) else {
        return; // over max_connections: closed without reading
    };
    let name = format!("connlab-blocking-{}", link.id());
    // The closure owns the link; if spawning fails it comes back.
    let slot = Arc::new(Mutex::new(Some(link)));
    let taken = Arc::clone(&slot);
    let thread_shared = Arc::clone(shared);
    let spawned = ServerThread::spawn(name, Some(shared.config.thread_stack), move || {
        let _alive = thread_shared.registry.thread_guard();
        if let Some(link) = taken.lock().unwrap_or_else(|e| e.into_inner()).take() {
            serve(&thread_shared, link);
        }
    });
    drop(admitting);
    match spawned {
        Ok(thread) => shared.threads.push(thread),
        Err(err) => {
            // No thread for it: it closes with io_error, nothing panics.
            if let Some(link) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                link.fail(&err);
            }
        }
    }
}

/// Serves one connection until it is closed.
fn serve(shared: &Shared, mut link: Link) {
    let fd = link.fd();
    let mut buf: Vec<u8> = Vec::new();
    let mut hangup = false;
    loop {
        let interest = match link.drive(&mut buf, shared.stop.grace_end(), hangup) {
            Next::Done => return,
            Next::Wait(interest) => interest,
        };
        if link.is_idle() {
            buf = Vec::new(); // an idle connection holds no buffer
        }
        let mut events = 0;
        if interest.read {
            events |= libc::POLLIN;
        }
        if interest.write {
            events |= libc::POLLOUT;
        }
        let mut fds = [sys::pollfd(fd, events), sys::pollfd(shared.stop.fd(), libc::POLLIN)];
        let watched = if link.stop_seen() { 1 } else { 2 };
        match sys::poll(&mut fds[..watched], driver::until(interest.deadline, Instant::now())) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                link.fail(&e);
                return;
            }
        }
        let revents = fds[0].revents;
        hangup = revents & (libc::POLLHUP | libc::POLLERR) != 0;
        link.ready(
            revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
            revents & libc::POLLOUT != 0,
            false,
        );
    }
}

//! `poll`: one thread, non-blocking sockets, `poll(2)` over the stop
//! eventfd, the listener and every connection.
//!
//! The pollfd array persists between calls: a connection's entry is updated
//! in place when its interest changes and swap-removed when it closes, so the
//! only O(connections) work per wake is the kernel's scan and ours of
//! `revents`, which is what this architecture costs and what it shows.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::Socket;

use super::driver::{self, Interest, Link, Next, Timers, READ_CHUNK};
use super::{accept_one, start_error, Accepted, BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::registry::Registry;
use crate::shutdown::{ServerThread, StopPoint, StopReport, StopSignal};
use crate::sys;

/// Index of the stop eventfd in the pollfd array.
const STOP: usize = 0;
/// Index of the listener (fd −1 while ignored or closed).
const LISTENER: usize = 1;
/// Index of the first connection.
const FIRST: usize = 2;

/// What the loop thread shares with `stop`.
#[derive(Debug)]
struct Shared {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Per-connection limits.
    config: Config,
    /// Raised by `stop`.
    stop: StopSignal,
    /// Counts when the listener closed.
    stop_point: StopPoint,
}

/// The `poll` backend.
#[derive(Debug)]
pub struct PollServer {
    /// State shared with the loop.
    shared: Arc<Shared>,
    /// The loop thread; taken by the first `stop`.
    thread: Mutex<Option<ServerThread>>,
}

impl PollServer {
    /// Starts the loop on `listener`.
    pub(super) fn start(config: Config, listener: Socket, registry: Arc<Registry>) -> Result<Self, Error> {
        let stop = StopSignal::new().map_err(start_error("creating the stop eventfd"))?;
        let shared = Arc::new(Shared { registry, config, stop, stop_point: StopPoint::default() });
        let thread = {
            let shared = Arc::clone(&shared);
            ServerThread::spawn("connlab-poll".into(), None, move || PollLoop::new(&shared, listener).run())
                .map_err(start_error("spawning the loop thread"))?
        };
        Ok(PollServer { shared, thread: Mutex::new(Some(thread)) })
    }
}

impl Server for PollServer {
    fn kind(&self) -> BackendKind {
        BackendKind::Poll
    }

    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn stop(&self, grace: Duration) -> StopReport {
        let started = Instant::now();
        let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return StopReport::default();
        };
        self.shared.stop.raise(crate::shutdown::grace_end(started, grace));
        thread.join();
        self.shared.stop.close();
        self.shared.stop_point.report(&self.shared.registry, started)
    }
}

impl Drop for PollServer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The loop's state.
struct PollLoop<'a> {
    /// Shared with `stop`.
    shared: &'a Shared,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// What `poll` watches: [stop, listener, connections...].
    fds: Vec<libc::pollfd>,
    /// The slab key of the connection at each index of `fds` (from FIRST).
    owners: Vec<usize>,
    /// Open connections and their index in `fds`.
    links: Slab<(Link, usize)>,
    /// Their deadlines.
    timers: Timers,
    /// The loop's one read buffer.
    scratch: Vec<u8>,
    /// While set, the listener is left out of the poll set.
    backoff_until: Option<Instant>,
    /// Connections with events in the last wake: reused between wakes.
    ready: Vec<(usize, libc::c_short)>,
}

impl<'a> PollLoop<'a> {
    fn new(shared: &'a Shared, listener: Socket) -> Self {
        let fds = vec![
            sys::pollfd(shared.stop.fd(), libc::POLLIN),
            sys::pollfd(listener.as_raw_fd(), libc::POLLIN),
        ];
        PollLoop {
            shared,
            listener: Some(listener),
            fds,
            owners: vec![usize::MAX, usize::MAX],
            links: Slab::new(),
            timers: Timers::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            backoff_until: None,
            ready: Vec::new(),
        }
    }

    fn run(mut self) {
        let _alive = self.shared.registry.thread_guard();
        while self.listener.is_some() || !self.links.is_empty() {
            let wake_at = [self.timers.next(), self.backoff_until].into_iter().flatten().min();
            match sys::poll(&mut self.fds, driver::until(wake_at, Instant::now())) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Only a lack of kernel memory (ENOMEM) gets here: wait as
                // for EMFILE rather than spin or give up.
                Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
            }
            if self.fds[STOP].revents != 0 && self.listener.is_some() {
                self.close_listener();
            }
            if self.fds[LISTENER].revents != 0 {
                self.accept_all();
            }
            self.ready.clear();
            for (index, pfd) in self.fds.iter().enumerate().skip(FIRST) {
                if pfd.revents != 0 {
                    self.ready.push((self.owners[index], pfd.revents));
                }
            }
            for i in 0..self.ready.len() {
                let (key, revents) = self.ready[i];
                let Some((link, _)) = self.links.get_mut(key) else { continue };
                let hangup = revents & (libc::POLLHUP | libc::POLLERR) != 0;
                link.ready(
                    revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
                    revents & libc::POLLOUT != 0,
                    false,
                );
                self.step(key, hangup);
            }
            let now = Instant::now();
            if self.backoff_until.is_some_and(|until| until <= now) {
                self.backoff_until = None;
                self.fds[LISTENER].fd = self.listener.as_ref().map_or(-1, |l| l.as_raw_fd());
                self.accept_all();
            }
            while let Some((key, id, at)) = self.timers.pop_due(now) {
                if self.links.get_mut(key).is_some_and(|(link, _)| Timers::claim(link, id, at)) {
                    self.step(key, false);
                }
            }
        }
    }

    /// Stop step 1, then 2–4: close the listener, record the counts, and let
    /// every connection see the stop.
    fn close_listener(&mut self) {
        self.listener = None;
        self.fds[LISTENER].fd = -1;
        // The stop eventfd stays readable: leave it out from now on.
        self.fds[STOP].fd = -1;
        self.shared.stop_point.record(&self.shared.registry);
        let keys: Vec<usize> = self.links.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.step(key, false);
        }
    }

    /// Accepts until WouldBlock (or a resource error starts a back-off).
    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            match accept_one(listener, &self.shared.registry) {
                Accepted::Conn(sock, peer) => {
                    let limits = self.shared.config.limits();
                    let Some(link) = Link::admit(&self.shared.registry, limits, sock, peer) else {
                        continue; // over max_connections: closed without reading
                    };
                    let fd = link.fd();
                    let key = self.links.insert((link, self.fds.len()));
                    self.fds.push(sys::pollfd(fd, 0));
                    self.owners.push(key);
                    self.step(key, false);
                }
                Accepted::Empty => return,
                Accepted::BackOff => {
                    // Level-triggered: the listener must leave the set, or
                    // every poll would return at once for it.
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    self.fds[LISTENER].fd = -1;
                    return;
                }
            }
        }
    }

    /// Drives one connection and updates its pollfd, or removes both.
    fn step(&mut self, key: usize, hangup: bool) {
        let grace_end = if self.listener.is_none() { self.shared.stop.grace_end() } else { None };
        let (link, index) = &mut self.links[key];
        let index = *index;
        match link.drive(&mut self.scratch, grace_end, hangup) {
            Next::Done => {
                self.links.remove(key);
                self.fds.swap_remove(index);
                self.owners.swap_remove(index);
                if let Some(&moved) = self.owners.get(index) {
                    self.links[moved].1 = index;
                }
            }
            Next::Wait(Interest { read, write, deadline }) => {
                let mut events = 0;
                if read {
                    events |= libc::POLLIN;
                }
                if write {
                    events |= libc::POLLOUT;
                }
                self.fds[index].events = events;
                self.fds[index].revents = 0;
                self.timers.schedule(key, link, deadline);
            }
        }
    }
}

//! `epoll`: one thread, edge-triggered epoll through mio.
//!
//! Every connection is registered once for both readable and writable edges;
//! [`Link`] reads and writes until WouldBlock (or a short read) and remembers
//! what it has not drained, since an edge is reported only once. Deadlines
//! live in a heap ([`Timers`]), so a tick costs nothing per idle connection.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use socket2::Socket;

use super::driver::{self, Link, Next, Timers, READ_CHUNK};
use super::{accept_one, start_error, Accepted, BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::registry::Registry;
use crate::shutdown::{ServerThread, StopPoint, StopReport};

/// The waker's token; connections use `FIRST + slab key`.
const WAKER: Token = Token(0);
/// The listener's token.
const LISTENER: Token = Token(1);
/// The first connection token.
const FIRST: usize = 2;

/// What the loop thread shares with `stop`.
#[derive(Debug)]
struct Shared {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Per-connection limits.
    config: Config,
    /// The end of the grace, set by `stop` before it wakes the loop.
    grace_end: OnceLock<Instant>,
    /// Counts when the listener closed.
    stop_point: StopPoint,
}

/// The `epoll` backend.
#[derive(Debug)]
pub struct EpollServer {
    /// State shared with the loop.
    shared: Arc<Shared>,
    /// The loop thread and its waker; taken by the first `stop`.
    running: Mutex<Option<(ServerThread, Waker)>>,
}

impl EpollServer {
    /// Starts the loop on `listener`.
    pub(super) fn start(config: Config, listener: Socket, registry: Arc<Registry>) -> Result<Self, Error> {
        let poll = Poll::new().map_err(start_error("creating the epoll instance"))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(start_error("creating the waker"))?;
        poll.registry()
            .register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)
            .map_err(start_error("registering the listener"))?;
        let shared = Arc::new(Shared {
            registry,
            config,
            grace_end: OnceLock::new(),
            stop_point: StopPoint::default(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            ServerThread::spawn("connlab-epoll".into(), None, move || {
                EventLoop::new(&shared, poll, listener).run();
            })
            .map_err(start_error("spawning the loop thread"))?
        };
        Ok(EpollServer { shared, running: Mutex::new(Some((thread, waker))) })
    }
}

impl Server for EpollServer {
    fn kind(&self) -> BackendKind {
        BackendKind::Epoll
    }

    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn stop(&self, grace: Duration) -> StopReport {
        let started = Instant::now();
        let Some((thread, waker)) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return StopReport::default();
        };
        let _ = self.shared.grace_end.set(crate::shutdown::grace_end(started, grace));
        waker.wake().expect("waking the loop cannot fail");
        // The loop closes the listener, drains, and returns once the last
        // connection is closed; the waker's eventfd closes after it.
        thread.join();
        drop(waker);
        self.shared.stop_point.report(&self.shared.registry, started)
    }
}

impl Drop for EpollServer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The loop's state.
struct EventLoop<'a> {
    /// Shared with `stop`.
    shared: &'a Shared,
    /// The epoll instance.
    poll: Poll,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// Open connections by slab key (token − FIRST).
    links: Slab<Link>,
    /// Their deadlines.
    timers: Timers,
    /// The loop's one read buffer.
    scratch: Vec<u8>,
    /// While set, the listener is ignored (EMFILE/ENFILE back-off).
    backoff_until: Option<Instant>,
    /// Whether the waker fired (stop began).
    stopping: bool,
}

impl<'a> EventLoop<'a> {
    fn new(shared: &'a Shared, poll: Poll, listener: Socket) -> Self {
        EventLoop {
            shared,
            poll,
            listener: Some(listener),
            links: Slab::new(),
            timers: Timers::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            backoff_until: None,
            stopping: false,
        }
    }

    fn run(mut self) {
        let _alive = self.shared.registry.thread_guard();
        let mut events = Events::with_capacity(1024);
        while self.listener.is_some() || !self.links.is_empty() {
            let wake_at = [self.timers.next(), self.backoff_until].into_iter().flatten().min();
            match self.poll.poll(&mut events, driver::until(wake_at, Instant::now())) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Only a lack of kernel memory (ENOMEM) gets here: wait as
                // for EMFILE rather than spin or give up.
                Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.stopping = true,
                    LISTENER if self.backoff_until.is_none() => self.accept_all(),
                    LISTENER => {}
                    Token(token) => {
                        let key = token - FIRST;
                        let Some(link) = self.links.get_mut(key) else { continue };
                        let closed = event.is_read_closed() || event.is_error();
                        link.ready(event.is_readable() || closed, event.is_writable(), closed);
                        let hangup = event.is_error() || (event.is_read_closed() && event.is_write_closed());
                        self.step(key, hangup);
                    }
                }
            }
            let now = Instant::now();
            if self.backoff_until.is_some_and(|until| until <= now) {
                // Edge-triggered: connections queued during the back-off will
                // not be reported again, so accept until WouldBlock now.
                self.backoff_until = None;
                self.accept_all();
            }
            while let Some((key, id, at)) = self.timers.pop_due(now) {
                if self.links.get_mut(key).is_some_and(|link| Timers::claim(link, id, at)) {
                    self.step(key, false);
                }
            }
            if self.stopping && self.listener.is_some() {
                self.close_listener();
            }
        }
    }

    /// Stop step 1, then 2–4: close the listener, record the counts, and let
    /// every connection see the stop.
    fn close_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&listener.as_raw_fd()));
        }
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
                    let Some(link) =
                        Link::admit(&self.shared.registry, self.shared.config.limits(), sock, peer)
                    else {
                        continue; // over max_connections: closed without reading
                    };
                    let fd = link.fd();
                    let key = self.links.insert(link);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    match self.poll.registry().register(&mut SourceFd(&fd), Token(FIRST + key), interest) {
                        Ok(()) => self.step(key, false),
                        Err(err) => self.links.remove(key).fail(&err),
                    }
                }
                Accepted::Empty => return,
                Accepted::BackOff => {
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Drives one connection; forgets it once closed (closing its fd took it
    /// out of the epoll set), else schedules its deadline.
    fn step(&mut self, key: usize, hangup: bool) {
        let grace_end = if self.listener.is_none() { self.shared.grace_end.get().copied() } else { None };
        let link = &mut self.links[key];
        match link.drive(&mut self.scratch, grace_end, hangup) {
            Next::Done => {
                self.links.remove(key);
            }
            Next::Wait(interest) => {
                self.timers.schedule(key, link, interest.deadline);
            }
        }
    }
}

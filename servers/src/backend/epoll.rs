//! `epoll`: one thread, edge-triggered epoll through mio.
//!
//! Every connection is registered once for both readable and writable edges;
//! the driver reads and writes until WouldBlock (or a short read) and
//! remembers what it has not drained, since an edge is reported only once.
//! Deadlines live in a heap (the driver's `Timers`), so a tick costs nothing
//! per idle connection. The same loop is each shard of `sharded`, given its
//! `Shard`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::Socket;

use crate::backend::sharded::Shard;
use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Link, Next, Timers, READ_CHUNK};
use crate::gate::{self, Acceptor, Gate};
use crate::kind::BackendKind;
use crate::server::{LoopThread, Served};
use crate::sys::{self, Waker};

/// The stop eventfd's token; connections use `FIRST + slab key`.
const STOP: Token = Token(0);
/// The listener's token.
const LISTENER: Token = Token(1);
/// A shard's inbox eventfd: connections handed over by another shard.
const INBOX: Token = Token(2);
/// The first connection token.
const FIRST: usize = 3;

/// Starts the loop on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<LoopThread>, Error> {
    let waker = Waker::new().map_err(Error::starting("creating the stop eventfd"))?;
    let event_loop = EventLoop::new(&config, listener, Arc::clone(&gate), &waker, None)?;
    LoopThread::serve(BackendKind::Epoll, gate, waker, move || event_loop.run())
}

/// The loop's state.
#[derive(Debug)]
pub(crate) struct EventLoop {
    /// Admission and the published stop.
    gate: Arc<Gate>,
    /// Per-connection limits.
    limits: Limits,
    /// The epoll instance.
    poll: Poll,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// The EMFILE back-off.
    acceptor: Acceptor,
    /// Open connections by slab key (token − FIRST).
    links: Slab<Link<Socket>>,
    /// Their deadlines.
    timers: Timers,
    /// The loop's one read buffer.
    scratch: Vec<u8>,
    /// Keys of connections just accepted: reused.
    accepted: Vec<usize>,
    /// As a shard of `sharded`: its place among the others.
    shard: Option<Shard>,
}

impl EventLoop {
    /// A loop on `listener`, woken by `stop`; as a shard, the listener is
    /// registered with `EPOLLEXCLUSIVE` (a new connection wakes one shard,
    /// not all) and the shard's inbox is watched.
    pub fn new(
        config: &Config,
        listener: Socket,
        gate: Arc<Gate>,
        stop: &Waker,
        shard: Option<Shard>,
    ) -> Result<Self, Error> {
        let poll = Poll::new().map_err(Error::starting("creating the epoll instance"))?;
        let registry = poll.registry();
        registry
            .register(&mut SourceFd(&stop.raw()), STOP, Interest::READABLE)
            .map_err(Error::starting("registering the stop eventfd"))?;
        match &shard {
            None => registry.register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE),
            Some(shard) => registry
                .register(&mut SourceFd(&shard.inbox_waker().raw()), INBOX, Interest::READABLE)
                .and_then(|()| {
                    sys::epoll_add_exclusive(poll.as_raw_fd(), listener.as_raw_fd(), LISTENER.0 as u64)
                }),
        }
        .map_err(Error::starting("registering the listener"))?;
        Ok(EventLoop {
            gate,
            limits: config.limits(),
            poll,
            listener: Some(listener),
            acceptor: Acceptor::default(),
            links: Slab::new(),
            timers: Timers::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            accepted: Vec::new(),
            shard,
        })
    }

    /// Whether the loop has more to do: its listener is open, a connection
    /// is, or (a shard) another shard may still hand it one.
    fn busy(&self) -> bool {
        self.listener.is_some()
            || !self.links.is_empty()
            || self.shard.as_ref().is_some_and(Shard::may_receive)
    }

    pub fn run(mut self) {
        let _alive = self.gate.registry().thread_guard();
        let mut events = Events::with_capacity(1024);
        let mut stopping = false;
        while self.busy() {
            let wake_at = [self.timers.next(), self.acceptor.wake_at()].into_iter().flatten().min();
            if let Err(e) = self.poll.poll(&mut events, driver::until(wake_at, Instant::now())) {
                gate::wait_failed(&e);
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    STOP => stopping = true,
                    // While backing off, an edge is ignored: the back-off's
                    // end accepts until WouldBlock anyway.
                    LISTENER => self.accept_all(),
                    INBOX => self.receive(),
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
            if self.acceptor.on_timer(Instant::now()) {
                self.accept_all();
            }
            let now = Instant::now();
            while let Some((key, id, at)) = self.timers.pop_due(now) {
                if self.links.get_mut(key).is_some_and(|link| Timers::claim(link, id, at)) {
                    self.step(key, false);
                }
            }
            if stopping && self.listener.is_some() {
                self.close_listener();
            }
        }
    }

    /// Stop began (the gate is closed): close the listener and let every
    /// connection see the stop.
    fn close_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&listener.as_raw_fd()));
        }
        if let Some(shard) = &self.shard {
            shard.stopped_accepting();
        }
        let keys: Vec<usize> = self.links.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.step(key, false);
        }
    }

    /// Accepts until WouldBlock or a back-off, registers the new connections
    /// for both edges (a shard: those whose turn is its own; the others go to
    /// their shards), then drives them.
    fn accept_all(&mut self) {
        let Some(listener) = &self.listener else { return };
        let (links, accepted, registry, limits) =
            (&mut self.links, &mut self.accepted, self.poll.registry(), self.limits);
        let mut shard = self.shard.as_mut();
        accepted.clear();
        self.acceptor.accept_all(listener, &self.gate, |sock, handle| {
            let (sock, handle) = match shard.as_deref_mut() {
                Some(shard) => match shard.deal(sock, handle) {
                    Some(mine) => mine,
                    None => return,
                },
                None => (sock, handle),
            };
            register(links, accepted, registry, Link::new(sock, handle, limits));
        });
        if let Some(shard) = &mut self.shard {
            shard.flush();
        }
        for i in 0..self.accepted.len() {
            self.step(self.accepted[i], false);
        }
    }

    /// Takes in the connections other shards handed over, and drives them.
    fn receive(&mut self) {
        let Some(shard) = &self.shard else { return };
        shard.inbox_waker().drain();
        self.accepted.clear();
        for (sock, handle) in shard.inbox() {
            let link = Link::new(sock, handle, self.limits);
            register(&mut self.links, &mut self.accepted, self.poll.registry(), link);
        }
        for i in 0..self.accepted.len() {
            self.step(self.accepted[i], false);
        }
    }

    /// Drives one connection; forgets it once closed (closing its fd took it
    /// out of the epoll set), else schedules its deadline.
    fn step(&mut self, key: usize, hangup: bool) {
        let link = &mut self.links[key];
        match link.drive(&mut self.scratch, &self.gate, hangup) {
            Next::Done => {
                self.links.remove(key);
            }
            Next::Wait(interest) => {
                self.timers.schedule(key, link, interest.deadline);
            }
        }
    }
}

/// Registers a new connection for both edges and keeps it (its key in
/// `accepted`), or fails it.
fn register(
    links: &mut Slab<Link<Socket>>,
    accepted: &mut Vec<usize>,
    registry: &mio::Registry,
    link: Link<Socket>,
) {
    let (fd, key) = (link.fd(), links.vacant_key());
    match registry.register(&mut SourceFd(&fd), Token(FIRST + key), Interest::READABLE | Interest::WRITABLE) {
        Ok(()) => accepted.push(links.insert(link)),
        Err(err) => link.fail(&err),
    }
}

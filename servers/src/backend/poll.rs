//! `poll`: one thread, non-blocking sockets, `poll(2)` over the stop
//! eventfd, the listener and every connection.
//!
//! The pollfd array persists between calls: a connection's entry is updated
//! in place when its interest changes and swap-removed when it closes, so the
//! only O(connections) work per wake is the kernel's scan and ours of
//! `revents`, which is what this architecture costs and what it shows.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use slab::Slab;
use socket2::Socket;

use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Link, Next, Timers, READ_CHUNK};
use crate::gate::{self, AcceptEnd, Acceptor, Gate};
use crate::kind::BackendKind;
use crate::server::{LoopThread, Served};
use crate::sys::{self, Waker};

/// Index of the stop eventfd in the pollfd array (fd −1 once seen).
const STOP: usize = 0;
/// Index of the listener (fd −1 while ignored or closed).
const LISTENER: usize = 1;
/// Index of the first connection.
const FIRST: usize = 2;

/// Starts the loop on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<LoopThread>, Error> {
    let waker = Waker::new().map_err(Error::starting("creating the stop eventfd"))?;
    let poll_loop = PollLoop::new(Arc::clone(&gate), config.limits(), listener, &waker);
    LoopThread::serve(BackendKind::Poll, gate, waker, move || poll_loop.run())
}

/// The loop's state.
#[derive(Debug)]
struct PollLoop {
    /// Admission and the published stop.
    gate: Arc<Gate>,
    /// Per-connection limits.
    limits: Limits,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// The EMFILE back-off.
    acceptor: Acceptor,
    /// What `poll` watches: [stop, listener, connections...].
    fds: Vec<libc::pollfd>,
    /// The slab key of the connection at each index of `fds` (from FIRST).
    owners: Vec<usize>,
    /// Open connections and their index in `fds`.
    links: Slab<(Link<Socket>, usize)>,
    /// Their deadlines.
    timers: Timers,
    /// The loop's one read buffer.
    scratch: Vec<u8>,
    /// Connections with events in the last wake, or just accepted: reused.
    ready: Vec<(usize, libc::c_short)>,
}

impl PollLoop {
    fn new(gate: Arc<Gate>, limits: Limits, listener: Socket, stop: &Waker) -> Self {
        let fds =
            vec![sys::pollfd(stop.raw(), libc::POLLIN), sys::pollfd(listener.as_raw_fd(), libc::POLLIN)];
        PollLoop {
            gate,
            limits,
            listener: Some(listener),
            acceptor: Acceptor::default(),
            fds,
            owners: vec![usize::MAX, usize::MAX],
            links: Slab::new(),
            timers: Timers::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            ready: Vec::new(),
        }
    }

    fn run(mut self) {
        let _alive = self.gate.registry().thread_guard();
        while self.listener.is_some() || !self.links.is_empty() {
            // Level-triggered: while backing off, the listener leaves the set,
            // or every poll would return at once for it.
            let listening = self.listener.as_ref().filter(|_| self.acceptor.listening());
            self.fds[LISTENER].fd = listening.map_or(-1, |l| l.as_raw_fd());
            let wake_at = [self.timers.next(), self.acceptor.wake_at()].into_iter().flatten().min();
            if let Err(e) = sys::poll(&mut self.fds, driver::until(wake_at, Instant::now())) {
                gate::wait_failed(&e);
                continue;
            }
            if self.fds[STOP].revents != 0 {
                self.close_listener();
            }
            if self.acceptor.on_timer(Instant::now()) || self.fds[LISTENER].revents != 0 {
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
            while let Some((key, id, at)) = self.timers.pop_due(now) {
                if self.links.get_mut(key).is_some_and(|(link, _)| Timers::claim(link, id, at)) {
                    self.step(key, false);
                }
            }
        }
    }

    /// Stop began (the gate is closed): close the listener and let every
    /// connection see the stop. The stop eventfd stays readable: it leaves
    /// the set.
    fn close_listener(&mut self) {
        self.listener = None;
        self.fds[STOP].fd = -1;
        self.fds[LISTENER].fd = -1;
        let keys: Vec<usize> = self.links.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.step(key, false);
        }
    }

    /// Accepts until WouldBlock or a back-off, then drives the new ones.
    fn accept_all(&mut self) {
        let Some(listener) = &self.listener else { return };
        let (links, fds, owners, ready, limits) =
            (&mut self.links, &mut self.fds, &mut self.owners, &mut self.ready, self.limits);
        ready.clear();
        let end = self.acceptor.accept_all(listener, &self.gate, |sock, handle| {
            let link = Link::new(sock, handle, limits);
            let fd = link.fd();
            let key = links.insert((link, fds.len()));
            fds.push(sys::pollfd(fd, 0));
            owners.push(key);
            ready.push((key, 0));
        });
        for i in 0..self.ready.len() {
            self.step(self.ready[i].0, false);
        }
        if end == AcceptEnd::Closed && self.listener.is_some() {
            // Stop began: its eventfd is a moment away, and a level-triggered
            // listener with connections queued would wake every poll till then.
            self.close_listener();
        }
    }

    /// Drives one connection and updates its pollfd, or removes both.
    fn step(&mut self, key: usize, hangup: bool) {
        let (link, index) = &mut self.links[key];
        let index = *index;
        match link.drive(&mut self.scratch, &self.gate, hangup) {
            Next::Done => {
                self.links.remove(key);
                self.fds.swap_remove(index);
                self.owners.swap_remove(index);
                if let Some(&moved) = self.owners.get(index) {
                    self.links[moved].1 = index;
                }
            }
            Next::Wait(interest) => {
                self.fds[index].events = interest.poll_events();
                self.fds[index].revents = 0;
                self.timers.schedule(key, link, interest.deadline);
            }
        }
    }
}

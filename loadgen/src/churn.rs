//! Connection churn: `cycles × parallel` connections, at most `parallel` open
//! at once (a finished one is replaced at once, not in lockstep rounds), each
//! connect → one frame → verified echo → close, by FIN or by RST.
//!
//! A connection's latency runs from the start of its connect to its verified
//! echo. A failed attempt counts one error and is not retried. The run stops
//! when every attempt is done, or at its deadline, where connections still
//! open count as timeouts and attempts never started are simply not made
//! (so `frames + errors < cycles × parallel` tells that the deadline hit).
//!
//! Closing first leaves TIME_WAIT on this side (60 s a port on Linux): tens
//! of thousands of graceful connections can run out of local ports, which
//! shows up as `connect` errors; `rst` leaves no TIME_WAIT.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::link::{Link, READ_CHUNK};
use crate::report::{ErrorKind, Mode, Recorder, Report, Shape};
use crate::sys::Timer;
use crate::{on_threads, setup_error, Error};

/// How often a thread looks for stalled connections.
const TICK: Duration = Duration::from_millis(10);
/// The timerfd's token; connections use their slot index.
const TIMER: Token = Token(usize::MAX);

/// A validated churn run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setup {
    /// The server.
    pub address: SocketAddr,
    /// Rounds: each slot makes this many connections, one after another.
    pub cycles: u64,
    /// Connections open at once (≥ 1).
    pub parallel: usize,
    /// Payload bytes of the one frame.
    pub size: usize,
    /// Close with an RST instead of a FIN.
    pub rst: bool,
    /// Worker threads (1..=parallel).
    pub threads: usize,
    /// Longest wait for a connect or the echo (> 0).
    pub timeout: Duration,
    /// The whole run's bound (> 0).
    pub deadline: Duration,
}

/// Runs `setup` to completion.
pub(crate) fn run(setup: Setup) -> Result<Report, Error> {
    let start = Instant::now();
    let hard_end = start + setup.deadline;
    let results = on_threads(setup.threads, |thread| Worker::new(&setup, thread, hard_end)?.run())?;
    let elapsed = start.elapsed();
    let mut rec = Recorder::new();
    for r in results {
        rec.merge(r);
    }
    let shape = Shape { connections: setup.parallel, threads: setup.threads, size: setup.size, rate: None };
    Ok(Report::new(Mode::Churn, shape, rec, elapsed))
}

/// One thread's loop.
struct Worker<'a> {
    /// The run.
    setup: &'a Setup,
    /// This thread's index, part of every connection's number.
    thread: usize,
    /// When the run gives up.
    hard_end: Instant,
    /// The epoll instance.
    poll: Poll,
    /// Wakes `poll` at the next tick or the deadline.
    timer: Timer,
    /// This thread's share of the parallel connections.
    slots: Vec<Option<Link>>,
    /// Attempts not yet started.
    left: u64,
    /// Attempts started so far (numbers connections, so payloads differ).
    started: u64,
    /// The one read buffer.
    scratch: Vec<u8>,
    /// What this thread counted.
    rec: Recorder,
}

impl<'a> Worker<'a> {
    fn new(setup: &'a Setup, thread: usize, hard_end: Instant) -> Result<Self, Error> {
        let poll = Poll::new().map_err(setup_error("creating an epoll instance"))?;
        let timer = Timer::new().map_err(setup_error("creating a timerfd"))?;
        let fd: RawFd = timer.raw();
        poll.registry()
            .register(&mut SourceFd(&fd), TIMER, Interest::READABLE)
            .map_err(setup_error("registering the timerfd"))?;
        let parallel = (thread..setup.parallel).step_by(setup.threads).count();
        Ok(Worker {
            setup,
            thread,
            hard_end,
            poll,
            timer,
            slots: (0..parallel).map(|_| None).collect(),
            left: setup.cycles * parallel as u64,
            started: 0,
            scratch: Vec::with_capacity(READ_CHUNK),
            rec: Recorder::new(),
        })
    }

    fn run(mut self) -> Result<Recorder, Error> {
        let now = Instant::now();
        for s in 0..self.slots.len() {
            self.start_next(s, now);
        }
        let mut events = Events::with_capacity(1024);
        let mut next_tick = now + TICK;
        loop {
            let now = Instant::now();
            if self.left == 0 && self.slots.iter().all(Option::is_none) {
                break;
            }
            if now >= self.hard_end {
                for s in 0..self.slots.len() {
                    if self.slots[s].is_some() {
                        self.end(s, Err(ErrorKind::Timeout));
                    }
                }
                break;
            }
            if now >= next_tick {
                for s in 0..self.slots.len() {
                    if self.slots[s].as_ref().is_some_and(|l| l.stalled(now, self.setup.timeout)) {
                        self.end(s, Err(ErrorKind::Timeout));
                        self.start_next(s, now);
                    }
                }
                next_tick = now + TICK;
            }
            let wake = next_tick.min(self.hard_end);
            self.timer.arm(wake, now).map_err(setup_error("arming the timerfd"))?;
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(setup_error("waiting in epoll_wait")(e)),
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    TIMER => self.timer.expired(),
                    Token(s) => self.on_event(s, event, now),
                }
            }
        }
        Ok(self.rec)
    }

    /// Readiness on slot `s`: drive its connection; once it is done (echoed
    /// or failed), close it and start the next attempt in its place.
    fn on_event(&mut self, s: usize, event: &Event, now: Instant) {
        match self.drive(s, event, now) {
            Ok(false) => {}
            done => {
                self.end(s, done.map(|_| now));
                self.start_next(s, now);
            }
        }
    }

    /// `Ok(true)` once the echo is verified.
    fn drive(&mut self, s: usize, event: &Event, now: Instant) -> Result<bool, ErrorKind> {
        let Some(link) = self.slots[s].as_mut() else { return Ok(false) };
        if !link.connected() {
            if !link.finish_connect()? {
                return Ok(false);
            }
            link.push(link.opened_at, now);
        } else if event.is_readable() || event.is_read_closed() || event.is_error() {
            let mut echoed = false;
            link.read(&mut self.scratch, now, |_| echoed = true)?;
            if echoed {
                return Ok(true);
            }
        }
        link.flush()?;
        Ok(false)
    }

    /// Closes slot `s`'s connection: echoed at `Ok(at)`, or failed.
    fn end(&mut self, s: usize, outcome: Result<Instant, ErrorKind>) {
        let Some(link) = self.slots[s].take() else { return };
        match outcome {
            Ok(at) => {
                self.rec.record(at - link.opened_at);
                self.rec.connects += 1;
                link.close(self.poll.registry(), self.setup.rst);
            }
            Err(kind) => {
                self.rec.errors.add(kind);
                link.close(self.poll.registry(), false);
            }
        }
    }

    /// Starts the next attempt in slot `s`, if any is left; an attempt whose
    /// connect fails at once counts and the next one is tried.
    fn start_next(&mut self, s: usize, now: Instant) {
        while self.left > 0 {
            self.left -= 1;
            let uid = (self.started << 16) | self.thread as u64;
            self.started += 1;
            match Link::open(self.poll.registry(), Token(s), self.setup.address, uid, self.setup.size, now) {
                Ok(link) => {
                    self.slots[s] = Some(link);
                    return;
                }
                Err(_) => self.rec.errors.add(ErrorKind::Connect),
            }
        }
    }
}

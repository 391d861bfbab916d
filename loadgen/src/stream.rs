//! Closed- and open-loop echo load: long-lived connections spread over a
//! few threads, each a mio loop over its share.
//!
//! A run has three phases, the same instants for every thread:
//!
//! 1. warm-up, `[start, window_start)`: connections open and frames flow,
//!    nothing is counted but errors;
//! 2. the measured window, `[window_start, window_end)`;
//! 3. the drain: no new frame; answers still owed are awaited until
//!    `hard_end` (window end + timeout), so connections close with nothing
//!    in flight (the server sees an orderly EOF, not a reset).
//!
//! Closed loop: each connection keeps `pipeline` frames in flight, sending one
//! when one is answered; a frame counts if its answer comes inside the window,
//! with latency = answer − send.
//!
//! Open loop: frame `k` of the run is due at `start + k / rate`, whatever the
//! server does. Thread `t` owns frames `k = t, t + T, t + 2T, …`, round-robin
//! over its connections; a due frame waits in its connection's backlog until
//! the socket takes it. A frame counts if it was *due* inside the window, with
//! latency = answer − due instant, so a server that stalls for 200 ms shows
//! 200 ms in the tail instead of just sending fewer frames (coordinated
//! omission, as wrk2 avoids it). The drain waits for the window's last answers.
//!
//! A failed connection (any [`ErrorKind`]) counts one error and is closed;
//! its unanswered frames sent in the window count as `lost`. It is reopened
//! after `REOPEN_DELAY` (10 ms; in the drain only if an open loop's backlog still
//! holds frames for it); an open loop's backlog survives the reconnect.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::link::{Link, READ_CHUNK};
use crate::live::{Tap, FLUSH};
use crate::report::{ErrorKind, Mode, Recorder, Report, Shape};
use crate::sys::Timer;
use crate::{on_threads, setup_error, Error};

/// How often a thread checks its connections for timeouts and reopens.
const TICK: Duration = Duration::from_millis(10);
/// How long a failed connection stays closed before it is reopened, so a
/// server that refuses connections is not hammered in a tight loop.
pub(crate) const REOPEN_DELAY: Duration = TICK;
/// The timerfd's token; connections use their slot index.
const TIMER: Token = Token(usize::MAX);

/// How frames are paced.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pacing {
    /// Each connection keeps this many frames in flight.
    Closed { pipeline: usize },
    /// Frames per second across all connections, on a fixed schedule.
    Open { rate: f64 },
}

/// A validated stream run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setup {
    /// The server.
    pub address: SocketAddr,
    /// Connections kept open (≥ 1).
    pub connections: usize,
    /// Payload bytes per frame.
    pub size: usize,
    /// Closed or open loop.
    pub pacing: Pacing,
    /// The measured window's length (> 0).
    pub duration: Duration,
    /// Time before the window, not counted.
    pub warmup: Duration,
    /// Worker threads (1..=connections).
    pub threads: usize,
    /// Longest wait for a connect or an owed answer (> 0); also the drain's bound.
    pub timeout: Duration,
}

/// The instants every thread shares.
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// When the warm-up begins (open loop: frame 0 is due).
    start: Instant,
    /// When counting begins.
    window_start: Instant,
    /// When new frames stop.
    window_end: Instant,
    /// When the drain gives up: owed answers become timeouts.
    hard_end: Instant,
}

impl Phases {
    /// Whether `t` is inside the measured window.
    fn in_window(&self, t: Instant) -> bool {
        t >= self.window_start && t < self.window_end
    }
}

/// Runs `setup` to completion. With a `tap`, the threads move what they
/// record into it as they go, and a stop on it ends the window early.
pub(crate) fn run(setup: Setup, tap: Option<&Tap>) -> Result<Report, Error> {
    let start = Instant::now();
    let window_start = start + setup.warmup;
    let window_end = window_start + setup.duration;
    let phases = Phases { start, window_start, window_end, hard_end: window_end + setup.timeout };
    let results = on_threads(setup.threads, |thread| Worker::new(&setup, phases, thread, tap)?.run())?;
    let mut rec = tap.map_or_else(Recorder::new, Tap::total);
    let mut last_answer = None;
    for (r, last) in results {
        rec.merge(r);
        last_answer = last_answer.max(last);
    }
    let window_end = tap.and_then(Tap::stopped).map_or(window_end, |at| at.min(window_end));
    let end = match setup.pacing {
        Pacing::Closed { .. } => window_end,
        Pacing::Open { .. } => last_answer.map_or(window_end, |t| t.max(window_end)),
    };
    let (mode, rate) = match setup.pacing {
        Pacing::Closed { .. } => (Mode::ClosedLoop, None),
        Pacing::Open { rate } => (Mode::OpenLoop, Some(rate)),
    };
    let shape = Shape { connections: setup.connections, threads: setup.threads, size: setup.size, rate };
    Ok(Report::new(mode, shape, rec, end.saturating_duration_since(window_start)))
}

/// One connection's place in a thread.
#[derive(Debug)]
struct Slot {
    /// The connection's number in the run (0..connections).
    conn: usize,
    /// How many times it was opened: with `conn`, names its payloads.
    generation: u64,
    /// The open connection, if any.
    link: Option<Link>,
    /// Open loop: due instants of frames not yet encoded, oldest first.
    backlog: VecDeque<Instant>,
    /// When to reopen a failed connection.
    reopen_at: Option<Instant>,
}

/// One thread's loop.
struct Worker<'a> {
    /// The run.
    setup: &'a Setup,
    /// Its instants.
    phases: Phases,
    /// This thread's index (0..threads).
    thread: usize,
    /// The epoll instance.
    poll: Poll,
    /// Wakes `poll` at the next due instant, to the microsecond.
    timer: Timer,
    /// This thread's connections: connection `thread + i × threads` in slot `i`.
    slots: Vec<Slot>,
    /// The one read buffer.
    scratch: Vec<u8>,
    /// What this thread counted.
    rec: Recorder,
    /// Open loop: this thread's next frame is `thread + next_j × threads`.
    next_j: u64,
    /// Open loop: frames due in the window not yet answered nor lost.
    window_owed: u64,
    /// Open loop: when the last frame due in the window was answered.
    last_answer: Option<Instant>,
    /// Set at the window's end: no new frames.
    draining: bool,
    /// Where what `rec` holds goes every [`FLUSH`], if the run is watched.
    tap: Option<&'a Tap>,
    /// When `rec` next goes into the tap.
    next_flush: Instant,
}

impl<'a> Worker<'a> {
    fn new(setup: &'a Setup, phases: Phases, thread: usize, tap: Option<&'a Tap>) -> Result<Self, Error> {
        let poll = Poll::new().map_err(setup_error("creating an epoll instance"))?;
        let timer = Timer::new().map_err(setup_error("creating a timerfd"))?;
        let fd: RawFd = timer.raw();
        poll.registry()
            .register(&mut SourceFd(&fd), TIMER, Interest::READABLE)
            .map_err(setup_error("registering the timerfd"))?;
        let slots = (thread..setup.connections)
            .step_by(setup.threads)
            .map(|conn| Slot { conn, generation: 0, link: None, backlog: VecDeque::new(), reopen_at: None })
            .collect();
        Ok(Worker {
            setup,
            phases,
            thread,
            poll,
            timer,
            slots,
            scratch: Vec::with_capacity(READ_CHUNK),
            rec: Recorder::new(),
            next_j: 0,
            window_owed: 0,
            last_answer: None,
            draining: false,
            tap,
            next_flush: phases.start + FLUSH,
        })
    }

    fn run(mut self) -> Result<(Recorder, Option<Instant>), Error> {
        let now = Instant::now();
        for s in 0..self.slots.len() {
            self.open(s, now);
        }
        let mut events = Events::with_capacity(1024);
        let mut next_tick = now + TICK;
        loop {
            let now = Instant::now();
            self.heed_stop();
            if now >= self.phases.hard_end {
                self.expire();
                break;
            }
            // Scheduled first: at the window's end, the frames due since the
            // last pass must be in a backlog before the drain can look empty.
            let next_due = self.schedule(now);
            if now >= self.phases.window_end {
                self.draining = true;
                if self.drained() {
                    break;
                }
            }
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
                if now >= self.next_flush {
                    self.flush();
                    self.next_flush = now + FLUSH;
                }
            }
            let mut wake = next_tick.min(self.phases.hard_end);
            if !self.draining {
                wake = wake.min(self.phases.window_end);
            }
            if let Some(due) = next_due {
                wake = wake.min(due);
            }
            self.wait(&mut events, wake)?;
            let now = Instant::now();
            // A stop during the wait: answers read from now on are past the window.
            self.heed_stop();
            for event in events.iter() {
                match event.token() {
                    TIMER => self.timer.expired(),
                    Token(s) => self.on_event(s, event, now),
                }
            }
        }
        for slot in &mut self.slots {
            if let Some(link) = slot.link.take() {
                link.close(self.poll.registry(), false);
            }
        }
        self.flush();
        Ok((self.rec, self.last_answer))
    }

    /// Moves what this thread recorded into the tap, if the run is watched.
    fn flush(&mut self) {
        if let Some(tap) = self.tap {
            tap.absorb(&mut self.rec);
        }
    }

    /// Ends the window at the tap's stop, if one came before the window's
    /// planned end (a stop in the warm-up leaves an empty window); the
    /// drain then runs as at a planned end. Seen within a tick.
    fn heed_stop(&mut self) {
        let Some(at) = self.tap.and_then(Tap::stopped) else { return };
        if at < self.phases.window_end {
            self.phases.window_end = at;
            self.phases.hard_end = at + self.setup.timeout;
        }
    }

    /// Waits for readiness or `wake`, whichever comes first.
    fn wait(&mut self, events: &mut Events, wake: Instant) -> Result<(), Error> {
        let now = Instant::now();
        let timeout = if wake <= now {
            Some(Duration::ZERO)
        } else {
            self.timer.arm(wake, now).map_err(setup_error("arming the timerfd"))?;
            None
        };
        match self.poll.poll(events, timeout) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                events.clear();
                Ok(())
            }
            Err(e) => Err(setup_error("waiting in epoll_wait")(e)),
        }
    }

    /// Whether the drain is over: nothing owed, nothing left to send.
    fn drained(&self) -> bool {
        self.slots.iter().all(|s| s.backlog.is_empty() && s.link.as_ref().is_none_or(|l| l.owed() == 0))
    }

    /// Open loop: moves every frame due by `now` into its connection's
    /// backlog and sends what the sockets take; returns when the next frame
    /// is due (None for a closed loop or once the window's frames are all due).
    fn schedule(&mut self, now: Instant) -> Option<Instant> {
        let Pacing::Open { rate } = self.setup.pacing else { return None };
        let n = self.slots.len() as u64;
        let first = self.next_j;
        let next = loop {
            let due = self.due(self.next_j, rate);
            if due > now || due >= self.phases.window_end {
                break due;
            }
            let s = (self.next_j % n) as usize;
            self.slots[s].backlog.push_back(due);
            if self.phases.in_window(due) {
                self.window_owed += 1;
            }
            self.next_j += 1;
        };
        // Frames go round-robin, so the slots touched are consecutive: pump each once.
        let touched = (self.next_j - first).min(n);
        for j in first..first + touched {
            self.pump((j % n) as usize, now);
        }
        (next < self.phases.window_end).then_some(next)
    }

    /// When this thread's `j`-th frame (frame `thread + j × threads` of the run) is due.
    fn due(&self, j: u64, rate: f64) -> Instant {
        let k = self.thread as u64 + j * self.setup.threads as u64;
        self.phases.start + Duration::from_nanos((k as f64 * 1e9 / rate) as u64)
    }

    /// Starts (or restarts) the connection of slot `s`.
    fn open(&mut self, s: usize, now: Instant) {
        let slot = &mut self.slots[s];
        slot.reopen_at = None;
        let uid = (slot.generation << 32) | slot.conn as u64;
        slot.generation += 1;
        match Link::open(self.poll.registry(), Token(s), self.setup.address, uid, self.setup.size, now) {
            Ok(link) => slot.link = Some(link),
            Err(_) => {
                self.rec.errors.add(ErrorKind::Connect);
                slot.reopen_at = Some(now + REOPEN_DELAY);
            }
        }
    }

    /// Times out stalled connections and reopens failed ones.
    fn tick(&mut self, now: Instant) {
        for s in 0..self.slots.len() {
            let slot = &self.slots[s];
            match &slot.link {
                Some(link) if link.stalled(now, self.setup.timeout) => self.fail(s, ErrorKind::Timeout, now),
                None if slot.reopen_at.is_some_and(|t| t <= now) => self.open(s, now),
                _ => {}
            }
        }
    }

    /// Readiness on slot `s`'s connection.
    fn on_event(&mut self, s: usize, event: &Event, now: Instant) {
        if let Err(kind) = self.drive(s, event, now) {
            self.fail(s, kind, now);
        }
    }

    /// Finishes the connect, reads and checks answers, and sends what the
    /// pacing asks for.
    fn drive(&mut self, s: usize, event: &Event, now: Instant) -> Result<(), ErrorKind> {
        let Worker { setup, phases, slots, scratch, rec, window_owed, last_answer, draining, .. } = self;
        let Some(link) = slots[s].link.as_mut() else { return Ok(()) };
        let mut sends = 0;
        if !link.connected() {
            if !link.finish_connect()? {
                return Ok(());
            }
            if phases.in_window(now) {
                rec.connects += 1;
            }
            if let Pacing::Closed { pipeline } = setup.pacing {
                sends = pipeline;
            }
        } else if event.is_readable() || event.is_read_closed() || event.is_error() {
            match setup.pacing {
                Pacing::Closed { .. } => link.read(scratch, now, |origin| {
                    if phases.in_window(now) {
                        rec.record(now - origin);
                    }
                    sends += 1;
                })?,
                Pacing::Open { .. } => link.read(scratch, now, |due| {
                    if phases.in_window(due) {
                        rec.record(now.saturating_duration_since(due));
                        *window_owed -= 1;
                        *last_answer = Some(now);
                    }
                })?,
            }
        }
        match setup.pacing {
            Pacing::Closed { .. } => {
                if !*draining {
                    for _ in 0..sends {
                        link.push(now, now);
                    }
                }
                link.flush()
            }
            Pacing::Open { .. } => self.pump_link(s, now),
        }
    }

    /// Open loop: sends slot `s`'s backlog; a failure closes the connection.
    fn pump(&mut self, s: usize, now: Instant) {
        if self.slots[s].link.as_ref().is_some_and(Link::connected) {
            if let Err(kind) = self.pump_link(s, now) {
                self.fail(s, kind, now);
            }
        }
    }

    /// Encodes backlog frames while the link has room, and writes them.
    fn pump_link(&mut self, s: usize, now: Instant) -> Result<(), ErrorKind> {
        let slot = &mut self.slots[s];
        let Some(link) = slot.link.as_mut() else { return Ok(()) };
        loop {
            while link.has_room() {
                let Some(due) = slot.backlog.pop_front() else { break };
                link.push(due, now);
            }
            link.flush()?;
            // Stop when everything went, or when the socket is full (its
            // writable edge calls again).
            if slot.backlog.is_empty() || !link.has_room() {
                return Ok(());
            }
        }
    }

    /// Counts a failure of slot `s`'s connection, closes it, and plans its reopening.
    fn fail(&mut self, s: usize, kind: ErrorKind, now: Instant) {
        self.rec.errors.add(kind);
        let slot = &mut self.slots[s];
        if let Some(link) = slot.link.take() {
            let owed = link.close(self.poll.registry(), false);
            self.count_lost(owed.iter().copied());
        }
        let slot = &mut self.slots[s];
        let more = match self.setup.pacing {
            Pacing::Closed { .. } => !self.draining,
            Pacing::Open { .. } => !self.draining || !slot.backlog.is_empty(),
        };
        slot.reopen_at = more.then_some(now + REOPEN_DELAY);
    }

    /// Counts frames that will never be answered: those of the window are
    /// `lost` (open loop: due in it; closed loop: sent in it).
    fn count_lost(&mut self, origins: impl Iterator<Item = Instant>) {
        for origin in origins {
            if self.phases.in_window(origin) {
                self.rec.lost += 1;
                if let Pacing::Open { .. } = self.setup.pacing {
                    self.window_owed -= 1;
                }
            }
        }
    }

    /// The hard deadline came: every connection still owing answers (or
    /// still connecting) counts a timeout, and its window frames are lost.
    fn expire(&mut self) {
        for s in 0..self.slots.len() {
            let slot = &mut self.slots[s];
            let backlog = std::mem::take(&mut slot.backlog);
            let stuck = match &slot.link {
                Some(link) => link.owed() > 0 || !link.connected() || !backlog.is_empty(),
                None => !backlog.is_empty(),
            };
            if stuck {
                self.rec.errors.add(ErrorKind::Timeout);
            }
            if let Some(link) = self.slots[s].link.take() {
                let owed = link.close(self.poll.registry(), false);
                self.count_lost(owed.into_iter());
            }
            self.count_lost(backlog.into_iter());
        }
    }
}

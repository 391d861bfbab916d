//! The sans-IO connection state machine shared by every backend.
//!
//! A [`Conn`] consumes bytes read and the current instant, and answers with
//! bytes to write ([`Conn::pending`]), when to wake it ([`Conn::deadline`]),
//! what to wait for ([`Conn::wants_read`], [`Conn::wants_write`]) and what to
//! do to the socket ([`Conn::action`]). It never touches a socket, so the five
//! backends behave alike by construction: they only move bytes. Everything
//! that must be counted or journaled is reported to an [`Observer`].

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::codec::{Decoded, Decoder, HEADER_LEN};

/// The five connection states (DESIGN.md §3), in journal order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Accepted and registered, no byte consumed yet.
    Connecting = 0,
    /// Waiting for (the rest of) a 4-byte header.
    ReadingHeader = 1,
    /// Header complete, body incomplete.
    ReadingBody = 2,
    /// An answer byte is queued in user space.
    Writing = 3,
    /// The close is decided; the fd is not closed yet.
    Closing = 4,
}

impl State {
    /// Every state, indexed by its `repr`.
    pub const ALL: [State; 5] =
        [State::Connecting, State::ReadingHeader, State::ReadingBody, State::Writing, State::Closing];

    /// The name used in stats, journals and Python.
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "Connecting",
            State::ReadingHeader => "ReadingHeader",
            State::ReadingBody => "ReadingBody",
            State::Writing => "Writing",
            State::Closing => "Closing",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a connection closed (DESIGN.md §3); each is a counter in `closed_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The peer finished (FIN) and every answer owed was delivered.
    Eof = 0,
    /// No frame in progress and no answer queued for `idle_timeout`.
    IdleTimeout = 1,
    /// A frame was not complete within `read_timeout` of its first byte.
    ReadTimeout = 2,
    /// No write accepted a byte of a queued answer for `write_timeout`.
    WriteTimeout = 3,
    /// A header announced more than `max_frame`.
    ProtocolError = 4,
    /// ECONNRESET or EPIPE.
    Reset = 5,
    /// Any other I/O error (or a thread that could not be spawned).
    IoError = 6,
    /// Closed by `stop()`, drained or forced.
    Shutdown = 7,
    /// Over `max_connections`; never registered.
    Rejected = 8,
}

impl CloseReason {
    /// Every reason, indexed by its `repr`.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Eof,
        CloseReason::IdleTimeout,
        CloseReason::ReadTimeout,
        CloseReason::WriteTimeout,
        CloseReason::ProtocolError,
        CloseReason::Reset,
        CloseReason::IoError,
        CloseReason::Shutdown,
        CloseReason::Rejected,
    ];

    /// The name used in stats, journals and Python.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ReadTimeout => "read_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Reset => "reset",
            CloseReason::IoError => "io_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Rejected => "rejected",
        }
    }

    /// The reason an I/O error stands for: `reset` for ECONNRESET and EPIPE,
    /// `io_error` for everything else.
    pub fn of_error(err: &std::io::Error) -> CloseReason {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                CloseReason::Reset
            }
            _ => CloseReason::IoError,
        }
    }

    /// Graceful reasons flush, half-close and linger; the others abort.
    fn is_graceful(self) -> bool {
        matches!(
            self,
            CloseReason::Eof
                | CloseReason::ProtocolError
                | CloseReason::IdleTimeout
                | CloseReason::ReadTimeout
                | CloseReason::Shutdown
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CloseReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CloseReason::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown close reason {s:?}"))
    }
}

/// The per-connection limits the core enforces (a copy of the config's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body accepted.
    pub max_frame: u32,
    /// Queued output above which reading pauses (it resumes below half).
    pub max_pending_output: usize,
    /// Idle clock; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Whole-frame read clock; `None` disables it.
    pub read_timeout: Option<Duration>,
    /// Write-progress clock; `None` disables it.
    pub write_timeout: Option<Duration>,
    /// Whether input is read while answers are queued (up to
    /// `max_pending_output`). A backend whose thread blocks in `send` cannot
    /// read meanwhile: it reads again once every answer is written, and the
    /// read clock pauses while it may not read (the client is not late).
    pub read_while_writing: bool,
}

/// How long a graceful close reads and discards after `shutdown(SHUT_WR)`.
pub const LINGER: Duration = Duration::from_secs(1);

/// Written bytes at the front of the output queue are dropped once there are
/// this many and they are at least a quarter of what is still queued (each
/// byte is moved at most about four times; the front never outweighs the rest).
const COMPACT_AFTER: usize = 64 << 10;

/// Receives what the core counts and journals; the registry implements it.
pub trait Observer {
    /// The state changed (`from` is `None` for the first entry).
    fn transition(&mut self, from: Option<State>, to: State, reason: Option<CloseReason>, now: Instant);
    /// `n` bytes were read from the socket.
    fn bytes_in(&mut self, n: usize, now: Instant);
    /// `n` bytes were written to the socket.
    fn bytes_out(&mut self, n: usize, now: Instant);
    /// A whole frame was received.
    fn frame_in(&mut self);
    /// `n` answers were completely written.
    fn frames_out(&mut self, n: u64);
    /// A partial frame was discarded at close.
    fn truncated(&mut self);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn transition(&mut self, _: Option<State>, _: State, _: Option<CloseReason>, _: Instant) {}
    fn bytes_in(&mut self, _: usize, _: Instant) {}
    fn bytes_out(&mut self, _: usize, _: Instant) {}
    fn frame_in(&mut self) {}
    fn frames_out(&mut self, _: u64) {}
    fn truncated(&mut self) {}
}

/// What the backend must do to the socket now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep moving bytes as [`Conn::wants_read`] / [`Conn::wants_write`] say.
    Continue,
    /// Everything is flushed: call `shutdown(SHUT_WR)`, then
    /// [`Conn::on_shutdown_write`].
    ShutdownWrite,
    /// Done gracefully: `close()` the fd, then unregister.
    Close,
    /// Done abortively: `SO_LINGER {on, 0}`, `close()`, then unregister.
    Abort,
}

/// Where a decided close is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Graceful: flushing queued output; `linger` is how long to read and
    /// discard after the half-close (zero: close right after it).
    Flush { linger: Duration },
    /// Half-closed; reading and discarding until EOF, RST or `until`.
    Linger { until: Instant },
    /// Nothing left but to close the fd (`abort`: with `SO_LINGER 0`).
    Done { abort: bool },
}

/// A decided close: why, and how far along it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Close {
    /// The recorded reason; it never changes once decided.
    reason: CloseReason,
    /// Progress of the close.
    phase: Phase,
}

/// What `stop()` asked of this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Not stopping.
    No,
    /// Draining: close gracefully once no frame is in progress and no answer
    /// queued; abort at `grace_end`.
    Draining { grace_end: Instant },
}

/// One connection's protocol and lifecycle state, without I/O.
#[derive(Debug)]
pub struct Conn {
    /// Limits and clocks from the config.
    limits: Limits,
    /// Frame decoder; knows whether a frame is in progress.
    decoder: Decoder,
    /// The frame in progress when its body spans reads: header then the body
    /// bytes so far. Empty (no allocation) between frames.
    partial: Vec<u8>,
    /// Input read while backpressure suspended parsing; parsed when the queue
    /// drains. Empty (no allocation) otherwise.
    held: Vec<u8>,
    /// Queued answers; `out[out_pos..]` is still to be written. Deallocated
    /// whenever it is fully written, so an idle connection holds no buffer.
    out: Vec<u8>,
    /// Bytes of `out` already written.
    out_pos: usize,
    /// Offset in `out` just past the answer being written (0 with `out`
    /// empty): answers are queued whole, so the next one's header is there.
    head_end: usize,
    /// The state last journaled (the rule of DESIGN.md §3 applied).
    state: State,
    /// Whether any byte was ever consumed (Connecting vs ReadingHeader).
    consumed_any: bool,
    /// The decided close, if any.
    close: Option<Close>,
    /// Whether the close was decided before stop began (counts as drained).
    closing_before_stop: bool,
    /// Whether this connection was aborted when the grace ended.
    forced: bool,
    /// Whether the peer's FIN was seen.
    peer_eof: bool,
    /// Whether backpressure suspends reading and parsing.
    paused: bool,
    /// Since when the connection is idle (no frame in progress, nothing
    /// queued or held); `None` while it is not idle.
    idle_since: Option<Instant>,
    /// When the frame in progress must be complete; `None` with no frame in
    /// progress or while paused.
    read_deadline: Option<Instant>,
    /// Since when reading waits for queued answers to be written (only
    /// without `read_while_writing`): the read clock stops meanwhile, and
    /// `read_deadline` moves by the time it stood still.
    read_waits_since: Option<Instant>,
    /// When a write last accepted a byte, or when output was first queued.
    write_since: Instant,
    /// What stop asked.
    stop: Stop,
    /// Whether any byte arrived before the close decision.
    received: bool,
    /// On a handoff's stop, a connection that has received nothing yet waits
    /// until then for its first frame: its client connected to be served,
    /// and its frame may be on the way.
    first_frame_by: Option<Instant>,
}

impl Conn {
    /// A connection accepted at `now`; journals None→Connecting.
    pub fn new(limits: Limits, now: Instant, obs: &mut impl Observer) -> Self {
        obs.transition(None, State::Connecting, None, now);
        Conn {
            limits,
            decoder: Decoder::new(limits.max_frame),
            partial: Vec::new(),
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            head_end: 0,
            state: State::Connecting,
            consumed_any: false,
            close: None,
            closing_before_stop: false,
            forced: false,
            peer_eof: false,
            paused: false,
            idle_since: Some(now),
            read_deadline: None,
            read_waits_since: None,
            write_since: now,
            stop: Stop::No,
            received: false,
            first_frame_by: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The close reason, once decided.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.map(|c| c.reason)
    }

    /// Whether the grace of `stop` ended with this connection still open.
    pub fn forced(&self) -> bool {
        self.forced
    }

    /// Whether the close was decided before `stop` began.
    pub fn closing_before_stop(&self) -> bool {
        self.closing_before_stop
    }

    /// Queued output still to be written.
    pub fn pending(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Bytes of buffer the connection holds (input partial or held, output
    /// queue); 0 whenever it is idle.
    pub fn buffered_capacity(&self) -> usize {
        self.partial.capacity() + self.held.capacity() + self.out.capacity()
    }

    /// Whether output is queued.
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len() && !matches!(self.phase(), Some(Phase::Done { .. }))
    }

    /// Whether the backend should read from the socket now.
    pub fn wants_read(&self) -> bool {
        match self.phase() {
            None => !self.paused && !self.peer_eof && self.read_waits_since.is_none(),
            // A graceful close reads and discards while it flushes, unless
            // the backend cannot read while it writes.
            Some(Phase::Flush { .. }) => {
                !self.peer_eof && (self.limits.read_while_writing || !self.wants_write())
            }
            Some(Phase::Linger { .. }) => !self.peer_eof,
            Some(Phase::Done { .. }) => false,
        }
    }

    /// Whether nothing is in progress, queued or held: the connection holds
    /// no buffer and may be closed at once by `stop`.
    pub fn is_idle(&self) -> bool {
        self.close.is_none() && !self.decoder.in_frame() && self.out.is_empty() && self.held.is_empty()
    }

    /// What the backend must do to the socket now.
    pub fn action(&self) -> Action {
        match self.phase() {
            None | Some(Phase::Linger { .. }) => Action::Continue,
            Some(Phase::Flush { .. }) if self.wants_write() => Action::Continue,
            Some(Phase::Flush { .. }) => Action::ShutdownWrite,
            Some(Phase::Done { abort: false }) => Action::Close,
            Some(Phase::Done { abort: true }) => Action::Abort,
        }
    }

    /// The earliest instant at which [`Conn::on_timer`] has work, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.clocks().into_iter().flatten().map(|(at, _)| at).min()
    }

    fn phase(&self) -> Option<Phase> {
        self.close.map(|c| c.phase)
    }

    /// Every running clock: when it expires and what expiry means.
    fn clocks(&self) -> [Option<(Instant, Expiry)>; 6] {
        let l = &self.limits;
        let mut clocks = [None; 6];
        if matches!(self.phase(), Some(Phase::Done { .. })) {
            return clocks;
        }
        if let (Some(since), Some(t)) = (self.idle_since, l.idle_timeout) {
            clocks[0] = Some((since + t, Expiry::Idle));
        }
        if let (Some(at), None) = (self.read_deadline, self.read_waits_since) {
            clocks[1] = Some((at, Expiry::Read));
        }
        if let (true, Some(t)) = (self.wants_write(), l.write_timeout) {
            clocks[2] = Some((self.write_since + t, Expiry::Write));
        }
        if let Some(Phase::Linger { until }) = self.phase() {
            clocks[3] = Some((until, Expiry::Linger));
        }
        // Before the grace: at the same instant, the first-frame wait ends in
        // a graceful close, not a forced one.
        if let (Some(by), false, None) = (self.first_frame_by, self.received, self.close) {
            clocks[4] = Some((by, Expiry::FirstFrame));
        }
        if let Stop::Draining { grace_end } = self.stop {
            clocks[5] = Some((grace_end, Expiry::Grace));
        }
        clocks
    }

    /// Consumes bytes read from the socket.
    pub fn on_read(&mut self, data: &[u8], now: Instant, obs: &mut impl Observer) {
        if data.is_empty() {
            return;
        }
        obs.bytes_in(data.len(), now);
        if self.close.is_some() {
            // Closing: input after the close decision is read only so the
            // peer's sends do not stall, and is discarded.
            return;
        }
        self.received = true;
        if self.paused || !self.held.is_empty() {
            self.held.extend_from_slice(data);
        } else {
            let used = self.parse(data, now, obs);
            if used < data.len() && self.close.is_none() {
                self.held.extend_from_slice(&data[used..]);
            }
        }
        self.settle(now, obs);
    }

    /// The peer sent FIN (a read returned 0).
    pub fn on_eof(&mut self, now: Instant, obs: &mut impl Observer) {
        self.peer_eof = true;
        if let Some(Phase::Linger { .. }) = self.phase() {
            self.set_phase(Phase::Done { abort: false });
        }
        self.settle(now, obs);
    }

    /// A syscall on the socket failed (not WouldBlock, not Interrupted).
    pub fn on_error(&mut self, err: &std::io::Error, now: Instant, obs: &mut impl Observer) {
        self.abort(CloseReason::of_error(err), now, obs);
    }

    /// `n` bytes of [`Conn::pending`] were written.
    pub fn on_written(&mut self, n: usize, now: Instant, obs: &mut impl Observer) {
        if n == 0 {
            return;
        }
        obs.bytes_out(n, now);
        self.write_since = now;
        self.out_pos += n;
        debug_assert!(self.out_pos <= self.out.len());
        let mut done = 0;
        while self.head_end != 0 && self.out_pos >= self.head_end {
            done += 1;
            self.head_end = match self.out.get(self.head_end..self.head_end + HEADER_LEN) {
                Some(header) => {
                    let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
                    self.head_end + HEADER_LEN + len
                }
                None => 0,
            };
        }
        if done > 0 {
            obs.frames_out(done);
        }
        if self.out_pos == self.out.len() {
            self.out = Vec::new();
            self.out_pos = 0;
        } else if self.out_pos >= COMPACT_AFTER && self.out_pos * 4 >= self.out.len() - self.out_pos {
            // A peer that reads steadily but never empties the queue would
            // otherwise grow the buffer by everything ever written through it.
            self.drop_written();
        }
        if self.paused && (self.out.len() - self.out_pos) * 2 < self.limits.max_pending_output {
            self.paused = false;
            if self.close.is_none() && !self.held.is_empty() {
                let held = std::mem::take(&mut self.held);
                let used = self.parse(&held, now, obs);
                if used < held.len() && self.close.is_none() {
                    self.held = held[used..].to_vec();
                }
            }
        }
        self.settle(now, obs);
    }

    /// The backend did `shutdown(SHUT_WR)` as [`Action::ShutdownWrite`] asked.
    pub fn on_shutdown_write(&mut self, now: Instant) {
        if let Some(Phase::Flush { linger }) = self.phase() {
            let phase = if linger.is_zero() || self.peer_eof {
                Phase::Done { abort: false }
            } else {
                Phase::Linger { until: now + linger }
            };
            self.set_phase(phase);
        }
    }

    /// Time passed: applies every clock that expired by `now`.
    pub fn on_timer(&mut self, now: Instant, obs: &mut impl Observer) {
        let expired =
            self.clocks().into_iter().flatten().filter(|&(at, _)| at <= now).min_by_key(|&(at, _)| at);
        let Some((_, what)) = expired else { return };
        match what {
            Expiry::Idle => self.decide(CloseReason::IdleTimeout, now, obs),
            Expiry::Read => self.decide(CloseReason::ReadTimeout, now, obs),
            // A stalled graceful flush becomes abortive and keeps its reason.
            Expiry::Write => self.abort(CloseReason::WriteTimeout, now, obs),
            Expiry::Linger => self.set_phase(Phase::Done { abort: false }),
            Expiry::FirstFrame => self.decide(CloseReason::Shutdown, now, obs),
            Expiry::Grace => {
                // Only a connection still busy is forced: one whose close
                // waits for nothing but shutdown(SHUT_WR) and close() (stop's
                // idle close, even with a grace of 0) finishes gracefully.
                if self.action() == Action::Continue {
                    self.forced = !self.closing_before_stop;
                    self.abort(CloseReason::Shutdown, now, obs);
                }
            }
        }
        // Another clock may have expired at the same instant.
        if self.action() == Action::Continue && self.deadline().is_some_and(|at| at <= now) {
            self.on_timer(now, obs);
        }
    }

    /// `stop()` began. `rx_empty` is whether the kernel's receive queue is
    /// empty (`FIONREAD` 0). Idle connections close at once without linger.
    /// On a handoff (`linger_idle`) the port lives on and a client's frame
    /// may be on its way: an idle connection closes with the usual lingering
    /// close (its frame meets a FIN, not an RST), and one that has received
    /// nothing yet first waits up to the linger for its first frame and
    /// answers it. The others drain until `grace_end`.
    pub fn on_stop(
        &mut self,
        now: Instant,
        grace_end: Instant,
        rx_empty: bool,
        linger_idle: bool,
        obs: &mut impl Observer,
    ) {
        if self.close.is_some() {
            self.closing_before_stop = true;
            self.stop = Stop::Draining { grace_end };
            return;
        }
        self.stop = Stop::Draining { grace_end };
        if self.is_idle() && rx_empty {
            if linger_idle && !self.received {
                self.first_frame_by = Some(now + LINGER.min(grace_end.saturating_duration_since(now)));
            } else if linger_idle {
                self.decide(CloseReason::Shutdown, now, obs);
            } else {
                self.decide_with_linger(CloseReason::Shutdown, Duration::ZERO, now, obs);
            }
        }
        // Otherwise the next event settles it: bytes still in the kernel's
        // queue are read and answered before the drain close.
        if now >= grace_end {
            self.on_timer(now, obs);
        }
    }

    /// Parses `input` frame by frame until it ends, backpressure pauses, or
    /// a violation closes; returns the bytes used.
    fn parse(&mut self, input: &[u8], now: Instant, obs: &mut impl Observer) -> usize {
        let mut used = 0;
        while used < input.len() && !self.paused && self.close.is_none() {
            if !self.decoder.in_frame() {
                // A frame begins: its clock starts, and ReadingHeader is
                // journaled even when the whole header came in this step.
                self.consumed_any = true;
                self.idle_since = None;
                // A frame begun while reading waits for the answers (its bytes
                // were read before) starts its clock when reading resumes:
                // anchored at the wait's start, the resume moves it on.
                let start = self.read_waits_since.unwrap_or(now);
                self.read_deadline = self.limits.read_timeout.map(|t| start + t);
                self.journal(now, obs);
            }
            let (n, what) = self.decoder.decode(&input[used..]);
            used += n;
            match what {
                Decoded::HeaderPart => {}
                Decoded::Header { len: 0 } => self.queue_frame(&[], now),
                Decoded::Header { .. } => {}
                Decoded::Body { bytes, done } => {
                    if done && self.partial.is_empty() {
                        self.queue_frame(bytes, now);
                    } else {
                        if self.partial.is_empty() {
                            let len = u32::from_be_bytes(self.decoder.header()) as usize;
                            self.fit_out_beside(HEADER_LEN + len);
                            self.partial.reserve_exact(HEADER_LEN + len);
                            self.partial.extend_from_slice(&self.decoder.header());
                        }
                        self.partial.extend_from_slice(bytes);
                        if done {
                            self.queue_partial(now);
                        }
                    }
                }
                Decoded::TooLarge { .. } => {
                    self.partial = Vec::new();
                    self.decide(CloseReason::ProtocolError, now, obs);
                    return input.len();
                }
            }
            if done_frame(&what) {
                obs.frame_in();
                self.read_deadline = None;
                if self.out.len() - self.out_pos > self.limits.max_pending_output {
                    self.paused = true;
                }
            }
            self.journal(now, obs);
        }
        used
    }

    /// Queues the answer to a frame whose whole body is `body`.
    fn queue_frame(&mut self, body: &[u8], now: Instant) {
        self.start_output(now, body.len());
        self.grow_out(HEADER_LEN + body.len());
        self.out.extend_from_slice(&crate::codec::header(body.len() as u32));
        self.out.extend_from_slice(body);
    }

    /// Queues the frame gathered in `partial`, moving the buffer if it can.
    fn queue_partial(&mut self, now: Instant) {
        self.start_output(now, self.partial.len() - HEADER_LEN);
        if self.out.is_empty() {
            self.out = std::mem::take(&mut self.partial);
        } else {
            self.grow_out(self.partial.len());
            self.out.extend_from_slice(&self.partial);
            self.partial = Vec::new();
        }
    }

    /// Makes room for `more` bytes of output. The written front is dropped
    /// first; growth doubles but never beyond what the queue can hold
    /// (reading pauses above `max_pending_output`, so at most that plus one
    /// whole answer), which keeps a slow reader's cost near the bound of
    /// DESIGN.md §3 rather than twice it.
    fn grow_out(&mut self, more: usize) {
        if self.out.len() + more <= self.out.capacity() {
            return;
        }
        self.drop_written();
        let need = self.out.len() + more;
        if need > self.out.capacity() {
            let target = (self.out.capacity() * 2).min(self.most_buffered()).max(need);
            self.out.reserve_exact(target - self.out.len());
        }
    }

    /// The most a connection buffers: `max_pending_output` queued plus one
    /// whole frame (its answer, or the frame being gathered), DESIGN.md §3.
    fn most_buffered(&self) -> usize {
        self.limits.max_pending_output + self.limits.max_frame as usize + HEADER_LEN
    }

    /// Before a frame of `len` bytes (header included) is gathered beside the
    /// queue: the queue's spare capacity, left from when it held more, gives
    /// way so that both stay within [`Conn::most_buffered`] between events.
    /// Not paused, the queue holds at most `max_pending_output` unwritten, so
    /// it always fits; its written front is moved only when it is in the way,
    /// and a shrinking `realloc` does not copy.
    fn fit_out_beside(&mut self, len: usize) {
        let most = self.most_buffered();
        if self.out.capacity() + len > most {
            if self.out.len() > most - len {
                self.drop_written();
            }
            self.out.shrink_to(most - len);
        }
    }

    /// Drops the written front of the output queue.
    fn drop_written(&mut self) {
        if self.out_pos > 0 {
            self.out.drain(..self.out_pos);
            self.head_end -= self.out_pos;
            self.out_pos = 0;
        }
    }

    /// Starts the write clock when output goes from empty to queued, and
    /// marks where that first answer (of body length `len`) ends.
    fn start_output(&mut self, now: Instant, len: usize) {
        if self.out.is_empty() {
            self.write_since = now;
            self.head_end = HEADER_LEN + len;
        }
    }

    /// Re-derives everything that follows from the buffers after an event:
    /// backpressure, the half-close and stop closes, the idle clock, the state.
    fn settle(&mut self, now: Instant, obs: &mut impl Observer) {
        // The state this event led to is journaled before any close it
        // causes: a flush that ends a half-close passes through ReadingHeader.
        self.journal(now, obs);
        if self.close.is_none() {
            let nothing_owed = self.out.is_empty() && self.held.is_empty();
            // The drain close comes first: every connection open when stop
            // began closes with `shutdown`, a half-closed one included.
            let awaits_first = self.first_frame_by.is_some_and(|by| !self.received && now < by);
            if matches!(self.stop, Stop::Draining { .. })
                && nothing_owed
                && !self.decoder.in_frame()
                && !awaits_first
            {
                self.decide(CloseReason::Shutdown, now, obs);
            } else if self.peer_eof && nothing_owed {
                self.decide(CloseReason::Eof, now, obs);
            } else if self.is_idle() {
                self.idle_since.get_or_insert(now);
            } else {
                self.idle_since = None;
            }
        }
        // Without read_while_writing, reading waits while an answer is queued.
        let waits = !self.limits.read_while_writing && self.out_pos < self.out.len() && self.close.is_none();
        match (waits, self.read_waits_since) {
            (true, None) => self.read_waits_since = Some(now),
            (false, Some(since)) => {
                self.read_waits_since = None;
                if let Some(at) = self.read_deadline.as_mut() {
                    *at += now.saturating_duration_since(since);
                }
            }
            _ => {}
        }
        self.journal(now, obs);
    }

    /// Decides a graceful close with the usual linger.
    fn decide(&mut self, reason: CloseReason, now: Instant, obs: &mut impl Observer) {
        let linger = match self.stop {
            Stop::Draining { grace_end } => LINGER.min(grace_end.saturating_duration_since(now)),
            Stop::No => LINGER,
        };
        self.decide_with_linger(reason, linger, now, obs);
    }

    fn decide_with_linger(
        &mut self,
        reason: CloseReason,
        linger: Duration,
        now: Instant,
        obs: &mut impl Observer,
    ) {
        if self.close.is_some() {
            return;
        }
        debug_assert!(reason.is_graceful());
        self.discard_input(reason, obs);
        self.close = Some(Close { reason, phase: Phase::Flush { linger } });
        self.journal(now, obs);
    }

    /// Decides an abortive close, or turns a graceful one abortive keeping
    /// its reason.
    fn abort(&mut self, reason: CloseReason, now: Instant, obs: &mut impl Observer) {
        match self.close {
            Some(ref mut close) => close.phase = Phase::Done { abort: true },
            None => {
                self.discard_input(reason, obs);
                self.close = Some(Close { reason, phase: Phase::Done { abort: true } });
                self.journal(now, obs);
            }
        }
    }

    /// Drops unparsed input at a close decision; a partial frame counts as
    /// truncated unless the close is a protocol error.
    /// Input held back by backpressure counts too, even if it holds whole
    /// frames: it was received and will never be answered.
    fn discard_input(&mut self, reason: CloseReason, obs: &mut impl Observer) {
        let partial = self.decoder.in_frame() || !self.held.is_empty();
        if partial && reason != CloseReason::ProtocolError {
            obs.truncated();
        }
        self.decoder.reset();
        self.partial = Vec::new();
        self.held = Vec::new();
        self.idle_since = None;
        self.read_deadline = None;
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(close) = self.close.as_mut() {
            close.phase = phase;
        }
    }

    /// Applies the state rule of DESIGN.md §3 and journals a change.
    fn journal(&mut self, now: Instant, obs: &mut impl Observer) {
        let next = if self.close.is_some() {
            State::Closing
        } else if self.out_pos < self.out.len() {
            State::Writing
        } else if self.decoder.header_complete() {
            State::ReadingBody
        } else if self.consumed_any {
            State::ReadingHeader
        } else {
            State::Connecting
        };
        if next != self.state {
            let reason = if next == State::Closing { self.close_reason() } else { None };
            obs.transition(Some(self.state), next, reason, now);
            self.state = next;
        }
    }
}

/// Whether a decode step completed a frame.
fn done_frame(what: &Decoded<'_>) -> bool {
    matches!(what, Decoded::Header { len: 0 } | Decoded::Body { done: true, .. })
}

/// Which clock expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// `idle_timeout`: nothing in progress for too long.
    Idle,
    /// `read_timeout`: a frame not complete in time.
    Read,
    /// `write_timeout`: queued output made no progress.
    Write,
    /// The lingering close's read-and-discard time is over.
    Linger,
    /// A handoff's wait for a fresh connection's first frame ended.
    FirstFrame,
    /// The stop's grace ended.
    Grace,
}

//! Property tests of the sans-IO core: random byte streams cut at random
//! points, EOF, errors, time passing and `stop` at random moments, fed to a
//! [`Conn`] and, side by side, to a small reference model of DESIGN.md §2-3
//! that works on offsets into the client's whole stream instead of buffers.
//!
//! After every event: the answers queued are, byte for byte, the model's (so
//! every complete frame is answered once, in order), the state follows the
//! rule of §3 and the journal is one unbroken chain ending in it, the close
//! reason, the action, the clocks and the counters equal the model's, and the
//! buffers stay within their bound. `CONNLAB_PROPTEST_CASES` sets the number
//! of cases (`make proptest-long` runs a million).

use std::time::{Duration, Instant};

use connlab_servers::codec::{encode, header, HEADER_LEN};
use connlab_servers::conn::{Action, CloseReason, Conn, Limits, State, LINGER};
use proptest::prelude::*;

mod util;
use util::rec::Rec;

/// Cases per property: `CONNLAB_PROPTEST_CASES`, or a number that runs in a
/// few seconds in a debug build.
fn cases() -> u32 {
    std::env::var("CONNLAB_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

// ---------------------------------------------------------------------------
// What is generated: limits, the client's stream, the events.
// ---------------------------------------------------------------------------

/// One thing that happens to the connection.
#[derive(Debug, Clone)]
enum Event {
    /// The backend reads up to this many bytes, if the core wants to read: the
    /// next bytes of the client's stream, or the EOF once the client shut down
    /// and everything it sent was read.
    Read(usize),
    /// The socket accepts up to this many bytes of the queued answers.
    Write(usize),
    /// The client shuts down its side: what it has not sent yet, it never sends.
    ClientFin,
    /// A syscall fails: ECONNRESET (`reset`) or EIO (`io_error`).
    Error { reset: bool },
    /// Time passes, then the timer fires.
    Advance(Duration),
    /// `stop()` with this grace; on a handoff (`linger_idle`) or not.
    Stop { grace: Duration, linger_idle: bool },
}

/// Limits at `scale`: frames of up to 48 × scale bytes, a queue bound of up
/// to 96 × scale.
fn limits(scale: usize) -> impl Strategy<Value = Limits> {
    let clock =
        || prop_oneof![1 => Just(None), 4 => (200u64..4000).prop_map(|ms| Some(Duration::from_millis(ms)))];
    (1u32..48 * scale as u32, 1usize..96 * scale, clock(), clock(), clock(), any::<bool>()).prop_map(
        |(max_frame, max_pending_output, idle_timeout, read_timeout, write_timeout, read_while_writing)| {
            Limits {
                max_frame,
                max_pending_output,
                idle_timeout,
                read_timeout,
                write_timeout,
                read_while_writing,
            }
        },
    )
}

/// The client's bytes for `max_frame`: frames of 0..=max_frame bytes, then
/// sometimes a header announcing more than `max_frame` followed by junk, or
/// the first bytes of one more frame. Payloads come from a length and a seed
/// (bytes that differ from one position to the next, so a misplaced or
/// repeated answer never compares equal), cheap at any size.
fn stream(max_frame: u32) -> impl Strategy<Value = Vec<u8>> {
    let payload = move || (0..=max_frame as usize, any::<u8>()).prop_map(|(n, seed)| bytes(n, seed));
    let tail = prop_oneof![
        3 => Just(Vec::new()),
        1 => (1u32..100, 0usize..8, any::<u8>()).prop_map(move |(over, junk, seed)| {
            let mut tail = header(max_frame + over).to_vec();
            tail.extend(bytes(junk, seed));
            tail
        }),
        1 => (payload(), 1usize..64).prop_map(|(p, cut)| {
            let frame = encode(&p);
            frame[..cut.min(frame.len() - 1)].to_vec()
        }),
    ];
    (prop::collection::vec(payload(), 0..12), tail).prop_map(|(payloads, tail)| {
        let mut stream: Vec<u8> = payloads.iter().flat_map(|p| encode(p)).collect();
        stream.extend(tail);
        stream
    })
}

/// `n` bytes from `seed`.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(31).wrapping_add((i / 251) as u8))
        .collect()
}

/// Reads and writes move up to this many bytes × scale.
const MAX_MOVE: usize = 40;

fn event(scale: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => (1usize..MAX_MOVE * scale).prop_map(Event::Read),
        6 => (1usize..MAX_MOVE * scale).prop_map(Event::Write),
        1 => Just(Event::ClientFin),
        1 => any::<bool>().prop_map(|reset| Event::Error { reset }),
        4 => (0u64..2500).prop_map(|ms| Event::Advance(Duration::from_millis(ms))),
        1 => (0u64..3000, any::<bool>())
            .prop_map(|(ms, linger_idle)| Event::Stop { grace: Duration::from_millis(ms), linger_idle }),
    ]
}

/// Most cases are small (every boundary is near); one in five is 1 024 times
/// larger, so the queue passes the size at which its written front is dropped.
fn case() -> impl Strategy<Value = (usize, Limits, Vec<u8>, Vec<Event>)> {
    prop_oneof![4 => Just(1usize), 1 => Just(1024)].prop_flat_map(|scale| {
        limits(scale).prop_flat_map(move |l| {
            (Just(scale), Just(l), stream(l.max_frame), prop::collection::vec(event(scale), 1..80))
        })
    })
}

// ---------------------------------------------------------------------------
// The reference model: offsets into the client's whole stream.
// ---------------------------------------------------------------------------

/// Where a decided close is (as `Action` tells the backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Flushing the answers; then half-close and linger this long.
    Flush(Duration),
    /// Half-closed, reading and discarding until EOF or this instant.
    Linger(Instant),
    /// Close the fd (abortively or not).
    Done { abort: bool },
}

#[derive(Debug)]
struct Model {
    lim: Limits,
    /// Everything the client sends (cut short by its FIN).
    stream: Vec<u8>,
    /// Bytes of `stream` the backend read and gave the core before the close.
    delivered: usize,
    /// Bytes of `stream` the parser consumed (the rest of `delivered` is held
    /// back by backpressure).
    parsed: usize,
    /// Where the frame in progress (or the next one) starts.
    frame_at: usize,
    /// Whether any byte was parsed.
    consumed_any: bool,
    /// The answers to every complete frame parsed: the frames themselves.
    answers: Vec<u8>,
    /// Bytes of `answers` written.
    written: usize,
    /// Complete frames parsed.
    frames_in: u64,
    /// Frames discarded incomplete at a close (not a protocol error's).
    truncated: u64,
    paused: bool,
    peer_eof: bool,
    received: bool,
    close: Option<(CloseReason, Phase)>,
    closing_before_stop: bool,
    forced: bool,
    idle_since: Option<Instant>,
    read_deadline: Option<Instant>,
    wait_since: Option<Instant>,
    write_since: Instant,
    grace_end: Option<Instant>,
    first_frame_by: Option<Instant>,
}

impl Model {
    fn new(lim: Limits, stream: Vec<u8>, now: Instant) -> Model {
        Model {
            lim,
            stream,
            delivered: 0,
            parsed: 0,
            frame_at: 0,
            consumed_any: false,
            answers: Vec::new(),
            written: 0,
            frames_in: 0,
            truncated: 0,
            paused: false,
            peer_eof: false,
            received: false,
            close: None,
            closing_before_stop: false,
            forced: false,
            idle_since: Some(now),
            read_deadline: None,
            wait_since: None,
            write_since: now,
            grace_end: None,
            first_frame_by: None,
        }
    }

    fn in_frame(&self) -> bool {
        self.close.is_none() && self.parsed > self.frame_at
    }

    fn queued(&self) -> usize {
        self.answers.len() - self.written
    }

    fn held(&self) -> bool {
        self.close.is_none() && self.parsed < self.delivered
    }

    fn idle(&self) -> bool {
        self.close.is_none() && !self.in_frame() && self.queued() == 0 && !self.held()
    }

    /// The rule of DESIGN.md §3.
    fn state(&self) -> State {
        if self.close.is_some() {
            State::Closing
        } else if self.queued() > 0 {
            State::Writing
        } else if self.in_frame() && self.parsed >= self.frame_at + HEADER_LEN {
            State::ReadingBody
        } else if self.consumed_any {
            State::ReadingHeader
        } else {
            State::Connecting
        }
    }

    fn phase(&self) -> Option<Phase> {
        self.close.map(|(_, p)| p)
    }

    fn wants_write(&self) -> bool {
        self.queued() > 0 && !matches!(self.phase(), Some(Phase::Done { .. }))
    }

    fn wants_read(&self) -> bool {
        match self.phase() {
            None => !self.paused && !self.peer_eof && self.wait_since.is_none(),
            Some(Phase::Flush(_)) => !self.peer_eof && (self.lim.read_while_writing || !self.wants_write()),
            Some(Phase::Linger(_)) => !self.peer_eof,
            Some(Phase::Done { .. }) => false,
        }
    }

    fn action(&self) -> Action {
        match self.phase() {
            None | Some(Phase::Linger(_)) => Action::Continue,
            Some(Phase::Flush(_)) if self.wants_write() => Action::Continue,
            Some(Phase::Flush(_)) => Action::ShutdownWrite,
            Some(Phase::Done { abort }) => {
                if abort {
                    Action::Abort
                } else {
                    Action::Close
                }
            }
        }
    }

    /// The running clocks, in the order that breaks ties: idle, read, write,
    /// linger, first frame, grace.
    fn clocks(&self) -> Vec<(Instant, u8)> {
        let mut clocks = Vec::new();
        if matches!(self.phase(), Some(Phase::Done { .. })) {
            return clocks;
        }
        if let (Some(since), Some(t)) = (self.idle_since, self.lim.idle_timeout) {
            clocks.push((since + t, 0));
        }
        if let (Some(at), None) = (self.read_deadline, self.wait_since) {
            clocks.push((at, 1));
        }
        if let (true, Some(t)) = (self.wants_write(), self.lim.write_timeout) {
            clocks.push((self.write_since + t, 2));
        }
        if let Some(Phase::Linger(until)) = self.phase() {
            clocks.push((until, 3));
        }
        if let (Some(by), false, None) = (self.first_frame_by, self.received, self.close) {
            clocks.push((by, 4));
        }
        if let Some(end) = self.grace_end {
            clocks.push((end, 5));
        }
        clocks
    }

    fn deadline(&self) -> Option<Instant> {
        self.clocks().into_iter().map(|(at, _)| at).min()
    }

    /// Parses what was delivered, frame by frame, until it ends, backpressure
    /// pauses or a violation closes.
    fn parse(&mut self, now: Instant) {
        while self.parsed < self.delivered && !self.paused && self.close.is_none() {
            if self.parsed == self.frame_at {
                self.consumed_any = true;
                self.idle_since = None;
                let start = self.wait_since.unwrap_or(now);
                self.read_deadline = self.lim.read_timeout.map(|t| start + t);
            }
            let head_end = self.frame_at + HEADER_LEN;
            if self.parsed < head_end {
                self.parsed = self.delivered.min(head_end);
                if self.parsed < head_end {
                    return;
                }
            }
            let len = u32::from_be_bytes(self.stream[self.frame_at..head_end].try_into().unwrap());
            if len > self.lim.max_frame {
                self.decide(CloseReason::ProtocolError, now);
                return;
            }
            let end = head_end + len as usize;
            self.parsed = self.delivered.min(end);
            if self.parsed < end {
                return;
            }
            if self.queued() == 0 {
                self.write_since = now;
            }
            self.answers.extend_from_slice(&self.stream[self.frame_at..end]);
            self.frames_in += 1;
            self.read_deadline = None;
            self.frame_at = end;
            if self.queued() > self.lim.max_pending_output {
                self.paused = true;
            }
        }
    }

    fn settle(&mut self, now: Instant) {
        if self.close.is_none() {
            let nothing_owed = self.queued() == 0 && !self.held();
            let awaits_first = self.first_frame_by.is_some_and(|by| !self.received && now < by);
            if self.grace_end.is_some() && nothing_owed && !self.in_frame() && !awaits_first {
                self.decide(CloseReason::Shutdown, now);
            } else if self.peer_eof && nothing_owed {
                self.decide(CloseReason::Eof, now);
            } else if self.idle() {
                self.idle_since.get_or_insert(now);
            } else {
                self.idle_since = None;
            }
        }
        let waits = !self.lim.read_while_writing && self.queued() > 0 && self.close.is_none();
        match (waits, self.wait_since) {
            (true, None) => self.wait_since = Some(now),
            (false, Some(since)) => {
                self.wait_since = None;
                if let Some(at) = self.read_deadline.as_mut() {
                    *at += now - since;
                }
            }
            _ => {}
        }
    }

    fn discard_input(&mut self, reason: CloseReason) {
        if (self.in_frame() || self.held()) && reason != CloseReason::ProtocolError {
            self.truncated += 1;
        }
        self.idle_since = None;
        self.read_deadline = None;
    }

    fn decide(&mut self, reason: CloseReason, now: Instant) {
        let linger = self.grace_end.map_or(LINGER, |end| LINGER.min(end.saturating_duration_since(now)));
        self.decide_with(reason, linger);
    }

    fn decide_with(&mut self, reason: CloseReason, linger: Duration) {
        if self.close.is_none() {
            self.discard_input(reason);
            self.close = Some((reason, Phase::Flush(linger)));
        }
    }

    fn abort(&mut self, reason: CloseReason) {
        match self.close.as_mut() {
            Some((_, phase)) => *phase = Phase::Done { abort: true },
            None => {
                self.discard_input(reason);
                self.close = Some((reason, Phase::Done { abort: true }));
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some((_, p)) = self.close.as_mut() {
            *p = phase;
        }
    }

    fn on_read(&mut self, n: usize, now: Instant) {
        if self.close.is_some() {
            return;
        }
        self.received = true;
        self.delivered += n;
        self.parse(now);
        self.settle(now);
    }

    fn on_eof(&mut self, now: Instant) {
        self.peer_eof = true;
        if let Some(Phase::Linger(_)) = self.phase() {
            self.set_phase(Phase::Done { abort: false });
        }
        self.settle(now);
    }

    fn on_written(&mut self, n: usize, now: Instant) {
        self.written += n;
        self.write_since = now;
        if self.paused && self.queued() * 2 < self.lim.max_pending_output {
            self.paused = false;
            self.parse(now);
        }
        self.settle(now);
    }

    fn on_shutdown_write(&mut self, now: Instant) {
        if let Some(Phase::Flush(linger)) = self.phase() {
            let next = if linger.is_zero() || self.peer_eof {
                Phase::Done { abort: false }
            } else {
                Phase::Linger(now + linger)
            };
            self.set_phase(next);
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let Some((_, which)) =
            self.clocks().into_iter().filter(|&(at, _)| at <= now).min_by_key(|&(at, _)| at)
        else {
            return;
        };
        match which {
            0 => self.decide(CloseReason::IdleTimeout, now),
            1 => self.decide(CloseReason::ReadTimeout, now),
            2 => self.abort(CloseReason::WriteTimeout),
            3 => self.set_phase(Phase::Done { abort: false }),
            4 => self.decide(CloseReason::Shutdown, now),
            _ => {
                if self.action() == Action::Continue {
                    self.forced = !self.closing_before_stop;
                    self.abort(CloseReason::Shutdown);
                }
            }
        }
        if self.action() == Action::Continue && self.deadline().is_some_and(|at| at <= now) {
            self.on_timer(now);
        }
    }

    fn on_stop(&mut self, now: Instant, grace_end: Instant, rx_empty: bool, linger_idle: bool) {
        self.grace_end = Some(grace_end);
        if self.close.is_some() {
            self.closing_before_stop = true;
            return;
        }
        if self.idle() && rx_empty {
            if linger_idle && !self.received {
                self.first_frame_by = Some(now + LINGER.min(grace_end.saturating_duration_since(now)));
            } else if linger_idle {
                self.decide(CloseReason::Shutdown, now);
            } else {
                self.decide_with(CloseReason::Shutdown, Duration::ZERO);
            }
        }
        if now >= grace_end {
            self.on_timer(now);
        }
    }
}

// ---------------------------------------------------------------------------
// The harness: a backend that moves bytes as the core asks, and the checks.
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Run {
    /// The largest read is `MAX_MOVE` × scale.
    scale: usize,
    conn: Conn,
    rec: Rec,
    model: Model,
    now: Instant,
    /// The client shut down its side.
    client_fin: bool,
    /// The backend saw the EOF.
    eof_read: bool,
    /// Bytes the backend read (before and after the close).
    read: usize,
    /// Every byte the backend wrote, in order.
    wire: Vec<u8>,
    /// Bytes of `wire` already compared with the model's answers.
    checked: usize,
    stopped: bool,
    /// The fd was closed: nothing more happens.
    closed: Option<Action>,
}

impl Run {
    fn new(scale: usize, lim: Limits, stream: Vec<u8>) -> Run {
        let now = Instant::now();
        let mut rec = Rec::default();
        let conn = Conn::new(lim, now, &mut rec);
        Run {
            scale,
            conn,
            rec,
            model: Model::new(lim, stream, now),
            now,
            client_fin: false,
            eof_read: false,
            read: 0,
            wire: Vec::new(),
            checked: 0,
            stopped: false,
            closed: None,
        }
    }

    fn apply(&mut self, event: &Event) {
        let now = self.now;
        match *event {
            Event::Read(n) => {
                if !self.conn.wants_read() {
                    return;
                }
                let rest = self.model.stream.len() - self.read;
                if rest > 0 {
                    let n = n.min(rest);
                    let data = self.model.stream[self.read..self.read + n].to_vec();
                    self.read += n;
                    self.conn.on_read(&data, now, &mut self.rec);
                    self.model.on_read(n, now);
                } else if self.client_fin && !self.eof_read {
                    self.eof_read = true;
                    self.conn.on_eof(now, &mut self.rec);
                    self.model.on_eof(now);
                }
            }
            Event::Write(n) => {
                if !self.conn.wants_write() {
                    return;
                }
                let n = n.min(self.conn.pending().len());
                self.wire.extend_from_slice(&self.conn.pending()[..n]);
                self.conn.on_written(n, now, &mut self.rec);
                self.model.on_written(n, now);
            }
            Event::ClientFin => {
                self.client_fin = true;
                self.model.stream.truncate(self.read);
            }
            Event::Error { reset } => {
                let errno = if reset { libc::ECONNRESET } else { libc::EIO };
                self.conn.on_error(&std::io::Error::from_raw_os_error(errno), now, &mut self.rec);
                let reason = if reset { CloseReason::Reset } else { CloseReason::IoError };
                self.model.abort(reason);
            }
            Event::Advance(d) => {
                self.now += d;
                self.conn.on_timer(self.now, &mut self.rec);
                self.model.on_timer(self.now);
            }
            Event::Stop { grace, linger_idle } => {
                if self.stopped {
                    return;
                }
                self.stopped = true;
                let rx_empty = self.read == self.model.stream.len();
                self.conn.on_stop(now, now + grace, rx_empty, linger_idle, &mut self.rec);
                self.model.on_stop(now, now + grace, rx_empty, linger_idle);
            }
        }
        // The backend does what the core asks of the socket.
        loop {
            match self.conn.action() {
                Action::ShutdownWrite => {
                    self.conn.on_shutdown_write(self.now);
                    self.model.on_shutdown_write(self.now);
                }
                Action::Continue => break,
                done => {
                    self.closed = Some(done);
                    break;
                }
            }
        }
    }

    fn check(&mut self, after: &Event) -> Result<(), TestCaseError> {
        let (conn, m, rec) = (&self.conn, &self.model, &self.rec);
        let ctx = format!("after {after:?}");
        // Every complete frame answered once, in order, byte for byte: what
        // was written and what is queued are exactly the frames parsed.
        // (Bytes are compared once, as they are written; the queue by length.)
        prop_assert_eq!(
            &self.wire[self.checked..],
            &m.answers[self.checked..m.written],
            "written bytes {}",
            ctx
        );
        prop_assert_eq!(conn.pending().len(), m.queued(), "queued answers {}", ctx);
        prop_assert_eq!(conn.close_reason(), m.close.map(|(r, _)| r), "close reason {}", ctx);
        prop_assert_eq!(conn.state(), m.state(), "state rule {}", ctx);
        prop_assert_eq!(conn.action(), m.action(), "action {}", ctx);
        prop_assert_eq!(conn.wants_read(), m.wants_read(), "wants_read {}", ctx);
        prop_assert_eq!(conn.wants_write(), m.wants_write(), "wants_write {}", ctx);
        prop_assert_eq!(conn.deadline(), m.deadline(), "deadline {}", ctx);
        prop_assert_eq!(conn.forced(), m.forced, "forced {}", ctx);
        prop_assert_eq!(conn.closing_before_stop(), m.closing_before_stop, "closing before stop {}", ctx);
        // The journal is one chain from None→Connecting to the state now, and
        // Closing is entered once, with the reason.
        prop_assert_eq!(rec.journal.first(), Some(&(None, State::Connecting, None)));
        for pair in rec.journal.windows(2) {
            prop_assert_eq!(pair[0].1, pair[1].0.unwrap(), "journal chain {:?} {}", rec.journal, ctx);
            prop_assert_ne!(pair[0].1, State::Closing, "left Closing {}", ctx);
        }
        let last = rec.journal.last().unwrap();
        prop_assert_eq!(last.1, conn.state(), "journal ends in the state {}", ctx);
        if last.1 == State::Closing {
            prop_assert_eq!(last.2, conn.close_reason());
        }
        // The counters.
        prop_assert_eq!(rec.bytes_in, self.read, "bytes_in {}", ctx);
        prop_assert_eq!(rec.bytes_out, m.written, "bytes_out {}", ctx);
        prop_assert_eq!(rec.frames_in, m.frames_in, "frames_in {}", ctx);
        prop_assert_eq!(rec.frames_out, frames_in(&self.wire), "frames_out {}", ctx);
        prop_assert_eq!(rec.truncated, m.truncated, "truncated {}", ctx);
        self.checked = self.wire.len();
        // Memory: the queue and the frame being gathered together never
        // exceed max_pending_output + max_frame (and one header); beside them
        // only what one read brought beyond a backpressure pause is held (in
        // a buffer of at least 8 bytes, Vec's least capacity).
        let lim = m.lim;
        let held = if m.held() { (m.delivered - m.parsed).max(8) } else { 0 };
        let bound = lim.max_frame as usize + lim.max_pending_output + HEADER_LEN + held;
        prop_assert!(
            conn.buffered_capacity() <= bound,
            "buffers {} > {} {}",
            conn.buffered_capacity(),
            bound,
            ctx
        );
        Ok(())
    }
}

/// Whole frames in `bytes`.
fn frames_in(bytes: &[u8]) -> u64 {
    let (mut at, mut n) = (0, 0);
    while at + HEADER_LEN <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + HEADER_LEN].try_into().unwrap()) as usize;
        if at + HEADER_LEN + len > bytes.len() {
            break;
        }
        at += HEADER_LEN + len;
        n += 1;
    }
    n
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Random event sequences against the reference model.
    #[test]
    fn the_core_follows_the_model((scale, lim, stream, events) in case()) {
        let mut run = Run::new(scale, lim, stream);
        for event in &events {
            run.apply(event);
            run.check(event)?;
            if run.closed.is_some() {
                break;
            }
        }
        // Then a backend that keeps moving bytes: every frame the client sent
        // is answered unless the connection closed before it was read.
        for _ in 0..10_000 {
            if run.closed.is_some() {
                break;
            }
            let event = if run.conn.wants_write() {
                Event::Write(usize::MAX)
            } else if run.conn.wants_read() && (run.read < run.model.stream.len() || !run.eof_read) {
                if run.read == run.model.stream.len() && !run.client_fin {
                    run.apply(&Event::ClientFin);
                }
                Event::Read(MAX_MOVE * run.scale)
            } else {
                match run.conn.deadline() {
                    Some(at) => Event::Advance(at.saturating_duration_since(run.now)),
                    None => break,
                }
            };
            run.apply(&event);
            run.check(&event)?;
        }
        prop_assert!(run.closed.is_some(), "the connection never closed: {:?}", run.conn);
        if run.closed == Some(Action::Close) {
            // A graceful close delivered every answer owed.
            prop_assert!(run.conn.pending().is_empty());
            prop_assert_eq!(&run.wire, &run.model.answers);
        }
    }
}

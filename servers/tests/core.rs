//! The sans-IO connection core (`conn::Conn`) tested alone: no sockets, a fake
//! clock (a base instant plus offsets) and an observer that records
//! everything, held to the contract of DESIGN.md §2-4.

use std::io;

use std::time::{Duration, Instant};

use connlab_servers::codec::{encode, header};
use connlab_servers::conn::State::{Closing, Connecting, ReadingBody, ReadingHeader, Writing};
use connlab_servers::conn::{Action, CloseReason, Conn, Limits, State, LINGER};

mod util;
use util::rec::{Rec, Tr};

// ---------------------------------------------------------------------------
// Shared helpers: the recording observer, the fake clock, frame builders.
// ---------------------------------------------------------------------------

/// A transition between two open states.
fn tr(from: State, to: State) -> Tr {
    (Some(from), to, None)
}

/// The transition that decides a close.
fn to_closing(from: State, reason: CloseReason) -> Tr {
    (Some(from), Closing, Some(reason))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One millisecond: "just before" a deadline.
const MS: Duration = Duration::from_millis(1);

/// One frame (header and payload).
fn frame(payload: &[u8]) -> Vec<u8> {
    encode(payload)
}

/// Several frames back to back.
fn frames(payloads: &[&[u8]]) -> Vec<u8> {
    payloads.iter().flat_map(|p| encode(p)).collect()
}

/// A payload of `n` bytes that differ from one position to the next, so a
/// misordered or misaligned answer cannot compare equal.
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| seed.wrapping_add(i as u8).wrapping_mul(31)).collect()
}

/// The default limits of these tests: idle 10 s, read 5 s, write 3 s.
fn limits() -> Limits {
    Limits {
        max_frame: 1024,
        max_pending_output: 4096,
        idle_timeout: Some(secs(10)),
        read_timeout: Some(secs(5)),
        write_timeout: Some(secs(3)),
        read_while_writing: true,
    }
}

/// Limits with every clock disabled.
fn no_clocks() -> Limits {
    Limits { idle_timeout: None, read_timeout: None, write_timeout: None, ..limits() }
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// A connection, its observer and a fake clock. Every call takes an offset
/// from the instant the connection was accepted (offset 0).
#[derive(Debug)]
struct H {
    conn: Conn,
    rec: Rec,
    base: Instant,
}

impl H {
    /// A connection accepted at offset 0.
    fn new(limits: Limits) -> H {
        let base = Instant::now();
        let mut rec = Rec::default();
        let conn = Conn::new(limits, base, &mut rec);
        H { conn, rec, base }
    }

    fn at(&self, d: Duration) -> Instant {
        self.base + d
    }

    fn read(&mut self, d: Duration, data: &[u8]) {
        let now = self.at(d);
        self.conn.on_read(data, now, &mut self.rec);
    }

    fn eof(&mut self, d: Duration) {
        let now = self.at(d);
        self.conn.on_eof(now, &mut self.rec);
    }

    fn error(&mut self, d: Duration, errno: i32) {
        let now = self.at(d);
        self.conn.on_error(&err(errno), now, &mut self.rec);
    }

    fn written(&mut self, d: Duration, n: usize) {
        let now = self.at(d);
        self.conn.on_written(n, now, &mut self.rec);
    }

    /// Writes `n` bytes of the pending output (as a socket would accept
    /// them) and returns them.
    fn write_some(&mut self, d: Duration, n: usize) -> Vec<u8> {
        let n = n.min(self.conn.pending().len());
        let bytes = self.conn.pending()[..n].to_vec();
        self.written(d, n);
        bytes
    }

    /// Writes everything pending and returns it.
    fn flush(&mut self, d: Duration) -> Vec<u8> {
        self.write_some(d, usize::MAX)
    }

    fn shutdown_write(&mut self, d: Duration) {
        let now = self.at(d);
        self.conn.on_shutdown_write(now);
    }

    fn timer(&mut self, d: Duration) {
        let now = self.at(d);
        self.conn.on_timer(now, &mut self.rec);
    }

    /// `stop()` begins at `d` with a grace ending at `grace_end`.
    fn stop(&mut self, d: Duration, grace_end: Duration, rx_empty: bool) {
        let (now, end) = (self.at(d), self.at(grace_end));
        self.conn.on_stop(now, end, rx_empty, false, &mut self.rec);
    }

    /// A handoff's stop begins at `d` (idle connections linger).
    fn handoff_stop(&mut self, d: Duration, grace_end: Duration) {
        let (now, end) = (self.at(d), self.at(grace_end));
        self.conn.on_stop(now, end, true, true, &mut self.rec);
    }

    /// The next deadline as an offset.
    fn deadline(&self) -> Option<Duration> {
        self.conn.deadline().map(|at| at - self.base)
    }

    fn state(&self) -> State {
        self.conn.state()
    }

    fn reason(&self) -> Option<CloseReason> {
        self.conn.close_reason()
    }

    fn action(&self) -> Action {
        self.conn.action()
    }

    /// Journal entries recorded since `mark` entries.
    fn journal_since(&self, mark: usize) -> Vec<Tr> {
        self.rec.journal[mark..].to_vec()
    }

    /// The offset at which the last transition was journaled.
    fn last_transition_at(&self) -> Duration {
        *self.rec.journal_at.last().expect("a transition") - self.base
    }
}

// ---------------------------------------------------------------------------
// Every state × every event.
// ---------------------------------------------------------------------------

/// When the events of the matrix happen (the setups happen at 1 s).
const EV: Duration = Duration::from_millis(1500);
/// When the grace of a stop in the matrix ends.
const GRACE_END: Duration = Duration::from_millis(3500);

#[derive(Debug, Clone, Copy)]
enum Event {
    Read,
    Eof,
    ResetError,
    OtherError,
    Written,
    TimerBefore,
    TimerAt,
    TimerAfter,
    StopRxEmpty,
    StopRxBusy,
}

const EVENTS: [Event; 10] = [
    Event::Read,
    Event::Eof,
    Event::ResetError,
    Event::OtherError,
    Event::Written,
    Event::TimerBefore,
    Event::TimerAt,
    Event::TimerAfter,
    Event::StopRxEmpty,
    Event::StopRxBusy,
];

/// Everything observable about a connection after an event.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    state: State,
    reason: Option<CloseReason>,
    action: Action,
    wants_read: bool,
    wants_write: bool,
    /// The next deadline, as an offset.
    deadline: Option<Duration>,
    /// What the backend would write now (empty unless `wants_write`).
    pending: Vec<u8>,
    /// Transitions journaled by the event.
    journal: Vec<Tr>,
    /// Frames counted as truncated by the event.
    truncated: u64,
    forced: bool,
    closing_before_stop: bool,
}

fn outcome(h: &H, mark: usize, truncated_before: u64) -> Outcome {
    Outcome {
        state: h.state(),
        reason: h.reason(),
        action: h.action(),
        wants_read: h.conn.wants_read(),
        wants_write: h.conn.wants_write(),
        deadline: h.deadline(),
        pending: if h.conn.wants_write() { h.conn.pending().to_vec() } else { Vec::new() },
        journal: h.journal_since(mark),
        truncated: h.rec.truncated - truncated_before,
        forced: h.conn.forced(),
        closing_before_stop: h.conn.closing_before_stop(),
    }
}

/// Runs `event` on a fresh connection prepared by `setup`; `read` is the data
/// of [`Event::Read`].
fn apply(setup: fn() -> H, read: &[u8], event: Event) -> Outcome {
    let mut h = setup();
    let (mark, truncated) = (h.rec.journal.len(), h.rec.truncated);
    match event {
        Event::Read => h.read(EV, read),
        Event::Eof => h.eof(EV),
        Event::ResetError => h.error(EV, libc::ECONNRESET),
        Event::OtherError => h.error(EV, libc::ETIMEDOUT),
        Event::Written => {
            let n = h.conn.pending().len();
            h.written(EV, n);
        }
        Event::TimerBefore => {
            let d = h.deadline().expect("every matrix setup runs a clock");
            h.timer(d - MS);
        }
        Event::TimerAt => {
            let d = h.deadline().expect("every matrix setup runs a clock");
            h.timer(d);
        }
        Event::TimerAfter => {
            let d = h.deadline().expect("every matrix setup runs a clock");
            h.timer(d + secs(1));
        }
        Event::StopRxEmpty => h.stop(EV, GRACE_END, true),
        Event::StopRxBusy => h.stop(EV, GRACE_END, false),
    }
    outcome(&h, mark, truncated)
}

/// Checks the setup itself, then every event against `expect`.
fn check_matrix(
    name: &str,
    setup: fn() -> H,
    read: &[u8],
    base: &Outcome,
    expect: impl Fn(Event) -> Outcome,
) {
    let h = setup();
    let mark = h.rec.journal.len();
    assert_eq!(&outcome(&h, mark, h.rec.truncated), base, "{name}: the setup");
    for event in EVENTS {
        assert_eq!(apply(setup, read, event), expect(event), "{name} × {event:?}");
    }
}

/// Fresh: nothing consumed yet.
fn setup_connecting() -> H {
    H::new(limits())
}

/// Half a header read at 1 s.
fn setup_reading_header() -> H {
    let mut h = H::new(limits());
    h.read(secs(1), &[0, 0]);
    h
}

/// A header of 5 and two body bytes read at 1 s.
fn setup_reading_body() -> H {
    let mut h = H::new(limits());
    h.read(secs(1), &[0, 0, 0, 5, b'h', b'e']);
    h
}

/// One answer queued at 1 s, nothing written.
fn setup_writing() -> H {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"hi"));
    h
}

/// A protocol error at 1 s, half-closed at once: lingering until 2 s.
fn setup_closing_lingering() -> H {
    let mut h = H::new(limits());
    h.read(secs(1), &header(2000));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(1));
    h
}

/// A protocol error at 1 s after one good frame: flushing its answer.
fn setup_closing_flushing() -> H {
    let mut h = H::new(limits());
    let mut input = frame(b"hi");
    input.extend_from_slice(&header(2000));
    h.read(secs(1), &input);
    h
}

#[test]
fn matrix_connecting() {
    let base = Outcome {
        state: Connecting,
        reason: None,
        action: Action::Continue,
        wants_read: true,
        wants_write: false,
        deadline: Some(secs(10)),
        pending: vec![],
        journal: vec![],
        truncated: 0,
        forced: false,
        closing_before_stop: false,
    };
    let closed = |reason, action, wants_read, deadline| Outcome {
        state: Closing,
        reason: Some(reason),
        action,
        wants_read,
        deadline,
        journal: vec![to_closing(Connecting, reason)],
        ..base.clone()
    };
    check_matrix("Connecting", setup_connecting, &frame(b"xyz"), &base, |event| match event {
        Event::Read => Outcome {
            state: Writing,
            wants_write: true,
            deadline: Some(EV + secs(3)),
            pending: frame(b"xyz"),
            journal: vec![
                tr(Connecting, ReadingHeader),
                tr(ReadingHeader, ReadingBody),
                tr(ReadingBody, Writing),
            ],
            ..base.clone()
        },
        Event::Eof => closed(CloseReason::Eof, Action::ShutdownWrite, false, None),
        Event::ResetError => closed(CloseReason::Reset, Action::Abort, false, None),
        Event::OtherError => closed(CloseReason::IoError, Action::Abort, false, None),
        Event::Written | Event::TimerBefore => base.clone(),
        Event::TimerAt | Event::TimerAfter => {
            closed(CloseReason::IdleTimeout, Action::ShutdownWrite, true, None)
        }
        Event::StopRxEmpty => closed(CloseReason::Shutdown, Action::ShutdownWrite, true, Some(GRACE_END)),
        Event::StopRxBusy => Outcome { deadline: Some(GRACE_END), ..base.clone() },
    });
}

/// The matrix of the two reading states: they differ only in the state and
/// in what completes the frame.
fn reading_matrix(
    name: &str,
    state: State,
    setup: fn() -> H,
    read: &[u8],
    completed: Vec<Tr>,
    answer: Vec<u8>,
) {
    let base = Outcome {
        state,
        reason: None,
        action: Action::Continue,
        wants_read: true,
        wants_write: false,
        // The read clock runs from the first byte (1 s), not the idle clock.
        deadline: Some(secs(6)),
        pending: vec![],
        journal: vec![],
        truncated: 0,
        forced: false,
        closing_before_stop: false,
    };
    // Every close here leaves the partial frame: one truncated each.
    let closed = |reason, action, wants_read| Outcome {
        state: Closing,
        reason: Some(reason),
        action,
        wants_read,
        deadline: None,
        journal: vec![to_closing(state, reason)],
        truncated: 1,
        ..base.clone()
    };
    check_matrix(name, setup, read, &base, |event| match event {
        Event::Read => Outcome {
            state: Writing,
            wants_write: true,
            deadline: Some(EV + secs(3)),
            pending: answer.clone(),
            journal: completed.clone(),
            ..base.clone()
        },
        Event::Eof => closed(CloseReason::Eof, Action::ShutdownWrite, false),
        Event::ResetError => closed(CloseReason::Reset, Action::Abort, false),
        Event::OtherError => closed(CloseReason::IoError, Action::Abort, false),
        Event::Written | Event::TimerBefore => base.clone(),
        Event::TimerAt | Event::TimerAfter => closed(CloseReason::ReadTimeout, Action::ShutdownWrite, true),
        // A frame in progress is busy whatever the kernel holds: it drains.
        Event::StopRxEmpty | Event::StopRxBusy => Outcome { deadline: Some(GRACE_END), ..base.clone() },
    });
}

#[test]
fn matrix_reading_header() {
    reading_matrix(
        "ReadingHeader",
        ReadingHeader,
        setup_reading_header,
        &[0, 3, b'x', b'y', b'z'],
        vec![tr(ReadingHeader, ReadingBody), tr(ReadingBody, Writing)],
        frame(b"xyz"),
    );
}

#[test]
fn matrix_reading_body() {
    reading_matrix(
        "ReadingBody",
        ReadingBody,
        setup_reading_body,
        b"llo",
        vec![tr(ReadingBody, Writing)],
        frame(b"hello"),
    );
}

#[test]
fn matrix_writing() {
    let base = Outcome {
        state: Writing,
        reason: None,
        action: Action::Continue,
        wants_read: true,
        wants_write: true,
        // The write clock from the moment the answer was queued.
        deadline: Some(secs(4)),
        pending: frame(b"hi"),
        journal: vec![],
        truncated: 0,
        forced: false,
        closing_before_stop: false,
    };
    let aborted = |reason| Outcome {
        state: Closing,
        reason: Some(reason),
        action: Action::Abort,
        wants_read: false,
        wants_write: false,
        deadline: None,
        pending: vec![],
        journal: vec![to_closing(Writing, reason)],
        ..base.clone()
    };
    check_matrix("Writing", setup_writing, &frame(b"xyz"), &base, |event| match event {
        // Pipelined: queued behind the first answer; the write clock keeps
        // counting from the first answer.
        Event::Read => Outcome { pending: frames(&[b"hi", b"xyz"]), ..base.clone() },
        // Half-close: the answer is still owed, the state stays Writing.
        Event::Eof => Outcome { wants_read: false, ..base.clone() },
        Event::ResetError => aborted(CloseReason::Reset),
        Event::OtherError => aborted(CloseReason::IoError),
        Event::Written => Outcome {
            state: ReadingHeader,
            wants_write: false,
            deadline: Some(EV + secs(10)),
            pending: vec![],
            journal: vec![tr(Writing, ReadingHeader)],
            ..base.clone()
        },
        Event::TimerBefore => base.clone(),
        Event::TimerAt | Event::TimerAfter => aborted(CloseReason::WriteTimeout),
        Event::StopRxEmpty | Event::StopRxBusy => Outcome { deadline: Some(GRACE_END), ..base.clone() },
    });
}

#[test]
fn matrix_closing_lingering() {
    let base = Outcome {
        state: Closing,
        reason: Some(CloseReason::ProtocolError),
        action: Action::Continue,
        wants_read: true,
        wants_write: false,
        deadline: Some(secs(1) + LINGER),
        pending: vec![],
        journal: vec![],
        truncated: 0,
        forced: false,
        closing_before_stop: false,
    };
    let done = |action| Outcome { action, wants_read: false, deadline: None, ..base.clone() };
    check_matrix("Closing(lingering)", setup_closing_lingering, &frame(b"xyz"), &base, |event| match event {
        // Read and discarded: nothing is answered.
        Event::Read => base.clone(),
        Event::Eof => done(Action::Close),
        Event::ResetError | Event::OtherError => done(Action::Abort),
        Event::Written | Event::TimerBefore => base.clone(),
        Event::TimerAt | Event::TimerAfter => done(Action::Close),
        // Already closing: keeps its reason; the linger ends before the grace.
        Event::StopRxEmpty | Event::StopRxBusy => Outcome { closing_before_stop: true, ..base.clone() },
    });
}

#[test]
fn matrix_closing_flushing() {
    let base = Outcome {
        state: Closing,
        reason: Some(CloseReason::ProtocolError),
        action: Action::Continue,
        wants_read: true,
        wants_write: true,
        deadline: Some(secs(4)),
        pending: frame(b"hi"),
        journal: vec![],
        truncated: 0,
        forced: false,
        closing_before_stop: false,
    };
    let aborted = Outcome {
        action: Action::Abort,
        wants_read: false,
        wants_write: false,
        deadline: None,
        pending: vec![],
        ..base.clone()
    };
    check_matrix("Closing(flushing)", setup_closing_flushing, &frame(b"xyz"), &base, |event| match event {
        Event::Read => base.clone(),
        Event::Eof => Outcome { wants_read: false, ..base.clone() },
        Event::ResetError | Event::OtherError => aborted.clone(),
        Event::Written => Outcome {
            action: Action::ShutdownWrite,
            wants_write: false,
            deadline: None,
            pending: vec![],
            ..base.clone()
        },
        Event::TimerBefore => base.clone(),
        // A stalled graceful flush turns abortive and keeps its reason.
        Event::TimerAt | Event::TimerAfter => aborted.clone(),
        Event::StopRxEmpty | Event::StopRxBusy => {
            Outcome { deadline: Some(GRACE_END), closing_before_stop: true, ..base.clone() }
        }
    });
}

// ---------------------------------------------------------------------------
// Journal and echo.
// ---------------------------------------------------------------------------

#[test]
fn h1_journal_is_exact() {
    let mut h = H::new(limits());
    h.read(ms(10), &frame(b"hello"));
    assert_eq!(h.conn.pending(), &frame(b"hello")[..]);
    let n = h.conn.pending().len();
    h.written(ms(20), n);
    h.eof(ms(30));
    assert_eq!(
        h.rec.journal,
        vec![
            (None, Connecting, None),
            tr(Connecting, ReadingHeader),
            tr(ReadingHeader, ReadingBody),
            tr(ReadingBody, Writing),
            tr(Writing, ReadingHeader),
            to_closing(ReadingHeader, CloseReason::Eof),
        ]
    );
    let at: Vec<Duration> = h.rec.journal_at.iter().map(|&t| t - h.base).collect();
    assert_eq!(at, vec![ms(0), ms(10), ms(10), ms(10), ms(20), ms(30)]);
    assert_eq!((h.rec.bytes_in, h.rec.bytes_out), (9, 9));
    assert_eq!((h.rec.frames_in, h.rec.frames_out, h.rec.truncated), (1, 1, 0));
    assert_eq!(h.action(), Action::ShutdownWrite);
    // The peer already finished: no linger after the half-close.
    h.shutdown_write(ms(30));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.wants_read());
}

#[test]
fn empty_frame_journals_reading_header_to_writing() {
    let mut h = H::new(limits());
    h.read(ms(1), &frame(b""));
    assert_eq!(
        h.rec.journal,
        vec![(None, Connecting, None), tr(Connecting, ReadingHeader), tr(ReadingHeader, Writing)]
    );
    assert_eq!(h.conn.pending(), &[0, 0, 0, 0]);
    assert_eq!(h.rec.frames_in, 1);
    // Header bytes one at a time: still no ReadingBody.
    let mut h = H::new(limits());
    for (i, b) in [0u8, 0, 0, 0].into_iter().enumerate() {
        h.read(ms(i as u64), &[b]);
    }
    assert_eq!(
        h.rec.journal,
        vec![(None, Connecting, None), tr(Connecting, ReadingHeader), tr(ReadingHeader, Writing)]
    );
    assert_eq!(h.flush(ms(9)), vec![0, 0, 0, 0]);
    assert_eq!(h.rec.frames_out, 1);
}

/// A pipeline mixing empty, small, large and max-size frames.
fn pipeline() -> (Vec<u8>, Vec<Vec<u8>>) {
    let payloads: Vec<Vec<u8>> = vec![
        b"first".to_vec(),
        vec![],
        payload(300, 1),
        b"x".to_vec(),
        vec![],
        payload(1024, 2),
        b"last".to_vec(),
    ];
    let stream = payloads.iter().flat_map(|p| encode(p)).collect();
    (stream, payloads)
}

#[test]
fn pipeline_in_one_read_answers_all_in_order() {
    let (stream, payloads) = pipeline();
    let mut h = H::new(limits());
    h.read(ms(1), &stream);
    assert_eq!(h.conn.pending(), &stream[..]);
    assert_eq!(h.rec.frames_in, payloads.len() as u64);
    assert_eq!(h.state(), Writing);
    // Writing is entered once: the answers queue behind each other.
    assert_eq!(
        h.rec.journal,
        vec![
            (None, Connecting, None),
            tr(Connecting, ReadingHeader),
            tr(ReadingHeader, ReadingBody),
            tr(ReadingBody, Writing)
        ]
    );
    // Written in odd-sized pieces, the bytes come out unchanged.
    let mut out = Vec::new();
    while h.conn.wants_write() {
        out.extend(h.write_some(ms(2), 7));
    }
    assert_eq!(out, stream);
    assert_eq!(h.rec.frames_out, payloads.len() as u64);
    assert_eq!(h.rec.bytes_out, stream.len());
    assert_eq!(h.state(), ReadingHeader);
}

/// Feeds `pieces` (flushing after each when `flush`), returns the bytes
/// written, the journal and the frame counters.
fn run_pieces(pieces: &[&[u8]], flush: bool) -> (Vec<u8>, Vec<Tr>, u64, u64) {
    let mut h = H::new(limits());
    let mut out = Vec::new();
    for piece in pieces {
        h.read(ms(1), piece);
        if flush {
            out.extend(h.flush(ms(1)));
        }
    }
    out.extend(h.flush(ms(2)));
    (out, h.rec.journal.clone(), h.rec.frames_in, h.rec.frames_out)
}

#[test]
fn input_split_at_every_byte_gives_identical_output() {
    let (stream, payloads) = pipeline();
    let n = payloads.len() as u64;
    let (whole, whole_journal, _, _) = run_pieces(&[&stream], false);
    assert_eq!(whole, stream);
    for cut in 0..=stream.len() {
        let pieces = [&stream[..cut], &stream[cut..]];
        // Unflushed: the answers pile up identically, journal included.
        assert_eq!(
            run_pieces(&pieces, false),
            (stream.clone(), whole_journal.clone(), n, n),
            "split at {cut}"
        );
        // Flushed after each read: same bytes out, same frame counts.
        let (out, _, fin, fout) = run_pieces(&pieces, true);
        assert_eq!((out, fin, fout), (stream.clone(), n, n), "split at {cut}, flushed");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run_pieces(&bytes, false), (stream.clone(), whole_journal, n, n), "byte at a time");
    let (out, _, fin, fout) = run_pieces(&bytes, true);
    assert_eq!((out, fin, fout), (stream, n, n), "byte at a time, flushed");
}

// ---------------------------------------------------------------------------
// Timeouts.
// ---------------------------------------------------------------------------

#[test]
fn idle_timeout_fires_at_connect_plus_t() {
    let mut h = H::new(limits());
    assert_eq!(h.deadline(), Some(secs(10)));
    h.timer(secs(10) - MS);
    assert_eq!((h.state(), h.reason()), (Connecting, None));
    assert_eq!(h.rec.journal.len(), 1);
    h.timer(secs(10));
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::IdleTimeout)));
    assert_eq!(h.journal_since(1), vec![to_closing(Connecting, CloseReason::IdleTimeout)]);
    assert_eq!(h.last_transition_at(), secs(10));
    assert_eq!(h.rec.truncated, 0);
    // Graceful: nothing to flush, so half-close at once.
    assert_eq!(h.action(), Action::ShutdownWrite);
}

#[test]
fn idle_clock_restarts_when_the_last_answer_is_written() {
    let mut h = H::new(limits());
    h.read(secs(4), &frame(b"a"));
    assert_eq!(h.deadline(), Some(secs(7)), "the write clock, not the idle one");
    h.flush(secs(5));
    assert_eq!(h.deadline(), Some(secs(15)));
    h.timer(secs(10));
    h.timer(secs(15) - MS);
    assert_eq!(h.reason(), None);
    h.timer(secs(15));
    assert_eq!(h.reason(), Some(CloseReason::IdleTimeout));
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 1),
        vec![to_closing(ReadingHeader, CloseReason::IdleTimeout)]
    );
}

#[test]
fn read_timeout_covers_the_whole_frame_slowloris() {
    let t = secs(4);
    let mut h = H::new(Limits { read_timeout: Some(t), idle_timeout: Some(secs(100)), ..limits() });
    let first = secs(1);
    let stream = frame(&payload(10, 3));
    // One byte every T/4 from the first byte on: steady progress, never done.
    for (i, b) in stream.iter().take(6).enumerate() {
        let at = first + t / 4 * i as u32;
        if at >= first + t {
            break;
        }
        h.read(at, &[*b]);
        assert_eq!(h.deadline(), Some(first + t), "byte {i} must not move the deadline");
    }
    h.timer(first + t - MS);
    assert_eq!((h.state(), h.reason()), (ReadingBody, None));
    h.timer(first + t);
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::ReadTimeout)));
    assert_eq!(h.last_transition_at(), first + t);
    assert_eq!(h.rec.truncated, 1);
    assert_eq!(h.rec.frames_in, 0);
    assert_eq!(h.action(), Action::ShutdownWrite);
    assert!(h.conn.pending().is_empty(), "nothing of the partial frame is echoed");
}

#[test]
fn read_clock_restarts_for_each_frame() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"one")[..3]);
    assert_eq!(h.deadline(), Some(secs(6)));
    h.read(secs(2), &frame(b"one")[3..]);
    h.flush(secs(2));
    h.read(secs(5), &frame(b"two")[..1]);
    assert_eq!(h.deadline(), Some(secs(10)), "the second frame's clock starts at its first byte");
    h.timer(secs(6));
    assert_eq!(h.reason(), None);
    h.timer(secs(10));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));
    assert_eq!(h.rec.truncated, 1);
}

#[test]
fn write_timeout_when_writes_make_no_progress() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"slow reader"));
    assert_eq!(h.deadline(), Some(secs(4)));
    h.written(secs(2), 0);
    assert_eq!(h.deadline(), Some(secs(4)), "a write of nothing is no progress");
    h.write_some(secs(3), 1);
    assert_eq!(h.deadline(), Some(secs(6)), "one byte accepted restarts the clock");
    h.written(secs(5), 0);
    h.timer(secs(6) - MS);
    assert_eq!((h.state(), h.reason()), (Writing, None));
    h.timer(secs(6));
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::WriteTimeout)));
    assert_eq!(h.action(), Action::Abort);
    assert!(!h.conn.wants_write() && !h.conn.wants_read());
    assert_eq!(h.deadline(), None);
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 1),
        vec![to_closing(Writing, CloseReason::WriteTimeout)]
    );
    assert_eq!(h.rec.truncated, 0);
    assert_eq!(h.rec.frames_out, 0);
}

#[test]
fn earliest_clock_wins_write_before_read() {
    // Write clock 3 s from the answer at 1 s (4 s); read clock 5 s from the
    // next frame's first byte at 2 s (7 s).
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"a"));
    h.read(secs(2), &[0, 0]);
    assert_eq!(h.deadline(), Some(secs(4)));
    h.timer(secs(4));
    assert_eq!(h.reason(), Some(CloseReason::WriteTimeout));
    assert_eq!(h.action(), Action::Abort);
    assert_eq!(h.rec.truncated, 1, "the partial frame is discarded");
}

#[test]
fn earliest_clock_wins_when_both_expired_long_ago() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"a"));
    h.read(secs(2), &[0, 0]);
    h.timer(secs(100));
    assert_eq!(h.reason(), Some(CloseReason::WriteTimeout));
    assert_eq!(h.action(), Action::Abort);
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 1),
        vec![to_closing(Writing, CloseReason::WriteTimeout)]
    );
}

#[test]
fn earliest_clock_wins_read_before_write() {
    // Read clock 1 s from the partial frame at 2 s (3 s); write 3 s from the
    // answer at 1 s (4 s).
    let mut h = H::new(Limits { read_timeout: Some(secs(1)), ..limits() });
    h.read(secs(1), &frame(b"a"));
    h.read(secs(2), &[0, 0]);
    assert_eq!(h.deadline(), Some(secs(3)));
    h.timer(secs(3));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));
    assert_eq!(h.rec.truncated, 1);
    // Graceful: the answer already queued is still flushed.
    assert_eq!(h.action(), Action::Continue);
    assert!(h.conn.wants_write());
    assert_eq!(h.conn.pending(), &frame(b"a")[..]);
    // ...but a stalled flush ends at the write clock, keeping its reason.
    assert_eq!(h.deadline(), Some(secs(4)));
    h.timer(secs(4));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));
    assert_eq!(h.action(), Action::Abort);
}

#[test]
fn earliest_clock_wins_grace_before_read() {
    let mut h = H::new(limits());
    h.read(secs(1), &[0, 0, 0, 9]);
    h.stop(secs(2), secs(3), false);
    assert_eq!(h.deadline(), Some(secs(3)), "grace at 3 s before the read clock at 6 s");
    h.timer(secs(10));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    assert!(h.conn.forced());
    assert_eq!(h.action(), Action::Abort);
}

#[test]
fn disabled_clocks_never_fire() {
    let far = secs(365 * 24 * 3600);
    let mut h = H::new(no_clocks());
    assert_eq!(h.deadline(), None);
    h.timer(far);
    assert_eq!((h.state(), h.reason()), (Connecting, None));
    h.read(secs(1), &[0, 0, 0, 4, 1]);
    assert_eq!(h.deadline(), None);
    h.timer(far);
    assert_eq!((h.state(), h.reason()), (ReadingBody, None));
    h.read(secs(2), &[2, 3, 4]);
    assert_eq!(h.deadline(), None);
    h.timer(far);
    assert_eq!((h.state(), h.reason()), (Writing, None));
    h.flush(secs(3));
    h.timer(far);
    assert_eq!((h.state(), h.reason()), (ReadingHeader, None));
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn each_clock_can_be_disabled_alone() {
    // No idle clock: a fresh connection has no deadline.
    let h = H::new(Limits { idle_timeout: None, ..limits() });
    assert_eq!(h.deadline(), None);
    // No read clock: a partial frame waits forever (the idle one is off too
    // while a frame is in progress).
    let mut h = H::new(Limits { read_timeout: None, ..limits() });
    h.read(secs(1), &[0]);
    assert_eq!(h.deadline(), None);
    // No write clock: a queued answer waits forever.
    let mut h = H::new(Limits { write_timeout: None, ..limits() });
    h.read(secs(1), &frame(b"z"));
    assert_eq!(h.deadline(), None);
    h.timer(secs(1000));
    assert_eq!(h.state(), Writing);
}

// ---------------------------------------------------------------------------
// Backpressure.
// ---------------------------------------------------------------------------

#[test]
fn backpressure_pauses_reading_and_resumes_below_half() {
    // 20-byte answers; reading pauses once more than 64 bytes are queued.
    let lim = Limits { max_pending_output: 64, ..no_clocks() };
    let payloads: Vec<Vec<u8>> = (0..12).map(|i| payload(16, i)).collect();
    let stream: Vec<u8> = payloads.iter().flat_map(|p| encode(p)).collect();
    let mut h = H::new(lim);
    h.read(ms(1), &stream);
    // Four answers are 80 bytes > 64: parsing stopped after the fourth.
    assert_eq!(h.rec.frames_in, 4);
    assert_eq!(h.conn.pending(), &stream[..80]);
    assert!(!h.conn.wants_read(), "over max_pending_output: not read from");
    assert!(!h.conn.is_idle());
    // More input meanwhile is held, not parsed.
    let extra = frame(b"tail");
    h.read(ms(2), &extra);
    assert_eq!(h.rec.frames_in, 4);
    // 80 → 40 queued: not below half (32) yet.
    let mut out = h.write_some(ms(3), 40);
    assert!(!h.conn.wants_read());
    assert_eq!(h.rec.frames_in, 4);
    // 40 → 31: below half, parsing resumes until over 64 again.
    out.extend(h.write_some(ms(4), 9));
    assert_eq!(h.rec.frames_in, 6, "31 + 20 + 20 = 71 > 64");
    assert!(!h.conn.wants_read());
    // Drain in small pieces; every answer comes out in order.
    while h.conn.wants_write() {
        out.extend(h.write_some(ms(5), 13));
    }
    let mut expected = stream.clone();
    expected.extend_from_slice(&extra);
    assert_eq!(out, expected);
    assert_eq!(h.rec.frames_in, 13);
    assert_eq!(h.rec.frames_out, 13);
    assert!(h.conn.wants_read(), "drained: reading again");
    assert_eq!(h.state(), ReadingHeader);
    assert!(h.conn.is_idle());
}

#[test]
fn backpressure_held_partial_frame_completes_after_resume() {
    let lim = Limits { max_pending_output: 8, ..no_clocks() };
    let mut h = H::new(lim);
    let stream = frames(&[b"0123456789", b"abc"]);
    // Over the limit after the first answer (14 > 8); the second frame is cut
    // one byte into its body.
    h.read(ms(1), &stream[..19]);
    assert!(!h.conn.wants_read());
    assert_eq!(h.conn.pending(), &frame(b"0123456789")[..]);
    let mut out = h.flush(ms(2));
    assert!(h.conn.wants_read());
    assert_eq!(h.state(), ReadingBody, "the held bytes were parsed on resume");
    h.read(ms(3), &stream[19..]);
    out.extend(h.flush(ms(4)));
    assert_eq!(out, stream);
    assert_eq!((h.rec.frames_in, h.rec.frames_out), (2, 2));
}

#[test]
fn read_clock_pauses_under_backpressure() {
    let lim = Limits { max_pending_output: 8, read_timeout: Some(secs(1)), ..no_clocks() };
    let mut h = H::new(lim);
    let stream = frames(&[b"0123456789", b"abc"]);
    // The second frame's first bytes are held while reading is paused.
    h.read(ms(0), &stream[..16]);
    assert!(!h.conn.wants_read());
    assert_eq!(h.deadline(), None, "no read clock while paused");
    h.timer(secs(60));
    assert_eq!(h.reason(), None);
    // Resumed at 60 s: the frame's clock starts now.
    h.flush(secs(60));
    assert_eq!(h.deadline(), Some(secs(61)));
    h.timer(secs(61));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));
    assert_eq!(h.rec.truncated, 1);
}

/// A backend that blocks in `send` (`read_while_writing` off) reads again only
/// once every answer is written; a whole read is still parsed, so its answers
/// go out in one write.
#[test]
fn without_read_while_writing_reading_waits_for_the_answers() {
    let mut h = H::new(Limits { read_while_writing: false, ..limits() });
    let stream = frames(&[b"a", b"bb", b"ccc"]);
    h.read(ms(1), &stream[..stream.len() - 2]);
    assert!(!h.conn.wants_read(), "answers queued: no read");
    assert_eq!(h.conn.pending(), &stream[..stream.len() - 7], "both whole frames answered at once");
    h.write_some(ms(2), 3);
    assert!(!h.conn.wants_read(), "still an answer queued");
    h.flush(ms(3));
    assert!(h.conn.wants_read(), "every answer written: read again");
    h.read(ms(4), &stream[stream.len() - 2..]);
    assert_eq!(h.flush(ms(5)), frame(b"ccc"));
    let mut both = H::new(limits());
    both.read(ms(1), &stream[..stream.len() - 2]);
    assert!(both.conn.wants_read(), "by default reading goes on while answers are queued");
}

/// While reading waits for the answers to be written, the client is not
/// late with the rest of its frame: the read clock stands still, and a slow
/// reader ends with write_timeout, not read_timeout.
#[test]
fn without_read_while_writing_the_read_clock_stands_still_while_writing() {
    let lim = Limits { read_while_writing: false, read_timeout: Some(secs(1)), ..no_clocks() };
    let mut h = H::new(lim);
    let stream = frames(&[b"0123456789", b"abc"]);
    h.read(ms(0), &stream[..16]); // a whole frame and 2 bytes of the next
    assert_eq!(h.deadline(), None, "no read clock while the answer waits");
    h.timer(secs(60));
    assert_eq!(h.reason(), None);
    // Written at 60.5 s: the frame had run 0 s of its 1 s; it has the rest.
    h.flush(ms(60_500));
    assert_eq!(h.deadline(), Some(ms(61_500)));
    h.timer(ms(61_499));
    assert_eq!(h.reason(), None);
    h.timer(ms(61_500));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));

    let lim = Limits {
        read_while_writing: false,
        read_timeout: Some(secs(1)),
        write_timeout: Some(secs(3)),
        ..no_clocks()
    };
    let mut slow = H::new(lim);
    slow.read(ms(0), &stream[..16]);
    assert_eq!(slow.deadline(), Some(secs(3)), "only the write clock runs");
    slow.timer(secs(3));
    assert_eq!(slow.reason(), Some(CloseReason::WriteTimeout));
}

/// A frame held back by backpressure while reading waited for the answers
/// starts its clock when reading resumes, not a second time later.
#[test]
fn without_read_while_writing_a_held_frame_starts_its_clock_on_resume() {
    let lim = Limits {
        read_while_writing: false,
        max_pending_output: 8,
        read_timeout: Some(secs(1)),
        ..no_clocks()
    };
    let mut h = H::new(lim);
    let stream = frames(&[b"0123456789", b"abc"]);
    h.read(ms(0), &stream[..16]); // a whole frame (paused after it) and 2 bytes of the next
    h.flush(secs(60));
    assert_eq!(h.deadline(), Some(secs(61)), "the held frame's clock runs from the resume");
}

/// Without `read_while_writing`, a graceful close does not read while its
/// flush is pending: a blocking backend would sit in `recv` instead of
/// finishing the flush and half-closing.
#[test]
fn without_read_while_writing_a_close_flushes_before_it_reads() {
    let mut h = H::new(Limits { read_while_writing: false, max_frame: 10, ..limits() });
    let mut stream = frame(b"abc");
    stream.extend_from_slice(&header(11));
    h.read(ms(1), &stream);
    assert_eq!(h.reason(), Some(CloseReason::ProtocolError));
    assert!(h.conn.wants_write() && !h.conn.wants_read(), "flush first");
    assert_eq!(h.flush(ms(2)), frame(b"abc"));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(ms(3));
    assert!(h.conn.wants_read(), "then the lingering read");
    let mut both = H::new(Limits { max_frame: 10, ..limits() });
    both.read(ms(1), &stream);
    assert!(both.conn.wants_write() && both.conn.wants_read(), "by default it reads while it flushes");
}

// ---------------------------------------------------------------------------
// Half-close, protocol errors, the close sequences.
// ---------------------------------------------------------------------------

#[test]
fn half_close_still_delivers_every_answer_then_closes_with_eof() {
    let mut h = H::new(limits());
    let stream = frames(&[b"a", b"bb", b"", b"ccc"]);
    h.read(ms(1), &stream);
    h.eof(ms(2));
    assert_eq!((h.state(), h.reason()), (Writing, None));
    assert!(!h.conn.wants_read() && h.conn.wants_write());
    assert_eq!(h.action(), Action::Continue);
    let mut out = h.write_some(ms(3), 5);
    assert_eq!((h.state(), h.reason()), (Writing, None), "partly written: still Writing");
    out.extend(h.flush(ms(4)));
    assert_eq!(out, stream);
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::Eof)));
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 2),
        vec![tr(Writing, ReadingHeader), to_closing(ReadingHeader, CloseReason::Eof)],
        "the flush passes through ReadingHeader before the close"
    );
    assert_eq!(h.last_transition_at(), ms(4));
    assert_eq!((h.rec.frames_out, h.rec.truncated), (4, 0));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(ms(4));
    assert_eq!(h.action(), Action::Close, "the peer's FIN was seen: no linger");
}

#[test]
fn half_closed_peer_that_never_reads_ends_with_write_timeout() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"never read"));
    h.eof(secs(1));
    h.timer(secs(4) - MS);
    assert_eq!(h.state(), Writing);
    h.timer(secs(4));
    assert_eq!(h.reason(), Some(CloseReason::WriteTimeout));
    assert_eq!(h.action(), Action::Abort);
}

#[test]
fn partial_frame_then_eof_truncates_with_reason_eof() {
    for cut in 1..frame(b"body").len() {
        let mut h = H::new(limits());
        h.read(ms(1), &frame(b"body")[..cut]);
        h.eof(ms(2));
        assert_eq!(h.reason(), Some(CloseReason::Eof), "cut {cut}");
        assert_eq!(h.rec.truncated, 1, "cut {cut}");
        assert_eq!(h.rec.frames_in, 0);
        assert!(h.conn.pending().is_empty());
        assert_eq!(h.action(), Action::ShutdownWrite);
    }
}

#[test]
fn answers_then_partial_frame_then_eof_flushes_then_truncates() {
    let mut h = H::new(limits());
    let mut input = frame(b"done");
    input.extend_from_slice(&frame(b"cut short")[..6]);
    h.read(ms(1), &input);
    h.eof(ms(2));
    assert_eq!((h.state(), h.rec.truncated), (Writing, 0));
    assert_eq!(h.flush(ms(3)), frame(b"done"));
    assert_eq!(h.reason(), Some(CloseReason::Eof));
    assert_eq!(h.rec.truncated, 1);
}

#[test]
fn protocol_error_delivers_earlier_answers_and_closes_gracefully() {
    let lim = Limits { max_frame: 16, ..limits() };
    let mut h = H::new(lim);
    let mut input = frames(&[b"one", b"two"]);
    input.extend_from_slice(&header(17));
    input.extend_from_slice(&payload(17, 9));
    input.extend_from_slice(&frame(b"after"));
    h.read(ms(1), &input);
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::ProtocolError)));
    assert_eq!(
        h.rec.journal,
        vec![
            (None, Connecting, None),
            tr(Connecting, ReadingHeader),
            tr(ReadingHeader, ReadingBody),
            tr(ReadingBody, Writing),
            to_closing(Writing, CloseReason::ProtocolError),
        ]
    );
    assert_eq!(h.conn.pending(), &frames(&[b"one", b"two"])[..], "the body is not echoed");
    assert_eq!((h.rec.frames_in, h.rec.truncated), (2, 0));
    assert_eq!(h.rec.bytes_in, input.len());
    assert_eq!(h.action(), Action::Continue);
    assert!(h.conn.wants_write() && h.conn.wants_read());
    // Garbage after the decision is read and discarded.
    h.read(ms(2), &[0xff; 40]);
    assert_eq!(h.conn.pending(), &frames(&[b"one", b"two"])[..]);
    assert_eq!(h.flush(ms(3)), frames(&[b"one", b"two"]));
    assert_eq!(h.rec.frames_out, 2);
    assert_eq!(h.action(), Action::ShutdownWrite);
    assert_eq!(h.reason(), Some(CloseReason::ProtocolError));
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn protocol_error_header_split_across_reads() {
    let lim = Limits { max_frame: 16, ..limits() };
    let big = header(u32::MAX);
    for cut in 1..4 {
        let mut h = H::new(lim);
        h.read(ms(1), &big[..cut]);
        assert_eq!(h.state(), ReadingHeader);
        h.read(ms(2), &big[cut..]);
        assert_eq!(h.reason(), Some(CloseReason::ProtocolError), "cut {cut}");
        assert_eq!(h.journal_since(2), vec![to_closing(ReadingHeader, CloseReason::ProtocolError)]);
        assert_eq!(h.rec.truncated, 0);
        assert_eq!(h.action(), Action::ShutdownWrite);
    }
}

#[test]
fn max_frame_is_accepted() {
    let lim = Limits { max_frame: 16, ..limits() };
    let mut h = H::new(lim);
    h.read(ms(1), &frame(&payload(16, 4)));
    assert_eq!(h.reason(), None);
    assert_eq!(h.flush(ms(2)), frame(&payload(16, 4)));
}

#[test]
fn graceful_close_lingers_and_ends_at_eof() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"x"));
    h.flush(secs(1));
    h.timer(secs(11));
    assert_eq!(h.reason(), Some(CloseReason::IdleTimeout));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(11));
    // Lingering: reading and discarding, nothing to write, no abort.
    assert_eq!(h.action(), Action::Continue);
    assert!(h.conn.wants_read() && !h.conn.wants_write());
    assert_eq!(h.deadline(), Some(secs(11) + LINGER));
    let before = h.rec.bytes_in;
    h.read(secs(11) + ms(100), &frame(b"late"));
    assert_eq!(h.rec.bytes_in - before, 8, "read...");
    assert!(h.conn.pending().is_empty(), "...and discarded");
    assert_eq!(h.rec.frames_in, 1);
    h.timer(secs(11) + LINGER - MS);
    assert_eq!(h.action(), Action::Continue);
    h.eof(secs(11) + ms(500));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.wants_read());
    assert_eq!(h.deadline(), None);
    assert_eq!(h.state(), Closing);
    assert_eq!(h.reason(), Some(CloseReason::IdleTimeout));
    // No transition after the close was decided.
    assert_eq!(h.rec.journal.last(), Some(&to_closing(ReadingHeader, CloseReason::IdleTimeout)));
}

#[test]
fn graceful_close_ends_after_linger() {
    let mut h = H::new(limits());
    h.read(secs(1), &[0, 0, 0, 3, b'a']);
    h.timer(secs(6));
    assert_eq!(h.reason(), Some(CloseReason::ReadTimeout));
    h.shutdown_write(secs(6));
    assert_eq!(h.action(), Action::Continue);
    h.timer(secs(6) + LINGER);
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.wants_read());
}

#[test]
fn abortive_closes_abort_at_once() {
    for (errno, reason) in [
        (libc::ECONNRESET, CloseReason::Reset),
        (libc::EPIPE, CloseReason::Reset),
        (libc::ETIMEDOUT, CloseReason::IoError),
        (libc::EBADF, CloseReason::IoError),
    ] {
        let mut h = H::new(limits());
        h.read(ms(1), &frame(b"owed"));
        h.error(ms(2), errno);
        assert_eq!(h.reason(), Some(reason), "errno {errno}");
        assert_eq!(h.action(), Action::Abort, "errno {errno}: no flush, no half-close");
        assert!(!h.conn.wants_read() && !h.conn.wants_write());
        assert_eq!(h.journal_since(h.rec.journal.len() - 1), vec![to_closing(Writing, reason)]);
    }
}

#[test]
fn reset_is_kept_when_a_later_read_returns_zero() {
    let mut h = H::new(limits());
    h.read(ms(1), &frame(b"x"));
    h.error(ms(2), libc::ECONNRESET);
    h.eof(ms(3));
    assert_eq!(h.reason(), Some(CloseReason::Reset));
    assert_eq!(h.action(), Action::Abort);
    // A second error does not change it either.
    h.error(ms(4), libc::EIO);
    assert_eq!(h.reason(), Some(CloseReason::Reset));
    assert_eq!(h.rec.journal.iter().filter(|t| t.1 == Closing).count(), 1);
}

#[test]
fn reset_while_lingering_keeps_the_reason() {
    let mut h = H::new(limits());
    h.timer(secs(10));
    h.shutdown_write(secs(10));
    h.error(secs(10) + ms(5), libc::ECONNRESET);
    assert_eq!(h.reason(), Some(CloseReason::IdleTimeout));
    assert!(matches!(h.action(), Action::Close | Action::Abort), "the RST ends the linger");
    assert!(!h.conn.wants_read());
}

// ---------------------------------------------------------------------------
// stop().
// ---------------------------------------------------------------------------

#[test]
fn stop_closes_idle_at_once_without_linger() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"x"));
    h.flush(secs(1));
    h.stop(secs(2), secs(7), true);
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::Shutdown)));
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 1),
        vec![to_closing(ReadingHeader, CloseReason::Shutdown)]
    );
    assert_eq!(h.last_transition_at(), secs(2));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(2));
    assert_eq!(h.action(), Action::Close, "no linger");
    assert!(!h.conn.forced());
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn handoff_stop_closes_a_used_idle_connection_with_the_lingering_close() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"x"));
    h.flush(secs(1));
    h.handoff_stop(secs(2), secs(7));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    h.shutdown_write(secs(2));
    // The client's next frame, sent before it saw the FIN, is read and
    // discarded: it meets no RST.
    assert_eq!(h.action(), Action::Continue);
    assert_eq!(h.deadline(), Some(secs(2) + LINGER));
    h.read(secs(2) + ms(1), &frame(b"too late"));
    h.eof(secs(2) + ms(2));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
}

#[test]
fn handoff_stop_serves_the_first_frame_of_a_fresh_connection() {
    let mut h = H::new(limits());
    h.handoff_stop(secs(1), secs(11));
    assert_eq!((h.state(), h.reason()), (Connecting, None), "it waits for its first frame");
    assert_eq!(h.deadline(), Some(secs(1) + LINGER));
    h.read(secs(1) + ms(5), &frame(b"just connected"));
    assert_eq!(h.flush(secs(1) + ms(5)), frame(b"just connected"));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown), "then the drain close");
    assert!(!h.conn.forced());
}

#[test]
fn handoff_stop_closes_a_silent_fresh_connection_gracefully_after_the_wait() {
    // A grace shorter than the linger: the wait ends with the grace, and the
    // close at that instant is graceful, not forced.
    let mut h = H::new(limits());
    h.handoff_stop(secs(1), secs(1) + ms(300));
    assert_eq!(h.deadline(), Some(secs(1) + ms(300)));
    h.timer(secs(1) + ms(300));
    assert_eq!((h.reason(), h.action()), (Some(CloseReason::Shutdown), Action::ShutdownWrite));
    h.shutdown_write(secs(1) + ms(300));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
}

#[test]
fn stop_with_zero_grace_still_closes_idle_gracefully() {
    // stop(grace=0): step 2 (idle: shutdown then close) comes before step 4.
    let mut h = H::new(limits());
    h.stop(secs(1), secs(1), true);
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    assert_eq!(h.action(), Action::ShutdownWrite);
    assert!(!h.conn.forced());
    // A backend that checks its timers first must not force it either.
    h.timer(secs(1));
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(1));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
}

#[test]
fn stop_with_zero_grace_forces_busy() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"queued"));
    h.stop(secs(2), secs(2), true);
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    assert_eq!(h.action(), Action::Abort);
    assert!(h.conn.forced());
}

#[test]
fn stop_idle_with_bytes_in_the_kernel_serves_them_first() {
    let mut h = H::new(limits());
    h.stop(secs(1), secs(11), false);
    assert_eq!((h.state(), h.reason()), (Connecting, None));
    assert!(h.conn.wants_read());
    h.read(secs(1), &frame(b"in flight"));
    assert_eq!(h.state(), Writing);
    assert_eq!(h.flush(secs(2)), frame(b"in flight"));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 2),
        vec![tr(Writing, ReadingHeader), to_closing(ReadingHeader, CloseReason::Shutdown)],
        "the flush passes through ReadingHeader before the close"
    );
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(2));
    // Drained with plenty of grace left: the usual linger.
    assert_eq!(h.deadline(), Some(secs(2) + LINGER));
    h.eof(secs(2) + ms(1));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
}

#[test]
fn stop_busy_drains_then_closes_gracefully_with_shutdown() {
    let mut h = H::new(limits());
    let whole = frame(b"in progress");
    h.read(secs(1), &whole[..7]);
    h.stop(secs(2), secs(12), true);
    assert_eq!((h.state(), h.reason()), (ReadingBody, None), "a frame in progress is served");
    assert!(h.conn.wants_read());
    h.read(secs(3), &whole[7..]);
    assert_eq!((h.state(), h.reason()), (Writing, None), "not closed before the answer is written");
    let mut out = h.write_some(secs(4), 3);
    assert_eq!(h.reason(), None);
    out.extend(h.flush(secs(4)));
    assert_eq!(out, whole);
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::Shutdown)));
    assert_eq!(
        h.journal_since(h.rec.journal.len() - 2),
        vec![tr(Writing, ReadingHeader), to_closing(ReadingHeader, CloseReason::Shutdown)],
        "the flush passes through ReadingHeader before the close"
    );
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(4));
    assert_eq!(h.action(), Action::Continue, "lingering");
    h.eof(secs(4) + ms(10));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
    assert_eq!(h.rec.truncated, 0);
    assert_eq!((h.rec.frames_in, h.rec.frames_out), (1, 1));
}

#[test]
fn stop_drain_linger_is_bounded_by_the_remaining_grace() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"x"));
    h.stop(secs(1), secs(1) + ms(300), true);
    h.flush(secs(1) + ms(100));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    h.shutdown_write(secs(1) + ms(100));
    assert_eq!(h.deadline(), Some(secs(1) + ms(300)), "min(1 s, remaining grace)");
    h.timer(secs(1) + ms(300));
    assert_eq!(h.action(), Action::Close, "the linger ends with the grace: not forced");
    assert!(!h.conn.forced());
}

#[test]
fn stop_still_busy_at_grace_end_is_forced() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"answer"));
    h.read(secs(1), &frame(b"partial")[..5]);
    // The grace ends at 3.5 s, before the write clock (4 s).
    h.stop(secs(2), ms(3500), false);
    assert_eq!(h.deadline(), Some(ms(3500)));
    h.timer(ms(3500) - MS);
    assert_eq!(h.reason(), None);
    h.timer(ms(3500));
    assert_eq!((h.state(), h.reason()), (Closing, Some(CloseReason::Shutdown)));
    assert_eq!(h.action(), Action::Abort);
    assert!(h.conn.forced());
    assert_eq!(h.rec.truncated, 1, "the partial frame counts");
    assert_eq!(h.journal_since(h.rec.journal.len() - 1), vec![to_closing(Writing, CloseReason::Shutdown)]);
}

#[test]
fn stop_forced_without_partial_frame_truncates_nothing() {
    let mut h = H::new(no_clocks());
    h.read(secs(1), &frame(b"unread answer"));
    h.stop(secs(2), secs(3), true);
    h.timer(secs(3));
    assert_eq!(h.action(), Action::Abort);
    assert!(h.conn.forced());
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn stop_flush_stalled_at_grace_end_is_forced() {
    // Drained-decided but still flushing when the grace ends: forced.
    let mut h = H::new(no_clocks());
    h.read(secs(1), &frame(b"0123456789"));
    h.stop(secs(1), secs(5), true);
    h.write_some(secs(2), 3);
    assert_eq!(h.reason(), None);
    h.timer(secs(5));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    assert_eq!(h.action(), Action::Abort);
    assert!(h.conn.forced());
}

#[test]
fn stop_keeps_the_reason_of_a_connection_already_closing() {
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"owed"));
    h.eof(secs(1));
    h.flush(secs(2));
    assert_eq!(h.reason(), Some(CloseReason::Eof));
    // Flushed, not half-closed yet when stop begins.
    let mark = h.rec.journal.len();
    h.stop(secs(2), secs(3), true);
    assert_eq!(h.reason(), Some(CloseReason::Eof));
    assert!(h.conn.closing_before_stop());
    assert_eq!(h.journal_since(mark), vec![]);
    assert_eq!(h.action(), Action::ShutdownWrite);
    h.shutdown_write(secs(2));
    assert_eq!(h.action(), Action::Close);
    assert!(!h.conn.forced());
}

#[test]
fn stop_grace_end_aborts_a_closing_connection_without_forcing_it() {
    let mut h = H::new(limits());
    h.timer(secs(10));
    h.shutdown_write(secs(10));
    assert_eq!(h.deadline(), Some(secs(11)));
    h.stop(secs(10), secs(10) + ms(200), false);
    assert_eq!(h.deadline(), Some(secs(10) + ms(200)), "the grace ends before the linger");
    h.timer(secs(10) + ms(200));
    assert_eq!(h.reason(), Some(CloseReason::IdleTimeout), "keeps its reason");
    assert_eq!(h.action(), Action::Abort);
    assert!(!h.conn.forced(), "closing before stop counts as drained");
    assert!(h.conn.closing_before_stop());
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn stop_drains_a_half_closed_peer_with_reason_shutdown() {
    // Every connection open when stop began closes with `shutdown` once its
    // answers are delivered, a half-closed one included.
    let mut h = H::new(limits());
    h.read(secs(1), &frame(b"owed"));
    h.eof(secs(1));
    h.stop(secs(2), secs(5), true);
    assert_eq!((h.state(), h.reason()), (Writing, None));
    h.flush(secs(3));
    assert_eq!(h.reason(), Some(CloseReason::Shutdown));
    h.shutdown_write(secs(3));
    assert_eq!(h.action(), Action::Close, "the peer's FIN was seen: no linger");
    assert!(!h.conn.forced());
}

// ---------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------

#[test]
fn counters_add_up() {
    let mut h = H::new(limits());
    let stream = frames(&[b"a", b"", &payload(100, 5)]);
    h.read(ms(1), &stream[..50]);
    h.read(ms(2), &stream[50..]);
    h.read(ms(2), &[]);
    assert_eq!(h.rec.bytes_in, stream.len());
    assert_eq!(h.rec.frames_in, 3);
    assert_eq!(h.rec.frames_out, 0, "counted once written");
    h.write_some(ms(3), 10);
    // "a" (5 bytes) and "" (4 bytes) are whole in the first 10 bytes.
    assert_eq!((h.rec.bytes_out, h.rec.frames_out), (10, 2), "each answer counts once its last byte is out");
    h.flush(ms(4));
    assert_eq!((h.rec.bytes_out, h.rec.frames_out), (stream.len(), 3));
    h.eof(ms(5));
    assert_eq!(h.reason(), Some(CloseReason::Eof));
    assert_eq!(h.rec.truncated, 0);
}

#[test]
fn output_buffer_stays_bounded_under_a_steady_partial_reader() {
    // A peer that keeps reading some, never all: the queue's buffer must not
    // keep every byte ever written through it.
    let mut h = H::new(Limits { max_frame: 2000, max_pending_output: 256 << 10, ..no_clocks() });
    let one = frame(&[5u8; 1000]);
    for round in 0..2000 {
        h.read(ms(round), &one);
        h.write_some(ms(round), 900);
    }
    assert!(h.conn.pending().len() > 100_000, "the queue never emptied: {}", h.conn.pending().len());
    let held = h.conn.buffered_capacity();
    assert!(held <= 4 * (256 << 10), "buffers hold {held} bytes");
    h.flush(ms(3000));
    assert_eq!(h.conn.buffered_capacity(), 0, "an idle connection holds no buffer");
}

#[test]
fn answers_written_before_an_abort_are_counted() {
    let mut h = H::new(limits());
    let stream = frames(&[b"one", b"two", b"three"]);
    h.read(ms(1), &stream);
    h.write_some(ms(2), 7 + 7 + 2); // "one", "two", and 2 bytes of "three"
    h.error(ms(3), libc::ECONNRESET);
    assert_eq!(h.rec.frames_out, 2, "two answers left whole before the reset");
}

#[test]
fn smallest_output_limit_still_resumes_reading() {
    // max_pending_output = 1: any answer pauses reading; it must resume once
    // the queue is empty, or the connection would wait forever.
    let mut h = H::new(Limits { max_pending_output: 1, ..no_clocks() });
    let stream = frames(&[b"a", b"b", b"c"]);
    h.read(ms(1), &stream);
    assert!(!h.conn.wants_read(), "paused behind the first answer");
    let mut out = Vec::new();
    for _ in 0..3 {
        out.extend(h.flush(ms(2)));
    }
    assert_eq!(out, stream);
    assert!(h.conn.wants_read() && h.conn.is_idle());
}

#[test]
fn a_slow_reader_costs_at_most_the_queue_bound() {
    // The peer never reads: the queue fills to max_pending_output plus one
    // answer, and the buffer holding it must not be twice that.
    let max_pending = 256 << 10;
    let max_frame = 64 << 10;
    let mut h = H::new(Limits { max_frame, max_pending_output: max_pending, ..no_clocks() });
    let one = frame(&payload(48_000, 3)); // doubling would reach 384 032 bytes
    for round in 0..100 {
        if !h.conn.wants_read() {
            break;
        }
        h.read(ms(round), &one);
    }
    assert!(!h.conn.wants_read(), "backpressure paused reading");
    let bound = max_pending + max_frame as usize + 4;
    assert!(h.conn.buffered_capacity() <= bound, "{} > {bound}", h.conn.buffered_capacity());
}

#[test]
fn a_frame_gathered_beside_a_queue_that_held_more_stays_within_the_bound() {
    // The queue grew to max_pending_output + one answer, then mostly drained;
    // a frame spanning reads begins beside it. Its buffer and the queue's
    // spare capacity together must not exceed the bound (they could reach
    // max_pending_output + 2 × max_frame).
    let (max_pending, max_frame) = (4096, 1024);
    let mut h = H::new(Limits { max_frame, max_pending_output: max_pending, ..no_clocks() });
    let big = frame(&payload(1000, 7));
    let mut sent = Vec::new();
    while h.conn.wants_read() {
        h.read(ms(1), &big);
        sent.extend_from_slice(&big);
    }
    let bound = max_pending + max_frame as usize + 4;
    assert!(h.conn.buffered_capacity() > bound - 1100, "the queue grew near the bound");
    let queued = h.conn.pending().len();
    let mut out = h.write_some(ms(2), queued - 1500);
    assert!(h.conn.wants_read(), "below half of max_pending_output: reading resumed");
    let next = frame(&payload(1024, 9));
    h.read(ms(3), &next[..100]);
    assert!(h.conn.buffered_capacity() <= bound, "{} > {bound}", h.conn.buffered_capacity());
    // Nothing is lost on the way: the rest of the frame completes, and every
    // answer comes out in order.
    h.read(ms(4), &next[100..]);
    while h.conn.wants_write() {
        out.extend(h.flush(ms(5)));
    }
    sent.extend_from_slice(&next);
    assert_eq!(out, sent);
}

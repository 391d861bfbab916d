//! An observer that records everything the core reports, for the tests of
//! the core (`core.rs`) and of its reference model (`props.rs`).

use std::time::Instant;

use connlab_servers::conn::{CloseReason, Observer, State};

/// One journal entry as the observer saw it: (from, to, reason).
pub type Tr = (Option<State>, State, Option<CloseReason>);

/// An observer that records every call.
#[derive(Debug, Default)]
pub struct Rec {
    /// Every transition, in order.
    pub journal: Vec<Tr>,
    /// The instant each transition of `journal` was reported at.
    pub journal_at: Vec<Instant>,
    /// Sum of `bytes_in`.
    pub bytes_in: usize,
    /// Sum of `bytes_out`.
    pub bytes_out: usize,
    /// Count of `frame_in`.
    pub frames_in: u64,
    /// Sum of `frames_out`.
    pub frames_out: u64,
    /// Count of `truncated`.
    pub truncated: u64,
}

impl Observer for Rec {
    fn transition(&mut self, from: Option<State>, to: State, reason: Option<CloseReason>, now: Instant) {
        self.journal.push((from, to, reason));
        self.journal_at.push(now);
    }
    fn bytes_in(&mut self, n: usize, _: Instant) {
        self.bytes_in += n;
    }
    fn bytes_out(&mut self, n: usize, _: Instant) {
        self.bytes_out += n;
    }
    fn frame_in(&mut self) {
        self.frames_in += 1;
    }
    fn frames_out(&mut self, n: u64) {
        self.frames_out += n;
    }
    fn truncated(&mut self) {
        self.truncated += 1;
    }
}

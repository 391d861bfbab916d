//! A stream run watched while it goes: what it counted since the last look,
//! and a way to end its window early. This is how a caller that reports as
//! the load runs (Locust's workers, every second) drives the generator
//! without stopping and restarting it, which would reopen every connection.
//!
//! The run's threads move what they recorded into the [`Tap`] at least
//! every [`FLUSH`], and once more as they end; [`Tap::take`] hands the
//! caller everything moved in since the last take. The intervals a caller
//! takes add up, frame for frame and bucket for bucket, to the report the
//! run returns, once the run is over and the caller has taken a last time.

use std::mem;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::{Errors, Recorder};

/// Longest a run's thread keeps what it recorded before moving it into its
/// tap: what a take can miss of the moment it is made.
pub const FLUSH: Duration = Duration::from_millis(100);

/// Shared between a running stream run and its caller: see the module.
#[derive(Debug, Default)]
pub struct Tap {
    /// When [`Tap::stop`] was first called.
    stopped: OnceLock<Instant>,
    /// What the threads moved in.
    counts: Mutex<Counts>,
}

/// What a tap holds.
#[derive(Debug, Default)]
struct Counts {
    /// Moved in since the last take.
    pending: Recorder,
    /// Taken before.
    taken: Recorder,
}

/// What a run counted between two takes (see [`Tap::take`]).
#[derive(Debug, Clone)]
pub struct Interval {
    /// Frames answered, verified and counted.
    pub frames: u64,
    /// Connections established inside the window.
    pub connects: u64,
    /// Frames whose connection failed before their answer came.
    pub lost: u64,
    /// Failures by kind.
    pub errors: Errors,
    /// The counted frames' latencies, in nanoseconds.
    pub histogram: Histogram<u64>,
}

impl Tap {
    /// A tap for one run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the run's measured window now (or keeps the first instant, if
    /// called before): the run drains as at the end of its duration and
    /// returns, within [`FLUSH`] plus the time its owed answers take, at
    /// most the run's timeout.
    pub fn stop(&self) {
        let _ = self.stopped.set(Instant::now());
    }

    /// When the window was ended by [`Tap::stop`], if it was.
    pub fn stopped(&self) -> Option<Instant> {
        self.stopped.get().copied()
    }

    /// What the run counted since the last take (since its start, the first
    /// time): at most [`FLUSH`] behind, and complete once the run is over.
    pub fn take(&self) -> Interval {
        let mut counts = self.counts();
        let rec = mem::take(&mut counts.pending);
        let interval = Interval {
            frames: rec.frames,
            connects: rec.connects,
            lost: rec.lost,
            errors: rec.errors,
            histogram: rec.histogram.clone(),
        };
        counts.taken.merge(rec);
        interval
    }

    /// Moves what a thread recorded into the tap, leaving `rec` empty.
    pub(crate) fn absorb(&self, rec: &mut Recorder) {
        self.counts().pending.merge_ref(rec);
        rec.reset();
    }

    /// Everything the run moved in, taken or not.
    pub(crate) fn total(&self) -> Recorder {
        let counts = self.counts();
        let mut all = Recorder::new();
        all.merge_ref(&counts.taken);
        all.merge_ref(&counts.pending);
        all
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // A thread that panicked mid-merge leaves counts that are still
        // counts; its panic is resumed where the run joins it.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_add_up_to_the_total() {
        let tap = Tap::new();
        let mut rec = Recorder::new();
        rec.record(Duration::from_micros(10));
        rec.record(Duration::from_micros(20));
        rec.lost = 1;
        tap.absorb(&mut rec);
        assert_eq!(rec.frames, 0, "absorb empties the thread's recorder");
        let first = tap.take();
        assert_eq!((first.frames, first.lost, first.histogram.len()), (2, 1, 2));
        rec.record(Duration::from_micros(30));
        tap.absorb(&mut rec);
        let total = tap.total();
        assert_eq!((total.frames, total.lost, total.histogram.len()), (3, 1, 3), "untaken counts in");
        let second = tap.take();
        assert_eq!((second.frames, second.lost, second.histogram.len()), (1, 0, 1));
        assert_eq!(tap.take().frames, 0, "nothing twice");
        assert_eq!(tap.total().frames, 3);
    }

    #[test]
    fn stop_keeps_its_first_instant() {
        let tap = Tap::new();
        assert!(tap.stopped().is_none());
        tap.stop();
        let first = tap.stopped().unwrap();
        tap.stop();
        assert_eq!(tap.stopped(), Some(first));
    }
}

//! What a run measures: error kinds, the per-thread `Recorder`, and the
//! merged [`Report`] with rates, latency percentiles and the HDR histogram.

use std::fmt;
use std::io;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::hdr::new_histogram;

/// Why a connection (or a frame on it) failed. Each failure counts once, and
/// the connection is closed; a stream run reopens it (see [`crate::stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connect failed (refused, unreachable, no local port left).
    Connect,
    /// The server reset the connection (ECONNRESET, EPIPE, ECONNABORTED).
    Reset,
    /// The server closed the connection while answers were owed or
    /// frames were still to come.
    Eof,
    /// An answer differed from its frame: another length or another byte,
    /// or bytes arrived that answer nothing.
    Corrupt,
    /// A connect, or an owed answer, made no progress for the run's timeout
    /// (or was still pending when the run's hard deadline came).
    Timeout,
    /// Any other socket error.
    Io,
}

impl ErrorKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Connect,
        ErrorKind::Reset,
        ErrorKind::Eof,
        ErrorKind::Corrupt,
        ErrorKind::Timeout,
        ErrorKind::Io,
    ];

    /// The name used in reports and in Python.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Reset => "reset",
            ErrorKind::Eof => "eof",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
        }
    }

    /// The kind of a socket error on an established connection.
    pub(crate) fn of(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                ErrorKind::Reset
            }
            io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A count per [`ErrorKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Errors {
    /// Indexed by `ErrorKind as usize` (the order of [`ErrorKind::ALL`]).
    counts: [u64; ErrorKind::ALL.len()],
}

impl Errors {
    /// How many failures of `kind`.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.counts[kind as usize]
    }

    /// Every kind with its count, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL.iter().map(|&k| (k, self.get(k)))
    }

    /// Failures of every kind.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts one failure.
    pub(crate) fn add(&mut self, kind: ErrorKind) {
        self.counts[kind as usize] += 1;
    }

    /// Adds another thread's counts.
    fn merge(&mut self, other: &Errors) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }
}

/// What one thread counted; threads merge theirs when the run ends.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Latency of every counted frame (or connection, for churn), in ns.
    pub histogram: Histogram<u64>,
    /// Frames answered and verified that count (inside the measured window).
    pub frames: u64,
    /// Connections established inside the window (churn: completed).
    pub connects: u64,
    /// Frames whose latency will never be known: sent inside the window, then
    /// their connection failed before the answer came.
    pub lost: u64,
    /// Failures by kind (warm-up included: an error is never hidden).
    pub errors: Errors,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Recorder { histogram: new_histogram(), frames: 0, connects: 0, lost: 0, errors: Errors::default() }
    }

    /// Counts one frame (or connection) that took `latency`.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.histogram.saturating_record(ns);
        self.frames += 1;
    }

    /// Adds another thread's counts.
    pub fn merge(&mut self, other: Recorder) {
        self.merge_ref(&other);
    }

    /// Empties the recorder, keeping its histogram's memory.
    pub fn reset(&mut self) {
        self.histogram.reset();
        self.frames = 0;
        self.connects = 0;
        self.lost = 0;
        self.errors = Errors::default();
    }

    /// Adds counts that stay where they are (a [`crate::live::Tap`]'s).
    pub fn merge_ref(&mut self, other: &Recorder) {
        self.histogram.add(&other.histogram).expect("histograms of one shape add");
        self.frames += other.frames;
        self.connects += other.connects;
        self.lost += other.lost;
        self.errors.merge(&other.errors);
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Which generator produced a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each connection keeps `pipeline` frames in flight.
    ClosedLoop,
    /// Frames at a constant rate, latency from their intended send time.
    OpenLoop,
    /// Connect, one frame, close; over and over.
    Churn,
    /// One connection to an in-process echo thread: the loopback baseline.
    PingPong,
}

impl Mode {
    /// The name used in reports and in Python.
    pub fn name(self) -> &'static str {
        match self {
            Mode::ClosedLoop => "closed_loop",
            Mode::OpenLoop => "open_loop",
            Mode::Churn => "churn",
            Mode::PingPong => "pingpong",
        }
    }
}

/// Latency percentiles of a run, in microseconds (all 0 when nothing counted).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    /// Samples counted.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of a histogram in nanoseconds (a run's, or a merge
    /// of runs'), in microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1e3,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// The result of one run.
#[derive(Clone)]
pub struct Report {
    /// Which generator ran.
    pub mode: Mode,
    /// Connections kept open (churn: connections open at once).
    pub connections: usize,
    /// Generator threads used.
    pub threads: usize,
    /// Payload bytes per frame.
    pub size: usize,
    /// The open loop's target rate in frames/s.
    pub rate: Option<f64>,
    /// Frames answered, verified and counted (churn: connections completed).
    pub frames: u64,
    /// Bytes of the counted frames, headers included, one way (the echo
    /// moves as many back).
    pub bytes: u64,
    /// Connections established in the measured window (churn: completed).
    pub connects: u64,
    /// Frames sent in the window whose connection failed before their answer.
    pub lost: u64,
    /// The measured window: from the end of the warm-up to the end of the
    /// run (open loop: to the last answer of a frame intended in the window).
    pub elapsed: Duration,
    /// Failures by kind.
    pub errors: Errors,
    /// Latency of every counted frame (churn: connect to verified echo), in
    /// nanoseconds.
    pub histogram: Histogram<u64>,
}

impl Report {
    /// A report of `mode` from the merged recorder.
    pub(crate) fn new(mode: Mode, shape: Shape, rec: Recorder, elapsed: Duration) -> Self {
        Report {
            mode,
            connections: shape.connections,
            threads: shape.threads,
            size: shape.size,
            rate: shape.rate,
            frames: rec.frames,
            bytes: rec.frames * (shape.size as u64 + connlab_servers::codec::HEADER_LEN as u64),
            connects: rec.connects,
            lost: rec.lost,
            elapsed,
            errors: rec.errors,
            histogram: rec.histogram,
        }
    }

    /// Counted frames per second of the window.
    pub fn frames_per_s(&self) -> f64 {
        per_s(self.frames as f64, self.elapsed)
    }

    /// Counted bytes per second, in MB (10^6 bytes), one way.
    pub fn mb_per_s(&self) -> f64 {
        per_s(self.bytes as f64 / 1e6, self.elapsed)
    }

    /// Connections established (churn: completed) per second of the window.
    pub fn conns_per_s(&self) -> f64 {
        per_s(self.connects as f64, self.elapsed)
    }

    /// The latency percentiles, in microseconds.
    pub fn latency(&self) -> Latency {
        Latency::of(&self.histogram)
    }

    /// The histogram in HdrHistogram's compressed V2 encoding (what
    /// `HistogramLogWriter` writes, base64-encoded, and what every HdrHistogram
    /// port decodes); values are nanoseconds.
    pub fn histogram_v2_deflate(&self) -> Vec<u8> {
        crate::hdr::encode(&self.histogram)
    }
}

impl fmt::Debug for Report {
    /// Every field but the histogram's counts (tens of thousands of zeros):
    /// its length stands for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("mode", &self.mode)
            .field("connections", &self.connections)
            .field("threads", &self.threads)
            .field("size", &self.size)
            .field("rate", &self.rate)
            .field("frames", &self.frames)
            .field("bytes", &self.bytes)
            .field("connects", &self.connects)
            .field("lost", &self.lost)
            .field("elapsed", &self.elapsed)
            .field("errors", &self.errors)
            .field("latency", &self.latency())
            .finish_non_exhaustive()
    }
}

/// What a report says about the run's shape, besides its measurements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// See [`Report::connections`].
    pub connections: usize,
    /// See [`Report::threads`].
    pub threads: usize,
    /// See [`Report::size`].
    pub size: usize,
    /// See [`Report::rate`].
    pub rate: Option<f64>,
}

/// `n` per second of `elapsed` (0 for an empty window).
fn per_s(n: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn percentiles_are_ordered_and_in_microseconds() {
        let mut rec = Recorder::new();
        for us in 1..=1000u64 {
            rec.record(Duration::from_micros(us));
        }
        let shape = Shape { connections: 1, threads: 1, size: 64, rate: None };
        let report = Report::new(Mode::ClosedLoop, shape, rec, Duration::from_secs(2));
        let l = report.latency();
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() <= 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() <= 1.0, "{l:?}");
        assert!(l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
        assert!((l.max - 1000.0).abs() <= 1.0);
        assert_eq!(report.frames_per_s(), 500.0);
        assert_eq!(report.bytes, 1000 * 68);
    }

    #[test]
    fn the_export_decodes_to_the_same_histogram() {
        let mut rec = Recorder::new();
        rec.record(Duration::from_nanos(1500));
        rec.record(Duration::from_millis(250));
        let shape = Shape { connections: 1, threads: 1, size: 0, rate: None };
        let report = Report::new(Mode::OpenLoop, shape, rec, Duration::from_secs(1));
        let bytes = report.histogram_v2_deflate();
        let back: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, report.histogram);
    }

    #[test]
    fn merging_adds_everything() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(20));
        b.errors.add(ErrorKind::Corrupt);
        b.lost = 3;
        a.merge(b);
        assert_eq!((a.frames, a.lost, a.errors.get(ErrorKind::Corrupt), a.errors.total()), (2, 3, 1, 1));
        assert_eq!(a.histogram.len(), 2);
    }

    #[test]
    fn an_empty_report_has_zero_latency_and_rates() {
        let shape = Shape { connections: 1, threads: 1, size: 0, rate: None };
        let report = Report::new(Mode::Churn, shape, Recorder::new(), Duration::ZERO);
        assert_eq!(report.latency(), Latency::default());
        assert_eq!((report.frames_per_s(), report.conns_per_s()), (0.0, 0.0));
    }
}

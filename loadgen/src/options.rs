//! The four runs a user can ask for, their defaults, and their validation:
//! a bad value is an [`Error::Invalid`] naming the argument as Python spells it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::live::Tap;
use crate::report::Report;
use crate::stream::Pacing;
use crate::{churn, pingpong, stream, Error};

/// Most connections (or parallel churn connections) one run may keep.
pub const MAX_CONNECTIONS: usize = 100_000;
/// Largest payload (16 MiB): a frame is encoded whole in memory.
pub const MAX_SIZE: usize = 16 << 20;
/// Deepest pipeline per connection.
pub const MAX_PIPELINE: usize = 4096;
/// Most generator threads.
pub const MAX_THREADS: usize = 64;
/// Highest open-loop rate, frames/s.
pub const MAX_RATE: f64 = 10_000_000.0;
/// Longest duration, warm-up, timeout or deadline (one day).
pub const MAX_SECONDS: f64 = 86_400.0;
/// Most churn attempts (`cycles × parallel`) in one run.
pub const MAX_ATTEMPTS: u64 = 100_000_000;

/// A duration given in seconds: finite, ≥ 0, at most [`MAX_SECONDS`];
/// otherwise an error naming `field`.
pub fn seconds(field: &'static str, secs: f64) -> Result<Duration, Error> {
    if !secs.is_finite() || !(0.0..=MAX_SECONDS).contains(&secs) {
        return Err(Error::invalid(
            field,
            format!("must be a number of seconds in [0, {MAX_SECONDS}], got {secs}"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Connections one default thread takes before a second one helps: measured
/// on 2 cores against the one-thread epoll backend, a second generator thread
/// only pays off from about this many on (below, it steals the server's core).
const CONNECTIONS_PER_THREAD: usize = 512;

/// The threads a run uses: `asked`, or by default one, and two from
/// [`CONNECTIONS_PER_THREAD`] connections on if the machine has two cores;
/// never more than there are connections.
fn threads(asked: Option<usize>, connections: usize) -> Result<usize, Error> {
    let n = match asked {
        Some(n) => {
            in_range("threads", n, 1, MAX_THREADS)?;
            n
        }
        None => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            connections.div_ceil(CONNECTIONS_PER_THREAD).min(2).min(cores)
        }
    };
    Ok(n.min(connections).max(1))
}

/// `value` within `[min, max]`, or an error naming `field`.
fn in_range(field: &'static str, value: usize, min: usize, max: usize) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::invalid(field, format!("must be in [{min}, {max}], got {value}")));
    }
    Ok(())
}

/// A duration that must be positive.
fn positive(field: &'static str, d: Duration) -> Result<(), Error> {
    if d.is_zero() || d.as_secs_f64() > MAX_SECONDS {
        return Err(Error::invalid(
            field,
            format!("must be in (0, {MAX_SECONDS}] s, got {} s", d.as_secs_f64()),
        ));
    }
    Ok(())
}

/// A duration that may be zero.
fn at_most_a_day(field: &'static str, d: Duration) -> Result<(), Error> {
    if d.as_secs_f64() > MAX_SECONDS {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_SECONDS} s, got {} s", d.as_secs_f64()),
        ));
    }
    Ok(())
}

/// Closed-loop echo load: every connection keeps `pipeline` frames in flight
/// (see [`crate::stream`] for the phases and what counts).
#[derive(Debug, Clone, Copy)]
pub struct ClosedLoop {
    /// The server.
    pub address: SocketAddr,
    /// Connections kept open.
    pub connections: usize,
    /// Payload bytes per frame.
    pub size: usize,
    /// Frames in flight per connection.
    pub pipeline: usize,
    /// The measured window.
    pub duration: Duration,
    /// Time before the window, not counted.
    pub warmup: Duration,
    /// Generator threads; None picks (see [`ClosedLoop::run`]).
    pub threads: Option<usize>,
    /// Longest wait for a connect or an owed answer; also bounds the drain.
    pub timeout: Duration,
}

impl ClosedLoop {
    /// 10 connections, 64-byte frames, no pipelining, 1 s warm-up, 5 s
    /// window, 2 s timeout.
    pub fn new(address: SocketAddr) -> Self {
        ClosedLoop {
            address,
            connections: 10,
            size: 64,
            pipeline: 1,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            threads: None,
            timeout: Duration::from_secs(2),
        }
    }

    /// Runs the load; returns when the window and the drain are over (at the
    /// latest `warmup + duration + timeout` after the start).
    ///
    /// Default threads: one, or two from 512 connections on (given two cores).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming a bad field; [`Error::Io`] if a thread or
    /// its epoll instance cannot be created. Network failures are not
    /// errors of the call: they are counted in [`Report::errors`].
    pub fn run(&self) -> Result<Report, Error> {
        stream::run(self.setup()?, None)
    }

    /// [`ClosedLoop::run`], watched through `tap`: what it counts can be
    /// taken while it runs, and a stop on the tap ends its window early
    /// (see [`crate::live`]).
    ///
    /// # Errors
    ///
    /// As [`ClosedLoop::run`].
    pub fn run_watched(&self, tap: &Tap) -> Result<Report, Error> {
        stream::run(self.setup()?, Some(tap))
    }

    /// What [`Self::run`] would refuse, without running: a caller that
    /// runs it on a thread of its own reports bad options at once.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the bad field.
    pub fn check(&self) -> Result<(), Error> {
        self.setup().map(drop)
    }

    /// The validated run.
    fn setup(&self) -> Result<stream::Setup, Error> {
        in_range("connections", self.connections, 1, MAX_CONNECTIONS)?;
        in_range("size", self.size, 0, MAX_SIZE)?;
        in_range("pipeline", self.pipeline, 1, MAX_PIPELINE)?;
        positive("duration", self.duration)?;
        at_most_a_day("warmup", self.warmup)?;
        positive("timeout", self.timeout)?;
        Ok(stream::Setup {
            address: self.address,
            connections: self.connections,
            size: self.size,
            pacing: Pacing::Closed { pipeline: self.pipeline },
            duration: self.duration,
            warmup: self.warmup,
            threads: threads(self.threads, self.connections)?,
            timeout: self.timeout,
        })
    }
}

/// Open-loop, constant-rate echo load: `rate` frames/s across all
/// connections on a fixed schedule, latency measured from each frame's
/// intended send instant (see [`crate::stream`]).
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// The server.
    pub address: SocketAddr,
    /// Frames per second, all connections together.
    pub rate: f64,
    /// Connections the frames are spread over, round-robin.
    pub connections: usize,
    /// Payload bytes per frame.
    pub size: usize,
    /// The measured window: frames due in it count.
    pub duration: Duration,
    /// Time before the window, not counted.
    pub warmup: Duration,
    /// Generator threads; None picks as for [`ClosedLoop`].
    pub threads: Option<usize>,
    /// Longest wait for a connect or an owed answer; the drain waits this
    /// long at most for the window's last answers.
    pub timeout: Duration,
}

impl OpenLoop {
    /// `rate` frames/s over 10 connections, 64-byte frames, 1 s warm-up,
    /// 5 s window, 2 s timeout.
    pub fn new(address: SocketAddr, rate: f64) -> Self {
        OpenLoop {
            address,
            rate,
            connections: 10,
            size: 64,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            threads: None,
            timeout: Duration::from_secs(2),
        }
    }

    /// Runs the load; returns at the latest `warmup + duration + timeout`
    /// after the start.
    ///
    /// # Errors
    ///
    /// As [`ClosedLoop::run`]; `rate` must be in (0, [`MAX_RATE`]].
    pub fn run(&self) -> Result<Report, Error> {
        stream::run(self.setup()?, None)
    }

    /// [`OpenLoop::run`], watched through `tap` (see
    /// [`ClosedLoop::run_watched`]): a stop ends the schedule, and the
    /// drain waits for the answers of the frames already due.
    ///
    /// # Errors
    ///
    /// As [`OpenLoop::run`].
    pub fn run_watched(&self, tap: &Tap) -> Result<Report, Error> {
        stream::run(self.setup()?, Some(tap))
    }

    /// What [`Self::run`] would refuse, without running: a caller that
    /// runs it on a thread of its own reports bad options at once.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the bad field.
    pub fn check(&self) -> Result<(), Error> {
        self.setup().map(drop)
    }

    /// The validated run.
    fn setup(&self) -> Result<stream::Setup, Error> {
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(Error::invalid(
                "rate",
                format!("must be in (0, {MAX_RATE}] frames/s, got {}", self.rate),
            ));
        }
        in_range("connections", self.connections, 1, MAX_CONNECTIONS)?;
        in_range("size", self.size, 0, MAX_SIZE)?;
        positive("duration", self.duration)?;
        at_most_a_day("warmup", self.warmup)?;
        positive("timeout", self.timeout)?;
        Ok(stream::Setup {
            address: self.address,
            connections: self.connections,
            size: self.size,
            pacing: Pacing::Open { rate: self.rate },
            duration: self.duration,
            warmup: self.warmup,
            threads: threads(self.threads, self.connections)?,
            timeout: self.timeout,
        })
    }
}

/// Connection churn: `cycles × parallel` connections of one frame each (see
/// [`crate::churn`]).
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// The server.
    pub address: SocketAddr,
    /// Connections each parallel slot makes, one after another.
    pub cycles: u64,
    /// Connections open at once.
    pub parallel: usize,
    /// Payload bytes of the one frame.
    pub size: usize,
    /// Close each connection with an RST (SO_LINGER 0) instead of a FIN.
    pub rst: bool,
    /// Generator threads; None picks as for [`ClosedLoop`] (by `parallel`).
    pub threads: Option<usize>,
    /// Longest wait for a connect or the echo.
    pub timeout: Duration,
    /// The whole run's bound.
    pub deadline: Duration,
}

impl Churn {
    /// `cycles × parallel` connections with 64-byte frames, closed by FIN;
    /// 2 s timeout, 60 s deadline.
    pub fn new(address: SocketAddr, cycles: u64, parallel: usize) -> Self {
        Churn {
            address,
            cycles,
            parallel,
            size: 64,
            rst: false,
            threads: None,
            timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        }
    }

    /// Runs the churn; returns when every attempt is done, or at the deadline.
    ///
    /// # Errors
    ///
    /// As [`ClosedLoop::run`].
    pub fn run(&self) -> Result<Report, Error> {
        in_range("parallel", self.parallel, 1, MAX_CONNECTIONS)?;
        let attempts = self.cycles.saturating_mul(self.parallel as u64);
        if self.cycles == 0 || attempts > MAX_ATTEMPTS {
            return Err(Error::invalid(
                "cycles",
                format!("must be ≥ 1 with cycles × parallel ≤ {MAX_ATTEMPTS}, got {}", self.cycles),
            ));
        }
        in_range("size", self.size, 0, MAX_SIZE)?;
        positive("timeout", self.timeout)?;
        positive("deadline", self.deadline)?;
        churn::run(churn::Setup {
            address: self.address,
            cycles: self.cycles,
            parallel: self.parallel,
            size: self.size,
            rst: self.rst,
            threads: threads(self.threads, self.parallel)?,
            timeout: self.timeout,
            deadline: self.deadline,
        })
    }
}

/// The raw loopback round trip: the closed-loop client on one connection to
/// an echo thread of the generator itself (see [`crate::pingpong`]).
#[derive(Debug, Clone, Copy)]
pub struct PingPong {
    /// Payload bytes per frame.
    pub size: usize,
    /// The measured window.
    pub duration: Duration,
    /// Time before the window, not counted.
    pub warmup: Duration,
    /// The CPU the echo thread runs on (a pinned benchmark's server CPU, so
    /// the floor pays the same cross-CPU wake-ups a server does); `None`:
    /// wherever the caller's threads may run.
    pub echo_cpu: Option<usize>,
}

impl Default for PingPong {
    /// 64-byte frames, 0.1 s warm-up, 1 s window, the echo unpinned.
    fn default() -> Self {
        PingPong {
            size: 64,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
            echo_cpu: None,
        }
    }
}

impl PingPong {
    /// Runs it; returns after `warmup + duration` (or at the first failure).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming a bad field; [`Error::Io`] if the loopback
    /// listener, its connection or the echo thread cannot be set up.
    pub fn run(&self) -> Result<Report, Error> {
        in_range("size", self.size, 0, MAX_SIZE)?;
        positive("duration", self.duration)?;
        at_most_a_day("warmup", self.warmup)?;
        pingpong::run(self.size, self.duration, self.warmup, self.echo_cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn field(r: Result<Report, Error>) -> &'static str {
        r.unwrap_err().field()
    }

    #[test]
    fn bad_values_name_their_argument() {
        let ok = ClosedLoop::new(addr());
        assert_eq!(field(ClosedLoop { connections: 0, ..ok }.run()), "connections");
        assert_eq!(field(ClosedLoop { size: MAX_SIZE + 1, ..ok }.run()), "size");
        assert_eq!(field(ClosedLoop { pipeline: 0, ..ok }.run()), "pipeline");
        assert_eq!(field(ClosedLoop { duration: Duration::ZERO, ..ok }.run()), "duration");
        assert_eq!(field(ClosedLoop { timeout: Duration::ZERO, ..ok }.run()), "timeout");
        assert_eq!(field(ClosedLoop { threads: Some(0), ..ok }.run()), "threads");
        let open = OpenLoop::new(addr(), 100.0);
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_RATE * 2.0] {
            assert_eq!(field(OpenLoop { rate, ..open }.run()), "rate");
        }
        let churn = Churn::new(addr(), 1, 1);
        assert_eq!(field(Churn { cycles: 0, ..churn }.run()), "cycles");
        assert_eq!(field(Churn { parallel: 0, ..churn }.run()), "parallel");
        assert_eq!(field(Churn { cycles: u64::MAX, ..churn }.run()), "cycles");
        assert_eq!(field(Churn { deadline: Duration::ZERO, ..churn }.run()), "deadline");
        assert_eq!(field(PingPong { size: usize::MAX, ..PingPong::default() }.run()), "size");
    }

    #[test]
    fn seconds_rejects_what_is_not_a_duration() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, MAX_SECONDS * 2.0] {
            assert_eq!(seconds("warmup", bad).unwrap_err().field(), "warmup");
        }
        assert_eq!(seconds("warmup", 0.25).unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn default_threads_are_one_then_two_from_512_connections() {
        assert_eq!(threads(None, 1).unwrap(), 1);
        let two = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
        assert_eq!(threads(None, 512).unwrap(), 1);
        assert_eq!(threads(None, 513).unwrap(), two);
        assert_eq!(threads(None, 5000).unwrap(), two);
        assert_eq!(threads(Some(8), 3).unwrap(), 3, "never more threads than connections");
    }
}

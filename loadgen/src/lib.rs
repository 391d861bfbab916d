//! connlab-loadgen: the load, churn and ping-pong generator of connlab. Many
//! connections multiplexed on a few threads (edge-triggered epoll through
//! mio), every echo checked byte for byte, latency in an HDR histogram.
//!
//! A tour of the modules:
//!
//! - [`options`]: the runs a user asks for — [`ClosedLoop`], [`OpenLoop`],
//!   [`Churn`], [`PingPong`] — with their defaults and validation.
//! - [`stream`]: closed- and open-loop load over long-lived connections: the
//!   warm-up, window and drain phases, and how an open loop avoids
//!   coordinated omission.
//! - [`churn`]: connect, one frame, close, many times over.
//! - [`pingpong`]: the loopback baseline, the closed-loop client on one
//!   connection to an echo thread of its own.
//! - [`report`]: error kinds, what each thread records, and the merged
//!   [`Report`] (rates, percentiles, the exportable histogram).
//! - [`live`]: a stream run watched while it goes: its counts taken in
//!   intervals, its window ended on demand.
//! - [`hdr`]: exported histograms (compressed V2, nanoseconds) decoded,
//!   merged, as a percentile spectrum, or as an HdrHistogram interval log.
//! - `link`: one client connection: non-blocking connect, writes and reads
//!   until WouldBlock, each answer checked as it arrives.
//! - `payload`: deterministic payloads, recomputed at any offset to check an
//!   echo without keeping what was sent.
//! - `sys`: the timerfd that wakes a worker to the microsecond.
//!
//! Framing is `connlab_servers::codec`, the servers' own codec. Errors are
//! the servers' [`Error`]: `Invalid` names the bad argument, `Io` a setup
//! syscall; network failures during a run are counted, never returned.

use std::io;
use std::thread;

pub mod churn;
pub mod hdr;
mod link;
pub mod live;
pub mod options;
mod payload;
pub mod pingpong;
pub mod report;
pub mod stream;
mod sys;

pub use connlab_servers::Error;
pub use options::{seconds, Churn, ClosedLoop, OpenLoop, PingPong};
pub use report::{ErrorKind, Errors, Latency, Mode, Report};

/// Maps a failure to set up a run (a thread, an epoll instance, a timerfd)
/// to an error about `threads`, the resource it concerns.
pub(crate) fn setup_error(context: &str) -> impl FnOnce(io::Error) -> Error {
    let context = context.to_string();
    move |source| Error::Io { field: "threads", context, source }
}

/// Runs `work(i)` for `i` in `0..n`: 0 on the calling thread, the others on
/// threads named `loadgen-<i>` (not `connlab-`: that prefix is the
/// servers', whose CPU probes sum), all joined before it returns. The first
/// error wins; a panic in a thread is resumed here.
pub(crate) fn on_threads<T: Send>(
    n: usize,
    work: impl Fn(usize) -> Result<T, Error> + Sync,
) -> Result<Vec<T>, Error> {
    thread::scope(|scope| {
        let work = &work;
        let mut handles = Vec::with_capacity(n.saturating_sub(1));
        let mut spawn_error = None;
        for i in 1..n {
            match thread::Builder::new().name(format!("loadgen-{i}")).spawn_scoped(scope, move || work(i)) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(setup_error("spawning a generator thread")(e));
                    break;
                }
            }
        }
        // With a thread missing the run would be lopsided: the spawned ones
        // still run (and are joined by the scope) but their result is dropped.
        let first = work(0);
        let mut results = vec![first];
        for h in handles {
            results.push(h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        if let Some(e) = spawn_error {
            return Err(e);
        }
        results.into_iter().collect()
    })
}

/// The public types can cross threads (a Python caller releases the GIL).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Report>();
    send_sync::<ClosedLoop>();
    send_sync::<OpenLoop>();
    send_sync::<Churn>();
    send_sync::<PingPong>();
    send_sync::<live::Tap>();
};

//! What `stop` shares between backends: the stop signal that server threads
//! wait on, named server threads that can be joined and seen gone from
//! `/proc/self/task`, and the report `stop` returns.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::registry::Registry;
use crate::sys::{self, Waker};

/// What `stop` returns (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopReport {
    /// Connections closed before the grace ended.
    pub drained: u64,
    /// Connections aborted when the grace ended.
    pub forced: u64,
    /// Time `stop` took.
    pub elapsed: Duration,
}

/// When a stop that began at `started` with `grace` ends its grace; a grace
/// beyond [`crate::config::MAX_TIMEOUT`] is capped (it cannot overflow).
pub fn grace_end(started: Instant, grace: Duration) -> Instant {
    started + grace.min(crate::config::MAX_TIMEOUT)
}

/// The stop signal: when the grace ends, published before the waker fires.
#[derive(Debug)]
pub struct StopSignal {
    /// The end of the grace, set once by `stop`.
    grace_end: OnceLock<Instant>,
    /// The eventfd's number, for pollers; valid until [`StopSignal::close`].
    fd: RawFd,
    /// Owns the eventfd, readable once stop began; taken by `close`.
    waker: Mutex<Option<Waker>>,
}

impl StopSignal {
    /// A signal not yet raised.
    pub fn new() -> io::Result<Self> {
        let waker = Waker::new()?;
        Ok(StopSignal { grace_end: OnceLock::new(), fd: waker.raw(), waker: Mutex::new(Some(waker)) })
    }

    /// Raises the signal: publishes `grace_end`, then wakes every poller.
    pub fn raise(&self, grace_end: Instant) {
        let _ = self.grace_end.set(grace_end);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            waker.wake().expect("writing to an eventfd cannot fail");
        }
    }

    /// The end of the grace, once stop began.
    pub fn grace_end(&self) -> Option<Instant> {
        self.grace_end.get().copied()
    }

    /// The fd to poll for `POLLIN`; only while threads that poll it may run.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Closes the eventfd; call once every thread that polls it is joined.
    pub fn close(&self) {
        self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The registry's counts at the moment the listener closed, from which
/// `stop` computes its report.
#[derive(Debug, Default)]
pub struct StopPoint {
    /// `(active, forced)` when the listener closed.
    at: OnceLock<(u64, u64)>,
}

impl StopPoint {
    /// Records the counts; call right after closing the listener, when no
    /// connection can be added any more.
    pub fn record(&self, registry: &Registry) {
        let _ = self.at.set((registry.active(), registry.forced()));
    }

    /// The report once every connection is closed: `forced` are those the
    /// grace's end aborted, `drained` the rest of those open at the stop.
    pub fn report(&self, registry: &Registry, started: Instant) -> StopReport {
        let (active, forced_before) = self.at.get().copied().unwrap_or_default();
        let forced = registry.forced() - forced_before;
        StopReport { drained: active - forced, forced, elapsed: started.elapsed() }
    }
}

/// A spawned server thread: its handle and its kernel thread id.
#[derive(Debug)]
pub struct ServerThread {
    /// Joins the thread.
    handle: JoinHandle<()>,
    /// The thread's tid, written by the thread as its first act (0 before).
    tid: Arc<AtomicI32>,
}

impl ServerThread {
    /// Spawns a thread named `name` (DESIGN.md §4a: `connlab-<backend>[-n]`).
    pub fn spawn(name: String, stack: Option<usize>, f: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let tid = Arc::new(AtomicI32::new(0));
        let tid_in = Arc::clone(&tid);
        let mut builder = std::thread::Builder::new().name(name);
        if let Some(stack) = stack {
            builder = builder.stack_size(stack);
        }
        let handle = builder.spawn(move || {
            tid_in.store(sys::gettid(), Ordering::Release);
            f();
        })?;
        Ok(ServerThread { handle, tid })
    }

    /// Whether the thread's function returned.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Joins the thread, then waits (up to 2 s) until the kernel has removed
    /// it from `/proc/self/task`, so thread counts read after `stop` are exact.
    pub fn join(self) {
        let _ = self.handle.join();
        wait_gone(self.tid.load(Ordering::Acquire));
    }
}

/// Waits (up to 2 s) until thread `tid` has left `/proc/self/task`: a joined
/// or finished thread lingers there briefly, and thread counts read after
/// `stop` must be exact. A tid of 0 (never started) returns at once.
pub fn wait_gone(tid: libc::pid_t) {
    if tid == 0 {
        return;
    }
    let path = format!("/proc/self/task/{tid}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::path::Path::new(&path).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A growing set of threads (one per connection in `blocking`): finished
/// ones are reaped as new ones come, the rest joined at stop.
#[derive(Debug, Default)]
pub struct ThreadSet {
    /// Threads not joined yet, and the length at which to reap next.
    threads: Mutex<(Vec<ServerThread>, usize)>,
}

impl ThreadSet {
    /// Adds a thread; joins the finished ones whenever the set doubled since
    /// the last reaping (amortized O(1) per thread).
    pub fn push(&self, thread: ServerThread) {
        let finished = {
            let mut guard = self.threads.lock().unwrap_or_else(|e| e.into_inner());
            let (threads, reap_at) = &mut *guard;
            threads.push(thread);
            if threads.len() < *reap_at {
                return;
            }
            let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(ServerThread::is_finished);
            *threads = running;
            *reap_at = (threads.len() * 2).max(64);
            done
        };
        // Finished threads join at once; outside the lock all the same.
        finished.into_iter().for_each(ServerThread::join);
    }

    /// Joins every thread.
    pub fn join_all(&self) {
        let threads = std::mem::take(&mut self.threads.lock().unwrap_or_else(|e| e.into_inner()).0);
        threads.into_iter().for_each(ServerThread::join);
    }
}

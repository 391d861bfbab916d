//! What `stop` shares between backends: named server threads that can be
//! joined and seen gone from `/proc/self/task`, and the report `stop` returns.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys;

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

    /// The thread's join handle.
    pub fn handle(&self) -> &JoinHandle<()> {
        &self.handle
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

/// Kernel ids of threads a backend does not spawn itself (a thread pool's, a
/// runtime's), recorded as each one starts, so `stop` can wait until they
/// have left `/proc/self/task` after joining them.
#[derive(Debug, Default, Clone)]
pub struct Tids(Arc<Mutex<Vec<libc::pid_t>>>);

impl Tids {
    /// Records the calling thread.
    pub fn record_current(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(sys::gettid());
    }

    /// Waits until every recorded thread, joined already, is gone.
    pub fn wait_gone(&self) {
        let tids = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        tids.into_iter().for_each(wait_gone);
    }
}

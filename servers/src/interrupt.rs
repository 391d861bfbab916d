//! Waking a thread parked in a blocking socket call without touching its
//! connection: a real-time signal whose handler does nothing, installed
//! without `SA_RESTART`, so the call the thread is parked in returns EINTR
//! and the thread looks at the stop.
//!
//! A signal that lands just before the thread enters its call is lost (the
//! handler ran, the call then blocks), so [`ParkedThreads::wake_all`] sends
//! it again until every thread has reported that it saw the stop. The
//! signal is the highest real-time one that has no handler in the process
//! yet, so the host's own handlers (Python's among them) stay untouched.

use std::io;
use std::os::unix::thread::JoinHandleExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::shutdown::ServerThread;

/// Does nothing: its one effect is that the interrupted call returns EINTR.
extern "C" fn on_wake(_: libc::c_int) {}

/// The wake signal, chosen once per process.
static WAKE_SIGNAL: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();

/// The current disposition of `sig`, if it can be read.
fn disposition(sig: libc::c_int) -> Option<libc::sighandler_t> {
    // SAFETY: a zeroed sigaction is a valid out-parameter.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only reads the disposition into `old`.
    (unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0).then_some(old.sa_sigaction)
}

/// Installs the do-nothing handler on `sig`, without `SA_RESTART` (the parked
/// call must return EINTR). Returns whether it is installed.
fn install(sig: libc::c_int) -> bool {
    // SAFETY: a zeroed sigaction is valid; every field that matters is set
    // below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // On the thread's alternate stack where it has one: a connection
    // thread's own stack may be small.
    act.sa_flags = libc::SA_ONSTACK;
    // SAFETY: `act.sa_mask` is a valid sigset to initialize.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is fully initialized and the handler is async-signal-safe
    // (it does nothing).
    unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) == 0 }
}

/// The wake signal's number, installing its handler the first time: the
/// highest real-time signal whose disposition is still the default.
pub(crate) fn wake_signal() -> io::Result<libc::c_int> {
    let chosen = WAKE_SIGNAL.get_or_init(|| {
        (libc::SIGRTMIN()..=libc::SIGRTMAX())
            .rev()
            .find(|&sig| disposition(sig) == Some(libc::SIG_DFL) && install(sig))
            .ok_or(libc::EBUSY)
    });
    chosen.map_err(|errno| {
        io::Error::new(
            io::Error::from_raw_os_error(errno).kind(),
            "no real-time signal is free to wake parked threads",
        )
    })
}

/// Lets the wake signal through in the calling thread (a thread inherits
/// its creator's signal mask, which the host may have set).
pub(crate) fn accept_wake(sig: libc::c_int) {
    // SAFETY: `set` is a valid sigset, initialized by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// A parked thread as `stop` sees it.
#[derive(Debug)]
struct Parked {
    /// The thread.
    thread: ServerThread,
    /// Set by the thread once it has seen the stop.
    seen: Arc<AtomicBool>,
}

/// Threads that park in blocking calls (one per connection): finished ones
/// are reaped as new ones come, the rest woken and joined at stop.
#[derive(Debug, Default)]
pub(crate) struct ParkedThreads {
    /// Threads not joined yet, and the length at which to reap next.
    threads: Mutex<(Vec<Parked>, usize)>,
}

impl ParkedThreads {
    /// Adds a thread that sets `seen` once it has seen the stop; joins the
    /// finished ones whenever the set doubled since the last reaping
    /// (amortized O(1) per thread).
    pub fn push(&self, thread: ServerThread, seen: Arc<AtomicBool>) {
        let finished = {
            let mut guard = self.threads.lock().unwrap_or_else(|e| e.into_inner());
            let (threads, reap_at) = &mut *guard;
            threads.push(Parked { thread, seen });
            if threads.len() < *reap_at {
                return;
            }
            let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|p| p.thread.is_finished());
            *threads = running;
            *reap_at = (threads.len() * 2).max(64);
            done
        };
        // Finished threads join at once; outside the lock all the same.
        finished.into_iter().for_each(|p| p.thread.join());
    }

    /// Sends `sig` to every thread that has neither seen the stop nor
    /// returned, again every millisecond until none is left. Call once the
    /// stop is published and no thread can be added any more.
    pub fn wake_all(&self, sig: libc::c_int) {
        // A real-time signal's default action ends the process: should the
        // host have reset it since, the handler goes back first.
        if disposition(sig) == Some(libc::SIG_DFL) {
            install(sig);
        }
        let guard = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut waiting = 0;
            for parked in guard.0.iter() {
                if parked.seen.load(Ordering::Acquire) || parked.thread.is_finished() {
                    continue;
                }
                waiting += 1;
                let handle = parked.thread.handle().as_pthread_t();
                // SAFETY: the thread is not joined (its handle is held under
                // this lock), so its pthread_t is valid even if it has just
                // returned; the signal's handler is installed.
                unsafe { libc::pthread_kill(handle, sig) };
            }
            if waiting == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Joins every thread.
    pub fn join_all(&self) {
        let threads = std::mem::take(&mut self.threads.lock().unwrap_or_else(|e| e.into_inner()).0);
        threads.into_iter().for_each(|p| p.thread.join());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use socket2::{Domain, Socket, Type};

    use super::*;

    /// A thread that needs three wake-ups before it says it saw the stop (as
    /// if the first two had landed just before its call): `wake_all` keeps
    /// sending until it says so, and each send ends a parked call with EINTR.
    #[test]
    fn wake_all_resends_until_the_thread_has_seen_the_stop() {
        let sig = wake_signal().expect("a free real-time signal");
        assert_eq!(wake_signal().unwrap(), sig, "installed once");
        let (sock, _peer) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        let seen = Arc::new(AtomicBool::new(false));
        let interrupted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (seen, interrupted) = (Arc::clone(&seen), Arc::clone(&interrupted));
            ServerThread::spawn("connlab-test".into(), None, move || {
                accept_wake(sig);
                let mut buf = Vec::with_capacity(16);
                loop {
                    // Parked: nothing ever arrives on this socket.
                    let res = crate::sys::recv_into(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut buf, 0);
                    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::Interrupted);
                    if interrupted.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                        seen.store(true, Ordering::Release);
                        return;
                    }
                }
            })
            .unwrap()
        };
        let parked = ParkedThreads::default();
        parked.push(thread, seen);
        parked.wake_all(sig);
        parked.join_all();
        assert_eq!(interrupted.load(Ordering::SeqCst), 3);
    }
}

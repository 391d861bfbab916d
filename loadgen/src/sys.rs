//! The syscalls mio does not wrap: a timerfd, so a worker's `epoll_wait`
//! wakes with sub-millisecond precision (its own timeout is whole
//! milliseconds, too coarse for an open loop at thousands of frames/s), and
//! pinning a thread to a CPU.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Calls a libc function and turns `-1` into the thread's `errno`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each call site passes arguments that satisfy the function's
        // contract; its comment says why.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// A one-shot monotonic timer whose fd turns readable when it expires.
#[derive(Debug)]
pub(crate) struct Timer {
    /// The timerfd (non-blocking, close-on-exec).
    fd: OwnedFd,
    /// The instant it is armed for, if armed and not yet seen expired:
    /// re-arming for the same instant is skipped.
    armed_for: Option<Instant>,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        // Plain integer arguments; the returned fd is owned below.
        let fd = syscall!(timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC))?;
        // SAFETY: `fd` was just returned by timerfd_create and is owned by nobody else.
        Ok(Timer { fd: unsafe { OwnedFd::from_raw_fd(fd) }, armed_for: None })
    }

    /// Arms the timer to expire at `at` (which must be in the future), unless
    /// it is already armed for that instant.
    pub fn arm(&mut self, at: Instant, now: Instant) -> io::Result<()> {
        if self.armed_for == Some(at) {
            return Ok(());
        }
        // A relative timer: std's Instant is CLOCK_MONOTONIC but does not
        // expose its raw value; the few ns between `now` and the call do not
        // matter. A zero it_value would disarm, hence the 1 ns floor.
        let left = at.saturating_duration_since(now).max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: left.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
            },
        };
        // `spec` outlives the call; a null old_value is allowed.
        syscall!(timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()))?;
        self.armed_for = Some(at);
        Ok(())
    }

    /// Consumes an expiry (after the fd was reported readable), so the next
    /// `arm` sets the timer anew.
    pub fn expired(&mut self) {
        let mut count: u64 = 0;
        // `count` is 8 writable bytes that outlive the call. EAGAIN (a stale
        // readiness event) is fine: nothing expired.
        let _ = syscall!(read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8));
        self.armed_for = None;
    }

    /// The fd to register for readability.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Runs the calling thread on `cpu` only.
pub(crate) fn pin_current(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no CPU {cpu}")));
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked), inside the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // `set` is a cpu_set_t of the size given and outlives the call; pid 0 is this thread.
    syscall!(sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd, ms: i32) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // `p` is one valid pollfd for the whole call.
        syscall!(poll(&mut p, 1, ms)).unwrap() == 1
    }

    #[test]
    fn expires_once_at_the_instant_it_was_armed_for() {
        let mut t = Timer::new().unwrap();
        assert!(!readable(t.raw(), 0));
        let start = Instant::now();
        t.arm(start + Duration::from_millis(20), start).unwrap();
        assert!(!readable(t.raw(), 5));
        assert!(readable(t.raw(), 1000));
        assert!(start.elapsed() >= Duration::from_millis(20));
        t.expired();
        assert!(!readable(t.raw(), 0), "one-shot: consumed, and not re-armed");
    }

    #[test]
    fn an_instant_in_the_past_expires_at_once() {
        let mut t = Timer::new().unwrap();
        let now = Instant::now();
        t.arm(now - Duration::from_millis(1), now).unwrap();
        assert!(readable(t.raw(), 1000));
    }
}

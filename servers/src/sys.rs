//! The few syscalls that std and socket2 do not wrap, each behind one small
//! safe function.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

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

/// An eventfd used to wake threads blocked in `poll`: once woken it stays
/// readable (nobody reads it), so every waiter sees it.
#[derive(Debug)]
pub struct Waker {
    /// The eventfd.
    fd: OwnedFd,
}

impl Waker {
    /// A new, not yet woken, eventfd.
    pub fn new() -> io::Result<Self> {
        // Plain integer flags; the returned fd is owned below.
        let fd = syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Waker { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Resets the counter (the eventfd stops being readable); for a waker
    /// used many times.
    pub fn drain(&self) {
        let mut count: u64 = 0;
        // `count` is 8 writable bytes that outlive the call. EAGAIN (not
        // woken) is fine: there was nothing to drain.
        let _ = syscall!(read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8));
    }

    /// Makes the eventfd readable (until drained).
    pub fn wake(&self) -> io::Result<()> {
        let one: u64 = 1;
        // `one` lives across the call and is 8 bytes, as eventfd requires.
        syscall!(write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8))?;
        Ok(())
    }

    /// The fd to poll for `POLLIN`.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An epoll instance, used directly where mio has no equivalent
/// (`EPOLLONESHOT` hand-offs in the `pool` backend).
#[derive(Debug)]
pub struct Epoll {
    /// The epoll fd.
    fd: OwnedFd,
}

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // `event` outlives the call; the kernel copies it.
        syscall!(epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event))?;
        Ok(())
    }

    /// Adds `fd`, reporting `events` with `data`.
    pub fn add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    /// Changes (and, for `EPOLLONESHOT`, re-arms) `fd`'s registration.
    pub fn modify(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)
    }

    /// Removes `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events into the spare capacity of `events` (cleared
    /// first); EINTR comes back as `Interrupted`.
    pub fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        let ms = timeout_ms(timeout);
        let max = events.capacity().min(i32::MAX as usize) as libc::c_int;
        // The buffer has room for `max` events, which the kernel fills.
        let n = syscall!(epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, ms))?;
        // SAFETY: epoll_wait initialized the first `n` events.
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

/// Adds `fd` to the epoll instance `epfd` (mio's, whose events carry `token`)
/// for edge-triggered readability with `EPOLLEXCLUSIVE`: when several epoll
/// instances watch one listener, a new connection wakes one of those waiting,
/// not all of them (mio has no flag for it).
pub fn epoll_add_exclusive(epfd: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let events = (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32;
    let mut event = libc::epoll_event { events, u64: token };
    // `event` outlives the call; the kernel copies it. Both fds are open.
    syscall!(epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut event))?;
    Ok(())
}

/// A timeout rounded up to whole milliseconds (rounding down would wake
/// early and spin until the deadline); `None` is −1, forever.
fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
    }
}

/// `poll(2)` with a timeout rounded up to whole milliseconds (rounding down
/// would wake early and spin until the deadline); `None` waits forever.
/// Returns the number of ready fds; EINTR comes back as `Interrupted`.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout_ms(timeout);
    // `fds` is a valid slice of pollfd for its whole length.
    let n = syscall!(poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms))?;
    Ok(n as usize)
}

/// A pollfd asking for `events` on `fd`.
pub fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Bytes in the socket's kernel receive queue (`FIONREAD`).
pub fn fionread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // FIONREAD writes one c_int through the pointer, which outlives the call.
    syscall!(ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int))?;
    Ok(n.max(0) as usize)
}

/// `recv` into the spare capacity of `buf`, extending its length by the
/// bytes received. Ok(0) is the peer's FIN. `flags`: `MSG_DONTWAIT` for a
/// non-blocking call, 0 to block (bounded by the socket's `SO_RCVTIMEO`).
pub fn recv_into(fd: RawFd, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<usize> {
    let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
    // The pointer and length describe `spare`, writable memory owned by `buf`.
    let n = syscall!(recv(fd, spare.as_mut_ptr().cast(), spare.len(), flags))? as usize;
    // SAFETY: recv initialized exactly `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `send` that never raises SIGPIPE (EPIPE comes back instead). `flags`:
/// `MSG_DONTWAIT` for a non-blocking call, 0 to block (bounded by the
/// socket's `SO_SNDTIMEO`).
pub fn send(fd: RawFd, data: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // The pointer and length describe `data`, readable for the whole call.
    let n = syscall!(send(fd, data.as_ptr().cast(), data.len(), flags | libc::MSG_NOSIGNAL))?;
    Ok(n as usize)
}

/// The calling thread's kernel id (its entry in `/proc/self/task`).
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

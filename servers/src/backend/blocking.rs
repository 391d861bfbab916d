//! `blocking`: one OS thread per connection, parked in blocking calls — the
//! classic thread-per-connection server.
//!
//! An acceptor thread waits in `poll(2)` on the listener and a stop eventfd,
//! and starts a thread with a small stack for each connection it admits.
//! That thread's socket is in blocking mode, and the thread sits inside
//! `recv` or `send`: one call per read and one per write, nothing else per
//! frame. The core's deadline (idle, read, write, linger, grace) bounds each
//! call as `SO_RCVTIMEO` / `SO_SNDTIMEO`, kept while it ends no later than
//! the deadline, so a steady connection pays no extra syscall for it. A thread blocked in `send` is not
//! reading, so its core has `read_while_writing` off: it parses what it has
//! read, answers it in one write, and reads again once that is written. A
//! parked thread holds a read buffer for twice its last read (`IDLE_CHUNK`
//! at least), so a connection's usual frame comes in one `recv`.
//!
//! `stop` must drain, so it cannot close or shut down sockets under parked
//! threads. It wakes each thread with a real-time signal
//! (`interrupt.rs`): the parked call returns EINTR, the thread sees the
//! stop through the gate, and from then on the grace bounds its calls. A
//! wake that lands just before a thread enters its call is lost, so the
//! signal is sent again until that thread says it has seen the stop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Io, Link, Next, READ_CHUNK};
use crate::gate::{self, AcceptEnd, Acceptor, Gate};
use crate::interrupt::{self, ParkedThreads};
use crate::kind::BackendKind;
use crate::registry::ConnHandle;
use crate::server::{Running, Served};
use crate::shutdown::ServerThread;
use crate::sys::{self, Waker};

/// The read buffer a connection thread keeps while its connection is idle.
const IDLE_CHUNK: usize = 512;

/// A socket timeout that ends this little after the deadline is kept:
/// re-setting it per call would cost a syscall per frame (the deadline moves
/// with every frame), and the kernel counts in jiffies anyway.
const TIMEOUT_SLACK: Duration = Duration::from_millis(2);

/// Above this, a blocking send waits a quarter of what its deadline leaves.
const SEND_SPLIT: Duration = Duration::from_millis(40);

/// What the acceptor and every connection thread share.
#[derive(Debug)]
struct Shared {
    /// Admission, the registry and the published stop.
    gate: Arc<Gate>,
    /// Limits and stack size for every connection.
    config: Config,
    /// The signal that wakes parked threads.
    wake_signal: libc::c_int,
    /// Connection threads not joined yet.
    threads: ParkedThreads,
}

/// The running acceptor.
#[derive(Debug)]
pub(crate) struct Threads {
    /// State shared with the threads.
    shared: Arc<Shared>,
    /// The acceptor thread; it closes the listener when it returns.
    acceptor: ServerThread,
    /// Tells the acceptor to return.
    accept_stop: Arc<Waker>,
}

/// Starts the acceptor on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<Threads>, Error> {
    let wake_signal = interrupt::wake_signal().map_err(Error::starting("installing the wake signal"))?;
    let shared =
        Arc::new(Shared { gate: Arc::clone(&gate), config, wake_signal, threads: ParkedThreads::default() });
    let accept_stop = Arc::new(Waker::new().map_err(Error::starting("creating the accept eventfd"))?);
    let acceptor = {
        let (shared, accept_stop) = (Arc::clone(&shared), Arc::clone(&accept_stop));
        ServerThread::spawn("connlab-blocking".into(), None, move || {
            accept_loop(&shared, listener, &accept_stop)
        })
        .map_err(Error::starting("spawning the acceptor thread"))?
    };
    Ok(Served::new(BackendKind::Blocking, gate, Threads { shared, acceptor, accept_stop }))
}

impl Running for Threads {
    fn take_down(self) {
        // The listener closes when the acceptor returns; no thread is
        // started after that.
        self.accept_stop.wake().expect("writing to an eventfd cannot fail");
        self.acceptor.join();
        // Every parked thread is interrupted until it has seen the stop; each
        // then closes or drains, bounded by the grace. Join them all.
        self.shared.threads.wake_all(self.shared.wake_signal);
        self.shared.threads.join_all();
    }
}

/// Accepts until `stop` fires, giving each admitted connection a thread.
fn accept_loop(shared: &Arc<Shared>, listener: Socket, stop: &Waker) {
    let _alive = shared.gate.registry().thread_guard();
    let mut acceptor = Acceptor::default();
    loop {
        let mut fds =
            [sys::pollfd(stop.raw(), libc::POLLIN), sys::pollfd(listener.as_raw_fd(), libc::POLLIN)];
        // While backing off, the listener is left out of the poll set.
        let watched = if acceptor.listening() { 2 } else { 1 };
        if let Err(e) = sys::poll(&mut fds[..watched], driver::until(acceptor.wake_at(), Instant::now())) {
            gate::wait_failed(&e);
            continue;
        }
        if fds[0].revents != 0 {
            return; // dropping `listener` closes it
        }
        acceptor.on_timer(Instant::now());
        if acceptor.accept_all(&listener, &shared.gate, |sock, handle| admit(shared, sock, handle))
            == AcceptEnd::Closed
        {
            // Stop began: its eventfd is a moment away, and the listener
            // with connections queued would wake every poll till then.
            return;
        }
    }
}

/// Starts the thread of a connection the gate admitted. If no thread can be
/// spawned, the link inside the closure is dropped with it and closes as
/// `io_error`: nothing panics.
fn admit(shared: &Arc<Shared>, sock: Socket, handle: ConnHandle) {
    let seen = Arc::new(AtomicBool::new(false));
    // A thread blocked in send cannot read: the core reads only once every
    // answer is written, and stops the read clock meanwhile.
    let limits = Limits { read_while_writing: false, ..shared.config.limits() };
    let link = Link::new(Parked::new(sock, Arc::clone(&seen)), handle, limits);
    let name = format!("connlab-blocking-{}", link.id());
    let thread_shared = Arc::clone(shared);
    let spawned = ServerThread::spawn(name, Some(shared.config.thread_stack), move || {
        let _alive = thread_shared.gate.registry().thread_guard();
        interrupt::accept_wake(thread_shared.wake_signal);
        serve(&thread_shared.gate, link);
    });
    if let Ok(thread) = spawned {
        shared.threads.push(thread, seen);
    }
}

/// Serves one connection until it is closed. A blocking socket is always
/// "ready": the next call blocks until it is, or until the deadline.
fn serve(gate: &Gate, mut link: Link<Parked>) {
    let mut buf: Vec<u8> = Vec::with_capacity(IDLE_CHUNK);
    loop {
        let interest = match link.drive(&mut buf, gate, false) {
            Next::Done => return,
            Next::Wait(interest) => interest,
        };
        debug_assert!(interest.read || interest.write, "the driver never waits for nothing");
        if link.is_idle() {
            // Parked: room for twice the last read (0 after a timeout or a
            // wake), so a connection's usual frame fits in one read and a
            // once-busy connection gives the rest back; the driver grows it
            // to READ_CHUNK when a read fills it.
            let want = (buf.len() * 2).next_power_of_two().clamp(IDLE_CHUNK, READ_CHUNK);
            if buf.capacity() != want {
                buf = Vec::with_capacity(want);
            }
        }
        link.ready(true, true, false);
    }
}

/// A connection socket in blocking mode.
#[derive(Debug)]
struct Parked {
    /// The socket.
    sock: Socket,
    /// `SO_RCVTIMEO` as last set (`None`: unknown, not set yet or expired).
    recv_timeout: Option<Option<Duration>>,
    /// `SO_SNDTIMEO` as last set (`None`: unknown, not set yet or expired).
    send_timeout: Option<Option<Duration>>,
    /// Set once the thread has seen the stop: `stop` wakes it until then.
    seen: Arc<AtomicBool>,
}

impl Parked {
    /// `sock` from `accept(2)`: blocking already (`O_NONBLOCK` is not
    /// inherited from the listener on Linux), its timeouts set on first use.
    fn new(sock: Socket, seen: Arc<AtomicBool>) -> Self {
        Parked { sock, recv_timeout: None, send_timeout: None, seen }
    }
}

/// What is left until `deadline` as a socket timeout: `None` blocks without
/// limit; never zero, which would mean the same.
fn timeout_until(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|at| at.saturating_duration_since(Instant::now()).max(Duration::from_micros(1)))
}

/// Whether a socket timeout as set (`have`) can stay for a call that must
/// end within `want`: it must not end later (beyond the slack); ending
/// earlier is a spurious wake-up, after which it is set afresh. So a steady
/// connection whose deadline moves back and forth sets it rarely.
fn keeps(have: Option<Option<Duration>>, want: Option<Duration>) -> bool {
    match (have, want) {
        (None, _) | (Some(None), Some(_)) => false,
        (Some(_), None) => true,
        (Some(Some(have)), Some(want)) => have <= want + TIMEOUT_SLACK,
    }
}

/// A call's result; a timeout (WouldBlock) leaves the timeout unknown, so the
/// next call sets what its deadline then leaves.
fn expired(result: io::Result<usize>, timeout: &mut Option<Option<Duration>>) -> io::Result<usize> {
    if result.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
        *timeout = None;
    }
    result
}

impl Io for Parked {
    const MAY_BLOCK: bool = true;

    /// A blocking send cut short by its timeout returns what it wrote without
    /// saying when it last made progress, and the core counts the write
    /// clock from its return. So it waits a quarter of what the deadline
    /// leaves (all of it once that is short): the progress it reports is
    /// late by that much at most, well inside the write timeout's bound.
    fn send(&mut self, data: &[u8], deadline: Option<Instant>) -> io::Result<usize> {
        let want = timeout_until(deadline).map(|left| if left > SEND_SPLIT { left / 4 } else { left });
        if !keeps(self.send_timeout, want) {
            self.sock.set_write_timeout(want)?;
            self.send_timeout = Some(want);
        }
        expired(sys::send(self.sock.as_raw_fd(), data, 0), &mut self.send_timeout)
    }

    fn recv(&mut self, buf: &mut Vec<u8>, deadline: Option<Instant>) -> io::Result<usize> {
        let want = timeout_until(deadline);
        if !keeps(self.recv_timeout, want) {
            self.sock.set_read_timeout(want)?;
            self.recv_timeout = Some(want);
        }
        expired(sys::recv_into(self.sock.as_raw_fd(), buf, 0), &mut self.recv_timeout)
    }

    fn stop_seen(&mut self) {
        self.seen.store(true, Ordering::Release);
    }
}

impl AsFd for Parked {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

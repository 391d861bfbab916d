//! `uring`: one thread, completion-based I/O through io_uring (the tokio-rs
//! `io-uring` crate).
//!
//! The readiness loops wait to be told a socket is ready and then make the
//! call; this loop hands the kernel the calls themselves and reaps their
//! results: one multishot accept on the listener, and per connection a
//! receive into a buffer the kernel picks from a provided-buffer ring when
//! data arrives (so an idle connection holds none) and a send from the
//! connection's own buffer. One `io_uring_enter` submits a batch's calls and
//! waits for the next results, bounded by the earliest deadline of the
//! driver's `Timers`; the ring runs its completions only in that call
//! (`DEFER_TASKRUN`), so nothing completes behind the loop's back.
//!
//! The driver is the one every backend uses: a connection's socket is a
//! `Ring`, whose `recv` and `send` return the result of the call the kernel
//! completed and otherwise "would block", leaving the loop to submit the next
//! call. A connection closed with a call in flight keeps its slot and its
//! send buffer until the cancelled call's completion arrives.
//!
//! The multishot accept takes connections off the queue in the kernel,
//! outside the gate's lock, so stop first cancels it and waits for its last
//! completion (`Running::end_admission`), and only then closes the gate:
//! nothing is taken from the queue after admission ends, as with the others.
//!
//! Needs Linux 6.1 (single issuer, deferred task running; multishot accept
//! and buffer rings came in 5.19). Where io_uring cannot be used, starting
//! fails with [`Error::Unavailable`] saying why ([`unavailable`]).

use std::cell::{Cell, RefCell};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};
use slab::Slab;
use socket2::Socket;

use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Io, Link, Next, Timers, READ_CHUNK};
use crate::gate::{self, Accepted, Acceptor, Gate};
use crate::kind::BackendKind;
use crate::registry::ConnHandle;
use crate::server::{Running, Served};
use crate::shutdown::ServerThread;
use crate::sys::Waker;

/// Submission queue entries (the completion queue has twice as many; the
/// kernel keeps overflow rather than dropping it).
const ENTRIES: u32 = 1024;
/// Provided receive buffers, and the size of each.
const BUFFERS: u16 = 512;
const BUFFER_SIZE: usize = 16 << 10;
/// The buffer group of the provided-buffer ring.
const GROUP: u16 = 0;

/// `user_data` of the calls that are not a connection's: the stop eventfd's
/// poll, the end-of-admission eventfd's poll, the accept and its cancel.
const STOP: u64 = u64::MAX;
const ADMISSION: u64 = u64::MAX - 1;
const ACCEPT: u64 = u64::MAX - 2;
const CANCEL_ACCEPT: u64 = u64::MAX - 3;
/// A connection's calls: `slot << 2 | op`.
const RECV: u64 = 0;
const SEND: u64 = 1;
const CANCEL: u64 = 2;

/// Starts the loop on `listener`, or fails with [`Error::Unavailable`].
///
/// The ring is set up by the loop thread itself: the kernel counts the
/// thread that creates a ring among its users, and when the ring goes it
/// interrupts every such thread's blocking call (task work with a signal
/// notification), which would be the caller's, at any later time.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<Thread>, Error> {
    let stop = Waker::new().map_err(Error::starting("creating the stop eventfd"))?;
    let admission = Waker::new().map_err(Error::starting("creating the admission eventfd"))?;
    let (done, accepted_all) = crossbeam_channel::bounded(1);
    let (set_up, ready) = crossbeam_channel::bounded(1);
    let (limits, fds, loop_gate) = (config.limits(), (stop.raw(), admission.raw()), Arc::clone(&gate));
    let run = move || match Kernel::new() {
        Err(reason) => {
            let _ = set_up.send(Err(reason));
        }
        Ok(kernel) => {
            let _ = set_up.send(Ok(()));
            let setup =
                Setup { kernel, listener, gate: loop_gate, limits, stop: fds.0, admission: fds.1, done };
            setup.run();
        }
    };
    let thread = ServerThread::spawn(format!("connlab-{}", BackendKind::Uring), None, run)
        .map_err(Error::starting("spawning the loop thread"))?;
    match ready.recv() {
        Ok(Ok(())) => {
            Ok(Served::new(BackendKind::Uring, gate, Thread { thread, stop, admission, accepted_all }))
        }
        Ok(Err(reason)) => {
            thread.join();
            Err(Error::Unavailable { backend: "uring", reason })
        }
        Err(_) => {
            thread.join();
            Err(Error::Unavailable {
                backend: "uring",
                reason: "the loop thread ended while setting up".into(),
            })
        }
    }
}

/// Why the `uring` backend cannot run here, if it cannot: sets up (and drops)
/// a ring as starting would, in a thread of its own (see `start`).
pub fn unavailable() -> Option<String> {
    std::thread::spawn(|| Kernel::new().err())
        .join()
        .unwrap_or_else(|_| Some("setting up a ring panicked".into()))
}

/// The running loop: its thread and the two eventfds that reach it.
#[derive(Debug)]
pub(crate) struct Thread {
    /// The loop.
    thread: ServerThread,
    /// Readable once stop began; closed after the loop returned.
    stop: Waker,
    /// Readable once admission is to end.
    admission: Waker,
    /// Told once the accept is cancelled and its last connection admitted.
    accepted_all: Receiver<()>,
}

impl Running for Thread {
    fn end_admission(&mut self) {
        self.admission.wake().expect("writing to an eventfd cannot fail");
        // An error: the loop is gone, and its accept with it.
        let _ = self.accepted_all.recv();
    }

    fn take_down(self) {
        self.stop.wake().expect("writing to an eventfd cannot fail");
        self.thread.join();
        drop((self.stop, self.admission));
    }
}

/// A ring and its provided buffers, set up by the loop thread (a
/// single-issuer ring belongs to the thread that creates it).
struct Kernel {
    /// Dropped first: the kernel lets go of the buffers before they are freed.
    ring: IoUring,
    pool: Pool,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("free", &self.free.get()).finish_non_exhaustive()
    }
}

impl Kernel {
    /// Sets up the ring, checks the calls this loop makes, registers the
    /// buffer ring; the error is the reason in a sentence.
    fn new() -> Result<Self, String> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(ENTRIES)
            .map_err(|e| setup_failed(&e, io_uring_disabled()))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring_register(PROBE): {e}"))?;
        let codes = [
            ("accept", opcode::AcceptMulti::CODE),
            ("recv", opcode::Recv::CODE),
            ("send", opcode::Send::CODE),
            ("poll_add", opcode::PollAdd::CODE),
            ("async_cancel", opcode::AsyncCancel::CODE),
        ];
        if let Some((name, _)) = codes.iter().find(|(_, code)| !probe.is_supported(*code)) {
            return Err(format!("the kernel's io_uring lacks the {name} operation ({})", kernel_release()));
        }
        let pool = Pool::new().map_err(|e| format!("allocating the receive buffers: {e}"))?;
        // SAFETY: the ring of entries stays allocated until `pool` drops,
        // after `ring` (field order), which unregisters it.
        unsafe { ring.submitter().register_buf_ring_with_flags(pool.ring_addr(), BUFFERS, GROUP, 0) }
            .map_err(|e| {
                format!(
                    "registering a provided-buffer ring failed ({e}): it needs Linux 5.19, this is {}",
                    kernel_release()
                )
            })?;
        Ok(Kernel { ring, pool })
    }
}

/// The reason a ring could not be set up, from `io_uring_setup`'s error and
/// the `kernel.io_uring_disabled` sysctl (None where the kernel has none).
fn setup_failed(err: &io::Error, disabled: Option<u8>) -> String {
    match (err.raw_os_error(), disabled) {
        (Some(libc::ENOSYS), _) => format!(
            "io_uring_setup is not implemented (ENOSYS): the kernel ({}) has no io_uring, or a seccomp \
             filter hides it",
            kernel_release()
        ),
        (Some(libc::EPERM), Some(2)) => {
            "io_uring is disabled on this machine (kernel.io_uring_disabled = 2)".into()
        }
        (Some(libc::EPERM), Some(1)) => {
            "io_uring is limited to the group in kernel.io_uring_group (kernel.io_uring_disabled = 1), which \
             this process is not in"
                .into()
        }
        (Some(libc::EPERM), _) => {
            "io_uring_setup was refused (EPERM): a seccomp filter or the container's policy forbids io_uring"
                .into()
        }
        (Some(libc::EINVAL), _) => format!(
            "the kernel ({}) rejects a single-issuer ring with deferred task running: it needs Linux 6.1",
            kernel_release()
        ),
        _ => format!("io_uring_setup failed: {err}"),
    }
}

/// `kernel.io_uring_disabled` (0, 1 or 2), where the kernel has it.
fn io_uring_disabled() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?.trim().parse().ok()
}

/// The running kernel's release, for error messages.
fn kernel_release() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Linux {}", release.trim())
}

/// The provided-buffer ring: `BUFFERS` buffers of `BUFFER_SIZE` bytes, which
/// the kernel picks from as receives complete and the loop gives back once
/// it has copied them out.
struct Pool {
    /// The ring of entries the kernel reads (page aligned); its tail is the
    /// reserved field of the first entry.
    entries: NonNull<BufRingEntry>,
    /// The buffers, one allocation.
    memory: NonNull<u8>,
    /// The tail as last published.
    tail: Cell<u16>,
    /// Buffers in the ring, as far as the loop has seen completions.
    free: Cell<u16>,
}

impl Pool {
    fn entries_layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(BUFFERS as usize * size_of::<BufRingEntry>(), 4096)
            .expect("a valid layout")
    }

    fn memory_layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(BUFFERS as usize * BUFFER_SIZE, 4096).expect("a valid layout")
    }

    /// Allocates the ring and the buffers, every buffer given to the ring.
    fn new() -> io::Result<Self> {
        // SAFETY: the layouts have non-zero sizes.
        let entries = unsafe { std::alloc::alloc_zeroed(Self::entries_layout()) };
        let entries = NonNull::new(entries.cast::<BufRingEntry>()).ok_or(ErrorKind::OutOfMemory)?;
        // SAFETY: as above; the buffers need no initial contents.
        let memory = unsafe { std::alloc::alloc(Self::memory_layout()) };
        let Some(memory) = NonNull::new(memory) else {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries.as_ptr().cast(), Self::entries_layout()) };
            return Err(ErrorKind::OutOfMemory.into());
        };
        let pool = Pool { entries, memory, tail: Cell::new(0), free: Cell::new(0) };
        for bid in 0..BUFFERS {
            pool.give_back(bid);
        }
        Ok(pool)
    }

    fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    /// The first `len` bytes of buffer `bid`, which a completed receive filled.
    fn filled(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < BUFFERS && len <= BUFFER_SIZE, "a buffer of the pool");
        // SAFETY: in bounds (checked); the kernel wrote the bytes before it
        // posted the completion, and does not touch the buffer again until
        // `give_back` returns it to the ring.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().add(bid as usize * BUFFER_SIZE), len) }
    }

    /// Returns buffer `bid` to the ring, for the kernel to fill again.
    fn give_back(&self, bid: u16) {
        let tail = self.tail.get();
        let index = (tail & (BUFFERS - 1)) as usize;
        // SAFETY: `index` < BUFFERS; the entry at the tail is not yet the
        // kernel's (it reads entries between its head and the tail).
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        entry.set_addr(self.memory.as_ptr() as u64 + bid as u64 * BUFFER_SIZE as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
        self.free.set(self.free.get() + 1);
        // SAFETY: the tail is a u16 inside the first entry, shared with the
        // kernel, which reads it atomically; the store publishes the entry.
        let shared = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.entries.as_ptr()).cast_mut()) };
        shared.store(tail.wrapping_add(1), Ordering::Release);
    }
}

impl Pool {
    /// A completion says the kernel took a buffer.
    fn taken(&self) {
        self.free.set(self.free.get().saturating_sub(1));
    }

    /// Whether a buffer is in the ring.
    fn any_free(&self) -> bool {
        self.free.get() > 0
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `new` with these layouts; the ring
        // that used them is gone (see `Kernel`).
        unsafe {
            std::alloc::dealloc(self.entries.as_ptr().cast(), Self::entries_layout());
            std::alloc::dealloc(self.memory.as_ptr(), Self::memory_layout());
        }
    }
}

const _: () = assert!(BUFFERS.is_power_of_two() && BUFFER_SIZE <= READ_CHUNK);

/// A receive's outcome, held until the driver asks for it.
#[derive(Debug)]
enum Received {
    /// Bytes in buffer `bid`, from `offset` (a part already copied) to `len`.
    Data { bid: u16, offset: usize, len: usize },
    /// The peer's FIN.
    Eof,
    /// The receive failed.
    Failed(io::Error),
}

/// A connection's calls in flight and their results, shared by its [`Ring`]
/// and its slot (which outlives the socket until the calls are done).
#[derive(Debug, Default)]
struct Calls {
    /// A receive is in flight.
    receiving: bool,
    /// The last receive's outcome, not yet taken.
    received: Option<Received>,
    /// A send is in flight (from `outgoing`).
    sending: bool,
    /// `outgoing` is filled and waits to be submitted.
    to_send: bool,
    /// The last send's result, not yet taken.
    sent: Option<io::Result<usize>>,
    /// The bytes of the send in flight (a copy: the core's buffer may move).
    outgoing: Vec<u8>,
}

impl Calls {
    fn in_flight(&self) -> bool {
        self.receiving || self.sending
    }
}

/// A connection's socket as the driver sees it: `recv` and `send` return
/// what the kernel completed, or WouldBlock while a call is in flight.
#[derive(Debug)]
struct Ring {
    sock: Socket,
    calls: Rc<RefCell<Calls>>,
    pool: Rc<Pool>,
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Io for Ring {
    fn send(&mut self, data: &[u8], _: Option<Instant>) -> io::Result<usize> {
        let mut calls = self.calls.borrow_mut();
        if let Some(result) = calls.sent.take() {
            match result {
                // What the core has beyond the bytes sent goes out next, so a
                // partial (or outgrown) send keeps the connection writing.
                Ok(n) if n < data.len() => {
                    calls.outgoing.clear();
                    calls.outgoing.extend_from_slice(&data[n..]);
                    calls.to_send = true;
                }
                // Everything went: a large buffer is not kept while idle.
                Ok(_) if calls.outgoing.capacity() > 4 << 10 => calls.outgoing = Vec::new(),
                _ => {}
            }
            return result;
        }
        if !calls.sending && !calls.to_send {
            calls.outgoing.clear();
            calls.outgoing.extend_from_slice(data);
            calls.to_send = true;
        }
        Err(ErrorKind::WouldBlock.into())
    }

    fn recv(&mut self, buf: &mut Vec<u8>, _: Option<Instant>) -> io::Result<usize> {
        let mut calls = self.calls.borrow_mut();
        match calls.received.take() {
            None => Err(ErrorKind::WouldBlock.into()),
            Some(Received::Eof) => Ok(0),
            Some(Received::Failed(e)) => Err(e),
            Some(Received::Data { bid, offset, len }) => {
                let n = (len - offset).min(buf.capacity() - buf.len());
                buf.extend_from_slice(&self.pool.filled(bid, len)[offset..offset + n]);
                if offset + n < len {
                    calls.received = Some(Received::Data { bid, offset: offset + n, len });
                } else {
                    self.pool.give_back(bid);
                }
                Ok(n)
            }
        }
    }

    fn buffered(&self) -> usize {
        match self.calls.borrow().received {
            Some(Received::Data { offset, len, .. }) => len - offset,
            _ => 0,
        }
    }
}

/// A connection's place in the loop: its link until it closes, and its calls
/// until the last one in flight has completed.
#[derive(Debug)]
struct Slot {
    link: Option<Link<Ring>>,
    calls: Rc<RefCell<Calls>>,
}

/// What the loop thread is given.
struct Setup {
    kernel: Kernel,
    listener: Socket,
    gate: Arc<Gate>,
    limits: Limits,
    /// The eventfds' raw fds (the [`Thread`] owns them and closes them after
    /// the loop has returned).
    stop: i32,
    admission: i32,
    /// Told once the accept is cancelled and its last connection admitted.
    done: Sender<()>,
}

impl Setup {
    fn run(self) {
        let Setup { kernel: Kernel { ring, pool }, listener, gate, limits, stop, admission, done } = self;
        let _alive = gate.registry().thread_guard();
        let mut event_loop = Loop {
            ring,
            slots: Slab::new(),
            pool: Rc::new(pool),
            listener: Some(listener),
            gate,
            limits,
            acceptor: Acceptor::default(),
            accepting: true,
            accept_armed: false,
            done: Some(done),
            timers: Timers::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            ready: Vec::new(),
            starved: Vec::new(),
            stopping: false,
        };
        event_loop.push(opcode::PollAdd::new(Fd(stop), libc::POLLIN as u32).build().user_data(STOP));
        event_loop
            .push(opcode::PollAdd::new(Fd(admission), libc::POLLIN as u32).build().user_data(ADMISSION));
        event_loop.arm_accept();
        event_loop.run();
    }
}

/// The loop's state.
struct Loop {
    /// Declared first, dropped first: the kernel lets go of every buffer
    /// before the slots and the pool free them.
    ring: IoUring,
    /// Connections by slot (their calls' `user_data` is `slot << 2 | op`).
    slots: Slab<Slot>,
    /// The receive buffers.
    pool: Rc<Pool>,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// Admission and the published stop.
    gate: Arc<Gate>,
    /// Per-connection limits.
    limits: Limits,
    /// The EMFILE back-off.
    acceptor: Acceptor,
    /// Whether admission is still wanted (false once it is to end).
    accepting: bool,
    /// Whether the multishot accept is in the kernel.
    accept_armed: bool,
    /// Told once the accept is over after admission was to end.
    done: Option<Sender<()>>,
    /// The connections' deadlines.
    timers: Timers,
    /// The loop's one read buffer.
    scratch: Vec<u8>,
    /// Slots with a completion (or just accepted) to drive: reused.
    ready: Vec<usize>,
    /// Slots whose receive found no buffer: received again once one is back.
    starved: Vec<usize>,
    /// Stop began.
    stopping: bool,
}

impl Loop {
    fn run(&mut self) {
        while self.listener.is_some() || !self.slots.is_empty() || self.accept_armed {
            let wake_at = [self.timers.next(), self.acceptor.wake_at()].into_iter().flatten().min();
            self.wait(driver::until(wake_at, Instant::now()));
            self.reap();
            self.drive_ready();
            if self.acceptor.on_timer(Instant::now()) {
                self.arm_accept();
            }
            let now = Instant::now();
            while let Some((key, id, at)) = self.timers.pop_due(now) {
                let claimed = self.slots.get_mut(key).and_then(|slot| slot.link.as_mut());
                if claimed.is_some_and(|link| Timers::claim(link, id, at)) {
                    self.step(key);
                }
            }
            if self.stopping && self.listener.is_some() {
                self.close_listener();
            }
            self.drive_ready();
        }
    }

    /// Submits what is queued and waits for a completion or `timeout`.
    fn wait(&mut self, timeout: Option<std::time::Duration>) {
        let submitter = self.ring.submitter();
        let result = match timeout {
            None => submitter.submit_and_wait(1),
            Some(t) => submitter.submit_with_args(1, &SubmitArgs::new().timespec(&Timespec::from(t))),
        };
        match result {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => gate::wait_failed(&e),
        }
    }

    /// Queues `entry`; a full queue is submitted first, and what completes
    /// meanwhile reaped (so every result the kernel took is in a slot before
    /// any connection is driven).
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry's buffers live until its completion: a
            // send's in its slot's `Calls` (kept until the completion), a
            // receive's in the pool (kept until the ring is gone), polls and
            // cancels have none.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                gate::wait_failed(&e);
            }
            self.reap();
        }
    }

    /// Takes every completion: results go to their slots, and the slots to
    /// `ready`.
    fn reap(&mut self) {
        loop {
            let Some(cqe) = self.ring.completion().next() else { return };
            let (data, result, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match data {
                STOP => self.stopping = true,
                ADMISSION => self.end_admission(),
                ACCEPT => self.accepted(result, flags),
                CANCEL_ACCEPT => {}
                _ => self.completed((data >> 2) as usize, data & 3, result, flags),
            }
        }
    }

    /// A connection's call completed.
    fn completed(&mut self, key: usize, op: u64, result: i32, flags: u32) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        let open = slot.link.is_some();
        let mut calls = slot.calls.borrow_mut();
        match op {
            RECV => {
                calls.receiving = false;
                let bid = cqueue::buffer_select(flags);
                if bid.is_some() {
                    self.pool.taken();
                }
                let (received, kept) = match (result, bid) {
                    (n, Some(bid)) if n > 0 && open => {
                        (Some(Received::Data { bid, offset: 0, len: n as usize }), true)
                    }
                    (0, _) => (Some(Received::Eof), false),
                    // Out of buffers, nothing taken: receive again once one is back.
                    (n, _) if n == -libc::ENOBUFS && open => {
                        self.starved.push(key);
                        return;
                    }
                    // Data for a connection closed meanwhile.
                    (n, _) if n > 0 || !open => (None, false),
                    (n, _) => (Some(Received::Failed(io::Error::from_raw_os_error(-n))), false),
                };
                if let (Some(bid), false) = (bid, kept) {
                    self.pool.give_back(bid);
                }
                calls.received = received;
            }
            SEND => {
                calls.sending = false;
                calls.sent = Some(if result >= 0 {
                    Ok(result as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-result))
                });
            }
            _ => return,
        }
        let idle = !calls.in_flight();
        drop(calls);
        match &mut slot.link {
            Some(link) => {
                link.ready(op == RECV, op == SEND, false);
                self.ready.push(key);
            }
            // Closed, and its last call is done: the slot is free.
            None if idle => {
                self.slots.remove(key);
            }
            None => {}
        }
    }

    /// The multishot accept completed: a new connection, or its end.
    fn accepted(&mut self, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result == -libc::ECANCELED {
            // The end of admission cancelled it: not an accept error.
            self.maybe_done();
            return;
        }
        let outcome = if result >= 0 {
            // SAFETY: a successful accept's result is a new fd that nothing
            // else owns.
            let sock = unsafe { Socket::from_raw_fd(result) };
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            Ok((sock, peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))))
        } else {
            Err(io::Error::from_raw_os_error(-result))
        };
        match self.acceptor.on_result(outcome, Instant::now(), self.gate.registry()) {
            Accepted::Conn(sock, peer) => {
                if let Some(handle) = self.gate.admit(&sock, peer) {
                    // A failure means the connection is dead already; its
                    // first call reports it.
                    let _ = sock.set_tcp_nodelay(true);
                    self.serve(sock, handle);
                }
            }
            // The back-off's end re-arms it.
            Accepted::BackOff => {}
            Accepted::Again | Accepted::Empty => {}
        }
        if !self.accept_armed {
            if self.acceptor.listening() {
                self.arm_accept();
            }
            self.maybe_done();
        }
    }

    /// Submits the multishot accept if admission is wanted and it is not in
    /// the kernel already.
    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else { return };
        if !self.accepting || self.accept_armed || !self.acceptor.listening() {
            return;
        }
        let entry = opcode::AcceptMulti::new(Fd(listener.as_raw_fd())).flags(libc::SOCK_CLOEXEC).build();
        self.accept_armed = true;
        self.push(entry.user_data(ACCEPT));
    }

    /// Admission is to end: cancel the accept; once its last completion is
    /// in, tell the stopping thread.
    fn end_admission(&mut self) {
        self.accepting = false;
        if self.accept_armed {
            self.push(opcode::AsyncCancel::new(ACCEPT).build().user_data(CANCEL_ACCEPT));
        }
        self.maybe_done();
    }

    fn maybe_done(&mut self) {
        if !self.accepting && !self.accept_armed {
            if let Some(done) = self.done.take() {
                self.accept_queued();
                let _ = done.send(());
            }
        }
    }

    /// Admits what waits in the listener's queue, by `accept(2)` while the
    /// gate is still open, as the other backends' last accepts do. The
    /// cancelled accept's poll was exclusive: a connection whose wake-up it
    /// took just before the cancel is left queued with no other waiter
    /// woken, and a successor waiting exclusively too (`sharded`'s
    /// EPOLLEXCLUSIVE, `uring`'s accept) would not see it until another
    /// connection came.
    fn accept_queued(&mut self) {
        let Some(listener) = &self.listener else { return };
        let mut admitted = Vec::new();
        self.acceptor.accept_all(listener, &self.gate, |sock, handle| admitted.push((sock, handle)));
        for (sock, handle) in admitted {
            self.serve(sock, handle);
        }
    }

    /// Gives an admitted connection its slot, ready for its first receive.
    fn serve(&mut self, sock: Socket, handle: ConnHandle) {
        let calls = Rc::new(RefCell::new(Calls::default()));
        let ring = Ring { sock, calls: Rc::clone(&calls), pool: Rc::clone(&self.pool) };
        let key = self.slots.insert(Slot { link: Some(Link::new(ring, handle, self.limits)), calls });
        self.ready.push(key);
    }

    /// Stop began (the gate is closed, the accept over): close the listener
    /// and let every connection see the stop.
    fn close_listener(&mut self) {
        self.listener = None;
        if self.accept_armed {
            // Only if stop came without ending admission first.
            self.accepting = false;
            self.push(opcode::AsyncCancel::new(ACCEPT).build().user_data(CANCEL_ACCEPT));
        }
        let keys: Vec<usize> = self.slots.iter().filter(|(_, s)| s.link.is_some()).map(|(k, _)| k).collect();
        self.ready.extend(keys);
    }

    /// Drives every slot in `ready` (which may grow meanwhile), and the
    /// starved ones once a buffer is back.
    fn drive_ready(&mut self) {
        if self.pool.any_free() {
            self.ready.append(&mut self.starved);
        }
        let mut i = 0;
        while i < self.ready.len() {
            let key = self.ready[i];
            i += 1;
            self.step(key);
        }
        self.ready.clear();
    }

    /// Drives one connection, then submits what it waits for; a closed one
    /// has its calls cancelled, and its slot is freed once they are done.
    fn step(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        let Some(link) = slot.link.as_mut() else { return };
        let next = link.drive(&mut self.scratch, &self.gate, false);
        let (fd, calls) = (link.fd(), Rc::clone(&slot.calls));
        match next {
            Next::Done => {
                slot.link = None;
                let (receiving, sending) = {
                    let mut calls = calls.borrow_mut();
                    if let Some(Received::Data { bid, .. }) = calls.received.take() {
                        self.pool.give_back(bid);
                    }
                    (calls.receiving, calls.sending)
                };
                if !receiving && !sending {
                    self.slots.remove(key);
                    return;
                }
                let base = (key as u64) << 2;
                for (busy, op) in [(receiving, RECV), (sending, SEND)] {
                    if busy {
                        self.push(opcode::AsyncCancel::new(base | op).build().user_data(base | CANCEL));
                    }
                }
            }
            Next::Wait(interest) => {
                if let Some(link) = slot.link.as_mut() {
                    self.timers.schedule(key, link, interest.deadline);
                }
                let base = (key as u64) << 2;
                let (receive, send) = {
                    let mut calls = calls.borrow_mut();
                    let receive = interest.read && !calls.receiving && calls.received.is_none();
                    calls.receiving |= receive;
                    let send = calls.to_send && !calls.sending;
                    if send {
                        calls.to_send = false;
                        calls.sending = true;
                    }
                    (receive, send.then(|| (calls.outgoing.as_ptr(), calls.outgoing.len() as u32)))
                };
                if receive {
                    let recv =
                        opcode::Recv::new(Fd(fd), std::ptr::null_mut(), BUFFER_SIZE as u32).buf_group(GROUP);
                    self.push(recv.build().flags(squeue::Flags::BUFFER_SELECT).user_data(base | RECV));
                }
                if let Some((ptr, len)) = send {
                    let send = opcode::Send::new(Fd(fd), ptr, len).flags(libc::MSG_NOSIGNAL);
                    self.push(send.build().user_data(base | SEND));
                }
            }
        }
    }
}

impl Drop for Loop {
    /// Cancels whatever is still in the kernel before the buffers are freed
    /// (a loop that ends normally has nothing left; one unwinding may).
    fn drop(&mut self) {
        let _ = self.ring.submitter().register_sync_cancel(None, CancelBuilder::any());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        let (sock, _) = Socket::pair(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        Ring { sock, calls: Rc::default(), pool: Rc::new(Pool::new().unwrap()) }
    }

    /// `send` copies what the core has and asks for a send; its completion is
    /// the next call's result, and what the core queued beyond it goes next.
    #[test]
    fn a_send_completes_on_the_next_call_and_what_is_left_goes_next() {
        let mut ring = ring();
        let would_block = |r: io::Result<usize>| r.is_err_and(|e| e.kind() == ErrorKind::WouldBlock);
        assert!(would_block(ring.send(b"abc", None)));
        assert!(ring.calls.borrow().to_send && ring.calls.borrow().outgoing == b"abc");
        ring.calls.borrow_mut().to_send = false;
        ring.calls.borrow_mut().sending = true;
        assert!(would_block(ring.send(b"abcde", None)), "one send in flight at a time");
        ring.calls.borrow_mut().sending = false;
        ring.calls.borrow_mut().sent = Some(Ok(2));
        assert_eq!(ring.send(b"abcde", None).unwrap(), 2, "the short send's result");
        assert!(
            ring.calls.borrow().to_send && ring.calls.borrow().outgoing == b"cde",
            "the rest, and the growth"
        );
        // The loop submits it; it completes whole.
        ring.calls.borrow_mut().to_send = false;
        ring.calls.borrow_mut().sent = Some(Ok(3));
        assert_eq!(ring.send(b"cde", None).unwrap(), 3);
        assert!(!ring.calls.borrow().to_send, "all of it went: nothing more to send");
    }

    /// Bytes taken off the kernel's queue and not yet given to the core are
    /// unread input at the stop; a part copied out leaves the rest.
    #[test]
    fn received_bytes_not_yet_taken_count_as_buffered() {
        let mut ring = ring();
        assert_eq!(ring.buffered(), 0);
        ring.calls.borrow_mut().received = Some(Received::Data { bid: 3, offset: 0, len: 100 });
        assert_eq!(ring.buffered(), 100);
        let mut small = Vec::with_capacity(40);
        assert_eq!(ring.recv(&mut small, None).unwrap(), 40);
        assert_eq!(ring.buffered(), 60);
        let mut rest = Vec::with_capacity(READ_CHUNK);
        assert_eq!(ring.recv(&mut rest, None).unwrap(), 60);
        assert_eq!(ring.buffered(), 0);
        assert!(ring.recv(&mut rest, None).is_err_and(|e| e.kind() == ErrorKind::WouldBlock));
        ring.calls.borrow_mut().received = Some(Received::Eof);
        assert_eq!(ring.recv(&mut rest, None).unwrap(), 0, "the FIN");
    }

    #[test]
    fn each_refusal_names_its_cause() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(setup_failed(&eperm, Some(2)).contains("kernel.io_uring_disabled = 2"));
        assert!(setup_failed(&eperm, Some(1)).contains("io_uring_group"));
        assert!(setup_failed(&eperm, Some(0)).contains("seccomp"));
        assert!(setup_failed(&eperm, None).contains("seccomp"));
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(setup_failed(&enosys, None).contains("no io_uring"));
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(setup_failed(&einval, Some(0)).contains("Linux 6.1"));
    }
}

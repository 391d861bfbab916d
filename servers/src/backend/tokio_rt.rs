//! `tokio`: a tokio runtime owned by the server, an accept task, and a task
//! per connection: the reference a user would pick instead.
//!
//! A connection task is the shared driver and a wait: it drives its link
//! (the same loop as every backend, moving bytes with tokio's non-blocking
//! `try_io` so readiness stays tokio's), then waits in one `select!` for the
//! readiness the core wants, the core's deadline, or the stop signal.

use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Io, Link, Next};
use crate::gate::{AcceptEnd, Acceptor, Gate};
use crate::kind::BackendKind;
use crate::registry::ConnHandle;
use crate::server::{Running, Served};
use crate::shutdown::Tids;
use crate::sys;

/// Changes once, when stop begins: wakes every connection task to look at
/// the gate.
type StopRx = watch::Receiver<()>;

/// Held by every task the server spawns; the receiver sees the channel
/// closed once all of them are gone (the mini-redis shutdown pattern).
type Alive = mpsc::Sender<()>;

/// The runtime and the handles `stop` needs to take it down in order.
#[derive(Debug)]
pub(crate) struct Threads {
    /// The runtime: its worker threads, epoll fd and timer wheel.
    runtime: Runtime,
    /// The accept task; aborting it drops (closes) the listener.
    acceptor: JoinHandle<()>,
    /// Wakes every connection task when stop begins.
    stop: watch::Sender<()>,
    /// The server's own [`Alive`] sender, dropped by stop before waiting.
    alive: Alive,
    /// Closed once every task holding an [`Alive`] sender is gone.
    all_done: mpsc::Receiver<()>,
    /// Kernel ids of the runtime's threads, recorded as each one starts.
    tids: Tids,
}

/// What the accept task hands every connection task.
#[derive(Debug, Clone)]
struct Ctx {
    /// Admission and the published stop.
    gate: Arc<Gate>,
    /// Limits for every connection's core.
    limits: Limits,
    /// Wakes the task when stop begins.
    stop: StopRx,
    /// Keeps stop waiting until the task is gone.
    _alive: Alive,
}

/// Builds the runtime and spawns the accept task on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<Threads>, Error> {
    let tids = Tids::default();
    let runtime = {
        let (started, stopped) = (Arc::clone(gate.registry()), Arc::clone(gate.registry()));
        let tids = tids.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .thread_name("connlab-tokio")
            .on_thread_start(move || {
                started.thread_started();
                tids.record_current();
            })
            .on_thread_stop(move || stopped.thread_stopped())
            .enable_io()
            .enable_time()
            .build()
            .map_err(Error::starting("building the tokio runtime"))?
    };
    // Registering with the runtime's reactor needs its context. The listener
    // is non-blocking already, as tokio requires. It is accepted from through
    // the gate's `accept_all`, like every backend's: under the gate's lock.
    let listener = {
        let _context = runtime.enter();
        // SAFETY: the AsyncFd owns the socket, so its fd stays open and
        // refers to the same file for the AsyncFd's whole life.
        unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }.map_err(io::Error::from)
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            drop(runtime); // joins its threads
            tids.wait_gone();
            return Err(Error::starting("registering the listener")(e));
        }
    };
    let (stop, stop_rx) = watch::channel(());
    let (alive, all_done) = mpsc::channel(1);
    let ctx = Ctx { gate: Arc::clone(&gate), limits: config.limits(), stop: stop_rx, _alive: alive.clone() };
    let acceptor = runtime.spawn(accept_loop(listener, ctx));
    Ok(Served::new(BackendKind::Tokio, gate, Threads { runtime, acceptor, stop, alive, all_done, tids }))
}

impl Running for Threads {
    fn take_down(self) {
        let tids = self.tids.clone();
        // `block_on` and dropping a runtime panic inside an async context; if
        // a caller stops (or drops) the server there, a plain thread waits.
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.wind_down()).join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        } else {
            self.wind_down();
        }
        tids.wait_gone();
    }
}

impl Threads {
    /// Wakes every task, closes the listener, waits until every connection
    /// task is gone (by the end of the grace), then drops the runtime, which
    /// joins its threads and closes its epoll fd and eventfd.
    fn wind_down(self) {
        let Threads { runtime, acceptor, stop, alive, mut all_done, tids: _ } = self;
        stop.send_replace(());
        // Aborting the accept task drops its future, and with it the listener.
        acceptor.abort();
        let _ = runtime.block_on(acceptor);
        drop(alive);
        runtime.block_on(all_done.recv());
        drop(runtime);
    }
}

/// Accepts until aborted or admission ends, spawning a task per admitted
/// connection.
async fn accept_loop(listener: AsyncFd<Socket>, ctx: Ctx) {
    let mut acceptor = Acceptor::default();
    loop {
        let Ok(mut ready) = listener.readable().await else { return };
        match acceptor.accept_all(listener.get_ref(), &ctx.gate, |sock, handle| admit(&ctx, sock, handle)) {
            AcceptEnd::Empty => ready.clear_ready(),
            AcceptEnd::BackOff => {
                // The readiness stays set: once the back-off ends, the queue
                // is accepted from at once, without waiting for an event.
                drop(ready);
                if let Some(until) = acceptor.wake_at() {
                    tokio::time::sleep_until(until.into()).await;
                }
                acceptor.on_timer(Instant::now());
            }
            AcceptEnd::Closed => return, // stop began; dropping the listener closes it
        }
    }
}

/// Spawns the task of a connection the gate admitted.
fn admit(ctx: &Ctx, sock: Socket, handle: ConnHandle) {
    if let Err(err) = sock.set_nonblocking(true) {
        return Link::new(sock, handle, ctx.limits).fail(&err);
    }
    // Registering with the runtime; on failure it has closed the socket.
    match TcpStream::from_std(sock.into()) {
        Ok(stream) => drop(tokio::spawn(serve(Link::new(stream, handle, ctx.limits), ctx.clone()))),
        Err(err) => driver::abandon(handle, ctx.limits, &err),
    }
}

/// Serves one connection until the driver has closed it: drive, then wait
/// for what the core wants, its deadline, or stop.
async fn serve(mut link: Link<TcpStream>, mut ctx: Ctx) {
    // The read buffer exists only while the connection is busy: an idle
    // connection holds no buffer at all (the core frees its own).
    let mut buf: Vec<u8> = Vec::new();
    let mut hangup = false;
    // Whether the stop sender is gone (it outlives every connection task,
    // so this only guards against waiting on a closed channel).
    let mut stop_gone = false;
    // One timer for the connection's life, re-armed only when the core's
    // deadline moves; `armed` is what it is set to.
    let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let interest = match link.drive(&mut buf, &ctx.gate, hangup) {
            Next::Done => return,
            Next::Wait(interest) => interest,
        };
        if link.is_idle() {
            buf = Vec::new();
        }
        if interest.deadline != armed {
            if let Some(at) = interest.deadline {
                sleep.as_mut().reset(at.into());
            }
            armed = interest.deadline;
        }
        // With neither read nor write wanted, readability still reports a
        // hang-up (epoll always reports EPOLLHUP and EPOLLERR).
        let wanted = match (interest.read, interest.write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
            _ => Interest::READABLE,
        };
        let stream = link.io().expect("a waiting link is open");
        hangup = tokio::select! {
            // Readiness only wakes the loop: the driver's calls find out what
            // it means (data, EOF, the socket's error).
            ready = stream.ready(wanted) => ready.is_ok_and(|r| r.is_error() || (r.is_read_closed() && r.is_write_closed())),
            () = &mut sleep, if armed.is_some() => false,
            changed = ctx.stop.changed(), if !link.stop_seen() && !stop_gone => {
                stop_gone = changed.is_err();
                false
            }
        };
        // Tokio keeps the readiness: a call it knows would block returns
        // WouldBlock without a syscall.
        link.ready(true, true, false);
    }
}

/// Moves bytes through tokio's readiness API, so tokio's view of readiness
/// stays right.
impl Io for TcpStream {
    /// tokio's `try_io` clears write readiness on WouldBlock.
    fn send(&mut self, data: &[u8], _: Option<Instant>) -> io::Result<usize> {
        let fd = self.as_raw_fd();
        self.try_io(Interest::WRITABLE, || sys::send(fd, data, libc::MSG_DONTWAIT))
    }

    /// Like tokio's own `poll_read` (and unlike `try_read`), a short read
    /// clears the socket's read readiness: it drained the kernel's queue, so
    /// the next arrival is a new epoll edge, and the next `ready()` waits for
    /// it instead of costing a `recv` that returns WouldBlock. The clearing
    /// is tied to the readiness event the read was attempted under, so no
    /// later event is lost.
    fn recv(&mut self, buf: &mut Vec<u8>, _: Option<Instant>) -> io::Result<usize> {
        let fd = self.as_raw_fd();
        let room = buf.capacity() - buf.len();
        let mut got = 0;
        let res = self.try_io(Interest::READABLE, || {
            got = sys::recv_into(fd, buf, libc::MSG_DONTWAIT)?;
            if 0 < got && got < room {
                Err(ErrorKind::WouldBlock.into()) // clears readiness; `got` stands
            } else {
                Ok(got)
            }
        });
        match res {
            Err(e) if e.kind() == ErrorKind::WouldBlock && got > 0 => Ok(got),
            res => res,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{start, BackendKind, Config};

    /// `block_on` and dropping a runtime panic inside an async context: a
    /// server stopped or dropped there must take itself down all the same.
    #[test]
    fn stop_and_drop_inside_an_async_context() {
        let outer = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        outer.block_on(async {
            let server = start(BackendKind::Tokio, Config { workers: 1, ..Config::default() }).unwrap();
            let report = server.stop(Duration::ZERO);
            assert_eq!((report.drained, report.forced), (0, 0));
            assert_eq!(server.stats().threads, 0);
            drop(start(BackendKind::Tokio, Config { workers: 1, ..Config::default() }).unwrap());
        });
    }
}

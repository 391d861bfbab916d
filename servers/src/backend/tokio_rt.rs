//! `tokio`: a tokio runtime owned by the server, an accept task, and a task
//! per connection: the reference a user would pick instead.
//!
//! Each connection task drives the same sans-IO [`Conn`] as every other
//! backend: it waits with `TcpStream::ready` for what the core wants (read,
//! write, both), for the core's deadline (`sleep_until`) and for the stop
//! signal (a `watch` carrying the grace end), all in one `select!`, then
//! moves bytes with non-blocking `try_*` calls until the socket would block.
//! The core decides everything else.

use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{SockRef, Socket};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::driver::READ_CHUNK;
use super::{BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::conn::{Action, Conn, Limits};
use crate::registry::{ConnHandle, Registry};
use crate::shutdown::{self, StopReport};
use crate::sys;

/// The stop signal: `None` until stop begins, then the end of the grace.
type StopRx = watch::Receiver<Option<Instant>>;

/// Held by every task the server spawns; the receiver sees the channel
/// closed once all of them are gone (the mini-redis shutdown pattern).
type Alive = mpsc::Sender<()>;

/// The `tokio` backend.
#[derive(Debug)]
pub struct TokioServer {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Everything that runs; taken by the first `stop`.
    running: Mutex<Option<Running>>,
}

/// The runtime and the handles `stop` needs to take it down in order.
#[derive(Debug)]
struct Running {
    /// The runtime: its worker threads, epoll fd and timer wheel.
    runtime: Runtime,
    /// The accept task; aborting it drops (closes) the listener.
    acceptor: JoinHandle<()>,
    /// Raises the stop signal; lives until every connection task is gone.
    stop: watch::Sender<Option<Instant>>,
    /// The server's own [`Alive`] sender, dropped by stop before waiting.
    alive: Alive,
    /// Closed once every task holding an [`Alive`] sender is gone.
    all_done: mpsc::Receiver<()>,
    /// Kernel ids of the runtime's threads, recorded as each one starts.
    tids: Arc<Mutex<Vec<libc::pid_t>>>,
}

/// What the accept task needs to admit connections.
#[derive(Debug)]
struct Acceptor {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Limits for every connection's core.
    limits: Limits,
    /// Cloned into every connection task.
    stop: StopRx,
    /// Cloned into every connection task.
    alive: Alive,
}

impl TokioServer {
    /// Builds the runtime and spawns the accept task on `listener`.
    pub(super) fn start(config: Config, listener: Socket, registry: Arc<Registry>) -> Result<Self, Error> {
        let tids = Arc::new(Mutex::new(Vec::new()));
        let runtime = {
            let (started, stopped) = (Arc::clone(&registry), Arc::clone(&registry));
            let tids = Arc::clone(&tids);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.workers)
                .thread_name("connlab-tokio")
                .on_thread_start(move || {
                    started.thread_started();
                    lock(&tids).push(sys::gettid());
                })
                .on_thread_stop(move || stopped.thread_stopped())
                .enable_io()
                .enable_time()
                .build()
                .map_err(super::start_error("building the tokio runtime"))?
        };
        // Registering with the runtime's reactor needs its context. The
        // listener is non-blocking already, as tokio requires.
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener.into())
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                drop(runtime); // joins its threads
                wait_threads_gone(&tids);
                return Err(super::start_error("registering the listener")(e));
            }
        };
        let (stop, stop_rx) = watch::channel(None);
        let (alive, all_done) = mpsc::channel(1);
        let acceptor = Acceptor {
            registry: Arc::clone(&registry),
            limits: config.limits(),
            stop: stop_rx,
            alive: alive.clone(),
        };
        let acceptor = runtime.spawn(accept_loop(listener, acceptor));
        let running = Running { runtime, acceptor, stop, alive, all_done, tids };
        Ok(TokioServer { registry, running: Mutex::new(Some(running)) })
    }
}

impl Server for TokioServer {
    fn kind(&self) -> BackendKind {
        BackendKind::Tokio
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn stop(&self, grace: Duration) -> StopReport {
        let started = Instant::now();
        let Some(running) = lock(&self.running).take() else { return StopReport::default() };
        let tids = Arc::clone(&running.tids);
        let take_down = || running.take_down(&self.registry, shutdown::grace_end(started, grace));
        // `block_on` and dropping a runtime panic inside an async context; if
        // a caller stops (or drops) the server there, a plain thread waits.
        let (active, forced_before) = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(take_down).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        } else {
            take_down()
        };
        wait_threads_gone(&tids);
        let forced = self.registry.forced() - forced_before;
        StopReport { drained: active - forced, forced, elapsed: started.elapsed() }
    }
}

impl Running {
    /// Steps 1–5 of stop up to the join of the runtime's threads; returns
    /// `active` and `forced` as they were when the listener was closed.
    fn take_down(self, registry: &Registry, grace_end: Instant) -> (u64, u64) {
        let Running { runtime, acceptor, stop, alive, mut all_done, tids: _ } = self;
        // 1. Aborting the accept task drops its future, and with it the
        //    listener; once the join completes no connection can be added,
        //    so `active` is the number to drain. (Admitting is synchronous:
        //    an abort cannot cut one in half.)
        acceptor.abort();
        let _ = runtime.block_on(acceptor);
        let snapshot = (registry.active(), registry.forced());
        // 2–4. Every connection task tells its core: idle ones close at once,
        //    busy ones drain, the rest abort when the grace ends.
        stop.send_replace(Some(grace_end));
        // 5. Wait for every task (they are gone by the end of the grace),
        //    then shut the runtime down: dropping it joins its threads and
        //    closes its epoll fd and eventfd.
        drop(alive);
        runtime.block_on(all_done.recv());
        drop(runtime);
        drop(stop);
        snapshot
    }
}

impl Drop for TokioServer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// Waits until the runtime's threads, joined already, have left
/// `/proc/self/task` too, so thread counts read after stop are exact.
fn wait_threads_gone(tids: &Mutex<Vec<libc::pid_t>>) {
    for tid in std::mem::take(&mut *lock(tids)) {
        shutdown::wait_gone(tid);
    }
}

/// Locks a mutex, ignoring poisoning (every critical section here is a push
/// or a take).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts until aborted, spawning a task per connection.
async fn accept_loop(listener: TcpListener, ctx: Acceptor) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => admit(&ctx, stream, peer),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(e) => {
                // EMFILE/ENFILE (or another resource error): ignore the
                // listener for a while. Afterwards `accept()` calls accept(2)
                // at once, without waiting for an epoll event: tokio clears a
                // socket's readiness only on WouldBlock, which this error is
                // not, so connections queued meanwhile are taken until the
                // queue is empty (edge-triggered epoll would not report them).
                ctx.registry.accept_error(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Registers a connection and spawns its task, or rejects it.
fn admit(ctx: &Acceptor, stream: TcpStream, peer: SocketAddr) {
    // A failure here means the connection is already dead; the first read
    // or write reports it as the connection's error.
    let _ = stream.set_nodelay(true);
    let Some(mut handle) = ctx.registry.register(peer) else {
        return; // over max_connections: dropped, closed without reading
    };
    let conn = Conn::new(ctx.limits, Instant::now(), &mut handle);
    tokio::spawn(serve(stream, conn, handle, ctx.stop.clone(), ctx.alive.clone()));
}

/// Serves one connection until the core closes it, closes the socket as
/// the core decided, then unregisters it.
async fn serve(stream: TcpStream, conn: Conn, handle: ConnHandle, stop: StopRx, _alive: Alive) {
    let mut open = Open { stream: Some(stream), conn, handle: Some(handle) };
    if let Open { stream: Some(stream), conn, handle: Some(handle) } = &mut open {
        drive(stream, conn, handle, stop).await;
    }
    open.close();
}

/// A connection task's socket, core and registry entry. Dropped while still
/// open (the task unwinding, or a runtime dropped with the task unfinished)
/// it still closes the socket and leaves the registry, as `io_error`: no
/// phantom remains.
#[derive(Debug)]
struct Open {
    /// The socket; `None` once closed.
    stream: Option<TcpStream>,
    /// The sans-IO core.
    conn: Conn,
    /// The registry entry; `None` once unregistered (after the close).
    handle: Option<ConnHandle>,
}

impl Open {
    /// Closes the socket as the core decided (abortively: `SO_LINGER` 0, so
    /// close() sends an RST), then unregisters the connection.
    fn close(&mut self) {
        if let Some(stream) = self.stream.take() {
            if self.conn.action() == Action::Abort {
                let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
            drop(stream); // deregisters from epoll, then closes the fd
        }
        if let Some(handle) = self.handle.take() {
            handle.unregister(&self.conn);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.as_mut() {
            let err = io::Error::other("connection dropped by its backend");
            self.conn.on_error(&err, Instant::now(), handle);
            self.close();
        }
    }
}

/// Moves bytes as the core says until it decides to close ([`Conn::action`]
/// is then [`Action::Close`] or [`Action::Abort`]).
async fn drive(stream: &TcpStream, conn: &mut Conn, handle: &mut ConnHandle, mut stop: StopRx) {
    let fd = stream.as_raw_fd();
    // The read buffer exists only while the connection is busy: an idle
    // connection holds no buffer at all (the core frees its own).
    let mut buf: Vec<u8> = Vec::new();
    let mut stop_seen = false;
    // Whether the stop sender is gone (it outlives every connection task,
    // so this is only a guard against waiting on a closed channel).
    let mut stop_gone = false;
    // One timer for the connection's life, re-armed only when the core's
    // deadline moves; `armed` is what it is set to.
    let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !stop_seen {
            if let Some(grace_end) = *stop.borrow() {
                stop_seen = true;
                let rx_empty = sys::fionread(fd).map_or(true, |n| n == 0);
                conn.on_stop(now, grace_end, rx_empty, handle);
            }
        }
        if conn.deadline().is_some_and(|at| at <= now) {
            conn.on_timer(now, handle);
        }
        match conn.action() {
            Action::Continue => {}
            Action::ShutdownWrite => {
                // Through the socket itself, not AsyncWriteExt::shutdown: the
                // core wants exactly shutdown(SHUT_WR). An error means the
                // peer is gone; the linger ends it.
                let _ = SockRef::from(stream).shutdown(Shutdown::Write);
                conn.on_shutdown_write(now);
                continue;
            }
            Action::Close | Action::Abort => return,
        }
        let mut progressed = false;
        if conn.wants_write() {
            // tokio's try_write is mio's `(&TcpStream)::write`, which is
            // std's `TcpStream::write`: on Linux `send(fd, .., MSG_NOSIGNAL)`,
            // so a write to a reset peer returns EPIPE and never raises SIGPIPE.
            match stream.try_write(conn.pending()) {
                Ok(0) => {
                    progressed = true;
                    conn.on_error(&io::Error::from(ErrorKind::WriteZero), now, handle);
                }
                Ok(n) => {
                    progressed = true;
                    conn.on_written(n, now, handle);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => progressed = true,
                Err(e) => {
                    progressed = true;
                    conn.on_error(&e, now, handle);
                }
            }
        }
        if conn.wants_read() {
            if buf.capacity() < READ_CHUNK {
                buf.reserve_exact(READ_CHUNK);
            }
            buf.clear();
            match read(stream, &mut buf) {
                Ok(0) => {
                    progressed = true;
                    conn.on_eof(now, handle);
                }
                Ok(_) => {
                    progressed = true;
                    conn.on_read(&buf, now, handle);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => progressed = true,
                Err(e) => {
                    progressed = true;
                    conn.on_error(&e, now, handle);
                }
            }
        }
        if progressed {
            continue;
        }
        // Would block: wait for what the core wants, its deadline, or stop.
        if conn.is_idle() {
            buf = Vec::new();
        }
        let interest = match (conn.wants_read(), conn.wants_write()) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let deadline = conn.deadline();
        if deadline != armed {
            if let Some(at) = deadline {
                sleep.as_mut().reset(at.into());
            }
            armed = deadline;
        }
        tokio::select! {
            // Readiness only wakes the loop: the try_* calls above find out
            // what it means (data, EOF, the socket's error).
            _ = stream.ready(interest.unwrap_or(Interest::READABLE)), if interest.is_some() => {}
            () = &mut sleep, if deadline.is_some() => {}
            changed = stop.changed(), if !stop_seen && !stop_gone => stop_gone = changed.is_err(),
            else => {
                // Nothing to wait for: the core would never be woken again.
                let err = io::Error::other("connection has nothing to wait for");
                conn.on_error(&err, Instant::now(), handle);
            }
        }
    }
}

/// Reads once into the spare capacity of `buf`.
///
/// Like tokio's own `poll_read` (and unlike `try_read`), a short read clears
/// the socket's read readiness: it drained the kernel's queue, so the next
/// arrival is a new epoll edge, and the next `ready()` waits for it instead
/// of costing a `recv` that returns WouldBlock. The clearing is tied to the
/// readiness event the read was attempted under, so no later event is lost.
fn read(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    let res = stream.try_io(Interest::READABLE, || {
        got = sys::recv_into(fd, buf)?;
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

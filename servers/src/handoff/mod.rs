//! Zero-downtime handoff of the listening socket between two servers,
//! possibly of different backends and in different processes
//! (docs/DESIGN.md §4b).
//!
//! The incumbent opens a [`Control`] socket (a Unix stream socket at a
//! path). A successor calls [`take_over`]: it receives the listening socket
//! through `SCM_RIGHTS`, starts accepting on it, and only then tells the
//! incumbent to stop accepting; the incumbent then drains its own
//! connections as `stop` does. The listening socket is never closed in
//! between — both hold it while both may accept — so the kernel's accept
//! queue lives on and what is queued at the switch is served by one of the
//! two. [`proto`] is the framed, versioned protocol, sans IO.
//!
//! `SCM_RIGHTS` goes through rustix's `sendmsg`/`recvmsg`: maintained (the
//! Bytecode Alliance's), with typed ancillary buffers and `OwnedFd`s, so no
//! unsafe code is needed here; nix would do as well but brings a second
//! wrapper of everything libc already gives this crate, and sendfd covers
//! only the fd half.

pub mod proto;

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use socket2::Socket;

use crate::backend;
use crate::config::{Config, Error};
use crate::kind::BackendKind;
use crate::server::Server;
use crate::shutdown::StopReport;
use crate::sys::{self, Waker};
use proto::{Decoder, Frame, Incumbent, Kind, Step};

/// How the incumbent's control behaves.
#[derive(Debug, Clone, Copy)]
pub struct ControlOptions {
    /// The longest a successor may take to send its next frame; a session
    /// that stalls longer is closed.
    pub deadline: Duration,
    /// The grace of the drain that follows a handoff (as `stop`'s).
    pub grace: Duration,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions { deadline: Duration::from_secs(5), grace: Duration::from_secs(1) }
    }
}

/// What the incumbent's control did, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session was closed for `reason`; the server goes on serving.
    Rejected {
        /// Why, in words.
        reason: String,
    },
    /// The listener was handed off and this server has drained.
    HandedOff {
        /// The session's handoff id.
        id: u64,
        /// The successor's pid, from its hello.
        successor_pid: Option<u32>,
        /// The drain's report.
        report: StopReport,
        /// Whether the successor committed (false: it went away after the
        /// seal, and `reason` says how; the drain happened all the same).
        committed: bool,
        /// Why the session ended without a commit.
        reason: Option<String>,
    },
}

/// The control's counters.
#[derive(Debug, Clone, Default)]
pub struct ControlStats {
    /// Sessions accepted.
    pub sessions: u64,
    /// Sessions closed for a reason before the seal.
    pub rejected: u64,
    /// The latest reason a session was closed for.
    pub last_error: Option<String>,
    /// Whether the listener was handed off.
    pub handed_off: bool,
}

/// What the control thread and its owner share.
#[derive(Debug, Default)]
struct Shared {
    /// The counters, the events not yet taken, and whether the thread ended.
    state: Mutex<(ControlStats, VecDeque<Event>, bool)>,
    event: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, (ControlStats, VecDeque<Event>, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, event: Event) {
        let mut state = self.lock();
        match &event {
            Event::Rejected { reason } => {
                state.0.rejected += 1;
                state.0.last_error = Some(reason.clone());
            }
            Event::HandedOff { reason, .. } => {
                state.0.handed_off = true;
                if let Some(reason) = reason {
                    state.0.last_error = Some(reason.clone());
                }
            }
        }
        state.1.push_back(event);
        self.event.notify_all();
    }
}

/// An incumbent's control socket: a thread serving handoff sessions one at
/// a time until one hands the listener off, or until closed.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Control {
    /// Opens the control socket at `path` for `server`, which listens on
    /// `listener` (a duplicate of its listening socket, held here so it can
    /// be sent). A stale socket file at `path` (nobody accepts on it) is
    /// replaced; a live one is an error.
    pub fn open(
        path: &Path,
        server: Arc<dyn Server>,
        listener: Socket,
        options: ControlOptions,
    ) -> io::Result<Control> {
        let unix = bind_control(path)?;
        unix.set_nonblocking(true)?;
        let waker = Arc::new(Waker::new()?);
        let shared = Arc::new(Shared::default());
        let run = Run {
            path: path.to_owned(),
            unix: Some(unix),
            server,
            listener,
            options,
            waker: Arc::clone(&waker),
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new().name("connlab-control".into()).spawn(move || run.serve())?;
        Ok(Control { path: path.to_owned(), waker, thread: Some(thread), shared })
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The counters.
    pub fn stats(&self) -> ControlStats {
        self.shared.lock().0.clone()
    }

    /// The next event, waiting up to `timeout` (None: until one comes).
    pub fn next_event(&self, timeout: Option<Duration>) -> Option<Event> {
        self.events().next(timeout)
    }

    /// The control's events, to wait on without holding the control.
    pub fn events(&self) -> Events {
        Events(Arc::clone(&self.shared))
    }

    /// Closes the control: ends a session in progress (a drain already
    /// begun runs to its end first), joins the thread, removes the socket
    /// file and closes the listener duplicate.
    pub fn close(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.waker.wake();
            let _ = thread.join();
        }
    }
}

/// A control's events, in order; waiting ends when the control has closed.
#[derive(Debug, Clone)]
pub struct Events(Arc<Shared>);

impl Events {
    /// The next event, waiting up to `timeout` (None: until one comes, or
    /// until the control closes).
    pub fn next(&self, timeout: Option<Duration>) -> Option<Event> {
        let end = timeout.map(|t| Instant::now() + t);
        let mut state = self.0.lock();
        loop {
            if let Some(event) = state.1.pop_front() {
                return Some(event);
            }
            if state.2 {
                return None;
            }
            let wait = match end {
                None => Duration::from_secs(3600),
                Some(end) => end.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?,
            };
            state = self.0.event.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.close();
    }
}

/// Binds the control socket, replacing a stale file.
fn bind_control(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server's control socket is live there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
    .map_err(|e| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))
}

/// A fresh, non-zero handoff id.
fn new_id() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish().max(1)
}

/// How a session ended.
enum Outcome {
    /// Closed before the seal, for a reason: serve on, take the next one.
    Rejected(String),
    /// The control is closing.
    Closing,
    /// The listener went to the successor and this server drained.
    HandedOff,
}

/// The control thread.
struct Run {
    path: PathBuf,
    /// The control listener; dropped (and its file removed) at the seal, so
    /// a successor can open its own control at the same path.
    unix: Option<UnixListener>,
    server: Arc<dyn Server>,
    listener: Socket,
    options: ControlOptions,
    waker: Arc<Waker>,
    shared: Arc<Shared>,
}

impl Run {
    fn serve(mut self) {
        while let Some(unix) = &self.unix {
            let mut fds =
                [sys::pollfd(self.waker.raw(), libc::POLLIN), sys::pollfd(unix.as_raw_fd(), libc::POLLIN)];
            if sys::poll(&mut fds, None).is_err() {
                continue; // EINTR, or ENOMEM waited out by the next call
            }
            if fds[0].revents != 0 {
                break;
            }
            let stream = match unix.accept() {
                Ok((stream, _)) => stream,
                Err(_) => continue, // gone already, or EMFILE: the next poll says
            };
            self.shared.lock().0.sessions += 1;
            match self.session(stream) {
                Outcome::Rejected(reason) => self.shared.record(Event::Rejected { reason }),
                Outcome::Closing | Outcome::HandedOff => break,
            }
        }
        self.close_unix();
        let mut state = self.shared.lock();
        state.2 = true;
        self.shared.event.notify_all();
    }

    /// Stops taking sessions: the socket and its file go.
    fn close_unix(&mut self) {
        if self.unix.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Serves one session to its end.
    fn session(&mut self, mut stream: UnixStream) -> Outcome {
        if stream.set_nonblocking(true).is_err() {
            return Outcome::Rejected("the session socket failed".into());
        }
        let mut session = Incumbent::new(new_id());
        let mut decoder = Decoder::default();
        let mut drain: Option<JoinHandle<StopReport>> = None;
        let mut deadline = Instant::now() + self.options.deadline;
        let mut buf = [0u8; 1024];
        loop {
            // Every whole frame in, in order.
            loop {
                let frame = match decoder.decode() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return self.violation(&mut stream, &session, e.to_string(), drain),
                };
                let step = match session.on_frame(&frame) {
                    Ok(step) => step,
                    Err(v) => return self.violation(&mut stream, &session, v.0, drain),
                };
                let id = session.id();
                let sent = match step {
                    Step::Welcome => {
                        let grace = self.options.grace.as_millis() as u64;
                        send(
                            &mut stream,
                            &Frame::new(Kind::Welcome, id, grace.to_be_bytes().to_vec()),
                            None,
                            deadline,
                        )
                    }
                    Step::SendListener => {
                        let port = self.server.local_addr().port();
                        let frame = Frame::new(Kind::Listener, id, port.to_be_bytes().to_vec());
                        send(&mut stream, &frame, Some(&self.listener), deadline)
                    }
                    Step::Seal => {
                        self.close_unix();
                        match self.seal() {
                            Ok(handle) => drain = Some(handle),
                            Err(reason) => return self.violation(&mut stream, &session, reason, drain),
                        }
                        send(&mut stream, &Frame::new(Kind::Sealed, id, Vec::new()), None, deadline)
                    }
                    Step::Commit => {
                        let report = join(drain.take());
                        let body = proto::drained_body(report.drained, report.forced, report.elapsed);
                        let end = Instant::now() + self.options.deadline;
                        let _ = send(&mut stream, &Frame::new(Kind::Drained, id, body), None, end);
                        self.handed_off(&session, report, None);
                        return Outcome::HandedOff;
                    }
                };
                if let Err(e) = sent {
                    return self.violation(
                        &mut stream,
                        &session,
                        format!("writing to the successor: {e}"),
                        drain,
                    );
                }
                deadline = Instant::now() + self.options.deadline;
            }
            let mut fds =
                [sys::pollfd(self.waker.raw(), libc::POLLIN), sys::pollfd(stream.as_raw_fd(), libc::POLLIN)];
            match sys::poll(&mut fds, Some(deadline.saturating_duration_since(Instant::now()))) {
                Ok(0) if Instant::now() >= deadline => {
                    let reason = format!(
                        "the successor stalled: no frame within {} ms while waiting for {}",
                        self.options.deadline.as_millis(),
                        session.phase().waiting_for()
                    );
                    return self.violation(&mut stream, &session, reason, drain);
                }
                Ok(_) if fds[0].revents != 0 => {
                    if let Some(handle) = drain {
                        let reason = "the control closed during the handoff".to_string();
                        self.handed_off(&session, join(Some(handle)), Some(reason));
                    }
                    return Outcome::Closing;
                }
                _ => {}
            }
            match stream.read(&mut buf) {
                Ok(0) => {
                    let reason = format!(
                        "the successor hung up while this side waited for {}",
                        session.phase().waiting_for()
                    );
                    return self.violation(&mut stream, &session, reason, drain);
                }
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => {
                    return self.violation(
                        &mut stream,
                        &session,
                        format!("reading from the successor: {e}"),
                        drain,
                    )
                }
            }
        }
    }

    /// Ends admission on a drain thread (which then stops the server as
    /// `stop` does); returns once admission has ended.
    fn seal(&self) -> Result<JoinHandle<StopReport>, String> {
        let (closed, admission_ended) = mpsc::channel();
        let (server, grace) = (Arc::clone(&self.server), self.options.grace);
        let handle = std::thread::Builder::new()
            .name("connlab-drain".into())
            .spawn(move || {
                server.stop_notify(grace, true, &mut || {
                    let _ = closed.send(());
                })
            })
            .map_err(|e| format!("cannot start the drain: {e}"))?;
        // No message: the server was stopped already by its owner.
        admission_ended.recv().map_err(|_| "the server is stopping already".to_string())?;
        Ok(handle)
    }

    /// Closes the session for `reason`: tells the successor, then either
    /// serves on (before the seal) or finishes the drain (after it).
    fn violation(
        &mut self,
        stream: &mut UnixStream,
        session: &Incumbent,
        reason: String,
        drain: Option<JoinHandle<StopReport>>,
    ) -> Outcome {
        let end = Instant::now() + Duration::from_millis(100);
        let _ = send(stream, &Frame::new(Kind::Error, session.id(), reason.clone().into_bytes()), None, end);
        match drain {
            None => Outcome::Rejected(reason),
            Some(handle) => {
                self.handed_off(session, join(Some(handle)), Some(reason));
                Outcome::HandedOff
            }
        }
    }

    fn handed_off(&self, session: &Incumbent, report: StopReport, reason: Option<String>) {
        self.shared.record(Event::HandedOff {
            id: session.id(),
            successor_pid: session.successor_pid(),
            report,
            committed: reason.is_none(),
            reason,
        });
    }
}

/// The drain's report (zeros if the drain thread panicked).
fn join(handle: Option<JoinHandle<StopReport>>) -> StopReport {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// Writes `frame` (with `fd` attached to its first byte) on a non-blocking
/// stream by `deadline`.
fn send(stream: &mut UnixStream, frame: &Frame, fd: Option<&Socket>, deadline: Instant) -> io::Result<()> {
    let bytes = frame.encode();
    let mut sent = 0;
    while sent < bytes.len() {
        let result = match (fd, sent) {
            (Some(fd), 0) => {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut cmsg = SendAncillaryBuffer::new(&mut space);
                let fds = [fd.as_fd()];
                cmsg.push(SendAncillaryMessage::ScmRights(&fds));
                sendmsg(&*stream, &[IoSlice::new(&bytes)], &mut cmsg, SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            }
            _ => stream.write(&bytes[sent..]),
        };
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.checked_duration_since(Instant::now());
                let Some(left) = left else { return Err(io::ErrorKind::TimedOut.into()) };
                let _ = sys::poll(&mut [sys::pollfd(stream.as_raw_fd(), libc::POLLOUT)], Some(left));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a successor takes over.
#[derive(Debug, Clone, Copy)]
pub struct TakeOverOptions {
    /// The longest the incumbent may take to answer each step (the wait for
    /// its drain adds the grace it announced).
    pub deadline: Duration,
    /// The grace of this server's own stop if the handoff fails after it
    /// started accepting.
    pub grace: Duration,
}

impl Default for TakeOverOptions {
    fn default() -> Self {
        TakeOverOptions { deadline: Duration::from_secs(5), grace: Duration::from_secs(1) }
    }
}

/// How a take-over went.
#[derive(Debug, Clone)]
pub struct TakeOverReport {
    /// The session's handoff id.
    pub id: u64,
    /// When the take-over was asked for.
    pub requested: Instant,
    /// From the request to this server accepting on the listener.
    pub serving_after: Duration,
    /// From the request to the incumbent's seal (it accepts no more).
    pub sealed_after: Duration,
    /// The incumbent's drain, as it reported it.
    pub incumbent: Option<StopReport>,
    /// Why the incumbent's drain report did not come, if it did not.
    pub incumbent_error: Option<String>,
}

/// A server that took over a listener.
#[derive(Debug)]
pub struct TakenOver {
    /// The server, accepting on the listener.
    pub server: Box<dyn Server>,
    /// A duplicate of the listening socket, for this server's own control.
    pub listener: Socket,
    /// How it went.
    pub report: TakeOverReport,
}

/// The successor's end of a session: frames out, frames (and fds) in.
struct Peer {
    stream: UnixStream,
    decoder: Decoder,
    fds: Vec<OwnedFd>,
}

impl Peer {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.stream.write_all(&frame.encode())
    }

    /// The next frame within `timeout`; an Error frame is the incumbent's
    /// refusal, returned as an error with its reason.
    fn expect(&mut self, kind: Kind, id: u64, timeout: Duration) -> io::Result<Frame> {
        self.stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let frame = loop {
            if let Some(frame) = self
                .decoder
                .decode()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                break frame;
            }
            let mut buf = [0u8; 1024];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let got =
                recvmsg(&self.stream, &mut [IoSliceMut::new(&mut buf)], &mut cmsg, RecvFlags::CMSG_CLOEXEC);
            let got = got.map_err(io::Error::from).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no {} from the incumbent within {} ms", kind.name(), timeout.as_millis()),
                ),
                _ => e,
            })?;
            for message in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    self.fds.extend(fds);
                }
            }
            if got.bytes == 0 {
                let what = format!("the incumbent closed the session before its {}", kind.name());
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what));
            }
            self.decoder.push(&buf[..got.bytes]);
        };
        if frame.kind == Kind::Error {
            let reason = String::from_utf8_lossy(&frame.body);
            return Err(io::Error::other(format!("the incumbent refused: {reason}")));
        }
        if frame.kind != kind || (id != 0 && frame.id != id) {
            let what = format!(
                "expected {} of handoff {id:#x}, got {} of {:#x}",
                kind.name(),
                frame.kind.name(),
                frame.id
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, what));
        }
        Ok(frame)
    }
}

/// Takes the listener over from the incumbent whose control socket is at
/// `path`, and serves it as a `kind` server with `config` (whose host, port
/// and backlog are the socket's own). Returns once the incumbent has sealed
/// and reported its drain (or failed to: the report says so). Before the
/// seal any failure stops this server again and is returned: the incumbent
/// goes on serving.
pub fn take_over(
    path: &Path,
    kind: BackendKind,
    config: Config,
    options: TakeOverOptions,
) -> Result<TakenOver, Error> {
    config.validate()?;
    let requested = Instant::now();
    let fail = |context: &str| {
        let context = format!("{context} (control socket {})", path.display());
        move |source| Error::Io { field: "take_over", context, source }
    };
    let stream = UnixStream::connect(path).map_err(fail("cannot connect to the incumbent"))?;
    let mut peer = Peer { stream, decoder: Decoder::default(), fds: Vec::new() };
    let deadline = options.deadline;
    let pid = std::process::id();
    peer.send(&Frame::new(Kind::Hello, 0, pid.to_be_bytes().to_vec())).map_err(fail("saying hello"))?;
    let welcome = peer.expect(Kind::Welcome, 0, deadline).map_err(fail("waiting for the welcome"))?;
    let id = welcome.id;
    let incumbent_grace = Duration::from_millis(welcome.word(0).unwrap_or(0));
    peer.send(&Frame::new(Kind::Prepare, id, Vec::new())).map_err(fail("asking for the listener"))?;
    peer.expect(Kind::Listener, id, deadline).map_err(fail("waiting for the listener"))?;
    let refuse = |peer: &mut Peer, why: &str| {
        let _ = peer.send(&Frame::new(Kind::Error, id, why.as_bytes().to_vec()));
    };
    let Some(fd) = peer.fds.pop() else {
        refuse(&mut peer, "the listener frame came without a socket");
        let none = io::Error::new(io::ErrorKind::InvalidData, "the listener frame came without a socket");
        return Err(fail("receiving the listener")(none));
    };
    peer.fds.clear(); // anything else sent along is closed
    let listener = Socket::from(fd);
    let duplicate = listener.try_clone().map_err(fail("duplicating the listener"));
    let started = duplicate.and_then(|dup| Ok((backend::start_on(kind, config, listener)?, dup)));
    let (server, duplicate) = match started {
        Ok(both) => both,
        Err(e) => {
            refuse(&mut peer, &format!("the successor could not start: {e}"));
            return Err(e);
        }
    };
    let serving_after = requested.elapsed();
    let sealed = peer
        .send(&Frame::new(Kind::Seal, id, Vec::new()))
        .and_then(|()| peer.expect(Kind::Sealed, id, deadline))
        .map_err(fail("waiting for the seal"));
    if let Err(e) = sealed {
        server.stop(options.grace);
        return Err(e);
    }
    let sealed_after = requested.elapsed();
    let drained = peer
        .send(&Frame::new(Kind::Commit, id, Vec::new()))
        .and_then(|()| peer.expect(Kind::Drained, id, incumbent_grace + deadline));
    let (incumbent, incumbent_error) = match drained {
        Ok(frame) => {
            let (drained, forced) = (frame.word(0).unwrap_or(0), frame.word(1).unwrap_or(0));
            let elapsed = Duration::from_micros(frame.word(2).unwrap_or(0));
            (Some(StopReport { drained, forced, elapsed }), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let report = TakeOverReport { id, requested, serving_after, sealed_after, incumbent, incumbent_error };
    Ok(TakenOver { server, listener: duplicate, report })
}

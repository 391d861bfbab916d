//! The listener handoff: each protocol violation closes the session with its
//! reason while the incumbent serves on; a successor that dies holding the
//! socket changes nothing; and every ordered pair of backends hands off
//! under load with no connection refused, reset or short of an answer.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connlab_servers::handoff::proto::{Decoder, Frame, Kind};
use connlab_servers::handoff::{take_over, Control, ControlOptions, Event, TakeOverOptions};
use connlab_servers::{listen, start_on, BackendKind, Config, Server};
use util::*;

/// One test at a time: the fd checks count this process's fds.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh control socket path in the temp directory.
fn control_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("connlab-test-{}-{tag}-{n}.sock", std::process::id()))
}

/// An incumbent of `kind` with a control at a fresh path.
struct Incumbent {
    server: Arc<dyn Server>,
    control: Control,
    path: PathBuf,
}

fn incumbent(kind: BackendKind, deadline: Duration) -> Incumbent {
    let config = Config::default();
    let listener = listen(&config).expect("listen");
    let duplicate = listener.try_clone().expect("dup");
    let server: Arc<dyn Server> = start_on(kind, config, listener).expect("start").into();
    let path = control_path(kind.name());
    let options = ControlOptions { deadline, grace: Duration::from_secs(2) };
    let control = Control::open(&path, Arc::clone(&server), duplicate, options).expect("control");
    Incumbent { server, control, path }
}

/// One echo through a fresh connection.
fn serves(server: &dyn Server) -> bool {
    let mut c = connect(server);
    send_frame(&mut c, b"still here");
    read_frame(&mut c).is_ok_and(|f| f == b"still here")
}

/// A raw session: frames out, frames in.
struct Session {
    stream: UnixStream,
    decoder: Decoder,
}

impl Session {
    fn open(inc: &Incumbent) -> Session {
        let stream = UnixStream::connect(&inc.path).expect("connect control");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Session { stream, decoder: Decoder::default() }
    }

    fn send(&mut self, kind: Kind, id: u64, body: &[u8]) {
        self.stream.write_all(&Frame::new(kind, id, body.to_vec()).encode()).unwrap();
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame, or None at EOF.
    fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.decode().expect("a valid frame") {
                return Some(frame);
            }
            let mut buf = [0; 1024];
            let n = self.stream.read(&mut buf).expect("read");
            if n == 0 {
                return None;
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Hello, welcome: the session's id.
    fn hello(&mut self) -> u64 {
        self.send(Kind::Hello, 0, &std::process::id().to_be_bytes());
        let welcome = self.recv().expect("welcome");
        assert_eq!(welcome.kind, Kind::Welcome);
        welcome.id
    }

    /// The session ends with an Error frame whose reason contains `why`, then EOF.
    fn closed_with(&mut self, why: &str) -> String {
        let error = self.recv().expect("an error frame");
        assert_eq!(error.kind, Kind::Error, "{error:?}");
        let reason = String::from_utf8(error.body).unwrap();
        assert!(reason.contains(why), "reason {reason:?} does not say {why:?}");
        assert!(self.recv().is_none(), "the session stays open");
        reason
    }
}

/// The incumbent recorded `reason`, counts it, and still serves its port
/// and its control.
fn rejected_and_serving(inc: &Incumbent, reason: &str) {
    match inc.control.next_event(Some(Duration::from_secs(2))) {
        Some(Event::Rejected { reason: got }) => assert_eq!(got, reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let stats = inc.control.stats();
    assert_eq!((stats.rejected, stats.handed_off), (1, false), "{stats:?}");
    assert_eq!(stats.last_error.as_deref(), Some(reason));
    assert!(serves(&*inc.server), "the incumbent stopped serving");
    let mut again = Session::open(inc);
    again.hello();
}

fn violation(what: &str, deadline: Duration, script: impl FnOnce(&mut Session) -> &'static str) {
    let _guard = serial();
    let inc = incumbent(BackendKind::Epoll, deadline);
    let started = Instant::now();
    let mut session = Session::open(&inc);
    let why = script(&mut session);
    let reason = session.closed_with(why);
    rejected_and_serving(&inc, &reason);
    eprintln!("{what}: {reason} ({:?})", started.elapsed());
}

const DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn commit_before_seal_closes_the_session() {
    violation("commit before seal", DEADLINE, |s| {
        let id = s.hello();
        s.send(Kind::Prepare, id, &[]);
        assert_eq!(s.recv().unwrap().kind, Kind::Listener);
        s.send(Kind::Commit, id, &[]);
        "commit before seal"
    });
}

#[test]
fn seal_with_a_wrong_id_closes_the_session() {
    violation("seal, wrong id", DEADLINE, |s| {
        let id = s.hello();
        s.send(Kind::Prepare, id, &[]);
        assert_eq!(s.recv().unwrap().kind, Kind::Listener);
        s.send(Kind::Seal, id ^ 1, &[]);
        "seal with a wrong handoff id"
    });
}

#[test]
fn commit_with_a_wrong_id_closes_the_session() {
    violation("commit, wrong id", DEADLINE, |s| {
        let id = s.hello();
        s.send(Kind::Commit, id.wrapping_add(7), &[]);
        "commit with a wrong handoff id"
    });
}

#[test]
fn an_unknown_version_closes_the_session() {
    violation("unknown version", DEADLINE, |s| {
        s.raw(&Frame::new(Kind::Hello, 0, vec![0, 0, 0, 1]).encode_as(9));
        "unknown protocol version 9"
    });
}

#[test]
fn a_second_hello_closes_the_session() {
    violation("second hello", DEADLINE, |s| {
        s.hello();
        s.send(Kind::Hello, 0, &[0, 0, 0, 1]);
        "a second hello"
    });
}

#[test]
fn garbage_bytes_close_the_session() {
    violation("garbage", DEADLINE, |s| {
        s.raw(b"GET / HTTP/1.1\r\n\r\n");
        "garbage bytes"
    });
}

#[test]
fn a_stalled_peer_is_closed_at_the_deadline() {
    let deadline = Duration::from_millis(50);
    violation("stall", deadline, |s| {
        s.hello();
        "the successor stalled: no frame within 50 ms while waiting for prepare"
    });
}

#[test]
fn a_successor_that_dies_holding_the_socket_changes_nothing() {
    let _guard = serial();
    let inc = incumbent(BackendKind::Poll, DEADLINE);
    let fds = open_fds();
    {
        let mut s = Session::open(&inc);
        let id = s.hello();
        s.send(Kind::Prepare, id, &[]);
        // The fd arrives with the frame; closing the session without reading
        // it closes the fd in flight; reading it and dropping it likewise.
        assert_eq!(s.recv().unwrap().kind, Kind::Listener);
    }
    match inc.control.next_event(Some(Duration::from_secs(2))) {
        Some(Event::Rejected { reason }) => assert!(reason.contains("hung up"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(serves(&*inc.server));
    wait_for("the session's fds closed", || (open_fds() == fds).then_some(()));
}

/// Load on one port across a handoff: churning clients and persistent ones.
struct Load {
    stop: Arc<AtomicBool>,
    /// Persistent connections that have had their first answer.
    served: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

/// What one load thread saw.
#[derive(Debug, Default)]
struct Tally {
    connects: u64,
    refused: u64,
    resets: u64,
    /// Frames answered.
    answers: u64,
    /// An answer that was not the frame sent, or came out of order.
    wrong: u64,
    /// Persistent connections that ended by EOF with all their answers.
    drained: u64,
    /// Persistent connections still open at the end (served by nobody).
    open: u64,
}

fn load(addr: std::net::SocketAddr, churners: usize, persistent: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..churners {
        let stop = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            let mut t = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                t.connects += 1;
                let mut c = match TcpStream::connect(addr) {
                    Ok(c) => c,
                    Err(_) => {
                        t.refused += 1;
                        continue;
                    }
                };
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = c.write_all(&connlab_servers::codec::encode(b"churn"));
                match read_frame(&mut c) {
                    Ok(f) if f == b"churn" => t.answers += 1,
                    Ok(_) => t.wrong += 1,
                    Err(_) => t.resets += 1,
                }
            }
            t
        }));
    }
    for i in 0..persistent {
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        threads.push(std::thread::spawn(move || {
            let mut t = Tally { connects: 1, ..Tally::default() };
            let mut c = TcpStream::connect(addr).expect("persistent connect");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.set_nodelay(true).unwrap();
            let mut n: u64 = 0;
            // One frame in flight, then the next: every frame the server read
            // is answered before its drain closes (DESIGN.md §4).
            loop {
                if stop.load(Ordering::Relaxed) {
                    t.open = 1;
                    return t;
                }
                let payload = format!("{i}:{n}");
                if c.write_all(&connlab_servers::codec::encode(payload.as_bytes())).is_err() {
                    t.resets += 1;
                    return t;
                }
                let mut header = [0; 4];
                match c.read(&mut header[..1]) {
                    Ok(0) => {
                        // EOF at a frame boundary: the drain's close. The frame
                        // just sent was never read (lingering close).
                        t.drained = 1;
                        return t;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        t.resets += 1;
                        return t;
                    }
                }
                let answer = c.read_exact(&mut header[1..]).and_then(|()| {
                    let mut body = vec![0; u32::from_be_bytes(header) as usize];
                    c.read_exact(&mut body).map(|()| body)
                });
                match answer {
                    Ok(body) if body == payload.as_bytes() => {
                        t.answers += 1;
                        if t.answers == 1 {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => t.wrong += 1,
                    Err(_) => {
                        t.resets += 1;
                        return t;
                    }
                }
                n += 1;
            }
        }));
    }
    Load { stop, served, threads }
}

impl Load {
    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut sum = Tally::default();
        for t in self.threads {
            let t = t.join().expect("load thread");
            sum.connects += t.connects;
            sum.refused += t.refused;
            sum.resets += t.resets;
            sum.answers += t.answers;
            sum.wrong += t.wrong;
            sum.drained += t.drained;
            sum.open += t.open;
        }
        sum
    }
}

#[test]
fn every_pair_of_backends_hands_off_under_load() {
    let _guard = serial();
    let fds = open_fds();
    for from in BackendKind::ALL {
        for to in BackendKind::ALL {
            let inc = incumbent(from, DEADLINE);
            let addr = inc.server.local_addr();
            let load = load(addr, 2, 10);
            // A third party never gets the port: some socket listens on it
            // throughout.
            let binding = Arc::new(AtomicBool::new(true));
            let squatter = {
                let binding = Arc::clone(&binding);
                std::thread::spawn(move || {
                    let mut bound = 0;
                    while binding.load(Ordering::Relaxed) {
                        bound += u32::from(std::net::TcpListener::bind(addr).is_ok());
                    }
                    bound
                })
            };
            // All ten are the incumbent's: each had an answer before the handoff.
            wait_for("the persistent connections", || {
                (load.served.load(Ordering::Relaxed) == 10).then_some(())
            });
            let taken = take_over(&inc.path, to, Config::default(), TakeOverOptions::default())
                .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            let handed = inc.control.next_event(Some(Duration::from_secs(5)));
            let Some(Event::HandedOff { report, committed: true, .. }) = handed else {
                panic!("{from} -> {to}: {handed:?}");
            };
            // The successor serves the port; the incumbent has stopped.
            wait_for("the successor's first connection", || taken.server.registry().first_admitted());
            let served = taken.server.stats().frames_out;
            wait_for("the successor serving the load", || {
                (taken.server.stats().frames_out > served + 50).then_some(())
            });
            let tally = load.finish();
            binding.store(false, Ordering::Relaxed);
            assert_eq!(squatter.join().unwrap(), 0, "{from} -> {to}: a third party bound the port");
            let s = inc.server.stats();
            assert_eq!((s.active, report.forced), (0, 0), "{from} -> {to}: incumbent {s:?} {report:?}");
            // As the incumbent told it (elapsed in whole µs).
            let told = taken.report.incumbent.expect("the incumbent's report");
            assert_eq!((told.drained, told.forced), (report.drained, report.forced), "{from} -> {to}");
            assert_eq!((tally.refused, tally.resets, tally.wrong), (0, 0, 0), "{from} -> {to}: {tally:?}");
            assert_eq!(tally.drained, 10, "{from} -> {to}: every persistent connection drained: {tally:?}");
            assert!(serves(&*taken.server), "{from} -> {to}");
            eprintln!(
                "{from} -> {to}: serving after {:?}, sealed after {:?}, first accept after {:?}; {tally:?}",
                taken.report.serving_after,
                taken.report.sealed_after,
                taken.server.registry().first_admitted().map(|t| t - taken.report.requested)
            );
            let report = taken.server.stop(Duration::from_secs(1));
            assert_eq!(report.forced, 0);
            drop((inc, taken));
        }
    }
    wait_for("every fd of the 25 handoffs closed", || (open_fds() == fds).then_some(()));
}

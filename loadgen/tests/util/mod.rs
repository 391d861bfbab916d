//! Helpers for the generator's integration tests: connlab servers on port 0,
//! a misbehaving echo server of the tests' own, and polling with a deadline.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connlab_servers::{start, BackendKind, Config, Server, Stats};

/// One test at a time: they measure time and throughput on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the other tests off until dropped.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connlab server of `kind` on a free port, journal off (as for benchmarks).
pub fn server(kind: BackendKind) -> Box<dyn Server> {
    start(kind, Config { journal_capacity: 0, ..Config::default() }).expect("server starts")
}

/// Polls `f` until it returns `Some`, for up to 2 s.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the server has closed `n` connections and holds none; returns its stats.
pub fn wait_closed(server: &dyn Server, n: u64) -> Stats {
    wait_for(&format!("closed == {n}, active == 0"), || {
        let s = server.stats();
        (s.closed == n && s.active == 0).then_some(s)
    })
}

/// What the test server does to answer number `n` (counted over all its
/// connections, from 0) before sending it: nothing, flip bytes, or stall.
pub type Mischief = dyn Fn(u64, &mut Vec<u8>) + Send + Sync;

/// A thread-per-connection echo server that answers every frame in order,
/// after letting a [`Mischief`] touch it.
pub struct TestServer {
    /// Where it listens.
    pub address: SocketAddr,
    /// Asks the accept loop to end.
    stop: Arc<AtomicBool>,
    /// Answers sent so far.
    pub answers: Arc<AtomicU64>,
    /// The accept thread; it joins the connection threads before it ends.
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(mischief: Box<Mischief>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let mischief: Arc<Mischief> = Arc::from(mischief);
        let accept = {
            let (stop, answers) = (Arc::clone(&stop), Arc::clone(&answers));
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (answers, mischief) = (Arc::clone(&answers), Arc::clone(&mischief));
                    conns.push(std::thread::spawn(move || echo(stream, &answers, &*mischief)));
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        TestServer { address, stop, answers, accept: Some(accept) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so it sees the flag.
        let _ = TcpStream::connect(self.address);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Echoes frames on `stream` until EOF, letting `mischief` touch each answer.
pub fn echo(mut stream: TcpStream, answers: &AtomicU64, mischief: &Mischief) {
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = vec![0; 4];
    loop {
        frame.truncate(4);
        if stream.read_exact(&mut frame).is_err() {
            return;
        }
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        frame.resize(4 + len, 0);
        if stream.read_exact(&mut frame[4..]).is_err() {
            return;
        }
        let n = answers.fetch_add(1, Ordering::SeqCst);
        mischief(n, &mut frame);
        if stream.write_all(&frame).is_err() {
            return;
        }
    }
}

/// The kernel's count of connections dropped because an accept queue was
/// full (`TcpExt: ListenOverflows` in /proc/net/netstat).
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "ListenOverflows").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

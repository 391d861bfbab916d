//! Helpers for the proxy's integration tests: a std::net upstream (an echo
//! server, or one that hands each accepted socket to the test), clients
//! with timeouts, toxics, and polling for a condition with a deadline.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connlab_proxy::{Proxy, ProxyStats, Stream, Toxic, ToxicKind};

/// The timeout on every client and upstream socket call: a test that
/// waits longer has failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An upstream server on 127.0.0.1, port 0.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Accepted sockets, in manual mode.
    accepted: Option<mpsc::Receiver<TcpStream>>,
    /// Tells the accept thread to end at its next accept.
    stop: Arc<AtomicBool>,
    /// The accept thread.
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Echoes every byte back; on EOF, half-closes after the last byte.
    pub fn echo() -> Self {
        Self::start(false)
    }

    /// Hands every accepted socket to [`Upstream::accept`].
    pub fn manual() -> Self {
        Self::start(true)
    }

    fn start(manual: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop_in = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop_in.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                if manual {
                    let _ = tx.send(stream);
                } else {
                    std::thread::spawn(move || echo(stream));
                }
            }
        });
        Upstream { addr, accepted: manual.then_some(rx), stop, thread: Some(thread) }
    }

    /// The next socket the upstream accepted (manual mode), within 5 s.
    pub fn accept(&self) -> TcpStream {
        self.accepted
            .as_ref()
            .expect("manual upstream")
            .recv_timeout(Duration::from_secs(5))
            .expect("accepted")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Echoes until EOF (then half-closes) or an error.
fn echo(mut stream: TcpStream) {
    let mut buf = [0; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A proxy on 127.0.0.1, port 0, in front of `upstream`.
pub fn proxy(upstream: &Upstream, seed: Option<u64>) -> Proxy {
    Proxy::start("127.0.0.1:0".parse().unwrap(), upstream.addr, seed).expect("proxy starts")
}

/// A client of `proxy`, with [`IO_TIMEOUT`] on every call and no Nagle.
pub fn connect(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.local_addr()).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A toxic named `name` on `stream`, affecting every connection.
pub fn toxic(name: &str, stream: Stream, kind: ToxicKind) -> Toxic {
    Toxic { name: name.into(), kind, stream, toxicity: 1.0 }
}

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Polls `f` every 2 ms until it returns `Some`, for up to `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the proxy holds no byte and has closed every connection;
/// returns its stats then.
pub fn wait_quiet(proxy: &Proxy) -> ProxyStats {
    wait_for("no held byte and no active connection", Duration::from_secs(5), || {
        let s = proxy.stats();
        (s.active == 0 && s.upstream.bytes_held == 0 && s.downstream.bytes_held == 0).then_some(s)
    })
}

/// Reads exactly `n` bytes.
pub fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).expect("read");
    buf
}

/// Reads until EOF; an RST or a timeout is an error.
pub fn read_to_eof(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    Ok(all)
}

/// Whether nothing (no byte, no FIN, no RST) arrives on `stream` for `quiet`.
pub fn silent_for(stream: &TcpStream, quiet: Duration) -> bool {
    stream.set_read_timeout(Some(quiet)).unwrap();
    let mut byte = [0; 1];
    let silent = match (&*stream).read(&mut byte) {
        Err(e) => matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        Ok(_) => false,
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    silent
}

/// Whether `stream` has nothing to read and no FIN or RST either, right now.
pub fn nothing_pending(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0; 1];
    let pending = (&*stream).read(&mut byte);
    stream.set_nonblocking(false).unwrap();
    matches!(pending, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// `n` bytes of a pattern that shows a reordering or a lost byte.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The median of `samples`.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Open fds of this process (the directory's own fd included: it is there
/// at every count).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Threads of this process.
pub fn task_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Names of this process's threads.
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

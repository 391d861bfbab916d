//! Helpers for integration tests: start every backend on port 0, speak raw
//! framed bytes, poll for a condition with a deadline.

#![allow(dead_code)]

pub mod rec;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use connlab_servers::{codec, start, BackendKind, Config, Server, Stats};

/// A server of `kind` with the matrix's short timeouts, tweaked by `f`.
pub fn server(kind: BackendKind, f: impl FnOnce(&mut Config)) -> Box<dyn Server> {
    let mut config = Config {
        idle_timeout: Some(Duration::from_millis(500)),
        read_timeout: Some(Duration::from_millis(500)),
        write_timeout: Some(Duration::from_millis(500)),
        ..Config::default()
    };
    f(&mut config);
    start(kind, config).expect("server starts")
}

/// A client connected to `server`, with a 5 s timeout on every call.
pub fn connect(server: &dyn Server) -> TcpStream {
    let stream = TcpStream::connect(server.local_addr()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads one frame's payload.
pub fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut header = [0; codec::HEADER_LEN];
    stream.read_exact(&mut header)?;
    let mut body = vec![0; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Reads until EOF; an RST is an error.
pub fn read_to_eof(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    Ok(all)
}

/// Sends one frame.
pub fn send_frame(stream: &mut TcpStream, payload: &[u8]) {
    stream.write_all(&codec::encode(payload)).expect("send");
}

/// Half-closes the client's side.
pub fn shut_write(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).expect("shutdown");
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

/// Waits until `active == n`; returns the stats then.
pub fn wait_active(server: &dyn Server, n: u64) -> Stats {
    wait_for(&format!("active == {n}"), || {
        let s = server.stats();
        (s.active == n).then_some(s)
    })
}

/// DESIGN.md §4 conservation, which holds at quiescence.
pub fn assert_conservation(s: &Stats) {
    assert_eq!(s.accepted, s.active + s.closed, "accepted == active + closed: {s:?}");
    assert_eq!(s.closed_by.iter().sum::<u64>(), s.closed, "sum(closed_by) == closed: {s:?}");
    assert_eq!(s.by_state.iter().sum::<u64>(), s.active, "sum(by_state) == active: {s:?}");
}

/// Open fds of this process (the test binary), each with what it refers to
/// (`socket:[inode]`, `anon_inode:[eventpoll]`...), so a new fd is told apart
/// from an old one that reuses its number. The directory's own fd is left out.
pub fn open_fds() -> std::collections::BTreeSet<(String, String)> {
    let listing = format!("/proc/{}/fd", std::process::id());
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let target = std::fs::read_link(&path).ok()?.to_string_lossy().into_owned();
            let fd = path.file_name()?.to_string_lossy().into_owned();
            (target != listing).then_some((fd, target))
        })
        .collect()
}

/// Runs `test` once per backend, naming the backend if it panics.
pub fn for_each_backend(test: impl Fn(BackendKind)) {
    for kind in BackendKind::ALL {
        eprintln!("backend {kind}");
        test(kind);
    }
}

//! The loopback baseline: one connection, two threads, blocking sockets, no
//! connlab server. The calling thread sends a frame and waits for its echo;
//! an echo thread of this module answers with one write per frame. Its p50
//! round trip is what the kernel and two wake-ups cost, so a backend's
//! one-connection p50 can be read against it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use connlab_servers::codec::{self, HEADER_LEN};

use crate::payload;
use crate::report::{ErrorKind, Mode, Recorder, Report, Shape};
use crate::{setup_error, Error};

/// How long either side waits for a byte before it gives up (a bound, not a
/// pace: on loopback an answer takes microseconds).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Round trips for `warmup + duration`; those that end inside `duration`
/// after the warm-up count.
pub(crate) fn run(size: usize, duration: Duration, warmup: Duration) -> Result<Report, Error> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(setup_error("binding a loopback listener"))?;
    let address = listener.local_addr().map_err(setup_error("reading the listener's address"))?;
    // The connect completes in the listener's backlog, so the accept below
    // cannot wait: no thread is ever left blocked in accept.
    let client = TcpStream::connect(address).map_err(setup_error("connecting over loopback"))?;
    let (server, _) = listener.accept().map_err(setup_error("accepting over loopback"))?;
    drop(listener);
    for s in [&client, &server] {
        s.set_nodelay(true).map_err(setup_error("setting TCP_NODELAY"))?;
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(setup_error("setting SO_RCVTIMEO"))?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(setup_error("setting SO_SNDTIMEO"))?;
    }
    let (rec, elapsed) = std::thread::scope(|scope| {
        let echo = std::thread::Builder::new()
            .name("loadgen-echo".into())
            .spawn_scoped(scope, move || echo(server))
            .map_err(setup_error("spawning the echo thread"))?;
        // The client's socket closes when `ping` returns, which ends the echo thread.
        let measured = ping(client, size, duration, warmup);
        let _ = echo.join();
        Ok::<_, Error>(measured)
    })?;
    let shape = Shape { connections: 1, threads: 2, size, rate: None };
    Ok(Report::new(Mode::PingPong, shape, rec, elapsed))
}

/// Echoes frames until EOF or an error, each answer in one write.
fn echo(mut stream: TcpStream) {
    let mut frame = vec![0; HEADER_LEN];
    loop {
        frame.truncate(HEADER_LEN);
        if stream.read_exact(&mut frame).is_err() {
            return;
        }
        let len = u32::from_be_bytes(frame[..HEADER_LEN].try_into().expect("4 bytes")) as usize;
        frame.resize(HEADER_LEN + len, 0);
        if stream.read_exact(&mut frame[HEADER_LEN..]).is_err() || stream.write_all(&frame).is_err() {
            return;
        }
    }
}

/// Sends frames one at a time and checks each echo; returns what it counted
/// and the measured window's length. A failure counts one error and ends the run.
fn ping(mut stream: TcpStream, size: usize, duration: Duration, warmup: Duration) -> (Recorder, Duration) {
    let mut rec = Recorder::new();
    let start = Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + duration;
    let mut frame = Vec::with_capacity(HEADER_LEN + size);
    let mut answer = vec![0; HEADER_LEN + size];
    let mut seq = 0;
    let mut now = start;
    while now < window_end {
        let seed = payload::seed(0, seq);
        seq += 1;
        frame.clear();
        frame.extend_from_slice(&codec::header(size as u32));
        frame.resize(HEADER_LEN + size, 0);
        payload::fill(seed, 0, &mut frame[HEADER_LEN..]);
        let sent = Instant::now();
        if let Err(e) = stream.write_all(&frame).and_then(|()| stream.read_exact(&mut answer)) {
            rec.errors.add(match e.kind() {
                io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
                _ => ErrorKind::of(&e),
            });
            break;
        }
        now = Instant::now();
        if answer[..HEADER_LEN] != frame[..HEADER_LEN] || !payload::matches(seed, 0, &answer[HEADER_LEN..]) {
            rec.errors.add(ErrorKind::Corrupt);
            break;
        }
        if now >= window_start && now < window_end {
            rec.record(now - sent);
        }
    }
    (rec, now.saturating_duration_since(window_start))
}

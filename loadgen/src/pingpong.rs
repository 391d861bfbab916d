//! The loopback baseline: the generator's own closed-loop client — the one
//! every backend's one-connection round trip is measured with — on one
//! connection to a minimal echo thread of this module (blocking reads, one
//! write per frame), no connlab server. Its p50 round trip is what the
//! kernel, the client and two wake-ups cost, so the ratio of a backend's
//! one-connection p50 to it is the server's overhead alone.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use connlab_servers::codec::HEADER_LEN;

use crate::options::ClosedLoop;
use crate::report::{Mode, Report};
use crate::{setup_error, Error};

/// How long the echo waits for a byte before it gives up on a connection (a
/// bound, not a pace: on loopback an answer takes microseconds).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Round trips for `warmup + duration` by the closed-loop client, one frame
/// at a time on one connection; those that end inside `duration` after the
/// warm-up count. The echo runs on `echo_cpu` if given.
pub(crate) fn run(
    size: usize,
    duration: Duration,
    warmup: Duration,
    echo_cpu: Option<usize>,
) -> Result<Report, Error> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(setup_error("binding a loopback listener"))?;
    let address = listener.local_addr().map_err(setup_error("reading the listener's address"))?;
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (listener, done) = (&listener, &done);
        let (pinned, pinning) = std::sync::mpsc::sync_channel(1);
        let echo = std::thread::Builder::new()
            .name("loadgen-echo".into())
            .spawn_scoped(scope, move || {
                let result = echo_cpu.map_or(Ok(()), crate::sys::pin_current);
                let failed = result.is_err();
                let _ = pinned.send(result);
                if !failed {
                    serve(listener, done);
                }
            })
            .map_err(setup_error("spawning the echo thread"))?;
        if let Ok(Err(err)) = pinning.recv() {
            let _ = echo.join();
            return Err(setup_error("pinning the echo thread")(err));
        }
        let job = ClosedLoop {
            connections: 1,
            size,
            pipeline: 1,
            duration,
            warmup,
            threads: Some(1),
            ..ClosedLoop::new(address)
        };
        let report = job.run();
        // The echo thread is in `accept` (or about to be): one last
        // connection wakes it to see `done`.
        done.store(true, Ordering::Release);
        let _ = TcpStream::connect(address);
        let _ = echo.join();
        let mut report = report?;
        report.mode = Mode::PingPong;
        report.threads = 2;
        Ok(report)
    })
}

/// Serves the client's connections one after another (it reconnects after a
/// failure) until `done`.
fn serve(listener: &TcpListener, done: &AtomicBool) {
    for stream in listener.incoming() {
        if done.load(Ordering::Acquire) {
            return;
        }
        if let Ok(stream) = stream {
            echo(stream);
        }
    }
}

/// Echoes frames until EOF or an error, each answer in one write.
fn echo(mut stream: TcpStream) {
    let set = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    if set.is_err() {
        return;
    }
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

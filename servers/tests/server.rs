//! Integration tests of every backend over real loopback sockets.

mod util;

use std::io::Write;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use connlab_servers::{codec, BackendKind, CloseReason, State};
use util::*;

/// One test at a time: one of them counts this process's fds, which any
/// other test's sockets would disturb.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn reason_count(s: &connlab_servers::Stats, r: CloseReason) -> u64 {
    s.closed_by[r as usize]
}

#[test]
fn echo_pipeline_and_eof() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |_| {});
        let mut client = connect(&*server);
        let payloads: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().repeat(i as usize % 7)).collect();
        let stream: Vec<u8> = payloads.iter().flat_map(|p| codec::encode(p)).collect();
        client.write_all(&stream).unwrap();
        for p in &payloads {
            assert_eq!(&read_frame(&mut client).unwrap(), p);
        }
        drop(client);
        let s = wait_active(&*server, 0);
        assert_eq!((s.frames_in, s.frames_out), (200, 200));
        assert_eq!(reason_count(&s, CloseReason::Eof), 1);
        assert_conservation(&s);
        server.stop(Duration::ZERO);
    });
}

#[test]
fn journal_of_one_echo() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |_| {});
        let mut client = connect(&*server);
        let peer = client.local_addr().unwrap();
        send_frame(&mut client, b"hello");
        assert_eq!(read_frame(&mut client).unwrap(), b"hello");
        drop(client);
        wait_active(&*server, 0);
        let steps: Vec<_> =
            server.transitions(Some(peer)).into_iter().map(|t| (t.from, t.to, t.reason)).collect();
        use State::*;
        assert_eq!(
            steps,
            vec![
                (None, Connecting, None),
                (Some(Connecting), ReadingHeader, None),
                (Some(ReadingHeader), ReadingBody, None),
                (Some(ReadingBody), Writing, None),
                (Some(Writing), ReadingHeader, None),
                (Some(ReadingHeader), Closing, Some(CloseReason::Eof)),
            ]
        );
        server.stop(Duration::ZERO);
    });
}

#[test]
fn half_close_delivers_answers_then_eof() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |_| {});
        let mut client = connect(&*server);
        for i in 0..10u8 {
            send_frame(&mut client, &[i; 100]);
        }
        shut_write(&client);
        let got = read_to_eof(&mut client).unwrap();
        let want: Vec<u8> = (0..10u8).flat_map(|i| codec::encode(&[i; 100])).collect();
        assert_eq!(got, want);
        let s = wait_active(&*server, 0);
        assert_eq!(reason_count(&s, CloseReason::Eof), 1);
        server.stop(Duration::ZERO);
    });
}

#[test]
fn protocol_error_answers_earlier_frames_and_keeps_serving() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |c| c.max_frame = 100);
        let mut client = connect(&*server);
        let mut bytes = codec::encode(b"a");
        bytes.extend_from_slice(&codec::header(101));
        bytes.extend_from_slice(&[9; 500]);
        client.write_all(&bytes).unwrap();
        assert_eq!(read_to_eof(&mut client).unwrap(), codec::encode(b"a"));
        let s = wait_active(&*server, 0);
        assert_eq!(reason_count(&s, CloseReason::ProtocolError), 1);
        assert_eq!(s.truncated_frames, 0);
        let mut again = connect(&*server);
        send_frame(&mut again, b"next");
        assert_eq!(read_frame(&mut again).unwrap(), b"next");
        server.stop(Duration::ZERO);
    });
}

#[test]
fn idle_and_read_timeouts_close_within_bounds() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |_| {});
        let t = Duration::from_millis(500);
        let within = |elapsed: Duration| elapsed >= t && elapsed <= 2 * t + Duration::from_millis(250);
        // Each clock starts no earlier than its instant here (connect, send).
        let idle_start = Instant::now();
        let mut idle = connect(&*server);
        let mut partial = connect(&*server);
        let partial_start = Instant::now();
        partial.write_all(&[0, 0, 0]).unwrap();
        let reader = std::thread::spawn(move || {
            assert_eq!(read_to_eof(&mut idle).unwrap(), b"");
            idle_start.elapsed()
        });
        assert_eq!(read_to_eof(&mut partial).unwrap(), b"");
        let partial_elapsed = partial_start.elapsed();
        let idle_elapsed = reader.join().unwrap();
        assert!(within(idle_elapsed), "idle closed after {idle_elapsed:?}");
        assert!(within(partial_elapsed), "partial closed after {partial_elapsed:?}");
        let s = wait_active(&*server, 0);
        assert_eq!(reason_count(&s, CloseReason::IdleTimeout), 1);
        assert_eq!(reason_count(&s, CloseReason::ReadTimeout), 1);
        assert_eq!(s.truncated_frames, 1);
        server.stop(Duration::ZERO);
    });
}

#[test]
fn capacity_rejects_over_max_connections() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |c| {
            c.max_connections = 3;
            c.idle_timeout = None;
        });
        let kept: Vec<_> = (0..3).map(|_| connect(&*server)).collect();
        wait_active(&*server, 3);
        let mut extra = connect(&*server);
        assert_eq!(read_to_eof(&mut extra).unwrap(), b"");
        let s = wait_for("rejected", || {
            let s = server.stats();
            (s.rejected == 1).then_some(s)
        });
        assert_eq!(reason_count(&s, CloseReason::Rejected), 1);
        assert_eq!((s.accepted, s.closed, s.peak_active), (4, 1, 3));
        assert_conservation(&s);
        drop(kept);
        wait_active(&*server, 0);
        server.stop(Duration::ZERO);
    });
}

#[test]
fn reset_is_recorded_as_reset() {
    let _serial = serial();
    for_each_backend(|kind| {
        let server = server(kind, |c| c.idle_timeout = None);
        let client = connect(&*server);
        (&client).write_all(&[0, 0, 0, 10, 1, 2]).unwrap();
        wait_for("bytes read", || (server.stats().bytes_in == 6).then_some(()));
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let s = wait_active(&*server, 0);
        assert_eq!(reason_count(&s, CloseReason::Reset), 1, "{s:?}");
        assert_eq!(s.truncated_frames, 1);
        server.stop(Duration::ZERO);
    });
}

#[test]
fn stop_drains_busy_forces_stuck_and_closes_everything() {
    let _serial = serial();
    for_each_backend(|kind| {
        let before = open_fds();
        let server = server(kind, |c| {
            c.idle_timeout = None;
            c.read_timeout = None;
        });
        let addr = server.local_addr();
        let mut idle = connect(&*server);
        let stuck = connect(&*server);
        (&stuck).write_all(&[0, 0, 0, 50, 1]).unwrap(); // a frame that never completes
        let mut busy = connect(&*server);
        let big = vec![7u8; 1 << 20];
        busy.write_all(&codec::encode(&big)).unwrap();
        wait_for("all registered and read", || {
            (server.stats().active == 3 && server.stats().bytes_in >= 5).then_some(())
        });
        let reader = std::thread::spawn(move || read_to_eof(&mut busy).unwrap());
        let report = server.stop(Duration::from_millis(300));
        assert_eq!(reader.join().unwrap(), codec::encode(&big), "the answer in flight arrives whole");
        assert_eq!(read_to_eof(&mut idle).unwrap(), b"");
        assert_eq!((report.drained, report.forced), (2, 1), "{report:?}");
        assert!(report.elapsed >= Duration::from_millis(290), "{report:?}");
        let s = server.stats();
        assert_eq!(reason_count(&s, CloseReason::Shutdown), 3);
        assert_eq!(s.truncated_frames, 1);
        assert_eq!(s.threads, 0);
        assert_conservation(&s);
        assert_eq!(server.stop(Duration::ZERO), Default::default(), "a second stop returns zeros");
        drop((stuck, idle));
        // Fds the server opened and left open; one of another test closed meanwhile is not ours.
        let left: Vec<_> = open_fds().difference(&before).cloned().collect();
        assert!(left.is_empty(), "every fd of the server is closed after stop: {left:?} left");
        TcpListener::bind(addr).expect("port rebindable at once");
        drop(server);
    });
}

#[test]
fn start_and_stop_on_the_same_port_many_times() {
    let _serial = serial();
    for_each_backend(|kind| {
        let first = server(kind, |_| {});
        let port = first.local_addr().port();
        first.stop(Duration::ZERO);
        for _ in 0..50 {
            let s = server(kind, |c| c.port = port);
            let mut client = connect(&*s);
            send_frame(&mut client, b"x");
            assert_eq!(read_frame(&mut client).unwrap(), b"x");
            drop(client);
            s.stop(Duration::from_millis(100));
        }
    });
}

#[test]
fn bad_config_names_the_field() {
    let _serial = serial();
    let err = connlab_servers::start(
        BackendKind::ALL[0],
        connlab_servers::Config { workers: 0, ..Default::default() },
    )
    .unwrap_err();
    assert_eq!(err.field(), "workers");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = connlab_servers::Config { port: taken.local_addr().unwrap().port(), ..Default::default() };
    let err = connlab_servers::start(BackendKind::ALL[0], config).unwrap_err();
    assert_eq!(err.field(), "port");
    assert!(err.to_string().contains("cannot bind"), "{err}");
    assert!("nosuch".parse::<BackendKind>().unwrap_err().to_string().starts_with("backend: "));
}

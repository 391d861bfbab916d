//! `close` and drop leave no fd and no thread behind. One test in its own
//! binary: other tests' sockets and threads would blur the counts.

mod util;

use std::io::{self, Read, Write};
use std::time::Duration;

use connlab_proxy::{Stream, ToxicKind};
use util::*;

/// A proxy with connections in the states a close can find them in: idle,
/// after an echo, data held by a latency, data held by a `timeout`.
fn busy_proxy(upstream: &Upstream) -> (connlab_proxy::Proxy, Vec<std::net::TcpStream>) {
    let proxy = proxy(upstream, Some(3));
    let mut clients = vec![connect(&proxy)];
    let mut echo = connect(&proxy);
    echo.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut echo, 4), b"ping");
    clients.push(echo);
    let latency = ToxicKind::Latency { latency: ms(5000), jitter: ms(0) };
    proxy.add_toxic(toxic("lag", Stream::Downstream, latency)).unwrap();
    let mut slow = connect(&proxy);
    slow.write_all(b"slow").unwrap();
    clients.push(slow);
    // `bytes_in` too: the ping's echo counts as held until just after the
    // client has it.
    wait_for("the echo held", ms(2000), || {
        let s = proxy.stats().downstream;
        (s.bytes_in == 8 && s.bytes_held == 4).then_some(())
    });
    proxy.add_toxic(toxic("hold", Stream::Upstream, ToxicKind::Timeout { timeout: Duration::ZERO })).unwrap();
    let mut held = connect(&proxy);
    held.write_all(b"held").unwrap();
    clients.push(held);
    wait_for("the data held", ms(2000), || {
        let s = proxy.stats().upstream;
        (s.bytes_in == 12 && s.bytes_held == 4).then_some(())
    });
    (proxy, clients)
}

#[test]
fn close_and_drop_leave_no_fd_and_no_thread() {
    let upstream = Upstream::echo();
    let (fds, tasks) = (fd_count(), task_count());

    let (proxy, clients) = busy_proxy(&upstream);
    assert!(thread_names().iter().any(|n| n == "connlab-proxy"));
    proxy.close();
    assert!(!thread_names().iter().any(|n| n == "connlab-proxy"), "the proxy's thread outlived close");
    for mut client in clients {
        let mut buf = [0; 16];
        let read = client.read(&mut buf);
        assert_eq!(read.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset), "close sends RST");
    }
    // The echo threads end on the RST the proxy sent them.
    wait_for("fds and threads back to before start", ms(5000), || {
        (fd_count() == fds && task_count() == tasks).then_some(())
    });

    let (proxy, clients) = busy_proxy(&upstream);
    drop(proxy);
    assert!(!thread_names().iter().any(|n| n == "connlab-proxy"), "the proxy's thread outlived drop");
    drop(clients);
    wait_for("fds and threads back to before start, after drop", ms(5000), || {
        (fd_count() == fds && task_count() == tasks).then_some(())
    });
}

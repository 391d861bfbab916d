//! Relaying without toxics: bytes, half-close, failed dials, close, and the
//! counters.

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};

use util::*;

#[test]
fn forwards_a_mebibyte_both_ways_byte_identical() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let mut client = connect(&proxy);
    let sent = pattern(1 << 20);
    let mut writer = client.try_clone().unwrap();
    let to_send = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let echoed = read_to_eof(&mut client).expect("echo then EOF");
    sender.join().unwrap();
    assert!(echoed == sent, "echo differs from what was sent ({} bytes back)", echoed.len());
    drop(client);
    let s = wait_quiet(&proxy);
    for dir in [s.upstream, s.downstream] {
        assert_eq!(dir.bytes_in, 1 << 20, "{s:?}");
        assert_eq!(dir.bytes_out, dir.bytes_in, "{s:?}");
        assert_eq!(dir.bytes_held, 0, "{s:?}");
    }
    assert_eq!((s.accepted, s.closed, s.active), (1, 1, 0));
}

#[test]
fn half_close_passes_through() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    client.write_all(b"question").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The server sees the data, then EOF, while its own side stays open...
    assert_eq!(read_to_eof(&mut server).unwrap(), b"question");
    // ...and its answers still reach the client, then its own FIN.
    server.write_all(b"answer 1, ").unwrap();
    server.write_all(b"answer 2").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"answer 1, answer 2");
    let s = wait_quiet(&proxy);
    assert_eq!((s.upstream.bytes_out, s.downstream.bytes_out), (8, 18));
}

#[test]
fn a_failed_upstream_connect_resets_the_client() {
    // A port that was just free: connecting to it is refused.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = connlab_proxy::Proxy::start("127.0.0.1:0".parse().unwrap(), closed, None).unwrap();
    let mut client = connect(&proxy);
    let mut buf = [0; 1];
    let err = client.read(&mut buf).expect_err("an RST, not data or EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let s = wait_quiet(&proxy);
    assert_eq!((s.accepted, s.closed), (1, 1));
}

#[test]
fn an_rst_from_one_peer_resets_the_other() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    let client = connect(&proxy);
    let mut server = upstream.accept();
    socket2::SockRef::from(&client).set_linger(Some(ms(0))).unwrap();
    drop(client);
    let mut buf = [0; 1];
    let err = server.read(&mut buf).expect_err("an RST, not EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    wait_quiet(&proxy);
}

#[test]
fn close_resets_live_connections_and_is_idempotent() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    client.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut server, 4), b"ping");
    proxy.close();
    proxy.close();
    let mut buf = [0; 1];
    assert_eq!(client.read(&mut buf).expect_err("RST").kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(server.read(&mut buf).expect_err("RST").kind(), io::ErrorKind::ConnectionReset);
    let s = proxy.stats();
    assert_eq!((s.accepted, s.closed, s.active), (1, 1, 0));
    // The listener is gone too.
    assert!(std::net::TcpStream::connect(proxy.local_addr()).is_err());
}

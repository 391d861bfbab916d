//! Each toxic on live connections through a real proxy, timed with slack
//! for a loaded two-core machine.

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use connlab_proxy::{Stream, ToxicKind};
use util::*;

/// One echo round trip of 16 bytes.
fn round_trip(client: &mut TcpStream) -> Duration {
    let start = Instant::now();
    client.write_all(&[b'x'; 16]).unwrap();
    read_n(client, 16);
    start.elapsed()
}

#[test]
fn latency_delays_one_direction_from_arrival() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let latency = ToxicKind::Latency { latency: ms(50), jitter: ms(0) };
    proxy.add_toxic(toxic("lag", Stream::Downstream, latency)).unwrap();
    let mut client = connect(&proxy);
    let mut rtts: Vec<_> = (0..21).map(|_| round_trip(&mut client)).collect();
    let min = *rtts.iter().min().unwrap();
    let p50 = median(&mut rtts);
    assert!(min >= ms(50), "fastest round trip {min:?} beat the latency");
    // The median, not the max: one round trip may lose the CPU on a busy
    // machine, half of them may not.
    assert!(p50 <= ms(52), "median round trip {p50:?}: more than 2 ms over the latency");
}

#[test]
fn latency_jitter_spreads_within_bounds() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let latency = ToxicKind::Latency { latency: ms(50), jitter: ms(20) };
    proxy.add_toxic(toxic("lag", Stream::Downstream, latency)).unwrap();
    let mut client = connect(&proxy);
    let mut rtts: Vec<_> = (0..41).map(|_| round_trip(&mut client)).collect();
    rtts.sort();
    let (min, max) = (rtts[0], rtts[rtts.len() - 1]);
    // Each delay is drawn from 50 ± 20 ms: none below 30 ms; the 90th
    // percentile within 2 ms of 70 ms (the max may meet a busy machine).
    let p90 = rtts[rtts.len() * 9 / 10];
    assert!(min >= ms(30), "fastest {min:?} below latency - jitter");
    assert!(p90 <= ms(72), "p90 {p90:?} above latency + jitter + 2 ms");
    assert!(max - min >= ms(10), "no spread: {min:?}..{max:?}");
    // Seed 1 makes the draws the same every run; their median is near 50 ms.
    let p50 = median(&mut rtts);
    assert!((ms(42)..=ms(60)).contains(&p50), "median {p50:?}");
}

#[test]
fn latency_is_pipelined() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let latency = ToxicKind::Latency { latency: ms(200), jitter: ms(0) };
    proxy.add_toxic(toxic("lag", Stream::Downstream, latency)).unwrap();
    let mut client = connect(&proxy);
    let start = Instant::now();
    // Ten messages 10 ms apart: delayed 200 ms each, not queued behind each other.
    for i in 0..10u8 {
        client.write_all(&[i; 100]).unwrap();
        std::thread::sleep(ms(10));
    }
    let first = read_n(&mut client, 100);
    let first_at = start.elapsed();
    let rest = read_n(&mut client, 900);
    let last_at = start.elapsed();
    assert_eq!(first, [0; 100]);
    assert_eq!(&rest[800..], [9; 100]);
    assert!(first_at >= ms(200), "first message after {first_at:?}");
    assert!(last_at <= ms(200 + 90 + 150), "last message after {last_at:?}: not pipelined");
}

#[test]
fn toxics_act_on_live_connections_and_removal_releases_at_once() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let mut client = connect(&proxy);
    assert!(round_trip(&mut client) < ms(100));
    // Added on a live connection: the next round trip is delayed.
    let latency = ToxicKind::Latency { latency: ms(150), jitter: ms(0) };
    proxy.add_toxic(toxic("lag", Stream::Upstream, latency)).unwrap();
    assert!(round_trip(&mut client) >= ms(150));
    // A long latency holds a message; removing it lets the message go now.
    proxy.remove_toxic("lag").unwrap();
    let latency = ToxicKind::Latency { latency: ms(5000), jitter: ms(0) };
    proxy.add_toxic(toxic("lag", Stream::Downstream, latency)).unwrap();
    client.write_all(b"held").unwrap();
    wait_for("the echo held downstream", ms(2000), || {
        (proxy.stats().downstream.bytes_held == 4).then_some(())
    });
    let removed = Instant::now();
    proxy.remove_toxic("lag").unwrap();
    assert_eq!(read_n(&mut client, 4), b"held");
    assert!(removed.elapsed() < ms(1000), "released after {:?}", removed.elapsed());
    assert!(round_trip(&mut client) < ms(100));
}

#[test]
fn bandwidth_limits_the_rate() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    proxy.add_toxic(toxic("slow", Stream::Downstream, ToxicKind::Bandwidth { rate_kib: 100 })).unwrap();
    let mut client = connect(&proxy);
    let sent = pattern(200 * 1024);
    let start = Instant::now();
    let mut writer = client.try_clone().unwrap();
    let to_send = sent.clone();
    let sender = std::thread::spawn(move || writer.write_all(&to_send).unwrap());
    let got = read_n(&mut client, sent.len());
    let elapsed = start.elapsed();
    sender.join().unwrap();
    assert!(got == sent, "bytes differ");
    // 200 KiB at 100 KiB/s: 2 s, ± 10 %.
    assert!((ms(1800)..=ms(2200)).contains(&elapsed), "200 KiB took {elapsed:?}");
}

#[test]
fn slicer_reads_never_exceed_average_plus_variation() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    let slicer = ToxicKind::Slicer { average_size: 200, size_variation: 50, delay: ms(40) };
    proxy.add_toxic(toxic("slices", Stream::Downstream, slicer)).unwrap();
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    let sent = pattern(1000);
    server.write_all(&sent).unwrap();
    let (mut got, mut reads) = (Vec::new(), Vec::new());
    let mut buf = [0; 4096];
    while got.len() < sent.len() {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {} bytes", got.len());
        reads.push(n);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, sent);
    assert!(reads.iter().all(|&n| n <= 250), "reads {reads:?}");
    assert!(reads.len() >= 4, "reads {reads:?}");
}

#[test]
fn limit_data_passes_exactly_the_limit_then_fin() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    proxy.add_toxic(toxic("cut", Stream::Downstream, ToxicKind::LimitData { bytes: 1000 })).unwrap();
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    let sent = pattern(5000);
    server.write_all(&sent).unwrap();
    let got = read_to_eof(&mut client).expect("1000 bytes then EOF");
    assert_eq!(got, sent[..1000]);
    // The server gets a FIN too.
    let mut buf = [0; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    wait_quiet(&proxy);
}

#[test]
fn reset_peer_resets_the_client() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    proxy.add_toxic(toxic("rst", Stream::Downstream, ToxicKind::ResetPeer { timeout: ms(150) })).unwrap();
    let start = Instant::now();
    let mut client = connect(&proxy);
    // Data passes until the reset.
    assert!(round_trip(&mut client) < ms(150));
    let mut buf = [0; 1];
    let err = client.read(&mut buf).expect_err("an RST");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(start.elapsed() >= ms(150), "reset after {:?}", start.elapsed());
    wait_quiet(&proxy);
}

#[test]
fn reset_peer_added_to_an_idle_connection_fires_without_data() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(1));
    let mut client = connect(&proxy);
    round_trip(&mut client);
    // Nothing flows from now on: the toxic must act on its own clock.
    proxy.add_toxic(toxic("rst", Stream::Downstream, ToxicKind::ResetPeer { timeout: ms(50) })).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0; 1];
    let err = client.read(&mut buf).expect_err("an RST");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    wait_quiet(&proxy);
}

#[test]
fn timeout_zero_holds_silently_then_releases_in_order() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    let hold = ToxicKind::Timeout { timeout: Duration::ZERO };
    proxy.add_toxic(toxic("hold", Stream::Downstream, hold)).unwrap();
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    server.write_all(b"first ").unwrap();
    server.write_all(b"second").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    wait_for("12 bytes held", ms(2000), || (proxy.stats().downstream.bytes_held == 12).then_some(()));
    // Neither data nor FIN nor RST reaches the client for 2 s...
    assert!(silent_for(&client, ms(2000)), "the client heard something");
    // ...and the server side stays open: no FIN or RST from the proxy.
    assert!(nothing_pending(&server), "the server heard something");
    // The connection still carries the other direction.
    client.write_all(b"up").unwrap();
    assert_eq!(read_n(&mut server, 2), b"up");
    proxy.remove_toxic("hold").unwrap();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"first second");
    let s = proxy.stats();
    assert_eq!(s.downstream.bytes_held, 0);
    assert_eq!(s.active, 1, "the connection outlives the toxic");
}

#[test]
fn timeout_ends_the_connection_after_its_time() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    proxy.add_toxic(toxic("drop", Stream::Downstream, ToxicKind::Timeout { timeout: ms(300) })).unwrap();
    let start = Instant::now();
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    server.write_all(b"lost").unwrap();
    assert_eq!(read_to_eof(&mut client).expect("FIN"), b"");
    assert!(start.elapsed() >= ms(300), "ended after {:?}", start.elapsed());
    let mut buf = [0; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    wait_quiet(&proxy);
}

#[test]
fn slow_close_delays_the_fin() {
    let upstream = Upstream::manual();
    let proxy = proxy(&upstream, Some(1));
    proxy.add_toxic(toxic("slow", Stream::Downstream, ToxicKind::SlowClose { delay: ms(300) })).unwrap();
    let mut client = connect(&proxy);
    let mut server = upstream.accept();
    server.write_all(b"bye").unwrap();
    let closed = Instant::now();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut client, 3), b"bye");
    assert!(closed.elapsed() < ms(250), "data held {:?}", closed.elapsed());
    assert_eq!(read_to_eof(&mut client).unwrap(), b"");
    assert!(closed.elapsed() >= ms(300), "FIN after {:?}", closed.elapsed());
}

/// Which of 20 connections, in order, a `limit_data 0` toxic of toxicity
/// 0.5 cut, on a proxy seeded `seed`.
fn affected(seed: u64) -> Vec<bool> {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, Some(seed));
    let mut coin = toxic("coin", Stream::Downstream, ToxicKind::LimitData { bytes: 0 });
    coin.toxicity = 0.5;
    proxy.add_toxic(coin).unwrap();
    (0..20)
        .map(|_| {
            let mut client = connect(&proxy);
            client.write_all(b"x").unwrap();
            let mut buf = [0; 1];
            // Unaffected: the echo. Affected: EOF, or an RST if the proxy
            // closed with the byte unread.
            !matches!(client.read(&mut buf), Ok(1))
        })
        .collect()
}

#[test]
fn toxicity_is_reproducible_from_the_seed() {
    let seven = affected(7);
    let hits = seven.iter().filter(|&&a| a).count();
    assert!((3..=17).contains(&hits), "{hits} of 20 affected at toxicity 0.5: {seven:?}");
    assert_eq!(affected(7), seven, "same seed, different connections affected");
    assert_ne!(affected(8), seven, "seeds 7 and 8 affect the same connections");
}

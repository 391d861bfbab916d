//! The toxic list: adding, removing, listing, and every error.

mod util;

use std::time::Duration;

use connlab_proxy::{Error, Stream, ToxicKind};
use util::*;

#[test]
fn toxics_are_listed_in_insertion_order() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, None);
    let kinds = [
        ToxicKind::Latency { latency: ms(10), jitter: ms(1) },
        ToxicKind::Bandwidth { rate_kib: 1 },
        ToxicKind::Slicer { average_size: 1, size_variation: 0, delay: Duration::ZERO },
        ToxicKind::LimitData { bytes: 0 },
        ToxicKind::ResetPeer { timeout: Duration::ZERO },
        ToxicKind::Timeout { timeout: Duration::ZERO },
        ToxicKind::SlowClose { delay: Duration::ZERO },
    ];
    let names = ["latency", "bandwidth", "slicer", "limit_data", "reset_peer", "timeout", "slow_close"];
    for (i, kind) in kinds.iter().enumerate().rev() {
        let stream = if i % 2 == 0 { Stream::Upstream } else { Stream::Downstream };
        proxy.add_toxic(toxic(&format!("t{i}"), stream, kind.clone())).unwrap();
    }
    let listed = proxy.toxics();
    let listed_names: Vec<_> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(listed_names, ["t6", "t5", "t4", "t3", "t2", "t1", "t0"]);
    for t in &listed {
        let i: usize = t.name[1..].parse().unwrap();
        assert_eq!((&t.kind, t.kind.type_name()), (&kinds[i], names[i]));
    }
    proxy.remove_toxic("t3").unwrap();
    proxy.add_toxic(toxic("t3", Stream::Upstream, kinds[0].clone())).unwrap();
    let listed_names: Vec<_> = proxy.toxics().into_iter().map(|t| t.name).collect();
    assert_eq!(listed_names, ["t6", "t5", "t4", "t2", "t1", "t0", "t3"]);
}

#[test]
fn duplicate_and_unknown_names_are_errors() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, None);
    let lag = toxic("lag", Stream::Upstream, ToxicKind::Latency { latency: ms(1), jitter: ms(0) });
    proxy.add_toxic(lag.clone()).unwrap();
    // Names are unique across both directions.
    let mut other = lag.clone();
    other.stream = Stream::Downstream;
    let err = proxy.add_toxic(other).unwrap_err();
    assert!(matches!(&err, Error::DuplicateName(n) if n == "lag"), "{err:?}");
    assert!(err.to_string().contains("lag"), "{err}");
    let err = proxy.remove_toxic("nope").unwrap_err();
    assert!(matches!(&err, Error::UnknownName(n) if n == "nope"), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");
    proxy.remove_toxic("lag").unwrap();
    assert!(matches!(proxy.remove_toxic("lag"), Err(Error::UnknownName(_))));
    assert!(proxy.toxics().is_empty());
}

#[test]
fn bad_toxics_are_rejected_naming_the_field() {
    let upstream = Upstream::echo();
    let proxy = proxy(&upstream, None);
    let slicer =
        |average_size, size_variation| ToxicKind::Slicer { average_size, size_variation, delay: ms(1) };
    let ok = ToxicKind::LimitData { bytes: 1 };
    let cases = [
        ("", 1.0, ok.clone(), "name"),
        ("t", 1.5, ok.clone(), "toxicity"),
        ("t", -0.1, ok.clone(), "toxicity"),
        ("t", f64::NAN, ok.clone(), "toxicity"),
        ("t", 1.0, ToxicKind::Bandwidth { rate_kib: 0 }, "rate_kib"),
        ("t", 1.0, slicer(0, 0), "average_size"),
        ("t", 1.0, slicer(10, 10), "size_variation"),
        ("t", 1.0, slicer(10, 11), "size_variation"),
    ];
    for (name, toxicity, kind, field) in cases {
        let mut t = toxic(name, Stream::Downstream, kind);
        t.toxicity = toxicity;
        let err = proxy.add_toxic(t.clone()).expect_err(&format!("{t:?} accepted"));
        assert!(matches!(err, Error::InvalidToxic { field: f, .. } if f == field), "{t:?}: {err:?}");
        assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
    }
    assert!(proxy.toxics().is_empty());
    // The edges that are fine.
    proxy.add_toxic(toxic("a", Stream::Downstream, slicer(10, 9))).unwrap();
    proxy.add_toxic(toxic("b", Stream::Downstream, slicer(1, 0))).unwrap();
    let mut never = toxic("c", Stream::Upstream, ok);
    never.toxicity = 0.0;
    proxy.add_toxic(never).unwrap();
}

#[test]
fn streams_parse_in_any_case_and_display() {
    assert_eq!("upstream".parse::<Stream>().unwrap(), Stream::Upstream);
    assert_eq!("DownStream".parse::<Stream>().unwrap(), Stream::Downstream);
    let err = "sideways".parse::<Stream>().unwrap_err();
    assert!(err.to_string().starts_with("stream: "), "{err}");
    assert_eq!(Stream::Upstream.to_string(), "upstream");
    assert_eq!(Stream::Downstream.to_string(), "downstream");
}

#[test]
fn start_errors_are_io_errors() {
    let upstream = Upstream::echo();
    let first = proxy(&upstream, None);
    let err = connlab_proxy::Proxy::start(first.local_addr(), upstream.addr, None).unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::AddrInUse), "{err:?}");
}

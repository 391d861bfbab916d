//! HdrHistogram operations on exported latency histograms: decode, merge,
//! the percentile spectrum, and the interval log that HdrHistogram's tools read.
//!
//! Histograms travel as HdrHistogram's compressed V2 encoding (what
//! [`Report::histogram_v2_deflate`](crate::Report::histogram_v2_deflate)
//! returns), values in nanoseconds: the one form every HdrHistogram port
//! reads, so a run measured here can be merged, plotted or compared by tools
//! that know nothing of connlab.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
/// The histogram type of these functions, for callers without a dependency
/// on `hdrhistogram` of their own.
pub use hdrhistogram::Histogram;

use crate::Error;

/// Largest latency a run's histogram holds (longer ones are recorded as
/// this): far above any run's hard deadline.
const MAX_LATENCY_NS: u64 = 100_000_000_000;

/// Nanoseconds per microsecond: the spectrum's unit, as the load reports'.
const NS_PER_US: f64 = 1e3;

/// Nanoseconds per millisecond: the interval log's max column is in ms, as
/// the Java `HistogramLogWriter` writes it by default (its values in ns).
const NS_PER_MS: f64 = 1e6;

/// The column names HdrHistogram's `HistogramLogWriter` writes above the
/// intervals (the crate writes none; readers skip it).
const LEGEND: &str =
    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n";

/// A histogram of latencies in nanoseconds, 3 significant digits: the shape
/// of every run's, and of a merge.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant bounds are valid")
}

/// `h` in HdrHistogram's compressed V2 encoding (what `HistogramLogWriter`
/// writes, base64-encoded, and what every HdrHistogram port decodes).
pub fn encode(h: &Histogram<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut out).expect("serializing into a Vec cannot fail");
    out
}

/// The histogram `bytes` encode (V2, compressed or not); an error naming
/// `histogram` if they are anything else, trailing bytes included.
pub fn decode(bytes: &[u8]) -> Result<Histogram<u64>, Error> {
    decode_as("histogram", "", bytes)
}

/// [`decode`], with errors naming `field` and saying `which` one (e.g.
/// `"[2]: "`) ahead of the reason.
fn decode_as(field: &'static str, which: &str, bytes: &[u8]) -> Result<Histogram<u64>, Error> {
    let bad = |why: String| Error::invalid(field, format!("{which}not an HdrHistogram V2 encoding: {why}"));
    if bytes.starts_with(b"HISTF") {
        // The base64 text of a log line: an easy slip, so say what to do.
        return Err(bad("this is its base64 text, decode that first".into()));
    }
    let mut rest = bytes;
    let h = Deserializer::new().deserialize(&mut rest).map_err(|e| bad(e.to_string()))?;
    // Two histograms concatenated would otherwise pass as the first alone.
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes follow the histogram", rest.len())));
    }
    Ok(h)
}

/// The sum of the histograms `encoded` (e.g. the repetitions of one
/// workload), in the shape of a run's; none gives an empty one. Errors name
/// `histograms` and the index of the one that does not decode, or holds
/// values above a run's range.
pub fn merge(encoded: &[impl AsRef<[u8]>]) -> Result<Histogram<u64>, Error> {
    let mut sum = new_histogram();
    for (i, bytes) in encoded.iter().enumerate() {
        let which = format!("[{i}]: ");
        let h = decode_as("histograms", &which, bytes.as_ref())?;
        sum.add(&h).map_err(|e| Error::invalid("histograms", format!("{which}{e}")))?;
    }
    Ok(sum)
}

/// The percentile spectrum of `h`, as HdrHistogram's
/// `outputPercentileDistribution` prints it: `(quantile, value in µs)` at
/// quantile ticks that halve the distance to 1.0 in
/// `ticks_per_half_distance` steps each time (the log-scale x axis of a
/// latency-by-percentile plot), ending at quantile 1.0 with the max. Empty
/// for an empty histogram.
///
/// # Panics
///
/// If `ticks_per_half_distance` is 0.
pub fn spectrum(h: &Histogram<u64>, ticks_per_half_distance: u32) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(ticks_per_half_distance)
        .map(|v| (v.quantile_iterated_to(), v.value_iterated_to() as f64 / NS_PER_US))
        .collect()
}

/// An HdrHistogram interval log of `entries`, each `(tag, start, length,
/// histogram)` with `start` and `length` in seconds (start since
/// `base_time_unix_s`): the text HdrHistogram's `HistogramLogReader`,
/// HistogramLogAnalyzer and `HistogramLogProcessor` read, one line per entry
/// in the order given (readers expect it sorted by start).
///
/// The log opens with StartTime and BaseTime both at `base_time_unix_s` (so
/// no reader guesses whether the starts are absolute), a comment on the
/// units, and the column legend. An empty tag writes an untagged line, the
/// series a reader shows by default. Errors name `tag` (one with `,`, space,
/// CR or LF, which would split the line), `start_s` or `length_s` (negative
/// or not finite), or `base_time`.
pub fn interval_log(
    entries: &[(String, f64, f64, Histogram<u64>)],
    base_time_unix_s: f64,
) -> Result<String, Error> {
    let base = base_time(base_time_unix_s)?;
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    // The writer holds `out` until dropped and writes no legend: the headers
    // go first, then the legend, then a second writer (with the divisor,
    // which it announces in a comment) writes the intervals.
    IntervalLogWriterBuilder::new()
        .with_start_time(base)
        .with_base_time(base)
        .begin_log_with(&mut out, &mut serializer)
        .and_then(|mut log| log.write_comment("Values are latencies in nanoseconds; Interval_Max is in ms"))
        .expect("writing into a Vec cannot fail");
    out.extend_from_slice(LEGEND.as_bytes());
    let mut log = IntervalLogWriterBuilder::new()
        .with_max_value_divisor(NS_PER_MS)
        .begin_log_with(&mut out, &mut serializer)
        .expect("writing into a Vec cannot fail");
    for (i, (tag, start, length, h)) in entries.iter().enumerate() {
        let which = format!("entries[{i}]");
        let tag = match tag.as_str() {
            "" => None,
            tag => Some(Tag::new(tag).ok_or_else(|| {
                Error::invalid("tag", format!("{which}: must not contain ',', ' ', CR or LF, got {tag:?}"))
            })?),
        };
        let start = seconds("start_s", &which, *start)?;
        let length = seconds("length_s", &which, *length)?;
        log.write_histogram(h, start, length, tag)
            .map_err(|e| Error::invalid("histogram", format!("{which}: {e}")))?;
    }
    drop(log);
    Ok(String::from_utf8(out).expect("the log is ASCII but for the tags, which are UTF-8"))
}

/// A Unix time in seconds as a `SystemTime`; an error naming `base_time` if
/// negative or not finite.
fn base_time(secs: f64) -> Result<SystemTime, Error> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| UNIX_EPOCH.checked_add(d))
        .ok_or_else(|| Error::invalid("base_time", format!("must be a Unix time in seconds ≥ 0, got {secs}")))
}

/// A number of seconds of entry `which`; an error naming `field` if negative
/// or not finite.
fn seconds(field: &'static str, which: &str, secs: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| Error::invalid(field, format!("{which}: must be a number of seconds ≥ 0, got {secs}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    /// A run-shaped histogram of `values` (ns).
    fn histogram(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    /// The histogram of a log line's base64 text.
    fn from_base64(text: &str) -> Histogram<u64> {
        use base64::Engine as _;
        decode(&base64::engine::general_purpose::STANDARD.decode(text).unwrap()).unwrap()
    }

    #[test]
    fn hdr_decode_inverts_encode_and_refuses_garbage() {
        let h = histogram([1_500, 250_000_000]);
        assert_eq!(decode(&encode(&h)).unwrap(), h);
        for bad in [&b""[..], b"garbage", b"HISTFAAAA"] {
            let err = decode(bad).unwrap_err();
            assert_eq!(err.field(), "histogram", "{err}");
        }
        let mut two = encode(&h);
        two.extend(encode(&h));
        assert!(decode(&two).unwrap_err().to_string().contains("bytes follow"));
    }

    #[test]
    fn hdr_merge_of_two_equals_adding() {
        let a = histogram((1..=1000).map(|us| us * 1_000));
        let b = histogram([7_000, 42_000_000]);
        let mut sum = a.clone();
        sum.add(&b).unwrap();
        assert_eq!(merge(&[encode(&a), encode(&b)]).unwrap(), sum);
        let empty = merge(&[] as &[Vec<u8>]).unwrap();
        assert!(empty.is_empty());
        assert_eq!((empty.sigfig(), empty.high()), (3, MAX_LATENCY_NS));
        let err = merge(&[encode(&a), b"garbage".to_vec()]).unwrap_err();
        assert_eq!(err.field(), "histograms");
        assert!(err.to_string().starts_with("histograms: [1]: "), "{err}");
    }

    #[test]
    fn hdr_merge_refuses_values_beyond_a_runs_range() {
        let mut wide = Histogram::<u64>::new(3).unwrap();
        wide.record(MAX_LATENCY_NS * 10).unwrap();
        let err = merge(&[encode(&wide)]).unwrap_err();
        assert!(err.to_string().starts_with("histograms: [0]: "), "{err}");
    }

    #[test]
    fn hdr_spectrum_is_monotone_and_ends_at_the_max() {
        let h = histogram((1..=10_000).map(|i| i * 137));
        let s = spectrum(&h, 5);
        assert!(s.len() > 20, "{s:?}");
        assert!(s.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "{s:?}");
        assert_eq!(*s.last().unwrap(), (1.0, h.max() as f64 / 1e3));
        assert_eq!(s[0].0, 0.0);
        let p50 = s.iter().find(|(q, _)| (q - 0.5).abs() < 1e-9).expect("a tick at 0.5");
        assert_eq!(p50.1, h.value_at_quantile(0.5) as f64 / 1e3);
        assert!(spectrum(&new_histogram(), 5).is_empty());
    }

    #[test]
    fn hdr_interval_log_reads_back_the_same_entries() {
        let entries = vec![
            ("epoll".to_string(), 0.0, 5.0, histogram([1_000, 2_000, 3_000_000])),
            ("tokio/p=2".to_string(), 5.25, 4.5, histogram([50_000])),
            (String::new(), 12.125, 0.5, new_histogram()),
        ];
        let log = interval_log(&entries, 1_700_000_000.5).unwrap();
        assert!(log.starts_with("#[StartTime: 1700000000.500 "), "{log}");
        assert!(log.contains("#[BaseTime: 1700000000.500 "), "{log}");
        assert!(log.contains("nanoseconds") && log.contains(LEGEND), "{log}");

        let mut read = Vec::new();
        let (mut start_time, mut base_time) = (None, None);
        for entry in IntervalLogIterator::new(log.as_bytes()) {
            match entry.unwrap() {
                LogEntry::StartTime(t) => start_time = Some(t),
                LogEntry::BaseTime(t) => base_time = Some(t),
                LogEntry::Interval(i) => read.push((
                    i.tag().map_or("", |t| t.as_str()).to_string(),
                    i.start_timestamp(),
                    i.duration(),
                    i.max(),
                    from_base64(i.encoded_histogram()),
                )),
            }
        }
        let base = Duration::from_millis(1_700_000_000_500);
        assert_eq!((start_time, base_time), (Some(base), Some(base)));
        assert_eq!(read.len(), entries.len());
        for ((tag, start, length, max, h), (tag0, start0, length0, h0)) in read.iter().zip(&entries) {
            assert_eq!(tag, tag0);
            assert_eq!(start.as_secs_f64(), *start0);
            assert_eq!(length.as_secs_f64(), *length0);
            assert_eq!(h, h0);
            assert!((max - h0.max() as f64 / 1e6).abs() < 1e-3, "{max} vs {}", h0.max());
        }
    }

    #[test]
    fn hdr_interval_log_names_the_bad_field() {
        let h = histogram([1_000]);
        let field = |tag: &str, start: f64, length: f64, base: f64| {
            let entries =
                [("ok".to_string(), 0.0, 1.0, h.clone()), (tag.to_string(), start, length, h.clone())];
            let err = interval_log(&entries, base).unwrap_err();
            assert!(err.to_string().contains("entries[1]") || err.field() == "base_time", "{err}");
            err.field()
        };
        assert_eq!(field("a,b", 0.0, 1.0, 0.0), "tag");
        assert_eq!(field("a b", 0.0, 1.0, 0.0), "tag");
        assert_eq!(field("a", -1.0, 1.0, 0.0), "start_s");
        assert_eq!(field("a", 0.0, f64::NAN, 0.0), "length_s");
        assert_eq!(field("a", 0.0, 1.0, f64::INFINITY), "base_time");
        assert_eq!(field("a", 0.0, 1.0, -5.0), "base_time");
    }
}

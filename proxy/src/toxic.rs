//! What a toxic is: its kind and parameters, the direction it acts on, its
//! toxicity, and the validation every toxic passes before it is added.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// The direction of a connection a toxic acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Client to server: bytes the proxy reads from the client and writes
    /// to the upstream server.
    Upstream,
    /// Server to client: bytes the proxy reads from the upstream server and
    /// writes to the client.
    Downstream,
}

impl Stream {
    /// Both directions, upstream first.
    pub const ALL: [Stream; 2] = [Stream::Upstream, Stream::Downstream];

    /// The direction's name, as toxiproxy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = Error;

    /// `"upstream"` or `"downstream"`, in any case.
    fn from_str(s: &str) -> Result<Self, Error> {
        Stream::ALL.into_iter().find(|d| d.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            Error::invalid("stream", format!("expected \"upstream\" or \"downstream\", got {s:?}"))
        })
    }
}

/// What a toxic does to the direction it acts on, with its parameters.
///
/// Durations longer than ten years are taken as ten years. A direction's
/// toxics act until it has passed its source's EOF on; its timers
/// (`reset_peer`, `timeout`) do not fire after that.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ToxicKind {
    /// Delays every chunk by `latency` plus a uniform jitter in
    /// `[-jitter, +jitter]` (never below zero), measured from when the proxy
    /// read the chunk: delays overlap, so throughput is kept and order too.
    Latency {
        /// The mean delay.
        latency: Duration,
        /// The largest deviation from `latency`, either way.
        jitter: Duration,
    },
    /// Passes at most `rate_kib` KiB (1024 bytes) per second, splitting
    /// chunks into pieces of 50 ms worth; each piece leaves when a link of
    /// that rate would have finished carrying it. Must be at least 1.
    Bandwidth {
        /// The rate in KiB/s.
        rate_kib: u64,
    },
    /// Splits every chunk into slices of `average_size ± size_variation`
    /// bytes (uniform), written one by one with `delay` between slices.
    /// `average_size` must be at least 1 and `size_variation` below it.
    Slicer {
        /// The mean slice size in bytes.
        average_size: usize,
        /// The largest deviation from `average_size`, either way.
        size_variation: usize,
        /// The pause after each slice.
        delay: Duration,
    },
    /// Forwards the first `bytes` bytes of the direction (counted after the
    /// toxics before it), then ends the connection: FIN to both sides. The
    /// rest is dropped. With 0, the first chunk or EOF ends it.
    LimitData {
        /// The bytes forwarded before the cut.
        bytes: u64,
    },
    /// Resets the connection (RST to both sides, held data dropped)
    /// `timeout` after the toxic met it; data passes until then.
    ResetPeer {
        /// The time from meeting the connection to the reset.
        timeout: Duration,
    },
    /// Holds every byte of the direction, and its EOF: the other side sees
    /// a peer that went silent. With a nonzero `timeout`, the connection is
    /// ended (FIN to both sides, held data dropped) that long after the toxic
    /// met it; with [`Duration::ZERO`] nothing is ever closed, and removing
    /// the toxic releases what it held, in order, on a live connection.
    Timeout {
        /// The time from meeting the connection to its end; zero: never.
        timeout: Duration,
    },
    /// Passes data unchanged, but holds the source's EOF for `delay` before
    /// passing it on.
    SlowClose {
        /// How long the EOF is held.
        delay: Duration,
    },
}

impl ToxicKind {
    /// The kind's name, as toxiproxy spells it: `"latency"`, `"bandwidth"`,
    /// `"slicer"`, `"limit_data"`, `"reset_peer"`, `"timeout"`, `"slow_close"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::Slicer { .. } => "slicer",
            ToxicKind::LimitData { .. } => "limit_data",
            ToxicKind::ResetPeer { .. } => "reset_peer",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::SlowClose { .. } => "slow_close",
        }
    }
}

/// A named toxic on one direction of every connection of a proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Toxic {
    /// Unique among the proxy's toxics, both directions; not empty. With the
    /// proxy's seed and the connection number it decides which connections
    /// the toxic affects.
    pub name: String,
    /// What it does.
    pub kind: ToxicKind,
    /// The direction it acts on.
    pub stream: Stream,
    /// The probability, in `[0, 1]`, that it affects a given connection;
    /// decided once per connection, from the proxy's seed.
    pub toxicity: f64,
}

impl Toxic {
    /// Checks every field; the error names the first bad one.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::invalid("name", "must not be empty"));
        }
        // `contains` is false for NaN too.
        if !(0.0..=1.0).contains(&self.toxicity) {
            return Err(Error::invalid("toxicity", format!("must be within [0, 1], got {}", self.toxicity)));
        }
        match self.kind {
            ToxicKind::Bandwidth { rate_kib: 0 } => {
                Err(Error::invalid("rate_kib", "must be at least 1 KiB/s (0 would stall forever)"))
            }
            ToxicKind::Slicer { average_size: 0, .. } => {
                Err(Error::invalid("average_size", "must be at least 1"))
            }
            ToxicKind::Slicer { average_size, size_variation, .. } if size_variation >= average_size => {
                Err(Error::invalid(
                    "size_variation",
                    format!("must be below average_size ({average_size}), got {size_variation}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A toxic in a proxy's list, with the id that tells it apart from a later
/// toxic of the same name.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Unique over the proxy's life, increasing in insertion order.
    pub id: u64,
    /// The toxic as added.
    pub toxic: Toxic,
}

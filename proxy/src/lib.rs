//! connlab-proxy: a fault-injecting TCP proxy in the spirit of Shopify's
//! toxiproxy, for putting latency, slow links, cut streams, resets and
//! silent peers between a client and a server under test, reproducibly.
//!
//! The shape, from the data out:
//!
//! - `chain`: the sans-IO core of one direction of one connection: chunks
//!   stamped with their arrival go through the direction's toxics in
//!   insertion order; out come bytes to write, the next deadline, and
//!   connection-level actions (reset, end). It reads no clock and owns no
//!   socket.
//! - `conn`: one connection: dial upstream, then two pumps (read, chain,
//!   write) and the end of the connection they call for: half-close passed
//!   through, FIN to both, or RST to both.
//! - `proxy`: [`Proxy`]: the listener, the runtime's one thread, the live
//!   toxic list every connection watches, and `close`.
//! - `toxic`: [`Toxic`], [`ToxicKind`], [`Stream`] and validation.
//! - `rng`: splitmix64, keyed per (seed, toxic name, connection number):
//!   toxicity rolls, jitter and slice sizes replay with the seed.
//! - `stats`: [`ProxyStats`] and the atomics behind it. `error`: [`Error`].
//!
//! Where it differs from toxiproxy: a client's half-close is passed through
//! (toxiproxy closes both sockets); `timeout` holds data instead of dropping
//! it and releases it when removed; `reset_peer` and `timeout` time from
//! when the toxic meets the connection; toxicity is rolled once per
//! connection and toxic, from a seed.

mod chain;
mod conn;
mod error;
mod proxy;
mod rng;
mod stats;
mod toxic;

pub use error::Error;
pub use proxy::Proxy;
pub use stats::{DirStats, ProxyStats};
pub use toxic::{Stream, Toxic, ToxicKind};

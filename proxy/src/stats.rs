//! The proxy's counters, shared by every connection as atomics, and the
//! snapshot [`crate::Proxy::stats`] returns.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::toxic::Stream;

/// Bytes through one direction, over every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Read from the source.
    pub bytes_in: u64,
    /// Written to the destination.
    pub bytes_out: u64,
    /// Read and neither written nor dropped yet: held by toxics, waiting to
    /// be written, or in a socket buffer the proxy could not write to yet.
    /// Once nothing moves, `bytes_in == bytes_out + bytes_held + dropped`,
    /// where only `limit_data`, `reset_peer`, `timeout` with a timeout, a
    /// peer's error and [`crate::Proxy::close`] drop bytes.
    pub bytes_held: u64,
}

/// A snapshot of a proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted and not closed yet (`accepted - closed`).
    pub active: u64,
    /// Client connections accepted, in all (a connection's number in accept
    /// order, from 0, is the count before it).
    pub accepted: u64,
    /// Connections closed, both sockets; those whose upstream connect failed
    /// included.
    pub closed: u64,
    /// Client to server.
    pub upstream: DirStats,
    /// Server to client.
    pub downstream: DirStats,
}

/// The live counters behind [`DirStats`].
#[derive(Debug, Default)]
pub(crate) struct DirCounters {
    /// See [`DirStats::bytes_in`].
    pub bytes_in: AtomicU64,
    /// See [`DirStats::bytes_out`].
    pub bytes_out: AtomicU64,
    /// See [`DirStats::bytes_held`]; each connection adds its own through a [`Held`].
    pub bytes_held: AtomicU64,
}

/// The live counters behind [`ProxyStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// See [`ProxyStats::accepted`].
    pub accepted: AtomicU64,
    /// See [`ProxyStats::closed`].
    pub closed: AtomicU64,
    /// See [`ProxyStats::upstream`].
    pub upstream: DirCounters,
    /// See [`ProxyStats::downstream`].
    pub downstream: DirCounters,
}

impl Counters {
    /// The counters of `stream`.
    pub(crate) fn dir(&self, stream: Stream) -> &DirCounters {
        match stream {
            Stream::Upstream => &self.upstream,
            Stream::Downstream => &self.downstream,
        }
    }

    /// A snapshot. `closed` is read before `accepted`, so `active` never
    /// goes below zero.
    pub(crate) fn snapshot(&self) -> ProxyStats {
        let dir = |d: &DirCounters| DirStats {
            bytes_in: d.bytes_in.load(Ordering::Relaxed),
            bytes_out: d.bytes_out.load(Ordering::Relaxed),
            bytes_held: d.bytes_held.load(Ordering::Relaxed),
        };
        let closed = self.closed.load(Ordering::Acquire);
        let accepted = self.accepted.load(Ordering::Acquire);
        ProxyStats {
            active: accepted - closed,
            accepted,
            closed,
            upstream: dir(&self.upstream),
            downstream: dir(&self.downstream),
        }
    }
}

/// One connection's share of a direction's `bytes_held`, taken back when
/// the connection goes, however it goes.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    /// The direction's counter.
    counter: &'a AtomicU64,
    /// What this connection has added to it.
    mine: u64,
}

impl<'a> Held<'a> {
    /// A share of zero in `counter`.
    pub(crate) fn new(counter: &'a AtomicU64) -> Self {
        Held { counter, mine: 0 }
    }

    /// Makes this connection's share `n`.
    pub(crate) fn set(&mut self, n: usize) {
        let n = n as u64;
        if n > self.mine {
            self.counter.fetch_add(n - self.mine, Ordering::Relaxed);
        } else {
            self.counter.fetch_sub(self.mine - n, Ordering::Relaxed);
        }
        self.mine = n;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

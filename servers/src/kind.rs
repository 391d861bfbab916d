//! [`BackendKind`]: the one list of backends, their names, and parsing.

use std::fmt;
use std::str::FromStr;

use crate::config::Error;

/// Every backend; the one place that lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// One OS thread per connection, parked in blocking calls.
    Blocking,
    /// A readiness dispatcher and a fixed pool of workers.
    Pool,
    /// One thread, `poll(2)` over every connection.
    Poll,
    /// One thread, edge-triggered epoll through mio.
    Epoll,
    /// A tokio runtime, a task per connection.
    Tokio,
    /// Thread per core: one epoll loop per shard, sharing nothing per frame.
    Sharded,
    /// One thread, completion-based I/O through io_uring.
    Uring,
}

impl BackendKind {
    /// Every backend that exists, in presentation order.
    pub const ALL: [BackendKind; 7] = [
        BackendKind::Blocking,
        BackendKind::Pool,
        BackendKind::Poll,
        BackendKind::Epoll,
        BackendKind::Tokio,
        BackendKind::Sharded,
        BackendKind::Uring,
    ];

    /// The name used on the command line, in stats and in Python.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Blocking => "blocking",
            BackendKind::Pool => "pool",
            BackendKind::Poll => "poll",
            BackendKind::Epoll => "epoll",
            BackendKind::Tokio => "tokio",
            BackendKind::Sharded => "sharded",
            BackendKind::Uring => "uring",
        }
    }
}

impl BackendKind {
    /// Why this backend cannot run on this machine, if it cannot (`uring`
    /// where io_uring is disabled, forbidden or too old); the others always can.
    pub fn unavailable(self) -> Option<String> {
        match self {
            BackendKind::Uring => crate::backend::uring::unavailable(),
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = BackendKind::ALL.iter().map(|k| k.name()).collect();
            Error::invalid("backend", format!("unknown backend {s:?}; expected one of: {}", names.join(", ")))
        })
    }
}

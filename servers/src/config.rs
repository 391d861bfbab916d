//! Server configuration, its validation, and the crate's error type.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::conn::Limits;

/// Everything a backend needs to start (DESIGN.md §6 lists the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on.
    pub host: IpAddr,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Worker threads, for the backends that have a pool (≥ 1).
    pub workers: usize,
    /// Most connections registered at once (≥ 1); more are rejected.
    pub max_connections: usize,
    /// Largest frame body accepted.
    pub max_frame: u32,
    /// Queued output above which reading pauses (≥ 1).
    pub max_pending_output: usize,
    /// Idle clock; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Whole-frame read clock; `None` disables it.
    pub read_timeout: Option<Duration>,
    /// Write-progress clock; `None` disables it.
    pub write_timeout: Option<Duration>,
    /// Listen backlog (≥ 1).
    pub backlog: u32,
    /// Transition journal entries kept; 0 turns the journal off.
    pub journal_capacity: usize,
    /// Stack size of per-connection threads, in bytes (≥ 16 KiB).
    pub thread_stack: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_connections: 10_000,
            max_frame: 1 << 20,
            max_pending_output: 4 << 20,
            idle_timeout: Some(Duration::from_secs(60)),
            read_timeout: Some(Duration::from_secs(10)),
            write_timeout: Some(Duration::from_secs(10)),
            backlog: 1024,
            journal_capacity: 65_536,
            thread_stack: 64 << 10,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let at_least = |field: &'static str, value: u64, min: u64| {
            if value < min {
                Err(Error::invalid(field, format!("must be at least {min}, got {value}")))
            } else {
                Ok(())
            }
        };
        at_least("workers", self.workers as u64, 1)?;
        at_least("max_connections", self.max_connections as u64, 1)?;
        at_least("max_pending_output", self.max_pending_output as u64, 1)?;
        at_least("backlog", u64::from(self.backlog), 1)?;
        at_least("thread_stack", self.thread_stack as u64, 16 << 10)?;
        for (field, timeout) in [
            ("idle_timeout", self.idle_timeout),
            ("read_timeout", self.read_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if timeout.is_some_and(|t| t > MAX_TIMEOUT) {
                return Err(Error::invalid(field, format!("must be at most {} s", MAX_TIMEOUT.as_secs())));
            }
        }
        if self.backlog > i32::MAX as u32 {
            return Err(Error::invalid("backlog", format!("must be at most {}", i32::MAX)));
        }
        Ok(())
    }

    /// The per-connection limits the core enforces.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame: self.max_frame,
            max_pending_output: self.max_pending_output,
            idle_timeout: self.idle_timeout,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            read_while_writing: true,
        }
    }
}

/// The longest timeout or grace accepted (about 115 days): long enough for
/// any test, short enough that `Instant + timeout` cannot overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10_000_000);

/// A timeout given in seconds: 0 disables the clock; negative, NaN, infinite
/// or over [`MAX_TIMEOUT`] values are errors naming `field`.
pub fn timeout_from_secs(field: &'static str, secs: f64) -> Result<Option<Duration>, Error> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_TIMEOUT.as_secs_f64() {
        let max = MAX_TIMEOUT.as_secs();
        return Err(Error::invalid(field, format!("must be a number of seconds in [0, {max}], got {secs}")));
    }
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// Why a server could not start.
#[derive(Debug)]
pub enum Error {
    /// A configuration value is out of range.
    Invalid {
        /// The argument's name, as the Python API spells it.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A syscall failed while starting.
    Io {
        /// The argument the failure is about (e.g. `port`).
        field: &'static str,
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The backend cannot run on this machine (e.g. `uring` where io_uring
    /// is disabled or the kernel is too old); `reason` says which.
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why, in a sentence naming the cause.
        reason: String,
    },
}

impl Error {
    /// An out-of-range value.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { field, message: message.into() }
    }

    /// Maps a syscall failure while starting a backend (`context`: what was
    /// being done) to an error about the `backend` argument.
    pub(crate) fn starting(context: &str) -> impl FnOnce(io::Error) -> Error {
        let context = context.to_string();
        move |source| Error::Io { field: "backend", context, source }
    }

    /// The argument the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Error::Invalid { field, .. } | Error::Io { field, .. } => field,
            Error::Unavailable { .. } => "backend",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { field, message } => write!(f, "{field}: {message}"),
            Error::Io { field, context, source } => write!(f, "{field}: {context}: {source}"),
            Error::Unavailable { backend, reason } => {
                write!(f, "backend: {backend} is unavailable: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Invalid { .. } | Error::Unavailable { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let bad = Config { workers: 0, ..Config::default() };
        assert_eq!(bad.validate().unwrap_err().field(), "workers");
        let bad = Config { backlog: 0, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("backlog: "));
        let err = timeout_from_secs("idle_timeout", -1.0).unwrap_err();
        assert_eq!(err.field(), "idle_timeout");
        assert!(timeout_from_secs("read_timeout", f64::NAN).is_err());
        assert_eq!(timeout_from_secs("write_timeout", 1e20).unwrap_err().field(), "write_timeout");
        let bad = Config { idle_timeout: Some(Duration::from_secs(u64::MAX)), ..Config::default() };
        assert_eq!(bad.validate().unwrap_err().field(), "idle_timeout");
    }

    #[test]
    fn zero_timeout_disables_the_clock() {
        assert_eq!(timeout_from_secs("x", 0.0).unwrap(), None);
        assert_eq!(timeout_from_secs("x", 0.25).unwrap(), Some(Duration::from_millis(250)));
    }
}

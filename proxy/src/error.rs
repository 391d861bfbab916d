//! The crate's one error type.

use std::{fmt, io};

/// What can go wrong starting a proxy or changing its toxics.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A toxic's field has a value the proxy cannot act on.
    InvalidToxic {
        /// The field, as the toxic names it (`"rate_kib"`, `"toxicity"`...).
        field: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// A toxic of that name is on the proxy already.
    DuplicateName(String),
    /// No toxic of that name is on the proxy.
    UnknownName(String),
    /// A syscall failed: binding the listener, building the runtime,
    /// spawning its thread.
    Io(io::Error),
}

impl Error {
    /// An [`Error::InvalidToxic`].
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidToxic { field, reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidToxic { field, reason } => write!(f, "{field}: {reason}"),
            Error::DuplicateName(name) => write!(f, "name: a toxic named {name:?} exists already"),
            Error::UnknownName(name) => write!(f, "name: no toxic named {name:?}"),
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

//! connlab-servers: TCP server backends that speak one framed-echo protocol
//! and share one sans-IO connection core, so architectures can be compared
//! on identical work.
//!
//! A tour of the modules:
//!
//! - [`codec`]: the pure framing codec (4-byte big-endian length + payload).
//! - [`conn`]: the sans-IO connection state machine: states, close reasons,
//!   timeouts, backpressure, half-close, lingering close, stop draining.
//! - [`registry`]: the connection table, every counter of `stats()`, and the
//!   transition journal.
//! - [`config`]: [`Config`], its validation, and the crate's [`Error`].
//! - [`shutdown`]: the stop signal, joinable named server threads, and the
//!   report `stop` returns.
//! - [`backend`]: the [`Server`] trait, [`BackendKind`] (the one list of
//!   backends), the [`start`] factory, and one module per backend.
//! - `sys`: the few syscalls std and socket2 do not wrap.

pub mod backend;
pub mod codec;
pub mod config;
pub mod conn;
pub mod registry;
pub mod shutdown;
mod sys;

pub use backend::{start, BackendKind, Server};
pub use config::{timeout_from_secs, Config, Error};
pub use conn::{CloseReason, State};
pub use registry::{ConnInfo, Stats, Transition};
pub use shutdown::StopReport;

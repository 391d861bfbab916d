//! connlab-servers: TCP server backends that speak one framed-echo protocol
//! and share one sans-IO connection core, so architectures can be compared
//! on identical work.
//!
//! The shape, from the protocol out:
//!
//! - [`codec`]: the pure framing codec (4-byte big-endian length + payload).
//! - [`conn`]: the sans-IO connection state machine: states, close reasons,
//!   timeouts, backpressure, half-close, lingering close, stop draining.
//! - `driver`: the one connection loop: a `Link` (socket + core + registry
//!   entry) moves bytes as the core says, carries out its close, and is the
//!   `Drop` safety net; generic over the two socket calls backends differ in.
//! - `gate`: the one accept gate: admission (`max_connections`), the
//!   EMFILE back-off (sans-IO), and the end of admission at stop.
//! - [`server`]: the [`Server`] trait and its one implementation, which
//!   carries "stop runs once; drop stops with no grace" for every backend.
//! - [`backend`]: the [`start`] factory and one module per backend; each
//!   only says how its threads wait (a blocking call, `poll`, epoll, tokio,
//!   io_uring's completions).
//! - [`registry`]: the connection table, every counter of `stats()`, and the
//!   transition journal. [`kind`]: [`BackendKind`], the one list of backends.
//! - [`config`]: [`Config`], its validation, and the crate's [`Error`].
//! - [`shutdown`]: joinable named server threads and the report `stop`
//!   returns; `interrupt`: waking threads parked in blocking calls.
//! - [`handoff`]: passing the listening socket to a successor server over
//!   a Unix control socket, with no connection refused or lost.
//! - `sys`: the few syscalls std and socket2 do not wrap.

pub mod backend;
pub mod codec;
pub mod config;
pub mod conn;
mod driver;
mod gate;
pub mod handoff;
mod interrupt;
pub mod kind;
pub mod registry;
pub mod server;
pub mod shutdown;
mod sys;

pub use backend::{listen, start, start_on};
pub use config::{timeout_from_secs, Config, Error};
pub use conn::{CloseReason, State};
pub use kind::BackendKind;
pub use registry::{ConnInfo, Stats, Transition};
pub use server::Server;
pub use shutdown::StopReport;

//! The backends: one [`Server`] trait, the one list of them ([`BackendKind`]),
//! one factory ([`start`]), and the listener and accept helpers they share.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, Error};
use crate::registry::{ConnInfo, Registry, Stats, Transition};
use crate::shutdown::StopReport;

pub mod blocking;
mod driver;
pub mod epoll;
pub mod poll;
pub mod pool;
pub mod tokio_rt;

/// Every backend; the one place that lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// One OS thread per connection.
    Blocking,
    /// A readiness dispatcher and a fixed pool of workers.
    Pool,
    /// One thread, `poll(2)` over every connection.
    Poll,
    /// One thread, edge-triggered epoll through mio.
    Epoll,
    /// A tokio runtime, a task per connection.
    Tokio,
}

impl BackendKind {
    /// Every backend that exists, in presentation order.
    pub const ALL: [BackendKind; 5] =
        [BackendKind::Blocking, BackendKind::Pool, BackendKind::Poll, BackendKind::Epoll, BackendKind::Tokio];

    /// The name used on the command line, in stats and in Python.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Blocking => "blocking",
            BackendKind::Pool => "pool",
            BackendKind::Poll => "poll",
            BackendKind::Epoll => "epoll",
            BackendKind::Tokio => "tokio",
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

/// A running server of any backend.
///
/// # Implementing
///
/// A backend moves bytes between sockets and one [`crate::conn::Conn`] per
/// connection, and does nothing the core decides for it: it reads while
/// `wants_read`, writes `pending` while `wants_write`, wakes by `deadline`
/// and calls `on_timer`, and carries out `action` (half-close, close, abort).
/// It must also:
///
/// - register every accepted connection in its [`Registry`] before its first
///   read, and unregister it right after its fd is closed; a connection over
///   `max_connections` is closed at once without reading;
/// - set `TCP_NODELAY` on every accepted socket, write with `MSG_NOSIGNAL`,
///   and never block a thread in a call that `stop` cannot interrupt;
/// - on EMFILE/ENFILE from `accept`, ignore the listener for 100 ms, then
///   accept until WouldBlock without waiting for readiness; retry
///   ECONNABORTED and EINTR at once; never spin, never exit;
/// - use no CPU while idle (no periodic tick);
/// - name its threads `connlab-<backend>[-n]` and count them with
///   [`Registry::thread_guard`].
///
/// # Stopping
///
/// [`Server::stop`] closes the listener at once, tells every connection
/// ([`crate::conn::Conn::on_stop`]) so idle ones close at once and busy ones
/// drain until the grace ends, joins every thread it started and closes every
/// fd before it returns. A second call returns a zero report. Dropping a
/// server stops it with no grace.
///
/// # Errors
///
/// [`start`] fails with [`Error::Invalid`] naming the bad field of the
/// config, or [`Error::Io`] (naming `port` when the address is in use).
pub trait Server: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The server's registry: its connections, counters and journal.
    fn registry(&self) -> &Registry;

    /// Stops the server (see the trait documentation).
    fn stop(&self, grace: Duration) -> StopReport;

    /// The address the listener is bound to.
    fn local_addr(&self) -> SocketAddr {
        self.registry().stats().address
    }

    /// A snapshot of every counter.
    fn stats(&self) -> Stats {
        self.registry().stats()
    }

    /// Every registered connection.
    fn connections(&self) -> Vec<ConnInfo> {
        self.registry().connections()
    }

    /// The transition journal (only the latest connection from `peer`, if given).
    fn transitions(&self, peer: Option<SocketAddr>) -> Vec<Transition> {
        self.registry().transitions(peer)
    }
}

/// Starts a server of `kind`.
pub fn start(kind: BackendKind, config: Config) -> Result<Box<dyn Server>, Error> {
    config.validate()?;
    let listener = listen(&config)?;
    let address = listener.local_addr().and_then(|a| {
        a.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "listener has no IP address"))
    });
    let address = address.map_err(|source| Error::Io {
        field: "host",
        context: "reading the bound address".into(),
        source,
    })?;
    let registry = Arc::new(Registry::new(kind, address, config.max_connections, config.journal_capacity));
    let server: Box<dyn Server> = match kind {
        BackendKind::Blocking => Box::new(blocking::BlockingServer::start(config, listener, registry)?),
        BackendKind::Pool => Box::new(pool::PoolServer::start(config, listener, registry)?),
        BackendKind::Poll => Box::new(poll::PollServer::start(config, listener, registry)?),
        BackendKind::Epoll => Box::new(epoll::EpollServer::start(config, listener, registry)?),
        BackendKind::Tokio => Box::new(tokio_rt::TokioServer::start(config, listener, registry)?),
    };
    Ok(server)
}

/// Creates the listening socket: `SO_REUSEADDR` (never `SO_REUSEPORT`),
/// non-blocking, close-on-exec, backlog from the config.
fn listen(config: &Config) -> Result<Socket, Error> {
    let addr = SocketAddr::new(config.host, config.port);
    let io_err = |field, what: &str| {
        let context = format!("{what} {addr}");
        move |source| Error::Io { field, context, source }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(io_err("host", "creating a socket for"))?;
    socket.set_reuse_address(true).map_err(io_err("port", "setting SO_REUSEADDR on"))?;
    socket.set_nonblocking(true).map_err(io_err("port", "making non-blocking"))?;
    socket.bind(&addr.into()).map_err(|source| {
        let field = if source.kind() == io::ErrorKind::AddrNotAvailable { "host" } else { "port" };
        Error::Io { field, context: format!("cannot bind {addr}"), source }
    })?;
    socket.listen(config.backlog as i32).map_err(io_err("backlog", "listening on"))?;
    Ok(socket)
}

/// Maps a syscall failure while starting a backend to a start error.
pub(crate) fn start_error(context: &str) -> impl FnOnce(io::Error) -> Error {
    let context = context.to_string();
    move |source| Error::Io { field: "backend", context, source }
}

/// What one `accept` gave.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// A new connection, `TCP_NODELAY` already set.
    Conn(Socket, SocketAddr),
    /// Nothing queued right now.
    Empty,
    /// EMFILE/ENFILE (or another resource error): back off for [`ACCEPT_BACKOFF`].
    BackOff,
}

/// How long the listener is ignored after EMFILE/ENFILE.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts one connection, retrying ECONNABORTED and EINTR and counting
/// every other failure in the registry.
pub(crate) fn accept_one(listener: &Socket, registry: &Registry) -> Accepted {
    loop {
        match listener.accept() {
            Ok((sock, addr)) => {
                let Some(peer) = addr.as_socket() else { continue };
                // A failure here means the connection is already dead; the
                // first read or write reports it as the connection's error.
                let _ = sock.set_tcp_nodelay(true);
                return Accepted::Conn(sock, peer);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                registry.accept_error(&e);
                return Accepted::BackOff;
            }
        }
    }
}

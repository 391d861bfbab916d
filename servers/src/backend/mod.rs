//! The backends and the one factory that starts them ([`start`]).
//!
//! Each backend module says only how its threads wait — a blocking call,
//! `poll(2)`, epoll, a tokio runtime, an epoll loop per shard, io_uring's
//! completions — and hands every connection to the
//! shared driver and every accepted socket to the shared accept gate;
//! `Served` makes each one a [`Server`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, Error};
use crate::gate::Gate;
use crate::kind::BackendKind;
use crate::registry::Registry;
use crate::server::Server;

pub mod blocking;
pub mod epoll;
pub mod poll;
pub mod pool;
pub mod sharded;
pub mod tokio_rt;
pub mod uring;

/// Starts a server of `kind`.
pub fn start(kind: BackendKind, config: Config) -> Result<Box<dyn Server>, Error> {
    config.validate()?;
    let listener = listen(&config)?;
    start_on(kind, config, listener)
}

/// Starts a server of `kind` on a listening socket made elsewhere (by
/// [`listen`], or received from an incumbent in a handoff); `host`, `port`
/// and `backlog` of the config are the socket's own.
pub fn start_on(kind: BackendKind, config: Config, listener: Socket) -> Result<Box<dyn Server>, Error> {
    config.validate()?;
    let address = listener.local_addr().and_then(|a| {
        a.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "listener has no IP address"))
    });
    let address = address.map_err(|source| Error::Io {
        field: "host",
        context: "reading the bound address".into(),
        source,
    })?;
    let registry = Registry::new(kind, address, config.max_connections, config.journal_capacity);
    let gate = Arc::new(Gate::new(Arc::new(registry)));
    let server: Box<dyn Server> = match kind {
        BackendKind::Blocking => Box::new(blocking::start(config, listener, gate)?),
        BackendKind::Pool => Box::new(pool::start(config, listener, gate)?),
        BackendKind::Poll => Box::new(poll::start(config, listener, gate)?),
        BackendKind::Epoll => Box::new(epoll::start(config, listener, gate)?),
        BackendKind::Tokio => Box::new(tokio_rt::start(config, listener, gate)?),
        BackendKind::Sharded => Box::new(sharded::start(config, listener, gate)?),
        BackendKind::Uring => Box::new(uring::start(config, listener, gate)?),
    };
    Ok(server)
}

/// Creates the listening socket: `SO_REUSEADDR` (never `SO_REUSEPORT`),
/// non-blocking, close-on-exec, backlog from the config.
pub fn listen(config: &Config) -> Result<Socket, Error> {
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

//! One proxied connection: dial upstream, then move bytes both ways, each
//! direction between its sockets and its [`Chain`], and end the connection
//! as the chains and the peers say.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::chain::{Action, Chain, Item, Next};
use crate::proxy::Shared;
use crate::stats::Held;
use crate::toxic::{Entry, Stream};

/// The most bytes one read takes: one chunk. A direction starts with
/// [`FIRST_CHUNK`] and doubles its buffer each time a read fills it, so an
/// idle or chatty connection costs the proxy 2 × 4 KiB, a bulk one 2 × 32 KiB.
const CHUNK: usize = 32 * 1024;

/// The read buffer of a new direction.
const FIRST_CHUNK: usize = 4 * 1024;

/// A direction stops reading its source while it holds this much (plus at
/// most one chunk), so a stalled destination or a slow toxic pushes back on
/// the sender through TCP instead of growing the proxy's memory.
const MAX_HELD: usize = 4 * 1024 * 1024;

/// The longest a direction sleeps without looking at its clock again, so a
/// far deadline needs no timer that far out.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// How a direction, then the connection, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The source's EOF was passed on as a half-close: this direction is done,
    /// the other goes on.
    HalfClosed,
    /// End the connection gracefully: FIN to both sides.
    Fin,
    /// Abort the connection: RST to both sides.
    Reset,
}

/// A connection's sockets. Dropping it closes them, with an RST to both
/// sides unless a graceful end was chosen, so a connection the runtime drops
/// at [`crate::Proxy::close`] is reset; and counts the connection closed.
#[derive(Debug)]
pub(crate) struct Sockets {
    /// The accepted client socket.
    client: TcpStream,
    /// The upstream socket, once connected.
    server: Option<TcpStream>,
    /// Close with FIN (linger as usual) rather than RST.
    graceful: bool,
    /// The proxy, for its counters.
    shared: Arc<Shared>,
}

impl Sockets {
    /// Takes charge of an accepted client socket.
    pub(crate) fn new(client: TcpStream, shared: Arc<Shared>) -> Self {
        Sockets { client, server: None, graceful: false, shared }
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        if !self.graceful {
            // Linger 0 turns the close below into an RST, with whatever
            // the socket buffers held dropped.
            let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
            if let Some(server) = &self.server {
                let _ = SockRef::from(server).set_linger(Some(Duration::ZERO));
            }
        }
        self.shared.counters.closed.fetch_add(1, Ordering::AcqRel);
    }
}

/// Serves connection number `number`: dials upstream (on failure the client
/// is reset), relays both ways, and closes both sockets as the relay ended.
pub(crate) async fn serve(mut sockets: Sockets, number: u64) {
    let shared = Arc::clone(&sockets.shared);
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return; // dropping `sockets` resets the client
    };
    // Small writes from a slicer or a bandwidth toxic go out as they are.
    let _ = sockets.client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let server = sockets.server.insert(server);
    let ending = relay(&mut sockets.client, server, number, &shared).await;
    if ending == Ending::Fin {
        // FIN first: a close with unread input would send only an RST.
        let _ = SockRef::from(&sockets.client).shutdown(Shutdown::Write);
        let _ = SockRef::from(&*server).shutdown(Shutdown::Write);
    }
    sockets.graceful = ending != Ending::Reset;
}

/// Runs both directions until both have half-closed, or one ends the
/// connection.
async fn relay(client: &mut TcpStream, server: &mut TcpStream, number: u64, shared: &Shared) -> Ending {
    let (client_in, client_out) = client.split();
    let (server_in, server_out) = server.split();
    let up = pump(client_in, server_out, Stream::Upstream, number, shared);
    let down = pump(server_in, client_out, Stream::Downstream, number, shared);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let ending = tokio::select! {
            ending = &mut up, if !up_done => {
                up_done = true;
                ending
            }
            ending = &mut down, if !down_done => {
                down_done = true;
                ending
            }
        };
        if ending != Ending::HalfClosed || (up_done && down_done) {
            return ending;
        }
    }
}

/// One direction: reads `src` into the chain of `stream`'s toxics (kept in
/// step with the proxy's list as it changes), writes what the chain lets
/// out to `dst`, and carries out what it says. A read or write error ends
/// the connection with an RST: the peer that failed is gone, and the other
/// one should not take the cut stream for a whole one.
async fn pump(
    mut src: ReadHalf<'_>,
    dst: WriteHalf<'_>,
    stream: Stream,
    number: u64,
    shared: &Shared,
) -> Ending {
    let counters = shared.counters.dir(stream);
    let mut held = Held::new(&counters.bytes_held);
    let mut chain = Chain::new(shared.seed, number);
    let mut toxics = shared.toxics.subscribe();
    let mut toxics_open = true;
    let mut buf = vec![0; FIRST_CHUNK];
    let mut src_open = true;
    let mut changed = true;
    loop {
        let now = Instant::now();
        if changed || toxics.has_changed().unwrap_or(false) {
            sync(&mut chain, &mut toxics, stream, now);
        }
        let step = chain.advance(now);
        held.set(chain.held());
        match step.action {
            Some(Action::Reset) => return Ending::Reset,
            Some(Action::End) => return Ending::Fin,
            None => {}
        }
        // Write what is ready until the socket would block.
        loop {
            match chain.next() {
                None => break,
                Some(Next::Write(bytes)) => match dst.try_write(bytes) {
                    Ok(n) => {
                        counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        chain.wrote(n);
                        held.set(chain.held());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Ending::Reset,
                },
                Some(Next::Eof) => {
                    let _ = SockRef::from(dst.as_ref()).shutdown(Shutdown::Write);
                    return Ending::HalfClosed;
                }
                Some(Next::End) => return Ending::Fin,
            }
        }
        let writing = chain.next().is_some();
        let reading = src_open && chain.held() < MAX_HELD;
        let deadline = step.deadline.map(|d| d.min(now + MAX_SLEEP));
        let sleep = tokio::time::sleep_until(deadline.unwrap_or(now).into());
        changed = false;
        tokio::select! {
            biased;
            // Always waited on: a toxic added to an idle connection (a reset
            // or a timeout on its clock) must act without waiting for data.
            result = toxics.changed(), if toxics_open => match result {
                Ok(()) => changed = true,
                Err(_) => toxics_open = false,
            },
            () = sleep, if deadline.is_some() => {}
            result = dst.writable(), if writing => {
                if result.is_err() {
                    return Ending::Reset;
                }
            }
            // An async read, not `readable` + `try_read`: a short read clears
            // the readiness, which saves a read that would only say EAGAIN.
            result = src.read(&mut buf), if reading => {
                match result {
                    Ok(0) => {
                        src_open = false;
                        chain.push(Item::Eof);
                    }
                    Ok(n) => {
                        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        // Without a toxic the chunk goes straight on; only what the
                        // destination does not take now is held (and copied).
                        if toxics.has_changed().unwrap_or(false) {
                            sync(&mut chain, &mut toxics, stream, Instant::now());
                        }
                        let sent = if chain.passthrough() { write_now(&dst, &buf[..n]) } else { Ok(0) };
                        let Ok(sent) = sent else { return Ending::Reset };
                        counters.bytes_out.fetch_add(sent as u64, Ordering::Relaxed);
                        if sent < n {
                            chain.push(Item::Data { bytes: buf[sent..n].to_vec(), arrival: Instant::now() });
                            held.set(chain.held());
                        }
                        if n == buf.len() && n < CHUNK {
                            buf.resize(2 * n, 0);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Ending::Reset,
                }
            }
            // Nothing to wait for, and the proxy is gone: the runtime is
            // about to drop this task.
            else => std::future::pending().await,
        }
    }
}

/// Brings `chain` in step with the proxy's toxics of `stream`.
fn sync(chain: &mut Chain, toxics: &mut watch::Receiver<Vec<Entry>>, stream: Stream, now: Instant) {
    let list = toxics.borrow_and_update();
    let live: Vec<_> = list.iter().filter(|e| e.toxic.stream == stream).collect();
    chain.sync(&live, now);
}

/// Writes as much of `bytes` to `dst` as it takes without blocking.
fn write_now(dst: &WriteHalf<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match dst.try_write(&bytes[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

//! One client connection of a worker: a non-blocking socket registered
//! edge-triggered, the frames it sent and still awaits, and the incremental
//! check of every answer against the frame it echoes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use connlab_servers::codec::{self, Decoded, Decoder};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use socket2::SockRef;

use crate::payload;
use crate::report::ErrorKind;

/// Encoded bytes a link queues in user space before it stops encoding more
/// frames (an open loop's backlog waits as instants, 16 bytes a frame).
const OUT_HIGH: usize = 256 << 10;

/// Size of a worker's read buffer.
pub(crate) const READ_CHUNK: usize = 64 << 10;

/// A client connection.
#[derive(Debug)]
pub(crate) struct Link {
    /// The socket, registered for both edges under this link's token.
    stream: TcpStream,
    /// Numbers this connection in the run; with a frame's sequence number it
    /// seeds the frame's payload.
    uid: u64,
    /// Payload bytes of every frame.
    size: usize,
    /// When the connect began.
    pub opened_at: Instant,
    /// Whether the connect completed.
    connected: bool,
    /// Encoded frames; `out[written..]` is not yet accepted by the socket.
    out: Vec<u8>,
    /// Bytes of `out` the socket accepted.
    written: usize,
    /// Origin (send or intended instant) of every encoded frame not yet
    /// answered, oldest first: the front is the next answer expected.
    inflight: VecDeque<Instant>,
    /// Sequence number of the next frame to encode.
    next_seq: u64,
    /// Sequence number of the frame the next answer echoes (of `inflight`'s front).
    recv_seq: u64,
    /// Parses answers; its `max_frame` is `size`, so a longer header is caught.
    decoder: Decoder,
    /// Body bytes of the current answer already checked.
    body_off: usize,
    /// Since when an answer is owed with none arriving (None: none owed).
    waiting_since: Option<Instant>,
}

impl Link {
    /// Starts a non-blocking connect to `address` and registers it for both
    /// edges under `token`. An error here is a connect failure.
    pub fn open(
        registry: &Registry,
        token: Token,
        address: SocketAddr,
        uid: u64,
        size: usize,
        now: Instant,
    ) -> io::Result<Link> {
        let mut stream = TcpStream::connect(address)?;
        // Every frame is one write that must leave at once: no Nagle delay.
        stream.set_nodelay(true)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Link {
            stream,
            uid,
            size,
            opened_at: now,
            connected: false,
            out: Vec::new(),
            written: 0,
            inflight: VecDeque::new(),
            next_seq: 0,
            recv_seq: 0,
            decoder: Decoder::new(size as u32),
            body_off: 0,
            waiting_since: None,
        })
    }

    /// Whether the connect completed.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// After a readiness event on a connecting link: `Ok(true)` once the
    /// connect completed, `Ok(false)` while it is still in progress.
    pub fn finish_connect(&mut self) -> Result<bool, ErrorKind> {
        if self.connected {
            return Ok(true);
        }
        // mio's recipe: a pending error means the connect failed; no peer
        // address yet means the event was spurious and it is still going on.
        match self.stream.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Err(ErrorKind::Connect),
        }
        match self.stream.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(_) => Err(ErrorKind::Connect),
        }
    }

    /// Frames encoded and not yet answered.
    pub fn owed(&self) -> usize {
        self.inflight.len()
    }

    /// Whether another frame may be encoded without queueing more than
    /// [`OUT_HIGH`] bytes in user space (one always may when none is queued).
    pub fn has_room(&self) -> bool {
        self.out.len() - self.written < OUT_HIGH
    }

    /// Encodes the next frame, whose latency will be measured from `origin`.
    /// It leaves with the next [`Link::flush`].
    pub fn push(&mut self, origin: Instant, now: Instant) {
        let seed = payload::seed(self.uid, self.next_seq);
        self.next_seq += 1;
        self.out.extend_from_slice(&codec::header(self.size as u32));
        let start = self.out.len();
        self.out.resize(start + self.size, 0);
        payload::fill(seed, 0, &mut self.out[start..]);
        self.inflight.push_back(origin);
        self.waiting_since.get_or_insert(now);
    }

    /// Writes queued bytes until none is left or the socket would block (a
    /// writable edge then says when to go on).
    pub fn flush(&mut self) -> Result<(), ErrorKind> {
        while self.written < self.out.len() {
            // std's TcpStream writes with send(MSG_NOSIGNAL): a reset peer
            // comes back as EPIPE, never as SIGPIPE in the host process.
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(ErrorKind::Io),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ErrorKind::of(&e)),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    /// Reads until the socket would block, checking every answer byte;
    /// calls `answered(origin)` for each complete, verified answer.
    ///
    /// A read that returns fewer bytes than asked means the socket is
    /// drained (stream sockets on Linux), which saves the WouldBlock call.
    pub fn read(
        &mut self,
        scratch: &mut Vec<u8>,
        now: Instant,
        mut answered: impl FnMut(Instant),
    ) -> Result<(), ErrorKind> {
        loop {
            scratch.clear();
            scratch.resize(READ_CHUNK, 0);
            match self.stream.read(scratch) {
                Ok(0) => return Err(ErrorKind::Eof),
                Ok(n) => {
                    self.consume(&scratch[..n], now, &mut answered)?;
                    if n < scratch.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ErrorKind::of(&e)),
            }
        }
    }

    /// Checks received bytes against the frames they must echo.
    fn consume(
        &mut self,
        mut data: &[u8],
        now: Instant,
        answered: &mut impl FnMut(Instant),
    ) -> Result<(), ErrorKind> {
        while !data.is_empty() {
            if self.inflight.is_empty() {
                // Bytes that answer no frame of ours.
                return Err(ErrorKind::Corrupt);
            }
            let (n, what) = self.decoder.decode(data);
            data = &data[n..];
            match what {
                Decoded::HeaderPart => {}
                Decoded::Header { len } if len as usize != self.size => return Err(ErrorKind::Corrupt),
                Decoded::Header { len: 0 } => self.answer(now, answered),
                Decoded::Header { .. } => self.body_off = 0,
                Decoded::Body { bytes, done } => {
                    if !payload::matches(payload::seed(self.uid, self.recv_seq), self.body_off, bytes) {
                        return Err(ErrorKind::Corrupt);
                    }
                    self.body_off += bytes.len();
                    if done {
                        self.answer(now, answered);
                    }
                }
                Decoded::TooLarge { .. } => return Err(ErrorKind::Corrupt),
            }
        }
        Ok(())
    }

    /// The front frame's answer is complete and verified.
    fn answer(&mut self, now: Instant, answered: &mut impl FnMut(Instant)) {
        let origin = self.inflight.pop_front().expect("consume checks a frame is owed");
        self.recv_seq += 1;
        self.waiting_since = if self.inflight.is_empty() { None } else { Some(now) };
        answered(origin);
    }

    /// Whether the connect, or an owed answer, made no progress for `timeout`.
    pub fn stalled(&self, now: Instant, timeout: Duration) -> bool {
        let since = if self.connected { self.waiting_since } else { Some(self.opened_at) };
        since.is_some_and(|t| now.saturating_duration_since(t) >= timeout)
    }

    /// Deregisters and closes the connection; returns the origins of the
    /// frames it still owed. `rst` closes abortively (SO_LINGER 0: the peer
    /// sees ECONNRESET and no TIME_WAIT is left here); otherwise the close is
    /// an orderly FIN.
    pub fn close(mut self, registry: &Registry, rst: bool) -> VecDeque<Instant> {
        let _ = registry.deregister(&mut self.stream);
        if rst {
            let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        } else {
            // Harmless if the peer is gone: the close that follows is what counts.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        std::mem::take(&mut self.inflight)
    }
}

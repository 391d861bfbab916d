//! `sharded`: thread per core. One `epoll` loop per shard thread (default:
//! one per core, `workers`), each with its own epoll instance, timers and
//! read buffer; nothing is shared on the per-frame path.
//!
//! The shards share one listening socket, registered in each shard's epoll
//! with `EPOLLEXCLUSIVE`, rather than one `SO_REUSEPORT` socket each: one
//! socket is what a handoff passes on and what `stop` closes with nothing
//! lost (a closed `SO_REUSEPORT` socket resets the connections in its own
//! queue), and the port stays closed to anyone else (a stranger's
//! `SO_REUSEPORT` socket could join the group). `EPOLLEXCLUSIVE` wakes one
//! waiting shard, which accepts until WouldBlock; since the shard first woken
//! would take a whole burst, it deals the accepted connections round robin:
//! its own turn it keeps, the others go to their shard's inbox (a channel
//! and an eventfd, woken once per burst). Admission is the one gate, so
//! `max_connections` is global.
//!
//! A shard leaves its loop only once every shard has closed its listener
//! (none can hand it a connection any more) and its own connections are
//! closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, SendError, Sender};
use socket2::Socket;

use crate::backend::epoll::EventLoop;
use crate::config::{Config, Error};
use crate::gate::Gate;
use crate::kind::BackendKind;
use crate::registry::ConnHandle;
use crate::server::{Running, Served};
use crate::shutdown::ServerThread;
use crate::sys::Waker;

/// A connection accepted by one shard for another.
type Handed = (Socket, ConnHandle);

/// What the shards share: each one's inbox, and how many still accept.
#[derive(Debug)]
struct Peers {
    /// Per shard: where to hand it a connection, and the eventfd that says so.
    inboxes: Vec<(Sender<Handed>, Waker)>,
    /// Shards whose listener is still open.
    accepting: AtomicUsize,
}

/// One shard's place among the others (held by its `EventLoop`).
#[derive(Debug)]
pub(crate) struct Shard {
    /// Its index.
    index: usize,
    /// Every shard's inbox.
    peers: Arc<Peers>,
    /// Connections handed to it.
    inbox: Receiver<Handed>,
    /// Whose turn the next accepted connection is.
    turn: usize,
    /// Shards handed a connection since the last `flush`.
    to_wake: Vec<bool>,
}

impl Shard {
    /// The eventfd its inbox is signalled on.
    pub fn inbox_waker(&self) -> &Waker {
        &self.peers.inboxes[self.index].1
    }

    /// The connections handed to it so far.
    pub fn inbox(&self) -> impl Iterator<Item = Handed> + '_ {
        self.inbox.try_iter()
    }

    /// Whether another shard may still hand it a connection.
    pub fn may_receive(&self) -> bool {
        self.peers.accepting.load(Ordering::Acquire) > 0 || !self.inbox.is_empty()
    }

    /// Its listener is closed; the last shard to get there wakes every
    /// inbox, so each shard sees that nothing more will come.
    pub fn stopped_accepting(&self) {
        if self.peers.accepting.fetch_sub(1, Ordering::AcqRel) == 1 {
            for (_, waker) in &self.peers.inboxes {
                let _ = waker.wake();
            }
        }
    }

    /// Deals a connection just accepted: back to the caller if it is this
    /// shard's turn, else into the turn's inbox (`None`).
    pub fn deal(&mut self, sock: Socket, handle: ConnHandle) -> Option<Handed> {
        let to = self.turn;
        self.turn = (self.turn + 1) % self.peers.inboxes.len();
        if to == self.index {
            return Some((sock, handle));
        }
        match self.peers.inboxes[to].0.send((sock, handle)) {
            Ok(()) => {
                self.to_wake[to] = true;
                None
            }
            // That shard has left its loop (which it does only once no shard
            // accepts, so never while this one does): served here instead.
            Err(SendError(back)) => Some(back),
        }
    }

    /// Wakes the shards handed connections since the last call.
    pub fn flush(&mut self) {
        for (to, wake) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(wake) {
                let _ = self.peers.inboxes[to].1.wake();
            }
        }
    }
}

/// The shard threads and the stop eventfd they all watch.
#[derive(Debug)]
pub(crate) struct Shards {
    /// One per shard.
    threads: Vec<ServerThread>,
    /// Readable once stop began.
    stop: Waker,
}

impl Running for Shards {
    fn take_down(self) {
        self.stop.wake().expect("writing to an eventfd cannot fail");
        for thread in self.threads {
            thread.join();
        }
    }
}

/// Starts `config.workers` shards on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<Shards>, Error> {
    let n = config.workers;
    let stop = Waker::new().map_err(Error::starting("creating the stop eventfd"))?;
    let mut inboxes = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = crossbeam_channel::unbounded();
        inboxes.push((tx, Waker::new().map_err(Error::starting("creating a shard's inbox eventfd"))?));
        receivers.push(rx);
    }
    let peers = Arc::new(Peers { inboxes, accepting: AtomicUsize::new(n) });
    let mut loops = Vec::with_capacity(n);
    for (index, inbox) in receivers.into_iter().enumerate() {
        // Each shard closes its own descriptor of the one socket.
        let mine = listener.try_clone().map_err(Error::starting("duplicating the listener for a shard"))?;
        let shard = Shard { index, peers: Arc::clone(&peers), inbox, turn: index, to_wake: vec![false; n] };
        loops.push(EventLoop::new(&config, mine, Arc::clone(&gate), &stop, Some(shard))?);
    }
    drop(listener);
    let mut threads = Vec::with_capacity(n);
    let mut loops = loops.into_iter().enumerate();
    while let Some((index, event_loop)) = loops.next() {
        match ServerThread::spawn(format!("connlab-sharded-{index}"), None, move || event_loop.run()) {
            Ok(thread) => threads.push(thread),
            Err(source) => {
                // Those started stop as at `stop`; those not started never accept.
                gate.close(Instant::now(), false);
                for _ in index..n {
                    peers.accepting.fetch_sub(1, Ordering::AcqRel);
                }
                drop(loops);
                let _ = stop.wake();
                Shards { threads, stop }.take_down();
                return Err(Error::starting("spawning a shard thread")(source));
            }
        }
    }
    Ok(Served::new(BackendKind::Sharded, gate, Shards { threads, stop }))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use socket2::{Domain, Type};

    use super::*;
    use crate::registry::Registry;

    /// `n` shards' places, as `start` makes them.
    fn shards(n: usize) -> Vec<Shard> {
        let mut inboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            inboxes.push((tx, Waker::new().unwrap()));
            receivers.push(rx);
        }
        let peers = Arc::new(Peers { inboxes, accepting: AtomicUsize::new(n) });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Shard {
                index,
                peers: Arc::clone(&peers),
                inbox,
                turn: index,
                to_wake: vec![false; n],
            })
            .collect()
    }

    #[test]
    fn a_burst_is_dealt_round_robin_and_each_shard_woken_once() {
        let registry =
            Arc::new(Registry::new(BackendKind::Sharded, SocketAddr::from(([127, 0, 0, 1], 1)), 100, 0));
        let mut all = shards(3);
        let mut kept = 0;
        for _ in 0..9 {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let handle = registry.register(SocketAddr::from(([127, 0, 0, 1], 2))).unwrap();
            kept += usize::from(all[1].deal(sock, handle).is_some());
        }
        all[1].flush();
        assert_eq!(kept, 3, "its own turn every third connection");
        // In the inboxes, not yet in a shard's core: active, and in Connecting.
        let stats = registry.stats();
        assert_eq!((stats.active, stats.by_state.iter().sum::<u64>()), (9, 9), "{stats:?}");
        for (i, shard) in all.iter().enumerate() {
            let got = shard.inbox().count();
            assert_eq!(got, if i == 1 { 0 } else { 3 }, "shard {i}");
        }
    }

    #[test]
    fn the_last_shard_to_stop_accepting_ends_every_inbox() {
        let all = shards(2);
        assert!(all.iter().all(Shard::may_receive));
        all[0].stopped_accepting();
        assert!(all.iter().all(Shard::may_receive), "shard 1 may still hand over a connection");
        all[1].stopped_accepting();
        assert!(!all.iter().any(Shard::may_receive));
    }
}

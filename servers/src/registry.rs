//! The registry: the connection table, every counter of `stats()`, and the
//! transition journal.
//!
//! Counters are atomics, touched a few times per read or write, never under a
//! lock; the table's lock is taken only to register and unregister, and the
//! journal's only when it is on (`journal_capacity > 0`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::conn::{CloseReason, Conn, Observer, State};
use crate::kind::BackendKind;

/// A snapshot of every counter (the `stats()` of DESIGN.md §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Which backend serves.
    pub backend: BackendKind,
    /// The listener's address.
    pub address: SocketAddr,
    /// Registered connections (accepted, not rejected, fd not closed yet).
    pub active: u64,
    /// Every accepted connection, rejected ones included.
    pub accepted: u64,
    /// Every closed connection, rejected ones included.
    pub closed: u64,
    /// Connections refused over `max_connections`.
    pub rejected: u64,
    /// Highest `active` ever seen.
    pub peak_active: u64,
    /// Registered connections per state, indexed like [`State::ALL`].
    pub by_state: [u64; 5],
    /// Closed connections per reason, indexed like [`CloseReason::ALL`].
    pub closed_by: [u64; 9],
    /// Whole frames received.
    pub frames_in: u64,
    /// Answers completely written.
    pub frames_out: u64,
    /// Bytes read from connections.
    pub bytes_in: u64,
    /// Bytes written to connections.
    pub bytes_out: u64,
    /// Partial frames discarded at close.
    pub truncated_frames: u64,
    /// `accept` failures with EMFILE or ENFILE.
    pub accept_errors_emfile: u64,
    /// Other `accept` failures (not WouldBlock, EINTR or ECONNABORTED).
    pub accept_errors_other: u64,
    /// Server threads alive now.
    pub threads: u64,
    /// Journal entries overwritten because the ring was full.
    pub journal_dropped: u64,
}

/// One connection as `connections()` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnInfo {
    /// Registry id, unique for the server's life.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// Current state.
    pub state: State,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Time since accept.
    pub age: Duration,
    /// Time since the last byte read or written.
    pub idle: Duration,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The connection's registry id.
    pub conn_id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The state left (`None` for the first entry).
    pub from: Option<State>,
    /// The state entered.
    pub to: State,
    /// The close reason, on the entry into `Closing`.
    pub reason: Option<CloseReason>,
    /// Time since the server started.
    pub at: Duration,
}

/// A connection's shared record: what `connections()` shows while it lives.
#[derive(Debug)]
struct Entry {
    /// Registry id.
    id: u64,
    /// The client's address.
    peer: SocketAddr,
    /// When it was accepted.
    created: Instant,
    /// Current state (`State as u8`), written only by the owning backend.
    state: AtomicU8,
    /// Bytes read.
    bytes_in: AtomicU64,
    /// Bytes written.
    bytes_out: AtomicU64,
    /// Nanoseconds after `created` of the last byte moved.
    last_io_ns: AtomicU64,
}

/// The bounded ring of transitions.
#[derive(Debug)]
struct Journal {
    /// Entries, oldest first; never longer than `capacity`.
    ring: VecDeque<Transition>,
    /// Most entries kept; 0 turns the journal off.
    capacity: usize,
    /// Entries dropped from the front when the ring was full.
    dropped: u64,
}

/// Monotonic counters; `Relaxed` is enough since readers want a snapshot
/// that is exact only at quiescence.
#[derive(Debug, Default)]
struct Counters {
    /// Registered connections; admission compares it with `max_connections`.
    active: AtomicU64,
    /// Every accepted connection, rejected ones included.
    accepted: AtomicU64,
    /// Every closed connection, rejected ones included.
    closed: AtomicU64,
    /// Connections refused over `max_connections`.
    rejected: AtomicU64,
    /// Highest `active` reached.
    peak_active: AtomicU64,
    /// Registered connections per state (indexed by `State as usize`).
    by_state: [AtomicU64; 5],
    /// Closed connections per reason (indexed by `CloseReason as usize`).
    closed_by: [AtomicU64; 9],
    /// Whole frames received.
    frames_in: AtomicU64,
    /// Answers whose last byte was written.
    frames_out: AtomicU64,
    /// Bytes read.
    bytes_in: AtomicU64,
    /// Bytes written.
    bytes_out: AtomicU64,
    /// Partial frames discarded at close.
    truncated: AtomicU64,
    /// `accept` failures with EMFILE or ENFILE.
    emfile: AtomicU64,
    /// Other `accept` failures.
    accept_other: AtomicU64,
    /// Server threads alive.
    threads: AtomicU64,
    /// Connections aborted when a stop's grace ended.
    forced: AtomicU64,
}

/// The connection table, counters and journal of one server.
#[derive(Debug)]
pub struct Registry {
    /// Which backend this registry belongs to.
    backend: BackendKind,
    /// The listener's address.
    address: SocketAddr,
    /// When the server started: the journal's time origin.
    started: Instant,
    /// Most connections registered at once.
    max_connections: u64,
    /// Next registry id.
    next_id: AtomicU64,
    /// Live connections by id.
    table: Mutex<HashMap<u64, Arc<Entry>>>,
    /// Every counter.
    counters: Counters,
    /// The transition journal; `None` when `journal_capacity` is 0.
    journal: Option<Mutex<Journal>>,
    /// When the first connection was admitted (a handoff's successor reports
    /// the time from the take-over request to it).
    first_admitted: OnceLock<Instant>,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// data consistent even if a thread panicked inside it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// An empty registry for a server listening on `address`.
    pub fn new(
        backend: BackendKind,
        address: SocketAddr,
        max_connections: usize,
        journal_capacity: usize,
    ) -> Self {
        let journal = (journal_capacity > 0).then(|| {
            Mutex::new(Journal {
                ring: VecDeque::with_capacity(journal_capacity.min(1 << 16)),
                capacity: journal_capacity,
                dropped: 0,
            })
        });
        Registry {
            backend,
            address,
            started: Instant::now(),
            max_connections: max_connections as u64,
            next_id: AtomicU64::new(1),
            table: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            journal,
            first_admitted: OnceLock::new(),
        }
    }

    /// When the first connection was admitted, if one was.
    pub fn first_admitted(&self) -> Option<Instant> {
        self.first_admitted.get().copied()
    }

    /// Registers a connection just accepted from `peer`, or counts it as
    /// rejected (accepted, closed, `closed_by.rejected`) when `max_connections`
    /// are registered already; the caller then closes it without reading.
    pub fn register(self: &Arc<Self>, peer: SocketAddr) -> Option<ConnHandle> {
        let c = &self.counters;
        let admitted =
            c.active.fetch_update(Relaxed, Relaxed, |n| (n < self.max_connections).then_some(n + 1));
        c.accepted.fetch_add(1, Relaxed);
        let Ok(before) = admitted else {
            c.rejected.fetch_add(1, Relaxed);
            c.closed_by[CloseReason::Rejected as usize].fetch_add(1, Relaxed);
            c.closed.fetch_add(1, Relaxed);
            return None;
        };
        c.peak_active.fetch_max(before + 1, Relaxed);
        // Counted in Connecting from here, not from the core's first journal
        // entry: a connection dealt to another thread (sharded) is active
        // before that thread builds its core.
        c.by_state[State::Connecting as usize].fetch_add(1, Relaxed);
        self.first_admitted.get_or_init(Instant::now);
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Relaxed),
            peer,
            created: Instant::now(),
            state: AtomicU8::new(State::Connecting as u8),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_io_ns: AtomicU64::new(0),
        });
        lock(&self.table).insert(entry.id, Arc::clone(&entry));
        Some(ConnHandle { registry: Arc::clone(self), entry })
    }

    /// Counts an `accept` failure.
    pub fn accept_error(&self, err: &std::io::Error) {
        let emfile = matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        let counter = if emfile { &self.counters.emfile } else { &self.counters.accept_other };
        counter.fetch_add(1, Relaxed);
    }

    /// Registered connections now.
    pub fn active(&self) -> u64 {
        self.counters.active.load(Relaxed)
    }

    /// Connections aborted when a stop's grace ended.
    pub fn forced(&self) -> u64 {
        self.counters.forced.load(Relaxed)
    }

    /// Counts a server thread for its lifetime (drop the guard at its end).
    pub fn thread_guard(self: &Arc<Self>) -> ThreadGuard {
        self.thread_started();
        ThreadGuard(Arc::clone(self))
    }

    /// Counts a server thread that starts, for threads whose start and end
    /// are callbacks (a tokio runtime's) rather than a scope that can hold a
    /// [`ThreadGuard`]; pair each call with [`Registry::thread_stopped`].
    pub(crate) fn thread_started(&self) {
        self.counters.threads.fetch_add(1, Relaxed);
    }

    /// Uncounts a thread counted by [`Registry::thread_started`].
    pub(crate) fn thread_stopped(&self) {
        self.counters.threads.fetch_sub(1, Relaxed);
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Relaxed);
        Stats {
            backend: self.backend,
            address: self.address,
            active: load(&c.active),
            accepted: load(&c.accepted),
            closed: load(&c.closed),
            rejected: load(&c.rejected),
            peak_active: load(&c.peak_active),
            by_state: c.by_state.each_ref().map(load),
            closed_by: c.closed_by.each_ref().map(load),
            frames_in: load(&c.frames_in),
            frames_out: load(&c.frames_out),
            bytes_in: load(&c.bytes_in),
            bytes_out: load(&c.bytes_out),
            truncated_frames: load(&c.truncated),
            accept_errors_emfile: load(&c.emfile),
            accept_errors_other: load(&c.accept_other),
            threads: load(&c.threads),
            journal_dropped: self.journal.as_ref().map_or(0, |j| lock(j).dropped),
        }
    }

    /// Every registered connection.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let now = Instant::now();
        let mut list: Vec<ConnInfo> = lock(&self.table)
            .values()
            .map(|e| {
                let age = now.saturating_duration_since(e.created);
                let last_io = Duration::from_nanos(e.last_io_ns.load(Relaxed));
                ConnInfo {
                    id: e.id,
                    peer: e.peer,
                    state: State::ALL[e.state.load(Relaxed) as usize],
                    bytes_in: e.bytes_in.load(Relaxed),
                    bytes_out: e.bytes_out.load(Relaxed),
                    age,
                    idle: age.saturating_sub(last_io),
                }
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// The journal, oldest first; with `peer`, only the entries of the latest
    /// connection from that address.
    pub fn transitions(&self, peer: Option<SocketAddr>) -> Vec<Transition> {
        let Some(journal) = &self.journal else { return Vec::new() };
        let journal = lock(journal);
        match peer {
            None => journal.ring.iter().cloned().collect(),
            Some(peer) => {
                let latest = journal.ring.iter().filter(|t| t.peer == peer).map(|t| t.conn_id).max();
                journal.ring.iter().filter(|t| Some(t.conn_id) == latest).cloned().collect()
            }
        }
    }

    fn journal(
        &self,
        entry: &Entry,
        from: Option<State>,
        to: State,
        reason: Option<CloseReason>,
        now: Instant,
    ) {
        let Some(journal) = &self.journal else { return };
        let t = Transition {
            conn_id: entry.id,
            peer: entry.peer,
            from,
            to,
            reason,
            at: now.saturating_duration_since(self.started),
        };
        let mut j = lock(journal);
        if j.ring.len() == j.capacity {
            j.ring.pop_front();
            j.dropped += 1;
        }
        j.ring.push_back(t);
    }
}

/// Keeps `stats()["threads"]` counting one thread while alive.
#[derive(Debug)]
pub struct ThreadGuard(Arc<Registry>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.0.thread_stopped();
    }
}

/// A registered connection: the [`Observer`] its [`Conn`] reports to. Give it
/// back with [`ConnHandle::unregister`] once the fd is closed.
#[derive(Debug)]
pub struct ConnHandle {
    /// The registry the connection is in.
    registry: Arc<Registry>,
    /// Its record in the table.
    entry: Arc<Entry>,
}

impl ConnHandle {
    /// The connection's registry id.
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    /// Removes the connection after its fd was closed, counting its reason.
    pub fn unregister(self, conn: &Conn) {
        let c = &self.registry.counters;
        let reason = conn.close_reason().unwrap_or(CloseReason::IoError);
        lock(&self.registry.table).remove(&self.entry.id);
        c.by_state[conn.state() as usize].fetch_sub(1, Relaxed);
        c.closed_by[reason as usize].fetch_add(1, Relaxed);
        if conn.forced() {
            c.forced.fetch_add(1, Relaxed);
        }
        c.closed.fetch_add(1, Relaxed);
        c.active.fetch_sub(1, Relaxed);
    }

    fn touch(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.entry.created).as_nanos() as u64;
        self.entry.last_io_ns.store(ns, Relaxed);
    }
}

impl Observer for ConnHandle {
    fn transition(&mut self, from: Option<State>, to: State, reason: Option<CloseReason>, now: Instant) {
        let c = &self.registry.counters;
        // The first entry, None→Connecting, was counted at registration.
        if let Some(from) = from {
            c.by_state[from as usize].fetch_sub(1, Relaxed);
            c.by_state[to as usize].fetch_add(1, Relaxed);
        }
        self.entry.state.store(to as u8, Relaxed);
        self.registry.journal(&self.entry, from, to, reason, now);
    }

    fn bytes_in(&mut self, n: usize, now: Instant) {
        self.registry.counters.bytes_in.fetch_add(n as u64, Relaxed);
        self.entry.bytes_in.fetch_add(n as u64, Relaxed);
        self.touch(now);
    }

    fn bytes_out(&mut self, n: usize, now: Instant) {
        self.registry.counters.bytes_out.fetch_add(n as u64, Relaxed);
        self.entry.bytes_out.fetch_add(n as u64, Relaxed);
        self.touch(now);
    }

    fn frame_in(&mut self) {
        self.registry.counters.frames_in.fetch_add(1, Relaxed);
    }

    fn frames_out(&mut self, n: u64) {
        self.registry.counters.frames_out.fetch_add(n, Relaxed);
    }

    fn truncated(&mut self) {
        self.registry.counters.truncated.fetch_add(1, Relaxed);
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
    assert_send_sync::<ConnHandle>();
};

//! `pool`: half-sync/half-async. One dispatcher thread waits for readiness
//! over every idle connection and hands a ready one to a fixed pool of
//! workers; the worker moves bytes until the socket would block, then gives
//! the connection back and re-arms it.
//!
//! Connections are registered `EPOLLONESHOT`, so a connection is in exactly
//! one place at a time — the table (idle, armed) or one worker (busy) — and
//! two workers never serve it at once. Threads are bounded (workers + 1),
//! and an idle connection holds no thread, so idle clients cannot starve a
//! new one. The worker that woke for a connection keeps it until it would
//! block: a hand-off costs a cross-CPU wake-up, not one per frame.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use slab::Slab;
use socket2::Socket;

use super::driver::{self, Interest, Link, Next, Timers, READ_CHUNK};
use super::{accept_one, start_error, Accepted, BackendKind, Server, ACCEPT_BACKOFF};
use crate::config::{Config, Error};
use crate::registry::Registry;
use crate::shutdown::{self, ServerThread, StopPoint, StopReport};
use crate::sys::{self, Epoll, Waker};

/// epoll data of the stop eventfd; connections use their slab key.
const STOP: u64 = u64::MAX;
/// epoll data of the workers' eventfd that wakes the dispatcher.
const NOTIFY: u64 = u64::MAX - 1;
/// epoll data of the listener.
const LISTENER: u64 = u64::MAX - 2;

/// Where a connection is.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "boxing the link would allocate on every hand-off")]
enum Slot {
    /// In the table, armed in epoll.
    Idle(Link),
    /// With a worker. `timer_lost` is set when its heap entry came due
    /// meanwhile: the worker must then schedule it afresh.
    Busy { timer_lost: bool },
}

/// The connection table, shared by the dispatcher and the workers.
#[derive(Debug, Default)]
struct Table {
    /// Every open connection.
    slots: Slab<Slot>,
    /// Deadlines of idle connections.
    timers: Timers,
    /// When the dispatcher will wake at the latest; a worker scheduling an
    /// earlier deadline wakes it.
    planned_wake: Option<Instant>,
}

/// A ready connection on its way to a worker.
#[derive(Debug)]
struct Job {
    /// Its slab key.
    key: usize,
    /// The connection.
    link: Link,
    /// What epoll reported (none for a timer or the stop sweep).
    readable: bool,
    /// What epoll reported.
    writable: bool,
    /// EPOLLHUP or EPOLLERR.
    hangup: bool,
}

/// What the dispatcher, the workers and `stop` share.
#[derive(Debug)]
struct Shared {
    /// The server's registry.
    registry: Arc<Registry>,
    /// Limits, workers, stack size.
    config: Config,
    /// Readiness of the listener, the eventfds and every idle connection.
    epoll: Epoll,
    /// Readable once `stop` began.
    stop: Waker,
    /// Workers write it to wake the dispatcher.
    notify: Waker,
    /// The grace end as `stop` asked it.
    grace_asked: OnceLock<Instant>,
    /// The grace end once the listener is closed: connections see the stop
    /// from then on.
    grace_end: OnceLock<Instant>,
    /// Counts when the listener closed.
    stop_point: StopPoint,
    /// The connections.
    table: Mutex<Table>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `pool` backend.
#[derive(Debug)]
pub struct PoolServer {
    /// The server's registry (also in `Shared`, which `stop` drops).
    registry: Arc<Registry>,
    /// The threads and what they share; taken by `stop`.
    running: Mutex<Option<Running>>,
}

/// A running pool server: its threads and what they share.
#[derive(Debug)]
struct Running {
    /// State shared with the threads; the last reference, once they are
    /// gone, so dropping it closes the epoll and eventfd fds.
    shared: Arc<Shared>,
    /// The dispatcher.
    dispatcher: ServerThread,
    /// The workers.
    workers: threadpool::ThreadPool,
    /// Kernel ids of the workers, for waiting until they are gone.
    worker_tids: Arc<Mutex<Vec<libc::pid_t>>>,
}

impl PoolServer {
    /// Starts the dispatcher and the workers on `listener`.
    pub(super) fn start(config: Config, listener: Socket, registry: Arc<Registry>) -> Result<Self, Error> {
        let epoll = Epoll::new().map_err(start_error("creating the epoll instance"))?;
        let stop = Waker::new().map_err(start_error("creating the stop eventfd"))?;
        let notify = Waker::new().map_err(start_error("creating the notify eventfd"))?;
        let level = libc::EPOLLIN as u32;
        epoll.add(stop.raw(), level, STOP).map_err(start_error("registering the stop eventfd"))?;
        epoll.add(notify.raw(), level, NOTIFY).map_err(start_error("registering the notify eventfd"))?;
        epoll.add(listener.as_raw_fd(), level, LISTENER).map_err(start_error("registering the listener"))?;
        let workers = config.workers;
        let stack = config.thread_stack.max(256 << 10);
        let shared = Arc::new(Shared {
            registry: Arc::clone(&registry),
            config,
            epoll,
            stop,
            notify,
            grace_asked: OnceLock::new(),
            grace_end: OnceLock::new(),
            stop_point: StopPoint::default(),
            table: Mutex::new(Table::default()),
        });
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let pool = threadpool::Builder::new()
            .num_threads(workers)
            .thread_name("connlab-pool".into())
            .thread_stack_size(stack)
            .build();
        let worker_tids = Arc::new(Mutex::new(Vec::with_capacity(workers)));
        for _ in 0..workers {
            let (shared, jobs, tids) = (Arc::clone(&shared), jobs_rx.clone(), Arc::clone(&worker_tids));
            pool.execute(move || {
                tids.lock().unwrap_or_else(|e| e.into_inner()).push(sys::gettid());
                work(&shared, &jobs);
            });
        }
        drop(jobs_rx);
        let dispatcher = {
            let shared = Arc::clone(&shared);
            ServerThread::spawn("connlab-pool".into(), None, move || {
                Dispatcher::new(&shared, listener, jobs_tx).run()
            })
            .map_err(start_error("spawning the dispatcher thread"))?
        };
        let running = Running { shared, dispatcher, workers: pool, worker_tids };
        Ok(PoolServer { registry, running: Mutex::new(Some(running)) })
    }
}

impl Server for PoolServer {
    fn kind(&self) -> BackendKind {
        BackendKind::Pool
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn stop(&self, grace: Duration) -> StopReport {
        let started = Instant::now();
        let Some(running) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return StopReport::default();
        };
        let shared = running.shared;
        let _ = shared.grace_asked.set(crate::shutdown::grace_end(started, grace));
        shared.stop.wake().expect("writing to an eventfd cannot fail");
        // The dispatcher closes the listener, lets every connection drain or
        // be forced, and returns once the table is empty; dropping its job
        // sender ends the workers' loops.
        running.dispatcher.join();
        running.workers.join();
        drop(running.workers); // its threads exit once their job queue closes
        for tid in running.worker_tids.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            shutdown::wait_gone(tid);
        }
        let report = shared.stop_point.report(&self.registry, started);
        debug_assert_eq!(Arc::strong_count(&shared), 1, "every thread dropped its reference");
        drop(shared); // closes the epoll instance and both eventfds
        report
    }
}

impl Drop for PoolServer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The dispatcher's state.
struct Dispatcher<'a> {
    /// Shared with the workers and `stop`.
    shared: &'a Shared,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// Where ready connections go.
    jobs: Sender<Job>,
    /// While set, the listener is out of the epoll set (EMFILE back-off).
    backoff_until: Option<Instant>,
    /// Whether stop began.
    stopping: bool,
}

impl<'a> Dispatcher<'a> {
    fn new(shared: &'a Shared, listener: Socket, jobs: Sender<Job>) -> Self {
        Dispatcher { shared, listener: Some(listener), jobs, backoff_until: None, stopping: false }
    }

    fn run(mut self) {
        let _alive = self.shared.registry.thread_guard();
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        loop {
            let wake_at = {
                let mut table = self.shared.table();
                if self.listener.is_none() && table.slots.is_empty() {
                    break;
                }
                let wake_at = [table.timers.next(), self.backoff_until].into_iter().flatten().min();
                table.planned_wake = wake_at;
                wake_at
            };
            match self.shared.epoll.wait(&mut events, driver::until(wake_at, Instant::now())) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Only a lack of kernel memory (ENOMEM) gets here: wait as
                // for EMFILE rather than spin or give up.
                Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
            }
            for event in &events {
                let (flags, data) = (event.events, event.u64);
                match data {
                    STOP => self.stopping = true,
                    NOTIFY => self.shared.notify.drain(),
                    LISTENER => self.accept_all(),
                    key => {
                        let hangup = flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                        let readable = flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                        let writable = flags & libc::EPOLLOUT as u32 != 0;
                        self.dispatch(key as usize, readable, writable, hangup);
                    }
                }
            }
            let now = Instant::now();
            if self.backoff_until.is_some_and(|until| until <= now) {
                self.backoff_until = None;
                if let Some(listener) = &self.listener {
                    let _ = self.shared.epoll.add(listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER);
                }
                self.accept_all();
            }
            self.fire_timers(now);
            if self.stopping && self.listener.is_some() {
                self.close_listener();
            }
        }
        // Dropping `self.jobs` here ends the workers' loops.
    }

    /// Hands the idle connection in `key` to a worker (one-shot: epoll will
    /// not report it again until the worker re-arms it).
    fn dispatch(&self, key: usize, readable: bool, writable: bool, hangup: bool) {
        let link = {
            let mut table = self.shared.table();
            match table.slots.get_mut(key) {
                Some(slot @ Slot::Idle(_)) => match std::mem::replace(slot, Slot::Busy { timer_lost: false })
                {
                    Slot::Idle(link) => link,
                    Slot::Busy { .. } => unreachable!("matched Idle"),
                },
                // A hang-up reported while a worker holds it: the worker sees
                // it on its next read or write.
                _ => return,
            }
        };
        self.send(Job { key, link, readable, writable, hangup });
    }

    fn send(&self, job: Job) {
        // The workers outlive the dispatcher, so the channel is open.
        self.jobs.send(job).expect("workers are running");
    }

    /// Sends every idle connection whose deadline came to a worker.
    fn fire_timers(&self, now: Instant) {
        let mut due = Vec::new();
        {
            let mut table = self.shared.table();
            let table = &mut *table;
            while let Some((key, id, at)) = table.timers.pop_due(now) {
                match table.slots.get_mut(key) {
                    Some(Slot::Idle(link)) => due.extend(Timers::claim(link, id, at).then_some(key)),
                    Some(Slot::Busy { timer_lost }) => *timer_lost = true,
                    None => {}
                }
            }
        }
        for key in due {
            self.dispatch(key, false, false, false);
        }
    }

    /// Stop step 1, then 2–4: close the listener, record the counts, publish
    /// the grace, and send every idle connection to a worker to see it.
    /// Busy ones see it when their worker gives them back (under the same
    /// lock, so none is missed).
    fn close_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.shared.epoll.delete(listener.as_raw_fd());
        }
        let _ = self.shared.epoll.delete(self.shared.stop.raw());
        self.shared.stop_point.record(&self.shared.registry);
        let idle: Vec<usize> = {
            let table = self.shared.table();
            let grace_end = self.shared.grace_asked.get().copied().unwrap_or_else(Instant::now);
            let _ = self.shared.grace_end.set(grace_end);
            table.slots.iter().filter(|(_, slot)| matches!(slot, Slot::Idle(_))).map(|(key, _)| key).collect()
        };
        for key in idle {
            self.dispatch(key, false, false, false);
        }
    }

    /// Accepts until WouldBlock (or a resource error starts a back-off).
    fn accept_all(&mut self) {
        if self.backoff_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else { return };
            match accept_one(listener, &self.shared.registry) {
                Accepted::Conn(sock, peer) => {
                    let limits = self.shared.config.limits();
                    let Some(link) = Link::admit(&self.shared.registry, limits, sock, peer) else {
                        continue; // over max_connections: closed without reading
                    };
                    let fd = link.fd();
                    let key = self.shared.table().slots.insert(Slot::Busy { timer_lost: false });
                    // Registered disarmed; the worker arms it for what the
                    // core wants after its first drive.
                    match self.shared.epoll.add(fd, libc::EPOLLONESHOT as u32, key as u64) {
                        Ok(()) => self.send(Job { key, link, readable: true, writable: true, hangup: false }),
                        Err(err) => {
                            self.shared.table().slots.remove(key);
                            link.fail(&err);
                        }
                    }
                }
                Accepted::Empty => return,
                Accepted::BackOff => {
                    // Level-triggered: the listener leaves the set, or every
                    // wait would return at once for it.
                    let _ = self.shared.epoll.delete(listener.as_raw_fd());
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }
}

/// A worker: serves connections from `jobs` until the dispatcher is gone.
fn work(shared: &Shared, jobs: &Receiver<Job>) {
    let _alive = shared.registry.thread_guard();
    let mut scratch: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    for Job { key, mut link, readable, writable, hangup } in jobs.iter() {
        link.ready(readable, writable, false);
        let mut hangup = hangup;
        loop {
            let next = link.drive(&mut scratch, shared.grace_end.get().copied(), hangup);
            hangup = false;
            let mut guard = shared.table();
            let Next::Wait(Interest { read, write, deadline }) = next else {
                guard.slots.remove(key);
                drop(guard);
                if shared.grace_end.get().is_some() {
                    shared.notify.wake().expect("writing to an eventfd cannot fail");
                }
                break;
            };
            if shared.grace_end.get().is_some() && !link.stop_seen() {
                continue; // stop began while it was busy: let it see the stop
            }
            let table = &mut *guard;
            if let Some(Slot::Busy { timer_lost: true }) = table.slots.get(key) {
                link.scheduled = None;
            }
            let earlier = deadline.is_some_and(|at| table.planned_wake.is_none_or(|wake| at < wake));
            table.timers.schedule(key, &mut link, deadline);
            let mut events = libc::EPOLLONESHOT as u32;
            if read {
                events |= libc::EPOLLIN as u32;
            }
            if write {
                events |= libc::EPOLLOUT as u32;
            }
            let fd = link.fd();
            table.slots[key] = Slot::Idle(link);
            // Re-armed under the lock: an event firing at once finds it idle.
            if let Err(err) = shared.epoll.modify(fd, events, key as u64) {
                let Some(Slot::Idle(link)) = table.slots.try_remove(key) else { unreachable!("just put") };
                link.fail(&err);
            }
            drop(guard);
            if earlier {
                shared.notify.wake().expect("writing to an eventfd cannot fail");
            }
            break;
        }
    }
}

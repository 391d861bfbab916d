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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use slab::Slab;
use socket2::Socket;

use crate::config::{Config, Error};
use crate::conn::Limits;
use crate::driver::{self, Link, Next, Timers, READ_CHUNK};
use crate::gate::{self, AcceptEnd, Acceptor, Gate};
use crate::kind::BackendKind;
use crate::server::{LoopThread, Served};
use crate::shutdown::Tids;
use crate::sys::{Epoll, Waker};

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
    Idle(Link<Socket>),
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

/// A ready connection on its way to a worker: its slab key, the link (with
/// what epoll reported recorded), and whether epoll reported a hang-up.
type Job = (usize, Link<Socket>, bool);

/// What the dispatcher, the workers and `stop` share.
#[derive(Debug)]
struct Shared {
    /// Admission and the published stop.
    gate: Arc<Gate>,
    /// Per-connection limits.
    limits: Limits,
    /// Readiness of the listener, the eventfds and every idle connection.
    epoll: Epoll,
    /// Workers write it to wake the dispatcher.
    notify: Waker,
    /// The connections.
    table: Mutex<Table>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the dispatcher, which owns the workers, on `listener`.
pub(crate) fn start(config: Config, listener: Socket, gate: Arc<Gate>) -> Result<Served<LoopThread>, Error> {
    let epoll = Epoll::new().map_err(Error::starting("creating the epoll instance"))?;
    let stop = Waker::new().map_err(Error::starting("creating the stop eventfd"))?;
    let notify = Waker::new().map_err(Error::starting("creating the notify eventfd"))?;
    // The stop eventfd one-shot: once stop began it stays readable.
    let (level, once) = (libc::EPOLLIN as u32, (libc::EPOLLIN | libc::EPOLLONESHOT) as u32);
    epoll.add(stop.raw(), once, STOP).map_err(Error::starting("registering the stop eventfd"))?;
    epoll.add(notify.raw(), level, NOTIFY).map_err(Error::starting("registering the notify eventfd"))?;
    epoll.add(listener.as_raw_fd(), level, LISTENER).map_err(Error::starting("registering the listener"))?;
    let table = Mutex::new(Table::default());
    let shared = Arc::new(Shared { gate: Arc::clone(&gate), limits: config.limits(), epoll, notify, table });
    let (jobs, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let workers = threadpool::Builder::new()
        .num_threads(config.workers)
        .thread_name("connlab-pool".into())
        .thread_stack_size(config.thread_stack.max(256 << 10))
        .build();
    let worker_tids = Tids::default();
    for _ in 0..config.workers {
        let (shared, jobs, tids) = (Arc::clone(&shared), jobs_rx.clone(), worker_tids.clone());
        workers.execute(move || work(&shared, &jobs, &tids));
    }
    let (listener, acceptor, workers) = (Some(listener), Acceptor::default(), (workers, worker_tids));
    let dispatcher = Dispatcher { shared, listener, acceptor, jobs, workers };
    LoopThread::serve(BackendKind::Pool, gate, stop, move || dispatcher.run())
}

/// The dispatcher's state.
#[derive(Debug)]
struct Dispatcher {
    /// Shared with the workers.
    shared: Arc<Shared>,
    /// The listener until stop closes it.
    listener: Option<Socket>,
    /// The EMFILE back-off.
    acceptor: Acceptor,
    /// Where ready connections go; dropping it ends the workers' loops.
    jobs: Sender<Job>,
    /// The workers, and their kernel ids for waiting until they are gone.
    workers: (threadpool::ThreadPool, Tids),
}

impl Dispatcher {
    fn run(mut self) {
        let _alive = self.shared.gate.registry().thread_guard();
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        loop {
            let wake_at = {
                let mut table = self.shared.table();
                if self.listener.is_none() && table.slots.is_empty() {
                    break;
                }
                let wake_at = [table.timers.next(), self.acceptor.wake_at()].into_iter().flatten().min();
                table.planned_wake = wake_at;
                wake_at
            };
            if let Err(e) = self.shared.epoll.wait(&mut events, driver::until(wake_at, Instant::now())) {
                gate::wait_failed(&e);
                continue;
            }
            let mut stopping = false;
            let mut accept = self.acceptor.on_timer(Instant::now());
            if let (true, Some(listener)) = (accept, &self.listener) {
                // Back in the set after a back-off.
                let _ = self.shared.epoll.add(listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER);
            }
            for event in &events {
                let (flags, data) = (event.events, event.u64);
                match data {
                    STOP => stopping = true,
                    NOTIFY => self.shared.notify.drain(),
                    LISTENER => accept = true,
                    key => {
                        let key = key as usize;
                        let job =
                            self.shared.table().slots.get_mut(key).and_then(|s| Self::take(s, key, flags));
                        job.into_iter().for_each(|job| send(&self.jobs, job));
                    }
                }
            }
            // Admission ended (stop began): a level-triggered listener with
            // connections queued would wake every wait until the stop's
            // eventfd is seen, so the listener goes now.
            if accept && self.accept_all() == AcceptEnd::Closed {
                stopping = true;
            }
            self.fire_timers(Instant::now());
            if stopping && self.listener.is_some() {
                self.close_listener();
            }
        }
        // Every connection is closed: end the workers, join them, and see
        // them gone; the last reference to `shared` closes the epoll fd.
        let Dispatcher { jobs, workers: (workers, tids), .. } = self;
        drop(jobs);
        workers.join();
        drop(workers);
        tids.wait_gone();
    }

    /// Takes an idle connection (`slot`, key `key`) for a worker with what epoll
    /// reported (`flags`; none for a timer or the stop sweep), to send once the
    /// lock is released. One-shot: not reported again until re-armed.
    fn take(slot: &mut Slot, key: usize, flags: u32) -> Option<Job> {
        let Slot::Idle(_) = slot else { return None };
        let Slot::Idle(mut link) = std::mem::replace(slot, Slot::Busy { timer_lost: false }) else {
            unreachable!("matched Idle")
        };
        let (hangup, out) = ((libc::EPOLLHUP | libc::EPOLLERR) as u32, libc::EPOLLOUT as u32);
        link.ready(flags & (hangup | libc::EPOLLIN as u32) != 0, flags & out != 0, false);
        Some((key, link, flags & hangup != 0))
    }

    /// Sends every idle connection whose deadline came to a worker.
    fn fire_timers(&self, now: Instant) {
        let due: Vec<Job> = {
            let mut guard = self.shared.table();
            let (table, mut keys) = (&mut *guard, Vec::new());
            while let Some((key, id, at)) = table.timers.pop_due(now) {
                match table.slots.get_mut(key) {
                    Some(Slot::Idle(link)) => keys.extend(Timers::claim(link, id, at).then_some(key)),
                    Some(Slot::Busy { timer_lost }) => *timer_lost = true,
                    None => {}
                }
            }
            keys.into_iter().filter_map(|key| Self::take(&mut table.slots[key], key, 0)).collect()
        };
        due.into_iter().for_each(|job| send(&self.jobs, job));
    }

    /// Stop began (the gate is closed): close the listener and send every
    /// idle connection to a worker to see the stop. Busy ones see it when
    /// their worker gives them back, under the table's lock, so none is
    /// missed.
    fn close_listener(&mut self) {
        // Out of the set first: after a handoff the socket lives on in the
        // successor, so closing this fd alone would leave it registered.
        if let Some(listener) = self.listener.take() {
            let _ = self.shared.epoll.delete(listener.as_raw_fd());
        }
        let mut table = self.shared.table();
        let idle: Vec<Job> =
            table.slots.iter_mut().filter_map(|(key, slot)| Self::take(slot, key, 0)).collect();
        drop(table);
        idle.into_iter().for_each(|job| send(&self.jobs, job));
    }

    /// Accepts until WouldBlock, a back-off or the end of admission; each
    /// new connection goes to a worker, registered disarmed (the worker arms
    /// it after its first drive).
    fn accept_all(&mut self) -> AcceptEnd {
        let Some(listener) = &self.listener else { return AcceptEnd::Closed };
        let (shared, jobs) = (&self.shared, &self.jobs);
        let end = self.acceptor.accept_all(listener, &shared.gate, |sock, handle| {
            let link = Link::new(sock, handle, shared.limits);
            let key = shared.table().slots.insert(Slot::Busy { timer_lost: false });
            match shared.epoll.add(link.fd(), libc::EPOLLONESHOT as u32, key as u64) {
                Ok(()) => send(jobs, (key, link, false)),
                Err(err) => {
                    shared.table().slots.remove(key);
                    link.fail(&err);
                }
            }
        });
        if !self.acceptor.listening() {
            // Level-triggered: while backing off the listener leaves the set,
            // or every wait would return at once for it.
            let _ = self.shared.epoll.delete(listener.as_raw_fd());
        }
        end
    }
}

/// Hands a job to the workers, which outlive the dispatcher: the channel is
/// open.
fn send(jobs: &Sender<Job>, job: Job) {
    jobs.send(job).expect("workers are running");
}

/// A worker: serves connections from `jobs` until the dispatcher is gone.
fn work(shared: &Shared, jobs: &Receiver<Job>, tids: &Tids) {
    tids.record_current();
    let _alive = shared.gate.registry().thread_guard();
    let mut scratch: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    for (key, mut link, mut hangup) in jobs.iter() {
        loop {
            let next = link.drive(&mut scratch, &shared.gate, hangup);
            hangup = false;
            let mut guard = shared.table();
            let (table, stopping) = (&mut *guard, shared.gate.grace_end().is_some());
            if let Next::Wait(interest) = next {
                if stopping && !link.stop_seen() {
                    continue; // stop began while it was busy: let it see the stop
                }
                if let Some(Slot::Busy { timer_lost: true }) = table.slots.get(key) {
                    link.scheduled = None;
                }
                let earlier =
                    interest.deadline.is_some_and(|at| table.planned_wake.is_none_or(|wake| at < wake));
                table.timers.schedule(key, &mut link, interest.deadline);
                // Re-armed under the lock: an event firing at once finds it idle.
                let events = libc::EPOLLONESHOT as u32 | interest.epoll_events();
                match shared.epoll.modify(link.fd(), events, key as u64) {
                    Ok(()) => {
                        table.slots[key] = Slot::Idle(link);
                        drop(guard);
                        if earlier {
                            shared.notify.wake().expect("writing to an eventfd cannot fail");
                        }
                        break;
                    }
                    Err(err) => link.fail(&err),
                }
            }
            // Closed: out of the table; a stopping dispatcher waits for it to empty.
            table.slots.remove(key);
            drop(guard);
            if stopping {
                shared.notify.wake().expect("writing to an eventfd cannot fail");
            }
            break;
        }
    }
}

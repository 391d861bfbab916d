//! [`Proxy`]: the listener, the runtime thread that accepts and serves
//! connections, the live list of toxics, and `close`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};

use crate::conn::{self, Sockets};
use crate::error::Error;
use crate::stats::{Counters, ProxyStats};
use crate::toxic::{Entry, Toxic};

/// The name of the proxy's one thread.
const THREAD_NAME: &str = "connlab-proxy";

/// The longest [`Proxy::close`] waits, after joining the thread, for the
/// kernel to remove it from `/proc/self/task`.
const TASK_GONE_LIMIT: Duration = Duration::from_secs(1);

/// How long the accept loop pauses after an error such as `EMFILE`, so it
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// What the proxy's thread and every connection share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The toxics in insertion order. Every direction of every connection
    /// watches it and brings its chain in step as soon as it changes.
    pub toxics: watch::Sender<Vec<Entry>>,
    /// The next [`Entry::id`].
    next_id: AtomicU64,
    /// Every counter of [`Proxy::stats`].
    pub counters: Counters,
    /// Keys every toxicity roll, jitter and slice size.
    pub seed: u64,
    /// Where every client's connection goes.
    pub upstream: SocketAddr,
}

/// The running part of a proxy, gone after [`Proxy::close`].
#[derive(Debug)]
struct Running {
    /// Tells the accept loop to return.
    stop: oneshot::Sender<()>,
    /// The proxy's one thread; it drops the runtime, and with it every
    /// connection, before it ends.
    thread: JoinHandle<()>,
    /// The thread's `/proc/self/task/<tid>` entry, if `/proc` is there: a
    /// joined thread can linger there for a moment (its tid is cleared, which
    /// wakes the joiner, before it is reaped).
    task: Option<PathBuf>,
}

/// A fault-injecting TCP proxy: every connection accepted on its listen
/// address is relayed to one upstream address through the proxy's toxics,
/// which can be added and removed while connections are live.
///
/// It runs a tokio current-thread runtime on one thread of its own, named
/// `connlab-proxy`: the work is waiting on sockets and timers, which one
/// thread does without any cross-thread wake-up, and one known thread is
/// simple to account for and to join.
pub struct Proxy {
    /// The bound listen address (the real port if 0 was asked for).
    local: SocketAddr,
    /// The toxics, counters and seed, shared with the runtime.
    shared: Arc<Shared>,
    /// `Some` until the first `close`; the lock makes a second `close` wait
    /// for the first.
    running: Mutex<Option<Running>>,
}

// The binding shares a proxy between Python threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Proxy>();
};

impl Proxy {
    /// Binds `listen` (port 0 picks a free port) and starts relaying every
    /// accepted connection to `upstream`. `seed` keys which connections each
    /// toxic affects, every jitter and every slice size, so the same seed
    /// replays them; `None` seeds from the clock.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if binding, building the runtime or spawning its thread
    /// fails; nothing is left running then.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, seed: Option<u64>) -> Result<Proxy, Error> {
        let listener = std::net::TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        // tokio requires a non-blocking socket.
        listener.set_nonblocking(true)?;
        let seed = seed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        let shared = Arc::new(Shared {
            toxics: watch::Sender::new(Vec::new()),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
            seed,
            upstream,
        });
        let (stop, stopped) = oneshot::channel();
        let (ready, started) = mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        // The runtime is built and dropped on its own thread, never on the
        // caller's, which may be inside another runtime.
        let thread = std::thread::Builder::new().name(THREAD_NAME.into()).spawn(move || {
            let (runtime, listener) = match runtime_with(listener) {
                Ok(pair) => pair,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let task = std::fs::read_link("/proc/thread-self").ok().and_then(|link| {
                let tid = link.file_name()?.to_owned();
                Some(PathBuf::from("/proc/self/task").join(tid))
            });
            let _ = ready.send(Ok(task));
            runtime.block_on(accept_loop(listener, thread_shared, stopped));
            // Drops every connection task (each resets its sockets), then
            // closes the runtime's epoll and wake-up fds.
            drop(runtime);
        })?;
        let task = match started.recv() {
            Ok(Ok(task)) => task,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other("the proxy thread ended while starting").into());
            }
        };
        Ok(Proxy { local, shared, running: Mutex::new(Some(Running { stop, thread, task })) })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Adds `toxic` at the end of the list. It acts at once: every live
    /// connection's direction takes it into its chain, and applies it to
    /// every chunk that reaches it from then on.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToxic`] naming the bad field; [`Error::DuplicateName`]
    /// if a toxic of that name is on the proxy already.
    pub fn add_toxic(&self, toxic: Toxic) -> Result<(), Error> {
        toxic.validate()?;
        let mut duplicate = None;
        self.shared.toxics.send_if_modified(|list| {
            if list.iter().any(|e| e.toxic.name == toxic.name) {
                duplicate = Some(toxic.name.clone());
                return false;
            }
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            list.push(Entry { id, toxic: toxic.clone() });
            true
        });
        duplicate.map_or(Ok(()), |name| Err(Error::DuplicateName(name)))
    }

    /// Removes the toxic `name`. What it holds on live connections is passed
    /// on at once, in order (a `timeout` toxic's held data and EOF too; the
    /// connection goes on).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownName`] if there is no such toxic.
    pub fn remove_toxic(&self, name: &str) -> Result<(), Error> {
        let removed = self.shared.toxics.send_if_modified(|list| {
            let at = list.iter().position(|e| e.toxic.name == name);
            at.map(|i| list.remove(i)).is_some()
        });
        if removed {
            Ok(())
        } else {
            Err(Error::UnknownName(name.to_owned()))
        }
    }

    /// The toxics, in the order they were added.
    pub fn toxics(&self) -> Vec<Toxic> {
        self.shared.toxics.borrow().iter().map(|e| e.toxic.clone()).collect()
    }

    /// The proxy's counters now.
    pub fn stats(&self) -> ProxyStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, closes the listener, resets every connection (RST
    /// to client and server: data held by toxics is lost, so neither side
    /// may take the end for a clean one), and joins the proxy's thread.
    /// When it returns, the proxy holds no fd and no thread. Idempotent; a
    /// call racing another returns when the first is done.
    pub fn close(&self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Running { stop, thread, task }) = running.take() {
            let _ = stop.send(());
            // A panic on the proxy's thread already printed its message.
            let _ = thread.join();
            if let Some(task) = task {
                let limit = Instant::now() + TASK_GONE_LIMIT;
                while task.exists() && Instant::now() < limit {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.running.lock().map(|r| r.is_some()).unwrap_or(false);
        f.debug_struct("Proxy")
            .field("local", &self.local)
            .field("upstream", &self.shared.upstream)
            .field("seed", &self.shared.seed)
            .field("running", &running)
            .finish_non_exhaustive()
    }
}

/// A current-thread runtime, and `listener` registered with it.
fn runtime_with(listener: std::net::TcpListener) -> io::Result<(Runtime, TcpListener)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let listener = {
        let _context = runtime.enter();
        TcpListener::from_std(listener)?
    };
    Ok((runtime, listener))
}

/// Accepts clients until `stop` fires (or its sender is gone), numbering
/// them in accept order from 0 and spawning a task for each.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut number = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::AcqRel);
                    // The guard exists before the task: a task dropped
                    // before its first poll still resets and counts.
                    let sockets = Sockets::new(client, Arc::clone(&shared));
                    tokio::spawn(conn::serve(sockets, number));
                    number += 1;
                }
                // ECONNABORTED and the like are the client's; EMFILE and
                // ENOBUFS pass. Either way, wait a little and go on.
                Err(_) => tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                },
            },
        }
    }
}

//! PyO3 module `connlab._native`: the connlab servers, the load generator
//! and the fault-injecting proxy for Python.
//!
//! Thin on purpose: argument conversion and validation, one error conversion
//! (`NativeError`), and dict/tuple views of the registry and of load
//! reports (`load`). Every call that can block (start, stop, snapshots that
//! take a lock, load runs) releases the GIL.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connlab_servers::handoff::{self, Control, ControlOptions, Events, TakeOverOptions, TakeOverReport};
use connlab_servers::{timeout_from_secs, BackendKind, CloseReason, Config, Error, Server, State};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

mod handoff_py;
mod load;
mod proxy;

pyo3::create_exception!(
    connlab,
    BackendUnavailable,
    pyo3::exceptions::PyRuntimeError,
    "The backend cannot run on this machine (e.g. `uring` where io_uring is disabled); the message says why."
);

/// The one conversion from the servers' error to a Python exception:
/// `ValueError` for bad arguments, `OSError` (with errno) for syscalls,
/// `BackendUnavailable` for a backend this machine cannot run; the message
/// starts with the argument's name.
#[derive(Debug)]
pub(crate) struct NativeError(pub(crate) Error);

impl From<NativeError> for PyErr {
    fn from(err: NativeError) -> PyErr {
        match &err.0 {
            Error::Invalid { .. } => PyValueError::new_err(err.0.to_string()),
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(errno) => PyOSError::new_err((errno, err.0.to_string())),
                None => PyOSError::new_err(err.0.to_string()),
            },
            Error::Unavailable { .. } => BackendUnavailable::new_err(err.0.to_string()),
        }
    }
}

impl From<Error> for NativeError {
    fn from(err: Error) -> Self {
        NativeError(err)
    }
}

/// A value that must be a non-negative integer fitting `T`, named `field`.
pub(crate) fn count<T: TryFrom<i64>>(field: &'static str, value: i64) -> Result<T, NativeError> {
    T::try_from(value).map_err(|_| NativeError(Error::invalid(field, format!("out of range: {value}"))))
}

/// A timeout in seconds; `None` or 0 disables it.
fn timeout(field: &'static str, secs: Option<f64>) -> Result<Option<Duration>, NativeError> {
    Ok(match secs {
        None => None,
        Some(secs) => timeout_from_secs(field, secs)?,
    })
}

/// An IP address, or `localhost` (127.0.0.1), named `field` when it is neither.
pub(crate) fn ip(field: &'static str, host: &str) -> Result<IpAddr, NativeError> {
    match host {
        "localhost" => Ok(IpAddr::from([127, 0, 0, 1])),
        other => other
            .parse()
            .map_err(|_| NativeError(Error::invalid(field, format!("not an IP address: {other:?}")))),
    }
}

/// A `(host, port)` Python tuple; IPv6 addresses keep their flow info out.
pub(crate) fn addr_tuple<'py>(py: Python<'py>, addr: SocketAddr) -> PyResult<Bound<'py, PyTuple>> {
    (addr.ip().to_string(), addr.port()).into_pyobject(py)
}

/// A TCP server of one backend, listening from construction until `stop()`.
#[pyclass(name = "Server", module = "connlab._native", frozen)]
struct PyServer {
    /// The running server; `stop` is idempotent on it.
    inner: Arc<dyn Server>,
    /// The listener's address, fixed at start (read without a lock).
    address: SocketAddr,
    /// The handoff control socket, if one was asked for; closed by `stop`.
    control: Mutex<Option<Control>>,
    /// Its events, waited on without holding `control`.
    events: Option<Events>,
    /// How this server took its listener over, if it did.
    taken_over: Option<TakeOverReport>,
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (
        backend, host = "127.0.0.1", port = 0, workers = None, max_connections = 10_000,
        max_frame = 1 << 20, max_pending_output = 4 << 20, idle_timeout = Some(60.0),
        read_timeout = Some(10.0), write_timeout = Some(10.0), backlog = 1024,
        journal_capacity = 65_536, thread_stack = 64 << 10, control = None, take_over = None,
        handoff_deadline = 5.0, handoff_grace = 1.0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: &str,
        host: &str,
        port: i64,
        workers: Option<i64>,
        max_connections: i64,
        max_frame: i64,
        max_pending_output: i64,
        idle_timeout: Option<f64>,
        read_timeout: Option<f64>,
        write_timeout: Option<f64>,
        backlog: i64,
        journal_capacity: i64,
        thread_stack: i64,
        control: Option<PathBuf>,
        take_over: Option<PathBuf>,
        handoff_deadline: f64,
        handoff_grace: f64,
    ) -> PyResult<Self> {
        let kind: BackendKind = backend.parse().map_err(NativeError)?;
        let host = ip("host", host)?;
        let defaults = Config::default();
        let config = Config {
            host,
            port: count("port", port)?,
            workers: match workers {
                Some(w) => count("workers", w)?,
                None => defaults.workers,
            },
            max_connections: count("max_connections", max_connections)?,
            max_frame: count("max_frame", max_frame)?,
            max_pending_output: count("max_pending_output", max_pending_output)?,
            idle_timeout: timeout("idle_timeout", idle_timeout)?,
            read_timeout: timeout("read_timeout", read_timeout)?,
            write_timeout: timeout("write_timeout", write_timeout)?,
            backlog: count("backlog", backlog)?,
            journal_capacity: count("journal_capacity", journal_capacity)?,
            thread_stack: count("thread_stack", thread_stack)?,
        };
        let deadline = timeout_from_secs("handoff_deadline", handoff_deadline)
            .map_err(NativeError)?
            .ok_or_else(|| NativeError(Error::invalid("handoff_deadline", "must be more than 0")))?;
        let grace =
            timeout_from_secs("handoff_grace", handoff_grace).map_err(NativeError)?.unwrap_or_default();
        let started = py.detach(|| -> Result<_, Error> {
            Ok(match &take_over {
                None => {
                    let listener = connlab_servers::listen(&config)?;
                    let duplicate = match control {
                        None => None,
                        Some(_) => Some(listener.try_clone().map_err(|source| Error::Io {
                            field: "control",
                            context: "duplicating the listener".into(),
                            source,
                        })?),
                    };
                    (connlab_servers::start_on(kind, config, listener)?, duplicate, None)
                }
                Some(path) => {
                    let options = TakeOverOptions { deadline, grace };
                    let taken = handoff::take_over(path, kind, config, options)?;
                    (taken.server, Some(taken.listener), Some(taken.report))
                }
            })
        });
        let (inner, duplicate, taken_over) = started.map_err(NativeError)?;
        let inner: Arc<dyn Server> = inner.into();
        let control = match (control, duplicate) {
            (Some(path), Some(listener)) => {
                let options = ControlOptions { deadline, grace };
                let opened = Control::open(&path, Arc::clone(&inner), listener, options);
                Some(opened.map_err(|source| {
                    inner.stop(Duration::ZERO);
                    NativeError(Error::Io {
                        field: "control",
                        context: "opening the control socket".into(),
                        source,
                    })
                })?)
            }
            _ => None,
        };
        let address = inner.local_addr();
        let events = control.as_ref().map(Control::events);
        Ok(PyServer { inner, address, control: Mutex::new(control), events, taken_over })
    }

    /// Starts a `backend` server on the listening socket of the server whose
    /// control socket is at `path` (DESIGN.md §4b): the same keyword
    /// arguments as the constructor (`host` and `port` are the socket's).
    /// Returns once the incumbent stopped accepting and reported its drain.
    #[staticmethod]
    #[pyo3(signature = (path, backend, **kwargs))]
    fn take_over<'py>(
        py: Python<'py>,
        path: PathBuf,
        backend: &str,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = match kwargs {
            Some(k) => k.copy()?,
            None => PyDict::new(py),
        };
        kwargs.set_item("take_over", path)?;
        py.get_type::<PyServer>().call((backend,), Some(&kwargs))
    }

    /// The next event of this server's control socket, waiting up to
    /// `timeout` seconds (None: until one comes): `{"event": "rejected",
    /// "reason": ...}` or `{"event": "handed-off", ...}`; None after the
    /// timeout, or with no control socket.
    #[pyo3(signature = (timeout = None))]
    fn handoff_event<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let timeout = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        let event = py.detach(|| self.events.as_ref().and_then(|e| e.next(timeout)));
        event.map(|e| handoff_py::event(py, &e)).transpose()
    }

    /// How this server took its listener over (None if it did not): the
    /// handoff id, `serving_after_s` and `sealed_after_s` from the request,
    /// `first_accept_after_s` (None until a connection came), and the
    /// incumbent's drain report (or why it did not come).
    #[getter]
    fn handoff<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(report) = &self.taken_over else { return Ok(None) };
        let first = self.inner.registry().first_admitted();
        handoff_py::report(py, report, first).map(Some)
    }

    /// The backend's name.
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.kind().name()
    }

    /// The listener's `(host, port)`.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        addr_tuple(py, self.address)
    }

    /// Every counter, as DESIGN.md §6 lists them.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| self.inner.stats());
        let d = PyDict::new(py);
        d.set_item("backend", s.backend.name())?;
        d.set_item("address", addr_tuple(py, s.address)?)?;
        d.set_item("active", s.active)?;
        d.set_item("accepted", s.accepted)?;
        d.set_item("closed", s.closed)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item("peak_active", s.peak_active)?;
        let by_state = PyDict::new(py);
        for (state, n) in State::ALL.iter().zip(s.by_state) {
            by_state.set_item(state.name(), n)?;
        }
        d.set_item("by_state", by_state)?;
        let closed_by = PyDict::new(py);
        for (reason, n) in CloseReason::ALL.iter().zip(s.closed_by) {
            closed_by.set_item(reason.name(), n)?;
        }
        d.set_item("closed_by", closed_by)?;
        d.set_item("frames_in", s.frames_in)?;
        d.set_item("frames_out", s.frames_out)?;
        d.set_item("bytes_in", s.bytes_in)?;
        d.set_item("bytes_out", s.bytes_out)?;
        d.set_item("truncated_frames", s.truncated_frames)?;
        let accept_errors = PyDict::new(py);
        accept_errors.set_item("emfile", s.accept_errors_emfile)?;
        accept_errors.set_item("other", s.accept_errors_other)?;
        d.set_item("accept_errors", accept_errors)?;
        d.set_item("threads", s.threads)?;
        d.set_item("journal_dropped", s.journal_dropped)?;
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(control) = control.as_ref() {
            d.set_item("control", handoff_py::stats(py, control)?)?;
        }
        Ok(d)
    }

    /// Every registered connection, oldest first.
    fn connections<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let list = py.detach(|| self.inner.connections());
        list.into_iter()
            .map(|c| {
                let d = PyDict::new(py);
                d.set_item("id", c.id)?;
                d.set_item("peer", addr_tuple(py, c.peer)?)?;
                d.set_item("state", c.state.name())?;
                d.set_item("bytes_in", c.bytes_in)?;
                d.set_item("bytes_out", c.bytes_out)?;
                d.set_item("age_s", c.age.as_secs_f64())?;
                d.set_item("idle_s", c.idle.as_secs_f64())?;
                Ok(d)
            })
            .collect()
    }

    /// The transition journal as `(conn_id, peer, from_state, to_state,
    /// reason, t_s)` tuples; with `peer=(host, port, ...)`, only the latest
    /// connection from that address.
    #[pyo3(signature = (peer = None))]
    fn transitions<'py>(
        &self,
        py: Python<'py>,
        peer: Option<Bound<'py, PyTuple>>,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let peer = match peer {
            None => None,
            Some(t) => {
                let bad = || NativeError(Error::invalid("peer", "expected a (host, port) tuple"));
                if t.len() < 2 {
                    return Err(bad().into());
                }
                let host: String = t.get_item(0)?.extract().map_err(|_| bad())?;
                let port: u16 = t.get_item(1)?.extract().map_err(|_| bad())?;
                let ip: IpAddr = host.parse().map_err(|_| bad())?;
                Some(SocketAddr::new(ip, port))
            }
        };
        let list = py.detach(|| self.inner.transitions(peer));
        list.into_iter()
            .map(|t| {
                (
                    t.conn_id,
                    addr_tuple(py, t.peer)?,
                    t.from.map(State::name),
                    t.to.name(),
                    t.reason.map(CloseReason::name),
                    t.at.as_secs_f64(),
                )
                    .into_pyobject(py)
            })
            .collect()
    }

    /// Stops the server (DESIGN.md §4): returns `drained`, `forced` and
    /// `elapsed_s`; a repeated call returns zeros.
    #[pyo3(signature = (grace = 1.0))]
    fn stop<'py>(&self, py: Python<'py>, grace: f64) -> PyResult<Bound<'py, PyDict>> {
        let grace = timeout_from_secs("grace", grace).map_err(NativeError)?.unwrap_or_default();
        let report = py.detach(|| {
            // The control first: a handoff in progress finishes its drain.
            let control = self.control.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(control);
            self.inner.stop(grace)
        });
        let d = PyDict::new(py);
        d.set_item("drained", report.drained)?;
        d.set_item("forced", report.forced)?;
        d.set_item("elapsed_s", report.elapsed.as_secs_f64())?;
        Ok(d)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py, 1.0)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("<connlab.Server backend={} address={}>", self.inner.kind(), self.address)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        // Destruction stops with no grace, without holding the GIL while the
        // server's threads are joined.
        Python::attach(|py| {
            py.detach(|| {
                let control = self.control.lock().unwrap_or_else(|e| e.into_inner()).take();
                drop(control);
                self.inner.stop(Duration::ZERO)
            })
        });
    }
}

/// Why `backend` cannot run on this machine, or None if it can (sets up and
/// drops what it needs, e.g. an io_uring ring).
#[pyfunction]
fn unavailable(py: Python<'_>, backend: &str) -> PyResult<Option<String>> {
    let kind: BackendKind = backend.parse().map_err(NativeError)?;
    Ok(py.detach(|| kind.unavailable()))
}

/// The native module: `Server`, the names of backends, states and reasons,
/// the load generator's `load_*` functions, and the fault-injecting `Proxy`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyServer>()?;
    load::register(m)?;
    proxy::register(m)?;
    m.add("BACKENDS", PyTuple::new(py, BackendKind::ALL.map(BackendKind::name))?)?;
    m.add("BackendUnavailable", py.get_type::<BackendUnavailable>())?;
    m.add_function(wrap_pyfunction!(unavailable, m)?)?;
    m.add("STATES", PyTuple::new(py, State::ALL.map(State::name))?)?;
    m.add("CLOSE_REASONS", PyTuple::new(py, CloseReason::ALL.map(CloseReason::name))?)?;
    Ok(())
}

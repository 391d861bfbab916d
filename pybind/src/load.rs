//! The load generator for Python: `load_closed_loop`, `load_open_loop`,
//! `load_churn` and `load_pingpong` on `connlab._native` (re-exported without
//! the prefix by `connlab.load`). Each converts its arguments (errors name
//! them), runs with the GIL released, and returns the report as a dict.
//! `load_start` runs a closed or open loop on a native thread of its own and
//! returns at once: a `LoadRun` to take intervals from and stop.
//! `hdr_merge`, `hdr_spectrum`, `hdr_counts` and `hdr_log` work on the
//! reports' encoded histograms (`connlab.load` wraps them to take base64 text
//! too).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use connlab_loadgen::hdr::{self, Histogram};
use connlab_loadgen::live::{Interval, Tap};
use connlab_loadgen::options::MAX_SECONDS;
use connlab_loadgen::{seconds, Churn, ClosedLoop, ErrorKind, Latency, OpenLoop, PingPong, Report};
use connlab_servers::Error;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::{count, ip, NativeError};

/// A `(host, port)` tuple naming a server to load; errors name `address`.
fn address(value: &Bound<'_, PyAny>) -> Result<SocketAddr, NativeError> {
    let bad = |why: &str| NativeError(Error::invalid("address", why.to_string()));
    let (host, port): (String, i64) = value.extract().map_err(|_| bad("expected a (host, port) tuple"))?;
    let port =
        u16::try_from(port).ok().filter(|&p| p != 0).ok_or_else(|| bad("port must be in [1, 65535]"))?;
    Ok(SocketAddr::new(ip("address", &host)?, port))
}

/// Optional thread count.
fn threads(value: Option<i64>) -> Result<Option<usize>, NativeError> {
    value.map(|n| count("threads", n)).transpose()
}

/// The report as the dict `_native.pyi` documents.
fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mode", r.mode.name())?;
    d.set_item("connections", r.connections)?;
    d.set_item("threads", r.threads)?;
    d.set_item("size", r.size)?;
    d.set_item("rate", r.rate)?;
    d.set_item("frames", r.frames)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("elapsed_s", r.elapsed.as_secs_f64())?;
    d.set_item("frames_per_s", r.frames_per_s())?;
    d.set_item("mb_per_s", r.mb_per_s())?;
    d.set_item("connects", r.connects)?;
    d.set_item("conns_per_s", r.conns_per_s())?;
    d.set_item("lost", r.lost)?;
    d.set_item("errors", errors_dict(py, &r.errors)?)?;
    d.set_item("latency_us", latency_dict(py, &r.latency())?)?;
    d.set_item("histogram", PyBytes::new(py, &r.histogram_v2_deflate()))?;
    Ok(d)
}

/// Percentiles as the `Latency` dict of `connlab.load`.
fn latency_dict<'py>(py: Python<'py>, l: &Latency) -> PyResult<Bound<'py, PyDict>> {
    let latency = PyDict::new(py);
    latency.set_item("count", l.count)?;
    latency.set_item("min", l.min)?;
    latency.set_item("mean", l.mean)?;
    latency.set_item("p50", l.p50)?;
    latency.set_item("p90", l.p90)?;
    latency.set_item("p99", l.p99)?;
    latency.set_item("p99.9", l.p999)?;
    latency.set_item("max", l.max)?;
    Ok(latency)
}

/// A count per error kind, zeros included.
fn errors_dict<'py>(py: Python<'py>, errors: &connlab_loadgen::Errors) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (kind, n) in errors.iter() {
        d.set_item(kind.name(), n)?;
    }
    Ok(d)
}

/// Runs `f` without the GIL and returns its report as a dict.
fn run<'py>(
    py: Python<'py>,
    f: impl FnOnce() -> Result<Report, Error> + Send,
) -> PyResult<Bound<'py, PyDict>> {
    let report = py.detach(f).map_err(NativeError)?;
    report_dict(py, &report)
}

/// Closed-loop echo load (see `connlab.load.closed_loop`).
#[pyfunction]
#[pyo3(signature = (
    address, connections = 10, size = 64, pipeline = 1, duration = 5.0, warmup = 1.0,
    threads = None, timeout = 2.0,
))]
#[allow(clippy::too_many_arguments)]
fn load_closed_loop<'py>(
    py: Python<'py>,
    address: &Bound<'py, PyAny>,
    connections: i64,
    size: i64,
    pipeline: i64,
    duration: f64,
    warmup: f64,
    threads: Option<i64>,
    timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let job = ClosedLoop {
        address: self::address(address)?,
        connections: count("connections", connections)?,
        size: count("size", size)?,
        pipeline: count("pipeline", pipeline)?,
        duration: seconds("duration", duration).map_err(NativeError)?,
        warmup: seconds("warmup", warmup).map_err(NativeError)?,
        threads: self::threads(threads)?,
        timeout: seconds("timeout", timeout).map_err(NativeError)?,
    };
    run(py, move || job.run())
}

/// Open-loop, constant-rate echo load (see `connlab.load.open_loop`).
#[pyfunction]
#[pyo3(signature = (
    address, rate, connections = 10, size = 64, duration = 5.0, warmup = 1.0,
    threads = None, timeout = 2.0,
))]
#[allow(clippy::too_many_arguments)]
fn load_open_loop<'py>(
    py: Python<'py>,
    address: &Bound<'py, PyAny>,
    rate: f64,
    connections: i64,
    size: i64,
    duration: f64,
    warmup: f64,
    threads: Option<i64>,
    timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let job = OpenLoop {
        address: self::address(address)?,
        rate,
        connections: count("connections", connections)?,
        size: count("size", size)?,
        duration: seconds("duration", duration).map_err(NativeError)?,
        warmup: seconds("warmup", warmup).map_err(NativeError)?,
        threads: self::threads(threads)?,
        timeout: seconds("timeout", timeout).map_err(NativeError)?,
    };
    run(py, move || job.run())
}

/// Connection churn (see `connlab.load.churn`).
#[pyfunction]
#[pyo3(signature = (
    address, cycles, parallel, size = 64, rst = false, threads = None, timeout = 2.0, deadline = 60.0,
))]
#[allow(clippy::too_many_arguments)]
fn load_churn<'py>(
    py: Python<'py>,
    address: &Bound<'py, PyAny>,
    cycles: i64,
    parallel: i64,
    size: i64,
    rst: bool,
    threads: Option<i64>,
    timeout: f64,
    deadline: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let job = Churn {
        address: self::address(address)?,
        cycles: count("cycles", cycles)?,
        parallel: count("parallel", parallel)?,
        size: count("size", size)?,
        rst,
        threads: self::threads(threads)?,
        timeout: seconds("timeout", timeout).map_err(NativeError)?,
        deadline: seconds("deadline", deadline).map_err(NativeError)?,
    };
    run(py, move || job.run())
}

/// The loopback ping-pong baseline (see `connlab.load.pingpong`).
#[pyfunction]
#[pyo3(signature = (size = 64, duration = 1.0, warmup = 0.1, echo_cpu = None))]
fn load_pingpong<'py>(
    py: Python<'py>,
    size: i64,
    duration: f64,
    warmup: f64,
    echo_cpu: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let job = PingPong {
        size: count("size", size)?,
        duration: seconds("duration", duration).map_err(NativeError)?,
        warmup: seconds("warmup", warmup).map_err(NativeError)?,
        echo_cpu: echo_cpu.map(|cpu| count("echo_cpu", cpu)).transpose()?,
    };
    run(py, move || job.run())
}

/// A closed loop (no `rate`) or an open loop on a native thread of its own,
/// watched through a tap (see `connlab.load.start`). Bad options raise here;
/// the run starts only once they are checked.
#[pyfunction]
#[pyo3(signature = (
    address, connections = 10, size = 64, rate = None, pipeline = 1, duration = None, warmup = 0.0,
    threads = None, timeout = 2.0,
))]
#[allow(clippy::too_many_arguments)]
fn load_start(
    address: &Bound<'_, PyAny>,
    connections: i64,
    size: i64,
    rate: Option<f64>,
    pipeline: i64,
    duration: Option<f64>,
    warmup: f64,
    threads: Option<i64>,
    timeout: f64,
) -> PyResult<LoadRun> {
    let address = self::address(address)?;
    let connections = count("connections", connections)?;
    let size = count("size", size)?;
    let duration = seconds("duration", duration.unwrap_or(MAX_SECONDS)).map_err(NativeError)?;
    let warmup = seconds("warmup", warmup).map_err(NativeError)?;
    let threads = self::threads(threads)?;
    let timeout = seconds("timeout", timeout).map_err(NativeError)?;
    let tap = Arc::new(Tap::new());
    let job = match rate {
        None => {
            let pipeline = count("pipeline", pipeline)?;
            let job = ClosedLoop { address, connections, size, pipeline, duration, warmup, threads, timeout };
            job.check().map_err(NativeError)?;
            Watched::Closed(job)
        }
        Some(rate) => {
            let job = OpenLoop { address, rate, connections, size, duration, warmup, threads, timeout };
            job.check().map_err(NativeError)?;
            Watched::Open(job)
        }
    };
    let watched = Arc::clone(&tap);
    let over = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&over);
    let thread = std::thread::Builder::new()
        .name("loadgen-run".into())
        .spawn(move || {
            let report = job.run(&watched);
            ended.store(true, Ordering::Release);
            report
        })
        .map_err(|e| {
            NativeError(Error::Io {
                field: "threads",
                context: "spawning the run's thread".into(),
                source: e,
            })
        })?;
    Ok(LoadRun { tap, over, thread: Mutex::new(Some(thread)), report: Mutex::new(None) })
}

/// The runs `load_start` can watch.
enum Watched {
    Closed(ClosedLoop),
    Open(OpenLoop),
}

impl Watched {
    fn run(&self, tap: &Tap) -> Result<Report, Error> {
        match self {
            Watched::Closed(job) => job.run_watched(tap),
            Watched::Open(job) => job.run_watched(tap),
        }
    }
}

/// A run started by `load_start`. Dropped while it runs, it stops it; the
/// run's thread then drains and ends by itself.
#[pyclass(module = "connlab._native", frozen)]
pub(crate) struct LoadRun {
    /// Shared with the run's threads.
    tap: Arc<Tap>,
    /// Set by the run's thread once the run has returned (every count in the tap).
    over: Arc<AtomicBool>,
    /// The run's thread, until `result` joins it.
    thread: Mutex<Option<JoinHandle<Result<Report, Error>>>>,
    /// The report, once joined.
    report: Mutex<Option<Report>>,
}

#[pymethods]
impl LoadRun {
    /// What the run counted since the last take, as a dict: `frames`,
    /// `connects`, `lost`, `errors` (a count per kind) and `histogram` (V2
    /// deflate, nanoseconds). At most 100 ms behind; complete once `done`.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (interval, encoded): (Interval, Vec<u8>) = py.detach(|| {
            let interval = self.tap.take();
            let encoded = hdr::encode(&interval.histogram);
            (interval, encoded)
        });
        let d = PyDict::new(py);
        d.set_item("frames", interval.frames)?;
        d.set_item("connects", interval.connects)?;
        d.set_item("lost", interval.lost)?;
        d.set_item("errors", errors_dict(py, &interval.errors)?)?;
        d.set_item("histogram", PyBytes::new(py, &encoded))?;
        Ok(d)
    }

    /// Ends the measured window now; the run drains and ends (`done`).
    fn stop(&self) {
        self.tap.stop();
    }

    /// Whether the run is over (its report is ready).
    #[getter]
    fn done(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// The run's report, as the `load_*` functions return it; waits (GIL
    /// released) for the run to end if it has not. Its frames and histogram
    /// are the sum of every take.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let report = py.detach(|| -> Result<Report, NativeError> {
            let mut kept = self.report.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(report) = kept.as_ref() {
                return Ok(report.clone());
            }
            let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
            let Some(thread) = thread else {
                return Err(NativeError(Error::invalid(
                    "result",
                    "the run failed, and its error was raised",
                )));
            };
            let report = thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            *kept = Some(report.clone());
            Ok(report)
        })?;
        report_dict(py, &report)
    }

    fn __repr__(&self) -> String {
        let state = if self.done() {
            "done"
        } else if self.tap.stopped().is_some() {
            "stopping"
        } else {
            "running"
        };
        format!("<LoadRun {state}>")
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.tap.stop();
    }
}

/// The percentiles of an encoded histogram (see
/// `connlab.load.histogram_latency`).
#[pyfunction]
fn hdr_latency<'py>(py: Python<'py>, histogram: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let h = py.detach(|| hdr::decode(histogram)).map_err(NativeError)?;
    latency_dict(py, &Latency::of(&h))
}

/// Every recorded value of an encoded histogram as `(microseconds, count)`,
/// smallest first (see `connlab.load.histogram_counts`).
#[pyfunction]
fn hdr_counts(py: Python<'_>, histogram: &[u8]) -> PyResult<Vec<(f64, u64)>> {
    let h = py.detach(|| hdr::decode(histogram)).map_err(NativeError)?;
    Ok(h.iter_recorded().map(|v| (v.value_iterated_to() as f64 / 1e3, v.count_at_value())).collect())
}

/// The sum of encoded histograms, encoded (see `connlab.load.merge_histograms`).
#[pyfunction]
fn hdr_merge<'py>(py: Python<'py>, histograms: Vec<Bound<'py, PyBytes>>) -> PyResult<Bound<'py, PyBytes>> {
    let encoded: Vec<&[u8]> = histograms.iter().map(|h| h.as_bytes()).collect();
    let merged = py.detach(|| hdr::merge(&encoded).map(|h| hdr::encode(&h))).map_err(NativeError)?;
    Ok(PyBytes::new(py, &merged))
}

/// The percentile spectrum of an encoded histogram (see
/// `connlab.load.percentile_spectrum`).
#[pyfunction]
#[pyo3(signature = (histogram, ticks_per_half_distance = 5))]
fn hdr_spectrum(py: Python<'_>, histogram: &[u8], ticks_per_half_distance: i64) -> PyResult<Vec<(f64, f64)>> {
    let ticks: u32 = count("ticks_per_half_distance", ticks_per_half_distance)?;
    if ticks == 0 {
        return Err(NativeError(Error::invalid("ticks_per_half_distance", "must be at least 1")).into());
    }
    let h = py.detach(|| hdr::decode(histogram)).map_err(NativeError)?;
    Ok(hdr::spectrum(&h, ticks))
}

/// An HdrHistogram interval log of `(tag, start_s, length_s, histogram)`
/// entries (see `connlab.load.histogram_log`).
#[pyfunction]
fn hdr_log(
    py: Python<'_>,
    entries: Vec<(String, f64, f64, Bound<'_, PyBytes>)>,
    base_time: f64,
) -> PyResult<String> {
    let entries: Vec<_> =
        entries.iter().map(|(tag, start, length, h)| (tag, *start, *length, h.as_bytes())).collect();
    let log = py.detach(|| {
        let decoded = entries
            .iter()
            .enumerate()
            .map(|(i, &(tag, start, length, bytes))| {
                Ok((tag.clone(), start, length, entry_histogram(i, bytes)?))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        hdr::interval_log(&decoded, base_time)
    });
    Ok(log.map_err(NativeError)?)
}

/// The histogram of entry `i` of `hdr_log`; errors name `histogram` and the entry.
fn entry_histogram(i: usize, bytes: &[u8]) -> Result<Histogram<u64>, Error> {
    hdr::decode(bytes).map_err(|e| match e {
        Error::Invalid { field, message } => Error::invalid(field, format!("entries[{i}]: {message}")),
        other => other,
    })
}

/// Adds the `load_*` and `hdr_*` functions and `LOAD_ERROR_KINDS` to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_closed_loop, m)?)?;
    m.add_function(wrap_pyfunction!(load_open_loop, m)?)?;
    m.add_function(wrap_pyfunction!(load_churn, m)?)?;
    m.add_function(wrap_pyfunction!(load_pingpong, m)?)?;
    m.add_function(wrap_pyfunction!(load_start, m)?)?;
    m.add_class::<LoadRun>()?;
    m.add_function(wrap_pyfunction!(hdr_merge, m)?)?;
    m.add_function(wrap_pyfunction!(hdr_counts, m)?)?;
    m.add_function(wrap_pyfunction!(hdr_latency, m)?)?;
    m.add_function(wrap_pyfunction!(hdr_spectrum, m)?)?;
    m.add_function(wrap_pyfunction!(hdr_log, m)?)?;
    m.add("LOAD_ERROR_KINDS", PyTuple::new(m.py(), ErrorKind::ALL.map(ErrorKind::name))?)?;
    Ok(())
}

//! `connlab._native.Proxy`: the fault-injecting proxy for Python, with
//! toxics described as toxiproxy describes them (name, type, stream,
//! toxicity, integer attributes in toxiproxy's units).

use std::net::SocketAddr;
use std::time::Duration;

use connlab_proxy::{DirStats, Proxy, Stream, Toxic, ToxicKind};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::{addr_tuple, ip};

/// The proxy's errors as Python's: `OSError` for a syscall, `ValueError`
/// for a bad toxic or name.
fn py_err(err: connlab_proxy::Error) -> PyErr {
    match err {
        connlab_proxy::Error::Io(io) => match io.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, io.to_string())),
            None => PyOSError::new_err(io.to_string()),
        },
        // The crate names `rate_kib`; Python's toxic says `rate`, as toxiproxy does.
        other => PyValueError::new_err(other.to_string().replace("rate_kib", "rate")),
    }
}

/// The attributes each toxic type takes, in toxiproxy's units.
const ATTRIBUTES: [(&str, &[&str]); 7] = [
    ("latency", &["latency", "jitter"]),
    ("bandwidth", &["rate"]),
    ("slicer", &["average_size", "size_variation", "delay"]),
    ("limit_data", &["bytes"]),
    ("reset_peer", &["timeout"]),
    ("timeout", &["timeout"]),
    ("slow_close", &["delay"]),
];

/// A toxic from its type and attributes (ms unless said: `rate` KiB/s,
/// slicer `delay` µs, sizes and `bytes` in bytes); a missing attribute is 0.
fn kind(type_name: &str, attributes: Option<&Bound<'_, PyDict>>) -> PyResult<ToxicKind> {
    let Some((_, known)) = ATTRIBUTES.iter().find(|(name, _)| *name == type_name) else {
        let types: Vec<_> = ATTRIBUTES.iter().map(|(name, _)| *name).collect();
        return Err(PyValueError::new_err(format!(
            "type: unknown toxic {type_name:?}; known: {}",
            types.join(", ")
        )));
    };
    let mut values = [0u64; 3];
    if let Some(attributes) = attributes {
        for (key, value) in attributes.iter() {
            let key: String = key.extract()?;
            let Some(i) = known.iter().position(|k| *k == key) else {
                return Err(PyValueError::new_err(format!(
                    "{key}: not an attribute of {type_name} (it takes {})",
                    known.join(", ")
                )));
            };
            values[i] = value.extract().map_err(|_| {
                PyValueError::new_err(format!("{key}: expected an integer >= 0, got {value}"))
            })?;
        }
    }
    let ms = Duration::from_millis;
    let [a, b, c] = values;
    Ok(match type_name {
        "latency" => ToxicKind::Latency { latency: ms(a), jitter: ms(b) },
        "bandwidth" => ToxicKind::Bandwidth { rate_kib: a },
        "slicer" => ToxicKind::Slicer {
            average_size: a as usize,
            size_variation: b as usize,
            delay: Duration::from_micros(c),
        },
        "limit_data" => ToxicKind::LimitData { bytes: a },
        "reset_peer" => ToxicKind::ResetPeer { timeout: ms(a) },
        "timeout" => ToxicKind::Timeout { timeout: ms(a) },
        _ => ToxicKind::SlowClose { delay: ms(a) },
    })
}

/// The attributes of `kind` in toxiproxy's units, as a dict.
fn attributes<'py>(py: Python<'py>, kind: &ToxicKind) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let ms = |d: &Duration| d.as_millis() as u64;
    match kind {
        ToxicKind::Latency { latency, jitter } => {
            d.set_item("latency", ms(latency))?;
            d.set_item("jitter", ms(jitter))?;
        }
        ToxicKind::Bandwidth { rate_kib } => d.set_item("rate", rate_kib)?,
        ToxicKind::Slicer { average_size, size_variation, delay } => {
            d.set_item("average_size", average_size)?;
            d.set_item("size_variation", size_variation)?;
            d.set_item("delay", delay.as_micros() as u64)?;
        }
        ToxicKind::LimitData { bytes } => d.set_item("bytes", bytes)?,
        ToxicKind::ResetPeer { timeout } | ToxicKind::Timeout { timeout } => {
            d.set_item("timeout", ms(timeout))?
        }
        ToxicKind::SlowClose { delay } => d.set_item("delay", ms(delay))?,
    }
    Ok(d)
}

fn dir_stats<'py>(py: Python<'py>, s: &DirStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes_in", s.bytes_in)?;
    d.set_item("bytes_out", s.bytes_out)?;
    d.set_item("bytes_held", s.bytes_held)?;
    Ok(d)
}

/// A fault-injecting TCP proxy in front of one upstream address, listening
/// from construction until `close()`.
#[pyclass(name = "Proxy", module = "connlab._native", frozen)]
struct PyProxy {
    inner: Proxy,
    address: SocketAddr,
}

#[pymethods]
impl PyProxy {
    #[new]
    #[pyo3(signature = (upstream_host, upstream_port, *, host = "127.0.0.1", port = 0, seed = None))]
    fn new(
        py: Python<'_>,
        upstream_host: &str,
        upstream_port: u16,
        host: &str,
        port: u16,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let upstream = SocketAddr::new(ip("upstream", upstream_host)?, upstream_port);
        let listen = SocketAddr::new(ip("host", host)?, port);
        let inner = py.detach(|| Proxy::start(listen, upstream, seed)).map_err(py_err)?;
        let address = inner.local_addr();
        Ok(PyProxy { inner, address })
    }

    /// `(host, port)` the proxy listens on.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        addr_tuple(py, self.address)
    }

    /// Adds a toxic; it acts on live connections at once.
    #[pyo3(signature = (name, r#type, stream = "downstream", toxicity = 1.0, attributes = None))]
    fn add_toxic(
        &self,
        name: String,
        r#type: &str,
        stream: &str,
        toxicity: f64,
        attributes: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let stream: Stream = stream.parse().map_err(|_| {
            PyValueError::new_err(format!("stream: expected upstream or downstream, got {stream:?}"))
        })?;
        let toxic = Toxic { name, kind: kind(r#type, attributes)?, stream, toxicity };
        self.inner.add_toxic(toxic).map_err(py_err)
    }

    /// Removes the toxic `name`; what it holds is released.
    fn remove_toxic(&self, name: &str) -> PyResult<()> {
        self.inner.remove_toxic(name).map_err(py_err)
    }

    /// The toxics in the order they were added, as toxiproxy's JSON: name,
    /// type, stream, toxicity, attributes.
    fn toxics<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .toxics()
            .iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("name", &t.name)?;
                d.set_item("type", t.kind.type_name())?;
                d.set_item("stream", t.stream.to_string())?;
                d.set_item("toxicity", t.toxicity)?;
                d.set_item("attributes", attributes(py, &t.kind)?)?;
                Ok(d)
            })
            .collect()
    }

    /// Connections (active, accepted, closed) and bytes in, out and held per
    /// direction (upstream: client to server; downstream: server to client).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("active", s.active)?;
        d.set_item("accepted", s.accepted)?;
        d.set_item("closed", s.closed)?;
        d.set_item("upstream", dir_stats(py, &s.upstream)?)?;
        d.set_item("downstream", dir_stats(py, &s.downstream)?)?;
        Ok(d)
    }

    /// Ends every connection and the listener; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!("<connlab.Proxy address={}>", self.address)
    }
}

impl Drop for PyProxy {
    fn drop(&mut self) {
        Python::attach(|py| py.detach(|| self.inner.close()));
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProxy>()?;
    let types: Vec<_> = ATTRIBUTES.iter().map(|(name, _)| *name).collect();
    m.add("TOXIC_TYPES", PyTuple::new(m.py(), types)?)?;
    Ok(())
}

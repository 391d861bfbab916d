//! Dict views of the handoff's events, reports and counters.

use std::time::Instant;

use connlab_servers::handoff::{Control, Event, TakeOverReport};
use connlab_servers::StopReport;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A stop report as `stop()` returns it.
fn stop_report<'py>(py: Python<'py>, r: &StopReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("drained", r.drained)?;
    d.set_item("forced", r.forced)?;
    d.set_item("elapsed_s", r.elapsed.as_secs_f64())?;
    Ok(d)
}

/// A control event.
pub(crate) fn event<'py>(py: Python<'py>, e: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match e {
        Event::Rejected { reason } => {
            d.set_item("event", "rejected")?;
            d.set_item("reason", reason)?;
        }
        Event::HandedOff { id, successor_pid, report, committed, reason } => {
            d.set_item("event", "handed-off")?;
            d.set_item("id", format!("{id:#018x}"))?;
            d.set_item("successor_pid", successor_pid)?;
            d.set_item("committed", committed)?;
            d.set_item("reason", reason)?;
            d.update(stop_report(py, report)?.as_mapping())?;
        }
    }
    Ok(d)
}

/// A successor's take-over report; `first` is its first admission.
pub(crate) fn report<'py>(
    py: Python<'py>,
    r: &TakeOverReport,
    first: Option<Instant>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", format!("{:#018x}", r.id))?;
    d.set_item("serving_after_s", r.serving_after.as_secs_f64())?;
    d.set_item("sealed_after_s", r.sealed_after.as_secs_f64())?;
    d.set_item(
        "first_accept_after_s",
        first.map(|t| t.saturating_duration_since(r.requested).as_secs_f64()),
    )?;
    d.set_item("incumbent", r.incumbent.as_ref().map(|i| stop_report(py, i)).transpose()?)?;
    d.set_item("incumbent_error", &r.incumbent_error)?;
    Ok(d)
}

/// The control's counters.
pub(crate) fn stats<'py>(py: Python<'py>, control: &Control) -> PyResult<Bound<'py, PyDict>> {
    let s = control.stats();
    let d = PyDict::new(py);
    d.set_item("path", control.path())?;
    d.set_item("sessions", s.sessions)?;
    d.set_item("rejected", s.rejected)?;
    d.set_item("last_error", s.last_error)?;
    d.set_item("handed_off", s.handed_off)?;
    Ok(d)
}

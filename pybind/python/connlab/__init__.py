"""connlab: a laboratory for TCP server architectures, seven backends behind one protocol."""

from connlab import client, load, probe
from connlab._native import BACKENDS, CLOSE_REASONS, STATES, BackendUnavailable, Server, unavailable

__all__ = [
    "BACKENDS",
    "CLOSE_REASONS",
    "STATES",
    "BackendUnavailable",
    "Server",
    "client",
    "load",
    "probe",
    "unavailable",
]

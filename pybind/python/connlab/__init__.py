"""connlab: a laboratory for TCP server architectures, six backends behind one protocol."""

from connlab import client, load, probe
from connlab._native import BACKENDS, CLOSE_REASONS, STATES, Server

__all__ = ["BACKENDS", "CLOSE_REASONS", "STATES", "Server", "client", "load", "probe"]

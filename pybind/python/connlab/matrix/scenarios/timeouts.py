"""Scenarios of the timeouts category (see docs/MATRIX.md)."""

"""Scenarios of the errors category (see docs/MATRIX.md)."""

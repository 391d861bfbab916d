"""Scenarios of the leak category (see docs/MATRIX.md)."""

"""Scenarios of the phantom category (see docs/MATRIX.md)."""

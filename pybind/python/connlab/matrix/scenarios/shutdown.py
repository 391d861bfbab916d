"""Scenarios of the shutdown category (see docs/MATRIX.md)."""

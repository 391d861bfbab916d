"""Scenarios of the halfclose category (see docs/MATRIX.md)."""

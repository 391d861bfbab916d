"""Scenarios of the churn category (see docs/MATRIX.md)."""

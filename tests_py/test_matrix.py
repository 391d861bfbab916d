"""The lifecycle matrix over every backend: scenarios x backends, from connlab.matrix alone."""

from connlab.testing.test_matrix import test_scenario

__all__ = ["test_scenario"]

"""argparse types shared by the command lines: numbers with a lower bound, and a clear message."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(kind: type[int] | type[float], *, positive: bool) -> Callable[[str], int | float]:
    """Parses an int or float that must be > 0 (`positive`) or >= 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if not positive and not value >= 0:
            raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
        return value

    return parse


positive_int = number(int, positive=True)
positive_float = number(float, positive=True)
non_negative_int = number(int, positive=False)
non_negative_float = number(float, positive=False)

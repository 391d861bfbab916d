"""The `connlab` command as the tests run it: this interpreter's package, in a child process."""

from __future__ import annotations

import subprocess
import sys

CONNLAB = [sys.executable, "-m", "connlab"]


def connlab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Runs `connlab ARGS...` to its end; its output captured as text."""
    return subprocess.run([*CONNLAB, *args], capture_output=True, text=True, timeout=timeout, check=False)

"""The server as its own process: `connlab serve`, signals, fd exhaustion, idle CPU."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import connlab
from conftest import ServerFactory
from connlab import probe
from connlab.client import connect, encode, read_frame, wait_until

SERVE = [sys.executable, "-m", "connlab", "serve"]


@contextmanager
def serve(backend: str, *args: str, nofile: int | None = None) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Runs `connlab serve` in a child; yields it and its `listening` line; kills it at the end."""

    child = subprocess.Popen(
        [*SERVE, "--backend", backend, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if nofile is not None:
            # Before the child's first line: it has opened a handful of fds by then.
            resource.prlimit(child.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"serve printed nothing; stderr: {child.stderr.read() if child.stderr else ''}"
        yield child, json.loads(line)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream:
                stream.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_address_serves_and_stops_on_signal(connlab_backend: str, signum: int) -> None:
    with serve(connlab_backend) as (child, listening):
        assert listening["event"] == "listening" and listening["pid"] == child.pid
        host, port = listening["address"].rsplit(":", 1)
        assert (host, int(port)) == (listening["host"], listening["port"])
        with connect((host, int(port))) as client:
            client.sendall(encode(b"over the process boundary"))
            assert read_frame(client) == b"over the process boundary"
            child.send_signal(signum)
            assert client.recv(1) == b""  # idle: closed at once by the stop
        assert child.wait(timeout=10) == 0
        assert child.stdout is not None
        stopped = json.loads(child.stdout.readline())
        assert stopped["event"] == "stopped" and stopped["signal"] == signal.Signals(signum).name
        assert stopped["drained"] == 1 and stopped["forced"] == 0


def test_serve_help_explains_every_option() -> None:
    out = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--backend", "--port", "--host", "--grace", "--workers", "--max-connections",
                   "--max-frame", "--max-pending-output", "--idle-timeout", "--read-timeout",
                   "--write-timeout", "--backlog", "--journal-capacity"):  # fmt: skip
        assert option in out
    for backend in connlab.BACKENDS:
        assert backend in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nosuch"], "invalid choice: 'nosuch'"),
        (["--backend", "blocking", "--idle-timeout", "-1"], "--idle-timeout: must be ≥ 0"),
        (["--backend", "blocking", "--port", "http"], "--port: expected an integer, got 'http'"),
        (["--backend", "blocking", "--port", "70000"], "--port: must be at most 65,535"),
        (["--backend", "blocking", "--workers", "0"], "argument --workers: must be > 0, got 0"),
    ],
)
def test_serve_rejects_bad_options_clearly(args: list[str], message: str) -> None:
    result = subprocess.run([*SERVE, *args], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_idle_server_uses_no_cpu(make_server: ServerFactory) -> None:
    server = make_server(idle_timeout=60.0)
    clients = [connect(server.address) for _ in range(50)]
    try:
        wait_until(lambda: server.stats()["active"] == 50)
        cpu0, t0 = probe.threads_cpu_seconds("connlab-"), time.monotonic()
        time.sleep(2.0)  # the measurement window itself
        cpu = (probe.threads_cpu_seconds("connlab-") - cpu0) / (time.monotonic() - t0)
        assert cpu < 0.01, f"idle server threads used {cpu:.2%} of a core"
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: server.stats()["active"] == 0)

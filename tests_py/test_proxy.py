"""connlab.proxy from Python: the toxics' fields, live changes, counters, the command, no leak.
(Each toxic is measured against its parameter in the Rust crate's own tests, proxy/tests.)"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

import connlab
from connlab.client import connect, encode, read_frame, wait_until
from connlab.proxy import TOXIC_TYPES, Proxy, parse_toxic


def echo_through(proxy: Proxy, payload: bytes, timeout: float = 5.0) -> bytes:
    with connect(proxy.address, timeout=timeout) as client:
        client.sendall(encode(payload))
        return read_frame(client)


def test_forwards_and_counts_every_byte(leak_guard: Any) -> None:
    with connlab.Server("epoll") as server, Proxy(server) as proxy:
        assert proxy.upstream == server.address and proxy.address[0] == "127.0.0.1"
        payload = bytes(range(256)) * 4096  # 1 MiB
        assert echo_through(proxy, payload) == payload
        stats = wait_until(lambda: (s := proxy.stats())["active"] == 0 and s, what="connection closed")
        frame = len(encode(payload))
        for stream in ("upstream", "downstream"):
            assert stats[stream] == {"bytes_in": frame, "bytes_out": frame, "bytes_held": 0}, stats
        assert (stats["accepted"], stats["closed"]) == (1, 1), stats


def test_toxics_have_toxiproxys_fields_and_change_live(leak_guard: Any) -> None:
    with connlab.Server("epoll", idle_timeout=0) as server, Proxy(server, seed=1) as proxy:
        proxy.add_toxic("lag", "latency", latency=80, jitter=0)
        proxy.add_toxic("cut", "limit_data", stream="upstream", toxicity=0.5, bytes=1 << 20)
        assert proxy.toxics() == [
            {"name": "lag", "type": "latency", "stream": "downstream", "toxicity": 1.0,
             "attributes": {"latency": 80, "jitter": 0}},
            {"name": "cut", "type": "limit_data", "stream": "upstream", "toxicity": 0.5,
             "attributes": {"bytes": 1 << 20}},
        ]  # fmt: skip
        with connect(proxy.address) as client:
            started = time.monotonic()
            client.sendall(encode(b"slow"))
            assert read_frame(client) == b"slow"
            assert time.monotonic() - started >= 0.08
            proxy.remove_toxic("lag")  # on the live connection at once
            started = time.monotonic()
            client.sendall(encode(b"fast"))
            assert read_frame(client) == b"fast"
            assert time.monotonic() - started < 0.08
        proxy.remove_toxic("cut")
        assert proxy.toxics() == []


def test_a_partition_heals_without_losing_a_frame(leak_guard: Any) -> None:
    """timeout 0 both ways holds everything and closes nothing; removed, it releases it in order."""
    with (
        connlab.Server("epoll", idle_timeout=5) as server,
        Proxy(server) as proxy,
        connect(proxy.address) as client,
    ):
        client.sendall(encode(b"before"))
        assert read_frame(client) == b"before"
        for stream in ("upstream", "downstream"):
            proxy.add_toxic(f"cut-{stream}", "timeout", stream=stream, timeout=0)
        client.sendall(encode(b"during"))
        readable, _, _ = select.select([client], [], [], 0.5)
        assert not readable, "nothing may cross a partition, not even a FIN or an RST"
        assert wait_until(lambda: proxy.stats()["upstream"]["bytes_held"] == len(encode(b"during")))
        for stream in ("upstream", "downstream"):
            proxy.remove_toxic(f"cut-{stream}")
        assert read_frame(client) == b"during"
        client.sendall(encode(b"after"))
        assert read_frame(client) == b"after"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.add_toxic("x", "jitterbug"), 'type: unknown toxic "jitterbug"'),
        (lambda p: p.add_toxic("x", "latency", stream="sideways"), "stream: expected upstream or downstream"),
        (lambda p: p.add_toxic("x", "latency", lag=5), "lag: not an attribute of latency"),
        (lambda p: p.add_toxic("x", "latency", latency=-1), "latency: expected an integer >= 0"),
        (lambda p: p.add_toxic("x", "bandwidth", rate=0), "^rate: "),
        (lambda p: p.add_toxic("x", "latency", toxicity=1.5), "toxicity"),
        (lambda p: p.remove_toxic("nosuch"), "nosuch"),
    ],
)
def test_bad_toxics_are_value_errors_naming_the_field(call: Any, message: str, leak_guard: Any) -> None:
    with Proxy(("127.0.0.1", 9)) as proxy, pytest.raises(ValueError, match=message):
        call(proxy)


def test_a_name_is_unique(leak_guard: Any) -> None:
    with Proxy(("127.0.0.1", 9)) as proxy:
        proxy.add_toxic("x", "latency", latency=1)
        with pytest.raises(ValueError, match="x"):
            proxy.add_toxic("x", "slow_close", delay=1)


def test_parse_toxic_reads_the_command_line_form() -> None:
    assert parse_toxic("latency:downstream:latency=50,jitter=5") == {
        "name": "latency_downstream", "type": "latency", "stream": "downstream", "latency": 50, "jitter": 5,
    }  # fmt: skip
    assert parse_toxic("timeout:upstream:timeout=0,toxicity=0.5")["toxicity"] == 0.5
    assert parse_toxic("reset_peer")["stream"] == "downstream"
    assert set(TOXIC_TYPES) >= {"latency", "bandwidth", "slicer", "limit_data", "reset_peer", "timeout"}
    for bad in ("lag", "latency:sideways", "latency:downstream:latency", "latency:downstream:latency=x"):
        with pytest.raises(ValueError):
            parse_toxic(bad)


def test_the_command_prints_its_address_and_stops_on_sigterm(leak_guard: Any) -> None:
    with connlab.Server("epoll") as server:
        host, port = server.address
        argv = [sys.executable, "-m", "connlab", "proxy", "--upstream", f"{host}:{port}"]
        argv += ["--toxic", "latency:downstream:latency=1", "--seed", "3"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            listening = json.loads(child.stdout.readline())
            assert (
                listening["event"] == "listening" and listening["toxics"][0]["name"] == "latency_downstream"
            )
            with socket.create_connection((listening["host"], listening["port"]), timeout=5) as client:
                client.sendall(encode(b"via the command"))
                assert read_frame(client) == b"via the command"
            child.terminate()
            stopped = json.loads(child.stdout.readline())
            assert child.wait(timeout=10) == 0
        assert stopped["event"] == "stopped" and stopped["upstream"]["bytes_out"] == len(
            encode(b"via the command")
        )
    code = subprocess.run(
        [sys.executable, "-m", "connlab", "proxy", "--upstream", "127.0.0.1:1", "--toxic", "lag"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert code.returncode == 2 and "unknown toxic type 'lag'" in code.stderr, code.stderr

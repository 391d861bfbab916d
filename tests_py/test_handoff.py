"""The listener handoff from Python and from the command line: the API, the control's events and
counters, two `connlab serve` processes, and `connlab handoff`'s figures."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

import connlab
from connlab.client import connect, encode, read_frame, wait_until
from connlab.process import ServeProcess, connlab_serve_argv
from run_cli import CONNLAB


def echoes(address: tuple[str, int], payload: bytes = b"hello") -> bool:
    with connect(address) as c:
        c.sendall(encode(payload))
        return read_frame(c) == payload


def test_a_server_hands_its_listener_to_another_backend(tmp_path: Path, leak_guard: Any) -> None:
    control = tmp_path / "control.sock"
    with connlab.Server("blocking", control=control) as old:
        busy = connect(old.address)
        busy.sendall(encode(b"before"))
        assert read_frame(busy) == b"before"
        new = connlab.Server.take_over(control, "epoll", idle_timeout=None)
        with new:
            assert new.address == old.address and new.backend == "epoll"
            event = old.handoff_event(timeout=5)
            assert event is not None and event["event"] == "handed-off", event
            assert (event["committed"], event["drained"], event["forced"]) == (True, 1, 0), event
            # The connection the incumbent held ended by its drain: a FIN, not an RST.
            assert busy.recv(1) == b""
            busy.close()
            report = new.handoff
            assert report is not None and report["id"] == event["id"]
            assert report["incumbent"]["drained"] == 1 and report["incumbent_error"] is None
            assert 0 < report["serving_after_s"] <= report["sealed_after_s"] < 5
            assert echoes(new.address)
            assert new.handoff["first_accept_after_s"] is not None
            assert old.stats()["control"]["handed_off"] is True
            assert old.stats()["active"] == 0
            # The control socket's file went with the seal.
            assert not control.exists()


def test_a_refused_session_is_logged_counted_and_the_incumbent_serves_on(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with connlab.Server("poll", control=control) as server:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(control))
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            s.settimeout(5)
            # An Error frame naming the reason, then EOF.
            reply = b"".join(iter(lambda: s.recv(4096), b""))
        assert b"garbage bytes" in reply
        event = server.handoff_event(timeout=5)
        assert event == {"event": "rejected", "reason": "garbage bytes: not a handoff frame (bad magic)"}
        stats = server.stats()["control"]
        assert (stats["sessions"], stats["rejected"], stats["handed_off"]) == (1, 1, False)
        assert stats["last_error"].startswith("garbage bytes")
        assert echoes(server.address)
        # The control still takes a real successor afterwards.
        with connlab.Server.take_over(control, "tokio") as new:
            assert echoes(new.address)


def test_take_over_fails_clearly_without_an_incumbent(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot connect to the incumbent"):
        connlab.Server.take_over(tmp_path / "nobody.sock", "epoll")


def test_a_live_control_path_is_not_stolen(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with (
        connlab.Server("epoll", control=control),
        pytest.raises(OSError, match="another server's control socket is live"),
    ):
        connlab.Server("epoll", control=control)


def test_two_serve_processes_hand_off_and_the_incumbent_exits(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with ServeProcess(connlab_serve_argv("epoll", control=control)) as old:
        held = connect(old.address)
        held.sendall(encode(b"held"))
        assert read_frame(held) == b"held"
        with ServeProcess(connlab_serve_argv("pool", take_over=control)) as new:
            assert new.address[1] == old.address[1]
            stopped = old.wait_exit(timeout=10)
            assert stopped.returncode == 0, stopped.describe()
            gone = next(e for e in old.events if e.get("event") == "stopped")
            assert (gone["reason"], gone["drained"], gone["forced"], gone["committed"]) == (
                "handoff",
                1,
                0,
                True,
            )
            assert held.recv(1) == b""
            held.close()
            listening = next(e for e in new.events if e.get("event") == "listening")
            assert listening["handoff"]["incumbent"]["drained"] == 1
            assert echoes(new.address)


def test_upgrades_chain_on_one_control_path_and_refusals_are_logged(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with ServeProcess(connlab_serve_argv("tokio", control=control)) as first:
        # A broken session is refused and printed; the server serves on.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(control))
            s.sendall(b"\x00" * 16)
            s.settimeout(5)
            assert b"".join(iter(lambda: s.recv(4096), b""))
        wait_until(lambda: any(e.get("event") == "handoff-rejected" for e in first.events), 5)
        [rejected] = [e for e in first.events if e.get("event") == "handoff-rejected"]
        assert rejected["reason"].startswith("garbage bytes"), rejected
        assert echoes(first.address)
        # The successor opens its own control at the same path once the first has sealed.
        with ServeProcess(connlab_serve_argv("poll", take_over=control, control=control)) as second:
            assert first.wait_exit(timeout=10).returncode == 0
            with ServeProcess(connlab_serve_argv("blocking", take_over=control)) as third:
                assert second.wait_exit(timeout=10).returncode == 0
                assert third.address[1] == first.address[1]
                assert echoes(third.address)


def test_connlab_handoff_reports_each_pair(tmp_path: Path) -> None:
    out = tmp_path / "handoff.json"
    run = subprocess.run(
        [*CONNLAB, "handoff", "--pairs", "epoll:poll", "--repetitions", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    [row] = json.loads(out.read_text())["summary"]
    assert row["pair"] == "epoll -> poll" and row["errors"] == {} and row["forced"] == 0
    assert 0 < row["serving_ms"]["median"] <= row["sealed_ms"]["median"]
    assert row["first_accept_ms"] is not None and row["churn_max_ms"]["max"] > 0


@pytest.mark.parametrize("pairs", ["epoll", "epoll:nope", "epoll:poll,"])
def test_bad_pairs_exit_2(pairs: str) -> None:
    run = subprocess.run(
        [*CONNLAB, "handoff", "--pairs", pairs], capture_output=True, text=True, timeout=30, check=False
    )
    assert run.returncode == 2 and "expected FROM:TO" in run.stderr, run.stderr

"""The command line itself: shared option checks made before any work, and how a stop signal
ends a command (its exit status, one line, no server child left behind)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from connlab import BACKENDS
from connlab._cli import build_parser
from connlab._cli.options import backend_list, output_dir, output_path
from connlab._measure import report
from connlab._measure.bench import Bench, BenchConfig, Run, Workload
from run_cli import CONNLAB


def test_help_lists_every_command() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"serve", "proxy", "matrix", "bench", "compare", "soak", "handoff", "stress"}
    run = subprocess.run([*CONNLAB, "--help"], capture_output=True, text=True, timeout=30, check=True)
    for command in sub.choices:
        assert f"\n    {command} " in run.stdout, command


def test_backend_list_takes_all_or_known_names() -> None:
    assert backend_list("all") == list(BACKENDS)
    assert backend_list("epoll, tokio,epoll") == ["epoll", "tokio"]
    with pytest.raises(argparse.ArgumentTypeError) as err:
        backend_list("epoll,nosuch,other")
    assert str(err.value) == f"unknown backends nosuch, other; available: {', '.join(BACKENDS)}"
    with pytest.raises(argparse.ArgumentTypeError, match="expected all or a,b; available: "):
        backend_list(" , ")


def test_output_path_and_dir_say_why_a_path_cannot_be_written(tmp_path: Path) -> None:
    assert output_path(str(tmp_path / "x.json")) == tmp_path / "x.json"
    assert output_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    (tmp_path / "file").write_text("")
    cases = [
        (output_path, tmp_path / "missing" / "x.json", f"directory {tmp_path / 'missing'} does not exist"),
        (output_path, tmp_path, "it is a directory"),
        (output_path, tmp_path / "file" / "x.json", f"{tmp_path / 'file'} is not a directory"),
        (output_dir, tmp_path / "file" / "report", f"{tmp_path / 'file'} is not a directory"),
    ]
    for check, path, why in cases:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            check(str(path))
        assert str(path) in str(err.value) and str(err.value).endswith(why), err.value


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--json", "{missing}/x.json"], "argument --json: cannot write {missing}/x.json"),
        (["soak", "--backend", "epoll", "--json", "{missing}/x.json"], "cannot write {missing}/x.json"),
        (["compare", "--out", "{file}/report"], "argument --out: cannot write into {file}/report"),
        (["handoff", "--json", "{missing}/x.json"], "argument --json: cannot write {missing}/x.json"),
    ],
)
def test_a_bad_output_path_fails_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("")
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "file"}
    started = time.monotonic()
    run = subprocess.run(
        [*CONNLAB, *(a.format(**paths) for a in args)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # A benchmark or a soak takes minutes: exit 2 this fast means nothing was measured first.
    assert time.monotonic() - started < 5
    assert run.returncode == 2 and message.format(**paths) in run.stderr, run.stderr


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # gone meanwhile
        return []


def _connections(p: psutil.Process) -> int:
    try:
        return len(p.net_connections(kind="tcp"))
    except psutil.Error:
        return 0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_stop_signal_ends_bench_and_its_server_child(
    sig: signal.Signals, code: int, word: str, tmp_path: Path
) -> None:
    # A load run already started ends its window (the generator has no cancel): keep it short.
    args = [
        "--backends",
        "epoll",
        "--repetitions",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--idle-steps",
        "0,100",
        "--reports",
        str(tmp_path),
    ]
    bench = subprocess.Popen(
        [*CONNLAB, "bench", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        parent = psutil.Process(bench.pid)
        deadline = time.monotonic() + 30
        servers: list[psutil.Process] = []
        # Mid-measurement: a server child holding connections besides its listener.
        while not any(_connections(p) > 1 for p in servers):
            assert time.monotonic() < deadline and bench.poll() is None, "bench loaded no server child"
            time.sleep(0.05)
            servers = [p for p in parent.children(recursive=True) if "serve" in _cmdline(p)]
        bench.send_signal(sig)
        _, stderr = bench.communicate(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == code and stderr.strip().endswith(f"connlab bench: {word}"), stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 5
    while left := [p.pid for p in servers if _alive(p)]:
        assert time.monotonic() < deadline, f"server children left running: {left}"
        time.sleep(0.05)
    assert not list(tmp_path.iterdir()), "a run stopped before any result leaves no empty directory"


def test_compare_report_without_matplotlib_says_what_the_plots_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rtt = Workload("rtt")
    config = BenchConfig(backends=["epoll"], workloads=[rtt], repetitions=1)
    bench = Bench(config, {}, "none", [], [Run("epoll", rtt, 0, {"latency_us": {"p50": 30.0}})])
    written = report.write(tmp_path, {"machine": {}, "bench": bench.to_json(), "targets": []}, bench)
    assert written.no_plots == report.PLOTS_NEED
    assert "pip install 'connlab[report]'" in written.md.read_text()
    assert "| one connection, one 64 B frame at a time | p50 | 30.0 µs |" in written.md.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_nothing_the_library_or_the_pytest_plugin_imports_loads_matplotlib() -> None:
    code = "import sys, connlab, connlab.matrix, connlab.pytest_plugin; print('matplotlib' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "False"

"""`connlab.locust`: Locust's distributed mode driving connlab's generator. Locust runs in child
processes only (importing it monkey-patches a process with gevent); skipped without the extra."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from connlab import load
from connlab.process import ServeProcess, connlab_serve_argv

pytestmark = pytest.mark.skipif(
    find_spec("locust") is None, reason="Locust is not installed (pip install 'connlab[locust]')"
)

LOCUST = [sys.executable, "-m", "locust"]

LOCUSTFILE = """
from connlab.locust import FramedEchoUser


class Echo(FramedEchoUser):
    connections = 8
    size = 64
    report_every = 0.5
"""

#: How far Locust's merged percentile may be from the exact one of the same frames: its buckets
#: round to two significant digits (at most 5 % off), plus slack for a rank at a bucket's edge.
TOLERANCE = 0.06


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def test_the_bulk_path_matches_locusts_own_and_hosts_parse() -> None:
    checks = Path(__file__).with_name("locust_bulk.py")
    done = subprocess.run(
        [sys.executable, str(checks)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_master_and_two_workers_count_every_frame_and_merge_the_percentiles(tmp_path: Path) -> None:
    locustfile = tmp_path / "locustfile.py"
    locustfile.write_text(LOCUSTFILE)
    port = _free_port()
    with ServeProcess(connlab_serve_argv("epoll")) as server:
        host = "{}:{}".format(*server.address)
        master_argv = [
            *["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)],
            *["--headless", "--expect-workers", "2", "--expect-workers-max-wait", "30"],
            *["-u", "2", "-r", "2", "-t", "4s", "--host", host, "--csv", str(tmp_path / "run")],
            *["--connlab-report", str(tmp_path / "connlab.json")],
        ]
        worker_argv = ["--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
        logs = [tmp_path / name for name in ("master.log", "worker0.log", "worker1.log")]
        processes = []
        for argv, log in zip([master_argv, worker_argv, worker_argv], logs, strict=True):
            with log.open("w") as out:
                processes.append(
                    subprocess.Popen(
                        [*LOCUST, "-f", str(locustfile), *argv],
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        try:
            for p in processes:
                p.wait(timeout=90)
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    codes = [p.returncode for p in processes]
    assert codes == [0, 0, 0], "\n\n".join(f"{log.name}:\n{_tail(log)}" for log in logs)

    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    report = json.loads((tmp_path / "connlab.json").read_text())
    runs = [run for worker_runs in report["by_worker"].values() for run in worker_runs]
    per_worker = [sum(run["frames"] for run in worker_runs) for worker_runs in report["by_worker"].values()]

    # Both workers carried load, and the master's CSV counts every frame their generators counted.
    assert len(per_worker) == 2 and min(per_worker) > 0, per_worker
    assert int(total["Request Count"]) == sum(per_worker) == report["frames"], (total, per_worker)
    assert int(total["Failure Count"]) == 0 and sum(report["errors"].values()) == 0
    assert rows["echo 64 B (µs)"]["Type"] == "frame"

    # The merged percentiles are those of all frames together: the exact ones come from the
    # generators' own histograms, merged here; Locust's from its buckets, merged by its master.
    exact = load.histogram_latency(load.merge_histograms(run["histogram"] for run in runs))
    assert exact["count"] == sum(per_worker)
    for column, key in [("50%", "p50"), ("99%", "p99")]:
        got, want = float(total[column]), exact[key]
        assert abs(got - want) <= TOLERANCE * want + 1, f"{column}: Locust {got} µs, exact {want:.1f} µs"

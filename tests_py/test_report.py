"""The report's words and numbers: units, the instability rule, targets that noise leaves
unsettled, the generated summary, the baseline's regressions, the CSV and histogram files, and
`bench` against a server connlab did not start as a backend."""

from __future__ import annotations

import base64
import csv
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from connlab import load
from connlab._measure import baseline, report, story, targets, units
from connlab._measure.bench import (
    Bench,
    BenchConfig,
    Run,
    Workload,
    spread_of,
)
from connlab.process import ServeProcess, connlab_serve_argv
from run_cli import CONNLAB


def test_units_are_chosen_per_value() -> None:
    assert units.duration_us(85.23) == "85.2 µs"
    assert units.duration_us(1_330_643) == "1.33 s"
    assert units.duration_us(2_500) == "2.50 ms"
    assert units.rate(6197.6) == "6.20 k"
    assert units.rate(123_456) == "123 k"
    assert units.rate(1_234_567) == "1.23 M"
    assert units.grouped(4971) == "4 971"
    assert units.size(64) == "64 B" and units.size(16 << 10) == "16 KiB" and units.size(10_100) == "9.86 KiB"
    assert units.plural(1, "connection") == "1 connection"
    assert units.plural(1000, "connection") == "1 000 connections"
    assert units.figure("p99_us", 1_330_643) == "p99 1.33 s"
    assert units.figure("frames_per_s", 120_400) == "120 k frames/s"


def test_workloads_have_human_names() -> None:
    assert Workload("closed", connections=1000).label == "64 B frames, 1 000 connections"
    assert Workload("closed", connections=10, size=16 << 10).label == "16 KiB frames, 10 connections"
    assert (
        Workload("closed", connections=10, pipeline=4).label
        == "64 B frames, 10 connections, 4 in flight each"
    )
    assert (
        Workload("open", connections=100, rate=20_000).label
        == "64 B frames at 20 000/s over 100 connections (open loop)"
    )
    # The JSON key stays short and stable.
    assert Workload("closed", connections=1000).name == "closed64-c1000"
    assert Workload("closed", connections=10, pipeline=4).name == "closed64-c10-p4"


def test_a_figure_is_unstable_when_its_spread_exceeds_a_quarter_of_its_median() -> None:
    assert not spread_of([100, 112, 124])["unstable"]  # 24 %
    wide = spread_of([100, 115, 130])  # 30 / 115 = 26 %
    assert wide["unstable"] and wide["spread"] == pytest.approx(30 / 115)
    # One value: the spread is unknown, which n says; it is not called unstable.
    one = spread_of([5.0])
    assert one["n"] == 1 and not one["unstable"]


def _cell(*values: float) -> dict[str, Any]:
    return spread_of(list(values))


def test_a_target_decided_by_noise_is_unsettled() -> None:
    c100 = Workload("closed", connections=100)
    target = targets.Ratio(
        "pool >= 0.7x epoll", targets.Match("closed", 100, 64), "frames_per_s", "pool", "epoll", 0.7
    )

    def status(pool: list[float], epoll: list[float]) -> str:
        summary = {c100: {"pool": {"frames_per_s": _cell(*pool)}, "epoll": {"frames_per_s": _cell(*epoll)}}}
        [row] = targets.evaluate([target], summary, [])
        return row["status"]

    # Stable figures decide: met, or missed.
    assert status([75, 76, 77], [100, 101, 102]) == targets.MET
    assert status([60, 61, 62], [100, 101, 102]) == targets.MISSED
    # pool's figure spreads 50 %: its range straddles the bound, so noise decides.
    assert status([50, 65, 90], [100, 101, 102]) == targets.UNSETTLED
    # Unstable, but missed over the whole range: the noise does not change the outcome.
    assert status([20, 30, 40], [100, 101, 102]) == targets.MISSED


def _bench(
    values: dict[tuple[Workload, str], list[dict[str, Any]]],
    servers: list[str],
    conditions: dict[str, Any] | None = None,
) -> Bench:
    workloads = list(dict.fromkeys(w for w, _ in values))
    cfg = BenchConfig(backends=servers, workloads=workloads, repetitions=3)
    runs = [Run(s, w, rep, m) for (w, s), reps in values.items() for rep, m in enumerate(reps)]
    quiet = {
        "load_avg_before": (0.2, 0.3, 0.3),
        "load_avg_after": (0.9, 0.5, 0.4),
        "cpus": 2,
        "steal_pct": 0.0,
        "pingpong_p50_us": [20.0, 21.0, 22.0],
        "pingpong_p50": spread_of([20.0, 21.0, 22.0]),
    }
    return Bench(cfg, {}, "none", [], runs, conditions or quiet)


def _reps(**figures: list[float]) -> list[dict[str, Any]]:
    """Three runs' metrics from per-figure lists of three values (p99_us into latency_us)."""
    out = []
    for i in range(3):
        m: dict[str, Any] = {k: v[i] for k, v in figures.items() if not k.endswith("_us")}
        m["latency_us"] = {k.removesuffix("_us"): v[i] for k, v in figures.items() if k.endswith("_us")}
        out.append(m)
    return out


def _story_bench(conditions: dict[str, Any] | None = None) -> Bench:
    idle = Workload("idle", steps=(0, 1000, 5000))
    c10, c5000 = Workload("closed", connections=10), Workload("closed", connections=5000)
    rtt = Workload("rtt")

    def idle_run(per_conn: float, threads: list[int]) -> list[dict[str, Any]]:
        by_step = dict(zip((0, 1000, 5000), threads, strict=True))
        return [{"rss_per_conn_bytes": per_conn, "threads_by_step": by_step}] * 3

    values = {
        (idle, "epoll"): idle_run(300.0, [2, 2, 2]),
        (idle, "blocking"): idle_run(10_200.0, [2, 1002, 5002]),
        (c10, "epoll"): _reps(
            frames_per_s=[118e3, 120e3, 122e3], p99_us=[90, 95, 100], server_cpu_us_per_frame=[2.0, 2.1, 2.2]
        ),
        (c10, "blocking"): _reps(
            frames_per_s=[99e3, 100e3, 101e3], p99_us=[100, 110, 120], server_cpu_us_per_frame=[3.0, 3.1, 3.2]
        ),
        (c5000, "epoll"): _reps(frames_per_s=[90e3, 100e3, 110e3], p99_us=[1e4, 1.2e4, 1.3e4]),
        (c5000, "blocking"): _reps(frames_per_s=[95e3, 104e3, 108e3], p99_us=[1.2e6, 1.33e6, 1.4e6]),
        (rtt, "epoll"): _reps(p50_us=[24.0, 25.0, 26.0]),
        (rtt, "blocking"): _reps(p50_us=[30.0, 31.0, 32.0]),
    }
    return _bench(values, ["epoll", "blocking"], conditions)


def test_the_summary_names_who_leads_where_by_how_much_and_what_it_costs() -> None:
    bench = _story_bench()
    lines = story.story(bench, [])
    text = "\n".join(lines)
    # A clear lead, with the factor over the next, in units read at a glance.
    assert (
        "**64 B frames, 10 connections**: epoll leads with 120 k frames/s, 1.20x blocking, the next." in text
    )
    # Overlapping ranges are a tie, not a win.
    assert "**64 B frames, 5 000 connections**: blocking and epoll tie within the noise" in text
    assert (
        "**idle connections (0, 1 000, 5 000)**: epoll leads with 300 B per idle connection, 34.0x blocking"
        in text
    )
    assert "**one connection, one 64 B frame at a time**: epoll leads with p50 25.0 µs" in text
    [blocking] = [line for line in lines if line.startswith("- **blocking**")]
    assert "a thread per connection" in blocking and "9.96 KiB per idle connection" in blocking
    assert "3.10 µs of CPU per frame at 10 connections" in blocking
    assert "its p99 reaches 1.33 s at 64 B x 5 000 (best: 12.0 ms)" in blocking
    [epoll] = [line for line in lines if line.startswith("- **epoll**")]
    assert "no thread per connection" in epoll
    assert epoll.startswith(
        "- **epoll** leads at idle memory, 64 B x 10 and round trip; ties for first at 64 B x 5 000;"
    )
    assert lines[0].startswith("The machine was quiet: load average 0.2 before and 0.9 after on 2 CPUs")


def test_one_server_alone_is_described_by_its_costs_not_ranked() -> None:
    w = Workload("closed", connections=10)
    reps = _reps(frames_per_s=[100.0, 101.0, 102.0], server_cpu_us_per_frame=[4.0, 4.1, 4.2])
    lines = story.story(_bench({(w, "mine"): reps}, ["mine"]), [])
    assert not any("lead" in line or "tie" in line for line in lines), lines
    assert "- **mine** costs 4.10 µs of CPU per frame at 10 connections." in lines


def test_the_summary_says_when_the_machine_was_busy_or_noisy() -> None:
    busy = {
        "load_avg_before": (29.0, 10.0, 5.0),
        "load_avg_after": (3.0, 8.0, 5.0),
        "cpus": 2,
        "steal_pct": 0.0,
        "pingpong_p50_us": [25.0, 137.0, 40.0],
        "pingpong_p50": spread_of([25.0, 137.0, 40.0]),
    }
    first = story.story(_story_bench(busy), [])[0]
    assert first.startswith("The machine was noisy: load average 29.0 before")
    assert "the ping-pong floor between 25.0 µs and 137 µs" in first
    assert "figures spread over 25 %" in first


def test_a_regression_is_a_move_beyond_both_runs_noise(tmp_path: Path) -> None:
    now = _story_bench()
    earlier = {"bench": json.loads(json.dumps(now.to_json()))}  # a copy, as a file holds it
    c10 = earlier["bench"]["summary"]["closed64-c10"]
    c10["epoll"]["frames_per_s"] = {
        **c10["epoll"]["frames_per_s"],
        "median": 150e3,
        "min": 148e3,
        "max": 152e3,
    }
    c10["blocking"]["frames_per_s"] = {
        **c10["blocking"]["frames_per_s"],
        "median": 102e3,
        "min": 90e3,
        "max": 110e3,
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    compared = {
        (c["workload"], c["server"], c["figure"]): c for c in baseline.compare(baseline.read(path), now)
    }
    assert compared["closed64-c10", "epoll", "frames_per_s"]["verdict"] == "regressed"
    # 2 % down and the ranges overlap: noise.
    assert compared["closed64-c10", "blocking", "frames_per_s"]["verdict"] == "same"
    assert compared["closed64-c5000", "epoll", "frames_per_s"]["verdict"] == "same"
    assert [c["server"] for c in baseline.regressed(list(compared.values()))] == ["epoll"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="has no benchmark summary"):
        baseline.read(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="is not JSON"):
        baseline.read(bad)


def test_server_cpu_per_frame_is_read_against_tokios_in_the_same_repetition(tmp_path: Path) -> None:
    c10 = Workload("closed", connections=10)
    values = {
        (c10, "epoll"): _reps(frames_per_s=[1e5] * 3, server_cpu_us_per_frame=[6.0, 7.0, 9.0]),
        (c10, "tokio"): _reps(frames_per_s=[1e5] * 3, server_cpu_us_per_frame=[8.0, 7.0, 10.0]),
    }
    bench = _bench(values, ["epoll", "tokio"])
    # Repetition by repetition: 6/8, 7/7, 9/10.
    ratio = bench.summary[c10]["epoll"]["server_cpu_vs_tokio"]
    assert (ratio["median"], ratio["min"], ratio["max"]) == pytest.approx((0.9, 0.75, 1.0))
    assert bench.summary[c10]["tokio"]["server_cpu_vs_tokio"]["median"] == 1.0
    _, rows = report.comparison_rows(bench)
    assert ["", "server CPU per frame vs tokio", "0.900x (0.750x-1.00x) *", "1.00x"] in rows  # 28 % spread
    report.write(tmp_path, {"machine": {}, "bench": bench.to_json(), "targets": []}, bench)
    summary = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    [row] = [r for r in summary if r["figure"] == "server_cpu_vs_tokio" and r["server"] == "epoll"]
    assert float(row["median"]) == pytest.approx(0.9) and row["n"] == "3"
    # Without tokio in the run, there is nothing to read it against.
    alone = _bench({(c10, "epoll"): _reps(server_cpu_us_per_frame=[6.0, 7.0, 9.0])}, ["epoll"])
    assert "server_cpu_vs_tokio" not in alone.summary[c10]["epoll"]


def test_the_report_keeps_every_figure_as_csv_and_the_histograms_as_a_log(tmp_path: Path) -> None:
    ping = load.pingpong(duration=0.2)
    w = Workload("rtt")
    metrics = {
        "frames_per_s": ping["frames_per_s"],
        "elapsed_s": ping["elapsed_s"],
        "latency_us": dict(ping["latency_us"]),
        "histogram": load.histogram_base64(ping),
    }
    bench = _bench({(w, "epoll"): [metrics]}, ["epoll"])
    written = report.write(tmp_path, {"machine": {}, "bench": bench.to_json(), "targets": []}, bench)
    rows = list(csv.DictReader((tmp_path / "figures.csv").read_text().splitlines()))
    [p50] = [r for r in rows if r["figure"] == "p50_us" and r["server"] == "epoll"]
    assert float(p50["value"]) == pytest.approx(ping["latency_us"]["p50"])
    assert p50["workload_label"] == "one connection, one 64 B frame at a time"
    summary = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert {"median", "min", "max", "spread", "unstable", "n"} <= set(summary[0])
    log = (tmp_path / "latency.hlog").read_text().splitlines()
    assert log[0].startswith("#[StartTime:")
    [line] = [entry for entry in log if entry.startswith("Tag=rtt/epoll/rep1,")]
    assert base64.b64decode(line.rsplit(",", 1)[1]) == ping["histogram"]
    md = written.md.read_text()
    assert "## Summary" in md and "## Conditions" in md and "[latency.hlog](latency.hlog)" in md


def _connlab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CONNLAB, *args], capture_output=True, text=True, timeout=timeout, check=False)


TINY = [
    "--repetitions", "2", "--duration", "0.3", "--warmup", "0.1", "--connections", "1,10",
    "--idle-steps", "0,50", "--churn", "20x5", "--rate", "2000", "--syscall-frames", "300",
]  # fmt: skip


def test_bench_loads_a_running_server_given_as_target(tmp_path: Path) -> None:
    with ServeProcess(connlab_serve_argv("poll")) as server:
        host, port = server.address
        run = _connlab(
            "bench", "--target", f"{host}:{port}", "--pid", str(server.pid), "--name", "mine",
            "--backends", "epoll", *TINY, "--size", "100", "--pipeline", "2", "--out", str(tmp_path),
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert server.alive, "a target is used as it is, never stopped"
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["bench"]["summary"]
    assert set(summary["closed100-c10-p2"]) == {"epoll", "mine"}
    mine = summary["closed100-c10-p2"]["mine"]
    assert mine["frames_per_s"]["median"] > 0 and not any(mine["errors"].values())
    # With its pid, the target's own cost is measured as a backend's is.
    assert mine["server_cpu_us_per_frame"]["median"] > 0 and mine["server_threads"]["median"] >= 1
    assert summary["idle"]["mine"]["rss_per_conn_bytes"]["n"] == 2
    md = (tmp_path / "report.md").read_text()
    assert "| workload | figure | epoll | mine |" in md
    assert "100 B frames, 10 connections, 2 in flight each" in md
    assert (tmp_path / "latency.hlog").read_text().count("/mine/rep") >= 10
    # No target about a backend that was not measured (tokio, poll...) is listed.
    assert all("tokio" not in t["label"] for t in results["targets"])
    # Its syscalls are counted as a backend's are, given its pid.
    rows = {r["server"]: r["status"] for r in results["bench"]["syscalls"]}
    assert rows == dict.fromkeys(
        ("epoll", "mine"), "counted" if shutil.which("strace") else "strace not installed"
    )


def test_bench_starts_a_server_command_each_repetition_and_gates_on_regressions(tmp_path: Path) -> None:
    command = shlex.join([*connlab_serve_argv("epoll")[:-2], "--port", "{port}"])
    first = tmp_path / "first"
    run = _connlab("bench", "--serve-cmd", command, *TINY, "--out", str(first))
    assert run.returncode == 0, run.stderr
    results = json.loads((first / "results.json").read_text())
    assert set(results["bench"]["summary"]["closed64-c10"]) == {"command"}
    # A baseline that was ten times faster: the same server now regressed, and the gate says so.
    summary = results["bench"]["summary"]
    for cell in summary["closed64-c10"].values():
        cell["frames_per_s"] = {
            k: 10 * v if k in ("median", "min", "max") else v for k, v in cell["frames_per_s"].items()
        }
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(results))
    second = tmp_path / "second"
    run = _connlab(
        "bench",
        "--serve-cmd",
        command,
        *TINY,
        "--baseline",
        str(faster),
        "--fail-on-missed",
        "--out",
        str(second),
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "figures regressed" in run.stdout and "REGRESSED" in (second / "report.md").read_text()


def test_bench_refuses_a_target_that_does_not_accept(tmp_path: Path) -> None:
    with ServeProcess(connlab_serve_argv("epoll")) as server:
        address = server.address
    run = _connlab("bench", "--target", f"{address[0]}:{address[1]}", "--out", str(tmp_path))
    assert run.returncode == 2 and "refuses connections; nothing was run" in run.stderr, run.stderr
    assert not os.listdir(tmp_path)

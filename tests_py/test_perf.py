"""Smoke runs of bench, soak and compare, and the target arithmetic."""

from __future__ import annotations

import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from connlab._cli import build_parser, measure
from connlab._measure import report, soak, targets
from connlab._measure.bench import Workload, spread_of
from run_cli import connlab

TINY = [
    "--repetitions",
    "1",
    "--duration",
    "0.3",
    "--warmup",
    "0.1",
    "--connections",
    "1,10",
    "--idle-steps",
    "0,50",
    "--churn",
    "20x5",
    "--rate",
    "2000",
    "--syscall-frames",
    "300",
]


def test_bench_smoke_measures_every_workload_on_every_backend(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = connlab("bench", "--backends", "epoll,blocking", *TINY, "--json", str(out), "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    workloads = [w["name"] for w in data["config"]["workloads"]]
    # Idle memory first, on a fresh server.
    assert workloads == [
        "idle",
        "closed64-c1",
        "closed64-c10",
        "closed16k-c10",
        "open64-r2000",
        "churn-20x5",
        "rtt",
    ]
    for name in workloads:
        for backend in ("epoll", "blocking"):
            cell = data["summary"][name][backend]
            assert not any(cell["errors"].values()), (name, backend, cell["errors"])
    assert data["summary"]["closed64-c10"]["epoll"]["frames_per_s"]["median"] > 0
    assert data["summary"]["churn-20x5"]["blocking"]["conns_per_s"]["median"] > 0
    assert data["summary"]["open64-r2000"]["epoll"]["p99_us"]["median"] > 0
    assert data["pingpong"][0]["latency_us"]["p50"] > 0
    # Each run is in its own process: blocking's threads grow with connections, epoll's do not.
    assert data["summary"]["closed64-c10"]["blocking"]["server_threads"]["median"] >= 11
    assert data["summary"]["closed64-c10"]["epoll"]["server_threads"]["median"] <= 3
    assert {t["label"] for t in data["targets"]} >= {"epoll idle RSS per connection <= 1 KiB"}
    assert data["summary"]["idle"]["epoll"]["rss_per_conn_bytes"]["median"] > 0
    # The syscall phase, after the timed runs: a row per server, counted where strace is.
    rows = {r["server"]: r for r in data["syscalls"]}
    assert set(rows) == {"epoll", "blocking"}
    if shutil.which("strace") is None:
        assert {r["status"] for r in rows.values()} == {"strace not installed"}
    else:
        assert {r["status"] for r in rows.values()} == {"counted"}, rows
        assert 2 <= rows["epoll"]["per_frame"] <= 5 and 1.5 <= rows["blocking"]["per_frame"] <= 5, rows
    assert "Syscalls per echoed frame" in run.stdout


def test_bench_proxy_measures_each_backend_through_the_proxy_beside_it_direct(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    tiny = [*TINY[: TINY.index("--connections")], "--connections", "100", "--idle-steps", "0,20"]
    run = connlab(
        "bench", "--backends", "epoll", *tiny, "--proxy", "--json", str(out), "--out", str(tmp_path)
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    c100 = data["summary"]["closed64-c100"]
    direct, proxied = c100["epoll"], c100["epoll+proxy"]
    assert direct["frames_per_s"]["median"] > 0 and proxied["frames_per_s"]["median"] > 0
    assert not any(direct["errors"].values()) and not any(proxied["errors"].values())
    # The proxy's own CPU is measured beside the server's, and only where it was in the way.
    assert proxied["proxy_cpu_pct"]["median"] > 0 and "proxy_cpu_pct" not in direct
    # Idle memory is the server's alone: not measured again through the proxy.
    assert "rss_per_conn_bytes" not in data["summary"]["idle"]["epoll+proxy"]
    [target] = [t for t in data["targets"] if "through the proxy" in t["label"]]
    assert target["value"] == pytest.approx(
        proxied["frames_per_s"]["median"] / direct["frames_per_s"]["median"]
    )
    assert "epoll+proxy" in run.stdout and "proxy CPU %" in run.stdout


def test_compare_writes_the_report(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    run = connlab("compare", "--backends", "epoll,tokio", *TINY, "--only", "H1,H3", "--reports", str(reports))
    assert run.returncode == 0, run.stderr
    # The run has a directory of its own, and `latest` links to it.
    [out] = [p for p in reports.iterdir() if p.name != "latest"]
    assert (reports / "latest").is_symlink() and (reports / "latest").resolve() == out.resolve()
    for name in (
        "report.md",
        "report.html",
        "results.json",
        "throughput.png",
        "p99.png",
        "threads.png",
        "rss_per_conn.png",
        "churn.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Lifecycle matrix" in md and "| H1 |" in md and "## Comparison" in md and "## Targets" in md
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["cpus"] >= 1 and {r["status"] for r in results["matrix"]} == {"pass"}
    assert "Targets" in run.stdout or "targets" in run.stdout


def test_each_run_keeps_its_directory_and_latest_follows(tmp_path: Path) -> None:
    root = tmp_path / "reports"
    # A real directory left by an older connlab is kept, under its own time.
    (root / "latest").mkdir(parents=True)
    (root / "latest" / "report.md").write_text("old")
    first = report.new_run_dir(root, now=1_000_000_000)
    again = report.new_run_dir(root, now=1_000_000_000)
    assert first.name == time.strftime("%Y%m%d-%H%M%S", time.localtime(1_000_000_000))
    assert again.name == f"{first.name}-2", "the same second twice: a second directory"
    report.link_latest(root, first)
    assert (root / "latest").resolve() == first.resolve()
    kept = [p for p in root.iterdir() if (p / "report.md").exists() and not p.is_symlink()]
    assert [p.read_text() for p in (k / "report.md" for k in kept)] == ["old"]
    report.link_latest(root, again)
    assert (root / "latest").resolve() == again.resolve()
    assert not [p for p in root.iterdir() if p.name.startswith(".latest")], "no temporary link left"


def test_a_soak_whose_clients_died_fails_saying_so() -> None:
    cfg = soak.SoakConfig(backend="epoll", connections=2, ramp_rate=100, interval=0.5, duration=2)
    samples = [
        soak.Sample(t, 2, 2, 0, 2, 0, 0, frames, 1 << 20, 2, 10, 1.0)
        for t, frames in [(0.5, 2), (1.0, 4), (1.5, 4), (2.0, 4)]
    ]
    kwargs = {"samples": samples, "errors": {}, "left_server": 0, "left_kernel": 0, "stop_report": {}}
    died = soak.verdict(cfg, clients_ended="died during the run (killed by signal 9)", **kwargs)
    assert not died["passed"]
    [row] = [r for r in died["criteria"] if r["criterion"] == "the client process ran the whole soak"]
    assert not row["held"] and row["measured"] == "died during the run (killed by signal 9)"
    lived = soak.verdict(cfg, clients_ended="ran to the end, exit status 0", **kwargs)
    assert lived["passed"], lived


def test_soak_smoke_passes_its_verdict(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = connlab(
        "soak",
        "--backend",
        "epoll",
        "--connections",
        "40",
        "--ramp-rate",
        "200",
        "--interval",
        "0.5",
        "--duration",
        "2",
        "--sample-every",
        "0.5",
        "--json",
        str(out),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and len(data["samples"]) >= 3
    # Quiescent once the ramp (0.2 s) and one interval are over.
    assert all(s["phantoms"] == 0 for s in data["samples"] if s["t"] >= 0.7)
    assert max(s["clients_connected"] for s in data["samples"]) == 40


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--connections", "x"], "expected comma-separated integers"),
        (["bench", "--churn", "10"], "expected CYCLESxPARALLEL"),
        (["bench", "--backends", "nosuch"], "unknown backends"),
        (["soak", "--backend", "epoll", "--duration", "-1"], "must be > 0"),
        (["compare", "--only", "Z1"], "argument --only: unknown scenario ids ['Z1']"),
        (["matrix", "--only", "H1,Z9"], "argument --only: unknown scenario ids ['Z9']"),
        (["bench", "--connections", "0"], "argument --connections: must be > 0, got 0"),
        (["bench", "--connections", "10,1000000"], "must be at most"),
        (["bench", "--idle-steps", "0"], "expected two or more ascending counts"),
        (["bench", "--idle-steps", "0,1000000"], "net.ipv4.ip_local_port_range"),
        (["bench", "--rate", "100000000"], "argument --rate: must be at most 10,000,000 frames/s"),
        (["bench", "--gen-threads", "1000"], "argument --gen-threads: must be at most 64 generator threads"),
        (["bench", "--churn", "100000x10"], "each leaving a TIME_WAIT"),
        (["bench", "--duration", "1e9"], "argument --duration: must be at most 3,600 (an hour)"),
        (["bench", "--size", "0"], "argument --size: must be > 0"),
        (["bench", "--size", "2000000"], "argument --size: must be at most 1,048,576 bytes"),
        (["bench", "--pipeline", "5000"], "argument --pipeline: must be at most 4,096"),
        (["bench", "--target", "localhost"], "argument --target: expected HOST:PORT"),
        (["bench", "--target", "127.0.0.1:70000"], "argument --target: expected HOST:PORT"),
        (["matrix", "--target", "nohost"], "argument --target: expected HOST:PORT"),
        (["bench", "--pid", "1"], "--pid: only with --target"),
        (["bench", "--name", "x"], "--name: only with --target or --serve-cmd"),
        (["bench", "--baseline", "/nonexistent/results.json"], "cannot read /nonexistent/results.json"),
        (["compare", "--baseline", "/nonexistent/results.json"], "cannot read /nonexistent/results.json"),
        (["soak", "--backend", "epoll", "--connections", "0"], "argument --connections: must be > 0"),
        (["soak", "--backend", "epoll", "--max-phantoms", "-1"], "argument --max-phantoms: must be ≥ 0"),
        (["handoff", "--repetitions", "0"], "argument --repetitions: must be > 0"),
        (
            ["soak", "--backend", "epoll", "--max-error-rate", "5"],
            "argument --max-error-rate: must be at most 1",
        ),
    ],
)
def test_bad_options_get_a_clear_error(args: list[str], message: str) -> None:
    started = time.monotonic()
    run = connlab(*args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    # Refused by argparse, before anything started: no traceback.
    assert "Traceback" not in run.stderr and time.monotonic() - started < 10


def test_version_is_the_installed_one() -> None:
    run = connlab("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"connlab {version('connlab')}", run.stdout


@pytest.mark.parametrize("command", ["bench", "soak", "compare"])
def test_help_explains_every_option(command: str) -> None:
    run = connlab(command, "--help")
    assert run.returncode == 0
    options = {
        "bench": [
            "--backends",
            "--repetitions",
            "--duration",
            "--warmup",
            "--connections",
            "--rate",
            "--churn",
            "--idle-steps",
            "--workers",
            "--pin",
            "--gen-threads",
            "--proxy",
            "--json",
            "--target",
            "--pid",
            "--serve-cmd",
            "--name",
            "--size",
            "--pipeline",
            "--reports",
            "--out",
            "--baseline",
            "--fail-on-missed",
            "--no-syscalls",
            "--syscall-frames",
        ],
        "soak": [
            "--backend",
            "--connections",
            "--ramp-rate",
            "--interval",
            "--duration",
            "--sample-every",
            "--max-phantoms",
            "--max-error-rate",
            "--json",
        ],
        "compare": [
            "--out",
            "--reports",
            "--skip-matrix",
            "--only",
            "--pin",
            "--repetitions",
            "--proxy",
            "--size",
            "--baseline",
            "--fail-on-missed",
            "--no-syscalls",
            "--syscall-frames",
        ],
    }[command]
    for option in options:
        assert option in run.stdout, option


def test_targets_are_ratios_to_the_same_run() -> None:
    def cell(**figures: float) -> dict:
        return {k: spread_of([v]) for k, v in figures.items()}

    closed = Workload("closed", connections=10), Workload("closed", connections=1000)
    summary = {
        closed[0]: {"epoll": cell(frames_per_s=120.0), "tokio": cell(frames_per_s=100.0)},
        closed[1]: {
            "epoll": cell(p99_us=40.0, server_cpu_us_per_frame=6.0),
            "tokio": cell(p99_us=100.0, server_cpu_us_per_frame=8.0),
            "uring": cell(server_cpu_us_per_frame=5.0),
        },
        Workload("idle", steps=(0, 50)): {"tokio": cell(rss_per_conn_bytes=5000.0)},
        Workload("rtt"): {"epoll": cell(p50_us=25.0)},
        Workload("churn", cycles=20, parallel=5): {
            "epoll": cell(conns_per_s=300.0),
            "tokio": cell(conns_per_s=200.0),
        },
    }
    pingpong = [{"latency_us": {"p50": 20.0}}]
    rows = {r["label"]: r for r in targets.evaluate(targets.default_targets(2), summary, pingpong)}
    assert rows["epoll >= 1.0x tokio frames/s at 10 connections"]["met"] is True
    assert rows["epoll >= 1.0x tokio frames/s at 10 connections"]["value"] == pytest.approx(1.2)
    assert rows["epoll p99 <= 0.5x tokio's at 1000 connections"]["met"] is True
    assert rows["tokio idle RSS per connection <= 4 KiB"]["met"] is False
    assert rows["epoll one-connection p50 <= 1.2x raw loopback ping-pong"]["value"] == pytest.approx(1.25)
    assert rows["epoll one-connection p50 <= 1.2x raw loopback ping-pong"]["met"] is False
    assert rows["poll >= 0.8x epoll at 100 connections"]["status"] == "not measured"
    # Server CPU per frame at 1 000 connections: epoll against tokio, uring against epoll.
    cpu = rows["epoll <= 0.9x tokio server CPU per frame at 1000 connections"]
    assert cpu["value"] == pytest.approx(0.75) and cpu["met"] is True
    assert cpu["detail"] == "0.75x (6.00 µs server CPU per frame vs 8.00 µs server CPU per frame)"
    uring = rows["uring <= 0.8x epoll server CPU per frame at 1000 connections"]
    assert uring["value"] == pytest.approx(5 / 6) and uring["met"] is False
    # The ping-pong floor target covers uring too, beside epoll and poll.
    assert "uring one-connection p50 <= 1.2x raw loopback ping-pong" in rows
    assert rows["poll one-connection p50 <= 1.2x raw loopback ping-pong"]["status"] == "not measured"
    # Read from whatever churn the run had, found by its kind, not by its name.
    assert rows["epoll >= 1.1x tokio churn rate"]["value"] == pytest.approx(1.5)


def test_sharded_target_is_judged_only_unpinned() -> None:
    """Pinned, the shards share the server's one CPU while the generator has the other: the
    sharded >= 1.3x epoll target then says it is not measured, and why."""

    def cell(**figures: float) -> dict:
        return {k: spread_of([v]) for k, v in figures.items()}

    summary = {
        Workload("closed", connections=1000): {
            "epoll": cell(frames_per_s=100.0),
            "sharded": cell(frames_per_s=140.0),
        }
    }
    label = "sharded (2 shards) >= 1.3x epoll frames/s at 1000 connections (unpinned)"
    for pinned, status in ((False, "met"), (True, "not measured")):
        rows = {
            r["label"]: r for r in targets.evaluate(targets.default_targets(2), summary, [], pinned=pinned)
        }
        assert rows[label]["status"] == status, pinned
    assert "unpinned run only" in rows[label]["detail"]


def test_a_backend_this_machine_cannot_run_is_left_out_of_the_bench_with_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def why(backend: str) -> str | None:
        return f"{backend} is unavailable here: no ring" if backend == "uring" else None

    monkeypatch.setattr(measure, "backend_unavailable", why)
    cfg = measure._bench_config(build_parser().parse_args(["bench", "--backends", "epoll,uring"]))
    assert cfg.backends == ["epoll"]
    assert cfg.skipped == {"uring": "uring is unavailable here: no ring"}

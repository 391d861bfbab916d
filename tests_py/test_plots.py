"""The report's plots, drawn from a made-up bench: every file written and a real PNG, plots without
data left out, the connection axis ticked at the measured counts."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from connlab import load
from connlab._measure import plots
from connlab._measure.bench import Bench, BenchConfig, External, Run, Workload, default_workloads

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
BACKENDS = ["blocking", "pool", "poll", "epoll", "tokio"]
EVERY_PLOT = {
    "throughput.png",
    "p99.png",
    "threads.png",
    "cpu_per_frame.png",
    "cpu_vs_tokio.png",
    "mb_per_s.png",
    "open_latency.png",
    "rtt.png",
    "rss_per_conn.png",
    "churn.png",
}
#: What a server without a pid has no figures for.
NEEDS_PID = {"threads.png", "cpu_per_frame.png", "cpu_vs_tokio.png", "rss_per_conn.png"}


@pytest.fixture(scope="module")
def histogram() -> str:
    """A real latency histogram (base64 text), from a short raw loopback ping-pong."""
    return load.histogram_base64(load.pingpong(duration=0.2))


def made_up(w: Workload, label: str, rep: int, histogram: str, *, pid: bool) -> dict[str, Any]:
    """Plausible figures of one run: jitter of a few percent, a wide one for blocking at the most
    connections and in churn (unstable figures), poll and epoll at 2 threads (equal values)."""
    rng = random.Random(f"{w.name}/{label}/{rep}")
    speed = {"blocking": 0.6, "pool": 0.8, "poll": 1.0, "epoll": 1.1, "tokio": 1.05}.get(label, 0.9)
    shaky = label == "blocking" and (w.connections >= 1000 or w.kind == "churn")

    def jitter(x: float) -> float:
        return x * (1 + rng.uniform(-0.5, 0.5) if shaky else 1 + rng.uniform(-0.04, 0.04))

    if w.kind == "idle":
        if not pid:
            return {}
        per_conn = {"blocking": 10_100.0, "pool": 5_000.0}.get(label, 900.0)
        return {"rss_per_conn_bytes": jitter(per_conn), "server_threads": 3}
    if w.kind == "churn":
        return {"conns_per_s": jitter(6_197.6 * speed), "errors": {}}
    p50 = jitter(20 + 0.5 * w.connections / speed)
    latency = {"p50": p50, "p90": 1.5 * p50, "p99": 3 * p50, "p99.9": 5 * p50, "max": 9 * p50}
    figures: dict[str, Any] = {
        "latency_us": latency,
        "frames_per_s": jitter(60_000 * speed * min(w.connections, 20) ** 0.5),
        "mb_per_s": jitter(900 * speed) if w.size >= 1024 else 0.0,
        "errors": {},
    }
    if w.kind == "open":
        figures["histogram"] = histogram
    if pid:
        threads = {"blocking": w.connections + 2, "pool": 10}.get(label, 2)
        figures |= {"server_threads": threads, "server_cpu_us_per_frame": jitter(7 / speed)}
    return figures


def synthetic(
    histograms: str | list[str], *, backends: list[str], external: bool = False, reps: int = 3
) -> Bench:
    """A bench of `backends` (and an external server without a pid) with made-up figures; the
    open loop's histogram is one of `histograms`, one per label in turn."""
    histograms = [histograms] if isinstance(histograms, str) else histograms
    externals = [External("nginx", address=("127.0.0.1", 8080))] if external else []
    cfg = BenchConfig(backends=backends, workloads=default_workloads(), repetitions=reps, externals=externals)
    runs = [
        Run(label, w, rep, made_up(w, label, rep, histograms[i % len(histograms)], pid=label in backends))
        for rep in range(reps)
        for i, label in enumerate(cfg.labels)
        for w in cfg.workloads
    ]
    floor = [17.9, 18.4, 19.2][:reps]
    return Bench(
        cfg, machine={}, pinning="none", pingpong=[], runs=runs, conditions={"pingpong_p50_us": floor}
    )


def assert_pngs(out: Path, made: dict[str, str]) -> None:
    assert {p.name for p in out.iterdir()} == set(made.values())
    for name in made.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, name


def test_draw_writes_every_plot_as_a_png(tmp_path: Path, histogram: str) -> None:
    made = plots.draw(synthetic(histogram, backends=BACKENDS, external=True), tmp_path)
    assert set(made.values()) == EVERY_PLOT
    assert_pngs(tmp_path, made)
    assert "Throughput vs connections — 64 B frames, closed loop" in made
    assert "Bandwidth — 16 KiB frames, 10 connections" in made


def test_a_server_without_cpu_figures_leaves_those_plots_out(tmp_path: Path, histogram: str) -> None:
    made = plots.draw(synthetic(histogram, backends=[], external=True, reps=1), tmp_path)
    assert set(made.values()) == EVERY_PLOT - NEEDS_PID
    assert_pngs(tmp_path, made)  # and no empty PNG in their place


def test_a_workload_not_run_has_no_plot(tmp_path: Path, histogram: str) -> None:
    bench = synthetic(histogram, backends=["epoll"], reps=1)
    bench.config.workloads = [w for w in bench.config.workloads if w.kind in {"closed", "rtt"}]
    bench.runs = [r for r in bench.runs if r.workload in bench.config.workloads]
    made = plots.draw(bench, tmp_path)
    # Without tokio in the run, no CPU ratio to it either.
    assert set(made.values()) == {"throughput.png", "p99.png", "threads.png", "cpu_per_frame.png"} | {
        "mb_per_s.png",
        "rtt.png",
    }
    assert_pngs(tmp_path, made)


def test_the_throughput_axis_is_ticked_at_the_measured_counts(histogram: str) -> None:
    bench = synthetic(histogram, backends=BACKENDS, reps=1)
    fig = next(fig for name, _, fig in plots.figures(bench) if name == "throughput.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "10", "100", "1 000", "5 000"]
    assert list(ax.get_xticks()) == [1, 10, 100, 1000, 5000]
    assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert len(ax.get_legend().get_texts()) == len(BACKENDS)


def test_cpu_per_frame_against_tokio_is_a_ratio_per_repetition_by_connections(histogram: str) -> None:
    bench = synthetic(histogram, backends=BACKENDS, reps=3)
    closed = plots.main_closed(bench.config.workloads)
    # Each run's ratio is to tokio's run of the same workload and repetition.
    for w in closed:
        for rep in range(3):
            epoll, tokio = (
                next(r for r in bench.runs if (r.workload, r.rep, r.backend) == (w, rep, b))
                for b in ("epoll", "tokio")
            )
            assert epoll.metrics["server_cpu_vs_tokio"] == pytest.approx(
                epoll.metrics["server_cpu_us_per_frame"] / tokio.metrics["server_cpu_us_per_frame"]
            )
    fig = next(fig for name, _, fig in plots.figures(bench) if name == "cpu_vs_tokio.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "10", "100", "1 000", "5 000"]
    # A line per server with min-max error bars (tokio's flat at 1, the reference), in each
    # server's style; blocking's unstable points hollow, and the legend says so.
    series = {c.get_label(): c for c in ax.containers}
    assert list(series) == BACKENDS
    assert list(series["tokio"].lines[0].get_ydata()) == [1.0] * len(closed)
    epoll = series["epoll"].lines[0]
    medians = [bench.summary[w]["epoll"]["server_cpu_vs_tokio"]["median"] for w in closed]
    assert list(epoll.get_ydata()) == pytest.approx(medians)
    assert epoll.get_marker() == plots.MARKERS[BACKENDS.index("epoll")]
    assert series["epoll"].has_yerr
    legend = [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]
    assert legend == [*BACKENDS, plots.HOLLOW_NOTE]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0


def test_unstable_figures_are_noted_in_the_legend(histogram: str) -> None:
    bench = synthetic(histogram, backends=BACKENDS, reps=3)
    fig = next(fig for name, _, fig in plots.figures(bench) if name == "throughput.png")
    legend = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [*BACKENDS, plots.HOLLOW_NOTE]
    assert plots.HOLLOW_NOTE == "hollow: min-max spread over 25 %"


def test_connection_ticks_are_exactly_the_counts_grouped() -> None:
    assert plots.connection_ticks([1000, 1, 10, 5000, 100, 10]) == (
        [1, 10, 100, 1000, 5000],
        ["1", "10", "100", "1 000", "5 000"],
    )
    assert plots.connection_ticks([12_345]) == ([12_345], ["12 345"])


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_offsets_are_distinct_small_and_centred(n: int) -> None:
    step = plots.offset_step([1, 10, 100, 1000, 5000])
    assert 1.1 < 1 + step < 1.2  # a marker's width on a 7-inch plot
    factors = plots.offsets(n, step)
    assert len(set(factors)) == n and factors == sorted(factors)
    assert all(0.5 < f < 2 for f in factors)  # never as far as the next count (10x, or 5x)
    assert all(b / a == pytest.approx(1 + step) for a, b in itertools.pairwise(factors))
    assert abs(factors[0] * factors[-1] - 1) < 1e-9  # symmetric on the log axis
    if n % 2:
        assert factors[n // 2] == 1.0


def test_offset_step_narrows_with_a_wider_axis() -> None:
    assert plots.offset_step([10]) < plots.offset_step([1, 10]) < plots.offset_step([1, 100_000])


def test_tick_labels_drop_the_zeros_of_significant_digits() -> None:
    assert [
        plots.tick_label(t) for t in ["50.0 k", "20.0 µs", "1.00 ms", "2.50 ms", "10.0", "100 µs", "0"]
    ] == [
        "50 k",
        "20 µs",
        "1 ms",
        "2.5 ms",
        "10",
        "100 µs",
        "0",
    ]


def test_percentile_ticks_reach_the_data() -> None:
    assert plots.percentile_ticks(50) == ([2.0, 10.0, 100.0], ["50%", "90%", "99%"])
    positions, labels = plots.percentile_ticks(20_000)
    assert labels == ["50%", "90%", "99%", "99.9%", "99.99%"]
    assert positions[-1] == 10_000


def test_main_closed_is_the_common_frame_size_by_connections() -> None:
    main = plots.main_closed(default_workloads((100, 1, 10)))
    assert [(w.size, w.connections) for w in main] == [(64, 1), (64, 10), (64, 100)]
    # A tie between 64 B and 16 KiB frames: the smaller.
    assert [w.size for w in plots.main_closed(default_workloads((10,)))] == [64]
    assert plots.main_closed([Workload("rtt")]) == []


def test_spectrum_merges_the_repetitions(histogram: str) -> None:
    bench = synthetic(histogram, backends=["epoll"], reps=2)
    open_loop = next(w for w in bench.config.workloads if w.kind == "open")
    points = plots.spectrum(bench, open_loop, "epoll")
    assert points == load.percentile_spectrum(load.merge_histograms([histogram, histogram]))
    assert points[-1][0] == 1.0
    assert plots.spectrum(bench, open_loop, "tokio") == []

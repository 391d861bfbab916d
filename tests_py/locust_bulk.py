"""Checks of `connlab.locust` that must run under Locust (importing it monkey-patches the process with
gevent): `test_locust.py` runs this file in a child process, which exits non-zero on a failed check.

The bulk path against Locust's own: an interval recorded in bulk must leave Locust's statistics
exactly as one `log_request` per frame would, and its failures as one `log_error` per failure.
"""

from __future__ import annotations

import sys
from unittest import mock

import locust.stats
from locust.env import Environment

import connlab
from connlab import load
from connlab.client import wait_until
from connlab.locust import FAILURES, METHOD, FramedEchoUser, target


class Echo(FramedEchoUser):
    size = 100


#: Two instants, three seconds apart: the second report finds a new second, and the web UI's cache
#: of response times (what `StatsEntry.log` keeps at each new second) must be updated as Locust would.
INSTANTS = (1_000_000.25, 1_000_003.5)


def recorded_in_bulk(interval: load.Interval) -> locust.stats.RequestStats:
    env = Environment(user_classes=[Echo])
    env.stats = locust.stats.RequestStats(use_response_times_cache=True)
    user = Echo(env)
    for t in INSTANTS:
        with mock.patch("time.time", return_value=t):
            user._record(interval)
    return env.stats


def recorded_one_by_one(interval: load.Interval, name: str) -> locust.stats.RequestStats:
    stats = locust.stats.RequestStats(use_response_times_cache=True)
    for t in INSTANTS:
        with mock.patch("time.time", return_value=t):
            for us, n in load.histogram_counts(interval["histogram"]):
                for _ in range(n):
                    stats.log_request(METHOD, name, us, 104)
            for kind, n in interval["errors"].items():
                for _ in range(n):
                    stats.log_error(METHOD, name, FAILURES[kind])
    return stats


def cache(entry: locust.stats.StatsEntry) -> dict[int, tuple[dict[int, int], int]]:
    return {t: (dict(c.response_times), c.num_requests) for t, c in entry.response_times_cache.items()}


def check_bulk_equals_one_by_one() -> None:
    # A real interval: a run against a connlab server, so the histogram has the shape runs give.
    with connlab.Server("epoll", journal_capacity=0) as server:
        running = load.start(server, connections=2, rate=3000.0, duration=0.5)
        wait_until(lambda: running.done, timeout=10.0, what="a 0.5 s run to end")
        interval = running.take()
    assert interval["frames"] == 1500, interval["frames"]
    interval["errors"] = {**interval["errors"], "reset": 2, "timeout": 1}
    name = Echo(Environment(user_classes=[Echo])).entry
    bulk, single = recorded_in_bulk(interval), recorded_one_by_one(interval, name)
    for got, want in [(bulk.get(name, METHOD), single.get(name, METHOD)), (bulk.total, single.total)]:
        assert got.num_requests == want.num_requests == 3000
        assert dict(got.response_times) == dict(want.response_times)
        assert got.min_response_time == want.min_response_time
        assert got.max_response_time == want.max_response_time
        assert abs(got.total_response_time - want.total_response_time) < 1e-6 * want.total_response_time
        assert got.total_content_length == want.total_content_length
        assert dict(got.num_reqs_per_sec) == dict(want.num_reqs_per_sec) == {1_000_000: 1500, 1_000_003: 1500}
        assert got.last_request_timestamp == want.last_request_timestamp == INSTANTS[1]
        assert got.num_failures == want.num_failures == 6
        assert dict(got.num_fail_per_sec) == dict(want.num_fail_per_sec)
        assert cache(got) == cache(want) and cache(got), "the web UI's current percentiles"
        for q in (0.5, 0.9, 0.99, 1.0):
            assert got.get_response_time_percentile(q) == want.get_response_time_percentile(q)
    errors = {e.error: (e.occurrences, e.first_seen, e.last_seen) for e in bulk.errors.values()}
    assert errors == {e.error: (e.occurrences, e.first_seen, e.last_seen) for e in single.errors.values()}
    assert errors[FAILURES["reset"]] == (4, INSTANTS[0], INSTANTS[1])


def check_target() -> None:
    assert target("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert target("tcp://127.0.0.1:7000/") == ("127.0.0.1", 7000)
    assert target("[::1]:7000") == ("::1", 7000)
    assert target("localhost:7000")[1] == 7000
    for bad in [None, "", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http", "http://x:80:"]:
        try:
            target(bad)
        except ValueError as e:
            assert "--host" in str(e) or "no host" in str(e), e
        else:
            raise AssertionError(f"target({bad!r}) was accepted")


if __name__ == "__main__":
    check_bulk_equals_one_by_one()
    check_target()
    print("locust checks: ok")
    sys.exit(0)

"""Load from more than one machine: a Locust user whose load comes from connlab's Rust generator.

Install with ``pip install 'connlab[locust]'`` and subclass ``FramedEchoUser`` in a locustfile::

    from connlab.locust import FramedEchoUser

    class Echo(FramedEchoUser):
        connections = 200  # per user: run one user per worker process
        size = 64

then run ``locust -f locustfile.py --host 127.0.0.1:7000`` (alone, or as ``--master`` with ``--worker``
processes on other machines). Each user is one generator run (``connlab.load.start``) on native
threads of its own, so gevent's loop is never blocked; every ``report_every`` seconds the user moves
what the run counted into Locust's statistics in bulk: each verified echo is one request of type
``frame``, with its latency in **microseconds** (the entry's name says so: Locust labels its columns
"ms", and would round sub-millisecond times to 0 or 1). Failures count connections that failed, by
kind (``connlab.load.ERROR_KINDS``), not frames. Workers send Locust histograms (response-time
buckets), so the master's percentiles are those of all frames together, not averages.

When the master stops the test (``--run-time``, the web UI, Ctrl-C or SIGTERM to the master), it asks
every worker to end its runs and waits for each worker's last counts before Locust stops the users:
no frame its workers counted is missing from its totals. It then logs the exact figures, from the
runs' own HDR histograms merged (Locust's buckets hold two significant digits), and with
``--connlab-report PATH`` writes them, per worker and per run, as JSON. A worker stopped on its own
(a signal to the worker) ends as any Locust worker does: the counts of its last report interval
(3 s) never reach the master.

Importing this module imports Locust, and so gevent's monkey patching: import it from a locustfile,
never from a program that does not run under Locust.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from typing import Any

import gevent
import gevent.event
import locust.stats
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import STATE_MISSING, MasterRunner, WorkerRunner
from locust.stats import StatsError
from locust.user.users import LOCUST_STATE_STOPPING

from connlab import load

__all__ = ["METHOD", "FramedEchoUser", "target"]

logger = logging.getLogger(__name__)

#: Locust's request type (its "Type" column) for an echoed frame.
METHOD = "frame"

#: How each error kind reads in Locust's failures table.
FAILURES = {
    "connect": "connect: the connection could not be opened (refused, unreachable, no local port)",
    "reset": "reset: the server reset the connection (ECONNRESET, EPIPE)",
    "eof": "eof: the server closed the connection while answers were owed",
    "corrupt": "corrupt: an answer differed from its frame",
    "timeout": "timeout: a connect or an owed answer made no progress for the run's timeout",
    "io": "io: another socket error",
}

#: Custom messages between the master and its workers.
STOP = "connlab_stop"
DONE = "connlab_done"

#: How long the master waits for a worker's last counts beyond the runs' own drain.
STOP_SLACK_S = 10.0


def target(host: str | None) -> tuple[str, int]:
    """``(ip, port)`` of Locust's ``--host``: ``HOST:PORT``, ``[IPv6]:PORT`` or ``tcp://HOST:PORT``, a
    name resolved here. Anything else raises ``ValueError`` saying what ``--host`` should be."""
    usage = "--host must be the echo server's address, HOST:PORT (e.g. 127.0.0.1:7000)"
    if not host:
        raise ValueError(f"no host given: {usage}")
    rest = host.removeprefix("tcp://").rstrip("/")
    name, sep, port_text = rest.rpartition(":")
    name = name.removeprefix("[").removesuffix("]")
    if not sep or not name or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--host {host!r}: {usage}")
    try:
        infos = socket.getaddrinfo(name, int(port_text), type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"--host {host!r}: cannot resolve {name!r}: {e}") from None
    address = infos[0][4]
    return str(address[0]), int(address[1])


class FramedEchoUser(User):
    """One connlab generator run, for as long as Locust runs the user: ``connections`` connections
    (per user) echoing frames of ``size`` bytes, each keeping ``pipeline`` in flight (a closed loop),
    or, with ``rate``, ``rate`` frames/s of this user on a fixed schedule with latency from each
    frame's due instant (an open loop, free of coordinated omission). The options are those of
    ``connlab.load.start``; set them as class attributes of a subclass.

    The generator paces the frames: its one task, ``generate``, runs as long as the user. One user runs the
    generator on one or two native threads (``threads``); run one user per worker process
    (``-u`` equal to the number of workers) and size the load with ``connections`` and ``rate``.
    """

    abstract = True
    wait_time = constant(0)

    #: Connections this user's run keeps open.
    connections: int = 10
    #: Payload bytes per frame.
    size: int = 64
    #: Frames per second of this user's run (an open loop); None for a closed loop.
    rate: float | None = None
    #: Frames in flight per connection in a closed loop.
    pipeline: int = 1
    #: Generator threads; None: one, two from 512 connections on.
    threads: int | None = None
    #: Longest wait for a connect or an owed answer, in seconds.
    timeout: float = 2.0
    #: Seconds between two reports into Locust's statistics.
    report_every: float = 1.0
    #: The statistics entry's name; None: "echo <size> B (µs)".
    name: str | None = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._running: load.Running | None = None
        self._result: load.Result | None = None
        #: Set once `finish` began: a second caller waits for the first.
        self._finishing: gevent.event.Event | None = None

    @property
    def entry(self) -> str:
        """The name of this user's statistics entry."""
        return self.name or f"echo {self.size} B (µs)"

    @task
    def generate(self) -> None:
        """The one task: starts the run, then reports it every ``report_every`` seconds until Locust
        stops the user (killed, or asked to stop with ``--stop-timeout``) or the run's day is over;
        after that, idles."""
        if self._running is not None or _process.stopping:
            # The run is over (tasks are called again after each), or the test is stopping: a user
            # spawned now must not start a run that the stop has already gathered without it.
            gevent.sleep(self.report_every if self.report_every > 0 else 1.0)
            return
        try:
            if not self.report_every > 0:
                raise ValueError(f"report_every must be a positive number of seconds: {self.report_every}")
            self._running = load.start(
                target(self.host),
                self.connections,
                self.size,
                rate=self.rate,
                pipeline=self.pipeline,
                threads=self.threads,
                timeout=self.timeout,
            )
        except ValueError as e:
            # A setting no run can start with: said once, counted as the user's error (Locust then
            # exits non-zero), and this user stops, rather than failing again at every task call.
            logger.error("connlab: %s: %s", type(self).__name__, e)
            self.environment.events.user_error.fire(user_instance=self, exception=e, tb=e.__traceback__)
            raise StopUser() from e
        try:
            while not self._running.done and self._state != LOCUST_STATE_STOPPING:
                gevent.sleep(self.report_every)
                self._record(self._running.take())
        finally:  # on a kill (GreenletExit) too: the last counts must not be lost
            self.finish()

    def stop_run(self) -> None:
        """Ends the run's window now, without waiting for its drain (``finish`` waits)."""
        if self._running is not None:
            self._running.stop()

    def finish(self) -> load.Result | None:
        """Stops the run, waits for its drain (cooperatively), records its last counts, and returns its
        report. Called again, or from another greenlet meanwhile, it waits for the first call and
        returns the same report. None if the run never started, did not end in time, or failed."""
        if self._finishing is not None:
            self._finishing.wait()
            return self._result
        running = self._running
        if running is None:
            return None
        self._finishing = gevent.event.Event()
        try:
            running.stop()
            deadline = time.monotonic() + self.timeout + 1.0
            while not running.done and time.monotonic() < deadline:
                gevent.sleep(0.005)
            if not running.done:
                # Still draining past its timeout: its report would block the loop, which must not.
                logger.error(
                    "connlab: a generator run did not end within %.1f s of its stop", self.timeout + 1
                )
                return None
            self._record(running.take())
            try:
                self._result = running.result()
            except OSError as e:  # the run could not go on (a thread or an epoll instance failed)
                logger.error("connlab: a generator run failed: %s", e)
                return None
            _process.finished.append(self._result)
            return self._result
        finally:
            self._finishing.set()

    def _record(self, interval: load.Interval) -> None:
        """Adds an interval to Locust's statistics as that many requests, in bulk (Locust's
        ``log_request`` one frame at a time would cost more than the frames)."""
        stats = self.environment.stats
        now = time.time()
        second = int(now)
        frames = interval["frames"]
        if frames:
            counts = load.histogram_counts(interval["histogram"])
            for entry in (stats.get(self.entry, METHOD), stats.total):
                if (
                    entry.use_response_times_cache
                    and entry.last_request_timestamp
                    and second > int(entry.last_request_timestamp)
                ):
                    # What StatsEntry.log does at a new second: the web UI's current percentiles.
                    entry._cache_response_times(second - 1)
                entry.num_requests += frames
                entry.num_reqs_per_sec[second] += frames
                entry.last_request_timestamp = now
                entry.total_content_length += frames * (self.size + 4)
                for us, n in counts:
                    entry.response_times[locust.stats.bucket_response_time(us)] += n
                    entry.total_response_time += us * n
                low, high = counts[0][0], counts[-1][0]
                entry.min_response_time = (
                    low if entry.min_response_time is None else min(entry.min_response_time, low)
                )
                entry.max_response_time = max(entry.max_response_time, high)
        for kind, n in interval["errors"].items():
            if n:
                self._record_failures(FAILURES[kind], n, now)

    def _record_failures(self, error: str, n: int, now: float) -> None:
        """What ``n`` calls of Locust's ``RequestStats.log_error`` would record, at once (a server that
        refuses 200 connections reopened every 10 ms fails 20 000 times a second)."""
        stats = self.environment.stats
        for entry in (stats.get(self.entry, METHOD), stats.total):
            entry.num_failures += n
            entry.num_fail_per_sec[int(now)] += n
        key = StatsError.create_key(METHOD, self.entry, error)
        if key not in stats.errors:
            stats.errors[key] = StatsError(METHOD, self.entry, error, first_seen=now)
        record = stats.errors[key]
        record.occurrences += n
        record.first_seen = record.first_seen or now
        record.last_seen = now


def _users(environment: Environment) -> list[FramedEchoUser]:
    """This process's connlab users that are still alive."""
    runner = environment.runner
    if runner is None:
        return []
    return [u for g in runner.user_greenlets if isinstance(u := g.args[0], FramedEchoUser)]


def _finish_all(environment: Environment) -> list[load.Result]:
    """Finishes every live connlab user's run here: all are stopped first, then each awaited, so none
    goes on loading the server while another drains. Returns the reports of every run this test
    finished in this process (users stopped earlier by a ramp-down included)."""
    users = _users(environment)
    for user in users:
        user.stop_run()
    for user in users:
        user.finish()
    return list(_process.finished)


def _encodable(result: load.Result) -> dict[str, Any]:
    """A report as a message (and the JSON report) carries it: the histogram as base64 text."""
    return {**result, "histogram": load.histogram_base64(result)}


class _Collection:
    """The master's wait for every worker's last counts."""

    def __init__(self, workers: set[str]) -> None:
        self.waiting = set(workers)
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.complete = gevent.event.Event()
        if not self.waiting:
            self.complete.set()

    def arrived(self, worker: str, results: list[dict[str, Any]]) -> None:
        self.results[worker] = results
        self.waiting.discard(worker)
        if not self.waiting:
            self.complete.set()


class _Process:
    """This process's part in the current test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        #: Set once the test began to stop here: no new run starts.
        self.stopping = False
        #: Set once the stop has gathered every run (a second stop waits for it).
        self.stopped = gevent.event.Event()
        #: The reports of the runs finished in this test.
        self.finished: list[load.Result] = []
        #: The master's wait for its workers, while it lasts.
        self.collection: _Collection | None = None


_process = _Process()


def _on_done(environment: Environment, msg: Any, **_: Any) -> None:
    if _process.collection is not None:
        _process.collection.arrived(msg.node_id, msg.data["results"])


def _on_stop(environment: Environment, msg: Any, **_: Any) -> None:
    """On a worker: finish the runs, send Locust's stats at once (they hold the last counts), then the
    runs' reports: in this order, over one connection, so the master has the stats first."""
    runner = environment.runner
    assert isinstance(runner, WorkerRunner)
    _process.stopping = True
    results = [_encodable(r) for r in _finish_all(environment)]
    data: dict[str, Any] = {}
    environment.events.report_to_master.fire(client_id=runner.client_id, data=data)
    runner.send_message("stats", data)
    runner.send_message(DONE, {"results": results})


def _uses_connlab(environment: Environment) -> bool:
    return any(issubclass(c, FramedEchoUser) for c in environment.user_classes)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_: Any) -> None:
    parser.add_argument(
        "--connlab-report",
        default="",
        metavar="PATH",
        help="connlab: write the generator runs' own figures (frames, errors, HDR percentiles merged "
        "over every run, per worker and per run) to PATH as JSON when the test stops",
    )


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(STOP, _on_stop, concurrent=True)
    elif isinstance(runner, MasterRunner):
        runner.register_message(DONE, _on_done)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    _process.reset()


@events.test_stopping.add_listener
def _on_test_stopping(environment: Environment, **_: Any) -> None:
    """Before Locust stops the users: gather every run's last counts into the statistics. A second
    stop meanwhile (a second click, a signal) waits for the first and adds nothing."""
    if not _uses_connlab(environment):
        return
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return  # the master's STOP message does it
    if _process.stopping:
        _process.stopped.wait()
        return
    _process.stopping = True
    try:
        if isinstance(runner, MasterRunner):
            by_worker = _collect(environment, runner)
        else:
            by_worker = {"local": [_encodable(r) for r in _finish_all(environment)]}
        _summarize(environment, by_worker)
        if getattr(environment.parsed_options, "csv_prefix", None):
            # Locust writes its CSV files every CSV_STATS_INTERVAL_SEC and not at exit: let it write
            # once more with the last counts in.
            gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)
    finally:
        _process.stopped.set()


def _collect(environment: Environment, runner: MasterRunner) -> dict[str, list[dict[str, Any]]]:
    """Asks every worker to end its runs, and waits for their last counts and reports."""
    workers = {c.id for c in runner.clients.all if c.state != STATE_MISSING}
    _process.collection = collection = _Collection(workers)
    for worker in workers:
        runner.send_message(STOP, None, client_id=worker)
    classes = [c for c in environment.user_classes if issubclass(c, FramedEchoUser)]
    # A worker stops its runs at once and then waits for their drains, each at most timeout + 1 s.
    wait = max((c.timeout for c in classes), default=2.0) + 1.0 + STOP_SLACK_S
    if not collection.complete.wait(wait):
        logger.error(
            "connlab: no last counts from %d worker(s) (%s): their last frames are not in the totals",
            len(collection.waiting),
            ", ".join(sorted(collection.waiting)),
        )
    _process.collection = None
    return collection.results


def _summarize(environment: Environment, by_worker: dict[str, list[dict[str, Any]]]) -> None:
    """Logs the runs' own figures, merged, and writes them with ``--connlab-report``."""
    runs = [r for results in by_worker.values() for r in results]
    merged = load.merge_histograms(r["histogram"] for r in runs)
    latency = load.histogram_latency(merged)
    frames = sum(r["frames"] for r in runs)
    errors = {k: sum(r["errors"][k] for r in runs) for k in load.ERROR_KINDS}
    summary = {
        "workers": len(by_worker),
        "runs": len(runs),
        "frames": frames,
        "frames_per_s": sum(r["frames_per_s"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "errors": errors,
        "latency_us": latency,
        "histogram": base64.b64encode(merged).decode("ascii"),
        "by_worker": by_worker,
    }
    logger.info(
        "connlab: %d run(s) in %d process(es): %d frames, %.0f frames/s; latency p50 %.0f µs, p99 %.0f µs "
        "(HDR, every run merged); %d errors",
        len(runs),
        len(by_worker),
        frames,
        summary["frames_per_s"],
        latency["p50"],
        latency["p99"],
        sum(errors.values()),
    )
    path = getattr(environment.parsed_options, "connlab_report", "")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)

"""--workers N: the pool's bookkeeping (fake reactor), the counts adding up,
and several real processes sharing the strip and HTTP sockets end to end."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sockproto import checks, config, workers
from sockproto.stats import Stats
from tests.support import ALL_OFF, Suite, recv_until, temp_dir, wait_for


class CountsTests(SynchronousTestCase):
    def test_combined_adds_the_other_processes(self) -> None:
        stats = Stats(Clock().seconds)
        strip = stats.service("strip", "lines")
        strip.listening.append("tcp:127.0.0.1:9000")
        strip.current, strip.total, strip.handled = 1, 5, 50
        strip.limit_hit("max_line")
        other = Stats(Clock().seconds)
        theirs = other.service("strip", "lines")
        theirs.current, theirs.total, theirs.handled = 2, 7, 70
        theirs.limit_hit("max_line")
        theirs.counters["odd"] = 3
        stats.others = {"worker 2": other.local_counts()}
        combined = stats.combined()["strip"]
        self.assertEqual((combined.current, combined.total, combined.handled), (3, 12, 120))
        self.assertEqual(combined.limits["max_line"], 2)
        self.assertEqual(combined.counters["odd"], 3)
        self.assertEqual(combined.listening, ["tcp:127.0.0.1:9000"])
        self.assertEqual(strip.handled, 50)  # the local counts are left alone
        self.assertEqual(stats.snapshot()["services"]["strip"]["lines"], 120)

    def test_services_of_other_processes_only_are_shown(self) -> None:
        worker = Stats(Clock().seconds)
        worker.service("strip", "lines")
        main = Stats(Clock().seconds)
        main.service("pop3", "commands").handled = 4
        worker.others = {"main": main.local_counts()}
        self.assertEqual(worker.snapshot()["services"]["pop3"]["commands"], 4)

    def test_one_process_shows_no_process_list(self) -> None:
        self.assertNotIn("processes", Stats(Clock().seconds).snapshot())


class SettingsTests(SynchronousTestCase):
    def test_workers_bounded(self) -> None:
        self.assertEqual(checks.workers("4"), 4)
        for bad in ("0", "65", "x"):
            self.assertRaises(ValueError, checks.workers, bad)

    def test_settings_travel_as_data(self) -> None:
        settings = config.build({("udp", "rate"): ("5/10", "test"), ("suite", "workers"): ("3", "test")})
        self.assertEqual(config.from_data(json.loads(json.dumps(config.as_data(settings)))), settings)

    def test_workers_get_no_credentials_nor_log_file(self) -> None:
        settings = config.build(
            {("suite", "auth"): (["memory:a:b"], "test"), ("http", "access_log"): ("x.log", "test")}
        )
        given = workers.worker_settings(settings)
        self.assertEqual((given.suite.auth, given.http.access_log), ((), ""))
        self.assertEqual(given.http.port, settings.http.port)


class SuiteWideSettingsTests(SynchronousTestCase):
    """--shutdown-grace and --refusal-log-rate reach every stream service,
    and a worker's copy of a shared listener (built as the worker builds it)."""

    def test_every_stream_listener_and_a_workers_copy_use_them(self) -> None:
        from sockproto.service import BUILDERS

        folder = temp_dir(self)
        settings = config.build(
            {
                ("suite", "shutdown_grace"): ("7", "test"),
                ("suite", "refusal_log_rate"): ("3/4", "test"),
                ("pop3", "maildir"): (folder, "test"),
            }
        )
        for name in ("strip", "chat", "http", "pop3"):
            built = BUILDERS[name](settings, Stats(Clock().seconds), Clock())
            listeners = [built, built.adopting(-1, socket.AF_INET, Clock())]
            for listener in listeners:
                graces: list[float] = []
                listener.factory.server_stopping = graces.append
                listener.port = ClosedPort()
                listener.stopService()
                self.assertEqual(graces, [7.0], name)
                self.assertEqual(listener.factory.policy.refusal_log_rate, (3.0, 4.0), name)


class ClosedPort:
    def stopListening(self) -> None:
        pass


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for chunk in self.written for line in chunk.splitlines()]


class FakeReactor(Clock):
    """A Clock that 'spawns' processes: it records them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, dict[int, Any], FakeProcess]] = []

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any, childFDs: Any) -> None:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, childFDs, process))
        protocol.makeConnection(process)


class FakeListener:
    def __init__(self, name: str, fd: int, log_file: Any = None) -> None:
        self.name = name
        self.where = f"tcp:{fd}"
        self.fd = fd
        self.port = type("Port", (), {"doRead": lambda self: None})()
        self.factory = type("Guard", (), {"wrappedFactory": type("Site", (), {"logFile": log_file})()})()

    def shared_socket(self) -> tuple[int, int]:
        return self.fd, socket.AF_INET


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


def ended(status: int | None = 1, sig: int | None = None) -> Failure:
    if status == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(status, sig))


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.stats = Stats(self.reactor.seconds)
        self.access = Lines()
        settings = config.build({("suite", "workers"): ("3", "test")})
        listeners = {"strip": FakeListener("strip", 7), "http": FakeListener("http", 8, self.access)}
        self.pool = workers.WorkerPool(settings, self.stats, listeners, self.reactor)  # type: ignore[arg-type]
        with capturedLogs():
            self.pool.startService()

    def worker(self, slot: int) -> workers.WorkerProcess:
        return self.pool.workers[slot]

    def say(self, slot: int, *messages: dict[str, Any]) -> None:
        data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
        self.worker(slot).childDataReceived(workers.MESSAGES_FD, data)

    def test_spawns_the_others_with_the_sockets(self) -> None:
        self.assertEqual(len(self.reactor.spawned), 2)
        _, child_fds, process = self.reactor.spawned[0]
        self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 3: "r", 4: 7, 5: 8})
        (start,) = process.messages()
        self.assertEqual(start["start"]["slot"], 2)
        self.assertFalse(start["start"]["relay_access_log"])  # each process logs within its budget
        self.assertEqual(
            start["start"]["services"],
            [
                {"name": "strip", "fd": 4, "family": socket.AF_INET},
                {"name": "http", "fd": 5, "family": socket.AF_INET},
            ],
        )

    def test_ready_when_every_worker_is(self) -> None:
        with capturedLogs() as events:
            self.say(2, {"ready": {"pid": 1000}})
            self.assertFalse(self.pool.ready.called)
            self.say(3, {"ready": {"pid": 1001}})
        self.assertTrue(self.pool.ready.called)
        self.assertIn("workers: 3 of 3 processes serve strip, http", [formatEvent(e) for e in events])

    def test_ready_anyway_after_a_while(self) -> None:
        with capturedLogs():
            self.say(2, {"ready": {"pid": 1000}})
            self.reactor.advance(workers.START_GRACE)
        self.assertTrue(self.pool.ready.called)

    def test_counts_logs_and_access_lines(self) -> None:
        counts = {"strip": {"unit": "lines", "total": 4, "handled": 9}}
        with capturedLogs() as events:
            self.say(
                2,
                {"counts": counts},
                {"log": [["warn", "something odd"]]},
                {"access": {"http": ["line one\n", "line two\n"]}},
            )
        self.assertEqual(self.stats.others["worker 2"], counts)
        (event,) = events
        self.assertEqual((formatEvent(event), event["log_level"]), ("worker 2: something odd", LogLevel.warn))
        self.assertEqual(self.access.lines, ["line one\n", "line two\n"])
        self.assertEqual(self.stats.processes[1]["connections"], {"strip": 4})

    def test_stray_output_logged_line_by_line(self) -> None:
        with capturedLogs() as events:
            self.worker(2).childDataReceived(2, b"Traceback (most")
            self.worker(2).childDataReceived(2, b" recent call last):\nboom\n")
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["worker 2 stderr: Traceback (most recent call last):", "worker 2 stderr: boom"],
        )

    def test_others_counts_sent_to_each_worker(self) -> None:
        self.stats.service("strip", "lines").handled = 5
        self.say(2, {"ready": {}}, {"counts": {"strip": {"handled": 2}}})
        self.say(3, {"ready": {}}, {"counts": {"strip": {"handled": 3}}})
        self.say(2, {"counts": {"strip": {"handled": 2}}})
        self.reactor.advance(workers.REPORT_INTERVAL)
        others = self.reactor.spawned[0][2].messages()[-1]["others"]["counts"]
        self.assertEqual(set(others), {"main", "worker 3"})
        self.assertEqual(others["main"]["strip"]["handled"], 5)

    def test_a_silent_worker_gets_no_more_views(self) -> None:
        self.say(2, {"ready": {}})  # and then nothing (stopped, hung): its pipe must not fill up
        process = self.reactor.spawned[0][2]
        sent = len(process.written)
        self.reactor.advance(workers.REPORT_INTERVAL * 10)
        self.assertEqual(len(process.written), sent)
        self.say(2, {"counts": {}})
        self.reactor.advance(workers.REPORT_INTERVAL)
        self.assertEqual(len(process.written), sent + 1)

    def test_exited_worker_started_again_with_a_growing_pause(self) -> None:
        self.say(2, {"counts": {"strip": {"unit": "lines", "current": 2, "total": 6, "handled": 9}}})
        with capturedLogs() as events:
            self.worker(2).processEnded(ended(sig=9))
        self.assertIn("exited (signal 9); starting it again in 1 s", formatEvent(events[0]))
        # What it counted stays (its connections are gone).
        kept = self.stats.combined()["strip"]
        self.assertEqual((kept.current, kept.total, kept.handled), (0, 6, 9))
        self.reactor.advance(workers.RESTART_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)
        with capturedLogs() as events:
            self.worker(2).processEnded(ended(1))
        self.assertIn("status 1); starting it again in 2 s", formatEvent(events[0]))
        self.assertEqual(self.stats.processes[1]["restarts"], 2)
        self.reactor.advance(2)
        self.reactor.advance(workers.STEADY)  # a good long run
        with capturedLogs() as events:
            self.worker(2).processEnded(ended(1))
        self.assertIn("starting it again in 1 s", formatEvent(events[0]))

    def test_a_worker_that_cannot_start_is_tried_again(self) -> None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError(11, "Resource temporarily unavailable")

        self.reactor.spawnProcess = refuse  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.worker(2).processEnded(ended(1))
            self.reactor.advance(workers.RESTART_FIRST)
        del events[0]  # it exited
        self.assertEqual(
            formatEvent(events[0]),
            "worker 2 could not start: Resource temporarily unavailable; starting it again in 2 s",
        )
        del self.reactor.spawnProcess
        self.reactor.advance(2)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stop_terminates_then_kills(self) -> None:
        stopped = self.pool.stopService()
        processes = [process for _, _, process in self.reactor.spawned]
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        self.worker(2).processEnded(ended(0))
        # The worker's connections get --shutdown-grace (10 s), and it some time to exit.
        self.reactor.advance(10 + workers.STOP_MARGIN - 0.1)
        self.assertEqual(processes[1].signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(processes[1].signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        self.worker(3).processEnded(ended(sig=9))
        self.successResultOf(stopped)
        self.assertEqual(len(self.reactor.spawned), 2)  # nothing started again


class AcceptTests(SynchronousTestCase):
    def test_a_shared_port_accepts_one_connection_a_turn(self) -> None:
        class Port:
            numberAccepts = 100
            seen: list[int] = []

            def doRead(self) -> None:
                self.seen.append(self.numberAccepts)
                self.numberAccepts += 20  # what Twisted does after a full batch

        port = Port()
        workers.accept_one_at_a_time(port)
        port.doRead()
        port.doRead()
        self.assertEqual(port.seen, [1, 1])


class WorkerSideTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.worker = workers.Worker(self.clock)
        self.sent: list[bytes] = []
        self.worker.transport = type("T", (), {"write": lambda _, data: self.sent.append(data)})()

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for chunk in self.sent for line in chunk.splitlines()]

    def test_own_events_and_warnings_relayed_in_batches(self) -> None:
        self.worker.observe(
            {"log_namespace": "sockproto", "log_level": LogLevel.info, "log_format": "a {x}", "x": 1}
        )
        self.worker.observe(
            {"log_namespace": "twisted.internet", "log_level": LogLevel.info, "log_format": "chat"}
        )
        self.worker.observe(
            {"log_namespace": "twisted.web", "log_level": LogLevel.error, "log_format": "bad"}
        )
        self.worker.relay_access("http", "GET /\n")
        self.worker.relay_access("http", "GET /x\n")
        self.assertEqual(self.sent, [])
        self.clock.advance(workers.FLUSH_DELAY)
        self.assertEqual(
            self.messages(),
            [{"log": [["info", "a 1"], ["error", "bad"]]}, {"access": {"http": ["GET /\n", "GET /x\n"]}}],
        )

    def test_lines_counted_not_kept_while_the_main_process_does_not_read(self) -> None:
        self.worker._backlog.pauseProducing()
        for _ in range(1000):
            self.worker.relay_access("http", "GET /\n")
        self.worker._report()
        self.clock.advance(workers.FLUSH_DELAY)
        self.assertEqual(self.sent, [])
        self.worker._backlog.resumeProducing()
        self.worker.relay_access("http", "GET /y\n")
        self.clock.advance(workers.FLUSH_DELAY)
        self.assertEqual(
            self.messages(),
            [
                {"log": [["warn", "1000 log lines dropped while the main process was not reading"]]},
                {"access": {"http": ["GET /y\n"]}},
            ],
        )

    def test_others_counts_shown_in_status(self) -> None:
        self.worker.stats.service("strip", "lines").handled = 2
        view = {
            "counts": {"main": {"strip": {"handled": 3}}},
            "started": 12.0,
            "processes": [{"name": "main"}],
        }
        self.worker.lineReceived(json.dumps({"others": view}).encode())
        snapshot = self.worker.stats.snapshot()
        self.assertEqual(snapshot["services"]["strip"]["lines"], 5)
        self.assertEqual(snapshot["processes"], [{"name": "main"}])


def fetch(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=20)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too


class WorkersEndToEndTests(SynchronousTestCase):
    """Two processes: each serves strip and HTTP, /status adds them up, and the
    workers go when the main process does."""

    def setUp(self) -> None:
        self.suite = Suite([*ALL_OFF, "--port", "0", "--http-port", "0", "--workers", "2"]).start()
        self.addCleanup(self.suite.stop)
        self.suite.wait_log("workers: 2 of 2 processes serve strip, http")
        assert self.suite.process is not None
        self.main = self.suite.process.pid
        # Each process knows the others' pids once the main process told it.
        self.worker = wait_for(lambda: self.status().get("processes"), what="the process list")[1]["pid"]
        # A failed test must not leave a process stopped: it could not stop.
        self.addCleanup(self._continue_all)

    def _continue_all(self) -> None:
        for pid in (self.main, self.worker):
            if alive(pid):
                os.kill(pid, signal.SIGCONT)

    def status(self) -> dict[str, Any]:
        status, body = fetch(self.suite.address("http"), "/status")
        self.assertEqual(status, 200)
        return json.loads(body)

    def strip_lines(self, count: int) -> None:
        with self.suite.connect("strip") as sock:
            sock.sendall(b"a b\n" * count)
            self.assertEqual(recv_until(sock, lambda d: len(d) >= 3 * count), b"ab\0" * count)

    def test_each_process_serves_while_the_other_is_stopped(self) -> None:
        for stopped in (self.main, self.worker):
            os.kill(stopped, signal.SIGSTOP)
            try:
                for _ in range(5):
                    self.strip_lines(2)
                    self.assertEqual(fetch(self.suite.address("http"), "/")[0], 200)
            finally:
                os.kill(stopped, signal.SIGCONT)

        def summed() -> dict[str, Any] | None:
            status = self.status()  # one more request, from whichever process
            strip, served = status["services"]["strip"], status["processes"]
            done = strip["lines"] == 20 and status["services"]["http"]["requests"] >= 11
            return status if done and all(p["connections"].get("strip") == 5 for p in served) else None

        status = wait_for(summed, what="/status adding up both processes")
        self.assertEqual(status["services"]["strip"]["connections"]["total"], 10)
        self.assertEqual([p["pid"] for p in status["processes"]], [self.main, self.worker])
        for process in status["processes"]:
            self.assertGreaterEqual(process["connections"]["http"], 5)

    def test_sighup_to_every_process_stops_none(self) -> None:
        """A closed terminal sends SIGHUP to the whole process group."""
        for pid in (self.main, self.worker):
            os.kill(pid, signal.SIGHUP)
        self.suite.wait_log("SIGHUP: log files reopened")
        os.kill(self.main, signal.SIGSTOP)
        try:
            self.strip_lines(1)  # the worker serves
        finally:
            os.kill(self.main, signal.SIGCONT)
        self.assertEqual(self.status()["processes"][1]["pid"], self.worker)
        self.assertFalse(self.suite.saw("exited"), self.suite.output)

    def test_worker_that_dies_is_started_again(self) -> None:
        os.kill(self.worker, signal.SIGKILL)
        self.suite.wait_log(f"worker 2 (pid {self.worker}) exited (signal 9); starting it again in 1 s")
        again = wait_for(
            lambda: self.status()["processes"][1]["pid"] not in (None, self.worker) and self.status(),
            what="a new worker",
        )
        self.assertEqual(again["processes"][1]["restarts"], 1)
        self.worker = again["processes"][1]["pid"]
        self.suite.wait_log(f"worker 2: pid {self.worker}, serving strip, http")
        os.kill(self.main, signal.SIGSTOP)
        try:
            self.strip_lines(1)  # the new one serves
        finally:
            os.kill(self.main, signal.SIGCONT)

    def test_stopping_the_main_process_stops_the_worker(self) -> None:
        self.assertEqual(self.suite.stop(), 0)
        wait_for(lambda: not alive(self.worker), what="the worker to exit")
        self.assertTrue(self.suite.saw(f"worker 2: pid {self.worker}, stopped"))

    def test_worker_leaves_when_the_main_process_dies(self) -> None:
        os.kill(self.main, signal.SIGKILL)
        wait_for(lambda: not alive(self.worker), what="the worker to notice")


class WorkersAccessLogTests(SynchronousTestCase):
    def test_requests_a_worker_served_are_in_the_main_process_access_log(self) -> None:
        folder = temp_dir(self)
        access_log = os.path.join(folder, "access.log")
        suite = Suite([*ALL_OFF, "--http-port", "0", "--workers", "2", "--http-access-log", access_log])
        suite.start()
        self.addCleanup(suite.stop)
        suite.wait_log("workers: 2 of 2 processes serve http")
        assert suite.process is not None
        os.kill(suite.process.pid, signal.SIGSTOP)
        try:
            self.assertEqual(fetch(suite.address("http"), "/ip")[0], 200)  # the worker answers
        finally:
            os.kill(suite.process.pid, signal.SIGCONT)

        def logged() -> bool:
            with open(access_log) as file:
                return '"GET /ip HTTP/1.1" 200' in file.read()

        # The main process writes the line (its file buffer flushes when it stops).
        self.assertEqual(suite.stop(), 0)
        self.assertTrue(logged())

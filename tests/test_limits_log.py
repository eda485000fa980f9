"""One budget for the log lines clients can cause (``--log-rate``), and the
accept errors of a server out of file descriptors, one line an interval.

Unit tests drive :class:`~sockproto.logfilter.ClientLogFilter` in front of a
publisher with a task.Clock; the end-to-end one floods the real twistd log
from one kept-alive HTTP connection and counts its lines.
"""

from __future__ import annotations

import array
import os
import socket
import threading
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from sockproto.http_files import SafeFile
from sockproto.limits import LOG_SUMMARY_INTERVAL
from sockproto.logfilter import ClientLogFilter, install
from tests.support import ALL_OFF, Suite, recv_until, temp_dir

ours = Logger(namespace="sockproto")


class Harness:
    """A filter with a budget of ``rate/burst`` in front of a publisher whose
    one observer collects what gets through, as text."""

    def __init__(self, test: SynchronousTestCase, rate: tuple[float, float] = (1.0, 3.0)) -> None:
        self.clock = Clock()
        self.lines: list[str] = []
        self.publisher = LogPublisher(lambda event: self.lines.append(formatEvent(event)))
        self.log = Logger(namespace="sockproto", observer=self.publisher)
        self.filter = ClientLogFilter(rate, self.clock, logger=self.log)
        test.addCleanup(install(self.filter, self.publisher))
        self.twisted = Logger(namespace="twisted.internet.tcp.Port", observer=self.publisher)


class ClientLogFilterTests(SynchronousTestCase):
    def test_client_lines_within_the_budget_then_summed_up_by_kind(self) -> None:
        harness = Harness(self)
        for _ in range(5):
            harness.log.info(
                "http: 400 to {peer}: request target {target} {problem}",
                peer="p",
                target="x",
                problem="is bad",
            )
        harness.log.info(
            "{service}: closing {peer}: idle for {seconds:g} s", service="strip", peer="p", seconds=1
        )
        self.assertEqual(len(harness.lines), 3)  # the burst
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(harness.lines), 4)
        summary = harness.lines[-1]
        self.assertIn("3 more lines caused by clients in the last 10 s", summary)
        self.assertIn("2 x http: 400 to <peer>: request target <target> <problem>", summary)
        self.assertIn("1 x strip: closing <peer>: idle for <seconds> s", summary)
        self.assertIn("--log-rate 1/3", summary)

    def test_lines_naming_a_nick_or_user_are_a_clients_too(self) -> None:
        harness = Harness(self)
        for _ in range(5):
            harness.log.info("chat: {old} is now {nick}", old="a", nick="b")
            harness.log.info("pop3: removed {count} file(s) from {user}/tmp", count=1, user="u")
        self.assertEqual(len(harness.lines), 3)
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        summary = harness.lines[-1]  # the most frequent first
        self.assertIn(
            "4 x pop3: removed <count> file(s) from <user>/tmp, 3 x chat: <old> is now <nick>", summary
        )

    def test_the_servers_own_lines_are_never_held_back(self) -> None:
        harness = Harness(self)
        for _ in range(10):
            harness.log.info("{service} listening on {address}", service="http", address="tcp:127.0.0.1:1")
            harness.twisted.info("Site starting on {port}", port=1)
        self.assertEqual(len(harness.lines), 20)
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(harness.lines), 20)

    def test_lines_from_another_thread_pass_untouched(self) -> None:
        """The budget's timers are the reactor's, not to be set from a thread."""
        harness = Harness(self)

        def flood() -> None:
            for _ in range(10):
                harness.log.info("chat: {peer} joined as {nick}", peer="p", nick="n")

        thread = threading.Thread(target=flood)
        thread.start()
        thread.join()
        self.assertEqual((len(harness.lines), harness.clock.getDelayedCalls()), (10, []))

    def test_rate_zero_logs_every_line(self) -> None:
        harness = Harness(self, (0.0, 0.0))
        for _ in range(100):
            harness.log.info("chat: {peer} joined as {nick}", peer="p", nick="n")
        self.assertEqual((len(harness.lines), harness.clock.getDelayedCalls()), (100, []))

    def test_twisteds_malformed_range_lines_pass_the_budget(self) -> None:
        """twisted.web logs one line per request with a bad Range header,
        through the legacy log (to the global publisher)."""
        root = temp_dir(self)
        path = os.path.join(root, "a.txt")
        with open(path, "wb") as file:
            file.write(b"hello\n")
        clock = Clock()
        budget = ClientLogFilter((1.0, 2.0), clock)
        with capturedLogs() as events:
            uninstall = install(budget)
            try:
                for _ in range(50):
                    request = DummyRequest([b""])
                    request.requestHeaders.addRawHeader(b"range", b"bytes=zz")
                    SafeFile(path, root).render(request)
                clock.advance(LOG_SUMMARY_INTERVAL)
            finally:
                uninstall()
        texts = [formatEvent(event) for event in events]
        self.assertEqual(sum(text.startswith("Ignoring malformed Range header") for text in texts), 2, texts)
        self.assertIn("48 x Ignoring malformed Range header", texts[-1])

    def test_accept_errors_once_an_interval_with_a_count(self) -> None:
        """Twisted's accept loop logs three lines per connection it cannot
        accept for want of a descriptor, and one per turn for the others."""
        harness = Harness(self)
        for n in range(100):
            harness.twisted.info("EMFILE encountered; releasing reserved file descriptor.")
            harness.twisted.info("EMFILE recovery: Closed socket from {address}", address=("127.0.0.1", n))
            harness.twisted.info("Re-reserving EMFILE recovery file descriptor.")
            harness.twisted.info("Could not accept new connection ({acceptError})", acceptError="ENFILE")
        self.assertEqual(len(harness.lines), 2, harness.lines)
        self.assertIn(
            "cannot accept connections: out of file descriptors (EMFILE, open-file limit", harness.lines[0]
        )
        self.assertEqual(harness.lines[1], "Could not accept new connection (ENFILE)")
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(harness.lines), 3)
        self.assertIn("99 connections closed unserved (EMFILE", harness.lines[2])
        self.assertIn("99 x could not accept a connection (ENFILE)", harness.lines[2])
        harness.twisted.info("EMFILE recovery: Closed socket from {address}", address=("127.0.0.1", 1))
        self.assertEqual(len(harness.lines), 4)  # a new interval: told again

    def test_flush_sums_up_now(self) -> None:
        harness = Harness(self)
        for _ in range(4):
            harness.log.info("pop3: {peer}: login failed", peer="p")
        harness.filter.flush()
        self.assertIn("1 more lines caused by clients", harness.lines[-1])
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_uninstall_gives_the_observers_back(self) -> None:
        seen: list[Any] = []
        publisher = LogPublisher(seen.append)
        uninstall = install(ClientLogFilter((1.0, 1.0), Clock()), publisher)
        log = Logger(namespace="sockproto", observer=publisher)
        for _ in range(3):
            log.info("{peer}", peer="p")
        uninstall()
        for _ in range(3):
            log.info("{peer}", peer="p")
        self.assertEqual(len(seen), 4)


class LogFloodEndToEndTests(SynchronousTestCase):
    def test_one_connection_cannot_flood_the_twistd_log(self) -> None:
        """Thousands of requests with a malformed Range header and bad targets
        on one kept-alive connection: the log stays within the budget and the
        summary says what was held back."""
        root = temp_dir(self)
        with open(os.path.join(root, "a.txt"), "wb") as file:
            file.write(b"hello\n")
        suite = Suite([*ALL_OFF, "--http-port", "0", "--http-root", root, "--log-rate", "10/20"]).start()
        self.addCleanup(suite.stop)
        requests = 2000
        started = len(suite.lines)
        with suite.connect("http") as sock:
            batch = (
                b"GET /files/a.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=zz\r\n\r\n"
                b"GET x HTTP/1.1\r\nHost: x\r\n\r\n"
            ) * 100
            answered = bytearray()
            for _ in range(requests // 200):
                sock.sendall(batch)
                answered += recv_until(sock, lambda d: d.count(b"HTTP/1.1 ") >= 200)
        self.assertEqual(answered.count(b"HTTP/1.1 400 "), requests // 2)
        suite.wait_log("more lines caused by clients", timeout=LOG_SUMMARY_INTERVAL + 10)
        lines = suite.lines[started:]
        summary = next(line for line in lines if "more lines caused by clients" in line)
        self.assertIn("x Ignoring malformed Range header", summary)
        self.assertIn("x http: 400 to <peer>: request target <target> <problem>", summary)
        # A burst of 20 and 10 a second, plus the summaries (http's and ours).
        flood = [line for line in lines if "Range header" in line or "http: " in line]
        self.assertLess(len(flood), 20 + 10 * 30 + 10, flood[-5:])
        self.assertLess(len(flood), requests // 4)

    def test_a_workers_lines_pass_the_budget_too(self) -> None:
        """With --workers, whichever process serves the connection: a worker
        relays ready-made text, so it filters before relaying."""
        suite = Suite([*ALL_OFF, "--http-port", "0", "--workers", "2", "--log-rate", "10/20"]).start()
        self.addCleanup(suite.stop)
        requests = 1000
        with suite.connect("http") as sock:
            sock.sendall(b"GET x HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
            answered = recv_until(sock, lambda d: d.count(b"HTTP/1.1 400 ") >= requests)
        self.assertEqual(answered.count(b"HTTP/1.1 400 "), requests)
        suite.wait_log("more lines caused by clients", timeout=LOG_SUMMARY_INTERVAL + 10)
        bad = [line for line in suite.lines if "http: 400 to" in line]
        self.assertLess(len(bad), 20 + 10 * 30, bad[-3:])

    def test_descriptors_sent_over_a_unix_socket(self) -> None:
        """Twisted logs a line for each message carrying descriptors (SCM_RIGHTS)
        to a protocol that takes none: within the budget too."""
        path = os.path.join(temp_dir(self), "strip.sock")
        suite = Suite([*ALL_OFF, "--port", f"unix:{path}", "--log-rate", "10/20"]).start()
        self.addCleanup(suite.stop)
        messages = 500
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            descriptor = array.array("i", [sock.fileno()])
            for _ in range(messages):
                sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, descriptor)])
            sock.sendall(b"\n")
            self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"x" * messages + b"\0")
        suite.wait_log("more lines caused by clients", timeout=LOG_SUMMARY_INTERVAL + 10)
        told = [line for line in suite.lines if "IFileDescriptorReceiver" in line]
        self.assertLessEqual(len(told), 20 + 10 * 30)
        summary = next(line for line in suite.lines if "more lines caused by clients" in line)
        self.assertIn("x descriptors sent over a UNIX socket (closed)", summary)

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

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel

from sockproto.limits import LOG_SUMMARY_INTERVAL, LogBudget, rate_limit
from sockproto.logfilter import ClientLogFilter, install
from tests.support import ALL_OFF, Suite, recv_until, temp_dir
from tests.test_pop3 import Server
from tests.test_pop3_e2e import Box, start

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
            "{service}: closing {peer}: idle for {seconds:g} s", service="http", peer="p", seconds=1
        )
        self.assertEqual(len(harness.lines), 3)  # the burst
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(harness.lines), 4)
        summary = harness.lines[-1]
        self.assertIn("log: http: 3 more lines caused by clients in the last 10 s", summary)
        self.assertIn("2 x http: 400 to <peer>: request target <target> <problem>", summary)
        self.assertIn("1 x http: closing <peer>: idle for <seconds> s", summary)
        self.assertIn("--log-rate 1/3, each service", summary)

    def test_lines_naming_a_nick_or_user_are_a_clients_too(self) -> None:
        harness = Harness(self)
        for _ in range(5):
            harness.log.info("chat: {old} is now {nick}", old="a", nick="b")
            harness.log.info("chat: {nick} left", nick="b")
            harness.log.info("pop3: removed {count} file(s) from {user}/tmp", count=1, user="u")
        self.assertEqual(len(harness.lines), 6)  # each service's burst
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        summaries = sorted(harness.lines[6:])
        self.assertEqual(len(summaries), 2)
        # The most frequent first.
        self.assertIn("log: chat: 7 more lines", summaries[0])
        self.assertIn("4 x chat: <nick> left, 3 x chat: <old> is now <nick>", summaries[0])
        self.assertIn("2 x pop3: removed <count> file(s) from <user>/tmp", summaries[1])

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

    def test_twisteds_client_lines_pass_the_budget(self) -> None:
        """twisted.web logs a line per client it times out (its own
        HTTPChannel's, to the global publisher): http's budget."""
        clock = Clock()
        budget = ClientLogFilter((1.0, 2.0), clock)
        with capturedLogs() as events:
            uninstall = install(budget)
            try:
                for _ in range(50):
                    channel = HTTPChannel()
                    channel.makeConnection(StringTransport())
                    channel.timeoutConnection()
                    channel.connectionLost(Failure(ConnectionDone()))
                clock.advance(LOG_SUMMARY_INTERVAL)
            finally:
                uninstall()
        texts = [formatEvent(event) for event in events]
        self.assertEqual(sum(text.startswith("Timing out client") for text in texts), 2, texts)
        self.assertIn("log: http: 48 more lines caused by clients", texts[-1])
        self.assertIn("48 x Timing out client", texts[-1])

    def test_each_service_has_a_budget_of_its_own(self) -> None:
        """An HTTP client's bad requests use up http's budget, not pop3's: the
        password guesser's address is still logged."""
        harness = Harness(self)
        for _ in range(100):
            harness.log.info("http: 400 to {peer}: request target {target}", peer="h", target="x")
        harness.log.info("pop3: {peer}: login failed for {user}", peer="guesser", user="root")
        harness.log.info(
            "{service}: closing {peer}: idle for {seconds:g} s", service="strip", peer="s", seconds=1
        )
        self.assertEqual(
            harness.lines[3:], ["pop3: guesser: login failed for root", "strip: closing s: idle for 1 s"]
        )
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(
            harness.lines[5:],
            [
                "log: http: 97 more lines caused by clients in the last 10 s, not logged one by one"
                " (--log-rate 1/3, each service): 97 x http: 400 to <peer>: request target <target>"
            ],
        )

    def test_lines_budgeted_already_are_not_charged_again(self) -> None:
        """Access lines (--http-log-rate), datagrams (--udp-log-rate) and
        refusals (--refusal-log-rate) passed a budget of their own: a flood of
        them neither loses lines to --log-rate nor uses up another's."""
        harness = Harness(self)
        for _ in range(100):
            harness.log.info("http: {access}", access="GET /", budget="--http-log-rate")
            harness.log.info(
                "{service}: {peer},{payload}", service="udp", peer="p", payload="x", budget="--udp-log-rate"
            )
            harness.log.info(
                "{service}: refused {peer}", service="pop3", peer="p", budget="--refusal-log-rate"
            )
        harness.log.info("pop3: {peer}: login failed for {user}", peer="guesser", user="root")
        self.assertEqual(len(harness.lines), 301)
        harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(harness.lines), 301)

    def test_the_label_only_for_a_line_held_back(self) -> None:
        """Working out a line's label costs a substitution: not for a line the
        budget lets through."""
        clock = Clock()
        budget = LogBudget(rate_limit((1.0, 2.0), clock.seconds), clock, lambda counts, seconds: None)
        labelled: list[int] = []

        def label() -> str:
            labelled.append(1)
            return "kind"

        self.assertEqual([budget.admit(label) for _ in range(5)], [True, True, False, False, False])
        self.assertEqual((len(labelled), budget.unlogged), (3, {"kind": 3}))

    def test_pop3s_unreadable_message_lines_pass_the_budget(self) -> None:
        """RETR of a message that cannot be read, pipelined: one line each,
        with the client's address, within pop3's budget."""
        server = Server(self)
        message = server.deliver(b"Subject: x\n\nmail\n")
        client = server.connect()
        client.login()
        message.unlink()
        message.symlink_to(message.with_name("elsewhere"))
        budget = ClientLogFilter((1.0, 2.0), server.clock)
        with capturedLogs() as events:
            uninstall = install(budget)
            try:
                answer = client.send(b"RETR 1\r\n" * 50)
                server.clock.advance(LOG_SUMMARY_INTERVAL)
            finally:
                uninstall()
        self.assertEqual(answer.count(b"-ERR [SYS/TEMP] cannot read the message"), 50)
        texts = [formatEvent(event) for event in events]
        told = [text for text in texts if text.startswith("pop3: cannot read")]
        self.assertEqual(len(told), 2, texts)
        self.assertIn("(for 10.0.0.1:", told[0])
        self.assertIn("mailbox of alice", told[0])
        summary = next(text for text in texts if "more lines caused by clients" in text)
        self.assertIn("log: pop3: 48 more lines", summary)
        self.assertIn("48 x pop3: cannot read <path> (for <peer>, mailbox of <user>): <error>", summary)

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
        """Thousands of requests with bad targets, and as many good ones, on
        one kept-alive connection: the bad ones' lines stay within http's
        --log-rate, the access lines within --http-log-rate (once each), and
        the summaries say what was held back."""
        root = temp_dir(self)
        with open(os.path.join(root, "a.txt"), "wb") as file:
            file.write(b"hello\n")
        suite = Suite(
            [
                *ALL_OFF,
                "--http-port",
                "0",
                "--http-root",
                root,
                "--log-rate",
                "10/20",
                "--http-log-rate",
                "10/20",
            ]
        ).start()
        self.addCleanup(suite.stop)
        requests = 2000
        started = len(suite.lines)
        with suite.connect("http") as sock:
            batch = (b"GET /files/a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET x HTTP/1.1\r\nHost: x\r\n\r\n") * 100
            answered = bytearray()
            for _ in range(requests // 200):
                sock.sendall(batch)
                answered += recv_until(sock, lambda d: d.count(b"HTTP/1.1 ") >= 200)
        self.assertEqual(answered.count(b"HTTP/1.1 400 "), requests // 2)
        suite.wait_log("more lines caused by clients", timeout=LOG_SUMMARY_INTERVAL + 10)
        suite.wait_log("more requests in the last", timeout=LOG_SUMMARY_INTERVAL + 10)
        lines = suite.lines[started:]
        summary = next(line for line in lines if "more lines caused by clients" in line)
        self.assertIn("log: http: ", summary)
        self.assertIn("x http: 400 to <peer>: request target <target> <problem>", summary)
        self.assertNotIn("<access>", summary)  # the access lines are not charged twice
        # A burst of 20 and 10 a second each, plus the summaries.
        bad = [line for line in lines if "http: 400 to" in line]
        self.assertGreaterEqual(len(bad), 20)  # the burst, not cut by the access lines
        access = [line for line in lines if ' HTTP/1.1" ' in line]
        for flood in (bad, access):
            self.assertLess(len(flood), 20 + 10 * 30, flood[-5:])

    def test_a_flood_of_one_service_hides_nothing_of_another(self) -> None:
        """HTTP clients use up http's budget; a POP3 password guesser's
        address is logged all the same (what an operator and fail2ban read)."""
        box = Box(self)
        suite = start(self, box, "--http-port", "0", "--log-rate", "10/20")
        requests = 1000
        with suite.connect("http") as sock:
            sock.sendall(b"GET x HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
            recv_until(sock, lambda d: d.count(b"HTTP/1.1 400 ") >= requests)
        self.assertLess(len([line for line in suite.lines if "http: 400 to" in line]), requests // 2)
        with socket.create_connection(suite.address("pop3"), timeout=20) as sock:
            recv_until(sock, lambda d: d.endswith(b"\r\n"))
            sock.sendall(b"USER alice\r\nPASS wrong\r\n")
            recv_until(sock, lambda d: d.count(b"\r\n") >= 2)
        suite.wait_log("login failed for alice")
        line = next(line for line in suite.lines if "login failed for alice" in line)
        self.assertIn("pop3: 127.0.0.1:", line)

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

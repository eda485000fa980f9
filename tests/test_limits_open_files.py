"""The open-file limit against the connection caps, and a server out of
descriptors: it says so once, keeps its log bounded and serves again as soon
as descriptors free.

The start-up check runs on a stand-in for the ``resource`` module (the limits
of the test process are left alone); end to end, the suite runs under a low
RLIMIT_NOFILE that it cannot raise, set before twistd starts.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sockproto.config import build
from sockproto.service import OPEN_FILE_RESERVE, check_open_files
from tests.support import ALL_OFF, Suite, recv_all, wait_for
from tests.test_pop3 import Server


class Limits:
    """The part of ``resource`` the check uses, with limits of our choosing."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise the soft limit")
        soft, hard = limits
        if hard != self.hard or soft > hard:
            raise ValueError("only the soft limit, up to the hard one")
        self.soft = soft


def check(limits: Limits, **given: Any) -> list[str]:
    """Run the check on settings ``section__key=value``; the lines it logs."""
    settings = build({tuple(name.split("__")): (value, "test") for name, value in given.items()})  # type: ignore[misc]
    with capturedLogs() as events:
        check_open_files(settings, limits)
    return [formatEvent(event) for event in events]


# The defaults: strip 10 + chat 1000 + http 1000 + pop3 100 x 3 (a session
# holds its mailbox lock, and a RETR the message file), and the reserve.
DEFAULT_NEED = 2310 + OPEN_FILE_RESERVE


class OpenFileLimitTests(SynchronousTestCase):
    def test_soft_limit_raised_as_far_as_the_caps_need(self) -> None:
        limits = Limits(1024, 65536)
        lines = check(limits)
        self.assertEqual(limits.soft, DEFAULT_NEED)
        self.assertEqual(lines, [f"open-file limit raised from 1024 to {DEFAULT_NEED} (hard limit 65536)"])

    def test_one_warning_naming_both_numbers_when_the_hard_limit_is_too_low(self) -> None:
        limits = Limits(1024, 1500)
        lines = check(limits)
        self.assertEqual(limits.soft, 1500)
        self.assertEqual(len(lines), 2, lines)
        warning = lines[1]
        self.assertIn(f"open-file limit 1500 is below the {DEFAULT_NEED} descriptors", warning)
        self.assertIn(
            f"strip 10 + chat 1000 + http 1000 + pop3 100 x 3 (lock, message) + {OPEN_FILE_RESERVE} reserved",
            warning,
        )
        self.assertIn(
            "lower --max-clients, --chat-max-clients, --http-max-clients, --pop3-max-clients", warning
        )

    def test_cannot_raise(self) -> None:
        limits = Limits(1024, 65536, refuse=True)
        lines = check(limits)
        self.assertEqual(limits.soft, 1024)
        self.assertIn(f"cannot raise the open-file limit from 1024 to {DEFAULT_NEED}", lines[0])
        self.assertIn(f"open-file limit 1024 is below the {DEFAULT_NEED} descriptors", lines[1])

    def test_never_lowered_and_quiet_when_it_fits(self) -> None:
        limits = Limits(100000, 100000)
        self.assertEqual((check(limits), limits.soft), ([], 100000))

    def test_only_enabled_services_count_and_a_download_holds_a_file(self) -> None:
        limits = Limits(64, 4096)
        check(limits, strip__port="off", chat__port="off", pop3__port="off", udp__port="off", http__root=".")
        self.assertEqual(limits.soft, 2 * 1000 + OPEN_FILE_RESERVE)

    def test_a_pop3_session_holds_its_lock_and_a_message_file(self) -> None:
        limits = Limits(64, 4096)
        check(limits, strip__port="off", chat__port="off", http__port="off", udp__port="off")
        self.assertEqual(limits.soft, 3 * 100 + OPEN_FILE_RESERVE)


class Pop3DescriptorsTests(SynchronousTestCase):
    """What the check counts for a POP3 session, measured: besides its
    connection, the mailbox lock while logged in, and the message during RETR."""

    def test_a_session_holds_its_lock_and_the_message_being_sent(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("counts the descriptors in /proc/self/fd")

        def open_now() -> int:
            return len(os.listdir("/proc/self/fd"))

        server = Server(self)  # StringTransport: the connection holds no descriptor here
        server.deliver(b"line\n" * 100_000)
        client = server.connect()
        before = open_now()
        client.login()
        logged_in = open_now()
        client.guard.dataReceived(b"RETR 1\r\n")
        self.assertTrue(client.take_some().startswith(b"+OK "))
        sending = open_now()
        client.take()
        self.assertEqual((logged_in - before, sending - before, open_now() - before), (1, 2, 1))

    def test_a_service_without_a_cap_gets_the_hard_limit_and_a_warning(self) -> None:
        limits = Limits(1024, 65536)
        lines = check(limits, chat__max_clients=0)
        self.assertEqual(limits.soft, 65536)
        self.assertIn("chat: no cap on clients (--chat-max-clients 0): the open-file limit 65536", lines[-1])


class OutOfDescriptorsEndToEndTests(SynchronousTestCase):
    LIMIT = 100

    def start(self) -> Suite:
        suite = Suite([*ALL_OFF, "--chat-port", "0", "--http-port", "0"])
        # A hard limit the suite cannot raise, set before twistd starts.
        low = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.LIMIT}, {self.LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        suite.command = [sys.executable, "-c", low, *suite.command]
        self.addCleanup(suite.stop)
        return suite.start()

    def http_answers(self, suite: Suite) -> bool:
        try:
            with suite.connect("http", timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return recv_all(sock, timeout=5).startswith(b"HTTP/1.0 200 ")
        except OSError:
            return False

    def test_warns_at_start_logs_accept_errors_once_and_serves_again(self) -> None:
        suite = self.start()
        need = 2000 + OPEN_FILE_RESERVE
        suite.wait_log(f"open-file limit {self.LIMIT} is below the {need} descriptors")
        clients: list[socket.socket] = []
        self.addCleanup(lambda: [client.close() for client in clients])
        for _ in range(3 * self.LIMIT):
            clients.append(suite.connect("chat"))
        suite.wait_log("cannot accept connections: out of file descriptors (EMFILE, open-file limit 100)")
        # Every connection it could not take was closed at once (the kernel
        # completed them all): the last one reads its end.
        self.assertEqual(recv_all(clients[-1]), b"")
        for client in clients:
            client.close()
        wait_for(lambda: self.http_answers(suite), what="HTTP served again once descriptors free")
        self.assertEqual(suite.stop(), 0)
        accept_lines = [line for line in suite.lines if "EMFILE" in line or "Could not accept" in line]
        # Ours: the warning, then the count (at the stop, or 10 s on); not
        # Twisted's three lines for each of the 200 it closed unserved.
        self.assertIn("cannot accept connections", accept_lines[0])
        self.assertIn("connections closed unserved (EMFILE, open-file limit 100)", accept_lines[1])
        self.assertLessEqual(len(accept_lines), 4, accept_lines)  # a later interval may tell again
        self.assertFalse(
            [line for line in accept_lines if "EMFILE recovery" in line or "Re-reserving" in line]
        )

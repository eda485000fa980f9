"""The UDP responder under the real twistd plugin, over loopback sockets."""

from __future__ import annotations

import re
import socket
import struct
import time
from datetime import datetime

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ALL_OFF, DEADLINE, Suite, run_twistd

DAYTIME = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"([1-9]|[12]\d|3[01]) ([01]\d|2[0-3]):[0-5]\d:[0-5]\d \d{4}\r\n"
)


class UdpTestCase(SynchronousTestCase):
    args: list[str] = []

    def setUp(self) -> None:
        self.suite = Suite([*ALL_OFF, "--udp-port", "0", *self.args]).start()
        self.addCleanup(self.suite.stop)
        self.server = self.suite.address("udp")

    def client(self, port: int = 0) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((self.server[0], port))
        sock.settimeout(DEADLINE)
        return sock

    def ask(self, datagram: bytes, sock: socket.socket | None = None) -> bytes:
        sock = sock or self.client()
        sock.sendto(datagram, self.server)
        answer, sender = sock.recvfrom(65535)
        self.assertEqual(sender[:2], self.server)
        return answer

    def assert_unanswered(self, sock: socket.socket, datagram: bytes, why: str) -> None:
        """Send from ``sock``, then prove the datagram was handled and got no answer."""
        sock.sendto(datagram, self.server)
        self.suite.wait_log(f"not answered: {why}")
        sock.setblocking(False)
        with self.assertRaises(BlockingIOError):
            sock.recv(65535)


class DaytimeTests(UdpTestCase):
    def test_seed_ping_exchange(self) -> None:
        sock = self.client()
        answer = self.ask(b"Ping !", sock)
        self.assertRegex(answer, DAYTIME)
        said = datetime.strptime(answer.decode(), "%a %b %d %H:%M:%S %Y\r\n")
        self.assertLess(abs((datetime.now() - said).total_seconds()), 5)
        self.suite.wait_log(f"udp: 127.0.0.1:{sock.getsockname()[1]},Ping !")

    def test_empty_datagram_answered(self) -> None:
        self.assertRegex(self.ask(b""), DAYTIME)

    def test_burst_answered_at_no_more_than_the_rate(self) -> None:
        sock = self.client()
        answers = 0
        started = time.monotonic()
        for _ in range(3000):
            sock.sendto(b"Ping !", self.server)
        # The burst's 40 answers come (however slowly a busy machine runs the
        # server), then, watching a second more: however long we watch, no
        # more than burst + rate x elapsed answers may come.
        window_end = time.monotonic() + DEADLINE
        while (left := window_end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                answer = sock.recv(65535)
            except TimeoutError:
                break
            self.assertRegex(answer, DAYTIME)
            answers += 1
            if answers == 40:
                window_end = time.monotonic() + 1.0
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(answers, 40)
        self.assertLessEqual(answers, 40 + 20 * elapsed + 1)
        # the drops are summed up in one line, here at stop
        self.suite.stop()
        match = re.search(r"(\d+) over the rate limit", self.suite.output)
        assert match is not None, self.suite.output
        self.assertLessEqual(answers + 1 + int(match.group(1)), 3000)
        # A flood must not flood the log: a line per answer, a few for the
        # start and the stop, one summing up the rest.
        self.assertLess(len(self.suite.lines), answers + 30, self.suite.output)

    def test_source_port_13_unanswered(self) -> None:
        try:
            sock = self.client(13)
        except PermissionError:
            self.skipTest("binding port 13 needs privileges")
        self.assert_unanswered(sock, b"Ping !", "source port 13 is a small service's (loop protection)")
        self.assertRegex(self.ask(b"Ping !"), DAYTIME)


class EchoTests(UdpTestCase):
    args = ["--udp-mode", "echo"]

    def test_bytes_come_back_unchanged(self) -> None:
        for datagram in (b"Ping !", b"", bytes(range(256)), b"\xff" * 65507):
            self.assertEqual(self.ask(datagram), datagram)


class StripTests(UdpTestCase):
    args = ["--udp-mode", "strip"]

    def test_whitespace_removed_nul_added(self) -> None:
        self.assertEqual(self.ask(b" Ping !\r\n"), b"Ping!\x00")
        self.assertEqual(self.ask(b""), b"\x00")

    def test_answer_too_big_for_a_datagram(self) -> None:
        sock = self.client()
        self.assert_unanswered(sock, b"x" * 65507, "send failed")  # 65508 bytes with the NUL
        self.assertEqual(self.ask(b"still here"), b"stillhere\x00")


class TimeTests(UdpTestCase):
    args = ["--udp-mode", "time"]

    def test_rfc868_seconds_since_1900(self) -> None:
        answer = self.ask(b"")
        self.assertEqual(len(answer), 4)
        expected = (int(time.time()) + 2_208_988_800) % 2**32
        self.assertLess(abs(struct.unpack("!I", answer)[0] - expected), 5)


class NoAmplifyTests(UdpTestCase):
    args = ["--udp-no-amplify"]

    def test_short_requests_unanswered_long_ones_answered(self) -> None:
        sock = self.client()
        self.assert_unanswered(sock, b"Ping !", "the answer (2")
        self.assertRegex(self.ask(b"x" * 26), DAYTIME)


class Ipv6Tests(UdpTestCase):
    args = ["--udp-port", "udp:0:interface=::1"]

    def setUp(self) -> None:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        super().setUp()

    def test_answers_over_ipv6(self) -> None:
        self.assertEqual(self.server[0], "::1")
        sock = self.client()
        self.assertRegex(self.ask(b"Ping !", sock), DAYTIME)
        self.suite.wait_log(f"udp: [::1]:{sock.getsockname()[1]},Ping !")
        self.suite.wait_log("udp listening on udp6:[::1]:")


class StartupTests(SynchronousTestCase):
    def test_port_taken_is_one_line(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            result = run_twistd(["-n", "sockproto", *ALL_OFF, "--udp-port", str(port)])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            f"udp: cannot listen on udp:{port}:interface=127.0.0.1: Address already in use",
            result.stdout + result.stderr,
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)

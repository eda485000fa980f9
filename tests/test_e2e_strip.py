"""The strip server under the real twistd plugin, over loopback sockets."""

from __future__ import annotations

import contextlib
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ALL_OFF, Suite, recv_all, recv_until, wait_for


class StripSuiteCase(SynchronousTestCase):
    idle_timeout = "300"  # the default: a loaded machine cannot make these clients idle

    def setUp(self) -> None:
        limits = ["--max-clients", "3", "--max-line", "1000", "--idle-timeout", self.idle_timeout]
        self.suite = Suite([*ALL_OFF, "--port", "0", *limits]).start()
        self.addCleanup(self.suite.stop)

    def connect(self) -> socket.socket:
        sock = self.suite.connect("strip")
        self.addCleanup(sock.close)
        return sock


class StripEndToEndTests(StripSuiteCase):
    def test_seed_exchange(self) -> None:
        sock = self.connect()
        sock.sendall(b"hello world\n")
        self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"helloworld\x00")

    def test_pipelined_and_split_lines(self) -> None:
        sock = self.connect()
        sock.sendall(b"a 1\r\nb 2\n\xff \xfe\nc")
        sock.sendall(b" 3\n")
        expected = b"a1\x00b2\x00\xff\xfe\x00c3\x00"
        self.assertEqual(recv_until(sock, lambda d: len(d) >= len(expected)), expected)

    def test_a_telnet_client_ctrl_c(self) -> None:
        # Regression: telnet's Ctrl-C (IAC IP IAC DO TIMING-MARK) came back in
        # the next answer and went unanswered, so telnet showed no output again.
        sock = self.connect()
        sock.sendall(b"a b\r\n\xff\xf4\xff\xfd\x06")
        expected = b"ab\x00\xff\xfc\x06"  # then IAC WONT TIMING-MARK
        self.assertEqual(recv_until(sock, lambda d: len(d) >= len(expected)), expected)
        sock.sendall(b"c d\r\n")
        self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"cd\x00")

    def test_exit_closes_without_answer(self) -> None:
        sock = self.connect()
        sock.sendall(b"one\n  exit  \ntwo\n")
        self.assertEqual(recv_all(sock), b"one\x00")

    def test_half_close_answers_last_line(self) -> None:
        sock = self.connect()
        sock.sendall(b"first\nlast one")
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b"first\x00lastone\x00")

    def test_overlong_line(self) -> None:
        sock = self.connect()
        sock.sendall(b"x" * 5000)
        self.assertEqual(recv_all(sock), b"error: line too long\r\n")

    def test_client_over_the_cap(self) -> None:
        clients = []
        for _ in range(3):
            sock = self.connect()
            sock.sendall(b"hi\n")
            self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"hi\x00")
            clients.append(sock)
        extra = self.connect()
        self.assertEqual(recv_all(extra), b"too many users\r\n")
        # the others are undisturbed
        clients[0].sendall(b"still here\n")
        self.assertEqual(recv_until(clients[0], lambda d: d.endswith(b"\0")), b"stillhere\x00")
        # one leaves, a newcomer is accepted again
        clients[1].close()

        def newcomer_answered() -> bool:
            sock = self.connect()
            sock.sendall(b"new comer\n")
            return recv_until(sock, lambda d: d.endswith(b"\0") or d.endswith(b"\n")) == b"newcomer\x00"

        wait_for(newcomer_answered, what="a free slot after one client left")


class StripIdleEndToEndTests(StripSuiteCase):
    idle_timeout = "1"

    def test_client_that_never_reads_costs_bounded_memory(self) -> None:
        """It can send only until the buffers between us are full: reading stops."""
        sock = self.connect()
        sock.setblocking(False)
        before = self.suite.rss_kib()
        block = (b"x" * 999 + b"\n") * 64
        sent = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                sent += sock.send(block[sent % len(block) :])  # whole lines, however it is cut
            except BlockingIOError:
                time.sleep(0.01)
        grown = self.suite.rss_kib() - before
        self.assertLess(sent, 48 * 2**20)  # socket buffers: a few MiB on loopback
        self.assertLess(grown, 32 * 1024, f"{grown} KiB after {sent} bytes")
        # Then it is idle, and closed as soon as it has read what was answered
        # (not after the 15 s abort: the paused reading must not hold the close).
        self.suite.wait_log("idle for 1 s")
        started = time.monotonic()
        sock.setblocking(True)
        with contextlib.suppress(ConnectionResetError):  # it left input unread: RST
            recv_all(sock)
        self.assertLess(time.monotonic() - started, 10)

    def test_idle_client_dropped(self) -> None:
        sock = self.connect()
        self.assertEqual(recv_all(sock, timeout=10), b"")
        self.suite.wait_log("idle for 1 s")


class StripDefaultsTests(SynchronousTestCase):
    def test_eleventh_client_with_default_cap(self) -> None:
        with Suite([*ALL_OFF, "--port", "0"]) as suite:
            clients = [suite.connect("strip") for _ in range(10)]
            for sock in clients:
                sock.sendall(b"a b\n")
                self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"ab\x00")
            eleventh = suite.connect("strip")
            self.assertEqual(recv_all(eleventh), b"too many users\r\n")
            for sock in [*clients, eleventh]:
                sock.close()

    def test_big_pipelined_burst_answered_in_order(self) -> None:
        lines = [f"line {i}\tx\r\n".encode() for i in range(20000)]
        expected = b"".join(f"line{i}x".encode() + b"\0" for i in range(20000))
        with Suite([*ALL_OFF, "--port", "0"]) as suite:
            sock = suite.connect("strip")
            sock.sendall(b"".join(lines))
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(sock), expected)
            sock.close()

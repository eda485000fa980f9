"""The chat server under the real twistd plugin, over loopback sockets."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from sockproto.limits import LOGIN_DELAY_CAP
from tests.support import ALL_OFF, Suite, recv_all, recv_until, wait_for


def line_count(text: bytes) -> int:
    return text.count(b"\n")


class Reader:
    """Reads one socket in a thread, keeping everything it got."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()  # appending to bytes would be quadratic
        self.lines = 0
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(60)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
                self.lines += chunk.count(b"\n")
        except OSError:
            pass
        self.closed = True

    @property
    def data(self) -> bytes:
        return bytes(self.received)

    def wait_for(self, text: bytes, timeout: float = 30) -> None:
        scanned, seen = 0, False

        def found() -> bool:
            nonlocal scanned, seen
            start, scanned = max(0, scanned - len(text)), len(self.received)
            seen = seen or self.received.find(text, start) >= 0
            return seen

        wait_for(lambda: found() or self.closed, timeout, f"{text!r} from the server")
        if not found():
            raise AssertionError(f"the server closed before sending {text!r}; the end: {self.data[-200:]!r}")


def chat_suite(test: SynchronousTestCase, *args: str) -> Suite:
    """A suite serving chat alone on a free port, stopped when ``test`` ends."""
    suite = Suite([*ALL_OFF, "--chat-port", "0", *args]).start()
    test.addCleanup(suite.stop)
    return suite


class ChatEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.suite = chat_suite(self, "--chat-history", "2")

    def connect(self) -> socket.socket:
        sock = self.suite.connect("chat")
        self.addCleanup(sock.close)
        recv_until(sock, lambda d: d.endswith(b"\n"))  # the welcome (and history)
        return sock

    def test_three_clients_talk(self) -> None:
        alice, bob = self.connect(), self.connect()
        self.assertEqual(recv_until(alice, lambda d: d.endswith(b"\n")), b"*** guest2 joined\r\n")
        alice.sendall(b"/nick alice\nhello \x1b[2Jeveryone\r\n/me waves\n")
        expected = b"*** guest1 is now known as alice\r\n<alice> hello [2Jeveryone\r\n* alice waves\r\n"
        self.assertEqual(recv_until(bob, lambda d: len(d) >= len(expected)), expected)
        carol = self.suite.connect("chat")
        self.addCleanup(carol.close)
        welcome = recv_until(carol, lambda d: line_count(d) >= 3)
        self.assertIn(b"you are guest3", welcome)
        self.assertTrue(welcome.endswith(b"<alice> hello [2Jeveryone\r\n* alice waves\r\n"), welcome)
        carol.sendall(b"/who\n")
        self.assertEqual(
            recv_until(carol, lambda d: d.endswith(b"\n")), b"*** 3 here: alice, guest2, guest3 (you)\r\n"
        )
        # no echo: after her own rename, alice's next line is carol's join
        self.assertEqual(
            recv_until(alice, lambda d: line_count(d) >= 2), b"*** you are now alice\r\n*** guest3 joined\r\n"
        )

    def test_leave_reasons(self) -> None:
        watcher = self.connect()
        quitter, closer, resetter = self.connect(), self.connect(), self.connect()
        recv_until(watcher, lambda d: line_count(d) >= 3)
        quitter.sendall(b"/quit lunch\n")
        self.assertTrue(recv_all(quitter).endswith(b"*** goodbye\r\n"))
        self.assertEqual(
            recv_until(watcher, lambda d: d.endswith(b"\n")), b"*** guest2 left (quit: lunch)\r\n"
        )
        recv_until(closer, lambda d: line_count(d) >= 2)  # read it all so the close is a clean EOF
        closer.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_until(watcher, lambda d: d.endswith(b"\n")), b"*** guest3 left (EOF)\r\n")
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.close()
        self.assertEqual(
            recv_until(watcher, lambda d: d.endswith(b"\n")), b"*** guest4 left (connection reset)\r\n"
        )
        self.suite.wait_log("chat: guest4 (127.0.0.1:")

    def test_nothing_a_client_sends_breaks_it(self) -> None:
        rude, watcher = self.connect(), self.connect()
        every_byte_but_lf = bytes(range(10)) + bytes(range(11, 256))
        rude.sendall(every_byte_but_lf + b"\n/\n/nick \xff\n\xc0\xaf\n" + b"/" * 4000 + b"\n")
        answers = recv_until(rude, lambda d: line_count(d) >= 3)
        self.assertIn(b"error: unknown command / ", answers)
        self.assertIn(b"error: a nickname is", answers)
        seen = recv_until(watcher, lambda d: line_count(d) >= 3)
        for control in [*range(9), *range(11, 32), 127]:
            self.assertNotIn(bytes([control]), seen.replace(b"\r\n", b""))
        self.assertIn("<guest1> \ufffd\ufffd\r\n".encode(), seen)
        self.assertIn(b"<guest1> " + b"/" * 3999 + b"\r\n", seen)
        self.assertIn(b'<guest1> \t !"#', seen)
        rude.sendall(b"x" * 5000)
        self.assertEqual(recv_all(rude), b"error: line too long\r\n")
        self.assertIn(b"left (line too long)", recv_until(watcher, lambda d: b"too long" in d))
        self.assertFalse(self.suite.saw("Traceback"))

    def test_a_telnet_client_ctrl_c_and_bidi_overrides(self) -> None:
        # Regression: telnet's Ctrl-C (IAC IP IAC DO TIMING-MARK) reached the
        # others as garbage and went unanswered, so telnet showed no output
        # again; an RLO reversed the rest of the line on the others' screens.
        telnet, watcher = self.connect(), self.connect()
        telnet.sendall(b"hello\r\n\xff\xf4\xff\xfd\x06")
        answered = recv_until(telnet, lambda d: d.endswith(b"\xff\xfc\x06"))  # IAC WONT TIMING-MARK
        self.assertEqual(answered, b"*** guest2 joined\r\n\xff\xfc\x06")
        telnet.sendall("still \u202eereh\u202c, \U0001f468\u200d\U0001f469\r\n".encode())
        expected = "<guest1> hello\r\n<guest1> still ereh, \U0001f468\u200d\U0001f469\r\n".encode()
        self.assertEqual(recv_until(watcher, lambda d: len(d) >= len(expected)), expected)

    def test_shutdown_says_so_to_everyone(self) -> None:
        clients = [self.connect() for _ in range(3)]
        for sock in clients[:2]:
            recv_until(sock, lambda d: b"guest3 joined" in d)
        self.suite.send_signal(signal.SIGTERM)
        for sock in clients:
            self.assertEqual(recv_all(sock), b"*** server shutting down\r\n")
        self.assertEqual(self.suite.stop(), 0)


class StallingShutdownTests(SynchronousTestCase):
    def test_a_client_that_never_reads_delays_the_stop_at_most_the_grace(self) -> None:
        # No cap on pending output, so the stalled client keeps its backlog.
        suite = chat_suite(self, "--chat-rate", "0", "--chat-max-pending", "0", "--shutdown-grace", "5")
        stalled, talker = socket.socket(), socket.socket()
        for sock in (stalled, talker):
            self.addCleanup(sock.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for sock in (stalled, talker):
            sock.connect(suite.address("chat"))
        talker.sendall(b"".join(b"%06d %s\n" % (i, b"z" * 1000) for i in range(2048)))
        talker.sendall(b"/who\n")  # answered once the server has read all of the above
        recv_until(talker, lambda d: b"*** 2 here" in d)
        started = time.monotonic()
        suite.send_signal(signal.SIGTERM)
        suite.wait_log("received SIGTERM")
        suite.send_signal(signal.SIGTERM)  # an impatient operator
        self.assertEqual(suite.stop(), 0)
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(suite.saw("chat stopped"))
        self.assertFalse(suite.saw("Traceback"), suite.output)


class SlowConsumerEndToEndTests(SynchronousTestCase):
    """ncat --chat's flaw: one client that does not read stalls the room."""

    def test_a_reader_that_stops_costs_the_room_nothing(self) -> None:
        # The default --chat-max-pending (1 MiB), no rate limit.
        suite = chat_suite(self, "--chat-rate", "0")
        stalled, talker, listener = socket.socket(), socket.socket(), socket.socket()
        for sock in (stalled, talker, listener):
            self.addCleanup(sock.close)
        # A small receive window, so the kernel does not soak up megabytes for it.
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for sock in (stalled, talker, listener):
            sock.connect(suite.address("chat"))
        reader = Reader(listener)
        Reader(talker)
        reader.wait_for(b"*** welcome")
        before = suite.rss_kib()

        # 32 MiB through the room, 1 MiB at a time, each once the listener has
        # read the one before: on a busy machine the listener (a thread of
        # this test) must not fall behind and be dropped as too slow itself.
        chunks, lines, size = 32, 1024, 1024
        for chunk in range(chunks):
            first = chunk * lines
            talker.sendall(
                b"".join(b"%06d " % i + b"x" * (size - 9) + b"\r\n" for i in range(first, first + lines))
            )
            last = first + lines
            wait_for(lambda last=last: reader.lines >= last or reader.closed, what=f"line {last}")
        talker.sendall(b"done\n")
        reader.wait_for(b"<guest2> done\r\n")
        after = suite.rss_kib()

        self.assertIn(b"*** guest1 left (too slow)\r\n", reader.data)
        suite.wait_log("chat: dropping guest1")
        said = [line for line in reader.data.split(b"\r\n") if line.startswith(b"<guest2> ")]
        self.assertEqual(len(said), chunks * lines + 1)  # nothing lost, in order
        self.assertEqual([int(line[9:15]) for line in said[:-1]], list(range(chunks * lines)))
        # The stalled reader's backlog is capped: the server did not keep 32 MiB for it.
        self.assertLess(after - before, 16 * 1024, f"RSS grew from {before} to {after} KiB")


class FloodEndToEndTests(SynchronousTestCase):
    def test_a_flooder_is_read_more_slowly_and_loses_nothing(self) -> None:
        suite = chat_suite(self, "--chat-rate", "50/10")
        flooder, listener = suite.connect("chat"), suite.connect("chat")
        self.addCleanup(flooder.close)
        self.addCleanup(listener.close)
        reader = Reader(listener)
        reader.wait_for(b"*** welcome")
        before = suite.rss_kib()
        flooder.setblocking(False)
        offered = b"".join(b"line %06d %s\n" % (i, b"y" * 90) for i in range(300_000))  # 30 MiB
        sent, started = 0, time.monotonic()
        while sent < len(offered) and time.monotonic() - started < 5:
            try:
                sent += flooder.send(offered[sent : sent + 65536])
            except BlockingIOError:
                if time.monotonic() - started > 0.5:
                    break  # the server has stopped reading it: TCP pushes back
                time.sleep(0.01)
        # Only what the socket buffers hold was taken: the server stopped reading.
        self.assertLess(sent, len(offered))

        def relayed() -> int:
            return reader.received.count(b"<guest1> line")

        wait_for(lambda: relayed() >= 60, what="60 lines")
        # 10 at once, then 50 a second
        self.assertGreater(time.monotonic() - started, 0.9)
        self.assertLessEqual(relayed(), 10 + 50 * (time.monotonic() - started) + 5)
        said = [line for line in reader.data.split(b"\r\n") if line.startswith(b"<guest1> line")]
        self.assertEqual([int(line[14:20]) for line in said], list(range(len(said))))
        self.assertLess(suite.rss_kib() - before, 8 * 1024)
        suite.wait_log("sends faster than 50 lines/s; reading it more slowly")


class LoginEndToEndTests(SynchronousTestCase):
    def test_login_required_and_failures_slowed(self) -> None:
        suite = chat_suite(self, "--chat-auth", "--auth", "memory:alice:secret", "--chat-login-delay", "0.3")
        with suite.connect("chat") as sock:
            self.assertIn(b"/login USER PASSWORD", recv_until(sock, lambda d: d.endswith(b"\n")))
            sock.sendall(b"hello\n")
            self.assertEqual(
                recv_until(sock, lambda d: d.endswith(b"\n")),
                b"error: log in first: /login USER PASSWORD\r\n",
            )
            started = time.monotonic()
            sock.sendall(b"/login alice wrong\n/login alice secret\nhi\n")
            answers = recv_until(sock, lambda d: line_count(d) >= 2)
            # 0.3 s for the failure, then 0.3 s more for the right password:
            # from an address with failures, every answer waits its penalty.
            self.assertGreaterEqual(time.monotonic() - started, 0.6)
            self.assertEqual(
                answers, b"error: login failed\r\n*** welcome, alice; /help lists the commands\r\n"
            )
            suite.wait_log("joined as alice")
        self.assertFalse(suite.saw("secret"))
        self.assertFalse(suite.saw("wrong"))

    def test_right_password_after_wrong_ones_waits_the_penalty_within_the_cap(self) -> None:
        """40 wrong logins at once from one address made the right one wait
        for all their queued waits (some 18 minutes); then it was answered at
        once, which told a guesser to hang up and try the next. Now it waits
        the address's penalty: 0.25 s * 2**(4-1) after 4 failures. (Two
        logins in flight at a time from one address: two connections, each
        trying twice, its second when the first is answered.)"""
        suite = chat_suite(self, "--chat-auth", "--auth", "memory:alice:secret", "--chat-login-delay", "0.25")
        guessers = []
        for _ in range(2):
            sock = suite.connect("chat")
            self.addCleanup(sock.close)
            recv_until(sock, lambda d: d.endswith(b"\n"))
            sock.sendall(b"/login alice wrong\n/login alice wrong\n")
            guessers.append(sock)
        for sock in guessers:
            self.assertEqual(
                recv_until(sock, lambda d: line_count(d) >= 2, timeout=LOGIN_DELAY_CAP),
                b"error: login failed\r\n" * 2,
            )
        with suite.connect("chat") as sock:
            recv_until(sock, lambda d: d.endswith(b"\n"))
            started = time.monotonic()
            sock.sendall(b"/login alice secret\n")
            answer = recv_until(sock, lambda d: d.endswith(b"\n"), timeout=LOGIN_DELAY_CAP)
            waited = time.monotonic() - started
            self.assertEqual(answer, b"*** welcome, alice; /help lists the commands\r\n")
            self.assertGreaterEqual(waited, 2.0)
            self.assertLess(waited, LOGIN_DELAY_CAP)
        suite.wait_log("left: EOF")
        with suite.connect("chat") as sock:  # the count was cleared: no wait now
            recv_until(sock, lambda d: d.endswith(b"\n"))
            started = time.monotonic()
            sock.sendall(b"/login alice secret\n")
            answer = recv_until(sock, lambda d: d.endswith(b"\n"))
            self.assertEqual(answer, b"*** welcome, alice; /help lists the commands\r\n")
            self.assertLess(time.monotonic() - started, 2.0)

    def test_hang_ups_while_failed_answers_wait_free_their_slots(self) -> None:
        """With a 10 s wait, a newcomer must get in well before the first
        answer would have been due to the clients that hung up."""
        suite = chat_suite(
            self,
            *("--chat-auth", "--auth", "memory:alice:secret"),
            *("--chat-login-delay", "10", "--chat-max-clients", "10"),
        )
        for _ in range(10):
            with suite.connect("chat") as sock:
                recv_until(sock, lambda d: d.endswith(b"\n"))
                sock.sendall(b"/login alice wrong\n")
        # Each checked (or, while two were still in flight, refused at once).
        tried = ("failed to log in as alice", "refused a login: too many logins in progress")
        wait_for(lambda: sum(map(suite.output.count, tried)) >= 10, what="10 logins tried")

        def welcomed() -> bool:
            with suite.connect("chat") as sock:
                greeting = recv_until(sock, lambda d: d.endswith(b"\n"))
            return b"welcome" in greeting

        wait_for(welcomed, timeout=8, what="a chat session after the hang-ups")


class OutputBudgetEndToEndTests(SynchronousTestCase):
    """Issue 12: 300 members that talk and never read took +1.2 GiB: the real
    bound was max clients x max pending. --chat-max-output bounds the room."""

    MEMBERS = 30

    def test_members_that_talk_and_never_read_stay_within_the_budget(self) -> None:
        suite = chat_suite(
            self, "--chat-rate", "0", "--chat-max-pending", "0", "--chat-max-output", "4M", "--http-port", "0"
        )
        members = []
        for _ in range(self.MEMBERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # and never read
            sock.connect(suite.address("chat"))
            self.addCleanup(sock.close)
            members.append(sock)
        suite.wait_log(f"joined as guest{self.MEMBERS}")
        before = suite.rss_kib()
        # Each says 180 KB, which reaches 29 others: 156 MB, were it all held.
        # They talk at once, so each gets the lines of a turn but its own:
        # a copy of its own.
        for i in range(60):
            line = b"%04d %s\n" % (i, b"z" * 3000)
            for sock in members:
                with contextlib.suppress(OSError):  # dropped already
                    sock.sendall(line)
        suite.wait_log("(--chat-max-output)")
        grown = suite.rss_kib() - before
        self.assertLess(grown, 32 * 1024, f"RSS grew by {grown} KiB")
        host, port = suite.address("http")
        with socket.create_connection((host, port), timeout=20) as sock:
            sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
            status = json.loads(recv_all(sock).partition(b"\r\n\r\n")[2])
        chat = status["services"]["chat"]
        self.assertGreater(chat["limits_hit"]["max_output"], 0)
        self.assertEqual(chat["counters"]["dropped_slow"], chat["limits_hit"]["max_output"])

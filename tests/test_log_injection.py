"""Logs cannot be forged by client input.

Every log call that carries something a client chose is driven here with
hostile values (CR, LF, ANSI escapes, other control and non-ASCII characters)
and each event, formatted as ``formatEvent`` formats it, must be one line of
printable characters. What a client chooses:

- UDP: the payload (answered and every kind of unanswered datagram);
- HTTP: the request target (the 400 lines) and, in the access log, the
  method, target, Referer and User-Agent;
- every TCP service: the peer, when it listens on a UNIX socket (``unix:``
  endpoints): the peer's address is whatever path the client bound. That is
  in the shared lines (too many clients, idle, line too long) and in each of
  HTTP's (malformed, too long, body over the cap, timeouts).

An IP peer is the kernel's, and the daemon's own lines (listening, stopped)
carry only settings.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import strip, udp
from sockproto.limits import LOG_SUMMARY_INTERVAL, ConnectionPolicy, GuardedFactory, peer_of
from sockproto.stats import ServiceStats
from sockproto.text import loggable
from tests.support import ALL_OFF, Suite, recv_all, temp_dir
from tests.test_http import Harness, parse_responses
from tests.test_strip import connect
from tests.test_udp import NOW, FakeDatagramTransport

FORGED = "\r\n2026-11-22T04:03:05+0000 [sockproto#info] strip: forged line"
NASTIES = [
    FORGED,
    "\x1b[2J\x1b[31mred\x1b[0m",  # clear screen, colour
    "\x1b]0;owned\x07",  # set the terminal title
    "\x1b[6n",  # make the terminal answer
    "a\u2028b\u0085c\u202ed",  # line and paragraph separators, NEL, right-to-left override
    "\x00\x7f\x9b\x08",  # NUL, DEL, CSI, backspace
]
hostile_text = st.one_of(st.sampled_from(NASTIES), st.text(min_size=1, max_size=40))
hostile_bytes = st.one_of(st.sampled_from([n.encode() for n in NASTIES]), st.binary(min_size=1, max_size=40))


def unix_peer(name: str | bytes) -> UNIXAddress:
    """The peer of a UNIX socket client that bound ``name`` (bytes: Linux's abstract names)."""
    return UNIXAddress(name)


class Lines:
    """Checks captured events: each one printable line, the forged text never raw."""

    def __init__(self, test: SynchronousTestCase, events: list[dict[str, Any]]) -> None:
        self.test = test
        self.texts = [formatEvent(event) for event in events]

    def check(self, count: int | None = None) -> list[str]:
        test = self.test
        test.assertTrue(self.texts, "nothing was logged")
        if count is not None:
            test.assertEqual(len(self.texts), count, self.texts)
        for text in self.texts:
            test.assertTrue(text.isprintable(), repr(text))
            test.assertNotIn("Unable to format event", text)
        return self.texts


class LoggableTests(SynchronousTestCase):
    @given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
    def test_always_one_line_of_printable_ascii(self, data: bytes | str) -> None:
        shown = loggable(data)
        self.assertTrue(shown.isascii() and shown.isprintable(), shown)

    @given(st.binary(max_size=200), st.binary(max_size=200))
    def test_different_input_shows_differently(self, one: bytes, other: bytes) -> None:
        if one != other:
            self.assertNotEqual(loggable(one), loggable(other))

    def test_escapes(self) -> None:
        self.assertEqual(loggable(b"a\r\n\x1b[2J\\\xff"), "a\\r\\n\\x1b[2J\\\\\\xff")
        self.assertEqual(loggable("\u2028"), "\\xe2\\x80\\xa8")
        self.assertEqual(loggable(b"x" * 5, limit=3), "xxx...(+2 bytes)")


class PeerTests(SynchronousTestCase):
    def test_ip_peers_as_they_are(self) -> None:
        self.assertEqual(
            peer_of(StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5))), "10.1.2.3:5"
        )
        six = StringTransport(peerAddress=IPv6Address("TCP", "::1", 5))
        self.assertEqual(peer_of(six), "[::1]:5")

    def test_unnamed_unix_peer(self) -> None:
        self.assertEqual(peer_of(StringTransport(peerAddress=unix_peer(None))), "local")  # type: ignore[arg-type]

    @given(st.one_of(hostile_text, hostile_bytes.map(lambda b: b"\0" + b)))
    def test_unix_peer_names_escaped(self, name: str | bytes) -> None:
        shown = peer_of(StringTransport(peerAddress=unix_peer(name)))
        self.assertTrue(shown.isascii() and shown.isprintable(), shown)
        self.assertEqual(shown, loggable(name))

    def test_unix_peer_is_a_path(self) -> None:
        # It was shown as a bytes repr: b'/run/client.sock'.
        self.assertEqual(peer_of(StringTransport(peerAddress=unix_peer("/run/c.sock"))), "/run/c.sock")


class StripLogTests(SynchronousTestCase):
    """The shared guard's and line policy's lines, through the strip server."""

    @given(hostile_text)
    def test_every_line_with_a_unix_peer(self, name: str) -> None:
        clock = Clock()
        stats = ServiceStats("strip", "lines")
        policy = ConnectionPolicy(max_clients=2, idle_timeout=5)
        factory = GuardedFactory(strip.StripFactory(8, stats), policy, stats, clock)
        peer = unix_peer("/tmp/" + name)
        with capturedLogs() as events:
            first, _ = connect(factory, peer)
            connect(factory, peer)
            connect(factory, peer)  # too many clients
            first.dataReceived(b"x" * 20)  # line too long
            first.connectionLost(None)
            clock.advance(6)  # the second one: idle
        texts = Lines(self, events).check(count=3)
        for text in texts:
            self.assertIn(loggable("/tmp/" + name), text)


class UdpLogTests(SynchronousTestCase):
    @given(hostile_bytes, st.sampled_from([9002, 7, 0]), st.sampled_from(sorted(udp.RESPONDERS)))
    def test_payloads_escaped(self, payload: bytes, port: int, mode: str) -> None:
        clock = Clock()
        clock.advance(NOW)
        events: list[dict[str, Any]] = []
        self.patch(udp, "log", Logger(namespace="sockproto", observer=events.append))
        protocol = udp.UdpResponder(
            udp.RESPONDERS[mode], ServiceStats("udp", "datagrams"), clock, rate=(1, 1), no_amplify=True
        )
        transport = FakeDatagramTransport(port=9002)
        protocol.makeConnection(transport)
        for source_port in (40000, 40000, port):  # answered (or no-amplify), rate, loop protection
            protocol.datagramReceived(payload, ("127.0.0.1", source_port))
        transport.error = OSError(errno.EPERM, "Operation not permitted")
        protocol.datagramReceived(payload, ("10.0.0.1", 40000))  # send failed (unless no-amplify)
        clock.advance(LOG_SUMMARY_INTERVAL)
        texts = Lines(self, events).check()
        self.assertTrue(any(loggable(payload) in text for text in texts), texts)


class HttpLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = self.harness()

    def harness(self) -> Harness:
        harness = Harness(self, max_body=10, idle_timeout=5)
        harness.site.doStart()  # the access log
        self.addCleanup(harness.site.doStop)
        return harness

    def test_access_log_fields_escaped(self) -> None:
        connection = self.http.connect()
        hostile = b"\x1b[2J\x1b]0;owned\x07\x7f\x9b\xff" + FORGED.encode().replace(b"\r\n", b" ")
        with capturedLogs() as events:
            connection.send(
                b"GET /anything/%0d%0a%1b HTTP/1.1\r\nHost: x\r\nReferer: "
                + hostile
                + b"\r\nUser-Agent: "
                + hostile
                + b"\r\n\r\n"
            )
        (line,) = Lines(self, events).check(count=1)
        self.assertIn(r'"GET /anything/%0d%0a%1b HTTP/1.1" 200', line)
        self.assertEqual(line.count(r"\x1b[2J\x1b]0;owned\x07\x7f\x9b\xff"), 2)

    @given(hostile_text)
    def test_every_error_line_with_a_unix_peer(self, name: str) -> None:
        self.http = self.harness()  # a fresh one for each example
        peer = unix_peer("/tmp/" + name)
        sends = [
            b"GARBAGE\r\n\r\n",  # malformed
            b"GET /" + b"a" * 20000,  # request line too long
            b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n",  # body over the cap
            b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n",  # target not a path
            b"GET /ip\x80 HTTP/1.1\r\nHost: x\r\n\r\n",  # target not ASCII
        ]
        with capturedLogs() as events:
            for data in sends:
                self.http.connect(peer).send(data)
            self.http.connect(peer).send(b"GET / HTTP/1.1\r\n")  # then no more: 408
            self.http.connect(peer)  # nothing at all: idle
            slow = self.http.connect(peer)
            slow.send(b"GET /delay/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.transport.producer.pauseProducing()  # and it reads nothing of the answer
            self.http.clock.advance(6)
        texts = Lines(self, events).check()
        # A line per mistake, an access line for each of the two 400s, the
        # 408, "idle" for the silent one and the two the 400s left open, and
        # "read nothing" (the delay's answer is made as it is read, so the
        # request of a client that reads nothing never ends: no access line).
        self.assertEqual(len(texts), len(sends) + 2 + 1 + 3 + 1, texts)
        self.assertTrue(any("read nothing for 5 s" in text for text in texts), texts)
        for text in texts:
            if not text.startswith('http: "-"'):  # access lines show no UNIX peer
                self.assertIn(loggable("/tmp/" + name), text)

    def test_overflow_line_with_a_unix_peer(self) -> None:
        harness = Harness(self, max_clients=1)
        harness.connect()
        with capturedLogs() as events:
            refused = harness.connect(unix_peer(FORGED))
        self.assertEqual(parse_responses(refused.received())[0].status, 503)
        (text,) = Lines(self, events).check(count=1)
        self.assertIn(loggable(FORGED), text)


class EndToEndTests(SynchronousTestCase):
    def test_unix_socket_client_cannot_forge_a_line(self) -> None:
        """Through twistd's own log: a client bound to a hostile path, a line too long."""
        folder = temp_dir(self)
        server = os.path.join(folder, "strip.sock")
        suite = Suite([*ALL_OFF, "--port", f"unix:{server}", "--max-line", "8"]).start()
        self.addCleanup(suite.stop)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.bind(os.path.join(folder, "c\n2026-11-22T04:03:05+0000 [sockproto#info] forged\x1b[31m"))
        client.connect(server)
        client.sendall(b"x" * 20 + b"\n")
        self.assertEqual(recv_all(client), b"error: line too long\r\n")
        suite.wait_log("line longer than 8 bytes")
        (line,) = [line for line in suite.lines if "forged" in line]
        self.assertTrue(line.isprintable(), line)
        self.assertIn("strip.sock", suite.output)  # listening on it
        self.assertRegex(
            line, r"strip: closing \S+/c\\n2026-11-22T04:03:05\+0000 \[sockproto#info\] forged\\x1b"
        )

"""A response's producer under a transport that pauses it on every write while
its buffer is full and resumes it once (found by the soak run, bench/soak.py:
pipelined requests after a large response hung the connection)."""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ALL_OFF, Suite, recv_until
from tests.test_http import Harness


class CountingProducer:
    """Counts like the CooperativeTask a pull producer runs as: it needs as
    many resumes as it had pauses."""

    def __init__(self) -> None:
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        if self.pauses == 0:
            raise AssertionError("resumed while not paused")
        self.pauses -= 1

    def stopProducing(self) -> None:
        self.stopped = True


class PausedOnceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self)
        connection = self.http.connect()
        self.channel = connection.transport.producer  # the channel, under the guard

    def test_every_pause_of_a_full_buffer_needs_one_resume(self) -> None:
        producer = CountingProducer()
        self.channel.registerProducer(producer, True)
        for _ in range(3):  # the transport: one call per write into a full buffer
            self.channel.pauseProducing()
        self.assertEqual(producer.pauses, 1)
        self.channel.resumeProducing()  # the buffer drained
        self.assertEqual(producer.pauses, 0)

    def test_a_producer_registered_while_the_buffer_is_full_waits_for_it(self) -> None:
        self.channel.pauseProducing()
        producer = CountingProducer()
        self.channel.registerProducer(producer, True)
        self.assertEqual(producer.pauses, 1)
        self.channel.pauseProducing()  # its own first write
        self.channel.resumeProducing()
        self.assertEqual(producer.pauses, 0)

    def test_stop_reaches_the_producer(self) -> None:
        producer = CountingProducer()
        self.channel.registerProducer(producer, True)
        self.channel.stopProducing()
        self.assertTrue(producer.stopped)
        self.channel.unregisterProducer()


class PipelinedAfterLargeResponseTests(SynchronousTestCase):
    def test_every_pipelined_response_arrives(self) -> None:
        # /bytes/N with N a multiple of 64 KiB ends with the send buffer full
        # at the moment the next request starts: without PausedOnce, the
        # 1000 bytes arrive but their request never finishes, and / never comes.
        with Suite([*ALL_OFF, "--http-port", "0", "--http-message", "the end"]) as suite:
            with suite.connect("http") as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
                sock.sendall(b"".join(request % path for path in (b"/bytes/10485760", b"/bytes/1000", b"/")))
                data = recv_until(sock, lambda got: got.endswith(b"\r\n\r\nthe end\n"), timeout=20)
            self.assertEqual(data.count(b"HTTP/1.1 200 OK\r\n"), 3)
            self.assertEqual(len(data) - data.rindex(b"\r\n\r\nthe end\n"), len(b"\r\n\r\nthe end\n"))

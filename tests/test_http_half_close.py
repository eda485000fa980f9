"""A client that half-closes after its requests, as ncat and ``nc -N`` do, gets
every answer (found by the soak run, bench/soak.py: twisted.web dropped each
one not yet written, so ``/delay`` and large files came back empty)."""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ALL_OFF, Suite, recv_all, temp_dir
from tests.test_http import Harness, parse_responses


class HalfCloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self)
        self.connection = self.http.connect()

    def half_close(self) -> None:
        self.connection.protocol.readConnectionLost()  # through the guard, as the reactor calls it

    def test_an_answer_under_way_still_comes_then_the_close(self) -> None:
        self.connection.send(b"GET /delay/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.half_close()
        self.assertFalse(self.connection.closed)
        self.http.clock.advance(1)
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(response.status, 200)
        self.assertTrue(self.connection.closed)

    def test_pipelined_requests_are_all_answered(self) -> None:
        request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
        self.connection.send(request % b"/delay/1" + request % b"/ip")
        self.half_close()
        self.http.clock.advance(1)
        self.assertEqual([r.status for r in parse_responses(self.connection.received())], [200, 200])
        self.assertTrue(self.connection.closed)

    def test_nothing_asked_closes_at_once(self) -> None:
        self.half_close()
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.connection.received(), b"")

    def test_a_request_cut_short_gets_no_answer(self) -> None:
        self.connection.send(b"GET / HTTP/1.1\r\nHost")
        self.half_close()
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.connection.received(), b"")


class HalfCloseEndToEndTests(SynchronousTestCase):
    def test_streamed_and_delayed_answers_reach_a_half_closed_client(self) -> None:
        root = temp_dir(self)
        big = os.urandom(2_000_000)
        with open(os.path.join(root, "big.bin"), "wb") as file:
            file.write(big)
        with Suite([*ALL_OFF, "--http-port", "0", "--http-root", root]) as suite:
            answers = {b"/delay/0.2": None, b"/bytes/300000": 300000, b"/files/big.bin": len(big)}
            for path, size in answers.items():
                with suite.connect("http") as sock:
                    sock.sendall(b"GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path)
                    sock.shutdown(socket.SHUT_WR)  # what ncat does at the end of its input
                    answer = recv_all(sock)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.0 200 OK\r\n"), (path, answer[:100]))
                if size is not None:
                    self.assertEqual(len(body), size, path)
            self.assertFalse(suite.saw("Traceback"))

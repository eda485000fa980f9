"""The HTTP responder without sockets: the real Site and guard over a
StringTransport, time from a Clock. Routes that stream through a producer
(/bytes and static files) are pumped by a Cooperator that runs on the Clock."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import _producer_helpers
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sockproto import __version__, http
from sockproto.config import HttpSettings
from sockproto.limits import LOG_SUMMARY_INTERVAL, ConnectionPolicy, GuardedFactory
from sockproto.stats import Stats
from tests.support import Consumer, temp_dir

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A StringTransport that half-closes as a TCP connection does."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass  # HTTPChannel asks a TCP transport for it


@dataclass
class Response:
    status: int
    reason: bytes
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_responses(data: bytes, head_only: bool = False) -> list[Response]:
    """Every whole response in ``data`` (Content-Length, chunked, or none)."""
    responses = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"incomplete response head: {head!r}")
        lines = head.split(b"\r\n")
        _version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
        response = Response(int(status), reason)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            response.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if head_only or response.status in (204, 304) or 100 <= response.status < 200:
            pass
        elif response.header(b"content-length") is not None:
            size = int(response.header(b"content-length") or 0)
            response.body, data = data[:size], data[size:]
        elif response.header(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
            response.body = body
        else:
            response.body, data = data, b""
        responses.append(response)
    return responses


class Harness:
    """One responder with its stats, and connections to it."""

    def __init__(
        self, test: SynchronousTestCase, max_clients: int = 0, clock: Clock | None = None, **fields: Any
    ) -> None:
        """Harnesses alive at once in a test must share one ``clock`` (the cooperator is global)."""
        self.connections: list[Connection] = []
        test.addCleanup(self.close_all)
        self.clock = clock or Clock()
        self.stats = Stats(self.clock.seconds)
        self.service_stats = self.stats.service("http", "requests")
        self.settings = HttpSettings(**fields)
        self.site = http.build_site(self.settings, self.stats, self.service_stats, self.clock)
        policy = ConnectionPolicy(max_clients=max_clients, overflow_message=http.OVERFLOW)
        self.factory = GuardedFactory(self.site, policy, self.service_stats, self.clock)
        # twisted.web turns a pull producer (static files, /bytes) into a push
        # one with the global cooperator, which needs a running reactor; this
        # one runs its steps as the Clock's calls, at the current time.
        cooperator = Cooperator(scheduler=lambda step: self.clock.callLater(0, step))
        test.patch(_producer_helpers, "cooperate", cooperator.cooperate)

    def connect(self, peer: Any = PEER) -> Connection:
        protocol = self.factory.buildProtocol(peer)
        transport = TCPStringTransport(hostAddress=HOST, peerAddress=peer)
        protocol.makeConnection(transport)
        connection = Connection(protocol, transport, self.pump)
        self.connections.append(connection)
        return connection

    def pump(self) -> None:
        """Run what is due now: producer steps, and the steps they schedule in turn."""
        self.clock.advance(0)

    def close_all(self) -> None:
        """What the reactor does when a test's connections go (it closes their bodies' files)."""
        for connection in self.connections:
            connection.lose()

    def get(self, target: str, method: str = "GET", headers: str = "", body: bytes = b"") -> Response:
        """One request on a fresh connection; its one response."""
        connection = self.connect()
        (response,) = connection.request(target, method, headers, body)
        return response


class Connection:
    lost = False

    def __init__(self, protocol: Any, transport: TCPStringTransport, pump: Callable[[], None]) -> None:
        self.protocol = protocol
        self.transport = transport
        self.pump = pump

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.pump()

    def received(self) -> bytes:
        """What came back since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def request(
        self, target: str, method: str = "GET", headers: str = "", body: bytes = b""
    ) -> list[Response]:
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}{length}\r\n"
        self.send(head.encode("latin-1") + body)
        return parse_responses(self.received(), head_only=method == "HEAD")

    @property
    def closed(self) -> bool:
        """The server is done with the connection: closing it, or its write side
        (a refusal, which still reads for a while: see :class:`LingerTests`)."""
        return bool(self.transport.disconnecting or self.transport.write_closed)

    def end(self) -> None:
        """The client closes its side (what the reactor tells a half-closeable protocol)."""
        self.protocol.readConnectionLost()

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


class PureFunctionTests(SynchronousTestCase):
    def test_greeting_names_version(self) -> None:
        self.assertEqual(
            http.greeting(""), f"Hello from sockproto {__version__}, the mini HTTP responder.\n".encode()
        )

    def test_greeting_keeps_message_and_ends_line(self) -> None:
        self.assertEqual(http.greeting("hi"), b"hi\n")
        self.assertEqual(http.greeting("hi\n"), b"hi\n")
        self.assertEqual(http.greeting("h\u00e9"), "h\u00e9\n".encode())

    def test_status_codes(self) -> None:
        self.assertEqual(http.parse_status_code(b"418"), 418)
        for bad in (b"99", b"100", b"199", b"600", b"2000", b"abc", b"", b"20x", b" 200"):
            self.assertIsNone(http.parse_status_code(bad), bad)

    def test_delays(self) -> None:
        self.assertEqual(http.parse_delay(b"0"), 0.0)
        self.assertEqual(http.parse_delay(b"1.5"), 1.5)
        self.assertEqual(http.parse_delay(b"10"), 10.0)
        for bad in (b"10.01", b"11", b"-1", b"1e3", b"nan", b"inf", b"", b"1.", b".5"):
            self.assertIsNone(http.parse_delay(bad), bad)

    def test_sizes(self) -> None:
        self.assertEqual(http.parse_size(b"0"), 0)
        self.assertEqual(http.parse_size(b"10485760"), 10 * 1024 * 1024)
        for bad in (b"10485761", b"-1", b"1k", b"", b"1.0", b"99999999999"):
            self.assertIsNone(http.parse_size(bad), bad)

    def test_query(self) -> None:
        self.assertEqual(
            http.query_of(b"/a?x=1&x=2&y=&z=%C3%A9"), {"x": ["1", "2"], "y": [""], "z": ["\u00e9"]}
        )
        self.assertEqual(http.query_of(b"/a"), {})

    def test_decoded_never_fails(self) -> None:
        self.assertEqual(http.decoded("\u00e9".encode()), "\u00e9")
        self.assertEqual(http.decoded(b"\xff"), "\u00ff")


class RandomBytesProducerTests(SynchronousTestCase):
    """The producer alone, pulled by hand; the /bytes route is served on the Clock in test_properties_http."""

    def test_one_chunk_per_pull_then_finish(self) -> None:
        consumer = Consumer()
        producer = http.RandomBytesProducer(consumer, 250, chunk=100)
        producer.start()
        self.assertIs(consumer.producer, producer)
        self.assertEqual(consumer.chunks, [])  # nothing made before it is asked
        for _ in range(3):
            producer.resumeProducing()
        self.assertEqual([len(c) for c in consumer.chunks], [100, 100, 50])
        self.assertFalse(consumer.finished)
        producer.resumeProducing()
        self.assertTrue(consumer.finished)
        self.assertIsNone(consumer.producer)
        self.assertNotEqual(consumer.chunks[0], consumer.chunks[1])

    def test_stopped_producer_writes_nothing(self) -> None:
        consumer = Consumer()
        producer = http.RandomBytesProducer(consumer, 250, chunk=100)
        producer.start()
        producer.stopProducing()
        producer.resumeProducing()
        self.assertEqual(consumer.chunks, [])
        self.assertFalse(consumer.finished)


def echoed_as_before(method: str, path: str, uri: str, headers: dict[str, str], body: bytes) -> bytes:
    """What /anything answered when it built its JSON in one piece."""
    shown: dict[str, Any] = {
        "method": method,
        "path": path,
        "query": http.query_of(uri.encode()),
        "headers": headers,
        "origin": "127.0.0.1",
        "body_length": len(body),
    }
    try:
        shown["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        shown["body"] = None
        shown["body_base64"] = base64.b64encode(body).decode("ascii")
    return json.dumps(shown, indent=2).encode("ascii") + b"\n"


class EchoBodyTests(SynchronousTestCase):
    """/anything's JSON is made a chunk at a pull, byte for byte as json.dumps makes it whole."""

    BODIES = [
        b"",
        b"x",
        b'{"k": 1}',
        'h\u00e9 \U0001f600 \u2028 \x00\x1f"\\/'.encode() * 3000,  # chars split across reads
        b"\x01" * (3 * http.ECHO_READ + 1),  # six bytes of JSON each
        b"\xff\x00\xfe",  # not UTF-8: base64
        b"\x00" * 5 + b"\xff" + b"a" * (2 * http.ECHO_READ),  # bad byte in the first read
        b"a" * (2 * http.ECHO_READ) + b"\xe2\x82",  # cut short in the last one
        os.urandom(3 * http.ECHO_READ + 2),
    ]

    def setUp(self) -> None:
        self.http = Harness(self, max_body=10 * 1024 * 1024)

    def test_same_bytes_as_one_json_dumps(self) -> None:
        for body in self.BODIES:
            response = self.http.get("/anything/x?q=1&q=%C3%A9", method="PUT", body=body)
            headers = (
                {"Host": "localhost", "Content-Length": str(len(body))} if body else {"Host": "localhost"}
            )
            expected = echoed_as_before("PUT", "/anything/x", "/anything/x?q=1&q=%C3%A9", headers, body)
            self.assertEqual(response.body, expected, body[:40])
            self.assertEqual(response.header(b"content-length"), b"%d" % len(expected))

    def test_head_gets_the_length_only(self) -> None:
        get = self.http.get("/anything", method="GET")
        head = self.http.connect().request("/anything", "HEAD")[0]
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header(b"content-length"), b"%d" % (len(get.body) + len("HEAD") - len("GET")))

    def test_a_client_that_does_not_read_holds_a_chunk_not_the_whole_json(self) -> None:
        """1 MiB of control bytes makes 6 MiB of JSON: made as the client
        reads it (here, while the transport says it is full: nothing more)."""
        body = b"\x01" * (1024 * 1024)
        connection = self.http.connect()
        channel = connection.transport.producer  # the channel, under the guard
        channel.pauseProducing()  # the transport's buffer is full, as a client that stopped reading leaves it
        connection.send(
            b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        self.http.pump()
        self.assertLess(len(connection.transport.value()), 64 * 1024)
        for _ in range(10_000):  # the client reads: each drained buffer asks for more
            if connection.transport.value().endswith(b"\n}\n"):
                break
            channel.resumeProducing()
            self.http.pump()
            channel.pauseProducing()
        (response,) = parse_responses(connection.received())
        headers = {"Host": "x", "Content-Length": str(len(body))}
        self.assertEqual(response.body, echoed_as_before("POST", "/anything", "/anything", headers, body))

    def test_delay_answers_the_same_way(self) -> None:
        connection = self.http.connect()
        connection.send(b"POST /delay/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        self.http.clock.advance(1)
        self.http.pump()
        (response,) = parse_responses(connection.received())
        self.assertEqual(
            response.body,
            echoed_as_before("POST", "/delay/1", "/delay/1", {"Host": "x", "Content-Length": "2"}, b"hi"),
        )


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self, max_body=1000, idle_timeout=60.0)

    def test_greeting(self) -> None:
        response = self.http.get("/")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(response.body, http.greeting(""))

    def test_custom_message(self) -> None:
        self.http = Harness(self, message="hello, tester")
        self.assertEqual(self.http.get("/").body, b"hello, tester\n")

    def test_head_has_length_but_no_body(self) -> None:
        response = self.http.get("/", method="HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(http.greeting("")))
        self.assertEqual(response.body, b"")

    def test_wrong_method(self) -> None:
        response = self.http.get("/", method="DELETE")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header(b"allow"), b"GET, HEAD")

    def test_unknown_route_lists_routes(self) -> None:
        response = self.http.get("/nope")
        self.assertEqual(response.status, 404)
        self.assertIn(b"/anything", response.body)

    def test_route_with_extra_segments_is_not_found(self) -> None:
        self.assertEqual(self.http.get("/ip/more").status, 404)
        self.assertEqual(self.http.get("/status/200/more").status, 404)

    def test_files_off_says_how_to_turn_on(self) -> None:
        response = self.http.get("/files/anything.txt")
        self.assertEqual(response.status, 404)
        self.assertIn(b"--http-root", response.body)

    def test_anything_echoes_request(self) -> None:
        response = self.http.get(
            "/anything/deep/path?a=1&a=2&b=%20x", method="PATCH", headers="X-Test: one\r\n", body=b'{"k": 1}'
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        echoed = json.loads(response.body)
        self.assertEqual(echoed["method"], "PATCH")
        self.assertEqual(echoed["path"], "/anything/deep/path")
        self.assertEqual(echoed["query"], {"a": ["1", "2"], "b": [" x"]})
        self.assertEqual(echoed["headers"]["X-Test"], "one")
        self.assertEqual(echoed["headers"]["Host"], "localhost")
        self.assertEqual(echoed["body"], '{"k": 1}')
        self.assertEqual(echoed["body_length"], 8)
        self.assertEqual(echoed["origin"], "127.0.0.1")
        self.assertNotIn("body_base64", echoed)

    def test_anything_binary_body_as_base64(self) -> None:
        echoed = json.loads(self.http.get("/anything", method="POST", body=b"\xff\x00\xfe").body)
        self.assertIsNone(echoed["body"])
        self.assertEqual(base64.b64decode(echoed["body_base64"]), b"\xff\x00\xfe")

    def test_anything_ignores_forwarded_for(self) -> None:
        echoed = json.loads(self.http.get("/anything", headers="X-Forwarded-For: 10.9.9.9\r\n").body)
        self.assertEqual(echoed["origin"], "127.0.0.1")

    def test_headers_and_ip(self) -> None:
        headers = json.loads(self.http.get("/headers", headers="X-A: 1\r\nX-A: 2\r\n").body)
        self.assertEqual(headers["headers"]["X-A"], "1, 2")
        self.assertEqual(json.loads(self.http.get("/ip").body), {"origin": "127.0.0.1"})

    def test_status_code(self) -> None:
        response = self.http.get("/status/418", method="POST", body=b"x")
        self.assertEqual(response.status, 418)
        self.assertEqual(response.body, b"418 I'm a teapot\n")
        self.assertEqual(self.http.get("/status/599").status, 599)

    def test_redirect_status_names_a_location(self) -> None:
        # Regression: /status/3xx had no Location; httpbin sends /redirect/1
        # for these five, so a client's redirect handling has one to follow.
        for code in (301, 302, 303, 305, 307):
            response = self.http.get(f"/status/{code}")
            self.assertEqual((response.status, response.header(b"location")), (code, b"/redirect/1"), code)
        for code in (300, 304, 308, 200):
            self.assertIsNone(self.http.get(f"/status/{code}").header(b"location"), code)

    def test_status_204_has_no_body_or_length(self) -> None:
        connection = self.http.connect()
        connection.send(b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = connection.received()
        self.assertTrue(raw.startswith(b"HTTP/1.1 204 "), raw)
        self.assertNotIn(b"content-length", raw.lower())
        self.assertTrue(raw.endswith(b"\r\n\r\n"))
        # and the connection still works
        self.assertEqual(connection.request("/ip")[0].status, 200)

    def test_bad_status_codes(self) -> None:
        for code in ("100", "600", "abc"):
            response = self.http.get(f"/status/{code}")
            self.assertEqual(response.status, 400, code)
            self.assertIn(b"200 to 599", response.body)

    def test_bad_parameters(self) -> None:
        self.assertEqual(self.http.get("/delay/11").status, 400)
        self.assertEqual(self.http.get("/bytes/10485761").status, 400)
        self.assertEqual(self.http.get("/bytes/x").status, 400)
        response = self.http.get("/delay")
        self.assertEqual(response.status, 404)
        self.assertIn(b"/delay/SECONDS", response.body)

    def test_bytes_head_needs_no_producer(self) -> None:
        response = self.http.get("/bytes/5000", method="HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"5000")
        self.assertEqual(response.header(b"content-type"), b"application/octet-stream")

    def test_keep_alive(self) -> None:
        connection = self.http.connect()
        for target in ("/", "/ip", "/status/404", "/anything"):
            (response,) = connection.request(target)
            self.assertNotEqual(response.status, 0)
        self.assertFalse(connection.closed)
        self.assertEqual(self.http.service_stats.total, 1)
        self.assertEqual(self.http.service_stats.handled, 4)

    def test_pipelined_requests_answered_in_order(self) -> None:
        connection = self.http.connect()
        connection.send(
            b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual([r.status for r in parse_responses(connection.received())], [201, 202])

    def test_http10_closes_after_response(self) -> None:
        connection = self.http.connect()
        connection.send(b"GET /ip HTTP/1.0\r\n\r\n")
        self.assertEqual(parse_responses(connection.received())[0].status, 200)
        self.assertTrue(connection.closed)


class StatusAndMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self)
        strip = self.http.stats.service("strip", "lines")
        strip.listening.append("tcp:127.0.0.1:9000")
        strip.total, strip.current, strip.handled = 3, 1, 7
        strip.bytes_in, strip.bytes_out = 70, 56
        strip.limit_hit("max_line")

    def test_status_json(self) -> None:
        self.http.clock.advance(12.5)
        response = self.http.get("/status")
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertEqual(response.header(b"cache-control"), b"no-store")
        status = json.loads(response.body)
        self.assertEqual(status["version"], __version__)
        self.assertEqual(status["uptime_seconds"], 12.5)
        strip = status["services"]["strip"]
        self.assertEqual(strip["listening"], ["tcp:127.0.0.1:9000"])
        self.assertEqual(strip["connections"], {"current": 1, "total": 3})
        self.assertEqual(strip["lines"], 7)
        self.assertEqual(strip["bytes"], {"in": 70, "out": 56})
        self.assertEqual(strip["limits_hit"], {"max_line": 1})
        # the request being answered is counted, with its connection
        self.assertEqual(status["services"]["http"]["requests"], 1)
        self.assertEqual(status["services"]["http"]["connections"], {"current": 1, "total": 1})

    def test_metrics(self) -> None:
        response = self.http.get("/metrics")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.header(b"content-type").startswith(b"text/plain; version=0.0.4"))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.body.decode())
            for s in family.samples
        }
        strip = (("service", "strip"),)
        self.assertEqual(samples[("sockproto_connections_total", strip)], 3)
        self.assertEqual(samples[("sockproto_connections_open", strip)], 1)
        self.assertEqual(samples[("sockproto_handled_total", (("service", "strip"), ("unit", "lines")))], 7)
        self.assertEqual(samples[("sockproto_received_bytes_total", strip)], 70)
        self.assertEqual(samples[("sockproto_sent_bytes_total", strip)], 56)
        self.assertEqual(
            samples[("sockproto_limit_hits_total", (("limit", "max_line"), ("service", "strip")))], 1
        )
        self.assertEqual(
            samples[("sockproto_listening", (("address", "tcp:127.0.0.1:9000"), ("service", "strip")))], 1
        )
        self.assertEqual(samples[("sockproto_info", (("version", __version__),))], 1)
        self.assertIn(("sockproto_handled_total", (("service", "http"), ("unit", "requests"))), samples)

    def test_metrics_openmetrics_on_request(self) -> None:
        response = self.http.get(
            "/metrics", headers="Accept: application/openmetrics-text; version=1.0.0\r\n"
        )
        self.assertTrue(response.header(b"content-type").startswith(b"application/openmetrics-text"))
        self.assertTrue(response.body.endswith(b"# EOF\n"))

    def test_metrics_with_an_accept_it_cannot_read(self) -> None:
        # Regression: prometheus_client raised on version=abc: a traceback and a 500.
        with capturedLogs() as events:
            response = self.http.get(
                "/metrics", headers="Accept: application/openmetrics-text; version=abc\r\n"
            )
        self.assertEqual(response.status, 200)
        self.assertTrue(response.header(b"content-type").startswith(b"text/plain; version=0.0.4"))
        self.assertEqual(events, [])

    def test_response_classes_counted(self) -> None:
        self.http.site.doStart()
        self.addCleanup(self.http.site.doStop)
        with capturedLogs():
            self.http.get("/")
            self.http.get("/nope")
        self.assertEqual(self.http.service_stats.counters["responses_2xx"], 1)
        self.assertEqual(self.http.service_stats.counters["responses_4xx"], 1)


class AccessLogTests(SynchronousTestCase):
    def test_combined_format_to_twistd_log(self) -> None:
        harness = Harness(self)
        harness.site.doStart()
        self.addCleanup(harness.site.doStop)
        with capturedLogs() as events:
            harness.get("/ip", headers="User-Agent: tester/1.0\r\nReferer: http://x/\r\n")
        (line,) = [m for m in messages(events) if "GET /ip" in m]
        self.assertRegex(
            line,
            r'^http: "127\.0\.0\.1" - - \[[^]]+\] "GET /ip HTTP/1\.1" 200 \d+ "http://x/" "tester/1\.0"$',
        )
        self.assertEqual(events[0]["log_namespace"], "sockproto")

    def test_twistd_log_lines_within_budget_then_summed_up(self) -> None:
        harness = Harness(self, log_rate=(1.0, 3.0))
        harness.site.doStart()
        self.addCleanup(harness.site.doStop)
        with capturedLogs() as events:
            connection = harness.connect()
            for _ in range(10):
                connection.request("/")
            self.assertEqual(len([m for m in messages(events) if "GET / " in m]), 3)
            harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(
            messages(events)[-1],
            "http: 7 more requests in the last 10 s, not logged one by one (--http-log-rate)",
        )
        with capturedLogs() as events:
            connection.request("/ip")  # the bucket filled up again meanwhile
            harness.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(len(messages(events)), 1)
        self.assertIn("GET /ip", messages(events)[0])

    def test_lines_beyond_the_budget_are_not_even_formatted(self) -> None:
        harness = Harness(self, log_rate=(1.0, 2.0))
        harness.site.doStart()
        self.addCleanup(harness.site.doStop)
        formatted = []
        formatter = harness.site._logFormatter
        harness.site._logFormatter = lambda *args: formatted.append(1) or formatter(*args)
        with capturedLogs():
            connection = harness.connect()
            for _ in range(10):
                connection.request("/")
        self.assertEqual(len(formatted), 2)

    def test_rate_zero_logs_every_request(self) -> None:
        harness = Harness(self, log_rate=(0.0, 0.0))
        harness.site.doStart()
        self.addCleanup(harness.site.doStop)
        with capturedLogs() as events:
            connection = harness.connect()
            for _ in range(300):
                connection.request("/")
        self.assertEqual(len([m for m in messages(events) if "GET / " in m]), 300)
        self.assertEqual(
            (harness.site.logFile.budget.unlogged, harness.site.logFile.budget._call), ({}, None)
        )

    def test_stopping_sums_up_at_once(self) -> None:
        harness = Harness(self, log_rate=(1.0, 1.0))
        harness.site.doStart()
        with capturedLogs() as events:
            connection = harness.connect()
            connection.request("/")
            connection.request("/")
            harness.site.doStop()
        self.assertIn("http: 1 more requests", messages(events)[-1])

    def test_access_log_file(self) -> None:
        path = os.path.join(temp_dir(self), "access.log")
        harness = Harness(self, access_log=path)
        harness.site.doStart()
        with capturedLogs() as events:
            harness.get("/status/201")
        harness.site.doStop()
        with open(path) as file:
            text = file.read()
        self.assertRegex(
            text, r'^"127\.0\.0\.1" - - \[[^]]+\] "GET /status/201 HTTP/1\.1" 201 \d+ "-" "-"\n$'
        )
        self.assertEqual(messages(events), [])


class BodyCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self, max_body=100)
        self.connection = self.http.connect()

    def test_body_at_the_cap_accepted(self) -> None:
        (response,) = self.connection.request("/anything", "POST", body=b"x" * 100)
        self.assertEqual(json.loads(response.body)["body_length"], 100)

    def test_declared_length_over_cap_refused_before_body(self) -> None:
        with capturedLogs() as events:
            self.connection.send(b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(response.status, 413)
        self.assertIn(b"--http-max-body", response.body)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.http.service_stats.limits["max_body"], 1)
        self.assertEqual(
            messages(events), ["http: closing 127.0.0.1:40000: request body of 101 bytes over 100 bytes"]
        )
        # what the client still sends is dropped, never answered
        self.connection.send(b"x" * 101)
        self.assertEqual(self.connection.received(), b"")

    def test_no_continue_after_refusal(self) -> None:
        with capturedLogs():
            self.connection.send(
                b"POST /anything HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
            )
        raw = self.connection.received()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)

    def test_continue_under_cap(self) -> None:
        self.connection.send(
            b"POST /anything HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertEqual(self.connection.received(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.connection.send(b"hello")
        self.assertEqual(json.loads(parse_responses(self.connection.received())[0].body)["body"], "hello")

    def test_chunked_body_counted_as_it_arrives(self) -> None:
        self.connection.send(b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.connection.send(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(self.connection.received(), b"")
        with capturedLogs():
            self.connection.send(b"40\r\n" + b"a" * 64 + b"\r\n")
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(response.status, 413)
        self.assertTrue(self.connection.closed)
        self.connection.send(b"0\r\n\r\n")  # the end of the body does not start a request
        self.assertEqual(self.connection.received(), b"")
        self.assertEqual(self.http.service_stats.handled, 0)

    def test_zero_means_no_body(self) -> None:
        self.http = Harness(self, max_body=0)
        with capturedLogs():
            (response,) = self.http.connect().request("/anything", "POST", body=b"x")
        self.assertEqual(response.status, 413)
        self.assertEqual(self.http.get("/anything", "POST").status, 200)


class MalformedRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self)
        self.connection = self.http.connect()

    def refused(self, data: bytes) -> tuple[Response, list[str]]:
        with capturedLogs() as events:
            self.connection.send(data)
        (response,) = parse_responses(self.connection.received())
        self.assertTrue(self.connection.closed)
        return response, messages(events)

    def test_malformed_request_line(self) -> None:
        response, logged = self.refused(b"GARBAGE\r\n\r\n")
        self.assertEqual(response.status, 400)
        self.assertEqual(response.body, b"bad request: malformed HTTP\n")
        self.assertEqual(logged, ["http: closing 127.0.0.1:40000: malformed request"])
        self.assertEqual(self.http.service_stats.counters["bad_requests"], 1)
        # and the server carries on
        self.assertEqual(self.http.get("/ip").status, 200)

    def test_bad_header_and_bad_version(self) -> None:
        self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")[0].status, 400)
        self.connection = self.http.connect()
        self.assertEqual(self.refused(b"GET / HTTP/9.9\r\n\r\n")[0].status, 400)

    def test_request_line_too_long(self) -> None:
        response, logged = self.refused(b"GET /" + b"a" * 20000)
        self.assertEqual(response.status, 414)
        self.assertEqual(logged, ["http: closing 127.0.0.1:40000: request line over 16384 bytes"])
        self.assertEqual(self.http.service_stats.limits["header_size"], 1)

    def test_header_line_too_long(self) -> None:
        response, _ = self.refused(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000)
        self.assertEqual(response.status, 431)

    def test_target_not_a_path(self) -> None:
        with capturedLogs() as events:
            (response,) = self.connection.request("ftp://example.com/ip")
        self.assertEqual(response.status, 400)
        self.assertIn(b"starting with /", response.body)
        self.assertEqual(
            messages(events),
            ["http: 400 to 127.0.0.1:40000: request target ftp://example.com/ip is not a path"],
        )

    def test_absolute_form_routed_by_its_path(self) -> None:
        # Regression: RFC 9112 sec. 3.2.2 says a server must accept it; it got 400.
        self.assertEqual(
            json.loads(self.connection.request("http://localhost:8080/ip")[0].body)["origin"], "127.0.0.1"
        )
        (response,) = self.connection.request("HTTP://example.com/anything/x?q=1", "POST", body=b"hi")
        echoed = json.loads(response.body)
        self.assertEqual(
            (echoed["path"], echoed["query"], echoed["body"]), ("/anything/x", {"q": ["1"]}, "hi")
        )
        (response,) = self.connection.request("https://example.com")
        self.assertEqual((response.status, response.body), (200, http.greeting("")))
        self.assertEqual(self.connection.request("http://h?x=1")[0].status, 200)
        self.assertFalse(self.connection.closed)
        self.assertEqual(http.origin_form(b"http://h/files/a?b"), b"/files/a?b")
        for kept in (b"/ip", b"*", b"http:/ip", b"http://h\xff/ip", b"ftp://h/ip"):
            self.assertEqual(http.origin_form(kept), kept)

    def test_origin_form_target_skips_the_regex(self) -> None:
        # Regression (review): every request target went through the
        # absolute-form regex; one starting with "/" (almost all, and the
        # benchmarked /) is returned as it is.
        class Unused:
            def match(self, target: bytes) -> None:
                raise AssertionError(f"regex run on {target!r}")

        self.patch(http, "ABSOLUTE_FORM", Unused())
        for target in (b"/", b"/ip?x=1", b"//h/x"):
            self.assertEqual(http.origin_form(target), target)

    def test_folded_header_refused(self) -> None:
        # Regression: twisted.web joined a line starting with SP/HT to the
        # header before it (obs-fold); a proxy that reads it as a header of
        # its own would see another request: the smuggling shape nginx refuses.
        for fold in (b" b", b"\tb", b" Transfer-Encoding: chunked"):
            self.connection = self.http.connect()
            response, logged = self.refused(
                b"POST /anything HTTP/1.1\r\nHost: x\r\nX-A: a\r\n" + fold + b"\r\nContent-Length: 0\r\n\r\n"
            )
            self.assertEqual(response.status, 400, fold)
            self.assertIn(b"obs-fold", response.body)
            self.assertEqual(
                logged, ["http: closing 127.0.0.1:40000: header line starts with a space or tab (obs-fold)"]
            )
        self.connection = self.http.connect()
        response, logged = self.refused(b" GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a header: malformed
        self.assertEqual(logged, ["http: closing 127.0.0.1:40000: malformed request"])
        self.assertEqual(self.http.service_stats.counters["bad_requests"], 4)
        self.assertEqual(self.http.service_stats.handled, 0)

    def test_http11_needs_one_host(self) -> None:
        # Regression: an HTTP/1.1 request without Host got 200 (RFC 9112 sec. 3.2: 400).
        response, logged = self.refused(b"GET /ip HTTP/1.1\r\n\r\n")
        self.assertEqual(response.status, 400)
        self.assertIn(b"Host header", response.body)
        self.assertEqual(logged, ["http: closing 127.0.0.1:40000: no Host header"])
        self.connection = self.http.connect()
        response, logged = self.refused(b"GET /ip HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.assertEqual(response.status, 400)
        self.assertEqual(logged, ["http: closing 127.0.0.1:40000: more than one Host header"])
        self.assertEqual(self.http.service_stats.handled, 0)
        # HTTP/1.0 has no Host to require
        connection = self.http.connect()
        connection.send(b"GET /ip HTTP/1.0\r\n\r\n")
        self.assertEqual(parse_responses(connection.received())[0].status, 200)

    def test_ambiguous_framing_refused(self) -> None:
        """Request smuggling's shapes: 400 and close, and what follows is never a request."""
        heads = [
            b"Content-Length: 4\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: chunked\r\nContent-Length: 4",
            b"Content-Length: 1\r\nContent-Length: 2",
            b"Content-Length: 1, 2",
            b"Content-Length: +2",
            b"Transfer-Encoding: xchunked",
            b"Transfer-Encoding: gzip, chunked",
            b"Transfer-Encoding : chunked",
            b"X: a\x00b",
        ]
        smuggled = b"GET /status/418 HTTP/1.1\r\nHost: x\r\n\r\n"
        for head in heads:
            self.connection = self.http.connect()
            response, _ = self.refused(
                b"POST /anything HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n0\r\n\r\n" + smuggled
            )
            self.assertEqual(response.status, 400, head)
        for chunk in (b"0x2", b"+2", b"2\nab\n0\n\n"):
            self.connection = self.http.connect()
            body = chunk + b"\r\nab\r\n0\r\n\r\n" + smuggled
            response, _ = self.refused(
                b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
            )
            self.assertEqual(response.status, 400, chunk)
        self.assertEqual(self.http.service_stats.handled, 0)

    def test_target_not_printable_ascii(self) -> None:
        # Regression: twisted.web lets bytes 0x7F-0xB0 into a target, and its
        # folder redirect and listing then failed with a traceback and a 500.
        self.http = Harness(self, root=temp_dir(self), listing=True)
        os.mkdir(os.path.join(self.http.settings.root, "sub"))
        for target in (b"/files/sub?\xa0", b"/files/?\x7f", b"/ip\x80", b"/\xb0"):
            connection = self.http.connect()
            with capturedLogs() as events:
                connection.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            (response,) = parse_responses(connection.received())
            self.assertEqual(response.status, 400, target)
            self.assertIn(b"printable ASCII", response.body)
            self.assertFalse(connection.closed)
            (line,) = messages(events)
            self.assertRegex(line, r"^http: 400 to 127\.0\.0\.1:40000: request target /\S*\\x[78ab]")
            self.assertTrue(line.endswith(" is not printable ASCII"), line)


class LingerTests(SynchronousTestCase):
    """After a refusal the server closes its write side and reads on for a bounded
    time and byte count: closing at once with unread data makes the kernel reset
    the connection, and a client still uploading loses the answer."""

    def setUp(self) -> None:
        self.http = Harness(self, max_body=100, linger_time=5.0, linger_bytes=1000)
        self.connection = self.http.connect()

    def refuse(self) -> None:
        with capturedLogs():
            self.connection.send(b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.connection.send(b"80\r\n" + b"a" * 128 + b"\r\n" + b"80\r\n" + b"a" * 50)
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(response.status, 413)

    def open(self) -> bool:
        return not self.connection.transport.disconnecting

    def test_reads_and_drops_until_the_time_bound(self) -> None:
        self.refuse()
        self.assertTrue(self.connection.transport.write_closed)  # the answer, then FIN
        for _ in range(4):
            self.connection.send(b"a" * 150 + b"\r\n0\r\n\r\nGET /ip HTTP/1.1\r\nHost: x\r\n\r\n")
            self.http.clock.advance(1.0)
        self.assertEqual(self.connection.received(), b"")  # nothing more is answered
        self.assertTrue(self.open())
        self.http.clock.advance(1.0)
        self.assertFalse(self.open())
        self.assertEqual(self.http.service_stats.handled, 0)

    def test_closes_past_the_byte_bound(self) -> None:
        self.refuse()
        self.connection.send(b"x" * 1000)
        self.assertTrue(self.open())
        self.connection.send(b"x")
        self.assertFalse(self.open())

    def test_closes_when_the_client_does(self) -> None:
        self.refuse()
        self.connection.end()
        self.assertFalse(self.open())
        self.connection.lose()
        self.assertEqual(self.http.clock.getDelayedCalls(), [])  # no timer outlives it

    def test_every_refusal_lingers(self) -> None:
        with capturedLogs():
            self.connection.send(b"GARBAGE\r\n\r\nmore")
        self.assertTrue(self.connection.transport.write_closed)
        self.assertTrue(self.open())
        self.http.clock.advance(5.0)
        self.assertFalse(self.open())

    def test_zero_closes_at_once(self) -> None:
        self.http = Harness(self, max_body=100, linger_time=0.0)
        self.connection = self.http.connect()
        self.refuse()
        self.assertFalse(self.open())


class TimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Harness(self, idle_timeout=10.0)
        self.connection = self.http.connect()

    def test_idle_connection_closed(self) -> None:
        self.http.clock.advance(9.9)
        self.assertFalse(self.connection.closed)
        with capturedLogs() as events:
            self.http.clock.advance(0.2)
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.connection.received(), b"")
        self.assertEqual(messages(events), ["http: closing 127.0.0.1:40000: idle for 10 s"])
        self.assertEqual(self.http.service_stats.limits["idle_timeout"], 1)

    def test_idle_time_counts_from_last_response(self) -> None:
        self.http.clock.advance(8)
        self.connection.request("/ip")
        self.http.clock.advance(8)
        self.assertFalse(self.connection.closed)
        self.http.clock.advance(2.1)
        self.assertTrue(self.connection.closed)

    def test_dripped_request_head_cannot_pin(self) -> None:
        self.connection.send(b"GET / HTTP/1.1\r\n")
        for _ in range(4):
            self.http.clock.advance(2)
            self.connection.send(b"X-Slow: 1\r\n")
        with capturedLogs() as events:
            self.http.clock.advance(2.1)
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(response.status, 408)
        self.assertTrue(self.connection.closed)
        self.assertEqual(messages(events), ["http: closing 127.0.0.1:40000: request incomplete after 10 s"])
        self.assertEqual(self.http.service_stats.limits["request_timeout"], 1)

    def test_dripped_body_cannot_pin(self) -> None:
        self.connection.send(b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):
            self.http.clock.advance(2)
            self.connection.send(b"x")
        with capturedLogs():
            self.http.clock.advance(2.1)
        self.assertEqual(parse_responses(self.connection.received())[0].status, 408)

    def test_request_deadline_restarts_for_each_request(self) -> None:
        for _ in range(3):
            self.connection.send(b"GET /ip HTTP/1.1\r\n")
            self.http.clock.advance(6)
            self.connection.send(b"Host: x\r\n\r\n")
            self.assertEqual(parse_responses(self.connection.received())[0].status, 200)
        self.assertFalse(self.connection.closed)

    def test_slow_answer_is_not_idle(self) -> None:
        self.connection.send(b"GET /delay/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.http.clock.advance(9.99)
        self.assertEqual(self.connection.received(), b"")
        self.http.clock.advance(0.02)
        (response,) = parse_responses(self.connection.received())
        self.assertEqual(json.loads(response.body)["path"], "/delay/10")
        self.assertFalse(self.connection.closed)

    def test_delay_cancelled_when_client_leaves(self) -> None:
        self.connection.send(b"GET /delay/5 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.connection.lose()
        self.http.clock.advance(6)
        self.assertEqual(self.connection.received(), b"")
        self.assertEqual(self.http.clock.getDelayedCalls(), [])

    def test_client_that_stops_reading_is_dropped(self) -> None:
        self.connection.send(b"GET /delay/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        channel = self.connection.transport.producer
        channel.pauseProducing()  # what the transport does when its buffer is full
        self.http.clock.advance(9)
        channel.resumeProducing()  # it read some: the clock starts again
        channel.pauseProducing()
        self.http.clock.advance(9.9)
        self.assertFalse(self.connection.transport.disconnected)
        with capturedLogs() as events:
            self.http.clock.advance(0.2)
        self.assertTrue(self.connection.transport.disconnected)
        self.assertEqual(messages(events), ["http: closing 127.0.0.1:40000: read nothing for 10 s"])
        self.assertEqual(self.http.service_stats.limits["send_timeout"], 1)

    def test_refused_connection_is_not_timed_out_too(self) -> None:
        # Regression: a refused connection whose peer had not read the answer
        # yet also got "request incomplete": a false log line and count.
        with capturedLogs() as events:
            self.connection.send(b"GARBAGE\r\n\r\n")
            self.http.clock.advance(11)
        self.assertEqual(messages(events), ["http: closing 127.0.0.1:40000: malformed request"])
        self.assertEqual(self.http.service_stats.limits["request_timeout"], 0)

    def test_zero_means_never(self) -> None:
        self.http = Harness(self, idle_timeout=0.0)
        self.connection = self.http.connect()
        self.connection.send(b"GET / HTTP/1.1\r\n")
        self.connection.transport.producer.pauseProducing()
        self.http.clock.advance(10**6)
        self.assertFalse(self.connection.closed)
        self.assertEqual(self.http.clock.getDelayedCalls(), [])


class ConnectionCapTests(SynchronousTestCase):
    def test_overflow_gets_503(self) -> None:
        harness = Harness(self, max_clients=1)
        first = harness.connect()
        with capturedLogs():
            second = harness.connect()
        (response,) = parse_responses(second.received())
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(second.closed)
        self.assertEqual(first.request("/ip")[0].status, 200)

    def test_stopping_closes_connections(self) -> None:
        harness = Harness(self)
        connection = harness.connect()
        harness.factory.server_stopping()
        self.assertTrue(connection.closed)


class GracefulStopTests(SynchronousTestCase):
    """At a stop, a response under way is finished; the connection then
    closes. (A download under way at a stop: see test_graceful_stop.)"""

    def setUp(self) -> None:
        self.http = Harness(self)

    def test_a_delayed_answer_is_sent_then_the_connection_closes(self) -> None:
        connection, idle = self.http.connect(), self.http.connect()
        connection.send(b"GET /delay/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /ip HTTP/1.1\r\nHost: x\r\n\r\n")
        with capturedLogs():
            stopped = self.http.factory.server_stopping(grace=10)
        self.assertTrue(idle.closed)
        self.assertFalse(connection.closed)
        self.http.clock.advance(2)
        (response,) = parse_responses(connection.received())  # the pipelined /ip is not answered
        self.assertEqual(json.loads(response.body)["path"], "/delay/2")
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(connection.closed)
        idle.lose()
        connection.lose()
        self.assertTrue(stopped.called)

    def test_a_request_still_arriving_is_not_waited_for(self) -> None:
        connection = self.http.connect()
        connection.send(b"GET /ip HTTP/1.1\r\nHo")
        self.http.factory.server_stopping()
        self.assertTrue(connection.closed)
        self.assertEqual(connection.received(), b"")

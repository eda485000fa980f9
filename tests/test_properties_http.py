"""Properties of the HTTP responder under arbitrary byte streams cut anywhere.

The real site, channel and guard run over a StringTransport with a Clock (see
:class:`tests.test_http.Harness`); static files and ``/bytes`` are pumped on
the Clock too. Two sources of input: pipelines of well-formed requests of
every kind (methods, targets, headers, bodies by length or chunked), and the
same pipelines mangled byte by byte, or plain random bytes. Whatever arrives:

- nothing raises out of the protocol and nothing is logged as a failure;
- what comes back is a sequence of well-formed responses, one per request the
  site processed, in order, each framed by Content-Length, chunking, or the
  close of the connection; at most one more, a refusal, just before a close;
- the bytes held for a connection stay bounded (header buffer, pipelined
  data, request body under ``max_body``), and no timer outlives it;
- at the idle timeout every connection is answered or closed: nothing pins.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import http
from tests.support import cut, temp_dir
from tests.test_http import Harness

IDLE_TIMEOUT = 10.0
PIPELINE_PAUSE = 0x4000  # twisted.web's _optimisticEagerReadSize
CRLF = b"\r\n"

# -- what clients send ---------------------------------------------------------------

METHODS = [b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"get", b"X-Y"]
FIXED_TARGETS = [
    b"/", b"/ip", b"/headers", b"/status", b"/metrics", b"/anything", b"/anything/a/b?x=1&y",
    b"/status/200", b"/status/204", b"/status/304", b"/status/418", b"/status/99", b"/status/x",
    b"/delay/0", b"/delay/1.5", b"/delay/11", b"/delay", b"/bytes/0", b"/bytes/1", b"/bytes/70000",
    b"/bytes/x", b"/nope", b"*", b"http://example.com/ip", b"/files", b"/files/", b"/files/a.txt",
    b"/files/sub", b"/files/sub/", b"/files/sub/b.txt", b"/files/../secret", b"/files/%2e%2e/x",
    b"/files/.hidden", b"/files/a.txt/x", b"/files//etc/passwd", b"/files/sub?q=%ff", b"/ip/more",
    b"/files/big.bin", b"/files/big.bin", b"/files/big.bin", b"/metrics", b"/metrics",
]  # fmt: skip
visible = st.binary(min_size=1, max_size=8).map(lambda b: bytes(0x21 + c % 94 for c in b))
percent = st.integers(0, 255).map(lambda n: b"%%%02X" % n)
segment = st.lists(st.one_of(visible, percent), max_size=3).map(b"".join)
targets = st.one_of(
    st.sampled_from(FIXED_TARGETS),
    st.tuples(st.sampled_from([b"/files", b"/anything", b"/status", b"/bytes", b""]), st.lists(segment)).map(
        lambda t: t[0] + b"".join(b"/" + s for s in t[1]) or b"/"
    ),
)
HEADERS = [
    b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue", b"Range: bytes=0-2",
    b"Range: bytes=1-1,3-", b"Range: bytes=\xff", b"Range: chars=1-2",
    b"Accept: application/openmetrics-text",
    b"If-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT", b"User-Agent: \x1b[31mred", b"Cookie: a=b; c",
    b"Authorization: Basic !!!", b"Content-Type: multipart/form-data; boundary=x", b"X-Empty:",
]  # fmt: skip
header_values = st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in b"\r\n"))
BIG = 70_003  # bytes in files/big.bin: more than one producer buffer (and no /bytes/N size)
offsets = st.one_of(st.integers(0, BIG + 10), st.integers(65_000, 66_000))  # around a buffer's end
range_specs = st.one_of(
    st.tuples(offsets, offsets).map(lambda t: b"%d-%d" % (min(t), max(t))),
    offsets.map(lambda n: b"%d-" % n),
    offsets.map(lambda n: b"-%d" % n),
)
ranges = st.lists(range_specs, min_size=1, max_size=5).map(lambda r: b"Range: bytes=" + b",".join(r))
accepts = header_values.map(lambda v: b"Accept: application/openmetrics-text; version=" + v)
headers = st.lists(
    st.one_of(st.sampled_from(HEADERS), ranges, accepts, header_values.map(lambda v: b"X-Fuzz: " + v)),
    max_size=4,
)


@st.composite
def requests(draw: Any, targets: Any = targets, headers: Any = headers) -> bytes:
    """One well-formed request: any method, target, headers, body framing."""
    method = draw(st.sampled_from(METHODS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"]))
    lines = [b"%s %s %s" % (method, draw(targets), version), b"Host: x", *draw(headers)]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 100), max_size=5))
        chunks, rest = [], body
        for size in sizes:
            if rest:
                chunks.append(b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size]))
                rest = rest[size:]
        if rest:
            chunks.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        body = b"".join(chunks) + b"0\r\n\r\n"
    else:
        body = b""
    return CRLF.join(lines) + CRLF + CRLF + body


range_requests = requests(st.sampled_from([b"/files/big.bin", b"/files/a.txt"]), st.tuples(ranges).map(list))
pipelines = st.lists(st.one_of(requests(), range_requests), min_size=1, max_size=4).map(b"".join)


@st.composite
def mangled(draw: Any) -> bytes:
    """A pipeline with bytes replaced, dropped and inserted; or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(min_size=1, max_size=400))
    data = bytearray(draw(pipelines))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "drop", "insert"]))
        if kind == "replace" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif kind == "drop":
            del data[where : where + draw(st.integers(1, 20))]
        else:
            data[where:where] = draw(st.sampled_from([b"\r\n", b"\n", b" ", b"\0", b":", b"\xff", b"0\r\n"]))
    return bytes(data)


# -- what must come back --------------------------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\x20-\x7e]*\Z")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([\t\x20-\x7e\x80-\xff]*)\Z")
CHUNK_SIZE = re.compile(rb"[0-9a-f]+\Z")


class MalformedError(AssertionError):
    pass


def check(condition: Any, why: str, data: bytes = b"") -> None:
    if not condition:
        raise MalformedError(f"{why}: {data[:300]!r}")


def parse_stream(
    data: bytes, methods: list[bytes], closed: bool
) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """Checks the framing of every response in ``data``; returns (status, headers, body) of each final one.

    ``methods`` are those of the requests the site processed, in order; a final
    response beyond them must be a refusal that closes the connection.
    """
    pending = list(methods)
    answered = []
    while data:
        head, separator, data = data.partition(CRLF + CRLF)
        check(separator, "response head not terminated", head)
        status_line, *header_lines = head.split(CRLF)
        match = STATUS_LINE.match(status_line)
        check(match, "bad status line", status_line)
        code = int(match[1])  # type: ignore[index]
        fields: dict[bytes, list[bytes]] = {}
        for line in header_lines:
            field = HEADER_LINE.match(line)
            check(field, "bad header line", line)
            fields.setdefault(field[1].lower(), []).append(field[2])  # type: ignore[index]
        if code < 200:
            check(code == 100 and not fields, "only a bare 100 Continue is interim", head)
            continue
        method = pending.pop(0) if pending else None
        if method is None:
            check(closed and fields.get(b"connection") == [b"close"], "a response to no request", head)
        lengths = fields.get(b"content-length", [])
        chunked = fields.get(b"transfer-encoding") == [b"chunked"]
        check(len(lengths) <= 1 and not (lengths and chunked), "ambiguous framing", head)
        check(all(re.fullmatch(rb"[0-9]+", n) for n in lengths), "bad Content-Length", head)
        if code in (204, 304) or method == b"HEAD":
            check(code != 204 or not lengths, "204 with a Content-Length", head)
            body = b""
        elif chunked:
            body = b""
            while True:
                size_line, separator, data = data.partition(CRLF)
                check(separator and CHUNK_SIZE.match(size_line), "bad chunk size", size_line)
                size = int(size_line, 16)
                check(data[size : size + 2] == CRLF, "chunk not terminated", data[: size + 2])
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        elif lengths:
            size = int(lengths[0])
            check(len(data) >= size, "body shorter than its Content-Length", data)
            body, data = data[:size], data[size:]
        else:
            check(closed, "a body without length on an open connection", head)
            body, data = data, b""
        answered.append((code, fields, body))
    check(not pending, f"{len(pending)} processed requests got no response")
    return answered


class Run:
    """One connection: delivers chunks as a reactor would, watching what it holds."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.connection = harness.connect()
        self.channel = self.connection.protocol.wrappedProtocol
        self.channel.processed = []  # methods, as the site processes them

    def deliver(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self.connection.closed:
                return  # a closed connection is read no more
            while self.connection.transport.producerState == "paused":
                # twisted.web stopped reading until a response is out: the
                # reactor would deliver nothing until then.
                if not self.advance(0.5):
                    return
            self.connection.send(chunk)
            self.check_held(len(chunk))

    def advance(self, seconds: float) -> bool:
        """Let time pass; False once the idle timeout has passed too."""
        if self.harness.clock.seconds() > IDLE_TIMEOUT * 2:
            return False
        self.harness.clock.advance(seconds)  # runs the producer steps that come due too
        return True

    def check_held(self, chunk: int) -> None:
        channel = self.channel
        held = len(channel._buffer)
        assert held <= channel.MAX_LENGTH + 2 + chunk, f"header buffer {held}"
        pipelined = sum(map(len, channel._dataBuffer))
        assert pipelined <= PIPELINE_PAUSE + chunk, f"pipelined data {pipelined}"
        assert len(channel.requests) <= 1, f"{len(channel.requests)} requests at once"
        for request in channel.requests:
            if request.content is not None and not request.content.closed:
                size = request.content.tell()
                limit = self.harness.settings.max_body
                assert size <= limit, f"body of {size} bytes held, max_body {limit}"


class RecordingRequest(http.ResponderRequest):
    def process(self) -> None:
        self.channel.processed.append(self.method)
        super().process()


class HttpPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = temp_dir(self)
        os.makedirs(os.path.join(root, "sub"))
        self.files = {
            "a.txt": b"hello\n",
            "sub/b.txt": b"bee\n",
            ".hidden": b"no\n",
            "big.bin": os.urandom(BIG),
        }
        for name, content in self.files.items():
            with open(os.path.join(root, name), "wb") as file:
                file.write(content)
        self.root = root

    def harness(self, max_body: int, listing: bool) -> Harness:
        harness = Harness(self, root=self.root, listing=listing, max_body=max_body, idle_timeout=IDLE_TIMEOUT)
        harness.site.requestFactory = RecordingRequest
        harness.site.doStart()  # the access log: every request is logged too
        self.addCleanup(harness.site.doStop)
        return harness

    def exercise(self, chunks: list[bytes], max_body: int, listing: bool) -> None:
        harness = self.harness(max_body, listing)
        run = Run(harness)
        with capturedLogs() as events:
            run.deliver(chunks)
            while run.advance(0.5) and not run.connection.closed:
                pass
            output = run.connection.received()
            closed = run.connection.closed
            try:
                answered = parse_stream(output, run.channel.processed, closed)
            finally:
                run.connection.lose()
        # Nothing pins a connection: it was closed by the idle timeout at the latest.
        self.assertTrue(closed, "still open after the idle timeout")
        timers = [c for c in harness.clock.getDelayedCalls() if c.func != harness.site._updateLogDateTime]
        self.assertEqual(timers, [], "timers left behind")
        self.assertEqual(harness.service_stats.current, 0)
        for code, fields, body in answered:
            event(f"answered {code}")
            self.assertLess(code, 500, body)
            self.check_content(code, fields, body)
        for logged in events:
            text = formatEvent(logged)
            self.assertNotIn("log_failure", logged, text)
            self.assertLess(logged["log_level"], LogLevel.warn, text)
            self.assertTrue(text.isprintable(), text)

    def check_content(self, code: int, fields: dict[bytes, list[bytes]], body: bytes) -> None:
        """A part of big.bin is that part of it, whole or one range."""
        big = self.files["big.bin"]
        if code == 200 and len(body) == BIG:
            self.assertEqual(body, big)
        (content_range,) = fields.get(b"content-range", [b""])
        match = re.fullmatch(rb"bytes (\d+)-(\d+)/%d" % BIG, content_range)
        if code == 206 and match and body:
            self.assertEqual(body, big[int(match[1]) : int(match[2]) + 1])
        if code == 206 and b"multipart/byteranges" in b"".join(fields.get(b"content-type", [])):
            self.assertTrue(body.endswith(b"--\r\n"), body[-50:])

    @given(pipelines, st.integers(0, 400), st.booleans(), st.data())
    def test_well_formed_pipelines(self, stream: bytes, max_body: int, listing: bool, data: Any) -> None:
        self.exercise(data.draw(cut(stream, 10)), max_body, listing)

    @given(mangled(), st.integers(0, 400), st.data())
    def test_mangled_streams(self, stream: bytes, max_body: int, data: Any) -> None:
        self.exercise(data.draw(cut(stream, 10)), max_body, True)

    def test_every_request_of_a_pipeline_answered_in_order(self) -> None:
        """The harness itself: a plain pipeline gives what parse_stream expects."""
        harness = self.harness(1000, False)
        run = Run(harness)
        run.deliver([b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n" * 2])
        answered = parse_stream(run.connection.received(), run.channel.processed, False)
        self.assertEqual([code for code, _, _ in answered], [201, 200, 201, 200])
        self.assertEqual(run.channel.processed, [b"GET", b"HEAD"] * 2)
        run.connection.lose()

    def test_parser_rejects_bad_framing(self) -> None:
        for data in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\n\r\nbody",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ):
            self.assertRaises(MalformedError, parse_stream, data, [b"GET"], False)

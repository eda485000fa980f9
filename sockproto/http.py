"""The mini HTTP responder: a small, safe twisted.web site for testing HTTP clients and
watching the suite.

Routes: ``/`` (a fixed message), ``/files/`` (static files, see :mod:`sockproto.http_files`),
``/status`` and ``/metrics`` (the suite's counters as JSON and in the Prometheus
format), and an httpbin-like set: ``/anything``, ``/status/CODE``, ``/delay/S``,
``/bytes/N``, ``/headers``, ``/ip``.

twisted.web does the HTTP; this module adds the limits it lacks:

- a deadline per request: twisted.web restarts its idle timer on every byte, so
  a request dripped a byte a minute would hold a connection for days;
- a send timeout: twisted.web stops its timer while a response is under way, so
  a client that never reads would hold its connection for ever;
- a body cap enforced while the body arrives (twisted.web buffers the whole
  body before a resource sees it);
- one log line for each client mistake (twisted.web answers them silently);
- a response's producer is paused once however often the transport asks
  (see :class:`PausedOnce`): twisted.web would leave a pipelined response
  that starts while the send buffer is full paused for ever;
- a client that half-closes after its requests (ncat, ``nc -N``) gets its
  answers: twisted.web would drop every one not yet written;
- a body made from the client's input (``/anything``) is made a chunk at a
  time as the client reads it (:class:`EchoBody`), like every other large body;
- a refusal (413, 400, ...) is followed by a lingering close, as nginx's:
  twisted.web closes at once, and the kernel's reset over the unread upload
  loses the answer;
- RFC 9112's rules twisted.web lacks: a folded header line (obs-fold) and an
  HTTP/1.1 request without one Host get 400, an absolute-form target is
  answered by its path.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from io import BytesIO
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, INegotiated, IPushProducer, ITCPTransport
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.logfile import LogFile
from twisted.web import http, resource, server
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from sockproto import __version__
from sockproto.config import HttpSettings, Settings
from sockproto.http_files import FILES_OFF, NOT_FOUND, PlainPage, PulledBody, SafeFile, method_not_allowed
from sockproto.limits import ConnectionPolicy, LogBudget, TokenBucket, peer_of, rate_limit
from sockproto.listening import Listener, StartupError, stream_listener
from sockproto.stats import ServiceStats, Stats
from sockproto.text import loggable

log = Logger(namespace="sockproto")

MAX_DELAY = 10.0
MAX_BYTES = 10 * 1024 * 1024
CHUNK = 64 * 1024
# The access log file rotates (twisted.python.logfile) so it cannot fill a disk.
ACCESS_LOG_ROTATE = 10 * 1000 * 1000
ACCESS_LOG_KEEP = 9
ROUTES = "/ /files/ /status /metrics /anything /status/CODE /delay/SECONDS /bytes/N /headers /ip"
ANY_METHOD = None


def greeting(message: str) -> bytes:
    """The body of ``GET /``: the configured message, or one naming us, ending in a newline."""
    text = message or f"Hello from sockproto {__version__}, the mini HTTP responder."
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def plain_response(code: int, text: str) -> bytes:
    """A whole ``Connection: close`` response, for answers given outside a Request."""
    body = text.encode("utf-8")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (code, http.RESPONSES.get(code, b"Error")),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n",
            body,
        ]
    )


OVERFLOW = plain_response(503, "too many connections, try again later\n")


def decoded(data: bytes) -> str:
    """UTF-8 where it is, else Latin-1 (what HTTP says header bytes are): never lossy."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_status_code(segment: bytes) -> int | None:
    """``b"418"`` -> 418; None unless a final status (200-599)."""
    if re.fullmatch(rb"[2-5]\d\d", segment):
        return int(segment)
    return None


def parse_delay(segment: bytes) -> float | None:
    """``b"1.5"`` -> 1.5; None unless a number of seconds from 0 to :data:`MAX_DELAY`."""
    if re.fullmatch(rb"\d{1,6}(\.\d{1,6})?", segment) and float(segment) <= MAX_DELAY:
        return float(segment)
    return None


def parse_size(segment: bytes) -> int | None:
    """``b"1024"`` -> 1024; None unless a whole number from 0 to :data:`MAX_BYTES`."""
    if re.fullmatch(rb"\d{1,9}", segment) and int(segment) <= MAX_BYTES:
        return int(segment)
    return None


# An absolute-form target's scheme and authority (RFC 9112 sec. 3.2.2): what follows
# is the path and query the request is routed by.
ABSOLUTE_FORM = re.compile(rb"(?i)https?://[!-~]*?(?=[/?]|$)")


def origin_form(target: bytes) -> bytes:
    """``http://host:8080/get?a=1`` -> ``/get?a=1``; any other target unchanged.

    RFC 9112 says a server must accept the absolute form (what a client talking to a
    proxy sends); the authority adds nothing here, which answers for one site only.
    """
    if target[:1] == b"/":  # almost every target: no regex on the hot path
        return target
    match = ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith(b"/") else b"/" + rest


def target_problem(uri: bytes) -> str | None:
    """Why a request target cannot be answered (the end of a log line), or None.

    RFC 9112 makes a target visible ASCII. twisted.web means to check that but
    lets bytes 0x7F-0xB0 through (it compares with 176 where octal 0176 was
    meant), and several of its own code paths (the folder redirect, the
    listing page, ``repr(request)``) then fail on them with a traceback.
    """
    if not uri.isascii() or b"\x7f" in uri:
        return "is not printable ASCII"
    if not uri.startswith(b"/") and uri.partition(b"?")[0] != b"*":
        return "is not a path"
    return None


BAD_TARGET = {
    "is not printable ASCII": "bad request: the request target must be printable ASCII (others as %XX)\n",
    "is not a path": "bad request: the request target must be a path starting with / (or http://HOST/PATH)\n",
}


def headers_of(request: Any) -> dict[str, str]:
    """Request headers by name; a repeated header's values joined with ``, ``."""
    return {
        decoded(name): ", ".join(decoded(value) for value in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def query_of(uri: bytes) -> dict[str, list[str]]:
    _, _, query = uri.partition(b"?")
    return parse_qs(query.decode("latin-1"), keep_blank_values=True, errors="replace")


def origin_of(request: Any) -> str:
    """The client's address (the peer of the connection; no header is trusted)."""
    address = request.getClientAddress()
    return getattr(address, "host", None) or "local"


def echo(request: Any) -> dict[str, Any]:
    """The request as ``/anything`` shows it, but for the body itself (see :class:`EchoBody`)."""
    content = request.content
    content.seek(0, os.SEEK_END)
    return {
        "method": decoded(request.method),
        "path": decoded(request.path),
        "query": query_of(request.uri),
        "headers": headers_of(request),
        "origin": origin_of(request),
        "body_length": content.tell(),
    }


# Body bytes read at a pull for /anything: JSON escapes make at most six bytes
# of one (\u00XX), so a pull writes at most 48 KiB.
ECHO_READ = 8 * 1024


def _body_chunks(content: Any, size: int) -> Iterator[bytes]:
    content.seek(0)
    while chunk := content.read(size):
        yield chunk


def _json_text(content: Any) -> Iterator[bytes]:
    """The body as the inside of a JSON string, a chunk at a time; raises
    UnicodeDecodeError (before the end, perhaps) if it is not UTF-8.

    JSON escapes one character at a time, so the pieces add up to what
    ``json.dumps`` makes of the whole text."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    for chunk in _body_chunks(content, ECHO_READ):
        text = decoder.decode(chunk)
        if text:
            yield encode_basestring_ascii(text)[1:-1].encode("ascii")
    decoder.decode(b"", final=True)


def _json_base64(content: Any) -> Iterator[bytes]:
    """The body in base64, a chunk at a time: whole groups of 3 bytes encode
    on their own."""
    rest = b""
    for chunk in _body_chunks(content, ECHO_READ):
        data = rest + chunk
        whole = len(data) - len(data) % 3
        rest = data[whole:]
        if whole:
            yield base64.b64encode(data[:whole])
    if rest:
        yield base64.b64encode(rest)


class EchoBody(PulledBody):
    """The JSON of ``/anything`` (and ``/delay``), made a bounded chunk at a
    pull from the body twisted.web kept (a file above 100 KB): a client that
    sends 1 MiB and never reads holds one chunk and the transport's buffer,
    not the 6 MiB of JSON that body can make. The bytes are those of
    ``json.dumps(..., indent=2)``; the length is worked out first (a pass over
    the body), as Content-Length needs it."""

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        shown = echo(request)
        content = request.content
        try:
            size = sum(map(len, _json_text(content)))
            self._pieces: Callable[[Any], Iterator[bytes]] = _json_text
            shown["body"] = ""
        except UnicodeDecodeError:
            size = (shown["body_length"] + 2) // 3 * 4
            self._pieces = _json_base64
            shown["body"] = None
            shown["body_base64"] = ""
        # The text field is last and empty: the document ends '""\n}'; its
        # text goes between the quotes.
        document = json.dumps(shown, indent=2)
        self.head = document[:-3].encode("ascii")
        self.tail = document[-3:].encode("ascii") + b"\n"
        self.length = len(self.head) + size + len(self.tail)
        self._body: Iterator[bytes] | None = None

    def start(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % self.length)
        if request.method == b"HEAD":
            request.write(b"")
            request.finish()
            return
        super().start()

    def produce(self, request: Any) -> None:
        if self._body is None:
            self._body = self._pieces(request.content)
            request.write(self.head)
            return
        piece = next(self._body, None)
        if piece is None:
            self.end(request, self.tail)
        else:
            request.write(piece)


def metrics_encoder(accept: str) -> tuple[Callable[[Any], bytes], str]:
    """prometheus_client's encoder for an ``Accept`` header, or its default text
    format when the header makes it fail (``version=abc`` raised TypeError)."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")


def as_json(request: Any, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=2).encode("ascii") + b"\n"


# -- routes -------------------------------------------------------------------------


class Route(resource.Resource):
    """Answers ``methods`` with what :meth:`respond` returns; HEAD gets the headers only.

    twisted.web would answer HEAD by rendering GET and logging a warning each
    time; a wrong method gets its HTML page. Here both are plain.
    """

    isLeaf = True
    methods: tuple[bytes, ...] | None = (b"GET", b"HEAD")
    takes_subpath = False  # does /route/more/segments mean this route?

    def render(self, request: Any) -> Any:
        if request.postpath and self.isLeaf and not self.takes_subpath:
            return NOT_FOUND.render(request)
        if self.methods is not ANY_METHOD and request.method not in self.methods:
            return method_not_allowed(self.methods).render(request)
        body = self.respond(request)
        if body is server.NOT_DONE_YET:
            return body
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def respond(self, request: Any) -> Any:
        raise NotImplementedError


class Greeting(Route):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.body = greeting(message)

    def respond(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.body


class Status(Route):
    """``/status``: the suite's counters as JSON; ``/status/CODE`` answers with CODE."""

    isLeaf = False

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self.stats = stats

    def respond(self, request: Any) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        return as_json(request, self.stats.snapshot())

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        code = parse_status_code(path)
        if code is None:
            return PlainPage(400, "bad request: /status/CODE takes a status from 200 to 599\n")
        return StatusCode(code)


# The redirects httpbin's /status/CODE sends with a Location (and where to).
REDIRECT_CODES = frozenset({301, 302, 303, 305, 307})
REDIRECT_LOCATION = b"/redirect/1"


class StatusCode(Route):
    """``/status/CODE``: CODE with its reason as the body; a redirect names a
    Location, as httpbin's does, so a client's redirect handling gets one."""

    methods = ANY_METHOD

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def respond(self, request: Any) -> Any:
        request.setResponseCode(self.code)
        if self.code in REDIRECT_CODES:
            request.setHeader(b"location", REDIRECT_LOCATION)
        if self.code in http.NO_BODY_CODES:
            # Finished here: twisted.web's render would add Content-Length: 0,
            # which a 204 must not carry.
            request.write(b"")
            request.finish()
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"%d %s\n" % (self.code, request.code_message)


class Metrics(Route):
    """``/metrics`` in the Prometheus text format (or OpenMetrics, if the scraper asks).

    Rendering runs in the reactor thread, like every other route, so it reads
    the counters between two events and never sees one half updated.
    """

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(stats))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def respond(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept") or b""
        encode, content_type = metrics_encoder(accept.decode("latin-1"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encode(self.registry)


class Anything(Route):
    """``/anything[/...]``: any method; the request comes back as JSON."""

    methods = ANY_METHOD
    takes_subpath = True

    def respond(self, request: Any) -> Any:
        EchoBody(request).start()
        return server.NOT_DONE_YET


class Headers(Route):
    def respond(self, request: Any) -> bytes:
        return as_json(request, {"headers": headers_of(request)})


class Ip(Route):
    def respond(self, request: Any) -> bytes:
        return as_json(request, {"origin": origin_of(request)})


class WithParameter(resource.Resource):
    """``/NAME/VALUE``: ``parse`` checks VALUE, ``make`` builds the route that answers."""

    def __init__(self, usage: str, parse: Callable[[bytes], Any], make: Callable[[Any], resource.Resource]):
        super().__init__()
        self.usage = usage
        self.parse = parse
        self.make = make

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        value = self.parse(path)
        if value is None:
            return PlainPage(400, f"bad request: {self.usage}\n")
        return self.make(value)

    def render(self, request: Any) -> bytes:
        return PlainPage(404, f"not found; use {self.usage}\n").render(request)


class Delay(Route):
    """Answers like ``/anything`` after ``seconds``, without blocking the reactor."""

    methods = ANY_METHOD

    def __init__(self, seconds: float, clock: Any) -> None:
        super().__init__()
        self.seconds = seconds
        self.clock = clock

    def respond(self, request: Any) -> Any:
        waiting = deferLater(self.clock, self.seconds, self.answer, request)
        waiting.addErrback(lambda failure: failure.trap(CancelledError))
        # A client that leaves early cancels the timer: nothing is written to it.
        request.notifyFinish().addErrback(lambda _: waiting.cancel())
        return server.NOT_DONE_YET

    def answer(self, request: Any) -> None:
        EchoBody(request).start()


class RandomBytes(Route):
    """``/bytes/N``: N random bytes, made as the client reads them, never all in memory."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def respond(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % self.size)
            request.write(b"")
            request.finish()
            return server.NOT_DONE_YET
        request.setHeader(b"content-length", b"%d" % self.size)
        RandomBytesProducer(request, self.size).start()
        return server.NOT_DONE_YET


class RandomBytesProducer(PulledBody):
    """``size`` random bytes, a chunk at a pull (as static.File sends a file)."""

    def __init__(self, request: Any, size: int, chunk: int = CHUNK) -> None:
        super().__init__(request)
        self.remaining = size
        self.chunk = chunk

    def produce(self, request: Any) -> None:
        if self.remaining:
            size = min(self.chunk, self.remaining)
            self.remaining -= size
            request.write(os.urandom(size))
        else:
            self.end(request)


class Root(resource.Resource):
    """Unknown paths get a 404 that lists the routes."""

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return PlainPage(404, f"not found; routes: {ROUTES}\n")


def make_root(settings: HttpSettings, stats: Stats, clock: Any) -> Root:
    root = Root()
    root.putChild(b"", Greeting(settings.message))
    files = SafeFile.serving(settings.root, settings.listing) if settings.root else FILES_OFF
    root.putChild(b"files", files)
    root.putChild(b"status", Status(stats))
    root.putChild(b"metrics", Metrics(stats))
    root.putChild(b"anything", Anything())
    root.putChild(b"headers", Headers())
    root.putChild(b"ip", Ip())
    root.putChild(
        b"delay",
        WithParameter(
            f"/delay/SECONDS, from 0 to {MAX_DELAY:g}", parse_delay, lambda seconds: Delay(seconds, clock)
        ),
    )
    root.putChild(b"bytes", WithParameter(f"/bytes/N, N from 0 to {MAX_BYTES}", parse_size, RandomBytes))
    return root


# -- /metrics -----------------------------------------------------------------------


class StatsCollector(Collector):
    """The one :class:`Stats` object as Prometheus metrics, read at each scrape."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        # Names depend on which services run: do not collect at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield InfoMetricFamily("sockproto", "The sockproto version.", value={"version": __version__})
        yield GaugeMetricFamily(
            "sockproto_uptime_seconds", "Seconds since the suite started.", stats.uptime()
        )
        by_service = ["service"]
        listening = GaugeMetricFamily(
            "sockproto_listening", "1 for each address a service listens on.", labels=["service", "address"]
        )
        current = GaugeMetricFamily("sockproto_connections_open", "Connections open now.", labels=by_service)
        total = CounterMetricFamily(
            "sockproto_connections", "Connections (UDP: datagrams) ever.", labels=by_service
        )
        handled = CounterMetricFamily(
            "sockproto_handled", "Lines, requests, datagrams or commands handled.", labels=["service", "unit"]
        )
        received = CounterMetricFamily("sockproto_received_bytes", "Bytes received.", labels=by_service)
        sent = CounterMetricFamily("sockproto_sent_bytes", "Bytes sent.", labels=by_service)
        limits = CounterMetricFamily(
            "sockproto_limit_hits", "Times a limit was hit.", labels=["service", "limit"]
        )
        events = CounterMetricFamily(
            "sockproto_events", "Service-specific counters.", labels=["service", "event"]
        )
        for name, service in stats.combined().items():
            for address in service.listening:
                listening.add_metric([name, address], 1)
            current.add_metric([name], service.current)
            total.add_metric([name], service.total)
            handled.add_metric([name, service.unit], service.handled)
            received.add_metric([name], service.bytes_in)
            sent.add_metric([name], service.bytes_out)
            for limit, times in sorted(service.limits.items()):
                limits.add_metric([name, limit], times)
            for event, times in sorted(service.counters.items()):
                events.add_metric([name, event], times)
        yield from (listening, current, total, handled, received, sent, limits, events)


# -- the site, its channel and its requests -----------------------------------------


@implementer(IPushProducer)
class PausedOnce:
    """A response's producer, paused and resumed once per change of state.

    The transport calls ``pauseProducing`` on every write while its buffer is
    full but ``resumeProducing`` once when it drains, and HTTPChannel passes
    each call on to the response's producer. A pull producer (``static.File``,
    ``/bytes``) runs as a CooperativeTask, which needs as many resumes as it
    had pauses: a response that starts while the buffer is still full (the
    next of pipelined requests) writes its headers and its first chunk, is
    paused twice, resumed once, and never finishes; the connection hangs.
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    def stopStreaming(self) -> None:
        """HTTPChannel's call to the pull-to-push adapter it made."""
        self.producer.stopStreaming()


# What a folded header line (obs-fold) starts with, as a one-byte slice.
_FOLDED = frozenset((b" ", b"\t"))


@implementer(IHalfCloseableProtocol)
class ResponderChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 connection with the limits of the module docstring."""

    site: ResponderSite
    _receiving = False  # part of a request is in: its deadline runs
    _client_done = False  # the client half-closed: it sends nothing more
    _stall_call: Any = None
    _until_done: Deferred[bytes] | None = None  # the server stops once the response is out
    _lingering = False  # refused: what the client still sends is read and dropped
    _lingered = 0  # bytes dropped so far
    _linger_call: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._lingering:
            self._discard(data)
            return
        # HTTPChannel restarts the timer on every chunk; start it only at a
        # request's first byte, so the whole request must arrive in time.
        if not self._receiving:
            self._receiving = True
            self.resetTimeout()
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        if line[:1] not in _FOLDED and not self._lingering:  # the usual line: one test
            HTTPChannel.lineReceived(self, line)
            return
        if self._lingering:
            return  # the rest of a chunk read before the refusal
        if self.requests:  # a header line (see lineLengthExceeded)
            # twisted.web joins such a line to the header before it (obs-fold,
            # RFC 9112 sec. 5.2); a proxy in front may read it as a header of
            # its own, so the two would disagree on the request: refused, as
            # nginx does. (A request line so indented is malformed already.)
            self._bad_request(
                "header line starts with a space or tab (obs-fold)",
                "bad request: a header line must not start with a space or tab (no obs-fold)\n",
            )
            return
        HTTPChannel.lineReceived(self, line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._lingering:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        # RFC 9112 sec. 3.2: 400 to an HTTP/1.1 request without a Host header,
        # and to any request with more than one.
        hosts = self.requests[-1].requestHeaders.getRawHeaders(b"host", [])
        if len(hosts) > 1 or (not hosts and self._version == b"HTTP/1.1"):
            self._bad_request(
                "no Host header" if not hosts else "more than one Host header",
                "bad request: an HTTP/1.1 request needs one Host header\n",
            )
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._lingering:
            return  # the end of a refused request's body: not a request
        self._receiving = False
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        if self.transport.disconnecting:
            return  # already closing (a refusal): the guard bounds how long that takes
        seconds = self.site.idle_timeout
        if self._receiving:
            self.site.service_stats.limit_hit("request_timeout")
            log.info(
                "http: closing {peer}: request incomplete after {seconds:g} s",
                peer=peer_of(self.transport),
                seconds=seconds,
            )
            self.refuse(408, f"request timeout: send a whole request within {seconds:g} s\n")
            return
        self.site.service_stats.limit_hit("idle_timeout")
        log.info(
            "http: closing {peer}: idle for {seconds:g} s", peer=peer_of(self.transport), seconds=seconds
        )
        # The suite's guard aborts the connection if the close does not
        # complete (twisted.web would schedule its own abort).
        self.loseConnection()

    def pauseProducing(self) -> None:
        """The client's receive window is full: it has that long to read some of it."""
        super().pauseProducing()
        if self._stall_call is None and self.site.idle_timeout:
            self._stall_call = self.callLater(self.site.idle_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel_stall()
        super().resumeProducing()

    def _stalled(self) -> None:
        self._stall_call = None
        self.site.service_stats.limit_hit("send_timeout")
        log.info(
            "http: closing {peer}: read nothing for {seconds:g} s",
            peer=peer_of(self.transport),
            seconds=self.site.idle_timeout,
        )
        self.transport.abortConnection()

    def _cancel_stall(self) -> None:
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def readConnectionLost(self) -> None:
        """The client has sent all it will: answer the requests it made, then close.

        twisted.web is not half-closeable, so this EOF would drop every
        response still under way (``/delay``, ``/bytes``, a large file): all
        a client that closes its side after a request, as ncat does, would get.
        """
        if not self._client_done:  # twisted.web's resumeProducing can read the EOF again
            self._client_done = True
            self._close_when_answered()

    def writeConnectionLost(self) -> None:
        if not self._lingering:  # lingering: the write side was closed on purpose
            self.loseConnection()

    def _close_when_answered(self) -> None:
        # A request only partly received when the client closed can never be
        # completed: it gets no answer.
        if not self._handlingRequest and not self.transport.disconnecting:
            self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self._requestProducer = PausedOnce(self._requestProducer)
        if self._waitingForTransport:
            # The buffer is full already: start paused, and go on with the
            # others when it drains.
            self._requestProducer.pauseProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close without a word.
        first = not self.requests  # no request yet: this is its request line
        what = "request line" if first else "header line"
        self.site.service_stats.limit_hit("header_size")
        log.info(
            "http: closing {peer}: {what} over {limit} bytes",
            peer=peer_of(self.transport),
            what=what,
            limit=self.MAX_LENGTH,
        )
        self.refuse(414 if first else 431, f"{what} longer than {self.MAX_LENGTH} bytes\n")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own answer to a malformed request is a bare 400 and
        # no log line; same status, but say it to the client and the log.
        self._bad_request("malformed request", "bad request: malformed HTTP\n")

    def _bad_request(self, why: str, text: str) -> None:
        """A 400 for a request the server will not read: counted, logged once, then close."""
        if self._lingering or self.transport.disconnecting:
            return  # refused already: one answer, one line
        self.site.service_stats.counters["bad_requests"] += 1
        log.info("http: closing {peer}: {why}", peer=peer_of(self.transport), why=why)
        self.refuse(400, text)

    def refuse(self, code: int, text: str) -> None:
        """Answer ``code`` outside any Request, then close (see :meth:`_linger`)."""
        if self._lingering or self.transport.disconnecting:
            return
        self.transport.write(plain_response(code, text))
        self._linger()

    def _linger(self) -> None:
        """Read and drop what the client still sends, then close: nginx's lingering close.

        Closing a socket with unread data makes the kernel send a reset, and a
        client still sending (curl uploading a body over the cap) then loses
        the answer it was sent. So the write side is closed after the answer
        (the client reads it, then an end) and the connection stays open for
        at most ``linger_time`` seconds and ``linger_bytes`` bytes, or until
        the client closes its side.
        """
        self._lingering = True
        self._receiving = False
        self.setTimeout(None)
        self.clearLineBuffer()  # what is read already is dropped too
        site = self.site
        if not site.linger_time:
            self.loseConnection()
            return
        transport = self.transport
        # Over TLS a TCP half-close would skip TLS's own close: there the
        # client is only told by the close at the end.
        if ITCPTransport.providedBy(transport) and not INegotiated.providedBy(transport):
            # The channel is the transport's producer: while it is, the
            # transport would not close its write side.
            self._networkProducer.unregisterProducer()
            transport.loseWriteConnection()
        self._linger_call = self.callLater(site.linger_time, self._linger_over)

    def _discard(self, data: bytes) -> None:
        self._lingered += len(data)
        if self._lingered > self.site.linger_bytes:
            self._linger_over()

    def _linger_over(self) -> None:
        self._cancel_linger()
        if not self.transport.disconnecting:
            self.loseConnection()

    def _cancel_linger(self) -> None:
        if self._linger_call is not None:
            if self._linger_call.active():
                self._linger_call.cancel()
            self._linger_call = None

    def connectionLost(self, reason: Any) -> None:
        self._cancel_stall()
        self._cancel_linger()
        super().connectionLost(reason)

    def server_stopping(self) -> bytes | Deferred[bytes]:
        """The suite stops: a response under way is finished, then the
        connection closes instead of waiting for another request (its header
        says ``Connection: close`` if it is not sent yet). An idle connection,
        or one whose request is still arriving, closes now."""
        if not self._handlingRequest:
            return b""
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self._until_done = Deferred()
        return self._until_done

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self._client_done:  # the client half-closed: close once it is answered
            self._close_when_answered()
        if self._until_done is not None and not self.requests:  # the suite stops
            done, self._until_done = self._until_done, None
            done.callback(b"")


class ResponderRequest(server.Request):
    """Counts requests and caps the body as it arrives."""

    channel: ResponderChannel
    _body_size = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body:
            self.content = BytesIO()  # stays empty: the body is refused
            self._refuse_body(f"of {length} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self.channel.site.max_body:
            self._refuse_body("")
            return
        super().handleContentChunk(data)

    def _refuse_body(self, size: str) -> None:
        self._refused = True
        # twisted.web answers "Expect: 100-continue" right after gotLength:
        # it must not follow a 413.
        self.requestHeaders.removeHeader(b"expect")
        site = self.channel.site
        site.service_stats.limit_hit("max_body")
        log.info(
            "http: closing {peer}: request body {size} over {limit} bytes",
            peer=peer_of(self.channel.transport),
            size=size or "(chunked)",
            limit=site.max_body,
        )
        self.channel.refuse(413, f"request body over {site.max_body} bytes (--http-max-body)\n")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, origin_form(path), version)

    def process(self) -> None:
        self.channel.site.service_stats.handled += 1
        problem = target_problem(self.uri)
        if problem is not None:
            log.info(
                "http: 400 to {peer}: request target {target} {problem}",
                peer=peer_of(self.channel.transport),
                target=loggable(self.uri),
                problem=problem,
            )
            self.site = self.channel.site
            self.write(PlainPage(400, BAD_TARGET[problem]).render(self))
            self.finish()
            return
        super().process()


class TwistdAccessLog:
    """Access log lines into the twistd log, one event each, within a budget.

    A line through twisted.logger's text observer costs more than answering a
    small request, and a busy server would drown the log the operator reads:
    lines beyond ``budget`` are counted and summed up once an interval
    (:class:`~sockproto.limits.LogBudget`, as the UDP service does with
    datagrams). ``--http-access-log FILE`` gets every line.
    """

    def __init__(self, budget: TokenBucket | None, clock: Any) -> None:
        self.budget = LogBudget(budget, clock, self._sum_up)

    def write(self, line: str) -> None:
        if self.admit():
            self.emit(line)

    def admit(self) -> bool:
        """Whether the next line gets logged; if not, it is counted for the summary."""
        return self.budget.admit("requests")

    def emit(self, line: str) -> None:
        # Budgeted here (--http-log-rate), not charged to --log-rate as well.
        log.info("http: {access}", access=line.rstrip("\n"), budget="--http-log-rate")

    def _sum_up(self, counts: dict[str, int], seconds: float) -> None:
        log.info(
            "http: {count} more requests in the last {seconds:.3g} s, not logged one by one"
            " (--http-log-rate)",
            count=counts["requests"],
            seconds=seconds,
        )

    def close(self) -> None:
        """The site stops: sum up now."""
        self.budget.flush()


class ResponderSite(server.Site):
    protocol = ResponderChannel  # type: ignore[assignment]
    requestFactory = ResponderRequest

    def __init__(
        self,
        root: resource.Resource,
        service_stats: ServiceStats,
        *,
        max_body: int,
        idle_timeout: float,
        linger_time: float = 5.0,
        linger_bytes: int = 16 * 1024 * 1024,
        access_log: str = "",
        log_rate: tuple[float, float] = (0.0, 0.0),
        reactor: Any = None,
    ) -> None:
        super().__init__(
            root,
            logPath=access_log or None,
            timeout=idle_timeout or None,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.service_stats = service_stats
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.linger_time = linger_time
        self.linger_bytes = linger_bytes
        self.log_rate = log_rate

    def acceptableProtocols(self) -> list[bytes]:
        """Only HTTP/1.1 over TLS too: the channel above is not twisted.web's HTTP/2 one."""
        return [b"http/1.1"]

    def startFactory(self) -> None:
        super().startFactory()
        if not self.logPath:
            self.logFile = TwistdAccessLog(rate_limit(self.log_rate, self.reactor.seconds), self.reactor)

    def _openLogFile(self, path: str) -> Any:
        try:
            return LogFile(
                os.path.basename(path),
                os.path.dirname(path),
                rotateLength=ACCESS_LOG_ROTATE,
                maxRotatedFiles=ACCESS_LOG_KEEP,
            )
        except OSError as error:
            raise StartupError(f"cannot open access log {path}: {error.strerror}") from None

    def log(self, request: Any) -> None:
        self.service_stats.counters[f"responses_{request.code // 100}xx"] += 1
        access = self._logFile
        if isinstance(access, TwistdAccessLog):
            # Formatting a line costs about as much as a small answer: only
            # for the lines that will be logged.
            if access.admit():
                access.emit(self._logFormatter(self._logDateTime, request))
            return
        super().log(request)


def build_site(
    settings: HttpSettings, stats: Stats, service_stats: ServiceStats, reactor: Any
) -> ResponderSite:
    return ResponderSite(
        make_root(settings, stats, reactor),
        service_stats,
        max_body=settings.max_body,
        idle_timeout=settings.idle_timeout,
        linger_time=settings.linger_time,
        linger_bytes=settings.linger_bytes,
        access_log=settings.access_log,
        log_rate=settings.log_rate,
        reactor=reactor,
    )


def build(settings: Settings, stats: Stats, reactor: Any) -> Listener | None:
    """The HTTP responder as configured, or None when its port is off.

    The guard gives the connection cap and the counters; the idle timeout is
    twisted.web's (see :class:`ResponderChannel`), which knows when a request
    is being answered: the guard's would cut a long download or a /delay.
    """
    if settings.http.port == "off":
        return None
    service_stats = stats.service("http", "requests")
    policy = ConnectionPolicy(
        max_clients=settings.http.max_clients,
        overflow_message=OVERFLOW,
        max_output=settings.http.max_output,
    )
    site = build_site(settings.http, stats, service_stats, reactor)
    return stream_listener("http", settings.http.port, settings.suite, site, policy, service_stats, reactor)

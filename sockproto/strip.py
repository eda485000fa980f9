"""The strip-whitespace server of seed 000: each line comes back without
spaces, tabs, CR and LF, NUL-terminated; ``exit`` or ``quit`` closes.

NUL ends an answer, so a NUL inside a line is dropped too: one line is always
exactly one answer, whatever bytes it holds. Telnet's commands (a telnet
client's Ctrl-C) are taken out before the lines are split: see
:class:`~sockproto.text.TelnetFilter`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from sockproto.config import Settings
from sockproto.limits import BoundedLineReceiver, ConnectionPolicy, peer_of
from sockproto.listening import Listener, stream_listener
from sockproto.stats import ServiceStats, Stats
from sockproto.text import MAX_TELNET_COMMANDS, TOO_MANY_COMMANDS, TelnetInput

log = Logger(namespace="sockproto")

WHITESPACE = b" \t\r\n"
# What an answer never holds: the whitespace, and the NUL that ends it.
DROPPED = WHITESPACE + b"\0"
CLOSING_WORDS = (b"exit", b"quit")
# Deletes the whitespace and NULs and turns each LF into the NUL that ends an answer,
# so a whole block of lines is answered in one C-level pass.
_LF_TO_NUL = bytes.maketrans(b"\n", b"\0")
_DROPPED_BUT_LF = DROPPED.replace(b"\n", b"")


def strip_whitespace(data: bytes) -> bytes:
    """``b"hello world"`` -> ``b"helloworld"``; other bytes pass untouched."""
    return data.translate(None, WHITESPACE)


def answer(line: bytes) -> bytes:
    """What the server sends back for one line (or, in UDP strip mode, one datagram):
    without whitespace or NUL, then one NUL."""
    return line.translate(None, DROPPED) + b"\0"


def is_closing(line: bytes) -> bool:
    """``exit``/``quit`` once surrounding whitespace is trimmed, in any case."""
    return line.strip(WHITESPACE).lower() in CLOSING_WORDS


class StripProtocol(TelnetInput, BoundedLineReceiver):
    """Answers whole blocks of lines at once; see :meth:`dataReceived`."""

    service_stats: ServiceStats

    def connectionMade(self) -> None:
        # The answers are as big as what the client sends: one that sends and
        # never reads would have them all buffered here. As the transport's
        # producer (LineReceiver is one), reading stops while output backs up.
        self.transport.registerProducer(self, True)

    def _telnet_reply(self, reply: bytes) -> None:
        if not self.transport.disconnecting:
            self.transport.write(reply)

    def _telnet_flood(self) -> None:
        if self.transport.disconnecting:
            return  # closing already: the client has had its one line
        self.service_stats.limit_hit("telnet_commands")
        log.info(
            "strip: closing {peer}: more than {limit} telnet commands",
            peer=peer_of(self.transport),
            limit=MAX_TELNET_COMMANDS,
        )
        self.transport.write(TOO_MANY_COMMANDS)
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self._telnet_end()
        super().readConnectionLost()

    def _bytes_received(self, data: bytes) -> Any:
        # LineReceiver splits one line at a time and copies the rest of the
        # buffer each time; the answer to a block of lines is computable in one
        # pass, so take the fast path whenever no line needs a closer look.
        transport = self.transport
        if transport.disconnecting:
            return None
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) > self.MAX_LENGTH:
                return self.lineLengthExceeded(data)
            self._buffer = data
            return None
        if end == len(data) - 1:  # the usual case: whole lines only
            block, rest = data[:end], b""
        else:
            block, rest = data[:end], data[end + 1 :]
        lowered = block.lower()  # may a line close? then each gets a closer look
        if b"exit" in lowered or b"quit" in lowered or len(block) > self.MAX_LENGTH:
            return self._answer_one_by_one(block, rest)
        self.service_stats.handled += block.count(b"\n") + 1
        transport.write(block.translate(_LF_TO_NUL, _DROPPED_BUT_LF) + b"\0")
        if rest:
            return self._keep(rest)
        return None

    def _answer_one_by_one(self, block: bytes, rest: bytes) -> Any:
        answers = []
        for line in block.split(b"\n"):
            if len(line) > self.MAX_LENGTH:
                self._send(answers)
                return self.lineLengthExceeded(line)
            if is_closing(line):
                self._send(answers)
                self.transport.loseConnection()
                return None
            answers.append(answer(line))
        self._send(answers)
        return self._keep(rest)

    def _send(self, answers: list[bytes]) -> None:
        self.service_stats.handled += len(answers)
        self.transport.write(b"".join(answers))

    def _keep(self, rest: bytes) -> Any:
        if len(rest) > self.MAX_LENGTH:
            return self.lineLengthExceeded(rest)
        self._buffer = rest
        return None

    def line_received(self, line: bytes) -> None:
        # Used for the last line on half-close.
        if is_closing(line):
            self.transport.loseConnection()
            return
        self._send([answer(line)])


class StripFactory(Factory):
    protocol = StripProtocol

    def __init__(self, max_line: int, stats: ServiceStats) -> None:
        self.max_line = max_line
        self.stats = stats

    def buildProtocol(self, addr: Any) -> StripProtocol:
        protocol = StripProtocol()
        protocol.factory = self
        protocol.MAX_LENGTH = self.max_line
        protocol.service_stats = self.stats
        return protocol


def build(settings: Settings, stats: Stats, reactor: Any) -> Listener | None:
    """The strip service as configured, or None when its port is off."""
    if settings.strip.port == "off":
        return None  # and no stats: /status lists running services only
    service_stats = stats.service("strip", "lines")
    policy = ConnectionPolicy(
        max_clients=settings.strip.max_clients,
        idle_timeout=settings.strip.idle_timeout,
    )
    factory = StripFactory(settings.strip.max_line, service_stats)
    return stream_listener(
        "strip", settings.strip.port, settings.suite, factory, policy, service_stats, reactor
    )

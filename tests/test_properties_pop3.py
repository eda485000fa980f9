"""Properties of a POP3 session, logged in over a Maildir of arbitrary
messages, under arbitrary byte streams cut anywhere, with a client that
reads its answers late (flow control on all the time):

- nothing raises out of the protocol and nothing is logged as a failure;
- the output is exactly one response per command line, in order, each
  starting with ``+OK`` or ``-ERR``; a multi-line one ends in exactly one
  terminating ``.`` line, and no line inside it is an unstuffed ``.`` line;
- RETR gives back the message with CRLF line ends, as many octets as LIST
  said; TOP gives its header and the lines asked for;
- the unhandled input held for the connection stays under MAX_BACKLOG plus
  one read.

What a command should answer is modelled here from RFC 1939 and the README,
not taken from pop3.py.
"""

from __future__ import annotations

import os
import re
from typing import Any
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sockproto.pop3 import MAX_BACKLOG, MAX_LINE, AnyLogin
from tests.support import cut
from tests.test_pop3 import FlowTransport, Server

MAX_CHUNK = 200
NUMBER = re.compile(rb"[0-9]+")  # RFC 1939: no limit (the line has one)


class TinyWindow(FlowTransport):
    """The client's receive window is a few hundred bytes: output backs up at once."""

    limit = 300


message_pieces = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(
        [b".", b"..", b".\r\n", b".\n", b"\r\n.\r\n", b"\n", b"\r\n", b"\r", b"\n\n", b"Subject: s"]
    ),
)
messages = st.lists(st.lists(message_pieces, max_size=15).map(b"".join), min_size=1, max_size=4)
retrievals = st.sampled_from(
    [
        b"RETR 1",
        b"RETR 2",
        b"retr 3",
        b"RETR 4",
        b"TOP 1 0",
        b"TOP 2 1",
        b"top 3 2",
        b"TOP 4 100",
        b"TOP 1 2147483647",
    ]
)
commands = st.sampled_from(
    [
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"list 2",
        b"UIDL",
        b"UIDL 3",
        b"DELE 1",
        b"DELE 2",
        b"RSET",
        b"NOOP",
        b"CAPA",
        b"QUIT",
        b"USER x",
        b"AUTH",
        b"RETR",
        b"RETR 1 2",
        b"TOP 1",
        b"LIST 0",
        b"RETR 999999999999",
        b"LIST 0000000001",
        b"DELE -1",
        b"",
    ]
)
garbage = st.one_of(
    st.binary(max_size=8),
    st.sampled_from([b" ", b"\t", b"\r", b"\x00", b"\xff", b" 1", b"  2 "]),
    st.integers(250, 300).map(lambda n: b"z" * n),  # about RFC 2449's 255 octets
)
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"", b"\r"])
lines_of_commands = st.tuples(
    st.one_of(*[retrievals] * 4, *[commands] * 4, *[garbage] * 2),
    st.one_of(st.just(b""), st.just(b""), garbage),
    line_ends,
).map(b"".join)


@st.composite
def streams(draw: Any) -> bytes:
    """Command lines and garbage; now and then a line over the cap, which ends the session."""
    lines = draw(st.lists(lines_of_commands, min_size=2, max_size=25))
    if draw(st.integers(0, 7)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), b"w" * (MAX_LINE + 10))
    return b"".join(lines)


def small_pieces(chunks: list[bytes]) -> list[bytes]:
    """Chunks of at most MAX_CHUNK bytes."""
    return [chunk[i : i + MAX_CHUNK] for chunk in chunks for i in range(0, len(chunk), MAX_CHUNK)]


def on_the_wire(message: bytes) -> bytes:
    """A stored message as RETR sends it (before dot-stuffing): CRLF line ends, a last line ended."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if not text or text.endswith(b"\r\n") else text + b"\r\n"


def top_of(wire: bytes, lines: int) -> bytes:
    """The header, the blank line, then ``lines`` lines of the body."""
    blank = (b"\r\n" + wire).find(b"\r\n\r\n")
    if blank < 0:
        return wire
    head, body = wire[: blank + 2], wire[blank + 2 :]
    ends = [i + 1 for i, byte in enumerate(body) if byte == ord("\n")]
    return head + body[: ends[lines - 1] if 0 < lines <= len(ends) else len(body) if lines else 0]


def command_lines(stream: bytes, half_closed: bool) -> tuple[list[bytes], bool]:
    """The lines the server handles, in order (a CR before the LF dropped),
    and whether one is over the line cap, which ends the session."""
    *lines, rest = stream.split(b"\n")
    too_long = next((i for i, line in enumerate(lines) if len(line) > MAX_LINE), None)
    if too_long is not None:
        lines = lines[:too_long]
    elif len(rest) > MAX_LINE:
        too_long = len(lines)
    elif half_closed and rest:
        lines.append(rest)
    return [line[:-1] if line.endswith(b"\r") else line for line in lines], too_long is not None


class Model:
    """The mailbox as the session sees it; what each command line should get."""

    def __init__(self, wires: list[bytes]) -> None:
        self.wires = wires
        self.deleted: set[int] = set()

    def message(self, word: bytes) -> int | None:
        if not NUMBER.fullmatch(word):
            return None
        number = int(word)
        return number if 1 <= number <= len(self.wires) and number not in self.deleted else None

    def visible(self) -> list[tuple[int, bytes]]:
        return [(n, wire) for n, wire in enumerate(self.wires, 1) if n not in self.deleted]

    def expect(self, line: bytes) -> tuple[bytes, bytes | None, bool]:
        """(how the first line starts, the multi-line body after unstuffing if
        there is one, None if not; whether the session ends)."""
        if len(line) + 2 > 255:
            return b"-ERR", None, False
        keyword, _, argument = line.partition(b" ")
        keyword, words = keyword.upper(), argument.split()
        if keyword == b"QUIT":
            return b"+OK", None, True
        if keyword == b"CAPA":
            return b"+OK", b"", False  # (its body is checked elsewhere)
        if keyword == b"NOOP":
            return b"+OK", None, False
        if keyword in (b"STAT", b"RSET"):
            if keyword == b"RSET":
                self.deleted.clear()
            shown = [len(wire) for _, wire in self.visible()]
            form = b"+OK %d %d" if keyword == b"STAT" else b"+OK maildrop has %d messages (%d octets)"
            return form % (len(shown), sum(shown)), None, False
        if keyword == b"UIDL" and not words:
            return b"+OK", b"", False
        if keyword == b"LIST" and not words:
            return b"+OK", b"".join(b"%d %d\r\n" % (n, len(w)) for n, w in self.visible()), False
        if keyword in (b"LIST", b"UIDL"):
            number = self.message(words[0]) if len(words) == 1 else None
            if number is None:
                return b"-ERR", None, False
            return (
                (b"+OK %d %d" % (number, len(self.wires[number - 1])) if keyword == b"LIST" else b"+OK"),
                None,
                False,
            )
        if keyword == b"DELE":
            number = self.message(words[0]) if len(words) == 1 else None
            if number is None:
                return b"-ERR", None, False
            self.deleted.add(number)
            return b"+OK", None, False
        if keyword == b"RETR":
            number = self.message(words[0]) if len(words) == 1 else None
            if number is None:
                return b"-ERR", None, False
            wire = self.wires[number - 1]
            return b"+OK %d octets" % len(wire), wire, False
        if keyword == b"TOP":
            ok = len(words) == 2 and NUMBER.fullmatch(words[1])
            number = self.message(words[0]) if ok else None
            if number is None:
                return b"-ERR", None, False
            return b"+OK", top_of(self.wires[number - 1], int(words[1])), False
        return b"-ERR", None, False  # unknown, or not valid after login (USER, PASS, APOP, AUTH, STLS)


def parse(test: SynchronousTestCase, output: bytes, model: Model, lines: list[bytes]) -> tuple[bytes, bool]:
    """Checks ``output`` against the model, response by response; returns
    what follows the last one, and whether a QUIT ended the session."""
    for line in lines:
        start, body, ends = model.expect(line)
        head, separator, output = output.partition(b"\r\n")
        test.assertTrue(separator, f"no answer to {line!r}")
        test.assertTrue(head.startswith(start), (line, head, start))
        if body is not None:
            sent: list[bytes] = []
            while True:
                text, separator, output = output.partition(b"\r\n")
                test.assertTrue(separator, f"multi-line answer to {line!r} not terminated")
                if text == b".":
                    break
                test.assertFalse(text.startswith(b".") and not text.startswith(b".."), f"unstuffed: {text!r}")
                sent.append(text[1:] if text.startswith(b".") else text)
            if body:
                test.assertEqual(b"".join(t + b"\r\n" for t in sent), body, line)
        if ends:
            return output, True
    return output, False


class Session:
    def __init__(self, test: SynchronousTestCase, messages: list[bytes]) -> None:
        server = Server(test, checkers=[AnyLogin()])
        with mock.patch("os.fsync"):  # durability is not what is tested here
            for when, message in enumerate(messages, 1):
                path = server.deliver(message)
                os.utime(path, ns=(when, when))  # the order of the listing
        self.transport = TinyWindow(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        self.guard = server.guarded.buildProtocol(self.transport.getPeer())
        self.guard.makeConnection(self.transport)
        self.protocol = self.guard.wrappedProtocol
        self.guard.dataReceived(b"USER alice\r\nPASS any\r\n")
        greeting = self.transport.read()
        assert greeting.count(b"\r\n") == 3 and b"+OK alice's maildrop" in greeting, greeting
        self.peak = 0

    def feed(self, chunk: bytes, read_now: bool) -> bytes:
        out = b""
        if self.transport.producerState == "paused":  # not read until the client reads
            out += self.transport.read()
            paused = self.transport.producerState == "paused" and not self.transport.disconnecting
            assert not paused, "input not read again once the client read every answer"
        if self.transport.disconnecting:
            return out
        self.guard.dataReceived(chunk)
        self.peak = max(self.peak, len(self.protocol._buffer))
        return out + (self.transport.read() if read_now else b"")


class Pop3PropertyTests(SynchronousTestCase):
    @given(data=st.data(), stored=messages, stream=streams(), half_close=st.booleans())
    def test_any_command_stream(
        self, data: Any, stored: list[bytes], stream: bytes, half_close: bool
    ) -> None:
        with capturedLogs() as events:
            session = Session(self, stored)
            output = b""
            for chunk in data.draw(cut(stream, 15).map(small_pieces)):
                output += session.feed(chunk, read_now=data.draw(st.booleans()))
            output += session.transport.read()
            if half_close and not session.transport.disconnecting:
                session.guard.readConnectionLost()
                output += session.transport.read()
            session.guard.connectionLost(Failure(ConnectionDone()))
        lines, too_long = command_lines(stream, half_close)
        rest, quit = parse(self, output, Model([on_the_wire(m) for m in stored]), lines)
        self.assertEqual(rest, b"-ERR line too long\r\n" if too_long and not quit else b"")
        self.assertLessEqual(session.peak, MAX_BACKLOG + MAX_CHUNK)
        self.assertEqual([formatEvent(e) for e in events if "log_failure" in e], [])

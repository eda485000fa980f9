"""Properties of the strip server under arbitrary byte streams cut anywhere.

The protocol runs behind the real guard over a StringTransport. A model
written here from the README (not from strip.py or sockproto.text, byte by
byte where they scan) says what must come back, telnet commands and their
answers included.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from sockproto import strip
from sockproto.limits import BoundedLineReceiver, ConnectionPolicy, GuardedFactory
from sockproto.stats import ServiceStats
from sockproto.text import MAX_TELNET_COMMANDS, TOO_MANY_COMMANDS
from tests.support import cut
from tests.test_strip import connect

TOO_LONG = BoundedLineReceiver.line_too_long_message
SEPARATORS = b" \t\r\n"

# Streams rich in what matters: whitespace, LFs, NULs, closing words in any
# case and spacing, long runs, and arbitrary bytes between them.
pieces = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(
        [b"\n", b"\r\n", b" ", b"\t", b"\r", b"\0", b"\x0b\x0c", b"exit", b"QUIT", b" Exit\t", b"\xff\xfe"]
    ),
    # telnet: Ctrl-C, an offer, a subnegotiation and its end, IAC IAC, a lone IAC
    st.sampled_from(
        [b"\xff\xf4\xff\xfd\x06", b"\xff\xfb\x18", b"\xff\xfa\x18\x00", b"\xff\xf0", b"\xff\xff", b"\xff"]
    ),
    st.integers(1, 80).map(lambda n: b"x" * n),
)
streams = st.lists(pieces, max_size=40).map(b"".join)
streams = st.lists(pieces, max_size=40).map(b"".join)
# Whole commands (one each, Ctrl-C two) and the data between them.
COMMAND_RICH = [
    b"\xff\xf4\xff\xfd\x06",
    b"\xff\xf1",
    b"\xff\xfb\x18",
    b"\xff\xfa\x18\x00x\xff\xff\xff\xf0",
    b"\xff\xff",
    b"ab",
    b"\n",
]


FLOOD = "flood"  # the event of the command one past MAX_TELNET_COMMANDS


def telnet(stream: bytes, eof: bool) -> list[int | bytes | str]:
    """``stream`` as the README reads it: its data bytes (ints) and the
    server's answers to telnet commands (bytes), in order. 0xFF then
    0xF0-0xFE is a command (WILL, WONT, DO, DONT take one byte more; SB runs
    to IAC SE or any IAC but IAC IAC); 0xFF then anything else is two data
    bytes; DO x is answered WONT x, WILL x DONT x. An unfinished command at
    the end is no data yet, or at EOF none at all, but a lone 0xFF is. The
    command one past MAX_TELNET_COMMANDS (a subnegotiation is one) is FLOOD,
    and nothing after it counts."""
    events: list[int | bytes | str] = []
    i, in_sb, commands = 0, False, 0
    while i < len(stream):
        byte, following = stream[i], stream[i + 1 : i + 2]
        if byte != 0xFF:
            if not in_sb:
                events.append(byte)
            i += 1
        elif not following:
            if eof and not in_sb:
                events.append(byte)
            break
        elif in_sb:
            if following[0] == 0xFF:
                i += 2
            else:
                in_sb = False
                i += 2 if following[0] == 0xF0 else 0  # another command: read it as one
        elif following[0] == 0xFF or following[0] < 0xF0:
            events += [byte, following[0]]
            i += 2
        elif (commands := commands + 1) > MAX_TELNET_COMMANDS and (
            following[0] not in (0xFB, 0xFC, 0xFD, 0xFE) or i + 2 < len(stream)
        ):
            events.append(FLOOD)
            break
        elif following[0] in (0xFB, 0xFC, 0xFD, 0xFE):
            if i + 2 == len(stream):
                break
            answer = {0xFB: b"\xff\xfe", 0xFD: b"\xff\xfc"}.get(following[0])
            if answer:
                events.append(answer + stream[i + 2 : i + 3])
            i += 3
        else:
            in_sb = following[0] == 0xFA
            i += 2
    return events


def expected(stream: bytes, max_line: int, half_close: bool) -> tuple[bytes, bool, bool]:
    """What the README promises for ``stream``: (the bytes sent back, closed
    or not, telnet answers among them or not)."""
    out, line, answered = b"", bytearray(), False
    for event in [*telnet(stream, half_close), None]:
        if isinstance(event, int) and event != 0x0A:
            line.append(event)
            continue
        if isinstance(event, int) or (event is None and half_close and line):
            if len(line) > max_line:
                return out + TOO_LONG, True, answered
            if line.strip(SEPARATORS).lower() in (b"exit", b"quit"):
                return out, True, answered
            out += bytes(b for b in line if b not in SEPARATORS + b"\0") + b"\0"
            line.clear()
        elif len(line) > max_line:  # a line without LF yet: too long as soon as it is seen
            return out + TOO_LONG, True, answered
        elif event == FLOOD:  # one line, then closed; the line under way is lost
            return out + TOO_MANY_COMMANDS, True, answered
        elif event is not None:
            out, answered = out + event, True
    return out, half_close, answered


class Run:
    """One connection to a fresh strip server."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.stats = ServiceStats("strip", "lines")
        factory = GuardedFactory(
            strip.StripFactory(max_line, self.stats), ConnectionPolicy(), self.stats, Clock()
        )
        self.guard, self.transport = connect(factory)
        self.protocol = self.guard.wrappedProtocol
        self.peak_buffer = 0

    def feed(self, chunks: list[bytes], half_close: bool) -> bytes:
        for chunk in chunks:
            self.guard.dataReceived(chunk)
            self.peak_buffer = max(self.peak_buffer, len(self.protocol._buffer))
        if half_close and not self.transport.disconnecting:
            self.guard.readConnectionLost()
        return self.transport.value()


class StripPropertyTests(SynchronousTestCase):
    @given(streams, st.integers(1, 64), st.booleans(), st.data())
    def test_any_stream_cut_anywhere(self, stream: bytes, max_line: int, half_close: bool, data: Any) -> None:
        chunks = data.draw(cut(stream, 12))
        whole, split = Run(max_line), Run(max_line)
        with capturedLogs() as events:
            output = whole.feed([stream] if stream else [], half_close)
            self.assertEqual(split.feed(chunks, half_close), output)
        want, closed, answered = expected(stream, max_line, half_close)
        self.assertEqual(output, want)
        self.assertEqual(bool(split.transport.disconnecting), closed)
        # Memory: never more than one line's worth held between chunks.
        self.assertLessEqual(split.peak_buffer, max_line)
        self.assertEqual(len(events), int(output.endswith(TOO_LONG)) * 2)  # the limit's line, each run
        if answered:
            return  # telnet answers (with any option byte) among the answers: the model checked them
        # The answers: whitespace-free, one NUL each, one per line handled.
        answers = output.removesuffix(TOO_LONG)
        self.assertFalse(set(answers) & set(SEPARATORS), answers)
        self.assertEqual(answers.count(b"\0"), split.stats.handled)
        if answers:
            self.assertTrue(answers.endswith(b"\0"))

    @given(
        st.lists(st.sampled_from(COMMAND_RICH), min_size=1, max_size=12),
        st.integers(-30, 30),
        st.booleans(),
        st.data(),
    )
    def test_commands_around_the_budget(
        self, unit: list[bytes], off: int, half_close: bool, data: Any
    ) -> None:
        # A stream of about MAX_TELNET_COMMANDS commands among lines, cut
        # anywhere: answered as the README says up to the budget, then one
        # line and closed.
        per_unit = sum(
            piece.count(b"\xff") - 2 * piece.count(b"\xff\xff") - piece.count(b"\xff\xf0") for piece in unit
        )
        repeat = max(1, (MAX_TELNET_COMMANDS + off) // max(1, per_unit))
        stream = b"".join(unit) * repeat
        chunks = data.draw(cut(stream, 12))
        run = Run(len(stream))  # no line too long: the budget is what closes
        with capturedLogs():
            output = run.feed(chunks, half_close)
        want, closed, _ = expected(stream, len(stream), half_close)
        self.assertEqual(output, want)
        self.assertEqual(bool(run.transport.disconnecting), closed)
        self.assertEqual(output.endswith(TOO_MANY_COMMANDS), per_unit * repeat > MAX_TELNET_COMMANDS)

    @given(st.lists(st.binary(min_size=1, max_size=4096), min_size=1, max_size=8))
    def test_long_input_without_lf_is_bounded(self, chunks: list[bytes]) -> None:
        run = Run(1024)
        chunks = [c.replace(b"\n", b"") or b"x" for c in chunks]
        with capturedLogs():
            output = run.feed(chunks, half_close=False)
        self.assertLessEqual(run.peak_buffer, 1024)
        self.assertEqual(output, TOO_LONG if sum(map(len, chunks)) > 1024 else b"")

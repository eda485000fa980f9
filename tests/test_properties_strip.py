"""Properties of the strip server under arbitrary byte streams cut anywhere.

The protocol runs behind the real guard over a StringTransport. A model
written here from the README (not from strip.py) says what must come back.
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
    st.integers(1, 80).map(lambda n: b"x" * n),
)
streams = st.lists(pieces, max_size=40).map(b"".join)


def expected(stream: bytes, max_line: int, half_close: bool) -> tuple[bytes, bool]:
    """What the README promises for ``stream``: (the bytes sent back, closed or not)."""
    out = b""
    *lines, rest = stream.split(b"\n")
    if half_close and rest:
        lines, rest = [*lines, rest], b""
    for line in lines:
        if len(line) > max_line:
            return out + TOO_LONG, True
        if line.strip(SEPARATORS).lower() in (b"exit", b"quit"):
            return out, True
        out += bytes(b for b in line if b not in SEPARATORS + b"\0") + b"\0"
    if len(rest) > max_line:
        return out + TOO_LONG, True
    return out, half_close


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
        want, closed = expected(stream, max_line, half_close)
        self.assertEqual(output, want)
        self.assertEqual(bool(split.transport.disconnecting), closed)
        # The answers: whitespace-free, one NUL each, one per line handled.
        answers = output.removesuffix(TOO_LONG)
        self.assertFalse(set(answers) & set(SEPARATORS), answers)
        self.assertEqual(answers.count(b"\0"), split.stats.handled)
        if answers:
            self.assertTrue(answers.endswith(b"\0"))
        # Memory: never more than one line's worth held between chunks.
        self.assertLessEqual(split.peak_buffer, max_line)
        self.assertEqual(len(events), int(output.endswith(TOO_LONG)) * 2)  # the limit's line, each run

    @given(st.lists(st.binary(min_size=1, max_size=4096), min_size=1, max_size=8))
    def test_long_input_without_lf_is_bounded(self, chunks: list[bytes]) -> None:
        run = Run(1024)
        chunks = [c.replace(b"\n", b"") or b"x" for c in chunks]
        with capturedLogs():
            output = run.feed(chunks, half_close=False)
        self.assertLessEqual(run.peak_buffer, 1024)
        self.assertEqual(output, TOO_LONG if sum(map(len, chunks)) > 1024 else b"")

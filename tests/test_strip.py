"""The strip protocol, driven with StringTransport and a Clock (no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sockproto import strip
from sockproto.limits import ConnectionPolicy, GuardedFactory
from sockproto.stats import ServiceStats
from sockproto.text import MAX_TELNET_COMMANDS, TOO_MANY_COMMANDS

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def connect(factory: GuardedFactory, peer: Any = PEER) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


class StripFunctionTests(SynchronousTestCase):
    def test_removes_space_tab_cr_lf(self) -> None:
        self.assertEqual(strip.strip_whitespace(b" a\tb\r\nc d "), b"abcd")

    def test_answer_is_nul_terminated(self) -> None:
        self.assertEqual(strip.answer(b"hello world"), b"helloworld\x00")

    def test_other_bytes_untouched(self) -> None:
        self.assertEqual(strip.answer(b"\xff \xfe\x0b\x0c"), b"\xff\xfe\x0b\x0c\x00")

    def test_nul_is_dropped_it_ends_the_answer(self) -> None:
        # Regression: a NUL inside a line made two answers of one.
        self.assertEqual(strip.answer(b"a\0b \0"), b"ab\x00")

    def test_closing_words(self) -> None:
        for line in (b"exit", b"quit", b"  exit\t\r", b"QUIT", b"Exit"):
            self.assertTrue(strip.is_closing(line), line)
        for line in (b"e x i t", b"exits", b"exit now", b""):
            self.assertFalse(strip.is_closing(line), line)


class StripProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = ServiceStats("strip", "lines")
        self.policy = ConnectionPolicy(max_clients=10, idle_timeout=300)
        self.factory = GuardedFactory(strip.StripFactory(64, self.stats), self.policy, self.stats, self.clock)
        self.protocol, self.transport = connect(self.factory)

    def send(self, *chunks: bytes) -> bytes:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        return self.transport.value()

    def test_one_line(self) -> None:
        self.assertEqual(self.send(b"hello world\n"), b"helloworld\x00")

    def test_crlf_tolerated(self) -> None:
        self.assertEqual(self.send(b"a b\r\n"), b"ab\x00")

    def test_many_lines_in_one_segment_answered_in_order(self) -> None:
        self.assertEqual(self.send(b"a 1\nb 2\n\nc 3\n"), b"a1\x00b2\x00\x00c3\x00")
        self.assertEqual(self.stats.handled, 4)

    def test_one_line_in_many_segments(self) -> None:
        self.assertEqual(self.send(b"he", b"llo ", b"wor", b"ld", b"\r", b"\n"), b"helloworld\x00")

    def test_partial_line_waits(self) -> None:
        self.assertEqual(self.send(b"a b\nc d"), b"ab\x00")
        self.assertEqual(self.send(b"\n"), b"ab\x00cd\x00")

    def test_bytes_pass_through(self) -> None:
        self.assertEqual(self.send(b"\xff \xfe\n"), b"\xff\xfe\x00")

    def test_nul_inside_lines_dropped_on_every_path(self) -> None:
        # the block path, then the line-by-line path (a closing word is near)
        self.assertEqual(self.send(b"a\0b\n\0\n"), b"ab\x00\x00")
        self.assertEqual(self.send(b"c\0\nexit\n"), b"ab\x00\x00c\x00")

    def test_lines_answered_before_a_close_are_counted(self) -> None:
        # Regression: the answers written just before an exit or an over-long
        # line were sent but not counted.
        self.send(b"a\nb\nexit\n")
        self.assertEqual(self.stats.handled, 2)
        other = GuardedFactory(strip.StripFactory(4, self.stats), self.policy, self.stats, self.clock)
        protocol, transport = connect(other)
        protocol.dataReceived(b"c\n" + b"x" * 5 + b"\n")
        self.assertEqual(transport.value(), b"c\x00error: line too long\r\n")
        self.assertEqual(self.stats.handled, 3)

    def test_reading_stops_while_answers_back_up(self) -> None:
        # Regression: a client that sent and never read had every answer
        # buffered in the server (300 MiB in 8 s on loopback).
        self.assertEqual(
            (self.transport.producer, self.transport.streaming), (self.protocol.wrappedProtocol, True)
        )
        self.transport.producer.pauseProducing()  # the transport's buffer is full
        self.assertEqual(self.transport.producerState, "paused")
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_exit_closes_without_answer(self) -> None:
        self.assertEqual(self.send(b"exit\n"), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_lines_before_exit_answered_after_not(self) -> None:
        self.assertEqual(self.send(b"a b\n quit \r\nc d\n"), b"ab\x00")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.send(b"more\n"), b"ab\x00")

    def test_spaced_exit_is_just_a_line(self) -> None:
        self.assertEqual(self.send(b"e x i t\n"), b"exit\x00")
        self.assertFalse(self.transport.disconnecting)

    def test_half_close_answers_last_line(self) -> None:
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.protocol))
        self.send(b"one\nlast line")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"one\x00lastline\x00")
        self.assertTrue(self.transport.disconnecting)

    def test_half_close_after_exit_word_sends_nothing(self) -> None:
        self.send(b"exit")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_overlong_line_gets_error_and_close(self) -> None:
        self.send(b"x" * 65 + b"\n")
        self.assertEqual(self.transport.value(), b"error: line too long\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.stats.limits["max_line"], 1)

    def test_overlong_line_without_lf_bounded(self) -> None:
        self.send(b"y" * 40, b"y" * 40)
        self.assertEqual(self.transport.value(), b"error: line too long\r\n")
        self.assertEqual(self.protocol.wrappedProtocol._buffer, b"")

    def test_line_at_the_limit_is_fine(self) -> None:
        self.assertEqual(self.send(b"z" * 64 + b"\n"), b"z" * 64 + b"\x00")

    def test_overlong_line_after_good_ones_in_one_block(self) -> None:
        self.send(b"ok\n" + b"x" * 100 + b"\nnever\n")
        self.assertEqual(self.transport.value(), b"ok\x00error: line too long\r\n")

    def test_idle_client_disconnected(self) -> None:
        self.clock.advance(299)
        self.send(b"still here\n")
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.stats.limits["idle_timeout"], 1)


# Telnet shapes: (what the client sends, what comes back), in stream order.
TELNET = [
    # Ctrl-C: IAC IP IAC DO TIMING-MARK, answered WONT TM (the client shows nothing until then)
    (b"a b\xff\xf4\xff\xfd\x06c\n", b"\xff\xfc\x06abc\x00"),
    (b"a\nb\xff\xfb\x18\n", b"a\x00\xff\xfe\x18b\x00"),  # WILL x: DONT x, after a's answer
    (b"\xff\xfc\x01\xff\xfe\x03ok\n", b"ok\x00"),  # WONT, DONT: nothing to answer
    (b"\xff\xfa\x18\x00xterm\xff\xff\n\xff\xf0ok\n", b"ok\x00"),  # a subnegotiation, LF and all
    (b"\xff\xfa\x1fno end\xff\xf4ok\n", b"ok\x00"),  # one without SE ends at a command
    # NOP, DM, BRK, IP, AO, AYT, EC, EL, GA: two bytes each
    (b"o" + b"".join(bytes([0xFF, c]) for c in range(0xF1, 0xFA)) + b"k\n", b"ok\x00"),
    # not commands, data: IAC IAC (so a telnet client gets it back escaped), IAC before other bytes
    (b"\xff\xff \xff\x00\xff \xfe\n", b"\xff\xff\xff\xff\xfe\x00"),
]


class StripTelnetTests(SynchronousTestCase):
    setUp = StripProtocolTests.setUp
    send = StripProtocolTests.send

    def test_commands_taken_out_and_answered_however_cut(self) -> None:
        # Regression: telnet's Ctrl-C came back inside the next answer, and the
        # telnet client showed no output again for want of an answer to DO TM.
        for sent, answered in TELNET:
            for cut in range(len(sent)):
                protocol, transport = connect(self.factory)
                protocol.dataReceived(sent[:cut])
                protocol.dataReceived(sent[cut:])
                self.assertEqual(transport.value(), answered, (sent, cut))
                protocol.connectionLost(None)

    def test_commands_byte_by_byte(self) -> None:
        for sent, answered in TELNET:
            self.transport.clear()
            self.send(*(sent[i : i + 1] for i in range(len(sent))))
            self.assertEqual(self.transport.value(), answered, sent)

    def test_nothing_answered_after_exit(self) -> None:
        self.assertEqual(self.send(b"a\nexit\n\xff\xfd\x06"), b"a\x00")
        self.assertTrue(self.transport.disconnecting)

    def test_a_last_lone_0xff_is_data_at_half_close(self) -> None:
        self.send(b"one\xff")
        self.assertEqual(self.transport.value(), b"")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"one\xff\x00")

    def test_an_unfinished_command_at_half_close_is_dropped(self) -> None:
        self.send(b"one\xff\xfd")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"one\x00")

    def test_the_held_0xff_counts_toward_the_line_at_half_close(self) -> None:
        self.send(b"z" * 64 + b"\xff")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"error: line too long\r\n")


class StripTelnetBudgetTests(SynchronousTestCase):
    """Each command costs Python work where text costs none: a connection
    gets MAX_TELNET_COMMANDS of them (a telnet client sends two per Ctrl-C)."""

    setUp = StripProtocolTests.setUp
    send = StripProtocolTests.send

    def test_a_flood_of_commands_is_closed_at_the_budget(self) -> None:
        # Regression: 64 KiB of IAC NOP took 9.4 ms where text takes 0.2 ms,
        # without end: one client could pin the reactor every service shares.
        flood = b"\xff\xf1" * (4 * MAX_TELNET_COMMANDS)
        self.assertEqual(self.send(flood[:1001], flood[1001:], b"\xff\xfd\x06more\n"), TOO_MANY_COMMANDS)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.wrappedProtocol._telnet.commands, MAX_TELNET_COMMANDS + 1)
        self.assertEqual(self.stats.limits["telnet_commands"], 1)

    def test_one_line_when_closing_for_another_reason(self) -> None:
        self.assertEqual(
            self.send(b"x" * 100 + b"\xff\xf1" * (2 * MAX_TELNET_COMMANDS)), b"error: line too long\r\n"
        )
        self.assertEqual(self.stats.limits["telnet_commands"], 0)

    def test_every_kind_of_command_counts(self) -> None:
        ctrl_c = b"\xff\xf4\xff\xfd\x06"  # two commands
        subnegotiation = b"\xff\xfa\x18\x00xterm\xff\xf0"  # one
        self.send(ctrl_c * (MAX_TELNET_COMMANDS // 2 - 1), subnegotiation, b"\xff\xf1", b"ok\n")
        self.assertEqual(self.protocol.wrappedProtocol._telnet.commands, MAX_TELNET_COMMANDS)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"\xff\xfc\x06" * (MAX_TELNET_COMMANDS // 2 - 1) + b"ok\x00")
        self.assertEqual(self.send(b"\xff\xfb\x18")[-len(TOO_MANY_COMMANDS) :], TOO_MANY_COMMANDS)
        self.assertTrue(self.transport.disconnecting)

    def test_0xff_as_data_is_no_command(self) -> None:
        # IAC IAC, IAC before a non-command byte, IAC IAC inside a
        # subnegotiation: data, however much of it, and no command counted.
        lines = (b"\xff\xff\xff\x00" * 8 + b"\n") * (MAX_TELNET_COMMANDS // 4)
        inside = b"\xff\xfa\x18" + b"\xff\xff" * (2 * MAX_TELNET_COMMANDS) + b"\xff\xf0"
        answers = lines.replace(b"\x00", b"").replace(b"\n", b"\x00")
        self.assertEqual(self.send(lines, inside, b"ok\n"), answers + b"ok\x00")
        self.assertEqual(self.protocol.wrappedProtocol._telnet.commands, 1)
        self.assertFalse(self.transport.disconnecting)

    def test_no_filter_until_a_telnet_command(self) -> None:
        # A read without 0xFF skips the filter until one has come; after it,
        # even such a read goes through it (a command or a subnegotiation may
        # be cut across reads).
        wrapped = self.protocol.wrappedProtocol
        self.send(b"text")
        self.assertIsNone(wrapped._telnet)
        for sent in (b"\xff", b"\xfd", b"\x06", b"\xff\xfa\x18", b"x\nterm", b"\xff\xf0ok\n"):
            self.send(sent)
        self.assertIsNotNone(wrapped._telnet)
        self.assertEqual(self.transport.value(), b"\xff\xfc\x06textok\x00")


class StripFactoryLimitTests(SynchronousTestCase):
    def test_eleventh_client_told_and_dropped(self) -> None:
        clock = Clock()
        stats = ServiceStats("strip", "lines")
        factory = GuardedFactory(
            strip.StripFactory(64, stats), ConnectionPolicy(max_clients=10), stats, clock
        )
        clients = [connect(factory) for _ in range(10)]
        self.assertEqual(stats.current, 10)
        _extra, extra_transport = connect(factory)
        self.assertEqual(extra_transport.value(), b"too many users\r\n")
        self.assertTrue(extra_transport.disconnecting)
        self.assertEqual(stats.limits["max_clients"], 1)
        # the others are undisturbed
        first, first_transport = clients[0]
        first.dataReceived(b"a b\n")
        self.assertEqual(first_transport.value(), b"ab\x00")
        # one leaves; a newcomer gets in
        first.connectionLost(None)
        self.assertEqual(stats.current, 9)
        newcomer, newcomer_transport = connect(factory)
        newcomer.dataReceived(b"c d\n")
        self.assertEqual(newcomer_transport.value(), b"cd\x00")

"""The shared policies added for the chat server: bounded output, login
delays, and a shutdown that lets the last words out."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sockproto.limits import SHUTDOWN_GRACE, ConnectionPolicy, FailureDelays, GuardedFactory, OutputBuffer
from sockproto.stats import ServiceStats

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class OutputBufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = StringTransport()
        self.overflows = 0
        self.output = OutputBuffer(self.transport, 100, self.overflowed)

    def overflowed(self) -> None:
        self.overflows += 1

    def test_registers_as_streaming_producer(self) -> None:
        self.assertIs(self.transport.producer, self.output)
        self.assertTrue(self.transport.streaming)

    def test_writes_straight_through_while_the_transport_keeps_up(self) -> None:
        for _ in range(50):
            self.output.write(b"x" * 10)
        self.assertEqual(len(self.transport.value()), 500)
        self.assertEqual(self.output.pending, 0)

    def test_waits_while_paused_and_moves_on_in_order(self) -> None:
        self.output.write(b"a")
        self.output.pauseProducing()
        self.output.write(b"b")
        self.output.write(b"c")
        self.assertEqual(self.transport.value(), b"a")
        self.assertEqual(self.output.pending, 2)
        self.output.resumeProducing()
        self.assertEqual(self.transport.value(), b"abc")
        self.assertEqual(self.output.pending, 0)

    def test_resume_stops_when_the_transport_is_full_again(self) -> None:
        self.output.pauseProducing()
        for chunk in (b"1", b"2", b"3"):
            self.output.write(chunk)

        original = self.transport.write

        def write_then_full(data: bytes) -> None:
            original(data)
            self.output.pauseProducing()

        self.transport.write = write_then_full  # type: ignore[method-assign]
        self.output.resumeProducing()
        self.assertEqual(self.transport.value(), b"1")
        self.assertEqual(self.output.pending, 2)

    def test_over_the_limit_drops_everything_once(self) -> None:
        self.output.pauseProducing()
        self.output.write(b"x" * 100)
        self.assertEqual(self.overflows, 0)
        self.output.write(b"y")
        self.assertEqual(self.overflows, 1)
        self.assertEqual(self.output.pending, 0)
        self.assertIsNone(self.transport.producer)
        self.output.write(b"z" * 1000)
        self.output.resumeProducing()
        self.assertEqual(self.overflows, 1)
        self.assertEqual(self.transport.value(), b"")

    def test_zero_limit_is_no_cap(self) -> None:
        output = OutputBuffer(StringTransport(), 0, self.overflowed)
        output.pauseProducing()
        for _ in range(1000):
            output.write(b"x" * 1000)
        self.assertEqual((output.pending, self.overflows), (1_000_000, 0))

    def test_finish_hands_over_and_unregisters(self) -> None:
        self.output.pauseProducing()
        self.output.write(b"late")
        self.output.finish()
        self.assertEqual(self.transport.value(), b"late")
        self.assertIsNone(self.transport.producer)
        self.output.write(b"after")
        self.assertEqual(self.transport.value(), b"late")

    def test_discard_drops_and_unregisters(self) -> None:
        self.output.pauseProducing()
        self.output.write(b"late")
        self.output.discard()
        self.output.finish()
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.transport.producer)

    def test_stop_producing_when_the_connection_is_gone(self) -> None:
        self.output.pauseProducing()
        self.output.write(b"late")
        self.output.stopProducing()
        self.output.write(b"more")
        self.assertEqual((self.output.pending, self.transport.value()), (0, b""))


class FailureDelaysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.delays = FailureDelays(1.0, 8.0, self.clock.seconds, forget=600)

    def test_doubles_up_to_the_cap(self) -> None:
        waits = []
        for _ in range(6):
            waits.append(self.delays.failed("a"))
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 8, 8, 8])

    def test_answers_to_one_peer_queue_up(self) -> None:
        # Five tries at once, on five connections: each waits for the last.
        self.assertEqual([self.delays.failed("a") for _ in range(5)], [1, 3, 7, 15, 23])
        self.assertEqual(self.delays.wait("a"), 23)
        self.assertEqual(self.delays.wait("b"), 0)

    def test_success_forgets(self) -> None:
        self.delays.failed("a")
        self.delays.failed("a")
        self.assertEqual(self.delays.wait("a"), 3)
        self.clock.advance(3)
        self.delays.succeeded("a")
        self.assertEqual(self.delays.failed("a"), 1)

    def test_quiet_peers_forgotten(self) -> None:
        for _ in range(3):
            self.delays.failed("a")
        self.clock.advance(7 + 600)
        self.assertEqual(self.delays.wait("a"), 0)
        self.assertEqual(len(self.delays), 0)
        self.assertEqual(self.delays.failed("a"), 1)

    def test_bounded(self) -> None:
        delays = FailureDelays(1.0, 8.0, self.clock.seconds, max_keys=100)
        for source in range(10_000):
            delays.failed(source)
        self.assertEqual(len(delays), 100)

    def test_zero_base_is_off(self) -> None:
        delays = FailureDelays(0, 8.0, self.clock.seconds)
        self.assertEqual([delays.failed("a") for _ in range(10)], [0] * 10)
        self.assertEqual((delays.wait("a"), len(delays)), (0, 0))


class Farewell(Protocol):
    def server_stopping(self) -> bytes:
        return b"bye\r\n"


class Silent(Protocol):
    pass


class ShutdownTests(SynchronousTestCase):
    """The reactor drops unsent output when it stops: the stop waits for the goodbyes."""

    def setUp(self) -> None:
        self.clock = Clock()
        stats = ServiceStats("test", "things")
        self.factory = GuardedFactory(Factory.forProtocol(Farewell), ConnectionPolicy(), stats, self.clock)

    def connect(self) -> tuple[object, StringTransport]:
        wrapper = self.factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_waits_until_every_connection_is_closed(self) -> None:
        (one, one_transport), (two, _) = self.connect(), self.connect()
        stopped = self.factory.server_stopping()
        self.assertEqual(one_transport.value(), b"bye\r\n")
        self.assertTrue(one_transport.disconnecting)
        fired: list[object] = []
        stopped.addCallback(fired.append)
        one.connectionLost(None)
        self.assertEqual(fired, [])
        two.connectionLost(None)
        self.assertEqual(fired, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # grace timer and aborts cancelled

    def test_waits_at_most_the_grace(self) -> None:
        self.connect()
        fired: list[object] = []
        self.factory.server_stopping().addCallback(fired.append)
        self.clock.advance(SHUTDOWN_GRACE - 0.1)
        self.assertEqual(fired, [])
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])

    def test_nothing_to_wait_for(self) -> None:
        self.assertIsNone(self.factory.server_stopping())
        silent = GuardedFactory(
            Factory.forProtocol(Silent), ConnectionPolicy(), ServiceStats("s", "x"), self.clock
        )
        wrapper = silent.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        self.assertIsNone(silent.server_stopping())
        self.assertFalse(transport.disconnecting)

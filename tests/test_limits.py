"""The shared policies: connection guard, gentle close, token buckets."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from sockproto.limits import (
    HOLD_LIMIT,
    LOG_SUMMARY_INTERVAL,
    BucketTable,
    ConnectionPolicy,
    GuardedFactory,
    LogBudget,
    TokenBucket,
    at_turn_end,
    turn_end,
)
from sockproto.stats import ServiceStats

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(data.upper())

    def connectionLost(self, reason: object) -> None:
        self.lost = True


class Polite(Recorder):
    def idle_timed_out(self) -> bytes:
        return b"bye: idle\r\n"


class StubbornTransport(StringTransport):
    """A peer that never reads: loseConnection never completes."""

    connected = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.connected = False


def guarded(
    protocol: type[Protocol] = Recorder, **policy: object
) -> tuple[GuardedFactory, ServiceStats, Clock]:
    clock = Clock()
    stats = ServiceStats("test", "things")
    factory = GuardedFactory(Factory.forProtocol(protocol), ConnectionPolicy(**policy), stats, clock)
    return factory, stats, clock


class GuardedFactoryTests(SynchronousTestCase):
    def test_counts_connections_and_bytes(self) -> None:
        factory, stats, _ = guarded()
        wrapper = factory.buildProtocol(PEER)
        wrapper.makeConnection(StringTransport())
        wrapper.dataReceived(b"abc")
        wrapper.writeSequence([b"x", b"yz"])
        self.assertEqual((stats.current, stats.total), (1, 1))
        self.assertEqual((stats.bytes_in, stats.bytes_out), (3, 6))
        wrapper.connectionLost(None)
        self.assertEqual((stats.current, stats.total), (0, 1))

    def test_no_cap_when_zero(self) -> None:
        factory, stats, _ = guarded(max_clients=0)
        for _ in range(50):
            factory.buildProtocol(PEER).makeConnection(StringTransport())
        self.assertEqual(stats.current, 50)
        self.assertEqual(stats.limits["max_clients"], 0)

    def test_refusals_logged_within_a_budget_then_summed_up(self) -> None:
        factory, stats, clock = guarded(max_clients=1, refusal_log_rate=(1.0, 2.0))
        factory.buildProtocol(PEER).makeConnection(StringTransport())
        with capturedLogs() as events:
            for _ in range(5):
                refused = factory.buildProtocol(PEER)
                transport = StringTransport()
                refused.makeConnection(transport)
                self.assertEqual(transport.value(), b"too many users\r\n")  # each one is still told
            clock.advance(LOG_SUMMARY_INTERVAL)
        lines = [formatEvent(event) for event in events]
        self.assertEqual(stats.limits["max_clients"], 5)
        self.assertEqual(lines[:2], ["test: refused 192.168.1.1:54321: too many clients (max 1)"] * 2)
        self.assertEqual(len(lines), 3)
        self.assertEqual(
            lines[2],
            "test: 3 more connections refused in the last 10 s: too many clients (max 1);"
            " not logged one by one (--refusal-log-rate)",
        )

    def test_overflow_message_is_configurable(self) -> None:
        factory, _, _ = guarded(max_clients=1, overflow_message=b"-ERR [SYS/TEMP] busy\r\n")
        factory.buildProtocol(PEER).makeConnection(StringTransport())
        refused = factory.buildProtocol(PEER)
        transport = StringTransport()
        refused.makeConnection(transport)
        refused.dataReceived(b"ignored\n")
        self.assertEqual(transport.value(), b"-ERR [SYS/TEMP] busy\r\n")

    def test_half_close_passed_only_when_wanted(self) -> None:
        factory, _, _ = guarded()
        wrapper = factory.buildProtocol(PEER)
        wrapper.makeConnection(StringTransport())
        self.assertFalse(IHalfCloseableProtocol.providedBy(wrapper))

    def test_idle_timeout_says_goodbye_through_hook(self) -> None:
        factory, stats, clock = guarded(Polite, idle_timeout=10)
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        clock.advance(10)
        self.assertEqual(transport.value(), b"bye: idle\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stats.limits["idle_timeout"], 1)

    def test_idle_timeout_off(self) -> None:
        factory, _, clock = guarded(idle_timeout=0)
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        clock.advance(10**6)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_aborts_a_peer_that_never_reads(self) -> None:
        factory, _, clock = guarded()
        wrapper = factory.buildProtocol(PEER)
        transport = StubbornTransport()
        wrapper.makeConnection(transport)
        wrapper.loseConnection()
        wrapper.loseConnection()  # twice schedules one abort, not two
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(14.9)
        self.assertFalse(getattr(transport, "aborted", False))
        clock.advance(0.2)
        self.assertTrue(transport.aborted)

    def test_closing_connection_is_not_timed_out(self) -> None:
        # Regression: a connection the service closed but whose peer did not
        # read yet was also "closed for idleness": a false log line and count.
        factory, stats, clock = guarded(idle_timeout=5)
        wrapper = factory.buildProtocol(PEER)
        transport = StubbornTransport()
        wrapper.makeConnection(transport)
        wrapper.loseConnection()
        with capturedLogs() as events:
            clock.advance(15)
        self.assertEqual(stats.limits["idle_timeout"], 0)
        self.assertEqual(events, [])
        self.assertTrue(transport.aborted)

    def test_close_unregisters_a_protocol_that_is_its_own_producer(self) -> None:
        # Regression: a paused one kept the transport from ever finishing the
        # close (it resumes the producer instead): every such close took the
        # 15 s abort, though the client read everything.
        factory, _, _ = guarded()
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        wrapper.registerProducer(wrapper.wrappedProtocol, True)
        wrapper.loseConnection()
        self.assertIsNone(transport.producer)

    def test_close_leaves_a_producer_of_data_registered(self) -> None:
        """A file being sent finishes first: the transport closes when it unregisters."""
        factory, _, _ = guarded()
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        sender = Recorder()
        wrapper.registerProducer(sender, False)
        wrapper.loseConnection()
        self.assertIs(transport.producer, sender)

    def test_close_that_completes_cancels_abort(self) -> None:
        factory, _, clock = guarded()
        wrapper = factory.buildProtocol(PEER)
        wrapper.makeConnection(StubbornTransport())
        wrapper.loseConnection()
        wrapper.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])


class LazyIdleTimerTests(SynchronousTestCase):
    """Reads only note the time; one timer checks it when it comes due."""

    def test_reads_postpone_the_timeout(self) -> None:
        factory, stats, clock = guarded(idle_timeout=10)
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        clock.advance(6)
        wrapper.dataReceived(b"x")
        clock.advance(6)
        self.assertFalse(transport.disconnecting)
        clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)  # 10 s after the last read
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stats.limits["idle_timeout"], 1)

    def test_one_timer_however_many_reads(self) -> None:
        factory, _, clock = guarded(idle_timeout=10)
        wrapper = factory.buildProtocol(PEER)
        wrapper.makeConnection(StringTransport())
        (timer,) = clock.getDelayedCalls()
        for _ in range(100):
            clock.advance(0.05)
            wrapper.dataReceived(b"x")
        self.assertEqual(clock.getDelayedCalls(), [timer])

    def test_reset_timeout_is_activity(self) -> None:
        factory, _, clock = guarded(idle_timeout=10)
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        clock.advance(9)
        wrapper.resetTimeout()  # e.g. POP3 while it sends a long message
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_stops_the_timer(self) -> None:
        factory, _, clock = guarded(idle_timeout=10)
        wrapper = factory.buildProtocol(PEER)
        wrapper.makeConnection(StringTransport())
        wrapper.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])


class Answers(Protocol):
    """Answers each read with several writes, and what the read asks for."""

    def dataReceived(self, data: bytes) -> None:
        for command in data.split():
            if command == b"big":
                self.transport.write(b"b" * (HOLD_LIMIT * 4))
            elif command == b"bye":
                self.transport.write(b"bye\n")
                self.transport.loseConnection()
                return
            elif command == b"later":
                reactor.callLater(0.01, self.later)
            elif command == b"str":
                try:
                    self.transport.write("text")  # type: ignore[arg-type]
                except TypeError:
                    self.transport.write(b"TypeError\n")
            else:
                self.transport.write(b"<")
                self.transport.writeSequence([command, b">"])
        self.transport.write(b"\n")
        self.factory.seen.append(self.transport.transport)  # the real transport, after the read

    def later(self) -> None:
        """Writes outside a read (a timer): held until the reactor turn ends."""
        self.transport.write(b"<l1>")
        self.transport.writeSequence([b"<l2>", b"\n"])
        real = self.transport.transport
        self.factory.held.append((list(self.transport._held), real.dataBuffer, list(real._tempDataBuffer)))


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiting: tuple[bytes, Deferred[bytes]] | None = None
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and self.received.endswith(self.waiting[0]):
            done, self.waiting = self.waiting[1], None
            done.callback(self.received)

    def until(self, end: bytes) -> Deferred[bytes]:
        self.waiting = (end, Deferred())
        return self.waiting[1]

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


class HeldWritesOverTcpTests(TestCase):
    """What a protocol writes while it handles a read goes out in one send
    when the read is handled, in order, over a real TCP connection."""

    @inlineCallbacks
    def setUp(self) -> Any:
        stats = ServiceStats("test", "things")
        factory = Factory.forProtocol(Answers)
        factory.seen = []  # type: ignore[attr-defined]
        factory.held = []  # type: ignore[attr-defined]
        self.held = factory.held  # type: ignore[attr-defined]
        self.seen = factory.seen  # type: ignore[attr-defined]
        self.guarded = GuardedFactory(factory, ConnectionPolicy(), stats, reactor)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.guarded)
        self.addCleanup(port.stopListening)
        self.client = Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield endpoint.connect(Factory.forProtocol(lambda: self.client))
        self.addCleanup(self._close)

    def _close(self) -> Any:
        if self.client.transport.connected:
            self.client.transport.loseConnection()
            return self.client.closed
        return None

    @inlineCallbacks
    def test_answers_in_order_sent_at_once(self) -> Any:
        self.client.transport.write(b"one two three\n")
        received = yield self.client.until(b"\n")
        self.assertEqual(received, b"<one><two><three>\n")
        (transport,) = self.seen[:1]
        # Sent before the reactor went round again: nothing left to write.
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertNotIn(transport, reactor.getWriters())

    @inlineCallbacks
    def test_big_answer_whole_and_in_order(self) -> Any:
        self.client.transport.write(b"a big z\n")
        received = yield self.client.until(b"<z>\n")
        self.assertEqual(received, b"<a>" + b"b" * (HOLD_LIMIT * 4) + b"<z>\n")

    @inlineCallbacks
    def test_close_after_the_last_words(self) -> Any:
        self.client.transport.write(b"x bye\n")
        yield self.client.closed
        self.assertEqual(self.client.received, b"<x>bye\n")

    @inlineCallbacks
    def test_writes_outside_a_read_go_out_when_the_turn_ends(self) -> Any:
        self.client.transport.write(b"later\n")
        yield self.client.until(b"\n")
        received = yield self.client.until(b"<l1><l2>\n")
        self.assertEqual(received, b"\n<l1><l2>\n")
        # While the timer ran they were held, nothing in the transport's buffer;
        # once sent, nothing is left to write.
        self.assertEqual(self.held, [([b"<l1>", b"<l2>", b"\n"], b"", [])])
        (transport,) = self.seen[:1]
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertNotIn(transport, reactor.getWriters())

    @inlineCallbacks
    def test_text_refused_as_by_a_transport(self) -> Any:
        self.client.transport.write(b"str\n")
        received = yield self.client.until(b"\n")
        self.assertEqual(received, b"TypeError\n\n")


@implementer(IHalfCloseableProtocol)
class HalfCloser(Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def readConnectionLost(self) -> None:
        self.events.append("EOF")

    def connectionLost(self, reason: Any) -> None:
        self.events.append(type(reason.value).__name__)


class ResetSeenBySendTests(SynchronousTestCase):
    """The peer resets the connection and our direct send() gets the error:
    the socket then reads as a clean EOF, but the protocol must see a reset."""

    def connection(self) -> tuple[HalfCloser, Any]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.close()  # sends now fail, reads see EOF
        factory, _, self.clock = guarded(HalfCloser)
        wrapper = factory.buildProtocol(PEER)
        transport = tcp.Connection(ours, wrapper, reactor)
        transport.connected = 1
        self.addCleanup(transport.stopWriting)
        self.addCleanup(ours.close)
        wrapper.makeConnection(transport)
        wrapper.write(b"x")  # outside a read: sent when the turn ends
        self.clock.advance(0)
        return wrapper.wrappedProtocol, transport

    def test_eof_after_a_failed_send_is_a_reset(self) -> None:
        protocol, transport = self.connection()
        self.assertIsInstance(transport.doRead(), ConnectionDone)
        transport.readConnectionLost(Failure(ConnectionDone()))  # what the reactor does next
        self.assertEqual(protocol.events, ["ConnectionLost"])

    def test_a_clean_close_after_a_failed_send_is_a_reset(self) -> None:
        protocol, transport = self.connection()
        transport.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.events, ["ConnectionLost"])


class PollingClock(Clock):
    """A Clock that has a reactor's doIteration: one poll, whose events are
    the calls in ``events``."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def doIteration(self, timeout: float | None) -> None:
        events, self.events = self.events, []
        for event in events:
            event()


class AnswerWhenTests(SynchronousTestCase):
    """An answer leaves as soon as its read is handled when the last poll
    brought one read; after a busier poll it waits for the poll's end."""

    def setUp(self) -> None:
        ours, self.theirs = socket.socketpair()
        ours.setblocking(False)
        self.theirs.setblocking(False)
        self.addCleanup(self.theirs.close)
        self.addCleanup(ours.close)
        self.clock = PollingClock()
        factory = GuardedFactory(
            Factory.forProtocol(Recorder), ConnectionPolicy(), ServiceStats("t", "t"), self.clock
        )
        self.wrapper = factory.buildProtocol(PEER)
        transport = tcp.Connection(ours, self.wrapper, reactor)
        transport.connected = 1
        self.wrapper.makeConnection(transport)
        self.seen: list[bytes] = []

    def read_then_look(self, data: bytes) -> None:
        self.wrapper.dataReceived(data)
        self.seen.append(self.received())

    def received(self) -> bytes:
        try:
            return self.theirs.recv(100)
        except BlockingIOError:
            return b""

    def test_one_read_a_poll_answered_at_once(self) -> None:
        self.clock.events = [lambda: self.read_then_look(b"a")]
        self.clock.doIteration(0)
        self.assertEqual(self.seen, [b"A"])

    def test_after_a_busy_poll_answers_wait_for_its_end(self) -> None:
        self.clock.events = [lambda: self.read_then_look(b"a"), lambda: self.read_then_look(b"b")]
        self.clock.doIteration(0)  # two reads: the next poll batches
        self.seen.clear()
        self.clock.events = [lambda: self.read_then_look(b"c"), lambda: self.read_then_look(b"d")]
        self.clock.doIteration(0)
        self.assertEqual(self.seen, [b"", b""])
        self.assertEqual(self.received(), b"CD")  # in one send, as the poll ended


class TurnEndTests(SynchronousTestCase):
    def test_calls_made_once_the_turn_ends_with_those_they_add(self) -> None:
        clock = Clock()
        made: list[int] = []

        def first() -> None:
            made.append(1)
            at_turn_end(clock, lambda: made.append(3))

        at_turn_end(clock, first)
        at_turn_end(clock, lambda: made.append(2))
        self.assertEqual((made, len(clock.getDelayedCalls())), ([], 1))
        clock.advance(0)
        self.assertEqual(made, [1, 2, 3])
        self.assertEqual(clock.getDelayedCalls(), [])
        at_turn_end(clock, lambda: made.append(4))  # a new turn, a new call
        clock.advance(0)
        self.assertEqual(made, [1, 2, 3, 4])

    def test_calls_added_by_the_events_of_a_poll_made_as_it_returns(self) -> None:
        clock = PollingClock()
        turn_end(clock)  # as a GuardedFactory does when it is made
        made: list[str] = []
        clock.events = [lambda: at_turn_end(clock, lambda: made.append("a")), lambda: made.append("event")]
        clock.doIteration(0)
        self.assertEqual(made, ["event", "a"])
        self.assertEqual(clock.getDelayedCalls(), [])  # no timer needed, and the next poll may wait
        at_turn_end(clock, lambda: made.append("timer's"))  # outside a poll: a call due now
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.doIteration(0)  # made as the poll returns; the timer is cancelled
        self.assertEqual((made[-1], clock.getDelayedCalls()), ("timer's", []))

    def test_an_error_is_logged_and_the_others_still_made(self) -> None:
        clock = Clock()
        made: list[int] = []
        at_turn_end(clock, lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        at_turn_end(clock, lambda: made.append(1))
        with capturedLogs() as events:
            clock.advance(0)
        self.assertEqual(made, [1])
        self.assertEqual([e["log_format"] for e in events], ["error at the end of a reactor turn"])
        self.assertTrue(events[0]["log_failure"].check(ZeroDivisionError))
        self.flushLoggedErrors(ZeroDivisionError)


class LogBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.summaries: list[tuple[dict[str, int], float]] = []

        def summary(counts: dict[str, int], seconds: float) -> None:
            self.summaries.append((counts, seconds))

        self.budget = LogBudget(TokenBucket(1, 3, self.clock.seconds), self.clock, summary)

    def test_within_the_budget_then_counted_and_summed_up_once(self) -> None:
        self.assertEqual([self.budget.admit("a") for _ in range(5)], [True, True, True, False, False])
        self.clock.advance(1)
        self.assertEqual([self.budget.admit("b"), self.budget.admit("b")], [True, False])  # a token came back
        self.assertEqual(self.summaries, [])
        self.clock.advance(LOG_SUMMARY_INTERVAL - 1)
        self.assertEqual(self.summaries, [({"a": 2, "b": 1}, LOG_SUMMARY_INTERVAL)])
        self.clock.advance(LOG_SUMMARY_INTERVAL * 3)  # nothing held back: no line, no timer
        self.assertEqual((len(self.summaries), self.clock.getDelayedCalls()), (1, []))

    def test_first_of_each_kind_per_interval(self) -> None:
        self.assertEqual([self.budget.first_of("x") for _ in range(3)], [True, False, False])
        self.assertTrue(self.budget.first_of("y"))
        self.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(self.summaries, [({"x": 2}, LOG_SUMMARY_INTERVAL)])
        self.assertTrue(self.budget.first_of("x"))  # a new interval

    def test_flush_sums_up_now(self) -> None:
        for _ in range(4):
            self.budget.admit("a")
        self.clock.advance(1)
        self.budget.flush()
        self.assertEqual((self.summaries, self.clock.getDelayedCalls()), ([({"a": 1}, 1.0)], []))

    def test_no_bucket_logs_everything(self) -> None:
        budget = LogBudget(None, self.clock, lambda counts, seconds: None)
        self.assertTrue(all(budget.admit("a") for _ in range(1000)))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(rate=20, burst=40, now=clock.seconds)
        self.assertEqual(sum(bucket.take() for _ in range(100)), 40)
        clock.advance(0.5)
        self.assertEqual(sum(bucket.take() for _ in range(100)), 10)
        self.assertAlmostEqual(bucket.wait(), 0.05)

    def test_never_above_burst(self) -> None:
        clock = Clock()
        bucket = TokenBucket(rate=10, burst=5, now=clock.seconds)
        clock.advance(3600)
        self.assertEqual(sum(bucket.take() for _ in range(100)), 5)


class BucketTableTests(SynchronousTestCase):
    def test_per_key(self) -> None:
        clock = Clock()
        table = BucketTable(rate=1, burst=2, now=clock.seconds)
        self.assertEqual([table.allow("a") for _ in range(3)], [True, True, False])
        self.assertTrue(table.allow("b"))

    def test_bounded_size(self) -> None:
        clock = Clock()
        table = BucketTable(rate=1, burst=2, now=clock.seconds, max_keys=100)
        for source in range(10_000):
            table.allow(source)
        self.assertLessEqual(len(table), 100)

    def test_full_buckets_forgotten(self) -> None:
        clock = Clock()
        table = BucketTable(rate=10, burst=20, now=clock.seconds, max_keys=100)
        for source in range(50):
            table.allow(source)
        clock.advance(2)  # every bucket refilled
        table.allow("new")
        self.assertEqual(len(table), 1)

    def test_zero_rate_means_off(self) -> None:
        table = BucketTable(rate=0, burst=0, now=Clock().seconds)
        self.assertTrue(all(table.allow("a") for _ in range(1000)))

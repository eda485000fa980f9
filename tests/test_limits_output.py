"""The shared policies added for the chat server: bounded output, login
delays, and a shutdown that lets the last words out."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import config
from sockproto.limits import (
    LOGIN_DELAY_CAP,
    LOGINS_IN_FLIGHT,
    SHUTDOWN_GRACE,
    ConnectionPolicy,
    DelayedAnswer,
    FailureDelays,
    GuardedFactory,
    Login,
    OutputBudget,
    OutputBuffer,
    login_key,
    suite_logins,
    suite_output,
)
from sockproto.stats import ServiceStats
from tests.test_limits import guarded

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


class Backlog(Protocol):
    """Queues what it is given for a peer that does not read (a paused OutputBuffer)."""

    def connectionMade(self) -> None:
        self.output = OutputBuffer(self.transport, 0, lambda: None)
        self.output.pauseProducing()
        self.dropped = False

    def dataReceived(self, data: bytes) -> None:
        self.output.write(data * 100)

    def output_dropped(self) -> None:
        self.dropped = True
        self.output.discard()


class OutputBudgetTests(SynchronousTestCase):
    """One budget per service with the suite's above them: each connection
    reports what it holds; over a limit, the largest holders go first."""

    def setUp(self) -> None:
        self.clock = Clock()

    def service(self, name: str, limit: int = 0, suite: int = 0) -> tuple[GuardedFactory, ServiceStats]:
        stats = ServiceStats(name, "things")
        policy = ConnectionPolicy(max_output=limit, suite_max_output=suite)
        return GuardedFactory(Factory.forProtocol(Backlog), policy, stats, self.clock), stats

    def connect(self, factory: GuardedFactory, port: int) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", "127.0.0.1", port)
        wrapper = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_the_suite_drops_the_largest_holder_of_any_service(self) -> None:
        chat, chat_stats = self.service("chat", suite=5000)
        http, http_stats = self.service("http", suite=5000)
        (small, _), (big, big_transport) = self.connect(chat, 1), self.connect(http, 2)
        small.dataReceived(b"x" * 10)  # holds 1000
        big.dataReceived(b"y" * 30)  # holds 3000
        self.assertEqual((chat.output.total, http.output.total, chat.output.parent.total), (1000, 3000, 4000))
        with capturedLogs() as events:
            small.dataReceived(b"x" * 15)  # 2500 + 3000: over the suite's 5000
        self.assertTrue(big.wrappedProtocol.dropped)
        self.assertTrue(big_transport.disconnected)
        self.assertFalse(small.wrappedProtocol.dropped)
        self.assertEqual((http_stats.limits["suite_max_output"], chat_stats.limits), (1, {}))
        self.assertEqual(chat.output.parent.total, 2500)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "http: dropping 127.0.0.1:2: 3000 bytes of output unread, the most while the suite's clients"
                " held over 5000 bytes (--suite-max-output)"
            ],
        )

    def test_a_service_over_its_own_budget_drops_only_its_own(self) -> None:
        chat, chat_stats = self.service("chat", limit=2000, suite=100_000)
        http, _ = self.service("http", suite=100_000)
        (biggest, _), (other, _) = self.connect(http, 1), self.connect(chat, 2)
        biggest.dataReceived(b"y" * 50)  # 5000, but in http, which has room
        other.dataReceived(b"x" * 15)
        (first, _) = self.connect(chat, 3)
        first.dataReceived(b"x" * 10)  # chat: 1500 + 1000
        self.assertEqual((other.wrappedProtocol.dropped, first.wrappedProtocol.dropped), (True, False))
        self.assertFalse(biggest.wrappedProtocol.dropped)
        self.assertEqual((chat.output.total, chat_stats.limits["max_output"]), (1000, 1))

    def test_drops_until_under_and_recounts_each_time(self) -> None:
        chat, stats = self.service("chat", limit=3500)
        wrappers = [self.connect(chat, port)[0] for port in range(1, 5)]
        for wrapper in wrappers:
            wrapper.dataReceived(b"x" * 8)  # 800 each: 3200
        wrappers[0].dataReceived(b"x" * 30)  # 3800 for it: 6200 in all
        self.assertEqual([w.wrappedProtocol.dropped for w in wrappers], [True, False, False, False])
        self.assertEqual(wrappers[1].output_held(), 800)
        wrappers[1].wrappedProtocol.output.resumeProducing()  # it reads its backlog
        wrappers[1].wrappedProtocol.output.pauseProducing()  # and stops again
        self.assertEqual(chat.output.total, 1600)
        for wrapper in wrappers[1:]:
            wrapper.dataReceived(b"x" * 10)  # +1000 each: 2800, 1800, 1800 -> over at the third
        self.assertEqual([w.wrappedProtocol.dropped for w in wrappers], [True, False, True, False])
        self.assertEqual(stats.limits["max_output"], 2)

    def test_nothing_counted_without_a_cap(self) -> None:
        factory, _ = self.service("strip")
        wrapper, _ = self.connect(factory, 1)
        wrapper.dataReceived(b"x" * 10_000)
        self.assertEqual((factory.output.total, factory.output.parent.total), (0, 0))
        self.assertEqual(len(factory.output.holders), 0)

    def test_one_suite_budget_per_reactor(self) -> None:
        self.assertIs(suite_output(self.clock, 10), suite_output(self.clock, 10))
        self.assertIsNot(suite_output(self.clock, 10), suite_output(Clock(), 10))
        self.assertIsInstance(suite_output(self.clock, 10), OutputBudget)


class FailureDelaysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.delays = FailureDelays(8.0, self.clock, forget=600)

    def later(
        self, key: str, outcome: Login, answer: Any, release: Any = None, base: float = 1.0
    ) -> DelayedAnswer | None:
        """A login from ``key`` that takes its slot and is answered after its penalty."""
        slot = self.delays.begin(key)
        assert slot is not None
        return self.delays.answer_later(slot, base, outcome, answer, release)

    def test_doubles_up_to_the_cap(self) -> None:
        waits = []
        for _ in range(6):
            waits.append(self.delays.failed("a", 1.0))
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 8, 8, 8])

    def test_waits_of_tries_at_once_do_not_add_up(self) -> None:
        # Five tries at once, on five connections: each its own wait from
        # the count, none queued behind the others (that gave 1, 3, 7, 15, 23).
        self.assertEqual([self.delays.failed("a", 1.0) for _ in range(5)], [1, 2, 4, 8, 8])
        self.assertEqual(self.delays.failures("a"), 5)
        self.assertEqual(self.delays.failures("b"), 0)

    def test_no_answer_waits_longer_than_the_cap(self) -> None:
        # However many failures came before (2**n of them would overflow a float).
        waits = [self.delays.failed("a", 1.0) for _ in range(5000)]
        self.assertEqual(max(waits), 8)
        self.assertEqual(waits[-1], 8)

    def test_success_forgets(self) -> None:
        self.delays.failed("a", 1.0)
        self.delays.failed("a", 1.0)
        self.delays.succeeded("a")
        self.assertEqual((self.delays.failures("a"), self.delays.failed("a", 1.0)), (0, 1))

    def test_quiet_peers_forgotten(self) -> None:
        for _ in range(3):
            self.delays.failed("a", 1.0)
        self.clock.advance(599)
        self.assertEqual(self.delays.failures("a"), 3)
        self.clock.advance(1)  # 600 s after its last failure
        self.assertEqual(self.delays.failures("a"), 0)
        self.assertEqual(len(self.delays), 0)
        self.assertEqual(self.delays.failed("a", 1.0), 1)

    def test_bounded_least_recently_failed_forgotten_first(self) -> None:
        delays = FailureDelays(8.0, self.clock, max_keys=100)
        delays.failed("old", 1.0)
        delays.failed("busy", 1.0)
        for source in range(10_000):
            delays.failed(source, 1.0)
            if source % 50 == 0:
                delays.failed("busy", 1.0)
        self.assertEqual(len(delays), 100)
        self.assertEqual((delays.failures("old"), delays.failures(9999)), (0, 1))
        self.assertGreater(delays.failures("busy"), 0)

    def test_zero_base_answers_at_once_but_counts(self) -> None:
        # A service with no delay answers at once; its failures still count
        # for the other services sharing the table (POP3 and chat).
        self.assertEqual([self.delays.failed("a", 0) for _ in range(3)], [0] * 3)
        self.assertEqual(self.delays.failures("a"), 3)
        answers: list[str] = []
        self.assertIsNone(self.later("a", Login.FAILED, lambda: answers.append("now"), base=0))
        self.assertEqual((answers, self.delays.flying("a")), (["now"], 0))
        self.assertEqual(self.delays.penalty("a", 1.0), 8)  # another service's answers wait

    def test_answer_later_waits_and_can_be_cancelled(self) -> None:
        answers: list[int] = []
        first = self.later("a", Login.FAILED, lambda: answers.append(1))
        second = self.later("a", Login.FAILED, lambda: answers.append(2))
        assert first is not None and second is not None
        self.assertEqual((first.seconds, second.seconds), (1, 2))
        second.cancel()  # its peer went away
        second.cancel()
        self.assertFalse(second.active())
        self.assertEqual(self.delays.flying("a"), 1)  # its slot freed at once
        self.clock.advance(1)
        self.assertEqual((answers, first.active(), self.delays.flying("a")), ([1], False, 0))
        first.cancel()  # answered already: nothing to do
        self.clock.advance(10)
        self.assertEqual((answers, self.clock.getDelayedCalls()), ([1], []))

    def test_any_answer_to_a_penalized_key_waits_its_penalty(self) -> None:
        # Dovecot's auth penalty: a right password answered at once, while a
        # wrong one waits, tells the guesser to hang up and try the next.
        answers: list[str] = []
        self.assertIsNone(self.later("a", Login.SUCCEEDED, lambda: answers.append("clean")))
        self.assertEqual(answers, ["clean"])  # no failures: at once
        for _ in range(3):
            self.delays.failed("a", 1.0)
        self.assertEqual(self.delays.penalty("a", 1.0), 4)
        self.assertEqual(self.delays.penalty("a", 0.5), 2)  # each service's own base
        right = self.later("a", Login.SUCCEEDED, lambda: answers.append("right"))
        refused = self.later("a", Login.REFUSED, lambda: answers.append("in use"))
        assert right is not None and refused is not None
        self.assertEqual((right.seconds, refused.seconds), (4, 4))  # the current penalty
        self.assertEqual(self.delays.failures("a"), 3)  # no increment, not cleared yet
        self.clock.advance(3.9)
        self.assertEqual(answers, ["clean"])
        self.clock.advance(0.1)
        self.assertEqual(answers, ["clean", "right", "in use"])
        self.assertEqual(self.delays.failures("a"), 0)  # cleared once answered
        self.assertEqual(self.delays.penalty("b", 1.0), 0)

    def test_a_success_waits_at_most_the_cap(self) -> None:
        for _ in range(5000):
            self.delays.failed("a", 1.0)
        right = self.later("a", Login.SUCCEEDED, lambda: None)
        assert right is not None
        self.assertEqual(right.seconds, 8)

    def test_cancelled_success_releases_and_clears_nothing(self) -> None:
        released: list[str] = []
        self.delays.failed("a", 1.0)
        right = self.later(
            "a", Login.SUCCEEDED, lambda: released.append("answered"), lambda: released.append("released")
        )
        assert right is not None
        right.cancel()  # its peer hung up
        right.cancel()
        self.assertEqual((released, self.delays.flying("a")), (["released"], 0))
        self.clock.advance(10)
        self.assertEqual((released, self.clock.getDelayedCalls()), (["released"], []))
        # The guesser learns nothing from the next penalty either.
        self.assertEqual(self.delays.failures("a"), 1)
        answered = self.later("a", Login.SUCCEEDED, lambda: None, lambda: released.append("late"))
        assert answered is not None
        self.clock.advance(1)
        answered.cancel()  # answered already: nothing to release
        self.assertEqual(released, ["released"])

    def test_logins_in_flight_per_key_are_bounded(self) -> None:
        # Each answer waits only its own penalty, so without a bound a key
        # held a guess on every connection it could open: ~100 per 30 s.
        self.delays.failed("a", 1.0)
        first, second = self.delays.begin("a"), self.delays.begin("a")
        assert first is not None and second is not None
        self.assertIsNone(self.delays.begin("a"))  # refused, nothing checked
        self.assertIsNotNone(self.delays.begin("b"))  # other keys are not held up
        first.free()  # its peer hung up while the password was checked
        first.free()
        third = self.delays.begin("a")
        assert third is not None
        wait = self.delays.answer_later(third, 1.0, Login.FAILED, lambda: None)
        assert wait is not None
        self.assertIsNone(self.delays.begin("a"))  # the waiting answer is in flight
        self.clock.advance(wait.seconds)
        self.assertEqual(self.delays.flying("a"), 1)  # answered: freed
        second.free()
        self.assertEqual(self.delays.flying("a"), 0)

    def test_a_key_without_failures_is_not_bounded(self) -> None:
        # Many clients behind one address (a test suite's parallel logins
        # over loopback) log in at once; the first failure brings the bound.
        slots = [self.delays.begin("a") for _ in range(50)]
        self.assertNotIn(None, slots)
        self.delays.failed("a", 1.0)
        self.assertIsNone(self.delays.begin("a"))

    def test_guesses_per_key_are_bounded_by_the_penalty(self) -> None:
        # A guesser with 100 connections that retries on each as soon as it
        # is answered gets LOGINS_IN_FLIGHT guesses per cap, not 100.
        delays = FailureDelays(8.0, self.clock)
        for _ in range(10):
            delays.failed("a", 1.0)  # at the cap
        checked = 0

        def guess() -> None:
            nonlocal checked
            slot = delays.begin("a")
            if slot is None:
                return
            checked += 1
            delays.answer_later(slot, 1.0, Login.FAILED, guess)

        for _ in range(100):
            guess()
        self.clock.pump([1.0] * 80)  # 80 s: ten caps
        self.assertEqual(checked, LOGINS_IN_FLIGHT * 11)

    def test_one_table_for_the_suite_per_reactor(self) -> None:
        table = suite_logins(self.clock)
        self.assertIs(suite_logins(self.clock), table)
        self.assertIsNot(suite_logins(Clock()), table)
        self.assertEqual((table.cap, table.in_flight), (LOGIN_DELAY_CAP, LOGINS_IN_FLIGHT))


class LoginKeyTests(SynchronousTestCase):
    def key(self, address: Any) -> str:
        transport = StringTransport(peerAddress=address)
        return login_key(transport)

    def test_ipv4_is_its_address(self) -> None:
        self.assertEqual(self.key(IPv4Address("TCP", "10.0.0.1", 1234)), "10.0.0.1")

    def test_ipv4_mapped_ipv6_is_ipv4(self) -> None:
        self.assertEqual(self.key(IPv6Address("TCP", "::ffff:10.0.0.1", 1234)), "10.0.0.1")

    def test_other_ipv6_is_its_slash_64(self) -> None:
        # Rotating through a prefix would escape the penalty and flush the table.
        one = self.key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1))
        other = self.key(IPv6Address("TCP", "2001:db8:1:2:ffff:1:2:3%eth0", 2))
        self.assertEqual((one, other), ("2001:db8:1:2::/64", "2001:db8:1:2::/64"))
        self.assertEqual(self.key(IPv6Address("TCP", "2001:db8:1:3::1", 1)), "2001:db8:1:3::/64")

    def test_unix_sockets_and_anything_else_are_local(self) -> None:
        self.assertEqual(self.key(UNIXAddress(b"/tmp/client.sock")), "local")
        self.assertEqual(self.key(UNIXAddress(None)), "local")
        self.assertEqual(self.key(IPv4Address("TCP", "not-an-address", 1)), "local")
        self.assertEqual(login_key(object()), "local")


class Farewell(Protocol):
    def server_stopping(self) -> bytes:
        return b"bye\r\n"


class Silent(Protocol):
    """No hook: nothing to finish, nothing to say."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # like strip: reading follows writing

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Busy(Protocol):
    """Has work in progress when the stop comes: says goodbye once it is done."""

    def server_stopping(self) -> Deferred[bytes]:
        self.done: Deferred[bytes] = Deferred()
        return self.done


class Broken(Protocol):
    def server_stopping(self) -> bytes:
        raise RuntimeError("hook bug")


class ShutdownTests(SynchronousTestCase):
    """One mechanism for every TCP service: at a stop each connection finishes
    its work in progress, says its last words and closes, all within a grace
    period; the stop waits for that, since the reactor drops unsent output."""

    def factory_for(self, protocol: type[Protocol], **policy: object) -> GuardedFactory:
        """The factory's clock becomes the test's: one factory a test."""
        factory, _, self.clock = guarded(protocol, **policy)
        return factory

    def connect(self, factory: GuardedFactory) -> tuple[Any, StringTransport]:
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_waits_until_every_connection_is_closed(self) -> None:
        factory = self.factory_for(Farewell)
        (one, one_transport), (two, _) = self.connect(factory), self.connect(factory)
        stopped = factory.server_stopping()
        self.assertEqual(one_transport.value(), b"bye\r\n")
        self.assertTrue(one_transport.disconnecting)
        fired: list[object] = []
        stopped.addCallback(fired.append)
        one.connectionLost(None)
        self.assertEqual(fired, [])
        two.connectionLost(None)
        self.assertEqual(fired, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # grace timer and aborts cancelled

    def test_work_in_progress_finishes_before_the_goodbye(self) -> None:
        factory = self.factory_for(Busy)
        wrapper, transport = self.connect(factory)
        fired: list[object] = []
        factory.server_stopping(grace=30).addCallback(fired.append)
        self.assertFalse(transport.disconnecting)  # still working: not closed
        self.clock.advance(29)
        wrapper.wrappedProtocol.transport.write(b"the rest of the answer\r\n")
        wrapper.wrappedProtocol.done.callback(b"bye\r\n")
        self.assertEqual(transport.value(), b"the rest of the answer\r\nbye\r\n")
        self.assertTrue(transport.disconnecting)
        wrapper.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_the_grace_bounds_it_and_cuts_what_is_left(self) -> None:
        factory = self.factory_for(Busy)
        (busy, busy_transport), (done, _) = self.connect(factory), self.connect(factory)
        fired: list[object] = []
        with capturedLogs() as events:
            factory.server_stopping(grace=2.5).addCallback(fired.append)
            done.wrappedProtocol.done.callback(b"")
            done.connectionLost(None)
            self.clock.advance(2.4)
            self.assertEqual(fired, [])
            self.clock.advance(0.1)
        self.assertEqual(fired, [None])
        self.assertTrue(busy_transport.disconnected)  # aborted
        texts = [formatEvent(event) for event in events]
        self.assertIn("test: closing 2 connection(s), finishing work in progress for up to 2.5 s", texts)
        self.assertIn("test: 1 connection(s) still open after 2.5 s; cutting them", texts)
        busy.wrappedProtocol.done.callback(b"too late\r\n")  # nothing is written to a cut connection
        self.assertNotIn(b"too late", busy_transport.value())

    def test_default_grace(self) -> None:
        self.assertEqual(SHUTDOWN_GRACE, config.build({}).suite.shutdown_grace)
        factory = self.factory_for(Busy)
        self.connect(factory)
        fired: list[object] = []
        factory.server_stopping().addCallback(fired.append)
        self.clock.advance(SHUTDOWN_GRACE - 0.1)
        self.assertEqual(fired, [])
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])

    def test_zero_grace_cuts_at_once(self) -> None:
        factory = self.factory_for(Busy)
        _, transport = self.connect(factory)
        fired: list[object] = []
        with capturedLogs():
            factory.server_stopping(grace=0).addCallback(fired.append)
            self.clock.advance(0)
        self.assertEqual(fired, [None])
        self.assertTrue(transport.disconnected)

    def test_without_a_hook_closed_too_and_its_producer_let_go(self) -> None:
        """A registered producer would keep a TLS connection (and a TCP one
        whose producer is paused) from ever closing."""
        factory = self.factory_for(Silent)
        _, transport = self.connect(factory)
        self.assertIsNotNone(transport.producer)
        self.assertIsNotNone(factory.server_stopping())
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_nothing_to_wait_for(self) -> None:
        self.assertIsNone(self.factory_for(Farewell).server_stopping())

    def test_a_connection_closing_already_is_waited_for_not_asked(self) -> None:
        factory = self.factory_for(Farewell)
        wrapper, transport = self.connect(factory)
        wrapper.loseConnection()
        fired: list[object] = []
        factory.server_stopping().addCallback(fired.append)
        self.assertEqual(transport.value(), b"")
        wrapper.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_a_broken_hook_is_logged_and_the_connection_closed(self) -> None:
        factory = self.factory_for(Broken)
        _, transport = self.connect(factory)
        with capturedLogs() as events:
            factory.server_stopping()
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["log_failure"].value.args for e in events if "log_failure" in e], [("hook bug",)])
        self.flushLoggedErrors(RuntimeError)

    def test_idle_timeout_lets_a_producer_go_too(self) -> None:
        factory = self.factory_for(Silent, idle_timeout=5)
        _, transport = self.connect(factory)
        with capturedLogs():
            self.clock.advance(5)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

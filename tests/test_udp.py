"""The UDP responder's pure functions and protocol, driven by a Clock (no sockets)."""

from __future__ import annotations

import errno
import struct
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import config, strip, udp
from sockproto.limits import LOG_SUMMARY_INTERVAL
from sockproto.listening import Listener
from sockproto.stats import ServiceStats, Stats

PEER = ("127.0.0.1", 40000)
# 2026-11-22 04:03:05 UTC, a Sunday
NOW = datetime(2026, 11, 22, 4, 3, 5, tzinfo=UTC).timestamp()


class FakeDatagramTransport:
    """What a listening UDP port offers a DatagramProtocol; records what is sent."""

    def __init__(self, port: int = 9002, error: BaseException | None = None, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.error = error
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((datagram, addr))

    def getHost(self) -> Any:
        kind = IPv6Address if ":" in self.host else IPv4Address
        return kind("UDP", self.host, self.port)


class DaytimeTests(SynchronousTestCase):
    def test_two_digit_day(self) -> None:
        self.assertEqual(udp.format_daytime(datetime(2026, 11, 22, 4, 3, 5)), b"Sun Nov 22 04:03:05 2026\r\n")

    def test_day_without_padding_hours_with(self) -> None:
        self.assertEqual(udp.format_daytime(datetime(2026, 11, 5, 4, 3, 5)), b"Thu Nov 5 04:03:05 2026\r\n")

    def test_midnight_and_small_year(self) -> None:
        self.assertEqual(udp.format_daytime(datetime(999, 1, 1, 0, 0, 0)), b"Tue Jan 1 00:00:00 0999\r\n")

    def test_every_day_and_month_name(self) -> None:
        days = {udp.format_daytime(datetime(2024, 1, d)).split()[0] for d in range(1, 8)}
        self.assertEqual(days, {b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"})
        months = [udp.format_daytime(datetime(2024, m, 1)).split()[1] for m in range(1, 13)]
        self.assertEqual(b" ".join(months), b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec")

    def test_answer_is_local_time_whatever_the_datagram(self) -> None:
        expected = udp.format_daytime(datetime.fromtimestamp(NOW))
        for datagram in (b"", b"Ping !", b"\xff" * 65507):
            self.assertEqual(udp.daytime_answer(datagram, NOW), expected)


class TimeTests(SynchronousTestCase):
    def seconds(self, answer: bytes) -> int:
        self.assertEqual(len(answer), 4)
        return struct.unpack("!I", answer)[0]

    def test_unix_epoch(self) -> None:
        self.assertEqual(self.seconds(udp.rfc868_time(0)), 2_208_988_800)

    def test_now(self) -> None:
        self.assertEqual(self.seconds(udp.time_answer(b"", NOW)), int(NOW) + 2_208_988_800)

    def test_fractions_are_dropped(self) -> None:
        self.assertEqual(udp.rfc868_time(100.999), udp.rfc868_time(100))

    def test_era_wrap_in_2036(self) -> None:
        era_end = datetime(2036, 2, 7, 6, 28, 16, tzinfo=UTC).timestamp()
        self.assertEqual(udp.rfc868_time(era_end - 1), b"\xff\xff\xff\xff")
        self.assertEqual(udp.rfc868_time(era_end), b"\x00\x00\x00\x00")
        later = datetime(2040, 1, 1, tzinfo=UTC).timestamp()
        self.assertEqual(self.seconds(udp.rfc868_time(later)), int(later) + 2_208_988_800 - 2**32)


class OtherModeTests(SynchronousTestCase):
    def test_echo_is_identity(self) -> None:
        for datagram in (b"", b"Ping !", bytes(range(256)) * 255):
            self.assertEqual(udp.echo_answer(datagram, NOW), datagram)

    def test_strip_reuses_the_strip_server(self) -> None:
        self.assertEqual(udp.strip_answer(b" Ping !\r\n", NOW), b"Ping!\x00")
        self.assertEqual(udp.strip_answer(b"", NOW), strip.answer(b""))

    def test_every_mode_of_the_settings_has_a_responder(self) -> None:
        for mode in udp.RESPONDERS:
            self.assertEqual(config.build({("udp", "mode"): (mode, "test")}).udp.mode, mode)
        with self.assertRaises(config.ConfigError):
            config.build({("udp", "mode"): ("chargen", "test")})

    @given(st.binary(max_size=2000), st.floats(min_value=-(2**40), max_value=2**40))
    @settings(max_examples=200)
    def test_answers_are_bytes_for_anything(self, datagram: bytes, now: float) -> None:
        for mode, answer in udp.RESPONDERS.items():
            if mode == "daytime" and not 0 <= now < 2**37:
                continue  # beyond datetime's range; the reactor's clock never is
            self.assertIsInstance(answer(datagram, now), bytes)


class ResponderTestCase(SynchronousTestCase):
    mode = "daytime"
    options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.stats = ServiceStats("udp", "datagrams")
        self.events: list[dict[str, Any]] = []
        self.patch(udp, "log", Logger(namespace="sockproto", observer=self.events.append))
        self.protocol, self.transport = self.responder(**self.options)

    def responder(self, transport: FakeDatagramTransport | None = None, **options: Any) -> Any:
        protocol = udp.UdpResponder(
            udp.RESPONDERS[self.mode], self.stats, self.clock, mode=self.mode, **options
        )
        transport = transport or FakeDatagramTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, datagram: bytes, peer: tuple[str, int] = PEER, count: int = 1) -> list[bytes]:
        before = len(self.transport.sent)
        for _ in range(count):
            self.protocol.datagramReceived(datagram, peer)
        return [data for data, _ in self.transport.sent[before:]]

    def log_lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def counters(self) -> dict[str, int]:
        counts = dict(self.stats.counters)
        accounted = sum(counts.get(k, 0) for k in ("answered", "rate_limited", "refused", "send_failed"))
        self.assertEqual(counts.get("received", 0), accounted, "every datagram is counted once")
        return counts


class ResponderTests(ResponderTestCase):
    def test_seed_exchange(self) -> None:
        expected = udp.format_daytime(datetime.fromtimestamp(NOW))
        self.assertEqual(self.send(b"Ping !"), [expected])
        self.assertEqual(self.transport.sent[0][1], PEER)
        self.assertIn("udp: 127.0.0.1:40000,Ping !", self.log_lines())
        self.assertEqual(self.counters(), {"received": 1, "answered": 1})
        self.assertEqual((self.stats.handled, self.stats.total), (1, 1))
        self.assertEqual((self.stats.bytes_in, self.stats.bytes_out), (6, len(expected)))

    def test_says_what_it_does_at_start(self) -> None:
        self.assertIn(
            "udp: answering daytime; 20 answers/s per source, burst 40; no-amplify off", self.log_lines()
        )

    def test_empty_and_largest_datagrams(self) -> None:
        self.assertEqual(len(self.send(b"")), 1)
        self.assertEqual(len(self.send(b"x" * 65507)), 1)

    def test_log_line_cannot_be_forged(self) -> None:
        datagram = b"hi\r\n2026-11-22 [sockproto#info] forged\x1b[2J" + b"z" * 1000
        self.send(datagram)
        line = self.log_lines()[-1]
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)
        self.assertNotIn("\x1b", line)
        self.assertTrue(line.startswith("udp: 127.0.0.1:40000,hi\\r\\n2026-11-22"), line)
        self.assertIn("\\x1b[2J", line)
        self.assertTrue(line.endswith(f"z...(+{len(datagram) - 200} bytes)"), line)

    def test_ipv6_peer(self) -> None:
        self.send(b"x", ("::1", 5000))
        self.assertEqual(self.transport.sent[-1][1], ("::1", 5000))
        self.assertIn("udp: [::1]:5000,x", self.log_lines())


class RateLimitTests(ResponderTestCase):
    def test_burst_then_rate(self) -> None:
        self.assertEqual(len(self.send(b"x", count=100)), 40)
        self.clock.advance(0.5)
        self.assertEqual(len(self.send(b"x", count=100)), 10)
        self.clock.advance(10)
        self.assertEqual(len(self.send(b"x", count=100)), 40)
        self.assertEqual(self.counters(), {"received": 300, "answered": 90, "rate_limited": 210})
        self.assertEqual(self.stats.limits["rate"], 210)

    def test_per_source_address_not_per_port(self) -> None:
        answered = sum(len(self.send(b"x", ("10.0.0.1", port))) for port in range(1024, 1124))
        self.assertEqual(answered, 40)
        self.assertEqual(len(self.send(b"x", ("10.0.0.2", 1024))), 1)

    def test_steady_rate_over_time(self) -> None:
        self.send(b"x", count=40)  # empty the bucket
        answered = 0
        for _ in range(1000):  # 10 s at 100 datagrams a second
            self.clock.advance(0.01)
            answered += len(self.send(b"x"))
        self.assertIn(answered, (199, 200, 201))

    def test_table_of_sources_is_bounded(self) -> None:
        protocol, _ = self.responder(max_sources=100)
        for n in range(20000):
            protocol.datagramReceived(b"x", (f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 5000))
        self.assertLessEqual(len(protocol.buckets), 100)

    def test_dropped_datagrams_cost_no_answer(self) -> None:
        made: list[bytes] = []

        def answer(datagram: bytes, now: float) -> bytes:
            made.append(datagram)
            return datagram

        protocol = udp.UdpResponder(answer, self.stats, self.clock)
        protocol.makeConnection(FakeDatagramTransport())
        for _ in range(100):
            protocol.datagramReceived(b"x", PEER)
        self.assertEqual(len(made), 40)

    def test_no_amplify_refusals_spend_no_tokens(self) -> None:
        protocol, transport = self.responder(no_amplify=True)
        for _ in range(100):
            protocol.datagramReceived(b"short", PEER)
        for _ in range(100):
            protocol.datagramReceived(b"x" * 40, PEER)
        self.assertEqual(len(transport.sent), 40)

    def test_rate_zero_turns_the_limit_off(self) -> None:
        protocol, transport = self.responder(rate=(0.0, 0.0))
        for _ in range(1000):
            protocol.datagramReceived(b"x", PEER)
        self.assertEqual(len(transport.sent), 1000)


class LoopProtectionTests(ResponderTestCase):
    def test_small_service_ports_and_own_port_unanswered(self) -> None:
        for port in (0, 7, 13, 17, 19, 37, 9002):
            self.assertEqual(self.send(b"x", ("127.0.0.1", port)), [], port)
        self.assertEqual(self.counters(), {"received": 7, "refused": 7})
        self.assertEqual(self.stats.limits["loop_protection"], 7)
        reasons = [x.split("not answered: ")[1] for x in self.log_lines() if "not answered" in x]
        self.assertEqual(reasons, ["source port 0 cannot be answered"])  # one line per kind and interval
        self.clock.advance(LOG_SUMMARY_INTERVAL)
        self.send(b"x", ("127.0.0.1", 13))
        self.clock.advance(LOG_SUMMARY_INTERVAL)
        self.send(b"x", ("127.0.0.1", 9002))
        reasons = [x.split("not answered: ")[1] for x in self.log_lines() if "not answered" in x]
        self.assertEqual(
            reasons[1:],
            [
                "source port 13 is a small service's (loop protection)",
                "source port 9002 is this responder's own (loop protection)",
            ],
        )
        self.assertEqual(len(self.send(b"x", ("127.0.0.1", 1024))), 1)
        self.assertEqual(self.counters(), {"received": 10, "refused": 9, "answered": 1})

    def test_own_port_is_the_bound_one(self) -> None:
        protocol, transport = self.responder(FakeDatagramTransport(port=41234))
        protocol.datagramReceived(b"x", ("127.0.0.1", 41234))
        protocol.datagramReceived(b"x", ("127.0.0.1", 9002))
        self.assertEqual([addr for _, addr in transport.sent], [("127.0.0.1", 9002)])

    def test_refusals_spend_no_tokens(self) -> None:
        self.send(b"x", ("127.0.0.1", 13), count=100)
        self.assertEqual(len(self.send(b"x", count=100)), 40)


class NoAmplifyTests(ResponderTestCase):
    options = {"no_amplify": True}

    def test_daytime_only_to_long_enough_requests(self) -> None:
        self.assertEqual(self.send(b"Ping !"), [])
        answer = udp.daytime_answer(b"", NOW)
        self.assertEqual(self.send(b"x" * len(answer)), [answer])
        self.assertEqual(self.counters(), {"received": 2, "refused": 1, "answered": 1})
        self.assertEqual(self.stats.limits["no_amplify"], 1)
        self.assertTrue(any("not answered: the answer (26 bytes) is longer" in x for x in self.log_lines()))

    def test_time_needs_four_bytes(self) -> None:
        self.mode = "time"
        protocol, transport = self.responder(no_amplify=True)
        for datagram in (b"", b"abc", b"abcd"):
            protocol.datagramReceived(datagram, PEER)
        self.assertEqual([len(data) for data, _ in transport.sent], [4])

    def test_echo_never_amplifies(self) -> None:
        self.mode = "echo"
        protocol, transport = self.responder(no_amplify=True)
        for datagram in (b"", b"abc", b"x" * 65507):
            protocol.datagramReceived(datagram, PEER)
        self.assertEqual(len(transport.sent), 3)

    def test_strip_nul_counts(self) -> None:
        self.mode = "strip"
        protocol, transport = self.responder(no_amplify=True)
        protocol.datagramReceived(b"abc", PEER)  # b"abc\0" is one byte longer
        protocol.datagramReceived(b"a b", PEER)
        self.assertEqual([data for data, _ in transport.sent], [b"ab\x00"])


class SendErrorTests(ResponderTestCase):
    def test_send_errors_are_one_log_line(self) -> None:
        errors = [
            MessageLengthError("message too long"),
            OSError(errno.ECONNREFUSED, "Connection refused"),
            OSError(errno.ENOBUFS, "No buffer space available"),
            OSError(errno.EAGAIN, "Resource temporarily unavailable"),
        ]
        for error in errors:
            protocol, _ = self.responder(FakeDatagramTransport(error=error))
            protocol.datagramReceived(b"x", PEER)  # must not raise
            protocol.journal.flush()
        self.assertEqual(self.counters(), {"received": 4, "send_failed": 4})
        lines = [x for x in self.log_lines() if "not answered" in x]
        self.assertEqual(len(lines), 4)
        self.assertIn("send failed: Connection refused", lines[1])


class FloodLogTests(ResponderTestCase):
    def test_one_source_flood_is_two_lines(self) -> None:
        self.events.clear()
        self.send(b"x", count=3000)
        self.assertEqual(len(self.events), 40 + 1)  # 40 answers, then the first drop
        self.assertIn("not answered: over 20 answers/s (burst 40) for this address", self.log_lines()[-1])
        self.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertEqual(
            self.log_lines()[-1],
            "udp: 2959 more datagrams in the last 10 s, not logged one by one: 2959 over the rate limit",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_many_source_flood_is_bounded(self) -> None:
        self.events.clear()
        for n in range(10000):
            self.protocol.datagramReceived(b"x", (f"10.0.{n >> 8}.{n & 255}", 5000))
        self.assertEqual(len(self.transport.sent), 10000)
        self.assertEqual(len(self.events), 100)  # the log budget's burst
        self.clock.advance(LOG_SUMMARY_INTERVAL)
        self.assertIn("9900 answered", self.log_lines()[-1])

    def test_budget_refills(self) -> None:
        self.events.clear()
        self.protocol, _ = self.responder(rate=(0.0, 0.0), log_rate=(1.0, 1.0))
        self.events.clear()
        self.send(b"x", count=5)
        self.clock.advance(1)
        self.send(b"x", count=5)
        answered = [x for x in self.log_lines() if x.endswith(",x")]
        self.assertEqual(len(answered), 2)

    def test_stop_sums_up_and_leaves_no_timer(self) -> None:
        self.send(b"x", ("127.0.0.1", 13), count=5)
        self.clock.advance(2)
        self.protocol.doStop()
        self.assertEqual(
            self.log_lines()[-1],
            "udp: 4 more datagrams in the last 2 s, not logged one by one: 4 refused (loop protection)",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(udp, "log", Logger(namespace="sockproto", observer=lambda event: None))

    @given(
        st.sampled_from(sorted(udp.RESPONDERS)),
        st.booleans(),
        st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 65535)), max_size=50),
    )
    def test_nothing_raises_and_everything_is_counted(
        self, mode: str, no_amplify: bool, datagrams: Any
    ) -> None:
        clock = Clock()
        clock.advance(NOW)
        stats = ServiceStats("udp", "datagrams")
        protocol = udp.UdpResponder(udp.RESPONDERS[mode], stats, clock, no_amplify=no_amplify)
        protocol.makeConnection(FakeDatagramTransport())
        for datagram, port in datagrams:
            protocol.datagramReceived(datagram, ("127.0.0.1", port))
        counts = stats.counters
        parts = counts["answered"] + counts["rate_limited"] + counts["refused"] + counts["send_failed"]
        self.assertEqual(counts["received"], len(datagrams))
        self.assertEqual(parts, len(datagrams))


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.listened: list[tuple[Any, ...]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        self.listened.append((port, protocol, interface, maxPacketSize))
        return None


class BuildTests(SynchronousTestCase):
    def build(self, values: dict[tuple[str, str], Any]) -> tuple[Listener | None, FakeReactor]:
        settings = config.build({key: (value, "test") for key, value in values.items()})
        reactor = FakeReactor()
        return udp.build(settings, Stats(reactor.seconds), reactor), reactor

    def test_off(self) -> None:
        self.assertIsNone(self.build({("udp", "port"): "off"})[0])

    def test_bare_port_on_the_suite_interface_reads_whole_datagrams(self) -> None:
        listener, reactor = self.build({("udp", "port"): "9102", ("suite", "interface"): "::1"})
        assert listener is not None
        self.assertEqual(listener.where, "udp:9102:interface=::1")
        listener._listen()
        port, protocol, interface, size = reactor.listened[0]
        self.assertEqual((port, interface, size), (9102, "::1", 65535))
        self.assertIsInstance(protocol, udp.UdpResponder)

    def test_options_reach_the_protocol(self) -> None:
        listener, reactor = self.build(
            {
                ("udp", "port"): "udp:9102:interface=0.0.0.0",
                ("udp", "mode"): "time",
                ("udp", "rate"): "5/7",
                ("udp", "max_sources"): 33,
                ("udp", "no_amplify"): True,
            }
        )
        assert listener is not None
        listener._listen()
        port, protocol, interface, _ = reactor.listened[0]
        self.assertEqual((port, interface), (9102, "0.0.0.0"))
        self.assertIs(protocol.answer, udp.time_answer)
        self.assertEqual(
            (protocol.buckets.rate, protocol.buckets.burst, protocol.buckets.max_keys), (5, 7, 33)
        )
        self.assertTrue(protocol.no_amplify)

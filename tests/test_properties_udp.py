"""Properties of the UDP responder under arbitrary datagrams from arbitrary sources.

Whatever arrives, from wherever, at whatever pace: nothing raises; what is sent
is exactly the mode's pure function of the datagram, to the address it came
from, or nothing; no answer goes to a small service's port or our own; with
no-amplify none is longer than its datagram; no source gets more than its
token bucket allows; the table of sources and the log stay bounded, and every
log line is one printable line.
"""

from __future__ import annotations

import errno
import math
from collections import defaultdict
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import udp
from sockproto.limits import LOG_SUMMARY_INTERVAL
from sockproto.stats import ServiceStats
from tests.test_udp import NOW, FakeDatagramTransport

OWN_PORT = 9002
RATE, BURST = 5.0, 8.0
LOG_RATE, LOG_BURST = 3.0, 4.0

hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "fe80::1"]),  # repeat sources: rate limits bite
    st.ip_addresses().map(str),
)
ports = st.one_of(st.sampled_from(sorted(udp.SMALL_SERVICE_PORTS | {OWN_PORT})), st.integers(0, 65535))
payloads = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [b"", b"\r\n", b"\x1b[2J\x1b]0;owned\x07", b"\nforged [sockproto#info] line", b" a \0 b "]
    ),
)
# The socket refusing to send (EMSGSIZE, ENOBUFS, a firewall's EPERM) now and then.
send_errors = st.one_of(
    st.none(),
    st.none(),
    st.sampled_from([OSError(errno.EMSGSIZE, "Message too long"), OSError(errno.EPERM, "")]),
)
# (seconds since the last datagram, datagram, source, the socket's error)
traffic = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.01, 0.2, 1.0, 11.0]), payloads, st.tuples(hosts, ports), send_errors
    ),
    max_size=80,
)


class UdpPropertyTests(SynchronousTestCase):
    @given(st.sampled_from(sorted(udp.RESPONDERS)), st.booleans(), st.sampled_from([4, 1000]), traffic)
    def test_any_datagrams_from_anywhere(
        self, mode: str, no_amplify: bool, max_sources: int, datagrams: Any
    ) -> None:
        clock = Clock()
        clock.advance(NOW)
        events: list[dict[str, Any]] = []
        self.patch(udp, "log", Logger(namespace="sockproto", observer=events.append))
        stats = ServiceStats("udp", "datagrams")
        protocol = udp.UdpResponder(
            udp.RESPONDERS[mode],
            stats,
            clock,
            rate=(RATE, BURST),
            max_sources=max_sources,
            no_amplify=no_amplify,
            log_rate=(LOG_RATE, LOG_BURST),
            mode=mode,
        )
        transport = FakeDatagramTransport(port=OWN_PORT)
        protocol.makeConnection(transport)
        answered_at: dict[str, list[float]] = defaultdict(list)
        for pause, datagram, source, error in datagrams:
            clock.advance(pause)
            transport.error = error
            before = len(transport.sent)
            protocol.datagramReceived(datagram, source)
            sent = transport.sent[before:]
            self.assertLessEqual(len(sent), 1)
            self.assertLessEqual(len(protocol.buckets), max_sources)
            if not sent:
                continue
            ((reply, to),) = sent
            self.assertEqual(to, source)
            self.assertEqual(reply, udp.RESPONDERS[mode](datagram, clock.seconds()))
            self.assertNotIn(source[1], udp.SMALL_SERVICE_PORTS | {OWN_PORT})
            if no_amplify:
                self.assertLessEqual(len(reply), len(datagram))
            answered_at[source[0]].append(clock.seconds())
        # No source beyond its bucket: in any span, burst + rate x span answers
        # (unless more sources than the table holds made it forget one).
        for times in (
            answered_at.values() if len({host for _, _, (host, _), _ in datagrams}) <= max_sources else ()
        ):
            for first in range(len(times)):
                for last in range(first, len(times)):
                    allowed = BURST + RATE * (times[last] - times[first])
                    self.assertLessEqual(last - first + 1, math.floor(allowed + 1e-9))
        protocol.doStop()
        elapsed = clock.seconds() - NOW
        # One line per answer within the log budget, one per kind of drop per
        # interval, one summary per interval, the start line: bounded by time.
        intervals = elapsed / LOG_SUMMARY_INTERVAL + 2
        bound = LOG_BURST + LOG_RATE * elapsed + (len(udp.UNANSWERED) + 1) * intervals + 1
        self.assertLessEqual(len(events), bound)
        for logged in events:
            text = formatEvent(logged)
            self.assertTrue(text.isprintable(), text)
        counts = stats.counters
        self.assertEqual(
            counts["received"],
            counts["answered"] + counts["rate_limited"] + counts["refused"] + counts["send_failed"],
        )
        self.assertEqual(counts["answered"], len(transport.sent))

"""The UDP responder of seeds 004 and 002: every datagram gets one answer.

The seed's PHP server answers each datagram with ``date("D M j H:i:s Y\\r\\n")``
and prints ``peer,payload``. That is the ``daytime`` mode here, beside ``echo``
(RFC 862), ``strip`` (the strip server's answer) and ``time`` (RFC 868). What a
UDP service on a real network needs and the seed lacks: a rate limit per source
address, so a forged source cannot turn it into a reflector; BSD inetd's loop
protection; an optional no-amplification rule; and a log that a flood cannot
flood.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet.error import InvalidAddressError, MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sockproto import strip
from sockproto.config import Settings
from sockproto.endpoints import datagram_address
from sockproto.limits import BucketTable, LogBudget, TokenBucket, rate_limit
from sockproto.listening import Listener
from sockproto.stats import ServiceStats, Stats
from sockproto.text import loggable

log = Logger(namespace="sockproto")

# PHP's date("D") and date("M") are English whatever the locale; strftime's %a
# and %b would follow LC_TIME.
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Seconds from RFC 868's epoch (1900-01-01 UTC) to Unix's (1970-01-01 UTC).
RFC868_OFFSET = 2_208_988_800

# Source ports of the small services (echo 7, daytime 13, qotd 17, chargen 19,
# time 37): two such services answering each other would ping-pong forever, so
# BSD inetd never answers them; nor do we (nor our own port). Port 0 cannot be
# answered at all.
SMALL_SERVICE_PORTS = frozenset({0, 7, 13, 17, 19, 37})

# Read buffer: the largest UDP payload (65507 bytes over IPv4, 65527 over IPv6).
# Twisted reads 8192 bytes by default and silently cuts longer datagrams.
MAX_DATAGRAM = 65535

# Datagrams that get no answer, by why (also the names in stats.limits).
UNANSWERED = {
    "rate": "over the rate limit",
    "loop_protection": "refused (loop protection)",
    "no_amplify": "refused (no-amplify)",
    "send_failed": "send failed",
}


def format_daytime(moment: datetime) -> bytes:
    """PHP's ``date("D M j H:i:s Y\\r\\n")``: ``Thu Nov 5 04:03:05 2026\\r\\n``."""
    return (
        f"{DAYS[moment.weekday()]} {MONTHS[moment.month - 1]} {moment.day} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {moment.year:04d}\r\n"
    ).encode("ascii")


def rfc868_time(seconds: float) -> bytes:
    """Unix time as RFC 868 sends it: whole seconds since 1900, 32 bits big-endian.

    The count wraps modulo 2**32 (era 1 begins 2036-02-07 06:28:16 UTC), as
    the NTP era rule says, rather than failing to pack.
    """
    return struct.pack("!I", (math.floor(seconds) + RFC868_OFFSET) % 2**32)


def daytime_answer(datagram: bytes, now: float) -> bytes:
    """The server's local time in the seed's format, whatever was asked."""
    return format_daytime(datetime.fromtimestamp(now))


def echo_answer(datagram: bytes, now: float) -> bytes:
    return datagram


def strip_answer(datagram: bytes, now: float) -> bytes:
    return strip.answer(datagram)


def time_answer(datagram: bytes, now: float) -> bytes:
    return rfc868_time(now)


# --udp-mode -> answer(datagram, now in Unix seconds)
RESPONDERS: dict[str, Callable[[bytes, float], bytes]] = {
    "daytime": daytime_answer,
    "echo": echo_answer,
    "strip": strip_answer,
    "time": time_answer,
}


def format_peer(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DatagramLog:
    """One line per datagram, as the seed prints ``peer,payload``, but bounded.

    Answered datagrams are logged one by one within a budget of lines a second
    (the per-source rate limit alone would not bound a flood from many
    sources). Of the datagrams left unanswered, only the first of each kind in
    an interval is logged. The rest are summed up at the end of the interval
    (:class:`~sockproto.limits.LogBudget`).
    """

    def __init__(self, service: str, budget: TokenBucket | None, clock: Any) -> None:
        self.service = service
        self.budget = LogBudget(budget, clock, self._sum_up)

    def answered(self, addr: tuple[Any, ...], datagram: bytes) -> None:
        if self.budget.admit("answered"):
            log.info(
                "{service}: {peer},{payload}",
                service=self.service,
                peer=format_peer(addr),
                payload=loggable(datagram),
                budget=f"--{self.service}-log-rate",  # not charged to --log-rate as well
            )

    def unanswered(self, kind: str, addr: tuple[Any, ...], datagram: bytes, why: str) -> None:
        if self.budget.first_of(kind):
            log.info(
                "{service}: {peer},{payload} not answered: {why}",
                service=self.service,
                peer=format_peer(addr),
                payload=loggable(datagram),
                why=why,
                kind=kind,
                budget=f"--{self.service}-log-rate",
            )

    def flush(self) -> None:
        """Sum up now (the service stops)."""
        self.budget.flush()

    def _sum_up(self, counts: dict[str, int], seconds: float) -> None:
        labels = {"answered": "answered", **UNANSWERED}
        log.info(
            "{service}: {total} more datagrams in the last {seconds:.3g} s, not logged one by one: {parts}",
            service=self.service,
            total=sum(counts.values()),
            seconds=seconds,
            parts=", ".join(f"{count} {labels[kind]}" for kind, count in counts.items()),
            counts=counts,
        )


class UdpResponder(DatagramProtocol):
    """Answers each datagram with ``answer(datagram, now)``, within the limits.

    Loop protection and no-amplify come before the rate limit, so a source's
    tokens are spent only on answers; the answer is made after it (unless
    no-amplify needs its length), so a flood is dropped at the least cost.
    """

    noisy = False  # the Listener says where it listens

    def __init__(
        self,
        answer: Callable[[bytes, float], bytes],
        stats: ServiceStats,
        clock: Any,
        *,
        rate: tuple[float, float] = (20.0, 40.0),
        max_sources: int = 10000,
        no_amplify: bool = False,
        log_rate: tuple[float, float] = (50.0, 100.0),
        mode: str = "",
    ) -> None:
        self.answer = answer
        self.stats = stats
        self.clock = clock
        self.rate = rate
        self.no_amplify = no_amplify
        self.mode = mode or getattr(answer, "__name__", "custom")
        self.buckets = BucketTable(rate[0], rate[1], clock.seconds, max_sources)
        self.journal = DatagramLog(stats.name, rate_limit(log_rate, clock.seconds), clock)
        self.refused_ports = SMALL_SERVICE_PORTS
        self._over_rate = f"over {rate[0]:g} answers/s (burst {rate[1]:g}) for this address"

    def startProtocol(self) -> None:
        own = self.transport.getHost().port
        self.refused_ports = SMALL_SERVICE_PORTS | {own}
        speed, burst = self.rate
        log.info(
            "{service}: answering {mode}; {limit}; no-amplify {amplify}",
            service=self.stats.name,
            mode=self.mode,
            limit=f"{speed:g} answers/s per source, burst {burst:g}" if speed else "no rate limit",
            amplify="on" if self.no_amplify else "off",
        )

    def stopProtocol(self) -> None:
        self.journal.flush()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        stats = self.stats
        counters = stats.counters
        stats.total += 1
        stats.bytes_in += len(datagram)
        counters["received"] += 1
        port = addr[1]
        if port in self.refused_ports:
            return self._refuse("loop_protection", addr, datagram, self._loop_reason(port))
        reply = None
        if self.no_amplify:
            reply = self.answer(datagram, self.clock.seconds())
            if len(reply) > len(datagram):
                why = f"the answer ({len(reply)} bytes) is longer than the datagram ({len(datagram)} bytes)"
                return self._refuse("no_amplify", addr, datagram, why)
        if not self.buckets.allow(addr[0]):
            counters["rate_limited"] += 1
            stats.limit_hit("rate")
            return self.journal.unanswered("rate", addr, datagram, self._over_rate)
        if reply is None:
            reply = self.answer(datagram, self.clock.seconds())
        try:
            self.transport.write(reply, addr)
        except (OSError, MessageLengthError, InvalidAddressError) as error:
            # EMSGSIZE (a strip answer one byte over the largest datagram),
            # ENOBUFS, EPERM from a firewall, an unreachable network...
            counters["send_failed"] += 1
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            return self.journal.unanswered("send_failed", addr, datagram, f"send failed: {reason}")
        stats.handled += 1
        stats.bytes_out += len(reply)
        counters["answered"] += 1
        self.journal.answered(addr, datagram)

    def _loop_reason(self, port: int) -> str:
        if port == 0:
            return "source port 0 cannot be answered"
        if port in SMALL_SERVICE_PORTS:
            return f"source port {port} is a small service's (loop protection)"
        return f"source port {port} is this responder's own (loop protection)"

    def _refuse(self, kind: str, addr: Any, datagram: bytes, why: str) -> None:
        self.stats.counters["refused"] += 1
        self.stats.limit_hit(kind)
        self.journal.unanswered(kind, addr, datagram, why)


def build(settings: Settings, stats: Stats, reactor: Any) -> Listener | None:
    """The UDP responder as configured, or None when its port is off."""
    config = settings.udp
    address = datagram_address(config.port, settings.suite.interface)
    if address is None:
        return None
    port, interface = address
    service_stats = stats.service("udp", "datagrams")
    protocol = UdpResponder(
        RESPONDERS[config.mode],
        service_stats,
        reactor,
        rate=config.rate,
        max_sources=config.max_sources,
        no_amplify=config.no_amplify,
        log_rate=config.log_rate,
        mode=config.mode,
    )

    def listen() -> Any:
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)

    return Listener("udp", f"udp:{port}:interface={interface}", listen, service_stats)

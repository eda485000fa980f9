"""Shared policies, written once: every service composes these, none copies them.

- :class:`GuardedFactory` wraps any server factory (ours or twisted.web's) and
  gives every connection the suite's connection policy: a cap on clients with an
  overflow line, an idle timeout, byte and connection counters, a bounded
  close (a peer that never reads cannot keep a closing connection alive), and
  a graceful stop (work in progress finishes, within a grace period).
- :class:`BoundedLineReceiver` is the line policy: LF lines with CR tolerated, a
  length cap answered with an error line, the last line kept on half-close.
- :class:`TokenBucket` and :class:`BucketTable` are the rate limits.
- :class:`OutputBuffer` bounds what waits to be sent to one slow peer, and
  :class:`OutputBudget` what waits for all of a service's peers and the suite's:
  over it, the peers holding the most are dropped first.
- :class:`FailureDelays` slows down an address whose logins keep failing
  (every login answer to it waits) and bounds its logins in flight; one for
  the suite (:func:`suite_logins`), keyed by :func:`login_key`, and
  :class:`DelayedAnswer` is how a session waits out that delay.
- :class:`LogBudget` bounds what a flood can write to the log.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from sockproto.stats import ServiceStats
from sockproto.text import loggable

log = Logger(namespace="sockproto")

# How long a connection we decided to close may take to flush its last words
# before it is aborted (twisted.web uses 15 s for the same purpose).
CLOSE_GRACE = 15.0
# How long a stopping service lets its connections finish the work in
# progress and take their last words before it cuts them (--shutdown-grace).
SHUTDOWN_GRACE = 10.0

# How often a LogBudget sums up the lines it did not log one by one.
LOG_SUMMARY_INTERVAL = 10.0

# The failed-login table (FailureDelays): how long an address's failures are
# remembered after its last one, and how many addresses at most.
FAILURE_MEMORY = 600.0
FAILURE_KEYS = 10000
# Failures counted at most per address: past the cap more change nothing.
_MAX_DOUBLINGS = 64
# The longest a login's answer waits, and how many logins of one key
# (login_key) may be in flight at once by default (--logins-in-flight).
LOGIN_DELAY_CAP = 30.0
LOGINS_IN_FLIGHT = 2

# Most bytes held back to be sent in one go as a reactor turn ends (see GuardedProtocol);
# a transport pauses its producer only beyond its buffer size, 64 KiB too.
HOLD_LIMIT = 64 * 1024


def peer_of(transport: Any) -> str:
    """``host:port`` of a transport's peer, for log lines.

    A UNIX socket's peer is the path the client bound, if any: client input,
    shown as :func:`loggable` shows it (and as a path, not as a bytes repr).
    """
    try:
        address = transport.getPeer()
    except Exception:
        return "?"
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        name = getattr(address, "name", None)
        return loggable(name) if name else "local"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ConnectionPolicy:
    """Per-service connection limits; 0 means 'no limit' for each."""

    max_clients: int = 0
    overflow_message: bytes = b"too many users\r\n"
    idle_timeout: float = 0.0
    # Refusals over the cap logged one by one a second (see LogBudget); 0: every one.
    refusal_log_rate: tuple[float, float] = (0.0, 0.0)
    # Bytes held for the service's peers, and for the suite's (see OutputBudget).
    max_output: int = 0
    suite_max_output: int = 0


class OverflowProtocol(Protocol):
    """Says the overflow line and closes; the service's protocol never sees the peer."""

    _abort_call: Any = None

    def __init__(self, factory: GuardedFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        factory = self.factory
        factory.stats.limit_hit("max_clients")
        if factory.refusals.admit("refused"):
            log.info(
                "{service}: refused {peer}: too many clients (max {limit})",
                service=factory.stats.name,
                peer=peer_of(self.transport),
                limit=factory.policy.max_clients,
                budget="--refusal-log-rate",  # not charged to --log-rate as well
            )
        self.transport.write(factory.policy.overflow_message)
        close_gently(self.transport, factory.clock, self)

    def dataReceived(self, data: bytes) -> None:
        """Whatever it says is ignored: it is being shown the door."""

    def connectionLost(self, reason: Any) -> None:
        _cancel(self._abort_call)


class GuardedProtocol(ProtocolWrapper):
    """The per-connection half of :class:`GuardedFactory`.

    Two things here are about speed, because every TCP service reads and writes
    through this wrapper:

    - The idle timer is lazy: a read only notes the time, and one timer checks
      it when it comes due (resetting a DelayedCall on every chunk costs more
      than the rest of a small read).
    - What the wrapped protocol writes is held until the reactor has handled
      every event of this turn (:func:`at_turn_end`), then sent in one send()
      if the socket takes it all. A transport only buffers writes and sends
      them the next time round the reactor loop, which costs a poll and two
      epoll_ctl calls per answer; and answering every read of a turn before
      the next poll lets a busy server's peers (100 clients, a chat room's
      lines to each of them) work in batches too. When the last poll brought
      a single read (one client at a time), the answer to a read leaves as
      soon as the read is handled instead: waiting buys nothing there.
    """

    factory: GuardedFactory
    _abort_call: Any = None
    _idle_call: Any = None
    _idle_timeout = 0.0
    _last_read = 0.0
    # Writes held until the end of the reactor turn (None: nothing held).
    _held: list[bytes] | None = None
    _held_size = 0
    # The real transport, when it is a plain TCP connection that can be sent to
    # directly (see _send).
    _direct: Any = None
    _host: Any = None
    _peer: Any = None
    _producer: Any = None  # what the wrapped protocol registered on the transport
    # The error a direct send got: the peer reset the connection, and the
    # transport will read that as a clean end unless told (see readConnectionLost).
    _send_failed: Exception | None = None
    # The service's output budget (None: no cap on it or the suite's), the
    # bytes last reported to it, and those of them the wrapped protocol holds
    # itself (see note_queued).
    _budget: OutputBudget | None = None
    _reported = 0
    _queued = 0

    def makeConnection(self, transport: Any) -> None:
        # Unlike ProtocolWrapper, also pass half-close through when the wrapped
        # protocol wants it: the reactor only asks the outermost protocol.
        extra = [IHalfCloseableProtocol] if IHalfCloseableProtocol.providedBy(self.wrappedProtocol) else []
        directlyProvides(self, providedBy(transport), *extra)
        self.transport = transport
        self.connected = 1
        factory = self.factory
        self._stats = factory.stats
        self._clock = factory.clock
        self._turn_end = factory.turn_end
        self._direct = transport if _can_write_directly(transport) else None
        if factory.output.capped:
            self._budget = factory.output
            factory.output.holders.add(self)
        factory.registerProtocol(self)
        if factory.policy.idle_timeout:
            self._idle_timeout = factory.policy.idle_timeout
            self.resetTimeout()
            self._idle_call = self._clock.callLater(self._idle_timeout, self._check_idle)
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._stats.bytes_in += len(data)
        if self._idle_timeout:
            self._last_read = self._clock.seconds()
        turn = self._turn_end
        turn.reads += 1
        if turn.batching or self._held is not None or self._direct is None:
            self.wrappedProtocol.dataReceived(data)  # what it writes waits for the turn's end
            return
        # The last poll brought one read: a single busy client wants its
        # answer now, and no other read is likely to come with this one.
        self._held = held = []
        self._held_size = 0
        try:
            self.wrappedProtocol.dataReceived(data)
        finally:
            if self._held is held:
                self._held = None
            if held:
                self._send(held)

    def _holding(self) -> list[bytes] | None:
        """Where a write goes: the writes held so far, a new hold until the end
        of this reactor turn, or None for the transport's own path."""
        held = self._held
        if held is None and self._direct is not None and not self.disconnecting:
            self._held = held = []
            self._held_size = 0
            self._turn_end.add(self.send_held)
        return held

    def write(self, data: bytes) -> None:
        self._stats.bytes_out += len(data)
        if self._held is None and self._turn_end.running and self._direct is not None:
            # Written as the turn ends (a chat room's lines of the turn):
            # nothing is left to wait for.
            self._send([_bytes_only(data)])
            return
        held = self._holding()
        if held is None:
            self.transport.write(data)
            self._report()
            return
        held.append(_bytes_only(data))
        self._held_size += len(data)
        if self._held_size > HOLD_LIMIT:
            self._stop_holding()

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self._stats.bytes_out += sum(map(len, data))
        held = self._holding()
        if held is None:
            self.transport.writeSequence(data)
            self._report()
            return
        for chunk in data:
            self._held_size += len(_bytes_only(chunk))
        held.extend(data)
        if self._held_size > HOLD_LIMIT:
            self._stop_holding()

    def _stop_holding(self) -> None:
        """A big answer: it goes to the socket (or the transport's buffer) now,
        64 KiB at a time, so that the transport's flow control (pausing a
        producer) acts as it would without us."""
        self._flush()
        self._held = None

    def send_held(self) -> None:
        """The reactor turn is over: send what was held for it."""
        held, self._held = self._held, None
        if held:
            self._send(held)

    def _flush(self) -> None:
        """Send what is held now: the transport is about to be used another way."""
        held = self._held
        if held:
            chunks = held[:]
            held.clear()
            self._held_size = 0
            self._send(chunks)

    def _can_send_now(self) -> bool:
        """Whether bytes may go straight to the socket: it is a plain TCP
        connection with nothing buffered, and nothing else to say about it
        (no TLS, no close or abort under way, no producer that waits for the
        buffer to drain)."""
        transport = self._direct
        return (
            transport is not None
            and transport.connected
            and not transport.dataBuffer
            and not transport._tempDataBuffer
            and not transport.TLS
            and not transport.disconnecting
            and not transport._aborting
            and not transport._writeDisconnecting
            and (transport.producer is None or transport.streamingProducer)
        )

    def _send(self, chunks: list[bytes]) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._can_send_now():
            sent = self._direct.writeSomeData(data)  # type: ignore[union-attr]
            if not isinstance(sent, int):  # the connection is lost: the transport will notice
                self._send_failed = sent
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)
        self._report()

    # The output budget: what this connection holds is reported as it grows
    # from our side (a write the socket did not take, what the protocol
    # queues); what the socket sends later is seen when the budget recounts.

    def note_queued(self, change: int) -> None:
        """The wrapped protocol holds ``change`` more bytes for the peer (fewer
        if negative) beyond the transport: a chat member's OutputBuffer."""
        self._queued += change
        self._report()

    def output_held(self) -> int:
        """Bytes held for the peer now: the transport's buffer and the protocol's queue."""
        return _buffered(self.transport) + self._queued

    def _report(self) -> None:
        budget = self._budget
        if budget is not None:
            held = _buffered(self.transport) + self._queued
            if held != self._reported:
                budget.change(self, held)

    def _leave_budget(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.change(self, 0)
            budget.holders.discard(self)

    def drop_for_output(self, budget: OutputBudget) -> None:
        """``budget`` is spent and this connection holds the most of it: cut,
        with its output (the protocol's ``output_dropped()`` hook is told first)."""
        held = self._reported
        self._leave_budget()
        self._stats.limit_hit(budget.limit_name)
        log.info(
            "{service}: dropping {peer}: {held} bytes of output unread, the most while {what} held over"
            " {limit} bytes ({option})",
            service=self._stats.name,
            peer=peer_of(self),
            held=held,
            what=budget.what,
            limit=budget.limit,
            option=budget.option,
        )
        hook = getattr(self.wrappedProtocol, "output_dropped", None)
        if hook is not None:
            hook()
        self.cut()

    def __getattr__(self, name: str) -> Any:
        # Anything else asked of the transport (pauseProducing, startTLS,
        # abortConnection, ...) comes after the writes held so far.
        if self._held:
            self._flush()
        return getattr(self.transport, name)

    def getHost(self) -> Any:
        # Asked for each HTTP request; a connection's addresses do not change,
        # and the host address costs a getsockname() call each time.
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._flush()
        self._producer = producer
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._flush()
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    def stopConsuming(self) -> None:
        self._flush()
        self.transport.stopConsuming()

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self._flush()
            self.disconnecting = 1
            # Closing: the close is bounded by close_gently, and an idle
            # timeout now would only log and count a second, false close.
            self._stop_idle_timer()
            if self._producer is self.wrappedProtocol:
                # A protocol registered as its own producer produces nothing:
                # it asks that reading pause while its output backs up. A
                # transport closes once its producer is unregistered; with a
                # paused one it resumes it instead, and the close would wait
                # for the abort (HTTPChannel unregisters itself for the same reason).
                self.unregisterProducer()
            close_gently(self.transport, self._clock, self)

    def _close(self, farewell: bytes = b"") -> None:
        """A close the guard decides on (idle, shutdown): the protocol has had
        its say, so a producer it left registered is let go; with one, a TCP
        transport whose producer is paused, and a TLS one always, would wait
        for it instead of closing."""
        if self.disconnecting or not self.connected:
            return
        if farewell:
            self.write(farewell)
        self.unregisterProducer()
        self.loseConnection()

    def server_stopping(self) -> None:
        """The service stops: the protocol finishes the work in progress and
        says its last words (its ``server_stopping()`` hook returns them, or a
        Deferred firing with them once that work is done), then the connection
        closes once its output is out. A connection closing already is left to
        finish."""
        if self.disconnecting:
            return
        hook = getattr(self.wrappedProtocol, "server_stopping", None)
        farewell = maybeDeferred(hook) if hook is not None else succeed(b"")
        farewell.addCallback(self._close)
        farewell.addErrback(self._stopping_failed)

    def cut(self) -> None:
        """Close now, dropping unsent output: the grace is over."""
        self.disconnecting = 1
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _stopping_failed(self, failure: Any) -> None:
        log.failure(
            "{service}: {peer}: error in the shutdown hook",
            failure,
            service=self._stats.name,
            peer=peer_of(self),
        )
        self._close()

    def readConnectionLost(self) -> None:
        if self._send_failed is not None:
            # A reset: our send() got the error, so the socket read as an EOF.
            self.transport.connectionLost(Failure(self._send_failed))
            return
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()

    def resetTimeout(self) -> None:
        """Activity: the idle timeout counts from now (reads do this themselves)."""
        if self._idle_timeout:
            self._last_read = self._clock.seconds()

    def _check_idle(self) -> None:
        left = self._last_read + self._idle_timeout - self._clock.seconds()
        if left > 0:
            self._idle_call = self._clock.callLater(left, self._check_idle)
            return
        self._idle_call = None
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        self._stats.limit_hit("idle_timeout")
        log.info(
            "{service}: closing {peer}: idle for {seconds:g} s",
            service=self._stats.name,
            peer=peer_of(self.transport),
            seconds=self.factory.policy.idle_timeout,
        )
        goodbye = getattr(self.wrappedProtocol, "idle_timed_out", None)
        self._close(goodbye() if goodbye is not None else b"")

    def _stop_idle_timer(self) -> None:
        self._idle_timeout = 0.0
        _cancel(self._idle_call)

    def connectionLost(self, reason: Any) -> None:
        if self._send_failed is not None and reason.check(ConnectionDone):
            reason = Failure(self._send_failed)  # see readConnectionLost
        self.connected = 0
        self._held = None  # nowhere to send it now
        self._leave_budget()
        self._stop_idle_timer()
        _cancel(self._abort_call)
        super().connectionLost(reason)


class GuardedFactory(WrappingFactory):
    """Applies a :class:`ConnectionPolicy` and counts into a service's stats."""

    protocol = GuardedProtocol
    # While stopping: (connections still closing, fired when none is, grace timer)
    _stopping: tuple[set[Any], Deferred[None], Any] | None = None

    def __init__(
        self,
        wrapped: Any,
        policy: ConnectionPolicy,
        stats: ServiceStats,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(wrapped)
        # Twisted's factories log every start and stop; the suite logs what
        # listens where itself.
        self.noisy = wrapped.noisy = False
        self.policy = policy
        self.stats = stats
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock: Any = clock
        # Before any connection: a reactor's polls are wrapped from the start.
        self.turn_end = turn_end(clock)
        # A flood of connections over the cap must not flood the log.
        self.refusals = LogBudget(
            rate_limit(policy.refusal_log_rate, clock.seconds), clock, self._sum_up_refusals
        )
        name = stats.name
        self.output = OutputBudget(
            policy.max_output,
            suite_output(clock, policy.suite_max_output),
            what=f"{name}'s clients",
            option=f"--{name}-max-output",
            limit_name="max_output",
        )

    def _sum_up_refusals(self, counts: dict[str, int], seconds: float) -> None:
        log.info(
            "{service}: {count} more connections refused in the last {seconds:.3g} s: too many clients"
            " (max {limit}); not logged one by one (--refusal-log-rate)",
            service=self.stats.name,
            count=counts["refused"],
            seconds=seconds,
            limit=self.policy.max_clients,
        )

    def buildProtocol(self, addr: Any) -> Any:
        if self.policy.max_clients and len(self.protocols) >= self.policy.max_clients:
            return OverflowProtocol(self)
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.stats.current += 1
        self.stats.total += 1

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.stats.current -= 1
        if self._stopping is not None:
            waiting = self._stopping[0]
            waiting.discard(p)
            if not waiting:
                self._stopped()

    def server_stopping(self, grace: float = SHUTDOWN_GRACE) -> Deferred[None] | None:
        """The service stops (its port is closed already): every connection
        finishes the work in progress, says its last words and closes (see
        :meth:`GuardedProtocol.server_stopping`).

        The Deferred fires once every connection is closed, or after ``grace``
        seconds, when those still open are cut: the reactor would drop their
        unsent output when it stops, and a client must not hold up the stop.
        """
        if not self.protocols:
            return None
        waiting = set(self.protocols)
        done: Deferred[None] = Deferred()
        timer = self.clock.callLater(grace, self._grace_over, grace)
        self._stopping = (waiting, done, timer)
        log.info(
            "{service}: closing {count} connection(s), finishing work in progress for up to {grace:g} s",
            service=self.stats.name,
            count=len(waiting),
            grace=grace,
        )
        for wrapper in list(waiting):
            wrapper.server_stopping()
        return done

    def _grace_over(self, grace: float) -> None:
        if self._stopping is None:
            return
        waiting = list(self._stopping[0])
        self._stopping = (set(), *self._stopping[1:])
        log.info(
            "{service}: {count} connection(s) still open after {grace:g} s; cutting them",
            service=self.stats.name,
            count=len(waiting),
            grace=grace,
        )
        for wrapper in waiting:
            wrapper.cut()
        self._stopped()

    def _stopped(self) -> None:
        if self._stopping is not None:
            _waiting, done, timer = self._stopping
            self._stopping = None
            _cancel(timer)
            done.callback(None)


class _TurnEnd:
    """Calls made once the reactor has handled every event of this turn.

    Twisted has no hook for "the events of this poll are handled", so the
    reactor's ``doIteration`` (one poll and its events) is wrapped, once:
    calls added while it handles events run as it returns. Calls added
    elsewhere (a timer's writes) are made by a call due now, ``callLater(0)``,
    which also keeps the next poll from waiting. Calls added while these run
    (a chat room's lines, then the writes they hold) run in the same pass. A
    clock without ``doIteration`` (another reactor, a test's Clock) gets the
    ``callLater(0)`` path for all of them.
    """

    running = False  # making the calls now
    _polling = False  # inside the wrapped doIteration
    # Reads in this poll, and whether the last poll had more than one: then
    # answers wait for the turn's end, so they go out together.
    reads = 0
    batching = False

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._calls: list[Callable[[], object]] = []
        self._due: Any = None
        poll = getattr(clock, "doIteration", None)
        if callable(poll):
            clock.doIteration = self._after(poll)

    def _after(self, poll: Callable[[Any], object]) -> Callable[[Any], None]:
        def doIteration(timeout: Any) -> None:
            self._polling = True
            self.reads = 0
            try:
                poll(timeout)
            finally:
                self._polling = False
                self.batching = self.reads > 1
                if self._calls and not self.running:
                    self._run()

        return doIteration

    def add(self, call: Callable[[], object]) -> None:
        self._calls.append(call)
        if self._due is None and not self._polling and not self.running:
            self._due = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()
        calls = self._calls
        index = 0
        self.running = True
        try:
            while index < len(calls):
                call = calls[index]
                index += 1
                try:
                    call()
                except Exception:
                    log.failure("error at the end of a reactor turn")
        finally:
            calls.clear()
            self.running = False


_turn_ends: WeakKeyDictionary[Any, _TurnEnd] = WeakKeyDictionary()


def turn_end(clock: Any) -> _TurnEnd:
    """The end of the turns of ``clock`` (the reactor, or a test's Clock)."""
    found = _turn_ends.get(clock)
    if found is None:
        found = _turn_ends[clock] = _TurnEnd(clock)
    return found


def at_turn_end(clock: Any, call: Callable[[], object]) -> None:
    """Make ``call`` once ``clock`` has handled the events of this turn: to
    send what a turn produced in one go."""
    turn_end(clock).add(call)


# What the direct send path (GuardedProtocol._can_send_now) reads of a TCP
# transport: Twisted internals, so it is used only where all of them exist;
# on another Twisted, or another transport, writes take the ordinary path.
_DIRECT_ATTRIBUTES = (
    "dataBuffer",
    "_tempDataBuffer",
    "TLS",
    "disconnecting",
    "_aborting",
    "_writeDisconnecting",
    "producer",
    "streamingProducer",
    "writeSomeData",
)
_direct_types: dict[type, bool] = {}


def _can_write_directly(transport: Any) -> bool:
    kind = type(transport)
    known = _direct_types.get(kind)
    if known is None:
        known = _direct_types[kind] = isinstance(transport, tcp.Connection) and all(
            hasattr(transport, name) for name in _DIRECT_ATTRIBUTES
        )
    return known


# What the output budget reads of a transport to know how much it holds
# unsent (GuardedProtocol.output_held): the same internals, where they exist.
_BUFFER_ATTRIBUTES = ("dataBuffer", "offset", "_tempDataLen")
_buffer_types: dict[type, bool] = {}


def _buffered(transport: Any) -> int:
    """Bytes ``transport`` holds unsent: its buffer, or for TLS the buffer of
    the TCP connection under it; 0 for another kind (a test's StringTransport)."""
    for candidate in (transport, getattr(transport, "transport", None)):
        kind = type(candidate)
        known = _buffer_types.get(kind)
        if known is None:
            known = _buffer_types[kind] = isinstance(candidate, abstract.FileDescriptor) and all(
                hasattr(candidate, name) for name in _BUFFER_ATTRIBUTES
            )
        if known:
            return len(candidate.dataBuffer) - candidate.offset + candidate._tempDataLen
    return 0


def _bytes_only(data: Any) -> bytes:
    """Refuse text as a transport does, before it is held."""
    if not isinstance(data, bytes):
        raise TypeError(f"Data must be bytes, not {type(data).__name__}")
    return data


def close_gently(transport: Any, clock: Any, owner: Any = None) -> None:
    """Close after the output is flushed, but abort if that takes too long.

    A peer that stops reading would otherwise keep the connection (and its
    buffered output) alive forever.
    """
    transport.loseConnection()
    abort = getattr(transport, "abortConnection", None)
    if abort is None:
        return
    call = clock.callLater(CLOSE_GRACE, _abort_if_open, transport)
    if owner is not None:
        owner._abort_call = call


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


def _abort_if_open(transport: Any) -> None:
    if getattr(transport, "connected", 0):
        transport.abortConnection()


@implementer(IHalfCloseableProtocol)
class BoundedLineReceiver(LineReceiver):
    """The suite's line policy on top of LineReceiver.

    Subclasses implement :meth:`line_received` (the line without LF or CR) and
    set ``service_stats``; ``MAX_LENGTH`` comes from the service's ``max_line``.
    """

    delimiter = b"\n"
    line_too_long_message = b"error: line too long\r\n"
    service_stats: ServiceStats

    def lineReceived(self, line: bytes) -> Any:
        if line[-1:] == b"\r":
            line = line[:-1]
        return self.line_received(line)

    def line_received(self, line: bytes) -> Any:
        raise NotImplementedError

    def lineLengthExceeded(self, line: bytes) -> None:
        self.service_stats.limit_hit("max_line")
        log.info(
            "{service}: closing {peer}: line longer than {limit} bytes",
            service=self.service_stats.name,
            peer=peer_of(self.transport),
            limit=self.MAX_LENGTH,
        )
        self.transport.write(self.line_too_long_message)
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """EOF from the peer: its last line counts even without LF, then we close."""
        rest, self._buffer = self._buffer, b""
        if rest and not self.transport.disconnecting:
            self.lineReceived(rest)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


def rate_limit(setting: tuple[float, float], now: Callable[[], float]) -> TokenBucket | None:
    """The bucket of a ``RATE/BURST`` setting (checks.rate); None when the
    rate is 0, which turns the limit off."""
    rate, burst = setting
    return TokenBucket(rate, burst, now) if rate else None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_now", "burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._now = now
        self.tokens = burst
        self.stamp = now()

    def _refill(self) -> None:
        now = self._now()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float = 1.0) -> bool:
        """Spend ``amount`` tokens if there are that many."""
        self._refill()
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def wait(self, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens will be there (0 if they are now)."""
        self._refill()
        missing = amount - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def idle_enough(self) -> bool:
        """True when the bucket is full again: forgetting it changes nothing."""
        return self.tokens + (self._now() - self.stamp) * self.rate >= self.burst


class BucketTable:
    """One token bucket per key (a peer), at most ``max_keys`` of them.

    Full buckets are forgotten (a new one would be the same); beyond the size
    bound the least recently used one goes, so a flood from spoofed sources
    costs bounded memory.
    """

    def __init__(self, rate: float, burst: float, now: Callable[[], float], max_keys: int = 10000) -> None:
        self.rate = rate
        self.burst = burst
        self._now = now
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, amount: float = 1.0) -> bool:
        if not self.rate:
            return True
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._expire()
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, self._now)
        else:
            buckets.move_to_end(key)
        return bucket.take(amount)

    def _expire(self) -> None:
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if len(buckets) < self.max_keys and not oldest.idle_enough():
                return
            buckets.popitem(last=False)


@implementer(IPushProducer)
class OutputBuffer:
    """Output to one peer that never blocks the writer and never grows without bound.

    It registers as the transport's streaming producer: while the transport's
    own buffer is full (the transport calls :meth:`pauseProducing`), output
    waits here; once the transport has sent it all (:meth:`resumeProducing`),
    it moves on. When more than ``limit`` bytes wait here, ``overflow()`` is
    called once and the output is dropped: that peer does not keep up, and the
    writer (one chat room, say) must not wait for it or hold its backlog.
    ``limit`` 0 means no cap. A registered producer keeps a connection open,
    so call :meth:`finish` or :meth:`discard` before closing it. Under the
    suite's guard, what waits here counts in the service's
    :class:`OutputBudget` (the transport's ``note_queued``).
    """

    def __init__(self, transport: Any, limit: int, overflow: Callable[[], Any]) -> None:
        self.transport = transport
        self.limit = limit
        self._overflow = overflow
        self._queue: deque[bytes] = deque()
        self.pending = 0  # bytes waiting here, beyond the transport's buffer
        self.paused = False
        self.closed = False
        self._note: Callable[[int], object] = getattr(transport, "note_queued", None) or _ignore
        transport.registerProducer(self, True)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused and not self._queue:
            self.transport.write(data)
            return
        self._queue.append(data)
        self.pending += len(data)
        self._note(len(data))
        if self.limit and self.pending > self.limit:
            self._stop(unregister=True)
            self._overflow()

    def finish(self) -> None:
        """Hand everything waiting to the transport and step aside."""
        if not self.closed:
            queued = list(self._queue)
            self._stop(unregister=True)
            if queued:
                self.transport.writeSequence(queued)

    def discard(self) -> None:
        """Drop everything waiting and step aside."""
        self._stop(unregister=True)

    def _stop(self, unregister: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        if self.pending:
            self._note(-self.pending)
        self.pending = 0
        if unregister:
            self.transport.unregisterProducer()

    # IPushProducer: the transport calls these.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        queue = self._queue
        # Refill the transport until it says it is full again.
        while queue and not self.paused and not self.closed:
            chunk = queue.popleft()
            self.pending -= len(chunk)
            self._note(-len(chunk))
            self.transport.write(chunk)

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._stop(unregister=False)


def _ignore(_change: int) -> None:
    """Where an OutputBuffer outside the guard reports what it holds."""


class OutputBudget:
    """Bytes held for peers that have not read them: one budget per service,
    with the suite's as the parent of them all (as Redis's maxmemory bounds
    what its clients' output buffers take together).

    Each guarded connection (:class:`GuardedProtocol`) reports what it holds
    as that grows from our side: its transport's buffer and what its protocol
    queues (a chat member's :class:`OutputBuffer`), an integer add each. What
    the socket sends meanwhile is not seen, so the total errs high, never
    low; when it passes the limit (this budget's or its parent's), the
    connections under that budget that reported output are recounted (the
    only scan of them, and only then), and while the total is still over, the
    one holding the most is dropped (logged, and counted as ``limit_name`` in
    the service's ``limits_hit``), then the next. ``limit`` 0: no cap here.
    """

    def __init__(
        self,
        limit: int,
        parent: OutputBudget | None = None,
        *,
        what: str = "the suite's clients",
        option: str = "--suite-max-output",
        limit_name: str = "suite_max_output",
    ) -> None:
        self.limit = limit
        self.parent = parent
        self.what = what
        self.option = option
        self.limit_name = limit_name
        self.total = 0
        self.holders: set[GuardedProtocol] = set()
        self.children: WeakSet[OutputBudget] = WeakSet()
        self._shedding = False
        if parent is not None:
            parent.children.add(self)

    @property
    def capped(self) -> bool:
        """Whether anything is counted: this budget or its parent has a limit."""
        return bool(self.limit or (self.parent is not None and self.parent.limit))

    def over(self) -> bool:
        return bool(self.limit) and self.total > self.limit

    def change(self, holder: GuardedProtocol, held: int) -> None:
        """``holder`` (under this budget) holds ``held`` bytes now."""
        change = held - holder._reported
        holder._reported = held
        self.total += change
        parent = self.parent
        if parent is not None:
            parent.total += change
        root = parent or self
        if change > 0 and not root._shedding and (self.over() or root.over()):
            root._shedding = True
            try:
                self._shed()
                if root is not self:
                    root._shed()
            finally:
                root._shedding = False

    def everyone(self) -> list[GuardedProtocol]:
        """The connections under this budget, its children's too."""
        found = list(self.holders)
        for child in self.children:
            found += child.holders
        return found

    def _shed(self) -> None:
        if not self.over():
            return
        # Only what was reported can be out of date (the socket sent some
        # since): a connection that reported nothing holds nothing.
        holders = [holder for holder in self.everyone() if holder._reported]
        for holder in holders:
            holder._report()
        if not self.over():
            return
        holders.sort(key=attrgetter("_reported"), reverse=True)
        for holder in holders:
            if not self.over() or not holder._reported:
                break
            if holder._budget is not None:
                holder.drop_for_output(self)


_suite_outputs: WeakKeyDictionary[Any, OutputBudget] = WeakKeyDictionary()


def suite_output(clock: Any, limit: int) -> OutputBudget:
    """The suite's output budget: one for all services of a process, as they
    share its memory (found by its reactor, or a test's Clock), with ``limit``."""
    found = _suite_outputs.get(clock)
    if found is None:
        found = _suite_outputs[clock] = OutputBudget(limit)
    found.limit = limit
    return found


class LogBudget:
    """Log lines one by one within a budget; count the rest and sum them up.

    A busy or flooded server must not drown the log its operator reads (nor
    spend more on formatting log lines than on the work): lines are let
    through by a token bucket (``None``: all of them), or one of each kind per
    interval (:meth:`first_of`); what is held back is counted by kind, and
    ``summary(counts, seconds)`` gets the counts once at the end of the
    interval, so the log grows by a bounded amount whatever arrives.
    """

    def __init__(
        self,
        bucket: TokenBucket | None,
        clock: Any,
        summary: Callable[[dict[str, int], float], None],
        interval: float = LOG_SUMMARY_INTERVAL,
    ) -> None:
        self.bucket = bucket
        self.clock = clock
        self.interval = interval
        self._summary = summary
        self.unlogged: Counter[str] = Counter()
        self._told: set[str] = set()  # kinds already logged once this interval
        self._call: Any = None
        self._opened = 0.0

    def admit(self, kind: str | Callable[[], str]) -> bool:
        """Whether this line is logged; if not, it is counted for the summary
        (under ``kind``, or what ``kind()`` says: worked out only then)."""
        if self.bucket is None or self.bucket.take():
            return True
        self._count(kind if isinstance(kind, str) else kind())
        return False

    def first_of(self, kind: str) -> bool:
        """Whether this is the first line of ``kind`` in the interval (logged);
        the others are counted for the summary."""
        if kind in self._told:
            self._count(kind)
            return False
        self._told.add(kind)
        self._open()
        return True

    def flush(self) -> None:
        """Sum up now (the service stops)."""
        _cancel(self._call)
        self._close()

    def _count(self, kind: str) -> None:
        self.unlogged[kind] += 1
        self._open()

    def _open(self) -> None:
        if self._call is None:
            self._opened = self.clock.seconds()
            self._call = self.clock.callLater(self.interval, self._close)

    def _close(self) -> None:
        self._call = None
        self._told.clear()
        if self.unlogged:
            counts = dict(self.unlogged)
            self.unlogged.clear()
            self._summary(counts, self.clock.seconds() - self._opened)


class Login(Enum):
    """What a login attempt came to, for :meth:`FailureDelays.answer_later`."""

    FAILED = "failed"  # a wrong name or password: counted, then answered
    SUCCEEDED = "succeeded"  # the right password: answered, then the count cleared
    REFUSED = "refused"  # neither (mailbox in use, an error): the count stays


def login_key(transport: Any) -> str:
    """Whose logins a connection's count as, for :class:`FailureDelays`.

    An IPv4 address (an IPv4-mapped IPv6 one as IPv4); other IPv6 addresses
    by their /64, as Dovecot does: a host is given a whole prefix, and
    rotating through it would escape the penalty and flush the table. A
    UNIX socket, or anything else, is one key: ``local``.
    """
    try:
        host = transport.getPeer().host
        address = ipaddress.ip_address(host.split("%", 1)[0])  # no IPv6 zone
    except Exception:  # no host (a UNIX socket), or not an IP address
        return "local"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureDelays:
    """How long the answer to a login attempt is held back, per key (see
    :func:`login_key`): longer for one whose logins keep failing, and how
    many may be in progress at once.

    A key with n failures counted has the penalty ``min(cap, base *
    2**(n-1))`` seconds (``base``: the service's own setting), and the
    answer to ANY login attempt from it waits that long, as with Dovecot's
    auth penalty: a failure counts first (so its answer waits the new
    penalty), a success waits the current one and only then clears the
    count. Answering a right password at once would be an oracle: a client
    that gets no answer within milliseconds knows its guess was wrong,
    hangs up and tries the next, and no delay slows it. A key with no
    failures is answered at once.

    Waits are computed from the count, never added to the waits already
    running, so no answer waits longer than ``cap``. What bounds the guess
    rate is the number of logins in flight (being checked, or their answer
    waiting): at most ``in_flight`` per key with failures counted, so such a
    key gets at most that many guesses per penalty however many connections
    it opens. :meth:`begin`
    refuses one more at once, before its password is checked, so the
    refusal says nothing about it. The counts are a bounded table: a key
    forgotten ``forget`` seconds after its last failure, at most
    ``max_keys`` kept (the least recently failed forgotten first), so a
    flood from many addresses costs bounded memory; the logins in flight
    are at most one per connection.

    One table for the suite (:func:`suite_logins`): POP3 and chat check the
    same users, so a guess on one is penalized on the other.
    """

    def __init__(
        self,
        cap: float,
        clock: IReactorTime,
        forget: float = FAILURE_MEMORY,
        max_keys: int = FAILURE_KEYS,
        in_flight: int = LOGINS_IN_FLIGHT,
    ) -> None:
        self.cap = cap
        self.clock = clock
        self.forget = forget
        self.max_keys = max_keys
        self.in_flight = in_flight
        # key -> [failures counted, time of the last one], least recent first
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._flying: Counter[Hashable] = Counter()  # key -> logins in flight

    def __len__(self) -> int:
        return len(self._keys)

    def failures(self, key: Hashable) -> int:
        """The failures of ``key`` still counted."""
        self._expire()
        entry = self._keys.get(key)
        return 0 if entry is None else int(entry[0])

    def penalty(self, key: Hashable, base: float) -> float:
        """Seconds the answer to a login attempt from ``key`` waits now: 0
        with no failures counted (or ``base`` 0), else ``min(cap, base *
        2**(n-1))``."""
        failures = self.failures(key)
        return min(self.cap, base * 2 ** (failures - 1)) if failures and base else 0.0

    def failed(self, key: Hashable, base: float) -> float:
        """Count a failure of ``key`` (whatever ``base``: another service
        may delay its answers); the seconds its answer waits."""
        self._expire()
        entry = self._keys.pop(key, None) or [0, 0.0]
        # Past the cap the count only needs to stay there: 2**n stays small.
        entry[0] = min(entry[0] + 1, _MAX_DOUBLINGS)
        entry[1] = self.clock.seconds()
        self._keys[key] = entry
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return self.penalty(key, base)

    def succeeded(self, key: Hashable) -> None:
        self._keys.pop(key, None)

    def flying(self, key: Hashable) -> int:
        """The logins of ``key`` in flight."""
        return self._flying[key]

    def begin(self, key: Hashable) -> LoginSlot | None:
        """A slot for a login attempt from ``key``, taken before its password
        is checked; None if ``key`` has failures counted and ``in_flight``
        logins already (refuse it now, unchecked). A key without failures is
        not bounded: many clients behind one address (a test suite's parallel
        logins over loopback, a NAT) log in at once, and a first wave of
        guesses is counted as it fails, so the next finds the bound. The
        session frees the slot when its peer goes away; an answer frees it as
        it is given (:meth:`answer_later`)."""
        if self._flying[key] >= self.in_flight and self.failures(key):
            return None
        self._flying[key] += 1
        return LoginSlot(self, key)

    def _free(self, key: Hashable) -> None:
        self._flying[key] -= 1
        if self._flying[key] <= 0:
            del self._flying[key]

    def answer_later(
        self,
        slot: LoginSlot,
        base: float,
        outcome: Login,
        answer: Callable[[], object],
        release: Callable[[], object] | None = None,
    ) -> DelayedAnswer | None:
        """Call ``answer`` once the penalty of the slot's key is over, then
        free the slot: a failure is counted first, a success clears the
        count just before its answer (so a success whose peer hung up first
        clears nothing). With no penalty, answer now and return None; else
        the session holds its further commands until the answer, and
        cancels it if its peer goes away, which frees the slot and calls
        ``release`` (what was opened for the answer)."""
        key = slot.key
        seconds = self.failed(key, base) if outcome is Login.FAILED else self.penalty(key, base)
        if outcome is Login.SUCCEEDED:
            answer = _after(lambda: self.succeeded(key), answer)
        answer = _after(slot.free, answer)
        if seconds <= 0:
            answer()
            return None
        return DelayedAnswer(self.clock, seconds, answer, _after(slot.free, release or _nothing))

    def _expire(self) -> None:
        keys, limit = self._keys, self.clock.seconds() - self.forget
        while keys:
            oldest = next(iter(keys.values()))
            if oldest[1] > limit:
                return
            keys.popitem(last=False)


class LoginSlot:
    """One login in flight for a key of :class:`FailureDelays`."""

    def __init__(self, delays: FailureDelays, key: Hashable) -> None:
        self.key = key
        self._delays: FailureDelays | None = delays

    def free(self) -> None:
        """Give the slot back (any number of times)."""
        delays, self._delays = self._delays, None
        if delays is not None:
            delays._free(self.key)


_suite_logins: WeakKeyDictionary[Any, FailureDelays] = WeakKeyDictionary()


def suite_logins(clock: Any, in_flight: int = LOGINS_IN_FLIGHT) -> FailureDelays:
    """The suite's failed-login table: one for all services of a process,
    as they check the same users (found by its reactor, or a test's Clock),
    with ``in_flight`` (--logins-in-flight)."""
    found = _suite_logins.get(clock)
    if found is None:
        found = _suite_logins[clock] = FailureDelays(LOGIN_DELAY_CAP, clock)
    found.in_flight = in_flight
    return found


def _nothing() -> None:
    pass


def _after(first: Callable[[], object], then: Callable[[], object]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both


class DelayedAnswer:
    """A login's answer, held back for its host's penalty (FailureDelays).

    The session holds its further commands meanwhile, so a client cannot try
    faster than its answers come; but it must call :meth:`cancel` as soon as
    its peer goes away (connectionLost, or the end of its input), and close:
    otherwise the connection, and its slot under the client cap, would stay
    until an answer that no one reads. Cancelling a wait still running calls
    its ``release`` (POP3: closes the mailbox opened for a right password).
    """

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float,
        answer: Callable[[], object],
        release: Callable[[], object] | None = None,
    ) -> None:
        self.seconds = seconds
        self._release = release
        self._call = clock.callLater(seconds, self._answer, answer)

    def _answer(self, answer: Callable[[], object]) -> None:
        self._release = None
        answer()

    def active(self) -> bool:
        """Whether the answer still waits."""
        return bool(self._call.active())

    def cancel(self) -> None:
        """End the wait without answering (any number of times)."""
        _cancel(self._call)
        release, self._release = self._release, None
        if release is not None:
            release()

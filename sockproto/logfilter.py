"""A budget per service for the log lines clients can cause, ours or Twisted's.

A client that keeps one connection open can make the server log a line per
request (our ``http: 400 to ...``, twisted.web's "Timing out client") or, by
holding descriptors, a few lines per refused accept: without a bound,
gigabytes. :class:`ClientLogFilter` is a predicate in front of every observer
the log has when the suite starts (twistd's file, a ``--logger``, the .tac's):
the lines it recognises as caused by a client pass a
:class:`~sockproto.limits.LogBudget` of their service (``--log-rate`` each),
so that one service's clients (a spoofed UDP flood, busy HTTP) cannot hide
another's (the addresses of a POP3 password guesser); those over it are
counted by kind and summed up in one line an interval. Lines that passed a
budget of their own already (access lines, ``--http-log-rate``; datagrams,
``--udp-log-rate``; refusals, ``--refusal-log-rate``: they carry a ``budget``
field) are not charged again. Accept errors (Twisted's ``EMFILE`` recovery and
"Could not accept new connection") get one line per kind and interval,
whatever the budget.
"""

from __future__ import annotations

import re
import resource
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogPublisher,
    PredicateResult,
    globalLogPublisher,
)
from twisted.python.logfile import BaseLogFile
from twisted.web.http import Request

from sockproto.limits import LOG_SUMMARY_INTERVAL, LogBudget, rate_limit

log = Logger(namespace="sockproto")

# Twisted's logging context while the reactor handles a connection's I/O is the
# transport's "Protocol,session,host" (tcp.Server's and unix.Server's logstr):
# a legacy line (log.msg, log.err) with that system was caused by that peer.
_CONNECTION_SYSTEM = re.compile(r",\d+,")

# Twisted's lines a client can cause, by how they start: their kind in the summary.
TWISTED_KINDS = (
    "Ignoring malformed Range header",
    "Could not decode path segment",
    "Timing out client",
    "Forcibly timing out client",
    "Using GET to fake a HEAD request",
    "Tried to fake a HEAD request",
    "Warning: HEAD request",
)
# And lines a connection's transport logs, which start with the protocol's
# name: what they contain -> their kind.
TWISTED_CONNECTION_KINDS = {
    "does not provide IFileDescriptorReceiver": "descriptors sent over a UNIX socket (closed)",
    "received unsupported ancillary data": "unsupported ancillary data on a UNIX socket",
}

# What Twisted's accept loop (tcp.Port.doRead, tcp._accept) logs, by format:
# three lines for each connection it accepts and closes for want of a
# descriptor, one a reactor turn for the other errors.
_EMFILE_START = "EMFILE encountered; releasing reserved file descriptor."
_EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"
_EMFILE_DONE = "Re-reserving EMFILE recovery file descriptor."
_CANNOT_ACCEPT = "Could not accept new connection ({acceptError})"
_CANNOT_RESERVE = (
    "Could not reserve EMFILE recovery file descriptor.",
    "Could not re-reserve EMFILE recovery file descriptor.",
)

# The fields of our lines that say a client caused them.
_CLIENT_FIELDS = frozenset(("peer", "nick", "user", "access"))
# The field of our lines that passed a budget of their own (its option's name).
BUDGETED = "budget"
# Our lines start with their service's name, when it is no ``service`` field.
_SERVICE_PREFIX = re.compile(r"(\w+): ")

_FIELD = re.compile(r"\{(\w*)[^{}]*\}")


def open_file_limit() -> int:
    """This process's soft RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ClientLogFilter:
    """A log predicate: client-caused lines within their service's budget,
    the rest counted.

    ``rate`` is ``(lines a second, burst)`` of each service's budget
    (``--log-rate``; 0: every line); its own lines (the summaries) go to
    ``logger`` (the global log).
    """

    def __init__(
        self,
        rate: tuple[float, float],
        clock: Any,
        interval: float = LOG_SUMMARY_INTERVAL,
        logger: Logger | None = None,
    ) -> None:
        self.log = log if logger is None else logger
        self.rate = rate
        # The budget's timers are the reactor's: lines logged in another
        # thread (none are a client's) pass untouched.
        self._thread = threading.get_ident()
        self.clock = clock
        self.interval = interval
        # One per service, made at its first line (the names are the code's).
        self.budgets: dict[str, LogBudget] = {}
        # Accept errors: the first of each kind an interval, the rest counted.
        self.accepts = LogBudget(None, clock, self._sum_up_accepts, interval)

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if threading.get_ident() != self._thread:
            return PredicateResult.maybe
        fmt = event.get("log_format")
        if fmt in _ACCEPT_FORMATS:
            return self._accept_error(fmt, event)
        service = client_service(event)
        if service is None:
            return PredicateResult.maybe
        budget = self.budgets.get(service)
        if budget is None:
            budget = self.budgets[service] = self._budget(service)
        # The label (a substitution) only for a line held back.
        return PredicateResult.maybe if budget.admit(lambda: client_kind(event)) else PredicateResult.no

    def _budget(self, service: str) -> LogBudget:
        def sum_up(counts: dict[str, int], seconds: float) -> None:
            self._sum_up(service, counts, seconds)

        return LogBudget(rate_limit(self.rate, self.clock.seconds), self.clock, sum_up, self.interval)

    def _accept_error(self, fmt: str, event: dict[str, Any]) -> PredicateResult:
        if fmt == _EMFILE_CLOSED:
            # One connection accepted and closed at once: no descriptor for it.
            if self.accepts.first_of("EMFILE"):
                self.log.warn(
                    "cannot accept connections: out of file descriptors (EMFILE, open-file limit "
                    "{limit}); new ones are closed at once until some close; further ones are summed "
                    "up every {interval:g} s",
                    limit=open_file_limit(),
                    interval=self.accepts.interval,
                )
            return PredicateResult.no
        if fmt in (_EMFILE_START, _EMFILE_DONE):
            return PredicateResult.no  # the recovery's bracket: the closed sockets are what count
        kind = f"{event.get('acceptError', '?')}" if fmt == _CANNOT_ACCEPT else "reserve"
        return PredicateResult.maybe if self.accepts.first_of(kind) else PredicateResult.no

    def _sum_up(self, service: str, counts: dict[str, int], seconds: float) -> None:
        kinds = ", ".join(f"{count} x {kind}" for kind, count in sorted(counts.items(), key=lambda i: -i[1]))
        self.log.info(
            "log: {of}: {total} more lines caused by clients in the last {seconds:.3g} s, not logged one"
            " by one (--log-rate {rate}, each service): {kinds}",
            of=service,
            total=sum(counts.values()),
            seconds=seconds,
            rate=f"{self.rate[0]:g}/{self.rate[1]:g}",
            kinds=kinds,
        )

    def _sum_up_accepts(self, counts: dict[str, int], seconds: float) -> None:
        parts = []
        for kind, count in sorted(counts.items()):
            if kind == "EMFILE":
                parts.append(
                    f"{count} connections closed unserved (EMFILE, open-file limit {open_file_limit()})"
                )
            elif kind == "reserve":
                parts.append(f"{count} x could not reserve the EMFILE recovery descriptor")
            else:
                parts.append(f"{count} x could not accept a connection ({kind})")
        self.log.warn(
            "accept errors in the last {seconds:.3g} s, not logged one by one: {parts}",
            seconds=seconds,
            parts="; ".join(parts),
        )

    def flush(self) -> None:
        """Sum up now (the suite stops)."""
        for budget in self.budgets.values():
            budget.flush()
        self.accepts.flush()


_ACCEPT_FORMATS = frozenset((_EMFILE_START, _EMFILE_CLOSED, _EMFILE_DONE, _CANNOT_ACCEPT, *_CANNOT_RESERVE))


def client_service(event: dict[str, Any]) -> str | None:
    """The budget a line a client caused is charged to (its service), or None:
    not a client's, or budgeted already.

    Ours name who caused them (a ``peer``, ``nick`` or ``user`` field) or
    are access lines (``access``), and name their service (a ``service``
    field or the text's first word); Twisted's are those of
    :data:`TWISTED_KINDS` (twisted.web's: http), and any other that comes
    from a request (http) or a connection's protocol (``log_source``: its
    factory's service, if known) or was logged while the reactor handled a
    connection (``log_system``); one budget, ``twisted``, for those of no
    known service.
    """
    namespace = event.get("log_namespace", "")
    if namespace == "sockproto":
        if BUDGETED in event or _CLIENT_FIELDS.isdisjoint(event):
            return None
        service = event.get("service")
        if isinstance(service, str):
            return service
        prefix = _SERVICE_PREFIX.match(str(event.get("log_format") or ""))
        return prefix.group(1) if prefix else "sockproto"
    text = _text(event)
    if text.startswith(TWISTED_KINDS):
        # Said only of a request or a client (twisted.web answers pipelined
        # requests outside the connection's logging context).
        return "http"
    source = event.get("log_source")
    if isinstance(source, Request):
        return "http"
    if isinstance(source, Protocol):
        # Our factories (limits.GuardedFactory) carry their service's stats.
        name = getattr(getattr(getattr(source, "factory", None), "stats", None), "name", None)
        return name if isinstance(name, str) else "twisted"
    system = event.get("log_system")
    if isinstance(system, str) and _CONNECTION_SYSTEM.search(system):
        # "Protocol,session,host" names no service: one budget for all.
        return "twisted"
    return None


def client_kind(event: dict[str, Any]) -> str:
    """The kind of a line a client caused (:func:`client_service` says
    which): its label in the summary."""
    if event.get("log_namespace", "") == "sockproto":
        return _label(event)
    text = _text(event)
    for kind in TWISTED_KINDS:
        if text.startswith(kind):
            return kind
    for marker, kind in TWISTED_CONNECTION_KINDS.items():
        if marker in text:
            return kind
    failed = "log_failure" in event or event.get("isError")
    return "errors (tracebacks)" if failed else "other Twisted lines"


def _text(event: dict[str, Any]) -> str:
    text = event.get("log_text") or event.get("log_format") or ""
    return text if isinstance(text, str) else ""


def _label(event: dict[str, Any]) -> str:
    """Our line's format with the client's values left out: ``http: 400 to
    <peer>: request target <target> <problem>`` (the service is filled in)."""
    fmt = str(event.get("log_format") or "")

    def field(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(event.get("service", name)) if name == "service" else f"<{name}>"

    return _FIELD.sub(field, fmt)


def log_observers(publisher: Any) -> list[tuple[ILogObserver, BaseLogFile | None]] | None:
    """The observers ``publisher`` has now, each with the log file it writes
    to (twistd's ``-l FILE``, or ``twistd.log`` as a daemon), if any.

    twisted.logger has no public way to list the observers twistd (or a .tac,
    or ``--logger``) gave the global publisher, nor to get the LogFile of a
    FileLogObserver, which twistd keeps nowhere else: so they are read from
    the private ``LogPublisher._observers`` and ``FileLogObserver._outFile``,
    here and nowhere else. Without ``_observers``: None (nothing is filtered,
    and :func:`install` warns); without ``_outFile``: no file (SIGHUP then
    reopens none, and says so).
    """
    observers = getattr(publisher, "_observers", None)
    if not isinstance(observers, list):
        return None
    found = []
    for observer in observers:
        out = getattr(observer, "_outFile", None)
        found.append((observer, out if isinstance(out, BaseLogFile) else None))
    return found


def install(
    predicate: Callable[[dict[str, Any]], PredicateResult], publisher: Any = None
) -> Callable[[], None]:
    """Put ``predicate`` in front of every observer ``publisher`` (the global
    log publisher) has now (:func:`log_observers`); returns the call that
    takes it out again.

    twisted.logger can filter what reaches an observer (FilteringLogObserver)
    once it knows the observers. Were they unknown, nothing is filtered and a
    warning says so. The observers are out of the publisher's list from now
    on: what looks for twistd's log file there looks before (see
    service.Suite).
    """
    publisher = globalLogPublisher if publisher is None else publisher
    observers = log_observers(publisher)
    if observers is None:
        log.warn("log: cannot put the --log-rate budget in front of the log on this Twisted")
        return lambda: None
    behind = [observer for observer, _ in observers]
    for observer in behind:
        publisher.removeObserver(observer)
    front = FilteringLogObserver(LogPublisher(*behind), [predicate])
    publisher.addObserver(front)

    def uninstall() -> None:
        publisher.removeObserver(front)
        for observer in behind:
            publisher.addObserver(observer)

    return uninstall

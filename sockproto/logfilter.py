"""One budget for every log line a client can cause, ours or Twisted's.

A client that keeps one connection open can make the server log a line per
request (twisted.web's "Ignoring malformed Range header", our ``http: 400 to
...``) or, by holding descriptors, a few lines per refused accept: without a
bound, gigabytes. :class:`ClientLogFilter` is a predicate in front of every
observer the log has when the suite starts (twistd's file, a ``--logger``, the
.tac's): the lines it recognises as caused by a client pass one shared
:class:`~sockproto.limits.LogBudget` (``--log-rate``); those over it are
counted by kind and summed up in one line an interval. Accept errors (Twisted's
``EMFILE`` recovery and "Could not accept new connection") get one line per
kind and interval, whatever the budget.
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

_FIELD = re.compile(r"\{(\w*)[^{}]*\}")


def open_file_limit() -> int:
    """This process's soft RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ClientLogFilter:
    """A log predicate: client-caused lines within the budget, the rest counted.

    ``rate`` is ``(lines a second, burst)`` (``--log-rate``; 0: every line);
    its own lines (the summaries) go to ``logger`` (the global log).
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
        self.budget = LogBudget(rate_limit(rate, clock.seconds), clock, self._sum_up, interval)
        # Accept errors: the first of each kind an interval, the rest counted.
        self.accepts = LogBudget(None, clock, self._sum_up_accepts, interval)

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if threading.get_ident() != self._thread:
            return PredicateResult.maybe
        fmt = event.get("log_format")
        if fmt in _ACCEPT_FORMATS:
            return self._accept_error(fmt, event)
        kind = client_kind(event)
        if kind is None or self.budget.admit(kind):
            return PredicateResult.maybe
        return PredicateResult.no

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

    def _sum_up(self, counts: dict[str, int], seconds: float) -> None:
        kinds = ", ".join(f"{count} x {kind}" for kind, count in sorted(counts.items(), key=lambda i: -i[1]))
        self.log.info(
            "log: {total} more lines caused by clients in the last {seconds:.3g} s, not logged one by one"
            " (--log-rate {rate}): {kinds}",
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
        self.budget.flush()
        self.accepts.flush()


_ACCEPT_FORMATS = frozenset((_EMFILE_START, _EMFILE_CLOSED, _EMFILE_DONE, _CANNOT_ACCEPT, *_CANNOT_RESERVE))


def client_kind(event: dict[str, Any]) -> str | None:
    """The kind of a line a client caused (its summary label), or None.

    Ours name who caused them (a ``peer``, ``nick`` or ``user`` field) or
    are access lines (``access``); Twisted's
    are those of :data:`TWISTED_KINDS`, and any other that comes from a
    request or a connection's protocol (``log_source``) or was logged while
    the reactor handled a connection (``log_system``).
    """
    namespace = event.get("log_namespace", "")
    if namespace == "sockproto":
        if not _CLIENT_FIELDS.isdisjoint(event):
            return _label(event)
        return None
    text = event.get("log_text") or event.get("log_format") or ""
    if isinstance(text, str) and text.startswith(TWISTED_KINDS):
        # Said only of a request or a client (twisted.web answers pipelined
        # requests outside the connection's logging context).
        return next(kind for kind in TWISTED_KINDS if text.startswith(kind))
    source = event.get("log_source")
    system = event.get("log_system")
    if isinstance(source, (Request, Protocol)) or (
        isinstance(system, str) and _CONNECTION_SYSTEM.search(system)
    ):
        if isinstance(text, str):
            for marker, kind in TWISTED_CONNECTION_KINDS.items():
                if marker in text:
                    return kind
        failed = "log_failure" in event or event.get("isError")
        return "errors (tracebacks)" if failed else "other Twisted lines"
    return None


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

"""Listening on a service's port: the one place that binds, reports and stops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockproto.checks import lacks_tls_files
from sockproto.config import ConfigError, SuiteSettings
from sockproto.endpoints import stream_description, with_backlog
from sockproto.limits import ConnectionPolicy, GuardedFactory
from sockproto.stats import ServiceStats

log = Logger(namespace="sockproto")


class StartupError(Exception):
    """A service could not start; the message says which one and why."""


class Listener(Service):
    """Listens while running; says where it listens, and that it stopped.

    ``on_stop()`` runs once the port is closed: it lets the open connections
    finish (within ``--shutdown-grace``, see :func:`stream_listener`).
    ``prepare`` runs at start once twistd has dropped privileges (``--uid``),
    so it checks what the service will use as the user it runs as; it raises
    :class:`StartupError` if the service cannot work.
    """

    def __init__(
        self,
        name: str,
        where: str,
        listen: Callable[[], Any],
        stats: ServiceStats,
        on_stop: Callable[[], Any] | None = None,
        prepare: Callable[[], None] | None = None,
        *,
        factory: Any = None,
        announce: bool = True,
    ) -> None:
        self.name = name
        self.where = where
        self._listen = listen
        self._stats = stats
        self._on_stop = on_stop  # after the port closes: let the open connections finish
        self._prepare = prepare
        self.factory = factory  # a stream service's GuardedFactory
        self.announce = announce  # log and count where it listens (a worker's copy does not)
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Listen before privileges are dropped, and synchronously, so that a
        # taken port stops the suite before it reports itself started.
        outcome = _now(maybeDeferred(self._listen))
        if isinstance(outcome, Failure):
            raise StartupError(f"{self.name}: cannot listen on {self.where}: {_reason(outcome.value)}")
        self.port = outcome
        if self.announce:
            address = describe(outcome.getHost(), tls=self.where.startswith("ssl:"))
            self._stats.listening.append(address)
            log.info("{service} listening on {address}", service=self.name, address=address)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:  # not started by twistd's privileged pass
            self.privilegedStartService()
        if self._prepare is not None:
            self._prepare()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        stopped = maybeDeferred(port.stopListening)
        if self._on_stop is not None:
            stopped.addCallback(lambda _: self._on_stop())
        if self.announce:
            self._stats.listening.clear()
            stopped.addCallback(lambda _: log.info("{service} stopped", service=self.name))
        return stopped

    def shared_socket(self) -> tuple[int, int] | None:
        """``(fd, family)`` of the listening socket for a worker to adopt, or
        None when it cannot be: not listening, or the port wraps our factory
        in another (``ssl:`` endpoints do), which a worker would not know."""
        port = self.port
        sock = getattr(port, "socket", None)
        if self.factory is None or sock is None or getattr(port, "factory", None) is not self.factory:
            return None
        return sock.fileno(), sock.family

    def adopting(self, fd: int, family: int, reactor: Any) -> Listener:
        """This service on a listening socket inherited from the main process."""
        factory = self.factory
        copy = Listener(
            self.name,
            self.where,
            lambda: reactor.adoptStreamPort(fd, family, factory),
            self._stats,
            self._on_stop,
            factory=factory,
            announce=False,
        )
        return copy


def stream_listener(
    name: str,
    spec: str,
    suite: SuiteSettings,
    factory: Any,
    policy: ConnectionPolicy,
    stats: ServiceStats,
    reactor: Any,
    prepare: Callable[[], None] | None = None,
) -> Listener | None:
    """A TCP-style service on its port setting, under the shared connection
    policy; ``suite`` says where bare ports listen, which TLS files an
    ``ssl:`` endpoint uses, how refusals are logged and how long a stop waits
    for open connections (here, so a worker's copy has them too)."""
    description = stream_description(spec, suite.interface, (suite.tls_cert, suite.tls_key), name)
    if description is None:
        return None
    if lacks_tls_files(description):
        raise ConfigError(
            f"{name}: {spec} needs --tls-cert (and --tls-key), or privateKey= and certKey= in it"
        )
    from twisted.internet.endpoints import serverFromString

    policy = replace(policy, refusal_log_rate=suite.refusal_log_rate, suite_max_output=suite.suite_max_output)
    guarded = GuardedFactory(factory, policy, stats, reactor)
    endpoint = serverFromString(reactor, with_backlog(description))
    return Listener(
        name,
        description,
        lambda: endpoint.listen(guarded),
        stats,
        lambda: guarded.server_stopping(suite.shutdown_grace),
        prepare,
        factory=guarded,
    )


def describe(address: Any, tls: bool = False) -> str:
    """An IAddress as ``tcp:127.0.0.1:9000``, ``tcp6:[::1]:9000``, ``unix:/path``;
    ``ssl:127.0.0.1:995`` (``ssl:[::1]:995``) with ``tls``, which the address
    cannot tell: a TLS port's is its TCP port's."""
    kind = getattr(address, "type", None)
    if kind in ("TCP", "UDP"):
        host = address.host
        shown = f"[{host}]" if ":" in host else host
        if tls:
            return f"ssl:{shown}:{address.port}"
        family = ("tcp" if kind == "TCP" else "udp") + ("6" if ":" in host else "")
        return f"{family}:{shown}:{address.port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


def _now(deferred: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (endpoint listens are synchronous)."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    if not results:
        return Failure(StartupError("did not start listening at once"))
    return results[0]


def _reason(error: BaseException) -> str:
    socket_error = getattr(error, "socketError", None)
    if socket_error is not None:
        return getattr(socket_error, "strerror", None) or str(socket_error)
    return str(error) or error.__class__.__name__

"""Settings -> one MultiService with a listening child per enabled service.

Both front doors (the twistd plugin and the .tac file) call :func:`make_service`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger, globalLogPublisher
from twisted.python.logfile import BaseLogFile

from sockproto import __version__, chat, http, pop3, strip, udp, workers
from sockproto.config import SERVICES, Settings
from sockproto.listening import Listener, StartupError
from sockproto.logfilter import ClientLogFilter, install, log_observers
from sockproto.stats import Stats

log = Logger(namespace="sockproto")


class Suite(MultiService):
    """All services; either all of them listen or none does."""

    def __init__(self, settings: Settings, stats: Stats, config_path: Path | None, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.stats = stats
        self.config_path = config_path
        self.pool: workers.WorkerPool | None = None
        self.log_filter: ClientLogFilter | None = None
        self._uninstall_log_filter: Callable[[], None] | None = None
        # twistd's log files, found before the filter took their observers
        # out of the global publisher's list (None: not looked for yet).
        self._twistd_log_files: list[BaseLogFile] | None = None

    def privilegedStartService(self) -> None:
        source = self.config_path or "defaults"
        log.info("sockproto {version} starting (settings: {source})", version=__version__, source=str(source))
        self._before_listening()
        started: list[Listener] = []
        try:
            for child in self:
                child.privilegedStartService()
                started.append(child)
        except StartupError as error:
            self._abandon_start(started, error)
            raise
        Service.privilegedStartService(self)

    def startService(self) -> None:
        self._before_listening()  # not started by twistd's privileged pass
        # Services check what they will use here, as the user twistd runs them
        # as (--uid); one that cannot work stops them all before any is ready.
        try:
            super().startService()
        except StartupError as error:
            self._abandon_start(list(self), error)
            raise
        # Ready means the reactor runs (and handles SIGTERM), not just listening.
        self.reactor.callWhenRunning(self._ready)

    def _before_listening(self) -> None:
        """Once, before the first port opens: every line a client can cause
        passes one budget (``--log-rate``, see logfilter) from the first
        connection to the end, and the open-file limit fits the caps."""
        if self._uninstall_log_filter is None:
            # LogFile.reopen() reopens in place: the ones found now stay twistd's.
            self._twistd_log_files = twistd_log_files()
            self.log_filter = ClientLogFilter(self.settings.suite.log_rate, self.reactor)
            self._uninstall_log_filter = install(self.log_filter)
            check_open_files(self.settings)

    def _unfilter_the_log(self, result: Any = None) -> Any:
        """Sum up what the budget held back and take the filter out."""
        uninstall, self._uninstall_log_filter = self._uninstall_log_filter, None
        if uninstall is not None and self.log_filter is not None:
            self.log_filter.flush()
            uninstall()
        return result

    def _abandon_start(self, started: list[Any], error: StartupError) -> None:
        """Stops what did start, says why the suite cannot, in one line."""
        for child in started:
            child.stopService()
        log.critical("{error}", error=str(error))
        self._unfilter_the_log()
        _report_cleanly(StartupError)

    def _ready(self) -> None:
        self._stop_cleanly_on_sigterm()
        self._reopen_logs_on_sighup()
        names = ", ".join(child.name for child in self if isinstance(child, Listener))
        names = names or "nothing (every service is off)"
        started = self.pool.ready if self.pool is not None else succeed(None)
        started.addCallback(lambda _: log.info("sockproto ready: {services}", services=names))

    def stopService(self) -> Deferred[Any]:
        """With workers, they stop first: what they send last (counts, log and
        access log lines) still finds the main process's services and files open."""
        if self.pool is None or not self.pool.running:
            stopped = maybeDeferred(super().stopService)
        else:
            stopped = maybeDeferred(self.pool.stopService)
            stopped.addBoth(lambda _: MultiService.stopService(self))
        stopped.addBoth(self._unfilter_the_log)
        return stopped

    def _stop_cleanly_on_sigterm(self) -> None:
        """SIGTERM is how systemd and ``kill`` ask for a normal stop: shut down
        and exit 0, rather than Twisted's default of re-raising the signal so
        the process dies with status 143."""
        if threading.current_thread() is not threading.main_thread():
            return

        def stop() -> None:
            # A second SIGTERM while the services say goodbye is no error.
            with contextlib.suppress(ReactorNotRunning):
                self.reactor.stop()

        def on_sigterm(signum: int, frame: Any) -> None:
            log.info("received SIGTERM, stopping")
            self.reactor.callFromThread(stop)

        signal.signal(signal.SIGTERM, on_sigterm)
        # Should Twisted's own handler have seen a SIGTERM all the same, twistd
        # would re-raise it at exit (via the reactor's private _exitSignal).
        self.reactor.addSystemEventTrigger("after", "shutdown", self._forget_sigterm)

    def _forget_sigterm(self) -> None:
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        # Stopped: a further SIGTERM has nothing left to stop. Python restores
        # the default action of handled signals while it shuts down, so one
        # arriving now would kill the process (status 143) mid-exit; ignored
        # signals it leaves alone.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _reopen_logs_on_sighup(self) -> None:
        """SIGHUP is what logrotate (and a closed terminal) sends: reopen the
        log files and keep serving, where Python's default would end the
        process and cut every request in flight."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reopen_log_files)

        signal.signal(signal.SIGHUP, on_sighup)
        # As for SIGTERM: a SIGHUP while Python shuts down must not kill it.
        self.reactor.addSystemEventTrigger("after", "shutdown", signal.signal, signal.SIGHUP, signal.SIG_IGN)

    def reopen_log_files(self) -> None:
        """Reopen twistd's log file and every access log by name, so that
        after logrotate moved them the lines go to new files of those names."""
        reopened, failed = [], []
        for log_file in self._log_files():
            problem = reopen_log_file(log_file)
            if problem is None:
                reopened.append(log_file.path)
            else:
                failed.append(problem)
        for problem in failed:
            log.warn(
                "SIGHUP: cannot reopen {problem}; still writing to the file it had open", problem=problem
            )
        log.info("SIGHUP: log files reopened: {files}", files=", ".join(reopened) or "none")

    def _log_files(self) -> list[BaseLogFile]:
        """twistd's (``-l FILE``) and the services' access logs
        (``--http-access-log``: a twisted.web Site's ``logFile``)."""
        found = self._twistd_log_files
        files = list(found) if found is not None else twistd_log_files()
        for child in self:
            site = getattr(getattr(child, "factory", None), "wrappedFactory", None)
            access = getattr(site, "logFile", None)
            if isinstance(access, BaseLogFile) and access not in files:
                files.append(access)
        return files


def twistd_log_files() -> list[BaseLogFile]:
    """The files twistd logs to: ``-l FILE``, or ``twistd.log`` as a daemon.

    twistd keeps its LogFile only inside the observer it gives the global log
    publisher (see :func:`~sockproto.logfilter.log_observers`), so this finds
    them only before the log filter wraps that observer. None logging to
    stdout, to syslog or through ``--logger``.
    """
    return [out for _, out in log_observers(globalLogPublisher) or () if out is not None]


def reopen_log_file(log_file: BaseLogFile) -> str | None:
    """Reopen ``log_file`` by its name; what stops it, or None.

    Reopening closes the old file first: one that cannot then be opened
    (a folder the user twistd runs as, ``--uid``, may not write) is checked
    for before, so the lines keep going to the old file rather than nowhere.
    """
    path = log_file.path
    where = path if os.path.exists(path) else os.path.dirname(path) or "."
    if not os.access(where, os.W_OK):
        return f"{path}: cannot write to {where}"
    try:
        log_file.reopen()
    except OSError as error:
        return f"{path}: {error.strerror or error}"
    return None


def make_service(settings: Settings, reactor: Any = None, config_path: Path | None = None) -> Suite:
    if reactor is None:
        from twisted.internet import reactor
    suite = Suite(settings, Stats(reactor.seconds), config_path, reactor)
    for name in SERVICES:
        builder = BUILDERS.get(name)
        if builder is not None:
            listener = builder(settings, suite.stats, reactor)
            if listener is not None:
                listener.setServiceParent(suite)
    if settings.suite.workers > 1:
        shared = {child.name: child for child in suite if child.name in workers.SHARED}
        suite.pool = workers.WorkerPool(settings, suite.stats, shared, reactor)
        suite.pool.setServiceParent(suite)
    return suite


# service name -> build(settings, stats, reactor) -> Listener, or None when off
BUILDERS: dict[str, Callable[[Settings, Stats, Any], Listener | None]] = {
    "strip": strip.build,
    "chat": chat.build,
    "udp": udp.build,
    "http": http.build,
    "pop3": pop3.build,
}


# Descriptors beyond the connection caps: listening sockets, the log and
# access log, the reactor's own, a POP3 message or a TLS file being read.
OPEN_FILE_RESERVE = 64
# Each worker costs the main process its pipes and process descriptors.
OPEN_FILES_PER_WORKER = 4
CAPPED = ("strip", "chat", "http", "pop3")  # the stream services: a descriptor per client


def open_files_needed(settings: Settings) -> tuple[int, int, list[str], list[str]]:
    """Descriptors the main process may hold with every cap reached: the sum,
    the reserve in it, its other parts (``chat 1000``), and the enabled
    services without a cap.

    The limit is per process, and the main one serves every service (a worker
    only strip and HTTP, each under its own copy of their caps), so this is
    the most any one process needs. An HTTP download holds the file open too;
    a POP3 session holds its mailbox lock while logged in, and a RETR or TOP
    the message file for the whole transfer.
    """
    reserve = OPEN_FILE_RESERVE + OPEN_FILES_PER_WORKER * (settings.suite.workers - 1)
    total = reserve
    parts: list[str] = []
    unbounded: list[str] = []
    for name in CAPPED:
        section = getattr(settings, name)
        if section.port == "off":
            continue
        if not section.max_clients:
            unbounded.append(name)
            continue
        each, held = _per_client(name, settings)
        total += section.max_clients * each
        parts.append(f"{name} {section.max_clients}{held}")
    return total, reserve, parts, unbounded


def _per_client(name: str, settings: Settings) -> tuple[int, str]:
    """Descriptors one client of ``name`` may hold (its connection and what
    else), and how the warning says so."""
    if name == "pop3":
        return 3, " x 3 (lock, message)"
    if name == "http" and settings.http.root:
        return 2, " x 2 (files)"
    return 1, ""


def _cap_option(name: str) -> str:
    return "--max-clients" if name == "strip" else f"--{name}-max-clients"


def check_open_files(settings: Settings, limits: Any = resource) -> None:
    """Raise the soft open-file limit toward the hard one as far as the caps
    need (all the way for a service without a cap); if it still falls short,
    say so once, with both numbers, as nginx does: otherwise one service's
    clients can take every descriptor and the others stop accepting, silently."""
    need, reserve, parts, unbounded = open_files_needed(settings)
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    infinite = limits.RLIM_INFINITY
    ceiling = hard if hard != infinite else max(need, soft)  # Linux has no unlimited NOFILE
    want = ceiling if unbounded else min(ceiling, need)
    if soft != infinite and want > soft:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as error:
            log.warn(
                "cannot raise the open-file limit from {soft} to {want}: {error}",
                soft=soft,
                want=want,
                error=error,
            )
        else:
            log.info(
                "open-file limit raised from {soft} to {want} (hard limit {hard})",
                soft=soft,
                want=want,
                hard="unlimited" if hard == infinite else hard,
            )
            soft = want
    capped = [name for name in CAPPED if getattr(settings, name).port != "off" and name not in unbounded]
    if soft != infinite and need > soft and capped:
        log.warn(
            "open-file limit {limit} is below the {need} descriptors the connection caps may take "
            "({parts} + {reserve} reserved): past it, connections are not accepted, whichever service "
            "they are for; raise the limit (ulimit -n, systemd LimitNOFILE=) or lower {options}",
            limit=soft,
            need=need,
            parts=" + ".join(parts),
            reserve=reserve,
            options=", ".join(_cap_option(name) for name in capped),
        )
    if unbounded:
        log.warn(
            "{services}: no cap on clients ({options} 0): the open-file limit {limit} is the only bound, "
            "and clients of one service can take every descriptor from the others",
            services=", ".join(unbounded),
            options=", ".join(_cap_option(name) for name in unbounded),
            limit="unlimited" if soft == infinite else soft,
        )


_hook_installed = False


def _report_cleanly(kind: type[BaseException]) -> None:
    """Make an uncaught ``kind`` print one line instead of a traceback.

    twistd re-raises start-up errors after cleaning up (pidfile, daemon status
    pipe), which ends in Python's traceback printer; an operator needs one line.
    """
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(exc_type, kind):
            print(f"sockproto: error: {value}", file=sys.__stderr__)
        else:
            previous(exc_type, value, tb)

    sys.excepthook = hook

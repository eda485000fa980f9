"""``--workers N``: more processes serving the stateless TCP services (strip, HTTP).

The main process binds every port as usual. For N > 1 it then starts N-1
worker processes (``python -m sockproto.worker``) that inherit the strip and
HTTP listening sockets and serve them under the same connection policy; the
kernel hands each new connection to whichever process accepts it first, so a
busy or stopped process simply gets fewer. Chat (its room), UDP and POP3 (its
per-host login delays) stay in the main process.

A worker talks to the main process over pipes, one JSON object a line:

- main -> worker, on the worker's stdin: first ``{"start": ...}`` (the
  settings, which inherited descriptor is which service), then every
  :data:`REPORT_INTERVAL` ``{"others": ...}``: the other processes' counts, so
  that the worker's /status and /metrics show the whole suite.
- worker -> main, on the worker's descriptor 3: ``{"ready": ...}``,
  ``{"counts": ...}`` every :data:`REPORT_INTERVAL`, and batches of its log
  events (``{"log": ...}``) and, with ``--http-access-log FILE``, of its
  access log lines (``{"access": ...}``): the main process writes every log
  (and rotates the file). Into the twistd log, each process logs requests
  within its own ``--http-log-rate``, as it applies its own caps.

Whatever a worker prints on stdout or stderr is logged by the main process as
a warning, a line at a time.

A worker stops gracefully on SIGTERM (as the main process does), and at once
when its stdin closes: the main process is gone. The main process starts a
worker that exits unexpectedly again, after a pause that doubles (to 30 s)
while it keeps failing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import site
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from sockproto import config
from sockproto.listening import Listener
from sockproto.logfilter import ClientLogFilter, install
from sockproto.stats import ServiceStats, Stats

log = Logger(namespace="sockproto")

# Services whose connections share nothing: any process may serve them.
SHARED = ("strip", "http")
REPORT_INTERVAL = 0.5  # seconds between two exchanges of counts
FLUSH_DELAY = 0.05  # a worker's log lines wait this long, to go in batches
STOP_MARGIN = 5.0  # a stopping worker gets --shutdown-grace and this long before SIGKILL
START_GRACE = 20.0  # "ready" waits this long for the workers, at most
RESTART_FIRST, RESTART_MOST = 1.0, 30.0  # the pause before starting a worker again
STEADY = 60.0  # a worker up this long had a good run: its next pause is the first again
MAX_MESSAGE = 1 << 20  # longest line accepted on a pipe, in bytes
MESSAGES_FD = 3  # a worker's descriptor for its messages to the main process
FIRST_SOCKET_FD = 4  # a worker's inherited listening sockets start here


def accept_one_at_a_time(port: Any) -> None:
    """A shared listening port accepts one connection per turn of the reactor
    loop. Twisted's port accepts as many as are waiting (up to a number it
    raises while they keep coming), so whichever process woke first would take
    a whole burst of new connections; one at a time, each process takes its
    turn (nginx's workers accept one at a time too, unless ``multi_accept``)."""
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return accept()

    port.doRead = doRead


def worker_environment() -> dict[str, str]:
    """This environment, and sockproto importable from a source checkout (an
    installed package needs nothing: its folder is on the default path)."""
    env = dict(os.environ)
    home = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if home not in installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), home]))
    return env


class WorkerPool(Service):
    """The main process's side: starts, watches, restarts and stops the workers."""

    name = "workers"

    def __init__(
        self, settings: config.Settings, stats: Stats, listeners: dict[str, Listener], reactor: Any
    ) -> None:
        self.settings = settings
        self.count = settings.suite.workers
        self.stats = stats
        self.listeners = listeners
        self.reactor = reactor
        self.workers: dict[int, WorkerProcess] = {}  # slot (2..N) -> its current process
        self.shared: list[tuple[str, int, int]] = []  # (service, fd, family)
        self.ready: Deferred[None] = Deferred()
        self._retired: dict[str, ServiceStats] = {}  # what workers that exited had counted
        self._pauses: dict[int, float] = {}  # slot -> pause before its next restart
        self._restarts: dict[int, Any] = {}  # slot -> pending restart call
        self._restarted: dict[int, int] = {}  # slot -> how many times
        self._ticker = LoopingCall(self._exchange_counts)
        self._ticker.clock = reactor
        self._start_call: Any = None

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._start)

    def _start(self) -> None:
        if not self.running:
            return
        for name, listener in self.listeners.items():
            inherited = listener.shared_socket()
            if inherited is None:
                log.warn(
                    "{service}: {where} cannot be shared with workers; the main process alone serves it",
                    service=name,
                    where=listener.where,
                )
            else:
                self.shared.append((name, *inherited))
                accept_one_at_a_time(listener.port)
        if not self.shared:
            log.warn(
                "--workers {count}: nothing to share (strip and HTTP are off or not plain TCP): one process",
                count=self.count,
            )
            self.ready.callback(None)
            return
        names = ", ".join(name for name, _, _ in self.shared)
        which = "worker 2" if self.count == 2 else f"workers 2 to {self.count}"
        log.info("workers: starting {which} for {services}", which=which, services=names)
        for slot in range(2, self.count + 1):
            self._spawn(slot)
        self._start_call = self.reactor.callLater(START_GRACE, self._started_anyway)
        self._ticker.start(REPORT_INTERVAL, now=False)

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        worker = WorkerProcess(self, slot)
        self.workers[slot] = worker
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", MESSAGES_FD: "r"}
        services = []
        for index, (name, fd, family) in enumerate(self.shared):
            child_fds[FIRST_SOCKET_FD + index] = fd
            services.append({"name": name, "fd": FIRST_SOCKET_FD + index, "family": family})
        try:
            self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "sockproto.worker"],
                env=worker_environment(),
                childFDs=child_fds,
            )
        except OSError as error:  # out of processes or descriptors, for one
            worker.gone = True
            self._start_again(worker, f"could not start: {error.strerror or error}")
            return
        worker.send(
            {
                "start": {
                    "slot": slot,
                    "settings": config.as_data(worker_settings(self.settings)),
                    "services": services,
                    "report_interval": REPORT_INTERVAL,
                    # An access log file is the main process's to write, every line of it.
                    "relay_access_log": bool(self.settings.http.access_log),
                }
            }
        )
        self._update_processes()

    # -- messages from a worker ---------------------------------------------------

    def message(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        if "counts" in message:
            worker.counts = message["counts"]
            self.stats.others[worker.name] = worker.counts
            self._update_processes()
        if "log" in message:
            for level, text in message["log"]:
                log.emit(LogLevel.levelWithName(level), "{worker}: {text}", worker=worker.name, text=text)
        if "access" in message:
            for service, lines in message["access"].items():
                sink = self._access_log(service)
                for line in lines:
                    sink(line)
        if "ready" in message:
            worker.ready = True
            self._exchange_counts()  # its /status shows the whole suite from the start
            self._check_started()

    def _access_log(self, service: str) -> Callable[[str], Any]:
        """Where the main process writes ``service``'s access log (a twisted.web Site's ``logFile``)."""
        listener = self.listeners.get(service)
        site = getattr(getattr(listener, "factory", None), "wrappedFactory", None)
        log_file = getattr(site, "logFile", None)
        return log_file.write if log_file is not None else (lambda line: None)

    def _check_started(self) -> None:
        if self.ready.called:
            return
        if all(worker.ready or worker.gone for worker in self.workers.values()):
            self._started()

    def _started_anyway(self) -> None:
        self._start_call = None
        late = ", ".join(w.name for w in self.workers.values() if not w.ready)
        log.warn("workers: {late} not ready after {seconds:g} s; going on", late=late, seconds=START_GRACE)
        self._started()

    def _started(self) -> None:
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        self._start_call = None
        ready = sum(1 for worker in self.workers.values() if worker.ready) + 1
        log.info(
            "workers: {ready} of {count} processes serve {services}",
            ready=ready,
            count=self.count,
            services=", ".join(name for name, _, _ in self.shared),
        )
        self.ready.callback(None)

    # -- counts -------------------------------------------------------------------

    def _exchange_counts(self) -> None:
        """Every worker gets the others' counts (its own it has)."""
        everyone = {"main": self.stats.local_counts(), **self._retired_counts()}
        for worker in self.workers.values():
            if worker.counts:
                everyone[worker.name] = worker.counts
        for worker in self.workers.values():
            # A worker that said nothing since the last view (stopped, hung)
            # gets no more: what waits in its pipe stays one view.
            if worker.ready and worker.heard and not worker.gone:
                worker.heard = False
                others = {name: counts for name, counts in everyone.items() if name != worker.name}
                worker.send(
                    {
                        "others": {
                            "counts": others,
                            "started": self.stats.started,
                            "processes": self.stats.processes,
                        }
                    }
                )

    def _retired_counts(self) -> dict[str, dict[str, Any]]:
        if not self._retired:
            return {}
        return {"exited workers": {name: s.counts() for name, s in self._retired.items()}}

    def _update_processes(self) -> None:
        def served(counts: dict[str, Any]) -> dict[str, int]:
            return {name: counts[name].get("total", 0) for name, _, _ in self.shared if name in counts}

        self.stats.processes = [
            {"name": "main", "pid": os.getpid(), "connections": served(self.stats.local_counts())},
            *(
                {
                    "name": worker.name,
                    "pid": worker.pid,
                    "restarts": self._restarted.get(slot, 0),
                    "connections": served(worker.counts),
                }
                for slot, worker in sorted(self.workers.items())
            ),
        ]

    # -- a worker's end -----------------------------------------------------------

    def ended(self, worker: WorkerProcess, status: str) -> None:
        """A worker exited: keep what it counted; start it again unless we stop."""
        self.stats.others.pop(worker.name, None)
        for name, counts in worker.counts.items():
            if name not in self._retired:
                self._retired[name] = ServiceStats(name, counts.get("unit", "handled"))
            self._retired[name].add({**counts, "current": 0, "listening": []})
        if self._retired:
            self.stats.others["exited workers"] = self._retired_counts()["exited workers"]
        worker.counts = {}
        if self.running:
            self._start_again(worker, f"(pid {worker.pid}) exited ({status})")

    def _start_again(self, worker: WorkerProcess, what: str) -> None:
        """After a pause that doubles while the worker keeps failing."""
        slot = worker.slot
        ran = self.reactor.seconds() - worker.started
        pause = RESTART_FIRST if ran >= STEADY else self._pauses.get(slot, RESTART_FIRST)
        self._pauses[slot] = min(RESTART_MOST, pause * 2)
        log.warn(
            "{worker} {what}; starting it again in {pause:g} s", worker=worker.name, what=what, pause=pause
        )
        self._restarted[slot] = self._restarted.get(slot, 0) + 1
        self._restarts[slot] = self.reactor.callLater(pause, self._spawn, slot)
        self._update_processes()
        self._check_started()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._ticker.running:
            self._ticker.stop()
        for call in [self._start_call, *self._restarts.values()]:
            if call is not None and call.active():
                call.cancel()
        self._restarts.clear()
        waiting = [worker.stop() for worker in self.workers.values() if not worker.gone]
        if not waiting:
            return succeed(None)
        return DeferredList(waiting)


def worker_settings(settings: config.Settings) -> config.Settings:
    """What a worker needs: no credentials (it serves neither chat nor POP3), and
    no access log file of its own (its lines go to the main process's)."""
    return dataclasses.replace(
        settings,
        suite=dataclasses.replace(settings.suite, auth=()),
        http=dataclasses.replace(settings.http, access_log=""),
    )


class WorkerProcess(ProcessProtocol):
    """One worker, as the main process sees it."""

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.name = f"worker {slot}"
        self.pid: int | None = None
        self.ready = False
        self.heard = True  # a message came since the last view of the others was sent
        self.gone = False
        self.counts: dict[str, Any] = {}
        self.started = pool.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b"", MESSAGES_FD: b""}
        self._kill_call: Any = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def send(self, message: dict[str, Any]) -> None:
        if not self.gone:
            self.transport.writeToChild(0, json.dumps(message).encode() + b"\n")

    def childDataReceived(self, fd: int, data: bytes) -> None:
        for line in self._lines(fd, data):
            if fd == MESSAGES_FD:
                self.heard = True
                try:
                    message = json.loads(line)
                except ValueError as error:
                    log.warn("{worker}: unreadable message ({error})", worker=self.name, error=str(error))
                    continue
                with log.failuresHandled("{worker}: while handling a message", worker=self.name):
                    self.pool.message(self, message)
            elif line.strip():
                stream = "stdout" if fd == 1 else "stderr"
                text = line.decode("utf-8", "replace").rstrip()
                log.warn("{worker} {stream}: {text}", worker=self.name, stream=stream, text=text)

    def _lines(self, fd: int, data: bytes) -> list[bytes]:
        *lines, rest = (self._partial.get(fd, b"") + data).split(b"\n")
        if len(rest) > MAX_MESSAGE:
            log.warn("{worker}: dropped a line over {limit} bytes", worker=self.name, limit=MAX_MESSAGE)
            rest = b""
        self._partial[fd] = rest
        return lines

    def stop(self) -> Deferred[None]:
        """SIGTERM, then SIGKILL if it is still there once its connections
        have had their --shutdown-grace, and :data:`STOP_MARGIN` to exit."""
        self._signal("TERM")
        limit = self.pool.settings.suite.shutdown_grace + STOP_MARGIN
        self._kill_call = self.pool.reactor.callLater(limit, self._signal, "KILL")
        return self.ended

    def _signal(self, name: str) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess(name)

    def processEnded(self, reason: Any) -> None:
        self.gone = True
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        value = reason.value
        signal_number = getattr(value, "signal", None)
        status = f"signal {signal_number}" if signal_number else f"status {getattr(value, 'exitCode', '?')}"
        self.pool.ended(self, status)
        self.ended.callback(None)


# -- the worker process's side ------------------------------------------------------


@implementer(IPushProducer)
class Backlog:
    """Told by the pipe to the main process when it is full (the main process
    is not reading: stopped, or busy); meanwhile log lines are counted, not kept."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class RelayedLines:
    """A twisted.web Site's ``logFile`` in a worker: its lines go to the main process."""

    def __init__(self, worker: Worker, service: str) -> None:
        self.worker = worker
        self.service = service

    def write(self, line: str) -> None:
        self.worker.relay_access(self.service, line)

    def close(self) -> None:
        """The main process owns the log."""


@implementer(IHalfCloseableProtocol)
class Worker(LineReceiver):
    """A worker process, talking to the main process over its stdin and fd 3."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.name = "worker"
        self.stats = Stats(reactor.seconds)
        self.services = MultiService()
        self.serving: list[str] = []
        self._outbox: list[dict[str, Any]] = []
        self._flush_call: Any = None
        self._ticker = LoopingCall(self._report)
        self._ticker.clock = reactor
        self._main_gone = False
        self._stopping: Deferred[None] | None = None
        self._flushed: Deferred[None] = Deferred()
        self._backlog = Backlog()
        self._dropped = 0  # log and access lines not sent while the pipe was full
        self.log_filter: ClientLogFilter | None = None  # once the settings are known

    def connectionMade(self) -> None:
        self.transport.registerProducer(self._backlog, True)

    # -- from the main process ----------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if "start" in message:
            self.start(message["start"])
        if "others" in message:
            others = message["others"]
            self.stats.others = others["counts"]
            self.stats.started = others["started"]
            self.stats.processes = others["processes"]

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("{worker}: a message from the main process was over {limit} bytes", worker=self.name)

    def start(self, start: dict[str, Any]) -> None:
        self.name = f"worker {start['slot']}"
        try:
            self._serve(start)
        except Exception:
            # Logged through the main process, which starts us again later.
            log.failure("cannot serve")
            self._flush()
            self.reactor.stop()
            return
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self._ticker.start(start["report_interval"], now=False)
        log.info("pid {pid}, serving {services}", pid=os.getpid(), services=", ".join(self.serving))
        self._send({"ready": {"pid": os.getpid()}})

    def _serve(self, start: dict[str, Any]) -> None:
        from sockproto.service import BUILDERS

        settings = config.from_data(start["settings"])
        # What clients make a worker log passes the budget here, as in the
        # main process: the lines it relays are ready-made text.
        self.log_filter = ClientLogFilter(settings.suite.log_rate, self.reactor)
        install(self.log_filter)
        for service in start["services"]:
            name, fd = service["name"], service["fd"]
            built = BUILDERS[name](settings, self.stats, self.reactor)
            if built is None:
                continue
            listener = built.adopting(fd, service["family"], self.reactor)
            listener.setServiceParent(self.services)
            listener.privilegedStartService()
            os.close(fd)  # adopting made its own copy
            accept_one_at_a_time(listener.port)
            site = listener.factory.wrappedFactory
            if start["relay_access_log"] and hasattr(site, "logFile"):  # a twisted.web Site
                site.logFile = RelayedLines(self, name)
            self.serving.append(name)
        self.services.startService()

    def readConnectionLost(self) -> None:
        """Our stdin closed: the main process is gone, and so are we."""
        self._main_gone = True
        if self.reactor.running:
            self.reactor.stop()

    def writeConnectionLost(self) -> None:
        if not self._flushed.called:
            self._flushed.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.readConnectionLost()
        self.writeConnectionLost()

    # -- to the main process ------------------------------------------------------

    def observe(self, event: dict[str, Any]) -> None:
        """The log observer: our own events and any warning or worse go to the
        main process (Twisted's chatter about ports starting does not)."""
        level = event.get("log_level", LogLevel.info)
        namespace = event.get("log_namespace", "")
        if namespace != "sockproto" and level < LogLevel.warn:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}".rstrip()
        self._queue("log", [level.name, text])

    def relay_access(self, service: str, line: str) -> None:
        self._queue("access", (service, line))

    def _queue(self, kind: str, item: Any) -> None:
        if self._backlog.paused:
            self._dropped += 1
            return
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            note = f"{dropped} log lines dropped while the main process was not reading"
            self._queue("log", ["warn", note])
        last = self._outbox[-1] if self._outbox else None
        if kind == "access":
            service, line = item
            if last is None or "access" not in last:
                last = {"access": {}}
                self._outbox.append(last)
            last["access"].setdefault(service, []).append(line)
        else:
            if last is None or kind not in last:
                last = {kind: []}
                self._outbox.append(last)
            last[kind].append(item)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(FLUSH_DELAY, self._flush)

    def _report(self) -> None:
        if not self._backlog.paused:  # counts are totals: the next report will do
            self._send({"counts": self.stats.local_counts()})

    def _send(self, message: dict[str, Any]) -> None:
        self._outbox.append(message)
        self._flush()

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        outbox, self._outbox = self._outbox, []
        if outbox and self.transport is not None and not self._main_gone:
            self.transport.write(b"".join(json.dumps(m).encode() + b"\n" for m in outbox))

    # -- stopping -----------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Stop serving as the main process does, say so, and let the last
        messages out (within a few seconds) before the reactor stops."""
        if self._stopping is not None:
            return self._stopping
        if self._ticker.running:
            self._ticker.stop()
        stopped = self.services.stopService() or succeed(None)

        def said(_: Any) -> Deferred[None]:
            if self.log_filter is not None:
                self.log_filter.flush()
            log.info("pid {pid}, stopped", pid=os.getpid())
            self._report()
            if self._main_gone or self.transport is None:
                return succeed(None)
            self.transport.loseWriteConnection()
            timeout = self.reactor.callLater(2.0, self.writeConnectionLost)
            self._flushed.addCallback(lambda _: timeout.cancel() if timeout.active() else None)
            return self._flushed

        self._stopping = stopped.addBoth(said)
        return self._stopping


def run_worker() -> int:
    """The worker process: ``python -m sockproto.worker``, started by the main process."""
    import signal

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    # Ctrl-C in a terminal reaches the whole process group; the main process
    # decides when its workers stop (SIGTERM), and Twisted leaves an ignored
    # SIGINT alone. A closed terminal's SIGHUP reaches the group too and must
    # not end a worker either: the main process reopens the log files, and a
    # worker has none of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = Worker(reactor)
    globalLogBeginner.beginLoggingTo([worker.observe], redirectStandardIO=False)
    StandardIO(worker, stdin=0, stdout=MESSAGES_FD, reactor=reactor)
    reactor.run()
    return 0

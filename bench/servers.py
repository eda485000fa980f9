"""Starting, watching and stopping the servers under test (ours and the peers)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
START_DEADLINE = 20.0
# Every service of the suite, and the option that turns it off.
PORT_OPTIONS = {
    "strip": "--port",
    "chat": "--chat-port",
    "udp": "--udp-port",
    "http": "--http-port",
    "pop3": "--pop3-port",
}
READY = re.compile(r"sockproto ready: (.*)$", re.MULTILINE)


class ServerError(Exception):
    """A server would not start, or died; the message ends with its last log lines."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(
    predicate: Callable[[], object], deadline: float, what: str, process: Process | None = None
) -> None:
    stop = time.monotonic() + deadline
    while not predicate():
        if process is not None and not process.alive():
            raise ServerError(f"{process.name} exited while {what}:\n{process.tail()}")
        if time.monotonic() > stop:
            tail = f":\n{process.tail()}" if process is not None else ""
            raise ServerError(f"timed out after {deadline} s {what}{tail}")
        time.sleep(0.02)


def tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tcp_greets(port: int) -> bool:
    """A probe for servers that greet: read the greeting, half-close, read
    until the server closes too. Leaving without a reset matters: ncat --chat
    quits when it announces a client whose connection was reset."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            if not sock.recv(65536):
                return False
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            return True
    except OSError:
        return False


def udp_answers(port: int, payload: bytes = b"Ping !") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        try:
            probe.sendto(payload, ("127.0.0.1", port))
            probe.recvfrom(65535)
            return True
        except OSError:
            return False


# The cores the servers run on, when pin_cores() split the machine: every
# server on one core, the load generator and the harness on the others.
SERVER_CORES: set[int] | None = None


def split_cores(available: Sequence[int]) -> tuple[set[int], set[int]] | None:
    """(generator cores, server cores), or None with fewer than two cores."""
    cores = sorted(available)
    if len(cores) < 2:
        return None
    return set(cores[:-1]), {cores[-1]}


def pin_cores() -> str:
    """Pin this process (and so the load generator, wrk and the clients it
    runs) away from the core every server gets. Where both ends of a
    latency-bound loop run decides its speed more than the server does: left
    to the scheduler, single rounds swung by 20-40%. Returns how, for the results."""
    global SERVER_CORES
    split = split_cores(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if split is None:
        return "not pinned (one core)"
    generator, SERVER_CORES = split
    os.sched_setaffinity(0, generator)
    cores = ", ".join(map(str, sorted(generator)))
    return (
        f"each server pinned to core {min(SERVER_CORES)} (all cores with `--workers 2`),"
        f" the load generators to core{'s' if len(generator) > 1 else ''} {cores}"
    )


class Process:
    """One server process in its own process group, its output in a log file.

    It runs on SERVER_CORES, unless ``all_cores`` (several worker processes).
    """

    def __init__(
        self, name: str, command: Sequence[str], log: Path, cwd: Path | None = None, all_cores: bool = False
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log = log
        self.cwd = cwd
        self.all_cores = all_cores
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        cores: set[int] | None = None  # left alone: the bench is not pinned either
        if SERVER_CORES is not None:  # the server's core, or with all_cores the whole machine
            cores = set(os.sched_getaffinity(0)) | SERVER_CORES if self.all_cores else set(SERVER_CORES)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if cores is None else (lambda: os.sched_setaffinity(0, cores)),
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exits_within(self, seconds: float) -> bool:
        """Whether the process ends (or has ended) within ``seconds``."""
        if self.popen is None:
            return False
        try:
            self.popen.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group we created; SIGKILL if it lingers."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The leader is gone; make sure no child of the group lingers (nginx workers).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def rss_kib(self) -> int:
        """Resident memory of the process and all its descendants (nginx's workers)."""
        return sum(_rss_kib(pid) for pid in [self.pid, *_descendants(self.pid)])


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name may hold spaces and parentheses: split after the last ')'.
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Server:
    """A started server the load generators can point at."""

    def __init__(
        self, name: str, process: Process, port: int, start_again: Callable[[], Server | None] | None = None
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.start_again = start_again
        self.restarts = 0

    def alive(self) -> bool:
        return self.process.alive()

    def restart(self) -> bool:
        """After a crash: the same server again (on a new port); False if it cannot be."""
        if self.start_again is None:
            return False
        self.process.stop()
        again = self.start_again()
        if again is None:
            return False
        self.process, self.port = again.process, again.port
        self.restarts += 1
        return True

    def stop(self) -> None:
        self.process.stop()


def twistd() -> list[str]:
    script = Path(PYTHON).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [PYTHON, "-c", "from twisted.scripts.twistd import run; run()"]


def suite_arguments(service: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Every service off but ``service``, which listens on ``port``."""
    args: list[str] = []
    for name, option in PORT_OPTIONS.items():
        args += [option, str(port) if name == service else "off"]
    return [*args, *extra]


def several_workers(command: Sequence[str]) -> bool:
    """Whether the suite runs more than one process (``--workers N``, N > 1)."""
    workers = "1"
    for i, arg in enumerate(command):
        if arg == "--workers" and i + 1 < len(command):
            workers = command[i + 1]
        elif arg.startswith("--workers="):
            workers = arg.partition("=")[2]
    return workers != "1"


def start_ours(
    service: str, extra: Sequence[str], work: Path, ours_args: Sequence[str], ready: Callable[[int], bool]
) -> Server | None:
    """The suite with only ``service`` on; None when the suite does not have it yet."""
    kind = socket.SOCK_DGRAM if service == "udp" else socket.SOCK_STREAM
    port = free_port(kind)
    # twistd -n logs to stdout, which Process sends to a file (never a pipe
    # that could fill up and stall the server).
    command = [*twistd(), "-n", "--pidfile=", "sockproto", *suite_arguments(service, port, extra), *ours_args]
    log = work / f"sockproto-{service}-{port}.log"
    process = Process("sockproto", command, log, cwd=work, all_cores=several_workers(command)).start()

    def started() -> bool:
        return READY.search(process.log.read_text(errors="replace")) is not None

    try:
        wait_for(started, START_DEADLINE, "starting", process)
        match = READY.search(process.log.read_text(errors="replace"))
        assert match is not None
        if service not in [name.strip() for name in match.group(1).split(",")]:
            process.stop()
            return None
        wait_for(lambda: ready(port), START_DEADLINE, "answering", process)
    except BaseException:
        process.stop()
        raise
    return Server("sockproto", process, port, lambda: start_ours(service, extra, work, ours_args, ready))


def start_peer(
    name: str,
    command: Callable[[int], Sequence[str]],
    work: Path,
    ready: Callable[[int], bool],
    kind: int = socket.SOCK_STREAM,
    cwd: Path | None = None,
) -> Server:
    """``command(port)`` started and answering on a free port."""
    port = free_port(kind)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    process = Process(name, command(port), work / f"{slug}-{port}.log", cwd=cwd or work).start()
    try:
        wait_for(lambda: ready(port), START_DEADLINE, "starting", process)
    except BaseException:
        process.stop()
        raise
    return Server(name, process, port, lambda: start_peer(name, command, work, ready, kind, cwd))


def python_peer(module: str, *args: str) -> Callable[[int], list[str]]:
    """The command of a peer in bench/peers, run with this Python."""
    return lambda port: [PYTHON, "-m", f"bench.peers.{module}", str(port), *args]

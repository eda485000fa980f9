"""End-to-end helpers: the real suite under twistd in a subprocess, plain sockets.

Services are started on port 0 and the test reads the actual address from the
log line ``<service> listening on tcp:127.0.0.1:PORT``, so tests never race for
a free port. Every wait has a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 20.0
ALL_OFF = [
    "--port",
    "off",
    "--chat-port",
    "off",
    "--udp-port",
    "off",
    "--http-port",
    "off",
    "--pop3-port",
    "off",
]
LISTENING = re.compile(r"\] (\w+) listening on (\S+)")


def twistd_command() -> list[str]:
    """The twistd of the Python running the tests (the project's virtualenv)."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "SOCKPROTO_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def temp_dir(test: Any) -> str:
    """A fresh folder removed after the test (trial's mktemp is cwd-relative)."""
    path = tempfile.mkdtemp(prefix="sockproto-test-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Suite:
    """``twistd -n sockproto ARGS`` (or ``twistd -ny TAC``) running in a temp dir."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        tac: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        twistd_args: Sequence[str] = (),
    ) -> None:
        self.cwd = cwd or tempfile.mkdtemp(prefix="sockproto-test-")
        pidfile = os.path.join(self.cwd, "twistd.pid")
        app = ["-y", str(tac)] if tac else ["sockproto", *args]
        self.command = [*twistd_command(), "-n", "--pidfile", pidfile, *twistd_args, *app]
        self.env = environment(env)
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self, ready: bool = True) -> Suite:
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if ready:
            wait_for(
                lambda: self.saw("sockproto ready") or self.process.poll() is not None, what="suite start"
            )
            if self.process.poll() is not None:
                raise AssertionError(f"suite exited {self.process.returncode}:\n{self.output}")
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_log(self, text: str, timeout: float = DEADLINE) -> None:
        wait_for(lambda: self.saw(text), timeout, f"log line containing {text!r}")

    def address(self, service: str) -> tuple[str, int]:
        for line in list(self.lines):
            match = LISTENING.search(line)
            if match and match.group(1) == service:
                where = match.group(2)
                host, port = where.split(":", 1)[1].rsplit(":", 1)
                return host.strip("[]"), int(port)
        raise AssertionError(f"{service} is not listening:\n{self.output}")

    def connect(self, service: str, timeout: float = DEADLINE) -> socket.socket:
        return socket.create_connection(self.address(service), timeout=timeout)

    def send_signal(self, sig: int) -> None:
        """Send a signal (a test that stops the suite itself: ``stop`` then only waits)."""
        assert self.process is not None
        self._signalled = True
        self.process.send_signal(sig)

    _signalled = False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None and not self._signalled:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(DEADLINE)
        self._reader.join(DEADLINE)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def rss_kib(self) -> int:
        """Resident memory of the server process, from /proc."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def __enter__(self) -> Suite:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_twistd(
    args: Sequence[str], cwd: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (for --help and start-up errors)."""
    return subprocess.run(
        [*twistd_command(), *args],
        cwd=cwd or tempfile.mkdtemp(prefix="sockproto-test-"),
        env=environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def recv_until(sock: socket.socket, done: Callable[[bytearray], bool], timeout: float = DEADLINE) -> bytes:
    """Read until ``done(data)`` or EOF; fail at the deadline. (``data`` is a
    bytearray: appending to bytes would make reading megabytes quadratic.)"""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while not done(data):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"timed out; got {bytes(data[:500])!r}") from None
        if not chunk:
            break
        data += chunk
    return bytes(data)


def recv_all(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Everything until the server closes."""
    return recv_until(sock, lambda _: False, timeout)


class Consumer:
    """What a Request offers a producer; records what it is given."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self.finished = self.lost = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.lost = True

    def pull(self) -> bytes:
        for _ in range(100):
            if self.producer is None:
                return b"".join(self.chunks)
            self.producer.resumeProducing()
        raise AssertionError("the producer never ends")


@st.composite
def cut(draw: Any, data: bytes, max_cuts: int) -> list[bytes]:
    """``data`` in chunks, split at up to ``max_cuts`` arbitrary points."""
    points = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=max_cuts)))
    bounds = [0, *[p for p in points if p < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]

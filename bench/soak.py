"""Soak and fault run: the whole suite under mixed load for a fixed time.

    scripts/soak                          # 60 s, about 1000 connections at once
    .venv/bin/python -m bench.soak --duration 15
    python bench/soak.py --duration 120 --connections 1500 --seed 7

Starts ``twistd -n sockproto`` with all five services on loopback ports 0 (POP3
over Maildirs filled with ``python -m sockproto deliver``, HTTP serving a few
files), then, for ``--duration`` seconds (at most 300), runs against all of
them at once, from this one asyncio process:

- well-behaved clients that check every answer: strip lines (pipelined, split,
  half-closed), chat deliveries between pairs of our own clients (and every
  line every member receives: format, no control characters, checksum, no
  echo to the sender, nothing lost or reordered), UDP echoes, HTTP routes and
  file bodies, POP3 logins, LIST, UIDL, RETR, TOP, DELE/RSET, QUIT; most of
  them idle but valid, holding their connection;
- misbehaving ones: silent, garbage, endless lines without LF, readers that
  stop reading (chat, HTTP ``/bytes``, POP3 RETR), resets mid-reply (RST via
  SO_LINGER 0), half-closes, open-and-drop in a tight loop, a crowd over the
  POP3 cap, wrong passwords and hostile user names, DELE then reset, and a UDP
  flood from many source ports;
- hostile ones: smuggling request framing (obs-fold, no Host, absolute-form),
  a keep-alive log flood, chunked uploads over the body limit, /anything
  echoes never read, files that shrink, grow or are swapped for a symlink or a
  FIFO while served, wrong POP3 logins that hang up at once, chat lines with
  bidi overrides, zero-width characters and telnet commands.

At the end every service must still answer, every mailbox must hold every
message, and no connection may still be counted open. It prints one summary
table and exits non-zero if any answer was wrong or missing, the log shows a
traceback or an error, the server's memory grew past the limit, or the server
did not stop cleanly on SIGTERM. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/soak.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import soak_checks as expect
from tests.support import LISTENING, environment, twistd_command

DEFAULT_DURATION = 60.0
MAX_DURATION = 300.0
DEFAULT_CONNECTIONS = 1000
# A well-behaved answer later than this counts as missing. Generous: on a
# shared two-core machine a correct answer may be slow, never wrong.
DEADLINE = 30.0
START_DEADLINE = 60.0
SERVICES = ("strip", "chat", "udp", "http", "pop3")
TCP = ("strip", "chat", "http", "pop3")

# Memory (see README "Soak test"). After the warm-up every client of the mix
# is connected and every kind of request has been made; from then on the
# work repeats, so what the server holds must not grow with it. What may
# still grow is bounded by the limits: a stalled chat reader's unread output
# (--chat-max-pending, 1 MiB, plus Twisted's 64 KiB; the kernel's socket
# buffer takes the first megabytes, outside RSS), 64 KiB for each stalled
# HTTP or POP3 reader, the buffers of connections that come and go, and the
# allocator's slack: some 6 MiB for the default mix. The limit is four times
# that. A leak of 1 KiB per connection (some 25 000 in a 60 s run) or of 100
# bytes per strip line or chat delivery (some 300 000 each) passes it; the
# 15 s run in scripts/test catches leaks about four times as large.
GROWTH_LIMIT_KIB = 24 * 1024
PEAK_LIMIT_KIB = 512 * 1024
# The log budget holds what clients can make the server write: about 400 lines
# a second come from this load without the floods; a flood that got through
# the budget (200 lines an episode) would write thousands.
LOG_LINES_PER_SECOND = 1000

SECRET = b"soak secret: never served\n"
HTTP_MESSAGE = "sockproto soak: hello"
FILES = {
    "hello.txt": b"hello from the soak run\n",
    "notes/deep.txt": b"a file in a folder\n" * 50,
    "page.html": b"<!doctype html><title>soak</title><p>soak</p>\n",
}
LOOPBACK = "127.0.0.1"
# Misbehavers use their own loopback addresses, so their failed logins and
# floods slow only themselves (the limits are per address).
BAD_LOGINS_FROM = "127.0.0.3"
LOGIN_DELAY_CAP = 30.0  # no failed login's answer waits longer (README, Limits)
BAD_NAMES_FROM = "127.0.0.4"
FLOOD_FROM = "127.0.0.5"
UDP_CLIENTS_FROM = "127.0.2."


# -- plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """How many clients of each kind; about ``connections`` at once in all."""

    strip_idle: int
    strip_busy: int
    chat_idle: int
    chat_pairs: int
    chat_stalled: int
    http_idle: int
    http_busy: int
    http_stalled: int
    pop3_idle: int
    pop3_users: int
    drop_users: int
    udp_clients: int
    misbehaving: int  # loops of each misbehaving kind
    crowd: int
    burst: int  # chat clients joining at once, now and then

    @classmethod
    def of(cls, connections: int) -> Mix:
        def part(share: float, least: int = 1) -> int:
            return max(least, round(connections * share))

        return cls(
            strip_idle=part(0.33),
            strip_busy=part(0.006, 2),
            chat_idle=part(0.18),
            chat_pairs=part(0.004, 2),
            chat_stalled=part(0.003, 1),
            http_idle=part(0.30),
            http_busy=part(0.006, 2),
            http_stalled=part(0.003, 1),
            pop3_idle=part(0.06),
            pop3_users=part(0.008, 2),
            drop_users=2,
            udp_clients=4,
            misbehaving=max(1, min(3, connections // 500)),
            crowd=0,
            burst=part(0.15),
        )._with_crowd()

    def _with_crowd(self) -> Mix:
        """The crowd is 20 more than the room the POP3 cap leaves, so some are always refused."""
        return dataclasses.replace(self, crowd=self.pop3_headroom + 20)

    @property
    def pop3_headroom(self) -> int:
        return 12 * self.misbehaving + 10

    @property
    def well_behaved(self) -> int:
        return (
            self.strip_idle
            + self.strip_busy
            + self.chat_idle
            + 2 * self.chat_pairs
            + 1
            + self.http_idle
            + self.http_busy
            + self.pop3_idle
            + self.pop3_users
        )

    def server_arguments(self) -> dict[str, int]:
        """Caps with room for the load; POP3's leaves the crowd over it."""
        pop3 = self.pop3_idle + self.pop3_users + self.drop_users + self.pop3_headroom
        return {
            "strip": self.strip_idle + self.strip_busy + 40 * self.misbehaving + 50,
            "pop3": pop3,
        }


@dataclass
class Tally:
    """What the clients saw. ``wrong`` and ``failed`` must stay 0."""

    checked: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # no answer in time, or dropped
    refused: Counter[str] = field(default_factory=Counter)  # by a limit, with its message
    lost: Counter[str] = field(default_factory=Counter)  # UDP datagrams never echoed
    episodes: Counter[str] = field(default_factory=Counter)  # misbehaving, by kind
    notes: list[str] = field(default_factory=list)

    def ok(self, service: str, count: int = 1) -> None:
        self.checked[service] += count

    def bad(self, service: str, what: str) -> None:
        self.wrong[service] += 1
        self._note(f"{service}: wrong: {what}")

    def fail(self, service: str, what: str) -> None:
        self.failed[service] += 1
        self._note(f"{service}: {what}")

    def _note(self, text: str) -> None:
        if len(self.notes) < 30:
            self.notes.append(text)


class WrongAnswerError(Exception):
    """An answer that breaks the service's promise."""


class RefusedError(Exception):
    """The server refused by a limit, and said so as documented."""


class PeerClosedError(Exception):
    """The peer closed (or reset) the connection; ``partial`` is what came first."""

    def __init__(self, partial: bytes, reset: bool = False) -> None:
        super().__init__(f"closed after {partial[-60:]!r}")
        self.partial = partial
        self.reset = reset


# -- connections ------------------------------------------------------------------


class Pipe(asyncio.Protocol):
    """Collects what arrives. Unlike asyncio's StreamReader, a reset does not
    hide the data that came before it: the answer before an RST still counts.
    Every client takes what it asked for (a client that must stop reading
    uses a :class:`RawSocket`), so nothing piles up here."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False
        self.error: Exception | None = None
        self.transport: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return True  # our side may still send (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def more(self) -> None:
        """Wait until something arrives (or the connection ends)."""
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    async def writable(self) -> None:
        if self._writable is not None:
            await self._writable


class Conn:
    """One TCP connection: buffered reads by separator or count, writes, closes."""

    opened = 0
    open_now = 0
    open_peak = 0

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.buffer = pipe.buffer
        self.closed = False
        Conn.opened += 1
        Conn.open_now += 1
        Conn.open_peak = max(Conn.open_peak, Conn.open_now)

    @classmethod
    async def open(cls, address: tuple[str, int], source: str = LOOPBACK) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            if source != LOOPBACK:
                sock.bind((source, 0))
            async with asyncio.timeout(DEADLINE):
                await loop.sock_connect(sock, address)
            _transport, pipe = await loop.create_connection(Pipe, sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(pipe)

    async def fill(self) -> None:
        """Wait for more data; :class:`PeerClosedError` if the connection ended instead."""
        before = len(self.buffer)
        while len(self.buffer) == before:
            if self.pipe.ended:
                raise PeerClosedError(bytes(self.buffer), reset=self.pipe.error is not None)
            await self.pipe.more()

    async def until(self, separator: bytes, start: int = 0) -> bytes:
        """Up to and including ``separator`` (searched from ``start``)."""
        while (index := self.buffer.find(separator, start)) < 0:
            start = max(start, len(self.buffer) - len(separator) + 1)
            await self.fill()
        end = index + len(separator)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self.fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def rest(self) -> bytes:
        """Everything until the peer closes (a reset ends it too)."""
        with contextlib.suppress(PeerClosedError):
            while True:
                await self.fill()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def send(self, data: bytes) -> None:
        transport = self.pipe.transport
        if self.pipe.error is not None or transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        transport.write(data)
        await self.pipe.writable()

    def half_close(self) -> None:
        self.pipe.transport.write_eof()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        Conn.open_now -= 1
        transport = self.pipe.transport
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


class RawSocket:
    """A plain non-blocking socket for clients that stop reading: a stream
    would keep reading into its own buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        Conn.opened += 1
        Conn.open_now += 1
        Conn.open_peak = max(Conn.open_peak, Conn.open_now)

    @classmethod
    async def open(cls, address: tuple[str, int], rcvbuf: int = 4096) -> RawSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            async with asyncio.timeout(DEADLINE):
                await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        async with asyncio.timeout(DEADLINE):
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def reset_by_peer(self) -> bool:
        """Whether the server has reset (dropped) the connection."""
        try:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return True
        return error != 0

    def close(self, reset: bool = False) -> None:
        if self.sock.fileno() < 0:
            return
        Conn.open_now -= 1
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- the server -------------------------------------------------------------------


class Server:
    """``twistd -n sockproto`` with its log in a file (a pipe could stall it)."""

    def __init__(self, workdir: Path, arguments: list[str]) -> None:
        self.workdir = workdir
        self.log_path = workdir / "twistd.log"
        self.command = [*twistd_command(), "-n", "--pidfile=", "sockproto", *arguments]
        self.process: subprocess.Popen[bytes] | None = None
        self.addresses: dict[str, tuple[str, int]] = {}

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_DEADLINE
        while "sockproto ready" not in self.log_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"soak: the suite did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        for line in self.log_lines():
            match = LISTENING.search(line)
            if match:
                host, port = match.group(2).split(":", 1)[1].rsplit(":", 1)
                self.addresses[match.group(1)] = (host.strip("[]"), int(port))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def rss_kib(self) -> int | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()  # type: ignore[union-attr]
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it had to be killed)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(DEADLINE)
            return None


@dataclass
class Fixtures:
    """The files the server serves and the mail it holds, to check answers against."""

    files: dict[str, bytes]
    random_file: bytes
    passwords: dict[str, str]
    mail: dict[str, list[bytes]]  # user -> messages in delivery order
    root: Path  # what --http-root serves; changing/ is for the episodes that change files


def make_fixtures(workdir: Path, mix: Mix, rng: random.Random) -> Fixtures:
    root = workdir / "public"
    files = dict(FILES)
    random_file = rng.randbytes(300 * 1024)
    files["random.bin"] = random_file
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".hidden").write_bytes(SECRET)
    (workdir / "secret.txt").write_bytes(SECRET)
    (root / "escape-link").symlink_to(workdir / "secret.txt")
    (root / "changing").mkdir()

    users = [f"pop{i}" for i in range(mix.pop3_users)] + [f"drop{i}" for i in range(mix.drop_users)]
    passwords = {user: f"pw-{user}-{rng.randrange(10**6)}" for user in users}
    templates = [expect.pop3_message(rng, n, lines) for n, lines in ((1, 5), (2, 40), (3, 900))]
    mail = {user: list(templates) for user in users}
    (workdir / "messages").mkdir()
    paths = []
    for number, message in enumerate(templates, 1):
        path = workdir / "messages" / f"{number}.eml"
        path.write_bytes(message)
        paths.append(path)
    # Delivered with the suite's own tool, in order per user (the server
    # lists oldest first), a few users at a time.
    deliver = [sys.executable, "-m", "sockproto", "deliver", "--maildir", str(workdir / "mail")]
    pending = list(users)
    while pending:
        batch, pending = pending[:4], pending[4:]
        for path in paths:
            runs = [
                subprocess.Popen([*deliver, user, str(path)], env=environment(), stdout=subprocess.DEVNULL)
                for user in batch
            ]
            if any(run.wait(60) != 0 for run in runs):
                raise SystemExit("soak: python -m sockproto deliver failed")
    return Fixtures(files, random_file, passwords, mail, root)


# -- the load ---------------------------------------------------------------------


class Load:
    """Every client task, sharing the tally, the addresses and the stop signal."""

    def __init__(self, server: Server, fixtures: Fixtures, mix: Mix, seed: int) -> None:
        self.server = server
        self.address = server.addresses
        self.fixtures = fixtures
        self.mix = mix
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.stopping = asyncio.Event()
        self.connects = asyncio.Semaphore(32)  # connection attempts in flight
        self.uids: dict[str, list[bytes]] = {}
        self.slowest_burst = 0.0  # seconds to the last welcome of a burst of joins
        self._serial = 0

    @property
    def running(self) -> bool:
        return not self.stopping.is_set()

    def serial(self) -> int:
        self._serial += 1
        return self._serial

    async def pause(self, seconds: float) -> bool:
        """Sleep, but wake at the stop; True while the run goes on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.running

    async def connect(self, service: str, source: str = LOOPBACK) -> Conn:
        async with self.connects:
            return await Conn.open(self.address[service], source)

    # -- how clients run

    async def well_behaved(self, service: str, session: Callable[[], Awaitable[None]]) -> None:
        """Run sessions until the stop; every problem is counted, none stops the loop."""
        while self.running:
            try:
                await session()
                continue
            except RefusedError:
                self.tally.refused[service] += 1
            except WrongAnswerError as error:
                self.tally.bad(service, str(error))
            except TimeoutError as error:
                self.tally.fail(service, f"no answer within {DEADLINE:g} s {error}".rstrip())
            except PeerClosedError as error:
                self.tally.fail(service, f"connection {'reset' if error.reset else 'closed'} by the server")
            except OSError as error:
                self.tally.fail(service, f"connection failed: {error}")
            await self.pause(self.rng.uniform(0.5, 2.0))

    async def misbehaving(
        self, kind: str, episode: Callable[..., Awaitable[Any]], services: tuple[str, ...], pause: float
    ) -> None:
        """Episodes until the stop (which cancels the one under way)."""
        turn = self.rng.randrange(len(services))
        while self.running:
            service = services[turn % len(services)]
            turn += 1
            try:
                async with asyncio.timeout(DEADLINE + 15):
                    await episode(service)
            except WrongAnswerError as error:
                self.tally.bad(service, f"{kind}: {error}")
            except RefusedError:
                self.tally.refused[service] += 1
            except (OSError, PeerClosedError, TimeoutError):
                pass  # a misbehaving client may well be cut off
            self.tally.episodes[kind] += 1
            await self.pause(self.rng.uniform(0, pause))

    # -- strip

    async def strip_exchange(self, conn: Conn, lines: list[bytes], split: bool = False) -> None:
        payload = b"".join(line + b"\n" for line in lines)
        wanted = expect.strip_answers(lines)
        if split:  # in small pieces: lines cut anywhere must be reassembled
            for start in range(0, len(payload), 7):
                await conn.send(payload[start : start + 7])
        else:
            await conn.send(payload)
        try:
            async with asyncio.timeout(DEADLINE):
                got = await conn.exactly(len(wanted))
        except PeerClosedError as error:
            if error.partial == expect.STRIP_OVERFLOW:
                raise RefusedError() from None
            raise
        if got != wanted:
            if expect.STRIP_OVERFLOW.startswith(got):  # the overflow line, then the close?
                async with asyncio.timeout(DEADLINE):
                    got += await conn.rest()
                if got == expect.STRIP_OVERFLOW:
                    raise RefusedError()
            raise WrongAnswerError(f"sent {payload[:60]!r}, wanted {wanted[:60]!r}, got {got[:60]!r}")
        self.tally.ok("strip", len(lines))

    def strip_lines(self, count: int, longest: int = 200) -> list[bytes]:
        return [expect.strip_line(self.rng, longest) for _ in range(count)]

    async def strip_idle(self) -> None:
        conn = await self.connect("strip")
        try:
            while self.running:
                await self.strip_exchange(conn, self.strip_lines(1))
                await self.pause(self.rng.uniform(3, 12))
        finally:
            conn.close()

    async def strip_busy(self) -> None:
        conn = await self.connect("strip")
        try:
            while self.running:
                count = self.rng.choice((1, 5, 50, 200))
                longest = self.rng.choice((20, 200, 5000))
                await self.strip_exchange(conn, self.strip_lines(count, longest), split=count == 5)
                await self.pause(0.02)
        finally:
            conn.close()

    # -- chat

    async def chat_join(self, role: str) -> ChatMember:
        conn = await self.connect("chat")
        member = ChatMember(self, conn, f"{role}c{self.serial()}")
        try:
            await member.join()
        except BaseException:
            conn.close()
            raise
        return member

    async def chat_idle(self) -> None:
        member = await self.chat_join("idle")
        try:
            await member.hold()
        finally:
            member.close()

    async def chat_pair(self, number: int) -> None:
        a = await self.chat_join(f"p{number}a")
        try:
            b = await self.chat_join(f"p{number}b")
        except BaseException:
            a.close()
            raise
        try:
            while self.running:
                for sender, receiver in ((a, b), (b, a)):
                    await sender.say_to(receiver, action=self.rng.random() < 0.1)
                if self.rng.random() < 0.1:
                    await a.who()
                await self.pause(self.rng.uniform(0.2, 0.6))
        finally:
            a.close()
            b.close()

    async def chat_burst(self) -> None:
        """A reconnect storm: many clients join at once (no throttle on the
        connects); every one must be welcomed, however full the accept queue."""
        conns: list[Conn] = []
        started = time.monotonic()

        async def join() -> None:
            conn = await Conn.open(self.address["chat"])
            conns.append(conn)
            async with asyncio.timeout(DEADLINE):
                welcome = await conn.until(b"\r\n")
            if expect.welcome_nick(welcome) is None:
                raise WrongAnswerError(f"welcome in a burst: {welcome!r}")

        try:
            results = await asyncio.gather(*(join() for _ in range(self.mix.burst)), return_exceptions=True)
        finally:
            for conn in conns:
                conn.close()
        self.slowest_burst = max(self.slowest_burst, time.monotonic() - started)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.tally.ok("chat", len(results))
        await self.pause(self.rng.uniform(3, 6))

    async def chat_loud(self) -> None:
        """Long lines at 15 a second: volume for every member to check, backlog for the stalled readers."""
        member = await self.chat_join("loud")
        try:
            while self.running and member.problem is None:
                await member.say(self.rng.randbytes(350).hex().encode())
                await self.pause(1 / 15)
            member.raise_problem()
        finally:
            member.close()

    async def chat_stalled(self, _service: str) -> None:
        """Joins with a tiny receive buffer and never reads, for 20 s or until dropped as too slow."""
        sock = await RawSocket.open(self.address["chat"])
        try:
            for _ in range(200):
                if sock.reset_by_peer() or not await self.pause(0.1):
                    break
        finally:
            sock.close()

    # -- UDP

    async def udp_client(self, number: int) -> None:
        loop = asyncio.get_running_loop()
        source = f"{UDP_CLIENTS_FROM}{number + 1}"
        transport, client = await loop.create_datagram_endpoint(
            EchoClient, local_addr=(source, 0), remote_addr=self.address["udp"]
        )
        tag = b"udp%d" % number
        seq = 0
        try:
            while self.running:
                seq += 1
                payload = expect.udp_payload(self.rng, tag, seq)
                answered = await client.ask(transport, payload)
                if answered:
                    self.tally.ok("udp")
                else:
                    self.tally.lost["udp"] += 1
                for stray in client.take_strays():
                    self.tally.bad("udp", f"an answer that echoes nothing we sent: {stray[:40]!r}")
                await self.pause(self.rng.uniform(0.15, 0.3))  # under 20/s from this address
        finally:
            transport.close()

    async def udp_flood(self) -> None:
        """Datagrams from 64 source ports of one address, about 2000 a second, never read."""
        socks = []
        try:
            for _ in range(64):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.bind((FLOOD_FROM, 0))
            payloads = [self.rng.randbytes(self.rng.choice((0, 8, 64, 512))) for _ in range(32)]
            turn = 0
            while self.running:
                for _ in range(20):
                    turn += 1
                    with contextlib.suppress(BlockingIOError):
                        socks[turn % len(socks)].sendto(payloads[turn % len(payloads)], self.address["udp"])
                self.tally.episodes["udp flood datagrams"] += 20
                await self.pause(0.01)
        finally:
            for sock in socks:
                sock.close()

    # -- HTTP

    async def http_exchange(self, conn: Conn, requests: list[HttpCase], sent: bool = False) -> None:
        started = time.monotonic()  # a pipelined answer cannot come before its request was sent
        if not sent:
            await conn.send(b"".join(case.request for case in requests))
        for case in requests:
            try:
                async with asyncio.timeout(DEADLINE):
                    response = await read_response(conn, case.method)
            except TimeoutError:
                raise TimeoutError(
                    f"to {case.method} {case.target} (got {bytes(conn.buffer[:40])!r})"
                ) from None
            if response.status == expect.HTTP_OVERFLOW_STATUS and b"too many" in response.body:
                raise RefusedError()
            problem = case.check(response, time.monotonic() - started)
            if problem:
                raise WrongAnswerError(f"{case.method} {case.target}: {problem}")
            self.tally.ok("http")

    async def http_idle(self) -> None:
        conn = await self.connect("http")
        try:
            while self.running:
                await self.http_exchange(conn, [http_case(self.rng, self.fixtures)])
                await self.pause(self.rng.uniform(3, 15))
        finally:
            conn.close()

    async def http_busy(self) -> None:
        conn = await self.connect("http")
        try:
            while self.running:
                if self.rng.random() < 0.02:
                    await self.http_after_full_buffer(conn)
                    continue
                count = 3 if self.rng.random() < 0.2 else 1  # sometimes pipelined
                await self.http_exchange(conn, [http_case(self.rng, self.fixtures) for _ in range(count)])
                await self.pause(0.02)
        finally:
            conn.close()

    async def http_after_full_buffer(self, conn: Conn) -> None:
        """Pipelined answers after one that leaves the server's send buffer full
        (10 MiB, in whole 64 KiB chunks, to a reader that looks away a moment)."""
        size = 10 * 1024 * 1024
        cases = [
            HttpCase("GET", f"/bytes/{size}", expect.http_request("GET", f"/bytes/{size}"), _expect(200)),
            HttpCase("GET", "/bytes/1000", expect.http_request("GET", "/bytes/1000"), _expect(200)),
            HttpCase(
                "GET", "/", expect.http_request("GET", "/"), _expect(200, (HTTP_MESSAGE + "\n").encode())
            ),
        ]
        conn.pipe.transport.pause_reading()
        try:
            await conn.send(b"".join(case.request for case in cases))
            await asyncio.sleep(0.3)
        finally:
            conn.pipe.transport.resume_reading()
        await self.http_exchange(conn, cases, sent=True)

    async def http_stalled(self, _service: str) -> None:
        """Asks for 10 MB and never reads: the server may hold only what fits its buffers."""
        sock = await RawSocket.open(self.address["http"])
        try:
            await sock.send(expect.http_request("GET", "/bytes/10485760"))
            for _ in range(200):
                if sock.reset_by_peer() or not await self.pause(0.1):
                    break
        finally:
            sock.close()

    # -- POP3

    async def pop3_idle(self) -> None:
        conn = await self.connect("pop3")
        try:
            await pop3_greeting(conn)
            self.tally.ok("pop3")
            while self.running:
                await conn.send(b"CAPA\r\n")
                status, body = await pop3_multiline(conn)
                if not status.startswith(b"+OK") or b"\r\nUIDL\r\n" not in b"\r\n" + body:
                    raise WrongAnswerError(f"CAPA: {status!r} {body[:80]!r}")
                self.tally.ok("pop3")
                await self.pause(self.rng.uniform(5, 20))
            await conn.send(b"QUIT\r\n")
        finally:
            conn.close()

    async def pop3_user(self, user: str) -> None:
        """One whole session over one mailbox: every answer checked."""
        conn = await self.connect("pop3")
        try:
            await Pop3Session(self, conn, user).run()
        finally:
            conn.close()
        await self.pause(self.rng.uniform(0.2, 1.0))

    async def pop3_login(self, conn: Conn, user: str, password: str) -> bytes:
        await conn.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password.encode()))
        first = await pop3_line(conn)
        if not first.startswith(b"+OK"):
            raise WrongAnswerError(f"USER {user}: {first!r}")
        return await pop3_line(conn)

    async def pop3_stalled(self, _service: str) -> None:
        """Logs in, asks for the big message many times and never reads."""
        user = self.rng.choice([u for u in self.fixtures.mail if u.startswith("drop")])
        sock = await RawSocket.open(self.address["pop3"])
        try:
            password = self.fixtures.passwords[user].encode()
            await sock.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password) + b"RETR 3\r\n" * 50)
            for _ in range(50):
                if sock.reset_by_peer() or not await self.pause(0.1):
                    break
        finally:
            sock.close(reset=True)

    # -- misbehaving episodes (each gets a TCP service)

    async def silent(self, service: str) -> None:
        conn = await self.connect(service)
        try:
            await self.pause(self.rng.uniform(0.5, 5))
        finally:
            conn.close(reset=self.rng.random() < 0.5)

    async def garbage(self, service: str) -> None:
        data = self.rng.randbytes(self.rng.randrange(1, 4096))
        if service in ("strip", "chat"):
            # Strip and chat take telnet commands (IAC, 0xFF) out of what they
            # read and answer them: garbage without them keeps its answers
            # known; the telnet bytes have their own episode (chat_spoof).
            data = data.replace(b"\xff", b"\xfe")
        conn = await self.connect(service)
        try:
            await conn.send(data)
            if service == "strip":
                # Garbage is lines too: the answers are known exactly.
                lines = data.split(b"\n")[:-1]
                if any(expect.closes_strip(line) for line in lines):
                    return
                wanted = expect.strip_answers(lines)
                try:
                    async with asyncio.timeout(DEADLINE):
                        got = await conn.exactly(len(wanted))
                except PeerClosedError as error:
                    refused_by_cap(service, error.partial)
                    raise WrongAnswerError(f"garbage: {error}") from None
                if got != wanted:
                    raise WrongAnswerError(f"garbage answered {got[:60]!r}, wanted {wanted[:60]!r}")
                self.tally.ok("strip", len(lines))
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await conn.rest()
            check_garbage_answer(service, bytes(conn.buffer))
        finally:
            conn.close(reset=self.rng.random() < 0.5)

    async def endless_line(self, service: str) -> None:
        """A line without LF until the server gives up on it, as each service says."""
        limits = {"strip": 65536, "chat": 4096, "http": 16384, "pop3": 8192}
        conn = await self.connect(service)
        try:
            # Just over the limit, in one write: had we kept sending, the
            # failed writes would end the connection before its answer is read.
            await conn.send(b"A" * (limits[service] + 1024))
            async with asyncio.timeout(DEADLINE):
                answer = await conn.rest()
        finally:
            conn.close()
        check_too_long(service, answer)
        self.tally.ok(service)

    async def reset_mid_reply(self, service: str) -> None:
        conn = await self.connect(service)
        try:
            if service == "strip":
                await conn.send(b"a b c d e f g h\n" * 20000)
            elif service == "chat":
                await conn.until(b"\r\n")
                await conn.send(b"about to vanish\n")
            elif service == "http":
                await conn.send(expect.http_request("GET", "/bytes/1048576"))
            else:
                user = self.rng.choice([u for u in self.fixtures.mail if u.startswith("drop")])
                await conn.send(
                    b"USER %s\r\nPASS %s\r\nRETR 3\r\n"
                    % (user.encode(), self.fixtures.passwords[user].encode())
                )
            async with asyncio.timeout(DEADLINE):
                await conn.exactly(self.rng.randrange(1, 2000))
        finally:
            conn.close(reset=True)

    async def half_close(self, service: str) -> None:
        """Sends, then closes its side only: what was sent still counts."""
        conn = await self.connect(service)
        try:
            if service == "strip":
                lines = self.strip_lines(3)
                lines[-1] += b"."  # sent without LF: empty, it would be no line at all
                await conn.send(b"\n".join(lines))
                conn.half_close()
                wanted = expect.strip_answers(lines)
            elif service == "pop3":
                await conn.send(b"CAPA\r\nQUIT")
                conn.half_close()
                wanted = b""
            elif service == "chat":
                await conn.send(b"/quit\n")
                conn.half_close()
                wanted = b""
            else:
                # Answered later or streamed: the answer must still come (ncat does this).
                target, body = self.rng.choice(
                    [("/", (HTTP_MESSAGE + "\n").encode()), ("/delay/0.2", None),
                     ("/bytes/100000", None), ("/files/random.bin", self.fixtures.random_file)]
                )  # fmt: skip
                await conn.send(expect.http_request("GET", target, close=True))
                conn.half_close()
                try:
                    async with asyncio.timeout(DEADLINE):
                        response = await read_response(conn, "GET")
                        rest = await conn.rest()
                except PeerClosedError as error:  # not a misbehaving client's fate: it is owed an answer
                    raise WrongAnswerError(f"GET {target} then a half-close: {error}") from None
                check_half_closed_http(target, response, body, rest)
                self.tally.ok(service)
                return
            async with asyncio.timeout(DEADLINE):
                answer = await conn.rest()
        finally:
            conn.close()
        check_half_close(service, answer, wanted)
        self.tally.ok(service)

    async def open_and_drop(self, service: str) -> None:
        """Connects and closes at once, ten times in a row, half of them with RST."""
        for _ in range(10):
            conn = await self.connect(service)
            conn.close(reset=self.rng.random() < 0.5)

    async def crowd(self, _service: str) -> None:
        """More POP3 connections than the cap at once: each gets the greeting or the overflow line."""
        conns: list[Conn] = []

        async def join() -> None:
            conns.append(await self.connect("pop3"))  # kept at once: a stop may cancel the others

        try:
            await asyncio.gather(*(join() for _ in range(self.mix.crowd)), return_exceptions=True)
            for conn in list(conns):
                async with asyncio.timeout(DEADLINE):
                    try:
                        first = await conn.until(b"\r\n")
                    except PeerClosedError as error:
                        first = error.partial
                if first == expect.POP3_OVERFLOW:
                    self.tally.refused["pop3"] += 1
                elif first.startswith(b"+OK ") and first.endswith(b">\r\n"):
                    self.tally.ok("pop3")
                else:
                    raise WrongAnswerError(f"crowd: first line {first!r}")
            await self.pause(1.0)
        finally:
            for conn in conns:
                conn.close()

    async def bad_login(self, _service: str) -> None:
        """A wrong password: answered -ERR [AUTH], later each time; never +OK."""
        user = self.rng.choice(list(self.fixtures.passwords))
        conn = await self.connect("pop3", BAD_LOGINS_FROM)
        try:
            await pop3_greeting(conn)
            answer = await self.pop3_login(conn, user, "wrong-" + self.fixtures.passwords[user])
            if not answer.startswith(b"-ERR [AUTH]"):
                raise WrongAnswerError(f"a wrong password for {user}: {answer!r}")
            self.tally.ok("pop3")
        finally:
            conn.close()

    async def bad_name(self, _service: str) -> None:
        """User names that try to leave the Maildir root: never let in."""
        name = self.rng.choice([b"../pop0", b"pop0/../pop1", b"/etc", b"pop0\x00x", b"x" * 300, b"."])
        password = self.rng.choice(list(self.fixtures.passwords.values())).encode()
        conn = await self.connect("pop3", BAD_NAMES_FROM)
        try:
            await pop3_greeting(conn)
            await conn.send(b"USER " + name + b"\r\nPASS " + password + b"\r\n")
            for _ in range(2):
                async with asyncio.timeout(DEADLINE + 5):
                    answer = await pop3_line(conn)
                if answer.startswith(b"+OK") and b"maildrop" in answer:
                    raise WrongAnswerError(f"user name {name[:40]!r} was let in: {answer!r}")
            self.tally.ok("pop3")
        finally:
            conn.close()

    async def dele_then_reset(self, user: str) -> None:
        """Marks messages deleted, then resets: nothing may go (checked at the end)."""
        conn = await self.connect("pop3")
        try:
            await pop3_greeting(conn)
            answer = await self.pop3_login(conn, user, self.fixtures.passwords[user])
            if answer.startswith(b"-ERR [IN-USE]"):
                return  # another drop episode holds it
            if not answer.startswith(b"+OK"):
                raise WrongAnswerError(f"login of {user}: {answer!r}")
            await conn.send(b"DELE 1\r\nDELE 3\r\nSTAT\r\n")
            for _ in range(2):
                if not (await pop3_line(conn)).startswith(b"+OK"):
                    raise WrongAnswerError("DELE refused")
            messages = self.fixtures.mail[user]
            wanted = b"+OK 1 %d\r\n" % expect.pop3_size(messages[1])
            stat = await pop3_line(conn)
            if stat != wanted:
                raise WrongAnswerError(f"STAT after DELE 1, DELE 3: {stat!r}, wanted {wanted!r}")
            self.tally.ok("pop3", 3)
        finally:
            conn.close(reset=True)

    # -- hostile shapes: what an attacker tries once the easy things fail
    # (each is owed its answer: a time-out there is a wrong answer, not a cut-off)

    async def http_framing(self, _service: str) -> None:
        """Requests that smuggle behind a proxy: obs-fold and a missing Host get 400
        and the close; an absolute-form target is served like its path."""
        kind = self.rng.choice(["fold", "no host", "absolute"])
        if kind == "fold":
            request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n b\r\n\r\n"
        elif kind == "no host":
            request = b"GET / HTTP/1.1\r\nUser-Agent: sockproto-soak\r\n\r\n"
        else:
            port = self.address["http"][1]
            request = b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % port
        conn = await self.connect("http")
        try:
            await conn.send(request)
            async with owed(kind):
                response = await read_response(conn, "GET")
                rest = await conn.rest() if kind != "absolute" else b""
        except PeerClosedError as error:
            refused_by_cap("http", error.partial)
            raise WrongAnswerError(f"{kind}: closed without an answer ({error.partial[:40]!r})") from None
        finally:
            conn.close()
        refused_by_cap("http", b"HTTP/1.1 %d " % response.status)
        if kind == "absolute":
            if response.status != 200 or response.body != (HTTP_MESSAGE + "\n").encode():
                raise WrongAnswerError(f"absolute-form GET: {response.status} {response.body[:60]!r}")
        elif response.status != 400 or rest:
            raise WrongAnswerError(f"{kind}: {response.status}, then {rest[:40]!r}")
        self.tally.ok("http")

    async def http_log_flood(self, _service: str) -> None:
        """One keep-alive connection, many requests whose headers Twisted logs about:
        every one answered (the log budget keeps the log small: checked at the end)."""
        count = 1000
        request = expect.http_request("GET", "/files/hello.txt", [("Range", "bytes=oops")])
        conn = await self.connect("http")
        try:
            await conn.send(request * count)
            async with owed("a malformed Range header"):
                for _ in range(count):
                    response = await read_response(conn, "GET")
                    refused_by_cap("http", b"HTTP/1.1 %d " % response.status)
                    if response.status != 200 or response.body != self.fixtures.files["hello.txt"]:
                        raise WrongAnswerError(f"malformed Range: {response.status} {response.body[:40]!r}")
            self.tally.ok("http", count)
        finally:
            conn.close()

    async def http_big_upload(self, _service: str) -> None:
        """A chunked upload over --http-max-body: the 413 must reach the client
        (read and discard before the close, not a reset over unread data)."""
        conn = await self.connect("http")
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"u" * 64 * 1024)
        head = b"POST /anything HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        try:
            await conn.send(head)
            for _ in range(24):  # 1.5 MiB, over the 1 MiB default
                if conn.buffer:
                    break
                with contextlib.suppress(OSError):
                    await conn.send(chunk)
            async with owed("an upload over the limit"):
                response = await read_response(conn, "POST")
        except PeerClosedError as error:
            refused_by_cap("http", error.partial)
            raise WrongAnswerError(f"upload over the limit: no 413 before the close ({error})") from None
        finally:
            conn.close()
        refused_by_cap("http", b"HTTP/1.1 %d " % response.status)
        if response.status != 413:
            raise WrongAnswerError(f"upload over the limit: {response.status}")
        self.tally.ok("http")

    async def http_echo_unread(self, _service: str) -> None:
        """Asks /anything to echo 1 MiB bodies and never reads the answers."""
        sock = await RawSocket.open(self.address["http"])
        try:
            body = self.rng.randbytes(1024 * 1024)
            with contextlib.suppress(OSError, TimeoutError):
                await sock.send(expect.http_request("POST", "/anything", body=body) * 2)
            for _ in range(50):
                if sock.reset_by_peer() or not await self.pause(0.1):
                    break
        finally:
            sock.close()

    async def file_changes(self, _service: str) -> None:
        """A file shrinks or grows while it is served: never more than its
        Content-Length, a short body ends the connection, the next answer is intact."""
        name = f"changing/{self.serial()}.bin"
        path = self.fixtures.root / name
        size = 2 * 1024 * 1024
        data = self.rng.randbytes(size)
        path.write_bytes(data)
        shrink = self.rng.random() < 0.5
        changed = data[: 64 * 1024] if shrink else data + b"APPENDED " * 10000
        ranged = [("Range", f"bytes=0-{size - 1}")] if self.rng.random() < 0.5 else []
        what = f"a file that {'shrinks' if shrink else 'grows'}{' (Range)' if ranged else ''}"
        conn = await self.connect("http")
        try:
            conn.pipe.transport.pause_reading()
            await conn.send(
                expect.http_request("GET", "/files/" + name, ranged) + expect.http_request("GET", "/")
            )
            await asyncio.sleep(0.2)
            with path.open("r+b") as file:
                if shrink:
                    file.truncate(len(changed))
                else:
                    file.write(changed)  # the same bytes, then more
            conn.pipe.transport.resume_reading()
            async with owed(what):
                head = expect.parse_head(await conn.until(b"\r\n\r\n"))
                if isinstance(head, str):
                    raise WrongAnswerError(f"{what}: {head}")
                refused_by_cap("http", b"HTTP/1.1 %d " % head.status)
                length = int(head.header("content-length") or -1)
                if head.status not in (200, 206) or length not in (size, len(changed)):
                    raise WrongAnswerError(f"{what}: {head.status}, Content-Length {length}")
                if length == size and shrink:  # sent as it was, then it ended early: closed
                    body = await conn.rest()
                    if len(body) >= size or body != data[: len(body)]:
                        raise WrongAnswerError(f"{what}: {len(body)} bytes before the close")
                else:  # whole: the file as it was, or as it is now if the change came first
                    body = await conn.exactly(length)
                    if body != (data if length == size else changed):
                        raise WrongAnswerError(f"{what}: the body is neither the file as it was nor as it is")
                    after = await read_response(conn, "GET")
                    if after.status != 200 or after.body != (HTTP_MESSAGE + "\n").encode():
                        raise WrongAnswerError(f"after {what}: {after.status} {after.body[:40]!r}")
            self.tally.ok("http")
        except PeerClosedError as error:
            raise WrongAnswerError(f"{what}: closed early ({len(error.partial)} bytes)") from None
        finally:
            conn.close()
            path.unlink(missing_ok=True)

    async def file_swaps(self, _service: str) -> None:
        """A served name swapped, as fast as it goes, between a file, a symlink out
        of the root and a FIFO while it is requested: the secret is never served,
        nothing blocks, and every request is answered 200 (the file) or 404."""
        folder = self.fixtures.root / "changing"
        path = folder / f"swap{self.serial()}"
        shapes = [folder / f".{path.name}-{n}" for n in range(3)]
        stop = asyncio.Event()

        async def swapper() -> None:
            turn = 0
            while not stop.is_set():
                for shape in shapes:
                    shape.unlink(missing_ok=True)
                shapes[0].write_bytes(b"swap\n")
                shapes[1].symlink_to(folder.parent.parent / "secret.txt")
                os.mkfifo(shapes[2])
                os.replace(shapes[turn % 3], path)
                turn += 1
                await asyncio.sleep(0)

        count = 30
        conn = await self.connect("http")
        swapping = asyncio.create_task(swapper())
        try:
            await conn.send(expect.http_request("GET", "/files/changing/" + path.name) * count)
            async with owed("a swapped file"):
                for _ in range(count):
                    response = await read_response(conn, "GET")
                    refused_by_cap("http", b"HTTP/1.1 %d " % response.status)
                    if SECRET in response.body:
                        raise WrongAnswerError("served a file outside the root through a swapped symlink")
                    if (response.status, response.body) != (200, b"swap\n") and response.status != 404:
                        raise WrongAnswerError(f"a swapped file: {response.status} {response.body[:40]!r}")
            self.tally.ok("http", count)
        except PeerClosedError as error:
            refused_by_cap("http", error.partial)
            raise WrongAnswerError(f"a swapped file: closed ({error.partial[:40]!r})") from None
        finally:
            stop.set()
            await swapping
            conn.close()
            for leftover in (path, *shapes):
                leftover.unlink(missing_ok=True)

    async def hang_up_logins(self, _service: str) -> None:
        """Wrong logins that hang up at once hold no session slot (checked at the
        end: nothing left open); the same address is then greeted and answered
        within the failure delay's cap."""
        for _ in range(30):
            conn = await self.connect("pop3", BAD_LOGINS_FROM)
            try:
                with contextlib.suppress(OSError):
                    await conn.send(b"USER nobody\r\nPASS wrong\r\n")
            finally:
                conn.close(reset=True)
        conn = await self.connect("pop3", BAD_LOGINS_FROM)
        try:
            await pop3_greeting(conn)
            await conn.send(b"USER nobody\r\nPASS wrong\r\n")
            try:
                async with asyncio.timeout(LOGIN_DELAY_CAP + 5):
                    await pop3_line(conn)
                    answer = await pop3_line(conn)
            except TimeoutError:
                raise WrongAnswerError(f"a wrong login waited over {LOGIN_DELAY_CAP:g} s") from None
            if not answer.startswith(b"-ERR [AUTH]"):
                raise WrongAnswerError(f"a wrong login after hang-ups: {answer!r}")
            self.tally.ok("pop3")
        finally:
            conn.close()

    async def chat_spoof(self, _service: str) -> None:
        """Bidi overrides, zero-width characters and telnet commands in a line:
        another member sees the text without them."""
        speaker = await self.connect("chat")
        try:
            listener = await self.connect("chat")
        except BaseException:
            speaker.close()
            raise
        try:
            nick = expect.welcome_nick(await first_line(speaker, expect.CHAT_OVERFLOW))
            await first_line(listener, expect.CHAT_OVERFLOW)
            token = f"spoof{self.serial()}"
            said = f"{token} \u202egnp.exe\u202c \u2066x\u2069\u200b\ufeff\u2028end".encode()
            await speaker.send(b"\xff\xf4\xff\xfd\x06" + said + b"\n")
            async with owed("a line with bidi, zero-width and telnet bytes"):
                while True:
                    line = expect.parse_chat(await listener.until(b"\r\n"))
                    if isinstance(line, str):
                        raise WrongAnswerError(f"chat, a spoofing line: {line}")
                    if line.who == nick and line.text.startswith(token):
                        break
            if line.text != f"{token} gnp.exe xend":
                raise WrongAnswerError(f"a spoofing line was relayed as {line.text!r}")
            self.tally.ok("chat")
        finally:
            speaker.close()
            listener.close()


class ChatMember:
    """One of our chat clients: checks every line it receives, as it arrives."""

    def __init__(self, load: Load, conn: Conn, tag: str) -> None:
        self.load = load
        self.conn = conn
        self.tag = tag
        self.nick = ""
        self.seq = 0
        self.last: dict[str, int] = {}  # tag -> last seq received from it
        self.nicks: dict[str, str] = {}  # tag -> the nick it came from
        self.waiting: dict[tuple[str, int], asyncio.Future[None]] = {}
        self.notices: deque[tuple[Callable[[str], bool], asyncio.Future[str]]] = deque()
        self.problem: Exception | None = None
        self.reading: asyncio.Task[None] | None = None
        self.leaving = False

    async def join(self) -> None:
        first = await first_line(self.conn, expect.CHAT_OVERFLOW)
        nick = expect.welcome_nick(first)
        if nick is None:
            raise WrongAnswerError(f"chat welcome: {first!r}")
        self.nick = nick
        self.load.tally.ok("chat")
        self.reading = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            while True:
                await self.conn.fill()
                data = self.conn.buffer
                end = data.rfind(b"\n") + 1
                if end:
                    lines = bytes(data[:end]).split(b"\n")[:-1]
                    del data[:end]
                    for line in lines:
                        self.receive(line + b"\n")
        except (PeerClosedError, OSError) as error:
            if not self.leaving:
                self.problem = (
                    error if isinstance(error, PeerClosedError) else PeerClosedError(b"", reset=True)
                )
                self.wake_all()

    def receive(self, line: bytes) -> None:
        tally = self.load.tally
        parsed = expect.parse_chat(line)
        if isinstance(parsed, str):
            tally.bad("chat", f"{self.nick} got {parsed}")
            return
        if parsed.kind == "notice":
            for predicate, future in list(self.notices):
                if predicate(parsed.text) and not future.done():
                    future.set_result(parsed.text)
                    self.notices.remove((predicate, future))
                    break
            return
        if parsed.kind == "error":
            tally.bad("chat", f"{self.nick} got an error it did not cause: {line!r}")
            return
        found = expect.parse_tagged(parsed.text)
        if found is None:
            return  # a misbehaving client's line: its format was checked above
        if isinstance(found, str):
            tally.bad("chat", f"{self.nick} got {found}")
            return
        if found.tag == self.tag:
            tally.bad("chat", f"{self.nick} got its own line back: {line[:60]!r}")
            return
        if self.nicks.setdefault(found.tag, parsed.who) != parsed.who:
            tally.bad("chat", f"{found.tag} spoke as {self.nicks[found.tag]} and as {parsed.who}")
        previous = self.last.get(found.tag)
        if previous is not None and found.seq != previous + 1:
            tally.bad("chat", f"{self.nick} got line {found.seq} of {found.tag} after line {previous}")
        self.last[found.tag] = found.seq
        tally.ok("chat")
        future = self.waiting.pop((found.tag, found.seq), None)
        if future is not None and not future.done():
            future.set_result(None)

    def wake_all(self) -> None:
        problem = self.problem or PeerClosedError(b"")
        for future in [*self.waiting.values(), *(f for _, f in self.notices)]:
            if not future.done():
                future.set_exception(problem)
        self.waiting.clear()
        self.notices.clear()

    def raise_problem(self) -> None:
        if self.problem is not None:
            raise self.problem

    def line(self, action: bool = False) -> bytes:
        """A tagged line, sometimes with controls and bad UTF-8 the server must clean."""
        rng = self.load.rng
        words = [rng.choice(["héllo", "wörld", "✓", "tab\there", "soak", "x" * rng.randrange(1, 60)])]
        raw = " ".join(words).encode()
        if rng.random() < 0.3:
            dirt = rng.choice([b"\x1b[31m", b"\x07", b"\x00", b"\x08", b"\x7f", b"\xc2\x9b", b"\xff", b"\r"])
            cut = rng.randrange(len(raw) + 1)
            raw = raw[:cut] + dirt + raw[cut:]
        text = self._tagged(raw)
        return (b"/me " + text if action else text) + b"\n"

    def _tagged(self, said: bytes) -> bytes:
        """Our next tagged text around ``said``: numbered on from the last, so readers see gaps."""
        self.seq += 1
        return expect.tagged_said(self.tag, self.seq, said)

    async def say(self, line: bytes) -> None:
        """Says a tagged line built around ``line`` (to everyone; no one waits for it)."""
        await self.conn.send(self._tagged(line) + b"\n")

    async def say_to(self, other: ChatMember, action: bool = False) -> None:
        line = self.line(action)
        arrived = asyncio.get_running_loop().create_future()
        other.waiting[(self.tag, self.seq)] = arrived
        self.raise_problem()
        other.raise_problem()
        await self.conn.send(line)
        async with asyncio.timeout(DEADLINE):
            await arrived

    async def who(self) -> None:
        listed = asyncio.get_running_loop().create_future()
        self.notices.append((lambda text: " here: " in text, listed))
        await self.conn.send(b"/who\n")
        async with asyncio.timeout(DEADLINE):
            text = await listed
        if f"{self.nick} (you)" not in text.split(": ", 1)[-1].split(", "):
            raise WrongAnswerError(f"/who of {self.nick}: {text!r}")
        self.load.tally.ok("chat")

    async def hold(self) -> None:
        """Stays in the room, reading, until the run stops."""
        while self.load.running:
            self.raise_problem()
            await self.load.pause(1.0)
        self.raise_problem()

    def close(self) -> None:
        self.leaving = True
        if self.reading is not None:
            self.reading.cancel()
        self.conn.close()


class EchoClient(asyncio.DatagramProtocol):
    """UDP echo: every answer must be a datagram this socket sent."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.recent: deque[bytes] = deque(maxlen=64)
        self.strays: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        future = self.waiting.pop(data, None)
        if future is not None:
            if not future.done():
                future.set_result(None)
        elif data not in self.recent:  # a late echo of a retried datagram is fine
            self.strays.append(data)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors: a datagram the kernel could not deliver; counted as lost."""

    async def ask(self, transport: Any, payload: bytes, tries: int = 3) -> bool:
        self.recent.append(payload)
        for _ in range(tries):
            future = asyncio.get_running_loop().create_future()
            self.waiting[payload] = future
            transport.sendto(payload)
            try:
                async with asyncio.timeout(2.0):
                    await future
                return True
            except TimeoutError:
                self.waiting.pop(payload, None)
        return False

    def take_strays(self) -> list[bytes]:
        strays, self.strays = self.strays, []
        return strays


# -- HTTP cases -------------------------------------------------------------------


@dataclass
class HttpCase:
    method: str
    target: str
    request: bytes
    check: Callable[[expect.Response, float], str | None]


def _expect(status: int, body: bytes | None = None, content_type: str | None = None) -> Callable[..., Any]:
    def check(response: expect.Response, _elapsed: float) -> str | None:
        if response.status != status:
            return f"status {response.status}, wanted {status}: {response.body[:80]!r}"
        if body is not None and response.body != body:
            return f"body {response.body[:60]!r} ({len(response.body)} bytes), wanted {body[:60]!r}"
        if content_type and not (response.header("content-type") or "").startswith(content_type):
            return f"content type {response.header('content-type')!r}, wanted {content_type}"
        return None

    return check


def http_case(rng: random.Random, fixtures: Fixtures) -> HttpCase:
    """One request, chosen at random, with the check of its answer."""
    kind = rng.choices(
        ["greeting", "file", "range", "head", "escape", "anything", "code", "bytes", "status", "headers",
         "ip", "missing", "delay", "metrics"],
        weights=[10, 12, 5, 4, 6, 8, 5, 5, 2, 3, 2, 3, 2, 1],
    )[0]  # fmt: skip
    method, target, headers, body = "GET", "/", [], b""
    greeting = (HTTP_MESSAGE + "\n").encode()
    if kind == "greeting":
        check = _expect(200, greeting, "text/plain")
    elif kind == "file":
        name = rng.choice(sorted(fixtures.files))
        target = "/files/" + name
        check = _expect(200, fixtures.files[name])
    elif kind == "range":
        start = rng.randrange(len(fixtures.random_file) - 1)
        end = rng.randrange(start, min(start + 100_000, len(fixtures.random_file)))
        target, headers = "/files/random.bin", [("Range", f"bytes={start}-{end}")]
        check = _expect(206, fixtures.random_file[start : end + 1])
    elif kind == "head":
        method, target = "HEAD", "/files/hello.txt"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            size = str(len(fixtures.files["hello.txt"]))
            if response.status != 200 or response.header("content-length") != size or response.body:
                return f"HEAD: {response.status} {response.headers} {response.body[:40]!r}"
            return None
    elif kind == "escape":
        target = rng.choice(
            ["/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
             "/files/%2e%2e%2fsecret.txt", "/files//etc/passwd", "/files/%2fetc%2fpasswd",
             "/files/escape-link", "/files/.hidden", "/files/notes/../../secret.txt",
             "/files/%2E%2E/secret.txt", "/files/notes/%2e%2e/%2e%2e/secret.txt"]
        )  # fmt: skip

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if SECRET in response.body or b"root:" in response.body:
                return "served a file outside the root"
            if response.status != 404:
                return f"status {response.status}, wanted 404"
            return None
    elif kind == "anything":
        method = rng.choice(["POST", "PUT", "DELETE", "PATCH"])
        body = rng.choice([b"", b"hello", "naïve ✓".encode(), rng.randbytes(rng.randrange(1, 5000))])
        target = f"/anything/soak?a=1&b={rng.randrange(1000)}"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if response.status != 200:
                return f"status {response.status}"
            shown = response.json()
            try:
                text = body.decode("utf-8")
                same = shown["body"] == text
            except UnicodeDecodeError:
                same = shown["body"] is None and base64.b64decode(shown["body_base64"]) == body
            wanted_query = {"a": ["1"], "b": [target.rsplit("=", 1)[1]]}
            if not same or shown["method"] != method or shown["query"] != wanted_query:
                return f"echoed {json.dumps(shown)[:200]}"
            if shown["path"] != "/anything/soak" or shown["body_length"] != len(body):
                return f"echoed {json.dumps(shown)[:200]}"
            return None
    elif kind == "code":
        code = rng.choice([200, 201, 204, 302, 400, 404, 418, 500, 503])
        target = f"/status/{code}"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if response.status != code:
                return f"status {response.status}"
            if code != 204 and not response.body.startswith(b"%d " % code):
                return f"body {response.body[:40]!r}"
            return None
    elif kind == "bytes":
        size = rng.choice([0, 1, 1000, 65536, 65537, 200_000])
        target = f"/bytes/{size}"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if response.status != 200 or len(response.body) != size:
                return f"status {response.status}, {len(response.body)} bytes, wanted {size}"
            return None
    elif kind == "status":
        target = "/status"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            services = response.json().get("services", {}) if response.status == 200 else {}
            if set(services) != set(SERVICES):
                return f"/status lists {sorted(services)}"
            return None
    elif kind == "headers":
        token = f"t{rng.randrange(10**9)}"
        target, headers = "/headers", [("X-Soak-Token", token)]

        def check(response: expect.Response, _elapsed: float) -> str | None:
            shown = {k.lower(): v for k, v in response.json().get("headers", {}).items()}
            if response.status != 200 or shown.get("x-soak-token") != token:
                return f"headers echoed {shown}"
            return None
    elif kind == "ip":
        target = "/ip"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if response.status != 200 or response.json() != {"origin": LOOPBACK}:
                return f"{response.status} {response.body[:80]!r}"
            return None
    elif kind == "missing":
        target = rng.choice(["/nope", "/files/missing.txt", "/bytes/x", "/delay/99"])
        wanted = 400 if target in ("/bytes/x", "/delay/99") else 404
        check = _expect(wanted)
    elif kind == "delay":
        target = "/delay/0.2"

        def check(response: expect.Response, elapsed: float) -> str | None:
            if response.status != 200 or response.json().get("path") != "/delay/0.2":
                return f"{response.status} {response.body[:80]!r}"
            if elapsed < 0.19:
                return f"answered after {elapsed:.3f} s"
            return None
    else:
        target = "/metrics"

        def check(response: expect.Response, _elapsed: float) -> str | None:
            if response.status != 200 or b"sockproto_connections_open{" not in response.body:
                return f"{response.status} {response.body[:80]!r}"
            return None

    return HttpCase(method, target, expect.http_request(method, target, headers, body), check)


async def read_response(conn: Conn, method: str) -> expect.Response:
    head = await conn.until(b"\r\n\r\n")
    response = expect.parse_head(head)
    if isinstance(response, str):
        raise WrongAnswerError(response)
    length = expect.body_length(response, method)
    if length == "chunked":
        parts = []
        while True:
            size_line = await conn.until(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await conn.until(b"\r\n")  # no trailers from twisted.web
                break
            parts.append(await conn.exactly(size))
            if await conn.exactly(2) != b"\r\n":
                raise WrongAnswerError("chunk not followed by CRLF")
        response.body = b"".join(parts)
    elif length is None:
        response.body = await conn.rest()
    else:
        response.body = await conn.exactly(int(length))
    return response


@contextlib.asynccontextmanager
async def owed(what: str) -> AsyncIterator[None]:
    """Within DEADLINE, or a :class:`WrongAnswerError` saying what did not come."""
    try:
        async with asyncio.timeout(DEADLINE):
            yield
    except TimeoutError:
        raise WrongAnswerError(f"{what}: no answer within {DEADLINE:g} s") from None


OVERFLOW = {"strip": expect.STRIP_OVERFLOW, "chat": expect.CHAT_OVERFLOW, "pop3": expect.POP3_OVERFLOW}


def refused_by_cap(service: str, answer: bytes) -> None:
    """A misbehaving client over a connection cap is refused before it misbehaves."""
    if (answer and answer == OVERFLOW.get(service)) or answer.startswith(b"HTTP/1.1 503 "):
        raise RefusedError()


async def first_line(conn: Conn, overflow: bytes) -> bytes:
    """The server's first line (within DEADLINE); RefusedError if it is ``overflow``,
    the service's refusal at its connection cap, whether the close came after it or not."""
    async with asyncio.timeout(DEADLINE):
        try:
            first = await conn.until(b"\r\n")
        except PeerClosedError as error:
            if error.partial == overflow:
                raise RefusedError() from None
            raise
    if first == overflow:
        raise RefusedError()
    return first


def check_garbage_answer(service: str, answer: bytes) -> None:
    """Whatever a service answers to garbage must still be its protocol."""
    refused_by_cap(service, answer)
    if not answer:
        return
    if service == "http":
        if not answer.startswith(b"HTTP/1.1 4"):
            raise WrongAnswerError(f"garbage answered {answer[:80]!r}")
    elif service == "chat":
        for line in answer.split(b"\n")[:-1]:
            parsed = expect.parse_chat(line + b"\n")
            if isinstance(parsed, str):
                raise WrongAnswerError(parsed)
    elif service == "pop3":
        for line in answer.split(b"\r\n")[:-1]:
            if not (line.startswith((b"+OK", b"-ERR", b"+ ")) or line == b"."):
                raise WrongAnswerError(f"garbage answered {line[:80]!r}")


def check_too_long(service: str, answer: bytes) -> None:
    refused_by_cap(service, answer)
    if service == "strip":
        ok = answer == expect.STRIP_TOO_LONG
    elif service == "chat":
        ok = answer.endswith(expect.CHAT_TOO_LONG)
    elif service == "http":
        ok = answer.startswith(b"HTTP/1.1 414 ")
    else:
        ok = answer.startswith(b"+OK ") and answer.endswith(b"\r\n" + expect.POP3_TOO_LONG)
    if not ok:
        raise WrongAnswerError(f"an endless line was answered {answer[-120:]!r}")


def check_half_close(service: str, answer: bytes, wanted: bytes) -> None:
    refused_by_cap(service, answer)
    if service == "strip":
        ok = answer == wanted
    elif service == "chat":
        ok = answer.endswith(b"*** goodbye\r\n")
    else:
        ok = b"\r\nIMPLEMENTATION " in answer and answer.endswith(
            b".\r\n+OK sockproto POP3 server signing off\r\n"
        )
    if not ok:
        raise WrongAnswerError(f"after a half-close: {answer[-120:]!r}")


def check_half_closed_http(target: str, response: expect.Response, body: bytes | None, rest: bytes) -> None:
    refused_by_cap("http", f"HTTP/1.1 {response.status} ".encode())
    size = response.header("content-length")
    if response.status != 200 or (body is not None and response.body != body) or rest:
        raise WrongAnswerError(f"GET {target} then a half-close: {response.status} {response.body[:60]!r}")
    if size is None or int(size) != len(response.body):
        raise WrongAnswerError(f"GET {target} then a half-close: {len(response.body)} bytes of {size}")


# -- POP3 -------------------------------------------------------------------------


async def pop3_line(conn: Conn) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await conn.until(b"\r\n")


async def pop3_multiline(conn: Conn) -> tuple[bytes, bytes]:
    """(status line, the lines after it up to and including the ``.`` line)."""
    async with asyncio.timeout(DEADLINE):
        status = await conn.until(b"\r\n")
        if not status.startswith(b"+OK"):
            return status, b""
        # The status line's CRLF may be the one before the terminating ".".
        conn.buffer[:0] = b"\r\n"
        body = await conn.until(b"\r\n.\r\n")
        return status, body[2:]


async def pop3_greeting(conn: Conn) -> bytes:
    greeting = await first_line(conn, expect.POP3_OVERFLOW)
    if not greeting.startswith(b"+OK ") or not greeting.endswith(b">\r\n"):
        raise WrongAnswerError(f"greeting {greeting!r}")
    return greeting


class Pop3Session:
    """Login (USER/PASS, APOP or AUTH PLAIN), then every command, every answer checked."""

    def __init__(self, load: Load, conn: Conn, user: str) -> None:
        self.load = load
        self.conn = conn
        self.user = user
        self.messages = load.fixtures.mail[user]
        self.password = load.fixtures.passwords[user]

    async def expect_line(self, wanted: bytes | None = None, prefix: bytes = b"+OK") -> bytes:
        line = await pop3_line(self.conn)
        if (wanted is not None and line != wanted) or not line.startswith(prefix):
            raise WrongAnswerError(f"{self.user}: {line!r}, wanted {wanted or prefix!r}")
        self.load.tally.ok("pop3")
        return line

    async def expect_multi(self, wanted: bytes, what: str) -> None:
        status, body = await pop3_multiline(self.conn)
        if not status.startswith(b"+OK") or body != wanted:
            raise WrongAnswerError(f"{self.user} {what}: {status!r} {body[:80]!r}, wanted {wanted[:80]!r}")
        self.load.tally.ok("pop3")

    async def run(self) -> None:
        conn, rng = self.conn, self.load.rng
        greeting = await pop3_greeting(conn)
        timestamp = greeting[greeting.index(b"<") : -2]
        way = rng.choice(["user", "apop", "auth"])
        user, password = self.user.encode(), self.password.encode()
        if way == "user":
            await conn.send(b"USER %s\r\nPASS %s\r\n" % (user, password))
            await self.expect_line()
        elif way == "apop":
            digest = hashlib.md5(timestamp + password).hexdigest().encode()
            await conn.send(b"APOP %s %s\r\n" % (user, digest))
        else:
            await conn.send(b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0" + user + b"\0" + password))
        login = await pop3_line(conn)
        if login.startswith(b"-ERR [IN-USE]"):
            raise WrongAnswerError(f"{self.user}'s mailbox in use, yet only one session uses it")
        wanted = expect.pop3_maildrop(self.user, self.messages)
        if login != wanted:
            raise WrongAnswerError(f"{way} login of {self.user}: {login!r}, wanted {wanted!r}")
        self.load.tally.ok("pop3")

        sizes = [expect.pop3_size(m) for m in self.messages]
        count, total = len(sizes), sum(sizes)
        listing = b"".join(b"%d %d\r\n" % (n, s) for n, s in enumerate(sizes, 1)) + b".\r\n"
        pipelined = rng.random() < 0.3
        commands = [b"STAT", b"LIST", b"UIDL", *(b"RETR %d" % n for n in range(1, count + 1))]
        commands += [b"TOP 2 3", b"DELE 2", b"STAT", b"RETR 2", b"RSET", b"LIST 2"]
        if pipelined:
            await conn.send(b"".join(c + b"\r\n" for c in commands))

        async def command(text: bytes) -> None:
            if not pipelined:
                await conn.send(text + b"\r\n")

        await command(b"STAT")
        await self.expect_line(b"+OK %d %d\r\n" % (count, total))
        await command(b"LIST")
        await self.expect_multi(listing, "LIST")
        await command(b"UIDL")
        status, body = await pop3_multiline(conn)
        uids = [line.split(b" ", 1)[1] for line in body.split(b"\r\n")[:-2]]
        known = self.load.uids.setdefault(self.user, uids)
        if not status.startswith(b"+OK") or len(uids) != count or uids != known:
            raise WrongAnswerError(f"UIDL of {self.user}: {body[:120]!r}, before {known!r}")
        self.load.tally.ok("pop3")
        for number, message in enumerate(self.messages, 1):
            await command(b"RETR %d" % number)
            await self.expect_multi(expect.pop3_retr(message), f"RETR {number}")
        await command(b"TOP 2 3")
        await self.expect_multi(expect.pop3_top(self.messages[1], 3), "TOP 2 3")
        await command(b"DELE 2")
        await self.expect_line(b"+OK message 2 deleted\r\n")
        await command(b"STAT")
        await self.expect_line(b"+OK %d %d\r\n" % (count - 1, total - sizes[1]))
        await command(b"RETR 2")
        await self.expect_line(b"-ERR message 2 is deleted\r\n", prefix=b"-ERR")
        await command(b"RSET")
        await self.expect_line(b"+OK maildrop has %d messages (%d octets)\r\n" % (count, total))
        await command(b"LIST 2")
        await self.expect_line(b"+OK 2 %d\r\n" % sizes[1])
        await conn.send(b"QUIT\r\n")
        await self.expect_line(b"+OK sockproto POP3 server signing off (0 messages deleted)\r\n")
        async with asyncio.timeout(DEADLINE):
            rest = await conn.rest()
        if rest:
            raise WrongAnswerError(f"after QUIT: {rest[:80]!r}")


# -- the run ----------------------------------------------------------------------


@dataclass
class Outcome:
    tally: Tally
    memory: expect.Memory | None
    finals: dict[str, str]  # service -> "answers" or what went wrong
    left_open: dict[str, int]
    limits: dict[str, dict[str, int]]
    duration: float = 0.0
    log_lines: int = 0
    problems: list[str] = field(default_factory=list)
    exit_status: int | None = None
    peak_connections: int = 0
    slowest_burst: float = 0.0
    ramp_up: float | None = None  # seconds until the well-behaved clients were connected


async def run_load(server: Server, fixtures: Fixtures, mix: Mix, duration: float, seed: int) -> Outcome:
    load = Load(server, fixtures, mix, seed)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    ramp_up: list[float] = []

    async def sample() -> None:
        while True:
            rss = server.rss_kib()
            if rss is not None:
                samples.append((time.monotonic() - started, rss))
            if not ramp_up and Conn.open_now >= 0.95 * mix.well_behaved:
                ramp_up.append(time.monotonic() - started)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    good: list[asyncio.Task[Any]] = []
    bad: list[asyncio.Task[Any]] = []

    def behave(service: str, session: Callable[[], Awaitable[None]], count: int) -> None:
        good.extend(asyncio.create_task(load.well_behaved(service, session)) for _ in range(count))

    def misbehave(kind: str, episode: Callable[..., Awaitable[Any]], services: tuple[str, ...],
                  loops: int, pause: float) -> None:  # fmt: skip
        bad.extend(
            asyncio.create_task(load.misbehaving(kind, episode, services, pause)) for _ in range(loops)
        )

    behave("strip", load.strip_busy, mix.strip_busy)
    for number in range(mix.chat_pairs):
        behave("chat", lambda n=number: load.chat_pair(n), 1)
    behave("chat", load.chat_loud, 1)
    behave("chat", load.chat_burst, 1)
    behave("http", load.http_busy, mix.http_busy)
    for user in [u for u in fixtures.mail if u.startswith("pop")]:
        behave("pop3", lambda u=user: load.pop3_user(u), 1)
    for number in range(mix.udp_clients):
        behave("udp", lambda n=number: load.udp_client(n), 1)
    behave("strip", load.strip_idle, mix.strip_idle)
    behave("chat", load.chat_idle, mix.chat_idle)
    behave("http", load.http_idle, mix.http_idle)
    behave("pop3", load.pop3_idle, mix.pop3_idle)

    loops = mix.misbehaving
    misbehave("silent", load.silent, TCP, 2 * loops, 0.5)
    misbehave("garbage", load.garbage, TCP, 2 * loops, 0.3)
    misbehave("endless line", load.endless_line, TCP, loops, 0.5)
    misbehave("stalled reader", load.chat_stalled, ("chat",), mix.chat_stalled, 0.5)
    misbehave("stalled reader", load.http_stalled, ("http",), mix.http_stalled, 0.5)
    misbehave("stalled reader", load.pop3_stalled, ("pop3",), 1, 1.0)
    misbehave("reset mid-reply", load.reset_mid_reply, TCP, 2 * loops, 0.3)
    misbehave("half-close", load.half_close, TCP, loops, 0.3)
    misbehave("open and drop", load.open_and_drop, TCP, loops, 0.01)
    misbehave("crowd", load.crowd, ("pop3",), 1, 3.0)
    misbehave("bad login", load.bad_login, ("pop3",), 1, 0.5)
    misbehave("bad user name", load.bad_name, ("pop3",), 1, 0.5)
    for user in [u for u in fixtures.mail if u.startswith("drop")]:
        misbehave("dele then reset", lambda _s, u=user: load.dele_then_reset(u), ("pop3",), 1, 0.5)
    misbehave("http framing", load.http_framing, ("http",), loops, 0.3)
    misbehave("log flood", load.http_log_flood, ("http",), 1, 1.0)
    misbehave("big upload", load.http_big_upload, ("http",), loops, 0.5)
    misbehave("unread echo", load.http_echo_unread, ("http",), loops, 0.5)
    misbehave("changing file", load.file_changes, ("http",), loops, 0.5)
    misbehave("swapped file", load.file_swaps, ("http",), 1, 0.5)
    misbehave("hang-up logins", load.hang_up_logins, ("pop3",), 1, 2.0)
    misbehave("spoofing text", load.chat_spoof, ("chat",), 1, 0.5)
    bad.append(asyncio.create_task(load.udp_flood()))

    try:
        await asyncio.sleep(duration)
    finally:
        load.stopping.set()
        for task in bad:
            task.cancel()
        await asyncio.gather(*bad, return_exceptions=True)
        _done, hung = await asyncio.wait(good, timeout=DEADLINE + 10) if good else (set(), set())
        for task in hung:
            task.cancel()
            load.tally.fail("soak", "a client did not finish its last exchange")
        await asyncio.gather(*good, return_exceptions=True)
    finals = await final_checks(load)
    left_open, limits = await leftovers(load)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    # The warm-up: every client connected, every kind of request made, and
    # at least a quarter of the run (the allocator settles).
    warm_until = max(ramp_up[0] if ramp_up else 0.0, duration / 4)
    return Outcome(
        tally=load.tally,
        memory=expect.memory_summary(samples, warm_until),
        finals=finals,
        left_open=left_open,
        limits=limits,
        duration=duration,
        peak_connections=Conn.open_peak,
        slowest_burst=load.slowest_burst,
        ramp_up=ramp_up[0] if ramp_up else None,
    )


async def final_checks(load: Load) -> dict[str, str]:
    """After the load: does every service still answer, and is all the mail there?"""
    finals: dict[str, str] = {}

    async def attempt(service: str, check: Callable[[], Awaitable[None]]) -> None:
        problem = "no answer"
        for _ in range(3):
            try:
                async with asyncio.timeout(DEADLINE):
                    await check()
                finals[service] = "answers"
                return
            except WrongAnswerError as error:
                problem = f"wrong: {error}"
                load.tally.bad(service, f"at the end: {error}")
                break
            except (OSError, PeerClosedError, TimeoutError, RefusedError) as error:
                problem = f"no answer ({type(error).__name__})"
            await asyncio.sleep(1.0)
        finals[service] = problem

    async def strip() -> None:
        conn = await load.connect("strip")
        try:
            await load.strip_exchange(conn, [b"still here?"])
        finally:
            conn.close()

    async def chat() -> None:
        a = await load.chat_join("final-a")
        try:
            b = await load.chat_join("final-b")
            try:
                await a.say_to(b)
                load.tally.ok("chat")
            finally:
                b.close()
        finally:
            a.close()

    async def udp() -> None:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(
            EchoClient, local_addr=(UDP_CLIENTS_FROM + "200", 0), remote_addr=load.address["udp"]
        )
        try:
            if not await client.ask(transport, b"final check", tries=5):
                raise TimeoutError()
            load.tally.ok("udp")
        finally:
            transport.close()

    async def http() -> None:
        conn = await load.connect("http")
        try:
            fixtures = load.fixtures
            cases = [
                HttpCase(
                    "GET", "/", expect.http_request("GET", "/"), _expect(200, (HTTP_MESSAGE + "\n").encode())
                ),
                HttpCase(
                    "GET",
                    "/files/random.bin",
                    expect.http_request("GET", "/files/random.bin"),
                    _expect(200, fixtures.random_file),
                ),
            ]
            await load.http_exchange(conn, cases)
        finally:
            conn.close()

    async def pop3() -> None:
        for user, messages in load.fixtures.mail.items():
            conn = await load.connect("pop3")
            try:
                await pop3_greeting(conn)
                answer = await load.pop3_login(conn, user, load.fixtures.passwords[user])
                wanted = expect.pop3_maildrop(user, messages)
                if answer != wanted:
                    raise WrongAnswerError(f"mail lost: {answer!r}, wanted {wanted!r}")
                await conn.send(b"QUIT\r\n")
                await pop3_line(conn)
                load.tally.ok("pop3")
            finally:
                conn.close()

    for service, check in (("strip", strip), ("chat", chat), ("udp", udp), ("http", http), ("pop3", pop3)):
        await attempt(service, check)
    return finals


async def leftovers(load: Load) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Connections the server still counts open once every client has gone
    (only our /status request may be), and the limits it says were hit."""
    # A misbehaving client's failed login may still be waiting for its
    # answer (up to 30 s, by design) when the run stops.
    deadline = time.monotonic() + DEADLINE + 30
    while True:
        conn = await load.connect("http")
        try:
            await conn.send(expect.http_request("GET", "/status", close=True))
            async with asyncio.timeout(DEADLINE):
                snapshot = (await read_response(conn, "GET")).json()
        finally:
            conn.close()
        services = snapshot["services"]
        left = {
            name: services[name]["connections"]["current"] - (1 if name == "http" else 0)
            for name in TCP
            if name in services
        }
        if not any(left.values()) or time.monotonic() > deadline:
            for name, count in left.items():
                if count:
                    load.tally.notes.extend(sockets_of(name, load.address[name][1]))
            limits = {name: dict(entry.get("limits_hit", {})) for name, entry in services.items()}
            for name, entry in services.items():
                for counter in ("dropped_slow", "bad_requests", "login_failures", "login_failed"):
                    if entry.get("counters", {}).get(counter):
                        limits[name][counter] = entry["counters"][counter]
            return left, limits
        await asyncio.sleep(0.5)


def sockets_of(service: str, port: int) -> list[str]:
    """The server's sockets on a port, as ``ss`` shows them (for a diagnosis)."""
    try:
        shown = subprocess.run(
            ["ss", "-tnoi", "state", "all", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{service} socket: {' '.join(line.split())}" for line in shown.splitlines()[1:]]


# -- report -----------------------------------------------------------------------


def verdict(outcome: Outcome) -> list[str]:
    """Why the run failed (empty: it passed)."""
    reasons = []
    tally = outcome.tally
    if sum(tally.wrong.values()):
        reasons.append(f"{sum(tally.wrong.values())} wrong answers")
    if sum(tally.failed.values()):
        reasons.append(f"{sum(tally.failed.values())} answers missing or connections dropped")
    if outcome.problems:
        reasons.append(f"{len(outcome.problems)} tracebacks or errors in the server log")
    memory = outcome.memory
    if memory is None:
        reasons.append("the server's memory could not be read")
    else:
        if memory.growth > GROWTH_LIMIT_KIB:
            reasons.append(f"server memory grew by {memory.growth / 1024:.1f} MiB after the warm-up")
        if memory.peak > PEAK_LIMIT_KIB:
            reasons.append(f"server memory peaked at {memory.peak / 1024:.1f} MiB")
    if outcome.log_lines > LOG_LINES_PER_SECOND * max(outcome.duration, 1.0):
        reasons.append(f"the server log has {outcome.log_lines} lines: a flood got past the log budget")
    silent = [name for name in SERVICES if outcome.finals.get(name) != "answers"]
    if silent:
        reasons.append(f"not answering at the end: {', '.join(silent)}")
    if any(outcome.left_open.values()):
        reasons.append(f"connections still open in the server: {outcome.left_open}")
    if outcome.exit_status != 0:
        reasons.append(f"the server's exit status on SIGTERM was {outcome.exit_status}")
    return reasons


def render(outcome: Outcome, duration: float, mix: Mix, seed: int) -> str:
    tally = outcome.tally
    ramp = (
        f"all connected after {outcome.ramp_up:.1f} s"
        if outcome.ramp_up is not None
        else "never all connected"
    )
    lines = [
        f"sockproto soak: {duration:g} s (seed {seed}), {mix.well_behaved} well-behaved clients ({ramp}), "
        f"peak {outcome.peak_connections} connections open at once, {Conn.opened} in all",
        "",
        f"{'service':<8} {'checked':>9} {'wrong':>6} {'failed':>7} {'refused':>8}  at the end",
    ]
    for name in SERVICES:
        lost = f" ({tally.lost[name]} datagrams never echoed)" if tally.lost[name] else ""
        lines.append(
            f"{name:<8} {tally.checked[name]:>9} {tally.wrong[name]:>6} {tally.failed[name]:>7} "
            f"{tally.refused[name]:>8}  {outcome.finals.get(name, '?')}{lost}"
        )
    if tally.failed["soak"]:
        lines.append(f"{'(other)':<8} {'':>9} {'':>6} {tally.failed['soak']:>7}")
    lines.append("")
    lines.append(
        f"bursts: {mix.burst} chat clients joining at once every few seconds; the slowest burst took "
        f"{outcome.slowest_burst:.2f} s"
    )
    lines.append(
        "misbehaving: " + ", ".join(f"{kind} {count}" for kind, count in sorted(tally.episodes.items()))
    )
    hit = [
        f"{name} " + " ".join(f"{limit}={count}" for limit, count in sorted(limits.items()))
        for name, limits in outcome.limits.items()
        if limits
    ]
    lines.append("limits hit (server's /status): " + ("; ".join(hit) or "none"))
    memory = outcome.memory
    if memory is not None:
        lines.append(
            f"server RSS: {memory.start / 1024:.1f} MiB at start, {memory.baseline / 1024:.1f} after the "
            f"warm-up, peak {memory.peak / 1024:.1f}; growth after the warm-up {memory.growth / 1024:.1f} "
            f"MiB (limit {GROWTH_LIMIT_KIB / 1024:g})"
        )
    lines.append(
        f"server log: {outcome.log_lines} lines, {len(outcome.problems)} tracebacks or errors; "
        f"left open after the run: {sum(outcome.left_open.values())}; exit status on SIGTERM: "
        f"{outcome.exit_status}"
    )
    reasons = verdict(outcome)
    if tally.notes:
        lines.append("")
        lines += [f"  {note}" for note in tally.notes[:40]]
    if outcome.problems:
        lines.append("")
        lines += [f"  log: {line[:200]}" for line in outcome.problems[:15]]
    lines.append("")
    lines.append("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return "\n".join(lines)


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            print(f"soak: only {target} open files allowed; the load may be refused", file=sys.stderr)


def duration_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_DURATION:g} s, got {text}")
    return value


def connections_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 100 <= value <= 5000:
        raise argparse.ArgumentTypeError(f"must be from 100 to 5000, got {text}")
    return value


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__.split("\n\n")[0],
        epilog="Exits 0 only if every check passed.",
    )
    parser.add_argument(
        "--duration",
        type=duration_argument,
        default=DEFAULT_DURATION,
        help=f"seconds of load (default {DEFAULT_DURATION:g}, at most {MAX_DURATION:g})",
    )
    parser.add_argument(
        "--connections",
        type=connections_argument,
        default=DEFAULT_CONNECTIONS,
        help=f"about how many connections at once (default {DEFAULT_CONNECTIONS})",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the server log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    mix = Mix.of(args.connections)
    raise_file_limit(2 * args.connections + 2000)
    workdir = Path(tempfile.mkdtemp(prefix="sockproto-soak-"))
    rng = random.Random(seed)
    server: Server | None = None
    outcome: Outcome | None = None
    try:
        fixtures = make_fixtures(workdir, mix, rng)
        caps = mix.server_arguments()
        auth = "memory:" + ":".join(f"{u}:{p}" for u, p in fixtures.passwords.items())
        server = Server(
            workdir,
            ["--interface", LOOPBACK,
             "--port", "0", "--max-clients", str(caps["strip"]),
             "--chat-port", "0",
             "--udp-port", "0", "--udp-mode", "echo",
             "--http-port", "0", "--http-root", str(workdir / "public"), "--http-message", HTTP_MESSAGE,
             "--pop3-port", "0", "--maildir", str(workdir / "mail"), "--pop3-max-clients", str(caps["pop3"]),
             "--auth", auth],
        )  # fmt: skip
        server.start()
        outcome = asyncio.run(run_load(server, fixtures, mix, args.duration, seed))
        outcome.exit_status = server.stop()
        lines = server.log_lines()
        outcome.log_lines = len(lines)
        outcome.problems = expect.log_problems(lines)
    finally:
        if server is not None and server.process is not None and server.process.poll() is None:
            server.stop()
        keep = args.keep or outcome is None or bool(verdict(outcome))
        if keep:
            print(f"soak: the work folder and the server log are kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(outcome, args.duration, mix, seed))
    return 1 if verdict(outcome) else 0


if __name__ == "__main__":
    sys.exit(main())

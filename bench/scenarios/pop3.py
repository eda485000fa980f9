"""pop3: log in and LIST a 1000-message box; RETR a 100 MB message. Ours and
Dovecot's pop3d serve the very same Maildir, one after the other."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Context, Metric, interleaved_rounds, line_up
from bench.servers import Server, tcp_answers
from bench.stats import Figure, median

BOX, BIG, PASSWORD = "box1000", "big", "bench"
MESSAGES = 1000
BIG_SIZE = 100 * 1000 * 1000
LIST_SESSIONS = 10  # per round: the round's figure is their median
CASES = (f"login + LIST, {MESSAGES} messages", "RETR 100 MB message")
METRICS = (Metric("time", "s", "lower", "seconds"),)
DOVECOT_CONF = """\
base_dir = {work}/dovecot/run
state_dir = {work}/dovecot/state
log_path = {work}/dovecot/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{maildir}/%u:INDEX={work}/dovecot/index/%u:CONTROL={work}/dovecot/control/%u
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {work}/dovecot/passwd
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={maildir}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def message(number: int) -> bytes:
    """An ordinary ~1.5 KB mail with LF line ends, as Maildir deliveries store them."""
    body = "".join(
        f"Line {line} of message {number}: the quick brown fox jumps over the lazy dog.\n"
        for line in range(16)
    )
    return (
        f"From: Sender {number} <sender{number}@example.org>\n"
        f"To: {BOX}@example.org\n"
        f"Subject: Benchmark message {number}\n"
        f"Date: Sun, 22 Nov 2026 04:03:05 +0000\n"
        f"Message-ID: <{number}.bench@example.org>\n\n"
    ).encode() + body.encode()


def make_maildir(root: Path) -> None:
    """ROOT/box1000 with 1000 messages, ROOT/big with one of 100 MB, in new/."""
    for user in (BOX, BIG):
        for sub in ("cur", "new", "tmp"):
            (root / user / sub).mkdir(parents=True, exist_ok=True)
    for number in range(MESSAGES):
        (root / BOX / "new" / f"1700000000.M{number}P1.bench").write_bytes(message(number))
    line = b"VGhlIHF1aWNrIGJyb3duIGZveCBqdW1wcyBvdmVyIHRoZSBsYXp5IGRvZy4gMDEyMzQ1Njc4OQ==\n"
    header = b"From: big@example.org\nTo: big@example.org\nSubject: 100 MB\n\n"
    block = line * (1024 * 1024 // len(line))
    with open(root / BIG / "new" / "1700000000.M0P1.bench", "wb") as out:
        out.write(header)
        written = len(header)
        while written + len(block) <= BIG_SIZE:
            out.write(block)
            written += len(block)
        rest = BIG_SIZE - written
        out.write(line * (rest // len(line)))


class Pop3:
    """A bare POP3 client that reads multi-line answers in big chunks (poplib
    reads them line by line, and would measure itself)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.pending = b""
        self.status()

    def status(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("POP3 server closed the connection")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\r\n", 1)
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"POP3 server said {line[:80]!r}")
        return line

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.status()

    def multiline(self, text: str, keep: bool = False) -> tuple[int, bytes]:
        """The size of the answer's body up to the final dot line, and the
        body itself if ``keep`` (only for small answers)."""
        self.command(text)
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        kept = [self.pending] if keep else []
        total, tail = len(self.pending), self.pending[-5:]
        self.pending = b""
        while not (tail.endswith(b"\r\n.\r\n") or tail == b".\r\n"):
            got = self.sock.recv_into(view)
            if not got:
                raise RuntimeError("POP3 server closed the connection mid-answer")
            total += got
            tail = (tail + bytes(view[max(0, got - 5) : got]))[-5:]
            if keep:
                kept.append(bytes(view[:got]))
        return total, b"".join(kept)

    def login(self, user: str) -> None:
        self.command(f"USER {user}")
        self.command(f"PASS {PASSWORD}")

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.command("QUIT")
        self.sock.close()


def login_and_list(port: int, sessions: int = 1) -> dict[str, Any]:
    """The median time of ``sessions`` sessions (one takes milliseconds)."""
    times = [_login_and_list_once(port) for _ in range(sessions)]
    return {"seconds": median(times)}


def _login_and_list_once(port: int) -> float:
    start = time.perf_counter()
    client = Pop3(port)
    try:
        client.login(BOX)
        _, body = client.multiline("LIST", keep=True)
        seconds = time.perf_counter() - start
    finally:
        client.close()
    listed = body.count(b"\r\n") - 1
    if listed != MESSAGES:
        raise RuntimeError(f"LIST gave {listed} messages, not {MESSAGES}")
    return seconds


def retrieve_big(port: int) -> dict[str, Any]:
    client = Pop3(port)
    try:
        client.login(BIG)
        start = time.perf_counter()
        size, _ = client.multiline("RETR 1")
        seconds = time.perf_counter() - start
    finally:
        client.close()
    if size < BIG_SIZE:
        raise RuntimeError(f"RETR gave {size} bytes, fewer than {BIG_SIZE}")
    return {"seconds": seconds}


def dovecot_command(work: Path, maildir: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        home = work / "dovecot"
        for sub in ("index", "control", "state"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("index", "control"):
            _give_to_dovecot(home / sub)
        (home / "passwd").write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}\n" for user in (BOX, BIG)))
        conf = home / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(work=work, maildir=maildir, port=port))
        return ["dovecot", "-F", "-c", str(conf)]

    return command


def _give_to_dovecot(path: Path) -> None:
    """Dovecot's mail processes run as the `dovecot` user: it must own the mail."""
    account = pwd.getpwnam("dovecot")
    for folder, dirs, files in os.walk(path):
        os.chown(folder, account.pw_uid, account.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(folder, name), account.pw_uid, account.pw_gid)


def run(ctx: Context) -> list[Figure]:
    maildir = ctx.work / "mail"
    ctx.say(f"  pop3: writing {MESSAGES} messages and a 100 MB one to {maildir}")
    make_maildir(maildir)
    ctx.setup(
        "pop3",
        f"One Maildir: `{BOX}` holds {MESSAGES} messages of about 1.5 KB, `{BIG}` one 100 MB message (LF line"
        " ends, so both servers convert to CRLF). The client is a bare socket reading 1 MiB at a time."
        " Login+LIST is timed from connect to the LIST's final dot; RETR from the command to its final dot."
        f" A round's login+LIST figure is the median of {LIST_SESSIONS} sessions. Each server gets one"
        " untimed session of each kind first (Dovecot builds its index then).",
    )
    ctx.setup(
        "pop3",
        "sockproto runs with `--maildir DIR --auth memory:USER:PASS`; Dovecot with its defaults on"
        " loopback (plaintext allowed, `ssl = no`), a passwd-file, and its index outside the Maildir.",
    )
    try:
        pwd.getpwnam("dovecot")
        has_dovecot = shutil.which("dovecot") is not None
    except KeyError:
        has_dovecot = False
    peers: list[tuple[str, Callable[[int], list[str]]]] = []
    if has_dovecot:
        _give_to_dovecot(maildir)
        peers.append(("Dovecot pop3d", dovecot_command(ctx.work, maildir)))
    else:
        ctx.note("pop3: Dovecot is not installed (scripts/bench installs dovecot-pop3d with apt-get)")
    with ctx.servers() as stack:
        auth = [arg for user in (BOX, BIG) for arg in ("--auth", f"memory:{user}:{PASSWORD}")]
        servers, figures = line_up(
            ctx,
            stack,
            "pop3",
            ["--maildir", str(maildir), *auth],
            peers,
            None,
            tcp_answers,
            (list(CASES), METRICS),
        )

        def measure(server: Server, case: str) -> dict[str, Any]:
            if case == CASES[0]:
                return login_and_list(server.port, LIST_SESSIONS)
            return retrieve_big(server.port)

        for server in servers:  # untimed first sessions
            for case in CASES:
                try:
                    measure(server, case)
                except (OSError, RuntimeError) as error:
                    ctx.say(f"  pop3 warm-up on {server.name} failed: {error}")
        figures += interleaved_rounds(ctx, "pop3", CASES, servers, METRICS, measure)
    return figures

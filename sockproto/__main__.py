"""``python -m sockproto COMMAND``: small tools that go with the servers."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import os
import select
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sockproto import __version__, config


class CommandError(Exception):
    """A tool cannot do what was asked; the message says why."""


class Interrupted(BaseException):
    """A signal ended the command (BaseException, as KeyboardInterrupt is)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockproto", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sockproto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("example-config", help="print a sockproto.toml with every key and its default")
    passwd = commands.add_parser(
        "passwd",
        help="add a user, or change a password, in a --auth file:PATH file (salted scrypt hash)",
        description="Asks for the password twice on a terminal; otherwise reads one line from stdin.",
    )
    passwd.add_argument("file", help="the users file (created if missing)")
    passwd.add_argument("user")
    deliver = commands.add_parser(
        "deliver",
        help="put a message (FILE or stdin) into USER's Maildir, atomically",
        description="Writes into ROOT/USER/tmp/, then renames into new/; prints the new file's path.",
    )
    deliver.add_argument("user")
    deliver.add_argument("file", nargs="?", help="the message (default: stdin)")
    deliver.add_argument(
        "--maildir",
        metavar="ROOT",
        help="Maildir root (default: [pop3] maildir from the config file, else 'mail')",
    )
    deliver.add_argument("--config", metavar="FILE", help="TOML settings file to read the root from")
    args = parser.parse_args(argv)
    try:
        if args.command == "example-config":
            sys.stdout.write(config.example_toml())
        elif args.command == "passwd":
            set_password(args.file, args.user, read_password())
            print(f"{args.user}: password set in {args.file}", file=sys.stderr)
        elif args.command == "deliver":
            root = args.maildir or config.load(args.config)[0].pop3.maildir
            with termination_exits() as wakeup:
                if args.file:
                    with open(args.file, "rb") as source:
                        path = deliver_message(root, args.user, source)
                else:
                    stdin = (
                        sys.stdin.buffer if wakeup is None else SignalAwareInput(sys.stdin.fileno(), wakeup)
                    )
                    path = deliver_message(root, args.user, stdin)
            print(path)
    except (CommandError, config.ConfigError) as error:
        print(f"python -m sockproto {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"python -m sockproto {args.command}: error: {error.strerror}{where}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(
            f"python -m sockproto {args.command}: interrupted by {signal.Signals(signum).name}",
            file=sys.stderr,
        )
        return 128 + signum
    return 0


@contextlib.contextmanager
def termination_exits() -> Iterator[int | None]:
    """Inside, SIGTERM and SIGHUP end the command the way Ctrl-C does:
    through the clean-ups on the way out (a delivery removes its file from
    tmp/), rather than killing it where it stands.

    Yields the read end of the pipe a signal's arrival is written to, for
    :class:`SignalAwareInput` (None outside the main thread, where Python
    runs no signal handlers)."""

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    wakeup, woken = os.pipe()
    for end in (wakeup, woken):
        os.set_blocking(end, False)
    previous_wakeup = signal.set_wakeup_fd(woken, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield wakeup
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wakeup)
        os.close(woken)


class SignalAwareInput(io.RawIOBase):
    """A pipe (or terminal) whose blocking read gives way to a signal.

    A signal that lands after Python last looked for one but before read()
    starts is handled only once read() returns (PEP 475), which on a quiet
    pipe may be never: ``deliver`` would sit out a SIGTERM. So the wait is a
    select() that also watches ``wakeup``, the pipe Python's C-level handler
    writes each signal to (:func:`signal.set_wakeup_fd`); back in Python, the
    handler runs."""

    def __init__(self, fd: int, wakeup: int) -> None:
        super().__init__()
        self.fd = fd
        self.wakeup = wakeup

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            readable, _, _ = select.select([self.fd, self.wakeup], [], [])
            if self.wakeup in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup, 512)
            if self.fd in readable:
                data = os.read(self.fd, len(buffer))
                buffer[: len(data)] = data
                return len(data)


def read_password() -> bytes:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise CommandError("the passwords differ")
        password = first.encode("utf-8")
    else:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password:
        raise CommandError("empty password")
    return password


def set_password(file: str, user: str, password: bytes) -> None:
    """Write ``user:HASH`` into the users file, replacing the user's old
    line; other lines stay as they are. The file is replaced atomically and
    readable by its owner only."""
    from sockproto.auth import hash_password
    from sockproto.maildir import valid_user

    if not valid_user(user):
        raise CommandError(
            f"{user!r} cannot be a user name (letters, digits, and . _ @ + - after the first; 64 at most)"
        )
    path = Path(file)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        lines = []
    entry = user.encode() + b":" + hash_password(password)
    kept: list[bytes] = []
    for line in lines:
        if line.split(b":", 1)[0] != user.encode():
            kept.append(line)
        elif entry not in kept:
            kept.append(entry)
    if entry not in kept:
        kept.append(entry)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent.resolve(), prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(b"".join(line + b"\n" for line in kept))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def deliver_message(root: str, user: str, source: BinaryIO) -> Path:
    from sockproto.maildir import Maildir, valid_user

    if not valid_user(user):
        raise CommandError(f"{user!r} is not a valid mailbox name")
    return Maildir(Path(os.path.abspath(root)) / user).deliver(source)


if __name__ == "__main__":
    raise SystemExit(main())

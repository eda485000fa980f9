"""The chat server: one room, many clients, never stalled by a slow one.

Seed 000's broadcast loop, done the way ``ncat --chat`` does not: every line a
client sends reaches every other client as ``<nick> text``, but a client that
stops reading costs the room no time and bounded memory (its output waits in a
bounded :class:`~sockproto.limits.OutputBuffer` and past ``--chat-max-pending``
it is dropped as too slow; what all of them hold together is bounded by the
guard's :class:`~sockproto.limits.OutputBudget`, ``--chat-max-output``, whose
largest holders go first), a client that floods is slowed by TCP backpressure
instead of being silenced, and no client can drive another's terminal.

The room (:class:`Room`) and the text rules (:func:`clean`, :func:`valid_nick`,
...) know nothing of sockets; :class:`ChatProtocol` is the I/O around them.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockproto import auth
from sockproto.config import ChatSettings, Settings
from sockproto.limits import (
    LOGINS_IN_FLIGHT,
    BoundedLineReceiver,
    ConnectionPolicy,
    Login,
    LoginSlot,
    OutputBuffer,
    at_turn_end,
    login_key,
    peer_of,
    rate_limit,
    suite_logins,
)
from sockproto.listening import Listener, stream_listener
from sockproto.stats import ServiceStats, Stats
from sockproto.text import MAX_TELNET_COMMANDS, TOO_MANY_COMMANDS, TelnetInput, loggable, relayable

log = Logger(namespace="sockproto")

NICK_RULE = "1 to 32 letters, digits, _ or -"
_NICK = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
_COMMAND = re.compile(r"/(\S*)\s*(.*)", re.DOTALL)
OVERFLOW_MESSAGE = b"error: too many users, try again later\r\n"

# A client's line as text fit to relay (the suite's one rule: sockproto.text).
clean = relayable


def valid_nick(name: str) -> bool:
    return _NICK.fullmatch(name) is not None


def said(nick: str, text: str) -> bytes:
    return f"<{nick}> {text}\r\n".encode()


def acted(nick: str, action: str) -> bytes:
    return f"* {nick} {action}\r\n".encode()


def notice(text: str) -> bytes:
    """A line from the server itself."""
    return f"*** {text}\r\n".encode()


def error(text: str) -> bytes:
    return f"error: {text}\r\n".encode()


def split_command(text: str) -> tuple[str, str]:
    """``"/Nick  bob "`` -> ``("nick", "bob")``; the text must start with ``/``."""
    match = _COMMAND.fullmatch(text)
    return (match[1].lower(), match[2].strip()) if match else ("", "")


HELP = [
    "commands:",
    "  /nick NAME      change your nickname (" + NICK_RULE + ")",
    "  /who            list who is here",
    "  /me ACTION      tell the others what you do: * you ACTION",
    "  /quit [REASON]  leave; the others see the reason",
    "  /help           this list",
    "anything else goes to everyone else as <you> text; //text sends /text",
]
LOGIN_HELP = ["  /login USER PASSWORD  log in first; your nickname is your user name"]


class Room:
    """Who is here, what was said lately, and delivery to everyone else.

    A member is anything with a ``nick`` and a ``send(bytes)``: the room knows
    no sockets. Nicknames are unique regardless of case.
    """

    def __init__(self, history: int) -> None:
        self.members: dict[str, Any] = {}  # nick.lower() -> member, in joining order
        self.history: deque[bytes] = deque(maxlen=history)
        self.closing = False  # the server stops: everyone leaves, no one is told
        self._guests = 0
        # Lines not sent yet: (number, line, who said it); see hold().
        self._outgoing: deque[tuple[int, bytes, Any]] = deque()
        self._numbered = 0
        # Members who joined while lines were waiting: the number of the first
        # line they are to get (they had the earlier ones in the history).
        self._joined_since: dict[Any, int] = {}
        self._batches = 0
        self._delivering = False

    def __contains__(self, member: Any) -> bool:
        return self.members.get(member.nick.lower()) is member

    def __len__(self) -> int:
        return len(self.members)

    def taken(self, nick: str) -> bool:
        return nick.lower() in self.members

    def guest_nick(self) -> str:
        """The next free ``guestN``."""
        while True:
            self._guests += 1
            nick = f"guest{self._guests}"
            if not self.taken(nick):
                return nick

    def nicks(self) -> list[str]:
        return [member.nick for member in self.members.values()]

    def join(self, member: Any) -> None:
        self.deliver(notice(f"{member.nick} joined"))
        if self._outgoing:
            self._joined_since[member] = self._numbered + 1
        self.members[member.nick.lower()] = member

    def leave(self, member: Any, reason: str) -> None:
        if member in self:
            del self.members[member.nick.lower()]
            if not self.closing:
                self.deliver(notice(f"{member.nick} left ({reason})"))

    def rename(self, member: Any, nick: str) -> None:
        old = member.nick
        member.nick = nick
        # Rebuilt rather than moved, so /who keeps the joining order.
        self.members = {(nick.lower() if m is member else key): m for key, m in self.members.items()}
        self.deliver(notice(f"{old} is now known as {nick}"), member)

    def say(self, member: Any, text: str) -> None:
        self._relay(said(member.nick, text), member)

    def act(self, member: Any, action: str) -> None:
        self._relay(acted(member.nick, action), member)

    def _relay(self, line: bytes, sender: Any) -> None:
        self.history.append(line)
        self.deliver(line, sender)

    def deliver(self, line: bytes, sender: Any = None) -> None:
        """Send ``line`` to every member but ``sender``: now, or when the
        batch open ends.

        Sending can make a member leave (too slow), and leaving is announced:
        such lines queue behind the current ones instead of nesting.
        """
        self._numbered += 1
        self._outgoing.append((self._numbered, line, sender))
        if not self._batches and not self._delivering:
            self._send_outgoing()

    def hold(self) -> None:
        """Keep what is delivered from now on until :meth:`release`, then send
        each member all of it at once: one write per member for every line
        of a reactor turn, not one per line per member (the fan-out is what a
        room costs)."""
        self._batches += 1

    def release(self) -> None:
        self._batches -= 1
        if not self._batches and not self._delivering:
            self._send_outgoing()

    def _send_outgoing(self) -> None:
        self._delivering = True
        try:
            while self._outgoing:
                lines = list(self._outgoing)
                self._outgoing.clear()
                self._send_lines(lines)
            self._joined_since.clear()
        finally:
            self._delivering = False

    def _send_lines(self, lines: list[tuple[int, bytes, Any]]) -> None:
        senders = {id(sender) for _, _, sender in lines}
        everything = lines[0][1] if len(lines) == 1 else b"".join(line for _, line, _ in lines)
        joined_since = self._joined_since
        for member in list(self.members.values()):
            if id(member) not in senders and member not in joined_since:
                member.send(everything)
                continue
            first = joined_since.get(member, 0)
            own = b"".join(line for number, line, sender in lines if sender is not member and number >= first)
            if own:
                member.send(own)


class ChatProtocol(TelnetInput, BoundedLineReceiver):
    """One client: lines in, room traffic out.

    Lines are split a whole block at a time and wait in ``_lines`` while the
    client is held (over its rate, or while its login is checked); while held,
    its socket is not read, so TCP slows the client down and nothing is lost.
    """

    factory: ChatFactory
    service_stats: ServiceStats
    nick = ""  # set once the client is in the room
    _leaving = ""  # why the connection ends, once that is decided
    _flood_logged = False
    _slot: LoginSlot | None = None  # a login's place among its address's logins in flight

    def connectionMade(self) -> None:
        factory = self.factory
        self.room = factory.room
        self.peer = peer_of(self.transport)
        self.output = OutputBuffer(self.transport, factory.settings.max_pending, self._too_slow)
        self.bucket = rate_limit(factory.settings.rate, factory.clock.seconds)
        self._lines: deque[bytes] = deque()
        self._holds: set[str] = set()
        self._timers: dict[str, Any] = {}
        self._reading = True
        self._eof = False
        self._overlong: bytes | None = None
        if factory.logins:
            self.send(notice("welcome to sockproto chat; log in with /login USER PASSWORD (/help for more)"))
        else:
            self._enter(self.room.guest_nick())

    def send(self, data: bytes) -> None:
        self.output.write(data)

    # Input: blocks of lines, held while the client must wait.

    def _telnet_reply(self, reply: bytes) -> None:
        if not self._leaving:
            self.send(reply)

    def _telnet_flood(self) -> None:
        """Past MAX_TELNET_COMMANDS: not a telnet client but a flood of commands."""
        if self._leaving:
            return  # closing already: the client has had its one line
        self.service_stats.limit_hit("telnet_commands")
        log.info(
            "chat: closing {peer}: more than {limit} telnet commands",
            peer=self.peer,
            limit=MAX_TELNET_COMMANDS,
        )
        self._depart("too many telnet commands")
        self.output.finish()
        self.transport.write(TOO_MANY_COMMANDS)
        self.transport.loseConnection()

    def _bytes_received(self, data: bytes) -> None:
        if self._leaving or self._overlong is not None:
            return
        lines = (self._buffer + data).split(b"\n") if self._buffer else data.split(b"\n")
        self._buffer = lines.pop()
        limit = self.MAX_LENGTH
        if len(self._buffer) > limit or (lines and max(map(len, lines)) > limit):
            # Lines before the long one still count; then it ends the session.
            first = next((i for i, line in enumerate(lines) if len(line) > limit), len(lines))
            self._overlong = lines[first] if first < len(lines) else self._buffer
            del lines[first:]
            self._buffer = b""
        self._lines.extend(lines)
        self._work()

    def readConnectionLost(self) -> None:
        """EOF: the last line counts even without LF; then the client leaves."""
        self._telnet_end()
        if self._buffer:
            self._lines.append(self._buffer)
            self._buffer = b""
        self._eof = True
        if "login answer" in self._timers:
            self._close("EOF")  # a login's answer waits for no one
            return
        self._work()

    def writeConnectionLost(self) -> None:
        self._depart("connection lost")
        self.output.discard()
        self.transport.loseConnection()

    def _work(self) -> None:
        """Handle the waiting lines unless held, then what ends the input."""
        lines = self._lines
        self.factory.hold_for_turn()
        while lines and not self._holds and not self._leaving:
            self.lineReceived(lines.popleft())
        if lines or self._holds or self._leaving:
            self._watch_for_hangup()
            return
        if self._overlong is not None:
            self.lineLengthExceeded(self._overlong)
        elif self._eof:
            self._close("EOF")

    def _hold(self, why: str, seconds: float | None = None) -> None:
        """Stop handling (and reading) this client's lines until :meth:`_release`."""
        self._holds.add(why)
        if seconds is not None:
            self._timers[why] = self.factory.clock.callLater(seconds, self._release, why)
        self._set_reading(False)

    def _release(self, why: str) -> None:
        self._timers.pop(why, None)
        self._holds.discard(why)
        if not self._holds and not self._leaving:
            self._work()
            if not self._holds:
                self._set_reading(True)
        else:
            self._watch_for_hangup()

    def _set_reading(self, reading: bool) -> None:
        if reading != self._reading and not self._leaving:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def line_received(self, line: bytes) -> None:
        if self.bucket is not None:
            self.bucket.take()
        self._handle(line)
        if self.bucket is not None and not self._leaving:
            wait = self.bucket.wait()
            if wait > 0:
                self._over_rate(wait)

    def _over_rate(self, wait: float) -> None:
        self.service_stats.limit_hit("rate")
        if not self._flood_logged:
            self._flood_logged = True
            log.info(
                "chat: {peer} sends faster than {rate:g} lines/s; reading it more slowly",
                peer=self.peer,
                rate=self.bucket.rate if self.bucket else 0,
            )
        self._hold("rate", wait)

    # Commands and chat.

    def _handle(self, line: bytes) -> None:
        text = clean(line)
        if not self.nick:
            self._before_login(line, text)
        elif text.startswith("//"):
            self._say(text[1:])
        elif text.startswith("/"):
            name, argument = split_command(text)
            command = self._COMMANDS.get(name)
            if command is None:
                self.send(error(f"unknown command /{name} (/help lists them)"))
            else:
                command(self, argument)
        else:
            self._say(text)

    def _say(self, text: str) -> None:
        if text.strip():
            self.room.say(self, text)
            self.service_stats.handled += 1

    def do_me(self, action: str) -> None:
        if not action:
            self.send(error("usage: /me ACTION"))
            return
        self.room.act(self, action)
        self.service_stats.handled += 1

    def do_nick(self, name: str) -> None:
        if self.factory.logins:
            self.send(error("your nickname is your user name here"))
        elif not valid_nick(name):
            self.send(error(f"a nickname is {NICK_RULE}"))
        elif name == self.nick:
            self.send(notice(f"you are already {name}"))
        elif self.room.taken(name) and name.lower() != self.nick.lower():
            self.send(error(f"{name} is taken"))
        else:
            old = self.nick
            self.room.rename(self, name)
            self.send(notice(f"you are now {name}"))
            log.info("chat: {old} is now {nick}", old=old, nick=name)

    def do_who(self, _argument: str) -> None:
        nicks = [f"{nick} (you)" if nick == self.nick else nick for nick in self.room.nicks()]
        self.send(notice(f"{len(nicks)} here: {', '.join(nicks)}"))

    def do_help(self, _argument: str) -> None:
        lines = HELP[:1] + (LOGIN_HELP if self.factory.logins else []) + HELP[1:]
        self.send(b"".join(notice(line) for line in lines))

    def do_quit(self, reason: str) -> None:
        self.send(notice("goodbye"))
        self._close(f"quit: {reason}" if reason else "quit")

    def do_login(self, _argument: str) -> None:
        if self.factory.logins:
            self.send(error(f"you are already logged in as {self.nick}"))
        else:
            self.send(error("no login here; /nick NAME picks your nickname"))

    _COMMANDS: dict[str, Callable[[ChatProtocol, str], None]] = {
        "me": do_me,
        "nick": do_nick,
        "who": do_who,
        "help": do_help,
        "quit": do_quit,
        "login": do_login,
    }

    # Logging in (with --chat-auth): nothing but /login, /help and /quit before it.

    def _before_login(self, line: bytes, text: str) -> None:
        name, argument = split_command(text) if text.startswith("/") else ("", "")
        if name == "login":
            self._login(line)
        elif name in ("help", "quit"):
            self._COMMANDS[name](self, argument)
        else:
            self.send(error("log in first: /login USER PASSWORD"))

    def _login(self, line: bytes) -> None:
        parts = line.split(None, 2)
        if len(parts) < 3:
            self.send(error("usage: /login USER PASSWORD"))
            return
        user = parts[1].decode("utf-8", "replace")
        if not valid_nick(user):
            self.send(error(f"that user name cannot be a nickname ({NICK_RULE})"))
            return
        # At most a few logins in flight per address (FailureDelays.begin):
        # one more is refused now, its password unchecked.
        self._slot = self.factory.login_delays.begin(login_key(self.transport))
        if self._slot is None:
            self.service_stats.limit_hit("logins_in_flight")
            log.info(
                "chat: {peer} refused a login: too many logins in progress from its address", peer=self.peer
            )
            self.send(error("too many logins in progress from your address"))
            return
        # Hold the client's later lines until the answer, which may be slowed.
        self._hold("login")
        checked = self.factory.authenticate(UsernamePassword(parts[1], parts[2]))
        checked.addBoth(self._login_checked, user)

    def _login_checked(self, result: Any, user: str) -> None:
        """Any login from an address whose logins failed is answered after
        its penalty, right password or not (FailureDelays: at most
        the suite's LOGIN_DELAY_CAP), during which the client's later lines wait too."""
        if self._leaving:
            return
        outcome = Login.SUCCEEDED
        if isinstance(result, Failure):
            outcome = Login.FAILED
            if not result.check(LoginFailed):
                log.error(
                    "chat: checking the login of {user} failed: {error}",
                    user=user,
                    error=result.getErrorMessage(),
                )
            self.service_stats.counters["login_failed"] += 1
        accepted = outcome is Login.SUCCEEDED
        slot, self._slot = self._slot, None  # the answer frees it, or its cancel
        assert slot is not None
        pending = self.factory.login_delays.answer_later(
            slot, self.factory.settings.login_delay, outcome, lambda: self._answer_login(user, accepted)
        )
        if outcome is Login.FAILED:
            log.info(
                "chat: {peer} failed to log in as {user}; answering in {wait:g} s",
                peer=self.peer,
                user=loggable(user),
                wait=0 if pending is None else pending.seconds,
            )
        if pending is None:
            return
        if self._eof:  # no one is left to answer
            pending.cancel()
            self._close("EOF")
            return
        self._timers["login answer"] = pending
        self._watch_for_hangup()

    def _watch_for_hangup(self) -> None:
        """While nothing but a login's answer holds the client, its
        socket is read (up to a line's worth of waiting input), so that a
        client that hangs up is seen at once: its wait ends and it leaves
        (see readConnectionLost), instead of keeping its slot until then."""
        if "login answer" not in self._timers:
            return
        waiting = len(self._buffer) + sum(map(len, self._lines))
        self._set_reading(self._holds == {"login"} and waiting <= self.MAX_LENGTH)

    def _answer_login(self, user: str, accepted: bool) -> None:
        self._timers.pop("login answer", None)
        if not accepted:
            self.send(error("login failed"))
        elif self.room.taken(user):
            self.send(error(f"{user} is already here"))
        else:
            self.service_stats.counters["logins"] += 1
            self._enter(user)
        self._release("login")

    # Joining and leaving.

    def _enter(self, nick: str) -> None:
        self.nick = nick
        if self.factory.logins:
            welcome = f"welcome, {nick}; /help lists the commands"
        else:
            welcome = (
                f"welcome to sockproto chat, you are {nick}; /nick NAME changes it, /help lists the commands"
            )
        self.output.write(b"".join([notice(welcome), *self.room.history]))
        self.room.join(self)
        log.info("chat: {peer} joined as {nick}", peer=self.peer, nick=nick)

    def _depart(self, reason: str) -> None:
        """Leave the room (once), telling the others why."""
        if self._leaving:
            return
        self._leaving = reason
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._slot is not None:  # a login being checked: no longer in flight
            self._slot.free()
            self._slot = None
        if self.room.closing:
            return
        if self.nick:
            self.room.leave(self, reason)
            log.info(
                "chat: {nick} ({peer}) left: {reason}",
                nick=self.nick,
                peer=self.peer,
                reason=loggable(reason),
            )
        else:
            log.info(
                "chat: {peer} left without logging in: {reason}", peer=self.peer, reason=loggable(reason)
            )

    def _close(self, reason: str) -> None:
        self._depart(reason)
        self.output.finish()
        self.transport.loseConnection()

    def _too_slow(self) -> None:
        """Its unread output passed --chat-max-pending: drop it, now."""
        self.service_stats.limit_hit("max_pending")
        self.service_stats.counters["dropped_slow"] += 1
        log.info(
            "chat: dropping {nick} ({peer}): over {limit} bytes of output unread",
            nick=self.nick,
            peer=self.peer,
            limit=self.factory.settings.max_pending,
        )
        self._depart("too slow")
        self.transport.abortConnection()

    def output_dropped(self) -> None:
        """The guard drops this client: it holds the most output while the
        room's (--chat-max-output) or the suite's (--suite-max-output) is spent."""
        self.service_stats.counters["dropped_slow"] += 1
        self._depart("too slow")
        self.output.discard()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._depart("line too long")
        self.output.finish()
        super().lineLengthExceeded(line)

    def idle_timed_out(self) -> bytes:
        self._depart("idle timeout")
        self.output.finish()
        return notice(f"idle for {self.factory.settings.idle_timeout:g} s; goodbye")

    def server_stopping(self) -> bytes:
        self.room.closing = True
        self._depart("server shutting down")
        self.output.finish()
        return notice("server shutting down")

    def connectionLost(self, reason: Any = None) -> None:
        if not self._leaving:
            if reason is None or reason.check(ConnectionDone):
                self._depart("EOF")
            else:
                self._depart("connection reset")


class ChatFactory(Factory):
    """The room and the settings every client of it shares."""

    protocol = ChatProtocol

    def __init__(
        self,
        settings: ChatSettings,
        stats: ServiceStats,
        clock: Any,
        checkers: Sequence[ICredentialsChecker] = (),
        logins_in_flight: int = LOGINS_IN_FLIGHT,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.clock = clock
        self.logins = settings.auth
        usable = [c for c in checkers if IUsernamePassword in c.credentialInterfaces]
        self.checker = auth.any_of(usable) if usable else None
        self.room = Room(settings.history)
        self.login_delays = suite_logins(clock, logins_in_flight)  # shared with POP3: the same users
        self._holding = False

    def authenticate(self, credentials: Any) -> Deferred[Any]:
        """The avatar id from the first checker that accepts ``credentials``."""
        if self.checker is None:
            return fail(UnauthorizedLogin())
        return maybeDeferred(self.checker.requestAvatarId, credentials)

    def hold_for_turn(self) -> None:
        """What is said in this reactor turn goes out when the turn ends:
        with many clients talking, each member gets one write a turn."""
        if not self._holding:
            self._holding = True
            self.room.hold()
            at_turn_end(self.clock, self._turn_over)

    def _turn_over(self) -> None:
        self._holding = False
        self.room.release()

    def buildProtocol(self, addr: Any) -> ChatProtocol:
        protocol = ChatProtocol()
        protocol.factory = self
        protocol.MAX_LENGTH = self.settings.max_line
        protocol.service_stats = self.stats
        return protocol


def build(settings: Settings, stats: Stats, reactor: Any) -> Listener | None:
    """The chat service as configured, or None when its port is off."""
    chat = settings.chat
    service_stats = stats.service("chat", "lines")
    checkers = auth.checkers(settings) if chat.auth else []
    factory = ChatFactory(chat, service_stats, reactor, checkers, settings.suite.logins_in_flight)
    policy = ConnectionPolicy(
        max_clients=chat.max_clients,
        overflow_message=OVERFLOW_MESSAGE,
        idle_timeout=chat.idle_timeout,
        max_output=chat.max_output,
    )
    return stream_listener("chat", chat.port, settings.suite, factory, policy, service_stats, reactor)

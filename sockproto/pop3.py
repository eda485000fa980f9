"""The POP3 server of issue 6: RFC 1939 over Maildir, with the RFC 2449
capabilities that are true here (TOP, USER, UIDL, RESP-CODES, AUTH-RESP-CODE,
PIPELINING, SASL PLAIN, STLS).

Our own protocol on the suite's BoundedLineReceiver rather than a subclass of
twisted.mail.pop3.POP3: that class would need almost every method replaced
(its error handler drops the connection on ``DELE abc`` and ``TOP 1``, its
mailbox model counts deleted messages, APOP compares str with bytes, its file
transfer stuffs dots per 16 KiB chunk, it has no STLS, its own line policy and
its own 300 s timer), leaving only its name. What is sound is reused: the cred
portal and strcred checkers, twisted's APOPCredentials (with its comparison
fixed), LineReceiver, the transport's producer/consumer flow control, and the
suite's connection guard for the client cap and the idle timeout.
"""

from __future__ import annotations

import binascii
import hmac
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from hashlib import md5
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.mail.pop3 import APOPCredentials as _TwistedAPOPCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from sockproto import __version__, auth
from sockproto.config import ConfigError, Settings
from sockproto.endpoints import loopback_only, stream_description
from sockproto.limits import (
    LOGIN_DELAY_CAP,
    LOGINS_IN_FLIGHT,
    BoundedLineReceiver,
    ConnectionPolicy,
    DelayedAnswer,
    Login,
    LoginSlot,
    login_key,
    peer_of,
    suite_logins,
)
from sockproto.listening import Listener, StartupError, stream_listener
from sockproto.maildir import TMP_MAX_AGE, IMaildrop, MailboxInUseError, Maildrop, WireReader, valid_user
from sockproto.stats import ServiceStats, Stats
from sockproto.text import loggable

log = Logger(namespace="sockproto")

# RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND = 255
# Longer than any command or SASL response: past this the line cannot be
# resynchronised without buffering it, so the session ends.
MAX_LINE = 8192
# Unhandled input kept while a command waits, before the socket is paused.
MAX_BACKLOG = MAX_LINE
# The longest a login's answer is held back, however many failures (the suite's).
MAX_AUTH_DELAY = LOGIN_DELAY_CAP
SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down\r\n"

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"
COMMANDS = {
    AUTHORIZATION: frozenset({"CAPA", "QUIT", "USER", "PASS", "APOP", "AUTH", "STLS"}),
    TRANSACTION: frozenset({"CAPA", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL"}),
    UPDATE: frozenset(),
}
KNOWN = COMMANDS[AUTHORIZATION] | COMMANDS[TRANSACTION]
# RFC 1939 sets no upper bound on a message number or TOP's line count: any
# decimal number a command line can hold (out of range is "no such message").
_NUMBER = re.compile(rb"[0-9]{1,%d}\Z" % MAX_COMMAND)
_DIGEST = re.compile(rb"[0-9a-fA-F]{32}\Z")


class APOPCredentials(_TwistedAPOPCredentials):
    """twisted.mail's APOP credentials compare a str digest with bytes, so
    APOP always fails on Python 3; this compares bytes, in constant time."""

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = md5(self.magic + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())


@implementer(ICredentialsChecker)
class AnyLogin:
    """Without ``--auth`` (a local test server): every name and password is
    accepted and names the mailbox."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.succeed(credentials.username)


@implementer(IRealm)
class MaildirRealm:
    """A login's avatar is the user's Maildir, locked for the session.

    Opening it sweeps tmp/ and reads every message without a size tag to
    count its CRLF octets: seconds for a big mailbox. That runs in the
    reactor's thread pool (``run``), so other sessions and services are
    served meanwhile; the login is answered once the sizes are known.
    """

    def __init__(self, root: Path, run: auth.Runner = deferToThread) -> None:
        self.root = root
        self._run = run

    def requestAvatar(
        self, avatar_id: Any, mind: Any, *interfaces: Any
    ) -> defer.Deferred[tuple[Any, Maildrop, Callable]]:
        if IMaildrop not in interfaces:
            raise NotImplementedError("only IMaildrop avatars here")
        user = avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else str(avatar_id)
        if not valid_user(user):
            raise UnauthorizedLogin("not a valid mailbox name")
        # Cancelled, this fires at once; the thread cannot be stopped, so a
        # mailbox it opens after that is closed here (else its lock stays).
        result: defer.Deferred[Maildrop] = defer.Deferred(lambda _: None)

        def opened(drop: Maildrop) -> None:
            if result.called:
                drop.close()
            else:
                result.callback(drop)

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        self._run(Maildrop.open, self.root, user).addCallbacks(opened, failed)
        return result.addCallback(self._avatar, user)

    def _avatar(self, drop: Maildrop, user: str) -> tuple[Any, Maildrop, Callable]:
        if drop.swept:
            log.info(
                "pop3: removed {count} file(s) older than {hours:g} h from {user}/tmp (deliveries that died)",
                count=drop.swept,
                hours=TMP_MAX_AGE / 3600,
                user=user,
            )
        return IMaildrop, drop, drop.close


def _number(word: bytes) -> int | None:
    """A decimal number of any size (the command line bounds its digits)."""
    return int(word) if _NUMBER.match(word) else None


@implementer(IPushProducer)
class Pop3Protocol(BoundedLineReceiver):
    """One POP3 session. Commands are handled one at a time, in order: while a
    login is checked or a message streams, further (pipelined) lines wait in
    the buffer, and past MAX_BACKLOG bytes of them the socket is not read.

    The session is its transport's streaming producer for all its output: when
    the client stops reading and our output backs up, we stop handling its
    commands too, and RETR/TOP write the next chunk only when there is room.
    A client can make us buffer about one chunk each way, whatever it sends.
    """

    MAX_LENGTH = MAX_LINE
    line_too_long_message = b"-ERR line too long\r\n"
    factory: Pop3Factory

    def __init__(self) -> None:
        self.state = AUTHORIZATION
        self.maildrop: Maildrop | None = None
        self.secure = False
        self.timestamp = b""
        self.peer = "?"
        self._user: bytes | None = None
        self._sasl = False  # the next line is an AUTH PLAIN response
        self._waiting: Any = None  # a login being checked, or the DelayedAnswer of its answer
        self._slot: LoginSlot | None = None  # its place among its address's logins in flight
        self._transfer: WireReader | None = None  # the RETR/TOP being sent
        self._file: Any = None
        self._output_full = False  # the transport asked us to pause
        self._registered = False
        self._reading = True
        self._peer_closed = False
        self._lost = False
        self._shutting_down = False  # the server stops: no further command is run
        self._until_done: defer.Deferred[bytes] | None = None  # fired when the last one is done

    # -- connection events

    def connectionMade(self) -> None:
        self.secure = ISSLTransport.providedBy(self.transport)
        self.peer = peer_of(self.transport)
        if self._login_allowed:
            self.timestamp = b"<%s.%d@%s>" % (
                secrets.token_hex(8).encode(),
                int(self.factory.clock.seconds()),
                self.factory.hostname,
            )
        # Else no APOP timestamp: clients (curl) choose APOP by themselves when
        # the greeting offers it, and no login of any kind is taken before STLS.
        # After STLS there is no second greeting, so APOP stays off there.
        self.transport.registerProducer(self, True)
        self._registered = True
        self._ok(b"sockproto POP3 server ready" + (b" " + self.timestamp if self.timestamp else b""))

    def readConnectionLost(self) -> None:
        # Complete lines already received still count (a QUIT among them
        # commits); they wait if a command is in progress.
        self._peer_closed = True
        if isinstance(self._waiting, DelayedAnswer):
            # A login's answer waits: no one is left to read it, and waiting
            # would keep the session, and its slot, for the delay.
            self._waiting.cancel()
            self._waiting = None
            self._close()
            return
        if not self.paused:
            self._end_of_input()

    def writeConnectionLost(self) -> None:
        self._close()

    def _end_of_input(self) -> None:
        if self.transport.disconnecting:
            return
        rest, self._buffer = self._buffer, b""
        if rest:
            self.lineReceived(rest)
        if not self.paused and not self.transport.disconnecting:
            self._close()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._stop_output()
        super().lineLengthExceeded(line)

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        if isinstance(self._waiting, DelayedAnswer):
            self._waiting.cancel()  # a login's answer: no one to tell (its mailbox closed)
        self._free_slot()  # a login being checked: no longer in flight
        self._end_transfer()
        if self.maildrop is not None:
            drop, self.maildrop = self.maildrop, None
            log.info(
                "pop3: {peer}: {user} disconnected without QUIT; nothing deleted",
                peer=self.peer,
                user=loggable(drop.user),
            )
            drop.close()

    def idle_timed_out(self) -> bytes:
        self._stop_output()
        return b""  # RFC 1939 section 3: close without a response

    def server_stopping(self) -> defer.Deferred[bytes]:
        """The command in progress (a RETR streaming, a login being checked)
        finishes; the commands after it are not run. Then the session ends
        with the shutdown line, without an UPDATE: nothing is deleted."""
        self._shutting_down = True
        if isinstance(self._waiting, DelayedAnswer):
            # A login's answer, held back: the shutdown line answers it, and
            # says nothing about the password (a mailbox opened is closed).
            self._waiting.cancel()
            self._waiting = None
        self._update()
        self._until_done = done = defer.Deferred()
        self._stopped_if_done()  # at once when nothing is in progress
        return done

    def _stopped_if_done(self) -> None:
        if self._until_done is not None and self._transfer is None and self._waiting is None:
            done, self._until_done = self._until_done, None
            self._stop_output()
            done.callback(SHUTTING_DOWN)

    def _close(self) -> None:
        self._stop_output()
        self.transport.loseConnection()

    def _stop_output(self) -> None:
        """Before a close: with a producer registered, a transport waits for
        it instead of closing once its buffer is flushed."""
        self._end_transfer()
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    # -- flow control (IPushProducer, driven by the transport's output buffer)

    def pauseProducing(self) -> None:
        self._output_full = True
        self._update()

    def resumeProducing(self) -> None:
        self._output_full = False
        self._run()

    def stopProducing(self) -> None:
        self._output_full = True
        self._end_transfer()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._update()

    def _update(self) -> None:
        """Handle commands only when nothing waits and the output has room.

        The socket is paused only once unhandled input piles up: pausing it at
        once would also stall a TLS handshake, during which TLS holds back
        our output (the greeting on an ssl: port).
        """
        self.paused = (
            self._shutting_down
            or self._output_full
            or self._waiting is not None
            or self._transfer is not None
        )
        reading = not (self.paused and len(self._buffer) >= MAX_BACKLOG)
        if reading != self._reading and not self._peer_closed and not self._lost:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _run(self) -> None:
        """Go on with what waits: the message being sent, then buffered commands."""
        if self._lost:
            return
        self._send_chunks()
        if self._shutting_down:
            self._stopped_if_done()
            return
        self._update()
        if self.paused or self._busyReceiving:  # else the loop we are called from goes on
            return
        self.dataReceived(b"")
        if self._peer_closed and not self.paused:
            self._end_of_input()

    def _send_chunks(self) -> None:
        keep_alive = getattr(self.transport, "resetTimeout", None)  # sending is activity
        while self._transfer is not None and not self._output_full:
            chunk = self._transfer.read()
            if not chunk:
                self._end_transfer()
                return
            self.transport.write(chunk)  # may pause us at once
            if keep_alive is not None:
                keep_alive()

    def _end_transfer(self) -> None:
        file, self._file, self._transfer = self._file, None, None
        if file is not None:
            file.close()

    def line_received(self, line: bytes) -> None:
        if self._sasl:
            self._sasl = False
            return self._guarded("AUTH", self._sasl_response, line)
        self.service_stats.handled += 1
        if len(line) + 2 > MAX_COMMAND:
            return self._err(b"command line too long (255 octets at most)")
        keyword, _, argument = line.partition(b" ")
        name = keyword.upper().decode("ascii", "replace")
        if name not in KNOWN:
            return self._err(b"unknown command")
        if name not in COMMANDS[self.state]:
            return self._err(b"%s is not valid in the %s state" % (name.encode(), self.state.encode()))
        return self._guarded(name, getattr(self, "do_" + name), argument)

    def _guarded(self, name: str, handler: Callable[[bytes], Any], argument: bytes) -> None:
        try:
            handler(argument)
        except Exception:
            log.failure("pop3: {peer}: error in {command}", peer=self.peer, command=name)
            self._err(b"[SYS/TEMP] internal error")

    # -- output

    def _ok(self, text: bytes = b"") -> None:
        self.transport.write(b"+OK " + text + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text: bytes) -> None:
        self.transport.write(b"-ERR " + text + b"\r\n")

    def _multiline(self, first: bytes, lines: Iterable[bytes]) -> None:
        body = b"".join(line + b"\r\n" for line in lines)
        self.transport.write(b"+OK " + first + b"\r\n" + body + b".\r\n")

    # -- AUTHORIZATION state

    @property
    def _login_allowed(self) -> bool:
        """With --pop3-require-tls, no login (USER/PASS, APOP, AUTH) before TLS."""
        return self.secure or not self.factory.require_tls

    def do_CAPA(self, argument: bytes) -> None:
        lines = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self._login_allowed:
            lines += [b"USER", b"SASL PLAIN"]
        if self.factory.tls is not None and not self.secure and self.state == AUTHORIZATION:
            lines.append(b"STLS")
        lines.append(b"IMPLEMENTATION sockproto-" + __version__.encode())
        self._multiline(b"capability list follows", lines)

    def do_STLS(self, argument: bytes) -> None:
        if self.factory.tls is None:
            return self._err(b"STLS is not available (no --tls-cert)")
        if self.secure:
            return self._err(b"TLS is already active")
        self._ok(b"begin TLS negotiation")
        # RFC 2595: nothing the client sent in plain text after STLS counts,
        # and what it said before (USER) is forgotten.
        self._buffer = b""
        self._user = None
        self.transport.startTLS(self.factory.tls)
        self.secure = True

    def _refuse_before_tls(self) -> bool:
        """The one answer USER, PASS, APOP and AUTH get before a required STLS,
        whatever their arguments."""
        if self._login_allowed:
            return False
        self._err(b"[AUTH] plaintext authentication disallowed before STLS")
        return True

    def do_USER(self, argument: bytes) -> None:
        if self._refuse_before_tls():
            return None
        words = argument.split()
        if len(words) != 1:
            return self._err(b"USER needs a name")
        self._user = words[0]
        return self._ok(b"send PASS")

    def do_PASS(self, argument: bytes) -> None:
        if self._refuse_before_tls():
            return None
        if self._user is None:
            return self._err(b"send USER first")
        user, self._user = self._user, None
        return self._login(UsernamePassword(user, argument), user)

    def do_APOP(self, argument: bytes) -> None:
        if self._refuse_before_tls():
            return None
        if not self.timestamp:
            return self._err(b"APOP is not offered on this connection (use USER/PASS or AUTH PLAIN)")
        words = argument.split()
        if len(words) != 2 or not _DIGEST.match(words[1]):
            return self._err(b"APOP needs a name and an MD5 digest")
        return self._login(APOPCredentials(self.timestamp, words[0], words[1].lower()), words[0])

    def do_AUTH(self, argument: bytes) -> None:
        words = argument.split()
        if not words:  # the pre-RFC 5034 way to ask for the mechanisms
            return self._multiline(b"SASL mechanisms follow", [b"PLAIN"] if self._login_allowed else [])
        if self._refuse_before_tls():
            return None
        if words[0].upper() != b"PLAIN":
            return self._err(b"unsupported SASL mechanism (PLAIN only)")
        if len(words) > 2:
            return self._err(b"AUTH PLAIN takes at most one initial response")
        if len(words) == 2:
            return self._sasl_response(words[1])
        self._sasl = True
        self.transport.write(b"+ \r\n")
        return None

    def _sasl_response(self, line: bytes) -> None:
        line = line.strip()
        if line == b"*":
            return self._err(b"AUTH cancelled")
        if line in (b"", b"="):
            # RFC 5034: an empty response (``=`` as the initial response, an
            # empty line after ``+``) names no one: a failed login like any other.
            return self._failed_at_once(b"")
        try:
            decoded = binascii.a2b_base64(line, strict_mode=True)
        except binascii.Error:
            decoded = b""
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            return self._err(b"malformed AUTH PLAIN response")
        authzid, user, password = parts
        if authzid and authzid != user:  # acting as another user: not here
            return self._failed_at_once(user)
        return self._login(UsernamePassword(user, password), user)

    def _failed_at_once(self, user: bytes) -> None:
        """A login that fails without a check: in flight, and delayed, like any."""
        if self._take_slot():
            self._failed(user)

    def _take_slot(self) -> bool:
        """A place among this address's logins in flight (FailureDelays.begin);
        without one the login is refused now, its password unchecked."""
        self._slot = self.factory.failed_logins.begin(login_key(self.transport))
        if self._slot is not None:
            return True
        self.service_stats.limit_hit("logins_in_flight")
        log.info(
            "pop3: {peer}: refused a login: too many logins in progress from its address", peer=self.peer
        )
        self._err(b"[AUTH] too many logins in progress from your address")
        return False

    def _free_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.free()

    def _login(self, credentials: Any, user: bytes) -> None:
        if not self._take_slot():
            return
        checked = self.factory.portal.login(credentials, None, IMaildrop)
        # Until it has an answer, the commands pipelined after wait. Not
        # ``checked.called``: that is true already when the checker answered
        # and the mailbox is still being opened in a thread.
        self._waiting = checked
        self._update()
        checked.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(user,), errbackArgs=(user,))
        checked.addErrback(self._unexpected, "login")

    def _logged_in(self, result: tuple[Any, Maildrop, Callable], user: bytes) -> None:
        _, drop, _ = result
        self._waiting = None
        if self._lost:
            drop.close()
            return
        # The mailbox stays locked for the answer, and is closed if it never comes.
        self._answer_later(Login.SUCCEEDED, user, lambda: self._welcome(drop), drop.close)

    def _welcome(self, drop: Maildrop) -> None:
        self._waiting = None
        self.maildrop = drop
        self.state = TRANSACTION
        count, octets = drop.stat()
        self.service_stats.counters["logins"] += 1
        log.info(
            "pop3: {peer} logged in as {user}: {count} messages, {octets} octets",
            peer=self.peer,
            user=loggable(drop.user),
            count=count,
            octets=octets,
        )
        self._ok(b"%s's maildrop has %d messages (%d octets)" % (drop.user.encode(), count, octets))
        self._run()

    def _login_failed(self, failure: Failure, user: bytes) -> None:
        self._waiting = None
        if self._lost:
            return
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            return self._failed(user)
        if failure.check(MailboxInUseError):
            self.service_stats.counters["mailbox_in_use"] += 1
            log.info("pop3: {peer}: mailbox of {user} is in use", peer=self.peer, user=loggable(user))
            reply = b"[IN-USE] mailbox is locked by another session"
        elif failure.check(OSError):
            log.error(
                "pop3: {peer}: cannot open the mailbox of {user}: {error}",
                peer=self.peer,
                user=loggable(user),
                error=str(failure.value),
            )
            reply = b"[SYS/TEMP] cannot open the mailbox"
        else:
            log.failure(
                "pop3: {peer}: cannot open the mailbox of {user}",
                failure,
                peer=self.peer,
                user=loggable(user),
            )
            reply = b"[SYS/TEMP] cannot open the mailbox"
        # Only a right password gets here: from a penalized host, it waits too.
        return self._answer_later(Login.REFUSED, user, lambda: self._refused(reply))

    def _refused(self, reply: bytes) -> None:
        self._waiting = None
        self._err(reply)
        self._run()

    def _failed(self, user: bytes) -> None:
        """A wrong name or password: counted against this host."""
        self.service_stats.counters["login_failures"] += 1
        self._answer_later(Login.FAILED, user, self._answer_failed)

    def _answer_later(
        self,
        outcome: Login,
        user: bytes,
        answer: Callable[[], object],
        release: Callable[[], object] | None = None,
    ) -> None:
        """Answer a login once this host's penalty is over (FailureDelays,
        at most MAX_AUTH_DELAY, whether the password was right or not), the
        commands after it held meanwhile; others are served. Unanswered if
        the peer has hung up (no one would read it) or the server stops (the
        shutdown line answers it, and says nothing about the password)."""
        slot, self._slot = self._slot, None  # the answer frees it, or its cancel
        assert slot is not None
        pending = self.factory.failed_logins.answer_later(
            slot, self.factory.auth_delay, outcome, answer, release
        )
        if pending is None:
            if outcome is Login.FAILED:
                log.info("pop3: {peer}: login failed for {user}", peer=self.peer, user=loggable(user))
            return
        if self._shutting_down or self._peer_closed:
            pending.cancel()
            log.info(
                "pop3: {peer}: login {outcome} for {user} (not answered: {why})",
                peer=self.peer,
                outcome=outcome.value,
                user=loggable(user),
                why="shutting down" if self._shutting_down else "the client hung up",
            )
            if self._shutting_down:
                self._run()
            else:
                self._close()
            return
        log.info(
            "pop3: {peer}: login {outcome} for {user} (answer delayed {delay:g} s)",
            peer=self.peer,
            outcome=outcome.value,
            user=loggable(user),
            delay=pending.seconds,
        )
        self._waiting = pending
        self._update()

    def _answer_failed(self) -> None:
        self._waiting = None
        self._err(b"[AUTH] invalid user name or password")
        self._run()

    def _unexpected(self, failure: Failure, what: str) -> None:
        self._waiting = None
        self._free_slot()
        log.failure("pop3: {peer}: error in {what}", failure, peer=self.peer, what=what)
        if not self._lost:
            self._err(b"[SYS/TEMP] internal error")
            self._run()

    # -- TRANSACTION state

    def _message(self, word: bytes) -> tuple[int, Any] | None:
        """The message a number names, or None after saying why not."""
        number = _number(word)
        if number is None:
            self._err(b"not a message number")
            return None
        assert self.maildrop is not None
        message = self.maildrop.get(number)
        if message is None:
            deleted = 1 <= number <= len(self.maildrop.messages)
            self._err(b"message %d is deleted" % number if deleted else b"no such message")
            return None
        return number, message

    def do_STAT(self, argument: bytes) -> None:
        assert self.maildrop is not None
        self._ok(b"%d %d" % self.maildrop.stat())

    def do_LIST(self, argument: bytes) -> None:
        assert self.maildrop is not None
        words = argument.split()
        if not words:
            count, octets = self.maildrop.stat()
            lines = (b"%d %d" % (n, m.size) for n, m in self.maildrop.visible())
            return self._multiline(b"%d messages (%d octets)" % (count, octets), lines)
        if len(words) > 1:
            return self._err(b"LIST takes at most one message number")
        found = self._message(words[0])
        if found is not None:
            self._ok(b"%d %d" % (found[0], found[1].size))
        return None

    def do_UIDL(self, argument: bytes) -> None:
        assert self.maildrop is not None
        words = argument.split()
        if not words:
            lines = (b"%d %s" % (n, m.uid.encode()) for n, m in self.maildrop.visible())
            return self._multiline(b"unique-id listing follows", lines)
        if len(words) > 1:
            return self._err(b"UIDL takes at most one message number")
        found = self._message(words[0])
        if found is not None:
            self._ok(b"%d %s" % (found[0], found[1].uid.encode()))
        return None

    def do_RETR(self, argument: bytes) -> None:
        words = argument.split()
        if len(words) != 1:
            return self._err(b"RETR needs a message number")
        found = self._message(words[0])
        if found is not None:
            self._send(found[1], b"%d octets" % found[1].size, None)
            self.service_stats.counters["retrieved"] += 1
        return None

    def do_TOP(self, argument: bytes) -> None:
        words = argument.split()
        lines = _number(words[1]) if len(words) == 2 else None
        if lines is None:
            return self._err(b"TOP needs a message number and a number of lines")
        found = self._message(words[0])
        if found is not None:
            self._send(found[1], b"top of message follows", lines)
        return None

    def _send(self, message: Any, first: bytes, body_lines: int | None) -> None:
        assert self.maildrop is not None
        try:
            file = self.maildrop.open_message(message)
        except FileNotFoundError:
            return self._err(b"[SYS/PERM] message is gone")
        except OSError as error:
            # A file name in a Maildir is whatever the deliverer chose: escaped too.
            # The client can ask again and again: a client's line (peer=), in the budget.
            log.warn(
                "pop3: cannot read {path} (for {peer}, mailbox of {user}): {error}",
                peer=self.peer,
                path=loggable(message.path),
                user=loggable(self.maildrop.user),
                error=loggable(str(error)),
            )
            return self._err(b"[SYS/TEMP] cannot read the message")
        self._ok(first)
        self._file, self._transfer = file, WireReader(file, body_lines)
        self._run()
        return None

    def do_DELE(self, argument: bytes) -> None:
        words = argument.split()
        if len(words) != 1:
            return self._err(b"DELE needs a message number")
        found = self._message(words[0])
        if found is not None:
            found[1].deleted = True
            self._ok(b"message %d deleted" % found[0])
        return None

    def do_NOOP(self, argument: bytes) -> None:
        self._ok()

    def do_RSET(self, argument: bytes) -> None:
        assert self.maildrop is not None
        self.maildrop.reset()
        self._ok(b"maildrop has %d messages (%d octets)" % self.maildrop.stat())

    def do_QUIT(self, argument: bytes) -> None:
        drop, self.maildrop = self.maildrop, None
        self.state = UPDATE
        if drop is None:
            self._ok(b"sockproto POP3 server signing off")
        else:
            try:
                removed, failed = drop.commit()
            finally:
                drop.close()
            self.service_stats.counters["deleted"] += removed
            log.info(
                "pop3: {peer}: {user} quit; {removed} messages deleted",
                peer=self.peer,
                user=loggable(drop.user),
                removed=removed,
            )
            if failed:
                self._err(b"[SYS/TEMP] some deleted messages not removed")
            else:
                self._ok(b"sockproto POP3 server signing off (%d messages deleted)" % removed)
        self._close()


class Pop3Factory(Factory):
    protocol = Pop3Protocol

    def __init__(
        self,
        portal: Portal,
        stats: ServiceStats,
        clock: Any,
        *,
        root: Path,
        tls: Any = None,
        require_tls: bool = False,
        auth_delay: float = 1.0,
        logins_in_flight: int = LOGINS_IN_FLIGHT,
        anyone: bool = False,
        warn_plaintext: bool = False,
    ) -> None:
        self.portal = portal
        self.stats = stats
        self.clock = clock
        self.root = root
        self.tls = tls
        self.require_tls = require_tls
        self.anyone = anyone
        self.warn_plaintext = warn_plaintext
        self.auth_delay = auth_delay
        self.failed_logins = suite_logins(clock, logins_in_flight)  # shared with chat: the same users
        # For the APOP timestamp, a msg-id: <random.time@host>.
        self.hostname = (
            re.sub(rb"[^A-Za-z0-9.-]", b"", socket.gethostname().encode("ascii", "ignore")) or b"localhost"
        )

    def buildProtocol(self, addr: Any) -> Pop3Protocol:
        protocol = Pop3Protocol()
        protocol.factory = self
        protocol.service_stats = self.stats
        return protocol

    def startFactory(self) -> None:
        log.info("pop3: Maildirs under {root}", root=str(self.root))
        if self.anyone:
            log.warn(
                "pop3: no --auth: any user name and password is accepted and gets a "
                "mailbox (a local test server; listening on loopback only)"
            )
        if self.warn_plaintext:
            log.warn("pop3: passwords may cross the network in clear text; consider --pop3-require-tls")


def tls_options(cert: str, key: str) -> Any:
    """A TLS server context from PEM files; the certificate file may hold the
    chain after the server's certificate, and the key if no key file is given.

    Every way these can be wrong is found here, at start, and said in one
    line naming the option and the file: a file missing or unreadable, one
    without the PEM block expected, a key that does not belong to the
    certificate.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
    from OpenSSL import SSL
    from twisted.internet.ssl import CertificateOptions

    def read(option: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(f"{option}: cannot read {path}: {error.strerror}") from None

    cert_pem = read("--tls-cert", cert)
    key_option, key_path = ("--tls-key", key) if key else ("--tls-cert", cert)
    key_pem = read(key_option, key_path)
    try:
        chain = (
            x509.load_pem_x509_certificates(cert_pem) if b"-----BEGIN CERTIFICATE-----" in cert_pem else []
        )
    except ValueError:
        chain = []
    if not chain:
        raise ConfigError(f"--tls-cert: no PEM certificate in {cert}")
    try:
        private = load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted: twistd could not ask for the passphrase
        raise ConfigError(
            f"{key_option}: the private key in {key_path} is encrypted; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{key_option}: no PEM private key in {key_path}") from None

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(private.public_key()) != spki(chain[0].public_key()):
        raise ConfigError(
            f"{key_option}: the private key in {key_path} does not belong to the certificate in {cert}"
        )
    try:
        options = CertificateOptions(privateKey=private, certificate=chain[0], extraCertChain=chain[1:])
        options.getContext()
    except (ValueError, TypeError, SSL.Error) as error:
        raise ConfigError(
            f"--tls-cert/--tls-key: cannot use {cert}: {error or type(error).__name__}"
        ) from None
    return options


def check_maildir_root(root: Path) -> None:
    """The Maildir root exists (it is made if missing) and this process can
    make mailboxes in it: an operator learns that at start, not from the
    first client's failed login. Run after twistd drops privileges."""
    if root.exists() and not root.is_dir():
        raise StartupError(f"pop3: the Maildir root {root} (--maildir) is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StartupError(
            f"pop3: cannot make the Maildir root {root} (--maildir): {error.strerror}"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise StartupError(
            f"pop3: the Maildir root {root} (--maildir) is not writable by the user the server runs as "
            f"(uid {os.getuid()})"
        )


def build(settings: Settings, stats: Stats, reactor: Any) -> Listener | None:
    """The POP3 service as configured, or None when its port is off."""
    pop3 = settings.pop3
    suite = settings.suite
    # TLS files are checked even when POP3 is off: an operator who gave them
    # expects TLS, and a typo must not pass silently.
    tls = tls_options(suite.tls_cert, suite.tls_key) if suite.tls_cert else None
    description = stream_description(pop3.port, suite.interface, (suite.tls_cert, suite.tls_key))
    if description is None:
        return None
    if not pop3.maildir:
        raise ConfigError("--maildir: must name a folder")
    checkers = auth.checkers(settings)
    beyond_loopback = not loopback_only(description)
    if not checkers and beyond_loopback:
        raise ConfigError(
            f"pop3: without --auth any password is accepted, so POP3 listens on loopback only, "
            f"not {description}; add --auth (e.g. --auth file:users.txt) or listen on 127.0.0.1"
        )
    implicit_tls = description.startswith("ssl:")
    if pop3.require_tls and tls is None and not implicit_tls:
        raise ConfigError("--pop3-require-tls: needs --tls-cert and --tls-key (for STLS) or an ssl: endpoint")
    root = Path(os.path.abspath(pop3.maildir))
    service_stats = stats.service("pop3", "commands")
    factory = Pop3Factory(
        Portal(MaildirRealm(root), [auth.any_of(checkers) if checkers else AnyLogin()]),
        service_stats,
        reactor,
        root=root,
        tls=tls,
        require_tls=pop3.require_tls,
        auth_delay=pop3.auth_delay,
        logins_in_flight=suite.logins_in_flight,
        anyone=not checkers,
        warn_plaintext=bool(checkers) and beyond_loopback and not (pop3.require_tls or implicit_tls),
    )
    policy = ConnectionPolicy(
        max_clients=pop3.max_clients,
        overflow_message=b"-ERR [SYS/TEMP] too many sessions, try again later\r\n",
        idle_timeout=pop3.idle_timeout,
    )
    return stream_listener(
        "pop3",
        pop3.port,
        suite,
        factory,
        policy,
        service_stats,
        reactor,
        prepare=lambda: check_maildir_root(root),
    )

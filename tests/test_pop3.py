"""The POP3 protocol, driven through the suite's connection guard with
StringTransport and a Clock. Tests named ``test_twisted_*`` are regressions
for twisted.mail.pop3 breakages listed in issue 6."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sockproto import __version__, auth, config, maildir
from sockproto.limits import ConnectionPolicy, GuardedFactory
from sockproto.maildir import IMaildrop, MailboxInUseError, Maildir, Maildrop
from sockproto.pop3 import MAX_LINE, AnyLogin, MaildirRealm, Pop3Factory, Pop3Protocol
from sockproto.stats import Stats
from tests.support import DEADLINE, temp_dir

USERS = "memory:alice:secret:bob:hunter2"
CAPA = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"USER", b"SASL PLAIN"]
IMPLEMENTATION = b"IMPLEMENTATION sockproto-" + __version__.encode()


@implementer(ITLSTransport)
class FlowTransport(StringTransport):
    """A StringTransport with a real transport's flow control: a streaming
    producer is paused when more than ``limit`` bytes are unread, and resumed
    when the client reads (:meth:`read`). Records startTLS."""

    limit = 64 * 1024
    tls: Any = None
    producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        unread = len(self.value())
        if self.producer is not None and self.streaming and not self.producer_paused and unread > self.limit:
            self.producer_paused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        """Everything the server sends until it has nothing more for now."""
        out = []
        while True:
            out.append(self.value())
            self.clear()
            if self.producer is None or not self.producer_paused:
                return b"".join(out)
            self.producer_paused = False
            self.producer.resumeProducing()

    def startTLS(self, context: Any) -> None:
        self.tls = context
        self.before_tls = self.value()


class Connection:
    """One client: the guard wrapper over a StringTransport."""

    def __init__(self, server: Server, host: str = "10.0.0.1") -> None:
        self.server = server
        self.lost = False
        self.transport = FlowTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.guard = server.guarded.buildProtocol(self.transport.getPeer())
        self.guard.makeConnection(self.transport)
        self.protocol: Pop3Protocol = self.guard.wrappedProtocol
        self.greeting = self.take()

    def send(self, data: bytes) -> bytes:
        self.guard.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        return self.transport.read()

    def take_some(self) -> bytes:
        """What was written so far, without letting a paused producer go on."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def login(self, user: bytes = b"alice", password: bytes = b"secret") -> bytes:
        return self.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n")

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.guard.connectionLost(Failure(ConnectionError("gone")))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@implementer(ICredentialsChecker)
class SlowChecker:
    """Answers when the test says so (a login checked in a thread, say)."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        self.pending: Deferred[Any] = Deferred()
        return self.pending


class Server:
    def __init__(
        self,
        test: SynchronousTestCase,
        checkers: Any = None,
        tls: Any = None,
        require_tls: bool = False,
        idle_timeout: float = 600.0,
        run: Any = maybeDeferred,  # opening a mailbox: at once, unless a test wants the thread pool
    ) -> None:
        # In a folder of its own, so a test can check nothing was made beside it.
        self.root = Path(temp_dir(test)) / "mail"
        self.root.mkdir()
        self.clock = Clock()
        self.stats = Stats(self.clock.seconds).service("pop3", "commands")
        if checkers is None:
            checkers = auth.checkers(config.build({("suite", "auth"): ([USERS], "test")}))
        self.factory = Pop3Factory(
            Portal(MaildirRealm(self.root, run=run), checkers),
            self.stats,
            self.clock,
            root=self.root,
            tls=tls,
            require_tls=require_tls,
        )
        self.guarded = GuardedFactory(
            self.factory, ConnectionPolicy(10, idle_timeout=idle_timeout), self.stats, self.clock
        )
        self.test = test

    def connect(self, host: str = "10.0.0.1") -> Connection:
        connection = Connection(self, host)
        self.test.addCleanup(connection.lose)
        return connection

    def deliver(self, data: bytes, user: str = "alice") -> Path:
        return Maildir(self.root / user).deliver(io.BytesIO(data))

    def messages(self, user: str = "alice") -> list[str]:
        return sorted(os.listdir(self.root / user / "new"))


class GreetingAndCapabilityTests(SynchronousTestCase):
    def test_greeting_carries_an_apop_timestamp(self) -> None:
        client = Server(self).connect()
        self.assertRegex(client.greeting, rb"^\+OK sockproto POP3 server ready <[0-9a-f]+\.\d+@[^>]+>\r\n$")
        self.assertNotEqual(client.greeting, Server(self).connect().greeting)

    def test_twisted_capa_lists_what_is_true(self) -> None:
        # twisted.mail said PIPELINE and joke tags, never RESP-CODES.
        client = Server(self).connect()
        self.assertEqual(
            client.send(b"CAPA\r\n"),
            b"+OK capability list follows\r\n"
            + b"".join(c + b"\r\n" for c in [*CAPA, IMPLEMENTATION])
            + b".\r\n",
        )
        client.login()
        self.assertIn(b"SASL PLAIN\r\n", client.send(b"CAPA\r\n"))

    def test_stls_is_listed_when_tls_is_configured(self) -> None:
        client = Server(self, tls=object()).connect()
        self.assertIn(b"\r\nSTLS\r\n", client.send(b"CAPA\r\n"))

    def test_commands_are_case_insensitive(self) -> None:
        client = Server(self).connect()
        self.assertTrue(client.send(b"capa\r\n").startswith(b"+OK"))


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(self)
        self.client = self.server.connect()

    def test_transaction_commands_need_a_login(self) -> None:
        for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 0", b"UIDL"):
            answer = self.client.send(command + b"\r\n")
            self.assertEqual(
                answer, b"-ERR %s is not valid in the AUTHORIZATION state\r\n" % command.split()[0]
            )
        self.assertFalse(self.client.closed)

    def test_authorization_commands_after_login(self) -> None:
        self.client.login()
        for command in (b"USER bob", b"PASS x", b"APOP bob " + b"0" * 32, b"AUTH PLAIN", b"STLS"):
            self.assertTrue(self.client.send(command + b"\r\n").startswith(b"-ERR "), command)

    def test_unknown_and_empty_commands(self) -> None:
        self.assertEqual(self.client.send(b"FOO\r\n"), b"-ERR unknown command\r\n")
        self.assertEqual(self.client.send(b"\r\n"), b"-ERR unknown command\r\n")
        self.assertEqual(self.client.send(b"\xff\xfe\r\n"), b"-ERR unknown command\r\n")

    def test_quit_before_login(self) -> None:
        self.assertEqual(self.client.send(b"QUIT\r\n"), b"+OK sockproto POP3 server signing off\r\n")
        self.assertTrue(self.client.closed)

    def test_command_line_limit(self) -> None:
        # RFC 2449: 255 octets with CRLF are fine; longer gets -ERR, and the
        # session goes on.
        name = b"a" * (255 - len(b"USER \r\n"))
        self.assertEqual(self.client.send(b"USER " + name + b"\r\n"), b"+OK send PASS\r\n")
        self.assertEqual(
            self.client.send(b"USER " + name + b"x\r\n"),
            b"-ERR command line too long (255 octets at most)\r\n",
        )
        self.assertFalse(self.client.closed)

    def test_line_beyond_the_buffer_limit_ends_the_session(self) -> None:
        self.assertEqual(self.client.send(b"x" * (MAX_LINE + 1)), b"-ERR line too long\r\n")
        self.assertTrue(self.client.closed)


class LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(self)
        self.server.deliver(b"Subject: one\n\nhello\n")
        self.client = self.server.connect()

    def test_user_pass(self) -> None:
        self.assertEqual(self.client.send(b"USER alice\r\n"), b"+OK send PASS\r\n")
        self.assertEqual(
            self.client.send(b"PASS secret\r\n"), b"+OK alice's maildrop has 1 messages (23 octets)\r\n"
        )
        self.assertEqual(self.server.stats.counters["logins"], 1)

    def test_password_may_contain_spaces(self) -> None:
        server = Server(
            self, checkers=auth.checkers(config.build({("suite", "auth"): (["memory:carol:a b "], "t")}))
        )
        client = server.connect()
        self.assertIn(b"+OK carol's maildrop", client.login(b"carol", b"a b "))

    def test_pass_needs_user_first(self) -> None:
        self.assertEqual(self.client.send(b"PASS secret\r\n"), b"-ERR send USER first\r\n")

    def test_twisted_bare_user_is_an_error_not_a_crash(self) -> None:
        self.assertEqual(self.client.send(b"USER\r\n"), b"-ERR USER needs a name\r\n")
        self.assertEqual(self.client.send(b"USER a b\r\n"), b"-ERR USER needs a name\r\n")
        self.assertFalse(self.client.closed)

    def test_failed_login_answers_after_a_growing_delay_per_host(self) -> None:
        self.assertEqual(self.client.login(b"alice", b"wrong"), b"+OK send PASS\r\n")
        self.server.clock.advance(0.99)
        self.assertEqual(self.client.take(), b"")
        # meanwhile another client is served at once
        other = self.server.connect(host="10.0.0.2")
        self.assertIn(b"+OK alice's maildrop", other.login())
        other.send(b"QUIT\r\n")
        self.server.clock.advance(0.01)
        self.assertEqual(self.client.take(), b"-ERR [AUTH] invalid user name or password\r\n")
        # the second failure from the same host waits twice as long
        self.client.login(b"nobody", b"x")
        self.server.clock.advance(1.99)
        self.assertEqual(self.client.take(), b"")
        self.server.clock.advance(0.01)
        self.assertEqual(self.client.take(), b"-ERR [AUTH] invalid user name or password\r\n")
        self.assertEqual(self.server.stats.counters["login_failures"], 2)

    def test_commands_pipelined_after_a_failed_login_wait_for_its_answer(self) -> None:
        self.client.send(b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
        self.server.clock.advance(1)
        self.assertEqual(
            self.client.take(), b"-ERR [AUTH] invalid user name or password\r\n+OK send PASS\r\n"
        )
        self.server.clock.advance(1)  # the right password waits the host's penalty too
        self.assertEqual(
            self.client.take(), b"+OK alice's maildrop has 1 messages (23 octets)\r\n+OK 1 23\r\n"
        )

    def test_disconnect_while_the_answer_is_delayed(self) -> None:
        self.client.login(b"alice", b"wrong")
        self.client.lose()
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_twisted_apop_works(self) -> None:
        # twisted.mail compared a str digest with bytes: APOP always failed.
        stamp = self.client.greeting.split()[-1]
        digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
        self.assertEqual(
            self.client.send(b"APOP alice " + digest + b"\r\n"),
            b"+OK alice's maildrop has 1 messages (23 octets)\r\n",
        )

    def test_apop_wrong_digest_and_malformed(self) -> None:
        self.assertEqual(self.client.send(b"APOP alice\r\n"), b"-ERR APOP needs a name and an MD5 digest\r\n")
        self.assertEqual(
            self.client.send(b"APOP alice xyz\r\n"), b"-ERR APOP needs a name and an MD5 digest\r\n"
        )
        self.client.send(b"APOP alice " + b"0" * 32 + b"\r\n")
        self.server.clock.advance(1)
        self.assertEqual(self.client.take(), b"-ERR [AUTH] invalid user name or password\r\n")

    def test_auth_plain_with_initial_response(self) -> None:
        token = base64.b64encode(b"\0alice\0secret")
        self.assertIn(b"+OK alice's maildrop", self.client.send(b"AUTH PLAIN " + token + b"\r\n"))

    def test_auth_plain_with_continuation_and_authzid(self) -> None:
        self.assertEqual(self.client.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
        token = base64.b64encode(b"alice\0alice\0secret")
        self.assertIn(b"+OK alice's maildrop", self.client.send(token + b"\r\n"))

    def test_auth_plain_for_another_identity_is_refused(self) -> None:
        self.client.send(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret") + b"\r\n")
        self.server.clock.advance(1)
        self.assertEqual(self.client.take(), b"-ERR [AUTH] invalid user name or password\r\n")

    def test_auth_plain_empty_response_is_a_failed_login(self) -> None:
        # RFC 5034: "=" is an empty initial response, an empty line an empty
        # continuation; either names no one, so it fails like a wrong password.
        refused = b"-ERR [AUTH] invalid user name or password\r\n"
        self.assertEqual(self.client.send(b"AUTH PLAIN =\r\n"), b"")
        self.server.clock.advance(1)
        self.assertEqual(self.client.take(), refused)
        self.assertEqual(self.client.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.client.send(b"\r\n")
        self.server.clock.advance(2)
        self.assertEqual(self.client.take(), refused)
        self.assertEqual(self.server.stats.counters["login_failures"], 2)
        self.assertEqual(self.server.factory.failed_logins.failures("10.0.0.1"), 2)
        # Counted like any failure: the right password from here waits the penalty.
        self.assertEqual(self.client.login(), b"+OK send PASS\r\n")
        self.server.clock.advance(1.9)
        self.assertEqual(self.client.take(), b"")
        self.server.clock.advance(0.1)
        self.assertIn(b"+OK alice's maildrop", self.client.take())

    def test_auth_plain_cancel_and_garbage(self) -> None:
        self.client.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.client.send(b"*\r\n"), b"-ERR AUTH cancelled\r\n")
        self.client.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.client.send(b"not base64!\r\n"), b"-ERR malformed AUTH PLAIN response\r\n")
        self.assertEqual(
            self.client.send(b"AUTH PLAIN " + base64.b64encode(b"no nuls") + b"\r\n"),
            b"-ERR malformed AUTH PLAIN response\r\n",
        )
        self.assertEqual(
            self.client.send(b"AUTH CRAM-MD5\r\n"), b"-ERR unsupported SASL mechanism (PLAIN only)\r\n"
        )
        self.assertEqual(self.client.send(b"AUTH\r\n"), b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")

    def test_mailbox_names_cannot_escape_the_root(self) -> None:
        server = Server(self, checkers=[AnyLogin()])
        client = server.connect()
        client.login(b"../../etc", b"x")
        server.clock.advance(1)
        self.assertEqual(client.take(), b"-ERR [AUTH] invalid user name or password\r\n")
        self.assertEqual(os.listdir(server.root), [])

    def test_without_auth_anyone_gets_a_mailbox_on_demand(self) -> None:
        server = Server(self, checkers=[AnyLogin()])
        client = server.connect()
        self.assertEqual(
            client.login(b"zoe", b"any"), b"+OK send PASS\r\n+OK zoe's maildrop has 0 messages (0 octets)\r\n"
        )
        self.assertTrue((server.root / "zoe" / "new").is_dir())
        stamp = client.greeting.split()[-1]
        other = server.connect()
        digest = hashlib.md5(other.greeting.split()[-1] + b"x").hexdigest().encode()
        self.assertIn(b"+OK yan's maildrop", other.send(b"APOP yan " + digest + b"\r\n"))
        self.assertTrue(stamp)


class InUseTests(SynchronousTestCase):
    def test_second_session_gets_in_use_until_the_first_ends(self) -> None:
        server = Server(self)
        first = server.connect()
        first.login()
        second = server.connect()
        self.assertEqual(
            second.login(), b"+OK send PASS\r\n-ERR [IN-USE] mailbox is locked by another session\r\n"
        )
        self.assertEqual(server.stats.counters["mailbox_in_use"], 1)
        first.lose()  # however the first ends, the lock goes
        self.assertIn(b"+OK alice's maildrop", second.login())


def eventually(predicate: Any, what: str) -> Deferred[None]:
    """Fires once ``predicate()`` holds, the reactor running meanwhile; fails
    after DEADLINE seconds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + DEADLINE

    @inlineCallbacks
    def poll() -> Any:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {DEADLINE} s waiting for {what}")
            yield deferLater(reactor, 0.01, lambda: None)

    return poll()


class LoginSizingTests(unittest.TestCase):
    """A login reads every message without a size tag to count its CRLF
    octets (seconds for a big Maildir): in the reactor's thread pool, while
    the reactor serves everyone else. Here the sizing waits for the test."""

    def setUp(self) -> None:
        self.server = Server(self, run=deferToThread)
        new = Maildir(self.server.root / "alice").create().path / "new"
        (new / "1.untagged").write_bytes(b"Subject: big\n\n" + b"line\n" * 1000)  # 16 + 6000 as CRLF
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)
        self.sized_in_reactor_thread: list[bool] = []
        measure = maildir.wire_size

        def held(file: Any, chunk: int = maildir.CHUNK) -> int:
            in_reactor = isInIOThread()
            self.sized_in_reactor_thread.append(in_reactor)
            if not in_reactor:  # (in the reactor thread it would wait for itself)
                self.gate.wait(DEADLINE)
            return measure(file, chunk)

        self.patch(maildir, "wire_size", held)

    def unlocked(self) -> bool:
        try:
            Maildrop.open(self.server.root, "alice").close()
        except MailboxInUseError:
            return False
        return True

    @inlineCallbacks
    def test_others_are_served_while_a_login_sizes_its_maildir(self) -> Any:
        client = self.server.connect()
        self.assertEqual(client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\n"), b"+OK send PASS\r\n")
        yield eventually(lambda: self.sized_in_reactor_thread, "the sizing to start")
        self.assertEqual(self.sized_in_reactor_thread, [False])
        other = self.server.connect("10.0.0.2")
        other.send(b"USER bob\r\nPASS hunter2\r\n")
        yield eventually(lambda: b"bob's maildrop" in other.transport.value(), "bob's login")
        self.assertEqual(client.take(), b"")  # alice's login, and the STAT after it, wait
        self.gate.set()
        yield eventually(lambda: client.transport.value().count(b"\r\n") == 2, "alice's answers")
        self.assertEqual(
            client.take(), b"+OK alice's maildrop has 1 messages (6016 octets)\r\n+OK 1 6016\r\n"
        )

    @inlineCallbacks
    def test_a_session_lost_while_sizing_releases_the_mailbox(self) -> Any:
        client = self.server.connect()
        client.login()
        yield eventually(lambda: self.sized_in_reactor_thread, "the sizing to start")
        client.lose()
        self.gate.set()
        yield eventually(self.unlocked, "the mailbox lock to be released")
        self.assertEqual(client.take(), b"")
        self.assertEqual(self.server.stats.counters["logins"], 0)

    @inlineCallbacks
    def test_a_login_cancelled_while_sizing_releases_the_mailbox(self) -> Any:
        opening = MaildirRealm(self.server.root).requestAvatar(b"alice", None, IMaildrop)
        yield eventually(lambda: self.sized_in_reactor_thread, "the sizing to start")
        opening.cancel()
        self.failureResultOf(opening, CancelledError)
        self.gate.set()
        yield eventually(self.unlocked, "the mailbox lock to be released")


class TransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(self)
        self.server.deliver(b"Subject: one\n\nhello\n")  # 23 octets as CRLF
        self.server.deliver(b"Subject: two\r\n\r\n.dot\r\nbye\r\n")  # 27
        self.server.deliver(b"Subject: three\n\nx")  # 21 with the added CRLF
        self.client = self.server.connect()
        self.client.login()

    def test_stat(self) -> None:
        self.assertEqual(self.client.send(b"STAT\r\n"), b"+OK 3 71\r\n")

    def test_twisted_list_sizes_are_crlf_sizes(self) -> None:
        # twisted.mail listed LF sizes, so clients saw size mismatches.
        self.assertEqual(
            self.client.send(b"LIST\r\n"), b"+OK 3 messages (71 octets)\r\n1 23\r\n2 27\r\n3 21\r\n.\r\n"
        )
        for number in (1, 2, 3):
            answer = self.client.send(b"RETR %d\r\n" % number)
            size = int(self.client.send(b"LIST %d\r\n" % number).split()[2])
            body = answer.split(b"\r\n", 1)[1][: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
            self.assertEqual(len(body), size)

    def test_list_one_and_errors(self) -> None:
        self.assertEqual(self.client.send(b"LIST 2\r\n"), b"+OK 2 27\r\n")
        self.assertEqual(self.client.send(b"LIST 999\r\n"), b"-ERR no such message\r\n")
        self.assertEqual(self.client.send(b"LIST 0\r\n"), b"-ERR no such message\r\n")
        self.assertEqual(self.client.send(b"LIST -1\r\n"), b"-ERR not a message number\r\n")
        self.assertEqual(self.client.send(b"LIST 1 2\r\n"), b"-ERR LIST takes at most one message number\r\n")
        self.assertFalse(self.client.closed)

    def test_message_numbers_of_any_length(self) -> None:
        # RFC 1939 sets no limit: a number past the mailbox is "no such
        # message" however many digits it has (Dovecot's answer too).
        self.assertEqual(self.client.send(b"LIST 0000000002\r\n"), b"+OK 2 27\r\n")
        for command in (
            b"RETR 99999999999999",
            b"LIST " + b"9" * 240,
            b"TOP 4294967297 0",
            b"DELE 10000000000",
            b"UIDL 2147483648",
        ):
            self.assertEqual(self.client.send(command + b"\r\n"), b"-ERR no such message\r\n", command)
        self.assertEqual(self.client.send(b"STAT\r\n"), b"+OK 3 71\r\n")

    def test_top_with_a_huge_line_count_sends_the_whole_message(self) -> None:
        whole = b"+OK top of message follows\r\nSubject: two\r\n\r\n..dot\r\nbye\r\n.\r\n"
        self.assertEqual(self.client.send(b"TOP 2 2147483647\r\n"), whole)
        self.assertEqual(self.client.send(b"TOP 2 " + b"9" * 200 + b"\r\n"), whole)

    def test_twisted_uidl_n_includes_the_number(self) -> None:
        whole = self.client.send(b"UIDL\r\n").split(b"\r\n")[1:-2]
        self.assertEqual([line.split()[0] for line in whole], [b"1", b"2", b"3"])
        self.assertEqual(self.client.send(b"UIDL 2\r\n"), b"+OK " + whole[1] + b"\r\n")

    def test_twisted_malformed_arguments_get_err_not_a_dropped_connection(self) -> None:
        # DELE abc and TOP 1 crashed twisted.mail's error handler.
        cases = {
            b"DELE abc": b"-ERR not a message number",
            b"DELE": b"-ERR DELE needs a message number",
            b"TOP 1": b"-ERR TOP needs a message number and a number of lines",
            b"TOP 1 x": b"-ERR TOP needs a message number and a number of lines",
            b"TOP abc 1": b"-ERR not a message number",
            b"RETR": b"-ERR RETR needs a message number",
            b"UIDL x": b"-ERR not a message number",
        }
        for command, answer in cases.items():
            self.assertEqual(self.client.send(command + b"\r\n"), answer + b"\r\n", command)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_retr_is_crlf_and_dot_stuffed(self) -> None:
        self.assertEqual(
            self.client.send(b"RETR 2\r\n"), b"+OK 27 octets\r\nSubject: two\r\n\r\n..dot\r\nbye\r\n.\r\n"
        )
        self.assertEqual(
            self.client.send(b"RETR 3\r\n"), b"+OK 21 octets\r\nSubject: three\r\n\r\nx\r\n.\r\n"
        )
        self.assertEqual(self.server.stats.counters["retrieved"], 2)

    def test_top(self) -> None:
        self.assertEqual(
            self.client.send(b"TOP 2 0\r\n"), b"+OK top of message follows\r\nSubject: two\r\n\r\n.\r\n"
        )
        self.assertEqual(
            self.client.send(b"TOP 2 1\r\n"),
            b"+OK top of message follows\r\nSubject: two\r\n\r\n..dot\r\n.\r\n",
        )

    def test_twisted_deleted_messages_vanish_from_stat_list_uidl_retr(self) -> None:
        self.assertEqual(self.client.send(b"DELE 2\r\n"), b"+OK message 2 deleted\r\n")
        self.assertEqual(self.client.send(b"STAT\r\n"), b"+OK 2 44\r\n")
        self.assertEqual(
            self.client.send(b"LIST\r\n"), b"+OK 2 messages (44 octets)\r\n1 23\r\n3 21\r\n.\r\n"
        )
        self.assertNotIn(b"\r\n2 ", self.client.send(b"UIDL\r\n"))
        for command in (b"RETR 2", b"TOP 2 0", b"LIST 2", b"UIDL 2", b"DELE 2"):
            self.assertEqual(self.client.send(command + b"\r\n"), b"-ERR message 2 is deleted\r\n", command)

    def test_twisted_dele_keeps_the_file_until_quit(self) -> None:
        # twisted.mail moved the file to .Trash at DELE: a dropped connection lost mail.
        before = self.server.messages()
        self.client.send(b"DELE 1\r\nDELE 3\r\n")
        self.assertEqual(self.server.messages(), before)
        self.assertEqual(
            self.client.send(b"QUIT\r\n"), b"+OK sockproto POP3 server signing off (2 messages deleted)\r\n"
        )
        self.assertEqual(self.server.messages(), [before[1]])
        self.assertTrue(self.client.closed)
        self.assertEqual(self.server.stats.counters["deleted"], 2)

    def test_rset_unmarks(self) -> None:
        self.client.send(b"DELE 1\r\n")
        self.assertEqual(self.client.send(b"RSET\r\n"), b"+OK maildrop has 3 messages (71 octets)\r\n")
        self.client.send(b"QUIT\r\n")
        self.assertEqual(len(self.server.messages()), 3)

    def test_session_ending_without_quit_removes_nothing(self) -> None:
        for end in ("lost", "idle", "stop", "eof"):
            client = self.client if end == "lost" else self.server.connect()
            if end != "lost":
                client.login()
            client.send(b"DELE 1\r\nDELE 2\r\n")
            if end == "lost":
                client.lose()
            elif end == "idle":
                self.server.clock.advance(600)
                self.assertTrue(client.closed)
                self.assertEqual(client.take(), b"")  # RFC 1939: no response on autologout
                client.lose()
            elif end == "stop":
                self.server.guarded.server_stopping()
                self.assertEqual(client.take(), b"-ERR [SYS/TEMP] server shutting down\r\n")
                client.lose()
            else:
                client.guard.readConnectionLost()
                self.assertTrue(client.closed)
                client.lose()
            self.assertEqual(len(self.server.messages()), 3, end)

    def test_message_removed_behind_our_back(self) -> None:
        for name in self.server.messages():
            os.unlink(self.server.root / "alice" / "new" / name)
        self.assertEqual(self.client.send(b"RETR 1\r\n"), b"-ERR [SYS/PERM] message is gone\r\n")
        self.assertEqual(self.client.send(b"NOOP\r\n"), b"+OK\r\n")


BIG = b"Subject: big\n\n" + b".line of some length, led by a dot\n" * 10000  # ~370 KiB on the wire


class FlowControlTests(SynchronousTestCase):
    """Output waits for the client to read: a message streams a chunk at a
    time, and commands are not read while answers back up."""

    def setUp(self) -> None:
        self.server = Server(self)
        self.server.deliver(BIG)
        self.server.deliver(b"Subject: small\n\nhi\n")
        self.client = self.server.connect()
        self.client.login()
        _, size = self.client.send(b"LIST 1\r\n").split()[1:]
        self.size = int(size)

    def test_retr_streams_as_the_client_reads_and_later_commands_wait(self) -> None:
        self.client.guard.dataReceived(b"RETR 1\r\nSTAT\r\nQUIT\r\n")
        first = self.client.take_some()
        self.assertTrue(first.startswith(b"+OK %d octets\r\n" % self.size))
        self.assertLess(len(first), FlowTransport.limit + 200 * 1024)  # about a chunk, not the message
        self.assertNotIn(b"+OK 2 ", first)
        rest = self.client.take()
        body = (first + rest).split(b"\r\n", 1)[1]
        self.assertTrue(
            body.endswith(
                b"\r\n.\r\n+OK 2 %d\r\n+OK sockproto POP3 server signing off (0 messages deleted)\r\n"
                % (self.size + len(b"Subject: small\r\n\r\nhi\r\n"))
            )
        )
        self.assertEqual(body.count(b"\r\n..line"), 10000)
        self.assertTrue(self.client.closed)
        self.assertIsNone(self.client.transport.producer)  # unregistered, so the close completes

    def test_a_client_that_does_not_read_cannot_fill_our_memory(self) -> None:
        flood = b"CAPA\r\n" * 5000  # some 800 KiB of answers
        self.client.guard.dataReceived(flood)
        unread = self.client.take_some()
        self.assertLess(len(unread), FlowTransport.limit + 1024)
        self.assertEqual(self.client.transport.producerState, "paused")  # the socket is not read
        self.assertLess(len(self.client.protocol._buffer), len(flood))
        self.assertEqual((unread + self.client.take()).count(b"+OK capability list follows"), 5000)
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_half_close_after_pipelined_quit_still_commits(self) -> None:
        self.client.guard.dataReceived(b"DELE 2\r\nRETR 1\r\nQUIT\r\n")
        self.client.guard.readConnectionLost()
        self.assertFalse(self.client.closed)  # RETR still streaming
        self.assertTrue(self.client.take().endswith(b"(1 messages deleted)\r\n"))
        self.assertTrue(self.client.closed)
        self.assertEqual(len(self.server.messages()), 1)

    def test_connection_lost_mid_retr_closes_the_file_and_keeps_mail(self) -> None:
        self.client.guard.dataReceived(b"DELE 2\r\nRETR 1\r\n")
        self.assertIsNotNone(self.client.protocol._transfer)
        self.client.lose()
        self.assertIsNone(self.client.protocol._transfer)
        self.assertEqual(len(self.server.messages()), 2)

    def test_server_stop_lets_the_retr_finish_then_ends_the_session(self) -> None:
        self.client.guard.dataReceived(b"DELE 2\r\nRETR 1\r\nSTAT\r\nQUIT\r\n")
        first = self.client.take_some()
        stopped = self.server.guarded.server_stopping(grace=60)
        self.assertFalse(self.client.closed)  # the message is still streaming
        rest = self.client.take()
        body = (first + rest).split(b"\r\n", 2)[2]  # after +OK to DELE and to RETR
        self.assertEqual(body.count(b"\r\n..line"), 10000)
        # The whole message, then the shutdown line; the commands after RETR never run.
        self.assertTrue(body.endswith(b"\r\n.\r\n-ERR [SYS/TEMP] server shutting down\r\n"))
        self.assertNotIn(b"+OK 1 ", body)
        self.assertTrue(self.client.closed)
        self.assertIsNone(self.client.transport.producer)
        self.client.lose()
        self.assertTrue(stopped.called)
        self.assertEqual(len(self.server.messages()), 2)  # no QUIT ran: DELE 2 not applied

    def test_server_stop_answers_a_held_back_failed_login(self) -> None:
        client = self.server.connect()
        client.guard.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(client.take(), b"+OK send PASS\r\n")  # the -ERR waits a second
        self.server.guarded.server_stopping()
        self.assertEqual(client.take(), b"-ERR [SYS/TEMP] server shutting down\r\n")
        self.assertTrue(client.closed)
        answers = [
            call
            for call in self.server.clock.getDelayedCalls()
            if call.func == client.protocol._answer_failed
        ]
        self.assertEqual(answers, [])

    def test_server_stop_answers_a_held_back_right_login(self) -> None:
        server = Server(self)
        failed = server.connect()
        failed.login(b"bob", b"wrong")
        failed.lose()
        client = server.connect()
        client.guard.dataReceived(b"USER bob\r\nPASS hunter2\r\nSTAT\r\n")
        self.assertEqual(client.take(), b"+OK send PASS\r\n")  # the +OK waits the penalty
        pending = client.protocol._waiting
        server.guarded.server_stopping()
        # Nothing said about the password; the mailbox opened for it is closed.
        self.assertEqual(client.take(), b"-ERR [SYS/TEMP] server shutting down\r\n")
        self.assertTrue(client.closed)
        self.assertIsNone(client.protocol.maildrop)
        self.assertEqual((client.protocol._waiting, pending.active()), (None, False))
        Maildrop.open(server.root, "bob").close()  # not locked

    def test_server_stop_lets_a_login_being_checked_finish(self) -> None:
        slow = SlowChecker()
        server = Server(self, checkers=[slow])
        server.deliver(b"Subject: x\n\nhi\n")
        client = server.connect()
        client.guard.dataReceived(b"USER alice\r\nPASS secret\r\nSTAT\r\n")
        client.take()
        server.guarded.server_stopping()
        self.assertFalse(client.closed)
        slow.pending.callback(b"alice")
        self.assertEqual(
            client.take(),
            b"+OK alice's maildrop has 1 messages (18 octets)\r\n-ERR [SYS/TEMP] server shutting down\r\n",
        )
        self.assertTrue(client.closed)

    def test_idle_timer_is_ten_minutes_and_a_transfer_counts_as_activity(self) -> None:
        self.assertEqual(config.build({}).pop3.idle_timeout, 600.0)  # twisted.mail: 300 s
        self.client.guard.dataReceived(b"RETR 1\r\n")
        for _ in range(3):  # a slow reader: a chunk every 599 s
            self.server.clock.advance(599)
            self.assertFalse(self.client.closed)
            self.client.transport.clear()
            self.client.transport.producer_paused = False
            self.client.protocol.resumeProducing()
        self.client.take()
        self.server.clock.advance(599)
        self.assertFalse(self.client.closed)
        self.server.clock.advance(1)
        self.assertTrue(self.client.closed)

    def test_closing_paths_unregister_the_producer(self) -> None:
        self.client.send(b"QUIT\r\n")
        self.assertIsNone(self.client.transport.producer)
        other = self.server.connect()
        other.send(b"x" * (MAX_LINE + 1))
        self.assertIsNone(other.transport.producer)
        idle = self.server.connect()
        self.server.clock.advance(600)
        self.assertTrue(idle.closed)
        self.assertIsNone(idle.transport.producer)


class StlsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.context = object()
        self.server = Server(self, tls=self.context, require_tls=True)
        self.client = self.server.connect()

    def test_plaintext_login_refused_before_tls(self) -> None:
        capabilities = self.client.send(b"CAPA\r\n")
        self.assertNotIn(b"USER", capabilities)
        self.assertNotIn(b"SASL", capabilities)
        refused = b"-ERR [AUTH] plaintext authentication disallowed before STLS\r\n"
        self.assertEqual(self.client.send(b"USER alice\r\n"), refused)
        self.assertEqual(self.client.send(b"AUTH PLAIN\r\n"), refused)

    def test_no_login_of_any_kind_before_tls(self) -> None:
        # curl picks APOP by itself when the greeting has a timestamp: none is
        # offered, and APOP gets the same refusal as USER, PASS and AUTH.
        self.assertEqual(self.client.greeting, b"+OK sockproto POP3 server ready\r\n")
        digest = hashlib.md5(b"secret").hexdigest().encode()
        token = base64.b64encode(b"\0alice\0secret")
        refused = b"-ERR [AUTH] plaintext authentication disallowed before STLS\r\n"
        for command in (
            b"USER alice",
            b"USER",
            b"PASS secret",
            b"APOP alice " + digest,
            b"APOP",
            b"AUTH PLAIN",
            b"AUTH PLAIN " + token,
            b"AUTH CRAM-MD5",
        ):
            self.assertEqual(self.client.send(command + b"\r\n"), refused, command)
        self.assertEqual(self.client.send(b"AUTH\r\n"), b"+OK SASL mechanisms follow\r\n.\r\n")
        self.assertEqual(os.listdir(self.server.root), [])  # no mailbox was opened
        self.assertEqual(self.server.stats.counters["login_failures"], 0)

    def test_apop_is_not_offered_after_stls_without_a_timestamp(self) -> None:
        self.client.send(b"STLS\r\n")
        self.assertEqual(
            self.client.send(b"APOP alice " + hashlib.md5(b"secret").hexdigest().encode() + b"\r\n"),
            b"-ERR APOP is not offered on this connection (use USER/PASS or AUTH PLAIN)\r\n",
        )
        self.assertIn(b"+OK alice's maildrop", self.client.login())

    def test_without_require_tls_the_greeting_offers_apop_before_stls(self) -> None:
        client = Server(self, tls=self.context).connect()
        stamp = client.greeting.split()[-1]
        self.assertTrue(stamp.startswith(b"<"), client.greeting)
        digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
        self.assertIn(b"+OK alice's maildrop", client.send(b"APOP alice " + digest + b"\r\n"))

    def test_stls_discards_pipelined_plaintext_and_then_allows_login(self) -> None:
        answer = self.client.send(b"STLS\r\nUSER evil\r\nPASS injected\r\n")
        self.assertEqual(answer, b"+OK begin TLS negotiation\r\n")
        self.assertIs(self.client.transport.tls, self.context)
        self.assertEqual(self.client.transport.before_tls, b"+OK begin TLS negotiation\r\n")
        capabilities = self.client.send(b"CAPA\r\n")
        self.assertIn(b"USER", capabilities)
        self.assertNotIn(b"STLS", capabilities)
        self.assertEqual(self.client.send(b"STLS\r\n"), b"-ERR TLS is already active\r\n")
        self.assertIn(b"+OK alice's maildrop", self.client.login())

    def test_stls_forgets_user(self) -> None:
        server = Server(self, tls=self.context)
        client = server.connect()
        client.send(b"USER alice\r\nSTLS\r\n")
        self.assertEqual(client.send(b"PASS secret\r\n"), b"-ERR send USER first\r\n")

    def test_stls_without_tls_configured(self) -> None:
        client = Server(self).connect()
        self.assertEqual(client.send(b"STLS\r\n"), b"-ERR STLS is not available (no --tls-cert)\r\n")

"""Security checks for the two services with logins, chat and POP3:

- no one gets in with a wrong password, whatever the password bytes;
- a POP3 user can never open another user's Maildir: names that could climb
  out of the root, hide in it or name another folder are refused, and any
  name that is let in opens exactly the folder of that name under the root;
- repeated failures from one address are answered ever later;
- logs cannot be forged: every logged value a client chose (user names,
  reasons, commands) is escaped, so each event is one printable line;
- a message swapped after login for a symlink or a FIFO is refused, not
  followed or waited on; a folder of a Maildir made a link into another one
  refuses the login, and nothing is listed or removed through it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sockproto import auth
from sockproto.limits import LOGIN_DELAY_CAP
from sockproto.maildir import Maildir
from sockproto.pop3 import AnyLogin
from tests.support import temp_dir
from tests.test_chat import ChatTestCase
from tests.test_pop3 import Server
from tests.test_pop3_e2e import Box, start

RIGHT = b"s3cret"
FORGED = b"\r\n2026-11-22T04:03:05+0000 [sockproto#info] pop3: forged line"
NASTY = [
    FORGED,
    b"\x1b[2J\x1b[31mred",
    b"\x1b]0;title\x07",
    b"a\x00b\x7f\x08",
    "\u2028\u009b".encode(),
    b"\xff",
]

# A wrong password: anything but the right one, as the line protocol reads it
# (a CR before the LF is part of the line end; a leading blank separates).
wrong_passwords = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"S3cret", b"s3cre", b"s3cret!", b"s3cret ", b"s3cret\x00", b"\x00s3cret", b"*"]),
).filter(lambda p: b"\n" not in p and p.removesuffix(b"\r") != RIGHT and not p[:1].isspace())

ESCAPING_NAMES = [
    "../bob",
    "bob/../alice",
    "..",
    ".",
    "",
    "/",
    "/etc",
    "bob/",
    "a/b",
    ".hidden",
    "..bob",
    "bob\x00alice",
    "alice\x00",
    "\x00",
    "b" * 65,
    "x" * 10_000,
    "bob\\..\\alice",
    "-rf",
    "bob alice",
    "bob\r\nalice",
    "\u0430lice",  # Cyrillic a
    "ali\u0301ce",
]


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(authzid + b"\0" + user + b"\0" + password) + b"\r\n"


def one_printable_line_each(test: SynchronousTestCase, events: list[dict[str, Any]]) -> list[str]:
    texts = [formatEvent(event) for event in events]
    for text in texts:
        # Printable: no CR or LF (so no FORGED line) and no ESC (no escape sequence).
        test.assertTrue(text.isprintable(), repr(text))
    return texts


class Pop3LoginTests(SynchronousTestCase):
    def server(self) -> Server:
        memory = InMemoryUsernamePasswordDatabaseDontUse()
        memory.users = {b"alice": RIGHT, b"bob": b"hunter2"}
        server = Server(self, checkers=[memory])
        server.deliver(b"Subject: for alice\n\nalice's\n", "alice")
        server.deliver(b"Subject: for bob\n\nbob's\n", "bob")
        return server

    @examples(max_examples=60)
    @given(password=wrong_passwords, way=st.sampled_from(["USER", "AUTH", "APOP"]))
    def test_no_wrong_password_lets_anyone_in(self, password: bytes, way: str) -> None:
        server = self.server()
        client = server.connect()
        with capturedLogs():
            if way == "USER":
                client.guard.dataReceived(b"USER alice\r\nPASS " + password + b"\r\n")
            elif way == "AUTH":
                client.guard.dataReceived(plain(b"alice", password))
            else:
                stamp = client.greeting.split()[-1]
                digest = hashlib.md5(stamp + password).hexdigest().encode()
                client.guard.dataReceived(b"APOP alice " + digest + b"\r\n")
            server.clock.advance(60)
        answers = client.take()
        self.assertNotIn(b"maildrop has", answers)
        # (a NUL in an AUTH PLAIN password is a malformed response, not a login)
        self.assertRegex(answers, rb"-ERR (\[AUTH\] invalid user name or password|malformed .*)\r\n$")
        self.assertIsNone(client.protocol.maildrop)
        self.assertEqual(client.send(b"STAT\r\n"), b"-ERR STAT is not valid in the AUTHORIZATION state\r\n")
        client.lose()

    def test_one_users_password_opens_only_that_users_mailbox(self) -> None:
        server = self.server()
        for attempt in (b"USER alice\r\nPASS hunter2\r\n", plain(b"alice", b"hunter2"), plain(b"bob", RIGHT)):
            client = server.connect()
            client.guard.dataReceived(attempt)
            server.clock.advance(60)
            self.assertTrue(client.take().endswith(b"-ERR [AUTH] invalid user name or password\r\n"))
        # Acting as another user (an authorization identity) is refused too.
        client = server.connect()
        client.guard.dataReceived(plain(b"bob", b"hunter2", authzid=b"alice"))
        server.clock.advance(60)
        self.assertTrue(client.take().endswith(b"-ERR [AUTH] invalid user name or password\r\n"))
        client = server.connect("10.0.0.2")  # an address without failures: answered at once
        client.login(b"alice", RIGHT)
        self.assertIn(b"alice's", client.send(b"RETR 1\r\n"))
        self.assertEqual(client.send(b"RETR 2\r\n"), b"-ERR no such message\r\n")

    def test_hashed_passwords_too(self) -> None:
        users = Path(temp_dir(self), "users.txt")
        users.write_bytes(b"alice:" + auth.hash_password(RIGHT) + b"\n")
        checker = auth.SaltedFilePasswordDB(str(users), run=lambda f, *a: defer.maybeDeferred(f, *a))
        server = Server(self, checkers=[checker])
        for password in (b"", b"S3cret", b"s3cret ", RIGHT + b"\x00", auth.hash_password(RIGHT)):
            client = server.connect()
            client.guard.dataReceived(b"USER alice\r\nPASS " + password + b"\r\n")
            server.clock.advance(60)
            self.assertTrue(
                client.take().endswith(b"-ERR [AUTH] invalid user name or password\r\n"), password
            )
        # From the address that failed, the right password waits its penalty too.
        right = server.connect()
        right.login(b"alice", RIGHT)
        server.clock.advance(LOGIN_DELAY_CAP)
        self.assertIn(b"+OK alice's maildrop", right.take())

    def test_repeated_failures_are_answered_ever_later(self) -> None:
        server = self.server()
        waits = []
        for _ in range(7):
            client = server.connect("10.9.9.9")  # a new connection each time: no way around it
            client.guard.dataReceived(b"USER alice\r\nPASS guess\r\n")
            client.take()
            waited = 0.0
            while not client.take():
                server.clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        elsewhere = server.connect("10.8.8.8")
        self.assertIn(b"+OK alice's maildrop", elsewhere.login(b"alice", RIGHT))  # others are not slowed


class MaildirNameTests(SynchronousTestCase):
    """Without --auth any name and password is accepted and the name is the
    mailbox: the one place a name decides which folder is opened."""

    def setUp(self) -> None:
        self.server = Server(self, checkers=[AnyLogin()])
        self.root = self.server.root.resolve()
        self.server.deliver(b"Subject: bob's secret\n\nbob's\n", "bob")
        self.server.deliver(b"Subject: alice's secret\n\nalice's\n", "alice")
        self.outside = sorted(os.listdir(self.root.parent))

    def attempt(self, name: bytes) -> Any:
        """Logs in as ``name`` by AUTH PLAIN (any byte but NUL can be in it); the session."""
        client = self.server.connect()
        with capturedLogs() as events:
            client.guard.dataReceived(plain(name, b"any"))
            self.server.clock.advance(60)
        one_printable_line_each(self, events)
        return client

    def test_names_that_could_escape_or_collide_are_refused(self) -> None:
        for name in ESCAPING_NAMES:
            client = self.attempt(name.encode("utf-8"))
            answer = client.take()
            self.assertTrue(answer.startswith(b"-ERR"), (name, answer))
            self.assertIsNone(client.protocol.maildrop, name)
            client.lose()
        self.assertEqual(sorted(os.listdir(self.root)), ["alice", "bob"])  # nothing made
        self.assertEqual(sorted(os.listdir(self.root.parent)), self.outside)

    def test_user_command_refuses_them_too(self) -> None:
        for name in ["../bob", "bob/../alice", ".", "..", "/etc", "b" * 65, "a/b"]:
            client = self.server.connect()
            with capturedLogs():
                client.guard.dataReceived(b"USER " + name.encode() + b"\r\nPASS any\r\n")
                self.server.clock.advance(60)
            self.assertTrue(client.take().endswith(b"-ERR [AUTH] invalid user name or password\r\n"), name)
            client.lose()
        self.assertEqual(sorted(os.listdir(self.root)), ["alice", "bob"])

    @examples(max_examples=80)
    @given(
        name=st.one_of(st.binary(min_size=1, max_size=80), st.text(min_size=1, max_size=80).map(str.encode))
    )
    def test_a_name_let_in_opens_exactly_its_own_folder(self, name: bytes) -> None:
        assume(b"\0" not in name)
        client = self.attempt(name)
        answer = client.take()
        drop = client.protocol.maildrop
        if drop is None:
            self.assertTrue(answer.startswith(b"-ERR"), answer)
            client.lose()
            return
        folder = drop.maildir.path.resolve()
        self.assertEqual((folder.parent, folder.name.encode()), (self.root, name))
        self.assertFalse(name.startswith(b"."))
        if name not in (b"alice", b"bob"):
            self.assertNotIn(b"secret", client.send(b"RETR 1\r\n"))
        client.lose()


class ChatLoginTests(ChatTestCase):
    settings = {"rate": (0.0, 0.0), "auth": True, "login_delay": 1.0}
    accounts = {b"alice": RIGHT, b"bob": b"hunter2"}

    @examples(max_examples=60)
    @given(password=wrong_passwords, user=st.sampled_from([b"alice", b"Alice", b"ALICE", b"alice_"]))
    def test_no_wrong_password_lets_anyone_in(self, password: bytes, user: bytes) -> None:
        self.setUp()  # a fresh room for each example
        watcher = self.connect("10.1.1.1")
        watcher.send("/login bob hunter2")
        watcher.received()
        guest = self.connect("10.2.2.2")
        guest.received()
        with capturedLogs():
            guest.send(b"/login " + user + b" " + password + b"\n", "hello?")
            self.clock.advance(60)
        self.assertIn(guest.received()[0], ["error: login failed", "error: usage: /login USER PASSWORD"])
        self.assertEqual(watcher.received(), [])  # no one joined, nothing said
        self.assertEqual(guest.chat.nick, "")

    def test_repeated_failures_are_answered_ever_later(self) -> None:
        waits = []
        for _ in range(7):
            guest = self.connect("10.3.3.3")
            guest.received()
            guest.send("/login alice guess")
            waited = 0.0
            with capturedLogs():
                while not guest.received():
                    self.clock.advance(0.5)
                    waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])


class Pop3LogForgingTests(SynchronousTestCase):
    """Every POP3 line that carries client input (user names by USER, AUTH
    PLAIN and APOP, a locked mailbox, commands), driven with CR, LF, ANSI
    escapes and other control bytes: one printable line per event."""

    def test_pop3(self) -> None:
        server = Server(self)
        server.deliver(b"Subject: x\n\nx\n")
        holder = server.connect()
        holder.login()
        with capturedLogs() as events:
            for nasty in NASTY:
                client = server.connect()
                client.guard.dataReceived(b"USER " + nasty.replace(b"\r\n", b"\r") + b"\r\nPASS x\r\n")
                client.guard.dataReceived(plain(b"alice" + nasty, b"secret"))
                client.guard.dataReceived(b"APOP " + nasty.strip() + b" " + b"0" * 32 + b"\r\n")
                client.guard.dataReceived(plain(b"alice", b"secret"))  # in use: logs the name
                client.guard.dataReceived(nasty + b"\r\n" + b"NOOP " + nasty + b"\r\n")
                server.clock.advance(60)
                client.lose()
        texts = one_printable_line_each(self, events)
        self.assertTrue(any("login failed for alice\\r\\n2026" in text for text in texts), texts)
        self.assertTrue(any("mailbox of alice is in use" in text for text in texts), texts)


class ChatLogForgingTests(ChatTestCase):
    """The same for chat: login names and passwords, nicknames, actions,
    lines, quit reasons, a line too long."""

    settings = {"rate": (0.0, 0.0), "auth": True, "login_delay": 0.0}
    accounts = {b"alice": RIGHT}

    def test_chat(self) -> None:
        with capturedLogs() as events:
            for nasty in NASTY:
                line = nasty.replace(b"\n", b" ")
                client = self.connect()
                client.send(b"/login " + line + b" x\n", b"/login alice " + line + b"\n")
                client.send(b"/login alice " + RIGHT + b"\n")
                client.send(b"/nick " + line + b"\n", b"/me " + line + b"\n", line + b"\n")
                client.send(b"/quit " + line + b"\n")
                client.lose()
                other = self.connect()
                other.send(b"/login alice " + RIGHT + b"\n", b"x" * 5000)  # line too long
                other.lose()
        texts = one_printable_line_each(self, events)
        # Chat removes control characters from what it relays, reasons too.
        self.assertTrue(
            any("left: quit: 2026-11-22T04:03:05+0000 [sockproto#info]" in text for text in texts)
        )


class Pop3SwappedMessageTests(SynchronousTestCase):
    """A local writer swaps a listed message after login: RETR and TOP answer
    with an error, never with a file outside the Maildir, and never wait."""

    def setUp(self) -> None:
        self.server = Server(self)
        self.message = self.server.deliver(b"Subject: x\n\nmail\n")
        self.client = self.server.connect()
        self.assertIn(b"+OK alice's maildrop has 1 messages", self.client.login())
        self.message.unlink()

    def test_a_symlink_is_not_followed(self) -> None:
        # Regression: RETR returned the file the link pointed to.
        secret = Path(temp_dir(self)) / "secret"
        secret.write_bytes(b"TOP-SECRET\n")
        self.message.symlink_to(secret)
        with capturedLogs() as events:
            for command in (b"RETR 1\r\n", b"TOP 1 0\r\n"):
                answer = self.client.send(command)
                self.assertEqual(answer, b"-ERR [SYS/TEMP] cannot read the message\r\n")
        self.assertEqual(len(events), 2)
        self.assertIn("a symbolic link", formatEvent(events[0]))
        self.assertFalse(self.client.closed)


class Pop3LinkedFolderTests(SynchronousTestCase):
    """A local writer makes a folder of their own Maildir a link into someone
    else's: the login is refused with a temporary error and one log line,
    and nothing of the other mailbox is listed or removed."""

    def setUp(self) -> None:
        self.server = Server(self)
        self.bobs = self.server.deliver(b"Subject: for bob\n\nbob's\n", "bob")
        self.alice = Maildir(self.server.root / "alice").create().path

    def test_a_linked_new_is_refused_at_login(self) -> None:
        # Regression: alice's login listed bob's mail, DELE 1 + QUIT removed it.
        os.rmdir(self.alice / "new")
        os.symlink("../bob/new", self.alice / "new")
        client = self.server.connect()
        with capturedLogs() as events:
            answer = client.login()
            answer += client.send(b"DELE 1\r\nQUIT\r\n")
        self.assertIn(b"-ERR [SYS/TEMP] cannot open the mailbox\r\n", answer)
        self.assertNotIn(b"+OK message 1 deleted", answer)
        (line,) = [formatEvent(e) for e in events if "cannot open the mailbox" in formatEvent(e)]
        self.assertIn("pop3: 10.0.0.1:", line)
        self.assertIn("cannot open the mailbox of alice: ", line)
        self.assertIn("a symbolic link", line)
        self.assertFalse([e for e in events if e.get("log_failure")])  # no traceback
        self.assertEqual(self.bobs.read_bytes(), b"Subject: for bob\n\nbob's\n")


class Pop3SwappedMessageEndToEndTests(SynchronousTestCase):
    """The FIFO case against the real daemon: a freeze there only costs the client's timeout."""

    def test_a_fifo_swapped_in_does_not_freeze_the_server(self) -> None:
        # Regression: RETR blocked the reactor in open() for ever: this
        # session, and every other one, waited.
        box = Box(self)
        message = box.deliver(b"Subject: x\n\nmail\n")
        suite = start(self, box)
        client = poplib.POP3("127.0.0.1", suite.address("pop3")[1], timeout=10)
        self.addCleanup(client.close)
        client.user("alice")
        client.pass_("secret")
        message.unlink()
        os.mkfifo(message)
        with self.assertRaises(poplib.error_proto) as raised:
            client.retr(1)
        self.assertIn(b"cannot read the message", raised.exception.args[0])
        self.assertEqual(client.noop(), b"+OK")
        suite.wait_log("pop3: cannot read")
        self.assertFalse(suite.saw("Traceback"))

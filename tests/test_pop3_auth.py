"""Salted password hashes, the --auth checkers (shared with chat), and
``python -m sockproto passwd``."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from sockproto import auth, config
from sockproto.__main__ import set_password
from sockproto.auth import SaltedFilePasswordDB, hash_password, verify_password
from sockproto.limits import suite_logins
from sockproto.pop3 import MAX_AUTH_DELAY, APOPCredentials
from tests.support import environment, temp_dir
from tests.test_pop3 import Server, SlowChecker


def settings_with(*descriptions: str) -> config.Settings:
    return config.build({("suite", "auth"): (list(descriptions), "test")})


def now(deferred: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def synchronous(function: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


class HashTests(SynchronousTestCase):
    def test_round_trip_and_salt(self) -> None:
        stored = hash_password(b"s3cret")
        self.assertTrue(stored.startswith(b"$scrypt$n=16384,r=8,p=1,pre=hmac-sha256$"))
        self.assertNotIn(b":", stored)  # it lives in a colon-separated file
        self.assertTrue(verify_password(b"s3cret", stored))
        self.assertFalse(verify_password(b"s3cret!", stored))
        self.assertNotEqual(stored, hash_password(b"s3cret"))

    def test_no_other_password_is_the_same(self) -> None:
        """scrypt's HMAC alone would take s3cret and s3cret NUL as one
        password, and a long password and its SHA-256 too."""
        stored = hash_password(b"s3cret")
        for other in (b"s3cret\x00", b"s3cret\x00\x00", b"s3cre"):
            self.assertFalse(verify_password(other, stored), other)
        long = b"a passphrase longer than the 64 bytes of an HMAC-SHA256 block, by far"
        stored = hash_password(long)
        self.assertTrue(verify_password(long, stored))
        self.assertFalse(verify_password(hashlib.sha256(long).digest(), stored))

    def test_hashes_without_the_prehash_still_verify(self) -> None:
        salt = b"0123456789abcdef"
        key = hashlib.scrypt(b"old", salt=salt, n=2**14, r=8, p=1, dklen=32)
        encode = base64.b64encode
        stored = b"$scrypt$n=16384,r=8,p=1$" + encode(salt).rstrip(b"=") + b"$" + encode(key).rstrip(b"=")
        self.assertTrue(verify_password(b"old", stored))
        self.assertFalse(verify_password(b"new", stored))
        self.assertFalse(verify_password(b"old", stored.replace(b"p=1$", b"p=1,pre=md5$")))

    def test_malformed_hashes_never_match(self) -> None:
        good = hash_password(b"x")
        for bad in (
            b"",
            b"$scrypt$",
            b"x",
            good.replace(b"n=16384", b"n=abc"),
            good.replace(b"scrypt", b"bcrypt"),
            good.replace(b"n=16384", b"n=1099511627776"),  # no memory bomb
            good[:-5] + b"!!!!!",
        ):
            self.assertFalse(verify_password(b"x", bad), bad)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(temp_dir(self)) / "users.txt"
        self.path.write_bytes(b"alice:" + hash_password(b"wonderland") + b"\nbob:plain\n")
        self.checker = SaltedFilePasswordDB(str(self.path), run=synchronous)

    def check(self, credentials: Any) -> Any:
        return now(self.checker.requestAvatarId(credentials))

    def test_hashed_and_plain_entries(self) -> None:
        self.assertEqual(self.check(UsernamePassword(b"alice", b"wonderland")), b"alice")
        self.assertEqual(self.check(UsernamePassword(b"bob", b"plain")), b"bob")
        for user, password in ((b"alice", b"wrong"), (b"bob", b"wrong"), (b"nobody", b"x")):
            self.assertTrue(self.check(UsernamePassword(user, password)).check(UnauthorizedLogin))

    def test_apop_works_for_plain_entries_only(self) -> None:
        # APOP needs the clear password, which a hash does not keep.
        stamp = b"<1.2@host>"
        from hashlib import md5

        self.assertEqual(
            self.check(APOPCredentials(stamp, b"bob", md5(stamp + b"plain").hexdigest().encode())), b"bob"
        )
        alice = APOPCredentials(stamp, b"alice", md5(stamp + b"wonderland").hexdigest().encode())
        self.assertTrue(self.check(alice).check(UnauthorizedLogin))

    def test_changes_to_the_file_apply_at_once(self) -> None:
        set_password(str(self.path), "carol", b"new")
        self.assertEqual(self.check(UsernamePassword(b"carol", b"new")), b"carol")

    def test_unreadable_file_fails_the_login(self) -> None:
        self.path.unlink()
        self.assertTrue(self.check(UsernamePassword(b"alice", b"wonderland")).check(UnauthorizedLogin))
        self.flushLoggedErrors()

    def test_checkers_from_settings(self) -> None:
        made = auth.checkers(settings_with(f"file:{self.path}", "memory:dave:pw"))
        self.assertIsInstance(made[0], SaltedFilePasswordDB)
        # strcred's memory checker stores str, so bytes credentials never
        # matched on Python 3; ours stores bytes.
        self.assertIsInstance(made[1], InMemoryUsernamePasswordDatabaseDontUse)
        self.assertEqual(now(made[1].requestAvatarId(UsernamePassword(b"dave", b"pw"))), b"dave")

    def test_several_auth_options_all_count(self) -> None:
        # A Portal keeps one checker per interface: without any_of only the
        # last --auth would be asked.
        made = auth.any_of(auth.checkers(settings_with("memory:erin:1", "memory:fred:2")))
        self.assertEqual(now(made.requestAvatarId(UsernamePassword(b"erin", b"1"))), b"erin")
        self.assertEqual(now(made.requestAvatarId(UsernamePassword(b"fred", b"2"))), b"fred")
        self.assertTrue(now(made.requestAvatarId(UsernamePassword(b"fred", b"1"))).check(UnauthorizedLogin))
        only = auth.checkers(settings_with("memory:erin:1"))
        self.assertIs(auth.any_of(only), only[0])

    def test_any_of_skips_checkers_for_other_credentials(self) -> None:
        from twisted.cred.checkers import AllowAnonymousAccess
        from twisted.cred.credentials import Anonymous

        memory = auth.checkers(settings_with("memory:erin:1"))[0]
        made = auth.any_of([AllowAnonymousAccess(), memory])
        self.assertEqual(now(made.requestAvatarId(UsernamePassword(b"erin", b"1"))), b"erin")
        self.assertEqual(now(made.requestAvatarId(Anonymous())), ())
        self.assertEqual(len(made.credentialInterfaces), 3)

    def test_missing_file_is_a_config_error(self) -> None:
        # Settings are checked where they are read, before any checker is built.
        error = self.assertRaises(config.ConfigError, settings_with, "file:/no/such/users.txt")
        self.assertIn("file:/no/such/users.txt: no such users file", str(error))


class ThreadedCheckTests(unittest.TestCase):
    """The default runner hashes in the reactor's thread pool."""

    def setUp(self) -> None:
        self.path = Path(temp_dir(self)) / "users.txt"
        self.path.write_bytes(b"alice:" + hash_password(b"pw") + b"\n")

    @defer.inlineCallbacks
    def test_hash_checked_in_a_thread(self) -> Any:
        checker = SaltedFilePasswordDB(str(self.path))
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))), b"alice")
        with self.assertRaises(UnauthorizedLogin):
            yield checker.requestAvatarId(UsernamePassword(b"alice", b"no"))


class PasswdCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(temp_dir(self))
        self.path = self.folder / "users.txt"

    def run_passwd(self, user: str, password: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "sockproto", "passwd", str(self.path), user],
            input=password,
            env=environment(),
            capture_output=True,
            timeout=60,
        )

    def test_writes_a_salted_hash_the_checker_accepts(self) -> None:
        result = self.run_passwd("alice", b"wonder land\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.decode().strip(), f"alice: password set in {self.path}")
        user, stored = self.path.read_bytes().strip().split(b":", 1)
        self.assertEqual(user, b"alice")
        self.assertTrue(verify_password(b"wonder land", stored))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_replaces_the_users_line_and_keeps_the_others(self) -> None:
        self.path.write_bytes(b"# users\nbob:plain\nalice:old\ncarol:x\n")
        set_password(str(self.path), "alice", b"new")
        lines = self.path.read_bytes().splitlines()
        self.assertEqual([line.split(b":")[0] for line in lines], [b"# users", b"bob", b"alice", b"carol"])
        self.assertTrue(verify_password(b"new", lines[2].split(b":", 1)[1]))
        self.assertEqual([p.name for p in self.folder.iterdir()], ["users.txt"])  # no temp file left

    def test_refuses_bad_names_and_empty_passwords(self) -> None:
        result = self.run_passwd("a:b", b"x\n")
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot be a user name", result.stderr.decode())
        result = self.run_passwd("alice", b"\n")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode().strip(), "python -m sockproto passwd: error: empty password")
        self.assertFalse(self.path.exists())


class FailedLoginThrottleTests(SynchronousTestCase):
    """A failed POP3 login's answer waits (FailureDelays), but never holds a
    session after its client hangs up, and never longer than the cap."""

    WRONG = b"-ERR [AUTH] invalid user name or password\r\n"

    def setUp(self) -> None:
        self.server = Server(self)  # --pop3-auth-delay 1, at most 10 sessions

    def test_hang_ups_while_answers_wait_free_their_slots(self) -> None:
        guesses = [self.server.connect() for _ in range(10)]
        for guess in guesses:
            guess.login(b"alice", b"wrong")
            guess.guard.readConnectionLost()  # the client hangs up: EOF
            self.assertTrue(guess.closed)  # at once, not after the wait
            self.assertEqual(guess.take(), b"")  # nothing said about the password
            guess.lose()
        self.assertEqual((len(self.server.guarded.protocols), self.server.stats.current), (0, 0))
        self.assertEqual(self.server.clock.getDelayedCalls(), [])
        fresh = self.server.connect()  # the slots are free: a session, not the overflow line
        self.assertTrue(fresh.greeting.startswith(b"+OK sockproto POP3 server ready"))
        self.assertEqual(fresh.login(), b"+OK send PASS\r\n")
        self.server.clock.advance(MAX_AUTH_DELAY)  # the penalty, right password or not
        self.assertIn(b"+OK alice's maildrop", fresh.take())

    def test_hang_up_while_the_login_is_checked(self) -> None:
        checker = SlowChecker()
        client = Server(self, checkers=[checker]).connect()
        client.login(b"alice", b"wrong")
        client.guard.readConnectionLost()
        self.assertFalse(client.closed)  # the check is in progress
        checker.pending.errback(UnauthorizedLogin())
        self.assertTrue(client.closed)  # no wait for an answer no one reads
        self.assertEqual(client.take(), b"")
        client.lose()
        self.assertEqual(client.server.clock.getDelayedCalls(), [])

    def test_logins_in_flight_per_host_are_bounded(self) -> None:
        # Each answer waited only its own penalty: a host held a guess on
        # every session under the cap (100 per 30 s), retried as each came.
        guesses = [self.server.connect() for _ in range(9)]
        with capturedLogs() as events:
            answers = [guess.login(b"alice", b"wrong") for guess in guesses]
        busy = b"+OK send PASS\r\n-ERR [AUTH] too many logins in progress from your address\r\n"
        self.assertEqual(answers, [b"+OK send PASS\r\n"] * 2 + [busy] * 7)  # at once
        self.assertEqual(self.server.stats.counters["login_failures"], 2)  # the others unchecked
        self.assertEqual(self.server.stats.limits["logins_in_flight"], 7)
        refusals = [e for e in events if "too many logins" in e.get("log_format", "")]
        self.assertEqual((len(refusals), refusals[0]["peer"]), (7, "10.0.0.1:40000"))
        # The right password is refused the same way, at once: nothing said about it.
        right = self.server.connect()
        self.assertEqual(right.login(), busy)
        self.assertEqual(right.send(b"AUTH PLAIN =\r\n"), busy[len(b"+OK send PASS\r\n") :])
        self.server.clock.advance(1)
        self.assertEqual(guesses[0].take(), self.WRONG)  # a slot frees as it is answered
        self.assertEqual(right.login(), b"+OK send PASS\r\n")  # checked: waits the penalty
        self.server.clock.advance(2)
        self.assertIn(b"+OK alice's maildrop", right.take())
        self.assertEqual(guesses[1].take(), self.WRONG)

    def test_a_hang_up_while_checked_frees_the_slot(self) -> None:
        checker = SlowChecker()
        server = Server(self, checkers=[checker])
        first, second = server.connect(), server.connect()
        first.login(b"alice", b"wrong")
        second.login(b"alice", b"wrong")
        first.lose()  # while its password is checked
        third = server.connect()
        self.assertEqual(third.login(b"alice", b"wrong"), b"+OK send PASS\r\n")  # checked, not refused
        self.assertEqual(server.factory.failed_logins.flying("10.0.0.1"), 2)

    def test_failures_on_chat_count_for_pop3(self) -> None:
        # One table for the suite (the same --auth users): each service's own base.
        self.assertIs(self.server.factory.failed_logins, suite_logins(self.server.clock))
        for _ in range(3):
            suite_logins(self.server.clock).failed("10.0.0.1", 5.0)  # chat's
        client = self.server.connect()
        self.assertEqual(client.login(), b"+OK send PASS\r\n")
        self.server.clock.advance(3.9)  # POP3's base, 1 s * 2**(3-1)
        self.assertEqual(client.take(), b"")
        self.server.clock.advance(0.1)
        self.assertIn(b"+OK alice's maildrop", client.take())

    def test_no_answer_waits_longer_than_the_cap(self) -> None:
        # However many failed before (they waited 181 s when queued).
        self.fail_logins(200)
        last = self.server.connect()
        last.login(b"alice", b"wrong")
        self.server.clock.advance(MAX_AUTH_DELAY - 0.5)
        self.assertEqual(last.take(), b"")
        self.server.clock.advance(0.5)
        self.assertEqual(last.take(), self.WRONG)

    def fail_logins(self, times: int, host: str = "10.0.0.1") -> None:
        for _ in range(times):
            guess = self.server.connect(host)
            guess.login(b"alice", b"wrong")
            guess.lose()

    def test_right_password_from_a_penalized_host_waits_its_penalty(self) -> None:
        # Answered at once while a wrong one waits, it told a guesser within
        # milliseconds that its guess was wrong: hang up, try the next.
        self.fail_logins(3)
        client = self.server.connect()
        # Pipelined: STAT waits behind the held-back answer.
        self.assertEqual(client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\n"), b"+OK send PASS\r\n")
        self.server.clock.advance(3.9)  # 1 s * 2**(3-1), no increment
        self.assertEqual(client.take(), b"")
        self.assertEqual(self.server.factory.failed_logins.failures("10.0.0.1"), 3)
        self.server.clock.advance(0.1)
        self.assertEqual(client.take(), b"+OK alice's maildrop has 0 messages (0 octets)\r\n+OK 0 0\r\n")
        self.assertEqual(self.server.factory.failed_logins.failures("10.0.0.1"), 0)  # it starts afresh
        client.send(b"QUIT\r\n")
        again = self.server.connect()
        self.assertIn(b"+OK alice's maildrop", again.login())  # at once, now

    def test_right_password_from_a_clean_host_is_answered_at_once(self) -> None:
        self.fail_logins(3)  # from another host
        client = self.server.connect("10.0.0.2")
        self.assertIn(b"+OK alice's maildrop has 0 messages", client.login())

    def test_right_password_waits_at_most_the_cap(self) -> None:
        self.fail_logins(200)  # however many failed before
        client = self.server.connect()
        self.assertEqual(client.login(), b"+OK send PASS\r\n")
        self.server.clock.advance(MAX_AUTH_DELAY - 0.5)
        self.assertEqual(client.take(), b"")
        self.server.clock.advance(0.5)
        self.assertIn(b"+OK alice's maildrop", client.take())

    def test_mailbox_in_use_from_a_penalized_host_waits_too(self) -> None:
        # The right password, refused for the lock: at once, it was an oracle too.
        holder = self.server.connect("10.0.0.2")
        self.assertIn(b"+OK alice's maildrop", holder.login())
        self.fail_logins(2)
        client = self.server.connect()
        self.assertEqual(client.login(), b"+OK send PASS\r\n")
        self.server.clock.advance(1.9)
        self.assertEqual(client.take(), b"")
        self.server.clock.advance(0.1)
        self.assertEqual(client.take(), b"-ERR [IN-USE] mailbox is locked by another session\r\n")
        self.assertEqual(self.server.factory.failed_logins.failures("10.0.0.1"), 2)

    def assert_released(self, client: Any, checker: SlowChecker | None = None) -> None:
        """The session is gone at once, unanswered, and the mailbox it had
        opened is free; nothing was cleared for the guesser to see."""
        self.assertEqual(client.take(), b"")
        client.lose()
        self.assertEqual((len(self.server.guarded.protocols), self.server.stats.current), (0, 0))
        self.assertEqual(self.server.clock.getDelayedCalls(), [])
        self.assertEqual(self.server.factory.failed_logins.failures("10.0.0.1"), 2)
        other = self.server.connect("10.0.0.2")
        answer = other.login()
        if checker is not None:
            checker.pending.callback(b"alice")
            answer += other.take()
        self.assertIn(b"+OK alice's maildrop", answer)  # not -ERR [IN-USE]

    def test_hang_up_while_a_right_password_waits_frees_the_slot_and_mailbox(self) -> None:
        self.fail_logins(2)
        client = self.server.connect()
        self.assertEqual(client.login(), b"+OK send PASS\r\n")
        locked = self.server.connect("10.0.0.2")
        self.assertIn(b"-ERR [IN-USE]", locked.login())  # held for the answer
        locked.lose()
        client.guard.readConnectionLost()  # the client hangs up: EOF
        self.assertTrue(client.closed)  # at once, not after the wait
        self.assert_released(client)

    def test_reset_while_a_right_password_waits_frees_the_mailbox(self) -> None:
        self.fail_logins(2)
        client = self.server.connect()
        client.login()
        client.lose()  # a reset: connectionLost without EOF
        self.assert_released(client)

    def test_hang_up_while_the_right_password_is_checked(self) -> None:
        checker = SlowChecker()
        self.server = Server(self, checkers=[checker])
        for _ in range(2):
            guess = self.server.connect()
            guess.login(b"alice", b"wrong")
            checker.pending.errback(UnauthorizedLogin())
            guess.lose()
        client = self.server.connect()
        client.login(b"alice", b"secret")
        client.guard.readConnectionLost()
        self.assertFalse(client.closed)  # the check is in progress
        checker.pending.callback(b"alice")
        self.assertTrue(client.closed)  # the mailbox opened, then closed: no answer
        self.assert_released(client, checker)

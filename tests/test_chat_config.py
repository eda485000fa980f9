"""The chat server's settings, and the shared pieces it needed: checked
--auth descriptions, settings that must go together, strcred's memory: fix."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase

from sockproto import auth, config
from tests.support import temp_dir
from tests.test_config import parse


class ChatSettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        chat = config.build({}).chat
        self.assertEqual(
            (chat.port, chat.max_clients, chat.max_line, chat.idle_timeout, chat.history),
            ("9001", 1000, 4096, 0.0, 20),
        )
        self.assertEqual(
            (chat.max_pending, chat.rate, chat.auth, chat.login_delay), (1 << 20, (20.0, 40.0), False, 1.0)
        )

    def test_command_line(self) -> None:
        chat = parse(
            "--chat-max-pending", "64k", "--chat-rate", "5", "--chat-login-delay", "0", "--chat-history", "0"
        ).settings.chat
        self.assertEqual(
            (chat.max_pending, chat.rate, chat.login_delay, chat.history), (65536, (5.0, 10.0), 0.0, 0)
        )

    def test_login_without_accounts_is_refused(self) -> None:
        error = self.assertRaises(SystemExit, parse, "--chat-auth")
        self.assertIn("--chat-auth ([chat] auth): no one could log in", str(error.code))
        # anonymous takes no password: still no one could log in
        error = self.assertRaises(SystemExit, parse, "--chat-auth", "--auth", "anonymous")
        self.assertIn("no one could log in", str(error.code))
        # fine when chat is off
        self.assertTrue(parse("--chat-auth", "--chat-port", "off").settings.chat.auth)

    def test_auth_checked_in_the_config_file_too(self) -> None:
        path = Path(temp_dir(self), "auth.toml")
        for text, expected in {
            'auth = ["bogus:x"]\n': "auth: unknown checker 'bogus'",
            'auth = ["memory:alice"]\n': "auth: bad checker 'memory': argstring must be in format",
            "auth = [3]\n": "auth: expected a list of strings",
        }.items():
            path.write_text(text)
            error = self.assertRaises(config.ConfigError, config.load, str(path))
            self.assertIn(expected, str(error))
        path.write_text('auth = "memory:alice:secret"\n[chat]\nauth = true\n')
        settings, _ = config.load(str(path))
        self.assertEqual(settings.suite.auth, ("memory:alice:secret",))


class CheckerTests(SynchronousTestCase):
    def check(self, description: str, user: bytes, password: bytes) -> object:
        settings = config.build({("suite", "auth"): ((description,), "--auth")})
        (checker,) = auth.checkers(settings)
        results: list[object] = []
        checker.requestAvatarId(UsernamePassword(user, password)).addBoth(results.append)
        return results[0]

    def test_memory_checker_takes_bytes_credentials(self) -> None:
        # strcred stores str, so without the fix no memory: login could succeed
        self.assertEqual(self.check("memory:alice:secret:bob:pw", b"alice", b"secret"), b"alice")
        self.assertEqual(self.check("memory:alice:s\xe9cret", b"alice", "s\xe9cret".encode()), b"alice")
        failure = self.check("memory:alice:secret", b"alice", b"wrong")
        self.assertTrue(failure.check(UnauthorizedLogin))  # type: ignore[attr-defined]

    def test_file_checker(self) -> None:
        path = os.path.join(temp_dir(self), "users.txt")
        Path(path).write_text("carol:hunter2\n")
        self.assertEqual(self.check(f"file:{path}", b"carol", b"hunter2"), b"carol")

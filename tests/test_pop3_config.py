"""POP3 settings that cannot work together are refused at start, in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockproto import config, pop3
from sockproto.endpoints import loopback_only
from sockproto.stats import Stats
from tests.support import temp_dir
from tests.test_pop3_e2e import make_certificate


def build(**values: Any) -> Any:
    raw = {}
    for key, value in values.items():
        section, _, name = key.partition("__")
        raw[(section, name)] = (value, f"--{name}")
    return pop3.build(config.build(raw), Stats(), Clock())


class LoopbackTests(SynchronousTestCase):
    def test_loopback_only(self) -> None:
        for description in (
            "tcp:1110:interface=127.0.0.1",
            "tcp:1110:interface=127.1.2.3",
            "tcp6:1110:interface=\\:\\:1",
            "ssl:995:privateKey=k.pem:interface=127.0.0.1",
            "unix:/tmp/pop3.sock",
            "tcp:1110:interface=localhost",
        ):
            self.assertTrue(loopback_only(description), description)
        for description in (
            "tcp:1110",
            "tcp:1110:interface=0.0.0.0",
            "tcp6:1110:interface=\\:\\:",
            "tcp:1110:interface=192.168.1.5",
            "ssl:995:privateKey=k.pem",
            "systemd:domain=INET:index=0",
        ):
            self.assertFalse(loopback_only(description), description)


class BuildTests(SynchronousTestCase):
    def test_off(self) -> None:
        self.assertIsNone(build(pop3__port="off"))

    def test_no_auth_beyond_loopback_is_refused(self) -> None:
        for values in ({"suite__interface": "0.0.0.0"}, {"pop3__port": "tcp:1110"}):
            error = self.assertRaises(config.ConfigError, build, **values)
            self.assertIn(
                "without --auth any password is accepted, so POP3 listens on loopback only", str(error)
            )

    def test_auth_beyond_loopback_is_allowed(self) -> None:
        self.assertIsNotNone(build(suite__interface="0.0.0.0", suite__auth=["memory:a:b"]))

    def test_require_tls_needs_a_way_to_tls(self) -> None:
        error = self.assertRaises(config.ConfigError, build, pop3__require_tls=True)
        self.assertEqual(
            str(error), "--pop3-require-tls: needs --tls-cert and --tls-key (for STLS) or an ssl: endpoint"
        )

    def test_tls_files(self) -> None:
        folder = Path(temp_dir(self))
        cert, key = make_certificate(folder)
        self.assertIsNotNone(build(suite__tls_cert=cert, suite__tls_key=key, pop3__require_tls=True))
        combined = folder / "combined.pem"
        combined.write_bytes(Path(cert).read_bytes() + Path(key).read_bytes())
        self.assertIsNotNone(build(suite__tls_cert=str(combined)))
        _, other_key = make_certificate(folder / "other")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=cert, suite__tls_key=other_key)
        self.assertIn(f"--tls-cert/--tls-key: cannot use {cert}:", str(error))
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=key, suite__tls_key=key)
        self.assertIn("no PEM certificate in it", str(error))
        error = self.assertRaises(config.ConfigError, build, suite__tls_key=key)
        self.assertEqual(str(error), "--tls-key: needs --tls-cert too")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=str(folder / "missing.pem"))
        self.assertIn("No such file", str(error))

    def test_defaults(self) -> None:
        settings = config.build({})
        self.assertEqual(
            (
                settings.pop3.port,
                settings.pop3.maildir,
                settings.pop3.max_clients,
                settings.pop3.idle_timeout,
            ),
            ("1110", "mail", 100, 600.0),
        )
        self.assertEqual(settings.pop3.auth_delay, 1.0)

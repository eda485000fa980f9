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
        for values in (
            {"suite__interface": "0.0.0.0"},
            {"pop3__port": "tcp:1110:interface=0.0.0.0"},
            {"suite__interface": "0.0.0.0", "pop3__port": "tcp:1110"},
        ):
            error = self.assertRaises(config.ConfigError, build, **values)
            self.assertIn(
                "without --auth any password is accepted, so POP3 listens on loopback only", str(error)
            )

    def test_an_endpoint_naming_no_interface_binds_the_loopback_interface(self) -> None:
        # It used to bind every address, and so was refused without --auth.
        listener = build(pop3__port="tcp:1110")
        self.assertEqual(listener.where, "tcp:1110:interface=127.0.0.1")

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
        self.assertEqual(
            str(error),
            f"--tls-key: the private key in {other_key} does not belong to the certificate in {cert}",
        )
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=key, suite__tls_key=key)
        self.assertEqual(str(error), f"--tls-cert: no PEM certificate in {key}")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=cert, suite__tls_key=cert)
        self.assertEqual(str(error), f"--tls-key: no PEM private key in {cert}")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=cert)
        self.assertEqual(str(error), f"--tls-cert: no PEM private key in {cert}")
        error = self.assertRaises(config.ConfigError, build, suite__tls_key=key)
        self.assertEqual(str(error), "--tls-key: needs --tls-cert too")
        missing = str(folder / "missing.pem")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=missing)
        self.assertEqual(str(error), f"--tls-cert: cannot read {missing}: No such file or directory")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=cert, suite__tls_key=missing)
        self.assertEqual(str(error), f"--tls-key: cannot read {missing}: No such file or directory")

    def test_encrypted_key(self) -> None:
        from cryptography.hazmat.primitives import serialization

        folder = Path(temp_dir(self))
        cert, key = make_certificate(folder)
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        encrypted = folder / "encrypted.pem"
        encrypted.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        error = self.assertRaises(
            config.ConfigError, build, suite__tls_cert=cert, suite__tls_key=str(encrypted)
        )
        self.assertEqual(
            str(error), f"--tls-key: the private key in {encrypted} is encrypted; give it unencrypted"
        )

    def test_tls_files_checked_with_pop3_off(self) -> None:
        folder = Path(temp_dir(self))
        missing = str(folder / "missing.pem")
        error = self.assertRaises(config.ConfigError, build, suite__tls_cert=missing, pop3__port="off")
        self.assertIn("--tls-cert: cannot read", str(error))
        cert, key = make_certificate(folder)
        self.assertIsNone(build(suite__tls_cert=cert, suite__tls_key=key, pop3__port="off"))

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

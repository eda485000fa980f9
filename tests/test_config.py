"""The settings model, the TOML file and the command line agree."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from sockproto import checks, config, tap
from sockproto.config import ConfigError
from sockproto.endpoints import datagram_address, loopback_only, stream_description
from sockproto.listening import describe
from tests.support import temp_dir

REPO = Path(__file__).resolve().parent.parent


def write(tmp: str, text: str) -> str:
    path = os.path.join(tmp, "sockproto.toml")
    Path(path).write_text(text)
    return path


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class DefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        settings = config.build({})
        self.assertEqual(settings.suite.interface, "127.0.0.1")
        self.assertEqual(
            (settings.strip.port, settings.strip.max_clients, settings.strip.max_line), ("9000", 10, 65536)
        )
        self.assertEqual(settings.strip.idle_timeout, 300)
        self.assertEqual(
            [settings.chat.port, settings.udp.port, settings.http.port, settings.pop3.port],
            ["9001", "9002", "8080", "1110"],
        )

    def test_example_file_lists_every_key_with_its_default(self) -> None:
        shipped = (REPO / "sockproto.example.toml").read_text()
        self.assertEqual(shipped, config.example_toml(), "regenerate: python -m sockproto example-config")
        document = tomllib.loads(shipped)
        values = {(("suite", k) if not isinstance(v, dict) else None): v for k, v in document.items()}
        values.pop(None, None)
        for section in config.SERVICES:
            for key, value in document[section].items():
                values[(section, key)] = value
        self.assertEqual(set(values), {(s.section, s.key) for s in config.specs()})
        self.assertEqual(config.build({k: (v, "x") for k, v in values.items()}), config.build({}))


class TomlTests(SynchronousTestCase):
    def test_file_values(self) -> None:
        path = write(self.mktemp_dir(), '[strip]\nport = 9100\nmax_clients = 3\n[chat]\nrate = "5/10"\n')
        settings, used = config.load(path)
        self.assertEqual((settings.strip.port, settings.strip.max_clients), ("9100", 3))
        self.assertEqual(settings.chat.rate, (5.0, 10.0))
        self.assertEqual(str(used), path)

    def test_command_line_wins(self) -> None:
        path = write(self.mktemp_dir(), "[strip]\nmax_clients = 3\nport = 9100\n")
        options = parse("--config", path, "--max-clients", "7")
        self.assertEqual(options.settings.strip.max_clients, 7)
        self.assertEqual(options.settings.strip.port, "9100")

    def test_errors_name_file_and_key(self) -> None:
        tmp = self.mktemp_dir()
        cases = {
            "[strip]\nmax_clientz = 3\n": "[strip] max_clientz: unknown setting",
            "[strip]\nmax_clients = 'many'\n": "[strip] max_clients: expected a whole number",
            "[strip]\nport = 70000\n": "[strip] port: port out of range",
            "[chat]\nport = 'tcp:abc'\n": "[chat] port: malformed endpoint",
            "colour = 'blue'\n": "colour: unknown setting",
            "[strip\n": "not valid TOML",
            "strip = 3\n": "[strip] must be a table",
            "auth = ['nonsense:x']\n": "auth: unknown checker 'nonsense'",
            "auth = ['file:/no/such/users.txt']\n": "auth: file:/no/such/users.txt: no such users file",
        }
        for text, expected in cases.items():
            error = self.assertRaises(config.ConfigError, config.load, write(tmp, text))
            self.assertIn(expected, str(error))

    def test_env_then_local_file(self) -> None:
        tmp = self.mktemp_dir()
        write(tmp, "[strip]\nmax_clients = 4\n")
        old = os.getcwd()
        self.addCleanup(os.chdir, old)
        os.chdir(tmp)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != config.CONFIG_ENV})
        self.assertEqual(config.load()[0].strip.max_clients, 4)
        other = os.path.join(tmp, "other.toml")
        Path(other).write_text("[strip]\nmax_clients = 5\n")
        os.environ[config.CONFIG_ENV] = other
        self.assertEqual(config.load()[0].strip.max_clients, 5)

    def mktemp_dir(self) -> str:
        return temp_dir(self)


class CommandLineTests(SynchronousTestCase):
    def test_every_option_has_a_flag_or_parameter(self) -> None:
        names = {p[0] for p in tap.Options.optParameters} | {f[0] for f in tap.Options.optFlags}
        for spec in config.specs():
            if spec.key != "auth" or spec.section != "suite":
                self.assertIn(spec.cli, names)

    def test_flags_and_auth(self) -> None:
        options = parse("--chat-auth", "--auth", "memory:alice:secret", "--auth", "memory:bob:pw")
        self.assertTrue(options.settings.chat.auth)
        self.assertEqual(options.settings.suite.auth, ("memory:alice:secret", "memory:bob:pw"))

    def test_bad_value_is_one_line_and_fails(self) -> None:
        for argv, expected in [
            (["--max-clients", "lots"], "--max-clients: expected a whole number"),
            (["--port", "99999"], "--port: port out of range"),
            (["--udp-mode", "chargen"], "--udp-mode: expected one of"),
            (["--bogus"], "option --bogus not recognized"),
            (["--auth", "nonsense:x"], "Auth plugin not recognized"),
        ]:
            error = self.assertRaises(SystemExit, parse, *argv)
            message = str(error.code)
            self.assertIn(expected, message)
            self.assertNotIn("\n", message)


class EndpointTests(SynchronousTestCase):
    def test_bare_port_gets_interface(self) -> None:
        self.assertEqual(stream_description("9000", "127.0.0.1"), "tcp:9000:interface=127.0.0.1")
        self.assertEqual(stream_description("9000", "::1"), "tcp6:9000:interface=\\:\\:1")
        self.assertEqual(stream_description("unix:/tmp/s", "127.0.0.1"), "unix:/tmp/s")
        self.assertIsNone(stream_description("off", "127.0.0.1"))

    def test_ssl_endpoints_take_the_suites_tls_files_unless_they_name_their_own(self) -> None:
        files = ("/etc/x/cert.pem", "/etc/x/key.pem")
        self.assertEqual(
            stream_description("ssl:995", "127.0.0.1", files),
            "ssl:995:privateKey=/etc/x/key.pem:certKey=/etc/x/cert.pem:interface=127.0.0.1",
        )
        self.assertEqual(
            stream_description("ssl:995:privateKey=k.pem:interface=10.0.0.1", "127.0.0.1", files),
            "ssl:995:privateKey=k.pem:interface=10.0.0.1",
        )
        self.assertEqual(
            stream_description("ssl:995", "127.0.0.1", ("C:/both.pem", "")),
            "ssl:995:privateKey=C\\:/both.pem:certKey=C\\:/both.pem:interface=127.0.0.1",
        )
        # No files: Twisted's default (server.pem); a tcp: endpoint takes none.
        self.assertEqual(stream_description("ssl:995", "127.0.0.1"), "ssl:995:interface=127.0.0.1")
        # Files named by position count too: Twisted would be given the key twice.
        self.assertEqual(
            stream_description("ssl:995:k.pem:c.pem", "127.0.0.1", files),
            "ssl:995:k.pem:c.pem:interface=127.0.0.1",
        )
        self.assertEqual(stream_description("tcp:995", "127.0.0.1", files), "tcp:995:interface=127.0.0.1")

    def test_every_endpoint_form_binds_the_interface_unless_it_names_one(self) -> None:
        files = ("cert.pem", "key.pem")
        for spec, interface, expected in (
            ("tcp:9000", "127.0.0.1", "tcp:9000:interface=127.0.0.1"),
            ("tcp:port=9000:backlog=8", "10.0.0.1", "tcp:port=9000:backlog=8:interface=10.0.0.1"),
            ("tcp:9000", "::1", "tcp:9000:interface=\\:\\:1"),
            ("ssl:995", "127.0.0.1", "ssl:995:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"),
            ("ssl:995:privateKey=k.pem", "::1", "ssl:995:privateKey=k.pem:interface=\\:\\:1"),
            # tcp6: the IPv6 counterpart of an IPv4 --interface.
            ("tcp6:9000", "::1", "tcp6:9000:interface=\\:\\:1"),
            ("tcp6:9000", "127.0.0.1", "tcp6:9000:interface=\\:\\:1"),
            ("tcp6:9000", "0.0.0.0", "tcp6:9000:interface=\\:\\:"),
            ("tcp6:9000", "fd00::5", "tcp6:9000:interface=fd00\\:\\:5"),
            # One that names its interface keeps it; unix: and systemd: have none.
            ("tcp:9000:interface=0.0.0.0", "127.0.0.1", "tcp:9000:interface=0.0.0.0"),
            ("tcp:interface=0.0.0.0:port=9000", "127.0.0.1", "tcp:interface=0.0.0.0:port=9000"),
            # ... by keyword or by position, as Twisted's grammar allows.
            ("tcp:9000:0.0.0.0", "127.0.0.1", "tcp:9000:0.0.0.0"),
            ("tcp6:9000:50:\\:\\:", "127.0.0.1", "tcp6:9000:50:\\:\\:"),
            (
                "ssl:995:k.pem:c.pem:TLSv1_2_METHOD:0.0.0.0",
                "127.0.0.1",
                "ssl:995:k.pem:c.pem:TLSv1_2_METHOD:0.0.0.0",
            ),
            ("tcp6:9000:interface=\\:\\:", "127.0.0.1", "tcp6:9000:interface=\\:\\:"),
            ("unix:/tmp/s", "127.0.0.1", "unix:/tmp/s"),
            ("systemd:domain=INET:index=0", "127.0.0.1", "systemd:domain=INET:index=0"),
        ):
            self.assertEqual(stream_description(spec, interface, files), expected, (spec, interface))

    def test_arguments_named_by_keyword_or_position(self) -> None:
        for description, name, expected in (
            ("tcp:9000:interface=10.0.0.1", "interface", "10.0.0.1"),
            ("tcp:9000:10.0.0.1:backlog=5", "interface", "10.0.0.1"),
            ("tcp:9000:10.0.0.1:5", "backlog", "5"),
            ("tcp6:9000:50:fd00\\:\\:1", "interface", "fd00::1"),
            ("tcp6:9000:interface=\\:\\:1", "interface", "::1"),
            ("tcp6:9000:50", "interface", None),
            ("ssl:995:privateKey=a\\=b.pem:interface=0.0.0.0", "interface", "0.0.0.0"),
            ("ssl:995:k.pem:c.pem:TLSv1_2_METHOD:127.0.0.1", "interface", "127.0.0.1"),
            ("ssl:995:k.pem", "privateKey", "k.pem"),
            ("ssl:995:k.pem:c.pem", "interface", None),
            ("unix:/tmp/s:660:20", "backlog", "20"),
            ("unix:/tmp/s", "interface", None),
            ("tcp:9000:backlog=5", "interface", None),
            ("tcp:9000:interfaces=x", "interface", None),
        ):
            self.assertEqual(checks.endpoint_argument(description, name), expected, (description, name))
        # What POP3 without --auth is allowed on goes by the same reading.
        self.assertTrue(loopback_only("tcp:1110:127.0.0.1"))
        self.assertFalse(loopback_only("tcp:1110:0.0.0.0"))
        self.assertFalse(checks.lacks_tls_files("ssl:995:k.pem"))
        self.assertTrue(checks.lacks_tls_files("ssl:995:interface=127.0.0.1"))

    def test_tcp6_with_an_ipv4_interface_it_cannot_bind(self) -> None:
        error = self.assertRaises(
            ConfigError, stream_description, "tcp6:9000", "192.168.1.5", service="strip"
        )
        self.assertEqual(
            str(error),
            "strip: tcp6:9000 names no interface= and tcp6 cannot bind --interface 192.168.1.5 (IPv4); "
            "name one, e.g. tcp6:9000:interface=\\:\\:1",
        )

    def test_the_log_names_a_tls_port_ssl(self) -> None:
        # A TLS port's address is its TCP port's: the scheme comes from the description.
        self.assertEqual(describe(IPv4Address("TCP", "127.0.0.1", 995)), "tcp:127.0.0.1:995")
        self.assertEqual(describe(IPv4Address("TCP", "127.0.0.1", 995), tls=True), "ssl:127.0.0.1:995")
        self.assertEqual(describe(IPv6Address("TCP", "::1", 995), tls=True), "ssl:[::1]:995")
        self.assertEqual(describe(IPv6Address("TCP", "::1", 9000)), "tcp6:[::1]:9000")

    def test_port_checks(self) -> None:
        self.assertEqual(checks.stream_port(9000), "9000")
        self.assertEqual(checks.stream_port("OFF"), "off")
        self.assertEqual(checks.stream_port("tcp6:9000:interface=\\:\\:1"), "tcp6:9000:interface=\\:\\:1")
        for bad in ("tcp:", "http:80", "-1", "9000x", True, "tcp:99999"):
            self.assertRaises(ValueError, checks.stream_port, bad)
        # An ssl: endpoint whose files come from --tls-cert/--tls-key: its port is checked too.
        self.assertEqual(checks.stream_port("ssl:995"), "ssl:995")
        self.assertRaises(ValueError, checks.stream_port, "ssl:99999")

    def test_udp(self) -> None:
        self.assertEqual(datagram_address("9002", "127.0.0.1"), (9002, "127.0.0.1"))
        self.assertEqual(datagram_address("udp:9002:interface=::1", "127.0.0.1"), (9002, "::1"))
        self.assertEqual(datagram_address("udp:9002", "10.0.0.1"), (9002, "10.0.0.1"))
        self.assertIsNone(datagram_address("off", "127.0.0.1"))
        self.assertRaises(ValueError, checks.datagram_port, "udp:x")

    def test_other_checks(self) -> None:
        self.assertEqual(checks.rate("20"), (20.0, 40.0))
        self.assertEqual(checks.rate("0"), (0.0, 0.0))
        self.assertEqual(checks.byte_size("64k"), 65536)
        self.assertEqual(checks.byte_size("1MiB"), 1048576)
        self.assertEqual(checks.seconds("0.5"), 0.5)
        for check, bad in [
            (checks.seconds, "-1"),
            (checks.seconds, "nan"),
            (checks.rate, "x"),
            (checks.interface, "host"),
        ]:
            self.assertRaises(ValueError, check, bad)


class ReadmeTests(SynchronousTestCase):
    def test_every_option_documented(self) -> None:
        readme = (REPO / "README.md").read_text()
        for spec in config.specs():
            self.assertIn(f"`--{spec.cli}", readme, f"README.md does not document --{spec.cli}")

"""The suite as operators start it: twistd plugin, .tac, config files, bad input."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sockproto import config
from tests.support import ALL_OFF, REPO, Suite, recv_until, run_twistd, temp_dir, wait_for
from tests.test_pop3_e2e import make_certificate

TAC = REPO / "tac" / "sockproto.tac"


def strip_works(suite: Suite) -> bool:
    with suite.connect("strip") as sock:
        sock.sendall(b"a b\n")
        return recv_until(sock, lambda d: d.endswith(b"\0")) == b"ab\x00"


class HelpTests(SynchronousTestCase):
    def test_twistd_lists_plugin(self) -> None:
        result = run_twistd(["--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("sockproto", result.stdout)

    def test_help_shows_every_option_with_default(self) -> None:
        result = run_twistd(["-n", "sockproto", "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        text = " ".join(result.stdout.split())
        for spec in config.specs():
            self.assertIn(f"--{spec.cli}", text)
            if spec.key != "auth" or spec.section != "suite":
                self.assertIn(f"[default: {config.show(spec.default)};", text)


class StartAndStopTests(SynchronousTestCase):
    def test_logs_each_service_and_stop(self) -> None:
        suite = Suite([*ALL_OFF, "--port", "0"]).start()
        host, _port = suite.address("strip")
        self.assertEqual(host, "127.0.0.1")
        self.assertTrue(strip_works(suite))
        self.assertEqual(suite.stop(), 0)
        self.assertTrue(suite.saw("strip stopped"))
        self.assertFalse(suite.saw("Traceback"))

    def test_ipv6_endpoint(self) -> None:
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        with Suite([*ALL_OFF, "--port", "tcp6:0:interface=\\:\\:1"]) as suite:
            self.assertEqual(suite.address("strip")[0], "::1")
            with socket.create_connection(suite.address("strip"), timeout=10) as sock:
                sock.sendall(b"v 6\n")
                self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"v6\x00")

    def test_endpoints_naming_no_interface_bind_the_interface_and_the_log_says_ssl(self) -> None:
        """The README's POP3S example, ``ssl:PORT`` with the suite's TLS files,
        and ``tcp:PORT`` listen on --interface only, not on every address."""
        folder = Path(temp_dir(self))
        cert, key = make_certificate(folder / "tls")
        args = ["--port", "tcp:0", "--pop3-port", "ssl:0", "--tls-cert", cert, "--tls-key", key]
        with Suite([*ALL_OFF, *args, "--maildir", str(folder / "mail")], cwd=str(folder)) as suite:
            self.assertEqual(suite.address("strip")[0], "127.0.0.1")
            host, port = suite.address("pop3")
            self.assertEqual(host, "127.0.0.1")
            self.assertTrue(suite.saw(f"pop3 listening on ssl:127.0.0.1:{port}"), suite.output)
            self.assertEqual(listening_on(port), {"127.0.0.1"})
            self.assertTrue(strip_works(suite))
            context = ssl.create_default_context(cafile=cert)
            with context.wrap_socket(suite.connect("pop3"), server_hostname="localhost") as tls:
                self.assertTrue(recv_until(tls, lambda d: d.endswith(b"\r\n")).startswith(b"+OK"))

    def test_unix_endpoint(self) -> None:
        path = os.path.join(temp_dir(self), "strip.sock")
        with Suite([*ALL_OFF, "--port", f"unix:{path}"]), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"u x\n")
            self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"ux\x00")

    def test_config_file_then_command_line(self) -> None:
        folder = temp_dir(self)
        path = Path(folder, "custom.toml")
        path.write_text(
            '[strip]\nport = 0\nmax_clients = 1\n[chat]\nport = "off"\n[udp]\nport = "off"\n'
            '[http]\nport = "off"\n[pop3]\nport = "off"\n'
        )
        with Suite(["--config", str(path)]) as suite:
            self.assertTrue(suite.saw(f"settings: {path}"))
            first = suite.connect("strip")
            first.sendall(b"x\n")
            self.assertEqual(recv_until(first, lambda d: d.endswith(b"\0")), b"x\x00")
            with suite.connect("strip") as second:
                self.assertEqual(recv_until(second, lambda d: d.endswith(b"\n")), b"too many users\r\n")
            first.close()
        with Suite(["--config", str(path), "--max-clients", "2"]) as suite:
            with suite.connect("strip") as one, suite.connect("strip") as two:
                for sock in (one, two):
                    sock.sendall(b"o k\n")
                    self.assertEqual(recv_until(sock, lambda d: d.endswith(b"\0")), b"ok\x00")

    def test_tac_reads_env_then_local_file(self) -> None:
        folder = temp_dir(self)
        Path(folder, "sockproto.toml").write_text(
            '[strip]\nport = 0\nmax_clients = 1\n[chat]\nport = "off"\n[udp]\nport = "off"\n'
            '[http]\nport = "off"\n[pop3]\nport = "off"\n'
        )
        with Suite(tac=TAC, cwd=folder) as suite:
            self.assertTrue(suite.saw("settings: sockproto.toml"))
            self.assertTrue(strip_works(suite))
        elsewhere = Path(temp_dir(self), "env.toml")
        elsewhere.write_text(
            'interface = "127.0.0.1"\n[strip]\nport = 0\n[chat]\nport = "off"\n'
            '[udp]\nport = "off"\n[http]\nport = "off"\n[pop3]\nport = "off"\n'
        )
        with Suite(tac=TAC, cwd=folder, env={"SOCKPROTO_CONFIG": str(elsewhere)}) as suite:
            self.assertTrue(suite.saw(f"settings: {elsewhere}"))
            self.assertTrue(strip_works(suite))

    def test_daemon_mode_with_logfile_and_pidfile(self) -> None:
        folder = temp_dir(self)
        logfile, pidfile = os.path.join(folder, "sockproto.log"), os.path.join(folder, "sockproto.pid")
        result = run_twistd(
            ["-l", logfile, "--pidfile", pidfile, "sockproto", *ALL_OFF, "--port", "0"], cwd=folder
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        pid = int(
            wait_for(lambda: Path(pidfile).exists() and Path(pidfile).read_text().strip(), what="pidfile")
        )
        self.addCleanup(_kill_quietly, pid)
        wait_for(lambda: "sockproto ready" in Path(logfile).read_text(), what="ready line in the log file")
        # logrotate's way: move the file, SIGHUP; the daemon goes on in a new one.
        os.rename(logfile, logfile + ".1")
        os.kill(pid, signal.SIGHUP)
        reopened = f"SIGHUP: log files reopened: {logfile}"
        wait_for(lambda: os.path.exists(logfile) and reopened in Path(logfile).read_text(), what="new log")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(pidfile).exists(), what="pidfile removed at stop")
        self.assertIn("strip stopped", Path(logfile).read_text())

    def test_json_logger(self) -> None:
        folder = temp_dir(self)
        suite = Suite(
            [*ALL_OFF, "--port", "0"], cwd=folder, twistd_args=["--logger", "tests.observers.json_to_stdout"]
        ).start(ready=False)
        wait_for(lambda: suite.saw('"sockproto ready: {services}"'), what="JSON ready event")
        self.assertTrue(suite.saw('"service": "strip"'))
        self.assertEqual(suite.stop(), 0)


def listening_on(port: int) -> set[str]:
    """The addresses the kernel has a TCP socket listening on ``port`` at
    (IPv4, from /proc/net/tcp: ``0100007F:PORT`` is 127.0.0.1)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, local_port = local.partition(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class BadConfigurationTests(SynchronousTestCase):
    """One clear line naming the option or key, a non-zero exit, no traceback."""

    def assert_refused(self, args: list[str], expected: str, cwd: str | None = None) -> None:
        result = run_twistd(["-n", "--pidfile", "", "sockproto", *args], cwd=cwd)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn(expected, result.stderr)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)

    def test_bad_options(self) -> None:
        self.assert_refused(["--max-clients", "ten"], "--max-clients: expected a whole number, got 'ten'")
        self.assert_refused(["--port", "65536"], "--port: port out of range 0-65535: 65536")
        self.assert_refused(["--chat-port", "tcp:9001:backlog=x"], "--chat-port: malformed endpoint")
        self.assert_refused(["--prot", "9000"], "option --prot not recognized")

    def test_tcp6_endpoint_and_an_ipv4_interface_it_cannot_bind(self) -> None:
        self.assert_refused(
            [*ALL_OFF, "--port", "tcp6:0", "--interface", "192.0.2.1"],
            "strip: tcp6:0 names no interface= and tcp6 cannot bind --interface 192.0.2.1 (IPv4); "
            "name one, e.g. tcp6:0:interface=\\:\\:1",
        )

    def test_bad_config_file(self) -> None:
        folder = temp_dir(self)
        path = Path(folder, "bad.toml")
        path.write_text("[strip]\nmax_clients = true\n")
        self.assert_refused(["--config", str(path)], "[strip] max_clients: expected a whole number, got True")
        path.write_text("[strip]\nportt = 9000\n")
        self.assert_refused(["--config", str(path)], "[strip] portt: unknown setting")
        self.assert_refused(["--config", str(Path(folder, "missing.toml"))], "missing.toml: cannot read")

    def test_bad_config_for_tac(self) -> None:
        folder = temp_dir(self)
        Path(folder, "sockproto.toml").write_text("[strip]\nidle_timeout = -3\n")
        result = run_twistd(["-n", "--pidfile", "", "-y", str(TAC)], cwd=folder)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("[strip] idle_timeout: must be a finite number >= 0", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            folder = temp_dir(self)
            started = time.monotonic()
            self.assert_refused(
                [*ALL_OFF, "--port", str(port)],
                f"strip: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use",
                cwd=folder,
            )
            self.assertLess(time.monotonic() - started, 30)
            self.assertFalse(Path(folder, "twistd.pid").exists())

    def test_no_half_started_suite(self) -> None:
        """A taken UDP port stops the strip server that did start."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            result = run_twistd(
                ["-n", "--pidfile", "", "sockproto", *ALL_OFF, "--port", "0", "--udp-port", str(port)]
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("udp: cannot listen on", result.stderr)
            self.assertIn("strip listening on", result.stdout)
            self.assertNotIn("sockproto ready", result.stdout)


class ServiceSetTests(SynchronousTestCase):
    def test_only_enabled_services_have_stats(self) -> None:
        from sockproto.config import build
        from sockproto.service import make_service

        suite = make_service(build({("strip", "port"): ("off", "test")}))  # built, not started
        self.assertNotIn("strip", suite.stats.services)
        self.assertNotIn("strip", [child.name for child in suite])
